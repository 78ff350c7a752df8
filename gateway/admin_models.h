/* admin_models.h: /admin/models, the fleet's control API: list models, add
 * one, remove one (it drains), change split or backend weights. Every
 * change edits a copy of the running configuration document and applies it
 * through the runtime, so the admin API, SIGHUP and a restart all see the
 * same rules (validation with JSON paths; unchanged models untouched). */
#ifndef MM_ADMIN_MODELS_H
#define MM_ADMIN_MODELS_H
#include <jansson.h>

#include "httpd.h"
#include "runtime.h"

/* Answer with j (reference taken) as JSON, not cached. */
void mm_admin_reply_json(mm_http_exchange *ex, int status, json_t *j);

/* Workers of a model, for GET (may be NULL): a new JSON array. */
typedef json_t *(*mm_admin_workers_fn)(void *arg, const char *model);

/* Handle the exchange if its target is under /admin/models; returns 1 when
 * it answered, 0 when the path is not ours. */
int mm_admin_models_route(mm_runtime *rt, mm_admin_workers_fn workers, void *warg,
                          mm_http_exchange *ex);
#endif
