// The direct HTTP/1.1 upstream path (gateway/h1up.c) against a raw-TCP fake
// upstream that answers with exact bytes: framing (Content-Length, chunked,
// close-delimited, interim 1xx, HEAD/204/304), malformed answers (a clean
// 502 and the connection never reused), keep-alive reuse and its limits,
// the one resend when a reused connection turns out dead, the size cap,
// back-pressure on a relayed answer, timeouts and the idle sweep. The
// fake records each request's connection and its index on it, so "reused"
// and "new connection" are facts the fake saw, not guesses from timing.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import { startGateway, request, postJson, checkErrorShape, waitFor } from './lib.mjs';
import { startRawUpstream, writeAll } from '../fakes/raw_upstream.mjs';

const J = '{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}';
const CAP = 12 * 1024 * 1024;                                       // max_response_bytes
const BIG = crypto.randomBytes(8 * 1024 * 1024).toString('base64'); // ~11 MB, under CAP
// Relayed to a client that does not read: larger than what socket buffers
// and the gateway's high-water mark can hold (~9 MB measured on loopback),
// so the upstream's writes must stall.
const RELAY = crypto.randomBytes(24 * 1024 * 1024);
// Over the cap by more than any socket buffers can take in (receive buffers
// autotune up to 32 MiB here): the gateway must stop reading long before
// the end.
const HUGE = CAP + 64 * 1024 * 1024;

const ok = (extra = '') => `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Up: yes\r\n${extra}Content-Length: ${J.length}\r\n\r\n${J}`;
const chunk = (s) => `${Buffer.byteLength(s).toString(16)}\r\n${s}\r\n`;

// The fake's answers, by the request's x-mode header. "Left open" means the
// fake keeps the socket: only the gateway can close it.
const answers = {
    ok: (s) => s.write(ok()),
    echo: (s, q) => {
        const b = JSON.stringify({ head: q.head, body: q.body.toString('latin1') });
        s.write(`HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(b)}\r\n\r\n${b}`);
    },
    digest: (s, q) => {
        const b = JSON.stringify({ len: q.body.length, sha256: crypto.createHash('sha256').update(q.body).digest('hex') });
        s.write(`HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${b.length}\r\n\r\n${b}`);
    },
    chunked: (s) => s.write('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n' +
        chunk(J.slice(0, 10)) + `${(J.length - 10).toString(16)};ext=1\r\n${J.slice(10)}\r\n` + '0\r\nX-Trailer: t\r\n\r\n'),
    // No Content-Length, no chunked: the body runs until the fake closes.
    closedelim: (s) => s.end(`HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n${J}`),
    interim: (s) => s.write('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n' + ok()),
    switch: (s) => s.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'), // left open
    garbage: (s) => s.write('this is not HTTP at all\r\n\r\n'),                                                     // left open
    badchunk: (s) => s.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nzz\r\n1}\r\n0\r\n\r\n'), // left open
    badchunkend: (s) => s.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX\r\n0\r\n\r\n'),      // left open
    connclose: (s) => s.write(ok('Connection: close\r\n')),                                                          // left open
    http10: (s) => s.write(`HTTP/1.0 200 OK\r\nContent-Length: ${J.length}\r\n\r\n${J}`),                          // left open
    http10ka: (s) => s.write(`HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: ${J.length}\r\n\r\n${J}`),
    bighead: (s) => s.write(`HTTP/1.1 200 OK\r\nX-Big: ${'a'.repeat(100000)}\r\nContent-Length: ${J.length}\r\n\r\n${J}`),
    clte: (s) => s.write(`HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n${chunk(J)}0\r\n\r\n`), // left open
    extra: (s) => s.write(`${ok()}GARBAGE`),                                                                          // left open
    twocl: (s) => s.write(`HTTP/1.1 200 OK\r\nContent-Length: ${J.length}\r\nContent-Length: 5\r\n\r\n${J}`),
    samecl: (s) => s.write(`HTTP/1.1 200 OK\r\nContent-Length: ${J.length}\r\nContent-Length: ${J.length}\r\n\r\n${J}`),
    fold: (s) => s.write(`HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: ${J.length}\r\n\r\n${J}`),
    badname: (s) => s.write(`HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: ${J.length}\r\n\r\n${J}`),
    cutbody: (s) => s.end(`HTTP/1.1 200 OK\r\nContent-Length: ${J.length + 100}\r\n\r\n${J}`),
    cutchunk: (s) => s.end('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n0123456789'),
    cuthead: (s) => s.end('HTTP/1.1 200 OK\r\nContent-Le'),
    big: (s, q, c) => writeAll(s, q, c, [`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ${BIG.length}\r\n\r\n`, BIG]),
    huge: (s, q, c) => {
        const piece = Buffer.alloc(256 * 1024, 0x61);
        writeAll(s, q, c, [`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ${HUGE}\r\n\r\n`,
            ...Array.from({ length: HUGE / piece.length }, () => piece)]);
    },
    relay: (s, q, c) => {
        const pieces = [`HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: ${RELAY.length}\r\n\r\n`];
        for (let i = 0; i < RELAY.length; i += 65536) pieces.push(RELAY.subarray(i, i + 65536));
        writeAll(s, q, c, pieces);
    },
    relaychunked: (s, q, c) => {
        const pieces = ['HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n'];
        for (let i = 0; i < RELAY.length; i += 100000) {
            const d = RELAY.subarray(i, i + 100000);
            pieces.push(`${d.length.toString(16)}\r\n`, d, '\r\n');
        }
        pieces.push('0\r\n\r\n');
        writeAll(s, q, c, pieces);
    },
    // Answers, then closes the (now idle) connection from its side.
    closeidle: (s) => s.end(ok()),
    // A reused connection dies before any answer byte (FIN / RST); a first
    // request on a connection is answered.
    dropreused: (s, q) => (q.seq > 0 ? s.end() : s.write(ok())),
    resetreused: (s, q) => (q.seq > 0 ? s.resetAndDestroy() : s.write(ok())),
    dropall: (s) => s.end(),
    // A reused connection dies after the first answer bytes.
    partialreused: (s, q) => (q.seq > 0 ? s.end('HTTP/1.1 200 OK\r\n') : s.write(ok())),
    partialresetreused: (s, q) => {
        if (q.seq === 0) return s.write(ok());
        s.write('HTTP/1.1 200 OK\r\n', () => s.resetAndDestroy());
    },
    hang: () => {},
    head: (s) => s.write('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n'),
    nocontent: (s) => s.write('HTTP/1.1 204 No Content\r\nX-Up: yes\r\n\r\n'),
    notmodified: (s) => s.write('HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 10\r\n\r\n'),
};

function answer(sock, q, conn) {
    const f = answers[q.headers['x-mode'] || 'ok'];
    if (!f) throw new Error(`raw upstream: no answer for x-mode ${q.headers['x-mode']}`);
    f(sock, q, conn);
}

let up, lone, sweeper, tlsUp, gw;
let sweepAnsweredAt = 0;

before(async () => {
    [up, lone, sweeper, tlsUp] = await Promise.all([answer, answer, answer, answer].map((a) => startRawUpstream(a)));
    const defaults = {
        health: false,
        retries: 0,
        // Many deliberate failures on one backend: the breaker stays out of it.
        breaker: { consecutive_failures: 0, min_requests: 1000000, max_ejection_percent: 0 },
    };
    gw = await startGateway({
        threads: 1,   // one thread: one keep-alive pool, so reuse is predictable
        max_response_bytes: CAP,
        defaults,
        models: [
            { name: 'm', backends: [{ url: up.url }] },
            { name: 'base', backends: [{ url: `${up.url}/base/` }] },
            { name: 'tot', timeouts: { total_ms: 300 }, backends: [{ url: up.url }] },
            { name: 'lone', backends: [{ url: lone.url }] },
            { name: 'sweep', backends: [{ url: sweeper.url }] },
            { name: 'tls', backends: [{ url: `https://127.0.0.1:${tlsUp.port}` }] },
        ],
        default_pool: { backends: [{ url: up.url }] },
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([up, lone, sweeper, tlsUp].map((u) => u?.close()));
});

let ids = 0;

// A chat request routed by model (answer buffered whole by the gateway) in
// the given fake mode. Resolves {res, recs (the fake's records of it, a
// resend included), rec (the last of them)}.
async function chat(mode, modelName = 'm', fake = up) {
    const id = `t${++ids}`;
    const res = await postJson(gw.port, '/v1/chat/completions', { model: modelName },
        { 'x-mode': mode, 'x-test-id': id }, { timeoutMs: 15000 });
    const recs = fake.requestsWith('x-test-id', id);
    return { res, recs, rec: recs[recs.length - 1] };
}

// A request to the default pool (relayed as it arrives).
async function plain(mode, method = 'GET', path = '/x', body) {
    const id = `t${++ids}`;
    const res = await request(gw.port, { method, path, body, headers: { 'x-mode': mode, 'x-test-id': id }, timeoutMs: 15000 });
    const recs = up.requestsWith('x-test-id', id);
    return { res, recs, rec: recs[recs.length - 1] };
}

function assertOk(res) {
    assert.equal(res.status, 200, res.body.slice(0, 300));
    assert.equal(res.body, J);
}

// The next request reuses rec's connection. The gateway reuses nothing idle
// past 4 s, so where the next request came later than 3.5 s after the fake
// wrote rec's answer (a big answer on a loaded machine) reuse is not
// required.
async function assertReused(rec, why) {
    const n = await chat('ok');
    assertOk(n.res);
    const idle = n.rec.t - (rec.doneAt || rec.t);
    if (idle > 3500 && n.rec.seq === 0) {
        process.stderr.write(`note: ${why}: ${idle} ms between answer and next request: reuse not checked\n`);
        return;
    }
    assert.deepEqual([n.rec.conn, n.rec.seq], [rec.conn, rec.seq + 1], `${why}: the next request reuses the connection (${idle} ms idle)`);
}

// rec's connection is not used again: the next request goes over a new
// one (asked at once: the gateway drops a connection before it answers the
// client, or on the EOF that ended the answer), and it gets closed (by the
// gateway where gatewayCloses: the fake left it open).
async function assertDropped(rec, why, gatewayCloses = true) {
    const n = await chat('ok');
    assertOk(n.res);
    assert.equal(n.rec.seq, 0, `${why}: the next request opened a new connection (conn ${n.rec.conn})`);
    assert.notEqual(n.rec.conn, rec.conn);
    const c = up.conns[rec.conn];
    await up.until(() => c.closed, `${why}: connection ${rec.conn} closed`);
    if (gatewayCloses) assert.ok(c.peerEnded, `${why}: the gateway closed the connection`);
}

function assert502(res, re) {
    const e = checkErrorShape(assert, res, 502);
    assert.ok(e.message.startsWith(`upstream ${up.url}`), e.message);
    if (re) assert.match(e.message, re);
}

// The sweep: a connection pooled here, first, and left idle while the other
// tests run, is closed by the gateway past 4 s of idleness (checked every
// 2 s), and not before: part 2 is the last test.
test('h1 upstream: idle sweep (part 1): a pooled connection to another backend', async () => {
    const a = await chat('ok', 'sweep', sweeper);
    assertOk(a.res);
    sweepAnsweredAt = Date.now();
    const b = await chat('ok', 'sweep', sweeper);
    assertOk(b.res);
    sweepAnsweredAt = Date.now();
    assert.deepEqual([b.rec.conn, b.rec.seq], [a.rec.conn, 1]);
});

// ---- well-formed answers ----------------------------------------------------

test('h1 upstream: a plain answer is relayed exactly and its connection reused', async () => {
    const a = await chat('ok');
    assertOk(a.res);
    assert.equal(a.res.headers['x-up'], 'yes', 'upstream headers are relayed');
    assert.equal(a.res.headers['content-length'], String(J.length));
    assert.equal(a.recs.length, 1);
    await assertReused(a.rec, 'plain answer');
});

test('h1 upstream: the request head and body the backend receives', async () => {
    const id = `t${++ids}`;
    const sent = JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'héllo' }] });
    const r = await request(gw.port, { method: 'POST', path: '/v1/chat/completions?x=1', body: sent,
        headers: { 'content-type': 'application/json', 'x-mode': 'echo', 'x-test-id': id, 'x-custom': 'v 1',
            'x-forwarded-for': '10.0.0.1', connection: 'keep-alive', expect: '100-continue' } });
    assert.equal(r.status, 200, r.body);
    const { head, body } = r.json();
    const lines = head.split('\r\n');
    assert.equal(lines[0], 'POST /v1/chat/completions?x=1 HTTP/1.1');
    assert.equal(lines[1], `Host: 127.0.0.1:${up.port}`);
    const hs = lines.slice(1).map((l) => l.toLowerCase());
    const values = (n) => hs.filter((l) => l.startsWith(`${n}:`)).map((l) => l.slice(n.length + 1).trim());
    assert.deepEqual(values('content-length'), [String(Buffer.byteLength(sent))]);
    assert.deepEqual(values('x-custom'), ['v 1']);
    assert.deepEqual(values('x-forwarded-for'), ['10.0.0.1, 127.0.0.1']);
    assert.equal(values('x-request-id').length, 1);
    for (const n of ['connection', 'expect', 'transfer-encoding', 'keep-alive']) assert.deepEqual(values(n), [], `${n} not forwarded`);
    assert.equal(Buffer.from(body, 'latin1').toString('utf8'), sent, 'body bytes exact');

    // No body: a GET carries no Content-Length, an empty POST carries 0.
    const g = await plain('echo');
    assert.equal(g.res.status, 200);
    assert.ok(g.res.json().head.startsWith(`GET /x HTTP/1.1\r\nHost: 127.0.0.1:${up.port}\r\n`), g.res.body);
    assert.doesNotMatch(g.res.json().head, /content-length/i);
    const p = await plain('echo', 'POST', '/x', '');
    assert.equal(p.res.status, 200);
    assert.match(p.res.json().head, /\r\nContent-Length: 0(\r\n|$)/);
});

test('h1 upstream: a 12 MB request body reaches the backend whole (writes resumed when the socket is full)', async () => {
    const body = crypto.randomBytes(12 * 1024 * 1024);
    const a = await plain('digest', 'POST', '/upload', body);
    assert.equal(a.res.status, 200, a.res.body);
    assert.deepEqual(a.res.json(), { len: body.length, sha256: crypto.createHash('sha256').update(body).digest('hex') });
    assert.equal(a.recs.length, 1);
    await assertReused(a.rec, 'large request body');
});

test('h1 upstream: the backend url\'s base path prefixes the request target', async () => {
    const r = await chat('echo', 'base');
    assert.equal(r.res.status, 200, r.res.body);
    assert.ok(r.res.json().head.startsWith(`POST /base/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:${up.port}\r\n`), r.res.body);
});

test('h1 upstream: chunked answer with an extension and trailers: body exact, trailers dropped, reused', async () => {
    const a = await chat('chunked');
    assertOk(a.res);
    assert.equal(a.res.headers['x-trailer'], undefined);
    assert.equal(a.res.headers.trailer, undefined, 'Trailer is hop-by-hop');
    assert.equal(a.res.headers['transfer-encoding'], undefined, 'buffered answer, sent with a length');
    await assertReused(a.rec, 'chunked answer');
});

test('h1 upstream: an answer delimited by the close of the connection is complete', async () => {
    const a = await chat('closedelim');
    assertOk(a.res);
    await assertDropped(a.rec, 'close-delimited', false);
});

test('h1 upstream: interim 100 and 103 answers are skipped; the connection is reused', async () => {
    const a = await chat('interim');
    assertOk(a.res);
    assert.equal(a.res.headers.link, undefined, 'headers of an interim answer are not relayed');
    assert.equal(a.res.headers['x-up'], 'yes');
    await assertReused(a.rec, 'interim answers');
});

test('h1 upstream: Connection: close, and HTTP/1.0 without keep-alive, are not reused', async () => {
    const a = await chat('connclose');
    assertOk(a.res);
    await assertDropped(a.rec, 'Connection: close');
    const b = await chat('http10');
    assertOk(b.res);
    await assertDropped(b.rec, 'HTTP/1.0');
    const c = await chat('http10ka');
    assertOk(c.res);
    await assertReused(c.rec, 'HTTP/1.0 with Connection: keep-alive');
});

test('h1 upstream: Content-Length next to chunked: chunked framing wins, the connection is not reused', async () => {
    const a = await chat('clte');
    assertOk(a.res);
    await assertDropped(a.rec, 'Content-Length + Transfer-Encoding');
});

test('h1 upstream: bytes after the answer: the answer stands, the connection is dropped', async () => {
    const a = await chat('extra');
    assertOk(a.res);
    await assertDropped(a.rec, 'extra bytes');
});

test('h1 upstream: a repeated identical Content-Length is accepted', async () => {
    const a = await chat('samecl');
    assertOk(a.res);
    await assertReused(a.rec, 'same Content-Length twice');
});

test('h1 upstream: HEAD, 204 and 304 have no body whatever their headers say; reused', async () => {
    const h = await plain('head', 'HEAD');
    assert.equal(h.res.status, 200);
    assert.equal(h.res.body, '');
    await assertReused(h.rec, 'HEAD with Content-Length 1234');
    const n = await plain('nocontent');
    assert.equal(n.res.status, 204);
    assert.equal(n.res.body, '');
    assert.equal(n.res.headers['x-up'], 'yes');
    await assertReused(n.rec, '204');
    const m = await plain('notmodified');
    assert.equal(m.res.status, 304);
    assert.equal(m.res.body, '');
    await assertReused(m.rec, '304 with Content-Length 10');
});

// ---- malformed answers: 502, connection not reused -------------------------

test('h1 upstream: an answer that is not HTTP is a 502 and the connection is closed', async () => {
    const a = await chat('garbage');
    assert502(a.res, /not HTTP/);
    assert.equal(a.recs.length, 1, 'not resent');
    await assertDropped(a.rec, 'not HTTP');
});

test('h1 upstream: 101 Switching Protocols is a 502 (never asked for)', async () => {
    const a = await chat('switch');
    assert502(a.res, /status line/);
    await assertDropped(a.rec, '101');
});

test('h1 upstream: bad chunk framing is a 502 and the connection is closed', async () => {
    const a = await chat('badchunk');
    assert502(a.res, /chunk/);
    assert.ok(!a.res.body.includes('{"a":'), 'nothing of the broken body is relayed');
    await assertDropped(a.rec, 'bad chunk size');
    const b = await chat('badchunkend');
    assert502(b.res, /chunk/);
    await assertDropped(b.rec, 'chunk data without its CRLF');
});

test('h1 upstream: malformed header sections are a 502', async () => {
    for (const [mode, re] of [['twocl', /header/], ['fold', /header/], ['badname', /header/], ['bighead', /too long/]]) {
        const a = await chat(mode);
        assert502(a.res, re);
        await assertDropped(a.rec, mode);
    }
});

test('h1 upstream: answers cut short by the backend are a 502', async () => {
    for (const [mode, re] of [['cutbody', /100 bytes remaining/], ['cutchunk', /closed/], ['cuthead', /closed/]]) {
        const a = await chat(mode);
        assert502(a.res, re);
        assert.equal(a.recs.length, 1, `${mode}: not resent (fresh or answering connection)`);
        await assertDropped(a.rec, mode, false);
    }
});

// ---- size and back-pressure ---------------------------------------------------

test('h1 upstream: an 11 MB answer is buffered whole, bytes exact, connection reused', async () => {
    const a = await chat('big');
    assert.equal(a.res.status, 200);
    assert.equal(a.res.headers['content-length'], String(BIG.length));
    assert.ok(a.res.body === BIG, `body differs (${a.res.body.length} of ${BIG.length} bytes)`);
    await assertReused(a.rec, 'big answer');
});

test('h1 upstream: an answer over max_response_bytes is a 502 and the connection is closed', async () => {
    const a = await chat('huge');
    assert502(a.res, /max_response_bytes/);
    assert.ok(a.rec.flushed < HUGE, `the gateway stopped reading (${a.rec.flushed} of ${HUGE} body bytes written)`);
    await assertDropped(a.rec, 'over the cap');
});

// GET through the default pool (relayed as it arrives) with the response
// left unread until the upstream's writes stall; then read it all.
async function relaySlowClient(mode) {
    const id = `t${++ids}`;
    const res = await new Promise((resolve, reject) => {
        const q = http.request({ host: '127.0.0.1', port: gw.port, path: '/blob', agent: false,
            headers: { 'x-mode': mode, 'x-test-id': id } }, resolve);
        q.on('error', reject);
        q.end();
    });
    assert.equal(res.statusCode, 200);
    const rec = await up.until(() => up.requestsWith('x-test-id', id)[0], 'the relayed request arrived');
    let last = -1;
    let same = 0;
    await waitFor(() => {
        if (rec.flushed > 0 && rec.flushed === last) same++;
        else same = 0;
        last = rec.flushed;
        return same >= 3;
    }, 15000, { intervalMs: 100, what: `${mode}: the upstream's writes stall while the client does not read` });
    assert.ok(rec.flushed < RELAY.length,
        `${mode}: back-pressure reached the upstream (it wrote ${rec.flushed} of ${RELAY.length} bytes with nobody reading)`);
    const parts = [];
    res.on('data', (d) => parts.push(d));
    await new Promise((resolve, reject) => { res.on('end', resolve); res.on('error', reject); });
    const got = Buffer.concat(parts);
    assert.equal(got.length, RELAY.length);
    assert.ok(got.equals(RELAY), `${mode}: relayed bytes differ`);
    return rec;
}

test('h1 upstream: 24 MB relayed to a client that stalls: upstream paused, resumed, bytes exact', { timeout: 30000 }, async () => {
    const a = await relaySlowClient('relay');
    await assertReused(a, 'relayed answer');
    const b = await relaySlowClient('relaychunked');
    await assertReused(b, 'relayed chunked answer');
});

// ---- connection lifetime ---------------------------------------------------------

test('h1 upstream: a connection the backend closed while idle is not used again', async () => {
    const a = await chat('closeidle');
    assertOk(a.res);
    await assertDropped(a.rec, 'closed by the backend while idle', false);
});

test('h1 upstream: a pooled connection that receives unasked-for bytes is closed', async () => {
    const a = await chat('ok');
    assertOk(a.res);
    // The answer is complete, so the connection is idle in the pool now.
    const c = up.conns[a.rec.conn];
    c.sock.write('HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n');
    // Closed at once, not by the idle sweep (4 s): a bound under that.
    await up.until(() => c.closed, 'the connection closed', 3000);
    assert.ok(c.peerEnded, 'the gateway closed it');
    await assertDropped(a.rec, 'bytes on an idle connection');
});

test('h1 upstream: a reused connection that dies before any answer byte is resent once on a new one', async () => {
    for (const mode of ['dropreused', 'resetreused']) {
        const p = await chat('ok');
        const a = await chat(mode);
        assertOk(a.res);
        assert.equal(a.recs.length, 2, `${mode}: sent twice`);
        assert.deepEqual([a.recs[0].conn, a.recs[0].seq], [p.rec.conn, p.rec.seq + 1], `${mode}: first over the pooled connection`);
        assert.equal(a.recs[1].seq, 0, `${mode}: then over a new connection`);
        await assertReused(a.recs[1], `${mode}: the new connection`);
    }
});

test('h1 upstream: the resend happens once: a new connection that dies too is a 502', async () => {
    const p = await chat('ok');
    const a = await chat('dropall');
    assert502(a.res, /Empty reply/);
    assert.equal(a.recs.length, 2, 'one resend, no more');
    assert.deepEqual([a.recs[0].conn, a.recs[0].seq], [p.rec.conn, p.rec.seq + 1]);
    assert.equal(a.recs[1].seq, 0);
});

test('h1 upstream: no resend after answer bytes, nor on a fresh connection', async () => {
    const p = await chat('ok');
    const a = await chat('partialreused');
    assert502(a.res, /closed/);
    assert.equal(a.recs.length, 1, 'an answer had begun: not resent');
    assert.deepEqual([a.rec.conn, a.rec.seq], [p.rec.conn, p.rec.seq + 1]);
    const p2 = await chat('ok');
    const a2 = await chat('partialresetreused');
    assert502(a2.res, /reset/i);
    assert.equal(a2.recs.length, 1, 'an answer had begun, then a reset: not resent');
    assert.deepEqual([a2.rec.conn, a2.rec.seq], [p2.rec.conn, p2.rec.seq + 1]);

    const b = await chat('dropall', 'lone', lone);
    const e = checkErrorShape(assert, b.res, 502);
    assert.match(e.message, /Empty reply/);
    assert.equal(b.recs.length, 1, 'a fresh connection that dies is a failure, not resent');
    assert.equal(b.rec.seq, 0);
});

test('h1 upstream: total_ms: 504 and the hung connection is closed', async () => {
    const t0 = Date.now();
    const a = await chat('hang', 'tot');
    const dt = Date.now() - t0;
    const e = checkErrorShape(assert, a.res, 504);
    assert.match(e.message, /timed out/);
    assert.ok(dt < 5000, `answered after ${dt} ms with total_ms 300`);
    await assertDropped(a.rec, 'timed out');
});

test('h1 upstream: a client that leaves mid-request closes the upstream connection', async () => {
    const id = `t${++ids}`;
    const q = http.request({ host: '127.0.0.1', port: gw.port, method: 'POST', path: '/v1/chat/completions', agent: false,
        headers: { 'content-type': 'application/json', 'x-mode': 'hang', 'x-test-id': id } });
    q.on('error', () => {});
    q.end(JSON.stringify({ model: 'm' }));
    const rec = await up.until(() => up.requestsWith('x-test-id', id)[0], 'the request arrived');
    q.destroy();
    await assertDropped(rec, 'client abort');
});

test('h1 upstream: an https:// backend still goes through libcurl (TLS), not the direct path', async () => {
    const r = await postJson(gw.port, '/v1/chat/completions', { model: 'tls' }, {}, { timeoutMs: 15000 });
    const e = checkErrorShape(assert, r, 502);
    assert.ok(e.message.startsWith(`upstream https://127.0.0.1:${tlsUp.port}`), e.message);
    assert.ok(tlsUp.conns.length >= 1 && tlsUp.conns.every((c) => c.tls), 'the backend saw a TLS ClientHello');
    assert.equal(tlsUp.requests.length, 0, 'no plain-text request');
});

// The sweep, part 2: see part 1, the first test.
test('h1 upstream: idle sweep (part 2): closed by the gateway after 4 s idle, not before', async () => {
    assert.ok(sweepAnsweredAt > 0, 'part 1 ran');
    const c = sweeper.conns[0];
    await sweeper.until(() => c.closed, 'the idle connection closed', 15000);
    assert.ok(c.peerEnded, 'the gateway closed it');
    const idle = c.closedAt - sweepAnsweredAt;
    assert.ok(idle >= 3000, `closed after ${idle} ms idle (the limit is 4 s)`);
    assert.equal(sweeper.conns.length, 1);
});
