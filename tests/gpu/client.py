#!/usr/bin/env python3
"""HTTP client for tests/gpu/run.sh (Python 3 standard library only: the GPU
machine has python3 but nothing can be installed there).

  client.py complete --url U --out FILE [--concurrency N] [--logprobs K]
      The e2e prompts (8 texts), greedy, max_tokens 48, ignore_eos; all
      requests at once with --concurrency 8, one at a time with 1. Writes
      the answers (text, and with --logprobs the tokens' offsets and top
      log-probabilities) as JSON.
  client.py compare GOT REF --name NAME [--tie 0.05] [--info]
      Texts of GOT against REF (which must have logprobs): one
      "ok - NAME (...)" / "not ok - NAME (...)" line; a difference is
      excused when REF's top-2 gap at the first differing token is below
      --tie (a near tie). --info prints a "# NAME: ..." line instead (a
      comparison to report, not to pass or fail).
  client.py load --url U --concurrency N [--prompt-len 128] [--max-tokens 128]
                 [--label L] [--timeout S]
      N streaming requests at once (token-id prompts, ignore_eos, greedy);
      prints one JSON line: throughput, TTFT mean/p50/p90, inter-token
      latency, errors.
  client.py summary JSONL OUT_JSON
      Every JSON line of a bench run into one JSON file, and the readable
      summary (with the decode roofline) on stdout.
"""
import argparse
import http.client
import json
import os
import re
import selectors
import socket
import statistics
import sys
import threading
import time
import urllib.parse

# The end-to-end model's flags and prompts, shared with run.sh and with
# gpu_check's replay of the worker's admission orders (tests/gpu/check.c).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e.json")) as _f:
    _E2E = json.load(_f)
PROMPTS = _E2E["prompts"]
E2E_MAX_TOKENS = _E2E["max_tokens"]


def post(url, body, timeout, stream=False):
    """POST JSON; returns (connection, response) with the body unread."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = json.dumps(body).encode()
    conn.request("POST", u.path or "/", body=data,
                 headers={"Content-Type": "application/json",
                          "Accept": "text/event-stream" if stream else "application/json"})
    return conn, conn.getresponse()


def model_name(url, timeout=10):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return body["data"][0]["id"]


def run_threads(n, fn):
    """fn(i) for i in 0..n-1, all started together; returns the results."""
    out = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        try:
            out[i] = fn(i)
        except Exception as e:  # reported per request, not fatal
            out[i] = {"error": f"{type(e).__name__}: {e}"}

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


# ---- complete / compare ----

def cmd_complete(a):
    name = model_name(a.url)

    def one(i):
        body = {"model": name, "prompt": PROMPTS[i], "max_tokens": E2E_MAX_TOKENS,
                "temperature": 0, "ignore_eos": True}
        if a.logprobs:
            body["logprobs"] = a.logprobs
        conn, r = post(a.url + "/v1/completions", body, a.timeout)
        raw = r.read()
        conn.close()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {raw[:300]!r}"}
        ch = json.loads(raw)["choices"][0]
        res = {"prompt": PROMPTS[i], "text": ch["text"],
               "completion_tokens": json.loads(raw)["usage"]["completion_tokens"]}
        lp = ch.get("logprobs")
        if lp:
            res["tokens"] = lp["tokens"]
            res["text_offset"] = lp["text_offset"]
            res["top"] = [sorted(t.values(), reverse=True)[:2] if t else None
                          for t in lp["top_logprobs"]]
        return res

    n = len(PROMPTS)
    t0 = time.monotonic()
    if a.concurrency > 1:
        res = run_threads(n, one)
    else:
        res = [one(i) for i in range(n)]
    wall = time.monotonic() - t0
    with open(a.out, "w") as f:
        json.dump({"concurrency": a.concurrency, "wall_s": wall, "results": res}, f, indent=1)
    errs = [r["error"] for r in res if "error" in r]
    print(f"# {n} requests, concurrency {a.concurrency}: {wall:.2f} s"
          + (f", {len(errs)} failed: {errs[0]}" if errs else ""))
    return 1 if errs else 0


def first_diff(x, y):
    n = min(len(x), len(y))
    for i in range(n):
        if x[i] != y[i]:
            return i
    return n if len(x) != len(y) else -1


def cmd_compare(a):
    got = json.load(open(a.got))["results"]
    ref = json.load(open(a.ref))["results"]
    equal = ties = 0
    bad = []
    notes = []
    for i, (g, r) in enumerate(zip(got, ref)):
        if "error" in g or "error" in r:
            bad.append(f"prompt {i}: {g.get('error') or r.get('error')}")
            continue
        d = first_diff(g["text"], r["text"])
        if d < 0:
            equal += 1
            continue
        offs, top = r.get("text_offset"), r.get("top")
        if not offs or not top:
            bad.append(f"prompt {i}: texts differ at char {d} (no logprobs to judge)")
            continue
        if "tokens" in g and "tokens" in r:
            # Both runs report their tokens: the first differing token is
            # exact (character offsets are not, when tokens end inside a
            # multi-byte character, as random models' outputs often do).
            j = first_diff(g["tokens"], r["tokens"])
            if j < 0:
                equal += 1
                continue
        else:
            # Only the reference has tokens: the token from its character
            # offsets, approximate (specials count there, not in the text;
            # split UTF-8 characters count once per piece), so said so.
            j = max(k for k in range(len(offs)) if offs[k] <= d) if offs[0] <= d else 0
            notes.append(f"prompt {i}: token {j} from character offsets (approximate)")
        t = top[j] if j < len(top) else None
        gap = (t[0] - t[1]) if t and len(t) >= 2 else float("inf")
        if gap < a.tie:
            ties += 1
            notes.append(f"prompt {i}: near tie at token {j} (gap {gap:.3f})")
        else:
            bad.append(f"prompt {i}: differs at token {j} (char {d}, reference gap {gap:.3f}): "
                       f"{g['text'][max(0, d - 10):d + 20]!r} vs {r['text'][max(0, d - 10):d + 20]!r}")
    n = len(ref)
    text = f"{equal}/{n} texts equal, {ties} near ties"
    if notes:
        text += " (" + "; ".join(notes[:3]) + ")"
    if bad:
        text += "; " + "; ".join(bad[:2])
    if a.info:
        print(f"# {a.name}: {text}")
        return 0
    print(f"{'not ok' if bad or len(got) != n else 'ok'} - {a.name} ({text})")
    return 1 if bad else 0


# ---- load ----

class Stream:
    """One streaming completion on a non-blocking socket."""

    def __init__(self, url, name, prompt, max_tokens):
        u = urllib.parse.urlsplit(url)
        self.addr = (u.hostname, u.port)
        body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        self.req = (f"POST /v1/completions HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                    f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        self.sent = 0
        self.buf = bytearray()
        self.start = self.first = self.end = None

    def feed(self, data, now):
        """Take received bytes; True once the stream is complete."""
        tail = len(self.buf)
        self.buf += data
        # A marker may straddle two reads: search from a little before.
        if self.first is None and self.buf.find(b'"choices":[{', max(0, tail - 16)) >= 0:
            self.first = now
        return self.buf.find(b"data: [DONE]", max(0, tail - 16)) >= 0

    def result(self):
        end = self.end if self.end is not None else time.monotonic()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if self.end is None:
            return {"error": f"timed out after {len(self.buf)} bytes"}
        if b" 200 " not in status + b" ":
            return {"error": f"{status.decode(errors='replace')}: {rest[:200]!r}"}
        if b'"error"' in rest:
            i = rest.find(b'"error"')
            return {"error": rest[i:i + 200].decode(errors="replace")}
        m = re.findall(rb'"completion_tokens":\s*(\d+)', rest)
        chunks = rest.count(b'"choices":[{')
        return {"start": self.start, "first": self.first if self.first is not None else end,
                "end": end, "tokens": int(m[-1]) if m else chunks, "chunks": chunks}


def run_streams(streams, timeout):
    """Drive every stream from one thread with a selector: threads, one a
    stream, spent ~70 us of GIL hand-offs per token, which capped this
    client at a few thousand tokens/s; here a token costs one recv and a
    substring search."""
    sel = selectors.DefaultSelector()
    for st in streams:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        st.start = time.monotonic()
        sock.connect_ex(st.addr)
        sel.register(sock, selectors.EVENT_WRITE, st)
    left = len(streams)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for key, mask in sel.select(timeout=1.0):
            st, sock = key.data, key.fileobj
            now = time.monotonic()
            done = False
            try:
                if mask & selectors.EVENT_WRITE:
                    st.sent += sock.send(st.req[st.sent:])
                    if st.sent == len(st.req):
                        sel.modify(sock, selectors.EVENT_READ, st)
                elif mask & selectors.EVENT_READ:
                    data = sock.recv(1 << 16)
                    done = not data or st.feed(data, now)
            except OSError as e:
                st.buf += f"\r\n\r\nsocket error: {e}".encode()
                done = True
            if done:
                st.end = now
                sel.unregister(sock)
                sock.close()
                left -= 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return [st.result() for st in streams]


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cmd_load(a):
    name = model_name(a.url)
    n = a.concurrency
    # Byte-level token ids (valid in any generated tokenizer), distinct per request.
    prompts = [[(k * 7919 + i * 131 + a.salt) % 256 for k in range(a.prompt_len)]
               for i in range(n)]
    streams = [Stream(a.url, name, p, a.max_tokens) for p in prompts]
    t0, c0 = time.monotonic(), time.process_time()
    res = run_streams(streams, a.timeout)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    ok = [r for r in res if r and "error" not in r]
    errs = [r["error"] for r in res if not r or "error" in r]
    short = [r for r in ok if r["tokens"] != a.max_tokens]
    ttft = [(r["first"] - r["start"]) * 1e3 for r in ok]
    itl = [(r["end"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in ok if r["tokens"] > 1]
    toks = sum(r["tokens"] for r in ok)
    span = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else float("nan")
    out = {"bench": "http", "label": a.label, "concurrency": n, "prompt_len": a.prompt_len,
           "max_tokens": a.max_tokens, "requests_ok": len(ok), "errors": len(errs),
           "short_answers": len(short), "completion_tokens": toks, "wall_s": round(wall, 4),
           "tok_s": round(toks / span, 2) if ok else None,
           "ttft_mean_ms": round(statistics.mean(ttft), 2) if ttft else None,
           "ttft_p50_ms": round(pct(ttft, 0.5), 2) if ttft else None,
           "ttft_p90_ms": round(pct(ttft, 0.9), 2) if ttft else None,
           "ttft_max_ms": round(max(ttft), 2) if ttft else None,
           "itl_mean_ms": round(statistics.mean(itl), 3) if itl else None,
           "client_cpu_s": round(cpu, 3)}
    if errs:
        out["first_error"] = errs[0]
    print(json.dumps(out))
    return 1 if errs or short else 0


# ---- summary ----

def fmt(x, spec):
    if x is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 0))
    return format(x, spec)


def cmd_summary(a):
    rows = []
    for line in open(a.jsonl):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    with open(a.out_json, "w") as f:
        json.dump({"results": rows}, f, indent=1)
    by = lambda k: [r for r in rows if r.get("bench") == k and "error" not in r]
    out = []
    dev = by("device")
    if dev:
        d = dev[0]
        out.append(f"Device: {d['name']} (sm {d['sm']}, {d['sms']} SMs, "
                   f"{d['global_mem_bytes'] / 2**30:.1f} GiB, datasheet-style peak "
                   f"{d['theoretical_gbs']:.0f} GB/s)")
    copy = [r for r in by("bw") if r["kind"] == "d2d_copy"]
    read = [r for r in by("bw") if r["kind"] == "read"]
    copy_gbs = max((r["best_gbs"] for r in copy), default=None)
    read_gbs = max((r["best_gbs"] for r in read), default=None)
    out.append(f"Bandwidth: device-to-device copy {fmt(copy_gbs, '.0f')} GB/s (read + write "
               f"counted), read kernel {fmt(read_gbs, '.0f')} GB/s (best over grid sizes)")
    gemm = by("gemm")
    peak = max((g["best_tflops"] for g in gemm), default=None)
    if gemm:
        out.append(f"cuBLAS bf16 GEMM: peak {peak:.0f} TFLOP/s; "
                   + "; ".join(f"{g['what']} {g['best_tflops']:.0f}" for g in gemm))
    errors = [r for r in rows if "error" in r]
    for e in errors:
        out.append(f"ERROR in {e.get('bench')}: {e['error']}")
    out.append("")
    out.append("Roofline: a decode step reads bytes_per_step (weights once + every sequence's KV "
               "cache at its mean context);")
    out.append("roofline tok/s = copy bandwidth / bytes_per_token; '% copy' is decode tok/s "
               "against it, '% read' against the read kernel's bandwidth.")
    models = []
    for r in rows:
        if r.get("bench") in ("setup", "verify", "decode_single", "decode_batch", "prefill",
                              "ttft") \
                and r["model"] not in models:
            models.append(r["model"])
    for m in models:
        mr = [r for r in rows if r.get("model") == m]
        setup = [r for r in mr if r.get("bench") == "setup"]
        out.append("")
        if setup:
            s = setup[0]
            out.append(f"Model {m} ({s['backend']}): {s['weight_bytes'] / 1e9:.2f} GB of weights, "
                       f"{s['weight_bytes_per_step'] / 1e9:.2f} GB read per decode step, "
                       f"{s['kv_bytes_per_pos'] / 1e3:.0f} KB KV per position; load "
                       f"{s['load_s']:.1f} s, backend {s['backend_s']:.1f} s")
        else:
            out.append(f"Model {m}")
        out.append(f"  {'measurement':<15} {'batch':>5} {'tok/s':>10} {'ms/step':>9} "
                   f"{'MB/token':>9} {'roofline':>10} {'% copy':>7} {'% read':>7}")
        for r in mr:
            if r.get("bench") not in ("decode_single", "decode_batch"):
                continue
            bpt = r["bytes_per_token"]
            roof = copy_gbs * 1e9 / bpt if copy_gbs else None
            rroof = read_gbs * 1e9 / bpt if read_gbs else None
            out.append(f"  {r['bench']:<15} {r['batch']:>5} {r['tok_s']:>10.1f} "
                       f"{r['ms_per_step']:>9.3f} {bpt / 1e6:>9.1f} {fmt(roof, '>10.1f')} "
                       f"{fmt(roof and 100 * r['tok_s'] / roof, '>6.0f')}% "
                       f"{fmt(rroof and 100 * r['tok_s'] / rroof, '>6.0f')}%")
        for r in mr:
            if r.get("bench") == "verify":
                out.append(f"  verify: {r['agree']}/{r['steps']} greedy tokens equal to the CPU "
                           f"backend's" + (f" (then a near tie at step {r['tie_at']})"
                                          if r["tie_at"] >= 0 else "")
                           + f", first row max |dlogprob| {r['first_row_max_diff']:.4f}: "
                           + ("ok" if r["ok"] else "FAILED"))
            if r.get("bench") == "prefill":
                # Layer weights only (bf16: 2 bytes a parameter): a prefill
                # computes the LM head for its last token alone.
                body = 0
                if setup:
                    s0 = setup[0]
                    emb = s0["vocab"] * s0["hidden"] * 2
                    body = s0["weight_bytes"] - emb * (1 if s0["tied"] else 2)
                tf = 2.0 * body / 2 * r["tokens"] / r["median_s"] / 1e12
                out.append(f"  prefill {r['tokens']} tokens (chunk {r['chunk']}): "
                           f"{r['tok_s']:.0f} tok/s (best {r['best_tok_s']:.0f}), "
                           f"~{tf:.0f} TFLOP/s in the layers' weight products"
                           + (f" = {100 * tf / peak:.0f}% of the GEMM peak" if peak else ""))
            if r.get("bench") == "ttft":
                out.append(f"  TTFT-like ({r['tokens']}-token prefill + first token): "
                           f"median {r['median_ms']:.2f} ms, best {r['best_s'] * 1e3:.2f} ms")
    http = by("http")
    if http:
        out.append("")
        out.append("End to end over HTTP (streaming /v1/completions, token-id prompts, "
                   "ignore_eos, greedy):")
        out.append(f"  {'label':<12} {'conc':>5} {'tok/s':>10} {'TTFT mean':>10} "
                   f"{'TTFT p50':>9} {'TTFT p90':>9} {'ITL ms':>7} {'errors':>6}")
        for h in http:
            out.append(f"  {h['label']:<12} {h['concurrency']:>5} {fmt(h['tok_s'], '>10.1f')} "
                       f"{fmt(h['ttft_mean_ms'], '>10.1f')} {fmt(h['ttft_p50_ms'], '>9.1f')} "
                       f"{fmt(h['ttft_p90_ms'], '>9.1f')} {fmt(h['itl_mean_ms'], '>7.2f')} "
                       f"{h['errors'] + h['short_answers']:>6}")
    for r in rows:
        if r.get("bench") == "http" and r.get("first_error"):
            out.append(f"  first error at concurrency {r['concurrency']}: {r['first_error']}")
    print("\n".join(out))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("complete")
    c.add_argument("--url", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--logprobs", type=int, default=0)
    c.add_argument("--timeout", type=float, default=60)
    c = sub.add_parser("compare")
    c.add_argument("got")
    c.add_argument("ref")
    c.add_argument("--name", required=True)
    c.add_argument("--tie", type=float, default=0.05)
    c.add_argument("--info", action="store_true")
    c = sub.add_parser("load")
    c.add_argument("--url", required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--prompt-len", type=int, default=128)
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--label", default="")
    c.add_argument("--salt", type=int, default=0)
    c.add_argument("--timeout", type=float, default=120)
    c = sub.add_parser("summary")
    c.add_argument("jsonl")
    c.add_argument("out_json")
    a = ap.parse_args()
    return {"complete": cmd_complete, "compare": cmd_compare, "load": cmd_load,
            "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
