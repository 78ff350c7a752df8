// The gateway's end, seen from the processes: on SIGTERM (and SIGINT) it
// stops accepting, lets the request in flight finish, then stops its
// workers, reaps them and exits 0, leaving no process behind (a worker's
// own children included); killed with -9 it cannot do any of that, and its
// workers still exit (parent-death signal).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import {
    FAKE, childrenOf, fakeCommand, fleetWorkers, getFreePort, listedModels, makeModel, pidAlive,
    processGroup, procStat, sseEvents, startGateway, streamRequest, waitFor,
} from './lib.mjs';

const HEALTH = { interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 2 };

let dir;
const gws = [];
const orphans = [];

before(() => {
    dir = makeModel('fleetend');
});

after(async () => {
    for (const g of gws) {
        await g.stop(1000).catch(() => {});
        fs.rmSync(g.configFile, { force: true });
    }
    // What a killed gateway's workers forked outlives them (the parent-death
    // signal reaches only its direct children): ours to clean up, by pid.
    for (const pid of orphans) {
        if (pidAlive(pid)) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// A gateway with a real worker, a fake upstream, and a shell whose child
// (the fake upstream, in the shell's process group) does the serving.
// extraModels: more models, with workers of their own.
async function fleetGateway(extra = {}, extraModels = []) {
    const p = { real: await getFreePort(), fake: await getFreePort(), tree: await getFreePort() };
    const tree = `"${process.execPath}" "${FAKE}" --port ${p.tree} --name tree & wait`;
    const gw = await startGateway({
        threads: 2,
        defaults: { health: HEALTH },
        models: [
            { name: 'real', backends: [{ launch: { model: dir, device: 'cpu', port: p.real, args: ['--threads', '1'] } }] },
            { name: 'fake', backends: [{ launch: { command: fakeCommand(p.fake, 'fake'), port: p.fake } }] },
            { name: 'tree', backends: [{ launch: { command: ['sh', '-c', tree], port: p.tree } }] },
            ...extraModels,
        ],
        ...extra,
    }, { admin: true });
    gws.push(gw);
    const n = 3 + extraModels.length;
    await waitFor(async () => (await listedModels(gw.port)).length === n, 20000,
        { intervalMs: 50, what: `the ${n} launched models published` });
    // Published means a worker answered /health; /proc may lag a moment
    // behind on a loaded machine, so poll for the children too.
    let kids = [];
    await waitFor(() => (kids = childrenOf(gw.proc.pid)).length === n, 5000,
        { intervalMs: 20, what: `one child per worker: ${JSON.stringify(kids)}` });
    assert.equal(kids.length, n, `one child per worker: ${JSON.stringify(kids)}`);
    // Every process the fleet owns: each worker's whole group.
    const all = kids.flatMap((k) => processGroup(k.pid).map((x) => x.pid));
    assert.ok(all.length >= 4, `the shell's child is in its group: ${JSON.stringify(all)}`);
    return { gw, ports: p, kids: kids.map((k) => k.pid), all };
}

// Whether a TCP connect to port is refused (nobody listening).
function refused(port) {
    return new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1');
        s.once('connect', () => { s.destroy(); resolve(false); });
        s.once('error', (e) => resolve(e.code === 'ECONNREFUSED'));
    });
}

function exitOf(gw) {
    return new Promise((resolve) => {
        if (gw.exited()) resolve(gw.exited());
        else gw.proc.once('exit', (code, signal) => resolve({ code, signal }));
    });
}

test('SIGTERM: new connections refused, the stream in flight completes, then every worker is stopped and reaped; exit 0', async () => {
    const { gw, kids, all } = await fleetGateway({ shutdown_grace_ms: 15000 });
    const fakePid = (await fleetWorkers(gw.adminPort)).find((w) => w.model === 'fake').pid;
    // 16 chunks 150 ms apart: about 2.4 s.
    let first;
    const gotFirst = new Promise((r) => { first = r; });
    const streamDone = streamRequest(gw.port, { model: 'fake', stream: true, messages: [{ role: 'user', content: 'hi' }] },
        { 'x-fake-chunks': '16', 'x-fake-delay-ms': '150' }, { timeoutMs: 20000, onEvent: () => first() });
    let streamEnded = false;
    streamDone.then(() => { streamEnded = true; });
    await gotFirst;
    const exit = exitOf(gw);
    const tTerm = Date.now();
    gw.terminate('SIGTERM');

    await waitFor(() => refused(gw.port), 3000, { intervalMs: 10, what: 'new connections refused after SIGTERM' });
    assert.ok(!streamEnded, 'refused while the stream is still running');
    // The workers outlive the drain: the one serving the stream must.
    assert.ok(pidAlive(fakePid), 'the worker serving the stream is still running');
    assert.ok(kids.every(pidAlive), 'every worker still running during the drain');

    const s = await streamDone;
    assert.equal(s.status, 200);
    assert.ok(s.ended && !s.error && !s.timedOut, `the stream completed: ${s.error}`);
    const data = sseEvents(s.events.join('\n\n') + '\n\n');
    assert.equal(data[data.length - 1], '[DONE]');
    assert.equal(data.filter((d) => d !== '[DONE]' && d.choices?.[0]?.delta?.content).length, 16, 'all 16 chunks');

    const how = await exit;
    assert.deepEqual(how, { code: 0, signal: null }, `the gateway exits 0 (log tail: ${gw.log().slice(-1500)})`);
    assert.ok(Date.now() - tTerm < 10000, 'well within the grace period plus the stop timeout');
    // Nothing it started is left: not the workers, not the shell's child.
    await waitFor(() => all.every((pid) => procStat(pid) === null), 3000, { what: `every process gone: ${JSON.stringify(all.map(procStat))}` });
    // Reaped by the gateway itself before it exited, not left to init.
    for (const pid of kids) assert.match(gw.log(), new RegExp(`worker#0 ${pid}\\] stopped \\(`), `worker ${pid} reaped by the fleet`);
    assert.ok(!/still running \d+ ms after SIGTERM/.test(gw.log()), 'every worker stopped on SIGTERM, none needed SIGKILL');
});

test('SIGINT works the same way; a worker that ignores SIGTERM is killed after the stop timeout (10 s)', async () => {
    // Ignores SIGTERM; its group's sleeps die of it, the shell goes on.
    const stubborn = await getFreePort();
    const { gw, all } = await fleetGateway({}, [{ name: 'stubborn', health: false,
        backends: [{ launch: { command: ['sh', '-c', 'trap "" TERM; while :; do sleep 1; done'], port: stubborn } }] }]);
    const exit = exitOf(gw);
    const t0 = Date.now();
    gw.terminate('SIGINT');
    assert.deepEqual(await exit, { code: 0, signal: null });
    const took = Date.now() - t0;
    assert.ok(took >= 9500 && took < 20000, `SIGKILL after the 10 s stop timeout, then exit (${took} ms)`);
    assert.match(gw.log(), /\[stubborn worker#0 \d+\] still running 10000 ms after SIGTERM: SIGKILL/);
    assert.match(gw.log(), /\[stubborn worker#0 \d+\] stopped \(killed by signal 9/);
    assert.match(gw.log(), /\[real worker#0 \d+\] stopped \(exited with code 0\)/, 'the others stopped on SIGTERM');
    await waitFor(() => all.every((pid) => procStat(pid) === null), 3000, { what: `every process gone: ${JSON.stringify(all.map(procStat))}` });
});

test('kill -9 the gateway: its workers exit too (parent-death signal)', async () => {
    const { gw, kids, all } = await fleetGateway();
    orphans.push(...all);
    const exit = exitOf(gw);
    gw.terminate('SIGKILL');
    assert.equal((await exit).signal, 'SIGKILL');
    // The direct children get SIGTERM from the kernel; a worker's own
    // children are its business (the shell here dies, its child is orphaned).
    await waitFor(() => kids.every((pid) => !pidAlive(pid)), 5000, { intervalMs: 20, what: `workers exit: ${JSON.stringify(kids.map(procStat))}` });
});
