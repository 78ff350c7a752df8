#!/bin/sh
# `make run`: a real fleet on the CPU. The gateway launches two workers on
# two small generated models (demo-a, demo-b), splits "demo" 50/50 between
# them, waits until they are ready and prints how to call it. Ctrl-C stops
# everything (the gateway stops its workers).
set -e
BUILD=${BUILD:-build}
PORT=${MM_DEMO_PORT:-8000}
ADMIN=${MM_DEMO_ADMIN_PORT:-8001}
MODELS=${MM_DEMO_MODELS:-$BUILD/demo-models}
dir=$(mktemp -d /tmp/modelmux-demo.XXXXXX)
gw=""
cleanup() {
    [ -n "$gw" ] && kill "$gw" 2>/dev/null && wait "$gw" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

# Small random-weight models, generated once (deterministic from the seed).
for m in demo-a demo-b; do
    if [ ! -s "$MODELS/$m/model.safetensors" ]; then
        mkdir -p "$MODELS"
        seed=1; [ "$m" = demo-b ] && seed=2
        "$BUILD/modelmux-worker" --make-model "$MODELS/$m" --arch qwen2 --layers 2 --hidden 128 \
            --seed $seed >/dev/null
    fi
done
abs=$(cd "$MODELS" && pwd)

cat >"$dir/gateway.json" <<JSON
{"listen": "127.0.0.1:$PORT", "admin_listen": "127.0.0.1:$ADMIN", "threads": 2,
 "access_log": "$dir/access.log",
 "defaults": {"health": {"interval_ms": 500}},
 "models": [
   {"name": "demo-a", "backends": [{"launch": {"model": "$abs/demo-a", "device": "cpu", "port": 9301}}],
    "fallback": ["demo-b"]},
   {"name": "demo-b", "backends": [{"launch": {"model": "$abs/demo-b", "device": "cpu", "port": 9302}}]},
   {"name": "demo", "split": [{"model": "demo-a", "weight": 50}, {"model": "demo-b", "weight": 50}],
    "sticky": "header:x-user-id"}]}
JSON

"$BUILD/modelmux-gateway" -c "$dir/gateway.json" &
gw=$!
i=0
until curl -fsS "http://127.0.0.1:$PORT/v1/models" 2>/dev/null | grep -q demo-b &&
      curl -fsS "http://127.0.0.1:$PORT/v1/models" 2>/dev/null | grep -q demo-a; do
    i=$((i + 1)); [ $i -gt 600 ] && { echo "the demo workers did not become ready" >&2; exit 1; }
    kill -0 "$gw" 2>/dev/null || { echo "the gateway exited" >&2; exit 1; }
    sleep 0.1
done
cat <<EOT

modelmux demo is up: gateway on http://127.0.0.1:$PORT, admin on http://127.0.0.1:$ADMIN
Two CPU workers (random-weight models: the text is gibberish, the plumbing is real).
  curl -s http://127.0.0.1:$PORT/v1/models
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
  curl -sN http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"demo-a","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
  curl -s http://127.0.0.1:$PORT/metrics | grep modelmux_requests_total
  $BUILD/modelmux-gateway ctl --admin http://127.0.0.1:$ADMIN models
  dashboard: http://127.0.0.1:$ADMIN/dashboard
Access log: $dir/access.log. Press Ctrl-C to stop.
EOT
wait "$gw"
