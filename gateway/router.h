/* router.h: the runtime routing table built from the config.
 *
 * A route is what a public model name resolves to: either a pool of backends
 * or a split between other routes (A/B variants). Pools are shared by every
 * event-loop thread; their balancer state sits behind a per-pool mutex held
 * only for the O(n) pick. */
#ifndef MM_ROUTER_H
#define MM_ROUTER_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "balance.h"
#include "config.h"

typedef struct mm_backend {
    const mm_backend_cfg *cfg;
    size_t index;              /* position in its pool */
    int    outstanding;        /* in flight; guarded by the pool lock */
} mm_backend;

typedef struct mm_pool {
    const mm_model_cfg *cfg;
    const char   *name;        /* model name ("" for the default pool) */
    mm_backend   *backends;
    size_t        nbackends;
    pthread_mutex_t lock;
    mm_swrr_peer *swrr;
    int          *weights;
    int          *outstanding; /* mirror for mm_balance_least */
    uint64_t      rng;
} mm_pool;

typedef struct mm_route {
    const mm_model_cfg *cfg;
    const char   *name;
    mm_pool      *pool;        /* a plain model */
    struct mm_route **variants;/* a split */
    const char  **variant_ids;
    int          *variant_weights;
    size_t        nvariants;
} mm_route;

typedef struct mm_router {
    const mm_gateway_cfg *cfg;
    mm_route *routes;
    size_t    nroutes;
    mm_pool  *pools;           /* one per plain model, same order as routes */
    mm_pool  *default_pool;    /* NULL when not configured */
    char     *models_json;     /* the /v1/models answer, built once */
    size_t    models_json_len;
    char     *names_list;      /* "a, b, c" for 404 messages */
} mm_router;

int  mm_router_new(const mm_gateway_cfg *cfg, mm_router **out, char *err, size_t errlen);
void mm_router_free(mm_router *r);

mm_route *mm_router_find(mm_router *r, const char *name, size_t len);

/* For a split: the variant for this request. key (len > 0) makes it sticky
 * through weighted rendezvous hashing; without a key it is weighted random.
 * A plain route returns itself. */
mm_route *mm_route_pick_variant(mm_route *route, const char *key, size_t key_len,
                                uint64_t *rng);

/* Pick a backend not in `tried` (a bitmap by backend index, may be NULL) and
 * count it as outstanding. NULL when none is eligible. */
mm_backend *mm_pool_pick(mm_pool *p, const uint64_t *tried);
void        mm_pool_release(mm_pool *p, mm_backend *b);
#define MM_POOL_MAX_BACKENDS 256
#endif
