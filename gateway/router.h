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
#include "breaker.h"
#include "config.h"
#include "health.h"

struct event;

/* Everything mutable in a backend is guarded by its pool's lock. */
typedef struct mm_backend {
    const mm_backend_cfg *cfg;
    struct mm_pool *pool;
    size_t   index;              /* position in its pool */
    int      outstanding;        /* requests in flight */
    mm_health  health;
    mm_breaker breaker;
    uint64_t cooldown_until_ms;  /* from Retry-After on 429/503 */
    uint64_t requests, failures; /* totals, for the admin view */
    uint64_t last_change_ms;     /* last health transition */
} mm_backend;

/* A request waiting for a backend slot (max_requests reached). */
typedef struct mm_waiter {
    struct mm_waiter *prev, *next;
    struct event     *wake;      /* activated (from any thread) on a free slot */
    int               queued;
} mm_waiter;

/* Outcome of one attempt, as the breaker and health see it. */
typedef enum mm_outcome {
    MM_OUTCOME_OK = 0,       /* any answer but 5xx/429: client errors never count */
    MM_OUTCOME_HTTP_FAIL,    /* 5xx or 429 */
    MM_OUTCOME_CONN_FAIL,    /* connect error, reset, timeout, broken framing */
    MM_OUTCOME_CANCEL,       /* client left before an outcome */
} mm_outcome;

/* Why mm_pool_pick found nothing. */
typedef struct mm_pick_info {
    int      busy;           /* some backend is usable but at max_requests */
    int      untried;        /* backends not yet tried by this request */
    uint64_t retry_at_ms;    /* earliest time an unusable backend may be tried */
} mm_pick_info;

/* A configuration shared by the routers and pools built from it: freed when
 * the last of them goes (requests still running on an older generation keep
 * theirs alive). */
typedef struct mm_cfg_holder {
    mm_gateway_cfg *cfg;
    int             refs;          /* atomic */
} mm_cfg_holder;

mm_cfg_holder *mm_cfg_holder_new(mm_gateway_cfg *cfg);
void           mm_cfg_holder_ref(mm_cfg_holder *h);
void           mm_cfg_holder_unref(mm_cfg_holder *h);

typedef struct mm_pool {
    int           refs;        /* atomic: routers and the health checker */
    mm_cfg_holder *holder;     /* keeps cfg alive */
    const mm_model_cfg *cfg;
    const char   *name;        /* model name ("" for the default pool) */
    mm_backend   *backends;
    size_t        nbackends;
    pthread_mutex_t lock;
    mm_swrr_peer *swrr;
    int          *weights;
    int          *outstanding; /* mirror for mm_balance_least */
    uint64_t      rng;
    mm_waiter    *queue_head, *queue_tail;
    int           queued;
    int           published;   /* atomic: routable and listed (see mm_router_find) */
    struct mm_pool *standby_for; /* referenced: the rebuilt pool this one serves for until it is published */
    struct mm_pool *reg_prev, *reg_next; /* registry of live pools */
} mm_pool;

typedef struct mm_route {
    const mm_model_cfg *cfg;
    const char   *name;
    mm_pool      *pool;        /* a plain model */
    mm_pool      *standby;     /* referenced: the previous generation's pool, serving
                                  while a rebuilt pool's workers start (blue/green) */
    struct mm_route **variants;/* a split */
    const char  **variant_ids;
    int          *variant_weights;
    size_t        nvariants;
} mm_route;

typedef struct mm_router {
    int       refs;            /* atomic: the runtime's current pointer + requests */
    mm_cfg_holder *holder;
    const mm_gateway_cfg *cfg;
    mm_route *routes;
    size_t    nroutes;
    mm_pool **pools;           /* one per plain model (NULL for splits), same order as routes */
    mm_pool  *default_pool;    /* NULL when not configured */
} mm_router;

/* Build a router for holder's config (taking a reference). Pools of models
 * that did not change against prev (may be NULL) are shared with it, runtime
 * state (health, breaker, in-flight) included; a change of backend weights
 * alone is applied to the shared pool in place. The result has one
 * reference. */
int  mm_router_new(mm_cfg_holder *holder, mm_router *prev, mm_router **out, char *err,
                   size_t errlen);
void mm_router_ref(mm_router *r);
void mm_router_unref(mm_router *r);
void mm_pool_ref(mm_pool *p);
void mm_pool_unref(mm_pool *p);

/* The route for a public name, or NULL. A model whose backends are all
 * launched workers is not routable (nor listed) until one of them has been
 * healthy once: it is published then. */
mm_route *mm_router_find(mm_router *r, const char *name, size_t len);
/* The pool that serves a plain route now: its own once published, else the
 * standby pool of the previous generation. */
mm_pool  *mm_route_pool(const mm_route *rt);
/* The /v1/models answer and the "a, b, c" list for 404 messages, built now
 * (publication changes as workers become ready). Caller frees. */
char *mm_router_models_json(mm_router *r, size_t *len);
char *mm_router_names(mm_router *r);
/* Requests in flight to backend url in any live pool, current or retired
 * (a removed model drains before its workers stop). */
int   mm_pools_in_flight(const char *url);

/* For a split: the variant for this request. key (len > 0) makes it sticky
 * through weighted rendezvous hashing; without a key it is weighted random.
 * A plain route returns itself. */
mm_route *mm_route_pick_variant(mm_route *route, const char *key, size_t key_len,
                                uint64_t *rng);

/* Pick a backend not in `tried` (a bitmap by backend index, may be NULL)
 * that is up, admitted by its breaker, not cooling down after Retry-After
 * and under its max_requests; count it as outstanding. NULL when none is
 * eligible, with the reason in *info. */
mm_backend *mm_pool_pick(mm_pool *p, const uint64_t *tried, uint64_t now_ms,
                         mm_pick_info *info);
/* The attempt on b ended. retry_after_ms > 0 cools b down that long. Wakes
 * one queued waiter. */
void        mm_pool_release(mm_pool *p, mm_backend *b, mm_outcome o, int retry_after_ms,
                            uint64_t now_ms);
/* Queue a waiter (max_queue per pool): 0, or -EAGAIN when the queue is full. */
int         mm_pool_enqueue(mm_pool *p, mm_waiter *w);
/* Remove a waiter if still queued (timeout, client gone). */
void        mm_pool_dequeue(mm_pool *p, mm_waiter *w);
/* Feed an active health-check result; returns 1 when up/down changed. */
int         mm_pool_health_result(mm_pool *p, mm_backend *b, mm_health_result r, uint64_t now_ms);
/* Every pool, default pool included, for the health checker and admin. */
size_t      mm_router_npools(const mm_router *r);
mm_pool    *mm_router_pool(mm_router *r, size_t i);

uint64_t mm_now_ms(void);
#define MM_POOL_MAX_BACKENDS 256
#endif
