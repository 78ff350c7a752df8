// Supervision with real processes: a worker killed with -9 is restarted and
// gets traffic again once healthy while its requests fail over (zero failed
// requests); a command that keeps crashing ends "failed"; a worker gets
// traffic only once its /health says ready. One gateway: the crash loop
// (about 15 s of backoff: 1 + 2 + 4 + 8 s) runs while the other tests do.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
    chat, childrenOf, fleetWorkers, gatedCommand, getFreePort, listedModels, loadFailures, makeModel,
    procStat, request, startGateway, startLoad, waitFor,
} from './lib.mjs';

const HEALTH = { interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 1 };
// The restarted real worker spends this long loading (/health 503) first:
// the gateway must wait for it.
const LOAD_DELAY_MS = 600;

let dir, gw;
const port = {};
const url = (k) => `http://127.0.0.1:${port[k]}`;

before(async () => {
    dir = makeModel('fleetrs');
    for (const k of ['a', 'b', 'crash', 'gate', 'gated', 'lone']) port[k] = await getFreePort();
    const real = (p) => ({ launch: { model: dir, device: 'cpu', port: p, args: ['--threads', '1'] } });
    gw = await startGateway({
        threads: 2,
        defaults: { health: HEALTH },
        models: [
            { name: 'pair', retries: 2, backends: [real(port.a), real(port.b)] },
            { name: 'crashy', backends: [{ launch: { command: ['sh', '-c', 'echo "crash-test output $$"; exit 3'], port: port.crash } }] },
            // A ready real worker beside one that stays loading until told.
            { name: 'gate', backends: [real(port.gate), { launch: { command: gatedCommand(port.gated), port: port.gated } }] },
            { name: 'lone', backends: [{ launch: { command: gatedCommand(port.lone), port: port.lone } }] },
        ],
    }, { admin: true, env: { MM_WORKER_TEST_LOAD_DELAY_MS: String(LOAD_DELAY_MS) } });
    await waitFor(async () => {
        const m = await listedModels(gw.port);
        return m.includes('pair') && m.includes('gate');
    }, 20000, { intervalMs: 50, what: 'pair and gate published' });
});

after(async () => {
    if (gw) await gw.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const worker = async (model, index = 0) => (await fleetWorkers(gw.adminPort)).find((w) => w.model === model && w.worker === index);
const gatedStats = async (k) => (await request(port[k], { path: '/_stats', timeoutMs: 2000 })).json();

test('a worker gets no traffic while its /health says loading, and traffic once ready', async (t) => {
    // The gateway's checks did reach the loading worker...
    await waitFor(async () => (await gatedStats('gated')).health >= 3, 5000, { what: 'health checks on the loading worker' });
    const load = startLoad(gw.port, ['gate'], { width: 4, t });
    await load.more(40);
    // ... and sent it no request: all went to the ready one.
    assert.equal((await gatedStats('gated')).requests, 0, 'the loading worker got no request');
    let res = [...load.results];
    assert.deepEqual(loadFailures(res), []);
    assert.ok(res.every((r) => r.backend === url('gate')), 'every answer from the ready worker');
    assert.equal((await worker('gate', 1)).ready, false, 'the fleet does not call it ready either');
    // A model whose only worker is loading is not published: not listed, 404.
    // (The message quotes the gateway's lines about lone: a port another
    // process answered on once made this fail.)
    assert.ok(!(await listedModels(gw.port)).includes('lone'), `lone not listed; gateway on lone: ${
        gw.log().split('\n').filter((l) => l.includes('lone') || l.includes(`:${port.lone}`)).slice(-12).join(' | ')}`);
    assert.equal((await chat(gw.port, 'lone')).status, 404);

    const tReady = Date.now();
    await request(port.gated, { method: 'POST', path: '/_ready' });
    await request(port.lone, { method: 'POST', path: '/_ready' });
    await waitFor(() => load.results.some((r) => r.t0 > tReady && r.backend === url('gated')), 5000,
        { what: 'traffic on the worker once ready' });
    res = await load.stop();
    assert.deepEqual(loadFailures(res), [], 'no failed request while it became ready');
    assert.ok((await gatedStats('gated')).requests > 0);
    await waitFor(async () => (await listedModels(gw.port)).includes('lone'), 5000, { what: 'lone published once ready' });
    const r = await chat(gw.port, 'lone');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.headers['x-modelmux-backend'], url('lone'));
    await waitFor(async () => (await worker('lone')).ready === true, 5000, { what: 'the fleet sees lone ready' });
});

test('kill -9 a worker: requests fail over with zero failures; it is restarted and gets traffic once healthy', async (t) => {
    const before0 = await worker('pair', 0);
    assert.equal(before0.state, 'running');
    const victim = before0.pid;
    assert.ok(victim > 0);
    assert.equal(procStat(victim).ppid, gw.proc.pid, 'the worker is the gateway\'s child');
    const load = startLoad(gw.port, ['pair'], { width: 4, t });
    await load.more(40);
    assert.ok(load.results.some((r) => r.backend === url('a')), 'worker a served before the kill');

    const tKill = Date.now();
    process.kill(victim, 'SIGKILL');
    // Restarted after the first backoff (1 s) as a new process, then ready.
    const fresh = await waitFor(async () => {
        const w = await worker('pair', 0);
        return w.pid && w.pid !== victim && w.state === 'running' && w.ready ? w : null;
    }, 10000, { intervalMs: 50, what: 'worker a restarted and ready' });
    assert.equal(fresh.restarts, before0.restarts + 1);
    assert.deepEqual(fresh.last_exit, { code: null, signal: 9 });
    assert.equal(procStat(fresh.pid).ppid, gw.proc.pid);
    // Reaped by the gateway: not left as a zombie.
    await waitFor(() => procStat(victim) === null, 3000, { what: `the killed worker ${victim} reaped` });
    // Traffic reaches it again.
    const back = await waitFor(() => load.results.find((r) => r.t0 > tKill && r.backend === url('a') && r.status === 200),
        10000, { what: 'a request served by the restarted worker' });
    await load.more(20);
    const res = await load.stop();
    assert.deepEqual(loadFailures(res), [], `zero failed requests (${res.length} sent)`);
    // The gap: between the kill and the restarted worker's first answer
    // everything went to b; nothing reached a while it was loading.
    assert.ok(back.t1 - tKill >= 1000, `a served again only after the restart backoff (${back.t1 - tKill} ms)`);
    assert.ok(res.filter((r) => r.t0 > tKill + 50 && r.t1 < tKill + 1000).every((r) => r.backend === url('b')),
        'while a was dead, b answered');
    assert.match(gw.log(), new RegExp(`\\[pair worker#0\\] killed by signal 9 \\(Killed\\) after \\d+ ms; restarting in 1000 ms`));
    assert.deepEqual(childrenOf(gw.proc.pid).filter((k) => k.state === 'Z'), [], 'no zombie child');
});

test('a crash-looping command ends "failed" after 5 crashes and is not restarted', async () => {
    const w = await waitFor(async () => {
        const x = await worker('crashy');
        return x.state === 'failed' ? x : null;
    }, 30000, { intervalMs: 100, what: 'crashy failed' });
    assert.equal(w.crashes, 5);
    assert.equal(w.restarts, 4, 'four restarts after the first start');
    assert.equal(w.pid, null);
    assert.deepEqual(w.last_exit, { code: 3, signal: null });
    assert.equal(w.ready, false);
    assert.match(gw.log(), /\[crashy worker#0\] failed: exited with code 3, 5 times in a row; not restarting/);
    // Its output was relayed with the worker's prefix.
    assert.match(gw.log(), /\[crashy worker#0 \d+\] crash-test output \d+/);
    // Not restarted any more; never published.
    const started = w.started_at;
    await new Promise((r) => setTimeout(r, 300));
    assert.equal((await worker('crashy')).started_at, started);
    assert.ok(!(await listedModels(gw.port)).includes('crashy'));
    assert.equal((await chat(gw.port, 'crashy')).status, 404);
    assert.ok(!childrenOf(gw.proc.pid).some((k) => k.state === 'Z'), 'no zombie child');
});
