/* admin.c: the admin API. */
#include "admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "httpd.h"
#include "log.h"

struct mm_admin {
    const mm_gateway_cfg *cfg;
    mm_router *router;
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
                     "weight", b->cfg->weight,
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

static void respond_json(mm_http_exchange *ex, int status, json_t *j)
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

static void admin_handle(mm_http_exchange *ex, void *arg)
{
    mm_admin *a = arg;
    const mm_http_request *q = &ex->req;
    int get = q->method_len == 3 && memcmp(q->method, "GET", 3) == 0;
    if (get && path_is(q, "/health")) {
        respond_json(ex, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    if (!authorized(a, q)) {
        mm_http_respond_error(ex, 401, NULL, "WWW-Authenticate: Bearer\r\n",
                              "admin token required (Authorization: Bearer ...)");
        return;
    }
    if (get && path_is(q, "/admin/backends")) {
        respond_json(ex, 200, backends_json(a->router));
        return;
    }
    mm_http_respond_error(ex, 404, NULL, NULL, "no admin route for %.*s %.*s",
                          (int)(q->method_len > 16 ? 16 : q->method_len), q->method,
                          (int)(q->target_len > 128 ? 128 : q->target_len), q->target);
}

int mm_admin_start(struct event_base *base, const mm_gateway_cfg *cfg, mm_router *r,
                   mm_admin **out, char *err, size_t errlen)
{
    mm_admin *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    a->cfg = cfg;
    a->router = r;
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

void mm_admin_free(mm_admin *a)
{
    if (!a)
        return;
    mm_httpd_free(a->httpd);
    free(a);
}
