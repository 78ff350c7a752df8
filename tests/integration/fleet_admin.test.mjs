// Loading and unloading models through the admin API while requests keep
// flowing: POST starts the model's workers and publishes it once one is
// ready; PATCH changes split or backend weights for the very next request;
// DELETE stops routing at once, lets in-flight requests finish, then stops
// the workers. Under a steady load (4 requests in flight) nothing fails but
// the requests sent to a model after it was deleted (404).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
    adminCall, chat, childrenOf, fakeCommand, fleetWorkers, gatedCommand, getFreePort, listedModels, loadFailures,
    makeModel, pidAlive, procStat, request, sseEvents, startGateway, startLoad, streamRequest, waitFor,
} from './lib.mjs';

const HEALTH = { interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 2 };

let dir, gw, load;
const port = {};
// model -> [sent, answered] (Date.now()) of its successful DELETE.
const deletedAt = {};
const url = (k) => `http://127.0.0.1:${port[k]}`;
const real = (p) => ({ launch: { model: dir, device: 'cpu', port: p, args: ['--threads', '1'] } });

before(async () => {
    dir = makeModel('fleetadm');
    for (const k of ['b0', 'b1', 'extra', 'slow', 'late']) port[k] = await getFreePort();
    gw = await startGateway({
        threads: 2,
        defaults: { health: HEALTH },
        // b0 written with a url (its port comes from it), b1 with launch.port only.
        models: [{ name: 'base', retries: 2, backends: [
            { url: url('b0'), launch: { model: dir, device: 'cpu', args: ['--threads', '1'] } }, real(port.b1)] }],
    }, { admin: true });
    await waitFor(async () => (await listedModels(gw.port)).includes('base'), 20000,
        { intervalMs: 50, what: 'base published' });
    // Both of base's workers take traffic before the changes start.
    await waitFor(async () => {
        const m = (await adminCall(gw.adminPort, 'GET', '/admin/models/base')).json;
        return m.backends.every((b) => b.health === 'up');
    }, 10000, { what: 'both base workers up' });
    load = startLoad(gw.port, ['base'], { width: 4 });
    await load.more(20);
});

after(async () => {
    if (load) await load.stop();
    if (gw) await gw.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// n sequential requests to model; resolves their answers.
async function sequential(model, n) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await chat(gw.port, model, {}, { timeoutMs: 10000 }));
    return out;
}

test('POST /admin/models starts the workers and publishes the model once one is ready', async () => {
    const entry = { name: 'extra', health: HEALTH, backends: [real(port.extra)] };
    const r = await adminCall(gw.adminPort, 'POST', '/admin/models', entry);
    assert.equal(r.status, 202, r.body);
    assert.deepEqual(r.json, { name: 'extra', status: 'added' });
    const w = await waitFor(async () => (await fleetWorkers(gw.adminPort)).find((x) => x.model === 'extra' && x.pid),
        5000, { what: 'a worker for extra' });
    assert.equal(procStat(w.pid).ppid, gw.proc.pid, 'started by the gateway');
    assert.equal(w.port, port.extra);
    // Published exactly when routable: the first request after it is listed succeeds.
    await waitFor(async () => (await listedModels(gw.port)).includes('extra'), 10000,
        { intervalMs: 20, what: 'extra listed in /v1/models' });
    const first = await chat(gw.port, 'extra');
    assert.equal(first.status, 200, first.body);
    assert.equal(first.headers['x-modelmux-backend'], url('extra'));
    assert.equal(JSON.parse(first.body).model, 'extra');
    load.setModels(['base', 'extra']);
    await load.more(20);

    const dup = await adminCall(gw.adminPort, 'POST', '/admin/models', entry);
    assert.equal(dup.status, 409, `a second POST of the same name: ${dup.body}`);
    const bad = await adminCall(gw.adminPort, 'POST', '/admin/models', { name: 'broken', backends: [] });
    assert.equal(bad.status, 409, `an invalid entry changes nothing: ${bad.body}`);
    assert.ok(!(await fleetWorkers(gw.adminPort)).some((x) => x.model === 'broken'));
});

test('POST a model whose worker is still loading: 202, not listed and 404 until its /health says ready', async () => {
    const r = await adminCall(gw.adminPort, 'POST', '/admin/models',
        { name: 'late', health: HEALTH, backends: [{ launch: { command: gatedCommand(port.late), port: port.late } }] });
    assert.equal(r.status, 202, r.body);
    // Started, probed (503), but not published.
    await waitFor(async () => (await request(port.late, { path: '/_stats', timeoutMs: 2000 })).json().health >= 3, 5000,
        { what: 'the gateway probes the loading worker' });
    assert.ok(!(await listedModels(gw.port)).includes('late'), 'not listed while loading');
    assert.equal((await chat(gw.port, 'late')).status, 404, 'not routed while loading');
    const m = (await adminCall(gw.adminPort, 'GET', '/admin/models/late')).json;
    assert.equal(m.published, false);
    await request(port.late, { method: 'POST', path: '/_ready' });
    await waitFor(async () => (await listedModels(gw.port)).includes('late'), 5000, { intervalMs: 20, what: 'late listed once ready' });
    const ok = await chat(gw.port, 'late');
    assert.equal(ok.status, 200, ok.body);
    assert.equal(ok.headers['x-modelmux-backend'], url('late'));
    assert.equal((await request(port.late, { path: '/_stats' })).json().requests, 1, 'its first request came after ready');
    const tDel = Date.now();
    assert.equal((await adminCall(gw.adminPort, 'DELETE', '/admin/models/late')).status, 200);
    deletedAt.late = [tDel, Date.now()];
});

test('PATCH split weights: applied to the very next request', async () => {
    const add = await adminCall(gw.adminPort, 'POST', '/admin/models',
        { name: 'ab', split: [{ model: 'base', weight: 50 }, { model: 'extra', weight: 50 }] });
    assert.equal(add.status, 202, add.body);
    load.setModels(['base', 'extra', 'ab']);
    for (const [wBase, wExtra, expect] of [[0, 100, 'extra'], [100, 0, 'base'], [0, 1, 'extra']]) {
        const p = await adminCall(gw.adminPort, 'PATCH', '/admin/models/ab',
            { split: [{ model: 'base', weight: wBase }, { model: 'extra', weight: wExtra }] });
        assert.equal(p.status, 200, p.body);
        const served = (await sequential('ab', 12)).map((r) => `${r.status} ${r.headers['x-modelmux-model']}`);
        assert.deepEqual(served, Array(12).fill(`200 ${expect}`), `after weights ${wBase}/${wExtra}`);
    }
    const m = (await adminCall(gw.adminPort, 'GET', '/admin/models/ab')).json;
    assert.deepEqual(m.split, [{ model: 'base', weight: 0 }, { model: 'extra', weight: 1 }]);
});

test('PATCH backend weights: applied to the very next request, same workers', async () => {
    const pids = (await fleetWorkers(gw.adminPort)).filter((w) => w.model === 'base').map((w) => w.pid);
    // b0 is written with its url in the config: PATCH names it by that.
    for (const [w0, expect] of [[0, 'b1'], [1, null]]) {
        const p = await adminCall(gw.adminPort, 'PATCH', '/admin/models/base', { backends: [{ url: url('b0'), weight: w0 }] });
        assert.equal(p.status, 200, p.body);
        const got = (await sequential('base', expect ? 12 : 30)).map((r) => `${r.status} ${r.headers['x-modelmux-backend']}`);
        if (expect) {
            assert.deepEqual(got, Array(12).fill(`200 ${url(expect)}`), `after weight ${w0} on b0`);
        } else {
            // The load shares the picks with these requests, so only "both
            // serve again" is certain (1:1: each of 30 misses b0 with p ~ 1/2).
            assert.ok(got.every((g) => g.startsWith('200 ')), JSON.stringify(got));
            assert.ok(got.includes(`200 ${url('b0')}`) && got.includes(`200 ${url('b1')}`), `both again: ${JSON.stringify(got)}`);
        }
    }
    const m = (await adminCall(gw.adminPort, 'GET', '/admin/models/base')).json;
    assert.deepEqual(m.backends.map((b) => b.weight), [1, 1]);
    const unknown = await adminCall(gw.adminPort, 'PATCH', '/admin/models/base',
        { backends: [{ url: 'http://127.0.0.1:1', weight: 5 }] });
    assert.equal(unknown.status, 404, unknown.body);
    // Weights are not a new worker: the same processes serve.
    assert.deepEqual((await fleetWorkers(gw.adminPort)).filter((w) => w.model === 'base').map((w) => w.pid), pids);
});

test('PATCH a launched backend by the url the admin API shows for it (launch.port, no url in the config)', async () => {
    const m = (await adminCall(gw.adminPort, 'GET', '/admin/models/base')).json;
    assert.equal(m.backends[1].url, url('b1'), 'the admin API names b1 by its derived url');
    const p = await adminCall(gw.adminPort, 'PATCH', '/admin/models/base', { backends: [{ url: url('b1'), weight: 0 }] });
    try {
        assert.equal(p.status, 200, `PATCH by the shown url: ${p.body}`);
        const got = (await sequential('base', 12)).map((r) => `${r.status} ${r.headers['x-modelmux-backend']}`);
        assert.deepEqual(got, Array(12).fill(`200 ${url('b0')}`), 'after weight 0 on b1');
    } finally {
        await adminCall(gw.adminPort, 'PATCH', '/admin/models/base', { backends: [{ url: url('b1'), weight: 1 }] });
    }
});

test('DELETE a model still named by a split is refused; DELETE the split, then the model: 404, worker stopped', async () => {
    const refused = await adminCall(gw.adminPort, 'DELETE', '/admin/models/extra');
    assert.equal(refused.status, 409, refused.body);
    assert.equal((await chat(gw.port, 'extra')).status, 200, 'extra still served');
    load.setModels(['base', 'extra']);
    const tSplit = Date.now();
    const delSplit = await adminCall(gw.adminPort, 'DELETE', '/admin/models/ab');
    deletedAt.ab = [tSplit, Date.now()];
    assert.equal(delSplit.status, 200, delSplit.body);
    // Requests to ab after its removal: 404.
    assert.equal((await chat(gw.port, 'ab')).status, 404);

    const pid = (await fleetWorkers(gw.adminPort)).find((w) => w.model === 'extra').pid;
    const tSent = Date.now();
    const del = await adminCall(gw.adminPort, 'DELETE', '/admin/models/extra');
    const tDone = Date.now();
    deletedAt.extra = [tSent, tDone];
    assert.equal(del.status, 200, del.body);
    assert.deepEqual(del.json, { name: 'extra', status: 'removed' });
    assert.equal((await chat(gw.port, 'extra')).status, 404, 'no longer routed');
    assert.ok(!(await listedModels(gw.port)).includes('extra'));
    await load.more(20);
    load.setModels(['base']);
    // Its worker is stopped and reaped (nothing in flight to wait for).
    await waitFor(() => procStat(pid) === null, 5000, { what: `extra's worker ${pid} gone` });
    assert.match(gw.log(), new RegExp(`\\[extra worker#0 ${pid}\\] removed from the configuration: stopping \\(drained\\)`));
    const res = load.results;
    const extra = res.filter((r) => r.model === 'extra');
    assert.deepEqual(loadFailures(extra, (r) => r.t1 < tSent), [], 'extra answered until the DELETE');
    assert.deepEqual(extra.filter((r) => r.t0 > tDone && r.status !== 404).map((r) => r.status), [],
        'after the DELETE answer: 404 only');
    assert.deepEqual(extra.filter((r) => r.status !== 200 && r.status !== 404), [], 'nothing but 200 and 404');
});

test('DELETE with a stream in flight: no new requests, the stream finishes, then the worker stops', async () => {
    const add = await adminCall(gw.adminPort, 'POST', '/admin/models',
        { name: 'slow', health: HEALTH, backends: [{ launch: { command: fakeCommand(port.slow, 'slow'), port: port.slow } }] });
    assert.equal(add.status, 202, add.body);
    await waitFor(async () => (await listedModels(gw.port)).includes('slow'), 10000, { intervalMs: 20, what: 'slow published' });
    const pid = (await fleetWorkers(gw.adminPort)).find((w) => w.model === 'slow').pid;
    load.setModels(['base', 'slow']);
    await load.more(20);

    // 10 chunks 200 ms apart: about 2 s in flight.
    let firstEvent;
    const gotFirst = new Promise((r) => { firstEvent = r; });
    const streamDone = streamRequest(gw.port, { model: 'slow', stream: true, messages: [{ role: 'user', content: 'hi' }] },
        { 'x-fake-chunks': '10', 'x-fake-delay-ms': '200' }, { timeoutMs: 15000, onEvent: () => firstEvent() });
    let streamEnded = false;
    streamDone.then(() => { streamEnded = true; });
    await gotFirst;
    const tSent = Date.now();
    const del = await adminCall(gw.adminPort, 'DELETE', '/admin/models/slow');
    const tDone = Date.now();
    deletedAt.slow = [tSent, tDone];
    assert.equal(del.status, 200, del.body);
    assert.equal((await chat(gw.port, 'slow')).status, 404, 'a new request after the DELETE: 404');
    // Still serving the stream: the worker must be alive.
    assert.ok(!streamEnded, 'the stream is still running');
    assert.ok(pidAlive(pid), 'the worker lives while its stream runs');
    const s = await streamDone;
    assert.equal(s.status, 200);
    assert.ok(s.ended && !s.error && !s.timedOut, `the stream ended cleanly: ${s.error}`);
    const data = sseEvents(s.events.join('\n\n') + '\n\n');
    assert.equal(data[data.length - 1], '[DONE]');
    assert.equal(data.filter((d) => d !== '[DONE]' && d.choices?.[0]?.delta?.content).length, 10, 'all 10 chunks');
    const tEnd = Date.now();
    await waitFor(() => procStat(pid) === null, 5000, { what: `slow's worker ${pid} stopped and reaped` });
    assert.ok(s.ms > 1500, 'the stream really was in flight across the DELETE');
    assert.ok(tEnd - tDone > 1000, 'the worker outlived the DELETE answer by the stream\'s length');

    load.setModels(['base']);
    await load.more(8);
    const slow = load.results.filter((r) => r.model === 'slow');
    assert.deepEqual(loadFailures(slow, (r) => r.t1 < tSent), [], 'slow answered until the DELETE');
    assert.deepEqual(slow.filter((r) => r.t0 > tDone && r.status !== 404).map((r) => r.status), []);
});

test('under all of the above the steady load never failed, but for 404s of deleted models after their DELETE', async () => {
    const res = await load.stop();
    load = null;
    const kept = res.filter((r) => r.model === 'base');
    assert.ok(kept.length > 100, `enough load: ${kept.length}`);
    assert.deepEqual(loadFailures(kept), [], `zero failed requests to base (${kept.length} sent)`);
    const bad = loadFailures(res, (r) => !(r.status === 404 && deletedAt[r.model] && r.t1 >= deletedAt[r.model][0]));
    assert.deepEqual(bad, [], `${res.length} requests: only 404s of a deleted model after its DELETE was sent`);
    const late = res.filter((r) => deletedAt[r.model] && r.t0 > deletedAt[r.model][1] && r.status !== 404);
    assert.deepEqual(late, [], 'a deleted model answers 404 once its DELETE was answered');
    for (const m of ['extra', 'ab']) {
        assert.ok(res.some((r) => r.model === m && r.status === 200), `${m} was under load before its DELETE`);
    }
    assert.deepEqual(childrenOf(gw.proc.pid).filter((k) => k.state === 'Z'), [], 'no zombie child');
    assert.deepEqual(childrenOf(gw.proc.pid).map((k) => k.pid).sort(),
        (await fleetWorkers(gw.adminPort)).map((w) => w.pid).sort(), 'only base\'s two workers are left');
});
