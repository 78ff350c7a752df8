// Error answers: status, exact OpenAI error shape, and that the upstream
// failure modes map to 502 / 503 / 504.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import {
    startFake, startGateway, getFreePort, request, postJson, chat, rawRequest, parseResponses,
    checkErrorShape, model,
} from './lib.mjs';

let ok, closer, hanger, badlen, zero, gw, deadPort;

before(async () => {
    [ok, closer, hanger, badlen, zero] = await Promise.all([
        startFake({ name: 'ok' }),
        startFake({ name: 'closer', mode: 'close' }),
        startFake({ name: 'hanger', mode: 'hang' }),
        startFake({ name: 'badlen', mode: 'badlen' }),
        startFake({ name: 'zero' }),
    ]);
    deadPort = await getFreePort();   // nothing listens there
    gw = await startGateway({
        threads: 2,
        max_body_bytes: 1024,
        models: [
            model('ok', [{ url: ok.url }]),
            model('dead', [{ url: `http://127.0.0.1:${deadPort}` }]),
            model('closer', [{ url: closer.url }]),
            model('hanger', [{ url: hanger.url }], { timeouts: { first_byte_ms: 500 } }),
            model('badlen', [{ url: badlen.url }]),
        ],
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([ok, closer, hanger, badlen, zero].map((f) => f?.kill()));
});

function parseOne(raw) {
    const p = parseResponses(raw.data);
    assert.ok(p.responses.length >= 1, `a response came back: ${JSON.stringify(raw.text.slice(0, 300))}`);
    const r = p.responses[0];
    return { status: r.status, headers: r.headers, body: r.body.toString('utf8') };
}

test('errors: 413 when the body is over max_body_bytes (Content-Length)', async () => {
    const before = (await ok.stats()).requests;
    const body = JSON.stringify({ model: 'ok', messages: [{ role: 'user', content: 'x'.repeat(2000) }] });
    const raw = await rawRequest(gw.port,
        `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    checkErrorShape(assert, parseOne(raw), 413);
    assert.equal((await ok.stats()).requests, before, 'nothing forwarded');
});

test('errors: 413 when a chunked body grows over max_body_bytes', async () => {
    const piece = 'x'.repeat(600);
    const raw = await rawRequest(gw.port, [
        'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n',
        `258\r\n${piece}\r\n`, `258\r\n${piece}\r\n`, '0\r\n\r\n',
    ]);
    checkErrorShape(assert, parseOne(raw), 413);
});

test('errors: a body exactly at max_body_bytes is accepted', async () => {
    const base = JSON.stringify({ model: 'ok', pad: '' });
    const body = JSON.stringify({ model: 'ok', pad: 'y'.repeat(1024 - base.length) });
    assert.equal(body.length, 1024);
    const r = await request(gw.port, { method: 'POST', path: '/v1/chat/completions', body, headers: { 'content-type': 'application/json' } });
    assert.equal(r.status, 200, r.body);
});

test('errors: 415 for a text/plain POST without default_pool', async () => {
    const r = await request(gw.port, { method: 'POST', path: '/v1/chat/completions', body: 'hello', headers: { 'content-type': 'text/plain' } });
    checkErrorShape(assert, r, 415);
});

test('errors: 404 for another route without default_pool', async () => {
    checkErrorShape(assert, await request(gw.port, { path: '/anything?x=1' }), 404);
    checkErrorShape(assert, await request(gw.port, { method: 'DELETE', path: '/v1/models' }), 404);
});

test('errors: 431 when the header section is over max_header_bytes (64 KiB)', async () => {
    const raw = await rawRequest(gw.port,
        `GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ${'b'.repeat(70 * 1024)}\r\n\r\n`);
    checkErrorShape(assert, parseOne(raw), 431);
});

test('errors: 502 when nothing listens on the backend port', async () => {
    checkErrorShape(assert, await chat(gw.port, 'dead'), 502);
});

test('errors: 502 when the backend closes the connection without answering', async () => {
    checkErrorShape(assert, await chat(gw.port, 'closer'), 502);
});

test('errors: 502 when the backend answer is shorter than its Content-Length', async () => {
    const r = await chat(gw.port, 'badlen');
    checkErrorShape(assert, r, 502);
    assert.ok(!r.body.includes('hello from badlen'), 'no part of the truncated answer is relayed');
});

test('errors: 504 when the first byte does not come within first_byte_ms', async () => {
    const t0 = Date.now();
    const r = await chat(gw.port, 'hanger', {}, { timeoutMs: 5000 });
    const dt = Date.now() - t0;
    checkErrorShape(assert, r, 504);
    assert.ok(dt >= 450 && dt < 2500, `answered after ${dt} ms with first_byte_ms 500`);
});

// A gateway of its own, so that a config-time objection to it cannot take
// the other error tests down with it.
test('errors: 503 when every backend has weight 0', async () => {
    const gz = await startGateway({
        threads: 1,
        models: [
            model('ok', [{ url: ok.url }]),
            model('zero', [{ url: zero.url, weight: 0 }, { url: ok.url, weight: 0 }]),
        ],
    });
    try {
        const before = (await zero.stats()).requests + (await ok.stats()).requests;
        checkErrorShape(assert, await chat(gz.port, 'zero'), 503);
        assert.equal((await zero.stats()).requests + (await ok.stats()).requests, before, 'nothing forwarded');
    } finally {
        await gz.stop();
    }
});

test('errors: the gateway still serves after all of the above', async () => {
    const r = await chat(gw.port, 'ok');
    assert.equal(r.status, 200);
    assert.equal(r.json().fake.name, 'ok');
});
