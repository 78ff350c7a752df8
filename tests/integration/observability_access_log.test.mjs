// Observability: the JSON access log. One line per request (builtin
// endpoints excluded), each a JSON object with the time, request id,
// client, requested model, the model and backend that served, status,
// bytes, latency, time to first token, tokens, retries, fallback and error
// kind, with the values the client saw.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import http from 'node:http';
import {
    startMiniUpstream, startFake, startGateway, model, postJson, streamRequest, request, waitFor, TMP,
} from './lib.mjs';

let up, bad, bad2, gw, logFile;
const t0 = Date.now();

before(async () => {
    up = await startMiniUpstream({ name: 'u' });
    [bad, bad2] = await Promise.all([startFake({ name: 'bad' }), startFake({ name: 'bad2' })]);
    fs.mkdirSync(TMP, { recursive: true });
    logFile = path.join(TMP, `access-${process.pid}.log`);
    fs.rmSync(logFile, { force: true });
    const noBreaker = { consecutive_failures: 0, min_requests: 1000000 };
    gw = await startGateway({
        threads: 2,
        access_log: logFile,
        models: [
            model('m', [{ url: up.url }]),
            model('fb-src', [{ url: bad.url }], { retries: 0, fallback: ['m'], breaker: noBreaker }),
            model('pair', [{ url: bad.url }, { url: bad2.url }], { retries: 1, breaker: noBreaker }),
            model('slow', [{ url: bad.url }], { retries: 0, timeouts: { first_byte_ms: 300 }, breaker: noBreaker }),
            model('mid', [{ url: bad.url }], { retries: 0, breaker: noBreaker }),
        ],
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([up?.close(), bad?.kill(), bad2?.kill()]);
    if (logFile) fs.rmSync(logFile, { force: true });
});

const readLines = () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8') : '')
    .split('\n').filter((l) => l !== '');

const KEYS = ['time', 'request_id', 'client', 'requested_model', 'model', 'backend', 'status', 'bytes',
    'latency_ms', 'ttft_ms', 'prompt_tokens', 'completion_tokens', 'retries', 'fallback', 'error'];

// A request whose body bytes are counted as received (after the chunked
// framing is removed); a client abort after abortMs.
function send(pathName, body, headers, abortMs) {
    return new Promise((resolve) => {
        const data = typeof body === 'string' ? body : JSON.stringify(body);
        const req = http.request({
            host: '127.0.0.1', port: gw.port, method: 'POST', path: pathName, agent: false,
            headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data), ...headers },
        }, (res) => {
            let bytes = 0;
            let text = '';
            res.on('data', (d) => { bytes += d.length; text += d; });
            res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, bytes, text }));
            res.on('error', () => resolve({ status: res.statusCode, aborted: true }));
        });
        req.on('error', () => resolve({ status: 0, aborted: true }));
        if (abortMs) setTimeout(() => req.destroy(), abortMs);
        req.end(data);
    });
}

const sent = [];   // {id, res, want}
const byId = new Map();   // request id -> its access log line, parsed
const chatBody = (m, extra = {}) => ({ model: m, messages: [{ role: 'user', content: 'hi' }], ...extra });

test('one JSON line per request with every field, matching what the client saw', async () => {
    const go = async (id, m, body, headers = {}, want = {}, abortMs = 0) => {
        const res = await send('/v1/chat/completions', body, { 'x-request-id': id, ...headers }, abortMs);
        sent.push({ id, res, want: { requested_model: m, ...want } });
        return res;
    };
    let r = await go('ok-json', 'm', chatBody('m'), {}, {
        model: 'm', backend: up.url, status: 200, prompt_tokens: 7, completion_tokens: 4, retries: 0, fallback: null, error: null,
    });
    assert.equal(r.status, 200);
    r = await go('ok-stream', 'm', chatBody('m', { stream: true }), { 'x-mini-chunks': '3' }, {
        model: 'm', backend: up.url, status: 200, prompt_tokens: 7, completion_tokens: 3, retries: 0, fallback: null, error: null,
    });
    assert.equal(r.status, 200);
    r = await go('ok-stream-usage', 'm', chatBody('m', { stream: true, stream_options: { include_usage: true } }), { 'x-mini-chunks': '2' }, {
        model: 'm', backend: up.url, status: 200, prompt_tokens: 7, completion_tokens: 2, retries: 0, fallback: null, error: null,
    });
    assert.equal(r.status, 200);
    assert.match(r.text, /"choices":\[\],"usage"/);
    r = await go('fallback', 'fb-src', chatBody('fb-src'), { 'x-fake-mode': 'status:500' }, {
        model: 'm', backend: up.url, status: 200, prompt_tokens: 7, completion_tokens: 4, retries: 1, fallback: 'm', error: null,
    });
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-modelmux-fallback'], 'm');
    r = await go('retried-5xx', 'pair', chatBody('pair'), { 'x-fake-mode': 'status:502' }, {
        model: 'pair', status: 502, prompt_tokens: null, completion_tokens: null, retries: 1, fallback: null, error: '5xx',
    });
    assert.equal(r.status, 502);
    sent.at(-1).want.backend = r.headers['x-modelmux-backend'];
    assert.ok([bad.url, bad2.url].includes(r.headers['x-modelmux-backend']));
    r = await go('timeout', 'slow', chatBody('slow'), { 'x-fake-mode': 'hang' }, {
        model: 'slow', backend: bad.url, status: 504, prompt_tokens: null, completion_tokens: null, retries: 0, fallback: null, error: 'timeout',
    });
    assert.equal(r.status, 504);
    r = await go('midstream', 'mid', chatBody('mid', { stream: true }), { 'x-fake-mode': 'midstream-close' }, {
        model: 'mid', backend: bad.url, status: 200, prompt_tokens: null, completion_tokens: null, retries: 0, fallback: null, error: 'midstream',
    });
    assert.equal(r.status, 200);
    assert.match(r.text, /"error"/, 'the stream ends with an SSE error event');
    r = await go('unknown', 'nope', chatBody('nope'), {}, {
        model: null, backend: null, status: 404, prompt_tokens: null, completion_tokens: null, retries: 0, fallback: null, error: 'client',
    });
    assert.equal(r.status, 404);
    r = await go('no-model', null, { messages: [] }, {}, {
        model: null, backend: null, prompt_tokens: null, completion_tokens: null, retries: 0, fallback: null, error: 'client',
    });
    assert.ok(r.status >= 400 && r.status < 500, `no model, no default pool: ${r.status}`);
    sent.at(-1).want.status = r.status;
    r = await go('abort', 'm', chatBody('m'), { 'x-mini-first-delay-ms': '3000' }, {
        model: 'm', backend: up.url, status: 0, ttft_ms: null, prompt_tokens: null, completion_tokens: null, retries: 0, fallback: null,
        error: 'client_abort', bytes: 0,
    }, 200);
    assert.ok(r.aborted);
    // Builtins are not logged.
    await request(gw.port, { method: 'GET', path: '/metrics' });
    await request(gw.port, { method: 'GET', path: '/health' });

    await waitFor(() => readLines().length >= sent.length, 5000, { what: `${sent.length} access log lines` });
    await new Promise((res) => setTimeout(res, 200));
    const lines = readLines();
    assert.equal(lines.length, sent.length, `one line per request:\n${lines.join('\n')}`);
    for (const l of lines) {
        const j = JSON.parse(l);   // each line is one JSON object
        for (const k of KEYS) assert.ok(Object.prototype.hasOwnProperty.call(j, k), `field ${k} in ${l}`);
        assert.ok(!byId.has(j.request_id), `request id ${j.request_id} once`);
        byId.set(j.request_id, j);
    }
    const problems = [];
    for (const { id, want } of sent) {
        const j = byId.get(id);
        assert.ok(j, `a line for ${id}`);
        for (const [k, v] of Object.entries(want)) {
            if (k === 'bytes' || (id === 'fallback' && k === 'error')) continue;   // tests of their own below
            if (j[k] !== v) problems.push(`${id}: ${k} is ${JSON.stringify(j[k])}, want ${JSON.stringify(v)}`);
        }
        const t = Date.parse(j.time);
        assert.match(j.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
        assert.ok(t >= t0 - 1000 && t <= Date.now() + 1000, `${id}: time ${j.time}`);
        assert.match(j.client, /^127\.0\.0\.1(:\d+)?$/, `${id}: client`);
        assert.equal(typeof j.latency_ms, 'number');
        assert.ok(j.latency_ms > 0 && j.latency_ms < 10000, `${id}: latency_ms ${j.latency_ms}`);
        if (j.ttft_ms !== null) assert.ok(j.ttft_ms > 0 && j.ttft_ms <= j.latency_ms, `${id}: ttft_ms ${j.ttft_ms} <= latency_ms ${j.latency_ms}`);
        assert.equal(typeof j.bytes, 'number');
    }
    assert.ok(byId.get('timeout').latency_ms >= 300, 'the timeout took first_byte_ms');
    assert.ok(byId.get('abort').latency_ms >= 150, 'the abort came after ~200 ms');
    assert.ok(byId.get('ok-json').ttft_ms !== null);
    assert.deepEqual(problems, [], `fields that differ from what the client saw:\n${problems.join('\n')}`);
});

// The log's "bytes" is the answer's body as the client received it: for a
// stream, after the gateway removed the usage chunk it had asked for and
// added its own error event; for the gateway's own error answers, their
// JSON body.
test('bytes: the body bytes the client received, for every kind of answer', () => {
    const problems = [];
    for (const { id, res, want } of sent) {
        const j = byId.get(id);
        const w = want.bytes !== undefined ? want.bytes : res.bytes;
        if (j.bytes !== w) problems.push(`${id}: bytes is ${j.bytes}, the client received ${w}`);
    }
    assert.deepEqual(problems, []);
});

// "error" says why a request failed; a request answered 200 by a fallback
// (or by a retry) did not fail: its failed attempt is counted in retries
// and in the backend's errors_total, not in the request's error field.
test('error: null for a request that succeeded after a failed attempt', () => {
    const j = byId.get('fallback');
    assert.equal(j.status, 200);
    assert.equal(j.retries, 1);
    assert.equal(j.fallback, 'm');
    assert.equal(j.error, null, `error of a request answered 200: ${JSON.stringify(j)}`);
});
