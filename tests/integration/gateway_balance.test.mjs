// Load balancing: smooth weighted round robin, weighted random, splits by
// weight, and sticky splits (header and body keys).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startFake, startGateway, postJson, chat, model, chiSquare, pool, sleep } from './lib.mjs';

// chi-square critical value, df = 1, p = 0.001
const CHI2_DF1_999 = 10.83;

let fa, fb, fc, gw, agent;

before(async () => {
    [fa, fb, fc] = await Promise.all([
        startFake({ name: 'a' }), startFake({ name: 'b' }), startFake({ name: 'c' }),
    ]);
    gw = await startGateway({
        // One thread: the round-robin state is then one sequence.
        threads: 1,
        models: [
            model('wrr', [{ url: fa.url, weight: 5 }, { url: fb.url, weight: 1 }, { url: fc.url, weight: 1 }],
                { strategy: 'round_robin' }),
            model('rnd', [{ url: fa.url, weight: 3 }, { url: fb.url, weight: 1 }], { strategy: 'random' }),
            model('lo', [{ url: fa.url }, { url: fb.url }], { strategy: 'least_outstanding' }),
            model('va', [{ url: fa.url }]),
            model('vb', [{ url: fb.url }]),
            { name: 'split', split: [{ model: 'va', weight: 90 }, { model: 'vb', weight: 10 }] },
            { name: 'sticky-h', split: [{ model: 'va', weight: 90 }, { model: 'vb', weight: 10 }], sticky: 'header:x-user-id' },
            { name: 'sticky-b', split: [{ model: 'va', weight: 90 }, { model: 'vb', weight: 10 }], sticky: 'body:user' },
        ],
    });
    agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
});

after(async () => {
    agent?.destroy();
    await gw?.stop();
    await Promise.all([fa, fb, fc].map((f) => f?.kill()));
});

test('smooth WRR: weights 5,1,1 give a a b a c a a, twice', async () => {
    const seen = [];
    for (let i = 0; i < 14; i++) {
        const r = await chat(gw.port, 'wrr');
        assert.equal(r.status, 200, r.body);
        seen.push(r.json().fake.name);
    }
    assert.equal(seen.join(' '), 'a a b a c a a a a b a c a a');
});

test('random: weights 3,1 hold over 1200 requests (chi-square, 99.9%)', async () => {
    const names = await pool(1200, 8, async () => {
        const r = await chat(gw.port, 'rnd', {}, { agent });
        assert.equal(r.status, 200);
        return r.json().fake.name;
    });
    const obs = [names.filter((n) => n === 'a').length, names.filter((n) => n === 'b').length];
    assert.equal(obs[0] + obs[1], 1200);
    const chi = chiSquare(obs, [3, 1]);
    assert.ok(chi < CHI2_DF1_999, `observed ${obs} for weights 3:1, chi2 ${chi.toFixed(2)}`);
});

test('least_outstanding: while one backend holds a slow request, the other gets the rest', async () => {
    const slow = chat(gw.port, 'lo', { 'x-fake-first-delay-ms': '1500' }, { timeoutMs: 5000 });
    // Wait until the slow request is at a fake, so the gateway counts it.
    const deadline = Date.now() + 2000;
    let busy = null;
    while (!busy && Date.now() < deadline) {
        for (const f of [fa, fb]) if ((await f.stats()).inflight > 0) busy = f;
        if (!busy) await sleep(10);
    }
    assert.ok(busy, 'the slow request reached a backend');
    const names = [];
    for (let i = 0; i < 6; i++) {
        const r = await chat(gw.port, 'lo');
        assert.equal(r.status, 200);
        names.push(r.json().fake.name);
    }
    const idle = busy === fa ? 'b' : 'a';
    assert.deepEqual(names, Array(6).fill(idle), `the busy backend was ${busy.name}`);
    const r = await slow;
    assert.equal(r.status, 200);
    assert.equal(r.json().fake.name, busy.name);
});

test('split: 90/10 over 2000 requests (chi-square, 99.9%), header names the variant', async () => {
    const results = await pool(2000, 8, async () => {
        const r = await chat(gw.port, 'split', {}, { agent });
        assert.equal(r.status, 200);
        const name = r.json().fake.name;
        const variant = r.headers['x-modelmux-model'];
        assert.equal(variant, name === 'a' ? 'va' : 'vb', 'x-modelmux-model is the variant that answered');
        return variant;
    });
    const obs = [results.filter((v) => v === 'va').length, results.filter((v) => v === 'vb').length];
    assert.equal(obs[0] + obs[1], 2000);
    const chi = chiSquare(obs, [90, 10]);
    assert.ok(chi < CHI2_DF1_999, `observed ${obs} for 90:10, chi2 ${chi.toFixed(2)}`);
});

// Sends 5 rounds over 200 keys (round-major, so a key's requests are spread
// out in time) and checks each key always lands on one variant, and that keys
// spread over the variants by weight.
async function stickyRun(send) {
    const byKey = new Map();
    for (let round = 0; round < 5; round++) {
        const variants = await pool(200, 8, async (i) => {
            const r = await send(`user-${i}-${(i * 7919) % 1000}`, round);
            assert.equal(r.status, 200, r.body);
            return r.headers['x-modelmux-model'];
        });
        variants.forEach((v, i) => {
            if (!byKey.has(i)) byKey.set(i, new Set());
            byKey.get(i).add(v);
        });
    }
    for (const [k, set] of byKey) {
        assert.equal(set.size, 1, `key ${k} got variants ${[...set]}`);
    }
    const first = [...byKey.values()].map((s) => [...s][0]);
    const obs = [first.filter((v) => v === 'va').length, first.filter((v) => v === 'vb').length];
    assert.equal(obs[0] + obs[1], 200);
    assert.ok(obs[1] > 0 && obs[0] > 0, `both variants used: ${obs}`);
    const chi = chiSquare(obs, [90, 10]);
    assert.ok(chi < CHI2_DF1_999, `keys per variant ${obs} for 90:10, chi2 ${chi.toFixed(2)}`);
}

test('sticky header: 200 user ids x 5 always get the same variant', async () => {
    await stickyRun((user, round) => chat(gw.port, 'sticky-h',
        // header names are case-insensitive
        round % 2 ? { 'X-User-Id': user } : { 'x-user-id': user }, { agent }));
});

test('sticky body:user: 200 users x 5 always get the same variant', async () => {
    await stickyRun((user, round) => postJson(gw.port, '/v1/chat/completions',
        { model: 'sticky-b', user, messages: [{ role: 'user', content: `round ${round}` }] }, {}, { agent }));
});
