/* admin.c: the admin API. */
#include "admin.h"
#include "pctdec.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dashboard.h"
#include "admin_models.h"
#include "httpd.h"
#include "log.h"

struct mm_admin {
    const mm_gateway_cfg *cfg;
    mm_runtime *rt;
    mm_metrics *metrics;
    mm_admin_workers_fn workers;
    void *workers_arg;
    mm_httpd  *httpd;
};

static int path_is(const mm_http_request *q, const char *p)
{
    size_t n = strlen(p);
    return q->target_len >= n && memcmp(q->target, p, n) == 0 &&
           (q->target_len == n || q->target[n] == '?');
}

static json_t *backend_json(mm_backend *b, uint64_t now)
{
    uint32_t total = 0;
    double rate = mm_breaker_error_rate(&b->breaker, now, &total);
    uint64_t at = mm_breaker_retry_at(&b->breaker, now);
    if (b->cooldown_until_ms > now && b->cooldown_until_ms > at)
        at = b->cooldown_until_ms;
    return json_pack("{s:s, s:i, s:s, s:s, s:b, s:i, s:I, s:I, s:f, s:i, s:I, s:i}",
                     "url", b->cfg->url,
                     "weight", b->pool->weights[b->index],
                     "health", mm_health_state_name(&b->health),
                     "breaker", mm_breaker_state_name(b->breaker.state),
                     "up", b->health.up,
                     "inflight", b->outstanding,
                     "requests", (json_int_t)b->requests,
                     "failures", (json_int_t)b->failures,
                     "error_rate", rate,
                     "window_requests", (int)total,
                     "retry_in_ms", (json_int_t)(at > now ? at - now : 0),
                     "trips", b->breaker.trips);
}

static json_t *backends_json(mm_router *r)
{
    json_t *models = json_array();
    uint64_t now = mm_now_ms();
    for (size_t i = 0; i < mm_router_npools(r); i++) {
        mm_pool *p = mm_router_pool(r, i);
        if (!p)
            continue;
        json_t *arr = json_array();
        pthread_mutex_lock(&p->lock);
        for (size_t j = 0; j < p->nbackends; j++)
            json_array_append_new(arr, backend_json(&p->backends[j], now));
        int queued = p->queued;
        pthread_mutex_unlock(&p->lock);
        json_array_append_new(models, json_pack("{s:s, s:b, s:i, s:o}", "model", p->name,
                                                "default_pool", p == r->default_pool, "queued",
                                                queued, "backends", arr));
    }
    return json_pack("{s:o}", "models", models);
}

static const char *const err_names[MM_ERR__COUNT] = {
    "none", "connect", "timeout", "5xx", "429", "breaker_open", "client_abort", "midstream", "client",
};

static json_t *hist_json(const mm_hist *h)
{
    json_t *b = json_array();
    for (int i = 0; i < MM_HIST_BUCKETS; i++)
        json_array_append_new(b, json_integer((json_int_t)h->bucket[i]));
    return json_pack("{s:I, s:I, s:o, s:f, s:f}", "count", (json_int_t)h->count, "sum_us",
                     (json_int_t)h->sum_us, "buckets", b, "p50_ms", mm_hist_quantile_ms(h, 0.5),
                     "p95_ms", mm_hist_quantile_ms(h, 0.95));
}

/* Cumulative counters per series; the dashboard turns successive snapshots
 * into rates, so the gateway keeps no time series of its own. */
static json_t *stats_json(mm_admin *a)
{
    json_t *series = json_array();
    size_t n = a->metrics ? mm_metrics_count(a->metrics) : 0;
    for (size_t i = 0; i < n; i++) {
        mm_series_stats st;
        mm_series_info info;
        if (mm_metrics_get(a->metrics, i, &st, &info) != 0)
            continue;
        json_t *resp = json_object(), *errs = json_object();
        static const char *const cls[6] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
        for (int k = 0; k < 6; k++)
            json_object_set_new(resp, cls[k], json_integer((json_int_t)st.responses[k]));
        for (int k = 1; k < MM_ERR__COUNT; k++)
            json_object_set_new(errs, err_names[k], json_integer((json_int_t)st.errors[k]));
        json_array_append_new(series, json_pack(
            "{s:s, s:s, s:s, s:I, s:o, s:o, s:I, s:I, s:I, s:I, s:o, s:o, s:o}",
            "model", info.model, "variant", info.variant, "backend", info.backend,
            "requests", (json_int_t)st.requests, "responses", resp, "errors", errs,
            "retries", (json_int_t)st.retries, "fallbacks", (json_int_t)st.fallbacks,
            "prompt_tokens", (json_int_t)st.prompt_tokens,
            "completion_tokens", (json_int_t)st.completion_tokens,
            "latency", hist_json(&st.hist[MM_H_LATENCY]), "ttft", hist_json(&st.hist[MM_H_TTFT]),
            "itl", hist_json(&st.hist[MM_H_ITL])));
    }
    json_t *weights = json_array();
    mm_router *cur = mm_runtime_acquire(a->rt);
    for (size_t i = 0; i < cur->cfg->nmodels; i++) {
        const mm_model_cfg *m = &cur->cfg->models[i];
        for (size_t j = 0; j < m->nsplit; j++)
            json_array_append_new(weights, json_pack("{s:s, s:s, s:i}", "model", m->name, "variant",
                                                     m->split[j].model, "weight", m->split[j].weight));
    }
    mm_router_unref(cur);
    mm_metrics_sink_stats sk = {0};
    if (a->metrics)
        mm_metrics_get_sink(a->metrics, &sk);
    mm_router *r = mm_runtime_acquire(a->rt);
    json_t *bk = backends_json(r);
    json_t *out = json_pack("{s:I, s:o, s:o, s:O, s:{s:b, s:b, s:I, s:I}}",
                            "time_ms", (json_int_t)mm_now_ms(), "series", series, "weights", weights,
                            "models", json_object_get(bk, "models"),
                            "redis", "configured", sk.redis_configured, "connected", sk.redis_connected,
                            "flushes", (json_int_t)sk.redis_flushes,
                            "failed_flushes", (json_int_t)sk.redis_failed_flushes);
    json_decref(bk);
    mm_router_unref(r);
    return out;
}

void mm_admin_reply_json(mm_http_exchange *ex, int status, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s) {
        mm_http_respond_error(ex, 500, NULL, NULL, "out of memory");
        return;
    }
    mm_http_respond(ex, status, "Content-Type: application/json\r\nCache-Control: no-store\r\n", s,
                    strlen(s));
    free(s);
}

static int authorized(const mm_admin *a, const mm_http_request *q)
{
    if (!a->cfg->admin_token)
        return 1;
    const mm_http_header *h = mm_http_find_header(q, "authorization");
    size_t tl = strlen(a->cfg->admin_token);
    return h && h->value_len == tl + 7 && strncasecmp(h->value, "Bearer ", 7) == 0 &&
           memcmp(h->value + 7, a->cfg->admin_token, tl) == 0;
}

/* Equal without an early exit, so the time taken does not tell how much of
 * a guess was right (only whether its length was). */
static int token_equal(const char *got, size_t n, const char *want)
{
    size_t wl = strlen(want);
    unsigned char diff = n != wl;
    for (size_t i = 0; i < n && i < wl; i++)
        diff |= (unsigned char)(got[i] ^ want[i]);
    return diff == 0;
}

/* ?token=... in the page's own URL: a browser following a link cannot send
 * an Authorization header, so the page is the one place that takes the
 * token from the query (percent-decoded; '+' is literal because a token has
 * no spaces). The page then sends it as a bearer token on /admin/stats; the
 * API itself keeps to the header. */
static int dashboard_query_token_ok(const mm_admin *a, const mm_http_request *q)
{
    const char *p = memchr(q->target, '?', q->target_len);
    const char *end = q->target + q->target_len;
    char tok[4098];   /* admin_token is at most 4096 chars; one more can only fail */
    if (!p)
        return 0;
    for (p++; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if (stop - p > 6 && memcmp(p, "token=", 6) == 0) {
            int n = mm_pct_decode(p + 6, (size_t)(stop - p - 6), tok, sizeof tok);
            return n >= 0 && token_equal(tok, (size_t)n, a->cfg->admin_token);
        }
        p = stop + 1;
    }
    return 0;
}

/* The page is static and self-contained: the CSP lets it talk only to this
 * listener, and no-referrer keeps a ?token= in its URL from travelling on. */
static void serve_dashboard(mm_admin *a, mm_http_exchange *ex)
{
    if (a->cfg->admin_token && !authorized(a, &ex->req) && !dashboard_query_token_ok(a, &ex->req)) {
        mm_http_respond_error(ex, 401, NULL, "WWW-Authenticate: Bearer\r\n",
                              "admin token required: open /dashboard?token=TOKEN");
        return;
    }
    mm_http_respond(ex, 200,
                    "Content-Type: text/html; charset=utf-8\r\n"
                    "Cache-Control: no-store\r\n"
                    "Referrer-Policy: no-referrer\r\n"
                    "X-Content-Type-Options: nosniff\r\n"
                    "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
                    mm_dashboard_html, mm_dashboard_html_len);
}

static void admin_handle(mm_http_exchange *ex, void *arg)
{
    mm_admin *a = arg;
    const mm_http_request *q = &ex->req;
    int get = q->method_len == 3 && memcmp(q->method, "GET", 3) == 0;
    if (get && path_is(q, "/health")) {
        mm_admin_reply_json(ex, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    if (get && path_is(q, "/dashboard")) {
        serve_dashboard(a, ex);
        return;
    }
    if (!authorized(a, q)) {
        mm_http_respond_error(ex, 401, NULL, "WWW-Authenticate: Bearer\r\n",
                              "admin token required (Authorization: Bearer ...)");
        return;
    }
    if (get && path_is(q, "/admin/backends")) {
        mm_router *r = mm_runtime_acquire(a->rt);
        mm_admin_reply_json(ex, 200, backends_json(r));
        mm_router_unref(r);
        return;
    }
    if (get && path_is(q, "/admin/stats")) {
        mm_admin_reply_json(ex, 200, stats_json(a));
        return;
    }
    if (mm_admin_models_route(a->rt, a->workers, a->workers_arg, ex))
        return;
    mm_http_respond_error(ex, 404, NULL, NULL, "no admin route for %.*s %.*s",
                          (int)(q->method_len > 16 ? 16 : q->method_len), q->method,
                          (int)(q->target_len > 128 ? 128 : q->target_len), q->target);
}

int mm_admin_start(struct event_base *base, const mm_gateway_cfg *cfg, mm_runtime *rt,
                   mm_metrics *m, mm_admin **out, char *err, size_t errlen)
{
    mm_admin *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    a->cfg = cfg;
    a->rt = rt;
    a->metrics = m;
    mm_httpd_limits lim = {
        .max_header_bytes = cfg->max_header_bytes,
        .max_body_bytes = cfg->max_body_bytes,
        .idle_timeout_ms = cfg->client_timeout_ms,
    };
    int rc = mm_httpd_new(base, &lim, admin_handle, a, &a->httpd);
    if (rc == 0)
        rc = mm_httpd_listen(a->httpd, cfg->admin_host, cfg->admin_port, 0, err, errlen);
    if (rc) {
        mm_admin_free(a);
        return rc;
    }
    mm_info("admin listening on %s:%d", cfg->admin_host, mm_httpd_port(a->httpd));
    *out = a;
    return 0;
}

void mm_admin_set_workers(mm_admin *a, mm_admin_workers_fn fn, void *arg)
{
    a->workers = fn;
    a->workers_arg = arg;
}

void mm_admin_free(mm_admin *a)
{
    if (!a)
        return;
    mm_httpd_free(a->httpd);
    free(a);
}
