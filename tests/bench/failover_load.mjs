#!/usr/bin/env node
// tests/bench/failover_load.mjs: the load generator and referee of the
// `failover` bench case (tests/bench/run.sh, docs/BENCHMARKS.md).
//
//   node tests/bench/failover_load.mjs --target HOST:PORT --admin HOST:PORT
//        --model NAME --victim URL --victim-pid PID
//        [--duration-ms 10000] [--kill-at-ms 4000] [--conns 16]
//        [--stream-percent 50] [--chunks 10] [--chunk-delay-ms 20]
//        [--first-delay-ms 10] [--poll-ms 20] [--timeout-ms 10000]
//        [--requests-out FILE] [--samples-out FILE]
//
// Keeps --conns requests in flight against the gateway for --duration-ms
// (--stream-percent of them, drawn at random, stream), kills
// --victim-pid with SIGKILL at --kill-at-ms, and meanwhile polls the
// gateway's GET /admin/backends every --poll-ms for the victim backend's
// pick counter ("requests", incremented by the balancer for every attempt
// it routes there, retries included) and its health state.
//
// --first-delay-ms and --chunk-delay-ms are passed to the fake upstream
// (x-fake-first-delay-ms, x-fake-delay-ms) so that at the moment of the kill
// the victim holds requests in every phase: waiting for their first byte
// (must be retried: a failure there is a miss) and half-way through a stream
// (cannot be retried: informational).
//
// Prints one line of key=value pairs on stdout (the numbers below), details
// on stderr. Exit status: 0 when the run was measured (whatever the numbers
// say), 1 when it could not be (bad arguments, the gateway unreachable, the
// victim not routed to before the kill, no poll sample after it).
//
//   requests ok streams      requests sent, answered in full, streaming ones
//   failed_before_stream     failed requests that had not started streaming:
//                            any non-streaming failure, or a stream that got
//                            no 200 head (goal 0)
//   failed_midstream         streams cut after their 200 head (informational)
//   victim_answers_after_kill  answers whose x-modelmux-backend is the victim
//                            that began after the kill (should be 0)
//   picks_at_kill picks_after_kill  the victim's pick counter at the kill,
//                            and how many more picks it got afterwards
//   cutoff_ms cutoff_lo_ms   time from the kill until the victim's last pick:
//                            the last increase of its counter happened after
//                            the sample before (lo) and before the sample
//                            that first showed the final value (cutoff_ms,
//                            the bound reported); 0 when no pick came after
//                            the kill
//   down_ms                  time from the kill until /admin/backends first
//                            showed the victim not up (-1: never)
//   rps_before rps_after     completed requests/s before and after the kill
//   poll_gap_ms              the largest gap between two samples after the
//                            kill (the resolution of cutoff_ms)
//   others_down_samples      samples in which another backend of the model
//                            was not up (should be 0: only the victim died)
//   victim_errors retries    from /metrics at the end: failed attempts on
//                            the victim by kind ("connect:3,midstream:9"),
//                            and retries of all requests
import http from 'node:http';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';

function die(msg) {
    process.stderr.write(`failover_load: ${msg}\n`);
    process.exit(1);
}

function parseArgs(argv) {
    const o = {
        target: null, admin: null, model: null, victim: null, victimPid: 0,
        durationMs: 10000, killAtMs: 4000, conns: 16, streamPercent: 50, chunks: 10,
        chunkDelayMs: 20, firstDelayMs: 10, pollMs: 20, timeoutMs: 10000,
        requestsOut: null, samplesOut: null,
    };
    const ints = {
        '--victim-pid': 'victimPid', '--duration-ms': 'durationMs', '--kill-at-ms': 'killAtMs',
        '--conns': 'conns', '--stream-percent': 'streamPercent', '--chunks': 'chunks',
        '--chunk-delay-ms': 'chunkDelayMs', '--first-delay-ms': 'firstDelayMs',
        '--poll-ms': 'pollMs', '--timeout-ms': 'timeoutMs',
    };
    const strs = {
        '--target': 'target', '--admin': 'admin', '--model': 'model', '--victim': 'victim',
        '--requests-out': 'requestsOut', '--samples-out': 'samplesOut',
    };
    for (let i = 2; i < argv.length; i += 2) {
        const a = argv[i];
        const v = argv[i + 1];
        if (v === undefined) die(`${a} needs a value`);
        if (ints[a]) {
            if (!/^[0-9]{1,9}$/.test(v)) die(`${a} must be a non-negative integer, not '${v}'`);
            o[ints[a]] = Number(v);
        } else if (strs[a]) {
            o[strs[a]] = v;
        } else {
            die(`unknown argument ${a}`);
        }
    }
    for (const k of ['target', 'admin', 'model', 'victim']) if (!o[k]) die(`--${k} is required`);
    if (o.victimPid <= 1) die('--victim-pid is required');
    if (o.conns < 1 || o.pollMs < 1 || o.timeoutMs < 1) die('--conns, --poll-ms, --timeout-ms must be > 0');
    if (o.streamPercent > 100) die('--stream-percent must be 0..100');
    if (o.killAtMs >= o.durationMs) die('--kill-at-ms must be before the end (--duration-ms)');
    return o;
}

function hostPort(s) {
    const m = /^([^:]+):([0-9]{1,5})$/.exec(s);
    if (!m) die(`'${s}' is not HOST:PORT`);
    return { host: m[1], port: Number(m[2]) };
}

const opt = parseArgs(process.argv);
const target = hostPort(opt.target);
const admin = hostPort(opt.admin);
const now = () => performance.now();
// Each request its own connection slot, kept alive: a steady N in flight.
const agent = new http.Agent({ keepAlive: true, maxSockets: opt.conns });
const adminAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const MAX_BODY = 1 << 20;   // far above any answer of the fake upstream

const bodies = [false, true].map((stream) => Buffer.from(JSON.stringify({
    model: opt.model, stream, messages: [{ role: 'user', content: 'failover bench' }],
})));

// One request; resolves (never rejects) with its record.
function one(seq) {
    // Random, not alternating: round robin over two backends would send
    // every stream to one of them and every plain request to the other.
    const stream = Math.random() * 100 < opt.streamPercent;
    const body = bodies[stream ? 1 : 0];
    const rec = {
        seq, stream, start: now(), end: 0, status: 0, backend: '', head: false,
        events: 0, ok: false, why: '',
    };
    return new Promise((resolve) => {
        let settled = false;
        const finish = (ok, why) => {
            if (settled) return;
            settled = true;
            rec.end = now();
            rec.ok = ok;
            rec.why = why;
            resolve(rec);
        };
        const req = http.request({
            host: target.host, port: target.port, method: 'POST', path: '/v1/chat/completions', agent,
            headers: {
                'content-type': 'application/json', 'content-length': body.length,
                'x-fake-first-delay-ms': String(opt.firstDelayMs),
                'x-fake-chunks': String(opt.chunks), 'x-fake-delay-ms': String(opt.chunkDelayMs),
            },
        }, (res) => {
            rec.status = res.statusCode;
            rec.backend = res.headers['x-modelmux-backend'] || '';
            rec.head = true;
            const parts = [];
            let size = 0;
            let text = '';
            res.on('data', (d) => {
                if (stream) {
                    // Count events as they come, so a cut stream shows how far it got.
                    text += d.toString('latin1');
                    let k;
                    while ((k = text.indexOf('\n\n')) >= 0) {
                        const ev = text.slice(0, k);
                        text = text.slice(k + 2);
                        if (ev.startsWith('data: [DONE]')) rec.done = true;
                        else if (ev.startsWith('data: {"error"')) rec.errorEvent = true;
                        else if (ev.startsWith('data: ')) rec.events++;
                    }
                    if (text.length > MAX_BODY) req.destroy(new Error('event too large'));
                    return;
                }
                size += d.length;
                if (size > MAX_BODY) req.destroy(new Error('answer too large'));
                else parts.push(d);
            });
            res.on('error', (e) => finish(false, `cut: ${e.code || e.message}`));
            res.on('aborted', () => finish(false, 'cut: aborted'));
            res.on('end', () => {
                if (res.statusCode !== 200) return finish(false, `http ${res.statusCode}`);
                if (stream) {
                    if (rec.errorEvent) return finish(false, 'error event');
                    if (!rec.done) return finish(false, 'no [DONE]');
                    if (rec.events !== opt.chunks) return finish(false, `${rec.events} of ${opt.chunks} events`);
                    return finish(true, '');
                }
                try {
                    const j = JSON.parse(Buffer.concat(parts).toString('utf8'));
                    if (!j || !Array.isArray(j.choices) || !j.choices.length) return finish(false, 'answer without choices');
                } catch {
                    return finish(false, 'answer not JSON');
                }
                return finish(true, '');
            });
            res.on('close', () => finish(false, 'cut: closed'));
        });
        req.setTimeout(opt.timeoutMs, () => req.destroy(new Error('client timeout')));
        req.on('error', (e) => finish(false, `${rec.head ? 'cut' : 'no answer'}: ${e.code || e.message}`));
        req.end(body);
    });
}

function getText(where, path) {
    return new Promise((resolve, reject) => {
        const req = http.get({ host: where.host, port: where.port, path, agent: adminAgent }, (res) => {
            const parts = [];
            let size = 0;
            res.on('data', (d) => {
                size += d.length;
                if (size > 16 * MAX_BODY) req.destroy(new Error(`${path}: answer too large`));
                else parts.push(d);
            });
            res.on('end', () => {
                if (res.statusCode !== 200) return reject(new Error(`${path}: HTTP ${res.statusCode}`));
                resolve(Buffer.concat(parts).toString('utf8'));
            });
            res.on('error', reject);
        });
        req.setTimeout(2000, () => req.destroy(new Error(`${path}: no answer in 2 s`)));
        req.on('error', reject);
    });
}

async function getJson(path) {
    const t = await getText(admin, path);
    try {
        return JSON.parse(t);
    } catch (e) {
        throw new Error(`${path}: ${e.message}`);
    }
}

// From the gateway's /metrics: the failed attempts on the victim by kind
// (counted per attempt against the backend that failed) and all retries,
// i.e. how many requests the retries rescued.
async function metricsSummary() {
    const t = await getText(target, '/metrics');
    const kinds = {};
    let retries = 0;
    const victim = `backend="${opt.victim}"`;
    for (const line of t.split('\n')) {
        const m = /^(modelmux_[a-z_]+)\{([^}]*)\} ([0-9]+)$/.exec(line);
        if (!m) continue;
        if (m[1] === 'modelmux_retries_total') retries += Number(m[3]);
        if (m[1] === 'modelmux_errors_total' && m[2].includes(victim)) {
            const k = /kind="([a-z_0-9]+)"/.exec(m[2]);
            if (k) kinds[k[1]] = (kinds[k[1]] || 0) + Number(m[3]);
        }
    }
    const e = Object.entries(kinds).map(([k, v]) => `${k}:${v}`).join(',');
    return { victim_errors: e || 'none', retries };
}

// One sample of the victim's state: sent/recv bracket the moment the
// gateway read its counters.
async function sample() {
    const sent = now();
    const j = await getJson('/admin/backends');
    const recv = now();
    const m = (j.models || []).find((x) => x.model === opt.model);
    const b = m && (m.backends || []).find((x) => x.url === opt.victim);
    if (!b) throw new Error(`/admin/backends has no backend ${opt.victim} for model ${opt.model}`);
    // The other backends' health too: a survivor wrongly marked down (its
    // checks starved on a loaded machine) explains 503s nothing else would.
    const othersUp = m.backends.filter((x) => x !== b).every((x) => x.health === 'up');
    return { sent, recv, picks: b.requests, health: b.health, breaker: b.breaker, failures: b.failures, othersUp };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
    try {
        process.kill(opt.victimPid, 0);
    } catch (e) {
        die(`victim pid ${opt.victimPid}: ${e.code}`);
    }
    const s0 = await sample().catch((e) => die(e.message));
    if (s0.health !== 'up') die(`victim is ${s0.health} before the run`);

    const t0 = now();
    const endAt = t0 + opt.durationMs;
    const recs = [];
    const samples = [s0];
    let seq = 0;
    let tKill = -1;
    let picksAtKill = -1;
    let loadDone = false;

    const workers = [];
    for (let w = 0; w < opt.conns; w++) {
        workers.push((async () => {
            while (now() < endAt) recs.push(await one(seq++));
        })());
    }

    // The poller also does the kill, right after a sample, so that the
    // counter at the kill is known to within one admin round trip.
    const poller = (async () => {
        let tail = 0;
        for (;;) {
            const next = now() + opt.pollMs;
            let s = null;
            try {
                s = await sample();
            } catch (e) {
                process.stderr.write(`failover_load: poll failed: ${e.message}\n`);
            }
            if (s) samples.push(s);
            if (s && tKill < 0 && s.recv - t0 >= opt.killAtMs) {
                picksAtKill = s.picks;
                tKill = now();
                try {
                    process.kill(opt.victimPid, 'SIGKILL');
                } catch (e) {
                    die(`cannot kill ${opt.victimPid}: ${e.code}`);
                }
            }
            // A few samples after the load ended, so the final count is seen.
            if (loadDone && ++tail >= 5) return;
            const wait = next - now();
            if (wait > 0) await sleep(wait);
        }
    })();

    await Promise.all(workers);
    const tLoadDone = now();
    loadDone = true;
    await poller;
    const ms = await metricsSummary().catch((e) => die(`/metrics: ${e.message}`));
    agent.destroy();
    adminAgent.destroy();

    if (tKill < 0) die('the run ended before the kill');
    const after = samples.filter((s) => s.sent >= tKill);
    if (after.length < 2) die('fewer than 2 samples after the kill');
    // The final count must be read once no request can add to it.
    if (samples[samples.length - 1].sent < tLoadDone) die('no poll sample after the load ended');
    const finalPicks = samples[samples.length - 1].picks;
    if (picksAtKill <= s0.picks) die('the victim got no requests before the kill: nothing was measured');

    let cutoff = 0;
    let cutoffLo = 0;
    if (finalPicks > picksAtKill) {
        const i = samples.findIndex((s) => s.sent >= tKill && s.picks === finalPicks);
        cutoff = samples[i].recv - tKill;
        cutoffLo = Math.max(0, samples[i - 1].sent - tKill);
    }
    const down = after.find((s) => s.health !== 'up');
    let gap = 0;
    for (let i = 1; i < after.length; i++) gap = Math.max(gap, after[i].recv - after[i - 1].recv);

    const failed = recs.filter((r) => !r.ok);
    const midstream = failed.filter((r) => r.stream && r.head && r.status === 200);
    const before = failed.filter((r) => !(r.stream && r.head && r.status === 200));
    const victimAfter = recs.filter((r) => r.backend === opt.victim && r.start >= tKill);
    const doneBefore = recs.filter((r) => r.end < tKill).length;
    const doneAfter = recs.filter((r) => r.start >= tKill && r.end <= endAt).length;
    const f = (x) => x.toFixed(1);
    const out = {
        requests: recs.length,
        ok: recs.length - failed.length,
        streams: recs.filter((r) => r.stream).length,
        failed_before_stream: before.length,
        failed_midstream: midstream.length,
        midstream_on_victim: midstream.filter((r) => r.backend === opt.victim).length,
        victim_answers_after_kill: victimAfter.length,
        picks_at_kill: picksAtKill - s0.picks,
        picks_after_kill: finalPicks - picksAtKill,
        cutoff_ms: f(cutoff),
        cutoff_lo_ms: f(cutoffLo),
        down_ms: down ? f(down.recv - tKill) : '-1',
        kill_at_ms: f(tKill - t0),
        rps_before: f(doneBefore / ((tKill - t0) / 1000)),
        rps_after: f(doneAfter / ((endAt - tKill) / 1000)),
        poll_gap_ms: f(gap),
        others_down_samples: samples.filter((x) => !x.othersUp).length,
        samples: samples.length,
        ...ms,
    };
    for (const r of failed.slice(0, 20)) {
        process.stderr.write(`failover_load: failed #${r.seq} ${r.stream ? 'stream' : 'plain'} ` +
            `t=${f(r.start - t0)}..${f(r.end - t0)} ms (kill at ${f(tKill - t0)}) ` +
            `status=${r.status} backend=${r.backend || '-'} events=${r.events}: ${r.why}\n`);
    }
    if (opt.requestsOut) {
        const lines = ['seq\tstream\tstart_ms\tend_ms\tstatus\tbackend\thead\tevents\tok\twhy'];
        for (const r of recs) {
            lines.push([r.seq, r.stream ? 1 : 0, f(r.start - t0), f(r.end - t0), r.status, r.backend || '-',
                r.head ? 1 : 0, r.events, r.ok ? 1 : 0, r.why || '-'].join('\t'));
        }
        fs.writeFileSync(opt.requestsOut, lines.join('\n') + '\n');
    }
    if (opt.samplesOut) {
        const lines = ['sent_ms\trecv_ms\tpicks\thealth\tbreaker\tfailures\tothers_up'];
        for (const s of samples) {
            lines.push([f(s.sent - t0), f(s.recv - t0), s.picks, s.health, s.breaker, s.failures, s.othersUp ? 1 : 0].join('\t'));
        }
        lines.push(`# kill at ${f(tKill - t0)} ms`);
        fs.writeFileSync(opt.samplesOut, lines.join('\n') + '\n');
    }
    process.stdout.write(Object.entries(out).map(([k, v]) => `${k}=${v}`).join(' ') + '\n');
}

main().catch((e) => die(e.stack || e.message));
