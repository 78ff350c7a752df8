/* healthcheck.h: active health checks of every backend (HAProxy style),
 * run on one event loop with its own libcurl multi handle. Results go to the
 * backend's mm_health through mm_pool_health_result. */
#ifndef MM_HEALTHCHECK_H
#define MM_HEALTHCHECK_H
#include "router.h"

struct event_base;
typedef struct mm_healthcheck mm_healthcheck;

int  mm_healthcheck_start(struct event_base *base, mm_router *r, mm_healthcheck **out);
/* Check exactly the backends of r from now on: probes of pools r still uses
 * go on untouched, others stop, new ones start. Runs on the checker's loop. */
int  mm_healthcheck_sync(mm_healthcheck *hc, mm_router *r);
void mm_healthcheck_free(mm_healthcheck *hc);
#endif
