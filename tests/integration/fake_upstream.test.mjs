// Self-test of the fake upstream and the harness, without the gateway: if
// these fail, the gateway tests' verdicts mean nothing.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import http from 'node:http';
import { startFake, request, postJson, rawRequest, parseResponses, nResponses, nowNs } from './lib.mjs';

let fake;
before(async () => { fake = await startFake({ name: 'self' }); });
after(async () => { await fake?.kill(); });

test('fake: echoes method, path, headers and body of a POST', async () => {
    const body = { model: 'm1', messages: [{ role: 'user', content: 'hé' }], temperature: 0.5 };
    const r = await postJson(fake.port, '/v1/chat/completions?a=1&b=%20', body, { 'x-custom': 'v1' });
    assert.equal(r.status, 200);
    const j = r.json();
    assert.equal(j.object, 'chat.completion');
    assert.equal(j.choices[0].message.content, 'hello from self');
    assert.equal(j.fake.name, 'self');
    assert.equal(j.fake.method, 'POST');
    assert.equal(j.fake.path, '/v1/chat/completions?a=1&b=%20');
    assert.equal(j.fake.headers['x-custom'], 'v1');
    assert.deepEqual(JSON.parse(j.fake.body), body);
    assert.equal(j.model, 'm1');
});

test('fake: GET echoes, /health answers, stats count requests', async () => {
    await fake.reset();
    const h = await request(fake.port, { path: '/health' });
    assert.equal(h.status, 200);
    assert.equal(h.json().status, 'ok');
    const g = await request(fake.port, { path: '/anything?x=1' });
    assert.equal(g.status, 200);
    assert.equal(g.json().fake.method, 'GET');
    assert.equal(g.json().fake.path, '/anything?x=1');
    const s = await fake.stats();
    assert.equal(s.requests, 1, 'health and stats are not counted');
    assert.equal(s.last.path, '/anything?x=1');
});

test('fake: x-fake-chunked-response frames a JSON answer chunked', async () => {
    const r = await postJson(fake.port, '/v1/chat/completions', { model: 'm' }, { 'x-fake-chunked-response': '1' });
    assert.equal(r.status, 200);
    assert.equal(r.headers['transfer-encoding'], 'chunked');
    assert.equal(r.headers['content-length'], undefined);
    assert.equal(r.json().fake.name, 'self');
});

test('fake: status mode answers an OpenAI error', async () => {
    const r = await postJson(fake.port, '/v1/chat/completions', { model: 'x' }, { 'x-fake-mode': 'status:503' });
    assert.equal(r.status, 503);
    assert.equal(r.json().error.code, 503);
});

test('fake: streams chunks with the requested count and delay, timestamps usable', async () => {
    const arrivals = [];
    const events = [];
    await new Promise((resolve, reject) => {
        const req = http.request({ port: fake.port, host: '127.0.0.1', method: 'POST', path: '/v1/chat/completions', agent: false,
            headers: { 'content-type': 'application/json', 'x-fake-chunks': '4', 'x-fake-delay-ms': '60' } }, (res) => {
            assert.equal(res.headers['content-type'], 'text/event-stream');
            let buf = '';
            res.setEncoding('utf8');
            res.on('data', (d) => {
                const t = nowNs();
                buf += d;
                let i;
                while ((i = buf.indexOf('\n\n')) >= 0) {
                    events.push(buf.slice(0, i));
                    arrivals.push(t);
                    buf = buf.slice(i + 2);
                }
            });
            res.on('end', resolve);
            res.on('error', reject);
        });
        req.on('error', reject);
        req.end(JSON.stringify({ model: 'm', stream: true }));
    });
    assert.equal(events.length, 5);
    assert.equal(events[4], 'data: [DONE]');
    const chunks = events.slice(0, 4).map((e) => JSON.parse(e.slice(6)));
    chunks.forEach((c, i) => {
        assert.equal(c.object, 'chat.completion.chunk');
        assert.equal(c.fake.index, i);
    });
    for (let i = 0; i + 1 < chunks.length; i++) {
        assert.ok(arrivals[i] < BigInt(chunks[i + 1].fake.sent_ns), `chunk ${i} arrived before chunk ${i + 1} was sent`);
        const gap = Number(BigInt(chunks[i + 1].fake.sent_ns) - BigInt(chunks[i].fake.sent_ns)) / 1e6;
        assert.ok(gap >= 55, `delay honoured (${gap} ms)`);
    }
});

test('fake: records a client abort with its time', async () => {
    await fake.reset();
    const sock = net.connect(fake.port, '127.0.0.1');
    await new Promise((r) => sock.on('connect', r));
    const body = JSON.stringify({ model: 'm', stream: true });
    sock.write(`POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-fake-chunks: 50\r\nx-fake-delay-ms: 100\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    await new Promise((r) => sock.once('data', r));
    const t0 = nowNs();
    sock.destroy();
    const deadline = Date.now() + 2000;
    let s;
    while (Date.now() < deadline) {
        s = await fake.stats();
        if (s.aborted > 0) break;
        await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(s.aborted, 1);
    const dt = Number(BigInt(s.aborts[0].t_ns) - t0) / 1e6;
    assert.ok(dt >= 0 && dt < 100, `abort seen ${dt} ms after the close`);
    assert.ok(s.aborts[0].chunks_sent < 50);
});

test('fake: close, badlen and midstream-close cut the connection', async () => {
    await fake.reset();
    await assert.rejects(postJson(fake.port, '/v1/chat/completions', { model: 'm' }, { 'x-fake-mode': 'close' }));
    await assert.rejects(postJson(fake.port, '/v1/chat/completions', { model: 'm' }, { 'x-fake-mode': 'badlen' }));
    const body = JSON.stringify({ model: 'm', stream: true });
    const r = await rawRequest(fake.port, `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-fake-mode: midstream-close\r\nx-fake-chunks: 5\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    assert.equal(r.closed, true);
    assert.equal((r.text.match(/chat\.completion\.chunk/g) || []).length, 2);
    assert.ok(!r.text.includes('[DONE]'));
    const s = await fake.stats();
    assert.equal(s.self_closed, 3);
    assert.equal(s.aborted, 0);
});

test('fake: hang never answers', async () => {
    const r = await rawRequest(fake.port, 'GET /x HTTP/1.1\r\nHost: x\r\nx-fake-mode: hang\r\n\r\n', { timeoutMs: 300 });
    assert.equal(r.closed, false);
    assert.equal(r.data.length, 0);
});

test('harness: rawRequest and parseResponses handle keep-alive and pipelining', async () => {
    const one = 'GET /a HTTP/1.1\r\nHost: x\r\n\r\n';
    const two = 'GET /b HTTP/1.1\r\nHost: x\r\nx-fake-first-delay-ms: 50\r\n\r\n';
    const r = await rawRequest(fake.port, one + two + 'GET /c HTTP/1.1\r\nHost: x\r\n\r\n', { until: nResponses(3) });
    const p = parseResponses(r.data);
    assert.equal(p.responses.length, 3);
    assert.deepEqual(p.responses.map((x) => JSON.parse(x.body).fake.path), ['/a', '/b', '/c']);
    // chunked responses parse too
    const c = parseResponses(Buffer.from('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nHTTP/1.1 400 Bad\r\nContent-Length: 1\r\n\r\nx'));
    assert.equal(c.responses.length, 2);
    assert.equal(c.responses[0].body.toString(), 'abcde');
    assert.equal(c.responses[1].status, 400);
});
