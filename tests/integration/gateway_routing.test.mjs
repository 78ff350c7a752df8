// Routing by the body's "model", the headers the gateway adds, model
// rewriting, path/query forwarding and api_key injection.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, request, postJson, chat, checkErrorShape, model } from './lib.mjs';

let fa, fb, fc, gw;

before(async () => {
    [fa, fb, fc] = await Promise.all([
        startFake({ name: 'fa' }), startFake({ name: 'fb' }), startFake({ name: 'fc' }),
    ]);
    gw = await startGateway({
        threads: 2,
        models: [
            model('alpha', [{ url: fa.url }]),
            model('beta', [{ url: fb.url, served_model: 'Beta-Served-7B' }]),
            model('gamma', [{ url: fc.url, api_key: '${MM_TEST_API_KEY}' }]),
        ],
    }, { env: { MM_TEST_API_KEY: 'sk-test-from-env-42' } });
});

after(async () => {
    await gw?.stop();
    await Promise.all([fa, fb, fc].map((f) => f?.kill()));
});

test('routing: each model reaches its own backend, with x-modelmux-* headers', async () => {
    for (const [name, fake] of [['alpha', fa], ['beta', fb], ['gamma', fc], ['alpha', fa]]) {
        const r = await chat(gw.port, name);
        assert.equal(r.status, 200, r.body);
        const j = r.json();
        assert.equal(j.fake.name, fake.name, `model ${name} answered by ${j.fake.name}`);
        assert.equal(j.choices[0].message.content, `hello from ${fake.name}`);
        assert.equal(r.headers['x-modelmux-model'], name);
        assert.equal(r.headers['x-modelmux-backend'], fake.url);
    }
});

test('routing: any path with a JSON model is routed and forwarded unchanged', async () => {
    for (const p of ['/v1/completions', '/v1/embeddings', '/v1/rerank', '/tokenize']) {
        const r = await postJson(gw.port, p, { model: 'beta', input: 'x' });
        assert.equal(r.status, 200, `${p}: ${r.body}`);
        assert.equal(r.json().fake.name, 'fb', p);
        assert.equal(r.json().fake.path, p);
        assert.equal(r.json().fake.method, 'POST');
        assert.equal(r.headers['x-modelmux-model'], 'beta');
    }
});

test('routing: a non-streaming answer keeps upstream headers and comes with Content-Length', async () => {
    const r = await chat(gw.port, 'alpha');
    assert.equal(r.status, 200);
    assert.match(r.headers['content-type'], /^application\/json/);
    assert.equal(r.headers['x-fake-name'], 'fa', 'upstream end-to-end header passed through');
    assert.equal(r.headers['transfer-encoding'], undefined);
    assert.equal(Number(r.headers['content-length']), Buffer.byteLength(r.body));
});

test('routing: a chunked upstream answer is re-framed with Content-Length', async () => {
    const r = await chat(gw.port, 'alpha', { 'x-fake-chunked-response': '1' });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.json().fake.name, 'fa');
    assert.equal(r.headers['transfer-encoding'], undefined, 'hop-by-hop Transfer-Encoding not relayed');
    assert.equal(Number(r.headers['content-length']), Buffer.byteLength(r.body));
});

test('routing: an upstream 4xx answer is passed through as it is', async () => {
    const r = await chat(gw.port, 'alpha', { 'x-fake-mode': 'status:422' });
    assert.equal(r.status, 422);
    const j = r.json();
    assert.equal(j.error.code, 422);
    assert.equal(j.fake.name, 'fa', 'the upstream\'s own body');
    assert.equal(r.headers['x-modelmux-backend'], fa.url);
});

test('routing: unknown model is a 404 listing the available names', async () => {
    const before = (await fa.stats()).requests + (await fb.stats()).requests + (await fc.stats()).requests;
    const r = await chat(gw.port, 'no-such-model');
    const e = checkErrorShape(assert, r, 404);
    assert.equal(e.param, 'model');
    for (const n of ['alpha', 'beta', 'gamma']) assert.ok(e.message.includes(n), `message lists ${n}: ${e.message}`);
    const afterCount = (await fa.stats()).requests + (await fb.stats()).requests + (await fc.stats()).requests;
    assert.equal(afterCount, before, 'nothing forwarded');
});

test('routing: JSON without model is a 400', async () => {
    const r = await postJson(gw.port, '/v1/chat/completions', { messages: [] });
    checkErrorShape(assert, r, 400);
});

test('routing: invalid JSON is a 400', async () => {
    const r = await request(gw.port, { method: 'POST', path: '/v1/chat/completions', body: '{"model": "alpha",', headers: { 'content-type': 'application/json' } });
    checkErrorShape(assert, r, 400);
});

test('routing: GET /v1/models lists every public model name', async () => {
    const r = await request(gw.port, { path: '/v1/models' });
    assert.equal(r.status, 200);
    assert.match(r.headers['content-type'], /^application\/json/);
    const j = r.json();
    assert.equal(j.object, 'list');
    assert.deepEqual(j.data.map((m) => m.id).sort(), ['alpha', 'beta', 'gamma']);
    for (const m of j.data) {
        assert.equal(m.object, 'model');
        assert.equal(m.owned_by, 'modelmux');
        assert.ok(Number.isInteger(m.created), `created is an integer: ${m.created}`);
    }
});

test('routing: /health answers 200 {"status":"ok"}', async () => {
    const r = await request(gw.port, { path: '/health' });
    assert.equal(r.status, 200);
    assert.equal(r.json().status, 'ok');
});

test('routing: x-request-id is generated when absent and kept when sent', async () => {
    const a = await chat(gw.port, 'alpha');
    const b = await chat(gw.port, 'alpha');
    assert.equal(typeof a.headers['x-request-id'], 'string');
    assert.ok(a.headers['x-request-id'].length >= 8, `generated id ${a.headers['x-request-id']}`);
    assert.notEqual(a.headers['x-request-id'], b.headers['x-request-id'], 'ids are unique');
    const c = await chat(gw.port, 'alpha', { 'x-request-id': 'client-req-0001' });
    assert.equal(c.headers['x-request-id'], 'client-req-0001');
    // errors carry one too
    const e = await chat(gw.port, 'nope', { 'x-request-id': 'client-req-0002' });
    assert.equal(e.status, 404);
    assert.equal(e.headers['x-request-id'], 'client-req-0002');
});

test('rewrite: served_model replaces the model, every other field is preserved', async () => {
    const sent = {
        model: 'beta',
        messages: [{ role: 'system', content: 'be "brief"\n\u00e9\u4e2d\ud83d\ude00' }, { role: 'user', content: 'x' }],
        temperature: 0.7,
        top_p: 1,
        max_tokens: 64,
        stop: ['\n\n', 'END'],
        n: 1,
        logit_bias: { 50256: -100 },
        user: 'user-1',
        response_format: { type: 'json_object' },
        tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: {} } } }],
        nothing: null,
        flag: false,
        big: 12345678901234,
    };
    const r = await postJson(gw.port, '/v1/chat/completions', sent);
    assert.equal(r.status, 200, r.body);
    const got = JSON.parse(r.json().fake.body);
    assert.equal(got.model, 'Beta-Served-7B');
    const { model: _a, ...restSent } = sent;
    const { model: _b, ...restGot } = got;
    assert.deepEqual(restGot, restSent);
    assert.equal(r.headers['x-modelmux-model'], 'beta', 'the public name in the header');
});

test('rewrite: without served_model the model is forwarded as sent', async () => {
    const sent = { model: 'alpha', messages: [{ role: 'user', content: 'q' }], seed: 7 };
    const r = await postJson(gw.port, '/v1/chat/completions', sent);
    assert.deepEqual(JSON.parse(r.json().fake.body), sent);
});

test('rewrite: path and query are forwarded unchanged', async () => {
    const p = '/v1/chat/completions?api-version=2024-02-01&q=a%2Fb%20c&empty=&x=1&x=2';
    const r = await postJson(gw.port, p, { model: 'beta', messages: [] });
    assert.equal(r.status, 200);
    assert.equal(r.json().fake.path, p);
});

test('rewrite: api_key is sent as Authorization: Bearer, with ${ENV} substituted', async () => {
    const r = await chat(gw.port, 'gamma', { authorization: 'Bearer client-key' });
    assert.equal(r.status, 200, r.body);
    const f = r.json().fake;
    assert.equal(f.headers.authorization, 'Bearer sk-test-from-env-42');
    const auths = f.raw_headers.filter((_, i) => i % 2 === 0 && f.raw_headers[i].toLowerCase() === 'authorization');
    assert.equal(auths.length, 1, 'exactly one Authorization header upstream');
    const noKey = await chat(gw.port, 'gamma');
    assert.equal(noKey.json().fake.headers.authorization, 'Bearer sk-test-from-env-42');
});

test('rewrite: without api_key the client\'s Authorization and own headers pass through', async () => {
    const r = await chat(gw.port, 'alpha', { authorization: 'Bearer client-key', 'x-custom-thing': 'kept' });
    const f = r.json().fake;
    assert.equal(f.headers.authorization, 'Bearer client-key');
    assert.equal(f.headers['x-custom-thing'], 'kept');
});
