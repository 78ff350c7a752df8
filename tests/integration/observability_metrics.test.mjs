// Observability: GET /metrics is strict Prometheus text (format 0.0.4),
// with the documented families, types, labels and LLM-sized histogram
// buckets, and its counts equal the traffic sent: requests, responses by
// status class, errors by kind, tokens, and histogram counts. The parser
// (parsePrometheus in lib.mjs) is itself checked to refuse malformed text,
// so "it parses" means something.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import {
    startMiniUpstream, startFake, startGateway, chat, model, streamRequest, waitFor, parsePrometheus,
    getMetrics, request,
} from './lib.mjs';

let upA, upB, bad, gw;
const series = new Map();   // "model\tvariant\tbackend" -> expected counts

function exp(m, v, b) {
    const k = [m, v, b].join('\t');
    if (!series.has(k)) {
        series.set(k, { requests: 0, responses: {}, errors: {}, prompt: 0, completion: 0, ttft: 0, itl: 0 });
    }
    return series.get(k);
}
function finished(m, res, o = {}) {
    const v = o.variant ?? res.headers['x-modelmux-model'] ?? '';
    const b = o.backend ?? res.headers['x-modelmux-backend'] ?? '';
    const e = exp(m, v, b);
    e.requests++;
    const cls = `${String(res.status)[0]}xx`;
    e.responses[cls] = (e.responses[cls] || 0) + 1;
    e.ttft++;
    if (o.err) e.errors[o.err] = (e.errors[o.err] || 0) + 1;
    if (o.tokens) { e.prompt += o.tokens[0]; e.completion += o.tokens[1]; }
    if (o.itl) e.itl += o.itl;
}

before(async () => {
    [upA, upB] = await Promise.all([startMiniUpstream({ name: 'a' }), startMiniUpstream({ name: 'b' })]);
    bad = await startFake({ name: 'bad' });
    gw = await startGateway({
        threads: 2,
        models: [
            model('m-a', [{ url: upA.url }]),
            model('m-b', [{ url: upB.url }]),
            { name: 'chat', split: [{ model: 'm-a', weight: 1 }, { model: 'm-b', weight: 1 }] },
            model('slow', [{ url: upB.url }]),
            model('f-5xx', [{ url: bad.url }], { retries: 0 }),
        ],
    });
});

after(async () => {
    await gw?.stop();
    await Promise.all([upA?.close(), upB?.close(), bad?.kill()]);
});

const BOUNDS = ['0.001', '0.0025', '0.005', '0.01', '0.025', '0.05', '0.1', '0.25', '0.5', '1', '2.5', '5', '10',
    '30', '60', '120', '300', '+Inf'];

test('the parser is strict: malformed exposition text is refused', () => {
    const ok = '# HELP x_total A counter.\n# TYPE x_total counter\nx_total{a="1"} 3\n'
        + '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n';
    const p = parsePrometheus(ok);
    assert.equal(p.value('x_total', { a: '1' }), 3);
    assert.equal(p.families.get('h').type, 'histogram');
    const bad1 = [
        ['no final newline', ok.slice(0, -1), /newline/],
        ['empty line', ok.replace('\n# TYPE h', '\n\n# TYPE h'), /empty line/],
        ['sample without TYPE', 'y 1\n', /no TYPE/],
        ['second TYPE', '# TYPE y gauge\n# TYPE y gauge\ny 1\n', /second TYPE/],
        ['second HELP', '# HELP y a\n# HELP y b\n# TYPE y gauge\ny 1\n', /second HELP/],
        ['bad type', '# TYPE y meter\ny 1\n', /unknown type/],
        ['bad metric name', '# TYPE 1y gauge\n', /bad metric name/],
        ['bad value', '# TYPE y gauge\ny one\n', /bad value/],
        ['no value', '# TYPE y gauge\ny{a="b"}\n', /no blank before the value/],
        ['bad label name', '# TYPE y gauge\ny{1a="x"} 1\n', /bad label name/],
        ['unquoted label', '# TYPE y gauge\ny{a=x} 1\n', /expected ="/],
        ['bad escape', '# TYPE y gauge\ny{a="\\t"} 1\n', /bad escape/],
        ['unterminated label', '# TYPE y gauge\ny{a="x} 1\n', /unterminated|expected , or \}/],
        ['duplicate label', '# TYPE y gauge\ny{a="x",a="y"} 1\n', /label a twice/],
        ['duplicate series', '# TYPE y gauge\ny{a="x"} 1\ny{a="x"} 2\n', /duplicate series/],
        ['not contiguous', '# TYPE y gauge\ny 1\n# TYPE z gauge\nz 1\ny{a="b"} 2\n', /not contiguous/],
        ['decreasing buckets', '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /decreases/],
        ['bounds out of order', '# TYPE h histogram\nh_bucket{le="2"} 1\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /not increasing/],
        ['no +Inf bucket', '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', /no \+Inf bucket/],
        ['count != +Inf', '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n', /_count 3 != \+Inf bucket 2/],
        ['no _sum', '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_count 2\n', /lacks _sum or _count/],
        ['le on _count', '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count{le="1"} 2\n', /"le" belongs/],
        ['bucket without le', '# TYPE h histogram\nh_bucket 2\nh_sum 1\nh_count 2\n', /"le" belongs/],
    ];
    for (const [what, text, why] of bad1) assert.throws(() => parsePrometheus(text), why, what);
});

test('/metrics: strict Prometheus text whose counts equal the traffic sent', async () => {
    // A 1:1 split, JSON and streams (with and without include_usage).
    for (let i = 0; i < 20; i++) {
        if (i % 2 === 0) {
            const r = await chat(gw.port, 'chat');
            assert.equal(r.status, 200, r.body);
            finished('chat', r, { tokens: [7, 4] });
        } else {
            const body = { model: 'chat', stream: true, messages: [] };
            if (i % 4 === 1) body.stream_options = { include_usage: true };
            const s = await streamRequest(gw.port, body, { 'x-mini-chunks': '4' });
            assert.equal(s.status, 200);
            assert.ok(s.ended);
            finished('chat', s, { tokens: [7, 4], itl: s.events.length - 1 });
        }
    }
    // Two answers that take 300 ms to start.
    for (let i = 0; i < 2; i++) {
        const r = await chat(gw.port, 'slow', { 'x-mini-first-delay-ms': '300' });
        assert.equal(r.status, 200);
        finished('slow', r, { tokens: [7, 4] });
    }
    let r = await chat(gw.port, 'f-5xx', { 'x-fake-mode': 'status:503' });
    assert.equal(r.status, 503);
    finished('f-5xx', r, { err: '5xx', variant: 'f-5xx', backend: bad.url });
    r = await chat(gw.port, 'nope');
    assert.equal(r.status, 404);
    finished('nope', r, { err: 'client', variant: '', backend: '' });
    const ab = await streamRequest(gw.port, { model: 'm-a', stream: true, messages: [] },
        { 'x-mini-chunks': '5', 'x-mini-delay-ms': '2000' }, { onEvent: (_e, _o, req) => req.destroy() });
    assert.equal(ab.status, 200);
    finished('m-a', ab, { err: 'client_abort' });

    const total = [...series.values()].reduce((a, e) => a + e.requests, 0);
    // The record is written when the request ends, which for the abort is
    // when the gateway notices: wait for it.
    await waitFor(async () => (await getMetrics(gw.port)).value('modelmux_requests_total') === total, 5000,
        { what: `requests_total reaches ${total}` });
    const res = await request(gw.port, { method: 'GET', path: '/metrics' });
    assert.equal(res.status, 200);
    assert.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/);
    const p = parsePrometheus(res.body);

    // Families, types and HELP.
    const want = {
        modelmux_requests_total: 'counter', modelmux_responses_total: 'counter', modelmux_errors_total: 'counter',
        modelmux_retries_total: 'counter', modelmux_fallbacks_total: 'counter',
        modelmux_prompt_tokens_total: 'counter', modelmux_completion_tokens_total: 'counter',
        modelmux_request_duration_seconds: 'histogram', modelmux_time_to_first_token_seconds: 'histogram',
        modelmux_inter_token_seconds: 'histogram', modelmux_metrics_dropped_total: 'counter',
        modelmux_redis_connected: 'gauge', modelmux_redis_flushes_total: 'counter',
        modelmux_redis_failed_flushes_total: 'counter', modelmux_redis_reconnects_total: 'counter',
    };
    assert.deepEqual(Object.fromEntries([...p.families.values()].map((f) => [f.name, f.type])), want);
    for (const f of p.families.values()) {
        assert.ok(f.help && f.help.length > 10, `HELP of ${f.name}`);
        for (const s of f.samples) {
            assert.ok(Number.isFinite(s.value) && s.value >= 0, `${s.name} value ${s.value}`);
            if (f.type === 'counter' || s.name.endsWith('_bucket') || s.name.endsWith('_count')) {
                assert.ok(Number.isInteger(s.value), `${s.name} is an integer: ${s.value}`);
            }
        }
    }

    // Labels.
    const base = ['backend', 'model', 'variant'];
    const keys = (s) => Object.keys(s.labels).sort();
    for (const n of ['modelmux_requests_total', 'modelmux_retries_total', 'modelmux_fallbacks_total',
        'modelmux_prompt_tokens_total', 'modelmux_completion_tokens_total']) {
        for (const s of p.samples(n)) assert.deepEqual(keys(s), base, n);
    }
    for (const s of p.samples('modelmux_responses_total')) {
        assert.deepEqual(keys(s), [...base, 'status'].sort());
        assert.match(s.labels.status, /^(none|[1-5]xx)$/);
    }
    for (const s of p.samples('modelmux_errors_total')) {
        assert.deepEqual(keys(s), [...base, 'kind'].sort());
        assert.match(s.labels.kind, /^(connect|timeout|5xx|429|breaker_open|client_abort|midstream|client)$/);
    }
    for (const h of ['modelmux_request_duration_seconds', 'modelmux_time_to_first_token_seconds', 'modelmux_inter_token_seconds']) {
        const byLabels = new Map();
        for (const s of p.samples(`${h}_bucket`)) {
            const k = JSON.stringify([s.labels.model, s.labels.variant, s.labels.backend]);
            if (!byLabels.has(k)) byLabels.set(k, []);
            byLabels.get(k).push(s.labels.le);
        }
        assert.ok(byLabels.size > 0, `${h} has series`);
        for (const [k, les] of byLabels) assert.deepEqual(les, BOUNDS, `${h}${k} buckets`);
    }
    assert.equal(p.value('modelmux_redis_connected'), 0, 'no Redis configured');
    assert.equal(p.value('modelmux_redis_flushes_total'), 0);
    assert.equal(p.value('modelmux_metrics_dropped_total'), 0);

    // Counts, series by series, and no series that was not sent.
    const seen = new Set(p.samples('modelmux_requests_total').map((s) => [s.labels.model, s.labels.variant, s.labels.backend].join('\t')));
    assert.deepEqual([...seen].sort(), [...series.keys()].sort(), 'the series are the ones the traffic made');
    for (const [k, e] of series) {
        const [model_, variant, backend] = k.split('\t');
        const l = { model: model_, variant, backend };
        const at = JSON.stringify(l);
        assert.equal(p.value('modelmux_requests_total', l), e.requests, `requests ${at}`);
        for (const cls of ['none', '1xx', '2xx', '3xx', '4xx', '5xx']) {
            assert.equal(p.value('modelmux_responses_total', { ...l, status: cls }), e.responses[cls] || 0, `responses ${cls} ${at}`);
        }
        for (const kind of ['connect', 'timeout', '5xx', '429', 'breaker_open', 'client_abort', 'midstream', 'client']) {
            assert.equal(p.value('modelmux_errors_total', { ...l, kind }), e.errors[kind] || 0, `errors ${kind} ${at}`);
        }
        assert.equal(p.value('modelmux_retries_total', l), 0, `retries ${at}`);
        assert.equal(p.value('modelmux_fallbacks_total', l), 0, `fallbacks ${at}`);
        assert.equal(p.value('modelmux_prompt_tokens_total', l), e.prompt, `prompt tokens ${at}`);
        assert.equal(p.value('modelmux_completion_tokens_total', l), e.completion, `completion tokens ${at}`);
        assert.equal(p.value('modelmux_request_duration_seconds_count', l), e.requests, `latency count ${at}`);
        assert.equal(p.value('modelmux_time_to_first_token_seconds_count', l), e.ttft, `ttft count ${at}`);
        assert.equal(p.value('modelmux_inter_token_seconds_count', l), e.itl, `itl count ${at}`);
    }
    const chatReq = p.value('modelmux_requests_total', { model: 'chat' });
    assert.equal(chatReq, 20);
    assert.ok(p.value('modelmux_requests_total', { model: 'chat', variant: 'm-a' }) > 0, 'the split used m-a');
    assert.ok(p.value('modelmux_requests_total', { model: 'chat', variant: 'm-b' }) > 0, 'the split used m-b');

    // Seconds, in the right buckets: the two 300 ms answers.
    const slow = { model: 'slow', variant: 'slow', backend: upB.url };
    for (const h of ['modelmux_request_duration_seconds', 'modelmux_time_to_first_token_seconds']) {
        assert.equal(p.value(`${h}_bucket`, { ...slow, le: '0.25' }), 0, `${h}: none under 250 ms`);
        assert.equal(p.value(`${h}_bucket`, { ...slow, le: '5' }), 2, `${h}: both under 5 s`);
        const sum = p.value(`${h}_sum`, slow);
        assert.ok(sum >= 0.6 && sum < 10, `${h}_sum ${sum} s`);
    }
    // Fast answers (no delay upstream) are in the low buckets.
    const fast = p.value('modelmux_request_duration_seconds_bucket', { model: 'chat', le: '2.5' });
    assert.equal(fast, 20);
});

test('builtin endpoints are not counted, and counters only grow', async () => {
    const a = await getMetrics(gw.port);
    await request(gw.port, { method: 'GET', path: '/health' });
    await request(gw.port, { method: 'GET', path: '/v1/models' });
    const b = await getMetrics(gw.port);
    assert.equal(b.value('modelmux_requests_total'), a.value('modelmux_requests_total'));
    const r = await chat(gw.port, 'm-b');
    assert.equal(r.status, 200);
    const c = await getMetrics(gw.port);
    assert.equal(c.value('modelmux_requests_total') - b.value('modelmux_requests_total'), 1);
    for (const f of b.families.values()) {
        if (f.type !== 'counter') continue;
        for (const s of f.samples) {
            const now = c.samples(s.name, s.labels).find((x) => JSON.stringify(x.labels) === JSON.stringify(s.labels));
            assert.ok(now && now.value >= s.value, `${s.name}${JSON.stringify(s.labels)} did not go down`);
        }
    }
});
