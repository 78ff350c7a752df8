// A worker whose device is lost mid-generation. On a GPU that is a sticky
// CUDA error (an illegal address, say): the context is unusable until the
// process ends. Here the test hook MM_WORKER_TEST_FAULT_STEPS makes every
// step after the third fail the same way (worker/backend_fault.c; the real
// path is checked on a GPU by tests/gpu/run.sh). The request in flight must
// fail with an OpenAI-shaped error naming the cause, and the worker must
// exit 1 on its own, so that a supervisor (the gateway's fleet, systemd)
// starts a fresh one instead of a worker that fails every request forever.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeModel, postJson, startWorker } from './lib.mjs';

let dir, name;

before(() => {
    dir = makeModel('wlost', ['--seed', '3']);
    name = path.basename(dir);
});

after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('a lost device: the request in flight fails with the cause, the worker exits 1', async () => {
    const w = await startWorker(dir, ['--max-model-len', '256'],
        { env: { MM_WORKER_TEST_FAULT_STEPS: '3' } });
    try {
        const exited = new Promise((resolve) => {
            if (w.exited()) resolve(w.exited());
            w.proc.once('exit', (code, signal) => resolve({ code, signal }));
        });
        const r = await postJson(w.port, '/v1/completions', {
            model: name, prompt: 'Once upon a time', max_tokens: 32, temperature: 0,
            ignore_eos: true,
        }, {}, { timeoutMs: 30000 });
        assert.equal(r.status, 500, r.body);
        const e = r.json();
        assert.equal(typeof e.error, 'object', r.body);
        assert.match(e.error.message, /device lost/);
        // No request needed for the exit: it follows the failure by itself.
        let timer;
        const got = await Promise.race([exited,
            new Promise((resolve) => { timer = setTimeout(() => resolve(null), 20000); })]);
        clearTimeout(timer);
        assert.ok(got, `the worker did not exit within 20 s; log:\n${w.log()}`);
        assert.deepEqual(got, { code: 1, signal: null });
        assert.match(w.log(), /the device cannot run again; exiting so that the worker is restarted/);
    } finally {
        await w.stop();
    }
});
