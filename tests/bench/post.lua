-- post.lua: the request of every wrk case in `make bench` (tests/bench/run.sh):
-- a small chat completion POST, so a gateway must parse the JSON body and
-- route on its "model" field. BENCH_MODEL picks another model name.
-- No response() hook on purpose: wrk then skips per-response Lua calls, and
-- it reports non-2xx answers itself ("Non-2xx or 3xx responses"), which
-- run.sh counts as errors.
-- BENCH_PACE_MS > 0: each connection waits that long before its next
-- request (wrk's delay() hook, one Lua call per request, so only then), which
-- offers both proxies the same load and compares p99 at equal req/s instead
-- of at saturation.
local model = os.getenv("BENCH_MODEL") or "bench-model"
wrk.method = "POST"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
local pace = tonumber(os.getenv("BENCH_PACE_MS") or "0") or 0
if pace > 0 then
    function delay()
        return pace
    end
end
