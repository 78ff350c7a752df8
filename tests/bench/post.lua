-- post.lua: the request of every wrk case in `make bench` (tests/bench/run.sh):
-- a small chat completion POST, so a gateway must parse the JSON body and
-- route on its "model" field. BENCH_MODEL picks another model name.
-- No response() hook on purpose: wrk then skips per-response Lua calls, and
-- it reports non-2xx answers itself ("Non-2xx or 3xx responses"), which
-- run.sh counts as errors.
local model = os.getenv("BENCH_MODEL") or "bench-model"
wrk.method = "POST"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
