#!/bin/sh
# tests/gpu/run.sh [check|bench|all|libs]: the CUDA backend's tests and
# benchmarks on the GPU machine, from the repository root, with $BUILD
# (build) already built here and carried there (missing binaries are built
# when make can).
#
#   check (~2 min): gpu_check --backend cuda --require-gpu (tests/gpu/check.c),
#     then end to end: a generated small model behind modelmux-worker
#     --device cuda, 8 greedy /v1/completions at once against the same one
#     at a time (with logprobs: the first differing token must be a near
#     tie by the sequential run's top-2 logprobs), and against a --device
#     cpu worker (reported);
#     preemptions on a small pool, the KV out-of-memory message, and a
#     sticky CUDA error (MM_CUDA_TEST_FAULT_STEP) failing the request and
#     making the worker exit 1.
#   bench (~6 min): gpu_bw, gpu_gemm, then for generated bf16 models of
#     Qwen2.5-1.5B's and Qwen2.5-7B's shapes gpu_bench (decode single and
#     batched, prefill, TTFT) and streaming HTTP load through the worker at
#     1/8/32/64/256 concurrent requests (128-token prompts, 128 tokens).
#
# Output under $OUT (default $BUILD/gpu-results; at most 8 files, the
# device tool's limit): gpu.txt (nvidia-smi), check.json, check.log,
# bench.json, bench.log, summary.txt (with the decode roofline). The last
# line is "N passed, N failed"; exit 1 when anything failed.
#
#   ab (~1 min per model and setting): single-stream decode of each of
#     $BENCH_MODELS under each environment setting in $AB_CONFIGS (words;
#     one word is one setting, VAR=value pairs joined by "+", e.g.
#     "MM_CUDA_CLUSTER=0 MM_CUDA_CLUSTER=1"; GPU_BENCH=path in a setting
#     runs that gpu_bench binary instead, e.g. one built from an older
#     commit), $AB_ROUNDS rounds (3),
#     the settings alternating within each round so drifts of the machine
#     hit all of them alike; the median per setting and its share of the
#     copy-bandwidth roofline go to ab.txt. For deciding an optimization
#     (docs/GPU_NOTES.md), not for the figures of record.
#
#   tp (~6 min; a machine with $TP GPUs, default 2): tensor parallelism.
#     check with every backend split over $TP GPUs (gpu_check --tp $TP:
#     each check, plus each shape against one GPU; the end-to-end part with
#     workers started with --tensor-parallel-size $TP), then gpu_bench of
#     each of $BENCH_MODELS on one GPU and on $TP in the same call
#     ($TP_ONLY: single,batch,prefill), to tp.txt with single-stream decode
#     against the $TP-GPU copy-bandwidth roofline (each GPU reads its share
#     of the weights), then streaming HTTP load on a split worker
#     ($TP_HTTP_MODELS: q7, at $TP_HTTP_CONC: 1 32 256). NCCL is loaded at run time: when the loader cannot
#     find libnccl.so.2, the one Python's nvidia-nccl package ships is used.
#
#   profile (~1 min per model): one single-stream decode of each of
#     $BENCH_MODELS with every kernel's start and end recorded through CUPTI
#     (tests/gpu/ktrace.c, graph nodes included), summarized by
#     tests/gpu/steptrace.py into profile-MODEL.txt:
#     how much later each kernel ends than the one before it (with
#     programmatic dependent launch, what it adds to the step), per kernel
#     name and for one step kernel by kernel.
#
#   libs (run HERE, before carrying): copy the shared libraries our binaries
#     need beyond glibc, libstdc++/libgcc and CUDA's into $BUILD/lib, for a
#     GPU machine that lacks them (its ldd says which); run.sh then puts
#     $BUILD/lib on LD_LIBRARY_PATH for our binaries alone (not for curl or
#     python3, which keep the machine's own libraries).
#
# Knobs (for trying this on a CPU-only machine too): CHECK_BACKEND (cuda),
# E2E_DEVICE (cuda), BENCH_BACKEND (cuda), BENCH_MODELS ("q15 q7"),
# BENCH_ARGS (extra gpu_bench flags), BENCH_VERIFY ("q15": models whose
# gpu_bench first checks 16 greedy tokens against the CPU backend),
# HTTP_CONC ("1 8 32 64 256"),
# HTTP_MODELS ("q15 q7"), HTTP_MAX_TOKENS (128), BENCH_BUDGET_S (330: later
# steps are skipped once the bench has run this long), BENCH_DIR
# (/tmp/mm-gpu-bench, generated models, kept for a second run).
# $RUNENV, $CLIENT and a few flag lists are split into words on purpose:
# shellcheck disable=SC2086
set -u
cd "$(dirname "$0")/../.." || exit 1

BUILD=${BUILD:-build}
what=${1:-all}
case $what in check|bench|all|libs|ab|tp|profile) ;; *) echo "usage: tests/gpu/run.sh [check|bench|all|libs|ab|tp|profile]" >&2; exit 2 ;; esac
OUT=${OUT:-$BUILD/gpu-results}
CHECK_BACKEND=${CHECK_BACKEND:-cuda}
E2E_DEVICE=${E2E_DEVICE:-cuda}
BENCH_BACKEND=${BENCH_BACKEND:-cuda}
BENCH_MODELS=${BENCH_MODELS:-q15 q7}
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_VERIFY=${BENCH_VERIFY:-q15}
HTTP_CONC=${HTTP_CONC:-1 8 32 64 256}
HTTP_MODELS=${HTTP_MODELS:-q15 q7}
HTTP_MAX_TOKENS=${HTTP_MAX_TOKENS:-128}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-330}
BENCH_DIR=${BENCH_DIR:-/tmp/mm-gpu-bench}
TP=${TP:-2}
TP_ONLY=${TP_ONLY:-single,batch,prefill}
# extra gpu_check flags and cuda worker flags (the tp mode sets them)
CHECK_FLAGS=""
E2E_FLAGS=""
HTTP_FLAGS=""
WORKER=$BUILD/modelmux-worker
T=$BUILD/tests
CLIENT="python3 tests/gpu/client.py"

if [ "$what" = libs ]; then
    mkdir -p "$BUILD/lib" || exit 1
    for b in "$WORKER" "$T/gpu_check" "$T/gpu_bench"; do [ -x "$b" ] && ldd "$b"; done |
        awk '/=> \// { print $3 }' | sort -u | while read -r p; do
            case ${p##*/} in
                libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|libcublas*|libcudart*|libcuda.so*) ;;
                *) cp -L "$p" "$BUILD/lib/" && echo "copied $p" ;;
            esac
        done
    du -sh "$BUILD/lib"
    exit 0
fi
# Libraries carried in $BUILD/lib (see libs above) for our binaries only.
RUNENV="env"
[ -d "$BUILD/lib" ] && RUNENV="env LD_LIBRARY_PATH=$(cd "$BUILD/lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

mkdir -p "$OUT" || exit 1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mmgpu.XXXXXX") || exit 1
WPID=""
GENPID=""
passed=0
failed=0

say() { echo "$*"; }
ok() { passed=$((passed + 1)); say "ok - $*"; }
notok() { failed=$((failed + 1)); say "not ok - $*"; }
now() { date +%s; }

stop_worker() {
    [ -n "$WPID" ] || return 0
    kill -TERM "$WPID" 2>/dev/null
    i=0
    while kill -0 "$WPID" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$WPID" 2>/dev/null
    wait "$WPID" 2>/dev/null
    WPID=""
}
cleanup() {
    stop_worker
    [ -n "$GENPID" ] && kill "$GENPID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------- the machine

{
    echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -srm), $(nproc) CPUs"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.memory,power.limit,pstate --format=csv
        timeout 30 nvidia-smi -L
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
    mkdir -p "$BENCH_DIR" && df -h "$BENCH_DIR" | tail -n 1 | awk '{ print "# disk for generated models: " $4 " free of " $2 }'
    printf '# binaries (%s):' "$BUILD"
    for b in "$WORKER" "$T"/gpu_*; do [ -x "$b" ] && printf ' %s' "${b##*/}"; done
    echo
} >"$OUT/gpu.txt" 2>&1
say "== $(sed -n 2,3p "$OUT/gpu.txt" | tr '\n' ' ')"

# ------------------------------------------------------------- binaries

# Build what is missing, when make can (the GPU machine may lack headers
# the worker needs; the CUDA-only tools need nvcc alone).
MAKEF=""
grep -q 'tests/gpu/gpu.mk' Makefile 2>/dev/null || MAKEF="-f Makefile -f tests/gpu/gpu.mk"
ensure() {
    for b in "$@"; do
        [ -x "$b" ] && continue
        say "# $b is missing: trying make"
        timeout 600 make $MAKEF BUILD="$BUILD" -j"$(nproc)" "$b" >"$TMP/make.log" 2>&1 ||
            { say "# make $b failed:"; tail -n 15 "$TMP/make.log"; }
    done
    for b in "$@"; do
        [ -x "$b" ] || continue
        missing=$($RUNENV ldd "$b" 2>/dev/null | grep 'not found' | awk '{ print $1 }' | tr '\n' ' ')
        [ -z "$missing" ] || say "# WARNING: $b: shared libraries not found: $missing"
    done
}

# start_worker DEVICE MODEL LOG [flags...]: WPID and URL, or return 1.
start_worker() {
    dev=$1 model=$2 wlog=$3
    shift 3
    $RUNENV "$WORKER" --model "$model" --device "$dev" --host 127.0.0.1 --port 0 \
        --served-model-name bench --disable-log-requests "$@" >"$wlog" 2>&1 &
    WPID=$!
    port=""
    i=0
    while [ -z "$port" ]; do
        kill -0 "$WPID" 2>/dev/null || { say "# the worker exited:"; tail -n 20 "$wlog"; WPID=""; return 1; }
        port=$(sed -n 's/.*serving .* on http:\/\/[^:]*:\([0-9][0-9]*\).*/\1/p' "$wlog" | head -n 1)
        i=$((i + 1))
        [ "$i" -lt 300 ] || { say "# the worker printed no port in 30 s"; stop_worker; return 1; }
        [ -n "$port" ] || sleep 0.1
    done
    URL=http://127.0.0.1:$port
    t0=$(now)
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ]; do
        kill -0 "$WPID" 2>/dev/null || { say "# the worker exited while loading:"; tail -n 20 "$wlog"; WPID=""; return 1; }
        [ $(($(now) - t0)) -lt 180 ] || { say "# the worker was not ready in 180 s"; tail -n 5 "$wlog"; stop_worker; return 1; }
        sleep 0.2
    done
    say "# worker ($dev) ready on $URL in $(($(now) - t0)) s"
}

# count_tap FILE: add a "N passed, N failed" line's figures (one failure
# when there is none: a crash or a timeout).
count_tap() {
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    if [ -z "$line" ]; then
        failed=$((failed + 1))
        say "not ok - $2 (no summary line: crashed or timed out; its last lines:)"
        tail -n 12 "$1" | sed 's/^/  | /'
        return
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    passed=$((passed + p))
    failed=$((failed + f))
}

# fault_case MODEL RANK: a worker whose 3rd step faults (on GPU RANK
# alone when RANK is set) answers HTTP 500 naming the lost device and
# exits 1 by itself. (Shell variables are global: none named "what".)
fault_case() {
    fcase="a sticky CUDA error${2:+ on GPU $2 alone}"
    export MM_CUDA_TEST_FAULT_STEP=3
    [ -n "$2" ] && export MM_CUDA_TEST_FAULT_RANK=$2
    if start_worker cuda "$1" "$TMP/w-fault.log" --max-model-len 256 \
        --gpu-memory-utilization 0.3 $E2E_FLAGS; then
        unset MM_CUDA_TEST_FAULT_STEP MM_CUDA_TEST_FAULT_RANK
        code=$(curl -s -m 60 -o "$TMP/fault.json" -w '%{http_code}' \
            -H 'content-type: application/json' -d '{"model": "bench", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": true}' \
            "$URL/v1/completions")
        i=0
        while kill -0 "$WPID" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        if kill -0 "$WPID" 2>/dev/null; then
            wrc="still running after 30 s"
            stop_worker
        else
            wait "$WPID"
            wrc=$?
            WPID=""
        fi
        { echo "== worker with $fcase at step 3 (log tail)"; tail -n 8 "$TMP/w-fault.log"; } >>"$OUT/check.log"
        if [ "$code" = 500 ] && grep -q 'CUDA device is unusable' "$TMP/fault.json" &&
            [ "$wrc" = 1 ] && grep -q 'exiting so that the worker is restarted' "$TMP/w-fault.log"; then
            ok "e2e: $fcase: HTTP 500 ($(grep -o 'unusable: [^"]*' "$TMP/fault.json" | head -c 120)), worker exit 1"
        else
            notok "e2e: $fcase: HTTP $code, exit $wrc, $(head -c 300 "$TMP/fault.json" 2>/dev/null)"
        fi
    else
        unset MM_CUDA_TEST_FAULT_STEP MM_CUDA_TEST_FAULT_RANK
        notok "e2e: the worker with a fault hook did not start"
    fi
}

# ------------------------------------------------------------- check

run_check() {
    t_check=$(now)
    ensure "$T/gpu_check" "$WORKER"
    if [ -x "$T/gpu_check" ]; then
        req=""
        [ "$CHECK_BACKEND" = cuda ] && req=--require-gpu
        say "== gpu_check --backend $CHECK_BACKEND"
        timeout "${CHECK_TIMEOUT:-150}" $RUNENV "$T/gpu_check" --backend "$CHECK_BACKEND" $req \
            $CHECK_FLAGS --json "$OUT/check.json" >"$TMP/check.txt" 2>&1
        echo "gpu_check exit status $?" >>"$TMP/check.txt"
        cat "$TMP/check.txt" >>"$OUT/check.log"
        grep -E '^(ok|not ok|skipped|#|[0-9]+ passed)' "$TMP/check.txt"
        count_tap "$TMP/check.txt" gpu_check
    else
        notok "gpu_check (not built)"
    fi

    say "== end to end: worker --device $E2E_DEVICE, concurrent vs one at a time vs --device cpu"
    if [ ! -x "$WORKER" ]; then
        notok "e2e (no $WORKER)"
        return
    fi
    m=$TMP/e2e-model
    # the model's flags: tests/gpu/e2e.json, which gpu_check and client.py read too
    margs=$(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["make_model"]))' \
        tests/gpu/e2e.json) || { notok "e2e: tests/gpu/e2e.json unreadable"; return; }
    if ! timeout 60 $RUNENV "$WORKER" --make-model "$m" $margs >>"$OUT/check.log" 2>&1; then
        notok "e2e: --make-model failed"
        return
    fi
    if start_worker "$E2E_DEVICE" "$m" "$TMP/w-e2e.log" --max-num-seqs 16 --max-model-len 1024 \
        --gpu-memory-utilization 0.3 $E2E_FLAGS; then
        # Both runs ask for logprobs, so both report their tokens and the
        # comparison finds the first differing token exactly: judged from
        # character offsets instead, a random model's special tokens (in
        # the tokens, not the text) and split UTF-8 characters misplaced it
        # (a near tie at token 38 was reported as a difference at token 20).
        $CLIENT complete --url "$URL" --concurrency 8 --logprobs 2 --out "$TMP/conc.json" &&
            $CLIENT complete --url "$URL" --concurrency 1 --logprobs 2 --out "$TMP/seq.json"
        rc=$?
        stop_worker
        { echo "== worker --device $E2E_DEVICE log (tail)"; tail -n 30 "$TMP/w-e2e.log"; } >>"$OUT/check.log"
        if [ $rc -ne 0 ]; then
            notok "e2e: requests to the $E2E_DEVICE worker failed"
        else
            $CLIENT compare "$TMP/conc.json" "$TMP/seq.json" \
                --name "e2e: $E2E_DEVICE worker, 8 at once vs one at a time" >"$TMP/cmp.txt"
            cat "$TMP/cmp.txt"
            if grep -q '^ok ' "$TMP/cmp.txt"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
            if start_worker cpu "$m" "$TMP/w-cpu.log" --max-num-seqs 16 \
                --max-model-len 1024; then
                $CLIENT complete --url "$URL" --concurrency 1 --logprobs 2 --out "$TMP/cpu.json"
                stop_worker
                [ -s "$TMP/cpu.json" ] && $CLIENT compare "$TMP/seq.json" "$TMP/cpu.json" --info \
                    --name "e2e: $E2E_DEVICE worker vs cpu worker (greedy, reported only)"
            fi
            # The scheduler's preemption on the device: a KV pool of exactly
            # one --max-model-len sequence (16 blocks of 16) for 8 requests
            # at once; every answer must still equal the one-at-a-time run.
            if start_worker "$E2E_DEVICE" "$m" "$TMP/w-pre.log" --max-num-seqs 16 \
                --max-model-len 256 --num-gpu-blocks-override 16 $E2E_FLAGS; then
                $CLIENT complete --url "$URL" --concurrency 8 --logprobs 2 --out "$TMP/pre.json"
                npre=$(curl -s "$URL/metrics" |
                    sed -n 's/^vllm:num_preemptions_total{[^}]*} \([0-9][0-9.]*\).*/\1/p' | head -n 1)
                stop_worker
                # A preempted sequence's cache is recomputed by a prefill
                # (GEMM attention, bf16 probabilities) where it was built by
                # decode steps (float probabilities): on the GPU the two
                # differ within bf16 tolerance (docs/GPU_NOTES.md; seen on
                # the H200: recompute flips at top-2 gaps up to 0.009, the
                # CPU's float32 reverses one of 0.067), so a near tie here is
                # a gap under 0.1. (The CPU backend's test requires exact
                # equality: tests/integration/worker_preempt.test.mjs.)
                tie=0.05
                [ "$E2E_DEVICE" = cuda ] && tie=0.1
                $CLIENT compare "$TMP/pre.json" "$TMP/seq.json" --tie "$tie" \
                    --name "e2e: $E2E_DEVICE worker, 8 at once on a 16-block KV pool vs one at a time" \
                    >"$TMP/cmp-pre.txt"
                tee -a "$OUT/check.log" <"$TMP/cmp-pre.txt"
                if grep -q '^ok ' "$TMP/cmp-pre.txt"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
                case ${npre:-0} in
                0 | 0.0) notok "e2e: preemptions on the 16-block pool: ${npre:-none reported}" ;;
                *) ok "e2e: preemptions on the 16-block pool: $npre" ;;
                esac
            else
                notok "e2e: the $E2E_DEVICE worker with a 16-block pool did not start"
            fi
            # Not enough memory for the KV cache: a clear message, exit
            # non-zero (the cpu backend ignores the utilization: cuda only).
            if [ "$E2E_DEVICE" = cuda ]; then
                timeout 60 $RUNENV "$WORKER" --model "$m" --device cuda --port 0 \
                    --gpu-memory-utilization 0.000001 $E2E_FLAGS >"$TMP/w-oom.log" 2>&1
                orc=$?
                if [ $orc -ne 0 ] && [ $orc -ne 124 ] && grep -q 'KV cache too small' "$TMP/w-oom.log"; then
                    ok "e2e: no room for the KV cache: exit $orc, $(grep -o 'KV cache too small[^;]*' "$TMP/w-oom.log" | head -n 1)"
                else
                    notok "e2e: no room for the KV cache: exit $orc, $(tail -n 1 "$TMP/w-oom.log")"
                fi
                # A sticky CUDA error (the test hook launches a kernel that
                # stores to an invalid address at the 3rd step): the request
                # fails with the cause and the worker exits 1 by itself, for
                # its supervisor to restart it. Split over GPUs, also with
                # the fault on one GPU alone (its peer then waits in a sum
                # that never completes).
                fault_case "$m" ""
                [ -n "$E2E_FLAGS" ] && fault_case "$m" 1
            fi
        fi
    else
        notok "e2e: the $E2E_DEVICE worker did not start"
        { echo "== worker log"; cat "$TMP/w-e2e.log"; } >>"$OUT/check.log"
    fi
    say "# check took $(($(now) - t_check)) s"
}

# ------------------------------------------------------------- bench

# Qwen2.5-1.5B and -7B shapes, random bf16 weights (makemodel).
model_args() {
    case $1 in
        q15) echo "--arch qwen2 --layers 28 --hidden 1536 --heads 12 --kv-heads 2 --intermediate 8960 --vocab 151936 --tie --max-pos 32768 --rope-theta 1000000 --dtype bf16" ;;
        q7) echo "--arch qwen2 --layers 28 --hidden 3584 --heads 28 --kv-heads 4 --intermediate 18944 --vocab 152064 --no-tie --max-pos 32768 --rope-theta 1000000 --dtype bf16" ;;
        # small shapes, for trying the script on a CPU
        tiny) echo "--arch qwen2 --layers 2 --hidden 256 --heads 4 --kv-heads 2 --intermediate 512 --vocab 4096 --max-pos 4096" ;;
        small) echo "--arch llama --layers 4 --hidden 512 --heads 8 --kv-heads 2 --intermediate 1024 --vocab 8192 --max-pos 4096" ;;
        *) return 1 ;;
    esac
}

# gen_model NAME: generate $BENCH_DIR/NAME unless it is there with the same flags.
gen_model() {
    args=$(model_args "$1") || { echo "unknown model $1" >&2; return 1; }
    d=$BENCH_DIR/$1
    [ "$(cat "$d/.args" 2>/dev/null)" = "$args" ] && return 0
    rm -rf "$d" "$d.tmp"
    mkdir -p "$BENCH_DIR"
    t0=$(now)
    timeout 300 $RUNENV "$WORKER" --make-model "$d.tmp" $args >"$TMP/gen-$1.log" 2>&1 || { cat "$TMP/gen-$1.log"; return 1; }
    echo "$args" >"$d.tmp/.args"
    mv "$d.tmp" "$d"
    echo "# generated $1 ($(du -sh "$d" | cut -f1)) in $(($(now) - t0)) s"
}

# gpu_bench_step NAME JSONL TIMEOUT ARGS...: run gpu_bench ARGS, log its
# output, append its JSON lines to JSONL, show the rest, count it as NAME.
gpu_bench_step() {
    gb_name=$1 gb_json=$2 gb_tmo=$3
    shift 3
    timeout "$gb_tmo" $RUNENV "$T/gpu_bench" "$@" >"$TMP/gb.txt" 2>&1
    gb_rc=$?
    cat "$TMP/gb.txt" >>"$OUT/bench.log"
    grep '^{' "$TMP/gb.txt" >>"$gb_json"
    grep -v '^{' "$TMP/gb.txt" | grep .
    if [ $gb_rc -eq 0 ]; then ok "$gb_name"; else notok "$gb_name (exit $gb_rc)"; fi
}

over_budget() { [ $(($(now) - t_bench)) -ge $((BENCH_BUDGET_S - ${1:-0})) ]; }

bench_http() {
    name=$1
    start_worker "$BENCH_BACKEND" "$BENCH_DIR/$name" "$TMP/w-$name.log" --max-num-seqs 256 \
        --max-model-len 512 --max-num-batched-tokens "${HTTP_BATCHED_TOKENS:-4096}" \
        --gpu-memory-utilization 0.85 $HTTP_FLAGS || { notok "http $name: the worker did not start"; return; }
    $CLIENT load --url "$URL" --concurrency 4 --max-tokens 8 --label warmup >/dev/null
    for c in $HTTP_CONC; do
        if over_budget 10; then say "# http $name: out of time budget, skipping from concurrency $c"; break; fi
        timeout 120 $CLIENT load --url "$URL" --concurrency "$c" --max-tokens "$HTTP_MAX_TOKENS" \
            --label "$name" --salt "$c" >"$TMP/load.txt" 2>&1
        rc=$?
        cat "$TMP/load.txt" >>"$OUT/bench.log"
        grep '^{' "$TMP/load.txt" >>"$TMP/bench.jsonl"
        if [ $rc -eq 0 ]; then
            ok "http $name x$c ($(sed -n 's/.*"tok_s": \([0-9.]*\).*"ttft_mean_ms": \([0-9.]*\).*/\1 tok\/s, TTFT mean \2 ms/p' "$TMP/load.txt"))"
        else
            notok "http $name x$c (exit $rc: $(tail -c 300 "$TMP/load.txt"))"
        fi
    done
    stop_worker
    { echo "== worker $name log (tail)"; tail -n 20 "$TMP/w-$name.log"; } >>"$OUT/bench.log"
}

run_bench() {
    t_bench=$(now)
    : >"$TMP/bench.jsonl"
    ensure "$WORKER" "$T/gpu_bench"
    # Models: all but the first are generated in the background from the
    # start (CPU and disk work, minutes for a 15 GB model) while the GPU
    # measures; the first in the foreground after gpu_bw and gpu_gemm.
    first=""
    rest=""
    for m in $BENCH_MODELS; do
        if [ -z "$first" ]; then first=$m; else rest="$rest $m"; fi
    done
    if [ -n "$rest" ] && [ -x "$WORKER" ]; then
        ( for m in $rest; do gen_model "$m" || exit 1; done ) >"$TMP/gen-rest.log" 2>&1 &
        GENPID=$!
    fi
    if [ "$BENCH_BACKEND" = cuda ]; then
        ensure "$T/gpu_bw" "$T/gpu_gemm"
        for tool in gpu_bw gpu_gemm; do
            say "== $tool"
            if [ ! -x "$T/$tool" ]; then notok "$tool (not built)"; continue; fi
            timeout 120 "$T/$tool" >"$TMP/$tool.txt" 2>&1
            rc=$?
            cat "$TMP/$tool.txt" >>"$OUT/bench.log"
            grep '^{' "$TMP/$tool.txt" >>"$TMP/bench.jsonl"
            if [ $rc -eq 0 ]; then ok "$tool"; else notok "$tool (exit $rc: $(tail -n 2 "$TMP/$tool.txt" | tr '\n' ' '))"; fi
        done
    fi

    [ -n "$first" ] && { gen_model "$first" || notok "generate $first"; }
    for m in $BENCH_MODELS; do
        if [ "$m" != "$first" ] && [ -n "$GENPID" ]; then
            wait "$GENPID" || notok "generate$rest ($(tail -n 3 "$TMP/gen-rest.log" | tr '\n' ' '))"
            GENPID=""
            cat "$TMP/gen-rest.log"
        fi
        [ -f "$BENCH_DIR/$m/model.safetensors" ] || continue
        if over_budget 60; then say "# gpu_bench $m: out of time budget, skipped"; continue; fi
        say "== gpu_bench $m ($BENCH_BACKEND)"
        verify=""
        case " $BENCH_VERIFY " in *" $m "*) verify="--verify 16" ;; esac
        gpu_bench_step "gpu_bench $m" "$TMP/bench.jsonl" 240 --model "$BENCH_DIR/$m" \
            --backend "$BENCH_BACKEND" --name "$m" $verify $BENCH_ARGS
    done
    for m in $HTTP_MODELS; do
        [ -f "$BENCH_DIR/$m/model.safetensors" ] || continue
        if over_budget 60; then say "# http $m: out of time budget, skipped"; continue; fi
        say "== http $m: worker --device $BENCH_BACKEND, streaming completions at $HTTP_CONC"
        bench_http "$m"
    done
    $CLIENT summary "$TMP/bench.jsonl" "$OUT/bench.json" >"$OUT/summary.txt" 2>&1 ||
        notok "summary"
    say "== summary ($OUT/summary.txt)"
    cat "$OUT/summary.txt"
    say "# bench took $(($(now) - t_bench)) s"
}

run_ab() {
    ensure "$WORKER" "$T/gpu_bench" "$T/gpu_bw"
    AB_CONFIGS=${AB_CONFIGS:-MM_CUDA_CLUSTER=0 MM_CUDA_CLUSTER=1}
    AB_ROUNDS=${AB_ROUNDS:-3}
    bw=$(timeout 120 "$T/gpu_bw" 2>/dev/null | grep '"d2d_copy"' |
        sed -n 's/.*"best_gbs":\([0-9.]*\).*/\1/p' | sort -n | tail -n 1)
    say "# copy bandwidth ${bw:-?} GB/s"
    : >"$TMP/ab.txt"
    for m in $BENCH_MODELS; do
        gen_model "$m" || { notok "generate $m"; continue; }
        r=1
        while [ "$r" -le "$AB_ROUNDS" ]; do
            for cfg in $AB_CONFIGS; do
                bin=$(echo "$cfg" | tr + '\n' | sed -n 's/^GPU_BENCH=//p')
                line=$(env $(echo "$cfg" | tr + ' ') $RUNENV timeout 240 "${bin:-$T/gpu_bench}" --model "$BENCH_DIR/$m" \
                    --backend "$BENCH_BACKEND" --name "$m" --only single $BENCH_ARGS 2>"$TMP/ab-err.txt" | grep '"decode_single"')
                tok=$(echo "$line" | sed -n 's/.*"tok_s":\([0-9.]*\).*/\1/p')
                wb=$(echo "$line" | sed -n 's/.*"bytes_per_step":\([0-9.e+]*\).*/\1/p')
                if [ -n "$tok" ]; then
                    echo "$m $cfg $r $tok $wb" >>"$TMP/ab.txt"
                    say "  $m round $r $cfg: $tok tok/s"
                else
                    notok "ab $m $cfg round $r: $(tail -c 300 "$TMP/ab-err.txt")"
                fi
            done
            r=$((r + 1))
        done
    done
    { echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') copy bandwidth ${bw:-?} GB/s; model setting rounds median-tok/s ms/token %roofline"
      sort -k1,1 -k2,2 -k4,4n "$TMP/ab.txt" | awk -v bw="${bw:-0}" '
        { k = $1 " " $2; n[k]++; v[k, n[k]] = $4; b[k] = $5 }
        END { for (k in n) { c = n[k]; med = (c % 2) ? v[k, (c + 1) / 2] : (v[k, c / 2] + v[k, c / 2 + 1]) / 2
                roof = (bw > 0 && b[k] > 0) ? bw * 1e9 / b[k] : 0
                printf "%s %d %.1f %.3f %s\n", k, c, med, 1000 / med, roof ? sprintf("%.1f", 100 * med / roof) : "?" } }' | sort
      echo "# raw: model setting round tok/s bytes/step"; cat "$TMP/ab.txt"; } >"$OUT/ab.txt"
    cat "$OUT/ab.txt"
    [ -s "$TMP/ab.txt" ] && ok "ab"
}

run_profile() {
    ensure "$T/gpu_bench" "$T/libktrace.so"
    kt=$(cd "$T" && pwd)/libktrace.so
    for m in $BENCH_MODELS; do
        gen_model "$m" || { notok "generate $m"; continue; }
        csv=$TMP/ktrace-$m.csv
        rm -f "$csv"
        timeout 300 env $RUNENV CUDA_INJECTION64_PATH="$kt" MM_KTRACE_OUT="$csv" "$T/gpu_bench" \
            --model "$BENCH_DIR/$m" --backend "$BENCH_BACKEND" --name "$m" --only single \
            --single-steps 64 $BENCH_ARGS >"$TMP/prof.log" 2>&1
        grep '"decode_single"' "$TMP/prof.log" | head -n 1
        if [ -s "$csv" ] && python3 tests/gpu/steptrace.py "$csv" >"$OUT/profile-$m.txt"; then
            head -n 45 "$OUT/profile-$m.txt"
            ok "profile $m"
        else
            notok "profile $m: no trace ($(tail -c 300 "$TMP/prof.log"))"
        fi
    done
}

# find_nccl: when the loader cannot find libnccl.so.2, point
# MM_NCCL_LIBRARY at one that is on the machine (Python's nvidia-nccl).
find_nccl() {
    [ -n "${MM_NCCL_LIBRARY:-}" ] && return 0
    ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2 ' && return 0
    [ -e /usr/local/cuda/lib64/libnccl.so.2 ] && return 0
    lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
    [ -n "$lib" ] && [ -e "$lib" ] || lib=$(find / -xdev -name 'libnccl.so.2' 2>/dev/null | head -n 1)
    if [ -n "$lib" ]; then export MM_NCCL_LIBRARY="$lib"; say "# NCCL: $lib"; else say "# NCCL: libnccl.so.2 not found"; fi
}

run_tp() {
    find_nccl
    CHECK_FLAGS="--tp $TP"
    E2E_FLAGS="--tensor-parallel-size $TP"
    CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
    # the bench models generate in the background while the checks run
    ( for m in $BENCH_MODELS; do gen_model "$m" || exit 1; done ) >"$TMP/gen-tp.log" 2>&1 &
    GENPID=$!
    run_check
    ensure "$T/gpu_bench" "$T/gpu_bw"
    bw=$(timeout 120 "$T/gpu_bw" 2>/dev/null | grep '"d2d_copy"' |
        sed -n 's/.*"best_gbs":\([0-9.]*\).*/\1/p' | sort -n | tail -n 1)
    say "# copy bandwidth of one GPU ${bw:-?} GB/s"
    wait "$GENPID" || notok "generate $BENCH_MODELS ($(tail -n 3 "$TMP/gen-tp.log" | tr '\n' ' '))"
    GENPID=""
    : >"$TMP/tp.jsonl"
    for m in $BENCH_MODELS; do
        [ -f "$BENCH_DIR/$m/model.safetensors" ] || continue
        for t in 1 "$TP"; do
            say "== gpu_bench $m on $t GPU(s)"
            gpu_bench_step "gpu_bench $m --tp $t" "$TMP/tp.jsonl" 300 --model "$BENCH_DIR/$m" \
                --name "$m" --tp "$t" --only "$TP_ONLY" $BENCH_ARGS
        done
    done
    # the split worker over HTTP (streaming completions, as bench's)
    : >"$TMP/bench.jsonl"
    t_bench=$(now)
    HTTP_FLAGS="$E2E_FLAGS"
    HTTP_CONC=${TP_HTTP_CONC:-1 32 256}
    for m in ${TP_HTTP_MODELS:-q7}; do
        [ -f "$BENCH_DIR/$m/model.safetensors" ] || continue
        say "== http $m: worker --tensor-parallel-size $TP, streaming completions at $HTTP_CONC"
        bench_http "$m"
    done
    cat "$TMP/bench.jsonl" >>"$TMP/tp.jsonl"
    cp "$TMP/tp.jsonl" "$OUT/bench.json"
    # model, GPUs, what, batch, tok/s, ms/step, and for single-stream decode
    # the share of the roofline: GPUs x copy bandwidth / bytes per token
    { echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') copy bandwidth ${bw:-?} GB/s per GPU"
      echo "# model gpus bench batch tok/s ms/step %roofline"
      sed -n 's/.*"bench":"\([a-z_]*\)".*"model":"\([^"]*\)","tp":\([0-9]*\).*"batch":\([0-9]*\).*"tok_s":\([0-9.]*\),"ms_per_step":\([0-9.]*\).*"bytes_per_step":\([0-9.e+]*\).*/\2 \3 \1 \4 \5 \6 \7/p' "$TMP/tp.jsonl" |
        awk -v bw="${bw:-0}" '{ r = ($3 == "decode_single" && bw > 0) ? sprintf("%.1f", 100 * $5 * $7 / ($2 * bw * 1e9)) : "-"; print $1, $2, $3, $4, $5, $6, r }'
      grep '"bench":"prefill"' "$TMP/tp.jsonl" | sed -n 's/.*"model":"\([^"]*\)","tp":\([0-9]*\).*"tok_s":\([0-9.]*\).*/\1 \2 prefill - \3 - -/p'
      echo "# http on $TP GPUs: client.py load lines"
      cat "$TMP/bench.jsonl"
    } >"$OUT/tp.txt"
    cat "$OUT/tp.txt"
}

if [ "$what" = ab ]; then
    run_ab
elif [ "$what" = profile ]; then
    run_profile
elif [ "$what" = tp ]; then
    run_tp
else
    [ "$what" = bench ] || run_check
    [ "$what" = check ] || run_bench
fi
say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
