// How modelmux-worker loads a model's chat template and maps its failures
// to HTTP statuses: a Llama-3 style tokenizer_config.json (model_max_length
// beyond 64-bit integers), a template construct the engine lacks (500: the
// server's limitation) and a template's own raise_exception (400).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { checkErrorShape, makeModel, postJson, startWorker } from './lib.mjs';

// Llama-3's tokenizer_config.json has exactly this: int(1e30) as an integer.
const LLAMA3_MAX_LEN = '1000000000000000019884624838656';

const dirs = [];
const workers = {};

// A generated tiny model whose chat template and tokenizer_config.json the
// test rewrites before the worker starts.
function modelWith(name, { jinja, config } = {}) {
    const dir = makeModel(name);
    dirs.push(dir);
    if (jinja !== undefined) fs.writeFileSync(path.join(dir, 'chat_template.jinja'), jinja);
    if (config) {
        const file = path.join(dir, 'tokenizer_config.json');
        fs.writeFileSync(file, config(JSON.parse(fs.readFileSync(file, 'utf8'))));
    }
    return dir;
}

before(async () => {
    const specs = {
        // The file keeps its own template and adds a BOS token used by it,
        // so the test sees that the whole file was read, not just parsed.
        llama3: modelWith('wtpl-llama3', {
            config: (cfg) => {
                cfg.bos_token = '<|endoftext|>';
                cfg.chat_template = `{{ bos_token }}${cfg.chat_template}`;
                const text = JSON.stringify({ ...cfg, model_max_length: 0 }, null, 2);
                const out = text.replace('"model_max_length": 0', `"model_max_length": ${LLAMA3_MAX_LEN}`);
                assert.notEqual(out, text);
                return out;
            },
        }),
        // Compiles; slicing a range is a construct the engine lacks at run time.
        unsupported: modelWith('wtpl-unsup', {
            jinja: "{% for m in messages %}{{ m.content }}{% endfor %}{{ range(3)[1:] }}",
        }),
        // 'include' is refused when the template is compiled at load.
        include: modelWith('wtpl-include', {
            jinja: "{% for m in messages %}{{ m.content }}{% endfor %}\n{% include 'other.jinja' %}",
        }),
        raises: modelWith('wtpl-raise', {
            jinja: "{% for m in messages %}{% if m.role == 'system' %}"
                + "{{ raise_exception('System role not supported') }}{% endif %}"
                + "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        }),
    };
    await Promise.all(Object.entries(specs).map(async ([k, dir]) => {
        workers[k] = await startWorker(dir, ['--max-model-len', '256', '--max-num-seqs', '2']);
    }));
});

after(async () => {
    await Promise.all(Object.values(workers).map((w) => w.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

const post = (k, p, body) => postJson(workers[k].port, p, body);
const hi = [{ role: 'user', content: 'Hi' }];

test('a Llama-3 style tokenizer_config.json (model_max_length 1e30 as an integer) gives its chat template', async () => {
    const w = workers.llama3;
    assert.doesNotMatch(w.log(), /tokenizer_config\.json/, 'no warning about the file');
    const t = await post('llama3', '/tokenize', { messages: hi });
    assert.equal(t.status, 200, t.body);
    const text = (await post('llama3', '/detokenize', { tokens: t.json().tokens })).json().prompt;
    assert.equal(text, '<|endoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n');
    const r = await post('llama3', '/v1/chat/completions', { messages: hi, max_tokens: 2, temperature: 0 });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.json().usage.prompt_tokens, t.json().count);
});

test('a construct the template engine lacks is a 500 naming it', async () => {
    for (const p of ['/v1/chat/completions', '/tokenize']) {
        const e = checkErrorShape(assert, await post('unsupported', p, { messages: hi, max_tokens: 2 }), 500);
        assert.match(e.message, /unsupported construct \(line 1\): slicing a range/, e.message);
        assert.equal(e.param, null);
    }
    assert.match(workers.unsupported.log(), /slicing a range/, 'the operator sees it in the log');
    // Completions do not use the template.
    const c = await post('unsupported', '/v1/completions', { prompt: 'Hi', max_tokens: 1 });
    assert.equal(c.status, 200, c.body);
});

test('a template that does not compile (include): chat requests name the construct and line', async () => {
    assert.match(workers.include.log(), /the 'include' tag/);
    const r = await post('include', '/v1/chat/completions', { messages: hi, max_tokens: 2 });
    // The compile status does not reach the API yet (mm_api_runtime carries
    // only the message), so this stays a 400 for now; the message is what
    // matters to whoever reads it.
    const e = checkErrorShape(assert, r, 400);
    assert.match(e.message, /unsupported construct \(line 2\): the 'include' tag/, e.message);
});

test("raise_exception in the template is a 400 with the template's own message", async () => {
    const ok = await post('raises', '/tokenize', { messages: hi });
    assert.equal(ok.status, 200, ok.body);
    const msgs = [{ role: 'system', content: 'Be brief.' }, ...hi];
    for (const p of ['/v1/chat/completions', '/tokenize']) {
        const e = checkErrorShape(assert, await post('raises', p, { messages: msgs, max_tokens: 2 }), 400);
        assert.equal(e.message, 'System role not supported');
        assert.equal(e.param, 'messages');
    }
});
