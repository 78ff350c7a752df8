/* metrics.h: in-memory request metrics, aggregated per series
 * (public model, variant, backend). Every event-loop thread records into one
 * table behind a mutex (held for a lookup and a few adds); readers are the
 * Prometheus endpoint, the Redis sink and the dashboard.
 *
 * Series are never removed and their ids are dense and stable (0..count-1),
 * so a reader can keep per-series state of its own (the Redis sink keeps
 * what it has already flushed) in a plain array. The table is capped:
 * records for a new series beyond max_series are dropped and counted. */
#ifndef MM_METRICS_H
#define MM_METRICS_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

typedef enum mm_err_kind {
    MM_ERR_NONE = 0,
    MM_ERR_CONNECT,        /* connect refused/reset/broken framing */
    MM_ERR_TIMEOUT,        /* connect, first-byte, idle or total timeout */
    MM_ERR_5XX,            /* upstream answered 5xx */
    MM_ERR_429,            /* upstream or gateway answered 429 */
    MM_ERR_BREAKER_OPEN,   /* nothing available: down, open or cooling */
    MM_ERR_CLIENT_ABORT,   /* the client left before the end */
    MM_ERR_MIDSTREAM,      /* the upstream failed after the first byte */
    MM_ERR_CLIENT,         /* 4xx from the gateway itself (bad request, unknown model) */
    MM_ERR__COUNT
} mm_err_kind;

typedef enum mm_hist_kind {
    MM_H_LATENCY = 0,      /* request start to last byte */
    MM_H_TTFT,             /* request start to first byte of the answer */
    MM_H_ITL,              /* between SSE events of a stream */
    MM_H__COUNT
} mm_hist_kind;

/* Bucket upper bounds in milliseconds; the last bucket is +Inf. Chosen for
 * LLM traffic: inter-token times of a few ms, first tokens in 0.1-10 s,
 * whole generations up to minutes. */
#define MM_HIST_BUCKETS 18
extern const double mm_hist_bounds_ms[MM_HIST_BUCKETS - 1];

typedef struct mm_hist {
    uint64_t bucket[MM_HIST_BUCKETS];   /* not cumulative */
    uint64_t count;
    uint64_t sum_us;
} mm_hist;

typedef struct mm_series_stats {
    uint64_t requests;
    uint64_t responses[6];       /* [k] = kxx answers to the client, [0] none sent */
    uint64_t errors[MM_ERR__COUNT];
    uint64_t retries;
    uint64_t fallbacks;
    uint64_t prompt_tokens;
    uint64_t completion_tokens;
    mm_hist  hist[MM_H__COUNT];
} mm_series_stats;

typedef struct mm_series_info {
    const char *model;     /* public name the client asked for ("" default pool) */
    const char *variant;   /* model that served (split variant or fallback) */
    const char *backend;   /* backend url, "" when none was reached */
} mm_series_info;

/* One finished request, as the proxy saw it. */
typedef struct mm_request_record {
    const char *model, *variant, *backend;
    int         status;           /* sent to the client; 0 if none */
    mm_err_kind err;
    int         retries;
    int         fallback;         /* served by a fallback model */
    int64_t     prompt_tokens;    /* -1 unknown */
    int64_t     completion_tokens;
    uint64_t    latency_us;
    uint64_t    ttft_us;          /* 0 = no first byte */
    const mm_hist *itl;           /* NULL or the request's inter-token histogram */
    int         attempt_only;     /* a failed attempt: only errors[err] counts */
} mm_request_record;

typedef struct mm_metrics mm_metrics;

/* Process-wide counters of the Redis sink, shown on /metrics. */
typedef struct mm_metrics_sink_stats {
    int      redis_configured;
    int      redis_connected;
    uint64_t redis_flushes;        /* batches acknowledged */
    uint64_t redis_failed_flushes; /* batches that failed (retried later) */
    uint64_t redis_reconnects;
} mm_metrics_sink_stats;

int    mm_metrics_new(size_t max_series, mm_metrics **out);
void   mm_metrics_free(mm_metrics *m);
void   mm_metrics_record(mm_metrics *m, const mm_request_record *r);
/* Add one observation to a request-local histogram (no lock). */
void   mm_hist_observe(mm_hist *h, uint64_t us);
/* Series access for readers. */
size_t mm_metrics_count(mm_metrics *m);
/* Copy series id's counters and names (names stay valid while m lives). */
int    mm_metrics_get(mm_metrics *m, size_t id, mm_series_stats *out, mm_series_info *info);
uint64_t mm_metrics_dropped(mm_metrics *m);   /* records lost to the series cap */
/* The sink updates these (under the metrics lock). */
void   mm_metrics_set_sink(mm_metrics *m, const mm_metrics_sink_stats *s);
void   mm_metrics_get_sink(mm_metrics *m, mm_metrics_sink_stats *s);
/* Render everything in the Prometheus text format (version 0.0.4). */
int    mm_metrics_prometheus(mm_metrics *m, mm_buf *out);
/* Estimate a quantile (0..1) from a histogram in ms, interpolating linearly
 * inside the bucket; 0 when empty. */
double mm_hist_quantile_ms(const mm_hist *h, double q);
#endif
