/* stats_cli.c: `modelmux-gateway stats` (see stats_cli.h, docs/METRICS.md). */
#include "stats_cli.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <jansson.h>

#include "balance.h"
#include "config.h"
#include "metrics.h"
#include "redis_sink.h"

/* Hard caps: the hashes are read from a server we do not control. */
#define MAX_ROWS        100000
#define MAX_GATEWAYS    10000
#define MAX_MINUTES     10080     /* a week */
#define MAX_NAME        4096

typedef struct row {
    char    *model, *variant;
    mm_series_stats st;
    int64_t  weight;              /* -1: not configured */
} row;

typedef struct gw {
    char   *id;
    int64_t last;
} gw;

struct mm_stats_report {
    row     *rows;
    size_t   n, cap;
    size_t  *index;               /* open addressing over rows; SIZE_MAX empty */
    size_t   icap;
    gw      *gws;
    size_t   ngw, gwcap;
    uint64_t skipped;
};

int mm_stats_report_new(mm_stats_report **out)
{
    mm_stats_report *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    *out = r;
    return 0;
}

void mm_stats_report_free(mm_stats_report *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n; i++) {
        free(r->rows[i].model);
        free(r->rows[i].variant);
    }
    for (size_t i = 0; i < r->ngw; i++)
        free(r->gws[i].id);
    free(r->rows);
    free(r->index);
    free(r->gws);
    free(r);
}

static uint64_t key_hash(const char *m, size_t ml, const char *v, size_t vl)
{
    return mm_hash64(v, vl, mm_hash64(m, ml, 0x5eed) ^ ml);
}

static int reindex(mm_stats_report *r, size_t icap)
{
    size_t *ix = malloc(icap * sizeof *ix);
    if (!ix)
        return -ENOMEM;
    for (size_t i = 0; i < icap; i++)
        ix[i] = SIZE_MAX;
    for (size_t i = 0; i < r->n; i++) {
        const row *w = &r->rows[i];
        size_t h = (size_t)key_hash(w->model, strlen(w->model), w->variant, strlen(w->variant));
        while (ix[h & (icap - 1)] != SIZE_MAX)
            h++;
        ix[h & (icap - 1)] = i;
    }
    free(r->index);
    r->index = ix;
    r->icap = icap;
    return 0;
}

static char *memdup0(const char *p, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, p, n);
        d[n] = '\0';
    }
    return d;
}

/* The row of (model, variant), created if new. */
static int find_row(mm_stats_report *r, const char *m, size_t ml, const char *v, size_t vl, row **out)
{
    if (ml > MAX_NAME || vl > MAX_NAME || memchr(m, '\0', ml) || memchr(v, '\0', vl))
        return -EINVAL;
    uint64_t h = key_hash(m, ml, v, vl);
    if (r->icap) {
        for (size_t k = (size_t)h;; k++) {
            size_t i = r->index[k & (r->icap - 1)];
            if (i == SIZE_MAX)
                break;
            row *w = &r->rows[i];
            if (strlen(w->model) == ml && strlen(w->variant) == vl && memcmp(w->model, m, ml) == 0 &&
                memcmp(w->variant, v, vl) == 0) {
                *out = w;
                return 0;
            }
        }
    }
    if (r->n >= MAX_ROWS)
        return -E2BIG;
    if (r->n == r->cap) {
        size_t ncap = r->cap ? r->cap * 2 : 16;
        row *nr = realloc(r->rows, ncap * sizeof *nr);
        if (!nr)
            return -ENOMEM;
        r->rows = nr;
        r->cap = ncap;
    }
    row *w = &r->rows[r->n];
    memset(w, 0, sizeof *w);
    w->weight = -1;
    w->model = memdup0(m, ml);
    w->variant = memdup0(v, vl);
    if (!w->model || !w->variant) {
        free(w->model);
        free(w->variant);
        return -ENOMEM;
    }
    r->n++;
    /* Keep the index at most half full. */
    if (r->n * 2 > r->icap) {
        int rc = reindex(r, r->icap ? r->icap * 2 : 64);
        if (rc) {
            r->n--;
            free(w->model);
            free(w->variant);
            return rc;
        }
    } else {
        size_t k = (size_t)h;
        while (r->index[k & (r->icap - 1)] != SIZE_MAX)
            k++;
        r->index[k & (r->icap - 1)] = r->n - 1;
    }
    *out = w;
    return 0;
}

/* A non-negative decimal integer, all of it. */
static int parse_u64(const char *p, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 20)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -EINVAL;
        unsigned d = (unsigned)(p[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -ERANGE;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int mm_stats_report_add(mm_stats_report *r, const char *field, size_t flen, const char *val, size_t vlen)
{
    const char *tab[3], *p = field, *end = field + flen;
    for (int k = 0; k < 3; k++) {
        tab[k] = memchr(p, '\t', (size_t)(end - p));
        if (!tab[k])
            goto skip;
        p = tab[k] + 1;
    }
    const char *metric = tab[2] + 1;
    int i = mm_redis_metric_find(metric, (size_t)(end - metric));
    uint64_t v;
    if (i < 0 || parse_u64(val, vlen, &v) != 0)
        goto skip;
    row *w;
    int rc = find_row(r, field, (size_t)(tab[0] - field), tab[0] + 1, (size_t)(tab[1] - tab[0] - 1), &w);
    if (rc == -EINVAL)
        goto skip;
    if (rc)
        return rc;
    uint64_t *slot = mm_redis_metric_slot(&w->st, (size_t)i);
    *slot = v > UINT64_MAX - *slot ? UINT64_MAX : *slot + v;
    return 0;
skip:
    r->skipped++;
    return 0;
}

int mm_stats_report_weight(mm_stats_report *r, const char *field, size_t flen, const char *val, size_t vlen)
{
    const char *t = memchr(field, '\t', flen);
    uint64_t v;
    if (!t || memchr(t + 1, '\t', flen - (size_t)(t - field) - 1) || parse_u64(val, vlen, &v) ||
        v > INT32_MAX) {
        r->skipped++;
        return 0;
    }
    row *w;
    int rc = find_row(r, field, (size_t)(t - field), t + 1, flen - (size_t)(t - field) - 1, &w);
    if (rc == -EINVAL) {
        r->skipped++;
        return 0;
    }
    if (rc)
        return rc;
    w->weight = (int64_t)v;
    return 0;
}

int mm_stats_report_gateway(mm_stats_report *r, const char *id, size_t idlen, const char *val, size_t vlen)
{
    uint64_t v;
    if (idlen > MAX_NAME || memchr(id, '\0', idlen) || parse_u64(val, vlen, &v) || v > INT64_MAX ||
        r->ngw >= MAX_GATEWAYS) {
        r->skipped++;
        return 0;
    }
    if (r->ngw == r->gwcap) {
        size_t ncap = r->gwcap ? r->gwcap * 2 : 8;
        gw *ng = realloc(r->gws, ncap * sizeof *ng);
        if (!ng)
            return -ENOMEM;
        r->gws = ng;
        r->gwcap = ncap;
    }
    if (!(r->gws[r->ngw].id = memdup0(id, idlen)))
        return -ENOMEM;
    r->gws[r->ngw++].last = (int64_t)v;
    return 0;
}

/* ---- the numbers ----------------------------------------------------- */

typedef struct figures {
    uint64_t failed;          /* 5xx answers + streams broken after the first byte */
    double   error_rate;      /* failed / requests; < 0: no requests */
    double   lat50, lat95, ttft50, ttft95, itl50, itl95;   /* ms; < 0: no data */
    double   tok_s;           /* completion tokens per second of request time */
    double   throughput;      /* completion tokens per second of the window */
    double   share;           /* of the model's requests; < 0: model has none */
    double   weight_share;    /* of the model's configured weights; < 0: none */
} figures;

static double quant(const mm_hist *h, double q)
{
    return h->count ? mm_hist_quantile_ms(h, q) : -1;
}

static void compute(const mm_stats_report *r, const row *w, double window_s, figures *f)
{
    uint64_t model_req = 0;
    int64_t model_w = 0;
    for (size_t i = 0; i < r->n; i++) {
        if (strcmp(r->rows[i].model, w->model) != 0)
            continue;
        model_req += r->rows[i].st.requests;
        if (r->rows[i].weight > 0)
            model_w += r->rows[i].weight;
    }
    const mm_series_stats *st = &w->st;
    f->failed = st->responses[5] + st->errors[MM_ERR_MIDSTREAM];
    f->error_rate = st->requests ? (double)f->failed / (double)st->requests : -1;
    f->lat50 = quant(&st->hist[MM_H_LATENCY], 0.5);
    f->lat95 = quant(&st->hist[MM_H_LATENCY], 0.95);
    f->ttft50 = quant(&st->hist[MM_H_TTFT], 0.5);
    f->ttft95 = quant(&st->hist[MM_H_TTFT], 0.95);
    f->itl50 = quant(&st->hist[MM_H_ITL], 0.5);
    f->itl95 = quant(&st->hist[MM_H_ITL], 0.95);
    uint64_t lat_us = st->hist[MM_H_LATENCY].sum_us;
    f->tok_s = lat_us ? (double)st->completion_tokens / ((double)lat_us / 1e6) : -1;
    f->throughput = window_s > 0 ? (double)st->completion_tokens / window_s : -1;
    f->share = model_req ? (double)st->requests / (double)model_req : -1;
    f->weight_share = w->weight >= 0 && model_w > 0 ? (double)w->weight / (double)model_w : -1;
}

static int row_cmp(const void *a, const void *b)
{
    const row *x = a, *y = b;
    int c = strcmp(x->model, y->model);
    return c ? c : strcmp(x->variant, y->variant);
}

/* ---- rendering ------------------------------------------------------- */

static json_t *num_or_null(double v)
{
    return v < 0 ? json_null() : json_real(v);
}

static int set(json_t *o, const char *k, json_t *v)
{
    return v && json_object_set_new(o, k, v) == 0 ? 0 : -ENOMEM;
}

static int render_json(mm_stats_report *r, const mm_stats_window *w, mm_buf *out)
{
    static const char *const resp_names[6] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
    json_t *doc = json_object(), *gws = json_array(), *vars = json_array();
    int rc = -ENOMEM;
    char *text = NULL;
    double window_s = (double)w->minutes * 60.0;
    if (!doc || !gws || !vars)
        goto out;
    if (set(doc, "prefix", json_string(w->prefix)) || set(doc, "minutes", json_integer(w->minutes)) ||
        set(doc, "first_minute", json_integer(w->first_minute)) ||
        set(doc, "last_minute", json_integer(w->last_minute)) ||
        set(doc, "skipped_fields", json_integer((json_int_t)r->skipped)))
        goto out;
    for (size_t i = 0; i < r->ngw; i++) {
        json_t *g = json_object();
        if (!g || json_array_append_new(gws, g) ||
            set(g, "id", json_stringn(r->gws[i].id, strlen(r->gws[i].id))) ||
            set(g, "last_flush", json_integer(r->gws[i].last)) ||
            set(g, "active", json_boolean(r->gws[i].last >= w->first_minute * 60)))
            goto out;
    }
    for (size_t i = 0; i < r->n; i++) {
        const row *x = &r->rows[i];
        const mm_series_stats *st = &x->st;
        figures f;
        compute(r, x, window_s, &f);
        json_t *v = json_object();
        if (!v || json_array_append_new(vars, v))
            goto out;
        /* set() and json_array_append_new() take the reference even when
         * they fail, so nothing leaks on the way out. */
        if (set(v, "model", json_string(x->model)) || set(v, "variant", json_string(x->variant)) ||
            set(v, "requests", json_integer((json_int_t)st->requests)) ||
            set(v, "failed", json_integer((json_int_t)f.failed)) ||
            set(v, "error_rate", num_or_null(f.error_rate)) ||
            set(v, "latency_p50_ms", num_or_null(f.lat50)) ||
            set(v, "latency_p95_ms", num_or_null(f.lat95)) ||
            set(v, "ttft_p50_ms", num_or_null(f.ttft50)) ||
            set(v, "ttft_p95_ms", num_or_null(f.ttft95)) ||
            set(v, "itl_p50_ms", num_or_null(f.itl50)) ||
            set(v, "itl_p95_ms", num_or_null(f.itl95)) ||
            set(v, "tokens_per_s", num_or_null(f.tok_s)) ||
            set(v, "throughput_tokens_per_s", num_or_null(f.throughput)) ||
            set(v, "prompt_tokens", json_integer((json_int_t)st->prompt_tokens)) ||
            set(v, "completion_tokens", json_integer((json_int_t)st->completion_tokens)) ||
            set(v, "retries", json_integer((json_int_t)st->retries)) ||
            set(v, "fallbacks", json_integer((json_int_t)st->fallbacks)) ||
            set(v, "share", num_or_null(f.share)) ||
            set(v, "weight", x->weight >= 0 ? json_integer(x->weight) : json_null()) ||
            set(v, "weight_share", num_or_null(f.weight_share)))
            goto out;
        json_t *resp = json_object(), *errs = json_object();
        if (set(v, "responses", resp)) {
            json_decref(errs);
            goto out;
        }
        if (set(v, "errors", errs))
            goto out;
        for (size_t k = 0; k < 6; k++)
            if (set(resp, resp_names[k], json_integer((json_int_t)st->responses[k])))
                goto out;
        for (size_t k = 1; k < MM_ERR__COUNT; k++)
            if (set(errs, mm_redis_err_name((mm_err_kind)k), json_integer((json_int_t)st->errors[k])))
                goto out;
    }
    if (set(doc, "gateways", gws)) {
        gws = NULL;
        goto out;
    }
    gws = NULL;
    if (set(doc, "variants", vars)) {
        vars = NULL;
        goto out;
    }
    vars = NULL;
    text = json_dumps(doc, JSON_PRESERVE_ORDER | JSON_INDENT(2) | JSON_REAL_PRECISION(10));
    if (!text)
        goto out;
    rc = mm_buf_append_str(out, text);
    if (!rc)
        rc = mm_buf_append(out, "\n", 1);
out:
    free(text);
    json_decref(gws);
    json_decref(vars);
    json_decref(doc);
    return rc;
}

enum { C_MODEL, C_VARIANT, C_REQ, C_ERR, C_L50, C_L95, C_T50, C_T95, C_TOK, C_SHARE, C_WEIGHT, C__N };
static const char *const col_head[C__N] = {
    "MODEL", "VARIANT", "REQUESTS", "ERRORS", "P50_MS", "P95_MS", "TTFT_P50", "TTFT_P95",
    "TOK/S", "SHARE", "WEIGHT",
};

static void fmt_ms(char *b, size_t n, double ms)
{
    if (ms < 0)
        snprintf(b, n, "-");
    else
        snprintf(b, n, ms < 10 ? "%.1f" : "%.0f", ms);
}

static void fmt_pct(char *b, size_t n, double x)
{
    if (x < 0)
        snprintf(b, n, "-");
    else
        snprintf(b, n, "%.1f%%", x * 100);
}

static int render_table(mm_stats_report *r, const mm_stats_window *w, mm_buf *out)
{
    typedef char cell[40];
    cell *cells = NULL;
    size_t width[C__N];
    int rc;
    size_t active = 0;
    for (size_t i = 0; i < r->ngw; i++)
        active += r->gws[i].last >= w->first_minute * 60;
    time_t end = (time_t)(w->last_minute + 1) * 60;
    struct tm tm;
    gmtime_r(&end, &tm);
    rc = mm_buf_printf(out, "last %d min up to %04d-%02d-%02d %02d:%02d UTC, prefix \"%s\", "
                       "%zu gateway(s) reporting\n",
                       w->minutes, tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                       tm.tm_min, w->prefix, active);
    if (rc)
        return rc;
    if (r->n == 0)
        return mm_buf_append_str(out, "no traffic recorded in this window\n");
    if (!(cells = calloc(r->n * C__N, sizeof *cells)))
        return -ENOMEM;
    for (size_t c = 0; c < C__N; c++)
        width[c] = strlen(col_head[c]);
    for (size_t i = 0; i < r->n; i++) {
        const row *x = &r->rows[i];
        cell *cl = &cells[i * C__N];
        figures f;
        compute(r, x, (double)w->minutes * 60.0, &f);
        /* Names are printed separately (they may be long); width only. */
        size_t ml = *x->model ? strlen(x->model) : strlen("(default)");
        if (ml > width[C_MODEL])
            width[C_MODEL] = ml;
        if (strlen(x->variant) > width[C_VARIANT])
            width[C_VARIANT] = strlen(x->variant);
        snprintf(cl[C_REQ], sizeof *cl, "%" PRIu64, x->st.requests);
        fmt_pct(cl[C_ERR], sizeof *cl, f.error_rate);
        fmt_ms(cl[C_L50], sizeof *cl, f.lat50);
        fmt_ms(cl[C_L95], sizeof *cl, f.lat95);
        fmt_ms(cl[C_T50], sizeof *cl, f.ttft50);
        fmt_ms(cl[C_T95], sizeof *cl, f.ttft95);
        if (f.tok_s < 0)
            snprintf(cl[C_TOK], sizeof *cl, "-");
        else
            snprintf(cl[C_TOK], sizeof *cl, "%.1f", f.tok_s);
        fmt_pct(cl[C_SHARE], sizeof *cl, f.share);
        if (x->weight < 0)
            snprintf(cl[C_WEIGHT], sizeof *cl, "-");
        else
            snprintf(cl[C_WEIGHT], sizeof *cl, "%.1f%% (%" PRId64 ")",
                     f.weight_share < 0 ? 0.0 : f.weight_share * 100, x->weight);
        for (size_t c = C_REQ; c < C__N; c++)
            if (strlen(cl[c]) > width[c])
                width[c] = strlen(cl[c]);
    }
    for (size_t c = 0; c < C__N && !rc; c++)
        rc = mm_buf_printf(out, c < C_REQ ? "%-*s  " : c + 1 < C__N ? "%*s  " : "%*s\n",
                           (int)width[c], col_head[c]);
    for (size_t i = 0; i < r->n && !rc; i++) {
        const row *x = &r->rows[i];
        rc = mm_buf_printf(out, "%-*s  %-*s  ", (int)width[C_MODEL], *x->model ? x->model : "(default)",
                           (int)width[C_VARIANT], x->variant);
        for (size_t c = C_REQ; c < C__N && !rc; c++)
            rc = mm_buf_printf(out, c + 1 < C__N ? "%*s  " : "%*s\n", (int)width[c], cells[i * C__N + c]);
    }
    if (!rc && r->skipped)
        rc = mm_buf_printf(out, "(%" PRIu64 " hash fields did not follow the schema and were skipped)\n",
                           r->skipped);
    free(cells);
    return rc;
}

int mm_stats_report_render(mm_stats_report *r, const mm_stats_window *w, int json, mm_buf *out)
{
    if (r->n > 1)
        qsort(r->rows, r->n, sizeof *r->rows, row_cmp);
    /* The index pointed at the old order. */
    int rc = r->n ? reindex(r, r->icap) : 0;
    if (rc)
        return rc;
    return json ? render_json(r, w, out) : render_table(r, w, out);
}

/* ---- the command ----------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: modelmux-gateway stats [-c CONFIG | --redis URL] [--prefix P] [--minutes N]\n"
            "                              [--at UNIX_TIME] [--json]\n"
            "  -c, --config FILE  read redis.url and redis.prefix from the gateway configuration\n"
            "  --redis URL        redis://[[user]:password@]host[:port][/db] (as redis.url)\n"
            "  --prefix P         key prefix (default: the config's, else \"modelmux\")\n"
            "  --minutes N        the window: the last N minutes, 1..%d (default 15)\n"
            "  --at UNIX_TIME     end the window at this time instead of now\n"
            "  --json             print JSON instead of a table\n",
            MAX_MINUTES);
}

static int parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -EINVAL;
    *out = v;
    return 0;
}

/* --redis goes through the config loader, so the URL means exactly what it
 * means as redis.url (same syntax, %-escapes, ${ENV}, checks) without a
 * second parser; the default_pool only makes the document valid. */
static int load_url(const char *url, mm_gateway_cfg **cfg, char *err, size_t errlen)
{
    json_t *doc = json_pack("{s:{s:s}, s:{s:[{s:s}], s:b}}", "redis", "url", url, "default_pool",
                            "backends", "url", "http://127.0.0.1:1", "health", 0);
    char *text = doc ? json_dumps(doc, 0) : NULL;
    int rc = text ? mm_config_load_string(text, cfg, err, errlen) : -ENOMEM;
    if (!text)
        snprintf(err, errlen, "out of memory");
    free(text);
    json_decref(doc);
    return rc;
}

static int check_reply(redisContext *c, redisReply *r, const char *what, int want_array)
{
    if (!r) {
        fprintf(stderr, "modelmux-gateway stats: %s: %s\n", what, c->errstr[0] ? c->errstr : "no reply");
        return -EIO;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "modelmux-gateway stats: %s: %s\n", what, r->str);
        return -EIO;
    }
    if (want_array && r->type != REDIS_REPLY_ARRAY) {
        fprintf(stderr, "modelmux-gateway stats: %s: unexpected reply type %d\n", what, r->type);
        return -EIO;
    }
    return 0;
}

typedef int (*pair_fn)(mm_stats_report *, const char *, size_t, const char *, size_t);

static int feed(mm_stats_report *rep, const redisReply *r, pair_fn fn)
{
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *k = r->element[i], *v = r->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        int rc = fn(rep, k->str, k->len, v->str, v->len);
        if (rc)
            return rc;
    }
    return 0;
}

int mm_stats_main(int argc, char **argv)
{
    const char *cfg_path = NULL, *url = NULL, *prefix = NULL;
    int64_t minutes = 15, at = -1;
    int json = 0, rc = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) && next) {
            cfg_path = next;
            i++;
        } else if (strcmp(a, "--redis") == 0 && next) {
            url = next;
            i++;
        } else if (strcmp(a, "--prefix") == 0 && next) {
            prefix = next;
            i++;
        } else if (strcmp(a, "--minutes") == 0 && next) {
            if (parse_i64(next, 1, MAX_MINUTES, &minutes)) {
                fprintf(stderr, "modelmux-gateway stats: --minutes: expected 1..%d, got '%s'\n",
                        MAX_MINUTES, next);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--at") == 0 && next) {
            if (parse_i64(next, 0, INT64_MAX / 2, &at)) {
                fprintf(stderr, "modelmux-gateway stats: --at: expected a unix time, got '%s'\n", next);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--json") == 0) {
            json = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "modelmux-gateway stats: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!cfg_path == !url) {
        fprintf(stderr, "modelmux-gateway stats: give either -c CONFIG or --redis URL\n");
        usage(stderr);
        return 2;
    }

    char err[1024] = "";
    mm_gateway_cfg *cfg = NULL;
    redisContext *c = NULL;
    mm_stats_report *rep = NULL;
    mm_buf out;
    mm_buf_init(&out, (size_t)1 << 30);
    if (cfg_path && mm_config_load_file(cfg_path, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "modelmux-gateway stats: config error: %s\n", err);
        goto out;
    }
    if (url && load_url(url, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "modelmux-gateway stats: --redis: %s\n", err);
        goto out;
    }
    const mm_redis_cfg *rcfg = &cfg->redis;
    if (!rcfg->url) {
        fprintf(stderr, "modelmux-gateway stats: %s has no redis.url\n", cfg_path);
        goto out;
    }
    if (!prefix)
        prefix = rcfg->prefix ? rcfg->prefix : "modelmux";

    struct timeval tv = {3, 0};
    c = redisConnectWithTimeout(rcfg->host, rcfg->port, tv);
    if (!c || c->err) {
        fprintf(stderr, "modelmux-gateway stats: cannot reach Redis at %s:%d: %s\n", rcfg->host,
                rcfg->port, c ? c->errstr : "out of memory");
        goto out;
    }
    redisSetTimeout(c, (struct timeval){10, 0});
    redisReply *r = NULL;
    if (rcfg->password) {
        const char *av[3] = {"AUTH", rcfg->username ? rcfg->username : rcfg->password, rcfg->password};
        r = redisCommandArgv(c, rcfg->username ? 3 : 2, av, NULL);
        int bad = check_reply(c, r, "AUTH", 0);
        freeReplyObject(r);
        if (bad)
            goto out;
    }
    if (rcfg->db) {
        r = redisCommand(c, "SELECT %d", rcfg->db);
        int bad = check_reply(c, r, "SELECT", 0);
        freeReplyObject(r);
        if (bad)
            goto out;
    }

    time_t now = at >= 0 ? (time_t)at : time(NULL);
    mm_stats_window w = {prefix, (int)minutes, (int64_t)now / 60 - minutes + 1, (int64_t)now / 60};
    /* One round trip: every minute, then the weights and the gateways. */
    char key[512];
    for (int64_t m = w.first_minute; m <= w.last_minute; m++) {
        snprintf(key, sizeof key, "%s:v1:m:%" PRId64, prefix, m);
        redisAppendCommandArgv(c, 2, (const char *[]){"HGETALL", key}, NULL);
    }
    snprintf(key, sizeof key, "%s:v1:weights", prefix);
    redisAppendCommandArgv(c, 2, (const char *[]){"HGETALL", key}, NULL);
    snprintf(key, sizeof key, "%s:v1:gateways", prefix);
    redisAppendCommandArgv(c, 2, (const char *[]){"HGETALL", key}, NULL);
    if (mm_stats_report_new(&rep) != 0) {
        fprintf(stderr, "modelmux-gateway stats: out of memory\n");
        goto out;
    }
    for (int64_t m = 0; m < minutes + 2; m++) {
        void *vr = NULL;
        if (redisGetReply(c, &vr) != REDIS_OK)
            vr = NULL;
        r = vr;
        int bad = check_reply(c, r, "HGETALL", 1);
        if (!bad) {
            pair_fn fn = m < minutes ? mm_stats_report_add
                         : m == minutes ? mm_stats_report_weight : mm_stats_report_gateway;
            if (feed(rep, r, fn) != 0) {
                fprintf(stderr, "modelmux-gateway stats: too much data (or out of memory)\n");
                bad = 1;
            }
        }
        freeReplyObject(r);
        if (bad)
            goto out;
    }
    if (mm_stats_report_render(rep, &w, json, &out) != 0) {
        fprintf(stderr, "modelmux-gateway stats: out of memory\n");
        goto out;
    }
    if (out.len && fwrite(out.data, 1, out.len, stdout) != out.len) {
        fprintf(stderr, "modelmux-gateway stats: cannot write the report\n");
        goto out;
    }
    rc = 0;
out:
    mm_buf_free(&out);
    mm_stats_report_free(rep);
    if (c)
        redisFree(c);
    mm_config_free(cfg);
    return rc;
}
