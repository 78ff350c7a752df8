// Resilience: the per-backend circuit breaker (consecutive failures, error
// rate over a window, half-open probes, doubling open time, max ejection
// percent), Retry-After cooling, and that client errors never count.
// Active health checks are off here so only the breaker decides.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, chat, checkErrorShape, model, waitFor } from './lib.mjs';

let A, B, C, gw;

// Breaker settings that keep one trigger at a time in play: the error-rate
// trigger needs more requests than any of these tests sends.
const noRate = { error_rate: 1.0, min_requests: 1000 };

before(async () => {
    [A, B, C] = await Promise.all([startFake({ name: 'A' }), startFake({ name: 'B' }), startFake({ name: 'C' })]);
    const pair = [{ url: A.url }, { url: B.url }];
    gw = await startGateway({
        threads: 2,
        models: [
            model('five', pair, { breaker: { ...noRate, consecutive_failures: 5, open_ms: 1000 } }),
            model('rate', pair, { breaker: { consecutive_failures: 0, error_rate: 0.5, window_ms: 10000, min_requests: 10, open_ms: 5000 } }),
            model('both', pair, { breaker: { ...noRate, consecutive_failures: 3, open_ms: 5000 } }),
            model('single', [{ url: A.url }], { breaker: { ...noRate, consecutive_failures: 3, open_ms: 5000 } }),
            model('poison', [{ url: A.url }, { url: B.url }, { url: C.url }], { breaker: { ...noRate, consecutive_failures: 3 } }),
            model('cool', pair, { breaker: { ...noRate, consecutive_failures: 100 } }),
            model('cooldate', pair, { breaker: { ...noRate, consecutive_failures: 100 } }),
            model('ho', pair, { breaker: { ...noRate, consecutive_failures: 2, open_ms: 400, max_open_ms: 10000, half_open_requests: 1 } }),
        ],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await Promise.all([A, B, C].map((f) => f?.kill()));
});

// Every fake back to normal with zeroed counters.
async function resetFakes() {
    await Promise.all([A, B, C].map(async (f) => { await f.setMode({}); await f.reset(); }));
}

async function requestsOf(f) { return (await f.stats()).requests; }

test('breaker: an upstream that answers 500 five times: clients all get 200, it opens at the 5th failure, half-open takes it back', async () => {
    await resetFakes();
    await A.setMode({ mode: 'status:500', count: 5 });
    // Sequential requests: after each, A's breaker must be closed while A
    // has failed fewer than 5 times, and open once it has failed 5 times.
    let aReqs = 0;
    for (let i = 0; i < 60 && aReqs < 5; i++) {
        const r = await chat(gw.port, 'five');
        assert.equal(r.status, 200, `request ${i} is retried onto B: ${r.body}`);
        assert.equal(r.headers['x-modelmux-backend'], B.url);
        aReqs = await requestsOf(A);
        const a = await gw.backend('five', A.url);
        if (aReqs < 5) assert.equal(a.breaker, 'closed', `after ${aReqs} failures: ${JSON.stringify(a)}`);
    }
    assert.equal(aReqs, 5, 'A got 5 requests');
    const a = await gw.backend('five', A.url);
    assert.equal(a.breaker, 'open', `open after 5 consecutive failures: ${JSON.stringify(a)}`);
    assert.equal(a.trips, 1);
    assert.equal(a.failures, 5);
    assert.ok(a.retry_in_ms > 0 && a.retry_in_ms <= 1000, `retry_in_ms ${a.retry_in_ms} within open_ms 1000`);

    // While open: no traffic to A. (Checked for the requests sent while
    // the admin view says open with time to spare, so a slow machine cannot
    // turn the end of open_ms into a false failure.)
    let checked = 0;
    for (let i = 0; i < 10; i++) {
        const st = await gw.backend('five', A.url);
        const r = await chat(gw.port, 'five');
        assert.equal(r.status, 200);
        if (st.breaker === 'open' && st.retry_in_ms > 200) {
            assert.equal(r.headers['x-modelmux-backend'], B.url, 'the open backend gets nothing');
            assert.equal(await requestsOf(A), 5);
            checked++;
        }
    }
    assert.ok(checked >= 1, 'at least one request was sent while A was open');

    // After open_ms a half-open probe goes to A (which answers 200 now) and
    // closes the breaker.
    await waitFor(async () => (await gw.backend('five', A.url)).retry_in_ms === 0, 3000, { what: 'open_ms elapsed' });
    let probe = null;
    for (let i = 0; i < 10 && !probe; i++) {
        const r = await chat(gw.port, 'five');
        assert.equal(r.status, 200);
        if (r.headers['x-modelmux-backend'] === A.url) probe = r;
    }
    assert.ok(probe, 'A is tried again after open_ms');
    const closed = await gw.backend('five', A.url);
    assert.equal(closed.breaker, 'closed', `the successful probe closed it: ${JSON.stringify(closed)}`);
    assert.equal(closed.trips, 1);
});

test('breaker: error rate over the window opens at min_requests, not before', async () => {
    await resetFakes();
    // A fails every other request: rate 0.5 = error_rate; consecutive off.
    await A.setMode({ pattern: ['status:500', 'normal'] });
    let aReqs = 0;
    for (let i = 0; i < 80 && aReqs < 10; i++) {
        const r = await chat(gw.port, 'rate');
        assert.equal(r.status, 200, r.body);
        aReqs = await requestsOf(A);
        const a = await gw.backend('rate', A.url);
        if (aReqs < 10) {
            assert.equal(a.breaker, 'closed', `${aReqs} outcomes < min_requests 10: ${JSON.stringify(a)}`);
            assert.equal(a.window_requests, aReqs, 'every outcome is in the window');
        }
    }
    assert.equal(aReqs, 10);
    const a = await gw.backend('rate', A.url);
    assert.equal(a.breaker, 'open', `5 failures in 10 reach error_rate 0.5: ${JSON.stringify(a)}`);
    assert.equal(a.failures, 5);
    assert.ok(Math.abs(a.error_rate - 0.5) < 1e-9, `error_rate ${a.error_rate}`);
    assert.ok(a.retry_in_ms > 0 && a.retry_in_ms <= 5000);
});

test('breaker: max_ejection_percent 50 with both backends failing: at most one is open', async () => {
    await resetFakes();
    await A.setMode({ mode: 'status:500' });
    await B.setMode({ mode: 'status:500' });
    for (let i = 0; i < 20; i++) {
        const r = await chat(gw.port, 'both');
        // Every attempt failed and there is no fallback: the last upstream
        // answer is passed through.
        assert.equal(r.status, 500, r.body);
        assert.match(r.json().error.message, /^fake [AB] failure 500$/);
    }
    const m = (await gw.admin()).models.find((x) => x.model === 'both');
    const open = m.backends.filter((b) => b.breaker !== 'closed');
    assert.equal(open.length, 1, `exactly one of two ejected: ${JSON.stringify(m.backends)}`);
    const other = m.backends.find((b) => b.breaker === 'closed');
    assert.ok(other.failures >= 3, 'the other kept failing but was not ejected');
});

test('breaker: a pool of one backend is never ejected', async () => {
    await resetFakes();
    await A.setMode({ mode: 'status:500' });
    for (let i = 0; i < 12; i++) {
        const r = await chat(gw.port, 'single');
        assert.equal(r.status, 500, 'the upstream answer, not a 503 from an open breaker');
    }
    const a = await gw.backend('single', A.url);
    assert.equal(a.breaker, 'closed', JSON.stringify(a));
    assert.equal(a.failures, 12);
    assert.equal(await requestsOf(A), 12, 'every request reached it');
});

test('breaker: a poison prompt that makes every backend answer 400 ejects no backend', async () => {
    await resetFakes();
    for (let i = 0; i < 20; i++) {
        const r = await chat(gw.port, 'poison', { 'x-fake-mode': i % 2 ? 'status:400' : 'status:422' });
        assert.equal(r.status, i % 2 ? 400 : 422, 'the client error is passed through');
    }
    const total = (await Promise.all([A, B, C].map(requestsOf))).reduce((x, y) => x + y, 0);
    assert.equal(total, 20, 'client errors are never retried: one attempt per request');
    const m = (await gw.admin()).models.find((x) => x.model === 'poison');
    for (const b of m.backends) {
        assert.equal(b.breaker, 'closed', JSON.stringify(b));
        assert.equal(b.failures, 0, `4xx is not a failure: ${JSON.stringify(b)}`);
        assert.equal(b.error_rate, 0);
    }
    const r = await chat(gw.port, 'poison');
    assert.equal(r.status, 200);
});

for (const status of [429, 503]) {
    test(`breaker: ${status} with Retry-After cools that backend for the time it names`, async () => {
        await resetFakes();
        await A.setMode({ mode: `status:${status}`, count: 1, retry_after: 1 });
        let r;
        for (let i = 0; i < 10 && (await requestsOf(A)) === 0; i++) {
            r = await chat(gw.port, 'cool');
            assert.equal(r.status, 200, `retried onto B: ${r.body}`);
            assert.equal(r.headers['x-modelmux-backend'], B.url);
        }
        assert.equal(await requestsOf(A), 1);
        const a = await gw.backend('cool', A.url);
        assert.ok(a.retry_in_ms > 0 && a.retry_in_ms <= 1000, `cooling for Retry-After 1 s: ${JSON.stringify(a)}`);
        assert.equal(a.breaker, 'closed', 'cooling is not the breaker');
        for (let i = 0; i < 10; i++) {
            const x = await chat(gw.port, 'cool');
            assert.equal(x.headers['x-modelmux-backend'], B.url, 'no traffic to a cooling backend');
        }
        if ((await gw.backend('cool', A.url)).retry_in_ms > 0) assert.equal(await requestsOf(A), 1);
        await waitFor(async () => (await gw.backend('cool', A.url)).retry_in_ms === 0, 3000, { what: 'cooldown over' });
        await waitFor(async () => (await chat(gw.port, 'cool')).headers['x-modelmux-backend'] === A.url, 3000,
            { what: 'A gets traffic again after Retry-After' });
    });
}

test('breaker: Retry-After as an HTTP date (RFC 9110) cools the backend too', async () => {
    await resetFakes();
    const when = new Date(Date.now() + 3000).toUTCString();   // 2..3 s ahead at 1 s resolution
    await A.setMode({ mode: 'status:503', count: 1, retry_after: when });
    for (let i = 0; i < 10 && (await requestsOf(A)) === 0; i++) {
        const r = await chat(gw.port, 'cooldate');
        assert.equal(r.status, 200, r.body);
    }
    assert.equal(await requestsOf(A), 1);
    const a = await gw.backend('cooldate', A.url);
    assert.ok(a.retry_in_ms > 1000 && a.retry_in_ms <= 3000, `Retry-After: ${when} -> retry_in_ms ${a.retry_in_ms}`);
});

test('breaker: a single backend that answers 429 + Retry-After: client gets it, then a fast 503 while it cools', async () => {
    await resetFakes();
    await A.setMode({ mode: 'status:429', count: 1, retry_after: 1 });
    const r = await chat(gw.port, 'single');
    assert.equal(r.status, 429, 'the upstream answer is passed through');
    assert.equal(r.headers['retry-after'], '1');
    const t0 = Date.now();
    const r2 = await chat(gw.port, 'single');
    const ms = Date.now() - t0;
    checkErrorShape(assert, r2, 503);
    const ra = Number(r2.headers['retry-after']);
    assert.ok(ra === 1, `Retry-After ${r2.headers['retry-after']}`);
    assert.ok(ms < 500, `answered at once (${ms} ms)`);
    assert.equal(await requestsOf(A), 1, 'the cooling backend was not contacted');
});

test('breaker: half-open admits one probe; a failed probe re-opens with open_ms doubled; a good one closes it', async () => {
    await resetFakes();
    await A.setMode({ mode: 'close' });   // connection closed before any answer
    // Attempts are counted by the gateway (failures): libcurl resends a
    // request once by itself when a reused connection closes before any
    // answer byte, so the fake may see two requests for one attempt.
    const failuresOf = async () => (await gw.backend('ho', A.url)).failures;
    for (let i = 0; i < 20 && (await failuresOf()) < 2; i++) {
        const r = await chat(gw.port, 'ho');
        assert.equal(r.status, 200, r.body);
    }
    let a = await gw.backend('ho', A.url);
    assert.equal(a.breaker, 'open', JSON.stringify(a));
    assert.equal(a.trips, 1);

    // The probe after open_ms fails too: open again for 2 x 400 ms.
    await waitFor(async () => (await gw.backend('ho', A.url)).retry_in_ms === 0, 3000, { what: 'first open period over' });
    for (let i = 0; i < 20 && (await failuresOf()) < 3; i++) {
        const r = await chat(gw.port, 'ho');
        assert.equal(r.status, 200, r.body);
    }
    a = await gw.backend('ho', A.url);
    assert.equal(a.breaker, 'open', JSON.stringify(a));
    assert.equal(a.trips, 2);
    assert.ok(a.retry_in_ms > 400 && a.retry_in_ms <= 800, `re-opened for 800 ms, ${a.retry_in_ms} left`);

    // Now A answers, slowly: while its one probe is in flight the breaker is
    // half_open and nothing else reaches A.
    await A.setMode({ mode: 'normal', first_delay_ms: 700 });
    await waitFor(async () => (await gw.backend('ho', A.url)).retry_in_ms === 0, 3000, { what: 'second open period over' });
    const before = await requestsOf(A);
    let probe = null;
    for (let i = 0; i < 20 && !probe; i++) {
        const p = chat(gw.port, 'ho');
        let settled = false;
        p.then(() => { settled = true; }, () => { settled = true; });
        await waitFor(async () => settled || (await requestsOf(A)) > before, 3000, { what: 'request answered or at A' });
        if ((await requestsOf(A)) > before) probe = p;
        else assert.equal((await p).status, 200);
    }
    assert.ok(probe, 'a probe reached A');
    a = await gw.backend('ho', A.url);
    assert.equal(a.breaker, 'half_open', JSON.stringify(a));
    assert.equal(a.inflight, 1);
    for (let i = 0; i < 10; i++) {
        const r = await chat(gw.port, 'ho');
        assert.equal(r.headers['x-modelmux-backend'], B.url, 'half_open_requests 1: no second request to A');
    }
    assert.equal(await requestsOf(A), before + 1);
    const pr = await probe;
    assert.equal(pr.status, 200);
    assert.equal(pr.headers['x-modelmux-backend'], A.url);
    a = await gw.backend('ho', A.url);
    assert.equal(a.breaker, 'closed', `the good probe closed it: ${JSON.stringify(a)}`);
});

test('admin: /admin/backends shows health, breaker, in-flight, error rate and retry time for every backend', async () => {
    await resetFakes();
    const j = await gw.admin();
    const names = j.models.map((m) => m.model).sort();
    assert.deepEqual(names, ['both', 'cool', 'cooldate', 'five', 'ho', 'poison', 'rate', 'single']);
    for (const m of j.models) {
        assert.equal(typeof m.queued, 'number');
        for (const b of m.backends) {
            assert.equal(typeof b.url, 'string');
            assert.ok(['up', 'down', 'loading'].includes(b.health), `health ${b.health}`);
            assert.ok(['closed', 'open', 'half_open'].includes(b.breaker), `breaker ${b.breaker}`);
            for (const k of ['inflight', 'error_rate', 'retry_in_ms', 'requests', 'failures']) {
                assert.equal(typeof b[k], 'number', `${k} in ${JSON.stringify(b)}`);
                assert.ok(b[k] >= 0);
            }
        }
    }
    // In-flight: a slow request shows up while it runs. (An earlier test's
    // Retry-After may still cool A in this pool.)
    await waitFor(async () => (await gw.backend('single', A.url)).retry_in_ms === 0, 3000, { what: 'single/A not cooling' });
    await A.setMode({ first_delay_ms: 600 });
    const p = chat(gw.port, 'single');
    await waitFor(async () => (await gw.backend('single', A.url)).inflight === 1, 3000, { what: 'inflight 1' });
    assert.equal((await p).status, 200);
    assert.equal((await gw.backend('single', A.url)).inflight, 0);
});
