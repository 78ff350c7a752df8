/* admin.h: the admin listener (default 127.0.0.1 only): backend state,
 * and later the dashboard and fleet control. A token is required when it
 * listens beyond loopback. Runs on one event loop. */
#ifndef MM_ADMIN_H
#define MM_ADMIN_H
#include "config.h"
#include "metrics.h"
#include "router.h"
#include "admin_models.h"
#include "runtime.h"

struct event_base;
typedef struct mm_admin mm_admin;

int  mm_admin_start(struct event_base *base, const mm_gateway_cfg *cfg, mm_runtime *rt,
                    mm_metrics *m, mm_admin **out, char *err, size_t errlen);
/* Where GET /admin/models gets each model's workers (the fleet). */
void mm_admin_set_workers(mm_admin *a, mm_admin_workers_fn fn, void *arg);
void mm_admin_free(mm_admin *a);
#endif
