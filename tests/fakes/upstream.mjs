#!/usr/bin/env node
// A fake OpenAI-compatible upstream for the gateway's integration tests.
// It echoes what it received (so a test can check what the gateway forwarded)
// and injects faults on request (so a test can check how the gateway copes).
//
//   node tests/fakes/upstream.mjs --port 0 --name up1 [--host 127.0.0.1]
//        [--mode normal|fail500|status:NNN|hang|close|reset|badlen|badchunk|garbage|
//                midstream-close|midstream-stall]
//        [--exit-on-stdin-eof]
//
// Prints one JSON line {"port":N,"name":...} on stdout once listening.
//
// Per-request controls (request headers; the runtime mode set through
// POST /_fake/mode, else the CLI --mode, applies to requests that carry no
// x-fake-mode):
//   x-fake-mode: normal | status:NNN | fail500 | hang | close | reset | badlen |
//                badchunk | garbage | midstream-close | midstream-stall
//       close: close the socket before any response byte (FIN); reset: the
//       same with a TCP RST; badlen: Content-Length 100 bytes longer than the
//       body, then close; badchunk: chunked framing with an invalid chunk
//       size, socket left open; garbage: a line that is not HTTP, socket left
//       open; midstream-close: a stream cut (FIN) after 2 chunks;
//       midstream-stall: a stream that stops after 2 chunks and never ends (a
//       non-streaming answer: headers and half the body, then nothing)
//   x-fake-retry-after: S     a Retry-After header on status:NNN answers
//   x-fake-chunks: N          streamed chunks (default 3)
//   x-fake-delay-ms: MS       delay between streamed chunks (default 0)
//   x-fake-first-delay-ms: MS delay before the first response byte (default 0)
//   x-fake-chunked-response: 1  a non-streaming answer framed chunked (no Content-Length)
// Control endpoints (not counted as requests):
//   GET /_fake/stats   counters, abort events, the last request
//   POST /_fake/reset  zero the counters (runtime mode and health stay)
//   POST /_fake/mode   {"mode": M, "count": N, "pattern": [M, ...],
//                       "retry_after": S, "first_delay_ms": D}
//       replaces the whole runtime setting (an empty object restores the CLI
//       mode). mode without count: every request; with count: the next N
//       requests, then the CLI mode. pattern: modes cycled request by request
//       (after any counted ones). retry_after, first_delay_ms: defaults for
//       requests without the matching x-fake-* header.
//   POST /_fake/health {"status": S, "count": N, "then": T, "delay_ms": D}
//       what GET /health answers: S for the next N checks (forever without
//       count), then T (default 200); each answer after D ms. {} restores 200.
//   GET /health        the status set above (200 {"status":"ok"} by default;
//                      503 says {"status":"loading"}); counted on arrival in
//                      health_checks, when answered in health_answers (per
//                      status) and health_log (the last 200: t_ms, t_ns, status)
//
// Timestamps: *_ms are Date.now(); *_ns are process.hrtime.bigint() as a
// decimal string. hrtime is CLOCK_MONOTONIC, shared by every process on the
// host, so a test can compare its own hrtime with the fake's to the
// microsecond without wall-clock jumps getting in the way.
import http from 'node:http';

function parseArgs(argv) {
    const o = { port: 0, host: '127.0.0.1', name: 'fake', mode: 'normal', parentStdin: false };
    for (let i = 2; i < argv.length; i++) {
        const a = argv[i];
        const v = argv[i + 1];
        if (a === '--port') { o.port = Number(v); i++; }
        else if (a === '--host') { o.host = v; i++; }
        else if (a === '--name') { o.name = v; i++; }
        else if (a === '--mode') { o.mode = v; i++; }
        else if (a === '--exit-on-stdin-eof') { o.parentStdin = true; }
        else { process.stderr.write(`upstream.mjs: unknown argument ${a}\n`); process.exit(2); }
    }
    if (!Number.isInteger(o.port) || o.port < 0 || o.port > 65535) {
        process.stderr.write('upstream.mjs: --port must be 0..65535\n');
        process.exit(2);
    }
    return o;
}

const opts = parseArgs(process.argv);
const MAX_BODY = 64 * 1024 * 1024;
const MAX_RECENT = 50;
const MAX_HEALTH_LOG = 200;

// Runtime fault settings (POST /_fake/mode, POST /_fake/health).
const ctl = {
    mode: null,           // replaces opts.mode while set
    count: 0,             // requests left in ctl.countedMode
    countedMode: null,
    pattern: null,
    patternPos: 0,
    retryAfter: null,
    firstDelayMs: 0,
};
const health = { status: 200, count: -1, then: 200, delayMs: 0 };

const stats = {
    name: opts.name,
    requests: 0,          // non-control requests received
    completed: 0,         // responses fully written
    aborted: 0,           // requests whose peer closed before the response finished
    self_closed: 0,       // requests the fake cut on purpose (close, badlen, midstream-close)
    inflight: 0,
    connections: 0,       // TCP connections accepted (upstream keep-alive shows here)
    request_connections: 0, // connections that carried at least one counted request
    control_connections: 0, // connections that carried a /_fake/ request (a test's own)
    health_checks: 0,
    health_answers: {},   // status -> number of health checks so answered
    health_log: [],       // the last MAX_HEALTH_LOG checks {t_ms, t_ns, status}
    mode_answers: {},     // mode -> requests answered in that mode
    aborts: [],           // {seq, path, t_ms, t_ns, chunks_sent}
    last: null,           // echo of the last request
    recent: [],           // echoes of the last MAX_RECENT requests
};

function nowNs() { return process.hrtime.bigint().toString(); }

function intHeader(req, name, dflt, min, max) {
    const v = req.headers[name];
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) return dflt;
    return n;
}

// The request's fault mode, decided once when its body has arrived: the
// x-fake-mode header, else a counted runtime mode, else the runtime pattern,
// else the runtime mode, else the CLI mode. Counted and pattern modes are
// consumed only by requests without the header.
function pickMode(req) {
    let m = req.headers['x-fake-mode'];
    if (!m && ctl.count > 0) {
        ctl.count--;
        m = ctl.countedMode;
    }
    if (!m && ctl.pattern && ctl.pattern.length) {
        m = ctl.pattern[ctl.patternPos % ctl.pattern.length];
        ctl.patternPos++;
    }
    if (!m) m = ctl.mode || opts.mode || 'normal';
    return m === 'fail500' ? 'status:500' : m;
}

function sendJson(res, status, obj, extraHeaders = {}) {
    const body = Buffer.from(JSON.stringify(obj));
    res.writeHead(status, {
        'content-type': 'application/json',
        'content-length': body.length,
        'x-fake-name': opts.name,
        ...extraHeaders,
    });
    res.end(body);
}

function modelOf(bodyText) {
    try {
        const j = JSON.parse(bodyText);
        if (j && typeof j.model === 'string') return { model: j.model, json: j };
        return { model: null, json: j };
    } catch {
        return { model: null, json: null };
    }
}

function completionFor(echo, model) {
    const content = `hello from ${opts.name}`;
    if (echo.path.split('?')[0].endsWith('/embeddings')) {
        return {
            object: 'list',
            data: [{ object: 'embedding', index: 0, embedding: [0.25, -0.5, 1] }],
            model: model || opts.name,
            usage: { prompt_tokens: 3, total_tokens: 3 },
            fake: echo,
        };
    }
    return {
        id: `chatcmpl-${opts.name}-${echo.seq}`,
        object: 'chat.completion',
        created: Math.floor(Date.now() / 1000),
        model: model || opts.name,
        choices: [{
            index: 0,
            message: { role: 'assistant', content },
            logprobs: null,
            finish_reason: 'stop',
        }],
        usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 },
        fake: echo,
    };
}

function stream(req, res, echo, model, state) {
    const n = intHeader(req, 'x-fake-chunks', 3, 0, 100000);
    const delay = intHeader(req, 'x-fake-delay-ms', 0, 0, 600000);
    const closeAfter = state.mode === 'midstream-close' ? Math.min(2, n) : -1;
    const stallAfter = state.mode === 'midstream-stall' ? Math.min(2, n) : -1;
    const id = `chatcmpl-${opts.name}-${echo.seq}`;
    const created = Math.floor(Date.now() / 1000);
    res.writeHead(200, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        'x-fake-name': opts.name,
    });
    let i = 0;
    const next = () => {
        state.timer = null;
        if (state.closed) return;
        if (i === closeAfter) {
            state.selfClosed = true;
            res.socket.destroy();
            return;
        }
        if (i === stallAfter) return;   // never another byte; the socket stays open
        if (i >= n) {
            res.end('data: [DONE]\n\n');
            return;
        }
        const chunk = {
            id,
            object: 'chat.completion.chunk',
            created,
            model: model || opts.name,
            choices: [{
                index: 0,
                delta: i === 0 ? { role: 'assistant', content: `tok${i} ` } : { content: `tok${i} ` },
                logprobs: null,
                finish_reason: i === n - 1 ? 'stop' : null,
            }],
            fake: { name: opts.name, seq: echo.seq, index: i, sent_ms: Date.now(), sent_ns: nowNs() },
        };
        res.write(`data: ${JSON.stringify(chunk)}\n\n`);
        state.chunksSent = ++i;
        state.timer = setTimeout(next, i >= n ? 0 : delay);
    };
    next();
}

function answer(req, res, echo, state) {
    const mode = state.mode;
    const { model, json } = modelOf(echo.body);
    if (mode === 'hang') return;   // keep the socket open, never answer
    if (mode === 'close') {
        state.selfClosed = true;
        req.socket.destroy();
        return;
    }
    if (mode === 'reset') {
        state.selfClosed = true;
        req.socket.resetAndDestroy();
        return;
    }
    if (mode === 'badchunk') {
        // A chunk size that is not hex: broken framing, not a short body.
        // The socket stays open so only the framing can give it away.
        state.selfClosed = true;
        req.socket.write('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n' +
            'transfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\nzz\r\n1}\r\n0\r\n\r\n');
        return;
    }
    if (mode === 'garbage') {
        state.selfClosed = true;
        req.socket.write('this is not HTTP at all\r\n\r\n');
        return;
    }
    if (mode === 'midstream-stall' && !(req.method === 'POST' && json && json.stream === true)) {
        const body = JSON.stringify(completionFor(echo, model));
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-fake-name': opts.name });
        res.write(body.slice(0, body.length >> 1));
        return;   // the rest never comes
    }
    if (mode === 'badlen') {
        // Raw bytes: http.ServerResponse would refuse to lie about the length.
        const body = JSON.stringify(completionFor(echo, model));
        const head = 'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n' +
            `content-length: ${Buffer.byteLength(body) + 100}\r\n\r\n`;
        state.selfClosed = true;
        req.socket.write(head + body, () => req.socket.destroy());
        return;
    }
    const sm = /^status:(\d{3})$/.exec(mode);
    if (sm) {
        const status = Number(sm[1]);
        const ra = req.headers['x-fake-retry-after'] ?? ctl.retryAfter;
        sendJson(res, status, {
            error: { message: `fake ${opts.name} failure ${status}`, type: status >= 500 ? 'server_error' : 'invalid_request_error', param: null, code: status },
            fake: echo,
        }, ra !== null && ra !== undefined ? { 'retry-after': String(ra) } : {});
        return;
    }
    if (req.method === 'POST' && json && json.stream === true) {
        stream(req, res, echo, model, state);
        return;
    }
    if (req.headers['x-fake-chunked-response']) {
        // No Content-Length: Node frames it chunked; two writes, two chunks.
        const body = JSON.stringify(completionFor(echo, model));
        res.writeHead(200, { 'content-type': 'application/json', 'x-fake-name': opts.name });
        const half = body.length >> 1;
        res.write(body.slice(0, half));
        res.end(body.slice(half));
        return;
    }
    sendJson(res, 200, completionFor(echo, model));
}

// Reads a small JSON control body; fn(obj) returns an error string or null.
function readJson(req, res, fn) {
    const parts = [];
    let size = 0;
    req.on('data', (d) => {
        size += d.length;
        if (size <= 65536) parts.push(d);
    });
    req.on('end', () => {
        let obj;
        try {
            obj = size ? JSON.parse(Buffer.concat(parts).toString('utf8')) : {};
        } catch (e) {
            sendJson(res, 400, { error: `bad JSON: ${e.message}` });
            return;
        }
        const err = size > 65536 ? 'body too large' : fn(obj || {});
        if (err) sendJson(res, 400, { error: err });
        else sendJson(res, 200, { ok: true });
    });
}

const isCount = (v) => Number.isInteger(v) && v >= 0;
const isStatus = (v) => Number.isInteger(v) && v >= 100 && v <= 599;

function setMode(o) {
    if (o.mode !== undefined && typeof o.mode !== 'string') return 'mode: a string';
    if (o.count !== undefined && !isCount(o.count)) return 'count: an integer >= 0';
    if (o.pattern !== undefined && !(Array.isArray(o.pattern) && o.pattern.every((m) => typeof m === 'string'))) return 'pattern: an array of strings';
    if (o.first_delay_ms !== undefined && !(isCount(o.first_delay_ms) && o.first_delay_ms <= 600000)) return 'first_delay_ms: 0..600000';
    Object.assign(ctl, { mode: null, count: 0, countedMode: null, pattern: null, patternPos: 0, retryAfter: null, firstDelayMs: 0 });
    if (o.mode !== undefined && o.count !== undefined) {
        ctl.countedMode = o.mode;
        ctl.count = o.count;
    } else if (o.mode !== undefined) {
        ctl.mode = o.mode;
    }
    if (o.pattern) ctl.pattern = o.pattern.slice();
    if (o.retry_after !== undefined && o.retry_after !== null) ctl.retryAfter = String(o.retry_after);
    if (o.first_delay_ms !== undefined) ctl.firstDelayMs = o.first_delay_ms;
    return null;
}

function setHealth(o) {
    const st = o.status === undefined ? 200 : o.status;
    const then = o.then === undefined ? 200 : o.then;
    if (!isStatus(st)) return 'status: 100..599';
    if (!isStatus(then)) return 'then: 100..599';
    if (o.count !== undefined && !isCount(o.count)) return 'count: an integer >= 0';
    if (o.delay_ms !== undefined && !(isCount(o.delay_ms) && o.delay_ms <= 600000)) return 'delay_ms: 0..600000';
    Object.assign(health, { status: st, count: o.count === undefined ? -1 : o.count, then, delayMs: o.delay_ms || 0 });
    return null;
}

function answerHealth(res) {
    stats.health_checks++;
    let status = health.status;
    if (health.count === 0) status = health.then;
    else if (health.count > 0) health.count--;
    const send = () => {
        // health_checks counts arrivals; these count answers, so a check the
        // gateway gave up on (timeout) is in neither.
        stats.health_answers[status] = (stats.health_answers[status] || 0) + 1;
        stats.health_log.push({ t_ms: Date.now(), t_ns: nowNs(), status });
        if (stats.health_log.length > MAX_HEALTH_LOG) stats.health_log.shift();
        const word = status >= 200 && status < 300 ? 'ok' : status === 503 ? 'loading' : 'error';
        sendJson(res, status, { status: word, name: opts.name });
    };
    if (health.delayMs > 0) {
        const t = setTimeout(() => { if (!res.destroyed) send(); }, health.delayMs);
        res.on('close', () => clearTimeout(t));
    } else {
        send();
    }
}

let seq = 0;
const countedSockets = new WeakSet();
const controlSockets = new WeakSet();

const server = http.createServer((req, res) => {
    const url = req.url;
    if (url.startsWith('/_fake/') && !controlSockets.has(req.socket)) {
        // So a test can tell the connections of the system under test
        // (connections - control_connections) from its own.
        controlSockets.add(req.socket);
        stats.control_connections++;
    }
    if (req.method === 'GET' && url === '/health') {
        req.resume();
        answerHealth(res);
        return;
    }
    if (url === '/_fake/mode' && req.method === 'POST') {
        readJson(req, res, setMode);
        return;
    }
    if (url === '/_fake/health' && req.method === 'POST') {
        readJson(req, res, setHealth);
        return;
    }
    if (url === '/_fake/stats' && req.method === 'GET') {
        req.resume();
        sendJson(res, 200, stats);
        return;
    }
    if (url === '/_fake/reset' && req.method === 'POST') {
        req.resume();
        Object.assign(stats, {
            requests: 0, completed: 0, aborted: 0, self_closed: 0, aborts: [], last: null, recent: [],
            request_connections: 0,
            health_checks: 0, health_answers: {}, health_log: [], mode_answers: {},
        });
        sendJson(res, 200, { ok: true });
        return;
    }

    const state = { closed: false, timer: null, chunksSent: 0, seq: ++seq };
    if (!countedSockets.has(req.socket)) {
        // Control requests (a test's own stats calls) open connections too;
        // this counts only those the system under test used.
        countedSockets.add(req.socket);
        stats.request_connections++;
    }
    stats.requests++;
    stats.inflight++;
    const recv = { t_ms: Date.now(), t_ns: nowNs() };
    let finished = false;
    const onGone = () => {
        if (state.closed) return;
        state.closed = true;
        stats.inflight--;
        if (state.timer) clearTimeout(state.timer);
        if (finished || res.writableFinished) {
            stats.completed++;
            return;
        }
        if (state.selfClosed) {
            stats.self_closed++;
            return;
        }
        stats.aborted++;
        stats.aborts.push({ seq: state.seq, path: url, t_ms: Date.now(), t_ns: nowNs(), chunks_sent: state.chunksSent });
    };
    res.on('finish', () => { finished = true; });
    res.on('close', onGone);
    req.on('aborted', onGone);

    const parts = [];
    let size = 0;
    req.on('data', (d) => {
        size += d.length;
        if (size > MAX_BODY) {
            req.socket.destroy();
            return;
        }
        parts.push(d);
    });
    req.on('end', () => {
        const echo = {
            name: opts.name,
            seq: state.seq,
            method: req.method,
            path: url,
            http_version: req.httpVersion,
            headers: req.headers,
            raw_headers: req.rawHeaders,
            body: Buffer.concat(parts).toString('utf8'),
            recv_ms: recv.t_ms,
            recv_ns: recv.t_ns,
        };
        state.mode = pickMode(req);
        stats.mode_answers[state.mode] = (stats.mode_answers[state.mode] || 0) + 1;
        stats.last = echo;
        stats.recent.push(echo);
        if (stats.recent.length > MAX_RECENT) stats.recent.shift();
        const firstDelay = intHeader(req, 'x-fake-first-delay-ms', ctl.firstDelayMs, 0, 600000);
        if (firstDelay > 0) {
            state.timer = setTimeout(() => { state.timer = null; if (!state.closed) answer(req, res, echo, state); }, firstDelay);
        } else {
            answer(req, res, echo, state);
        }
    });
});

server.on('connection', () => { stats.connections++; });
// Tests hold hanging requests open on purpose; Node's own request timeout
// must not answer them behind the test's back.
server.requestTimeout = 0;
server.headersTimeout = 60000;
server.keepAliveTimeout = 30000;

server.listen(opts.port, opts.host, () => {
    process.stdout.write(JSON.stringify({ port: server.address().port, name: opts.name }) + '\n');
});

for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => process.exit(0));
}
// With --exit-on-stdin-eof the harness holds our stdin: if it dies without
// killing us, the pipe closes and we go too, so no fake outlives a crashed
// test run.
if (opts.parentStdin) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
}
