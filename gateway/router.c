/* router.c: routes, pools and backend picks (see router.h). */
#include "router.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "jsonutil.h"

static int pool_init(mm_pool *p, const mm_model_cfg *m, const char *name, char *err,
                     size_t errlen)
{
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
        p->backends[i].cfg = &m->backends[i];
        p->backends[i].index = i;
        p->weights[i] = m->backends[i].weight;
    }
    mm_swrr_init(p->swrr, p->nbackends, p->weights);
    p->rng = mm_hash64(name, strlen(name), (uint64_t)time(NULL)) | 1;
    pthread_mutex_init(&p->lock, NULL);
    return 0;
}

static void pool_free(mm_pool *p)
{
    if (!p->backends)
        return;
    pthread_mutex_destroy(&p->lock);
    free(p->backends);
    free(p->swrr);
    free(p->weights);
    free(p->outstanding);
}

static int build_models_json(mm_router *r)
{
    mm_buf b, names;
    mm_buf_init(&b, 16 * 1024 * 1024);
    mm_buf_init(&names, 1024 * 1024);
    long long created = (long long)time(NULL);
    int rc = mm_buf_append_str(&b, "{\"object\":\"list\",\"data\":[");
    for (size_t i = 0; i < r->nroutes && rc == 0; i++) {
        const char *name = r->routes[i].name;
        rc = mm_buf_append_str(&b, i ? ",{\"id\":" : "{\"id\":");
        if (rc == 0)
            rc = mm_json_append_str(&b, name, strlen(name));
        if (rc == 0)
            rc = mm_buf_printf(&b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"modelmux\"}",
                               created);
        if (rc == 0)
            rc = mm_buf_printf(&names, "%s%s", i ? ", " : "", name);
    }
    if (rc == 0)
        rc = mm_buf_append_str(&b, "]}");
    if (rc) {
        mm_buf_free(&b);
        mm_buf_free(&names);
        return rc;
    }
    r->models_json = b.data;
    r->models_json_len = b.len;
    r->names_list = names.data ? names.data : strdup("");
    return 0;
}

int mm_router_new(const mm_gateway_cfg *cfg, mm_router **out, char *err, size_t errlen)
{
    int rc = -ENOMEM;
    mm_router *r = calloc(1, sizeof *r);
    if (!r)
        goto fail;
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
        if (m->nsplit == 0) {
            rc = pool_init(&r->pools[i], m, m->name, err, errlen);
            if (rc)
                goto fail;
            r->routes[i].pool = &r->pools[i];
        }
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
            mm_route *v = mm_router_find(r, m->split[j].model, strlen(m->split[j].model));
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
        r->default_pool = calloc(1, sizeof *r->default_pool);
        if (!r->default_pool)
            goto fail;
        rc = pool_init(r->default_pool, cfg->default_pool, "", err, errlen);
        if (rc)
            goto fail;
    }
    rc = build_models_json(r);
    if (rc)
        goto fail;
    *out = r;
    return 0;
fail:
    if (rc == -ENOMEM)
        snprintf(err, errlen, "out of memory");
    mm_router_free(r);
    *out = NULL;
    return rc;
}

void mm_router_free(mm_router *r)
{
    if (!r)
        return;
    for (size_t i = 0; r->routes && i < r->nroutes; i++) {
        free(r->routes[i].variants);
        free(r->routes[i].variant_ids);
        free(r->routes[i].variant_weights);
    }
    for (size_t i = 0; r->pools && i < r->nroutes; i++)
        pool_free(&r->pools[i]);
    if (r->default_pool) {
        pool_free(r->default_pool);
        free(r->default_pool);
    }
    free(r->routes);
    free(r->pools);
    free(r->models_json);
    free(r->names_list);
    free(r);
}

mm_route *mm_router_find(mm_router *r, const char *name, size_t len)
{
    /* Linear: deployments have a handful of models, and a scan over short
     * strings beats hashing at that size. */
    for (size_t i = 0; i < r->nroutes; i++) {
        const char *n = r->routes[i].name;
        if (strncmp(n, name, len) == 0 && n[len] == '\0')
            return &r->routes[i];
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

mm_backend *mm_pool_pick(mm_pool *p, const uint64_t *tried)
{
    uint8_t eligible[MM_POOL_MAX_BACKENDS];
    for (size_t i = 0; i < p->nbackends; i++)
        eligible[i] = !(tried && (tried[i / 64] >> (i % 64) & 1));
    pthread_mutex_lock(&p->lock);
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
    if (i >= 0) {
        p->outstanding[i]++;
        p->backends[i].outstanding++;
    }
    pthread_mutex_unlock(&p->lock);
    return i < 0 ? NULL : &p->backends[i];
}

void mm_pool_release(mm_pool *p, mm_backend *b)
{
    pthread_mutex_lock(&p->lock);
    p->outstanding[b->index]--;
    b->outstanding--;
    pthread_mutex_unlock(&p->lock);
}
