/* runtime.h: the gateway's current routing table and its replacement while
 * traffic flows.
 *
 * Every request takes a reference on the router current when it starts and
 * drops it when it ends, so a new configuration (SIGHUP, admin API) swaps in
 * atomically for the next request while requests in flight finish on the
 * old one. Pools of models that did not change are shared between the two,
 * with their health, breaker and in-flight state.
 *
 * Process-level settings (listen, admin_listen, threads, size limits,
 * timeouts of client connections, redis, access_log) are read at start only:
 * a new configuration that changes them is applied for its models and the
 * rest is logged as needing a restart. */
#ifndef MM_RUNTIME_H
#define MM_RUNTIME_H
#include <jansson.h>

#include "config.h"
#include "router.h"

typedef struct mm_runtime mm_runtime;

/* Called on the thread that applied a change, after the swap. */
typedef void (*mm_runtime_listener)(void *arg, mm_router *now);

/* Load path (or text when path is NULL). *out owns everything. */
int  mm_runtime_new(const char *path, const char *text, mm_runtime **out, char *err,
                    size_t errlen);
void mm_runtime_free(mm_runtime *rt);
/* The configuration the process started with (process-level settings). */
const mm_gateway_cfg *mm_runtime_boot_cfg(const mm_runtime *rt);
/* A reference on the current router; drop it with mm_router_unref. */
mm_router *mm_runtime_acquire(mm_runtime *rt);
int  mm_runtime_add_listener(mm_runtime *rt, mm_runtime_listener fn, void *arg);
/* Re-read the config file. On any error nothing changes (err says why). */
int  mm_runtime_reload(mm_runtime *rt, char *err, size_t errlen);
/* Apply a whole new configuration document (the admin API edits a copy of
 * mm_runtime_source and passes it here). Validation errors change nothing. */
int  mm_runtime_apply_json(mm_runtime *rt, const json_t *doc, char *err, size_t errlen);
/* A new reference to the current configuration document, as written
 * (${ENV} placeholders unexpanded). */
json_t *mm_runtime_source(mm_runtime *rt);
/* Increments on every applied change. */
unsigned long mm_runtime_generation(mm_runtime *rt);
#endif
