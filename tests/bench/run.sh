#!/bin/sh
# tests/bench/run.sh: `make bench`. Everything runs on loopback and is
# started and stopped here (temp dir, free ports, a trap that kills it all).
#
# Cases (BENCH_CASES="direct nginx modelmux sse", comma or space separated,
# default all):
#   direct    wrk straight to a static nginx upstream (the ceiling)
#   nginx     wrk through nginx proxy_pass + upstream keepalive (the yardstick)
#   modelmux  wrk through the gateway, routing on the body's "model"
#   sse       per-chunk SSE latency: direct, through nginx, through the gateway
#             (tests/bench/sse_latency.c, ping-pong, one clock)
#   failover  steady load on two backends, one killed with SIGKILL mid-run:
#             failed requests, time until the dead one gets no more picks
#             (tests/bench/failover_load.mjs; FAILOVER_* knobs at case_failover)
#   redis     requests/s of the gateway with Redis metrics on vs off, same
#             run, interleaved rounds; reports the ratio (goal >= 0.97)
# wrk cases run interleaved, BENCH_RUNS rounds of BENCH_DURATION seconds
# after a BENCH_WARMUP-second warm-up each; the table shows medians.
#
# Adding a case: a throughput case is a function wrk_setup_<name> that
# starts what it needs (use the need_* helpers) and sets CASE_URL; any other
# case is a function case_<name> that appends rows with add_result or
# add_sse_result (or prints its own section into $TMP/extra.md). Then add
# the name to ALL_CASES.
#
# Knobs: BENCH_DURATION (10) BENCH_RUNS (3) BENCH_WARMUP (3) BENCH_CONNS (32)
# BENCH_THREADS (2) BENCH_PACE_MS (0: closed loop) SSE_EVENTS (2000) BENCH_OUT (build/bench) BUILD (build)
# GATEWAY SSE_LATENCY (binaries) BENCH_PERF=1 (perf profile of the gateway
# under load, top symbols written to $BENCH_OUT/perf-gateway.txt).
# BENCH_REDIS_FLUSH_MS (1000) REDIS_SERVER REDIS_CLI (the redis case).
# Exit status: 0, or 1 when a case failed, was skipped or saw errors.
# Functions are called by name (wrk_setup_$c, case_$c) and set globals:
# shellcheck disable=SC2317,SC2154,SC2034,SC2046
set -u
cd "$(dirname "$0")/../.." || exit 1

BUILD=${BUILD:-build}
GATEWAY=${GATEWAY:-$BUILD/modelmux-gateway}
SSE_LATENCY=${SSE_LATENCY:-$BUILD/tests/sse_latency}
BENCH_CASES=${BENCH_CASES:-all}
BENCH_DURATION=${BENCH_DURATION:-10}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_WARMUP=${BENCH_WARMUP:-3}
BENCH_CONNS=${BENCH_CONNS:-32}
BENCH_THREADS=${BENCH_THREADS:-2}
SSE_EVENTS=${SSE_EVENTS:-2000}
SSE_RUNS=${SSE_RUNS:-$BENCH_RUNS}
BENCH_OUT=${BENCH_OUT:-$BUILD/bench}
BENCH_PERF=${BENCH_PERF:-0}
# post.lua reads it: each connection waits this long before its next
# request, so both proxies see the same offered load (0: as fast as it goes).
BENCH_PACE_MS=${BENCH_PACE_MS:-0}
export BENCH_PACE_MS
NGINX=${NGINX:-nginx}
WRK=${WRK:-wrk}

ALL_CASES="direct nginx modelmux sse failover redis"
BENCH_DIR=tests/bench

for v in BENCH_DURATION BENCH_RUNS BENCH_WARMUP BENCH_CONNS BENCH_THREADS SSE_EVENTS SSE_RUNS; do
    eval "val=\$$v"
    case $val in
        ''|*[!0-9]*) echo "bench: $v must be a positive integer, not '$val'" >&2; exit 2 ;;
    esac
    [ "$val" -gt 0 ] || { echo "bench: $v must be > 0" >&2; exit 2; }
done
case $BENCH_PACE_MS in
    ''|*[!0-9]*) echo "bench: BENCH_PACE_MS must be a whole number of ms, not '$BENCH_PACE_MS'" >&2; exit 2 ;;
esac
PACE_NOTE=""
[ "$BENCH_PACE_MS" -gt 0 ] && PACE_NOTE="; paced: each connection waits ${BENCH_PACE_MS} ms between requests (BENCH_PACE_MS), so both see about the same req/s"

# ---------------------------------------------------------------- plumbing

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mmbench.XXXXXX") || exit 1
PIDS=""
USED_PORTS=""
STATUS=0

cleanup() {
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null; done
    # Give them a moment to exit cleanly, then make sure.
    i=0
    while [ "$i" -lt 30 ]; do
        alive=""
        for p in $PIDS; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && break
        sleep 0.1
        i=$((i + 1))
    done
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null; done
    if [ "${BENCH_KEEP_TMP:-0}" = 1 ]; then
        echo "bench: temp dir kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { echo "bench: $*"; }
warn() { echo "bench: $*" >&2; }
die() { echo "bench: FAILED: $*" >&2; exit 1; }

need_tool() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found (run 'make deps')"; }

# Sets PORT to a random free port outside the kernel's ephemeral range
# (32768+), where wrk's and the proxies' own client sockets live. Not via
# $(...): the subshell would lose USED_PORTS.
pick_port() {
    n=0
    while [ "$n" -lt 200 ]; do
        n=$((n + 1))
        r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
        p=$((20000 + r % 10000))
        case " $USED_PORTS " in *" $p "*) continue ;; esac
        if command -v ss >/dev/null 2>&1; then
            [ -n "$(ss -Htln "sport = :$p" 2>/dev/null)" ] && continue
        else
            curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$p/"
            [ $? -eq 7 ] || continue
        fi
        USED_PORTS="$USED_PORTS $p"
        PORT=$p
        return 0
    done
    die "no free port found"
}

# spawn NAME CMD...: run in the background, output in $TMP/NAME.log.
spawn() {
    name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS="$PIDS $LAST_PID"
}

# wait_http PID NAME CURL-ARGS...: until curl gets a 200 (10 s), failing
# fast when the process is gone.
wait_http() {
    pid=$1
    name=$2
    shift 2
    i=0
    while [ "$i" -lt 200 ]; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$@" 2>/dev/null)
        [ "$code" = 200 ] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$TMP/$name.log" >&2
            die "$name exited during startup"
        fi
        sleep 0.05
        i=$((i + 1))
    done
    tail -20 "$TMP/$name.log" >&2
    die "$name not ready after 10 s (last status '$code')"
}

alive_or_die() { # PID NAME
    kill -0 "$1" 2>/dev/null && return 0
    tail -30 "$TMP/$2.log" >&2
    die "$2 (pid $1) died"
}

render_nginx_conf() { # TEMPLATE OUT PORT UP_PORT
    user=""
    # Workers would switch to nobody, who cannot use our 0700 temp dir.
    [ "$(id -u)" = 0 ] && user="user root;"
    sed -e "s|@DIR@|$TMP|g" -e "s|@PORT@|$3|g" -e "s|@UP_PORT@|${4:-}|g" \
        -e "s|@SSE_PORT@|$SSE_PORT|g" -e "s|@SSE_PROXY_PORT@|${SSE_PROXY_PORT:-}|g" \
        -e "s|@USER@|$user|g" "$1" >"$2"
}

post_json() { # URL -> curl args for the benchmark request
    echo "-X POST -H Content-Type:application/json --data-binary @$TMP/body.json $1/v1/chat/completions"
}

# ----------------------------------------------------------- the services

UP_PORT=""
need_upstream() {
    [ -n "$UP_PORT" ] && return 0
    need_tool "$NGINX"
    pick_port
    UP_PORT=$PORT
    render_nginx_conf "$BENCH_DIR/upstream.conf.in" "$TMP/upstream.conf" "$UP_PORT"
    spawn upstream "$NGINX" -p "$TMP" -c "$TMP/upstream.conf" -e "$TMP/upstream.error.log"
    UP_PID=$LAST_PID
    # shellcheck disable=SC2046
    wait_http "$UP_PID" upstream $(post_json "http://127.0.0.1:$UP_PORT")
    curl -s $(post_json "http://127.0.0.1:$UP_PORT") >"$TMP/expected_body"
    say "static upstream (nginx, 1 worker) on 127.0.0.1:$UP_PORT"
}

PROXY_PORT=""
need_proxy() {
    [ -n "$PROXY_PORT" ] && return 0
    need_upstream
    pick_port
    PROXY_PORT=$PORT
    pick_port
    SSE_PROXY_PORT=$PORT
    render_nginx_conf "$BENCH_DIR/proxy.conf.in" "$TMP/proxy.conf" "$PROXY_PORT" "$UP_PORT"
    spawn proxy "$NGINX" -p "$TMP" -c "$TMP/proxy.conf" -e "$TMP/proxy.error.log"
    PROXY_PID=$LAST_PID
    # shellcheck disable=SC2046
    wait_http "$PROXY_PID" proxy $(post_json "http://127.0.0.1:$PROXY_PORT")
    say "nginx proxy (2 workers, upstream keepalive 64) on 127.0.0.1:$PROXY_PORT"
}

GW_PORT=""
need_gateway() {
    [ -n "$GW_PORT" ] && return 0
    [ -x "$GATEWAY" ] || return 1
    need_upstream
    pick_port
    GW_PORT=$PORT
    cat >"$TMP/gateway.json" <<EOF
{
  "listen": "127.0.0.1:$GW_PORT",
  "threads": 2,
  "models": [
    {"name": "bench-model", "health": false,
     "backends": [{"url": "http://127.0.0.1:$UP_PORT"}]},
    {"name": "sse-model", "health": false,
     "backends": [{"url": "http://127.0.0.1:$SSE_PORT"}]}
  ]
}
EOF
    if ! "$GATEWAY" -c "$TMP/gateway.json" --check >"$TMP/gateway-check.log" 2>&1; then
        cat "$TMP/gateway-check.log" >&2
        die "the gateway rejects the bench config ($TMP/gateway.json)"
    fi
    spawn gateway "$GATEWAY" -c "$TMP/gateway.json"
    GW_PID=$LAST_PID
    wait_http "$GW_PID" gateway "http://127.0.0.1:$GW_PORT/health"
    # The numbers mean nothing unless the gateway relays the right answer.
    hdrs="$TMP/gw-headers"
    # shellcheck disable=SC2046
    code=$(curl -s -D "$hdrs" -o "$TMP/gw-body" -w '%{http_code}' \
        $(post_json "http://127.0.0.1:$GW_PORT"))
    [ "$code" = 200 ] || { cat "$TMP/gw-body" >&2; die "gateway answered $code to the bench request"; }
    cmp -s "$TMP/gw-body" "$TMP/expected_body" || die "gateway relayed a different body than the upstream's"
    grep -qi '^x-modelmux-model: bench-model' "$hdrs" || warn "gateway answer lacks x-modelmux-model: bench-model"
    say "modelmux gateway (threads 2) on 127.0.0.1:$GW_PORT"
}

# ------------------------------------------------------------- wrk cases

wrk_setup_direct() {
    need_upstream
    CASE_URL="http://127.0.0.1:$UP_PORT"
}

wrk_setup_nginx() {
    need_proxy
    CASE_URL="http://127.0.0.1:$PROXY_PORT"
}

wrk_setup_modelmux() {
    need_gateway || { CASE_SKIP="$GATEWAY not built"; return 1; }
    CASE_URL="http://127.0.0.1:$GW_PORT"
}

# run_wrk CASE URL SECONDS OUTFILE
run_wrk() {
    "$WRK" -t"$BENCH_THREADS" -c"$BENCH_CONNS" -d"$3"s --latency \
        -s "$BENCH_DIR/post.lua" "$2/v1/chat/completions" >"$4" 2>&1 \
        || { cat "$4" >&2; die "wrk failed on case $1"; }
}

# parse_wrk FILE -> "rps p50_us p99_us errors"
parse_wrk() {
    awk '
    function us(v) {
        if (v ~ /us$/) return v + 0
        if (v ~ /ms$/) return (v + 0) * 1000
        if (v ~ /m$/)  return (v + 0) * 60000000
        if (v ~ /s$/)  return (v + 0) * 1000000
        return v + 0
    }
    /Latency Distribution/ { dist = 1; next }
    dist && $1 == "50%" { p50 = us($2) }
    dist && $1 == "99%" { p99 = us($2) }
    /^Requests\/sec:/ { rps = $2 + 0 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ {
        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i + 0
    }
    END {
        if (rps == "" || p50 == "" || p99 == "") { print "parse-error"; exit 1 }
        printf "%.2f %.1f %.1f %d\n", rps, p50, p99, err
    }' "$1"
}

add_result() { # CASE RUN RPS P50_US P99_US ERRORS
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TMP/results.tsv"
}

add_sse_result() { # LABEL RUN P50 P90 P99 MAX
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TMP/sse.tsv"
}

run_wrk_cases() {
    cases=""
    for c in $SELECTED; do
        command -v "wrk_setup_$c" >/dev/null 2>&1 || continue
        CASE_SKIP=""
        if "wrk_setup_$c"; then
            eval "URL_$c=\$CASE_URL"
            cases="$cases $c"
        else
            warn "case $c SKIPPED: $CASE_SKIP"
            echo "$c	$CASE_SKIP" >>"$TMP/skipped.tsv"
            STATUS=1
        fi
    done
    [ -n "$cases" ] || return 0
    need_tool "$WRK"
    for c in $cases; do
        eval "url=\$URL_$c"
        say "warm-up $c (${BENCH_WARMUP}s)"
        run_wrk "$c" "$url" "$BENCH_WARMUP" "$TMP/wrk-warmup-$c.txt"
    done
    # Interleaved rounds, so slow drift on a shared machine (thermal, other
    # tenants) hits every case alike instead of whichever ran last; the order
    # flips every round (a b, b a, ...) so no case always follows another.
    rev=""
    for c in $cases; do rev="$c $rev"; done
    r=1
    while [ "$r" -le "$BENCH_RUNS" ]; do
        if [ $((r % 2)) -eq 1 ]; then order=$cases; else order=$rev; fi
        for c in $order; do
            eval "url=\$URL_$c"
            out="$TMP/wrk-$c-$r.txt"
            run_wrk "$c" "$url" "$BENCH_DURATION" "$out"
            cp "$out" "$BENCH_OUT/" 2>/dev/null
            m=$(parse_wrk "$out") || { cat "$out" >&2; die "cannot parse wrk output of $c"; }
            # shellcheck disable=SC2086
            set -- $m
            add_result "$c" "$r" "$1" "$2" "$3" "$4"
            say "run $r/$BENCH_RUNS $c: $1 req/s, p50 $2 us, p99 $3 us, errors $4, load $(cut -d" " -f1 /proc/loadavg)"
            if [ "$4" != 0 ]; then
                warn "case $c: $4 errors (non-2xx or socket errors), see $BENCH_OUT/$(basename "$out")"
                STATUS=1
            fi
            [ -n "${UP_PID:-}" ] && alive_or_die "$UP_PID" upstream
            [ -n "${PROXY_PID:-}" ] && alive_or_die "$PROXY_PID" proxy
            [ -n "${GW_PID:-}" ] && alive_or_die "$GW_PID" gateway
        done
        r=$((r + 1))
    done
    if [ "$BENCH_PERF" = 1 ] && [ -n "${GW_PID:-}" ]; then
        perf_gateway
    fi
}

# A profile of the gateway under the same load, outside the measured runs:
# top symbols, and system calls per request next to nginx's (syscalls are
# where a proxy on 2 cores spends most of its time).
perf_gateway() {
    command -v perf >/dev/null 2>&1 || { warn "perf not installed, no profile"; return 0; }
    say "perf profile of the gateway (${BENCH_DURATION}s under wrk)"
    # DWARF unwinding: libevent, libcurl and libc are built without frame
    # pointers, so -g alone loses every caller below them.
    perf record -q -F 499 --call-graph dwarf,8192 -p "$GW_PID" -o "$TMP/perf.data" \
        -- sleep "$BENCH_DURATION" \
        >"$TMP/perf-record.log" 2>&1 &
    perf_pid=$!
    PIDS="$PIDS $perf_pid"
    run_wrk perf "http://127.0.0.1:$GW_PORT" "$BENCH_DURATION" "$TMP/wrk-perf.txt"
    wait "$perf_pid"
    perf report -i "$TMP/perf.data" --stdio --no-children -G --percent-limit 0.5 \
        >"$BENCH_OUT/perf-gateway-full.txt" 2>/dev/null
    perf report -i "$TMP/perf.data" --stdio --no-children -g none --percent-limit 0.3 \
        --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -40 \
        >"$BENCH_OUT/perf-gateway.txt"
    {
        echo
        echo "system calls per request (perf stat, ${BENCH_DURATION}s under wrk):"
        perf_syscalls modelmux "$GW_PID" "http://127.0.0.1:$GW_PORT"
        if [ -n "${PROXY_PID:-}" ]; then
            workers=$(pgrep -P "$PROXY_PID" | tr '\n' ',' | sed 's/,$//')
            [ -n "$workers" ] && perf_syscalls nginx "$workers" "http://127.0.0.1:$PROXY_PORT"
        fi
    } >>"$BENCH_OUT/perf-gateway.txt"
    say "perf: $BENCH_OUT/perf-gateway.txt (call graphs: perf-gateway-full.txt)"
}

# perf_syscalls NAME PIDS URL: system calls per request of PIDS under wrk.
perf_syscalls() {
    perf stat -x, -e 'syscalls:sys_enter_*' -p "$2" -o "$TMP/perf-stat-$1.txt" \
        -- sleep "$BENCH_DURATION" >/dev/null 2>&1 &
    perf_pid=$!
    PIDS="$PIDS $perf_pid"
    run_wrk "$1" "$3" "$BENCH_DURATION" "$TMP/wrk-stat-$1.txt"
    wait "$perf_pid"
    reqs=$(awk '/requests in/ { print $1 }' "$TMP/wrk-stat-$1.txt")
    awk -F, -v n="$reqs" -v name="$1" '
        $1 ~ /^[0-9]+$/ && $1 > 0 { sub(/^syscalls:sys_enter_/, "", $3); c[$3] = $1; t += $1 }
        END {
            if (n + 0 == 0) exit
            printf "  %s: %.2f syscalls/request over %d requests:", name, t / n, n
            for (k in c) if (c[k] / n >= 0.05) printf " %s %.2f", k, c[k] / n
            printf "\n"
        }' "$TMP/perf-stat-$1.txt"
}

# -------------------------------------------------------------- sse case

# parse_sse FILE -> "p50 p90 p99 max"
parse_sse() {
    awk '/^label=/ {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%s %s %s %s\n", v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"]; found = 1
    } END { if (!found) exit 1 }' "$1"
}

case_sse() {
    [ -x "$SSE_LATENCY" ] || die "$SSE_LATENCY not built (make $SSE_LATENCY)"
    need_proxy
    have_gw=1
    if ! need_gateway; then
        warn "case sse (through the gateway) SKIPPED: $GATEWAY not built"
        echo "sse	$GATEWAY not built" >>"$TMP/skipped.tsv"
        STATUS=1
        have_gw=0
    fi
    common="--events $SSE_EVENTS --warmup 200 --timeout-ms 10000"
    r=1
    while [ "$r" -le "$SSE_RUNS" ]; do
        # shellcheck disable=SC2086
        "$SSE_LATENCY" --port 0 --target self --label direct $common \
            >"$TMP/sse-direct-$r.txt" 2>"$TMP/sse-direct-$r.log" \
            || { cat "$TMP/sse-direct-$r.log" >&2; die "sse_latency direct failed"; }
        m=$(parse_sse "$TMP/sse-direct-$r.txt") || die "cannot parse sse_latency output"
        # shellcheck disable=SC2086
        set -- $m
        add_sse_result direct "$r" "$1" "$2" "$3" "$4"
        say "sse run $r/$SSE_RUNS direct: p50 $1 us, p90 $2 us, p99 $3 us"
        # shellcheck disable=SC2086
        "$SSE_LATENCY" --port "$SSE_PORT" --target "127.0.0.1:$SSE_PROXY_PORT" --label nginx \
            $common >"$TMP/sse-nginx-$r.txt" 2>"$TMP/sse-nginx-$r.log" \
            || { cat "$TMP/sse-nginx-$r.log" >&2; die "sse_latency through nginx failed"; }
        m=$(parse_sse "$TMP/sse-nginx-$r.txt") || die "cannot parse sse_latency output"
        # shellcheck disable=SC2086
        set -- $m
        add_sse_result nginx "$r" "$1" "$2" "$3" "$4"
        say "sse run $r/$SSE_RUNS nginx: p50 $1 us, p90 $2 us, p99 $3 us"
        if [ "$have_gw" = 1 ]; then
            # shellcheck disable=SC2086
            if ! "$SSE_LATENCY" --port "$SSE_PORT" --target "127.0.0.1:$GW_PORT" \
                --label modelmux $common >"$TMP/sse-gw-$r.txt" 2>"$TMP/sse-gw-$r.log"; then
                cat "$TMP/sse-gw-$r.log" >&2
                tail -20 "$TMP/gateway.log" >&2
                die "sse_latency through the gateway failed"
            fi
            m=$(parse_sse "$TMP/sse-gw-$r.txt") || die "cannot parse sse_latency output"
            # shellcheck disable=SC2086
            set -- $m
            add_sse_result modelmux "$r" "$1" "$2" "$3" "$4"
            say "sse run $r/$SSE_RUNS modelmux: p50 $1 us, p90 $2 us, p99 $3 us"
            alive_or_die "$GW_PID" gateway
        fi
        r=$((r + 1))
    done
}

# --------------------------------------------------------- failover case

# Two fake upstreams (separate node processes, so kill -9 is a real crash:
# the kernel closes their sockets, later connects are refused) behind one
# gateway model with health checks on; tests/bench/failover_load.mjs keeps
# FAILOVER_CONNS requests in flight, kills one backend with SIGKILL at
# FAILOVER_KILL_AT seconds and watches the gateway's /admin/backends.
FAILOVER_RUNS=${FAILOVER_RUNS:-$BENCH_RUNS}
FAILOVER_DURATION=${FAILOVER_DURATION:-10}
FAILOVER_KILL_AT=${FAILOVER_KILL_AT:-4}
FAILOVER_CONNS=${FAILOVER_CONNS:-16}
FAILOVER_STREAM_PERCENT=${FAILOVER_STREAM_PERCENT:-50}
FAILOVER_HEALTH_MS=${FAILOVER_HEALTH_MS:-1000}
FAILOVER_FALL=${FAILOVER_FALL:-2}
FAILOVER_POLL_MS=${FAILOVER_POLL_MS:-20}

# stop_own PID: stop one process this script started, reap it and forget
# it, so the exit trap never signals a PID the system may have reused.
stop_own() {
    kill -TERM "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    PIDS=$(echo " $PIDS " | sed "s/ $1 / /;s/^ *//;s/ *$//")
}

failover_run() { # RUN
    pick_port
    fo_p1=$PORT
    pick_port
    fo_p2=$PORT
    pick_port
    fo_gw=$PORT
    pick_port
    fo_adm=$PORT
    spawn "fo-up1-$1" node tests/fakes/upstream.mjs --port "$fo_p1" --name fo1
    fo_pid1=$LAST_PID
    spawn "fo-up2-$1" node tests/fakes/upstream.mjs --port "$fo_p2" --name fo2
    fo_pid2=$LAST_PID
    wait_http "$fo_pid1" "fo-up1-$1" "http://127.0.0.1:$fo_p1/health"
    wait_http "$fo_pid2" "fo-up2-$1" "http://127.0.0.1:$fo_p2/health"
    # SIGKILL must hit the server itself, not a shell around it.
    [ "$(cat "/proc/$fo_pid1/comm" 2>/dev/null)" = node ] \
        || die "pid $fo_pid1 is not the fake upstream (comm '$(cat "/proc/$fo_pid1/comm" 2>/dev/null)')"
    cat >"$TMP/failover.json" <<EOJ
{
  "listen": "127.0.0.1:$fo_gw",
  "admin_listen": "127.0.0.1:$fo_adm",
  "threads": 2,
  "models": [
    {"name": "failover-model",
     "health": {"interval_ms": $FAILOVER_HEALTH_MS, "fall": $FAILOVER_FALL, "rise": 2},
     "backends": [{"url": "http://127.0.0.1:$fo_p1"}, {"url": "http://127.0.0.1:$fo_p2"}]}
  ]
}
EOJ
    if ! "$GATEWAY" -c "$TMP/failover.json" --check >"$TMP/failover-check.log" 2>&1; then
        cat "$TMP/failover-check.log" >&2
        die "the gateway rejects the failover config ($TMP/failover.json)"
    fi
    spawn "fo-gateway-$1" "$GATEWAY" -c "$TMP/failover.json"
    fo_gpid=$LAST_PID
    wait_http "$fo_gpid" "fo-gateway-$1" "http://127.0.0.1:$fo_gw/health"
    wait_http "$fo_gpid" "fo-gateway-$1" "http://127.0.0.1:$fo_adm/admin/backends"
    fo_load=$(cut -d' ' -f1 /proc/loadavg)
    say "failover run $1/$FAILOVER_RUNS: ${FAILOVER_DURATION}s, $FAILOVER_CONNS in flight, kill -9 of 127.0.0.1:$fo_p1 at ${FAILOVER_KILL_AT}s (load average $fo_load)"
    if ! node "$BENCH_DIR/failover_load.mjs" --target "127.0.0.1:$fo_gw" --admin "127.0.0.1:$fo_adm" \
        --model failover-model --victim "http://127.0.0.1:$fo_p1" --victim-pid "$fo_pid1" \
        --duration-ms $((FAILOVER_DURATION * 1000)) --kill-at-ms $((FAILOVER_KILL_AT * 1000)) \
        --conns "$FAILOVER_CONNS" --stream-percent "$FAILOVER_STREAM_PERCENT" --poll-ms "$FAILOVER_POLL_MS" \
        --requests-out "$BENCH_OUT/failover-requests-$1.tsv" --samples-out "$BENCH_OUT/failover-samples-$1.tsv" \
        >"$TMP/failover-$1.txt" 2>"$TMP/failover-$1.log"; then
        cat "$TMP/failover-$1.log" >&2
        tail -20 "$TMP/fo-gateway-$1.log" >&2
        die "failover_load failed in run $1"
    fi
    cp "$TMP/failover-$1.log" "$BENCH_OUT/failover-$1.log" 2>/dev/null
    cp "$TMP/fo-gateway-$1.log" "$BENCH_OUT/failover-gateway-$1.log" 2>/dev/null
    alive_or_die "$fo_gpid" "fo-gateway-$1"
    alive_or_die "$fo_pid2" "fo-up2-$1"
    # The victim is our child: reap it (exit 137) before its PID is forgotten.
    wait "$fo_pid1" 2>/dev/null
    PIDS=$(echo " $PIDS " | sed "s/ $fo_pid1 / /;s/^ *//;s/ *$//")
    stop_own "$fo_gpid"
    stop_own "$fo_pid2"
    # key=value line -> one TSV row: run, load average, then the values.
    awk -v r="$1" -v l="$fo_load" '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r, l, v["requests"], v["streams"],
            v["failed_before_stream"], v["failed_midstream"], v["picks_after_kill"], v["cutoff_ms"],
            v["cutoff_lo_ms"], v["down_ms"], v["rps_before"], v["rps_after"], v["poll_gap_ms"],
            v["retries"], v["victim_errors"], v["others_down_samples"]
        found = 1
    } END { exit !found }' "$TMP/failover-$1.txt" >>"$TMP/failover.tsv" \
        || die "cannot parse failover_load output: $(cat "$TMP/failover-$1.txt")"
    say "failover run $1: $(cat "$TMP/failover-$1.txt")"
}

case_failover() {
    need_tool node
    [ -x "$GATEWAY" ] || die "$GATEWAY not built"
    for v in FAILOVER_RUNS FAILOVER_DURATION FAILOVER_KILL_AT FAILOVER_CONNS FAILOVER_HEALTH_MS \
        FAILOVER_FALL FAILOVER_POLL_MS FAILOVER_STREAM_PERCENT; do
        eval "val=\$$v"
        case $val in
            ''|*[!0-9]*) die "$v must be a non-negative integer, not '$val'" ;;
        esac
    done
    if [ "$FAILOVER_KILL_AT" -lt 1 ] || [ "$FAILOVER_KILL_AT" -ge "$FAILOVER_DURATION" ]; then
        die "FAILOVER_KILL_AT must be 1..FAILOVER_DURATION-1"
    fi
    [ "$FAILOVER_RUNS" -ge 1 ] || die "FAILOVER_RUNS must be > 0"
    # Not r: pick_port uses it.
    fo_run=1
    while [ "$fo_run" -le "$FAILOVER_RUNS" ]; do
        failover_run "$fo_run"
        fo_run=$((fo_run + 1))
    done
    fo=$TMP/failover.tsv
    {
        echo "#### Failover"
        echo
        echo "Two fake upstreams (\`tests/fakes/upstream.mjs\`), one gateway model over both" \
            "(threads 2, health \`interval_ms\` $FAILOVER_HEALTH_MS, \`fall\` $FAILOVER_FALL, \`rise\` 2," \
            "default retries and breaker); $FAILOVER_CONNS requests in flight for ${FAILOVER_DURATION}s," \
            "$FAILOVER_STREAM_PERCENT% streaming (10 chunks 20 ms apart, first byte after 10 ms," \
            "plain answers after 10 ms); one backend killed with SIGKILL at ${FAILOVER_KILL_AT}s;" \
            "/admin/backends polled every $FAILOVER_POLL_MS ms."
        echo
        echo "| run | load avg | requests | failed before streaming (goal 0) | streams cut (info) | picks of the dead backend after the kill | last of them, after the kill (ms) | marked down after (ms) | req/s before / after | largest poll gap (ms) | retries | failed attempts on the dead backend | samples with the survivor down |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
        # The last pick lies between two samples: "lo..hi", hi is what counts.
        awk -F'\t' '{ last = $7 == 0 ? "none" : $9 ".." $8
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %.0f / %.0f | %s | %s | %s | %s |\n",
            $1, $2, $3, $5, $6, $7, last, $10, $11, $12, $13, $14, $15, $16 }' "$fo"
        echo
        # A run whose bounds straddle the interval (a stalled poller) proves
        # nothing either way: "unknown", not a miss.
        awk -F'\t' -v h="$FAILOVER_HEALTH_MS" '{ f += $5; if ($8 + 0 > m) m = $8 + 0
                if ($9 + 0 >= h) late++; else if ($8 + 0 >= h) unk++ }
            END {
                printf "Failed requests that had not started streaming: **%d** in %d runs (goal 0: %s). ", f, NR, f == 0 ? "met" : "NOT met"
                v = late ? "NOT met in " late " runs" : unk ? "unknown in " unk " runs (sampling stalled), met in the others" : "met"
                printf "Last request routed to the dead backend, worst run: **%.1f ms** after the kill (goal < one health interval, %d ms: %s).\n",
                    m, h, v
            }' "$fo"
        echo
    } >>"$TMP/extra.md"
}

# ------------------------------------------------------------ redis case

# The same gateway twice, side by side: the "modelmux" one (no Redis) and
# one with the same config plus "redis", which flushes its metrics to a private redis-server every
# BENCH_REDIS_FLUSH_MS (default 1000, the config default). wrk runs against
# each in turn, BENCH_RUNS rounds, the order alternating every round, so
# the ratio on/off compares like with like on a shared machine.
BENCH_REDIS_FLUSH_MS=${BENCH_REDIS_FLUSH_MS:-1000}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
REDIS_CLI=${REDIS_CLI:-redis-cli}

REDIS_PORT=""
need_redis() {
    [ -n "$REDIS_PORT" ] && return 0
    need_tool "$REDIS_SERVER"
    need_tool "$REDIS_CLI"
    pick_port
    REDIS_PORT=$PORT
    mkdir -p "$TMP/redis" || die "cannot create $TMP/redis"
    spawn redis "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$TMP/redis" --daemonize no
    REDIS_PID=$LAST_PID
    i=0
    while [ "$("$REDIS_CLI" -p "$REDIS_PORT" ping 2>/dev/null)" != PONG ]; do
        alive_or_die "$REDIS_PID" redis
        [ "$i" -lt 200 ] || die "redis-server not answering PING after 10 s"
        sleep 0.05
        i=$((i + 1))
    done
    say "redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
}

GWR_PORT=""
need_gateway_redis() {
    [ -n "$GWR_PORT" ] && return 0
    [ -x "$GATEWAY" ] || return 1
    need_upstream
    need_redis
    pick_port
    GWR_PORT=$PORT
    cat >"$TMP/gateway-redis.json" <<EOF2
{
  "listen": "127.0.0.1:$GWR_PORT",
  "threads": 2,
  "models": [
    {"name": "bench-model", "health": false,
     "backends": [{"url": "http://127.0.0.1:$UP_PORT"}]},
    {"name": "sse-model", "health": false,
     "backends": [{"url": "http://127.0.0.1:$SSE_PORT"}]}
  ],
  "redis": {"url": "redis://127.0.0.1:$REDIS_PORT/0", "flush_ms": $BENCH_REDIS_FLUSH_MS, "prefix": "bench"}
}
EOF2
    if ! "$GATEWAY" -c "$TMP/gateway-redis.json" --check >"$TMP/gateway-redis-check.log" 2>&1; then
        cat "$TMP/gateway-redis-check.log" >&2
        die "the gateway rejects the redis bench config ($TMP/gateway-redis.json)"
    fi
    spawn gateway-redis "$GATEWAY" -c "$TMP/gateway-redis.json"
    GWR_PID=$LAST_PID
    wait_http "$GWR_PID" gateway-redis "http://127.0.0.1:$GWR_PORT/health"
    # shellcheck disable=SC2046
    code=$(curl -s -o "$TMP/gwr-body" -w '%{http_code}' $(post_json "http://127.0.0.1:$GWR_PORT"))
    [ "$code" = 200 ] || { cat "$TMP/gwr-body" >&2; die "gateway (redis) answered $code to the bench request"; }
    cmp -s "$TMP/gwr-body" "$TMP/expected_body" || die "gateway (redis) relayed a different body than the upstream's"
    say "modelmux gateway with Redis metrics (threads 2, flush_ms $BENCH_REDIS_FLUSH_MS) on 127.0.0.1:$GWR_PORT"
}

# Requests counted in Redis under prefix "bench" (all minutes, all series).
redis_requests() {
    for k in $("$REDIS_CLI" -p "$REDIS_PORT" --scan --pattern 'bench:v1:m:*'); do
        "$REDIS_CLI" -p "$REDIS_PORT" --raw HGETALL "$k"
    done | awk 'NR % 2 == 1 { f = $0; next } f ~ /\trequests$/ { s += $0 } END { printf "%d\n", s }'
}

# A gauge or counter without labels from the redis gateway's /metrics.
gwr_metric() {
    curl -s --max-time 5 "http://127.0.0.1:$GWR_PORT/metrics" | awk -v n="$1" '$1 == n { print $2 }'
}

# wrk's completed requests in an output file.
wrk_requests() { awk '/requests in/ { print $1 }' "$1"; }

# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

case_redis() {
    if ! need_gateway || ! need_gateway_redis; then
        warn "case redis SKIPPED: $GATEWAY not built"
        echo "redis	$GATEWAY not built" >>"$TMP/skipped.tsv"
        STATUS=1
        return 0
    fi
    need_tool "$WRK"
    rd=$TMP/redis.tsv
    : >"$rd"
    CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
    say "warm-up redis off/on (${BENCH_WARMUP}s each)"
    run_wrk redis-off "http://127.0.0.1:$GW_PORT" "$BENCH_WARMUP" "$TMP/wrk-redis-warmup-off.txt"
    run_wrk redis-on "http://127.0.0.1:$GWR_PORT" "$BENCH_WARMUP" "$TMP/wrk-redis-warmup-on.txt"
    sent_on=$(wrk_requests "$TMP/wrk-redis-warmup-on.txt")
    rr=1
    while [ "$rr" -le "$BENCH_RUNS" ]; do
        # Alternate who goes first: a drift within a round then favours
        # neither side.
        if [ $((rr % 2)) -eq 1 ]; then order="off on"; else order="on off"; fi
        for side in $order; do
            if [ "$side" = on ]; then url="http://127.0.0.1:$GWR_PORT"; else url="http://127.0.0.1:$GW_PORT"; fi
            if [ "$side" = on ]; then gpid=$GWR_PID; else gpid=$GW_PID; fi
            out="$TMP/wrk-redis-$side-$rr.txt"
            c0=$(cpu_ticks "$gpid")
            run_wrk "redis-$side" "$url" "$BENCH_DURATION" "$out"
            c1=$(cpu_ticks "$gpid")
            cp "$out" "$BENCH_OUT/" 2>/dev/null
            m=$(parse_wrk "$out") || { cat "$out" >&2; die "cannot parse wrk output of redis-$side"; }
            # shellcheck disable=SC2086
            set -- $m
            # The gateway's CPU time per request: unlike req/s, hardly
            # moved by other processes taking the cores.
            cpu=$(awk -v a="$c0" -v b="$c1" -v n="$(wrk_requests "$out")" -v hz="$CLK_TCK" \
                'BEGIN { printf "%.2f", (n > 0 ? (b - a) * 1000000 / hz / n : 0) }')
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$rr" "$1" "$2" "$3" "$4" "$cpu" >>"$rd"
            say "redis run $rr/$BENCH_RUNS metrics $side: $1 req/s, p50 $2 us, p99 $3 us, errors $4, gateway CPU $cpu us/request"
            if [ "$4" != 0 ]; then
                warn "case redis-$side: $4 errors, see $BENCH_OUT/$(basename "$out")"
                STATUS=1
            fi
            [ "$side" = on ] && sent_on=$((sent_on + $(wrk_requests "$out")))
            alive_or_die "$GW_PID" gateway
            alive_or_die "$GWR_PID" gateway-redis
            alive_or_die "$REDIS_PID" redis
        done
        rr=$((rr + 1))
    done
    # The numbers mean nothing unless the counts did reach Redis: after a
    # few flushes, Redis must hold at least every request wrk completed
    # through that gateway (the gateway also counts the few that wrk cut
    # off at the end of each run, at most BENCH_CONNS per run).
    sleep "$(awk -v f="$BENCH_REDIS_FLUSH_MS" 'BEGIN { printf "%.2f", 3 * f / 1000 + 0.5 }')"
    in_redis=$(redis_requests)
    connected=$(gwr_metric modelmux_redis_connected)
    flushes=$(gwr_metric modelmux_redis_flushes_total)
    failed_fl=$(gwr_metric modelmux_redis_failed_flushes_total)
    slack=$((BENCH_CONNS * (BENCH_RUNS + 1) + 1))
    counted="yes"
    if [ "${connected:-0}" != 1 ] || [ "$in_redis" -lt "$sent_on" ] || [ "$in_redis" -gt $((sent_on + slack)) ]; then
        counted="NO"
        warn "case redis: Redis holds $in_redis requests, wrk completed $sent_on through that gateway (connected ${connected:-?})"
        STATUS=1
    fi
    on=$(col_median "$rd" on 3)
    off=$(col_median "$rd" off 3)
    ratio_r=$(ratio "$on" "$off")
    {
        echo "#### Redis metrics on vs off"
        echo
        echo "The same gateway config twice (threads 2, \`bench-model\`), one with \`redis\`" \
            "(\`flush_ms\` $BENCH_REDIS_FLUSH_MS, a private redis-server without persistence), wrk" \
            "-t$BENCH_THREADS -c$BENCH_CONNS, $BENCH_RUNS rounds of ${BENCH_DURATION}s, off and on" \
            "alternating first; medians."
        echo
        echo "| metrics | req/s | p50 (ms) | p99 (ms) | gateway CPU (us/request) | errors |"
        echo "|---|---:|---:|---:|---:|---:|"
        for side in off on; do
            errs=$(awk -F'\t' -v k="$side" '$1 == k { s += $6 } END { print s + 0 }' "$rd")
            printf '| %s | %.0f | %s | %s | %s | %s |\n' "$side" "$(col_median "$rd" "$side" 3)" \
                "$(ms "$(col_median "$rd" "$side" 4)")" "$(ms "$(col_median "$rd" "$side" 5)")" \
                "$(col_median "$rd" "$side" 7)" "$errs"
        done
        echo
        echo "Redis on / off: req/s **$ratio_r** (goal >= 0.97: $(goal "$ratio_r" ">=" 0.97))."
        # Per round, on and off ran back to back: the median of these
        # ratios is the steadier figure on a noisy machine.
        awk -F'\t' '$1 == "off" { f[$2] = $3 } $1 == "on" { n[$2] = $3 }
            END {
                for (r = 1; r in f && r in n; r++) { q[r] = n[r] / f[r]; a = a sep sprintf("%.3f", q[r]); sep = ", " }
                k = r - 1
                if (k == 0) exit
                for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (q[j] < q[i]) { t = q[i]; q[i] = q[j]; q[j] = t }
                m = k % 2 ? q[(k + 1) / 2] : (q[k / 2] + q[k / 2 + 1]) / 2
                printf "Same ratio per round: %s; their median **%.3f** (goal >= 0.97: %s).\n", a, m, (m >= 0.97 ? "met" : "NOT met")
            }' "$rd"
        echo "Gateway CPU time per request on / off: $(ratio "$(col_median "$rd" on 7)" "$(col_median "$rd" off 7)")" \
            "(per round: $(awk -F'\t' '$1 == "off" { f[$2] = $7 } $1 == "on" { n[$2] = $7 }
                END { for (r = 1; r in f && r in n; r++) { printf "%s%.3f", sep, (f[r] > 0 ? n[r] / f[r] : 0); sep = ", " } }' "$rd"))."
        echo "Counted in Redis: $in_redis requests for $sent_on completed by wrk through that gateway" \
            "(all arrived: $counted); $flushes batches acknowledged, ${failed_fl:-0} failed."
        echo
    } >>"$TMP/extra.md"
}

# ---------------------------------------------------------------- report

median() { # numbers on stdin -> median
    sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

col_median() { # FILE KEY COLUMN
    [ -f "$1" ] || { echo nan; return; }
    awk -F'\t' -v k="$2" -v c="$3" '$1 == k { print $c }' "$1" | median
}

has_case() { [ -f "$1" ] && awk -F'\t' -v k="$2" '$1 == k { f = 1 } END { exit !f }' "$1"; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "nan"; else printf "%.2f", a / b }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }
goal() { # A OP B, OP one of >= <= < -> "met" / "NOT met"
    awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN {
        if (a == "nan" || b == "nan") { print "unknown"; exit }
        ok = (op == ">=") ? (a + 0 >= b + 0) : (op == "<=") ? (a + 0 <= b + 0) : (a + 0 < b + 0)
        print (ok ? "met" : "NOT met") }'
}

report() {
    md="$BENCH_OUT/results.md"
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    {
        echo "### Results $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "Command: \`make bench\` (BENCH_CASES=\"$SELECTED\", wrk -t$BENCH_THREADS -c$BENCH_CONNS," \
            "$BENCH_RUNS interleaved runs of ${BENCH_DURATION}s after a ${BENCH_WARMUP}s warm-up, order flipped every round, medians;" \
            "SSE: $SSE_RUNS runs of $SSE_EVENTS events)."
        echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, Linux $(uname -r);" \
            "$("$NGINX" -v 2>&1 | sed 's|.*/||;s|^|nginx |')," \
            "$("$WRK" --version 2>&1 | head -1 | awk '{print "wrk", $2}')." \
            "Load average (1 min) at start $LOAD_START, at end $(cut -d' ' -f1 /proc/loadavg)" \
            "(above ~0.5 other processes shared the cores: expect noise)."
        case " $SELECTED " in
            *" nginx "*|*" modelmux "*)
                echo "Same footing: nginx 2 worker processes, the gateway 2 threads, wrk $BENCH_THREADS threads," \
                    "nothing pinned, all on the same $(nproc) cores; each proxy keeps its upstream connections alive$PACE_NOTE." ;;
        esac
        echo
        if [ -f "$TMP/results.tsv" ]; then
            echo "| case | req/s | p50 (ms) | p99 (ms) | errors |"
            echo "|---|---:|---:|---:|---:|"
            for c in $SELECTED; do
                has_case "$TMP/results.tsv" "$c" || continue
                rps=$(col_median "$TMP/results.tsv" "$c" 3)
                p50=$(col_median "$TMP/results.tsv" "$c" 4)
                p99=$(col_median "$TMP/results.tsv" "$c" 5)
                errs=$(awk -F'\t' -v k="$c" '$1 == k { s += $6 } END { print s + 0 }' "$TMP/results.tsv")
                printf '| %s | %.0f | %s | %s | %s |\n' "$c" "$rps" "$(ms "$p50")" "$(ms "$p99")" "$errs"
            done
            echo
            if has_case "$TMP/results.tsv" modelmux && has_case "$TMP/results.tsv" nginx; then
                rr=$(ratio "$(col_median "$TMP/results.tsv" modelmux 3)" "$(col_median "$TMP/results.tsv" nginx 3)")
                pr=$(ratio "$(col_median "$TMP/results.tsv" modelmux 5)" "$(col_median "$TMP/results.tsv" nginx 5)")
                p5=$(ratio "$(col_median "$TMP/results.tsv" modelmux 4)" "$(col_median "$TMP/results.tsv" nginx 4)")
                if [ "$BENCH_PACE_MS" -gt 0 ]; then
                    # Paced, req/s is what wrk offered, not what a proxy can do.
                    echo "modelmux / nginx (paced, equal offered load): req/s $rr, p99 **$pr** (goal <= 1.0: $(goal "$pr" "<=" 1.0)), p50 $p5."
                else
                    echo "modelmux / nginx: req/s **$rr** (goal >= 1.0: $(goal "$rr" ">=" 1.0)), p99 **$pr** (goal <= 1.0: $(goal "$pr" "<=" 1.0)), p50 $p5."
                fi
                # Ratios within each round are immune to drift between rounds;
                # their median and how many rounds went either way say more
                # about p99 than one ratio of medians (docs/BENCHMARKS.md).
                awk -F'\t' '$1 == "nginx" { n[$2] = $3; n99[$2] = $5 } $1 == "modelmux" { m[$2] = $3; m99[$2] = $5 }
                    function med(q, k,   i, j, t) {
                        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (q[j] < q[i]) { t = q[i]; q[i] = q[j]; q[j] = t }
                        return k % 2 ? q[(k + 1) / 2] : (q[k / 2] + q[k / 2 + 1]) / 2
                    }
                    END {
                        for (r = 1; r in n && r in m; r++) {
                            qr[r] = m[r] / n[r]; qp[r] = m99[r] / n99[r]
                            a = a sep sprintf("%.2f", qr[r]); b = b sep sprintf("%.2f", qp[r]); sep = ", "
                            wr += qr[r] >= 1; wp += qp[r] <= 1
                        }
                        k = r - 1
                        if (k == 0) exit
                        printf "Same ratios per round: req/s %s; p99 %s.\n", a, b
                        printf "Median of the per-round ratios: req/s **%.2f** (>= 1.0 in %d of %d rounds), p99 **%.2f** (<= 1.0 in %d of %d rounds).\n",
                            med(qr, k), wr, k, med(qp, k), wp, k
                    }' "$TMP/results.tsv"
                echo
            fi
            echo "Per run (req/s, p50 us, p99 us, errors):"
            echo
            for c in $SELECTED; do
                has_case "$TMP/results.tsv" "$c" || continue
                awk -F'\t' -v k="$c" '$1 == k { line = line sep $3 ", " $4 ", " $5 ", " $6; sep = "; " }
                    END { printf "- %s: %s\n", k, line }' "$TMP/results.tsv"
            done
            echo
        fi
        if [ -f "$TMP/sse.tsv" ]; then
            echo "| SSE path | p50 (us) | p90 (us) | p99 (us) | max (us) |"
            echo "|---|---:|---:|---:|---:|"
            for l in direct nginx modelmux; do
                has_case "$TMP/sse.tsv" "$l" || continue
                printf '| %s | %s | %s | %s | %s |\n' "$l" \
                    "$(col_median "$TMP/sse.tsv" "$l" 3)" "$(col_median "$TMP/sse.tsv" "$l" 4)" \
                    "$(col_median "$TMP/sse.tsv" "$l" 5)" "$(col_median "$TMP/sse.tsv" "$l" 6)"
            done
            echo
            if has_case "$TMP/sse.tsv" modelmux; then
                a50=$(awk -v g="$(col_median "$TMP/sse.tsv" modelmux 3)" -v d="$(col_median "$TMP/sse.tsv" direct 3)" 'BEGIN { printf "%.1f", g - d }')
                a99=$(awk -v g="$(col_median "$TMP/sse.tsv" modelmux 5)" -v d="$(col_median "$TMP/sse.tsv" direct 5)" 'BEGIN { printf "%.1f", g - d }')
                echo "Added per chunk by the gateway: p50 **+$a50 us** (goal < 100 us: $(goal "$a50" "<" 100)), p99 +$a99 us ($(goal "$a99" "<" 100) at p99)."
            fi
            if has_case "$TMP/sse.tsv" nginx; then
                n50=$(awk -v g="$(col_median "$TMP/sse.tsv" nginx 3)" -v d="$(col_median "$TMP/sse.tsv" direct 3)" 'BEGIN { printf "%.1f", g - d }')
                n99=$(awk -v g="$(col_median "$TMP/sse.tsv" nginx 5)" -v d="$(col_median "$TMP/sse.tsv" direct 5)" 'BEGIN { printf "%.1f", g - d }')
                echo "Added per chunk by nginx (proxy_buffering off), for comparison: p50 +$n50 us, p99 +$n99 us."
            fi
            echo
        fi
        if [ -f "$TMP/skipped.tsv" ]; then
            awk -F'\t' '{ printf "Skipped: %s (%s).\n", $1, $2 }' "$TMP/skipped.tsv"
            echo
        fi
        [ -f "$TMP/extra.md" ] && cat "$TMP/extra.md"
    } >"$md"
    echo
    cat "$md"
    say "markdown written to $md"
}

# ------------------------------------------------------------------ main

if [ "$BENCH_CASES" = all ]; then
    SELECTED=$ALL_CASES
else
    SELECTED=$(echo "$BENCH_CASES" | tr ',' ' ')
fi
for c in $SELECTED; do
    case " $ALL_CASES " in
        *" $c "*) ;;
        *) echo "bench: unknown case '$c' (known: $ALL_CASES)" >&2; exit 2 ;;
    esac
done
need_tool curl
# The sse case's fake upstream port, fixed up front because the proxy's
# and the gateway's configs route to it; sse_latency listens there only
# during its runs (nothing health-checks it in between).
pick_port
SSE_PORT=$PORT
mkdir -p "$BENCH_OUT" || exit 1
rm -f "$BENCH_OUT"/wrk-*.txt
printf '%s\n' '{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}' | tr -d '\n' >"$TMP/body.json"
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)
say "cases: $SELECTED; temp dir $TMP; load average $LOAD_START"

run_wrk_cases
for c in $SELECTED; do
    command -v "case_$c" >/dev/null 2>&1 && "case_$c"
done
report
exit $STATUS
