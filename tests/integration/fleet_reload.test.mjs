// SIGHUP under a steady load, on a fleet of real workers: one model added,
// several changed (backend weights; a per-model setting; the launch itself,
// moved to another port), one removed, one untouched. Nothing fails but the
// requests to the removed model once it is gone (404); unchanged workers
// keep their process, the removed one is stopped and reaped.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
    childrenOf, fleetWorkers, getFreePort, listedModels, loadFailures, makeModel, procStat,
    startGateway, startLoad, waitFor,
} from './lib.mjs';

const HEALTH = { interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 2 };
const LOADED = ['keep', 'reweighted', 'tuned', 'moved', 'gone'];

let dir, gw, load, v1, v2;
const port = {};
const url = (k) => `http://127.0.0.1:${port[k]}`;
let pidsBefore;          // model/worker -> pid before the reload
let tHup, tApplied;      // Date.now() at SIGHUP and once the new generation was seen applied
let results;             // the load's answers, whole run

const real = (p, args = []) => ({ launch: { model: dir, device: 'cpu', port: p, args: ['--threads', '1', ...args] } });
const key = (w) => `${w.model}/${w.worker}`;
// Failed answers in short: when, relative to the SIGHUP, and the first body.
const describe = (fails) => (fails.length ? `${fails.length} failed from ${fails[0].t0 - tHup} to ${fails[fails.length - 1].t1 - tHup} ms after SIGHUP: ${JSON.stringify(fails[0])}` : 'none failed');
const pidMap = async () => Object.fromEntries((await fleetWorkers(gw.adminPort)).map((w) => [key(w), w.pid]));

before(async () => {
    dir = makeModel('fleethup');
    for (const k of ['keep', 'rw0', 'rw1', 'tuned', 'moved', 'moved2', 'gone', 'added']) port[k] = await getFreePort();
    v1 = {
        threads: 2,
        defaults: { health: HEALTH },
        models: [
            { name: 'keep', backends: [real(port.keep)] },
            { name: 'reweighted', backends: [{ url: url('rw0'), weight: 1, launch: real(port.rw0).launch },
                { url: url('rw1'), weight: 1, launch: real(port.rw1).launch }] },
            // rise 2 at 200 ms: a pool rebuilt with its worker marked down
            // would need 200-400 ms to route again, which the load sees.
            { name: 'tuned', retries: 2, health: { ...HEALTH, interval_ms: 200, rise: 2 }, backends: [real(port.tuned)] },
            { name: 'moved', backends: [real(port.moved)] },
            { name: 'gone', backends: [real(port.gone)] },
        ],
    };
    gw = await startGateway(v1, { admin: true });
    await waitFor(async () => (await listedModels(gw.port)).length === LOADED.length, 20000,
        { intervalMs: 50, what: 'every model published' });
    await waitFor(async () => (await fleetWorkers(gw.adminPort)).every((w) => w.ready), 10000,
        { what: 'every worker ready' });
    pidsBefore = await pidMap();
    v2 = {
        ...gw.config,
        models: [
            v1.models[0],
            { ...v1.models[1], backends: [{ ...v1.models[1].backends[0], weight: 0 }, v1.models[1].backends[1]] },
            // A setting of the model, not of its worker: the same process serves on.
            { ...v1.models[2], retries: 1, timeouts: { first_byte_ms: 20000 } },
            // The launch itself changed: a new worker (another port, other args).
            { name: 'moved', health: { ...HEALTH, interval_ms: 200, rise: 2 }, backends: [real(port.moved2, ['--max-num-seqs', '8'])] },
            { name: 'added', backends: [real(port.added)] },
        ],
    };
});

after(async () => {
    if (load) await load.stop();
    if (gw) await gw.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('SIGHUP under load: the new configuration is applied and the added model is published once ready', async () => {
    load = startLoad(gw.port, LOADED, { width: 5 });
    await load.more(40);
    fs.writeFileSync(gw.configFile, JSON.stringify(v2, null, 2));
    tHup = Date.now();
    gw.proc.kill('SIGHUP');
    await waitFor(() => /config: generation 1 applied \(5 models\)/.test(gw.log()), 5000, { intervalMs: 5, what: 'generation 1 applied' });
    tApplied = Date.now();
    await waitFor(async () => (await listedModels(gw.port)).includes('added'), 10000,
        { intervalMs: 20, what: 'added listed' });
    load.setModels([...LOADED, 'added']);
    // The new worker of "moved" serves; the old ones are gone.
    await waitFor(() => load.results.some((r) => r.t0 > tApplied && r.model === 'moved' && r.backend === url('moved2')),
        10000, { what: 'moved served by its new worker' });
    await waitFor(() => procStat(pidsBefore['gone/0']) === null && procStat(pidsBefore['moved/0']) === null, 10000,
        { what: 'the workers of gone and of the old moved stopped and reaped' });
    await load.more(60);
    results = await load.stop();
    load = null;
    assert.deepEqual((await listedModels(gw.port)).sort(), ['added', 'keep', 'moved', 'reweighted', 'tuned']);
    assert.ok(results.some((r) => r.model === 'added' && r.status === 200 && r.backend === url('added')));
});

test('unchanged model: same worker process, zero failed requests', async () => {
    const now = await pidMap();
    assert.equal(now['keep/0'], pidsBefore['keep/0'], 'same pid');
    assert.deepEqual(loadFailures(results, (r) => r.model === 'keep'), []);
});

test('changed backend weights: same workers, zero failed requests, the new weights rule after the reload', async () => {
    const now = await pidMap();
    assert.equal(now['reweighted/0'], pidsBefore['reweighted/0']);
    assert.equal(now['reweighted/1'], pidsBefore['reweighted/1']);
    const mine = results.filter((r) => r.model === 'reweighted');
    assert.deepEqual(loadFailures(mine), []);
    assert.ok(mine.some((r) => r.t1 < tHup && r.backend === url('rw0')), 'rw0 served before');
    const late = mine.filter((r) => r.t0 > tApplied);
    assert.ok(late.length > 5);
    assert.deepEqual(late.filter((r) => r.backend !== url('rw1')).map((r) => r.backend), [], 'weight 0: rw0 gets nothing');
});

test('changed model setting (retries, timeouts): same worker, zero failed requests', async () => {
    const now = await pidMap();
    assert.equal(now['tuned/0'], pidsBefore['tuned/0'], 'the worker\'s launch did not change: same pid');
    const fails = loadFailures(results, (r) => r.model === 'tuned');
    assert.equal(fails.length, 0, `zero failed requests to tuned of ${results.filter((r) => r.model === 'tuned').length}; ${describe(fails)}`);
});

test('changed launch (new port and args): a new worker replaces the old, zero failed requests', async () => {
    const w = (await fleetWorkers(gw.adminPort)).find((x) => x.model === 'moved');
    assert.equal(w.port, port.moved2);
    assert.notEqual(w.pid, pidsBefore['moved/0']);
    assert.ok(w.command.includes('--max-num-seqs'));
    const fails = loadFailures(results, (r) => r.model === 'moved');
    assert.equal(fails.length, 0, `zero failed requests to moved of ${results.filter((r) => r.model === 'moved').length}; ${describe(fails)}`);
});

test('removed model: 404 only after the reload, its worker drained, stopped and reaped', async () => {
    const mine = results.filter((r) => r.model === 'gone');
    assert.ok(mine.some((r) => r.status === 200), 'served before');
    assert.deepEqual(loadFailures(mine, (r) => r.status !== 404 || r.t1 < tHup), [], 'only 404s, and only after SIGHUP');
    assert.deepEqual(mine.filter((r) => r.t0 > tApplied && r.status !== 404).map((r) => r.status), [], '404 once applied');
    assert.match(gw.log(), new RegExp(`\\[gone worker#0 ${pidsBefore['gone/0']}\\] removed from the configuration: stopping`));
    assert.ok(!(await fleetWorkers(gw.adminPort)).some((w) => w.model === 'gone'));
    assert.deepEqual(childrenOf(gw.proc.pid).filter((k) => k.state === 'Z'), [], 'no zombie child');
    const live = childrenOf(gw.proc.pid).map((k) => k.pid).sort();
    assert.deepEqual(live, Object.values(await pidMap()).sort(), 'the gateway\'s children are exactly the fleet\'s workers');
});

test('SIGHUP with a broken file changes nothing and fails no request', async (t) => {
    const pids = await pidMap();
    const l = startLoad(gw.port, ['keep', 'added'], { width: 4, t });
    await l.more(20);
    fs.writeFileSync(gw.configFile, '{"models": [');
    gw.proc.kill('SIGHUP');
    await waitFor(() => /SIGHUP: configuration not applied, nothing changed/.test(gw.log()), 5000, { what: 'the refusal logged' });
    await l.more(20);
    const res = await l.stop();
    assert.deepEqual(loadFailures(res), []);
    assert.deepEqual(await pidMap(), pids);
});
