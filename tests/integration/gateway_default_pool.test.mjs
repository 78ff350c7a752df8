// default_pool: what has no model goes to it untouched (the Nginx upstream
// mode), while JSON with a model is still routed.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, request, postJson, chat, model } from './lib.mjs';

let fm, fd, gw;

before(async () => {
    [fm, fd] = await Promise.all([startFake({ name: 'routed' }), startFake({ name: 'pool' })]);
    gw = await startGateway({
        threads: 2,
        models: [model('m1', [{ url: fm.url }])],
        default_pool: { strategy: 'round_robin', health: false, backends: [{ url: fd.url }] },
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([fm, fd].map((f) => f?.kill()));
});

test('default_pool: GET /anything?x=1 reaches the pool with method and path intact', async () => {
    const r = await request(gw.port, { path: '/anything?x=1&y=%2F', headers: { 'x-custom': 'c1' } });
    assert.equal(r.status, 200, r.body);
    const f = r.json().fake;
    assert.equal(f.name, 'pool');
    assert.equal(f.method, 'GET');
    assert.equal(f.path, '/anything?x=1&y=%2F');
    assert.equal(f.headers['x-custom'], 'c1', 'client headers passed through');
    assert.equal(r.headers['x-fake-name'], 'pool', 'upstream headers passed back');
    assert.ok(r.headers['x-request-id'], 'x-request-id set');
});

test('default_pool: a text/plain POST reaches the pool with its body intact', async () => {
    const body = 'plain body\r\nline 2\n\u00e9 \u2603';
    const r = await request(gw.port, { method: 'POST', path: '/upload/a?b=c', body, headers: { 'content-type': 'text/plain; charset=utf-8' } });
    assert.equal(r.status, 200, r.body);
    const f = r.json().fake;
    assert.equal(f.name, 'pool');
    assert.equal(f.method, 'POST');
    assert.equal(f.path, '/upload/a?b=c');
    assert.equal(f.body, body);
    assert.equal(f.headers['content-type'], 'text/plain; charset=utf-8');
});

test('default_pool: JSON without model and invalid JSON go to the pool', async () => {
    const a = await postJson(gw.port, '/v1/chat/completions', { messages: [] });
    assert.equal(a.status, 200, a.body);
    assert.equal(a.json().fake.name, 'pool');
    assert.deepEqual(JSON.parse(a.json().fake.body), { messages: [] });
    const bad = '{"model": "m1",';
    const b = await request(gw.port, { method: 'POST', path: '/v1/chat/completions', body: bad, headers: { 'content-type': 'application/json' } });
    assert.equal(b.status, 200, b.body);
    assert.equal(b.json().fake.name, 'pool');
    assert.equal(b.json().fake.body, bad);
});

test('default_pool: other methods pass through', async () => {
    for (const method of ['PUT', 'PATCH', 'DELETE']) {
        const r = await request(gw.port, { method, path: '/res/1', body: 'payload', headers: { 'content-type': 'application/octet-stream' } });
        assert.equal(r.status, 200, `${method}: ${r.body}`);
        assert.equal(r.json().fake.method, method);
        assert.equal(r.json().fake.body, 'payload', `${method} body`);
        assert.equal(r.json().fake.headers['content-type'], 'application/octet-stream', `${method} content-type`);
    }
});

test('default_pool: upstream error statuses pass through unchanged', async () => {
    const r = await request(gw.port, { path: '/x', headers: { 'x-fake-mode': 'status:418' } });
    assert.equal(r.status, 418);
    assert.equal(r.json().fake.name, 'pool');
});

test('default_pool: JSON with a model is still routed by it', async () => {
    const r = await chat(gw.port, 'm1');
    assert.equal(r.status, 200);
    assert.equal(r.json().fake.name, 'routed');
    assert.equal(r.headers['x-modelmux-model'], 'm1');
});
