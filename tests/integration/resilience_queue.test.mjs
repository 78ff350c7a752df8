// Resilience: concurrency caps. max_requests in flight per backend and a
// bounded queue per model (max_queue, queue_timeout_ms); overflow answers 429
// with Retry-After and opens no upstream connection.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, chat, model, waitFor } from './lib.mjs';

let A, gw;

before(async () => {
    A = await startFake({ name: 'A' });
    gw = await startGateway({
        threads: 2,
        models: [
            model('q', [{ url: A.url }], { max_requests: 1, max_queue: 1, queue_timeout_ms: 5000 }),
            model('qt', [{ url: A.url }], { max_requests: 1, max_queue: 1, queue_timeout_ms: 200 }),
            model('nq', [{ url: A.url, max_requests: 1 }]),   // per-backend cap, no queue
        ],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await A?.kill();
});

const slow = (ms) => ({ 'x-fake-first-delay-ms': String(ms) });
const queued = async (name) => (await gw.admin()).models.find((m) => m.model === name).queued;

// The error shape of a 429 from the gateway itself. The type is not pinned:
// OpenAI's own 429s say rate_limit_error, the generic 4xx rule says
// invalid_request_error.
function check429(res) {
    assert.equal(res.status, 429, `status; body: ${res.body}`);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    const j = JSON.parse(res.body);
    assert.deepEqual(Object.keys(j), ['error']);
    assert.deepEqual(Object.keys(j.error).sort(), ['code', 'message', 'param', 'type']);
    assert.equal(j.error.code, 429);
    assert.ok(['rate_limit_error', 'invalid_request_error'].includes(j.error.type), `type ${j.error.type}`);
    assert.ok(j.error.message.length > 0);
    const ra = res.headers['retry-after'];
    assert.match(String(ra), /^[1-9][0-9]*$/, `Retry-After: ${ra}`);
}

// The slot holder is in flight at A, as the gateway counts it for `name`.
// In flight at the gateway (picked) and arrived at A: the gateway counts a
// request at pick time, before its connection reaches A, so both are waited
// for before a test compares A's counters.
const holding = async (name) => {
    await waitFor(async () => (await gw.backend(name, A.url)).inflight === 1, 3000,
        { what: `a request of ${name} in flight at A` });
    await waitFor(async () => (await A.stats()).requests >= 1, 3000,
        { what: `the request of ${name} arrived at A` });
};

function timed(p) {
    const t0 = Date.now();
    return p.then((r) => ({ ...r, ms: Date.now() - t0, end: Date.now() }));
}

test('queue: max_requests + full max_queue -> 429 with Retry-After, no upstream connection or request; the queued one then succeeds', async () => {
    await A.reset();
    const p1 = timed(chat(gw.port, 'q', slow(800)));
    await holding('q');
    const p2 = timed(chat(gw.port, 'q'));
    p1.catch(() => {});
    p2.catch(() => {});
    await waitFor(async () => (await queued('q')) === 1, 3000, { what: 'second request queued' });
    const s0 = await A.stats();

    const t0 = Date.now();
    const r3 = await chat(gw.port, 'q');
    const ms = Date.now() - t0;
    check429(r3);
    assert.ok(ms < 300, `refused at once (${ms} ms)`);
    const s1 = await A.stats();
    assert.equal(s1.requests, s0.requests, 'no request reached the upstream');
    assert.equal(s1.connections - s1.control_connections, s0.connections - s0.control_connections, 'no upstream connection was opened');

    const [r1, r2] = await Promise.all([p1, p2]);
    assert.equal(r1.status, 200);
    assert.equal(r2.status, 200, 'the queued request is served once the slot frees');
    assert.equal(r2.headers['x-modelmux-backend'], A.url);
    assert.ok(r2.end >= r1.end, 'the queued request finished after the one holding the slot');
    assert.ok(r2.ms >= 600, `it waited for the slot (${r2.ms} ms)`);
    assert.equal((await A.stats()).requests, 2);
    assert.equal(await queued('q'), 0);
    assert.equal((await gw.backend('q', A.url)).inflight, 0);
});

test('queue: a request waits at most queue_timeout_ms, then 429 with Retry-After', async () => {
    await A.reset();
    const p1name = 'qt';
    const p1 = chat(gw.port, 'qt', slow(1500));
    p1.catch(() => {});   // awaited below; no unhandled rejection if an assert fails first
    await holding(p1name);
    const t0 = Date.now();
    const r2 = await chat(gw.port, 'qt');
    const ms = Date.now() - t0;
    check429(r2);
    assert.ok(ms >= 180 && ms < 1200, `gave up after queue_timeout_ms 200 (${ms} ms)`);
    assert.equal((await A.stats()).requests, 1, 'the timed-out request never reached the upstream');
    assert.equal(await queued('qt'), 0, 'it left the queue');
    assert.equal((await p1).status, 200);
});

test('queue: without a queue, a backend at max_requests means an immediate 429', async () => {
    await A.reset();
    const p1name = 'nq';
    const p1 = chat(gw.port, 'nq', slow(600));
    p1.catch(() => {});
    await holding(p1name);
    const s0 = await A.stats();
    const t0 = Date.now();
    const r2 = await chat(gw.port, 'nq');
    const ms = Date.now() - t0;
    check429(r2);
    assert.ok(ms < 300, `refused at once (${ms} ms)`);
    const s1 = await A.stats();
    assert.equal(s1.requests, s0.requests);
    assert.equal(s1.connections - s1.control_connections, s0.connections - s0.control_connections, 'no upstream connection was opened');
    assert.equal((await p1).status, 200);
    // Once the slot is free it serves again.
    assert.equal((await chat(gw.port, 'nq')).status, 200);
});
