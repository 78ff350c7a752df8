// Streaming: SSE chunks are relayed as they arrive (no buffering), and a
// client that leaves makes the gateway abort the upstream transfer at once.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startFake, startGateway, model, nowNs, sleep } from './lib.mjs';

let fs1, gw;

before(async () => {
    fs1 = await startFake({ name: 'streamer' });
    gw = await startGateway({
        threads: 2,
        models: [
            model('slow', [{ url: fs1.url }]),
            model('idle', [{ url: fs1.url }], { timeouts: { idle_ms: 300 } }),
        ],
    });
});

after(async () => {
    await gw?.stop();
    await fs1?.kill();
});

// Opens a streaming chat request. onEvent(text, arrivalNs, req) is called per
// SSE event. Resolves {res, events, arrivals, ended, error} when the response
// ends, errors or the request is destroyed.
function streamChat(headers, onEvent, timeoutMs = 10000, modelName = 'slow') {
    return new Promise((resolve) => {
        const out = { res: null, events: [], arrivals: [], ended: false, error: null, timedOut: false };
        const timer = setTimeout(() => { out.timedOut = true; req.destroy(); }, timeoutMs);
        const done = () => { clearTimeout(timer); resolve(out); };
        const req = http.request({
            host: '127.0.0.1', port: gw.port, method: 'POST', path: '/v1/chat/completions', agent: false,
            headers: { 'content-type': 'application/json', ...headers },
        }, (res) => {
            out.res = res;
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
                    if (onEvent) onEvent(ev, t, req);
                }
            });
            res.on('end', () => { out.ended = true; done(); });
            res.on('error', (e) => { out.error = out.error || e; done(); });
            res.on('close', done);
        });
        req.on('error', (e) => { out.error = out.error || e; done(); });
        req.on('close', () => { if (!out.res) done(); });
        req.end(JSON.stringify({ model: modelName, stream: true, messages: [{ role: 'user', content: 'go' }] }));
    });
}

test('streaming: each chunk reaches the client before the next is sent', async () => {
    const n = 5;
    const out = await streamChat({ 'x-fake-chunks': String(n), 'x-fake-delay-ms': '150' });
    assert.equal(out.error, null);
    assert.equal(out.timedOut, false);
    assert.equal(out.res.statusCode, 200);
    assert.match(out.res.headers['content-type'], /^text\/event-stream/);
    assert.equal(out.res.headers['transfer-encoding'], 'chunked');
    assert.equal(out.res.headers['x-modelmux-model'], 'slow');
    assert.equal(out.res.headers['x-modelmux-backend'], fs1.url);
    assert.equal(out.events.length, n + 1, `events: ${JSON.stringify(out.events)}`);
    assert.equal(out.events[n], 'data: [DONE]', 'the final event is [DONE]');
    const chunks = out.events.slice(0, n).map((e) => {
        assert.ok(e.startsWith('data: '), e);
        return JSON.parse(e.slice(6));
    });
    chunks.forEach((c, i) => assert.equal(c.fake.index, i, 'in order'));
    for (let i = 0; i + 1 < n; i++) {
        const arrived = out.arrivals[i];
        const nextSent = BigInt(chunks[i + 1].fake.sent_ns);
        assert.ok(arrived < nextSent,
            `chunk ${i} arrived ${Number(arrived - nextSent) / 1e6} ms after chunk ${i + 1} was sent (buffered)`);
    }
});

test('streaming: client disconnect aborts the upstream within 200 ms', async () => {
    await fs1.reset();
    let disconnectNs = null;
    const out = await streamChat({ 'x-fake-chunks': '50', 'x-fake-delay-ms': '100' }, (ev, t, req) => {
        if (disconnectNs !== null) return;
        disconnectNs = nowNs();
        req.destroy();
    });
    assert.ok(disconnectNs !== null, `got a first chunk (error: ${out.error})`);
    const deadline = Date.now() + 3000;
    let s;
    for (;;) {
        s = await fs1.stats();
        if (s.aborted > 0 || Date.now() > deadline) break;
        await sleep(10);
    }
    assert.equal(s.aborted, 1, `upstream saw the abort (stats ${JSON.stringify({ aborted: s.aborted, completed: s.completed, inflight: s.inflight })})`);
    const ab = s.aborts[0];
    const dt = Number(BigInt(ab.t_ns) - disconnectNs) / 1e6;
    assert.ok(dt < 200, `upstream aborted ${dt.toFixed(1)} ms after the client left`);
    assert.ok(ab.chunks_sent < 10, `the fake stopped early (sent ${ab.chunks_sent} of 50)`);
});

test('streaming: an upstream that dies mid-stream ends the client stream without [DONE]', async () => {
    const out = await streamChat({ 'x-fake-chunks': '5', 'x-fake-mode': 'midstream-close' }, null, 5000);
    assert.equal(out.timedOut, false, 'the client is not left hanging');
    assert.equal(out.res?.statusCode, 200);
    const chunks = out.events.filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)))
        .filter((c) => c.object === 'chat.completion.chunk');
    assert.deepEqual(chunks.map((c) => c.fake.index), [0, 1], `the two chunks sent were relayed: ${JSON.stringify(out.events)}`);
    assert.ok(!out.events.includes('data: [DONE]'), 'no [DONE] invented');
});

test('streaming: a gap longer than idle_ms cuts the upstream and ends the client stream', async () => {
    await fs1.reset();
    const t0 = Date.now();
    const out = await streamChat({ 'x-fake-chunks': '3', 'x-fake-delay-ms': '1500' }, null, 5000, 'idle');
    const dt = Date.now() - t0;
    assert.equal(out.timedOut, false, 'the client is not left hanging');
    assert.equal(out.res?.statusCode, 200);
    assert.ok(!out.events.includes('data: [DONE]'), 'no [DONE]');
    assert.ok(dt >= 250 && dt < 1400, `the stream ended ${dt} ms after it began (idle_ms 300, chunks 1500 ms apart)`);
    const deadline = Date.now() + 2000;
    let s;
    for (;;) {
        s = await fs1.stats();
        if (s.aborted > 0 || Date.now() > deadline) break;
        await sleep(10);
    }
    assert.equal(s.aborted, 1, 'the upstream saw its request cut');
    assert.equal(s.aborts[0].chunks_sent, 1);
});
