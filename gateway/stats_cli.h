/* stats_cli.h: `modelmux-gateway stats`, the A/B report read back from the
 * Redis keys the sink writes (schema in docs/METRICS.md): per public model
 * and variant over the last N minutes, summed over backends and gateways,
 * requests, error rate, p50/p95 latency and time to first token, tokens per
 * second, and the observed traffic share against the configured weight.
 *
 * The report itself (mm_stats_report) knows nothing of Redis: it is fed
 * hash fields, so it can be tested without a server. */
#ifndef MM_STATS_CLI_H
#define MM_STATS_CLI_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* argv[0] is "stats". Exit status: 0 ok, 1 Redis or config trouble (with a
 * message on stderr), 2 bad usage. */
int mm_stats_main(int argc, char **argv);

typedef struct mm_stats_report mm_stats_report;

typedef struct mm_stats_window {
    const char *prefix;
    int         minutes;
    int64_t     first_minute;   /* unix minutes, both included */
    int64_t     last_minute;
} mm_stats_window;

int  mm_stats_report_new(mm_stats_report **out);
void mm_stats_report_free(mm_stats_report *r);
/* One field and value of a per-minute hash. Fields that do not follow the
 * schema are skipped and counted (shown as "skipped_fields"); returns 0 or
 * -ENOMEM / -E2BIG (too many rows). */
int  mm_stats_report_add(mm_stats_report *r, const char *field, size_t flen,
                         const char *val, size_t vlen);
/* One field of the weights hash: "<model>\t<variant>" -> weight. */
int  mm_stats_report_weight(mm_stats_report *r, const char *field, size_t flen,
                            const char *val, size_t vlen);
/* One field of the gateways hash: gateway id -> unix time of its last flush. */
int  mm_stats_report_gateway(mm_stats_report *r, const char *id, size_t idlen,
                             const char *val, size_t vlen);
/* The table (json 0) or the JSON document (json 1), appended to out. */
int  mm_stats_report_render(mm_stats_report *r, const mm_stats_window *w, int json, mm_buf *out);
#endif
