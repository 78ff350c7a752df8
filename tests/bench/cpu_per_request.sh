#!/bin/sh
# CPU time per proxied request: nginx proxy_pass vs modelmux-gateway, same
# static upstream, same wrk load. On a shared machine requests/s swing with
# the neighbours' load; the CPU time a proxy spends per request does much
# less, so this is the steadier efficiency comparison.
#   sh tests/bench/cpu_per_request.sh   (after make; BUILD, DURATION, ROUNDS)
set -eu
BUILD=${BUILD:-build}
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-3}
dir=$(mktemp -d /tmp/mm-cpu.XXXXXX)
up_port=$((23000 + $$ % 500)); px_port=$((up_port + 500)); gw_port=$((up_port + 1000))
cleanup() {
    [ -f "$dir/up.pid" ] && kill "$(cat "$dir/up.pid")" 2>/dev/null || true
    [ -f "$dir/px.pid" ] && kill "$(cat "$dir/px.pid")" 2>/dev/null || true
    [ -n "${gw:-}" ] && kill "$gw" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
body='{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
cat >"$dir/up.conf" <<CONF
worker_processes 1; daemon off; error_log $dir/up.err; pid $dir/up.pid;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$up_port;
  location / { default_type application/json; return 200 '$body'; } } }
CONF
cat >"$dir/px.conf" <<CONF
worker_processes 2; daemon off; error_log $dir/px.err; pid $dir/px.pid;
events { worker_connections 1024; }
http { access_log off; upstream up { server 127.0.0.1:$up_port; keepalive 64; }
  server { listen 127.0.0.1:$px_port; location / { proxy_pass http://up;
    proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat >"$dir/gw.json" <<CONF
{"listen":"127.0.0.1:$gw_port","threads":2,
 "models":[{"name":"bench-model","health":false,"backends":[{"url":"http://127.0.0.1:$up_port"}]}]}
CONF
nginx -p "$dir" -c "$dir/up.conf" & nginx -p "$dir" -c "$dir/px.conf" &
"$BUILD/modelmux-gateway" -c "$dir/gw.json" 2>"$dir/gw.log" & gw=$!
for p in $up_port $px_port $gw_port; do
    i=0; until curl -s -o /dev/null "http://127.0.0.1:$p/"; do i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.05; done
done
ticks() { t=0; for p in "$@"; do set -- $(cut -d' ' -f14,15 "/proc/$p/stat"); t=$((t + $1 + $2)); done; echo $t; }
hz=$(getconf CLK_TCK)
run() { # port pids...
    port=$1; shift
    wrk -t2 -c32 -d2s -s tests/bench/post.lua "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
    c0=$(ticks "$@")
    n=$(wrk -t2 -c32 -d"${DURATION}s" -s tests/bench/post.lua "http://127.0.0.1:$port/v1/chat/completions" |
        awk '/requests in/ {print $1}')
    c1=$(ticks "$@")
    echo $(( (c1 - c0) * 1000000 / hz * 10 / n ))   # tenths of a microsecond per request
}
pxw=$(pgrep -P "$(cat "$dir/px.pid")" | tr '\n' ' ')
echo "| round | nginx us/req | modelmux us/req | ratio |"
echo "|---|---:|---:|---:|"
r=1
while [ $r -le "$ROUNDS" ]; do
    a=$(run $px_port $pxw); b=$(run $gw_port $gw)
    echo "| $r | $((a / 10)).$((a % 10)) | $((b / 10)).$((b % 10)) | $(awk "BEGIN{printf \"%.2f\", $b/$a}") |"
    r=$((r + 1))
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
