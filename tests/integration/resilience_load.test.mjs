// Resilience under load: 200 concurrent requests (half of them streams) on
// three backends, one of which is killed (-9) while they are in flight.
// Every request that had not started streaming must succeed; a stream that
// had started on the killed backend ends with one SSE error event.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startFake, startGateway, chat, streamRequest, waitFor } from './lib.mjs';

let A, B, C, gw;

before(async () => {
    [A, B, C] = await Promise.all(['A', 'B', 'C'].map((name) => startFake({ name })));
    gw = await startGateway({
        threads: 2,
        models: [{
            name: 'm',
            backends: [{ url: A.url }, { url: B.url }, { url: C.url }],
            health: { interval_ms: 200, timeout_ms: 200, rise: 2, fall: 2 },
        }],
    }, { admin: true });
});

after(async () => {
    await gw?.stop();
    await Promise.all([A, B, C].map((f) => f?.kill()));
});

test('load: 200 concurrent requests, one of three backends killed: every request that had not started streaming succeeds', async () => {
    const N = 200;
    const jobs = [];
    for (let i = 0; i < N; i++) {
        if (i % 2 === 0) {
            // Non-streaming: the answer comes 1000..1270 ms after the
            // request arrives, so all of them are waiting for their first
            // byte when B dies.
            const h = { 'x-fake-first-delay-ms': String(1000 + (i % 10) * 30) };
            jobs.push(chat(gw.port, 'm', h, { timeoutMs: 15000 }).then((r) => ({ i, stream: false, r }),
                (e) => ({ i, stream: false, error: e })));
        } else {
            // Streams: some begin at once (these may be cut by the kill),
            // others only after it (these must be retried if on B).
            const h = { 'x-fake-chunks': '6', 'x-fake-delay-ms': '200', 'x-fake-first-delay-ms': String(((i >> 1) % 4) * 500) };
            jobs.push(streamRequest(gw.port, { model: 'm', stream: true, messages: [{ role: 'user', content: String(i) }] }, h,
                { timeoutMs: 15000 }).then((o) => ({ i, stream: true, o })));
        }
    }
    // Kill B once every request has reached a backend.
    await waitFor(async () => {
        const s = await Promise.all([A, B, C].map((f) => f.stats()));
        return s.reduce((x, y) => x + y.requests, 0) >= N;
    }, 10000, { what: `all ${N} requests at the backends`, intervalMs: 20 });
    const bAtKill = (await B.stats()).inflight;
    await B.kill9();
    const results = await Promise.all(jobs);

    const failures = [];
    let cut = 0;
    for (const x of results) {
        if (!x.stream) {
            if (x.error || x.r.status !== 200) {
                failures.push(`#${x.i} (non-streaming): ${x.error ? x.error.message : `${x.r.status} ${x.r.body.slice(0, 200)}`}`);
                continue;
            }
            const j = JSON.parse(x.r.body);
            if (j.choices?.[0]?.message?.content === undefined) failures.push(`#${x.i}: not a completion: ${x.r.body.slice(0, 200)}`);
            continue;
        }
        const o = x.o;
        const done = o.events.length > 0 && o.events[o.events.length - 1] === 'data: [DONE]';
        const chunks = o.events.filter((e) => e.includes('chat.completion.chunk')).length;
        if (o.status === 200 && done && chunks === 6) continue;
        // Not complete: allowed only for a stream that had started on B,
        // and then it must end with one error event, never a hang.
        const last = o.events[o.events.length - 1] || '';
        const started = o.status === 200 && o.headers['x-modelmux-backend'] === B.url && chunks >= 1;
        if (started && !o.timedOut && last.startsWith('data: {"error"') && !o.events.includes('data: [DONE]')) {
            cut++;
            continue;
        }
        failures.push(`#${x.i} (stream): status ${o.status} backend ${o.headers?.['x-modelmux-backend']} chunks ${chunks} ` +
            `timedOut ${o.timedOut} last ${JSON.stringify(last.slice(0, 200))} error ${o.error?.message}`);
    }
    assert.ok(bAtKill > 10, `B had requests in flight when it was killed (${bAtKill})`);
    assert.equal(failures.length, 0, `${failures.length} of ${N} requests failed (B had ${bAtKill} in flight, ` +
        `${cut} streams cut mid-way); the first ones:\n${failures.slice(0, 5).join('\n')}`);
    assert.ok(cut <= bAtKill);
    // The gateway keeps serving, without B.
    const r = await chat(gw.port, 'm');
    assert.equal(r.status, 200);
    assert.notEqual(r.headers['x-modelmux-backend'], B.url);
});
