// Observability: Redis down, restarting, stopped, read-only or loading never
// slows or fails a request, and no count is lost or counted twice. Redis
// runs with an fsync-always AOF, so everything it acknowledged survives a
// kill -9 and the totals in Redis can be compared with what was sent,
// exactly:
//   - kill -9 while requests flow: zero failed requests; restarted on the
//     same port, the gateway reconnects and the counts made while Redis was
//     down arrive; one log line per state change, not one per attempt;
//   - SIGSTOP longer than the batch deadline: requests keep their normal
//     latency; after SIGCONT the totals are exact (the batch stuck in the
//     stopped server's socket and its resend are applied once);
//   - a read-only replica (-READONLY) and a server loading its dataset
//     (-LOADING, from a proxy in front of Redis): batches fail, are resent,
//     and count once when the server is writable again.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
    startRedis, startMiniUpstream, startGateway, chat, model, waitFor, sleep, getMetrics, getFreePort,
    redisMetricSums, respParse,
} from './lib.mjs';

let R, up, gw, gwL, proxy;
const main = { prefix: `outage${process.pid}`, sent: 0, failures: [], slowest: 0 };
const viaProxy = { prefix: `loading${process.pid}`, sent: 0, failures: [], slowest: 0 };

// A TCP proxy in front of Redis that, while `loading` is set, answers every
// command itself with the -LOADING error of a Redis still reading its
// dataset, and afterwards relays bytes both ways.
function startLoadingProxy(targetPort) {
    const state = { loading: true, loadingReplies: 0, conns: new Set() };
    const server = net.createServer((c) => {
        state.conns.add(c);
        c.on('close', () => state.conns.delete(c));
        c.on('error', () => {});
        let buf = Buffer.alloc(0);
        const onData = (d) => {
            buf = Buffer.concat([buf, d]);
            if (!state.loading) {
                c.off('data', onData);
                const upstream = net.connect(targetPort, '127.0.0.1');
                upstream.on('error', () => c.destroy());
                upstream.on('close', () => c.destroy());
                c.on('close', () => upstream.destroy());
                upstream.write(buf);
                c.pipe(upstream);
                upstream.pipe(c);
                return;
            }
            for (;;) {
                const r = respParse(buf, 0);
                if (!r) break;
                buf = buf.subarray(r.off);
                state.loadingReplies++;
                c.write('-LOADING Redis is loading the dataset in memory\r\n');
            }
        };
        c.on('data', onData);
    });
    return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(Object.assign(state, {
        port: server.address().port,
        close() {
            for (const c of state.conns) c.destroy();
            return new Promise((r) => server.close(r));
        },
    }))));
}

before(async () => {
    R = await startRedis({ appendonly: true });
    up = await startMiniUpstream({ name: 'up' });
    proxy = await startLoadingProxy(R.port);
    const models = [model('m', [{ url: up.url }])];
    [gw, gwL] = await Promise.all([
        startGateway({ threads: 2, redis: { url: R.url, flush_ms: 100, prefix: main.prefix }, models }),
        startGateway({ threads: 2, redis: { url: `redis://127.0.0.1:${proxy.port}/0`, flush_ms: 100, prefix: viaProxy.prefix }, models }),
    ]);
    main.gw = gw;
    viaProxy.gw = gwL;
});

after(async () => {
    await Promise.all([gw?.stop(), gwL?.stop()]);
    await up?.close();
    await proxy?.close();
    await R?.stop();
});

// Requests from `width` concurrent loops until stop() is called (or maxMs
// passed, so that a test that fails half-way cannot leave them spinning);
// each one must be a 200 within its timeout. Failures are kept (the first
// 20 in full) and slow the loop down.
function load(c, width = 3, maxMs = 30000) {
    let running = true;
    const end = Date.now() + maxMs;
    const fail = (msg) => {
        c.failures.push(c.failures.length < 20 ? msg : '...');
        return sleep(20);
    };
    const loops = Array.from({ length: width }, async () => {
        while (running && Date.now() < end) {
            const t0 = Date.now();
            try {
                const r = await chat(c.gw.port, 'm', {}, { timeoutMs: 5000 });
                if (r.status === 200) c.sent++;
                else await fail(`status ${r.status}: ${r.body}`);
            } catch (e) {
                await fail(e.message);
            }
            c.slowest = Math.max(c.slowest, Date.now() - t0);
        }
    });
    return { async stop() { running = false; await Promise.all(loops); } };
}

// Runs body(l) with a load on c, always stopping the load.
async function underLoad(c, width, body) {
    const l = load(c, width);
    try {
        return await body(l);
    } finally {
        await l.stop();
    }
}

const metric = async (g, name) => (await getMetrics(g.port)).value(name);
const redisRequests = async (c) => (await redisMetricSums(R.port, c.prefix)).sums.get(`m\tm\t${up.url}\trequests`) || 0;
const redisLines = (g) => g.log().split('\n').filter((l) => /\bredis\b/.test(l));

async function totalsExact(c, what) {
    let seen;
    await waitFor(async () => (seen = await redisRequests(c)) === c.sent, 15000, { intervalMs: 50, what })
        .catch((e) => assert.fail(`${e.message}: Redis has ${seen}, sent ${c.sent}`));
}

test('Redis killed mid-run: no failed request, reconnect, every count arrives', async (t) => {
    await waitFor(async () => (await metric(gw, 'modelmux_redis_flushes_total')) >= 2, 5000, { what: 'first batches acknowledged' });
    const linesBefore = redisLines(gw).length;
    let madeWhileDown = 0;
    await underLoad(main, 3, async () => {
        await waitFor(() => main.sent >= 50, 5000, { what: '50 requests before the kill' });
        await R.kill9();
        await waitFor(async () => (await metric(gw, 'modelmux_redis_connected')) === 0, 3000, { what: 'the sink sees Redis gone' });
        const sentAtDown = main.sent;
        // Long enough for several reconnect attempts (100, 200, 400, 800 ms ...).
        await sleep(1500);
        madeWhileDown = main.sent - sentAtDown;
        R = await R.restart();
        await waitFor(async () => (await metric(gw, 'modelmux_redis_connected')) === 1, 15000, { what: 'the sink reconnects' });
        await waitFor(() => main.sent >= sentAtDown + madeWhileDown + 20, 5000, { what: 'more requests after the restart' });
    });

    assert.deepEqual(main.failures, [], 'no request failed while Redis was down');
    assert.ok(madeWhileDown > 0, 'requests were made while Redis was down');
    assert.ok(main.slowest < 1000, `slowest request ${main.slowest} ms`);
    await totalsExact(main, 'every request is in Redis, once');
    assert.ok((await metric(gw, 'modelmux_redis_reconnects_total')) >= 1);

    // One line per change of state: lost/cannot connect, then back; not
    // one per reconnect attempt.
    const lines = redisLines(gw).slice(linesBefore);
    assert.ok(lines.length >= 2 && lines.length <= 4, `redis log lines during the outage:\n${lines.join('\n')}`);
    assert.equal(lines.filter((x) => /again/.test(x)).length, 1, lines.join('\n'));
    t.diagnostic(`${main.sent} requests, ${madeWhileDown} while Redis was down, slowest ${main.slowest} ms; log:\n${lines.join('\n')}`);
});

test('Redis stopped (SIGSTOP) past the batch deadline: requests unaffected, totals exact after SIGCONT', async (t) => {
    await totalsExact(main, 'in step before the stop');
    const failed0 = await metric(gw, 'modelmux_redis_failed_flushes_total');
    await underLoad(main, 3, async () => {
        await waitFor(() => main.sent >= 20, 5000);
        R.pause();
        try {
            main.slowest = 0;
            // The batch deadline is max(5 s, 5 x flush_ms): wait until the
            // sink has given up on the stuck batch at least once.
            await waitFor(async () => (await metric(gw, 'modelmux_redis_failed_flushes_total')) > failed0, 9000,
                { intervalMs: 100, what: 'the stuck batch times out' });
            const sentStopped = main.sent;
            await sleep(300);
            assert.ok(main.sent > sentStopped, 'requests still flow with Redis stopped');
        } finally {
            R.resume();
        }
        await sleep(300);
    });
    assert.deepEqual(main.failures, []);
    assert.ok(main.slowest < 1000, `slowest request while Redis was stopped: ${main.slowest} ms`);
    await waitFor(async () => (await metric(gw, 'modelmux_redis_connected')) === 1, 15000, { what: 'connected again' });
    await totalsExact(main, 'every request is in Redis after SIGCONT');
    // No double counting: later batches (and a late stale one) change nothing.
    const f0 = await metric(gw, 'modelmux_redis_flushes_total');
    await waitFor(async () => (await metric(gw, 'modelmux_redis_flushes_total')) >= f0 + 5, 5000, { what: '5 more batches' });
    assert.equal(await redisRequests(main), main.sent, 'still exact after more batches');
    t.diagnostic(`${main.sent} requests in all, slowest while stopped ${main.slowest} ms`);
});

test('a read-only replica (-READONLY): batches fail and are resent; exact once writable again', async () => {
    await totalsExact(main, 'in step before');
    const failed0 = await metric(gw, 'modelmux_redis_failed_flushes_total');
    const linesBefore = redisLines(gw).length;
    // A replica of a master that does not exist keeps its data and refuses
    // writes, like a former primary after a failover.
    await R.cmd('REPLICAOF', '127.0.0.1', String(await getFreePort()));
    await underLoad(main, 3, async () => {
        let promoted = false;
        try {
            await waitFor(async () => (await metric(gw, 'modelmux_redis_failed_flushes_total')) >= failed0 + 2, 8000,
                { intervalMs: 50, what: 'two batches refused by the replica' });
            const during = await redisRequests(main);
            await R.cmd('REPLICAOF', 'NO', 'ONE');
            promoted = true;
            assert.ok(during < main.sent, 'the replica took none of the refused batches');
        } finally {
            if (!promoted) await R.cmd('REPLICAOF', 'NO', 'ONE');
        }
        await sleep(200);
    });
    assert.deepEqual(main.failures, []);
    await totalsExact(main, 'exact after the promotion');
    const lines = redisLines(gw).slice(linesBefore);
    assert.equal(lines.filter((x) => /read-only|READONLY/i.test(x)).length, 1, `one line for the replica:\n${lines.join('\n')}`);
});

test('a server loading its dataset (-LOADING): batches fail and are resent; exact once loaded', async () => {
    await underLoad(viaProxy, 2, async () => {
        await waitFor(async () => (await metric(gwL, 'modelmux_redis_failed_flushes_total')) >= 3, 8000,
            { intervalMs: 50, what: 'three batches answered -LOADING' });
        assert.equal(await redisRequests(viaProxy), 0, 'nothing reached Redis while it was "loading"');
        assert.equal(await metric(gwL, 'modelmux_redis_flushes_total'), 0);
        proxy.loading = false;
        await sleep(300);
    });
    assert.deepEqual(viaProxy.failures, []);
    assert.ok(viaProxy.sent > 0);
    assert.ok(proxy.loadingReplies >= 3);
    await totalsExact(viaProxy, 'exact once the server has loaded');
    const lines = redisLines(gwL);
    assert.equal(lines.filter((x) => /loading/i.test(x)).length, 1, `one line for the loading state:\n${lines.join('\n')}`);
});
