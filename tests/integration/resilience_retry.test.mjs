// Resilience: retries and failover until the first byte (first-byte timeout,
// connection closed or reset before headers, broken framing), the retry
// bound and tried set, the total deadline; after the first byte nothing is
// retried (a stalled or killed stream ends with one SSE error event); a
// killed backend that restarts is taken back through half-open.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, chat, checkErrorShape, model, streamRequest, waitFor } from './lib.mjs';

let A, B, C, K, gw;

// Only the behaviour under test: no breaker trips from the failures these
// tests cause on purpose (except in "killme").
const noBreaker = { consecutive_failures: 0, min_requests: 1000 };

before(async () => {
    [A, B, C, K] = await Promise.all(['A', 'B', 'C', 'K'].map((name) => startFake({ name })));
    const to = { first_byte_ms: 400, idle_ms: 300 };
    const trio = [{ url: A.url }, { url: B.url }, { url: C.url }];
    gw = await startGateway({
        threads: 2,
        models: [
            model('pair', [{ url: A.url }, { url: B.url }], { timeouts: to, breaker: noBreaker }),
            model('solo', [{ url: A.url }], { timeouts: to, breaker: noBreaker }),
            model('trio0', trio, { retries: 0, breaker: noBreaker }),
            model('trio1', trio, { retries: 1, breaker: noBreaker }),
            model('trio2', trio, { breaker: noBreaker }),   // retries: the default, 2
            model('trio10', trio, { retries: 10, breaker: noBreaker }),
            model('deadline', trio, { retries: 2, timeouts: { first_byte_ms: 500, total_ms: 600 }, breaker: noBreaker }),
            model('killme', [{ url: K.url }, { url: B.url }], {
                timeouts: to,
                breaker: { consecutive_failures: 2, open_ms: 300, min_requests: 1000 },
            }),
        ],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await Promise.all([A, B, C, K].map((f) => f?.kill()));
});

async function resetFakes() {
    await Promise.all([A, B, C].map(async (f) => { await f.setMode({}); await f.reset(); }));
}

const requestsOf = async (f) => (await f.stats()).requests;

// Sends requests to `modelName` (sequentially) until one reaches fake f;
// returns that request's response and wall time. Requests that went
// elsewhere must have succeeded.
async function untilOneHits(f, modelName, send = () => chat(gw.port, modelName), max = 10) {
    const before0 = await requestsOf(f);
    for (let i = 0; i < max; i++) {
        const t0 = Date.now();
        const r = await send();
        const ms = Date.now() - t0;
        if ((await requestsOf(f)) > before0) return { r, ms };
        assert.equal(r.status, 200, `a request that did not touch ${f.name} succeeded`);
    }
    throw new Error(`no request reached ${f.name} in ${max} tries`);
}

test('retry: an upstream that accepts and never answers: first-byte timeout, then retried elsewhere', async () => {
    await resetFakes();
    await A.setMode({ mode: 'hang' });
    const { r, ms } = await untilOneHits(A, 'pair');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.headers['x-modelmux-backend'], B.url);
    assert.equal(r.json().fake.name, 'B');
    assert.ok(ms >= 380 && ms < 2000, `answered after the 400 ms first-byte timeout plus B (${ms} ms)`);
    await waitFor(async () => (await A.stats()).aborted === 1, 2000, { what: 'A saw its request abandoned' });
});

for (const mode of ['close', 'reset']) {
    test(`retry: an upstream that ${mode === 'close' ? 'closes' : 'resets'} the connection before headers: retried elsewhere`, async () => {
        await resetFakes();
        await A.setMode({ mode });
        const { r } = await untilOneHits(A, 'pair');
        assert.equal(r.status, 200, r.body);
        assert.equal(r.headers['x-modelmux-backend'], B.url);
        // Alone, it is a 502.
        const s = await chat(gw.port, 'solo');
        checkErrorShape(assert, s, 502);
    });
}

test('retry: a broken Content-Length (answer cut short): 502 alone, retried elsewhere with a whole answer', async () => {
    await resetFakes();
    await A.setMode({ mode: 'badlen' });
    const s = await chat(gw.port, 'solo');
    checkErrorShape(assert, s, 502);
    const { r } = await untilOneHits(A, 'pair');
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-modelmux-backend'], B.url);
    assert.equal(Number(r.headers['content-length']), Buffer.byteLength(r.body));
    assert.equal(r.json().fake.name, 'B', 'a whole answer from B');
});

for (const mode of ['badchunk', 'garbage']) {
    test(`retry: an upstream answer with broken framing (${mode}) is a 502, never a 200`, async () => {
        await resetFakes();
        await A.setMode({ mode });
        const t0 = Date.now();
        const s = await chat(gw.port, 'solo', {}, { timeoutMs: 5000 });
        checkErrorShape(assert, s, 502);
        assert.ok(Date.now() - t0 < 2000, 'detected from the bytes, not by a timeout');
        const { r } = await untilOneHits(A, 'pair');
        assert.equal(r.status, 200);
        assert.equal(r.json().fake.name, 'B');
    });
}

test('retry: at most `retries` extra attempts, each on a backend not yet tried', async () => {
    for (const [name, attempts] of [['trio0', 1], ['trio1', 2], ['trio2', 3], ['trio10', 3]]) {
        await resetFakes();
        await Promise.all([A, B, C].map((f) => f.setMode({ mode: 'status:500' })));
        const r = await chat(gw.port, name);
        assert.equal(r.status, 500, `${name}: the last upstream answer is passed through`);
        const counts = await Promise.all([A, B, C].map(requestsOf));
        assert.equal(counts.reduce((x, y) => x + y, 0), attempts, `${name}: ${attempts} attempts (${counts})`);
        assert.ok(counts.every((n) => n <= 1), `${name}: no backend tried twice (${counts})`);
    }
});

test('retry: all attempts stay within the total deadline (total_ms)', async () => {
    await resetFakes();
    await Promise.all([A, B, C].map((f) => f.setMode({ mode: 'hang' })));
    const t0 = Date.now();
    const r = await chat(gw.port, 'deadline', {}, { timeoutMs: 5000 });
    const ms = Date.now() - t0;
    assert.ok(r.status === 504, `a timeout answer: ${r.status} ${r.body}`);
    checkErrorShape(assert, r, 504);
    assert.ok(ms < 600 + 250, `answered ${ms} ms after the request; total_ms is 600`);
    await resetFakes();
});

// An SSE event that carries an error object.
function isErrorEvent(ev) {
    if (!ev.startsWith('data: {')) return false;
    try { return JSON.parse(ev.slice(6)).error !== undefined; } catch { return false; }
}

function checkCutStream(out, chunksBefore) {
    assert.equal(out.timedOut, false, 'never a hang');
    assert.equal(out.status, 200);
    const chunks = out.events.filter((e) => e.includes('chat.completion.chunk'));
    assert.equal(chunks.length, chunksBefore, `the chunks sent before the failure were relayed: ${JSON.stringify(out.events)}`);
    assert.ok(!out.events.includes('data: [DONE]'), 'never a made-up [DONE]');
    const last = out.events[out.events.length - 1];
    assert.ok(isErrorEvent(last), `the stream ends with one error event: ${JSON.stringify(out.events)}`);
    assert.equal(out.events.filter(isErrorEvent).length, 1, 'exactly one error event');
    const err = JSON.parse(last.slice(6)).error;
    assert.equal(typeof err.message, 'string');
    assert.equal(typeof err.code, 'number');
    assert.ok(out.ended, 'the chunked body is closed properly');
}

const streamBody = (m) => ({ model: m, stream: true, messages: [{ role: 'user', content: 'go' }] });

test('no retry after the first byte: a stream that stalls gets one SSE error event after idle_ms, then closes', async () => {
    await resetFakes();
    await A.setMode({ mode: 'midstream-stall' });
    const bBefore = await requestsOf(B);
    let out = null;
    let bStreams = 0;
    for (let i = 0; i < 10 && !out; i++) {
        const o = await streamRequest(gw.port, streamBody('pair'), { 'x-fake-chunks': '5' }, { timeoutMs: 5000 });
        if (o.headers?.['x-modelmux-backend'] === A.url) {
            out = o;
        } else {
            assert.ok(o.events.includes('data: [DONE]'), 'B streams completely');
            bStreams++;
        }
    }
    assert.ok(out, 'a stream reached A');
    checkCutStream(out, 2);
    assert.ok(out.ms >= 250 && out.ms < 2000, `cut after idle_ms 300 (${out.ms} ms)`);
    assert.equal((await requestsOf(B)) - bBefore, bStreams, 'the stalled stream was not retried on B');
    await waitFor(async () => (await A.stats()).aborted === 1, 2000, { what: 'A saw the stalled stream cut' });
});

test('no retry after the first byte: a non-streaming answer that stalls after its headers is a 502 (buffered, so nothing reached the client yet), never a cut 200', async () => {
    await resetFakes();
    await A.setMode({ mode: 'midstream-stall' });
    const t0 = Date.now();
    const r = await chat(gw.port, 'solo', {}, { timeoutMs: 5000 });
    assert.notEqual(r.status, 200, `not a truncated 200: ${r.body}`);
    assert.ok([502, 504].includes(r.status), `status ${r.status}`);
    checkErrorShape(assert, r, r.status);
    assert.ok(Date.now() - t0 < 2000);
});

test('kill -9 an upstream mid-stream: the client gets one SSE error event and the stream closes; no retry', async () => {
    const bBefore = await requestsOf(B);
    let out = null;
    let bStreams = 0;
    for (let i = 0; i < 10 && !out; i++) {
        let killedAt = null;
        const o = await streamRequest(gw.port, streamBody('killme'), { 'x-fake-chunks': '50', 'x-fake-delay-ms': '50' }, {
            timeoutMs: 8000,
            onEvent: (ev, cur) => {
                if (cur.headers['x-modelmux-backend'] === K.url && cur.events.length === 2 && !killedAt) {
                    killedAt = Date.now();
                    K.proc.kill('SIGKILL');
                }
            },
        });
        if (killedAt) {
            out = o;
            out.sinceKill = Date.now() - killedAt;
        } else {
            assert.ok(o.events.includes('data: [DONE]'), 'B streams completely');
            bStreams++;
        }
    }
    assert.ok(out, 'a stream reached K');
    checkCutStream(out, 2);
    assert.ok(out.sinceKill < 1000, `the stream ended ${out.sinceKill} ms after the kill`);
    assert.equal((await requestsOf(B)) - bBefore, bStreams, 'the killed stream was not retried on B');
});

test('a killed backend is taken out by the breaker (requests still succeed) and back through half-open after it restarts', async () => {
    await waitFor(() => K.proc.exitCode !== null || K.proc.signalCode !== null, 2000, { what: 'K exited' });
    // While K is dead every request succeeds on B; K's breaker opens.
    for (let i = 0; i < 10; i++) {
        const r = await chat(gw.port, 'killme');
        assert.equal(r.status, 200, r.body);
        assert.equal(r.headers['x-modelmux-backend'], B.url);
    }
    const k = await gw.backend('killme', K.url);
    assert.ok(['open', 'half_open'].includes(k.breaker), `K ejected: ${JSON.stringify(k)}`);
    assert.ok(k.trips >= 1);

    K = await K.restart();
    // After open_ms a probe reaches the new K and closes the breaker.
    await waitFor(async () => (await chat(gw.port, 'killme')).headers['x-modelmux-backend'] === K.url, 5000,
        { what: 'the restarted K serves again' });
    const k2 = await gw.backend('killme', K.url);
    assert.equal(k2.breaker, 'closed', JSON.stringify(k2));
    assert.ok((await K.stats()).requests >= 1);
});

test('retry: a backend that closes the connection before headers is not retried by the gateway (only libcurl\'s stale-connection resend)', async () => {
    await resetFakes();
    // Warm the gateway's keep-alive pools to A (both threads), so the next
    // request to A goes over a reused connection.
    for (let i = 0; i < 12; i++) assert.equal((await chat(gw.port, 'solo')).status, 200);
    await A.reset();
    await A.setMode({ mode: 'close' });
    for (let i = 0; i < 4; i++) {
        const r = await chat(gw.port, 'solo');
        checkErrorShape(assert, r, 502);
    }
    const s = await A.stats();
    // Each request is one gateway attempt on A (solo has no other backend,
    // and retries only go to backends not tried yet). libcurl itself resends
    // once, on a fresh connection, when a *reused* keep-alive connection
    // closes before any answer: that is how it survives an idle connection
    // the server closed a moment ago (docs/RESILIENCE.md). So A sees each
    // request once or twice, never more; a gateway retry to A would make 3+.
    assert.ok(s.requests >= 4 && s.requests <= 8, `A received ${s.requests} requests for 4 client requests`);
    await A.setMode({});
});
