#!/usr/bin/env node
// A fake OpenAI-compatible upstream for the gateway's integration tests.
// It echoes what it received (so a test can check what the gateway forwarded)
// and injects faults on request (so a test can check how the gateway copes).
//
//   node tests/fakes/upstream.mjs --port 0 --name up1 [--host 127.0.0.1]
//        [--mode normal|fail500|status:NNN|hang|close|badlen|midstream-close]
//        [--exit-on-stdin-eof]
//
// Prints one JSON line {"port":N,"name":...} on stdout once listening.
//
// Per-request controls (request headers; the CLI --mode applies to requests
// that carry no x-fake-mode):
//   x-fake-mode: normal | status:NNN | fail500 | hang | close | badlen | midstream-close
//   x-fake-chunks: N          streamed chunks (default 3)
//   x-fake-delay-ms: MS       delay between streamed chunks (default 0)
//   x-fake-first-delay-ms: MS delay before the first response byte (default 0)
//   x-fake-chunked-response: 1  a non-streaming answer framed chunked (no Content-Length)
// Control endpoints (not counted as requests):
//   GET /_fake/stats   counters, abort events, the last request
//   POST /_fake/reset  zero the counters
//   GET /health        200 {"status":"ok"}
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

const stats = {
    name: opts.name,
    requests: 0,          // non-control requests received
    completed: 0,         // responses fully written
    aborted: 0,           // requests whose peer closed before the response finished
    self_closed: 0,       // requests the fake cut on purpose (close, badlen, midstream-close)
    inflight: 0,
    connections: 0,       // TCP connections accepted (upstream keep-alive shows here)
    health_checks: 0,
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

function modeOf(req) {
    const m = req.headers['x-fake-mode'] || opts.mode || 'normal';
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
    const closeAfter = modeOf(req) === 'midstream-close' ? Math.min(2, n) : -1;
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
    const mode = modeOf(req);
    const { model, json } = modelOf(echo.body);
    if (mode === 'hang') return;   // keep the socket open, never answer
    if (mode === 'close') {
        state.selfClosed = true;
        req.socket.destroy();
        return;
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
        sendJson(res, status, {
            error: { message: `fake ${opts.name} failure ${status}`, type: status >= 500 ? 'server_error' : 'invalid_request_error', param: null, code: status },
            fake: echo,
        });
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

let seq = 0;

const server = http.createServer((req, res) => {
    const url = req.url;
    if (req.method === 'GET' && url === '/health') {
        stats.health_checks++;
        req.resume();
        sendJson(res, 200, { status: 'ok', name: opts.name });
        return;
    }
    if (url === '/_fake/stats' && req.method === 'GET') {
        req.resume();
        sendJson(res, 200, stats);
        return;
    }
    if (url === '/_fake/reset' && req.method === 'POST') {
        req.resume();
        Object.assign(stats, { requests: 0, completed: 0, aborted: 0, self_closed: 0, aborts: [], last: null, recent: [] });
        sendJson(res, 200, { ok: true });
        return;
    }

    const state = { closed: false, timer: null, chunksSent: 0, seq: ++seq };
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
        stats.last = echo;
        stats.recent.push(echo);
        if (stats.recent.length > MAX_RECENT) stats.recent.shift();
        const firstDelay = intHeader(req, 'x-fake-first-delay-ms', 0, 0, 600000);
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
