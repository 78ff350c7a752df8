// modelmux-worker with a KV pool far smaller than its batch: sequences are
// preempted and recomputed, and no answer changes or fails because of it.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeModel, postJson, request, runWorkerSync, startWorker } from './lib.mjs';

const MAX_LEN = 256;
const BLOCK = 16;
// Exactly one sequence of MAX_LEN: the least the worker accepts.
const BLOCKS = MAX_LEN / BLOCK;
let dir, name, w;

before(async () => {
    // std 0.5: peaked distributions, so greedy outputs are far from ties.
    dir = makeModel('wpreempt', ['--std', '0.5', '--seed', '6']);
    name = path.basename(dir);
    w = await startWorker(dir, ['--max-model-len', String(MAX_LEN), '--max-num-seqs', '16',
        '--block-size', String(BLOCK), '--num-gpu-blocks-override', String(BLOCKS)]);
});

after(async () => {
    await w?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function metric(m) {
    const r = await request(w.port, { path: '/metrics' });
    const mm = new RegExp(`^${m}\\{[^}]*\\} (\\S+)$`, 'm').exec(r.body);
    assert.ok(mm, `${m} in /metrics`);
    return Number(mm[1]);
}

const topics = ['the sea', 'a red fox', 'winter', 'numbers', 'the moon', 'bread', 'a city',
    'music', 'rain', 'the desert', 'a library', 'trains', 'gardens', 'a storm', 'mountains',
    'the river'];

const chat = (i) => postJson(w.port, '/v1/chat/completions', {
    model: name, temperature: 0, max_tokens: 48, ignore_eos: true,
    messages: [{ role: 'user', content: `Tell me something about ${topics[i]}, please.` }],
}, {}, { timeoutMs: 60000 });

test('16 concurrent greedy chats on a pool for one: all answer as they do alone', async () => {
    const alone = [];
    for (let i = 0; i < topics.length; i++) {
        const r = await chat(i);
        assert.equal(r.status, 200, r.body);
        alone.push(r.json());
    }
    // One at a time, a sequence (prompt + 48 tokens) fits the pool.
    assert.equal(await metric('vllm:num_preemptions_total'), 0);
    const need = alone.reduce((n, a) => n + Math.ceil(a.usage.total_tokens / BLOCK), 0);
    assert.ok(need > 2 * BLOCKS, `the 16 together need ${need} blocks of the ${BLOCKS}`);

    const together = await Promise.all(topics.map((_, i) => chat(i)));
    for (let i = 0; i < topics.length; i++) {
        assert.equal(together[i].status, 200, together[i].body);
        const a = alone[i], t = together[i].json();
        assert.equal(t.choices[0].message.content, a.choices[0].message.content, `chat ${i}`);
        assert.equal(t.choices[0].finish_reason, 'length');
        assert.deepEqual(t.usage, a.usage, `chat ${i}: usage counts the prompt once`);
    }
    const preempted = await metric('vllm:num_preemptions_total');
    assert.ok(preempted > 0, `preemptions: ${preempted}`);
    assert.equal(await metric('modelmux_worker_num_preemptions_total'), preempted);
    const body = (await request(w.port, { path: '/metrics' })).body;
    assert.match(body, /# TYPE vllm:num_preemptions_total counter/);
    assert.match(body, new RegExp(`vllm:num_preemptions_total\\{model_name="${name}"\\}`));
    assert.match(body, /finished_reason="error"\} 0\n/);
    assert.match(body, /finished_reason="length"\} 32\n/);
    assert.equal(await metric('modelmux_worker_requests_running'), 0);
    assert.equal(await metric('modelmux_worker_kv_cache_usage_perc'), 0);
});

test('a pool smaller than one --max-model-len sequence is refused, naming the flags', () => {
    const r = runWorkerSync(['--model', dir, '--port', '0', '--host', '127.0.0.1',
        '--max-model-len', String(MAX_LEN), '--block-size', String(BLOCK),
        '--num-gpu-blocks-override', String(BLOCKS - 1)], { timeoutMs: 30000 });
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /--max-model-len 256/);
    assert.match(r.stderr, /--num-gpu-blocks-override/);
});

test('--block-size and --num-gpu-blocks-override are checked', () => {
    for (const [args, re] of [
        [['--block-size', '0'], /--block-size: expected 1\.\.256/],
        [['--block-size', '257'], /--block-size: expected 1\.\.256/],
        [['--num-gpu-blocks-override', '0'], /--num-gpu-blocks-override: expected/],
        [['--num-gpu-blocks-override', 'x'], /--num-gpu-blocks-override: expected/],
        // tensor parallelism is the cuda backend's
        [['--device', 'cpu', '--tensor-parallel-size', '2'], /needs the CUDA backend/],
    ]) {
        const r = runWorkerSync(['--model', dir, ...args]);
        assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
        assert.match(r.stderr, re);
    }
    // On the cuda device the flag is accepted; without two GPUs (CI has
    // none) loading fails with the reason, not a crash or a hang.
    const tp = runWorkerSync(['--model', dir, '--port', '0', '--device', 'cuda',
        '--tensor-parallel-size', '2']);
    assert.notEqual(tp.status, 0, tp.stderr);
    assert.notEqual(tp.status, null, `killed by ${tp.signal}`);
    assert.match(tp.stderr,
        /CUDA backend not available in this build|--tensor-parallel-size 2 needs 2 GPUs|does not divide/);
    // A size that does not divide the model's heads is refused before any
    // GPU is looked for, with the numbers (4 query heads, 2 kv heads,
    // intermediate 128 in this model).
    const bad = runWorkerSync(['--model', dir, '--port', '0', '--device', 'cuda',
        '--tensor-parallel-size', '3']);
    assert.notEqual(bad.status, 0, bad.stderr);
    assert.notEqual(bad.status, null, `killed by ${bad.signal}`);
    assert.match(bad.stderr, /CUDA backend not available in this build|--tensor-parallel-size 3 does not divide this model: it needs query heads \(4\) divisible by 3, kv heads \(2\) divisible by 3 or dividing it, and the intermediate size \(128\) divisible by 24/);
    const h = runWorkerSync(['--help']);
    assert.match(h.stdout, /--block-size N/);
    assert.match(h.stdout, /--num-gpu-blocks-override N/);
});
