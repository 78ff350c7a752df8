// The dashboard (GET /dashboard on the admin listener), opened in headless
// Chromium (Debian's package, driven by playwright-core): what it shows must
// be what the gateway routed, it must follow backend state changes and new
// traffic without a reload, and with an admin token it must work from
// ?token=. A screenshot lands in build/screenshots/dashboard.png.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, chat, request, startFake, startGateway, waitFor } from './lib.mjs';

const CHROMIUM = '/usr/bin/chromium';
const SHOT = path.join(ROOT, 'build', 'screenshots', 'dashboard.png');
const PAGE = fs.readFileSync(path.join(ROOT, 'gateway', 'dashboard.html'));
const HEALTH = { interval_ms: 100, timeout_ms: 500, rise: 1, fall: 2 };

let browser, A, B, C, gw;

before(async () => {
    // Fail loudly: a skipped test would hide a dashboard nobody checked.
    if (!fs.existsSync(CHROMIUM)) {
        throw new Error(`${CHROMIUM} is missing: install Debian's chromium package ` +
            '(`make deps` as root, or `apt-get install chromium`)');
    }
    let pw;
    try {
        pw = await import('playwright-core');
    } catch (e) {
        throw new Error(`playwright-core is not installed: run \`npm ci\` in tests/ (${e.message})`);
    }
    [A, B, C] = await Promise.all(['A', 'B', 'C'].map((name) => startFake({ name })));
    browser = await pw.chromium.launch({
        executablePath: CHROMIUM,
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    gw = await startGateway({
        threads: 2,
        models: [
            { name: 'a', backends: [{ url: A.url }], health: HEALTH, retries: 0,
                breaker: { consecutive_failures: 0, min_requests: 1000 } },
            // C (weight 0, never picked) is there because a breaker never
            // ejects the only backend of a pool.
            { name: 'b', backends: [{ url: B.url }, { url: C.url, weight: 0 }], health: HEALTH, retries: 0,
                breaker: { consecutive_failures: 3, min_requests: 1000, open_ms: 60000, max_ejection_percent: 100 } },
            { name: 'chat', split: [{ model: 'a', weight: 75 }, { model: 'b', weight: 25 }] },
        ],
    }, { admin: true });
});

after(async () => {
    await browser?.close();
    await gw?.stop();
    await Promise.all([A, B, C].map((f) => f?.kill()));
});

async function adminStats(g = gw, headers = {}) {
    const r = await request(g.adminPort, { path: '/admin/stats', headers, timeoutMs: 3000 });
    assert.equal(r.status, 200, r.body);
    return r.json();
}

// What the gateway counted, per (model, variant), summed over backends: the
// numbers the page must show. failed = 5xx answers + broken streams.
function truth(stats) {
    const t = new Map();
    for (const s of stats.series) {
        const k = `${s.model}/${s.variant}`;
        const o = t.get(k) || { model: s.model, variant: s.variant, requests: 0, failed: 0, series: [] };
        o.requests += s.requests;
        o.failed += s.responses['5xx'] + s.errors.midstream;
        o.series.push(s);
        t.set(k, o);
    }
    return t;
}

// Every variant row of the page: raw numbers from attributes, shown text per cell.
function pageRows(page) {
    return page.$$eval('tr.variant', (trs) => trs.map((tr) => ({
        key: `${tr.dataset.model}/${tr.dataset.variant}`,
        ...tr.dataset,
        text: Object.fromEntries([...tr.querySelectorAll('td[data-col]')].map((td) => [td.dataset.col, td.textContent])),
    })));
}

function pageBackend(page, url) {
    return page.$eval(`tr.backend[data-url="${url}"]`, (tr) => ({
        ...tr.dataset,
        healthText: tr.querySelector('[data-col=health]').textContent,
        breakerText: tr.querySelector('[data-col=breaker]').textContent,
        retryText: tr.querySelector('[data-col=retry_in]').textContent,
    }));
}

// The rows shown equal the truth: same set, same counts, shares from counts.
function compare(rows, t) {
    const totals = new Map();
    for (const o of t.values()) totals.set(o.model, (totals.get(o.model) || 0) + o.requests);
    const shown = new Map(rows.map((r) => [r.key, r]));
    assert.deepEqual([...shown.keys()].sort(), [...t.keys()].sort(), 'one row per (model, variant) routed');
    for (const [k, o] of t) {
        const r = shown.get(k);
        assert.equal(Number(r.requests), o.requests, `${k} requests`);
        assert.equal(r.text.requests, String(o.requests), `${k} requests shown`);
        assert.equal(Number(r.failed), o.failed, `${k} failed`);
        assert.equal(r.text.failed, String(o.failed), `${k} failed shown`);
        const share = o.requests / totals.get(o.model);
        assert.ok(Math.abs(Number(r.share) - share) < 1e-12, `${k} share ${r.share} vs ${share}`);
        assert.equal(r.text.share, `${(100 * share).toFixed(1)}%`, `${k} share shown`);
        const rate = o.requests ? o.failed / o.requests : null;
        assert.equal(r.text.error_rate, rate === null ? '–' : `${(100 * rate).toFixed(1)}%`, `${k} error rate shown`);
    }
}

// Waits until the page shows `t` (the page polls every second).
async function pageShows(page, t, what) {
    // A mismatch throws; waitFor retries and, at the deadline, names the last one.
    await waitFor(async () => { compare(await pageRows(page), t); return true; }, 8000, { what, intervalMs: 100 });
}

const send = async (n, fn) => {
    const out = [];
    for (let i = 0; i < n; i += 5) out.push(...await Promise.all(Array.from({ length: Math.min(5, n - i) }, fn)));
    return out;
};

test('dashboard: shows the split, counts, errors and backend states it was sent, and refreshes itself', async () => {
    // The page itself, as embedded: byte for byte the source file.
    const r = await request(gw.adminPort, { path: '/dashboard' });
    assert.equal(r.status, 200);
    assert.equal(r.headers['content-type'], 'text/html; charset=utf-8');
    assert.equal(r.headers['cache-control'], 'no-store');
    assert.equal(r.body, PAGE.toString('utf8'));

    // Traffic with a known shape: 40 + 2 failing to the split, 10 + 3 failing to a.
    const ok = (x) => x.status === 200;
    const r1 = await send(40, () => chat(gw.port, 'chat'));
    assert.ok(r1.every(ok), 'chat answered');
    assert.ok((await send(10, () => chat(gw.port, 'a'))).every(ok));
    const bad = { 'x-fake-mode': 'status:500' };
    assert.ok((await send(3, () => chat(gw.port, 'a', bad))).every((x) => x.status === 500));
    assert.ok((await send(2, () => chat(gw.port, 'chat', bad))).every((x) => x.status === 500));

    let t = truth(await adminStats());
    const ca = t.get('chat/a'), cb = t.get('chat/b'), aa = t.get('a/a');
    assert.ok(ca && cb && aa, `series: ${[...t.keys()]}`);
    assert.equal(ca.requests + cb.requests, 42, 'every chat request counted once');
    assert.ok(ca.requests > 0 && cb.requests > 0, 'both variants got traffic');
    assert.equal(ca.failed + cb.failed, 2);
    assert.equal(aa.requests, 13);
    assert.equal(aa.failed, 3);
    // The gateway's counts agree with what the backends received.
    assert.equal((await A.stats()).requests, ca.requests + aa.requests);
    assert.equal((await B.stats()).requests, cb.requests);

    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const jsErrors = [];
    page.on('pageerror', (e) => jsErrors.push(e.message));
    page.on('console', (m) => { if (m.type() === 'error') jsErrors.push(m.text()); });
    let navigations = 0;
    page.on('framenavigated', (f) => { if (f === page.mainFrame()) navigations++; });
    await page.goto(`http://127.0.0.1:${gw.adminPort}/dashboard`);
    await page.waitForSelector('tr.variant', { timeout: 8000 });
    assert.equal(await page.$eval('#conn', (e) => e.dataset.state), 'live');

    await pageShows(page, t, 'the page shows the counts of /admin/stats');
    const rows = new Map((await pageRows(page)).map((x) => [x.key, x]));
    assert.equal(rows.get('chat/a').text.weight, '75.0% (75)');
    assert.equal(rows.get('chat/b').text.weight, '25.0% (25)');
    assert.equal(rows.get('a/a').text.weight, '–', 'not a split');
    // Its quantiles (its own bucket arithmetic) are the gateway's: one series each.
    for (const k of ['chat/a', 'chat/b', 'a/a']) {
        const s = t.get(k).series;
        assert.equal(s.length, 1);
        assert.ok(Math.abs(Number(rows.get(k).p50) - s[0].latency.p50_ms) < 1e-6, `${k} p50 ${rows.get(k).p50} vs ${s[0].latency.p50_ms}`);
        assert.ok(Math.abs(Number(rows.get(k).p95) - s[0].latency.p95_ms) < 1e-6, `${k} p95`);
    }
    for (const f of [A, B, C]) {
        const b = await pageBackend(page, f.url);
        assert.equal(b.health, 'up');
        assert.equal(b.healthText, 'up');
        assert.equal(b.breaker, 'closed');
        assert.equal(b.breakerText, 'closed');
    }
    // Charts were drawn: some pixels of the requests/s canvas of chat are set.
    await waitFor(() => page.$eval('article[data-model="chat"] canvas', (c) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
        return n > 500;
    }), 5000, { what: 'a chart drawn' });

    // It refreshes by itself: more traffic shows up with no reload.
    await page.evaluate(() => { window.__sameDocument = true; });
    assert.ok((await send(6, () => chat(gw.port, 'chat'))).every(ok));
    assert.ok((await send(2, () => chat(gw.port, 'b'))).every(ok));
    t = truth(await adminStats());
    assert.equal(t.get('chat/a').requests + t.get('chat/b').requests, 48);
    assert.equal(t.get('b/b').requests, 2);
    await pageShows(page, t, 'the page follows new traffic by itself');
    assert.equal(await page.evaluate(() => window.__sameDocument), true, 'not reloaded');

    // A's health checks fail: its badge turns "down".
    await A.setHealth({ status: 500 });
    await waitFor(async () => (await pageBackend(page, A.url)).health === 'down', 8000, { what: 'A down on the page', intervalMs: 100 });
    let ba = await pageBackend(page, A.url);
    assert.equal(ba.healthText, 'down');
    assert.equal(ba.breaker, 'closed', 'health, not the breaker');
    assert.equal((await gw.backend('a', A.url)).health, 'down', 'the page agrees with the gateway');

    // B fails requests: three in a row open its breaker; its badge turns "open".
    await B.setMode({ mode: 'status:500' });
    await waitFor(async () => {
        await chat(gw.port, 'b');
        return (await gw.backend('b', B.url)).breaker === 'open';
    }, 5000, { what: 'B breaker open', intervalMs: 1 });
    await waitFor(async () => (await pageBackend(page, B.url)).breaker === 'open', 8000, { what: 'B open on the page', intervalMs: 100 });
    const bb = await pageBackend(page, B.url);
    assert.equal(bb.breakerText, 'open');
    assert.equal(bb.health, 'up');
    assert.match(bb.retryText, /^\d+\.\d s$/, 'an open breaker shows when it retries');

    // The failures are counted on the page too.
    t = truth(await adminStats());
    assert.ok(t.get('b/b').failed >= 3);
    await pageShows(page, t, 'the page shows the new failures');
    assert.equal(await page.evaluate(() => window.__sameDocument), true, 'still not reloaded');
    assert.equal(navigations, 1, 'one navigation: the first load');

    fs.mkdirSync(path.dirname(SHOT), { recursive: true });
    await page.screenshot({ path: SHOT, fullPage: true });
    assert.ok(fs.statSync(SHOT).size > 10000, 'a screenshot with something in it');
    assert.deepEqual(jsErrors, [], 'no script errors on the page');
    await page.close();
});

test('dashboard: with an admin token, the page wants it and works from ?token=', async () => {
    const tok = 'dash/t0k+%x';   // needs percent-encoding in a URL
    const g = await startGateway({
        admin_token: tok,
        models: [{ name: 'a', backends: [{ url: A.url }], health: false }],
    }, { admin: true });
    try {
        const q = `?token=${encodeURIComponent(tok)}`;
        const get = (p, headers = {}) => request(g.adminPort, { path: p, headers });
        assert.equal((await get('/dashboard')).status, 401);
        assert.equal((await get('/dashboard?token=wrong')).status, 401);
        assert.equal((await get(`/dashboard?token=${encodeURIComponent(tok)}x`)).status, 401);
        assert.equal((await get('/dashboard?token=dash%2')).status, 401, 'a cut escape');
        const ok = await get(`/dashboard?x=1&token=${encodeURIComponent(tok)}`);
        assert.equal(ok.status, 200);
        assert.equal(ok.headers['content-type'], 'text/html; charset=utf-8');
        assert.equal(ok.headers['cache-control'], 'no-store');
        assert.equal(ok.body, PAGE.toString('utf8'));
        assert.equal((await get('/dashboard', { authorization: `Bearer ${tok}` })).status, 200);
        // The API itself keeps to the header.
        assert.equal((await get(`/admin/stats${q}`)).status, 401);

        // 401 from the API is explained on the page.
        const page = await browser.newPage();
        await page.route('**/admin/stats', (route) => route.continue({ headers: { ...route.request().headers(), authorization: 'Bearer nope' } }));
        await page.goto(`http://127.0.0.1:${g.adminPort}/dashboard${q}`);
        await waitFor(() => page.$eval('#conn', (e) => e.dataset.state === 'error'), 8000, { what: 'error state' });
        assert.match(await page.$eval('#alert', (e) => e.textContent), /token/);
        await page.unroute('**/admin/stats');
        // With the real token it goes live: the page sent it as a bearer token.
        assert.equal((await chat(g.port, 'a')).status, 200);
        await waitFor(() => page.$eval('#conn', (e) => e.dataset.state === 'live'), 8000, { what: 'live with the token' });
        await waitFor(() => page.$eval('tr.variant[data-model="a"]', (tr) => tr.dataset.requests === '1'), 8000,
            { what: 'the request shown' });
        assert.equal(await page.$eval('#alert', (e) => e.hidden), true);
        await page.close();
    } finally {
        await g.stop();
    }
});
