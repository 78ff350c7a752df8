/* metrics.c: the in-memory series table and its Prometheus rendering. */
#include "metrics.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "balance.h"

const double mm_hist_bounds_ms[MM_HIST_BUCKETS - 1] = {
    1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000,
};

typedef struct series {
    char *model, *variant, *backend;
    uint64_t hash;
    int next;                 /* hash chain, -1 ends */
    mm_series_stats st;
} series;

#define METRICS_HASH_SIZE 4096

struct mm_metrics {
    pthread_mutex_t lock;
    series  *s;
    size_t   n, cap, max;
    int      heads[METRICS_HASH_SIZE];
    uint64_t dropped;
    mm_metrics_sink_stats sink;
};

static const char *const err_names[MM_ERR__COUNT] = {
    "none", "connect", "timeout", "5xx", "429", "breaker_open", "client_abort", "midstream", "client",
};
static const char *const hist_names[MM_H__COUNT] = {
    "request_duration_seconds", "time_to_first_token_seconds", "inter_token_seconds",
};

int mm_metrics_new(size_t max_series, mm_metrics **out)
{
    mm_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return -ENOMEM;
    pthread_mutex_init(&m->lock, NULL);
    m->max = max_series ? max_series : 10000;
    for (size_t i = 0; i < METRICS_HASH_SIZE; i++)
        m->heads[i] = -1;
    *out = m;
    return 0;
}

void mm_metrics_free(mm_metrics *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++) {
        free(m->s[i].model);
        free(m->s[i].variant);
        free(m->s[i].backend);
    }
    free(m->s);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void mm_hist_observe(mm_hist *h, uint64_t us)
{
    double ms = (double)us / 1000.0;
    size_t i = 0;
    while (i < MM_HIST_BUCKETS - 1 && ms > mm_hist_bounds_ms[i])
        i++;
    h->bucket[i]++;
    h->count++;
    h->sum_us += us;
}

static void hist_add(mm_hist *dst, const mm_hist *src)
{
    for (size_t i = 0; i < MM_HIST_BUCKETS; i++)
        dst->bucket[i] += src->bucket[i];
    dst->count += src->count;
    dst->sum_us += src->sum_us;
}

static uint64_t key_hash(const char *a, const char *b, const char *c)
{
    uint64_t h = mm_hash64(a, strlen(a), 1);
    h = mm_hash64(b, strlen(b), h);
    return mm_hash64(c, strlen(c), h);
}

/* Caller holds the lock. Returns the series index or -1 (cap reached). */
static int series_find(mm_metrics *m, const char *model, const char *variant, const char *backend)
{
    uint64_t h = key_hash(model, variant, backend);
    int *head = &m->heads[h % METRICS_HASH_SIZE];
    for (int i = *head; i >= 0; i = m->s[i].next) {
        series *s = &m->s[i];
        if (s->hash == h && strcmp(s->model, model) == 0 && strcmp(s->variant, variant) == 0 &&
            strcmp(s->backend, backend) == 0)
            return i;
    }
    if (m->n >= m->max)
        return -1;
    if (m->n == m->cap) {
        size_t ncap = m->cap ? m->cap * 2 : 64;
        if (ncap > m->max)
            ncap = m->max;
        series *ns = realloc(m->s, ncap * sizeof *ns);
        if (!ns)
            return -1;
        m->s = ns;
        m->cap = ncap;
    }
    series *s = &m->s[m->n];
    memset(s, 0, sizeof *s);
    s->model = strdup(model);
    s->variant = strdup(variant);
    s->backend = strdup(backend);
    if (!s->model || !s->variant || !s->backend) {
        free(s->model);
        free(s->variant);
        free(s->backend);
        return -1;
    }
    s->hash = h;
    s->next = *head;
    *head = (int)m->n;
    return (int)m->n++;
}

void mm_metrics_record(mm_metrics *m, const mm_request_record *r)
{
    pthread_mutex_lock(&m->lock);
    int i = series_find(m, r->model ? r->model : "", r->variant ? r->variant : "",
                        r->backend ? r->backend : "");
    if (i < 0) {
        m->dropped++;
        pthread_mutex_unlock(&m->lock);
        return;
    }
    mm_series_stats *st = &m->s[i].st;
    if (r->attempt_only) {
        if (r->err > MM_ERR_NONE && r->err < MM_ERR__COUNT)
            st->errors[r->err]++;
        pthread_mutex_unlock(&m->lock);
        return;
    }
    st->requests++;
    int cls = r->status >= 100 && r->status < 600 ? r->status / 100 : 0;
    st->responses[cls]++;
    if (r->err > MM_ERR_NONE && r->err < MM_ERR__COUNT)
        st->errors[r->err]++;
    st->retries += (uint64_t)(r->retries > 0 ? r->retries : 0);
    st->fallbacks += (uint64_t)(r->fallback ? 1 : 0);
    if (r->prompt_tokens > 0)
        st->prompt_tokens += (uint64_t)r->prompt_tokens;
    if (r->completion_tokens > 0)
        st->completion_tokens += (uint64_t)r->completion_tokens;
    mm_hist_observe(&st->hist[MM_H_LATENCY], r->latency_us);
    if (r->ttft_us)
        mm_hist_observe(&st->hist[MM_H_TTFT], r->ttft_us);
    if (r->itl)
        hist_add(&st->hist[MM_H_ITL], r->itl);
    pthread_mutex_unlock(&m->lock);
}

size_t mm_metrics_count(mm_metrics *m)
{
    pthread_mutex_lock(&m->lock);
    size_t n = m->n;
    pthread_mutex_unlock(&m->lock);
    return n;
}

int mm_metrics_get(mm_metrics *m, size_t id, mm_series_stats *out, mm_series_info *info)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&m->lock);
    if (id < m->n) {
        if (out)
            *out = m->s[id].st;
        if (info) {
            info->model = m->s[id].model;
            info->variant = m->s[id].variant;
            info->backend = m->s[id].backend;
        }
        rc = 0;
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

uint64_t mm_metrics_dropped(mm_metrics *m)
{
    pthread_mutex_lock(&m->lock);
    uint64_t d = m->dropped;
    pthread_mutex_unlock(&m->lock);
    return d;
}

void mm_metrics_set_sink(mm_metrics *m, const mm_metrics_sink_stats *s)
{
    pthread_mutex_lock(&m->lock);
    m->sink = *s;
    pthread_mutex_unlock(&m->lock);
}

void mm_metrics_get_sink(mm_metrics *m, mm_metrics_sink_stats *s)
{
    pthread_mutex_lock(&m->lock);
    *s = m->sink;
    pthread_mutex_unlock(&m->lock);
}

double mm_hist_quantile_ms(const mm_hist *h, double q)
{
    if (h->count == 0)
        return 0;
    double rank = q * (double)h->count;
    uint64_t seen = 0;
    for (size_t i = 0; i < MM_HIST_BUCKETS; i++) {
        if (h->bucket[i] == 0)
            continue;
        if ((double)(seen + h->bucket[i]) >= rank) {
            double lo = i ? mm_hist_bounds_ms[i - 1] : 0;
            double hi = i < MM_HIST_BUCKETS - 1 ? mm_hist_bounds_ms[i] : lo * 2;
            double frac = (rank - (double)seen) / (double)h->bucket[i];
            return lo + (hi - lo) * (frac < 0 ? 0 : frac > 1 ? 1 : frac);
        }
        seen += h->bucket[i];
    }
    return mm_hist_bounds_ms[MM_HIST_BUCKETS - 2];
}

/* Prometheus label values escape backslash, quote and newline. */
static int label(mm_buf *out, const char *v)
{
    int rc = 0;
    for (const char *p = v; *p && rc == 0; p++) {
        if (*p == '\\' || *p == '"')
            rc = mm_buf_printf(out, "\\%c", *p);
        else if (*p == '\n')
            rc = mm_buf_append_str(out, "\\n");
        else
            rc = mm_buf_append(out, p, 1);
    }
    return rc;
}

static int labels(mm_buf *out, const series *s)
{
    int rc = mm_buf_append_str(out, "model=\"");
    rc = rc ? rc : label(out, s->model);
    rc = rc ? rc : mm_buf_append_str(out, "\",variant=\"");
    rc = rc ? rc : label(out, s->variant);
    rc = rc ? rc : mm_buf_append_str(out, "\",backend=\"");
    rc = rc ? rc : label(out, s->backend);
    rc = rc ? rc : mm_buf_append_str(out, "\"");
    return rc;
}

typedef uint64_t (*field_fn)(const mm_series_stats *st);
static uint64_t f_requests(const mm_series_stats *st) { return st->requests; }
static uint64_t f_retries(const mm_series_stats *st) { return st->retries; }
static uint64_t f_fallbacks(const mm_series_stats *st) { return st->fallbacks; }
static uint64_t f_prompt(const mm_series_stats *st) { return st->prompt_tokens; }
static uint64_t f_completion(const mm_series_stats *st) { return st->completion_tokens; }

static int counter(mm_buf *out, mm_metrics *m, const char *name, const char *help, field_fn f)
{
    int rc = mm_buf_printf(out, "# HELP modelmux_%s %s\n# TYPE modelmux_%s counter\n", name, help, name);
    for (size_t i = 0; i < m->n && rc == 0; i++) {
        rc = mm_buf_printf(out, "modelmux_%s{", name);
        rc = rc ? rc : labels(out, &m->s[i]);
        rc = rc ? rc : mm_buf_printf(out, "} %llu\n", (unsigned long long)f(&m->s[i].st));
    }
    return rc;
}

int mm_metrics_prometheus(mm_metrics *m, mm_buf *out)
{
    pthread_mutex_lock(&m->lock);
    int rc = counter(out, m, "requests_total", "Requests finished, per public model, variant and backend.", f_requests);
    rc = rc ? rc : mm_buf_append_str(out, "# HELP modelmux_responses_total Answers sent to clients by status class (none: no answer sent).\n# TYPE modelmux_responses_total counter\n");
    static const char *const cls[6] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
    for (size_t i = 0; i < m->n && rc == 0; i++)
        for (int k = 0; k < 6 && rc == 0; k++) {
            if (!m->s[i].st.responses[k])
                continue;
            rc = mm_buf_append_str(out, "modelmux_responses_total{");
            rc = rc ? rc : labels(out, &m->s[i]);
            rc = rc ? rc : mm_buf_printf(out, ",status=\"%s\"} %llu\n", cls[k], (unsigned long long)m->s[i].st.responses[k]);
        }
    rc = rc ? rc : mm_buf_append_str(out, "# HELP modelmux_errors_total Failed requests or attempts by kind.\n# TYPE modelmux_errors_total counter\n");
    for (size_t i = 0; i < m->n && rc == 0; i++)
        for (int k = 1; k < MM_ERR__COUNT && rc == 0; k++) {
            if (!m->s[i].st.errors[k])
                continue;
            rc = mm_buf_append_str(out, "modelmux_errors_total{");
            rc = rc ? rc : labels(out, &m->s[i]);
            rc = rc ? rc : mm_buf_printf(out, ",kind=\"%s\"} %llu\n", err_names[k], (unsigned long long)m->s[i].st.errors[k]);
        }
    rc = rc ? rc : counter(out, m, "retries_total", "Retried attempts.", f_retries);
    rc = rc ? rc : counter(out, m, "fallbacks_total", "Requests served by a fallback model.", f_fallbacks);
    rc = rc ? rc : counter(out, m, "prompt_tokens_total", "Prompt tokens from the upstream usage object.", f_prompt);
    rc = rc ? rc : counter(out, m, "completion_tokens_total", "Completion tokens from the upstream usage object.", f_completion);
    for (int h = 0; h < MM_H__COUNT && rc == 0; h++) {
        rc = mm_buf_printf(out, "# HELP modelmux_%s %s\n# TYPE modelmux_%s histogram\n", hist_names[h],
                           h == MM_H_LATENCY ? "Request latency, start to last byte." :
                           h == MM_H_TTFT ? "Time to the first byte of the answer (first token for streams)." :
                           "Time between SSE events of streamed answers.", hist_names[h]);
        for (size_t i = 0; i < m->n && rc == 0; i++) {
            const mm_hist *hs = &m->s[i].st.hist[h];
            if (!hs->count)
                continue;
            uint64_t cum = 0;
            for (int b = 0; b < MM_HIST_BUCKETS && rc == 0; b++) {
                cum += hs->bucket[b];
                rc = mm_buf_printf(out, "modelmux_%s_bucket{", hist_names[h]);
                rc = rc ? rc : labels(out, &m->s[i]);
                if (b < MM_HIST_BUCKETS - 1)
                    rc = rc ? rc : mm_buf_printf(out, ",le=\"%g\"} %llu\n", mm_hist_bounds_ms[b] / 1000.0, (unsigned long long)cum);
                else
                    rc = rc ? rc : mm_buf_printf(out, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
            }
            rc = rc ? rc : mm_buf_printf(out, "modelmux_%s_sum{", hist_names[h]);
            rc = rc ? rc : labels(out, &m->s[i]);
            rc = rc ? rc : mm_buf_printf(out, "} %.6f\n", (double)hs->sum_us / 1e6);
            rc = rc ? rc : mm_buf_printf(out, "modelmux_%s_count{", hist_names[h]);
            rc = rc ? rc : labels(out, &m->s[i]);
            rc = rc ? rc : mm_buf_printf(out, "} %llu\n", (unsigned long long)hs->count);
        }
    }
    mm_metrics_sink_stats sk = m->sink;
    uint64_t dropped = m->dropped;
    pthread_mutex_unlock(&m->lock);
    rc = rc ? rc : mm_buf_printf(out,
        "# HELP modelmux_metrics_dropped_total Metric updates dropped (series cap reached).\n"
        "# TYPE modelmux_metrics_dropped_total counter\nmodelmux_metrics_dropped_total %llu\n"
        "# HELP modelmux_redis_connected Whether the Redis sink is connected (1) or not (0).\n"
        "# TYPE modelmux_redis_connected gauge\nmodelmux_redis_connected %d\n"
        "# HELP modelmux_redis_flushes_total Metric batches acknowledged by Redis.\n"
        "# TYPE modelmux_redis_flushes_total counter\nmodelmux_redis_flushes_total %llu\n"
        "# HELP modelmux_redis_failed_flushes_total Metric batches that failed and will be resent.\n"
        "# TYPE modelmux_redis_failed_flushes_total counter\nmodelmux_redis_failed_flushes_total %llu\n"
        "# HELP modelmux_redis_reconnects_total Reconnections to Redis.\n"
        "# TYPE modelmux_redis_reconnects_total counter\nmodelmux_redis_reconnects_total %llu\n",
        (unsigned long long)dropped, sk.redis_connected,
        (unsigned long long)sk.redis_flushes, (unsigned long long)sk.redis_failed_flushes,
        (unsigned long long)sk.redis_reconnects);
    return rc;
}
