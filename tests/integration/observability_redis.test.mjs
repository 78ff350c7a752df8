// Observability: two gateway processes share one private redis-server. Known
// traffic goes through both (a weighted split, streams with and without
// include_usage, every error kind, retries, a fallback); the per-minute
// hashes in Redis must then hold exactly what was sent, summed over both
// gateways, with the configured TTL, the split weights and both gateways'
// heartbeats; `modelmux-gateway stats` must report the same requests,
// shares and weights; and each gateway's /metrics must add up to Redis.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { spawnSync } from 'node:child_process';
import {
    startRedis, startMiniUpstream, startFake, startGateway, gatewayBin, getFreePort, chat,
    streamRequest, model, waitFor, redisMetricSums, getMetrics,
} from './lib.mjs';

const TTL = 900;
const FLUSH_MS = 100;
const prefix = `obs${process.pid}`;
let R, upA, upB, bad, bad2, closer, closerConns = 0, deadPort, gw1, gw2;
const expected = new Map();   // Redis field -> count the traffic below must produce

const field = (m, v, b, metric) => [m, v, b, metric].join('\t');
function add(m, v, b, metric, n = 1) {
    const k = field(m, v, b, metric);
    expected.set(k, (expected.get(k) || 0) + n);
}
// One finished request of public model m, seen by the client as res
// (status and x-modelmux-* headers tell the variant and backend).
function finished(m, res, o = {}) {
    const v = o.variant ?? res.headers['x-modelmux-model'] ?? '';
    const b = o.backend ?? res.headers['x-modelmux-backend'] ?? '';
    add(m, v, b, 'requests');
    add(m, v, b, `resp_${o.statusClass || `${String(res.status)[0]}xx`}`);
    add(m, v, b, 'latency_count');
    add(m, v, b, 'ttft_count');   // every request here gets an answer
    if (o.err) add(m, v, b, `err_${o.err}`);
    if (o.retries) add(m, v, b, 'retries', o.retries);
    if (o.fallback) add(m, v, b, 'fallbacks');
    if (o.tokens) {
        add(m, v, b, 'prompt_tokens', o.tokens[0]);
        add(m, v, b, 'completion_tokens', o.tokens[1]);
    }
    if (o.itl) add(m, v, b, 'itl_count', o.itl);
    return { v, b };
}

// What the sums are compared on: every counter except the histogram
// buckets and sums (their timing is not known; their consistency is
// checked separately).
const CHECKED = /\t(requests|resp_\w+|err_\w+|retries|fallbacks|prompt_tokens|completion_tokens|latency_count|ttft_count|itl_count)$/;

function diff(actual) {
    const out = [];
    for (const [k, v] of expected) if (actual.get(k) !== v) out.push(`${JSON.stringify(k)}: redis ${actual.get(k)}, sent ${v}`);
    for (const [k, v] of actual) if (CHECKED.test(k) && !expected.has(k)) out.push(`${JSON.stringify(k)}: redis ${v}, sent nothing`);
    return out;
}

before(async () => {
    R = await startRedis();
    [upA, upB] = await Promise.all([startMiniUpstream({ name: 'a' }), startMiniUpstream({ name: 'b' })]);
    [bad, bad2] = await Promise.all([startFake({ name: 'bad' }), startFake({ name: 'bad2' })]);
    // A backend that accepts and hangs up at once: every attempt on it is
    // a connection failure, and the count of connections is the oracle.
    closer = net.createServer((s) => { closerConns++; s.destroy(); });
    await new Promise((r) => closer.listen(0, '127.0.0.1', r));
    deadPort = await getFreePort();
    const noBreaker = { consecutive_failures: 0, min_requests: 1000000 };
    const config = {
        threads: 2,
        redis: { url: R.url, flush_ms: FLUSH_MS, prefix, ttl_s: TTL },
        models: [
            model('m-a', [{ url: upA.url }]),
            model('m-b', [{ url: upB.url }]),
            { name: 'chat', split: [{ model: 'm-a', weight: 3 }, { model: 'm-b', weight: 1 }], sticky: 'header:x-user-id' },
            model('fb-src', [{ url: bad.url }], { retries: 0, fallback: ['m-b'], breaker: noBreaker }),
            model('f-5xx', [{ url: bad.url }], { retries: 0, breaker: noBreaker }),
            model('f-429', [{ url: bad.url }], { retries: 0, breaker: noBreaker }),
            model('f-conn', [{ url: `http://127.0.0.1:${deadPort}` }], { retries: 0, breaker: noBreaker }),
            model('f-timeout', [{ url: bad.url }], { retries: 0, timeouts: { first_byte_ms: 300 }, breaker: noBreaker }),
            model('f-mid', [{ url: bad.url }], { retries: 0, breaker: noBreaker }),
            model('retry', [{ url: `http://127.0.0.1:${closer.address().port}` }, { url: upA.url }], { retries: 1, breaker: noBreaker }),
            model('f-brk', [{ url: bad.url }, { url: bad2.url }], {
                retries: 1, breaker: { consecutive_failures: 1, open_ms: 60000, max_ejection_percent: 100 },
            }),
        ],
    };
    [gw1, gw2] = await Promise.all([startGateway(config), startGateway(config)]);
});

after(async () => {
    await Promise.all([gw1?.stop(), gw2?.stop()]);
    await Promise.all([upA?.close(), upB?.close(), bad?.kill(), bad2?.kill(), R?.stop()]);
    await new Promise((r) => (closer ? closer.close(r) : r()));
});

// Upstream events the client got (not the gateway's own error event).
const upstreamEvents = (s) => s.events.filter((e) => e.startsWith('data: ') && !e.includes('"error"')).length;

test('known traffic through two gateways adds up exactly in Redis', async () => {
    const gws = [gw1, gw2];
    // The split, from both gateways: JSON, streams without and with
    // include_usage (tokens must be counted in all three).
    const perVariant = { 'm-a': 0, 'm-b': 0 };
    for (let i = 0; i < 24; i++) {
        const g = gws[i % 2];
        const hdr = { 'x-user-id': `user-${i}` };
        if (i % 3 === 0) {
            const r = await chat(g.port, 'chat', hdr);
            assert.equal(r.status, 200, r.body);
            const { v } = finished('chat', r, { tokens: [7, 4] });
            perVariant[v]++;
        } else {
            const body = { model: 'chat', stream: true, messages: [{ role: 'user', content: 'hi' }] };
            if (i % 3 === 2) body.stream_options = { include_usage: true };
            const s = await streamRequest(g.port, body, hdr);
            assert.equal(s.status, 200);
            assert.ok(s.ended, 'stream ended cleanly');
            // 3 content chunks, [DONE], and the usage chunk only if asked.
            assert.equal(s.events.length, i % 3 === 2 ? 5 : 4, s.events.join('\n'));
            const { v } = finished('chat', s, { tokens: [7, 3], itl: s.events.length - 1 });
            perVariant[v]++;
        }
    }
    assert.ok(perVariant['m-a'] > 0 && perVariant['m-b'] > 0, `both variants served: ${JSON.stringify(perVariant)}`);

    // Per-request token numbers are the upstream's, not a constant.
    for (const g of gws) {
        const r = await chat(g.port, 'm-a', { 'x-mini-prompt-tokens': '11', 'x-mini-completion-tokens': '13' });
        assert.equal(r.status, 200);
        finished('m-a', r, { tokens: [11, 13] });
    }

    // A fallback on each gateway: fb-src's backend fails, m-b answers.
    for (const g of gws) {
        const r = await chat(g.port, 'fb-src', { 'x-fake-mode': 'status:500' });
        assert.equal(r.status, 200, r.body);
        assert.equal(r.headers['x-modelmux-fallback'], 'm-b');
        assert.equal(r.headers['x-modelmux-model'], 'm-b');
        finished('fb-src', r, { tokens: [7, 4], fallback: true, retries: 1 });
        add('fb-src', 'fb-src', bad.url, 'err_5xx');   // the failed attempt, against its backend
    }

    // Every upstream error kind, once.
    let r = await chat(gw1.port, 'f-5xx', { 'x-fake-mode': 'status:500' });
    assert.equal(r.status, 500);
    finished('f-5xx', r, { err: '5xx', backend: bad.url, variant: 'f-5xx' });
    r = await chat(gw2.port, 'f-429', { 'x-fake-mode': 'status:429' });
    assert.equal(r.status, 429);
    finished('f-429', r, { err: '429', backend: bad.url, variant: 'f-429' });
    r = await chat(gw1.port, 'f-conn');
    assert.equal(r.status, 502);
    finished('f-conn', r, { err: 'connect', backend: `http://127.0.0.1:${deadPort}`, variant: 'f-conn' });
    r = await chat(gw2.port, 'f-timeout', { 'x-fake-mode': 'hang' });
    assert.equal(r.status, 504);
    finished('f-timeout', r, { err: 'timeout', backend: bad.url, variant: 'f-timeout' });
    const mid = await streamRequest(gw1.port, { model: 'f-mid', stream: true, messages: [] }, { 'x-fake-mode': 'midstream-close' });
    assert.equal(mid.status, 200);
    assert.ok(mid.events.some((e) => e.includes('"error"')), 'one SSE error event after the cut');
    finished('f-mid', mid, { err: 'midstream', itl: upstreamEvents(mid) - 1 });

    // Retries: attempts on the closer fail at the connection level and go
    // to the other backend; every one of them is a retry of some request.
    let retried = 0;
    for (let i = 0; i < 8; i++) {
        const before0 = closerConns;
        r = await chat(gws[i % 2].port, 'retry');
        assert.equal(r.status, 200, r.body);
        assert.equal(r.headers['x-modelmux-backend'], upA.url);
        const n = closerConns - before0;
        retried += n;
        finished('retry', r, { tokens: [7, 4], retries: n });
    }
    assert.ok(retried >= 1, 'the closer was tried at least once');
    add('retry', 'retry', `http://127.0.0.1:${closer.address().port}`, 'err_connect', retried);

    // Breaker: both backends fail once (breaker opens on each), then
    // nothing is available.
    r = await chat(gw1.port, 'f-brk', { 'x-fake-mode': 'status:500' });
    assert.equal(r.status, 500);
    const last = r.headers['x-modelmux-backend'];
    assert.ok(last === bad.url || last === bad2.url, `last backend ${last}`);
    finished('f-brk', r, { retries: 1 });
    add('f-brk', 'f-brk', bad.url, 'err_5xx');
    add('f-brk', 'f-brk', bad2.url, 'err_5xx');
    r = await chat(gw1.port, 'f-brk', { 'x-fake-mode': 'status:500' });
    assert.equal(r.status, 503, r.body);
    finished('f-brk', r, { err: 'breaker_open', backend: '', variant: 'f-brk' });

    // A client that leaves in the middle of a stream.
    const aborted0 = upA.stats.aborted;
    const ab = await streamRequest(gw2.port, { model: 'm-a', stream: true, messages: [] },
        { 'x-mini-chunks': '5', 'x-mini-delay-ms': '3000' },
        { onEvent: (_e, _out, req) => req.destroy() });
    assert.equal(ab.status, 200);
    finished('m-a', ab, { err: 'client_abort', itl: 0 });
    await waitFor(() => upA.stats.aborted > aborted0, 3000, { what: 'the upstream stream was aborted' });

    // A model that does not exist.
    r = await chat(gw1.port, 'no-such-model');
    assert.equal(r.status, 404);
    finished('no-such-model', r, { err: 'client', backend: '', variant: '' });

    for (const [k, v] of expected) if (k.endsWith('\titl_count') && v === 0) expected.delete(k);

    let last2 = [];
    await waitFor(async () => {
        const { sums } = await redisMetricSums(R.port, prefix);
        last2 = diff(sums);
        return last2.length === 0;
    }, 10000, { intervalMs: 50, what: 'Redis sums equal to the traffic sent' }).catch((e) => {
        assert.fail(`${e.message}\n${last2.join('\n')}`);
    });

    // Stay equal: nothing is counted twice by later batches.
    const flushes = async (g) => (await getMetrics(g.port)).value('modelmux_redis_flushes_total');
    const f0 = [await flushes(gw1), await flushes(gw2)];
    await waitFor(async () => (await flushes(gw1)) >= f0[0] + 3 && (await flushes(gw2)) >= f0[1] + 3, 5000,
        { what: 'three more batches from each gateway' });
    const { sums, keys } = await redisMetricSums(R.port, prefix);
    assert.deepEqual(diff(sums), [], 'still equal after more batches');
    assert.ok(keys.length >= 1 && keys.length <= 2, `one or two minute keys: ${keys}`);

    // Histograms in Redis: buckets add up to the count, for every series.
    const series = new Map();
    for (const [k, v] of sums) {
        const parts = k.split('\t');
        assert.equal(parts.length, 4, `field ${JSON.stringify(k)} has four parts`);
        const m = /^(latency|ttft|itl)_(b(\d+)|count|sum_us)$/.exec(parts[3]);
        if (!m) continue;
        const id = `${parts.slice(0, 3).join('\t')}\t${m[1]}`;
        if (!series.has(id)) series.set(id, { buckets: 0, count: 0, sum: 0 });
        const s = series.get(id);
        if (m[3] !== undefined) {
            assert.ok(Number(m[3]) <= 17, `bucket index ${m[3]}`);
            s.buckets += v;
        } else if (m[2] === 'count') s.count = v;
        else s.sum = v;
    }
    assert.ok(series.size > 10);
    for (const [id, s] of series) {
        assert.equal(s.buckets, s.count, `${JSON.stringify(id)}: buckets add up to the count`);
        assert.ok(s.count > 0 && s.sum > 0, `${JSON.stringify(id)}: count and sum_us present`);
    }
    // The timeout took at least first_byte_ms: its latency sum says so (us).
    assert.ok(sums.get(field('f-timeout', 'f-timeout', bad.url, 'latency_sum_us')) >= 300000);
});

test('minute keys carry the configured TTL; weights and heartbeats are published', async () => {
    const keys = await R.cmd('KEYS', `${prefix}:*`);
    const minutes = keys.filter((k) => /:v1:m:\d+$/.test(k));
    assert.ok(minutes.length >= 1, `minute keys: ${keys}`);
    const nowMin = Math.floor(Date.now() / 60000);
    for (const k of minutes) {
        const m = Number(k.split(':').pop());
        assert.ok(m >= nowMin - 2 && m <= nowMin, `${k} is a recent unix minute (now ${nowMin})`);
        assert.equal(await R.cmd('TYPE', k), 'hash');
        const ttl = await R.cmd('TTL', k);
        assert.ok(ttl > TTL - 60 && ttl <= TTL, `${k}: TTL ${ttl}, want about ${TTL}`);
    }
    const wkey = `${prefix}:v1:weights`;
    const w = await R.cmd('HGETALL', wkey);
    const wmap = Object.fromEntries(Array.from({ length: w.length / 2 }, (_, i) => [w[2 * i], w[2 * i + 1]]));
    assert.deepEqual(wmap, { 'chat\tm-a': '3', 'chat\tm-b': '1' });
    const wttl = await R.cmd('TTL', wkey);
    assert.ok(wttl > 0 && wttl <= TTL, `weights TTL ${wttl}`);

    const g = await R.cmd('HGETALL', `${prefix}:v1:gateways`);
    const gmap = Object.fromEntries(Array.from({ length: g.length / 2 }, (_, i) => [g[2 * i], Number(g[2 * i + 1])]));
    const ids = Object.keys(gmap);
    assert.equal(ids.length, 2, `two gateways: ${ids}`);
    assert.ok(ids.some((id) => id.endsWith(`:${gw1.port}`)) && ids.some((id) => id.endsWith(`:${gw2.port}`)), `ids ${ids}`);
    const now = Date.now() / 1000;
    for (const id of ids) assert.ok(Math.abs(gmap[id] - now) < 30, `heartbeat of ${id}: ${gmap[id]} vs ${now}`);
    const gttl = await R.cmd('TTL', `${prefix}:v1:gateways`);
    assert.ok(gttl > 0 && gttl <= TTL, `gateways TTL ${gttl}`);
    // One sequence key per gateway run, with a bounded life.
    const seqs = keys.filter((k) => k.startsWith(`${prefix}:v1:seq:`));
    assert.equal(seqs.length, 2, `seq keys ${seqs}`);
    for (const k of seqs) {
        const ttl = await R.cmd('TTL', k);
        assert.ok(ttl > 0 && ttl <= 3600, `${k}: TTL ${ttl}`);
    }
});

test("the two gateways' /metrics add up to what Redis holds", async () => {
    const [m1, m2] = await Promise.all([getMetrics(gw1.port), getMetrics(gw2.port)]);
    const { sums } = await redisMetricSums(R.port, prefix);
    const pairs = [
        ['modelmux_requests_total', 'requests'],
        ['modelmux_retries_total', 'retries'],
        ['modelmux_fallbacks_total', 'fallbacks'],
        ['modelmux_prompt_tokens_total', 'prompt_tokens'],
        ['modelmux_completion_tokens_total', 'completion_tokens'],
        ['modelmux_request_duration_seconds_count', 'latency_count'],
    ];
    let compared = 0;
    for (const [prom, metric] of pairs) {
        const total = new Map();
        for (const m of [m1, m2]) {
            for (const s of m.samples(prom)) {
                const k = field(s.labels.model, s.labels.variant, s.labels.backend, metric);
                total.set(k, (total.get(k) || 0) + s.value);
            }
        }
        for (const [k, v] of total) {
            assert.equal(sums.get(k) || 0, v, `${prom} vs Redis ${JSON.stringify(k)}`);
            compared++;
        }
    }
    assert.ok(compared > 30);
    for (const m of [m1, m2]) {
        assert.equal(m.value('modelmux_redis_connected'), 1);
        assert.ok(m.value('modelmux_redis_flushes_total') > 0);
        assert.equal(m.value('modelmux_metrics_dropped_total'), 0);
    }
});

function stats(args) {
    const r = spawnSync(gatewayBin(), ['stats', ...args], { encoding: 'utf8', timeout: 10000 });
    return r;
}

test('`modelmux-gateway stats` reports the requests, shares and weights sent', async () => {
    const r = stats(['--redis', R.url, '--prefix', prefix, '--json', '--minutes', '5']);
    assert.equal(r.status, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    assert.equal(j.prefix, prefix);
    assert.equal(j.minutes, 5);
    assert.equal(j.skipped_fields, 0);
    assert.equal(j.gateways.length, 2);
    assert.ok(j.gateways.every((g) => g.active === true));
    const row = (m, v) => j.variants.find((x) => x.model === m && x.variant === v);
    const req = (m, v) => [...expected].filter(([k]) => k.startsWith(`${m}\t${v}\t`) && k.endsWith('\trequests'))
        .reduce((a, [, n]) => a + n, 0);
    const a = row('chat', 'm-a');
    const b = row('chat', 'm-b');
    assert.ok(a && b, `chat rows: ${r.stdout}`);
    assert.equal(a.requests, req('chat', 'm-a'));
    assert.equal(b.requests, req('chat', 'm-b'));
    assert.equal(a.requests + b.requests, 24);
    assert.ok(Math.abs(a.share - a.requests / 24) < 1e-6, `share ${a.share}`);
    assert.ok(Math.abs(b.share - b.requests / 24) < 1e-6, `share ${b.share}`);
    assert.equal(a.weight, 3);
    assert.equal(b.weight, 1);
    assert.ok(Math.abs(a.weight_share - 0.75) < 1e-9);
    assert.ok(Math.abs(b.weight_share - 0.25) < 1e-9);
    assert.equal(a.prompt_tokens, 7 * a.requests);
    assert.equal(a.failed, 0);
    assert.equal(a.error_rate, 0);
    assert.ok(a.latency_p50_ms > 0 && a.ttft_p50_ms > 0);
    // Rows of models that are not splits: no weight.
    const fb = row('fb-src', 'm-b');
    assert.equal(fb.requests, 2);
    assert.equal(fb.fallbacks, 2);
    assert.equal(fb.retries, 2);
    assert.equal(fb.weight, null);
    assert.equal(row('f-5xx', 'f-5xx').failed, 1);
    assert.equal(row('f-5xx', 'f-5xx').error_rate, 1);
    assert.equal(row('f-mid', 'f-mid').failed, 1, 'a stream cut after 200 counts as failed');
    assert.equal(row('f-429', 'f-429').failed, 0);
    assert.equal(row('f-429', 'f-429').errors['429'], 1);
    assert.equal(row('retry', 'retry').requests, 8);
    // stats sums over backends: the closer's connection failures show here.
    assert.equal(row('retry', 'retry').errors.connect,
        expected.get(field('retry', 'retry', `http://127.0.0.1:${closer.address().port}`, 'err_connect')));
    assert.equal(row('retry', 'retry').retries, row('retry', 'retry').errors.connect);
    assert.equal(row('m-a', 'm-a').prompt_tokens, 22);
    assert.equal(row('m-a', 'm-a').completion_tokens, 26);
    assert.equal(row('m-a', 'm-a').errors.client_abort, 1);
    assert.equal(row('no-such-model', '').errors.client, 1);
    const total = j.variants.reduce((s, x) => s + x.requests, 0);
    const sent = [...expected].filter(([k]) => k.endsWith('\trequests')).reduce((s, [, n]) => s + n, 0);
    assert.equal(total, sent);

    // The same from the gateway's own config file, and as a table.
    const c = stats(['-c', gw1.configFile, '--json', '--minutes', '5']);
    assert.equal(c.status, 0, c.stderr);
    assert.deepEqual(JSON.parse(c.stdout).variants.map((x) => [x.model, x.variant, x.requests]),
        j.variants.map((x) => [x.model, x.variant, x.requests]));
    const t = stats(['--redis', R.url, '--prefix', prefix, '--minutes', '5']);
    assert.equal(t.status, 0, t.stderr);
    assert.match(t.stdout, /2 gateway\(s\) reporting/);
    assert.match(t.stdout, /^chat\s+m-a\s+\d+\s.*75\.0% \(3\)$/m);
    assert.match(t.stdout, /^chat\s+m-b\s+\d+\s.*25\.0% \(1\)$/m);

    // A window that ends before any of it: nothing.
    const old = stats(['--redis', R.url, '--prefix', prefix, '--json', '--minutes', '1', '--at', String(Math.floor(Date.now() / 1000) - 7200)]);
    assert.equal(old.status, 0, old.stderr);
    assert.deepEqual(JSON.parse(old.stdout).variants.filter((x) => x.requests > 0), []);
    // Redis unreachable: exit 1 with one line.
    const down = stats(['--redis', `redis://127.0.0.1:${deadPort}/0`, '--json']);
    assert.equal(down.status, 1);
    assert.equal(down.stderr.trim().split('\n').length, 1, down.stderr);
});
