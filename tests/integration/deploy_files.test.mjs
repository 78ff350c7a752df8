// The deployment files: docker-compose.yml, deploy/Dockerfile*,
// deploy/modelmux-gateway.service and the example configs. No Docker engine
// runs where the tests run, so the files are held to what can be checked
// without one: the compose file is read (a strict YAML-subset reader,
// cross-checked against PyYAML and the compose CLI where those exist) and its
// profiles, device reservations, mounts and names are checked against each
// other and against the gateway configs it mounts; the commands it gives the
// workers are run here, as plain processes, end to end (CPU profile); the
// Dockerfiles' sources and runtime libraries are checked against the tree
// and the binaries; the systemd unit's keys are checked (and
// `systemd-analyze verify` runs when present).
import test from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
    ROOT, TMP, gatewayBin, getFreePort, postJson, request, startGateway, waitFor, workerBin,
} from './lib.mjs';

const COMPOSE = path.join(ROOT, 'docker-compose.yml');
const UNIT = path.join(ROOT, 'deploy', 'modelmux-gateway.service');
const CONFIG_8GPU = path.join(ROOT, 'deploy', 'gateway.8gpu.json');
const WORKER_STOP_MS = 10000;   // the fleet's SIGTERM -> SIGKILL for workers (fleet.h)
// The 8-GPU layout, one worker per GPU (the worker has no tensor
// parallelism): 14B replicas on GPUs 0-3, 32B replicas on 4-7. The compose
// services are named after their GPU.
const LAYOUT = { 'qwen-14b': ['0', '1', '2', '3'], 'qwen-32b': ['4', '5', '6', '7'] };
const GPU_WORKERS = Object.entries(LAYOUT).flatMap(([m, gpus]) => gpus.map((g) => `worker-${m.slice(5)}-${g}`));

// ---- a reader for the YAML subset the compose file is written in ----------
//
// Block mappings and sequences by indentation, "- key: value" items, flow
// sequences of scalars (may span lines), "{}", plain / single- / double-
// quoted scalars, comments. Plain scalars resolve as YAML 1.1 does (PyYAML,
// docker-compose v1): null, booleans (yes/no/on/off too), integers, floats.
// A mapping value may carry an anchor ("key: &name ...") and be an alias
// ("key: *name"); "<<: *name" merges an anchored mapping, whose keys the
// mapping's own keys override (YAML 1.1's merge key, which compose honours).
// Everything else (anchors or aliases elsewhere, tags, block scalars, flow
// mappings, documents, sexagesimal or octal-looking numbers) throws, so the
// file cannot drift into YAML this reader would misread.
function parseYamlSubset(text) {
    const lines = [];
    const anchors = new Map();
    const raw = text.split('\n');
    for (let i = 0; i < raw.length; i++) {
        const ln = i + 1;
        if (/\t/.test(raw[i].match(/^\s*/)[0])) throw new Error(`yaml line ${ln}: tab in indentation`);
        let content = stripComment(raw[i], ln).trimEnd();
        if (!content.trim()) continue;
        if (/^(---|\.\.\.)(\s|$)/.test(content)) throw new Error(`yaml line ${ln}: documents are outside the subset`);
        const indent = content.match(/^ */)[0].length;
        content = content.slice(indent);
        // A flow sequence may go on over the next lines until it closes.
        while (depth(content, ln) > 0) {
            i++;
            if (i >= raw.length) throw new Error(`yaml line ${ln}: unclosed [`);
            content += ` ${stripComment(raw[i], i + 1).trim()}`;
        }
        lines.push({ indent, content, ln });
    }
    let pos = 0;
    const out = lines.length ? parseBlock(lines[0].indent) : null;
    if (pos !== lines.length) throw new Error(`yaml line ${lines[pos].ln}: unexpected indentation`);
    return out;

    function parseBlock(indent) {
        return isItem(lines[pos].content) ? parseSeq(indent) : parseMap(indent);
    }
    function parseSeq(indent) {
        const arr = [];
        while (pos < lines.length && lines[pos].indent === indent && isItem(lines[pos].content)) {
            const l = lines[pos];
            const rest = l.content.slice(1);
            const body = rest.trimStart();
            if (!body) {
                pos++;
                arr.push(pos < lines.length && lines[pos].indent > indent ? parseBlock(lines[pos].indent) : null);
            } else if (keySplit(body, l.ln)) {
                // "- key: value": a mapping whose first line starts after "- ".
                lines[pos] = { indent: indent + 1 + (rest.length - body.length), content: body, ln: l.ln };
                arr.push(parseMap(lines[pos].indent));
            } else {
                pos++;
                arr.push(scalar(body, l.ln));
            }
        }
        return arr;
    }
    function parseMap(indent) {
        const obj = {};
        const own = new Set();      // keys written in this mapping (merged ones may be overridden)
        let merged = false;
        while (pos < lines.length && lines[pos].indent === indent) {
            const l = lines[pos];
            if (isItem(l.content)) throw new Error(`yaml line ${l.ln}: a sequence item inside a mapping`);
            const kv = keySplit(l.content, l.ln);
            if (!kv) throw new Error(`yaml line ${l.ln}: expected "key: value", got ${JSON.stringify(l.content)}`);
            const [key] = kv;
            let value = kv[1];
            let anchor = null;
            const am = /^&([^\s,[\]{}]+)(?:\s+(.*))?$/.exec(value);
            if (am) [, anchor, value = ''] = am;
            pos++;
            let v;
            if (value.startsWith('*')) {
                if (anchor) throw new Error(`yaml line ${l.ln}: an anchor on an alias`);
                const name = value.slice(1);
                if (!anchors.has(name)) throw new Error(`yaml line ${l.ln}: alias *${name} before (or without) its anchor`);
                v = structuredClone(anchors.get(name));
            } else if (value !== '') {
                v = scalar(value, l.ln);
            } else if (pos < lines.length && lines[pos].indent > indent) {
                v = parseBlock(lines[pos].indent);
            } else if (pos < lines.length && lines[pos].indent === indent && isItem(lines[pos].content)) {
                v = parseSeq(indent);   // "key:\n- item" at the key's own indentation
            } else {
                v = null;
            }
            if (anchor) anchors.set(anchor, structuredClone(v));
            if (key === '<<') {
                if (merged) throw new Error(`yaml line ${l.ln}: duplicate key <<`);
                if (!value.startsWith('*') || !v || typeof v !== 'object' || Array.isArray(v)) {
                    throw new Error(`yaml line ${l.ln}: << takes one alias of a mapping`);
                }
                merged = true;
                for (const [k, x] of Object.entries(v)) if (!own.has(k)) obj[k] = x;
                continue;
            }
            if (own.has(key)) throw new Error(`yaml line ${l.ln}: duplicate key ${key}`);
            own.add(key);
            obj[key] = v;
        }
        if (pos < lines.length && lines[pos].indent > indent) throw new Error(`yaml line ${lines[pos].ln}: unexpected indentation`);
        return obj;
    }
}

function isItem(s) { return s === '-' || s.startsWith('- '); }

// Walks s outside quotes: calls visit(i, ch) for every unquoted character.
function unquoted(s, ln, visit) {
    let q = null;
    for (let i = 0; i < s.length; i++) {
        const c = s[i];
        if (q === '"') {
            if (c === '\\') i++;
            else if (c === '"') q = null;
        } else if (q === "'") {
            if (c === "'" && s[i + 1] === "'") i++;
            else if (c === "'") q = null;
        } else if ((c === '"' || c === "'") && (i === 0 || /[\s[,:-]/.test(s[i - 1]))) {
            q = c;
        } else if (visit(i, c) === false) {
            return;
        }
    }
    if (q) throw new Error(`yaml line ${ln}: unterminated ${q} string`);
}

function stripComment(line, ln) {
    let cut = line.length;
    unquoted(line, ln, (i, c) => {
        if (c === '#' && (i === 0 || /\s/.test(line[i - 1]))) { cut = i; return false; }
        return true;
    });
    return line.slice(0, cut);
}

function depth(s, ln) {
    let d = 0;
    unquoted(s, ln, (i, c) => { if (c === '[') d++; else if (c === ']') d--; });
    return d;
}

// "key: value" or "key:" (outside quotes) -> [key, value], else null.
function keySplit(s, ln) {
    let at = -1;
    unquoted(s, ln, (i, c) => {
        if (c === '[' || c === '{') return false;
        if (c === ':' && (i + 1 === s.length || s[i + 1] === ' ')) { at = i; return false; }
        return true;
    });
    if (at < 0) return null;
    const k = s.slice(0, at).trim();
    const key = /^["']/.test(k) ? scalar(k, ln) : k;
    if (typeof key !== 'string' || !key) throw new Error(`yaml line ${ln}: bad key ${JSON.stringify(k)}`);
    return [key, s.slice(at + 1).trim()];
}

function scalar(s, ln) {
    if (s.startsWith('"')) {
        if (!s.endsWith('"') || s.length < 2) throw new Error(`yaml line ${ln}: trailing text after a string`);
        if (/\\[^"\\/bfnrtu]/.test(s.replace(/\\\\/g, ''))) throw new Error(`yaml line ${ln}: escape outside the subset in ${s}`);
        return JSON.parse(s);
    }
    if (s.startsWith("'")) {
        if (!s.endsWith("'") || s.length < 2) throw new Error(`yaml line ${ln}: trailing text after a string`);
        return s.slice(1, -1).replace(/''/g, "'");
    }
    if (s.startsWith('[')) {
        if (!s.endsWith(']')) throw new Error(`yaml line ${ln}: text after a flow sequence`);
        const inner = s.slice(1, -1);
        const items = [];
        let from = 0;
        unquoted(inner, ln, (i, c) => {
            if (c === '[' || c === '{') throw new Error(`yaml line ${ln}: nested flow collections are outside the subset`);
            if (c === ',') { items.push(inner.slice(from, i)); from = i + 1; }
        });
        items.push(inner.slice(from));
        if (items.length === 1 && !items[0].trim()) return [];
        return items.map((x) => {
            if (!x.trim()) throw new Error(`yaml line ${ln}: empty item in ${s}`);
            return scalar(x.trim(), ln);
        });
    }
    if (s === '{}') return {};
    if (/^[{&*!|>%@`]/.test(s)) throw new Error(`yaml line ${ln}: ${JSON.stringify(s)} is outside the subset`);
    if (/^(~|null|Null|NULL)$/.test(s)) return null;
    if (/^(true|True|TRUE|yes|Yes|YES|on|On|ON|y|Y)$/.test(s)) return true;
    if (/^(false|False|FALSE|no|No|NO|off|Off|OFF|n|N)$/.test(s)) return false;
    if (/^[-+]?(0|[1-9][0-9]*)$/.test(s)) return Number(s);
    if (/^[-+]?[0-9]*\.[0-9]+([eE][-+]?[0-9]+)?$/.test(s)) return Number(s);
    if (/^[-+]?0[0-9_]+$|^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+$|^0[xob]/.test(s)) {
        throw new Error(`yaml line ${ln}: ${s} reads as a YAML 1.1 number (octal or base 60): quote it`);
    }
    if (/: |\s#/.test(s)) throw new Error(`yaml line ${ln}: ambiguous plain scalar ${JSON.stringify(s)}: quote it`);
    return s;
}

// ---- compose helpers ---------------------------------------------------------

const compose = parseYamlSubset(fs.readFileSync(COMPOSE, 'utf8'));
const services = compose.services;

// The services `docker compose --profile P... up` starts: those without
// profiles plus those in one of the active profiles.
function activeServices(profiles) {
    return Object.entries(services)
        .filter(([, s]) => !s.profiles || s.profiles.some((p) => profiles.includes(p)))
        .map(([n]) => n);
}

// Compose's own interpolation of a string: $$ is a literal $, ${VAR:-def}
// takes the default (the tests run without those variables).
function interpolate(s) {
    return s.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}/g, (m, name, d, def) => {
        if (m === '$$') return '$';
        if (d === undefined) throw new Error(`\${${name}} without a default in ${s}`);
        return def;
    });
}

function argValue(args, flag) {
    const i = args.indexOf(flag);
    return i >= 0 ? args[i + 1] : undefined;
}

// The names a service answers to on the compose network.
function dnsNames(name) {
    const aliases = services[name].networks?.default?.aliases || [];
    return [name, ...aliases];
}

function durationMs(v) {
    const m = /^(\d+)(ms|s|m)$/.exec(String(v));
    assert.ok(m, `a duration: ${v}`);
    return Number(m[1]) * { ms: 1, s: 1000, m: 60000 }[m[2]];
}

function gatewayCheck(file) {
    return spawnSync(gatewayBin(), ['-c', file, '--check'], { encoding: 'utf8', timeout: 10000 });
}

// The gateway config a compose service mounts at /etc/modelmux/gateway.json.
function mountedConfig(svc) {
    const v = (svc.volumes || []).map(interpolate).find((x) => x.split(':')[1] === '/etc/modelmux/gateway.json');
    assert.ok(v, 'the gateway mounts its config at /etc/modelmux/gateway.json');
    const [src, , mode] = v.split(':');
    assert.equal(mode, 'ro', 'mounted read-only');
    return path.resolve(ROOT, src);
}

// ---- does a model fit one GPU? -------------------------------------------------
//
// Each worker holds a whole model on one GPU, so the bf16 weights of the 32B
// (~65.5 GB) leave an 80 GB card little room for the KV cache. The CUDA
// backend's pool is --gpu-memory-utilization of what the weights and the
// step buffers leave (worker/backend_cuda.c). Asked: the pool holds at least
// two sequences of --max-model-len, so one maximal request does not starve
// its replica. Shapes from the checkpoints' config.json (Qwen2: vocabulary
// 152064, untied embeddings, q/k/v biases, 8 kv heads of 128); the card taken
// at its label, 80e9 bytes (it has a little more), with 1.5 GB for the CUDA
// context, cuBLAS and the step buffers.
const SHAPES = { 'qwen-14b': { layers: 48, hidden: 5120, inter: 13824 }, 'qwen-32b': { layers: 64, hidden: 5120, inter: 27648 } };
const GPU_BYTES = 80e9;
const GPU_OVERHEAD = 1.5e9;

function assertFitsOneGpu(who, model, args) {
    const { layers: L, hidden: H, inter: I } = SHAPES[model];
    const kvw = 8 * 128;
    const params = 2 * 152064 * H + H + L * (H * (H + 2 * kvw) + (H + 2 * kvw) + H * H + 3 * H * I + 2 * H);
    const weights = 2 * params;
    const perPos = L * 2 * kvw * 2;   // K and V, bf16
    const util = Number(argValue(args, '--gpu-memory-utilization') ?? 0.9);
    const maxLen = Number(argValue(args, '--max-model-len'));
    assert.ok(maxLen > 0, `${who}: --max-model-len is set (the default, the model's 131072, cannot fit)`);
    assert.equal(argValue(args, '--dtype'), 'bfloat16', `${who}: bf16 weights`);
    const pool = util * (GPU_BYTES - weights - GPU_OVERHEAD);
    const seqs = pool / (maxLen * perPos);
    assert.ok(seqs >= 2, `${who}: ${(weights / 1e9).toFixed(1)} GB of weights leave a KV pool of ${(pool / 1e9).toFixed(1)} GB, `
        + `${seqs.toFixed(2)} sequences of --max-model-len ${maxLen}`);
}

// ---- compose ---------------------------------------------------------------

test('the YAML reader agrees with PyYAML on docker-compose.yml (when PyYAML is installed)', (t) => {
    const py = spawnSync('python3', ['-c', 'import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))'],
        { input: fs.readFileSync(COMPOSE), encoding: 'utf8' });
    if (py.error || py.status !== 0) {
        t.skip('python3 with PyYAML is not installed');
        return;
    }
    assert.deepEqual(compose, JSON.parse(py.stdout));
});

test('the YAML reader refuses what it does not understand', () => {
    for (const bad of ['a: *x', 'a: *x\nb: &x 1', 'a: &x *y', 'a: [&x 1]', 'a: [*x]', '- &x 1', 'a: !!str 1',
        'a: &x 1\nb:\n  <<: *x', 'a:\n  <<: {b: 1}', 'a: &x\n  b: 1\nc:\n  <<: *x\n  <<: *x',
        'a: |\n  b', 'a: {b: 1}', 'a: 1:30', 'a: 0755', 'a: b: c', 'a: [1, [2]]', '---\na: 1', 'a: 1\na: 2']) {
        assert.throws(() => parseYamlSubset(bad), undefined, JSON.stringify(bad));
    }
    assert.deepEqual(parseYamlSubset('a:\n  - x: 1\n    y: "2"\n  - [p, \'q\']\nb: no\n'), { a: [{ x: 1, y: '2' }, ['p', 'q']], b: false });
    // Anchors, aliases and merges: the mapping's own keys win wherever they
    // stand; an alias is a copy; a merged mapping may itself merge.
    const m = parseYamlSubset('x-b: &b\n  p: 1\n  q: [1, 2]\nx-c: &c\n  <<: *b\n  r: 3\ny:\n  q: 0\n  <<: *c\n  s: *b\nz: &n 5\nw: *n\n');
    assert.deepEqual(m, { 'x-b': { p: 1, q: [1, 2] }, 'x-c': { p: 1, q: [1, 2], r: 3 }, y: { p: 1, q: 0, r: 3, s: { p: 1, q: [1, 2] } }, z: 5, w: 5 });
    m.y.s.q.push(3);
    assert.deepEqual(m['x-b'].q, [1, 2]);
});

test('compose: redis and the gateway always; each profile brings its own workers', () => {
    assert.deepEqual(Object.keys(compose).filter((k) => !k.startsWith('x-')).sort(), ['services', 'volumes']);
    for (const name of ['redis', 'gateway']) {
        assert.ok(services[name], `service ${name}`);
        assert.equal(services[name].profiles, undefined, `${name} belongs to every profile`);
    }
    const cpu = activeServices(['cpu']);
    const gpu = activeServices(['gpu']);
    assert.deepEqual(cpu.sort(), ['gateway', 'make-model', 'redis', 'worker-14b-cpu', 'worker-32b-cpu']);
    assert.deepEqual(gpu.sort(), ['gateway', 'redis', ...GPU_WORKERS].sort());
    for (const [name, s] of Object.entries(services)) {
        for (const p of s.profiles || []) assert.ok(['cpu', 'gpu'].includes(p), `${name}: profile ${p}`);
    }
    // Every volume named by a service is declared.
    for (const [name, s] of Object.entries(services)) {
        for (const v of s.volumes || []) {
            const src = interpolate(v).split(':')[0];
            if (!src.startsWith('.') && !src.startsWith('/')) assert.ok(src in (compose.volumes || {}), `${name}: volume ${src} declared`);
        }
    }
});

test('compose: the gateway builds from deploy/Dockerfile and mounts a config that passes --check and names the workers of both profiles', () => {
    const g = services.gateway;
    assert.equal(g.build.context, '.');
    assert.equal(g.build.dockerfile, 'deploy/Dockerfile');
    assert.deepEqual(g.command, ['-c', '/etc/modelmux/gateway.json']);
    const file = mountedConfig(g);
    assert.ok(file.startsWith(path.join(ROOT, 'deploy') + path.sep), `the config lives in deploy/: ${file}`);
    const r = gatewayCheck(file);
    assert.equal(r.status, 0, r.stderr);
    const cfg = JSON.parse(fs.readFileSync(file, 'utf8'));
    // The published port is the one the gateway listens on, on every address.
    const listenPort = cfg.listen.split(':').pop();
    assert.ok(/^(0\.0\.0\.0)?:/.test(cfg.listen) || cfg.listen.startsWith('[::]'), `listen on all addresses in a container: ${cfg.listen}`);
    assert.ok(g.ports.some((p) => String(p).split(':').pop() === listenPort), `ports ${g.ports} publish ${listenPort}`);
    // The admin API is not published: it stays on the container's loopback.
    assert.ok(cfg.admin_listen.startsWith('127.0.0.1:'), cfg.admin_listen);
    assert.ok(!g.ports.some((p) => String(p).split(':').pop() === cfg.admin_listen.split(':').pop()), 'admin port not published');
    // Redis is the compose service, which the gateway waits for.
    assert.match(cfg.redis.url, /^redis:\/\/redis:6379\//);
    assert.equal(g.depends_on.redis.condition, 'service_healthy');
    assert.ok(services.redis.healthcheck, 'redis has a healthcheck to wait on');
    // Docker waits longer than the gateway's drain before SIGKILL.
    assert.ok(durationMs(g.stop_grace_period) > (cfg.shutdown_grace_ms ?? 30000),
        `stop_grace_period ${g.stop_grace_period} > shutdown_grace_ms`);
    // Every backend's host is exactly one service (or alias) in each profile,
    // and its port the one that worker listens on.
    for (const profile of ['cpu', 'gpu']) {
        const active = activeServices([profile]);
        for (const m of cfg.models.filter((x) => x.backends)) {
            for (const b of m.backends) {
                const u = new URL(b.url);
                const owners = active.filter((n) => dnsNames(n).includes(u.hostname));
                assert.equal(owners.length, 1, `${profile}: ${u.hostname} (model ${m.name}) is answered by ${owners.join(', ') || 'nobody'}`);
                const cmd = services[owners[0]].command;
                assert.equal(argValue(cmd, '--port'), u.port, `${owners[0]} listens on ${u.port}`);
                assert.equal(argValue(cmd, '--host'), '0.0.0.0', `${owners[0]} listens on all addresses`);
                assert.equal(argValue(cmd, '--served-model-name'), b.served_model || m.name, `${owners[0]} serves ${m.name}`);
            }
        }
        // ... and every worker of the profile is a backend (no replica left idle).
        const named = new Set(cfg.models.flatMap((m) => (m.backends || []).map((b) => new URL(b.url).hostname)));
        for (const n of active.filter((x) => services[x].command?.includes('--served-model-name'))) {
            assert.ok(dnsNames(n).some((d) => named.has(d)), `${profile}: ${n} is no backend of ${mountedConfig(g)}`);
        }
    }
    // The gpu profile's replicas, each its own backend of its model.
    for (const [model, gpus] of Object.entries(LAYOUT)) {
        const urls = cfg.models.find((m) => m.name === model).backends.map((b) => b.url);
        assert.deepEqual(urls, gpus.map((gpu) => `http://worker-${model.slice(5)}-${gpu}:8000`), model);
    }
});

test('compose: the cpu profile makes its models once and serves them on the CPU', () => {
    const mk = services['make-model'];
    assert.deepEqual(mk.entrypoint, ['/bin/sh', '-c']);
    assert.equal(mk.command.length, 1);
    assert.match(mk.command[0], /--make-model/);
    assert.ok(mk.volumes.includes('models:/models'), 'writes into the models volume');
    for (const name of ['worker-14b-cpu', 'worker-32b-cpu']) {
        const s = services[name];
        assert.equal(argValue(s.command, '--device'), 'cpu');
        assert.match(argValue(s.command, '--model'), /^\/models\//);
        assert.ok(s.volumes.includes('models:/models:ro'), `${name} mounts the models read-only`);
        assert.equal(s.depends_on['make-model'].condition, 'service_completed_successfully');
        assert.equal(s.deploy, undefined, `${name} reserves no GPU`);
    }
});

test('compose: one gpu worker per GPU, each reserving exactly that one (14B replicas on 0-3, 32B on 4-7), no tensor parallelism', () => {
    const gpuWorkers = activeServices(['gpu']).filter((n) => services[n].profiles);
    assert.deepEqual(gpuWorkers.sort(), [...GPU_WORKERS].sort());
    const seen = new Map();
    const byModel = {};
    for (const name of gpuWorkers) {
        const s = services[name];
        const devs = s.deploy?.resources?.reservations?.devices;
        assert.ok(Array.isArray(devs) && devs.length === 1, `${name}: one device reservation`);
        const d = devs[0];
        assert.equal(d.driver, 'nvidia');
        assert.ok(d.capabilities.includes('gpu'), `${name}: capabilities [gpu]`);
        assert.equal(d.count, undefined, `${name}: device_ids, not a count`);
        assert.ok(Array.isArray(d.device_ids) && d.device_ids.length === 1, `${name}: exactly one GPU, got ${d.device_ids}`);
        const id = d.device_ids[0];
        assert.equal(typeof id, 'string', 'device ids are strings');
        assert.ok(!seen.has(id), `GPU ${id} reserved by ${name} and ${seen.get(id)}`);
        seen.set(id, name);
        assert.equal(name.split('-').pop(), id, `${name} is named after its GPU`);
        assert.equal(argValue(s.command, '--device'), 'cuda');
        // One GPU per worker here: the layout is replicas (a 14B and a 32B
        // each fit one GPU), so no worker is split over several.
        const tp = argValue(s.command, '--tensor-parallel-size');
        assert.ok(tp === undefined || tp === '1', `${name}: --tensor-parallel-size ${tp}`);
        const served = argValue(s.command, '--served-model-name');
        assert.ok(served in LAYOUT, `${name} serves ${served}`);
        assert.match(argValue(s.command, '--model'), new RegExp(`^/models/.*${served.slice(5).toUpperCase()}$`));
        (byModel[served] ||= []).push(id);
        const mount = s.volumes.map(interpolate).find((v) => v.split(':')[1] === '/models');
        assert.ok(mount && mount.endsWith(':ro'), `${name} mounts the host's models read-only at /models`);
        assertFitsOneGpu(name, served, s.command);
    }
    for (const [model, gpus] of Object.entries(LAYOUT)) assert.deepEqual(byModel[model].sort(), gpus, model);
    assert.deepEqual([...seen.keys()].sort(), ['0', '1', '2', '3', '4', '5', '6', '7']);
});

test('compose: the gpu workers run what gateway.8gpu.json launches, model by model', () => {
    const cfg = JSON.parse(fs.readFileSync(CONFIG_8GPU, 'utf8'));
    for (const name of GPU_WORKERS) {
        const cmd = services[name].command.map(interpolate);
        const model = argValue(cmd, '--served-model-name');
        for (const { launch: l } of cfg.models.find((m) => m.name === model).backends) {
            assert.equal(path.basename(argValue(cmd, '--model')), path.basename(l.model), `${name}: the model of ${model}`);
            assert.equal(argValue(cmd, '--device'), l.device);
            for (const flag of ['--dtype', '--max-model-len', '--max-num-seqs', '--gpu-memory-utilization']) {
                assert.equal(argValue(cmd, flag), argValue(l.args, flag), `${name} ${flag} as in ${path.basename(CONFIG_8GPU)}`);
            }
        }
    }
});

test('compose: one image tag is one build; every Dockerfile and build argument exists', () => {
    const byImage = new Map();
    for (const [name, s] of Object.entries(services)) {
        if (!s.build) continue;
        assert.ok(s.image, `${name}: a built service names its image, so the others that share it do not pull`);
        if (byImage.has(s.image)) {
            assert.deepEqual(s.build, byImage.get(s.image).build, `${name} and ${byImage.get(s.image).name} build ${s.image} alike`);
        } else {
            byImage.set(s.image, { name, build: s.build });
        }
        assert.equal(s.build.context, '.');
        const df = path.join(ROOT, s.build.dockerfile);
        assert.ok(fs.existsSync(df), `${name}: ${s.build.dockerfile} exists`);
        const text = fs.readFileSync(df, 'utf8');
        for (const arg of Object.keys(s.build.args || {})) {
            assert.match(text, new RegExp(`^ARG ${arg}=`, 'm'), `${s.build.dockerfile} declares ARG ${arg}`);
        }
    }
    // Services without build use a public image.
    assert.match(services.redis.image, /^redis:/);
});

test('compose CLI (when installed) accepts the file and agrees on the profiles', (t) => {
    const v2 = spawnSync('docker', ['compose', 'version'], { encoding: 'utf8' });
    if (!v2.error && v2.status === 0) {
        for (const profile of ['cpu', 'gpu']) {
            const r = spawnSync('docker', ['compose', '-f', COMPOSE, '--profile', profile, 'config', '--format', 'json'],
                { encoding: 'utf8', cwd: ROOT });
            assert.equal(r.status, 0, r.stderr);
            const j = JSON.parse(r.stdout);
            assert.deepEqual(Object.keys(j.services).sort(), activeServices([profile]).sort());
            if (profile === 'gpu') {
                // Its merges (<<) came out as ours did.
                for (const n of GPU_WORKERS) {
                    assert.deepEqual(j.services[n].deploy.resources.reservations.devices[0].device_ids, [n.split('-').pop()]);
                    assert.deepEqual(j.services[n].command, services[n].command.map(interpolate), n);
                }
            }
        }
        return;
    }
    const v1 = spawnSync('docker-compose', ['version'], { encoding: 'utf8' });
    if (!v1.error && v1.status === 0) {
        // v1 validates the schema (it ignores profiles in `config`).
        const r = spawnSync('docker-compose', ['-f', COMPOSE, 'config', '-q'], { encoding: 'utf8', cwd: ROOT });
        assert.equal(r.status, 0, r.stderr);
        const names = spawnSync('docker-compose', ['-f', COMPOSE, 'config', '--services'], { encoding: 'utf8', cwd: ROOT });
        assert.deepEqual(names.stdout.trim().split('\n').sort(), Object.keys(services).sort());
        return;
    }
    t.skip('neither `docker compose` nor docker-compose is installed');
});

// The cpu profile end to end, without Docker: make-model's command, the two
// workers' commands and the gateway's config, as plain processes on
// loopback (paths and ports moved, nothing else).
test('the cpu profile runs: its commands and config serve chat end to end', async (t) => {
    if (!fs.existsSync(workerBin())) throw new Error(`worker binary not found: ${workerBin()} (make)`);
    const dir = path.join(TMP, `compose-cpu-${process.pid}`);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    const procs = [];
    let gw = null;
    t.after(async () => {
        await gw?.stop();
        for (const p of procs) p.kill('SIGKILL');
        fs.rmSync(dir, { recursive: true, force: true });
    });
    const local = (s) => s.replaceAll('/models/', `${dir}/`);
    const mk = interpolate(services['make-model'].command[0]).replaceAll('modelmux-worker ', `${workerBin()} `);
    for (let run = 0; run < 2; run++) {
        const r = spawnSync('/bin/sh', ['-c', local(mk)], { encoding: 'utf8', timeout: 120000 });
        assert.equal(r.status, 0, r.stderr);
        // The second run finds the models and leaves them alone.
        assert.equal(r.stdout.includes('qwen2 model'), run === 0, `run ${run}: ${r.stdout}`);
    }
    const ports = new Map();
    const portOf = {};   // served model -> its worker's port
    for (const name of ['worker-14b-cpu', 'worker-32b-cpu']) {
        const port = await getFreePort();
        const args = services[name].command.map((a) => local(interpolate(a)));
        args[args.indexOf('--port') + 1] = String(port);
        args[args.indexOf('--host') + 1] = '127.0.0.1';
        const p = spawn(workerBin(), args, { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        p.stderr.on('data', (d) => { err += d; });
        procs.push(p);
        for (const n of dnsNames(name)) ports.set(n, port);
        portOf[argValue(args, '--served-model-name')] = port;
        await waitFor(async () => {
            if (p.exitCode !== null) throw new Error(`${name} exited ${p.exitCode}: ${err}`);
            return (await request(port, { path: '/health', timeoutMs: 1000 })).status === 200;
        }, 30000, { what: `${name} healthy` });
    }
    const cfg = JSON.parse(fs.readFileSync(mountedConfig(services.gateway), 'utf8'));
    delete cfg.listen;
    delete cfg.admin_listen;
    delete cfg.redis;
    delete cfg.access_log;
    for (const m of cfg.models) {
        for (const b of m.backends || []) {
            const u = new URL(b.url);
            assert.ok(ports.has(u.hostname), `a local worker for ${u.hostname}`);
            b.url = `http://127.0.0.1:${ports.get(u.hostname)}`;
        }
    }
    gw = await startGateway(cfg);
    for (const model of ['qwen-14b', 'qwen-32b']) {
        const r = await postJson(gw.port, '/v1/chat/completions', { model, max_tokens: 8, messages: [{ role: 'user', content: 'hi' }] });
        assert.equal(r.status, 200, r.body);
        assert.equal(r.json().model, model);
        assert.equal(r.headers['x-modelmux-backend'], `http://127.0.0.1:${portOf[model]}`);
    }
    const r = await postJson(gw.port, '/v1/chat/completions', { model: 'chat', max_tokens: 8, messages: [{ role: 'user', content: 'hi' }] },
        { 'x-user-id': 'alice' });
    assert.equal(r.status, 200, r.body);
    assert.ok(['qwen-14b', 'qwen-32b'].includes(r.headers['x-modelmux-model']), JSON.stringify(r.headers));
});

test('the gpu profile\'s worker flags are all accepted by modelmux-worker', () => {
    for (const name of GPU_WORKERS) {
        const args = services[name].command.map(interpolate);
        args[args.indexOf('--port') + 1] = '0';
        const r = spawnSync(workerBin(), args, { encoding: 'utf8', timeout: 5000 });
        // Without a GPU (or, today, a CUDA backend) it stops, but never over a flag.
        assert.doesNotMatch(r.stderr, /unknown flag|--help' for the options|expected/, `${name}: ${r.stderr}`);
    }
});

// ---- Dockerfiles -----------------------------------------------------------

// FROM/ARG/COPY/RUN... of a Dockerfile, continuation lines joined.
function dockerInstructions(file) {
    const text = fs.readFileSync(file, 'utf8').replace(/\\\n/g, ' ');
    return text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'))
        .map((l) => { const m = /^([A-Z]+)\s+(.*)$/.exec(l); assert.ok(m, `${file}: ${l}`); return { op: m[1], arg: m[2] }; });
}

// The Debian package providing a shared library the binary needs.
function neededPackages(bin) {
    const od = spawnSync('objdump', ['-p', bin], { encoding: 'utf8' });
    if (od.error || od.status !== 0) return null;
    const libs = [...od.stdout.matchAll(/^\s*NEEDED\s+(\S+)/gm)].map((m) => m[1]);
    const cache = spawnSync('ldconfig', ['-p'], { encoding: 'utf8' }).stdout || '';
    const pkgs = new Set();
    for (const lib of libs) {
        const m = new RegExp(`^\\s*${lib.replace(/[.+]/g, '\\$&')} .*=> (\\S+)$`, 'm').exec(cache);
        if (!m) return null;
        let owner = null;
        for (const p of [fs.realpathSync(m[1]), m[1]]) {
            const q = spawnSync('dpkg', ['-S', p], { encoding: 'utf8' });
            if (!q.error && q.status === 0) { owner = q.stdout.split(':')[0]; break; }
        }
        if (!owner) return null;
        pkgs.add(owner);
    }
    return pkgs;
}

const BASE_PACKAGES = new Set(['libc6', 'libgcc-s1']);   // in every Debian/Ubuntu image
const PROVIDED_BY = { 'libopenblas0-pthread': 'libopenblas0' };   // an alternative of the metapackage

for (const [file, target, bin] of [['deploy/Dockerfile', 'modelmux-gateway', gatewayBin()],
    ['deploy/Dockerfile.worker', 'modelmux-worker', workerBin()]]) {
    test(`${file}: builds ${target} from sources that exist, runs it unprivileged with the libraries it needs`, () => {
        const ins = dockerInstructions(path.join(ROOT, file));
        const froms = ins.filter((i) => i.op === 'FROM');
        assert.equal(froms.length, 2, 'a build stage and a runtime stage');
        assert.match(froms[0].arg, / AS build$/);
        const stage2 = ins.slice(ins.indexOf(froms[1]));
        // Sources: every COPY of the build stage exists, and covers every
        // directory whose headers the copied sources include.
        const copied = [];
        for (const c of ins.slice(0, ins.indexOf(froms[1])).filter((i) => i.op === 'COPY')) {
            const [src, dst, ...more] = c.arg.split(/\s+/);
            assert.ok(fs.existsSync(path.join(ROOT, src)), `${file}: COPY ${src} exists`);
            // The tree's layout is kept: the Makefile finds common/, gateway/ ... where they are.
            assert.ok(more.length === 0 && (dst === src || (dst === './' && !src.includes('/'))), `${file}: COPY ${c.arg} keeps the layout`);
            copied.push(src);
        }
        assert.ok(!copied.includes('.'), `${file}: no COPY . (a host build/ would leak in)`);
        // make stops at an `include` whose file is missing (`-include` does not).
        const mk = fs.readFileSync(path.join(ROOT, 'Makefile'), 'utf8');
        for (const m of mk.matchAll(/^include\s+(.+)$/gm)) {
            for (const inc of m[1].trim().split(/\s+/)) {
                assert.ok(copied.some((c) => inc === c || inc.startsWith(`${c.replace(/\/$/, '')}/`)),
                    `${file}: the Makefile includes ${inc}, which no COPY brings in`);
            }
        }
        const incDirs = copied.filter((d) => fs.statSync(path.join(ROOT, d)).isDirectory());
        for (const d of incDirs.filter((x) => ['common', 'gateway', 'worker'].includes(x))) {
            for (const f of fs.readdirSync(path.join(ROOT, d)).filter((x) => /\.[ch]$/.test(x))) {
                const src = fs.readFileSync(path.join(ROOT, d, f), 'utf8');
                for (const m of src.matchAll(/^#include "([^"]+)"/gm)) {
                    assert.ok(incDirs.some((id) => fs.existsSync(path.join(ROOT, id, m[1]))),
                        `${file}: ${d}/${f} includes ${m[1]}, which no copied directory holds`);
                }
            }
        }
        assert.ok(ins.some((i) => i.op === 'RUN' && i.arg.includes(`make`) && i.arg.includes(`build/${target}`)), `${file}: make build/${target}`);
        const cp = stage2.find((i) => i.op === 'COPY' && i.arg.startsWith('--from=build '));
        assert.match(cp.arg, new RegExp(`/build/${target} /usr/local/bin/${target}$`));
        const user = stage2.filter((i) => i.op === 'USER').pop();
        assert.ok(user && user.arg !== 'root' && user.arg !== '0', `${file}: runs as a dedicated user`);
        assert.match(stage2.find((i) => i.op === 'ENTRYPOINT').arg, new RegExp(`^\\["/usr/local/bin/${target}"\\]$`));
        // Runtime libraries: each shared library the binary needs (this
        // machine is Debian 12, like the image) comes from a package the
        // runtime stage installs.
        const need = neededPackages(bin);
        if (!need) return;   // no objdump/dpkg here: nothing to compare with
        // A sanitizer build (make SANITIZE=...) links differently (its
        // runtime pulls libraries the image's plain build drops); the image
        // is built without one, so only a plain build is compared.
        if ([...need].some((p) => /^lib(asan|ubsan|tsan)\d*$/.test(p))) return;
        const installed = stage2.filter((i) => i.op === 'RUN').map((i) => i.arg).join(' ');
        for (const p of need) {
            if (BASE_PACKAGES.has(p)) continue;
            const want = PROVIDED_BY[p] || p;
            assert.match(installed, new RegExp(`(^|\\s)${want.replace(/[.+]/g, '\\$&')}(\\s|$)`), `${file}: the runtime stage installs ${want} (${target} needs it)`);
        }
    });
}

// ---- the systemd unit ------------------------------------------------------

function parseUnit(text) {
    const sections = {};
    let cur = null;
    for (const [i, line] of text.split('\n').entries()) {
        const l = line.trim();
        if (!l || l.startsWith('#') || l.startsWith(';')) continue;
        const s = /^\[([A-Za-z]+)\]$/.exec(l);
        if (s) { cur = sections[s[1]] = sections[s[1]] || {}; continue; }
        const kv = /^([A-Za-z]+)=(.*)$/.exec(l);
        assert.ok(cur && kv, `unit line ${i + 1}: ${l}`);
        (cur[kv[1]] = cur[kv[1]] || []).push(kv[2]);
    }
    return sections;
}

test('systemd unit: -c config, reload = check + SIGHUP, SIGTERM with a stop timeout above the drain, hardening that keeps GPUs', (t) => {
    const u = parseUnit(fs.readFileSync(UNIT, 'utf8'));
    const s = u.Service;
    const one = (k) => { assert.equal(s[k]?.length, 1, `exactly one ${k}`); return s[k][0]; };
    assert.equal(one('ExecStart'), '/usr/local/bin/modelmux-gateway -c /etc/modelmux/gateway.json');
    assert.deepEqual(s.ExecReload, ['/usr/local/bin/modelmux-gateway -c /etc/modelmux/gateway.json --check', '/bin/kill -HUP $MAINPID']);
    assert.deepEqual(s.ExecStartPre, ['/usr/local/bin/modelmux-gateway -c /etc/modelmux/gateway.json --check']);
    assert.equal(one('KillSignal'), 'SIGTERM');
    assert.equal(one('KillMode'), 'mixed', 'SIGTERM to the gateway only; it stops its own workers after draining');
    assert.equal(one('Restart'), 'on-failure');
    assert.ok(['exec', 'simple'].includes(one('Type')));
    const user = one('User');
    assert.ok(user && user !== 'root' && user !== '0', 'a dedicated user');
    assert.ok(!s.DynamicUser, 'a fixed user: it owns the state and log directories');
    // The stop timeout outlasts the drain plus stopping the workers.
    const cfg = JSON.parse(fs.readFileSync(CONFIG_8GPU, 'utf8'));
    const grace = cfg.shutdown_grace_ms ?? 30000;
    const stopMs = Number(one('TimeoutStopSec')) * 1000;
    assert.ok(stopMs > grace + WORKER_STOP_MS, `TimeoutStopSec ${stopMs} ms > grace ${grace} + worker stop ${WORKER_STOP_MS}`);
    // Hardening present ...
    for (const [k, v] of [['ProtectSystem', 'strict'], ['PrivateTmp', 'yes'], ['ProtectHome', 'yes'], ['ProtectKernelTunables', 'yes']]) {
        assert.equal(s[k]?.[0], v, `${k}=${v}`);
    }
    // ... but nothing that takes /dev/nvidia* away or stops the driver's
    // helper from creating /dev/nvidia-uvm.
    for (const k of ['PrivateDevices', 'DevicePolicy', 'DeviceAllow', 'ProtectClock', 'NoNewPrivileges',
        'MemoryDenyWriteExecute', 'CapabilityBoundingSet', 'ProtectKernelModules', 'SystemCallFilter', 'PrivateUsers']) {
        assert.equal(s[k], undefined, `${k} would break GPU access`);
    }
    assert.ok(u.Install.WantedBy.includes('multi-user.target'));

    const v = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
    if (v.error || v.status !== 0) {
        t.diagnostic('systemd-analyze not installed: verify skipped');
        return;
    }
    // verify wants the binaries to exist: point it at the built ones.
    const dir = path.join(TMP, `unit-${process.pid}`);
    fs.mkdirSync(dir, { recursive: true });
    const copy = path.join(dir, 'modelmux-gateway.service');
    fs.writeFileSync(copy, fs.readFileSync(UNIT, 'utf8').replaceAll('/usr/local/bin/modelmux-gateway', gatewayBin()));
    const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
    fs.rmSync(dir, { recursive: true, force: true });
    const ours = (r.stderr || '').split('\n').filter((l) => l.includes('modelmux-gateway.service'));
    assert.deepEqual(ours, [], `systemd-analyze verify: ${r.stderr}`);
    assert.equal(r.status, 0, r.stderr);
});

// ---- example configs -------------------------------------------------------

test('every example config in deploy/ passes --check', () => {
    const files = fs.readdirSync(path.join(ROOT, 'deploy')).filter((f) => /^gateway.*\.json$/.test(f));
    assert.ok(files.includes('gateway.8gpu.json') && files.includes('gateway.compose.json'), files.join(' '));
    for (const f of files) {
        const r = gatewayCheck(path.join(ROOT, 'deploy', f));
        assert.equal(r.status, 0, `${f}: ${r.stderr}`);
        assert.match(r.stdout, /configuration is valid/);
    }
});

test('gateway.8gpu.json: one worker per GPU launched by the gateway, 14B replicas on GPUs 0-3, 32B on 4-7, split "chat" between them', () => {
    const cfg = JSON.parse(fs.readFileSync(CONFIG_8GPU, 'utf8'));
    const model = (n) => cfg.models.find((m) => m.name === n);
    const ports = new Set();
    for (const [name, gpus] of Object.entries(LAYOUT)) {
        const m = model(name);
        assert.equal(m.strategy, 'least_outstanding', `${name}: the gateway balances its replicas`);
        assert.equal(m.backends.length, gpus.length, `${name}: one replica per GPU`);
        const got = [];
        for (const b of m.backends) {
            const l = b.launch;
            assert.ok(l, `${name}: launched by the gateway`);
            assert.match(l.model, new RegExp(`^/data/models/.*${name.slice(5).toUpperCase()}$`));
            // The fleet passes --tensor-parallel-size = the number of GPUs,
            // and the worker exits 2 above 1: exactly one GPU each.
            assert.match(l.gpus, /^\d+$/, `${name}: one GPU per worker, got "${l.gpus}"`);
            assert.equal(l.device, 'cuda');
            assert.ok(!l.share_gpus, 'no GPU shared');
            assert.ok(!ports.has(l.port), `port ${l.port} used twice`);
            ports.add(l.port);
            got.push(l.gpus);
            assertFitsOneGpu(`${name} on GPU ${l.gpus}`, name, l.args || []);
        }
        assert.deepEqual(got.sort(), gpus, `${name}'s GPUs`);
    }
    assert.deepEqual(model('qwen-14b').fallback, ['qwen-32b']);
    const split = model('chat').split;
    assert.deepEqual(split.map((x) => x.model).sort(), ['qwen-14b', 'qwen-32b']);
    assert.ok(split.every((x) => x.weight > 0));
    assert.equal(split.find((x) => x.model === 'qwen-14b').weight, 90);
    assert.equal(split.find((x) => x.model === 'qwen-32b').weight, 10);
    // --check guards the layout: an overlapping GPU is refused.
    const bad = JSON.parse(JSON.stringify(cfg));
    bad.models.find((m) => m.name === 'qwen-32b').backends[0].launch.gpus = '3';
    fs.mkdirSync(TMP, { recursive: true });
    const f = path.join(TMP, `8gpu-overlap-${process.pid}.json`);
    fs.writeFileSync(f, JSON.stringify(bad));
    const r = gatewayCheck(f);
    fs.rmSync(f, { force: true });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /GPU 3 is also used by/);
    // The worker accepts the command line the fleet will give it (the
    // fleet's own flags, then "args"): without a GPU, or in a build without
    // the CUDA backend, it stops there, never at a flag.
    for (const name of Object.keys(LAYOUT)) {
        for (const { launch: l } of model(name).backends) {
            const args = ['--model', l.model, '--port', '0', '--host', '127.0.0.1', '--served-model-name', name,
                '--tensor-parallel-size', String(l.gpus.split(',').length), '--device', l.device || 'cuda', ...(l.args || [])];
            const w = spawnSync(workerBin(), args, { encoding: 'utf8', timeout: 5000 });
            assert.doesNotMatch(w.stderr, /unknown flag|--help' for the options|expected|tensor parallelism/, `${name}: ${w.stderr}`);
        }
    }
});
