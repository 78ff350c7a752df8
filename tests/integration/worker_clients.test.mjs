// modelmux-worker as real clients see it: the official `openai` npm client
// talking to it directly, and the worker as a backend of modelmux-gateway
// (health checks that see it loading, routing, streaming through).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import OpenAI from 'openai';
import { makeModel, postJson, request, sleep, sseEvents, startGateway, startWorker } from './lib.mjs';

let dir, w, client;
const NAME = 'tiny-chat';

before(async () => {
    dir = makeModel('wcli', ['--std', '0.5', '--seed', '6']);
    w = await startWorker(dir, ['--served-model-name', NAME, 'tiny-alias', '--max-model-len', '512']);
    client = new OpenAI({ baseURL: `${w.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 20000 });
});

after(async () => {
    const ex = await w?.stop();
    if (ex) assert.equal(ex.code, 0, 'the worker exits cleanly on SIGTERM');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Say something.' }];

test('openai client: models.list() shows every served name', async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    assert.deepEqual(ids, [NAME, 'tiny-alias']);
});

test('openai client: chat.completions.create, whole and streamed, agree', async () => {
    const r = await client.chat.completions.create({ model: NAME, messages, max_tokens: 12, temperature: 0 });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.model, NAME);
    assert.equal(r.choices[0].message.role, 'assistant');
    assert.equal(typeof r.choices[0].message.content, 'string');
    assert.equal(r.usage.completion_tokens <= 12, true);
    const stream = await client.chat.completions.create({ model: NAME, messages, max_tokens: 12, temperature: 0,
        stream: true, stream_options: { include_usage: true } });
    let text = '';
    let finish = null;
    let usage = null;
    for await (const chunk of stream) {
        assert.equal(chunk.object, 'chat.completion.chunk');
        if (chunk.usage) usage = chunk.usage;
        const c = chunk.choices[0];
        if (!c) continue;
        text += c.delta?.content ?? '';
        if (c.finish_reason) finish = c.finish_reason;
    }
    assert.equal(text, r.choices[0].message.content);
    assert.equal(finish, r.choices[0].finish_reason);
    assert.deepEqual(usage, r.usage);
    // The alias serves the same model.
    const a = await client.chat.completions.create({ model: 'tiny-alias', messages, max_tokens: 12, temperature: 0 });
    assert.equal(a.choices[0].message.content, r.choices[0].message.content);
    assert.equal(a.model, 'tiny-alias');
});

test('openai client: completions.create and its errors', async () => {
    const r = await client.completions.create({ model: NAME, prompt: 'Hello', max_tokens: 5, temperature: 0,
        logprobs: 1 });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.usage.completion_tokens, 5);
    assert.equal(r.choices[0].logprobs.tokens.length, 5);
    const s = await client.completions.create({ model: NAME, prompt: 'Hello', max_tokens: 5, temperature: 0, stream: true });
    let text = '';
    for await (const chunk of s) text += chunk.choices[0]?.text ?? '';
    assert.equal(text, r.choices[0].text);
    await assert.rejects(client.completions.create({ model: NAME, prompt: 'x', temperature: -3 }), (e) => {
        assert.equal(e.status, 400);
        assert.ok(e instanceof OpenAI.BadRequestError, e.constructor.name);
        assert.equal(e.param, 'temperature');
        return true;
    });
    await assert.rejects(client.chat.completions.create({ model: 'other', messages }), (e) => {
        assert.equal(e.status, 404);
        return true;
    });
});

test('behind modelmux-gateway: loading, then routed, streamed and renamed', async () => {
    // A second worker that takes a moment to load, so the gateway's health
    // checks see it "loading" first.
    const slow = await startWorker(dir, ['--max-model-len', '512'],
        { env: { MM_WORKER_TEST_LOAD_DELAY_MS: '1500' }, listeningOnly: true });
    let gw;
    try {
        gw = await startGateway({
            models: [{ name: 'public-tiny', backends: [{ url: slow.url, served_model: 'wcli-' + process.pid }],
                health: { path: '/health', interval_ms: 50, timeout_ms: 1000, rise: 1, fall: 1 },
                retries: 0 }],
        }, { admin: true });
        let sawLoading = false;
        let loadingStatus = null;
        for (let i = 0; i < 200; i++) {
            const h = (await gw.backend('public-tiny', slow.url)).health;
            if (h === 'loading' && !sawLoading) {
                sawLoading = true;
                loadingStatus = (await postJson(gw.port, '/v1/chat/completions',
                    { model: 'public-tiny', messages, max_tokens: 4 })).status;
            }
            if (h === 'up' && sawLoading) break;
            await sleep(20);
        }
        assert.ok(sawLoading, 'the gateway saw the worker loading');
        assert.equal(loadingStatus, 503, 'no answer while the only backend loads');
        await slow.ready();
        let r;
        for (let i = 0; i < 100; i++) {
            r = await postJson(gw.port, '/v1/chat/completions', { model: 'public-tiny', messages, max_tokens: 12, temperature: 0 });
            if (r.status === 200) break;
            await sleep(20);
        }
        assert.equal(r.status, 200, r.body);
        assert.equal(r.headers['x-modelmux-backend'], slow.url);
        const direct = await postJson(w.port, '/v1/chat/completions', { model: NAME, messages, max_tokens: 12, temperature: 0 });
        assert.equal(r.json().choices[0].message.content, direct.json().choices[0].message.content);
        assert.equal(r.json().model, 'wcli-' + process.pid, 'the worker answered under the served name');

        const s = await postJson(gw.port, '/v1/chat/completions', { model: 'public-tiny', messages, max_tokens: 12,
            temperature: 0, stream: true });
        assert.equal(s.status, 200);
        const ev = sseEvents(s.body);
        assert.equal(ev.at(-1), '[DONE]');
        const text = ev.slice(0, -1).map((c) => c.choices[0]?.delta?.content ?? '').join('');
        assert.equal(text, direct.json().choices[0].message.content);
        // The gateway counted the worker's tokens from its usage.
        const m = (await request(gw.port, { path: '/metrics' })).body;
        assert.match(m, /public-tiny/);
        // The openai client through the gateway.
        const gc = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 20000 });
        const c = await gc.completions.create({ model: 'public-tiny', prompt: 'Hello', max_tokens: 5, temperature: 0 });
        const d = await client.completions.create({ model: NAME, prompt: 'Hello', max_tokens: 5, temperature: 0 });
        assert.equal(c.choices[0].text, d.choices[0].text);
    } finally {
        await gw?.stop();
        const ex = await slow.stop();
        assert.equal(ex.code, 0);
    }
});
