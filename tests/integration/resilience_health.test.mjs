// Resilience: active health checks (HAProxy rise/fall, 503 = loading, check
// timeout, a faster interval while a backend changes state) and passive
// health (failed requests feed the same state). A backend known to be down
// receives no traffic.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, getFreePort, chat, waitFor } from './lib.mjs';

const IV = 100;   // interval_ms of the checks here
let A, B, gw, gwPassive, deadPort;

before(async () => {
    [A, B] = await Promise.all([startFake({ name: 'A' }), startFake({ name: 'B' })]);
    deadPort = await getFreePort();   // nothing listens there
    gw = await startGateway({
        threads: 2,
        models: [{
            name: 'h',
            backends: [{ url: A.url }, { url: B.url }],
            health: { interval_ms: IV, timeout_ms: 150, rise: 2, fall: 3 },
            // Only health decides in this file.
            breaker: { consecutive_failures: 0, min_requests: 1000 },
        }],
    }, { admin: true });
    // Passive only: the first active check comes at a random point of a
    // one-day interval, so (but for a 1e-4 chance) never while this runs.
    gwPassive = await startGateway({
        threads: 2,
        models: [{
            name: 'p',
            backends: [{ url: `http://127.0.0.1:${deadPort}` }, { url: B.url }],
            health: { interval_ms: 86400000, rise: 2, fall: 3 },
            breaker: { consecutive_failures: 0, min_requests: 1000 },
        }],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await gwPassive?.stop();
    await Promise.all([A, B].map((f) => f?.kill()));
});

const state = async (f) => gw.backend('h', f.url);
const answers = async (f, status) => (await f.stats()).health_answers[status] || 0;

// Back to healthy: both fakes answer /health 200 and the gateway sees them up.
async function healthy() {
    await Promise.all([A, B].map((f) => f.setHealth({})));
    await waitFor(async () => (await state(A)).health === 'up' && (await state(B)).health === 'up', 5000,
        { what: 'A and B up' });
    await Promise.all([A, B].map((f) => f.reset()));
}

// Lines of the gateway log saying the health checker moved A to `word`.
function transitions(word) {
    const re = new RegExp(`backend ${A.url.replace(/[.]/g, '\\.')} of h: ${word} \\(health check\\)`, 'g');
    return (gw.log().match(re) || []).length;
}

test('health: a backend goes down after `fall` failed checks and then gets no traffic; up again after `rise`', async () => {
    await healthy();
    await A.setHealth({ status: 500 });
    const down = await waitFor(async () => { const s = await state(A); return s.health === 'down' && s; }, 5000,
        { what: 'A down' });
    assert.equal(down.up, false);
    const fails = await answers(A, 500);
    assert.ok(fails >= 3, `down after ${fails} failed checks (fall 3)`);
    assert.equal(down.breaker, 'closed', 'health, not the breaker');

    for (let i = 0; i < 10; i++) {
        const r = await chat(gw.port, 'h');
        assert.equal(r.status, 200);
        assert.equal(r.headers['x-modelmux-backend'], B.url, 'a down backend gets no traffic');
    }
    assert.equal((await A.stats()).requests, 0);

    const okBefore = await answers(A, 200);
    await A.setHealth({});
    await waitFor(async () => (await state(A)).health === 'up', 5000, { what: 'A up again' });
    const oks = (await answers(A, 200)) - okBefore;
    assert.ok(oks >= 2, `up after ${oks} good checks (rise 2)`);
    await waitFor(async () => (await chat(gw.port, 'h')).headers['x-modelmux-backend'] === A.url, 2000,
        { what: 'A gets traffic again' });
});

test('health: fall-1 failed checks do not take a backend down; rise-1 good ones do not bring it up', async () => {
    await healthy();
    const downs = transitions('down');
    // Two failures, then good answers: the streak breaks before fall 3.
    await A.setHealth({ status: 500, count: 2, then: 200 });
    const seen = new Set();
    await waitFor(async () => {
        seen.add((await state(A)).health);
        return (await answers(A, 500)) === 2 && (await answers(A, 200)) >= 3;
    }, 5000, { what: '2 failed checks then 3 good ones' });
    assert.deepEqual([...seen], ['up'], 'never down on 2 failures');
    assert.equal(transitions('down'), downs, 'no down transition logged');

    await A.setHealth({ status: 500 });
    await waitFor(async () => (await state(A)).health === 'down', 5000, { what: 'A down' });
    const ups = transitions('up');
    await A.reset();
    // One good check between failures: the streak breaks before rise 2.
    await A.setHealth({ status: 200, count: 1, then: 500 });
    seen.clear();
    await waitFor(async () => {
        seen.add((await state(A)).health);
        return (await answers(A, 200)) === 1 && (await answers(A, 500)) >= 3;
    }, 5000, { what: '1 good check then 3 failed ones' });
    assert.deepEqual([...seen], ['down'], 'never up on 1 good check');
    assert.equal(transitions('up'), ups, 'no up transition logged');
    await healthy();
});

test('health: a backend answering 503 while it loads is "loading", not failed, and gets no traffic', async () => {
    await healthy();
    await A.setHealth({ status: 503 });
    const s = await waitFor(async () => { const x = await state(A); return x.health === 'loading' && x; }, 5000,
        { what: 'A loading' });
    assert.equal(s.up, false);
    assert.equal(s.breaker, 'closed');
    assert.equal(s.failures, 0, 'loading is not a request failure');
    for (let i = 0; i < 10; i++) {
        const r = await chat(gw.port, 'h');
        assert.equal(r.headers['x-modelmux-backend'], B.url, 'a loading backend gets no traffic');
    }
    assert.equal((await A.stats()).requests, 0);
    // Loaded: up after rise good checks.
    await A.setHealth({});
    await waitFor(async () => (await state(A)).health === 'up', 5000, { what: 'A up after loading' });
});

test('health: a check slower than timeout_ms counts as failed', async () => {
    await healthy();
    await A.setHealth({ delay_ms: 600 });   // timeout_ms is 150
    await waitFor(async () => (await state(A)).health === 'down', 5000, { what: 'A down on slow checks' });
    assert.equal(await answers(A, 200), 0, 'no check was answered in time');
    assert.ok((await A.stats()).health_checks >= 3, 'the checks did arrive');
    await healthy();
});

test('health: checks run every interval_ms, faster while a backend is changing state', async () => {
    await healthy();
    // Stable: the gaps between checks are about interval_ms (+-10% jitter).
    await waitFor(async () => (await A.stats()).health_log.length >= 8, 5000, { what: '8 checks' });
    const log = (await A.stats()).health_log.map((e) => Number(BigInt(e.t_ns) / 1000000n));
    const gaps = log.slice(1).map((t, i) => t - log[i]).sort((x, y) => x - y);
    const median = gaps[gaps.length >> 1];
    assert.ok(median >= 0.85 * IV && median <= 2 * IV, `stable gaps ${gaps} around ${IV} ms`);

    // Changing: after the first failure the next checks come at a quarter of
    // the interval until the backend is down.
    await A.reset();
    await A.setHealth({ status: 500 });
    await waitFor(async () => (await state(A)).health === 'down', 5000, { what: 'A down' });
    const fl = (await A.stats()).health_log.filter((e) => e.status === 500).map((e) => Number(BigInt(e.t_ns) / 1000000n));
    assert.ok(fl.length >= 3);
    const g1 = fl[1] - fl[0];
    const g2 = fl[2] - fl[1];
    // A quarter of the interval; compared with the stable gaps measured on
    // this machine just before, so a slow machine slows both alike.
    assert.ok(g1 < 0.6 * median && g2 < 0.6 * median,
        `checks while going down came ${g1} and ${g2} ms apart (stable: ${median} ms, interval ${IV})`);
    await healthy();
});

test('health: passive: failed requests take a backend down without any check, then it gets no traffic', async () => {
    const dead = `http://127.0.0.1:${deadPort}`;
    let d;
    for (let i = 0; i < 30; i++) {
        const r = await chat(gwPassive.port, 'p');
        assert.equal(r.status, 200, `connect errors are retried on B: ${r.body}`);
        d = await gwPassive.backend('p', dead);
        if (d.requests >= 3) break;
        assert.equal(d.health, 'up', `still up after ${d.requests} failed requests`);
    }
    assert.equal(d.requests, 3);
    assert.equal(d.failures, 3);
    assert.equal(d.health, 'down', `down after fall (3) failed requests: ${JSON.stringify(d)}`);
    assert.equal(d.breaker, 'closed');
    for (let i = 0; i < 10; i++) {
        const r = await chat(gwPassive.port, 'p');
        assert.equal(r.status, 200);
        assert.equal(r.headers['x-modelmux-backend'], B.url);
    }
    assert.equal((await gwPassive.backend('p', dead)).requests, 3, 'no attempt on the down backend');
});
