// Continuous batching in modelmux-worker: concurrent requests share steps
// without changing their answers, requests beyond --max-num-seqs queue, and
// a client that leaves frees its slot.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { makeModel, postJson, request, startWorker } from './lib.mjs';

let dir, name;
const workers = [];

before(() => {
    // A long context, so one request can run for seconds when asked to.
    dir = makeModel('wbatch', ['--std', '0.5', '--seed', '4', '--max-pos', '32768']);
    name = path.basename(dir);
});

after(async () => {
    for (const w of workers) await w.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function worker(args) {
    const w = await startWorker(dir, args);
    workers.push(w);
    return w;
}

const prompts = [
    'Hello there', 'The quick brown fox', 'a', 'Once upon a time in a land far away',
    '1 2 3 4', 'What is the capital', 'Lorem ipsum dolor sit amet', 'zzz',
];

const greedy = (w, prompt, extra = {}) => postJson(w.port, '/v1/completions',
    { model: name, prompt, max_tokens: 24, temperature: 0, ignore_eos: true, ...extra }, {}, { timeoutMs: 30000 });

async function metric(w, m) {
    const r = await request(w.port, { path: '/metrics' });
    const mm = new RegExp(`^${m}\\{[^}]*\\} (\\S+)$`, 'm').exec(r.body);
    assert.ok(mm, `${m} in /metrics`);
    return Number(mm[1]);
}

test('8 concurrent requests all complete, with the answers they get alone', async () => {
    const w = await worker(['--max-num-seqs', '8', '--max-model-len', '512']);
    const alone = [];
    for (const p of prompts) alone.push((await greedy(w, p)).json().choices[0].text);
    const together = await Promise.all(prompts.map((p) => greedy(w, p)));
    for (let i = 0; i < prompts.length; i++) {
        assert.equal(together[i].status, 200, together[i].body);
        assert.equal(together[i].json().choices[0].text, alone[i], `prompt ${i}`);
        assert.equal(together[i].json().usage.completion_tokens, 24);
    }
    // Concurrent streams too.
    const streams = await Promise.all(prompts.slice(0, 4).map((p) => greedy(w, p, { stream: true })));
    for (let i = 0; i < 4; i++) {
        const text = streams[i].body.split('\n\n').filter((b) => b.startsWith('data: {'))
            .map((b) => JSON.parse(b.slice(6)).choices[0].text).join('');
        assert.equal(text, alone[i]);
    }
    assert.ok(await metric(w, 'modelmux_worker_engine_steps_total') > 0);
});

test('--max-num-seqs 2 with 5 concurrent requests: all complete', async () => {
    const w = await worker(['--max-num-seqs', '2', '--max-model-len', '512']);
    const rs = await Promise.all(prompts.slice(0, 5).map((p) => greedy(w, p, { max_tokens: 40 })));
    for (const r of rs) {
        assert.equal(r.status, 200, r.body);
        assert.equal(r.json().usage.completion_tokens, 40);
    }
    const body = (await request(w.port, { path: '/metrics' })).body;
    assert.match(body, /finished_reason="length"\} 5\n/);
    assert.equal(await metric(w, 'modelmux_worker_requests_running'), 0);
    assert.equal(await metric(w, 'modelmux_worker_requests_waiting'), 0);
});

test('a client that disconnects mid-stream frees its slot', async () => {
    const w = await worker(['--max-num-seqs', '1', '--max-model-len', '32768']);
    const LONG = 30000;
    // A stream that would run for a long time; read its first chunk, leave.
    await new Promise((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port: w.port, method: 'POST', path: '/v1/completions',
            headers: { 'content-type': 'application/json' }, agent: false }, (res) => {
            assert.equal(res.statusCode, 200);
            res.once('data', () => { req.destroy(); resolve(); });
        });
        req.on('error', (e) => { if (e.code !== 'ECONNRESET') reject(e); });
        req.end(JSON.stringify({ model: name, prompt: 'Hello', max_tokens: LONG, temperature: 0,
            ignore_eos: true, stream: true }));
    });
    // With one slot, the next request runs only once the first was dropped.
    const t0 = Date.now();
    const r = await greedy(w, 'The quick brown fox', { max_tokens: 5 });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.json().usage.completion_tokens, 5);
    const elapsed = Date.now() - t0;
    // The abandoned sequence ended as "abort", long before its 30000 tokens.
    let aborted = 0;
    for (let i = 0; i < 100 && aborted === 0; i++) {
        const body = (await request(w.port, { path: '/metrics' })).body;
        aborted = Number(/finished_reason="abort"\} (\d+)/.exec(body)[1]);
    }
    assert.equal(aborted, 1);
    assert.ok(await metric(w, 'modelmux_worker_generation_tokens_total') < LONG, 'cut short');
    assert.ok(elapsed < 10000, `the next request waited ${elapsed} ms`);
    assert.equal(await metric(w, 'modelmux_worker_requests_running'), 0);
});
