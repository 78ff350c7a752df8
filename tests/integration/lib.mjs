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

// Ports for processes a test starts later (a launched worker, a gateway).
// Asking the kernel for port 0 and closing it is racy: the kernel may hand
// the same port to the next bind to port 0 (a fake, or the next such call)
// before the child meant to bind it has started; the likeliest cause of one
// CI failure (a gated worker's port answered by another process, whose
// /health said 200). So ports come from below the kernel's ephemeral
// range, where no bind to port 0 and no outgoing connection lands, in order
// from a random start per process and never twice in one process; a trial
// bind skips ports something still holds.
const PORTS_FLOOR = 10000;
const portsHandedOut = new Set();
let portsNext = 0;

function ephemeralLow() {
    try {
        const lo = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
        if (Number.isInteger(lo) && lo > 0) return lo;
    } catch { /* not Linux: assume the IANA range */ }
    return 49152;
}

function tryBind(port) {
    return new Promise((resolve) => {
        const s = net.createServer();
        s.unref();
        s.once('error', () => resolve(false));
        s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
    });
}

export async function getFreePort() {
    const hi = ephemeralLow();          // exclusive
    const span = hi - PORTS_FLOOR;
    if (span < 1000) throw new Error(`getFreePort: no room below the ephemeral range (starts at ${hi})`);
    if (!portsNext) portsNext = PORTS_FLOOR + Math.floor(Math.random() * span);
    for (let tries = 0; tries < span; tries++) {
        const port = portsNext;
        portsNext = portsNext + 1 >= hi ? PORTS_FLOOR : portsNext + 1;
        if (portsHandedOut.has(port)) continue;
        if (await tryBind(port)) {
            portsHandedOut.add(port);
            return port;
        }
    }
    throw new Error(`getFreePort: every port in ${PORTS_FLOOR}-${hi - 1} is taken`);
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
        const t = setTimeout(() => reject(new Error(`fake ${name} did not start within 20 s: ${err}`)), 20000);
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
        // Sends sig (SIGTERM, SIGINT, SIGKILL) to end the gateway without
        // waiting: a test that watches the shutdown itself. Its exit is then
        // expected (no "died" report); stop() still cleans up afterwards.
        terminate(sig = 'SIGTERM') {
            stopping = true;
            proc.kill(sig);
        },
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

// ---- observability: Redis, a usage-reporting upstream, Prometheus text -------

// A private redis-server on a free loopback port (or opts.port), data in its
// own temp dir under tests/.tmp. No persistence unless opts.appendonly, which
// turns on the AOF with fsync on every write: a reply then means the write is
// on disk, so a kill -9 loses nothing that was acknowledged (tests that
// restart Redis and count exactly rely on this). Waits until PING answers
// PONG (not -LOADING). The handle: port, url, dir, cmd(...args) (one command,
// resolves the reply, rejects on an error reply), kill9(), pause() (SIGSTOP),
// resume() (SIGCONT), restart() (a new process on the same port and dir),
// stop() (kill and remove the dir). Killed at exit like every child.
const redisDirs = new Set();
process.on('exit', () => {
    for (const d of redisDirs) {
        try { fs.rmSync(d, { recursive: true, force: true }); } catch { /* best effort */ }
    }
});

export async function startRedis(opts = {}) {
    const port = opts.port || await getFreePort();
    let dir = opts.dir;
    if (!dir) {
        fs.mkdirSync(TMP, { recursive: true });
        dir = fs.mkdtempSync(path.join(TMP, `redis-${process.pid}-`));
        redisDirs.add(dir);
    }
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--dir', dir,
        '--daemonize', 'no', '--loglevel', 'notice', '--appendonly', opts.appendonly ? 'yes' : 'no'];
    if (opts.appendonly) args.push('--appendfsync', 'always');
    const proc = track(spawn(opts.bin || 'redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    let log = '';
    const add = (d) => { log += d; if (log.length > 1 << 20) log = log.slice(-(1 << 20)); };
    proc.stdout.on('data', add);
    proc.stderr.on('data', add);
    let exited = null;
    proc.on('exit', (code, signal) => { exited = { code, signal }; });
    const cmd = (...a) => redisCommand(port, a);
    await waitFor(async () => {
        if (exited) throw new Error(`redis-server exited (${JSON.stringify(exited)}): ${log}`);
        return (await cmd('PING')) === 'PONG';
    }, opts.readyTimeoutMs || 10000, { intervalMs: 20, what: `redis-server on port ${port} answers PING` });
    const handle = {
        port,
        url: `redis://127.0.0.1:${port}/0`,
        dir,
        proc,
        cmd,
        log: () => log,
        exited: () => exited,
        async kill9() {
            try { proc.kill('SIGCONT'); proc.kill('SIGKILL'); } catch { /* gone */ }
            await waitExit(proc, 2000);
        },
        pause() { proc.kill('SIGSTOP'); },
        resume() { proc.kill('SIGCONT'); },
        restart() { return startRedis({ ...opts, port, dir }); },
        async stop() {
            await handle.kill9();
            if (redisDirs.has(dir)) {
                fs.rmSync(dir, { recursive: true, force: true });
                redisDirs.delete(dir);
            }
        },
    };
    return handle;
}

export class RedisError extends Error {}

function respEncode(args) {
    const parts = [`*${args.length}\r\n`];
    for (const a of args) {
        const b = Buffer.from(String(a));
        parts.push(`$${b.length}\r\n`, b, '\r\n');
    }
    return Buffer.concat(parts.map((p) => (Buffer.isBuffer(p) ? p : Buffer.from(p))));
}

// One RESP2 value from buf at off: {value, off} or null when incomplete.
// Error replies become RedisError values (inside arrays too). Commands sent
// by a client (arrays of bulk strings) parse the same way.
export function respParse(buf, off) {
    const le = buf.indexOf('\r\n', off);
    if (le < 0) return null;
    const type = String.fromCharCode(buf[off]);
    const line = buf.subarray(off + 1, le).toString('utf8');
    const next = le + 2;
    switch (type) {
    case '+': return { value: line, off: next };
    case '-': return { value: new RedisError(line), off: next };
    case ':': return { value: Number(line), off: next };
    case '$': {
        const n = Number(line);
        if (n < 0) return { value: null, off: next };
        if (buf.length < next + n + 2) return null;
        return { value: buf.subarray(next, next + n).toString('utf8'), off: next + n + 2 };
    }
    case '*': {
        const n = Number(line);
        if (n < 0) return { value: null, off: next };
        const out = [];
        let p = next;
        for (let i = 0; i < n; i++) {
            const r = respParse(buf, p);
            if (!r) return null;
            out.push(r.value);
            p = r.off;
        }
        return { value: out, off: p };
    }
    default:
        throw new Error(`RESP: unexpected type byte ${JSON.stringify(type)}`);
    }
}

// One command on a fresh connection (no dependency on redis-cli or an npm
// client). Resolves the reply (arrays of strings/numbers); rejects with a
// RedisError on an error reply, with an Error on a timeout or a broken
// connection.
export function redisCommand(port, args, opts = {}) {
    const timeoutMs = opts.timeoutMs || 3000;
    return new Promise((resolve, reject) => {
        const sock = net.connect(port, '127.0.0.1');
        let buf = Buffer.alloc(0);
        let done = false;
        const finish = (err, value) => {
            if (done) return;
            done = true;
            clearTimeout(timer);
            sock.destroy();
            if (err) reject(err); else resolve(value);
        };
        const timer = setTimeout(() => finish(new Error(`redis ${args[0]}: no reply within ${timeoutMs} ms`)), timeoutMs);
        sock.on('connect', () => sock.write(respEncode(args)));
        sock.on('data', (d) => {
            buf = Buffer.concat([buf, d]);
            let r;
            try { r = respParse(buf, 0); } catch (e) { finish(e); return; }
            if (!r) return;
            if (r.value instanceof RedisError) finish(r.value);
            else finish(null, r.value);
        });
        sock.on('error', (e) => finish(e));
        sock.on('close', () => finish(new Error(`redis ${args[0]}: connection closed`)));
    });
}

// Every per-minute hash of the metrics schema under prefix, summed field by
// field over the minutes: {sums: Map(field -> number), keys: [minute keys]}.
// Fields are "<model>\t<variant>\t<backend>\t<metric>" (docs/METRICS.md).
export async function redisMetricSums(port, prefix) {
    const keys = (await redisCommand(port, ['KEYS', `${prefix}:v1:m:*`])).sort();
    const sums = new Map();
    for (const k of keys) {
        const flat = await redisCommand(port, ['HGETALL', k]);
        for (let i = 0; i + 1 < flat.length; i += 2) {
            sums.set(flat[i], (sums.get(flat[i]) || 0) + Number(flat[i + 1]));
        }
    }
    return { sums, keys };
}

// An OpenAI-like chat upstream in this process that reports usage the way
// OpenAI and vLLM do: a usage object on non-streaming answers, and on
// streams, only when the request says stream_options.include_usage = true,
// "usage": null on every content chunk plus one last chunk with
// "choices": [] and the usage before [DONE]. Every request body it gets is
// kept in `received` ({path, headers, body, json}) so a test can see what
// the gateway forwarded.
// Per request (headers): x-mini-prompt-tokens (default 7),
// x-mini-completion-tokens (non-streaming, default 4; a stream reports one
// per chunk), x-mini-chunks (default 3), x-mini-delay-ms (between chunks),
// x-mini-first-delay-ms (before the answer), x-mini-dribble: 1 (write each
// event in two pieces), x-mini-status (answer this status with an OpenAI
// error body instead).
export async function startMiniUpstream(opts = {}) {
    const name = opts.name || 'mini';
    const received = [];
    const stats = { requests: 0, aborted: 0 };
    const sockets = new Set();
    const intHdr = (req, h, d) => {
        const v = Number(req.headers[h]);
        return req.headers[h] !== undefined && Number.isInteger(v) && v >= 0 ? v : d;
    };
    const server = http.createServer((req, res) => {
        const parts = [];
        req.on('data', (d) => parts.push(d));
        req.on('end', () => {
            if (req.url === '/health') {
                res.writeHead(200, { 'content-type': 'application/json' });
                res.end('{"status":"ok"}');
                return;
            }
            stats.requests++;
            const body = Buffer.concat(parts).toString('utf8');
            let json = null;
            try { json = JSON.parse(body); } catch { /* kept as text */ }
            received.push({ path: req.url, headers: req.headers, body, json });
            if (received.length > 2000) received.shift();
            let finished = false;
            res.on('finish', () => { finished = true; });
            res.on('close', () => { if (!finished) stats.aborted++; });
            const timers = [];
            res.on('close', () => timers.forEach(clearTimeout));
            const later = (ms, fn) => { if (ms > 0) timers.push(setTimeout(fn, ms)); else fn(); };
            const pt = intHdr(req, 'x-mini-prompt-tokens', 7);
            const status = intHdr(req, 'x-mini-status', 200);
            later(intHdr(req, 'x-mini-first-delay-ms', 0), () => {
                const model = json && typeof json.model === 'string' ? json.model : name;
                if (status !== 200) {
                    const b = JSON.stringify({ error: { message: `${name} says ${status}`, type: 'server_error', param: null, code: status } });
                    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(b) });
                    res.end(b);
                    return;
                }
                if (!(json && json.stream === true)) {
                    const ct = intHdr(req, 'x-mini-completion-tokens', 4);
                    const b = JSON.stringify({
                        id: `chatcmpl-${name}-${stats.requests}`, object: 'chat.completion', created: 1, model,
                        choices: [{ index: 0, message: { role: 'assistant', content: `hello from ${name}` }, finish_reason: 'stop' }],
                        usage: { prompt_tokens: pt, completion_tokens: ct, total_tokens: pt + ct },
                    });
                    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(b) });
                    res.end(b);
                    return;
                }
                const n = intHdr(req, 'x-mini-chunks', 3);
                const delay = intHdr(req, 'x-mini-delay-ms', 0);
                const dribble = intHdr(req, 'x-mini-dribble', 0) > 0;
                const withUsage = Boolean(json.stream_options && json.stream_options.include_usage === true);
                res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
                const id = `chatcmpl-${name}-${stats.requests}`;
                // Dribbling cuts every event in two writes 15 ms apart, so
                // the gateway reads events in pieces.
                const emit = (text, then) => {
                    if (!dribble) { res.write(text); then(); return; }
                    const h = text.length >> 1;
                    res.write(text.slice(0, h));
                    later(15, () => { res.write(text.slice(h)); then(); });
                };
                let i = 0;
                const step = () => {
                    if (i < n) {
                        const c = { id, object: 'chat.completion.chunk', created: 1, model,
                            choices: [{ index: 0, delta: { content: `t${i} ` }, finish_reason: i === n - 1 ? 'stop' : null }] };
                        if (withUsage) c.usage = null;
                        i++;
                        emit(`data: ${JSON.stringify(c)}\n\n`, () => later(i < n ? delay : 0, step));
                        return;
                    }
                    const done = () => emit('data: [DONE]\n\n', () => res.end());
                    if (withUsage) {
                        emit(`data: ${JSON.stringify({ id, object: 'chat.completion.chunk', created: 1, model, choices: [],
                            usage: { prompt_tokens: pt, completion_tokens: n, total_tokens: pt + n } })}\n\n`, done);
                    } else {
                        done();
                    }
                };
                step();
            });
        });
    });
    server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
    server.keepAliveTimeout = 30000;
    await new Promise((resolve) => server.listen(opts.port || 0, '127.0.0.1', resolve));
    const port = server.address().port;
    return {
        name,
        port,
        url: `http://127.0.0.1:${port}`,
        received,
        stats,
        close() {
            for (const s of sockets) s.destroy();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}

// A strict parser of the Prometheus text exposition format (version 0.0.4).
// Throws (naming the line) on: a missing final newline, an empty line, a
// malformed HELP/TYPE/sample line, a bad metric or label name, a bad
// escape in a label value or HELP text, a duplicate HELP or TYPE, a TYPE
// after the family's samples, a sample whose family has no TYPE, a family
// whose lines are not contiguous, a duplicate series, a duplicate label
// name, an unparsable value; and for histograms: `le` on anything but
// _bucket, a bucket without `le` or with an unparsable one, bounds not
// strictly increasing, cumulative counts that decrease, no +Inf bucket, a
// missing _sum or _count, or _count != the +Inf bucket.
// Returns {families: Map(name -> {name, type, help, samples}), samples(name,
// match) (the samples of that metric name whose labels include match),
// value(name, match) (the sum of those samples' values)}.
export function parsePrometheus(text) {
    const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
    const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*/;
    const VALUE = /^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)$/;
    const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);
    if (!text.endsWith('\n')) throw new Error('prometheus: the text does not end with a newline');
    const lines = text.slice(0, -1).split('\n');
    const families = new Map();
    const closed = new Set();
    const seriesSeen = new Set();
    let current = null;
    const fam = (n) => {
        if (!families.has(n)) families.set(n, { name: n, type: null, help: null, samples: [] });
        return families.get(n);
    };
    const enter = (n, ln) => {
        if (n === current) return;
        if (closed.has(n)) throw new Error(`prometheus line ${ln}: family ${n} continues after other families (not contiguous)`);
        if (current !== null) closed.add(current);
        current = n;
    };
    const familyOf = (n) => {
        const f = families.get(n);
        if (f && f.type && f.type !== 'histogram' && f.type !== 'summary') return f;
        for (const suf of ['_bucket', '_sum', '_count']) {
            if (!n.endsWith(suf)) continue;
            const base = families.get(n.slice(0, -suf.length));
            if (base && (base.type === 'histogram' || (base.type === 'summary' && suf !== '_bucket'))) return base;
        }
        if (f && f.type === 'summary') return f;
        return null;
    };
    lines.forEach((line, idx) => {
        const ln = idx + 1;
        if (line === '') throw new Error(`prometheus line ${ln}: empty line`);
        if (line.startsWith('#')) {
            const m = /^#[ \t]+(HELP|TYPE)[ \t]+(\S+)(?:[ \t]+(.*))?$/.exec(line);
            if (!m) {
                if (/^#[ \t]+(HELP|TYPE)\b/.test(line)) throw new Error(`prometheus line ${ln}: malformed ${line}`);
                return;   // a plain comment
            }
            const [, kw, n, rest = ''] = m;
            if (NAME.exec(n)?.[0] !== n) throw new Error(`prometheus line ${ln}: bad metric name ${JSON.stringify(n)}`);
            const f = fam(n);
            enter(n, ln);
            if (kw === 'HELP') {
                if (f.help !== null) throw new Error(`prometheus line ${ln}: second HELP for ${n}`);
                if (/\\[^\\n]|\\$/.test(rest.replace(/\\\\/g, ''))) throw new Error(`prometheus line ${ln}: bad escape in HELP of ${n}`);
                f.help = rest.replace(/\\(\\|n)/g, (_, c) => (c === 'n' ? '\n' : '\\'));
            } else {
                if (f.type !== null) throw new Error(`prometheus line ${ln}: second TYPE for ${n}`);
                if (f.samples.length) throw new Error(`prometheus line ${ln}: TYPE of ${n} after its samples`);
                if (!TYPES.has(rest)) throw new Error(`prometheus line ${ln}: unknown type ${JSON.stringify(rest)}`);
                f.type = rest;
            }
            return;
        }
        const nm = NAME.exec(line);
        if (!nm) throw new Error(`prometheus line ${ln}: no metric name in ${JSON.stringify(line)}`);
        const name = nm[0];
        let p = name.length;
        const labels = {};
        if (line[p] === '{') {
            p++;
            for (;;) {
                if (line[p] === '}') { p++; break; }
                const lm = LABEL.exec(line.slice(p));
                if (!lm) throw new Error(`prometheus line ${ln}: bad label name at column ${p + 1}`);
                const lname = lm[0];
                p += lname.length;
                if (line[p] !== '=' || line[p + 1] !== '"') throw new Error(`prometheus line ${ln}: expected ="..." after label ${lname}`);
                p += 2;
                let v = '';
                for (;;) {
                    if (p >= line.length) throw new Error(`prometheus line ${ln}: unterminated label value`);
                    const c = line[p];
                    if (c === '"') { p++; break; }
                    if (c === '\\') {
                        const e = line[p + 1];
                        if (e === '\\') v += '\\';
                        else if (e === '"') v += '"';
                        else if (e === 'n') v += '\n';
                        else throw new Error(`prometheus line ${ln}: bad escape \\${e} in label ${lname}`);
                        p += 2;
                        continue;
                    }
                    v += c;
                    p++;
                }
                if (Object.prototype.hasOwnProperty.call(labels, lname)) throw new Error(`prometheus line ${ln}: label ${lname} twice`);
                labels[lname] = v;
                if (line[p] === ',') { p++; continue; }
                if (line[p] === '}') { p++; break; }
                throw new Error(`prometheus line ${ln}: expected , or } at column ${p + 1}`);
            }
        }
        if (line[p] !== ' ' && line[p] !== '\t') throw new Error(`prometheus line ${ln}: no blank before the value`);
        const fields = line.slice(p).trim().split(/[ \t]+/);
        if (fields.length < 1 || fields.length > 2) throw new Error(`prometheus line ${ln}: expected value [timestamp], got ${JSON.stringify(line.slice(p))}`);
        if (!VALUE.test(fields[0])) throw new Error(`prometheus line ${ln}: bad value ${JSON.stringify(fields[0])}`);
        if (fields.length === 2 && !/^-?\d+$/.test(fields[1])) throw new Error(`prometheus line ${ln}: bad timestamp ${JSON.stringify(fields[1])}`);
        const value = fields[0] === '+Inf' ? Infinity : fields[0] === '-Inf' ? -Infinity : Number(fields[0]);
        const f = familyOf(name);
        if (!f) throw new Error(`prometheus line ${ln}: sample ${name} has no TYPE`);
        enter(f.name, ln);
        const id = name + JSON.stringify(Object.keys(labels).sort().map((k) => [k, labels[k]]));
        if (seriesSeen.has(id)) throw new Error(`prometheus line ${ln}: duplicate series ${name}${JSON.stringify(labels)}`);
        seriesSeen.add(id);
        if (f.type === 'histogram' && ('le' in labels) !== name.endsWith('_bucket')) {
            throw new Error(`prometheus line ${ln}: ${name}: "le" belongs on _bucket samples only, and always there`);
        }
        f.samples.push({ name, labels, value, line: ln });
    });
    for (const f of families.values()) {
        if (f.type !== 'histogram') continue;
        const groups = new Map();
        for (const s of f.samples) {
            const { le, ...rest } = s.labels;
            const k = JSON.stringify(Object.keys(rest).sort().map((x) => [x, rest[x]]));
            if (!groups.has(k)) groups.set(k, { buckets: [], sum: null, count: null });
            const g = groups.get(k);
            if (s.name === `${f.name}_bucket`) {
                const b = le === '+Inf' ? Infinity : Number(le);
                if (le === '' || !(le === '+Inf' || VALUE.test(le)) || Number.isNaN(b)) throw new Error(`prometheus line ${s.line}: bad le ${JSON.stringify(le)}`);
                g.buckets.push({ le: b, leText: le, v: s.value, line: s.line });
            } else if (s.name === `${f.name}_sum`) g.sum = s.value;
            else if (s.name === `${f.name}_count`) g.count = s.value;
            else throw new Error(`prometheus line ${s.line}: ${s.name} is not a sample name of histogram ${f.name}`);
        }
        for (const [k, g] of groups) {
            if (!g.buckets.length) throw new Error(`prometheus: histogram ${f.name}${k} has no buckets`);
            for (let i = 1; i < g.buckets.length; i++) {
                if (!(g.buckets[i].le > g.buckets[i - 1].le)) throw new Error(`prometheus line ${g.buckets[i].line}: ${f.name} bucket bounds not increasing`);
                if (g.buckets[i].v < g.buckets[i - 1].v) throw new Error(`prometheus line ${g.buckets[i].line}: ${f.name} cumulative bucket count decreases`);
            }
            const last = g.buckets[g.buckets.length - 1];
            if (last.le !== Infinity) throw new Error(`prometheus: histogram ${f.name}${k} has no +Inf bucket`);
            if (g.sum === null || g.count === null) throw new Error(`prometheus: histogram ${f.name}${k} lacks _sum or _count`);
            if (g.count !== last.v) throw new Error(`prometheus: histogram ${f.name}${k}: _count ${g.count} != +Inf bucket ${last.v}`);
        }
    }
    const matches = (labels, match) => Object.entries(match).every(([k, v]) => labels[k] === v);
    const samples = (name, match = {}) => {
        const out = [];
        for (const f of families.values()) for (const s of f.samples) if (s.name === name && matches(s.labels, match)) out.push(s);
        return out;
    };
    return {
        families,
        samples,
        value: (name, match = {}) => samples(name, match).reduce((a, s) => a + s.value, 0),
    };
}

// GET /metrics of a gateway, checked for status and content type, parsed.
export async function getMetrics(port) {
    const r = await request(port, { method: 'GET', path: '/metrics', timeoutMs: 5000 });
    if (r.status !== 200) throw new Error(`/metrics: ${r.status} ${r.body}`);
    if (!/^text\/plain; version=0\.0\.4/.test(String(r.headers['content-type']))) {
        throw new Error(`/metrics content-type ${r.headers['content-type']}`);
    }
    return parsePrometheus(r.body);
}

// ---- the fleet: launched workers, /proc, steady load -------------------------

// /proc/PID/stat of a process: {pid, comm, state, ppid, pgrp, session}, or
// null when there is no such process (a zombie is still there: state 'Z').
export function procStat(pid) {
    let s;
    try { s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8'); } catch { return null; }
    // comm may hold spaces and parentheses: the fields resume after the last ')'.
    const close = s.lastIndexOf(')');
    const f = s.slice(close + 2).split(' ');
    return { pid: Number(pid), comm: s.slice(s.indexOf('(') + 1, close), state: f[0],
        ppid: Number(f[1]), pgrp: Number(f[2]), session: Number(f[3]) };
}

// Running (or stopped), i.e. present and not a zombie.
export function pidAlive(pid) {
    const st = procStat(pid);
    return st !== null && st.state !== 'Z' && st.state !== 'X';
}

// The environment a process started with, as an object (null when gone).
export function procEnviron(pid) {
    let raw;
    try { raw = fs.readFileSync(`/proc/${pid}/environ`, 'utf8'); } catch { return null; }
    const env = {};
    for (const kv of raw.split('\0')) {
        if (!kv) continue;
        const eq = kv.indexOf('=');
        env[eq < 0 ? kv : kv.slice(0, eq)] = eq < 0 ? '' : kv.slice(eq + 1);
    }
    return env;
}

// argv of a process (null when gone).
export function procCmdline(pid) {
    let raw;
    try { raw = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8'); } catch { return null; }
    return raw.split('\0').slice(0, -1);
}

// Every process (zombies included) whose parent is ppid, from /proc: [stat].
export function childrenOf(ppid) {
    const out = [];
    for (const d of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(d)) continue;
        const st = procStat(d);
        if (st && st.ppid === ppid) out.push(st);
    }
    return out;
}

// Every process in process group pgrp (zombies included): [stat].
export function processGroup(pgrp) {
    const out = [];
    for (const d of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(d)) continue;
        const st = procStat(d);
        if (st && st.pgrp === pgrp) out.push(st);
    }
    return out;
}

// A JSON call on an admin listener: resolves {status, body, json (parsed or null)}.
export async function adminCall(adminPort, method, pathName, body) {
    const r = await request(adminPort, { method, path: pathName, body, timeoutMs: 5000 });
    let json = null;
    try { json = JSON.parse(r.body); } catch { /* not JSON */ }
    return { status: r.status, body: r.body, headers: r.headers, json };
}

// The fleet's workers as GET /admin/models shows them, all models together:
// [{id, model, worker, url, pid, gpus, device, port, state, ready, restarts,
// crashes, last_exit, started_at, command}].
export async function fleetWorkers(adminPort) {
    const r = await adminCall(adminPort, 'GET', '/admin/models');
    if (r.status !== 200) throw new Error(`GET /admin/models: ${r.status} ${r.body}`);
    return r.json.models.flatMap((m) => m.workers || []);
}

// The names GET /v1/models lists.
export async function listedModels(port) {
    const r = await request(port, { path: '/v1/models', timeoutMs: 3000 });
    if (r.status !== 200) throw new Error(`/v1/models: ${r.status} ${r.body}`);
    return r.json().data.map((m) => m.id);
}

// The command line of a launched fake upstream (tests/fakes/upstream.mjs) on
// port: stdin stays /dev/null, so no --exit-on-stdin-eof.
export function fakeCommand(port, name) {
    return [process.execPath, FAKE, '--port', String(port), '--name', name];
}

// A launchable stand-in for a worker that is loading: GET /health answers 503
// {"status":"loading"} until someone POSTs /_ready to it (after that 200);
// every other request is counted and answered like a chat completion.
// GET /_stats gives {requests, health, ready}. Run as `node -e GATED_WORKER PORT`.
export const GATED_WORKER = `
const http = require('node:http');
let ready = false, requests = 0, health = 0;
http.createServer((req, res) => {
  const parts = [];
  req.on('data', (d) => parts.push(d));
  req.on('end', () => {
    const json = (st, o) => { const b = JSON.stringify(o); res.writeHead(st, {'content-type': 'application/json', 'content-length': Buffer.byteLength(b)}); res.end(b); };
    if (req.url === '/health') { health++; return ready ? json(200, {status: 'ok'}) : json(503, {status: 'loading'}); }
    if (req.url === '/_ready') { ready = true; return json(200, {ready}); }
    if (req.url === '/_stats') return json(200, {requests, health, ready});
    requests++;
    let model = 'gated';
    try { model = JSON.parse(Buffer.concat(parts).toString()).model || model; } catch {}
    json(200, {id: 'chatcmpl-gated', object: 'chat.completion', created: 1, model,
      choices: [{index: 0, message: {role: 'assistant', content: 'gated'}, finish_reason: 'stop'}],
      usage: {prompt_tokens: 1, completion_tokens: 1, total_tokens: 2}});
  });
}).listen(Number(process.argv[1]), '127.0.0.1');
`.replace(/\n\s*/g, ' ');   // one line: config strings hold no control characters

export function gatedCommand(port) {
    return [process.execPath, '-e', GATED_WORKER, String(port)];
}

// Steady load on a gateway: `width` loops, each sending one request at a time
// (chat for the next model of `models`, round robin, max_tokens 4, fresh
// connection) until stop(). Every answer is kept in `results` as {model,
// status, body (non-200 only), error, t0, t1 (Date.now() at send and at
// answer), backend, served}. models may be changed while it runs (setModels).
// stop() waits for the requests in flight and resolves the results; pass the
// test's context as opts.t to have it called when the test ends, passed or
// not. The loops also end by themselves after opts.maxMs (default 5 minutes,
// longer than any test file): a load that a failed test never stopped once
// kept a test file's process alive for 40 minutes, sending to a stopped
// gateway, until it ran out of memory.
export function startLoad(port, models, opts = {}) {
    const width = opts.width || 4;
    const deadline = Date.now() + (opts.maxMs || 300000);
    let list = [...models];
    let stopping = false;
    let next = 0;
    const results = [];
    const one = async () => {
        const m = list[next++ % list.length];
        const t0 = Date.now();
        const rec = { model: m, status: null, body: null, error: null, t0, t1: 0, backend: null, served: null };
        try {
            const r = await postJson(port, '/v1/chat/completions',
                { model: m, messages: [{ role: 'user', content: 'hi' }], max_tokens: opts.maxTokens || 4 },
                opts.headers || {}, { timeoutMs: opts.timeoutMs || 15000 });
            rec.status = r.status;
            rec.backend = r.headers['x-modelmux-backend'] || null;
            rec.served = r.headers['x-modelmux-model'] || null;
            if (r.status !== 200) rec.body = r.body;
        } catch (e) {
            rec.error = e.message;
        }
        rec.t1 = Date.now();
        results.push(rec);
    };
    const loop = async () => { while (!stopping && Date.now() < deadline) await one(); };
    const loops = Array.from({ length: width }, loop);
    const stop = async () => {
        stopping = true;
        await Promise.all(loops);
        return results;
    };
    if (opts.t) opts.t.after(stop);
    return {
        results,
        setModels(m) { list = [...m]; },
        // Resolves once n more answers than now have come back.
        async more(n, timeoutMs = 10000) {
            const target = results.length + n;
            await waitFor(() => results.length >= target, timeoutMs, { what: `${n} more answers under load` });
        },
        stop,
    };
}

// The failed answers (not 200, or no answer) of a load's results, optionally
// only those for which keep(rec) is true; for assertion messages.
export function loadFailures(results, keep = () => true) {
    return results.filter((r) => keep(r) && r.status !== 200).map((r) => ({ model: r.model, status: r.status,
        error: r.error, body: r.body && r.body.slice(0, 300), t0: r.t0, t1: r.t1 }));
}
