/* redis_sink.h: flushes the in-memory metrics (metrics.h) into Redis with
 * the hiredis asynchronous API on one of the gateway's libevent loops.
 *
 * Every flush_ms the sink sends one batch: the difference between each
 * series' counters now and what Redis has already acknowledged, as one EVAL
 * of a small script that adds it to the per-minute hash (key schema in
 * docs/METRICS.md). A batch carries a sequence number that the script
 * checks against the last one applied for this gateway run, so a batch
 * whose outcome is unknown (timeout, connection lost after sending) can be
 * sent again without being counted twice. Until a batch is acknowledged
 * nothing is forgotten: the next one carries the same deltas, or more.
 *
 * Redis being down, slow or restarting never blocks the loop: the host name
 * is resolved on a short-lived thread, every wait (lookup, connect, AUTH,
 * batch) has a deadline of max(5 s, 5 x flush_ms) capped at 60 s, after
 * which the connection is dropped, and reconnects back off exponentially
 * (100 ms doubling to 10 s, +-20% jitter). One log line per change of
 * state, never one per batch. Memory is bounded by the metrics table's
 * series cap: the sink keeps two copies of it (acknowledged and in flight)
 * and at most one batch of at most MM_REDIS_BATCH_FIELDS counters; nothing
 * is ever dropped by the sink (the only dropped updates are the metrics
 * table's, mm_metrics_dropped). */
#ifndef MM_REDIS_SINK_H
#define MM_REDIS_SINK_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "config.h"
#include "metrics.h"

struct event_base;

/* Counters per batch; a series is never split across batches, and series
 * that do not fit go into the next one. */
#define MM_REDIS_BATCH_FIELDS 8192

/* One configured split weight, (public model, variant) -> weight, so that
 * `modelmux-gateway stats` can compare the observed traffic share against
 * the configured one. */
typedef struct mm_redis_weight {
    const char *model;
    const char *variant;
    int         weight;
} mm_redis_weight;

typedef struct mm_redis_weights {
    mm_redis_weight *v;
    size_t           n;
} mm_redis_weights;

/* Fill *out from every split model of cfg (strings point into cfg). Free
 * with mm_redis_weights_free. */
int  mm_redis_weights_from_cfg(const mm_gateway_cfg *cfg, mm_redis_weights *out);
void mm_redis_weights_free(mm_redis_weights *w);

typedef struct mm_redis_sink mm_redis_sink;

/* Start the sink on `base` (the loop must be the only thread that touches
 * the sink afterwards; the base must have been created after
 * evthread_use_pthreads(), as the resolver thread wakes it). With no Redis configured (cfg->url NULL) it starts
 * nothing, returns 0 with *out NULL and marks the metrics "not configured".
 * gateway_id names this gateway in Redis (e.g. "host:port"); weights may be
 * NULL. Everything passed in is copied. The first connection attempt is
 * made from the loop, so start never blocks and never fails because Redis
 * is unreachable. */
int  mm_redis_sink_start(struct event_base *base, const mm_redis_cfg *cfg, mm_metrics *m,
                         const char *gateway_id, const mm_redis_weights *weights,
                         mm_redis_sink **out, char *err, size_t errlen);
/* At shutdown, after the loops have stopped: send what is not yet
 * acknowledged with the synchronous API, waiting at most about timeout_ms.
 * Returns 0 when everything was acknowledged, a negative errno otherwise. */
int  mm_redis_sink_final_flush(mm_redis_sink *s, int timeout_ms);
/* Stop and release (the loop must not be running the sink's events, e.g.
 * it has stopped, or this is called from the loop's own thread). */
void mm_redis_sink_free(mm_redis_sink *s);

/* The key schema, shared by the sink and `stats`.
 *
 * A series' counters become hash fields "<model>\t<variant>\t<backend>\t<metric>"
 * where <metric> is one of MM_REDIS_NMETRICS names ("requests", "resp_2xx",
 * "err_timeout", "latency_b3", "ttft_count", ...). */
#define MM_REDIS_NMETRICS (1 + 6 + (MM_ERR__COUNT - 1) + 4 + MM_H__COUNT * (MM_HIST_BUCKETS + 2))

/* Name of metric i (0 <= i < MM_REDIS_NMETRICS) into buf; 0 or -EINVAL. */
int       mm_redis_metric_name(size_t i, char *buf, size_t len);
/* The counter that metric i names inside s. */
uint64_t *mm_redis_metric_slot(mm_series_stats *s, size_t i);
/* "connect", "timeout", ... as in "err_<kind>"; "" for MM_ERR_NONE. */
const char *mm_redis_err_name(mm_err_kind k);
/* Index of the metric called name[0..len), or -1. */
int       mm_redis_metric_find(const char *name, size_t len);
/* Append "<model>\t<variant>\t<backend>\t<metric i>" to out. A tab or any
 * control character inside a name becomes '_' so the field always splits
 * back into exactly four parts. */
int       mm_redis_field(mm_buf *out, const mm_series_info *info, size_t i);
#endif
