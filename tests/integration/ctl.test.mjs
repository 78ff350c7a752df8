// `modelmux-gateway ctl`: the fleet's command line over the admin API, run as
// a real process against a real gateway in front of fake upstreams. What it
// prints must be what the API holds, and what it changes must change routing.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { TMP, chat, gatewayBin, request, startFake, startGateway, waitFor } from './lib.mjs';

let A, B, C, D, E, gw, gwTok;
const TOKEN = 'ctl-test-token-7f3a';
const HEALTH = { interval_ms: 50, timeout_ms: 500, rise: 1, fall: 1 };

// Runs `modelmux-gateway ctl ...args`; resolves {code, stdout, stderr}. The
// environment never carries the caller's MODELMUX_* settings, so a test
// sees only what it passes. opts.stdin: text written to its stdin.
// opts.onSpawn(proc): called at once (tests that act while it runs).
function ctl(args, opts = {}) {
    const env = { ...process.env };
    delete env.MODELMUX_ADMIN_URL;
    delete env.MODELMUX_ADMIN_TOKEN;
    Object.assign(env, opts.env || {});
    return new Promise((resolve, reject) => {
        const proc = spawn(gatewayBin(), ['ctl', ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
        let stdout = '';
        let stderr = '';
        proc.stdout.on('data', (d) => { stdout += d; });
        proc.stderr.on('data', (d) => { stderr += d; });
        const t = setTimeout(() => { proc.kill('SIGKILL'); }, opts.timeoutMs || 20000);
        proc.on('error', (e) => { clearTimeout(t); reject(e); });
        proc.on('exit', (code, signal) => { clearTimeout(t); resolve({ code, signal, stdout, stderr }); });
        // ctl may exit (a usage error) before it reads its input: the pipe
        // then breaks, which is not the test's concern.
        proc.stdin.on('error', () => {});
        proc.stdin.end(opts.stdin || '');
        if (opts.onSpawn) opts.onSpawn(proc);
    });
}

const admin = (g = gw) => ['--admin', `http://127.0.0.1:${g.adminPort}`];

// A table printed by ctl: the first line names the columns; cells never
// hold spaces. Returns one object per row, keyed by column name.
function table(text) {
    const lines = text.trimEnd().split('\n');
    const head = lines[0].split(/\s+/);
    return lines.slice(1).map((l) => {
        const cells = l.split(/\s+/);
        assert.equal(cells.length, head.length, `row ${JSON.stringify(l)} has ${cells.length} cells, header ${head.length}`);
        return Object.fromEntries(head.map((h, i) => [h, cells[i]]));
    });
}

async function ok(args, opts) {
    const r = await ctl(args, opts);
    assert.equal(r.code, 0, `ctl ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
    assert.equal(r.stderr, '', 'nothing on stderr on success');
    return r;
}

async function adminModel(name, g = gw) {
    const r = await request(g.adminPort, { path: `/admin/models/${name}`, timeoutMs: 3000 });
    return r.status === 200 ? r.json() : null;
}

function writeEntry(name, obj) {
    fs.mkdirSync(TMP, { recursive: true });
    const file = path.join(TMP, `ctl-${process.pid}-${name}.json`);
    fs.writeFileSync(file, JSON.stringify(obj));
    return file;
}

before(async () => {
    [A, B, C, D, E] = await Promise.all(['A', 'B', 'C', 'D', 'E'].map((name) => startFake({ name })));
    gw = await startGateway({
        threads: 2,
        models: [
            { name: 'a', health: false, retries: 0, backends: [{ url: A.url, weight: 3 }, { url: B.url, weight: 1 }] },
            { name: 'b', health: false, retries: 0, backends: [{ url: C.url }] },
            { name: 'chat', split: [{ model: 'a', weight: 90 }, { model: 'b', weight: 10 }] },
        ],
        default_pool: { health: false, backends: [{ url: E.url }] },
    }, { admin: true });
    gwTok = await startGateway({
        threads: 1,
        admin_token: TOKEN,
        models: [{ name: 't', health: false, backends: [{ url: A.url }] }],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await gwTok?.stop();
    await Promise.all([A, B, C, D, E].map((f) => f?.kill()));
    for (const f of fs.readdirSync(TMP)) if (f.startsWith(`ctl-${process.pid}-`)) fs.rmSync(path.join(TMP, f), { force: true });
});

test('models: one row per backend or variant, with weights and state; --json is the API document', async () => {
    const r = await ok([...admin(), 'models']);
    const rows = table(r.stdout);
    const row = (m, t) => rows.find((x) => x.MODEL === m && x.TARGET === t);
    assert.deepEqual(row('a', A.url), { MODEL: 'a', KIND: 'pool', PUBLISHED: 'yes', TARGET: A.url, WEIGHT: '3', STATE: 'up/closed', INFLIGHT: '0', WORKER: '-' });
    assert.equal(row('a', B.url).WEIGHT, '1');
    assert.equal(row('b', C.url).WEIGHT, '1');
    assert.deepEqual(row('chat', 'a'), { MODEL: 'chat', KIND: 'split', PUBLISHED: 'yes', TARGET: 'a', WEIGHT: '90', STATE: '-', INFLIGHT: '-', WORKER: '-' });
    assert.equal(row('chat', 'b').WEIGHT, '10');
    assert.equal(rows.length, 5, r.stdout);

    const one = table((await ok([...admin(), 'models', 'chat'])).stdout);
    assert.deepEqual(one.map((x) => [x.MODEL, x.TARGET, x.WEIGHT]), [['chat', 'a', '90'], ['chat', 'b', '10']]);

    const j = JSON.parse((await ok([...admin(), '--json', 'models'])).stdout);
    const api = (await request(gw.adminPort, { path: '/admin/models' })).json();
    assert.deepEqual(j.models.map((m) => m.name), api.models.map((m) => m.name));
    assert.deepEqual(j.models.find((m) => m.name === 'a').backends.map((b) => [b.url, b.weight]), [[A.url, 3], [B.url, 1]]);
});

test('backends: every pool backend with health and counters, the default pool included', async () => {
    await chat(gw.port, 'b');
    const rows = table((await ok([...admin(), 'backends'])).stdout);
    const c = rows.find((x) => x.URL === C.url);
    assert.equal(c.MODEL, 'b');
    assert.equal(c.HEALTH, 'up');
    assert.equal(c.BREAKER, 'closed');
    assert.ok(Number(c.REQUESTS) >= 1, `requests counted: ${JSON.stringify(c)}`);
    const dp = rows.find((x) => x.URL === E.url);
    assert.equal(dp.MODEL, '(default_pool)');
    assert.deepEqual(rows.filter((x) => x.MODEL === 'a').map((x) => x.URL), [A.url, B.url]);
    // Options after the command work too.
    const j = JSON.parse((await ok(['backends', '--json', ...admin()])).stdout);
    assert.ok(j.models.some((m) => m.default_pool && m.backends[0].url === E.url), JSON.stringify(j));
});

test('add FILE and add -: the model is listed and routed', async () => {
    const file = writeEntry('n1', { name: 'n1', health: false, backends: [{ url: D.url }] });
    const r = await ok([...admin(), 'add', file]);
    assert.match(r.stdout, /^added n1$/m);
    const rows = table((await ok([...admin(), 'models', 'n1'])).stdout);
    assert.deepEqual(rows.map((x) => [x.KIND, x.PUBLISHED, x.TARGET]), [['pool', 'yes', D.url]]);
    const res = await chat(gw.port, 'n1');
    assert.equal(res.status, 200, res.body);
    assert.equal(res.headers['x-modelmux-backend'], D.url);

    const r2 = await ok([...admin(), 'add', '-'], { stdin: JSON.stringify({ name: 'n2', health: false, backends: [{ url: C.url }] }) });
    assert.match(r2.stdout, /^added n2$/m);
    assert.equal((await chat(gw.port, 'n2')).headers['x-modelmux-backend'], C.url);

    // The same name again: the API's 409, exit 1.
    const dup = await ctl([...admin(), 'add', file]);
    assert.equal(dup.code, 1);
    assert.match(dup.stderr, /model n1 already exists.*\(HTTP 409\)/);
    // A file that is not one model entry never reaches the API.
    const bad = writeEntry('bad', [1, 2]);
    const b = await ctl([...admin(), 'add', bad]);
    assert.equal(b.code, 1);
    assert.match(b.stderr, /expected one model entry/);
    const notJson = await ctl([...admin(), 'add', '-'], { stdin: '{"name":' });
    assert.equal(notJson.code, 1);
    assert.match(notJson.stderr, /stdin: line \d+, column \d+/);
    const missing = await ctl([...admin(), 'add', path.join(TMP, 'no-such-file.json')]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /No such file/);
    // An entry the gateway refuses: its path-precise message, exit 1.
    const inval = await ctl([...admin(), 'add', '-'], { stdin: JSON.stringify({ name: 'n3', backends: [{ url: D.url, weight: -2 }] }) });
    assert.equal(inval.code, 1);
    assert.match(inval.stderr, /weight: expected an integer >= 0, got -2/);
    assert.equal(await adminModel('n3'), null, 'nothing applied');
});

test('add --wait returns only once a launched model is published', async () => {
    // Every backend launched and health-checked: the model is unpublished
    // until a check passes. D answers 503 ("loading") until told otherwise.
    await D.setHealth({ status: 503 });
    const entry = { name: 'w', health: HEALTH, backends: [{ url: D.url, launch: { command: ['sleep', '60'] } }] };
    let proc = null;
    const run = ctl([...admin(), 'add', '-', '--wait', '--timeout', '30'], { stdin: JSON.stringify(entry), onSpawn: (p) => { proc = p; } });
    // Several failed checks later, ctl is still waiting and the model is
    // neither published nor routed.
    const before0 = (await D.stats()).health_checks;
    await waitFor(async () => (await D.stats()).health_checks >= before0 + 4, 5000, { what: 'health checks of w' });
    assert.equal(proc.exitCode, null, 'ctl --wait still running while the worker is loading');
    const m = await adminModel('w');
    assert.equal(m.published, false);
    const rows = table((await ok([...admin(), 'models', 'w'])).stdout);
    assert.equal(rows[0].PUBLISHED, 'no');
    assert.equal((await chat(gw.port, 'w')).status, 404);

    await D.setHealth({});
    const r = await run;
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^w: published$/m);
    assert.equal((await adminModel('w')).published, true);
    const res = await chat(gw.port, 'w');
    assert.equal(res.status, 200, res.body);
    assert.equal(res.headers['x-modelmux-backend'], D.url);

    // One that never becomes ready: exit 1 when the timeout passes. (w
    // goes first: two launched workers may not share a port.)
    await ok([...admin(), 'remove', 'w']);
    await D.setHealth({ status: 503 });
    const t0 = Date.now();
    const late = await ctl([...admin(), 'add', '--wait', '--timeout', '1', '-'], { stdin: JSON.stringify({ ...entry, name: 'w2' }) });
    assert.equal(late.code, 1, late.stdout);
    assert.match(late.stderr, /w2: not published within 1 s/);
    assert.ok(Date.now() - t0 >= 1000, 'waited the whole timeout');
    assert.equal((await adminModel('w2')).published, false);
    await D.setHealth({});
    await ok([...admin(), 'remove', 'w2']);
});

test('weights: a backend at 0 gets no traffic; split weights move traffic; both visible in GET', async () => {
    const r = await ok([...admin(), 'weights', 'a', '--backend', `${B.url}=0`]);
    assert.match(r.stdout, /^updated a$/m);
    const m = await adminModel('a');
    assert.deepEqual(m.backends.map((b) => [b.url, b.weight]), [[A.url, 3], [B.url, 0]]);
    const rows = table((await ok([...admin(), 'models', 'a'])).stdout);
    assert.deepEqual(rows.map((x) => [x.TARGET, x.WEIGHT]), [[A.url, '3'], [B.url, '0']]);
    const bBefore = (await B.stats()).requests;
    for (let i = 0; i < 12; i++) {
        const res = await chat(gw.port, 'a');
        assert.equal(res.status, 200);
        assert.equal(res.headers['x-modelmux-backend'], A.url, 'the drained backend is never picked');
    }
    assert.equal((await B.stats()).requests, bBefore);

    // Split: all of "chat" to b.
    await ok([...admin(), 'weights', 'chat', 'a=0', 'b=5']);
    assert.deepEqual((await adminModel('chat')).split, [{ model: 'a', weight: 0 }, { model: 'b', weight: 5 }]);
    for (let i = 0; i < 12; i++) {
        const res = await chat(gw.port, 'chat');
        assert.equal(res.headers['x-modelmux-model'], 'b');
    }
    // And back, with both weights in one call.
    await ok([...admin(), 'weights', 'chat', 'a=90', 'b=10']);
    await ok([...admin(), 'weights', 'a', '--backend', `${B.url}=1`]);
    assert.deepEqual((await adminModel('a')).backends.map((b) => b.weight), [3, 1]);

    // Errors from the API: exit 1 with its message; nothing changed.
    const unknown = await ctl([...admin(), 'weights', 'chat', 'zzz=1']);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /model chat has no split entry zzz \(HTTP 404\)/);
    const neg = await ctl([...admin(), 'weights', 'chat', 'a=-1']);
    assert.equal(neg.code, 1);
    assert.match(neg.stderr, /configuration not changed: .*weight: expected an integer >= 0/);
    assert.deepEqual((await adminModel('chat')).split.map((s) => s.weight), [90, 10]);
});

test('remove: the model disappears and new requests get 404', async () => {
    await ok([...admin(), 'add', '-'], { stdin: JSON.stringify({ name: 'gone', health: false, backends: [{ url: C.url }] }) });
    assert.equal((await chat(gw.port, 'gone')).status, 200);
    const r = await ok([...admin(), 'remove', 'gone']);
    assert.match(r.stdout, /^removed gone$/m);
    const rows = table((await ok([...admin(), 'models'])).stdout);
    assert.ok(!rows.some((x) => x.MODEL === 'gone'), 'not listed');
    const res = await chat(gw.port, 'gone');
    assert.equal(res.status, 404, res.body);
    const again = await ctl([...admin(), 'remove', 'gone']);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /no model named gone \(HTTP 404\)/);
    // A model others depend on cannot go: the API's 409.
    const dep = await ctl([...admin(), 'remove', 'b']);
    assert.equal(dep.code, 1);
    assert.match(dep.stderr, /configuration not changed.*\(HTTP 409\)/);
    assert.ok(await adminModel('b'), 'b still there');
});

test('API errors exit 1 with the message; bad usage exits 2', async () => {
    const unknown = await ctl([...admin(), 'models', 'nope']);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /^modelmux-gateway ctl: no model named nope \(HTTP 404\)$/m);
    assert.equal(unknown.stdout, '');
    const unknownJson = await ctl([...admin(), '--json', 'models', 'nope']);
    assert.equal(unknownJson.code, 1);
    assert.equal(JSON.parse(unknownJson.stdout).error.code, 404, 'with --json the error body is printed');

    const down = await ctl(['--admin', 'http://127.0.0.1:1', 'models']);
    assert.equal(down.code, 1);
    assert.match(down.stderr, /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/);

    const usage = [
        [[], /a COMMAND is required/],
        [['frobnicate'], /unknown command 'frobnicate'/],
        [['models', 'a', 'b'], /at most one NAME/],
        [['backends', 'x'], /takes no arguments/],
        [['add'], /add takes one FILE/],
        [['remove'], /remove takes one model NAME/],
        [['weights', 'chat'], /weights takes NAME/],
        [['weights', 'chat', 'a'], /expected MODEL=WEIGHT/],
        [['weights', 'chat', 'a=x'], /expected MODEL=WEIGHT/],
        [['weights', 'a', '--backend', 'http://x=1.5'], /expected URL=WEIGHT/],
        [['models', '--backend'], /--backend goes with weights/],
        [['models', '--wait'], /--wait and --timeout go with add/],
        [['add', 'f.json', '--timeout', '3'], /--timeout needs --wait/],
        [['add', 'f.json', '--wait', '--timeout', 'soon'], /--timeout: expected seconds/],
        [['--frob', 'models'], /unknown or incomplete option '--frob'/],
        [['--admin'], /--admin needs a URL/],
        [['--admin', 'ftp://127.0.0.1:1', 'models'], /--admin: expected http/],
        [['--admin', 'http://user:pw@127.0.0.1:1', 'models'], /--admin: expected http/],
        [['--token', 'two words', 'models'], /admin token must be/],
        [['models', 'a?b'], /cannot be written in an admin API path/],
        [['reload'], /SIGHUP.*kill -HUP/],
    ];
    for (const [args, re] of usage) {
        const r = await ctl([...admin(), ...args]);
        assert.equal(r.code, 2, `ctl ${args.join(' ')}: exit ${r.code}, stderr ${r.stderr}`);
        assert.match(r.stderr, re, `ctl ${args.join(' ')}`);
    }
    const help = await ok(['--help']);
    assert.match(help.stdout, /usage: modelmux-gateway ctl/);
    assert.match(help.stdout, /kill -HUP/);
});

test('a configured admin token is required: --token, MODELMUX_ADMIN_TOKEN or -c CONFIG', async () => {
    const none = await ctl([...admin(gwTok), 'models']);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /admin token required.*\(HTTP 401\)/);
    assert.match(none.stderr, /--token or MODELMUX_ADMIN_TOKEN/);
    const wrong = await ctl([...admin(gwTok), '--token', 'not-it', 'models']);
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /HTTP 401/);
    const wrongRemove = await ctl([...admin(gwTok), '--token', 'not-it', 'remove', 't']);
    assert.equal(wrongRemove.code, 1);
    assert.ok(await adminModel('t', gwTok) === null, 'GET without a token is refused too');

    const flag = await ok([...admin(gwTok), '--token', TOKEN, 'models']);
    assert.deepEqual(table(flag.stdout).map((x) => [x.MODEL, x.TARGET]), [['t', A.url]]);
    const env = await ok([...admin(gwTok), 'models'], { env: { MODELMUX_ADMIN_TOKEN: TOKEN } });
    assert.equal(table(env.stdout)[0].MODEL, 't');
    // The URL from the environment too.
    await ok(['models'], { env: { MODELMUX_ADMIN_TOKEN: TOKEN, MODELMUX_ADMIN_URL: `http://127.0.0.1:${gwTok.adminPort}/` } });
    // -c: admin_listen and admin_token from the gateway's own config.
    const cfg = await ok(['-c', gwTok.configFile, 'backends']);
    assert.equal(table(cfg.stdout)[0].URL, A.url);
    // Changes go through with the token.
    await ok(['-c', gwTok.configFile, 'weights', 't', '--backend', `${A.url}=7`]);
    const r = await request(gwTok.adminPort, { path: '/admin/models/t', headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(r.json().backends[0].weight, 7);
});

test('answers from a misbehaving admin server: capped, sanitised, never trusted as JSON', async () => {
    // A stand-in admin API (this process) that answers what a test asks for.
    let answer = null;
    const server = http.createServer((req, res) => {
        req.resume();
        req.on('end', () => answer(req, res));
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${server.address().port}`;
    try {
        const ESC = '\u001b';
        // Control characters in an error message or a table cell reach the
        // terminal as '?'.
        answer = (req, res) => {
            res.writeHead(500, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ error: { message: `bad${ESC}[31m\u0085thing`, type: 'server_error', param: null, code: 500 } }));
        };
        const e = await ctl(['--admin', url, 'backends']);
        assert.equal(e.code, 1);
        assert.ok(!e.stderr.includes(ESC) && !e.stderr.includes('\u0085'), JSON.stringify(e.stderr));
        assert.match(e.stderr, /bad\?\[31m\?thing \(HTTP 500\)/);

        answer = (req, res) => {
            res.writeHead(200, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ generation: 1, models: [{ name: `x${ESC}]0;pwned\u0007`, kind: 'pool', published: true,
                backends: [{ url: 'http://h:1', weight: 1, health: 'up', breaker: 'closed', inflight: 0 }], workers: [] }] }));
        };
        const t = await ok(['--admin', url, 'models']);
        assert.ok(!t.stdout.includes(ESC) && !t.stdout.includes('\u0007'), JSON.stringify(t.stdout));
        assert.equal(table(t.stdout)[0].MODEL, 'x?]0;pwned?');

        // Workers are matched to backends by url; pid/state shown.
        answer = (req, res) => {
            res.writeHead(200, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ name: 'q', kind: 'pool', published: false,
                backends: [{ url: 'http://127.0.0.1:8101', weight: 1, health: 'down', breaker: 'closed', inflight: 0 },
                    { url: 'http://127.0.0.1:8102', weight: 2, health: 'up', breaker: 'open', inflight: 3 }],
                workers: [{ url: 'http://127.0.0.1:8102', pid: 4242, state: 'running' }, { url: 'http://127.0.0.1:8199', pid: null, state: 'draining' }] }));
        };
        const w = table((await ok(['--admin', url, 'models', 'q'])).stdout);
        assert.deepEqual(w.map((x) => [x.TARGET, x.WEIGHT, x.STATE, x.INFLIGHT, x.WORKER]), [
            ['http://127.0.0.1:8101', '1', 'down/closed', '0', '-'],
            ['http://127.0.0.1:8102', '2', 'up/open', '3', '4242/running'],
            ['http://127.0.0.1:8199', '-', '-', '-', '-/draining'],
        ]);
        assert.ok(w.every((x) => x.PUBLISHED === 'no'));

        // Not JSON, and not JSON errors.
        answer = (req, res) => { res.writeHead(200); res.end('<html>hi</html>'); };
        const nj = await ctl(['--admin', url, 'models']);
        assert.equal(nj.code, 1);
        assert.match(nj.stderr, /not a JSON object/);
        answer = (req, res) => { res.writeHead(502); res.end('upstream said no\r\n'); };
        const ne = await ctl(['--admin', url, 'remove', 'x']);
        assert.equal(ne.code, 1);
        assert.match(ne.stderr, /unexpected answer: upstream said no\?\? \(HTTP 502\)/);

        // Past the 64 MiB cap the transfer stops and ctl fails.
        answer = (req, res) => {
            res.writeHead(200, { 'content-type': 'application/json' });
            const chunk = Buffer.alloc(1 << 20, 0x20);
            let sent = 0;
            const more = () => {
                while (sent < 80) {
                    sent++;
                    if (!res.write(chunk)) { res.once('drain', more); return; }
                }
                res.end();
            };
            res.on('close', () => { sent = 1e9; });
            more();
        };
        const big = await ctl(['--admin', url, 'backends']);
        assert.equal(big.code, 1);
        assert.match(big.stderr, /larger than 67108864 bytes/);

        // What ctl sends: the method, the raw path, the bearer token, the JSON body.
        let seen = null;
        answer = (req, res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{"status":"updated"}'); };
        server.removeAllListeners('request');
        server.on('request', (req, res) => {
            let body = '';
            req.on('data', (d) => { body += d; });
            req.on('end', () => { seen = { method: req.method, url: req.url, auth: req.headers.authorization, ct: req.headers['content-type'], body }; answer(req, res); });
        });
        await ok(['--admin', `${url}/base/`, '--token', 'tk', 'weights', 'org/m.1', 'v1=2', '--backend', 'http://h:1/p=x=0']);
        assert.deepEqual(seen, { method: 'PATCH', url: '/base/admin/models/org/m.1', auth: 'Bearer tk', ct: 'application/json',
            body: JSON.stringify({ split: [{ model: 'v1', weight: 2 }], backends: [{ url: 'http://h:1/p=x', weight: 0 }] }) });
        await ok(['--admin', url, 'remove', 'a/../b']);
        assert.deepEqual([seen.method, seen.url, seen.auth], ['DELETE', '/admin/models/a/../b', undefined]);
    } finally {
        server.closeAllConnections?.();
        await new Promise((r) => server.close(r));
    }
});
