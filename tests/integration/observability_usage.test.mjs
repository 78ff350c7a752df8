// Observability: token usage of streams. The gateway asks the upstream for
// stream_options.include_usage so it can count tokens, and strips the
// usage-only chunk again when the client did not ask for it; a client that
// asked gets it unchanged. Tokens are counted in every case, from the
// upstream's usage numbers. The upstream here (startMiniUpstream) behaves
// like OpenAI/vLLM: a usage chunk only when include_usage is true.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startMiniUpstream, startGateway, model, streamRequest, postJson, getMetrics, waitFor } from './lib.mjs';

let up, gw;

before(async () => {
    up = await startMiniUpstream({ name: 'u' });
    gw = await startGateway({
        threads: 2,
        models: [
            model('m', [{ url: up.url }]),
            model('renamed', [{ url: up.url, served_model: 'Real/Model-7B' }]),
        ],
    });
});

after(async () => {
    await gw?.stop();
    await up?.close();
});

async function tokens() {
    const p = await getMetrics(gw.port);
    return [p.value('modelmux_prompt_tokens_total'), p.value('modelmux_completion_tokens_total'), p.value('modelmux_requests_total')];
}

// Sends one stream and returns what the client and the upstream saw, and
// the token counters' increase (waiting for the request to be recorded).
async function stream(body, headers = {}, path = '/v1/chat/completions') {
    const before0 = await tokens();
    const n0 = up.received.length;
    const s = await streamRequest(gw.port, body, headers, { path });
    assert.equal(s.status, 200);
    assert.ok(s.ended, 'the stream ended cleanly');
    assert.equal(up.received.length, n0 + 1, 'one upstream request');
    const fwd = up.received[n0];
    let after0;
    await waitFor(async () => (after0 = await tokens())[2] === before0[2] + 1, 3000, { what: 'the request is recorded' });
    const data = s.events.map((e) => {
        assert.ok(e.startsWith('data: '), `an SSE data event: ${e}`);
        const d = e.slice(6);
        return d === '[DONE]' ? d : JSON.parse(d);
    });
    return { s, data, fwd, counted: [after0[0] - before0[0], after0[1] - before0[1]] };
}

const isUsageChunk = (d) => d !== '[DONE]' && Array.isArray(d.choices) && d.choices.length === 0;

function contentOnly(data, n) {
    assert.equal(data.at(-1), '[DONE]', 'ends with [DONE]');
    const chunks = data.slice(0, -1);
    assert.equal(chunks.length, n, `${n} content chunks, nothing else`);
    assert.deepEqual(chunks.map((c) => c.choices[0].delta.content), Array.from({ length: n }, (_, i) => `t${i} `));
    assert.ok(!data.some(isUsageChunk), 'no usage-only chunk');
    assert.ok(!chunks.some((c) => c.usage), 'no usage numbers anywhere');
}

test('a stream without stream_options: include_usage is asked upstream, the usage chunk stripped, tokens counted', async () => {
    const body = { model: 'm', stream: true, messages: [{ role: 'user', content: 'hi' }], temperature: 0.5 };
    const r = await stream(body, { 'x-mini-chunks': '4', 'x-mini-prompt-tokens': '9' });
    assert.deepEqual(r.fwd.json, { ...body, stream_options: { include_usage: true } }, `forwarded ${r.fwd.body}`);
    contentOnly(r.data, 4);
    assert.deepEqual(r.counted, [9, 4], 'prompt and completion tokens from the stripped chunk');
});

test('stream_options without include_usage, or with it false: the same, other options kept', async () => {
    for (const so of [{}, { include_usage: false }, { include_usage: false, continuous_usage_stats: false }]) {
        const body = { model: 'm', stream: true, messages: [], stream_options: so };
        const r = await stream(body, { 'x-mini-chunks': '2', 'x-mini-prompt-tokens': '5' });
        assert.deepEqual(r.fwd.json, { ...body, stream_options: { ...so, include_usage: true } }, `forwarded ${r.fwd.body}`);
        contentOnly(r.data, 2);
        assert.deepEqual(r.counted, [5, 2], `tokens with stream_options ${JSON.stringify(so)}`);
    }
});

test('a client that asked for usage gets the usage chunk, and the upstream gets its body unchanged', async () => {
    const text = '{"model":"m", "stream":true,"stream_options":{"include_usage":true},"messages":[]}';
    const before0 = up.received.length;
    const r = await stream(JSON.parse(text), { 'x-mini-chunks': '3', 'x-mini-prompt-tokens': '11' });
    assert.equal(up.received[before0].body, JSON.stringify(JSON.parse(text)), 'forwarded as sent');
    assert.equal(r.data.length, 5, '3 chunks, the usage chunk, [DONE]');
    const u = r.data[3];
    assert.ok(isUsageChunk(u), `usage chunk: ${JSON.stringify(u)}`);
    assert.deepEqual(u.usage, { prompt_tokens: 11, completion_tokens: 3, total_tokens: 14 });
    assert.ok(r.data.slice(0, 3).every((c) => c.usage === null && c.choices.length === 1), 'content chunks with "usage": null pass');
    assert.equal(r.data[4], '[DONE]');
    assert.deepEqual(r.counted, [11, 3]);
});

test('events cut in pieces by the upstream: the usage chunk is still found and stripped', async () => {
    const r = await stream({ model: 'm', stream: true, messages: [] }, { 'x-mini-chunks': '3', 'x-mini-dribble': '1', 'x-mini-prompt-tokens': '6' });
    contentOnly(r.data, 3);
    assert.deepEqual(r.counted, [6, 3]);
    const asked = await stream({ model: 'm', stream: true, messages: [], stream_options: { include_usage: true } },
        { 'x-mini-chunks': '3', 'x-mini-dribble': '1', 'x-mini-prompt-tokens': '6' });
    assert.equal(asked.data.filter(isUsageChunk).length, 1);
    assert.deepEqual(asked.counted, [6, 3]);
});

test('served_model rename and /v1/completions streams: usage asked, stripped and counted too', async () => {
    const body = { model: 'renamed', stream: true, messages: [] };
    const r = await stream(body, { 'x-mini-chunks': '2', 'x-mini-prompt-tokens': '4' });
    assert.deepEqual(r.fwd.json, { model: 'Real/Model-7B', stream: true, messages: [], stream_options: { include_usage: true } });
    contentOnly(r.data, 2);
    assert.deepEqual(r.counted, [4, 2]);

    const c = await stream({ model: 'm', stream: true, prompt: 'once upon' }, { 'x-mini-chunks': '3', 'x-mini-prompt-tokens': '2' }, '/v1/completions');
    assert.equal(c.fwd.path, '/v1/completions');
    assert.deepEqual(c.fwd.json.stream_options, { include_usage: true });
    contentOnly(c.data, 3);
    assert.deepEqual(c.counted, [2, 3]);
});

test('non-streaming answers: the body is forwarded unchanged and tokens come from the usage object', async () => {
    const before0 = await tokens();
    const text = '{"model":"m","messages":[{"role":"user","content":"hi"}]}';
    const n0 = up.received.length;
    const r = await postJson(gw.port, '/v1/chat/completions', JSON.parse(text), { 'x-mini-prompt-tokens': '12', 'x-mini-completion-tokens': '30' });
    assert.equal(r.status, 200);
    assert.equal(up.received[n0].body, text);
    assert.deepEqual(r.json().usage, { prompt_tokens: 12, completion_tokens: 30, total_tokens: 42 });
    let after0;
    await waitFor(async () => (after0 = await tokens())[2] === before0[2] + 1, 3000);
    assert.deepEqual([after0[0] - before0[0], after0[1] - before0[1]], [12, 30]);
});
