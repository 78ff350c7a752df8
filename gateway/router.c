/* router.c: routes, pools and backend picks (see router.h). */
#include "router.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "buf.h"
#include "jsonutil.h"
#include "log.h"

uint64_t mm_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Every live pool, current or retired, for mm_pools_in_flight. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static mm_pool *registry;

static void registry_add(mm_pool *p)
{
    pthread_mutex_lock(&registry_lock);
    p->reg_next = registry;
    if (registry)
        registry->reg_prev = p;
    registry = p;
    pthread_mutex_unlock(&registry_lock);
}

static void registry_remove(mm_pool *p)
{
    pthread_mutex_lock(&registry_lock);
    if (p->reg_prev)
        p->reg_prev->reg_next = p->reg_next;
    else if (registry == p)
        registry = p->reg_next;
    if (p->reg_next)
        p->reg_next->reg_prev = p->reg_prev;
    pthread_mutex_unlock(&registry_lock);
}

int mm_pools_in_flight(const char *url)
{
    int n = 0;
    pthread_mutex_lock(&registry_lock);
    for (mm_pool *p = registry; p; p = p->reg_next) {
        /* Serving for a rebuilt pool whose workers are not ready: busy. */
        if (p->standby_for && !__atomic_load_n(&p->standby_for->published, __ATOMIC_ACQUIRE))
            for (size_t i = 0; i < p->nbackends; i++)
                if (strcmp(p->backends[i].cfg->url, url) == 0)
                    n++;
        pthread_mutex_lock(&p->lock);
        for (size_t i = 0; i < p->nbackends; i++)
            if (strcmp(p->backends[i].cfg->url, url) == 0)
                n += p->backends[i].outstanding;
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&registry_lock);
    return n;
}

mm_cfg_holder *mm_cfg_holder_new(mm_gateway_cfg *cfg)
{
    mm_cfg_holder *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->cfg = cfg;
    h->refs = 1;
    return h;
}

void mm_cfg_holder_ref(mm_cfg_holder *h)
{
    __atomic_add_fetch(&h->refs, 1, __ATOMIC_RELAXED);
}

void mm_cfg_holder_unref(mm_cfg_holder *h)
{
    if (!h || __atomic_sub_fetch(&h->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    mm_config_free(h->cfg);
    free(h);
}

static int pool_init(mm_pool *p, mm_cfg_holder *holder, const mm_model_cfg *m, const char *name,
                     char *err, size_t errlen)
{
    p->refs = 1;
    p->holder = holder;
    mm_cfg_holder_ref(holder);
    pthread_mutex_init(&p->lock, NULL);
    p->cfg = m;
    p->name = name;
    p->nbackends = m->nbackends;
    if (p->nbackends > MM_POOL_MAX_BACKENDS) {
        snprintf(err, errlen, "model %s: more than %d backends", name, MM_POOL_MAX_BACKENDS);
        return -EINVAL;
    }
    p->backends = calloc(p->nbackends ? p->nbackends : 1, sizeof *p->backends);
    p->swrr = calloc(p->nbackends ? p->nbackends : 1, sizeof *p->swrr);
    p->weights = calloc(p->nbackends ? p->nbackends : 1, sizeof *p->weights);
    p->outstanding = calloc(p->nbackends ? p->nbackends : 1, sizeof *p->outstanding);
    if (!p->backends || !p->swrr || !p->weights || !p->outstanding) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < p->nbackends; i++) {
        mm_backend *b = &p->backends[i];
        b->cfg = &m->backends[i];
        b->pool = p;
        b->index = i;
        /* Static backends start up so traffic flows at once; the first
         * failed checks take a dead one out within `fall` intervals. A
         * launched worker starts down: it gets traffic once its /health
         * says ready. */
        mm_health_init(&b->health, &m->health, b->cfg->launch ? 0 : 1);
        mm_breaker_init(&b->breaker, &m->breaker);
        p->weights[i] = m->backends[i].weight;
    }
    mm_swrr_init(p->swrr, p->nbackends, p->weights);
    p->rng = mm_hash64(name, strlen(name), (uint64_t)time(NULL)) | 1;
    return 0;
}

static void pool_free(mm_pool *p)
{
    registry_remove(p);
    if (p->standby_for)
        mm_pool_unref(p->standby_for);
    pthread_mutex_destroy(&p->lock);
    free(p->backends);
    free(p->swrr);
    free(p->weights);
    free(p->outstanding);
    mm_cfg_holder_unref(p->holder);
    free(p);
}

void mm_pool_ref(mm_pool *p)
{
    __atomic_add_fetch(&p->refs, 1, __ATOMIC_RELAXED);
}

void mm_pool_unref(mm_pool *p)
{
    if (p && __atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) == 0)
        pool_free(p);
}

static mm_pool *pool_new(mm_cfg_holder *holder, const mm_model_cfg *m, const char *name,
                         char *err, size_t errlen)
{
    mm_pool *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (pool_init(p, holder, m, name, err, errlen) != 0) {
        pool_free(p);
        return NULL;
    }
    /* Published at once unless every backend is a launched worker. */
    int all_launched = m->nbackends > 0;
    for (size_t i = 0; i < m->nbackends; i++)
        all_launched &= m->backends[i].launch != NULL && m->health.enabled;
    p->published = !all_launched;
    registry_add(p);
    return p;
}

static int str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int strv_eq(char **a, size_t na, char **b, size_t nb)
{
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++)
        if (!str_eq(a[i], b[i]))
            return 0;
    return 1;
}

static int launch_eq(const mm_launch_cfg *a, const mm_launch_cfg *b)
{
    if (!a || !b)
        return a == b;
    return str_eq(a->model, b->model) && str_eq(a->gpus, b->gpus) && str_eq(a->device, b->device) &&
           a->port == b->port && a->share_gpus == b->share_gpus &&
           a->startup_timeout_ms == b->startup_timeout_ms && strv_eq(a->args, a->nargs, b->args, b->nargs) &&
           strv_eq(a->command, a->ncommand, b->command, b->ncommand);
}

/* Whether a pool built for a can serve b unchanged but for backend weights:
 * the same backends in the same order with the same settings. */
static int pool_compatible(const mm_model_cfg *a, const mm_model_cfg *b)
{
    if (a->nbackends != b->nbackends || a->strategy != b->strategy || a->retries != b->retries ||
        a->max_requests != b->max_requests || a->max_queue != b->max_queue ||
        a->queue_timeout_ms != b->queue_timeout_ms ||
        memcmp(&a->timeouts, &b->timeouts, sizeof a->timeouts) != 0 ||
        a->health.interval_ms != b->health.interval_ms || a->health.timeout_ms != b->health.timeout_ms ||
        a->health.rise != b->health.rise || a->health.fall != b->health.fall ||
        a->health.enabled != b->health.enabled || !str_eq(a->health.path, b->health.path) ||
        memcmp(&a->breaker, &b->breaker, sizeof a->breaker) != 0)
        return 0;
    for (size_t i = 0; i < a->nbackends; i++) {
        const mm_backend_cfg *x = &a->backends[i], *y = &b->backends[i];
        if (!str_eq(x->url, y->url) || !str_eq(x->served_model, y->served_model) ||
            !str_eq(x->api_key, y->api_key) || x->max_requests != y->max_requests ||
            memcmp(&x->timeouts, &y->timeouts, sizeof x->timeouts) != 0 ||
            !launch_eq(x->launch, y->launch))
            return 0;
    }
    return 1;
}

/* New weights for a shared pool, applied atomically for the next pick. */
static void pool_set_weights(mm_pool *p, const mm_model_cfg *m)
{
    pthread_mutex_lock(&p->lock);
    int changed = 0;
    for (size_t i = 0; i < p->nbackends; i++)
        if (p->weights[i] != m->backends[i].weight) {
            p->weights[i] = m->backends[i].weight;
            changed = 1;
        }
    if (changed)
        mm_swrr_init(p->swrr, p->nbackends, p->weights);
    pthread_mutex_unlock(&p->lock);
}

/* A model changed in a way that needs a new pool (another setting, another
 * backend list): backends that are still the same server (same url) keep
 * their health, so a model whose workers keep running is not taken out of
 * service (or unpublished) by an unrelated change. */
static void pool_inherit(mm_pool *p, mm_router *prev, const char *name, int is_default,
                         mm_pool **out_standby)
{
    mm_pool *old = NULL;
    if (!prev)
        return;
    if (is_default)
        old = prev->default_pool;
    for (size_t i = 0; !is_default && i < prev->nroutes && !old; i++)
        if (prev->pools[i] && strcmp(prev->routes[i].name, name) == 0)
            old = prev->pools[i];
    if (!old)
        return;
    pthread_mutex_lock(&old->lock);
    int any = 0;
    for (size_t i = 0; i < p->nbackends; i++)
        for (size_t j = 0; j < old->nbackends; j++)
            if (strcmp(p->backends[i].cfg->url, old->backends[j].cfg->url) == 0) {
                mm_health *h = &p->backends[i].health;
                const mm_health *o = &old->backends[j].health;
                if (h->cfg->enabled) {
                    h->up = o->up;
                    h->loading = o->loading;
                }
                any |= o->up;
            }
    int was_published = __atomic_load_n(&old->published, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&old->lock);
    if (was_published && any)
        __atomic_store_n(&p->published, 1, __ATOMIC_RELEASE);
    /* Blue/green: new workers (another port, other args) are not ready yet;
     * the previous pool keeps serving until they are, and its workers are
     * not drained meanwhile (mm_pools_in_flight counts it busy). */
    if (was_published && !__atomic_load_n(&p->published, __ATOMIC_ACQUIRE) && !is_default &&
        !old->standby_for && out_standby) {
        mm_pool_ref(p);
        old->standby_for = p;
        mm_pool_ref(old);
        *out_standby = old;
    }
}

static mm_pool *find_prev_pool(mm_router *prev, const mm_model_cfg *m, int is_default)
{
    if (!prev)
        return NULL;
    mm_pool *p = NULL;
    if (is_default) {
        p = prev->default_pool;
    } else {
        for (size_t i = 0; i < prev->nroutes && !p; i++)
            if (prev->pools[i] && strcmp(prev->routes[i].name, m->name) == 0)
                p = prev->pools[i];
    }
    return p && pool_compatible(p->cfg, m) ? p : NULL;
}

static int route_published(const mm_route *rt)
{
    return rt->nvariants || !rt->pool || __atomic_load_n(&rt->pool->published, __ATOMIC_ACQUIRE) ||
           rt->standby;
}

mm_pool *mm_route_pool(const mm_route *rt)
{
    if (rt->standby && !__atomic_load_n(&rt->pool->published, __ATOMIC_ACQUIRE))
        return rt->standby;
    return rt->pool;
}

char *mm_router_models_json(mm_router *r, size_t *len)
{
    mm_buf b;
    mm_buf_init(&b, 16 * 1024 * 1024);
    long long created = (long long)time(NULL);
    int rc = mm_buf_append_str(&b, "{\"object\":\"list\",\"data\":[");
    int first = 1;
    for (size_t i = 0; i < r->nroutes && rc == 0; i++) {
        if (!route_published(&r->routes[i]))
            continue;
        const char *name = r->routes[i].name;
        rc = mm_buf_append_str(&b, first ? "{\"id\":" : ",{\"id\":");
        first = 0;
        if (rc == 0)
            rc = mm_json_append_str(&b, name, strlen(name));
        if (rc == 0)
            rc = mm_buf_printf(&b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"modelmux\"}",
                               created);
    }
    if (rc == 0)
        rc = mm_buf_append_str(&b, "]}");
    if (rc) {
        mm_buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}

char *mm_router_names(mm_router *r)
{
    mm_buf b;
    mm_buf_init(&b, 1024 * 1024);
    int rc = 0, first = 1;
    for (size_t i = 0; i < r->nroutes && rc == 0; i++) {
        if (!route_published(&r->routes[i]))
            continue;
        rc = mm_buf_printf(&b, "%s%s", first ? "" : ", ", r->routes[i].name);
        first = 0;
    }
    if (rc) {
        mm_buf_free(&b);
        return NULL;
    }
    return b.data ? b.data : strdup("");
}

/* A route by name whether published or not (building splits). */
static mm_route *route_any(mm_router *r, const char *name)
{
    for (size_t i = 0; i < r->nroutes; i++)
        if (strcmp(r->routes[i].name, name) == 0)
            return &r->routes[i];
    return NULL;
}

int mm_router_new(mm_cfg_holder *holder, mm_router *prev, mm_router **out, char *err,
                  size_t errlen)
{
    int rc = -ENOMEM;
    const mm_gateway_cfg *cfg = holder->cfg;
    mm_router *r = calloc(1, sizeof *r);
    if (!r)
        goto fail;
    r->refs = 1;
    r->holder = holder;
    mm_cfg_holder_ref(holder);
    r->cfg = cfg;
    r->nroutes = cfg->nmodels;
    r->routes = calloc(cfg->nmodels ? cfg->nmodels : 1, sizeof *r->routes);
    r->pools = calloc(cfg->nmodels ? cfg->nmodels : 1, sizeof *r->pools);
    if (!r->routes || !r->pools)
        goto fail;
    for (size_t i = 0; i < cfg->nmodels; i++) {
        const mm_model_cfg *m = &cfg->models[i];
        r->routes[i].cfg = m;
        r->routes[i].name = m->name;
        if (m->nsplit)
            continue;
        mm_pool *p = find_prev_pool(prev, m, 0);
        if (p) {
            mm_pool_ref(p);
            pool_set_weights(p, m);
            /* The same pool goes on: so does the standby it may have. */
            for (size_t k = 0; prev && k < prev->nroutes; k++)
                if (prev->pools[k] == p && prev->routes[k].standby &&
                    !__atomic_load_n(&p->published, __ATOMIC_ACQUIRE)) {
                    r->routes[i].standby = prev->routes[k].standby;
                    mm_pool_ref(r->routes[i].standby);
                }
        } else {
            p = pool_new(holder, m, m->name, err, errlen);
            if (!p) {
                rc = -EINVAL;
                goto fail;
            }
            pool_inherit(p, prev, m->name, 0, &r->routes[i].standby);
        }
        r->pools[i] = p;
        r->routes[i].pool = p;
    }
    /* Second pass: splits point at routes, which now all exist. */
    for (size_t i = 0; i < cfg->nmodels; i++) {
        const mm_model_cfg *m = &cfg->models[i];
        mm_route *rt = &r->routes[i];
        if (m->nsplit == 0)
            continue;
        rc = -ENOMEM;
        rt->nvariants = m->nsplit;
        rt->variants = calloc(m->nsplit, sizeof *rt->variants);
        rt->variant_ids = calloc(m->nsplit, sizeof *rt->variant_ids);
        rt->variant_weights = calloc(m->nsplit, sizeof *rt->variant_weights);
        if (!rt->variants || !rt->variant_ids || !rt->variant_weights)
            goto fail;
        for (size_t j = 0; j < m->nsplit; j++) {
            mm_route *v = route_any(r, m->split[j].model);
            if (!v || v->nvariants) {
                snprintf(err, errlen, "model %s: split variant %s is not a plain model", m->name,
                         m->split[j].model);
                rc = -EINVAL;
                goto fail;
            }
            rt->variants[j] = v;
            rt->variant_ids[j] = v->name;
            rt->variant_weights[j] = m->split[j].weight;
        }
    }
    if (cfg->default_pool) {
        mm_pool *p = find_prev_pool(prev, cfg->default_pool, 1);
        if (p) {
            mm_pool_ref(p);
            pool_set_weights(p, cfg->default_pool);
        } else {
            p = pool_new(holder, cfg->default_pool, "", err, errlen);
            if (!p) {
                rc = -EINVAL;
                goto fail;
            }
            pool_inherit(p, prev, "", 1, NULL);
        }
        r->default_pool = p;
    }
    *out = r;
    return 0;
fail:
    if (rc == -ENOMEM)
        snprintf(err, errlen, "out of memory");
    mm_router_unref(r);
    *out = NULL;
    return rc;
}

static void router_free(mm_router *r)
{
    for (size_t i = 0; r->routes && i < r->nroutes; i++) {
        mm_pool_unref(r->routes[i].standby);
        free(r->routes[i].variants);
        free(r->routes[i].variant_ids);
        free(r->routes[i].variant_weights);
    }
    for (size_t i = 0; r->pools && i < r->nroutes; i++)
        mm_pool_unref(r->pools[i]);
    mm_pool_unref(r->default_pool);
    free(r->routes);
    free(r->pools);
    mm_cfg_holder_unref(r->holder);
    free(r);
}

void mm_router_ref(mm_router *r)
{
    __atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
}

void mm_router_unref(mm_router *r)
{
    if (r && __atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) == 0)
        router_free(r);
}

mm_route *mm_router_find(mm_router *r, const char *name, size_t len)
{
    /* Linear: deployments have a handful of models, and a scan over short
     * strings beats hashing at that size. */
    for (size_t i = 0; i < r->nroutes; i++) {
        const char *n = r->routes[i].name;
        if (strncmp(n, name, len) == 0 && n[len] == '\0')
            return route_published(&r->routes[i]) ? &r->routes[i] : NULL;
    }
    return NULL;
}

mm_route *mm_route_pick_variant(mm_route *route, const char *key, size_t key_len, uint64_t *rng)
{
    if (!route->nvariants)
        return route;
    int i;
    if (key && key_len)
        i = mm_balance_rendezvous(key, key_len, route->variant_ids, route->variant_weights,
                                  route->nvariants, NULL);
    else
        i = mm_balance_random(route->variant_weights, route->nvariants, NULL, rng);
    return i < 0 ? NULL : route->variants[i];
}

static int pool_can_eject(const mm_pool *p)
{
    if (p->nbackends <= 1)
        return 0;
    size_t open = 0;
    for (size_t i = 0; i < p->nbackends; i++)
        open += p->backends[i].breaker.state != MM_BREAKER_CLOSED;
    return (open + 1) * 100 <= (size_t)p->cfg->breaker.max_ejection_percent * p->nbackends;
}

mm_backend *mm_pool_pick(mm_pool *p, const uint64_t *tried, uint64_t now_ms, mm_pick_info *info)
{
    uint8_t eligible[MM_POOL_MAX_BACKENDS];
    mm_pick_info inf = {0, 0, 0};
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < p->nbackends; i++) {
        mm_backend *b = &p->backends[i];
        eligible[i] = 0;
        if ((tried && (tried[i / 64] >> (i % 64) & 1)) || b->cfg->weight <= 0)
            continue;
        inf.untried++;
        uint64_t at = 0;
        if (!b->health.up)
            at = now_ms + (uint64_t)(b->health.cfg->interval_ms > 0 ? b->health.cfg->interval_ms : 1000);
        else if (b->cooldown_until_ms > now_ms)
            at = b->cooldown_until_ms;
        else if (!mm_breaker_would_allow(&b->breaker, now_ms))
            at = mm_breaker_retry_at(&b->breaker, now_ms);
        if (at) {
            if (!inf.retry_at_ms || at < inf.retry_at_ms)
                inf.retry_at_ms = at;
            continue;
        }
        if (b->cfg->max_requests > 0 && b->outstanding >= b->cfg->max_requests) {
            inf.busy = 1;
            continue;
        }
        eligible[i] = 1;
    }
    int i;
    switch (p->cfg->strategy) {
    case MM_STRATEGY_RANDOM:
        i = mm_balance_random(p->weights, p->nbackends, eligible, &p->rng);
        break;
    case MM_STRATEGY_LEAST_OUTSTANDING:
        i = mm_balance_least(p->outstanding, p->weights, p->nbackends, eligible, &p->rng);
        break;
    default:
        i = mm_swrr_pick(p->swrr, p->nbackends, eligible);
    }
    if (i >= 0 && !mm_breaker_allow(&p->backends[i].breaker, now_ms))
        i = -1; /* cannot happen: would_allow said yes under the same lock */
    if (i >= 0) {
        p->outstanding[i]++;
        p->backends[i].outstanding++;
        p->backends[i].requests++;
    }
    pthread_mutex_unlock(&p->lock);
    if (info)
        *info = inf;
    return i < 0 ? NULL : &p->backends[i];
}

/* Caller holds the lock. Wake the oldest waiter, if any. */
static void pool_wake_one(mm_pool *p)
{
    mm_waiter *w = p->queue_head;
    if (!w)
        return;
    p->queue_head = w->next;
    if (p->queue_head)
        p->queue_head->prev = NULL;
    else
        p->queue_tail = NULL;
    w->next = w->prev = NULL;
    w->queued = 0;
    p->queued--;
    event_active(w->wake, EV_TIMEOUT, 0);
}

void mm_pool_release(mm_pool *p, mm_backend *b, mm_outcome o, int retry_after_ms, uint64_t now_ms)
{
    pthread_mutex_lock(&p->lock);
    p->outstanding[b->index]--;
    b->outstanding--;
    if (o == MM_OUTCOME_CANCEL) {
        mm_breaker_cancel(&b->breaker);
    } else {
        int fail = o != MM_OUTCOME_OK;
        b->failures += (uint64_t)fail;
        mm_breaker_state before = b->breaker.state;
        if (mm_breaker_record(&b->breaker, fail, now_ms, pool_can_eject(p)))
            mm_warn("backend %s of %s: circuit breaker opened for %d ms", b->cfg->url,
                    p->name[0] ? p->name : "default pool", b->breaker.open_ms);
        else if (before != MM_BREAKER_CLOSED && b->breaker.state == MM_BREAKER_CLOSED)
            mm_info("backend %s of %s: circuit breaker closed", b->cfg->url,
                    p->name[0] ? p->name : "default pool");
        if (fail)
            mm_swrr_penalize(&p->swrr[b->index]);
        /* Only connection-level failures say the server itself is gone; an
         * HTTP 5xx is the breaker's business (see docs/RESILIENCE.md). */
        if (o == MM_OUTCOME_CONN_FAIL && mm_health_record(&b->health, MM_HEALTH_FAIL)) {
            b->last_change_ms = now_ms;
            mm_warn("backend %s of %s: down (passive: %d failed requests)", b->cfg->url,
                    p->name[0] ? p->name : "default pool", b->health.fail_streak);
        } else if (o == MM_OUTCOME_OK && b->health.up) {
            mm_health_record(&b->health, MM_HEALTH_OK);
        }
        if (retry_after_ms > 0)
            b->cooldown_until_ms = now_ms + (uint64_t)retry_after_ms;
    }
    pool_wake_one(p);
    pthread_mutex_unlock(&p->lock);
}

int mm_pool_enqueue(mm_pool *p, mm_waiter *w)
{
    int rc = 0;
    pthread_mutex_lock(&p->lock);
    if (p->queued >= p->cfg->max_queue) {
        rc = -EAGAIN;
    } else {
        w->next = NULL;
        w->prev = p->queue_tail;
        if (p->queue_tail)
            p->queue_tail->next = w;
        else
            p->queue_head = w;
        p->queue_tail = w;
        w->queued = 1;
        p->queued++;
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

void mm_pool_dequeue(mm_pool *p, mm_waiter *w)
{
    pthread_mutex_lock(&p->lock);
    if (w->queued) {
        if (w->prev)
            w->prev->next = w->next;
        else
            p->queue_head = w->next;
        if (w->next)
            w->next->prev = w->prev;
        else
            p->queue_tail = w->prev;
        w->queued = 0;
        w->next = w->prev = NULL;
        p->queued--;
    }
    pthread_mutex_unlock(&p->lock);
}

int mm_pool_health_result(mm_pool *p, mm_backend *b, mm_health_result r, uint64_t now_ms)
{
    pthread_mutex_lock(&p->lock);
    int changed = mm_health_record(&b->health, r);
    if (changed) {
        b->last_change_ms = now_ms;
        if (b->health.up) {
            if (!__atomic_load_n(&p->published, __ATOMIC_ACQUIRE)) {
                __atomic_store_n(&p->published, 1, __ATOMIC_RELEASE);
                mm_info("model %s: a worker is ready; published", p->name);
            }
            /* Back from the dead: give it a clean breaker. */
            mm_breaker_init(&b->breaker, b->breaker.cfg);
            pool_wake_one(p);
        }
    }
    pthread_mutex_unlock(&p->lock);
    if (changed)
        mm_log(b->health.up ? MM_LOG_INFO : MM_LOG_WARN, "backend %s of %s: %s (health check)",
               b->cfg->url, p->name[0] ? p->name : "default pool", mm_health_state_name(&b->health));
    return changed;
}

size_t mm_router_npools(const mm_router *r)
{
    return r->nroutes + (r->default_pool ? 1 : 0);
}

mm_pool *mm_router_pool(mm_router *r, size_t i)
{
    if (i < r->nroutes)
        return r->pools[i]; /* NULL for a split */
    return i == r->nroutes ? r->default_pool : NULL;
}
