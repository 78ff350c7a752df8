/* proxy.c: one client request through the gateway.
 *
 *   classify (builtin / routed by model / default pool / error)
 *   -> pick variant and backend -> forward: http:// backends over the
 *      direct HTTP/1.1 path (h1up.h), https:// over libcurl; both call the
 *      same header/body callbacks and the same completion
 *   -> relay: streamed answers (SSE, passthrough) chunk by chunk with
 *      back-pressure; non-streaming model answers buffered whole, so a cut or
 *      malformed upstream answer becomes a clean 502 instead of a truncated
 *      200.
 * A client that goes away aborts the upstream transfer at once. */
#include "proxy.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "buf.h"
#include "h1up.h"
#include "jsonscan.h"
#include "jsonutil.h"
#include "log.h"

enum { PX_IDLE = 0, PX_ATTEMPT, PX_BACKOFF, PX_QUEUED };

/* Retry budget shared by all threads: retries in flight stay under 20% of
 * requests in flight (at least 3), so a sick fleet is not hit twice as hard. */
static _Atomic long px_inflight;
static _Atomic long px_retries_inflight;

/* Stop reading from the upstream while this much is queued for the client. */
#define PX_CLIENT_HIGH_WATER (1024 * 1024)
#define PX_MAX_RESP_HEADERS (64 * 1024)
#define PX_MAX_MEMBERS 64             /* top-level fields of a routed body */

typedef struct px_req {
    mm_proxy_thread  *t;
    mm_http_exchange *ex;
    mm_router        *router;        /* referenced for the whole request */
    char              reqid[80];
    const char       *path;          /* request-target, kept as sent */
    size_t            path_len;
    int               routed;        /* body is a JSON object routed by its model */
    size_t            nmembers;
    mm_buf            scratch;       /* decoded model / sticky strings */
    mm_route         *route;         /* requested route (NULL: default pool) */
    mm_route         *variant;
    mm_pool          *pool;
    mm_backend       *backend;
    int               held;          /* backend counted as outstanding */
    uint64_t          tried[MM_POOL_MAX_BACKENDS / 64];
    char             *req_model;     /* the body's model as sent (own copy) */
    size_t            req_model_len;
    const char       *sticky;        /* sticky key, kept for fallbacks */
    size_t            sticky_len;
    char              sticky_num[32];
    const char       *fallback_name; /* set once a fallback model serves */
    mm_route         *fb_variant;    /* the variant whose fallbacks apply */
    size_t            fb_pos;        /* next fallback candidate */
    int               attempts;      /* on the current pool */
    int               retrying;      /* counted in px_retries_inflight */
    uint64_t          deadline_ns;   /* total deadline, 0 = none */
    int               phase;         /* PX_* below */
    mm_waiter         waiter;
    int               streaming;     /* the client asked "stream": true */
    int               relay;         /* send the answer as it arrives */
    mm_buf            fwd_body;      /* rewritten body; empty: send the client's */
    /* the current attempt: over libcurl (easy) or the direct path (fx) */
    CURL             *easy;
    struct curl_slist *hdrs;
    mm_h1up_xfer     *fx;
    mm_buf           *fx_head;       /* fx's request head while it is built */
    struct event     *timer;
    int               status;
    int64_t           resp_cl;
    int               headers_done;
    int               client_began;
    int               paused;
    int               timed_out;
    int               too_large;
    int               hold_error;    /* 5xx/429 answer kept for retry or pass-through */
    int               have_last;     /* resp_* hold a failed upstream answer */
    int               retry_after_ms;
    int               last_status;   /* of the last failed attempt */
    char              last_what[CURL_ERROR_SIZE + 32];
    uint64_t          attempt_ns;
    uint64_t          last_ns;
    mm_buf            resp_hdrs;     /* filtered upstream headers for the client */
    mm_buf            resp_body;     /* buffered answer */
    char              curl_err[CURL_ERROR_SIZE];
    /* observability: copies, since the exchange is gone by px_free */
    uint64_t          start_ns;
    char              method[16];
    char              peer[64];
    int               no_record;     /* builtin endpoints are not counted */
    int               sent_status;   /* status sent to the client */
    int               err_by_gateway;/* err was decided here, not by an upstream */
    mm_err_kind       err;           /* why the request failed, if it did */
    int               total_attempts;
    uint64_t          bytes_out;
    uint64_t          first_byte_ns; /* first answer byte to the client */
    uint64_t          last_event_ns; /* previous SSE event */
    int64_t           prompt_tokens, completion_tokens;
    mm_hist           itl;
    int               sse;           /* parse the stream's SSE events */
    int               strip_usage;   /* we asked for usage; the client did not */
    mm_buf            sse_buf;       /* incomplete SSE event */
    /* Not zeroed at allocation (px_new): written before they are read. */
    mm_json_member    members[PX_MAX_MEMBERS]; /* its top-level members */
    char              target[1024];
} px_req;

static const char *const px_err_names[MM_ERR__COUNT] = {
    "none", "connect", "timeout", "5xx", "429", "breaker_open", "client_abort", "midstream", "client",
};

static void px_access_log(px_req *r, uint64_t now)
{
    if (r->t->access_fd < 0)
        return;
    mm_buf b;
    mm_buf_init(&b, 16 * 1024);
    char ts[64];
    struct timespec rt;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &rt);
    gmtime_r(&rt.tv_sec, &tm);
    snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, rt.tv_nsec / 1000000L);
    mm_buf_printf(&b, "{\"time\":\"%s\",\"request_id\":", ts);
    mm_json_append_str(&b, r->reqid, strlen(r->reqid));
    mm_buf_append_str(&b, ",\"client\":");
    mm_json_append_str(&b, r->peer, strlen(r->peer));
    mm_buf_append_str(&b, ",\"method\":");
    mm_json_append_str(&b, r->method, strlen(r->method));
    mm_buf_append_str(&b, ",\"path\":");
    mm_json_append_str(&b, r->target, strlen(r->target));
    mm_buf_append_str(&b, ",\"requested_model\":");
    if (r->req_model)
        mm_json_append_str(&b, r->req_model, r->req_model_len);
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, ",\"model\":");
    if (r->variant)
        mm_json_append_str(&b, r->variant->name, strlen(r->variant->name));
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, ",\"backend\":");
    if (r->backend)
        mm_json_append_str(&b, r->backend->cfg->url, strlen(r->backend->cfg->url));
    else
        mm_buf_append_str(&b, "null");
    mm_buf_printf(&b, ",\"status\":%d,\"bytes\":%llu,\"latency_ms\":%.3f,\"ttft_ms\":", r->sent_status,
                  (unsigned long long)r->bytes_out, (double)(now - r->start_ns) / 1e6);
    if (r->first_byte_ns)
        mm_buf_printf(&b, "%.3f", (double)(r->first_byte_ns - r->start_ns) / 1e6);
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, ",\"prompt_tokens\":");
    if (r->prompt_tokens >= 0)
        mm_buf_printf(&b, "%lld", (long long)r->prompt_tokens);
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, ",\"completion_tokens\":");
    if (r->completion_tokens >= 0)
        mm_buf_printf(&b, "%lld", (long long)r->completion_tokens);
    else
        mm_buf_append_str(&b, "null");
    mm_buf_printf(&b, ",\"retries\":%d,\"fallback\":", r->total_attempts > 1 ? r->total_attempts - 1 : 0);
    if (r->fallback_name)
        mm_json_append_str(&b, r->fallback_name, strlen(r->fallback_name));
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, ",\"error\":");
    if (r->err != MM_ERR_NONE)
        mm_buf_printf(&b, "\"%s\"", px_err_names[r->err]);
    else
        mm_buf_append_str(&b, "null");
    mm_buf_append_str(&b, "}\n");
    /* One write per line: lines from several threads never interleave. */
    ssize_t w = write(r->t->access_fd, b.data, b.len);
    (void)w;
    mm_buf_free(&b);
}

static void px_record(px_req *r)
{
    if (r->no_record || !r->t->metrics)
        return;
    uint64_t now = mm_now_ns();
    mm_request_record rec = {
        .model = r->req_model ? r->req_model : "",
        .variant = r->variant ? r->variant->name : "",
        .backend = r->backend ? r->backend->cfg->url : "",
        .status = r->sent_status,
        .err = r->err,
        .retries = r->total_attempts > 1 ? r->total_attempts - 1 : 0,
        .fallback = r->fallback_name != NULL,
        .prompt_tokens = r->prompt_tokens,
        .completion_tokens = r->completion_tokens,
        .latency_us = (now - r->start_ns) / 1000,
        .ttft_us = r->first_byte_ns ? (r->first_byte_ns - r->start_ns) / 1000 : 0,
        .itl = r->itl.count ? &r->itl : NULL,
    };
    /* Gateway-side failures count once per request; upstream failures were
     * counted per attempt against their backend (px_attempt_error). */
    if (!r->err_by_gateway)
        rec.err = MM_ERR_NONE;
    mm_metrics_record(r->t->metrics, &rec);
    px_access_log(r, now);
}

static void px_free(px_req *r)
{
    if (!r)
        return;
    px_record(r);
    mm_router_unref(r->router);
    mm_buf_free(&r->sse_buf);
    if (r->pool && r->waiter.queued)
        mm_pool_dequeue(r->pool, &r->waiter);
    if (r->waiter.wake)
        event_free(r->waiter.wake);
    if (r->retrying)
        px_retries_inflight--;
    px_inflight--;
    if (r->timer)
        event_free(r->timer);
    if (r->hdrs)
        curl_slist_free_all(r->hdrs);
    mm_buf_free(&r->scratch);
    free(r->req_model);
    mm_buf_free(&r->fwd_body);
    mm_buf_free(&r->resp_hdrs);
    mm_buf_free(&r->resp_body);
    free(r);
}

/* A failed attempt counts against its backend in errors_total. */
static void px_attempt_error(px_req *r, mm_err_kind k)
{
    r->err = k;
    if (!r->t->metrics || r->no_record)
        return;
    mm_request_record rec = {
        .model = r->req_model ? r->req_model : "",
        .variant = r->variant ? r->variant->name : "",
        .backend = r->backend ? r->backend->cfg->url : "",
        .err = k,
        .attempt_only = 1,
    };
    mm_metrics_record(r->t->metrics, &rec);
}

static int ieq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    return alen == blen && strncasecmp(a, b, alen) == 0;
}

/* Our own headers on every answer; also notes what was sent. */
static void px_our_headers(px_req *r, mm_buf *out, int status)
{
    r->sent_status = status;
    if (!r->first_byte_ns)
        r->first_byte_ns = mm_now_ns();
    /* Plain appends: this runs for every answer, printf is measurably slow. */
    mm_buf_append_str(out, "x-request-id: ");
    mm_buf_append_str(out, r->reqid);
    if (r->variant) {
        mm_buf_append_str(out, "\r\nx-modelmux-model: ");
        mm_buf_append_str(out, r->variant->name);
    }
    if (r->backend) {
        mm_buf_append_str(out, "\r\nx-modelmux-backend: ");
        mm_buf_append_str(out, r->backend->cfg->url);
    }
    if (r->fallback_name) {
        mm_buf_append_str(out, "\r\nx-modelmux-fallback: ");
        mm_buf_append_str(out, r->fallback_name);
    }
    mm_buf_append_str(out, "\r\n");
}

static void px_error(px_req *r, int status, const char *param, const char *msg)
{
    mm_buf h;
    mm_buf_init(&h, 8192);
    px_our_headers(r, &h, status);
    if (status < 500 && status != 429 && r->err == MM_ERR_NONE) {
        r->err = MM_ERR_CLIENT;
        r->err_by_gateway = 1;
    }
    mm_http_respond_error(r->ex, status, param, mm_buf_cstr(&h), "%s", msg);
    mm_buf_free(&h);
}

/* ---- upstream attempt ---- */

static void px_release_attempt(px_req *r, int cancel, mm_outcome o)
{
    if (r->timer)
        evtimer_del(r->timer);
    if (r->easy) {
        if (cancel)
            mm_upstream_cancel(r->t->up, r->easy);
        else
            mm_upstream_recycle(r->t->up, r->easy);
        r->easy = NULL;
    }
    if (r->fx) {
        if (cancel)
            mm_h1up_cancel(r->fx);
        else
            mm_h1up_release(r->fx);
        r->fx = NULL;
        r->fx_head = NULL;
    }
    if (r->hdrs) {
        curl_slist_free_all(r->hdrs);
        r->hdrs = NULL;
    }
    if (r->held) {
        r->held = 0;
        mm_pool_release(r->pool, r->backend, o,
                        o == MM_OUTCOME_HTTP_FAIL ? r->retry_after_ms : 0, mm_now_ms());
    }
    r->phase = PX_IDLE;
}

static void px_begin_client(px_req *r)
{
    if (r->client_began)
        return;
    r->client_began = 1;
    mm_buf h;
    mm_buf_init(&h, PX_MAX_RESP_HEADERS + 8192);
    mm_buf_append(&h, r->resp_hdrs.data, r->resp_hdrs.len);
    px_our_headers(r, &h, r->status);
    mm_http_begin(r->ex, r->status, mm_buf_cstr(&h), r->resp_cl);
    mm_buf_free(&h);
}

/* The request has failed for good (no retry, no fallback left), before or
 * after the first byte reached the client. */
static void px_fail(px_req *r, int status, const char *what)
{
    r->ex->on_abort = NULL;
    if (!r->client_began && r->have_last) {
        /* The last upstream's own error answer (e.g. its 429 with
         * Retry-After) tells the client more than a generic 502. */
        mm_buf h;
        mm_buf_init(&h, PX_MAX_RESP_HEADERS + 8192);
        mm_buf_append(&h, r->resp_hdrs.data, r->resp_hdrs.len);
        px_our_headers(r, &h, r->status);
        mm_http_respond(r->ex, r->status, mm_buf_cstr(&h), r->resp_body.data, r->resp_body.len);
        mm_buf_free(&h);
    } else if (!r->client_began) {
        char msg[512];
        snprintf(msg, sizeof msg, "upstream %s: %s", r->backend ? r->backend->cfg->url : "?", what);
        px_error(r, status, NULL, msg);
    } else if (r->streaming) {
        /* Mid-stream: one SSE error event, then a clean end of the chunked
         * body; never a made-up [DONE]. */
        mm_buf ev;
        mm_buf_init(&ev, 4096);
        mm_buf_append_str(&ev, "data: ");
        char msg[512];
        snprintf(msg, sizeof msg, "upstream failed mid-stream: %s", what);
        mm_oai_error_body(&ev, status, NULL, msg);
        mm_buf_append_str(&ev, "\n\n");
        mm_http_write(r->ex, ev.data, ev.len);
        mm_buf_free(&ev);
        mm_http_end(r->ex);
    } else {
        mm_http_abort(r->ex);
    }
    px_free(r);
}

static void px_start_attempt(px_req *r);

/* Next fallback model, if any: the variant's own list, then the requested
 * (split) route's. Switches r to it and returns 1. */
static int px_switch_fallback(px_req *r)
{
    if (!r->route)
        return 0;
    const mm_model_cfg *first = r->route->cfg;
    for (;;) {
        const mm_model_cfg *vc = r->fb_variant ? r->fb_variant->cfg : first;
        size_t nv = vc->nfallback, nr = vc == first ? 0 : first->nfallback;
        if (r->fb_pos >= nv + nr)
            return 0;
        const char *name = r->fb_pos < nv ? vc->fallback[r->fb_pos] : first->fallback[r->fb_pos - nv];
        r->fb_pos++;
        mm_route *rt = mm_router_find(r->router, name, strlen(name));
        mm_route *v = rt ? mm_route_pick_variant(rt, r->sticky, r->sticky_len, &r->t->rng) : NULL;
        if (!v || v->pool == r->pool)
            continue;
        r->fallback_name = rt->name;
        r->variant = v;
        r->pool = v->pool;
        memset(r->tried, 0, sizeof r->tried);
        r->attempts = 0;
        return 1;
    }
}

static int px_method_idempotent(const mm_http_request *q)
{
    static const char *const m[] = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"};
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
        if (ieq(q->method, q->method_len, m[i]))
            return 1;
    return 0;
}

/* An attempt failed before anything reached the client (its backend is
 * already released). Retry on another backend, else fall back, else fail.
 * nothing_sent: the upstream cannot have acted on the request (connect
 * failed), which makes even a non-idempotent passthrough safe to retry. */
static void px_after_failure(px_req *r, int status, const char *what, int nothing_sent,
                             int conn_level)
{
    const mm_model_cfg *mc = r->pool->cfg;
    /* Model requests are safe to retry until the first byte: nothing was
     * generated for the client. Passthrough follows HTTP idempotence. */
    int safe = r->route || nothing_sent || px_method_idempotent(&r->ex->req);
    int retry = safe && r->attempts <= mc->retries;
    if (retry && r->deadline_ns && mm_now_ns() >= r->deadline_ns)
        retry = 0;
    /* The budget protects overloaded backends (5xx, 429, timeouts) from a
     * retry storm. A connection that was refused or reset is a dead server,
     * not a busy one: its requests are retried whatever the budget, or a
     * crash would fail every request it had in flight. */
    if (retry && !r->retrying && !conn_level) {
        long inflight = px_inflight, budget = inflight / 5;
        if (budget < 3)
            budget = 3;
        if (px_retries_inflight >= budget)
            retry = 0;
        else {
            r->retrying = 1;
            px_retries_inflight++;
        }
    }
    /* Jittered exponential backoff: 5, 10, 20 ... ms (cap 100), 50-100%. */
    uint64_t base = 5ull << (r->attempts > 5 ? 5 : r->attempts - 1);
    if (base > 100)
        base = 100;
    uint64_t backoff_ms = base / 2 + mm_rng_next(&r->t->rng) % (base / 2 + 1);
    if (retry && r->deadline_ns && mm_now_ns() + backoff_ms * 1000000ull >= r->deadline_ns)
        retry = 0;
    mm_debug("request %s: attempt %d on %s failed (%s)%s", r->reqid, r->attempts,
             r->backend ? r->backend->cfg->url : "?", what, retry ? ", retrying" : "");
    if (retry) {
        r->phase = PX_BACKOFF;
        struct timeval tv = {0, (suseconds_t)(backoff_ms * 1000)};
        evtimer_add(r->timer, &tv);
        return;
    }
    if (safe && px_switch_fallback(r)) {
        px_start_attempt(r);
        return;
    }
    px_fail(r, status, what);
}

static void px_arm_timer(px_req *r);

static size_t px_on_header(char *p, size_t size, size_t nmemb, void *ud)
{
    px_req *r = ud;
    size_t len = size * nmemb;
    size_t l = len;
    while (l > 0 && (p[l - 1] == '\n' || p[l - 1] == '\r'))
        l--;
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        /* A new status line (also after a 100 Continue): start over. */
        const char *sp = memchr(p, ' ', l);
        r->status = 0;
        if (sp && (size_t)(sp - p) + 4 <= l && isdigit((unsigned char)sp[1]) &&
            isdigit((unsigned char)sp[2]) && isdigit((unsigned char)sp[3]))
            r->status = (sp[1] - '0') * 100 + (sp[2] - '0') * 10 + (sp[3] - '0');
        r->resp_cl = -1;
        mm_buf_reset(&r->resp_hdrs);
        return len;
    }
    if (l == 0) {
        if (r->status >= 200) {
            r->headers_done = 1;
            r->last_ns = mm_now_ns();
            /* A failed answer is held back: it may still be retried
             * elsewhere, or passed through whole at the end. */
            r->hold_error = r->status >= 500 || r->status == 429;
            /* From now on the idle timeout applies, which may be sooner
             * than the first-byte deadline the timer is set for. Cannot
             * fire here: last_ns is now. */
            evtimer_del(r->timer);
            px_arm_timer(r);
            if (r->relay && !r->hold_error)
                px_begin_client(r);
        }
        return len;
    }
    const char *colon = memchr(p, ':', l);
    if (!colon)
        return len;
    size_t nlen = (size_t)(colon - p);
    const char *v = colon + 1;
    while (v < p + l && (*v == ' ' || *v == '\t'))
        v++;
    size_t vlen = (size_t)(p + l - v);
    if (ieq(p, nlen, "retry-after")) {
        char tmp[64];
        if (vlen > 0 && vlen < sizeof tmp) {
            memcpy(tmp, v, vlen);
            tmp[vlen] = '\0';
            char *end;
            long secs = strtol(tmp, &end, 10);
            if (*end != '\0' || end == tmp) {
                /* RFC 9110 also allows an HTTP-date. */
                time_t when = curl_getdate(tmp, NULL);
                secs = when > 0 ? (long)(when - time(NULL)) : -1;
                if (when > 0 && secs <= 0)
                    secs = 0;
            }
            if (secs >= 0)
                r->retry_after_ms = (int)(secs > 3600 ? 3600000 : secs * 1000);
        }
    }
    if (ieq(p, nlen, "content-length")) {
        char tmp[32];
        if (vlen < sizeof tmp) {
            memcpy(tmp, v, vlen);
            tmp[vlen] = '\0';
            char *end;
            long long cl = strtoll(tmp, &end, 10);
            if (*end == '\0' && cl >= 0)
                r->resp_cl = cl;
        }
        return len;
    }
    /* Hop-by-hop headers describe the upstream connection, not the answer. */
    if (ieq(p, nlen, "connection") || ieq(p, nlen, "keep-alive") ||
        ieq(p, nlen, "transfer-encoding") || ieq(p, nlen, "te") || ieq(p, nlen, "trailer") ||
        ieq(p, nlen, "upgrade") || ieq(p, nlen, "proxy-connection") ||
        ieq(p, nlen, "x-request-id") || (nlen > 11 && strncasecmp(p, "x-modelmux-", 11) == 0))
        return len;
    if (mm_buf_append(&r->resp_hdrs, p, l) || mm_buf_append(&r->resp_hdrs, "\r\n", 2))
        return 0; /* header section too large: abort -> 502 */
    return len;
}

/* The integer value of "key" directly inside the object text o[0..n), or
 * -1. The object is already known to be valid JSON. */
static int64_t px_usage_field(const char *o, size_t n, const char *key)
{
    size_t vs, ve;
    if (mm_json_top_value_span(o, n, key, &vs, &ve) != 0 || vs >= ve)
        return -1;
    int64_t v = 0;
    for (size_t i = vs; i < ve; i++) {
        if (o[i] < '0' || o[i] > '9' || v > (INT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (o[i] - '0');
    }
    return v;
}

/* Read prompt/completion tokens from the top-level usage object of a JSON
 * text. A scan, not a parse: this runs for every answer. */
static void px_usage_from_json(px_req *r, const char *text, size_t len)
{
    size_t vs, ve;
    if (mm_json_top_value_span(text, len, "usage", &vs, &ve) != 0 || text[vs] != '{')
        return;
    int64_t pt = px_usage_field(text + vs, ve - vs, "prompt_tokens");
    int64_t ct = px_usage_field(text + vs, ve - vs, "completion_tokens");
    if (pt >= 0)
        r->prompt_tokens = pt;
    if (ct >= 0)
        r->completion_tokens = ct;
}

/* One complete SSE event (with its blank line). Returns 1 to forward it. */
static int px_sse_event(px_req *r, const char *ev, size_t n)
{
    static const char key[] = "\"usage\":";
    const char *data = n >= 6 && memcmp(ev, "data: ", 6) == 0 ? ev + 6 : NULL;
    if (!data)
        return 1;
    const char *u = memmem(data, n - 6, key, sizeof key - 1);
    if (!u)
        return 1;
    const char *v = u + sizeof key - 1;
    while (v < ev + n && *v == ' ')
        v++;
    if ((size_t)(ev + n - v) >= 4 && memcmp(v, "null", 4) == 0)
        return 1;
    px_usage_from_json(r, data, n - 6);
    if (!r->strip_usage)
        return 1;
    /* The usage-only chunk we asked for on the client's behalf. */
    json_t *j = json_loadb(data, n - 6, 0, NULL);
    json_t *ch = json_object_get(j, "choices");
    int usage_only = json_is_array(ch) && json_array_size(ch) == 0;
    json_decref(j);
    return !usage_only;
}

/* Split the stream into SSE events so usage can be read (and our own usage
 * chunk dropped) and inter-token times measured. Whole events pass at once;
 * only a partial event waits for its end. */
static void px_sse_feed(px_req *r, const char *p, size_t len)
{
    if (mm_buf_append(&r->sse_buf, p, len) != 0) {
        /* An event over the cap: stop parsing, relay bytes as they are. */
        r->sse = 0;
        mm_http_write(r->ex, r->sse_buf.data, r->sse_buf.len);
        mm_http_write(r->ex, p, len);
        mm_buf_reset(&r->sse_buf);
        return;
    }
    size_t start = 0, i = 0;
    char *b = r->sse_buf.data;
    while (i + 1 < r->sse_buf.len) {
        if (b[i] == '\n' && b[i + 1] == '\n') {
            size_t end = i + 2;
            if (px_sse_event(r, b + start, end - start)) {
                uint64_t now = mm_now_ns();
                if (r->last_event_ns)
                    mm_hist_observe(&r->itl, (now - r->last_event_ns) / 1000);
                r->last_event_ns = now;
                mm_http_write(r->ex, b + start, end - start);
            }
            start = i = end;
            continue;
        }
        i++;
    }
    mm_buf_consume(&r->sse_buf, start);
}

static size_t px_on_write(char *p, size_t size, size_t nmemb, void *ud)
{
    px_req *r = ud;
    size_t len = size * nmemb;
    r->last_ns = mm_now_ns();
    if (r->relay && !r->hold_error) {
        px_begin_client(r);
        if (mm_http_pending(r->ex) > PX_CLIENT_HIGH_WATER) {
            /* The client reads slower than the upstream writes: stop reading
             * upstream until the client drains (on_drain resumes). */
            r->paused = 1;
            return CURL_WRITEFUNC_PAUSE;
        }
        if (r->sse)
            px_sse_feed(r, p, len);
        else
            mm_http_write(r->ex, p, len);
        return len;
    }
    if (mm_buf_append(&r->resp_body, p, len) != 0) {
        r->too_large = 1;
        return 0;
    }
    return len;
}

static void px_on_drain(mm_http_exchange *ex, void *udata)
{
    px_req *r = udata;
    (void)ex;
    if (r->paused && r->easy) {
        r->paused = 0;
        curl_easy_pause(r->easy, CURLPAUSE_CONT);
    } else if (r->paused && r->fx) {
        r->paused = 0;
        mm_h1up_resume(r->fx);
    }
}

static void px_on_client_abort(mm_http_exchange *ex, void *udata)
{
    px_req *r = udata;
    (void)ex;
    r->err = MM_ERR_CLIENT_ABORT;
    r->err_by_gateway = 1;
    px_release_attempt(r, 1, MM_OUTCOME_CANCEL);
    px_free(r);
}

static void px_respond_busy(px_req *r, const char *why);

static void px_on_timer(evutil_socket_t fd, short what, void *arg)
{
    px_req *r = arg;
    (void)fd;
    (void)what;
    switch (r->phase) {
    case PX_ATTEMPT:
        px_arm_timer(r);
        break;
    case PX_BACKOFF:
        r->phase = PX_IDLE;
        px_start_attempt(r);
        break;
    case PX_QUEUED:
        mm_pool_dequeue(r->pool, &r->waiter);
        r->phase = PX_IDLE;
        px_respond_busy(r, "timed out waiting in the queue");
        break;
    default:
        break;
    }
}

/* A queued request was handed a free slot (possibly by another thread). */
static void px_on_wake(evutil_socket_t fd, short what, void *arg)
{
    px_req *r = arg;
    (void)fd;
    (void)what;
    if (r->phase != PX_QUEUED)
        return;
    evtimer_del(r->timer);
    r->phase = PX_IDLE;
    px_start_attempt(r);
}

/* (Re)arm the attempt's timer for the nearest of first-byte and idle
 * deadlines; fire the timeout when it has passed. Cheaper than re-arming on
 * every chunk: data only records last_ns. */
static void px_arm_timer(px_req *r)
{
    const mm_timeouts_cfg *to = &r->backend->cfg->timeouts;
    uint64_t now = mm_now_ns(), deadline = 0;
    if (!r->headers_done && to->first_byte_ms > 0)
        deadline = r->attempt_ns + (uint64_t)to->first_byte_ms * 1000000ull;
    else if (r->headers_done && to->idle_ms > 0 && !r->paused)
        deadline = r->last_ns + (uint64_t)to->idle_ms * 1000000ull;
    else if (r->headers_done && to->idle_ms > 0)
        deadline = now + (uint64_t)to->idle_ms * 1000000ull; /* slow client, not upstream */
    /* The request's total deadline bounds every attempt until its answer
     * has begun (after that, total_ms is curl's CURLOPT_TIMEOUT_MS). */
    if (r->deadline_ns && !r->client_began && (!deadline || r->deadline_ns < deadline))
        deadline = r->deadline_ns;
    if (!deadline)
        return;
    if (now >= deadline) {
        const char *what = r->headers_done ? "idle timeout between chunks"
                                           : "no response before the first-byte timeout";
        r->timed_out = 1;
        r->have_last = 0;
        r->last_status = 504;
        snprintf(r->last_what, sizeof r->last_what, "%s", what);
        px_attempt_error(r, r->client_began ? MM_ERR_MIDSTREAM : MM_ERR_TIMEOUT);
        px_release_attempt(r, 1, MM_OUTCOME_CONN_FAIL);
        if (r->client_began)
            px_fail(r, 504, what);
        else
            px_after_failure(r, 504, what, 0, 0);
        return;
    }
    uint64_t left = deadline - now;
    struct timeval tv = {(time_t)(left / 1000000000ull), (suseconds_t)(left % 1000000000ull / 1000)};
    evtimer_add(r->timer, &tv);
}

static void px_respond_busy(px_req *r, const char *why)
{
    char msg[512];
    snprintf(msg, sizeof msg, "model %s is at capacity: %s", r->variant ? r->variant->name : "(default pool)", why);
    mm_buf h;
    mm_buf_init(&h, 8192);
    px_our_headers(r, &h, 429);
    r->err = MM_ERR_429;
    r->err_by_gateway = 1;
    mm_buf_append_str(&h, "Retry-After: 1\r\n");
    r->ex->on_abort = NULL;
    mm_http_respond_error(r->ex, 429, NULL, mm_buf_cstr(&h), "%s", msg);
    mm_buf_free(&h);
    px_free(r);
}

/* No backend could take the attempt: queue, fall back, or answer now. */
static void px_no_backend(px_req *r, const mm_pick_info *info)
{
    const mm_model_cfg *mc = r->pool->cfg;
    if (info->busy && mc->max_queue > 0 && r->phase != PX_QUEUED) {
        if (!r->waiter.wake)
            r->waiter.wake = event_new(r->t->base, -1, 0, px_on_wake, r);
        if (r->waiter.wake && mm_pool_enqueue(r->pool, &r->waiter) == 0) {
            r->phase = PX_QUEUED;
            int ms = mc->queue_timeout_ms;
            if (ms > 0) { /* 0: wait as long as the client does */
                struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
                evtimer_add(r->timer, &tv);
            }
            return;
        }
    }
    if (px_switch_fallback(r)) {
        px_start_attempt(r);
        return;
    }
    if (r->have_last || (info->untried == 0 && r->attempts > 0)) {
        px_fail(r, r->last_status ? r->last_status : 502, r->last_what);
        return;
    }
    if (info->busy) {
        px_respond_busy(r, mc->max_queue > 0 ? "the queue is full" : "every backend is at max_requests");
        return;
    }
    /* Everything is down, open or cooling: say when to come back instead of
     * letting the client wait for timeouts. */
    uint64_t now = mm_now_ms();
    uint64_t secs = info->retry_at_ms > now ? (info->retry_at_ms - now + 999) / 1000 : 1;
    char hdr[64], msg[512];
    snprintf(hdr, sizeof hdr, "Retry-After: %llu\r\n", (unsigned long long)(secs ? secs : 1));
    snprintf(msg, sizeof msg, "no backend available for model %s (all down or circuit open)",
             r->variant ? r->variant->name : "(default pool)");
    mm_buf h;
    mm_buf_init(&h, 8192);
    px_our_headers(r, &h, 503);
    r->err = MM_ERR_BREAKER_OPEN;
    r->err_by_gateway = 1;
    mm_buf_append_str(&h, hdr);
    r->ex->on_abort = NULL;
    mm_http_respond_error(r->ex, 503, NULL, mm_buf_cstr(&h), "%s", msg);
    mm_buf_free(&h);
    px_free(r);
}

static int px_add_header(px_req *r, const char *name, size_t nlen, const char *val, size_t vlen)
{
    if (r->fx_head) {
        /* The direct path: straight into the request head. */
        mm_buf *h = r->fx_head;
        if (mm_buf_append(h, name, nlen) || mm_buf_append(h, ": ", 2) ||
            mm_buf_append(h, val, vlen) || mm_buf_append(h, "\r\n", 2))
            return -E2BIG;
        return 0;
    }
    char line[8192 + 256];
    if (nlen + vlen + 3 > sizeof line)
        return -E2BIG;
    memcpy(line, name, nlen);
    size_t k = nlen;
    if (vlen == 0) {
        line[k++] = ';'; /* curl: "Name;" sends an empty header, "Name:" deletes it */
    } else {
        line[k++] = ':';
        line[k++] = ' ';
        memcpy(line + k, val, vlen);
        k += vlen;
    }
    line[k] = '\0';
    struct curl_slist *n = curl_slist_append(r->hdrs, line);
    if (!n)
        return -ENOMEM;
    r->hdrs = n;
    return 0;
}

static int px_build_headers(px_req *r)
{
    const mm_http_request *q = &r->ex->req;
    const mm_backend_cfg *b = r->backend->cfg;
    int rc = 0, saw_accept = 0;
    const mm_http_header *xff = NULL;
    for (size_t i = 0; i < q->nheaders && rc == 0; i++) {
        const mm_http_header *h = &q->headers[i];
        if (ieq(h->name, h->name_len, "connection") || ieq(h->name, h->name_len, "keep-alive") ||
            ieq(h->name, h->name_len, "proxy-connection") || ieq(h->name, h->name_len, "te") ||
            ieq(h->name, h->name_len, "trailer") || ieq(h->name, h->name_len, "upgrade") ||
            ieq(h->name, h->name_len, "transfer-encoding") ||
            ieq(h->name, h->name_len, "content-length") || ieq(h->name, h->name_len, "host") ||
            ieq(h->name, h->name_len, "expect") || ieq(h->name, h->name_len, "x-request-id"))
            continue;
        if (ieq(h->name, h->name_len, "x-forwarded-for")) {
            xff = h;
            continue;
        }
        if (b->api_key && ieq(h->name, h->name_len, "authorization"))
            continue;
        if (ieq(h->name, h->name_len, "accept"))
            saw_accept = 1;
        rc = px_add_header(r, h->name, h->name_len, h->value, h->value_len);
    }
    char tmp[8192];
    const char *peer = r->ex->peer;
    const char *colon = strrchr(peer, ':');
    size_t iplen = colon ? (size_t)(colon - peer) : strlen(peer);
    int n;
    size_t xl = 0;
    if (xff) {
        /* peer is at most 63 bytes: "<= 4096, peer" fits tmp. */
        xl = xff->value_len < 4096 ? xff->value_len : 4096;
        memcpy(tmp, xff->value, xl);
        memcpy(tmp + xl, ", ", 2);
        xl += 2;
    }
    if (iplen > 64)
        iplen = 64;
    memcpy(tmp + xl, peer, iplen);
    if (rc == 0)
        rc = px_add_header(r, "X-Forwarded-For", 15, tmp, xl + iplen);
    if (rc == 0)
        rc = px_add_header(r, "x-request-id", 12, r->reqid, strlen(r->reqid));
    if (rc == 0 && b->api_key) {
        n = snprintf(tmp, sizeof tmp, "Bearer %s", b->api_key);
        rc = px_add_header(r, "Authorization", 13, tmp, (size_t)n);
    }
    if (r->fx_head)
        return rc;
    /* curl would add "Expect: 100-continue" for large bodies (a round trip
     * for nothing) and a default Accept header the client never sent. */
    if (rc == 0) {
        struct curl_slist *s = curl_slist_append(r->hdrs, "Expect:");
        rc = s ? 0 : -ENOMEM;
        r->hdrs = s ? s : r->hdrs;
    }
    if (rc == 0 && !saw_accept) {
        struct curl_slist *s = curl_slist_append(r->hdrs, "Accept:");
        rc = s ? 0 : -ENOMEM;
        r->hdrs = s ? s : r->hdrs;
    }
    return rc;
}

/* The body for this backend: the client's bytes, with the model field
 * replaced when the backend serves it under another name. */
typedef struct px_edit {
    size_t      start, end;  /* bytes of the client's body replaced */
    const char *text;
    int         quote;       /* write text as a JSON string */
} px_edit;

/* Append src[from..to) to the forwarded body. */
static int px_copy(px_req *r, const char *src, size_t from, size_t to)
{
    return to > from ? mm_buf_append(&r->fwd_body, src + from, to - from) : 0;
}

/* The body for this backend: the client's bytes, with the model value
 * spliced when the backend serves another name, and include_usage added to
 * streams. Every other byte stays as the client sent it. */
static int px_body_for_backend(px_req *r, const char **body, size_t *len)
{
    const mm_backend_cfg *b = r->backend->cfg;
    const char *src = r->ex->body.data;
    size_t n = r->ex->body.len;
    *body = src;
    *len = n;
    if (!r->routed)
        return 0;
    /* The name the backend serves: its served_model, else the name of the
     * model whose pool it is in (a split variant or a fallback). */
    const char *want = b->served_model ? b->served_model : r->variant->name;
    int rename = !(r->req_model && strlen(want) == r->req_model_len &&
                   memcmp(want, r->req_model, r->req_model_len) == 0);
    const mm_json_member *so = mm_json_find(r->members, r->nmembers, "stream_options");
    if (!rename && !r->strip_usage)
        return 0;
    /* Edits, in body order: [start, end) replaced by text. */
    px_edit ed[2];
    int ne = 0;
    const mm_json_member *mm = mm_json_find(r->members, r->nmembers, "model");
    size_t model_at = mm ? (size_t)(mm->val - src) : 0;
    if (rename && mm)
        ed[ne++] = (px_edit){model_at, model_at + mm->val_len, want, 1};
    if (r->strip_usage) {
        if (!so) {
            /* Before the closing brace of the top-level object. */
            size_t close = n;
            while (close > 0 && src[close - 1] != '}')
                close--;
            ed[ne++] = (px_edit){close - 1, close - 1, ",\"stream_options\":{\"include_usage\":true}", 0};
        } else {
            size_t at = (size_t)(so->val - src);
            if (so->type != 'o') {
                ed[ne++] = (px_edit){at, at + so->val_len, "{\"include_usage\":true}", 0};
            } else {
                mm_json_member in[16];
                size_t nin = 0;
                mm_json_scan(so->val, so->val_len, in, 16, &nin, NULL, 0);
                const mm_json_member *iu = mm_json_find(in, nin < 16 ? nin : 16, "include_usage");
                if (iu) {
                    size_t ia = (size_t)(iu->val - src);
                    ed[ne++] = (px_edit){ia, ia + iu->val_len, "true", 0};
                } else {
                    ed[ne++] = (px_edit){at + 1, at + 1,
                                               nin ? "\"include_usage\":true," : "\"include_usage\":true", 0};
                }
            }
        }
    }
    if (ne == 2 && ed[1].start < ed[0].start) {
        px_edit t = ed[0];
        ed[0] = ed[1];
        ed[1] = t;
    }
    mm_buf_reset(&r->fwd_body);
    size_t pos = 0;
    int rc = 0;
    for (int k = 0; k < ne && rc == 0; k++) {
        rc = px_copy(r, src, pos, ed[k].start);
        if (rc == 0)
            rc = ed[k].quote ? mm_json_append_str(&r->fwd_body, ed[k].text, strlen(ed[k].text))
                             : mm_buf_append_str(&r->fwd_body, ed[k].text);
        pos = ed[k].end;
    }
    if (rc == 0)
        rc = px_copy(r, src, pos, n);
    if (rc)
        return rc;
    *body = r->fwd_body.data;
    *len = r->fwd_body.len;
    return 0;
}

/* An attempt that cannot go out ends the request: give the backend's slot
 * back and answer status with msg. */
static void px_attempt_fail(px_req *r, int status, const char *msg)
{
    px_release_attempt(r, 0, MM_OUTCOME_CANCEL);
    r->ex->on_abort = NULL;
    px_error(r, status, NULL, msg);
    px_free(r);
}

static void px_attempt_oom(px_req *r) { px_attempt_fail(r, 500, "out of memory"); }

/* Stamp the attempt's start, just before the transport takes it. */
static void px_attempt_stamp(px_req *r)
{
    r->curl_err[0] = '\0';
    r->attempt_ns = mm_now_ns();
    r->last_ns = r->attempt_ns;
}

/* After the transport took the attempt (rc 0) arm its timer, else end the
 * request. */
static void px_attempt_launched(px_req *r, int rc)
{
    if (rc != 0)
        px_attempt_fail(r, 500, "cannot start upstream transfer");
    else
        px_arm_timer(r);
}

/* The whole-transfer limit for this attempt in ms, 0 for none: what is left
 * of the request's deadline, else the backend's total_ms. */
static long px_total_ms(const px_req *r, const mm_backend *b)
{
    if (r->deadline_ns) {
        uint64_t now = mm_now_ns();
        long left = r->deadline_ns > now ? (long)((r->deadline_ns - now) / 1000000ull) : 1;
        return left > 0 ? left : 1L;
    }
    return b->cfg->timeouts.total_ms > 0 ? (long)b->cfg->timeouts.total_ms : 0;
}

static int px_append_u64(mm_buf *h, uint64_t v)
{
    char d[24];
    size_t i = sizeof d;
    do {
        d[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return mm_buf_append(h, d + i, sizeof d - i);
}

/* Build the request head ourselves and hand it to the direct path. Same
 * request as the libcurl path sends: the client's headers filtered the same
 * way, Host from the backend url, a Content-Length unless GET without a
 * body or HEAD (curl's HTTPGET / NOBODY). */
static void px_start_direct(px_req *r, const char *body, size_t blen)
{
    const mm_http_request *q = &r->ex->req;
    const mm_backend_cfg *b = r->backend->cfg;
    mm_h1up *h = mm_upstream_h1(r->t->up);
    mm_h1up_xfer *x = h ? mm_h1up_xfer_get(h) : NULL;
    if (!x) {
        px_attempt_oom(r);
        return;
    }
    r->fx = x;
    mm_buf *hb = r->fx_head = mm_h1up_head(x);
    int head = ieq(q->method, q->method_len, "HEAD");
    int nobody = head || (blen == 0 && ieq(q->method, q->method_len, "GET"));
    size_t alen;
    const char *auth = mm_h1up_authority(b->url, &alen);
    int rc = mm_buf_append(hb, q->method, q->method_len) || mm_buf_append(hb, " ", 1) ||
             mm_buf_append_str(hb, auth + alen) || mm_buf_append(hb, r->path, r->path_len) ||
             mm_buf_append(hb, " HTTP/1.1\r\nHost: ", 17) || mm_buf_append(hb, auth, alen) ||
             mm_buf_append(hb, "\r\n", 2);
    if (!rc)
        rc = px_build_headers(r);
    if (!rc && !nobody)
        rc = mm_buf_append(hb, "Content-Length: ", 16) || px_append_u64(hb, blen) ||
             mm_buf_append(hb, "\r\n", 2);
    if (!rc)
        rc = mm_buf_append(hb, "\r\n", 2);
    r->fx_head = NULL;
    if (rc) {
        px_attempt_oom(r);
        return;
    }
    mm_h1up_req rq = {
        .url = b->url,
        .body = nobody ? NULL : body,
        .body_len = nobody ? 0 : blen,
        .head_only = head,
        .connect_ms = b->timeouts.connect_ms > 0 ? (long)b->timeouts.connect_ms : 0,
        .timeout_ms = px_total_ms(r, r->backend),
        .on_header = px_on_header,
        .on_data = px_on_write,
        .ud = r,
        .errbuf = r->curl_err,
    };
    px_attempt_stamp(r);
    px_attempt_launched(r, mm_h1up_start(x, &rq, r));
}

static void px_start_attempt(px_req *r)
{
    mm_pick_info info;
    mm_backend *b = mm_pool_pick(r->pool, r->tried, mm_now_ms(), &info);
    if (!b) {
        px_no_backend(r, &info);
        return;
    }
    r->attempts++;
    r->total_attempts++;
    r->phase = PX_ATTEMPT;
    r->have_last = 0;
    r->hold_error = 0;
    r->retry_after_ms = 0;
    r->too_large = 0;
    r->backend = b;
    r->held = 1;
    r->tried[b->index / 64] |= 1ull << (b->index % 64);
    r->status = 0;
    r->resp_cl = -1;
    r->headers_done = 0;
    r->paused = 0;
    mm_buf_reset(&r->resp_hdrs);
    mm_buf_reset(&r->resp_body);
    const char *body;
    size_t blen;
    char url[4096];
    size_t ulen = strlen(b->cfg->url);
    if (ulen + r->path_len >= sizeof url) {
        px_attempt_fail(r, 414, "request target too long");
        return;
    }
    if (px_body_for_backend(r, &body, &blen)) {
        px_attempt_oom(r);
        return;
    }
    /* Plain http with an origin-form target: the direct path (h1up.h). */
    if (mm_h1up_url_ok(b->cfg->url) && r->path_len && r->path[0] == '/') {
        px_start_direct(r, body, blen);
        return;
    }
    memcpy(url, b->cfg->url, ulen);
    memcpy(url + ulen, r->path, r->path_len);
    url[ulen + r->path_len] = '\0';
    if (px_build_headers(r)) {
        px_attempt_oom(r);
        return;
    }
    CURL *e = mm_upstream_easy(r->t->up);
    if (!e) {
        px_attempt_oom(r);
        return;
    }
    r->easy = e;
    const mm_http_request *q = &r->ex->req;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, px_on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, px_on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->curl_err);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    if (b->cfg->timeouts.connect_ms > 0)
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)b->cfg->timeouts.connect_ms);
    long total_ms = px_total_ms(r, b);
    if (total_ms > 0)
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, total_ms);
    /* Do not reuse a connection idle longer than this: servers close idle
     * keep-alive connections (uvicorn after 5 s) and a request sent into a
     * closing connection has to be resent. */
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, 4L);
    /* Backends are addressed directly: no http_proxy from the environment
     * (which curl would otherwise look up on every request). */
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    char method[32];
    size_t ml = q->method_len < sizeof method - 1 ? q->method_len : sizeof method - 1;
    memcpy(method, q->method, ml);
    method[ml] = '\0';
    if (strcmp(method, "GET") == 0 && blen == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, body ? body : "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen);
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    px_attempt_stamp(r);
    px_attempt_launched(r, mm_upstream_add(r->t->up, e, r));
}

void mm_proxy_upstream_done(CURL *easy, CURLcode rc, void *priv)
{
    px_req *r = priv;
    (void)easy;
    if (rc == CURLE_OK && r->status >= 200 && !r->hold_error && !r->too_large) {
        px_release_attempt(r, 0, MM_OUTCOME_OK);
        r->err = MM_ERR_NONE; /* earlier failed attempts were counted per attempt */
        r->ex->on_abort = NULL;
        if (r->relay) {
            px_begin_client(r);
            if (r->sse && r->sse_buf.len) /* a last event without its blank line */
                mm_http_write(r->ex, r->sse_buf.data, r->sse_buf.len);
            mm_http_end(r->ex);
        } else {
            mm_buf h;
            mm_buf_init(&h, PX_MAX_RESP_HEADERS + 8192);
            mm_buf_append(&h, r->resp_hdrs.data, r->resp_hdrs.len);
            px_our_headers(r, &h, r->status);
            if (r->routed && r->status >= 200 && r->status < 300)
                px_usage_from_json(r, r->resp_body.data, r->resp_body.len);
            mm_http_respond(r->ex, r->status, mm_buf_cstr(&h), r->resp_body.data, r->resp_body.len);
            mm_buf_free(&h);
        }
        px_free(r);
        return;
    }
    if (r->too_large) {
        px_release_attempt(r, 0, MM_OUTCOME_OK);
        px_fail(r, 502, "response larger than max_response_bytes");
        return;
    }
    if (rc == CURLE_OK && r->hold_error) {
        /* A whole 5xx/429 answer: a failure for the breaker, kept to pass
         * through if no retry or fallback does better. */
        r->have_last = 1;
        r->last_status = r->status;
        snprintf(r->last_what, sizeof r->last_what, "HTTP %d", r->status);
        px_attempt_error(r, r->status == 429 ? MM_ERR_429 : MM_ERR_5XX);
        px_release_attempt(r, 0, MM_OUTCOME_HTTP_FAIL);
        if (r->client_began)
            px_fail(r, 502, r->last_what);
        else
            px_after_failure(r, r->status, r->last_what, 0, 0);
        return;
    }
    int status = rc == CURLE_OPERATION_TIMEDOUT ? 504 : 502;
    if (rc == CURLE_OK)
        snprintf(r->last_what, sizeof r->last_what, "no valid response");
    else
        snprintf(r->last_what, sizeof r->last_what, "%s",
                 r->curl_err[0] ? r->curl_err : curl_easy_strerror(rc));
    r->last_status = status;
    r->have_last = 0;
    px_attempt_error(r, r->client_began ? MM_ERR_MIDSTREAM
                        : rc == CURLE_OPERATION_TIMEDOUT ? MM_ERR_TIMEOUT : MM_ERR_CONNECT);
    px_release_attempt(r, 0, MM_OUTCOME_CONN_FAIL);
    if (r->client_began)
        px_fail(r, status, r->last_what);
    else
        px_after_failure(r, status, r->last_what, rc == CURLE_COULDNT_CONNECT,
                         rc != CURLE_OPERATION_TIMEDOUT);
}

/* ---- classification ---- */

static int path_is(const px_req *r, const char *p)
{
    size_t n = strlen(p);
    return r->path_len >= n && memcmp(r->path, p, n) == 0 &&
           (r->path_len == n || r->path[n] == '?');
}

static int is_json_type(const mm_http_request *q)
{
    const mm_http_header *h = mm_http_find_header(q, "content-type");
    if (!h)
        return 0;
    size_t n = h->value_len;
    const char *semi = memchr(h->value, ';', n);
    if (semi)
        n = (size_t)(semi - h->value);
    while (n && (h->value[n - 1] == ' ' || h->value[n - 1] == '\t'))
        n--;
    if (ieq(h->value, n, "application/json"))
        return 1;
    return n > 5 && strncasecmp(h->value + n - 5, "+json", 5) == 0;
}

/* s[0..n) into dst, cut to fit and NUL-terminated (snprintf is slow). */
static void px_copy_str(char *dst, size_t cap, const char *s, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, s, n);
    dst[n] = '\0';
}

static void px_hex64(char *out, uint64_t v)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4)
        out[i] = hex[v & 15];
}

static void px_set_reqid(px_req *r)
{
    const mm_http_header *h = mm_http_find_header(&r->ex->req, "x-request-id");
    if (h && h->value_len > 0 && h->value_len < sizeof r->reqid) {
        memcpy(r->reqid, h->value, h->value_len);
        r->reqid[h->value_len] = '\0';
        return;
    }
    uint64_t a = mm_rng_next(&r->t->rng), b = mm_rng_next(&r->t->rng);
    px_hex64(r->reqid, a);
    px_hex64(r->reqid + 16, b);
    r->reqid[32] = '\0';
}

static void px_route_default(px_req *r, int status_without, const char *msg_without)
{
    mm_router *rt = r->router;
    if (!rt->default_pool) {
        r->ex->on_abort = NULL;
        px_error(r, status_without, NULL, msg_without);
        px_free(r);
        return;
    }
    r->pool = rt->default_pool;
    r->relay = 1; /* Nginx upstream mode: stream whatever comes back */
    r->routed = 0;
    px_start_attempt(r);
}

static void px_route_model(px_req *r, const char *name, size_t nlen)
{
    mm_router *rt = r->router;
    r->req_model = strndup(name, nlen);
    r->req_model_len = r->req_model ? nlen : 0;
    mm_route *route = mm_router_find(rt, name, nlen);
    if (!route) {
        char msg[1024];
        char *names = mm_router_names(rt);
        snprintf(msg, sizeof msg, "The model `%.*s` does not exist. Available models: %s",
                 (int)(nlen > 200 ? 200 : nlen), name, names ? names : "");
        free(names);
        r->ex->on_abort = NULL;
        px_error(r, 404, "model", msg);
        px_free(r);
        return;
    }
    r->route = route;
    const char *key = NULL;
    size_t klen = 0;
    char num[64];
    if (route->cfg->sticky_kind == MM_STICKY_HEADER) {
        const mm_http_header *h = mm_http_find_header(&r->ex->req, route->cfg->sticky_key);
        if (h) {
            key = h->value;
            klen = h->value_len;
        }
    } else if (route->cfg->sticky_kind == MM_STICKY_BODY) {
        const mm_json_member *v = mm_json_find(r->members, r->nmembers, route->cfg->sticky_key);
        if (v && v->type == 's') {
            size_t at = r->scratch.len;
            if (mm_json_decode_string(v->val, v->val_len, &r->scratch) == 0) {
                key = r->scratch.data + at;
                klen = r->scratch.len - at;
            }
        } else if (v && v->type == 'n' && v->val_len < sizeof num) {
            memcpy(num, v->val, v->val_len);
            num[v->val_len] = '\0';
            klen = v->val_len;
            key = num;
        }
    }
    if (key == num) {
        memcpy(r->sticky_num, num, klen < sizeof r->sticky_num ? klen + 1 : sizeof r->sticky_num);
        key = r->sticky_num;
    }
    r->sticky = key;
    r->sticky_len = klen;
    r->variant = mm_route_pick_variant(route, key, klen, &r->t->rng);
    r->fb_variant = r->variant;
    if (!r->variant) {
        r->ex->on_abort = NULL;
        px_error(r, 503, NULL, "no variant of this model is available");
        px_free(r);
        return;
    }
    r->pool = mm_route_pool(r->variant);
    if (r->pool->cfg->timeouts.total_ms > 0)
        r->deadline_ns = r->ex->start_ns + (uint64_t)r->pool->cfg->timeouts.total_ms * 1000000ull;
    const mm_json_member *st = mm_json_find(r->members, r->nmembers, "stream");
    r->streaming = st && st->type == 't';
    r->relay = r->streaming;
    if (r->streaming && (path_is(r, "/v1/chat/completions") || path_is(r, "/v1/completions"))) {
        /* Ask for usage so tokens can be counted; drop that chunk again
         * when the client did not ask for it. */
        r->sse = 1;
        const mm_json_member *so = mm_json_find(r->members, r->nmembers, "stream_options");
        int asked = 0;
        if (so && so->type == 'o') {
            mm_json_member in[16];
            size_t nin = 0;
            mm_json_scan(so->val, so->val_len, in, 16, &nin, NULL, 0);
            const mm_json_member *iu = mm_json_find(in, nin < 16 ? nin : 16, "include_usage");
            asked = iu && iu->type == 't';
        }
        r->strip_usage = !asked;
    }
    px_start_attempt(r);
}

static void px_builtin_health(px_req *r)
{
    char body[256];
    int n = snprintf(body, sizeof body, "{\"status\":\"ok\",\"models\":%zu}",
                     r->router->nroutes);
    mm_buf h;
    mm_buf_init(&h, 1024);
    mm_buf_append_str(&h, "Content-Type: application/json\r\n");
    px_our_headers(r, &h, 200);
    mm_http_respond(r->ex, 200, mm_buf_cstr(&h), body, (size_t)n);
    mm_buf_free(&h);
}

static void px_builtin_metrics(px_req *r)
{
    mm_buf body;
    mm_buf_init(&body, 64 * 1024 * 1024);
    if (!r->t->metrics || mm_metrics_prometheus(r->t->metrics, &body) != 0) {
        mm_buf_free(&body);
        px_error(r, 500, NULL, "metrics unavailable");
        return;
    }
    mm_buf h;
    mm_buf_init(&h, 1024);
    mm_buf_append_str(&h, "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n");
    px_our_headers(r, &h, 200);
    mm_http_respond(r->ex, 200, mm_buf_cstr(&h), body.data, body.len);
    mm_buf_free(&h);
    mm_buf_free(&body);
}

static void px_builtin_models(px_req *r)
{
    mm_buf h;
    mm_buf_init(&h, 1024);
    mm_buf_append_str(&h, "Content-Type: application/json\r\n");
    px_our_headers(r, &h, 200);
    size_t len = 0;
    char *body = mm_router_models_json(r->router, &len);
    mm_http_respond(r->ex, 200, mm_buf_cstr(&h), body ? body : "{\"object\":\"list\",\"data\":[]}",
                    body ? len : 27);
    free(body);
    mm_buf_free(&h);
}

void mm_proxy_handle(mm_http_exchange *ex, void *arg)
{
    mm_proxy_thread *t = arg;
    /* Zeroing all of it would clear 4 KiB of arrays for every request. */
    px_req *r = malloc(sizeof *r);
    if (r)
        memset(r, 0, offsetof(px_req, members));
    if (!r) {
        mm_http_respond_error(ex, 500, NULL, NULL, "out of memory");
        return;
    }
    r->t = t;
    r->ex = ex;
    r->router = mm_runtime_acquire(t->rt);
    px_inflight++;
    mm_buf_init(&r->fwd_body, t->cfg->max_body_bytes + 4096);
    mm_buf_init(&r->resp_hdrs, PX_MAX_RESP_HEADERS);
    mm_buf_init(&r->resp_body, t->cfg->max_response_bytes);
    mm_buf_init(&r->sse_buf, 1024 * 1024);
    mm_buf_init(&r->scratch, 64 * 1024);
    r->prompt_tokens = r->completion_tokens = -1;
    r->timer = evtimer_new(t->base, px_on_timer, r);
    if (!r->timer) {
        r->no_record = 1;
        px_free(r);
        mm_http_respond_error(ex, 500, NULL, NULL, "out of memory");
        return;
    }
    ex->udata = r;
    ex->bytes_sink = &r->bytes_out;
    ex->on_abort = px_on_client_abort;
    ex->on_drain = px_on_drain;
    px_set_reqid(r);
    const mm_http_request *q = &ex->req;
    r->start_ns = ex->start_ns;
    px_copy_str(r->method, sizeof r->method, q->method, q->method_len);
    px_copy_str(r->target, sizeof r->target, q->target, q->target_len);
    px_copy_str(r->peer, sizeof r->peer, ex->peer, strlen(ex->peer));
    r->path = q->target;
    r->path_len = q->target_len;
    int is_get = ieq(q->method, q->method_len, "GET");
    int is_post = ieq(q->method, q->method_len, "POST");

    if (is_get && path_is(r, "/health")) {
        ex->on_abort = NULL;
        r->no_record = 1;
        px_builtin_health(r);
        px_free(r);
        return;
    }
    if (is_get && path_is(r, "/metrics")) {
        ex->on_abort = NULL;
        r->no_record = 1;
        px_builtin_metrics(r);
        px_free(r);
        return;
    }
    if (is_get && path_is(r, "/v1/models")) {
        ex->on_abort = NULL;
        r->no_record = 1;
        px_builtin_models(r);
        px_free(r);
        return;
    }
    if (!is_post) {
        char msg[256];
        snprintf(msg, sizeof msg, "no route for %.*s %.*s", (int)(q->method_len > 16 ? 16 : q->method_len),
                 q->method, (int)(q->target_len > 128 ? 128 : q->target_len), q->target);
        px_route_default(r, 404, msg);
        return;
    }
    if (!is_json_type(q)) {
        px_route_default(r, 415, "Content-Type must be application/json");
        return;
    }
    char jerr[160] = "";
    int jrc = mm_json_scan(ex->body.data ? ex->body.data : "", ex->body.len, r->members,
                           PX_MAX_MEMBERS, &r->nmembers, jerr, sizeof jerr);
    if (jrc != 0) {
        char msg[512];
        if (jrc == -EDOM)
            snprintf(msg, sizeof msg, "request body must be a JSON object");
        else
            snprintf(msg, sizeof msg, "invalid JSON body: %s", jerr);
        px_route_default(r, 400, msg);
        return;
    }
    /* Duplicate keys are refused: the gateway and the upstream must never
     * disagree about which "model" a body names. */
    if (r->nmembers > PX_MAX_MEMBERS || mm_json_has_duplicate(r->members, r->nmembers)) {
        r->ex->on_abort = NULL;
        px_error(r, 400, NULL, r->nmembers > PX_MAX_MEMBERS
                                   ? "request body has too many top-level fields"
                                   : "request body has a duplicate top-level key");
        px_free(r);
        return;
    }
    r->routed = 1;
    const mm_json_member *model = mm_json_find(r->members, r->nmembers, "model");
    if (model && model->type == 's' && model->val_len > 2) {
        mm_buf_reset(&r->scratch);
        if (mm_json_decode_string(model->val, model->val_len, &r->scratch) == 0 && r->scratch.len) {
            /* The sticky key may be decoded into scratch too: keep the model
             * name in its own copy (px_route_model strndup's it). */
            char name[1024];
            size_t nl = r->scratch.len < sizeof name ? r->scratch.len : sizeof name - 1;
            memcpy(name, r->scratch.data, nl);
            mm_buf_reset(&r->scratch);
            px_route_model(r, name, nl);
            return;
        }
    }
    if (model) {
        r->ex->on_abort = NULL;
        px_error(r, 400, "model", "the model field must be a non-empty string");
        px_free(r);
        return;
    }
    px_route_default(r, 400, "missing required field: model");
}
