// Helpers for the gateway's integration tests: start fakes and the gateway as
// real processes, talk HTTP to them (node:http or raw bytes), and make sure
// nothing is left running when the test file's process ends.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '..', '..');
export const TMP = path.join(ROOT, 'tests', '.tmp');
export const FAKE = path.join(ROOT, 'tests', 'fakes', 'upstream.mjs');

export function gatewayBin() {
    const build = process.env.MM_BUILD || 'build';
    return path.resolve(ROOT, build, 'modelmux-gateway');
}

// ---- process bookkeeping -------------------------------------------------

const children = new Set();

function track(proc) {
    children.add(proc);
    proc.on('exit', () => children.delete(proc));
    return proc;
}

function killAll() {
    for (const p of children) {
        try { p.kill('SIGKILL'); } catch { /* already gone */ }
    }
    children.clear();
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, () => { killAll(); process.exit(1); });
}

// Waits for a child to exit; SIGKILLs it after graceMs. Resolves {code, signal}.
function waitExit(proc, graceMs) {
    return new Promise((resolve) => {
        if (proc.exitCode !== null || proc.signalCode !== null) {
            resolve({ code: proc.exitCode, signal: proc.signalCode });
            return;
        }
        const t = setTimeout(() => { try { proc.kill('SIGKILL'); } catch { /* gone */ } }, graceMs);
        proc.once('exit', (code, signal) => { clearTimeout(t); resolve({ code, signal }); });
    });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn (sync or async) every intervalMs until it returns a truthy value,
// which is returned; past timeoutMs it throws, naming `what` and the last
// value (or error) seen. The first call is immediate.
export async function waitFor(fn, timeoutMs = 5000, opts = {}) {
    const intervalMs = opts.intervalMs || 10;
    const what = opts.what || String(fn);
    const deadline = Date.now() + timeoutMs;
    let last;
    for (;;) {
        try {
            last = await fn();
            if (last) return last;
        } catch (e) {
            last = e;
        }
        if (Date.now() >= deadline) {
            const shown = last instanceof Error ? last.message : JSON.stringify(last);
            throw new Error(`waitFor: ${what} not true within ${timeoutMs} ms (last: ${shown})`);
        }
        await sleep(Math.min(intervalMs, Math.max(1, deadline - Date.now())));
    }
}

export function nowNs() { return process.hrtime.bigint(); }

// A port that was free a moment ago (there is a small race with other
// processes; on a test machine that is acceptable).
export function getFreePort() {
    return new Promise((resolve, reject) => {
        const s = net.createServer();
        s.unref();
        s.on('error', reject);
        s.listen(0, '127.0.0.1', () => {
            const { port } = s.address();
            s.close(() => resolve(port));
        });
    });
}

// ---- the fake upstream ---------------------------------------------------

export async function startFake(opts = {}) {
    const name = opts.name || 'fake';
    const args = [FAKE, '--port', String(opts.port || 0), '--name', name, '--exit-on-stdin-eof'];
    if (opts.mode) args.push('--mode', opts.mode);
    const proc = track(spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] }));
    let err = '';
    proc.stderr.on('data', (d) => { err += d; });
    const port = await new Promise((resolve, reject) => {
        let out = '';
        const t = setTimeout(() => reject(new Error(`fake ${name} did not start within 5 s: ${err}`)), 5000);
        proc.stdout.on('data', (d) => {
            out += d;
            const nl = out.indexOf('\n');
            if (nl < 0) return;
            clearTimeout(t);
            try { resolve(JSON.parse(out.slice(0, nl)).port); } catch (e) { reject(e); }
        });
        proc.on('exit', (code) => { clearTimeout(t); reject(new Error(`fake ${name} exited ${code}: ${err}`)); });
    });
    const url = `http://127.0.0.1:${port}`;
    return {
        name,
        port,
        url,
        proc,
        async stats() {
            const r = await request(port, { method: 'GET', path: '/_fake/stats' });
            if (r.status !== 200) throw new Error(`fake ${name} stats: ${r.status}`);
            return r.json();
        },
        async reset() {
            await request(port, { method: 'POST', path: '/_fake/reset' });
        },
        // Runtime fault settings (see tests/fakes/upstream.mjs): setMode({mode,
        // count, pattern, retry_after, first_delay_ms}), setHealth({status,
        // count, then, delay_ms}). Each replaces the previous setting.
        async setMode(o = {}) {
            const r = await request(port, { method: 'POST', path: '/_fake/mode', body: o });
            if (r.status !== 200) throw new Error(`fake ${name} mode: ${r.status} ${r.body}`);
        },
        async setHealth(o = {}) {
            const r = await request(port, { method: 'POST', path: '/_fake/health', body: o });
            if (r.status !== 200) throw new Error(`fake ${name} health: ${r.status} ${r.body}`);
        },
        async kill() {
            try { proc.kill('SIGTERM'); } catch { /* gone */ }
            await waitExit(proc, 2000);
        },
        // kill -9: the kernel closes its sockets, nothing is flushed.
        async kill9() {
            try { proc.kill('SIGKILL'); } catch { /* gone */ }
            await waitExit(proc, 2000);
        },
        // A fresh process on the same port (after kill/kill9), same name and
        // CLI mode; resolves its handle.
        restart() {
            return startFake({ ...opts, name, port });
        },
        stderr: () => err,
    };
}

// ---- the gateway ---------------------------------------------------------

let configSeq = 0;

function writeConfig(config) {
    fs.mkdirSync(TMP, { recursive: true });
    const file = path.join(TMP, `gw-${process.pid}-${++configSeq}.json`);
    fs.writeFileSync(file, typeof config === 'string' ? config : JSON.stringify(config, null, 2));
    return file;
}

// Runs `modelmux-gateway -c FILE ...extra` to completion (for --check).
export function runGatewaySync(config, extraArgs = [], opts = {}) {
    const file = writeConfig(config);
    const r = spawnSync(gatewayBin(), ['-c', file, ...extraArgs], {
        env: { ...process.env, ...(opts.env || {}) },
        encoding: 'utf8',
        timeout: opts.timeoutMs || 10000,
    });
    fs.rmSync(file, { force: true });
    return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, error: r.error };
}

// Starts the gateway on config (an object; "listen" is filled in with a free
// port when absent) and waits until GET /health answers 200.
// opts.admin: fill in "admin_listen" with a free loopback port when the config
// has none. With an admin listener, the handle has adminPort and admin()
// (GET /admin/backends, parsed), and startup also waits for that listener.
export async function startGateway(config, opts = {}) {
    const bin = gatewayBin();
    if (!fs.existsSync(bin)) throw new Error(`gateway binary not found: ${bin} (set MM_BUILD)`);
    const cfg = { ...config };
    if (!cfg.listen) cfg.listen = `127.0.0.1:${await getFreePort()}`;
    if (opts.admin && !cfg.admin_listen) cfg.admin_listen = `127.0.0.1:${await getFreePort()}`;
    const port = Number(cfg.listen.split(':').pop());
    const adminPort = cfg.admin_listen ? Number(String(cfg.admin_listen).split(':').pop()) : null;
    const file = writeConfig(cfg);
    const proc = track(spawn(bin, ['-c', file, ...(opts.args || [])], {
        env: { ...process.env, ...(opts.env || {}) },
        stdio: ['ignore', 'pipe', 'pipe'],
    }));
    let log = '';
    const cap = 1 << 20;   // keep the last MiB: enough to diagnose, bounded
    const add = (d) => { log += d; if (log.length > cap) log = log.slice(-cap); };
    proc.stdout.on('data', add);
    proc.stderr.on('data', add);
    let exited = null;
    let stopping = false;
    let ready = false;
    proc.on('exit', (code, signal) => {
        exited = { code, signal };
        // A gateway that dies in the middle of a test would otherwise show
        // only as ECONNREFUSED in the next request: say why, with its log.
        if (ready && !stopping) {
            process.stderr.write(`\n*** gateway on port ${port} died (${JSON.stringify(exited)}); config ${file}; log tail:\n${log.slice(-4000)}\n`);
        }
    });

    const adminBackends = async () => {
        if (adminPort === null) throw new Error('this gateway has no admin listener');
        const r = await request(adminPort, { method: 'GET', path: '/admin/backends', timeoutMs: 3000 });
        if (r.status !== 200) throw new Error(`/admin/backends: ${r.status} ${r.body}`);
        return r.json();
    };

    const deadline = Date.now() + (opts.readyTimeoutMs || 10000);
    for (;;) {
        if (exited) {
            throw new Error(`gateway exited early (${JSON.stringify(exited)}); config ${file}; log:\n${log}`);
        }
        try {
            const r = await request(port, { method: 'GET', path: '/health', timeoutMs: 500 });
            const a = adminPort === null ? r
                : await request(adminPort, { method: 'GET', path: '/health', timeoutMs: 500 });
            if (r.status === 200 && a.status === 200) { ready = true; break; }
        } catch { /* not listening yet */ }
        if (Date.now() > deadline) {
            try { proc.kill('SIGKILL'); } catch { /* gone */ }
            throw new Error(`gateway not ready within ${opts.readyTimeoutMs || 10000} ms; config ${file}; log:\n${log}`);
        }
        await sleep(20);
    }
    return {
        port,
        url: `http://127.0.0.1:${port}`,
        adminPort,
        // GET /admin/backends, parsed: {models: [{model, default_pool, queued,
        // backends: [{url, health, breaker, up, inflight, retry_in_ms, ...}]}]}
        admin: adminBackends,
        // One backend's entry in /admin/backends (by model name and url).
        async backend(modelName, url) {
            const j = await adminBackends();
            const m = j.models.find((x) => x.model === modelName);
            if (!m) throw new Error(`/admin/backends has no model ${modelName}: ${JSON.stringify(j)}`);
            const b = m.backends.find((x) => x.url === url);
            if (!b) throw new Error(`/admin/backends has no backend ${url} in ${modelName}: ${JSON.stringify(m)}`);
            return b;
        },
        proc,
        configFile: file,
        config: cfg,
        log: () => log,
        exited: () => exited,
        // SIGTERM, then SIGKILL after graceMs; resolves {code, signal}. The
        // config file goes too, unless the gateway had died on its own (its
        // file is named in the error, for diagnosis).
        async stop(graceMs = 5000) {
            const diedOnItsOwn = exited !== null;
            stopping = true;
            if (!exited) {
                try { proc.kill('SIGTERM'); } catch { /* gone */ }
                await waitExit(proc, graceMs);
            }
            if (!diedOnItsOwn) fs.rmSync(file, { force: true });
            // Under `make SANITIZE=...` a report in the log fails the file's
            // after() hook, even when every request was answered right.
            const m = /(ERROR: (Address|Leak|Thread|Memory)Sanitizer|runtime error:)/.exec(log);
            if (m) throw new Error(`sanitizer report in the gateway log (config ${file}):\n${log.slice(Math.max(0, m.index - 200), m.index + 6000)}`);
            return exited;
        },
    };
}

// ---- HTTP clients --------------------------------------------------------

// One request over a fresh connection (agent: false) unless opts.agent is
// given. Resolves {status, headers, rawHeaders, body (string), json()}.
export function request(port, opts = {}) {
    return new Promise((resolve, reject) => {
        const body = opts.body === undefined ? undefined
            : (typeof opts.body === 'string' || Buffer.isBuffer(opts.body)) ? opts.body
                : JSON.stringify(opts.body);
        const headers = { ...(opts.headers || {}) };
        if (body !== undefined && opts.body !== undefined && typeof opts.body === 'object' && !Buffer.isBuffer(opts.body)
            && !Object.keys(headers).some((h) => h.toLowerCase() === 'content-type')) {
            headers['content-type'] = 'application/json';
        }
        // An explicit length: Node frames a body it is handed with write()
        // on a DELETE or GET with neither length nor chunked (so not at all).
        if (body !== undefined && !Object.keys(headers).some((h) => /^(content-length|transfer-encoding)$/i.test(h))) {
            headers['content-length'] = Buffer.byteLength(body);
        }
        const req = http.request({
            host: '127.0.0.1',
            port,
            method: opts.method || (body === undefined ? 'GET' : 'POST'),
            path: opts.path || '/',
            headers,
            agent: opts.agent || false,
        }, (res) => {
            const parts = [];
            res.on('data', (d) => parts.push(d));
            res.on('end', () => {
                clearTimeout(timer);
                const text = Buffer.concat(parts).toString('utf8');
                resolve({
                    status: res.statusCode,
                    headers: res.headers,
                    rawHeaders: res.rawHeaders,
                    body: text,
                    json() { return JSON.parse(text); },
                });
            });
            res.on('error', (e) => { clearTimeout(timer); reject(e); });
        });
        const timer = setTimeout(() => {
            req.destroy(new Error(`request ${opts.method || ''} ${opts.path} timed out after ${opts.timeoutMs || 10000} ms`));
        }, opts.timeoutMs || 10000);
        req.on('error', (e) => { clearTimeout(timer); reject(e); });
        req.end(body);
    });
}

export function postJson(port, pathName, obj, headers = {}, extra = {}) {
    return request(port, { method: 'POST', path: pathName, body: JSON.stringify(obj), headers: { 'content-type': 'application/json', ...headers }, ...extra });
}

// A streaming POST (body: an object, sent as JSON) read event by event.
// Resolves {status, headers, events (each without its blank line), arrivals
// (hrtime ns per event), ended (the chunked body ended cleanly), error,
// timedOut, ms (wall time to the end)} when the response ends or fails, or
// after timeoutMs (the request is then destroyed). onEvent(text, out, req) is
// called for every event.
export function streamRequest(port, body, headers = {}, opts = {}) {
    const timeoutMs = opts.timeoutMs || 10000;
    const t0 = Date.now();
    return new Promise((resolve) => {
        const out = { status: null, headers: null, events: [], arrivals: [], ended: false, error: null, timedOut: false, ms: 0 };
        let settled = false;
        const done = () => {
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            out.ms = Date.now() - t0;
            resolve(out);
        };
        const timer = setTimeout(() => { out.timedOut = true; req.destroy(); done(); }, timeoutMs);
        const req = http.request({
            host: '127.0.0.1', port, method: 'POST', path: opts.path || '/v1/chat/completions', agent: false,
            headers: { 'content-type': 'application/json', ...headers },
        }, (res) => {
            out.status = res.statusCode;
            out.headers = res.headers;
            let buf = '';
            res.setEncoding('utf8');
            res.on('data', (d) => {
                const t = nowNs();
                buf += d;
                let i;
                while ((i = buf.indexOf('\n\n')) >= 0) {
                    const ev = buf.slice(0, i);
                    buf = buf.slice(i + 2);
                    out.events.push(ev);
                    out.arrivals.push(t);
                    if (opts.onEvent) opts.onEvent(ev, out, req);
                }
            });
            res.on('end', () => { out.ended = true; if (buf.length) out.events.push(buf); done(); });
            res.on('error', (e) => { out.error = out.error || e; done(); });
            res.on('close', done);
        });
        req.on('error', (e) => { out.error = out.error || e; done(); });
        req.end(JSON.stringify(body));
    });
}

export function chat(port, model, headers = {}, extra = {}) {
    return postJson(port, '/v1/chat/completions', { model, messages: [{ role: 'user', content: 'hi' }] }, headers, extra);
}

// Sends raw bytes on a new TCP connection and collects what comes back.
// Resolves {data: Buffer, text (latin1), closed, error} once the server
// closes the connection, `until(data)` returns true, or timeoutMs passes
// (closed is then false). The client never half-closes: "closed" means the
// server closed.
export function rawRequest(port, bytes, opts = {}) {
    const timeoutMs = opts.timeoutMs || 3000;
    return new Promise((resolve) => {
        const sock = net.connect(port, '127.0.0.1');
        const parts = [];
        let done = false;
        let error = null;
        const finish = (closed) => {
            if (done) return;
            done = true;
            clearTimeout(timer);
            const data = Buffer.concat(parts);
            sock.destroy();
            resolve({ data, text: data.toString('latin1'), closed, error });
        };
        const timer = setTimeout(() => finish(false), timeoutMs);
        sock.on('connect', () => {
            const chunks = Array.isArray(bytes) ? bytes : [bytes];
            // Several pieces are written with a pause between them, so a test
            // can make a request arrive in parts.
            let i = 0;
            const writeNext = () => {
                if (done || i >= chunks.length) return;
                sock.write(chunks[i++]);
                if (i < chunks.length) setTimeout(writeNext, opts.pieceDelayMs || 20);
            };
            writeNext();
        });
        sock.on('data', (d) => {
            parts.push(d);
            if (opts.until && opts.until(Buffer.concat(parts))) finish(false);
        });
        sock.on('end', () => finish(true));
        sock.on('close', () => finish(true));
        sock.on('error', (e) => { error = e; finish(true); });
    });
}

// Parses consecutive HTTP/1.1 responses out of buf (Content-Length, chunked
// or a 1xx/204/304 without body). Returns {responses, rest, incomplete}.
// Each response: {status, reason, headers (lowercase names; arrays when
// repeated), headerList, body: Buffer}.
export function parseResponses(buf, opts = {}) {
    const responses = [];
    let off = 0;
    for (;;) {
        const headEnd = buf.indexOf('\r\n\r\n', off, 'latin1');
        if (headEnd < 0) break;
        const head = buf.subarray(off, headEnd).toString('latin1');
        const lines = head.split('\r\n');
        const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(lines[0]);
        if (!m) return { responses, rest: buf.subarray(off), incomplete: true, garbage: true };
        const headers = {};
        const headerList = [];
        for (const l of lines.slice(1)) {
            const c = l.indexOf(':');
            const k = l.slice(0, c).toLowerCase();
            const v = l.slice(c + 1).trim();
            headerList.push([k, v]);
            if (k in headers) headers[k] = [].concat(headers[k], v);
            else headers[k] = v;
        }
        const status = Number(m[1]);
        let p = headEnd + 4;
        let body;
        if (status < 200 || status === 204 || status === 304 || opts.headOnly) {
            body = Buffer.alloc(0);
        } else if (/chunked/i.test(headers['transfer-encoding'] || '')) {
            const parts = [];
            let ok = false;
            for (;;) {
                const le = buf.indexOf('\r\n', p, 'latin1');
                if (le < 0) break;
                const size = parseInt(buf.subarray(p, le).toString('latin1').split(';')[0], 16);
                if (Number.isNaN(size)) break;
                if (size === 0) {
                    const te = buf.indexOf('\r\n\r\n', le, 'latin1');
                    // "0\r\n\r\n": the empty trailer's CRLF follows the size line.
                    if (buf.subarray(le, le + 4).toString('latin1') === '\r\n\r\n') { p = le + 4; ok = true; }
                    else if (te >= 0) { p = te + 4; ok = true; }
                    break;
                }
                if (buf.length < le + 2 + size + 2) break;
                parts.push(buf.subarray(le + 2, le + 2 + size));
                p = le + 2 + size + 2;
            }
            if (!ok) return { responses, rest: buf.subarray(off), incomplete: true };
            body = Buffer.concat(parts);
        } else if (headers['content-length'] !== undefined) {
            const n = Number(headers['content-length']);
            if (buf.length < p + n) return { responses, rest: buf.subarray(off), incomplete: true };
            body = buf.subarray(p, p + n);
            p += n;
        } else {
            // Delimited by close: everything that is left.
            body = buf.subarray(p);
            p = buf.length;
        }
        responses.push({ status, reason: m[2] || '', headers, headerList, body });
        off = p;
    }
    return { responses, rest: buf.subarray(off), incomplete: off < buf.length };
}

// For rawRequest's `until`: true once n complete responses are in.
export function nResponses(n) {
    return (buf) => parseResponses(buf).responses.length >= n;
}

// ---- assertions shared by several files ------------------------------------

// The gateway's error shape: exactly {"error":{"message","type","param","code"}}.
export function checkErrorShape(assert, res, status) {
    assert.equal(res.status, status, `status; body: ${res.body}`);
    assert.match(String(res.headers['content-type']), /^application\/json/, 'error content-type');
    const j = JSON.parse(res.body);
    assert.deepEqual(Object.keys(j), ['error'], `top-level keys of ${res.body}`);
    assert.deepEqual(Object.keys(j.error).sort(), ['code', 'message', 'param', 'type'], `error keys of ${res.body}`);
    assert.equal(typeof j.error.message, 'string');
    assert.ok(j.error.message.length > 0, 'message not empty');
    assert.equal(j.error.type, status >= 500 ? 'server_error' : 'invalid_request_error', `type of ${res.body}`);
    assert.equal(j.error.code, status, `code of ${res.body}`);
    return j.error;
}

// A model entry with health checks off, so a test's fakes need answer nothing
// but the requests the test sends.
export function model(name, backends, extra = {}) {
    return { name, health: false, backends, ...extra };
}

// A raw keep-alive connection: write bytes, then wait for n complete
// responses (parsed) or for the server to close.
export async function openConn(port) {
    const sock = net.connect(port, '127.0.0.1');
    await new Promise((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
    let buf = Buffer.alloc(0);
    let closed = false;
    let waiter = null;
    const poke = () => { if (waiter) waiter(); };
    sock.on('data', (d) => { buf = Buffer.concat([buf, d]); poke(); });
    sock.on('close', () => { closed = true; poke(); });
    sock.on('error', () => { closed = true; poke(); });
    return {
        write(bytes) { sock.write(bytes); },
        get closed() { return closed; },
        // Resolves {responses, closed}; consumes the parsed bytes.
        async read(n, timeoutMs = 3000) {
            const deadline = Date.now() + timeoutMs;
            for (;;) {
                const p = parseResponses(buf);
                if (p.responses.length >= n || closed || Date.now() >= deadline) {
                    buf = Buffer.from(p.rest);
                    return { responses: p.responses, closed };
                }
                await new Promise((resolve) => {
                    waiter = resolve;
                    setTimeout(resolve, Math.max(1, deadline - Date.now()));
                });
                waiter = null;
            }
        },
        close() { sock.destroy(); },
    };
}

// Chi-square statistic of observed counts against expected proportions.
export function chiSquare(observed, weights) {
    const n = observed.reduce((a, b) => a + b, 0);
    const w = weights.reduce((a, b) => a + b, 0);
    return observed.reduce((acc, o, i) => {
        const e = (n * weights[i]) / w;
        return acc + ((o - e) ** 2) / e;
    }, 0);
}

// Runs fn(i) for i in [0, n) with at most `width` in flight; resolves the results in order.
export async function pool(n, width, fn) {
    const out = new Array(n);
    let next = 0;
    const worker = async () => {
        while (next < n) {
            const i = next++;
            out[i] = await fn(i);
        }
    };
    await Promise.all(Array.from({ length: Math.min(width, n) }, worker));
    return out;
}

// ---- the worker (modelmux-worker) ------------------------------------------

export function workerBin() {
    const build = process.env.MM_BUILD || 'build';
    return path.resolve(ROOT, build, 'modelmux-worker');
}

// Generates a random-weight model directory under tests/.tmp (synchronous;
// tiny by default: qwen2, 2 layers, hidden 64). Returns its path.
export function makeModel(name, args = []) {
    fs.mkdirSync(TMP, { recursive: true });
    const dir = path.join(TMP, `${name}-${process.pid}`);
    fs.rmSync(dir, { recursive: true, force: true });
    const r = spawnSync(workerBin(), ['--make-model', dir, '--arch', 'qwen2', '--layers', '2',
        '--hidden', '64', ...args], { encoding: 'utf8', timeout: 60000 });
    if (r.status !== 0) throw new Error(`--make-model ${dir} failed (${r.status}): ${r.stderr}`);
    return dir;
}

// Runs the worker to completion (flag errors, --make-model).
export function runWorkerSync(args, opts = {}) {
    const r = spawnSync(workerBin(), args, {
        env: { ...process.env, ...(opts.env || {}) }, encoding: 'utf8', timeout: opts.timeoutMs || 20000,
    });
    return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

// Starts `modelmux-worker --model DIR --port 0 ...args`, learns the port from
// its "serving ... on http://HOST:PORT" line and waits until GET /health is
// 200. `sawLoading` says whether a 503 {"status":"loading"} was seen first.
// opts.listeningOnly: return as soon as the port is known (still loading);
// the handle's ready() then waits for 200.
export async function startWorker(dir, args = [], opts = {}) {
    const bin = workerBin();
    if (!fs.existsSync(bin)) throw new Error(`worker binary not found: ${bin} (set MM_BUILD)`);
    const proc = track(spawn(bin, ['--model', dir, '--host', '127.0.0.1', '--port', '0', ...args], {
        env: { ...process.env, ...(opts.env || {}) },
        stdio: ['ignore', 'pipe', 'pipe'],
    }));
    let log = '';
    const cap = 1 << 20;
    const add = (d) => { log += d; if (log.length > cap) log = log.slice(-cap); };
    proc.stdout.on('data', add);
    proc.stderr.on('data', add);
    let exited = null;
    let stopping = false;
    let ready = false;
    proc.on('exit', (code, signal) => {
        exited = { code, signal };
        if (ready && !stopping) {
            process.stderr.write(`\n*** worker ${dir} died (${JSON.stringify(exited)}); log tail:\n${log.slice(-4000)}\n`);
        }
    });
    const timeoutMs = opts.readyTimeoutMs || 30000;
    const deadline = Date.now() + timeoutMs;
    let port = 0;
    const handle = { sawLoading: false, loadingBody: null };
    const waitHealthy = async (listeningOnly) => {
        for (;;) {
            if (exited) throw new Error(`worker exited early (${JSON.stringify(exited)}); log:\n${log}`);
            if (!port) {
                const m = /serving .* on http:\/\/[^:\s]+:(\d+)/.exec(log);
                if (m) port = Number(m[1]);
                if (port && listeningOnly) return;
            }
            if (port) {
                try {
                    const r = await request(port, { method: 'GET', path: '/health', timeoutMs: 1000 });
                    if (r.status === 200) { ready = true; return; }
                    if (r.status === 503) { handle.sawLoading = true; handle.loadingBody = r.body; }
                } catch { /* not yet */ }
            }
            if (Date.now() > deadline) {
                try { proc.kill('SIGKILL'); } catch { /* gone */ }
                throw new Error(`worker not ready within ${timeoutMs} ms; log:\n${log}`);
            }
            await sleep(10);
        }
    };
    await waitHealthy(Boolean(opts.listeningOnly));
    return Object.assign(handle, {
        port,
        url: `http://127.0.0.1:${port}`,
        proc,
        ready: () => waitHealthy(false),
        log: () => log,
        exited: () => exited,
        async stop(graceMs = 5000) {
            stopping = true;
            if (!exited) {
                try { proc.kill('SIGTERM'); } catch { /* gone */ }
                await waitExit(proc, graceMs);
            }
            const m = /(ERROR: (Address|Leak|Thread|Memory)Sanitizer|runtime error:)/.exec(log);
            if (m) throw new Error(`sanitizer report in the worker log (${dir}):\n${log.slice(Math.max(0, m.index - 200), m.index + 6000)}`);
            return exited;
        },
    });
}

// Parses an SSE body into its data payloads: JSON objects, and the string
// '[DONE]' where it appears.
export function sseEvents(body) {
    const out = [];
    for (const block of body.split('\n\n')) {
        if (!block.trim()) continue;
        for (const line of block.split('\n')) {
            if (!line.startsWith('data: ')) continue;
            const d = line.slice(6);
            out.push(d === '[DONE]' ? d : JSON.parse(d));
        }
    }
    return out;
}
