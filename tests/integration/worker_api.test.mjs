// modelmux-worker's endpoints on a generated tiny model: OpenAI and vLLM
// shapes, sampling semantics, errors, and the command line.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
    checkErrorShape, makeModel, postJson, request, runWorkerSync, sseEvents, startWorker,
} from './lib.mjs';

const MAX_LEN = 256;
let dir, w, name;

before(async () => {
    // std 0.5: peaked distributions, so greedy outputs are stable.
    dir = makeModel('wapi', ['--std', '0.5', '--seed', '3']);
    name = path.basename(dir);
    // A short load delay makes the "loading" state observable.
    w = await startWorker(dir, ['--max-model-len', String(MAX_LEN), '--max-num-seqs', '4'],
        { env: { MM_WORKER_TEST_LOAD_DELAY_MS: '400' } });
});

after(async () => {
    await w?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const complete = (body) => postJson(w.port, '/v1/completions', { model: name, ...body });
const chatReq = (body) => postJson(w.port, '/v1/chat/completions', { model: name, ...body });
const tokenize = async (body) => (await postJson(w.port, '/tokenize', { model: name, ...body })).json();
const msgs = [{ role: 'user', content: 'Hello, who are you?' }];

test('health said 503 {"status":"loading"} while loading, 200 once ready', async () => {
    assert.ok(w.sawLoading, 'a 503 was seen during the load delay');
    assert.deepEqual(JSON.parse(w.loadingBody), { status: 'loading' });
    const r = await request(w.port, { path: '/health' });
    assert.equal(r.status, 200);
    assert.match(w.log(), /model ready in/);
});

test('completions: a string prompt, greedy, with usage', async () => {
    const r = await complete({ prompt: 'Hello world', max_tokens: 8, temperature: 0 });
    assert.equal(r.status, 200, r.body);
    const j = r.json();
    assert.equal(j.object, 'text_completion');
    assert.match(j.id, /^cmpl-[0-9a-f]{32}$/);
    assert.equal(j.model, name);
    assert.equal(j.choices.length, 1);
    assert.equal(j.choices[0].index, 0);
    assert.equal(typeof j.choices[0].text, 'string');
    assert.equal(j.choices[0].finish_reason, 'length');
    assert.equal(j.choices[0].logprobs, null);
    const t = await tokenize({ prompt: 'Hello world' });
    assert.deepEqual(j.usage, { prompt_tokens: t.count, completion_tokens: 8, total_tokens: t.count + 8 });
    // Greedy is deterministic.
    const again = (await complete({ prompt: 'Hello world', max_tokens: 8, temperature: 0 })).json();
    assert.equal(again.choices[0].text, j.choices[0].text);
});

test('completions: a list of prompts and token-id prompts', async () => {
    const one = async (p) => (await complete({ prompt: p, max_tokens: 6, temperature: 0 })).json().choices[0].text;
    const a = await one('The cat');
    const b = await one('A dog');
    const r = (await complete({ prompt: ['The cat', 'A dog'], max_tokens: 6, temperature: 0 })).json();
    assert.deepEqual(r.choices.map((c) => [c.index, c.text]), [[0, a], [1, b]]);
    const ids = (await tokenize({ prompt: 'The cat' })).tokens;
    const byIds = (await complete({ prompt: ids, max_tokens: 6, temperature: 0 })).json();
    assert.equal(byIds.choices[0].text, a);
    assert.equal(byIds.usage.prompt_tokens, ids.length);
    const idsB = (await tokenize({ prompt: 'A dog' })).tokens;
    const lists = (await complete({ prompt: [ids, idsB], max_tokens: 6, temperature: 0 })).json();
    assert.deepEqual(lists.choices.map((c) => c.text), [a, b]);
    assert.equal(lists.usage.prompt_tokens, ids.length + idsB.length);
    assert.equal(lists.usage.completion_tokens, 12);
});

test('completions: echo + logprobs + max_tokens 0 scores the prompt', async () => {
    const prompt = 'The quick brown fox jumps';
    const ids = (await tokenize({ prompt })).tokens;
    const r = await complete({ prompt, max_tokens: 0, echo: true, logprobs: 2 });
    assert.equal(r.status, 200, r.body);
    const c = r.json().choices[0];
    assert.equal(c.text, prompt);
    const lp = c.logprobs;
    assert.equal(lp.tokens.length, ids.length);
    assert.equal(lp.tokens.join(''), prompt);
    assert.equal(lp.token_logprobs[0], null);
    assert.equal(lp.top_logprobs[0], null);
    assert.equal(lp.text_offset[0], 0);
    for (let i = 1; i < ids.length; i++) {
        assert.ok(lp.token_logprobs[i] < 0, `token ${i}: ${lp.token_logprobs[i]}`);
        const keys = Object.keys(lp.top_logprobs[i]);
        assert.ok(keys.length >= 2 && keys.length <= 3, JSON.stringify(lp.top_logprobs[i]));
        assert.equal(lp.top_logprobs[i][lp.tokens[i]], lp.token_logprobs[i]);
        assert.equal(lp.text_offset[i], lp.text_offset[i - 1] + [...lp.tokens[i - 1]].length);
    }
    assert.equal(r.json().usage.completion_tokens, 0);

    // The logprob of a generated token equals its logprob when scored as
    // part of the prompt (same model, same context).
    const g = (await complete({ prompt: ids, max_tokens: 1, temperature: 0, logprobs: 0 })).json();
    const gl = g.choices[0].logprobs;
    const tok = (await tokenize({ prompt: gl.tokens[0], add_special_tokens: false })).tokens;
    if (tok.length === 1) {
        const s = (await complete({ prompt: [...ids, ...tok], max_tokens: 0, echo: true, logprobs: 0 })).json();
        const last = s.choices[0].logprobs.token_logprobs.at(-1);
        assert.ok(Math.abs(last - gl.token_logprobs[0]) < 1e-3, `${last} vs ${gl.token_logprobs[0]}`);
    }
});

test('chat: the template is rendered and the answer has the OpenAI shape', async () => {
    const r = await chatReq({ messages: msgs, max_tokens: 10, temperature: 0 });
    assert.equal(r.status, 200, r.body);
    const j = r.json();
    assert.equal(j.object, 'chat.completion');
    assert.match(j.id, /^chatcmpl-/);
    assert.equal(j.choices[0].message.role, 'assistant');
    assert.equal(typeof j.choices[0].message.content, 'string');
    assert.ok(['stop', 'length'].includes(j.choices[0].finish_reason));
    const t = await tokenize({ messages: msgs });
    assert.equal(j.usage.prompt_tokens, t.count);
    assert.equal(j.usage.total_tokens, j.usage.prompt_tokens + j.usage.completion_tokens);
    // Content parts are joined like plain strings.
    const parts = await chatReq({ messages: [{ role: 'user', content: [{ type: 'text', text: 'Hello, who are you?' }] }],
        max_tokens: 10, temperature: 0 });
    assert.equal(parts.json().choices[0].message.content, j.choices[0].message.content);
    // Chat logprobs.
    const l = (await chatReq({ messages: msgs, max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 2 })).json();
    const content = l.choices[0].logprobs.content;
    assert.equal(content.length, 3);
    for (const e of content) {
        assert.equal(typeof e.token, 'string');
        assert.ok(e.logprob <= 0);
        assert.deepEqual(e.bytes, [...Buffer.from(e.token, 'utf8')]);
        assert.equal(e.top_logprobs.length, 2);
        // Greedy: the chosen token is the most likely one.
        assert.equal(e.top_logprobs[0].logprob, e.logprob);
    }
});

test('streaming chat: role first, deltas equal the whole answer, usage, [DONE]', async () => {
    const whole = (await chatReq({ messages: msgs, max_tokens: 12, temperature: 0 })).json();
    const r = await chatReq({ messages: msgs, max_tokens: 12, temperature: 0, stream: true,
        stream_options: { include_usage: true } });
    assert.equal(r.status, 200);
    assert.match(r.headers['content-type'], /^text\/event-stream/);
    const ev = sseEvents(r.body);
    assert.equal(ev.at(-1), '[DONE]');
    const chunks = ev.slice(0, -1);
    assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
    const usage = chunks.at(-1);
    assert.deepEqual(usage.choices, []);
    assert.deepEqual(usage.usage, whole.usage);
    let text = '';
    let finish = null;
    for (const c of chunks.slice(0, -1)) {
        assert.equal(c.object, 'chat.completion.chunk');
        assert.equal(c.id, chunks[0].id);
        assert.equal(c.usage, null);
        text += c.choices[0].delta.content ?? '';
        if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    }
    assert.equal(text, whole.choices[0].message.content);
    assert.equal(finish, whole.choices[0].finish_reason);
    // Without include_usage: no usage chunk, no usage keys.
    const plain = sseEvents((await chatReq({ messages: msgs, max_tokens: 3, stream: true })).body);
    assert.equal(plain.at(-1), '[DONE]');
    for (const c of plain.slice(0, -1)) {
        assert.equal(c.choices.length, 1);
        assert.ok(!('usage' in c));
    }
});

test('streaming completions with n = 2: each index ends once', async () => {
    const r = await complete({ prompt: 'Once upon a time', max_tokens: 5, n: 2, seed: 9, stream: true,
        stream_options: { include_usage: true } });
    const ev = sseEvents(r.body);
    assert.equal(ev.at(-1), '[DONE]');
    const finals = {};
    for (const c of ev.slice(0, -2)) {
        assert.equal(c.object, 'text_completion');
        for (const ch of c.choices) if (ch.finish_reason) finals[ch.index] = (finals[ch.index] || 0) + 1;
    }
    assert.deepEqual(finals, { 0: 1, 1: 1 });
    assert.equal(ev.at(-2).usage.completion_tokens, 10);
});

test('seeded sampling: the same seed gives the same text', async () => {
    const body = { prompt: 'In the beginning', max_tokens: 16, temperature: 1.0, top_p: 0.95, seed: 42 };
    const a = (await complete(body)).json().choices[0].text;
    const b = (await complete(body)).json().choices[0].text;
    assert.equal(a, b);
    const others = [];
    for (const seed of [43, 44, 45]) others.push((await complete({ ...body, seed })).json().choices[0].text);
    assert.ok(others.some((t) => t !== a), 'other seeds give other texts');
    // n = 2 with a seed: reproducible too.
    const n1 = (await complete({ ...body, n: 2 })).json().choices.map((c) => c.text);
    const n2 = (await complete({ ...body, n: 2 })).json().choices.map((c) => c.text);
    assert.deepEqual(n1, n2);
});

// Two printable ASCII characters from text, past its start.
function asciiPair(text) {
    for (let i = 1; i + 1 < text.length; i++) {
        if (/^[!-~]{2}$/.test(text.slice(i, i + 2))) return text.slice(i, i + 2);
    }
    return null;
}

test('stop strings end the text before them, streamed or not', async () => {
    let prompt;
    let ref;
    let stop = null;
    for (prompt of ['Hello world', 'The cat sat on', 'Numbers: 1 2 3', 'Why is the sky']) {
        ref = (await complete({ prompt, max_tokens: 40, temperature: 0, ignore_eos: true })).json().choices[0].text;
        stop = asciiPair(ref);
        if (stop) break;
    }
    assert.ok(stop, 'found a stop string candidate');
    const expect = ref.slice(0, ref.indexOf(stop));
    const r = (await complete({ prompt, max_tokens: 40, temperature: 0, ignore_eos: true, stop: [stop, 'qqqqzzzz'] })).json();
    assert.equal(r.choices[0].text, expect);
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.choices[0].stop_reason, stop);
    const s = sseEvents((await complete({ prompt, max_tokens: 40, temperature: 0, ignore_eos: true, stop, stream: true })).body);
    const streamed = s.slice(0, -1).map((c) => c.choices[0].text).join('');
    assert.equal(streamed, expect);
    assert.ok(!streamed.includes(stop));
    // include_stop_str_in_output keeps it.
    const inc = (await complete({ prompt, max_tokens: 40, temperature: 0, ignore_eos: true, stop, include_stop_str_in_output: true })).json();
    assert.equal(inc.choices[0].text, expect + stop);
});

test('stop_token_ids end the sequence on that token', async () => {
    const g = (await complete({ prompt: 'Hello world', max_tokens: 10, temperature: 0, ignore_eos: true, logprobs: 0 })).json();
    const ids = (await tokenize({ prompt: g.choices[0].logprobs.tokens[3], add_special_tokens: false })).tokens;
    if (ids.length !== 1) return; // the token's text re-tokenizes differently: nothing to test
    const r = (await complete({ prompt: 'Hello world', max_tokens: 10, temperature: 0, ignore_eos: true, stop_token_ids: ids })).json();
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.choices[0].stop_reason, ids[0]);
    assert.ok(r.usage.completion_tokens <= 4);
});

test('tokenize / detokenize round trip, both shapes', async () => {
    const text = 'Hello world, this is a test.';
    const t = await tokenize({ prompt: text });
    assert.deepEqual(Object.keys(t).sort(), ['count', 'max_model_len', 'token_strs', 'tokens']);
    assert.equal(t.count, t.tokens.length);
    assert.equal(t.max_model_len, MAX_LEN);
    const d = (await postJson(w.port, '/detokenize', { model: name, tokens: t.tokens })).json();
    assert.deepEqual(d, { prompt: text });
    // The chat shape tokenizes the rendered template; its special tokens are
    // single ids, and no BOS is added a second time.
    const c = await tokenize({ messages: [{ role: 'user', content: 'Hi' }] });
    const rendered = (await postJson(w.port, '/detokenize', { model: name, tokens: c.tokens })).json().prompt;
    assert.equal(rendered, '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n');
    const imStart = (await tokenize({ prompt: '<|im_start|>' })).tokens;
    assert.equal(imStart.length, 1);
    assert.equal(c.tokens[0], imStart[0]);
    assert.equal(c.tokens.filter((x) => x === imStart[0]).length, 2);
    const noGen = await tokenize({ messages: [{ role: 'user', content: 'Hi' }], add_generation_prompt: false });
    assert.ok(noGen.count < c.count);
    // continue_final_message: the rendering stops right after the last
    // message's content, so the model continues it.
    const cont = await tokenize({ messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'I am' }],
        add_generation_prompt: false, continue_final_message: true });
    const contText = (await postJson(w.port, '/detokenize', { model: name, tokens: cont.tokens })).json().prompt;
    assert.equal(contText, '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nI am');
    const strs = await tokenize({ prompt: 'Hello', return_token_strs: true });
    assert.equal(strs.token_strs.length, strs.count);
    const bad = await postJson(w.port, '/detokenize', { model: name, tokens: [1, 99999] });
    checkErrorShape(assert, bad, 400);
});

test('/v1/models, /version, /metrics', async () => {
    const m = (await request(w.port, { path: '/v1/models' })).json();
    assert.equal(m.object, 'list');
    assert.equal(m.data.length, 1);
    assert.equal(m.data[0].id, name, 'the served name defaults to the directory name');
    assert.equal(m.data[0].object, 'model');
    assert.equal(m.data[0].max_model_len, MAX_LEN);
    const v = (await request(w.port, { path: '/version' })).json();
    assert.match(v.version, /^\d+\.\d+\.\d+/);
    const r = await request(w.port, { path: '/metrics' });
    assert.equal(r.status, 200);
    assert.match(r.headers['content-type'], /^text\/plain/);
    const val = (metric) => {
        const re = new RegExp(`^${metric}\\{model_name="${name}"[^}]*\\} (\\S+)$`, 'm');
        const mm = re.exec(r.body);
        assert.ok(mm, `${metric} in\n${r.body}`);
        return Number(mm[1]);
    };
    assert.equal(val('modelmux_worker_model_ready'), 1);
    assert.equal(val('modelmux_worker_requests_running'), 0);
    assert.equal(val('modelmux_worker_requests_waiting'), 0);
    assert.ok(val('modelmux_worker_generation_tokens_total') > 0);
    assert.ok(val('modelmux_worker_prompt_tokens_total') > 0);
    assert.ok(val('modelmux_worker_time_to_first_token_seconds_count') > 0);
    assert.ok(val('modelmux_worker_inter_token_latency_seconds_count') > 0);
    assert.equal(val('modelmux_worker_kv_cache_usage_perc'), 0);
    assert.match(r.body, /# TYPE modelmux_worker_time_to_first_token_seconds histogram/);
    assert.match(r.body, /modelmux_worker_time_to_first_token_seconds_bucket\{[^}]*le="\+Inf"\} \d+/);
    assert.match(r.body, /modelmux_worker_request_success_total\{[^}]*finished_reason="length"\} [1-9]/);
});

test('invalid parameters: 400 with the OpenAI error shape naming the parameter', async () => {
    const cases = [
        [{ prompt: 'x', temperature: -1 }, 'temperature'],
        [{ prompt: 'x', top_p: 0 }, 'top_p'],
        [{ prompt: 'x', top_p: 1.5 }, 'top_p'],
        [{ prompt: 'x', n: 0 }, 'n'],
        [{ prompt: 'x', n: 17 }, 'n'],
        [{ prompt: 'x', logprobs: 21 }, 'logprobs'],
        [{ prompt: 'x', max_tokens: 'ten' }, 'max_tokens'],
        [{ prompt: 'x', max_tokens: -1 }, 'max_tokens'],
        [{ prompt: 'x', presence_penalty: 3 }, 'presence_penalty'],
        [{ prompt: 'x', repetition_penalty: 0 }, 'repetition_penalty'],
        [{ prompt: 'x', stream_options: { include_usage: true } }, 'stream_options'],
        [{ prompt: 'x', stop: Array(17).fill('a') }, 'stop'],
        [{ prompt: 'x', stop: [''] }, 'stop'],
        [{ prompt: 'x', logit_bias: { 99999: 1 } }, 'logit_bias'],
        [{ prompt: 'x', seed: 'abc' }, 'seed'],
        [{ prompt: [99999] }, 'prompt'],
        [{ prompt: 7 }, 'prompt'],
        [{}, 'prompt'],
        [{ prompt: '' }, 'prompt'],
    ];
    for (const [body, param] of cases) {
        const r = await complete(body);
        const e = checkErrorShape(assert, r, 400);
        assert.equal(e.param, param, `${JSON.stringify(body)} -> ${r.body}`);
    }
    const chatCases = [
        [{ messages: msgs, top_logprobs: 2 }, 'top_logprobs'],
        [{ messages: [] }, 'messages'],
        [{ messages: [{ content: 'no role' }] }, 'messages'],
        [{ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }, 'messages'],
        [{ messages: msgs, max_tokens: 0 }, 'max_tokens'],
        [{ messages: msgs, response_format: { type: 'json_object' } }, 'response_format'],
        [{ messages: msgs, tool_choice: 'required' }, 'tool_choice'],
        [{ messages: msgs, chat_template: '{{ 1 }}' }, 'chat_template'],
    ];
    for (const [body, param] of chatCases) {
        const e = checkErrorShape(assert, await chatReq(body), 400);
        assert.equal(e.param, param, JSON.stringify(body));
    }
    // A template error is a 400 that names what failed in the template.
    const te = checkErrorShape(assert, await chatReq({ messages: [{ role: 'user', content: null }] }), 400);
    assert.match(te.message, /template.*concatenate/);
    // Malformed JSON, wrong model, wrong method, unknown path.
    checkErrorShape(assert, await request(w.port, { method: 'POST', path: '/v1/completions', body: '{"prompt":',
        headers: { 'content-type': 'application/json' } }), 400);
    const nf = checkErrorShape(assert, await complete({ model: 'nope', prompt: 'x' }), 404);
    assert.match(nf.message, /nope/);
    checkErrorShape(assert, await request(w.port, { path: '/v1/completions' }), 405);
    checkErrorShape(assert, await request(w.port, { path: '/v2/nothing' }), 404);
});

test('prompts beyond --max-model-len: 400 naming max_model_len', async () => {
    const long = 'word '.repeat(400);
    const r = await complete({ prompt: long, max_tokens: 1 });
    const e = checkErrorShape(assert, r, 400);
    assert.match(e.message, /max_model_len/);
    assert.match(e.message, new RegExp(`${MAX_LEN} tokens`));
    // Fits alone, not with the completion asked for.
    const r2 = await complete({ prompt: 'Hello', max_tokens: MAX_LEN });
    assert.match(checkErrorShape(assert, r2, 400).message, /max_model_len/);
    const r3 = await chatReq({ messages: [{ role: 'user', content: long }] });
    assert.match(checkErrorShape(assert, r3, 400).message, /max_model_len/);
    // Exactly at the limit with max_tokens filling it: accepted.
    const ids = (await tokenize({ prompt: 'Hello' })).tokens;
    const ok = await complete({ prompt: 'Hello', max_tokens: MAX_LEN - ids.length, temperature: 0, ignore_eos: true });
    assert.equal(ok.status, 200, ok.body);
    assert.equal(ok.json().usage.total_tokens, MAX_LEN);
});

test('command line: invalid flags exit 2 with a clear message', () => {
    const cases = [
        [['--model', dir, '--bogus'], /unknown flag '--bogus'/],
        [['--model', dir, '--port', 'abc'], /--port/],
        [['--model', dir, '--tensor-parallel-size', '2'], /tensor-parallel-size/],
        [['--model', dir, '--max-model-len', '999999'], /max_position_embeddings/],
        [['--model', dir, '--dtype', 'int3'], /--dtype/],
        [['--model', dir, '--gpu-memory-utilization', '1.5'], /gpu-memory-utilization/],
        [['--port', '1'], /--model DIR is required/],
        [['--make-model', path.join(dir, 'x'), '--layers', 'many'], /--layers/],
    ];
    for (const [args, re] of cases) {
        const r = runWorkerSync(args);
        assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
        assert.match(r.stderr, re);
    }
    const h = runWorkerSync(['--help']);
    assert.equal(h.status, 0);
    assert.match(h.stdout, /--max-num-seqs/);
    // No GPU here: a build without the CUDA backend refuses the flag (exit
    // 2); a build with it fails to load, saying no device is visible.
    const c = runWorkerSync(['--model', dir, '--device', 'cuda']);
    assert.notEqual(c.status, 0, c.stderr);
    assert.match(c.stderr, /CUDA backend not available in this build|no CUDA device/);
});

test('--make-model writes a loadable Hugging Face directory, deterministically', () => {
    const a = makeModel('wapi-mk-a', ['--seed', '5']);
    const b = makeModel('wapi-mk-b', ['--seed', '5']);
    try {
        for (const f of ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']) {
            assert.ok(fs.existsSync(path.join(a, f)), f);
            assert.ok(fs.readFileSync(path.join(a, f)).equals(fs.readFileSync(path.join(b, f))), `${f} identical`);
        }
        assert.equal(JSON.parse(fs.readFileSync(path.join(a, 'config.json'))).num_hidden_layers, 2);
    } finally {
        fs.rmSync(a, { recursive: true, force: true });
        fs.rmSync(b, { recursive: true, force: true });
    }
});
