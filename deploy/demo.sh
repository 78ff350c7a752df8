#!/bin/sh
# `make run`: the gateway with an embedded demo configuration in front of
# local demo backends (fake OpenAI servers from tests/fakes until the fleet
# launches real workers). Ctrl-C stops everything.
set -e
BUILD=${BUILD:-build}
PORT=${MM_DEMO_PORT:-8000}
ADMIN=${MM_DEMO_ADMIN_PORT:-8001}
dir=$(mktemp -d /tmp/modelmux-demo.XXXXXX)
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

start_backend() { # name port
    node tests/fakes/upstream.mjs --port "$2" --name "$1" >"$dir/$1.log" 2>&1 &
    pids="$pids $!"
}
start_backend demo-a-1 9201
start_backend demo-a-2 9202
start_backend demo-b-1 9203
for p in 9201 9202 9203; do
    i=0
    until curl -fsS "http://127.0.0.1:$p/health" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 100 ] && { echo "demo backend on $p did not start" >&2; exit 1; }
        sleep 0.1
    done
done

cat >"$dir/gateway.json" <<JSON
{"listen": "127.0.0.1:$PORT", "admin_listen": "127.0.0.1:$ADMIN", "threads": 2,
 "access_log": "$dir/access.log",
 "models": [
   {"name": "demo-a", "strategy": "round_robin",
    "backends": [{"url": "http://127.0.0.1:9201", "weight": 3},
                 {"url": "http://127.0.0.1:9202", "weight": 1}],
    "fallback": ["demo-b"]},
   {"name": "demo-b", "backends": [{"url": "http://127.0.0.1:9203", "served_model": "demo-b-v2"}]},
   {"name": "demo", "split": [{"model": "demo-a", "weight": 50}, {"model": "demo-b", "weight": 50}],
    "sticky": "header:x-user-id"}]}
JSON

"$BUILD/modelmux-gateway" -c "$dir/gateway.json" &
pids="$pids $!"
i=0
until curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 100 ] && { echo "gateway did not start" >&2; exit 1; }
    sleep 0.1
done
cat <<EOT

modelmux demo is up: gateway on http://127.0.0.1:$PORT, admin on http://127.0.0.1:$ADMIN
  curl -s http://127.0.0.1:$PORT/v1/models
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
  curl -sN http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"demo-a","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  curl -s http://127.0.0.1:$PORT/metrics | head
  curl -s http://127.0.0.1:$ADMIN/admin/backends
Access log: $dir/access.log. Press Ctrl-C to stop.
EOT
wait
