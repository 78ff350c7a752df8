// The official `openai` client (pinned in tests/package.json) against the
// gateway: what a real user's code sees.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
// Resolved from tests/node_modules (installed by deploy/deps.sh: npm ci).
import OpenAI from 'openai';
import { startFake, startGateway, model } from './lib.mjs';

let fa, fb, gw, client;

before(async () => {
    [fa, fb] = await Promise.all([startFake({ name: 'oa' }), startFake({ name: 'ob' })]);
    gw = await startGateway({
        threads: 2,
        models: [
            model('small', [{ url: fa.url }]),
            model('large', [{ url: fb.url, served_model: 'Large-Served' }]),
            { name: 'chat', split: [{ model: 'small', weight: 1 }, { model: 'large', weight: 1 }] },
        ],
    });
    client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'sk-client', maxRetries: 0, timeout: 10000 });
});

after(async () => {
    await gw?.stop();
    await Promise.all([fa, fb].map((f) => f?.kill()));
});

test('openai client: models.list() returns the configured names', async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    assert.deepEqual(ids.sort(), ['chat', 'large', 'small']);
});

test('openai client: chat.completions.create returns the backend\'s answer', async () => {
    const r = await client.chat.completions.create({
        model: 'small',
        messages: [{ role: 'user', content: 'hello' }],
    });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0].message.content, 'hello from oa');
    assert.equal(r.usage.total_tokens, 8);
    const l = await client.chat.completions.create({ model: 'large', messages: [{ role: 'user', content: 'x' }] });
    assert.equal(l.choices[0].message.content, 'hello from ob');
    assert.equal(l.model, 'Large-Served', 'the backend saw the served name');
});

test('openai client: withResponse exposes the gateway headers', async () => {
    const { data, response } = await client.chat.completions
        .create({ model: 'small', messages: [{ role: 'user', content: 'h' }] })
        .withResponse();
    assert.equal(data.choices[0].message.content, 'hello from oa');
    assert.equal(response.headers.get('x-modelmux-model'), 'small');
    assert.equal(response.headers.get('x-modelmux-backend'), fa.url);
    assert.ok(response.headers.get('x-request-id'));
});

test('openai client: streaming yields the chunks in order and ends', async () => {
    const stream = await client.chat.completions.create(
        { model: 'small', stream: true, messages: [{ role: 'user', content: 'count' }] },
        { headers: { 'x-fake-chunks': '6', 'x-fake-delay-ms': '10' } },
    );
    const parts = [];
    const finish = [];
    for await (const chunk of stream) {
        assert.equal(chunk.object, 'chat.completion.chunk');
        parts.push(chunk.choices[0].delta.content);
        finish.push(chunk.choices[0].finish_reason);
    }
    assert.deepEqual(parts, ['tok0 ', 'tok1 ', 'tok2 ', 'tok3 ', 'tok4 ', 'tok5 ']);
    assert.equal(finish[5], 'stop');
});

test('openai client: an unknown model raises NotFoundError with the gateway\'s message', async () => {
    await assert.rejects(
        client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] }),
        (e) => {
            assert.equal(e.status, 404);
            assert.ok(e instanceof OpenAI.NotFoundError, e.constructor.name);
            assert.match(e.message, /small/);
            return true;
        },
    );
});

test('openai client: a split model answers from one of its variants', async () => {
    const seen = new Set();
    for (let i = 0; i < 20; i++) {
        const r = await client.chat.completions.create({ model: 'chat', messages: [{ role: 'user', content: 'x' }] });
        seen.add(r.choices[0].message.content);
    }
    assert.deepEqual([...seen].sort(), ['hello from oa', 'hello from ob']);
});
