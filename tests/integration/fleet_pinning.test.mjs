// The fleet's processes as the kernel sees them: each launched child gets
// exactly the GPUs its config names (CUDA_VISIBLE_DEVICES, read from
// /proc/PID/environ) whatever the gateway's own environment selects, the
// command line the docs promise, its own session, and the gateway as parent.
// There is no GPU here: the "GPU" workers are launched commands (the fake
// upstream), which is all pinning needs; the CPU worker is a real
// modelmux-worker on a generated tiny model.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
    FAKE, chat, childrenOf, fakeCommand, fleetWorkers, getFreePort, listedModels, makeModel,
    procCmdline, procEnviron, procStat, runGatewaySync, startGateway, waitFor, workerBin,
} from './lib.mjs';

const HEALTH = { interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 2 };
// What the test's own environment selects: none of it may reach a worker.
const GATEWAY_ENV = {
    CUDA_VISIBLE_DEVICES: '7', NVIDIA_VISIBLE_DEVICES: 'all', ROCR_VISIBLE_DEVICES: '3',
    HIP_VISIBLE_DEVICES: '3', GPU_DEVICE_ORDINAL: '5', CUDA_DEVICE_ORDER: 'FASTEST_FIRST',
    MM_FLEET_PIN_MARK: 'inherited',
};
const SELECTORS = ['NVIDIA_VISIBLE_DEVICES', 'ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES', 'GPU_DEVICE_ORDINAL'];

let dir, gw;
const port = {};

before(async () => {
    dir = makeModel('fleetpin');
    for (const k of ['pair', 'single', 'nogpu', 'cpu']) port[k] = await getFreePort();
    gw = await startGateway({
        threads: 1,
        defaults: { health: HEALTH },
        models: [
            { name: 'pair', backends: [{ launch: { command: fakeCommand(port.pair, 'pair'), gpus: '0,1', port: port.pair } }] },
            { name: 'single', backends: [{ launch: { command: fakeCommand(port.single, 'single'), gpus: '2', port: port.single } }] },
            { name: 'nogpu', backends: [{ launch: { command: fakeCommand(port.nogpu, 'nogpu'), gpus: '', port: port.nogpu } }] },
            { name: 'cpu', backends: [{ launch: { model: dir, device: 'cpu', port: port.cpu, args: ['--threads', '1'] } }] },
        ],
    }, { admin: true, env: GATEWAY_ENV });
    await waitFor(async () => (await listedModels(gw.port)).length === 4, 20000,
        { intervalMs: 50, what: 'all four launched models published' });
});

after(async () => {
    if (gw) await gw.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// The gateway's child listening on port p (by its command line).
function childOnPort(p) {
    const kids = childrenOf(gw.proc.pid);
    const hit = kids.filter((k) => (procCmdline(k.pid) || []).includes(String(p)));
    assert.equal(hit.length, 1, `one child of the gateway on port ${p}; children: ${JSON.stringify(kids.map((k) => [k.pid, procCmdline(k.pid)]))}`);
    return hit[0].pid;
}

test('every launched worker is a child of the gateway, in its own session, one per backend', async () => {
    const kids = childrenOf(gw.proc.pid).filter((k) => k.state !== 'Z');
    assert.equal(kids.length, 4, `four live children: ${JSON.stringify(kids)}`);
    for (const k of kids) {
        // setsid(): the worker leads its own session and group, so the fleet
        // can signal everything it forks and a terminal's ^C reaches only the gateway.
        assert.equal(k.session, k.pid, `worker ${k.pid} leads its session`);
        assert.equal(k.pgrp, k.pid, `worker ${k.pid} leads its process group`);
        assert.notEqual(k.session, procStat(gw.proc.pid).session, 'not the gateway\'s session');
    }
    const workers = await fleetWorkers(gw.adminPort);
    assert.deepEqual(workers.map((w) => w.pid).sort(), kids.map((k) => k.pid).sort(), 'the admin API names the same pids');
});

test('"gpus": "0,1" -> CUDA_VISIBLE_DEVICES=0,1 in PCI order; the gateway\'s own selection is gone', () => {
    const env = procEnviron(childOnPort(port.pair));
    assert.ok(env, 'environ readable');
    assert.equal(env.CUDA_VISIBLE_DEVICES, '0,1');
    assert.equal(env.CUDA_DEVICE_ORDER, 'PCI_BUS_ID');
    for (const k of SELECTORS) assert.equal(env[k], undefined, `${k} not passed on (gateway had ${GATEWAY_ENV[k]})`);
    // The rest of the environment is the gateway's.
    assert.equal(env.MM_FLEET_PIN_MARK, 'inherited');
    assert.equal(env.PATH, process.env.PATH);
});

test('"gpus": "2" and "gpus": "" pin exactly that (empty: no GPU visible)', () => {
    const one = procEnviron(childOnPort(port.single));
    assert.equal(one.CUDA_VISIBLE_DEVICES, '2');
    assert.equal(one.CUDA_DEVICE_ORDER, 'PCI_BUS_ID');
    const none = procEnviron(childOnPort(port.nogpu));
    assert.ok(Object.prototype.hasOwnProperty.call(none, 'CUDA_VISIBLE_DEVICES'), 'set, to nothing');
    assert.equal(none.CUDA_VISIBLE_DEVICES, '');
    for (const e of [one, none]) {
        for (const k of SELECTORS) assert.equal(e[k], undefined, `${k} not passed on`);
    }
});

test('a "command" runs exactly as written; a model runs modelmux-worker with the documented flags', () => {
    assert.deepEqual(procCmdline(childOnPort(port.pair)), [process.execPath, FAKE, '--port', String(port.pair), '--name', 'pair']);
    const pid = childOnPort(port.cpu);
    assert.deepEqual(procCmdline(pid), [workerBin(), '--model', dir, '--port', String(port.cpu), '--host', '127.0.0.1',
        '--served-model-name', 'cpu', '--tensor-parallel-size', '1', '--device', 'cpu', '--threads', '1']);
    const env = procEnviron(pid);
    assert.equal(env.CUDA_VISIBLE_DEVICES, '', 'a CPU worker sees no GPU');
    for (const k of SELECTORS) assert.equal(env[k], undefined, `${k} not passed on`);
});

test('the admin API reports each worker\'s GPUs, device and port', async () => {
    const byModel = Object.fromEntries((await fleetWorkers(gw.adminPort)).map((w) => [w.model, w]));
    assert.equal(byModel.pair.gpus, '0,1');
    assert.equal(byModel.pair.device, 'cuda', 'GPUs given, no device: cuda');
    assert.equal(byModel.single.gpus, '2');
    assert.equal(byModel.nogpu.gpus, '');
    assert.equal(byModel.cpu.gpus, '');
    assert.equal(byModel.cpu.device, 'cpu');
    for (const k of ['pair', 'single', 'nogpu', 'cpu']) {
        assert.equal(byModel[k].port, port[k]);
        assert.equal(byModel[k].url, `http://127.0.0.1:${port[k]}`);
        assert.equal(byModel[k].pid, childOnPort(port[k]));
    }
});

test('requests reach the pinned workers through the gateway', async () => {
    for (const m of ['pair', 'single', 'nogpu', 'cpu']) {
        const r = await chat(gw.port, m);
        assert.equal(r.status, 200, `${m}: ${r.body}`);
        assert.equal(r.headers['x-modelmux-backend'], `http://127.0.0.1:${port[m]}`);
    }
    // The real worker answered under the public name it was started with.
    assert.equal(JSON.parse((await chat(gw.port, 'cpu')).body).model, 'cpu');
});

test('two workers on one GPU are refused unless both set share_gpus', () => {
    const cfg = (shareA, shareB) => ({
        models: [
            { name: 'a', backends: [{ launch: { command: ['true'], gpus: '0,1', port: 9001, share_gpus: shareA } }] },
            { name: 'b', backends: [{ launch: { command: ['true'], gpus: '1', port: 9002, share_gpus: shareB } }] },
        ],
    });
    const bad = runGatewaySync(cfg(true, false), ['--check']);
    assert.notEqual(bad.status, 0, 'refused');
    assert.match(bad.stderr + bad.stdout, /models\[1\]\.backends\[0\]\.launch\.gpus: GPU 1 is also used by models\[0\]\.backends\[0\]/);
    const ok = runGatewaySync(cfg(true, true), ['--check']);
    assert.equal(ok.status, 0, `accepted with share_gpus on both: ${ok.stderr}`);
});
