// HTTP/1.1 on the client side, as raw bytes: chunked request bodies,
// keep-alive, pipelining, and strict framing (request smuggling attempts
// get one 400 and a closed connection, never a second answer).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import {
    startFake, startGateway, request, rawRequest, parseResponses, openConn, model,
} from './lib.mjs';

let fa, fb, gw;

before(async () => {
    [fa, fb] = await Promise.all([startFake({ name: 'fa' }), startFake({ name: 'fb' })]);
    gw = await startGateway({
        threads: 2,
        models: [model('alpha', [{ url: fa.url }]), model('beta', [{ url: fb.url }])],
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([fa, fb].map((f) => f?.kill()));
});

const J = (m, extra = {}) => JSON.stringify({ model: m, messages: [{ role: 'user', content: 'hi' }], ...extra });

function post(m, extraHeaders = '', body = J(m)) {
    return `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n${extraHeaders}` +
        `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
}

test('http: a chunked request body is routed by its model', async () => {
    const body = J('beta', { temperature: 0.25, note: 'sent in chunks' });
    const a = body.slice(0, 10);
    const b = body.slice(10, 31);
    const c = body.slice(31);
    const hex = (s) => Buffer.byteLength(s).toString(16);
    const raw = await rawRequest(gw.port, [
        'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n',
        `${hex(a)}\r\n${a}\r\n`,
        // a chunk extension is legal and ignored
        `${hex(b)};ext=1\r\n${b}\r\n`,
        `${hex(c).toUpperCase()}\r\n${c}\r\n0\r\n\r\n`,
    ]);
    const p = parseResponses(raw.data);
    assert.equal(p.responses.length, 1, raw.text);
    const r = p.responses[0];
    assert.equal(r.status, 200, raw.text);
    const j = JSON.parse(r.body.toString());
    assert.equal(j.fake.name, 'fb');
    assert.deepEqual(JSON.parse(j.fake.body), JSON.parse(body));
    assert.equal(r.headers['x-modelmux-model'], 'beta');
    assert.equal(raw.closed, true, 'Connection: close honoured');
});

test('http: keep-alive serves two requests on one connection', async () => {
    const c = await openConn(gw.port);
    try {
        c.write(post('alpha'));
        const one = await c.read(1);
        assert.equal(one.responses.length, 1);
        assert.equal(one.responses[0].status, 200);
        assert.equal(JSON.parse(one.responses[0].body).fake.name, 'fa');
        assert.equal(one.closed, false, 'still open after the first response');
        c.write('GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n');
        c.write(post('beta'));
        const two = await c.read(2);
        assert.equal(two.responses.length, 2);
        assert.equal(two.responses[0].status, 200);
        assert.equal(JSON.parse(two.responses[0].body).object, 'list');
        assert.equal(JSON.parse(two.responses[1].body).fake.name, 'fb');
    } finally {
        c.close();
    }
});

test('http: pipelined requests are answered in order (the slow first one first)', async () => {
    const raw = await rawRequest(gw.port,
        post('alpha', 'x-fake-first-delay-ms: 300\r\n') + post('beta') + 'GET /health HTTP/1.1\r\nHost: x\r\n\r\n',
        { until: (b) => parseResponses(b).responses.length >= 3, timeoutMs: 5000 });
    const p = parseResponses(raw.data);
    assert.equal(p.responses.length, 3, raw.text.slice(0, 500));
    assert.deepEqual(p.responses.map((r) => r.status), [200, 200, 200]);
    assert.equal(JSON.parse(p.responses[0].body).fake.name, 'fa');
    assert.equal(JSON.parse(p.responses[1].body).fake.name, 'fb');
    assert.equal(JSON.parse(p.responses[2].body).status, 'ok');
});

test('http: HTTP/1.0 without keep-alive gets an answer and a close', async () => {
    const body = J('alpha');
    const raw = await rawRequest(gw.port,
        `POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    const p = parseResponses(raw.data);
    assert.equal(p.responses.length, 1);
    assert.equal(p.responses[0].status, 200);
    assert.equal(raw.closed, true);
});

// ---- smuggling -----------------------------------------------------------

const SMUGGLED = 'GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n';
const BODY = J('alpha');
const LEN = Buffer.byteLength(BODY);
const HEX = LEN.toString(16);
const CHUNKED_BODY = `${HEX}\r\n${BODY}\r\n0\r\n\r\n`;
const HEAD = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n';

// Each case is a request whose framing is ambiguous or invalid; a lenient
// reading of it leaves SMUGGLED as a second request on the connection.
const smuggling = [
    ['Content-Length + Transfer-Encoding',
        `${HEAD}Content-Length: ${CHUNKED_BODY.length}\r\nTransfer-Encoding: chunked\r\n\r\n${CHUNKED_BODY}${SMUGGLED}`],
    ['Transfer-Encoding + Content-Length (TE first)',
        `${HEAD}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n${CHUNKED_BODY}${SMUGGLED}`],
    ['two different Content-Length',
        `${HEAD}Content-Length: ${LEN}\r\nContent-Length: ${LEN + SMUGGLED.length}\r\n\r\n${BODY}${SMUGGLED}`],
    ['two equal Content-Length',
        `${HEAD}Content-Length: ${LEN}\r\nContent-Length: ${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length "+N"', `${HEAD}Content-Length: +${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length "0xN"', `${HEAD}Content-Length: 0x${HEX}\r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length "N,N"', `${HEAD}Content-Length: ${LEN},${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length empty', `${HEAD}Content-Length: \r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length beyond int64', `${HEAD}Content-Length: 99999999999999999999\r\n\r\n${BODY}${SMUGGLED}`],
    ['Content-Length that wraps to N in 64 bits', `${HEAD}Content-Length: ${(2n ** 64n + BigInt(LEN)).toString()}\r\n\r\n${BODY}${SMUGGLED}`],
    ['space before the colon of Content-Length', `${HEAD}Content-Length : ${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['Transfer-Encoding "chunked, chunked"', `${HEAD}Transfer-Encoding: chunked, chunked\r\n\r\n${CHUNKED_BODY}${SMUGGLED}`],
    ['Transfer-Encoding "gzip"', `${HEAD}Transfer-Encoding: gzip\r\n\r\n${CHUNKED_BODY}${SMUGGLED}`],
    ['two Transfer-Encoding: chunked headers', `${HEAD}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n${CHUNKED_BODY}${SMUGGLED}`],
    ['chunk size "0xN"', `${HEAD}Transfer-Encoding: chunked\r\n\r\n0x${HEX}\r\n${BODY}\r\n0\r\n\r\n${SMUGGLED}`],
    ['chunk size overflow "ffffffffffffffffff"', `${HEAD}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n${BODY}\r\n0\r\n\r\n${SMUGGLED}`],
    ['chunk size that wraps to N in 64 bits', `${HEAD}Transfer-Encoding: chunked\r\n\r\n1${'0'.repeat(16 - HEX.length)}${HEX}\r\n${BODY}\r\n0\r\n\r\n${SMUGGLED}`],
    ['NUL in a header value', `${HEAD}X-Evil: a\0b\r\nContent-Length: ${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['bare CR in a header value', `${HEAD}X-Evil: a\rb\r\nContent-Length: ${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
    ['bare LF line ends',
        `POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: ${LEN}\n\n${BODY}${SMUGGLED}`],
    ['obsolete line folding', `${HEAD}X-Folded: a\r\n b\r\nContent-Length: ${LEN}\r\n\r\n${BODY}${SMUGGLED}`],
];

for (const [name, bytes] of smuggling) {
    test(`smuggling: ${name} -> one 400 and close`, async () => {
        const before = (await fa.stats()).requests;
        const raw = await rawRequest(gw.port, Buffer.from(bytes, 'latin1'), { timeoutMs: 3000 });
        const statusLines = raw.text.match(/HTTP\/1\.[01] \d{3}/g) || [];
        assert.equal(statusLines.length, 1, `exactly one response, got: ${JSON.stringify(raw.text.slice(0, 600))}`);
        assert.ok(raw.text.startsWith('HTTP/1.1 400 '), `a 400: ${JSON.stringify(raw.text.slice(0, 200))}`);
        assert.ok(!raw.text.includes('HTTP/1.1 200'), 'the smuggled request was not answered');
        assert.equal(raw.closed, true, 'the server closed the connection');
        const p = parseResponses(raw.data);
        assert.equal(p.responses.length, 1);
        const j = JSON.parse(p.responses[0].body.toString());
        assert.equal(j.error.code, 400);
        assert.equal(j.error.type, 'invalid_request_error');
        assert.equal((await fa.stats()).requests, before, 'nothing was forwarded upstream');
        const h = await request(gw.port, { path: '/health' });
        assert.equal(h.status, 200, 'the gateway still serves');
    });
}
