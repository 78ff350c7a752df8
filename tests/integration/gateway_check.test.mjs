// The command line: --check, bad usage, startup log, clean stop on SIGTERM.
import test from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { gatewayBin, runGatewaySync, startGateway, startFake } from './lib.mjs';

const valid = {
    listen: '127.0.0.1:18000',
    threads: 2,
    models: [
        { name: 'qwen-14b', strategy: 'round_robin', health: false,
            backends: [{ url: 'http://127.0.0.1:18001', weight: 1 },
                { url: 'http://127.0.0.1:18002', weight: 3, served_model: 'DeepSeek-R1-Distill-Qwen-14B' }] },
        { name: 'qwen-32b', backends: [{ url: 'http://127.0.0.1:18003' }] },
        { name: 'chat', split: [{ model: 'qwen-14b', weight: 90 }, { model: 'qwen-32b', weight: 10 }], sticky: 'header:x-user-id' },
    ],
    default_pool: { strategy: 'round_robin', backends: [{ url: 'http://127.0.0.1:18001' }] },
};

test('--check: the spec\'s example config is valid (exit 0)', () => {
    const r = runGatewaySync(valid, ['--check']);
    assert.equal(r.error, undefined, String(r.error));
    assert.equal(r.status, 0, `stderr: ${r.stderr}`);
});

test('--check: weight -1 is invalid (exit 1) and the error names its JSON path', () => {
    const bad = structuredClone(valid);
    bad.models[0].backends[0].weight = -1;
    const r = runGatewaySync(bad, ['--check']);
    assert.equal(r.status, 1, `stderr: ${r.stderr}`);
    assert.ok(r.stderr.includes('models[0].backends[0].weight'), `stderr: ${r.stderr}`);
});

test('--check: more invalid configs name their paths', () => {
    const cases = [
        [(c) => { c.models[1].strategy = 'fastest'; }, 'models[1].strategy'],
        [(c) => { c.models[2].split[1].model = 'no-such'; }, 'models[2].split[1].model'],
        [(c) => { c.models[0].backends[1].url = 'not a url'; }, 'models[0].backends[1].url'],
        [(c) => { c.models[0].backends[0].api_key = '${MM_SURELY_UNSET_VAR_X}'; }, 'MM_SURELY_UNSET_VAR_X'],
    ];
    for (const [mutate, path] of cases) {
        const bad = structuredClone(valid);
        mutate(bad);
        const r = runGatewaySync(bad, ['--check'], { env: { MM_SURELY_UNSET_VAR_X: undefined } });
        assert.equal(r.status, 1, `${path}: exit ${r.status}, stderr: ${r.stderr}`);
        assert.ok(r.stderr.includes(path), `stderr names ${path}: ${r.stderr}`);
    }
});

test('--check: a file that is not JSON is invalid (exit 1)', () => {
    const r = runGatewaySync('{"listen": ', ['--check']);
    assert.equal(r.status, 1, `stderr: ${r.stderr}`);
    assert.ok(r.stderr.length > 0);
});

test('bad usage exits 2', () => {
    const r = spawnSync(gatewayBin(), [], { encoding: 'utf8', timeout: 5000 });
    assert.equal(r.status, 2, `stderr: ${r.stderr}`);
    const r2 = spawnSync(gatewayBin(), ['--no-such-flag'], { encoding: 'utf8', timeout: 5000 });
    assert.equal(r2.status, 2, `stderr: ${r2.stderr}`);
});

test('startup logs "listening on HOST:PORT" and SIGTERM exits 0', async () => {
    const f = await startFake({ name: 'x' });
    try {
        const gw = await startGateway({ models: [{ name: 'm', health: false, backends: [{ url: f.url }] }] });
        assert.ok(gw.log().includes(`listening on 127.0.0.1:${gw.port}`), gw.log());
        const r = await gw.stop();
        assert.deepEqual(r, { code: 0, signal: null }, gw.log());
    } finally {
        await f.kill();
    }
});
