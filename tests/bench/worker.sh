#!/bin/sh
# tests/bench/worker.sh: `make bench-worker`. Prompt and generation speed of
# the real worker (build/modelmux-worker, CPU backend) on a generated model
# of Qwen2.5-0.5B's shape (bf16), driven over HTTP, next to this machine's
# memory-bandwidth roofline for decode (every weight byte is read once per
# step, so tokens/s per sequence <= read bandwidth / bytes of weights).
#
# Steps:
#   1. the model: generated once into $BENCH_OUT/models/ (kept; regenerated
#      when the generator's flags change), random weights, 988 MB of bf16;
#   2. read bandwidth: `cpu_bench --membw 2` (1 and 2 threads, one or four
#      streams each), before the worker starts and again after it stopped,
#      the best of all; bytes per decode step: `cpu_bench --weights`;
#   3. the worker on a free port, --max-num-seqs 8, --max-model-len 1024;
#      warm-up requests (one long prompt, then 8 at once);
#   4. prefill: a 512-token prompt (token ids), max_tokens 1, wall time of
#      the request -> prompt tokens/s;
#   5. decode, 1 and 8 concurrent requests: the same requests with
#      max_tokens 1 and with 1 + GEN (ignore_eos, greedy, no stop), so
#      decode tokens/s = requests x GEN / (time(1 + GEN) - time(1)): the
#      prefill, tokenization and HTTP cancel out. The worker's own
#      inter-token latency (/metrics histogram, sum / count over the
#      1 + GEN runs) is shown alongside as a cross-check.
# Each measurement runs WB_RUNS times (interleaved: 1 then 1 + GEN); the
# table shows medians, every run is listed below it.
#
# Knobs: WB_RUNS (3) WB_PROMPT (512) WB_DECODE_PROMPT (64) WB_GEN (128)
# WB_CONC ("1 8") WB_THREADS (the worker's default: one per core)
# BENCH_OUT (build/bench) BUILD (build) WORKER CPU_BENCH (binaries).
# Output: progress on stderr, the markdown section on stdout and in
# $BENCH_OUT/worker-results.md. Exit 1 when a request fails or returns a
# wrong token count, or a process dies; a missed goal is not a failure.
# val is set by eval:
# shellcheck disable=SC2154
set -u
cd "$(dirname "$0")/../.." || exit 1

BUILD=${BUILD:-build}
WORKER=${WORKER:-$BUILD/modelmux-worker}
CPU_BENCH=${CPU_BENCH:-$BUILD/tests/cpu_bench}
BENCH_OUT=${BENCH_OUT:-$BUILD/bench}
WB_RUNS=${WB_RUNS:-3}
WB_PROMPT=${WB_PROMPT:-512}
WB_DECODE_PROMPT=${WB_DECODE_PROMPT:-64}
WB_GEN=${WB_GEN:-128}
WB_CONC=${WB_CONC:-1 8}
WB_THREADS=${WB_THREADS:-}

for v in WB_RUNS WB_PROMPT WB_DECODE_PROMPT WB_GEN; do
    eval "val=\$$v"
    case $val in
        ''|*[!0-9]*) echo "bench-worker: $v must be a positive integer, not '$val'" >&2; exit 2 ;;
    esac
    [ "$val" -gt 0 ] || { echo "bench-worker: $v must be > 0" >&2; exit 2; }
done
for c in $WB_CONC; do
    case $c in ''|*[!0-9]*|0) echo "bench-worker: WB_CONC: bad count '$c'" >&2; exit 2 ;; esac
    [ "$c" -le 8 ] || { echo "bench-worker: WB_CONC: at most 8 (--max-num-seqs)" >&2; exit 2; }
done
MAX_LEN=1024
if [ $((WB_PROMPT + 1)) -gt $MAX_LEN ] || [ $((WB_DECODE_PROMPT + 1 + WB_GEN)) -gt $MAX_LEN ]; then
    echo "bench-worker: prompt + generation must fit in $MAX_LEN tokens" >&2
    exit 2
fi
for b in "$WORKER" "$CPU_BENCH"; do
    [ -x "$b" ] || { echo "bench-worker: $b not built (make all)" >&2; exit 1; }
done
for t in curl awk; do
    command -v "$t" >/dev/null 2>&1 || { echo "bench-worker: needs $t" >&2; exit 1; }
done

log() { echo "bench-worker: $*" >&2; }
die() { log "$*"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mmbenchw.XXXXXX") || exit 1
WPID=""
stop_worker() {
    [ -n "$WPID" ] || return 0
    kill -TERM "$WPID" 2>/dev/null
    i=0
    while kill -0 "$WPID" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$WPID" 2>/dev/null
    WPID=""
}
cleanup() {
    stop_worker
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')

# ---------------------------------------------------------------- the model

# Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads of 64,
# intermediate 4864, vocab 151936, tied embeddings, rope theta 1e6.
MODEL_ARGS="--arch qwen2 --layers 24 --hidden 896 --heads 14 --kv-heads 2 --head-dim 64"
MODEL_ARGS="$MODEL_ARGS --intermediate 4864 --vocab 151936 --max-pos 32768 --tie"
MODEL_ARGS="$MODEL_ARGS --rope-theta 1000000 --dtype bf16"
MODEL=$BENCH_OUT/models/qwen2.5-0.5b-shape-bf16
mkdir -p "$BENCH_OUT/models" || exit 1
if [ "$(cat "$MODEL/.bench-args" 2>/dev/null)" != "$MODEL_ARGS" ]; then
    log "generating $MODEL"
    rm -rf "$MODEL" "$MODEL.tmp"
    # shellcheck disable=SC2086
    "$WORKER" --make-model "$MODEL.tmp" $MODEL_ARGS >&2 || die "--make-model failed"
    echo "$MODEL_ARGS" >"$MODEL.tmp/.bench-args"
    mv "$MODEL.tmp" "$MODEL" || exit 1
else
    log "using the cached $MODEL"
fi

# ------------------------------------------------------ bandwidth and bytes

# membw N: measure into $TMP/membwN.txt. Run before and after the worker's
# runs; the roofline takes the best of both, since other processes can only
# lower what a measurement sees.
membw() {
    log "measuring memory read bandwidth (1 and 2 threads), pass $1"
    "$CPU_BENCH" --membw 2 >"$TMP/membw$1.txt" || die "cpu_bench --membw failed"
    awk '$1 == "best_read_gbs" { print $2 }' "$TMP/membw$1.txt" | grep -q . ||
        die "no best_read_gbs from cpu_bench --membw"
}
membw 1
"$CPU_BENCH" --weights "$MODEL" >"$TMP/weights.txt" || die "cpu_bench --weights failed"
BYTES=$(awk '$1 == "decode_bytes" { print $2 }' "$TMP/weights.txt")
[ -n "$BYTES" ] || die "no decode_bytes from cpu_bench --weights"

# ---------------------------------------------------------------- the worker

set -- --model "$MODEL" --served-model-name bench --host 127.0.0.1 --port 0 \
    --max-model-len "$MAX_LEN" --max-num-seqs 8 --disable-log-requests
[ -n "$WB_THREADS" ] && set -- "$@" --threads "$WB_THREADS"
"$WORKER" "$@" >"$TMP/worker.log" 2>&1 &
WPID=$!
PORT=""
i=0
while [ -z "$PORT" ]; do
    kill -0 "$WPID" 2>/dev/null || { cat "$TMP/worker.log" >&2; die "the worker exited"; }
    PORT=$(sed -n 's/.*serving .* on http:\/\/[^:]*:\([0-9][0-9]*\).*/\1/p' "$TMP/worker.log" | head -n1)
    i=$((i + 1))
    [ "$i" -lt 600 ] || die "the worker did not print its port"
    [ -n "$PORT" ] || sleep 0.1
done
URL=http://127.0.0.1:$PORT
i=0
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ]; do
    kill -0 "$WPID" 2>/dev/null || { cat "$TMP/worker.log" >&2; die "the worker exited while loading"; }
    i=$((i + 1))
    [ "$i" -lt 1200 ] || die "the worker was not ready within 120 s"
    sleep 0.1
done
log "worker ready on $URL"

# ---------------------------------------------------------------- requests

# body FILE PROMPT_LEN MAX_TOKENS SALT: a completions request over token ids
# (the generated tokenizer's byte tokens, so any id is valid), greedy, no EOS.
body() {
    awk -v n="$2" -v m="$3" -v s="$4" 'BEGIN {
        printf "{\"model\":\"bench\",\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,\"prompt\":[", m
        for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), (i * 7919 + s * 131) % 256
        printf "]}"
    }' >"$1"
}

# post BODY OUT MAX_TOKENS: one request (run in the background, so it
# reports and returns 1 rather than exiting); checks status and count.
post() {
    code=$(curl -s -o "$2" -w '%{http_code}' -H 'Content-Type: application/json' \
        --data-binary @"$1" "$URL/v1/completions") || { log "request failed (curl)"; return 1; }
    [ "$code" = 200 ] || { log "HTTP $code: $(head -c 500 "$2")"; return 1; }
    got=$(sed -n 's/.*"completion_tokens": *\([0-9][0-9]*\).*/\1/p' "$2")
    [ "$got" = "$3" ] || { log "expected $3 completion tokens, got $got: $(head -c 500 "$2")"; return 1; }
}

now() { date +%s.%N; }
TCK=$(getconf CLK_TCK)
# CPU seconds the worker has used (user + system): with other processes on
# the machine, cores busy = CPU seconds / wall seconds says how much of the
# machine it actually got.
cpu_s() { awk -v t="$TCK" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$WPID/stat"; }

# wave N PROMPT_LEN MAX_TOKENS SALT: N requests at once; sets WAVE_S to the
# wall time and WAVE_CORES to the worker's cores busy meanwhile. (Not
# called in $(...): its die must end the script.)
wave() {
    k=0
    while [ "$k" -lt "$1" ]; do
        body "$TMP/b$k.json" "$2" "$3" "$(($4 + k))"
        k=$((k + 1))
    done
    c0=$(cpu_s)
    t0=$(now)
    k=0
    pids=""
    while [ "$k" -lt "$1" ]; do
        (post "$TMP/b$k.json" "$TMP/r$k.json" "$3") &
        pids="$pids $!"
        k=$((k + 1))
    done
    fail=0
    for p in $pids; do wait "$p" || fail=1; done
    t1=$(now)
    [ "$fail" = 0 ] || die "a request of the wave failed"
    kill -0 "$WPID" 2>/dev/null || die "the worker died"
    c1=$(cpu_s)
    WAVE_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
    WAVE_CORES=$(awk -v a="$c0" -v b="$c1" -v w="$WAVE_S" 'BEGIN { printf "%.2f", (b - a) / w }')
}

# The inter-token latency histogram's sum and count, "SUM COUNT".
itl() {
    curl -s "$URL/metrics" | awk '
        /^modelmux_worker_inter_token_latency_seconds_sum/ { s = $NF }
        /^modelmux_worker_inter_token_latency_seconds_count/ { c = $NF }
        END { print s + 0, c + 0 }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

log "warm-up"
wave 1 "$WB_PROMPT" 4 999
wave 8 "$WB_DECODE_PROMPT" 4 900

RUNS_MD=""
add_run() { RUNS_MD="$RUNS_MD
$*"; }

log "prefill: $WB_PROMPT-token prompt x $WB_RUNS"
: >"$TMP/prefill"
: >"$TMP/prefill_cores"
r=1
while [ "$r" -le "$WB_RUNS" ]; do
    wave 1 "$WB_PROMPT" 1 "$((r * 10))"
    t=$WAVE_S
    tps=$(awk -v n="$WB_PROMPT" -v t="$t" 'BEGIN { printf "%.1f", n / t }')
    echo "$tps" >>"$TMP/prefill"
    echo "$WAVE_CORES" >>"$TMP/prefill_cores"
    add_run "- prefill run $r: $WB_PROMPT tokens in $t s = $tps tokens/s (worker cores busy $WAVE_CORES)"
    r=$((r + 1))
done
PREFILL=$(median <"$TMP/prefill")
PREFILL_CORES=$(median <"$TMP/prefill_cores")

ROWS=""
SINGLE_PCT=""
for c in $WB_CONC; do
    log "decode: $c concurrent request(s), $WB_GEN tokens each, x $WB_RUNS"
    : >"$TMP/dec$c"
    : >"$TMP/itl$c"
    : >"$TMP/cores$c"
    r=1
    while [ "$r" -le "$WB_RUNS" ]; do
        salt=$((100 * r + 10 * c))
        wave "$c" "$WB_DECODE_PROMPT" 1 "$salt"
        ta=$WAVE_S
        m0=$(itl)
        wave "$c" "$WB_DECODE_PROMPT" $((1 + WB_GEN)) "$salt"
        tb=$WAVE_S
        cores=$WAVE_CORES
        m1=$(itl)
        tps=$(awk -v c="$c" -v g="$WB_GEN" -v a="$ta" -v b="$tb" 'BEGIN {
            if (b <= a) print "nan"; else printf "%.2f", c * g / (b - a) }')
        [ "$tps" != nan ] || die "decode run: time(1+GEN) <= time(1) ($tb <= $ta)"
        ms=$(echo "$m0 $m1" | awk '{ if ($4 > $2) printf "%.1f", ($3 - $1) / ($4 - $2) * 1000; else print "?" }')
        echo "$tps" >>"$TMP/dec$c"
        echo "$ms" >>"$TMP/itl$c"
        echo "$cores" >>"$TMP/cores$c"
        add_run "- decode x$c run $r: max_tokens 1 in $ta s, $((1 + WB_GEN)) in $tb s -> $tps tokens/s; worker mean inter-token latency $ms ms, cores busy $cores"
        r=$((r + 1))
    done
done

kill -0 "$WPID" 2>/dev/null || die "the worker died"
# The worker's idle threads must not compete with the second measurement.
stop_worker
membw 2
BW=$(awk '$1 == "best_read_gbs" && $2 > b { b = $2 } END { print b }' "$TMP/membw1.txt" "$TMP/membw2.txt")
ROOF1=$(awk -v bw="$BW" -v by="$BYTES" 'BEGIN { printf "%.1f", bw * 1e9 / by }')
log "read bandwidth $BW GB/s, $BYTES bytes a step: roofline $ROOF1 tokens/s per step"
for c in $WB_CONC; do
    dec=$(median <"$TMP/dec$c")
    ms=$(grep -v '?' "$TMP/itl$c" | median)
    cores=$(median <"$TMP/cores$c")
    roof=$(awk -v c="$c" -v r="$ROOF1" 'BEGIN { printf "%.1f", c * r }')
    pct=$(awk -v d="$dec" -v r="$roof" 'BEGIN { printf "%.0f", 100 * d / r }')
    [ "$c" = 1 ] && SINGLE_PCT=$pct
    ROWS="$ROWS
| decode, $c concurrent ($WB_GEN tokens each) | $dec | $roof | $pct% | $ms | $cores |"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
# nproc counts the CPUs this process may run on (taskset), not all of them.
NCPU=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT + uncommitted changes"
if [ -z "$SINGLE_PCT" ]; then
    VERDICT="(no single-stream run: WB_CONC has no 1)"
elif [ "$SINGLE_PCT" -gt 100 ]; then
    VERDICT="**met** ($SINGLE_PCT% of the roofline: above 100%, so both bandwidth measurements were disturbed)"
elif [ "$SINGLE_PCT" -ge 50 ]; then
    VERDICT="**met** ($SINGLE_PCT% of the roofline)"
else
    VERDICT="**missed** ($SINGLE_PCT% of the roofline)"
fi

mkdir -p "$BENCH_OUT"
{
    echo "### Results $DATE"
    echo
    echo "\`make bench-worker\` on $CPU, $NCPU cores; worker at $COMMIT."
    echo "Model: generated Qwen2.5-0.5B shape ($MODEL_ARGS): $BYTES bytes of weights read per decode step."
    for k in 1 2; do
        echo "Memory read bandwidth (\`cpu_bench --membw 2\`, $([ $k = 1 ] && echo before || echo after) the runs): $(grep '^read' "$TMP/membw$k.txt" | paste -sd';' - | sed 's/;/; /g')."
    done
    echo "Roofline bandwidth: the best of these, $BW GB/s."
    echo "Load average (1, 5, 15 min) at start $LOAD_START, at end $LOAD_END."
    echo
    echo "| measurement | tokens/s (median of $WB_RUNS) | roofline tokens/s | % of roofline | worker inter-token latency (ms) | worker cores busy (of $NCPU) |"
    echo "|---|---:|---:|---:|---:|---:|"
    echo "| prefill, $WB_PROMPT-token prompt | $PREFILL | (compute bound) | | | $PREFILL_CORES |$ROWS"
    echo
    echo "Roofline: bandwidth / bytes of weights per step ($BW GB/s / $BYTES B = $ROOF1 steps/s); a step"
    echo "decodes one token of every running sequence, so N concurrent streams have N times it."
    echo "Goal, single-stream decode at >= 50% of the roofline: $VERDICT."
    echo "Cores busy: the worker's CPU seconds (user + system) / wall seconds during the measured"
    echo "requests (the 1 + $WB_GEN waves for decode; its threads spin briefly between steps, which"
    echo "counts as busy); below $NCPU, other processes had the rest."
    echo
    echo "Runs (decode prompt $WB_DECODE_PROMPT tokens):$RUNS_MD"
} >"$BENCH_OUT/worker-results.md"
cat "$BENCH_OUT/worker-results.md"
