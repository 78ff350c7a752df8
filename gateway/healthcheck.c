/* healthcheck.c: periodic GET of each backend's health path. */
#include "healthcheck.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "upstream.h"

typedef struct hc_probe {
    struct mm_healthcheck *hc;
    mm_pool      *pool;        /* referenced */
    mm_backend   *backend;
    struct event *timer;
    CURL         *easy;
    int           seen;        /* sync bookkeeping */
    char          url[2048];
    struct hc_probe *next;
} hc_probe;

struct mm_healthcheck {
    struct event_base *base;
    mm_upstream *up;
    hc_probe    *probes;
    uint64_t     rng;
};

static void hc_schedule(hc_probe *p, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(p->timer, &tv);
}

/* Discard the body: only the status matters. */
static size_t hc_discard(char *ptr, size_t size, size_t nmemb, void *ud)
{
    (void)ptr;
    (void)ud;
    return size * nmemb;
}

static void hc_fire(evutil_socket_t fd, short what, void *arg)
{
    hc_probe *p = arg;
    (void)fd;
    (void)what;
    const mm_health_cfg *cfg = p->backend->health.cfg;
    CURL *e = mm_upstream_easy(p->hc->up);
    if (!e) {
        hc_schedule(p, cfg->interval_ms);
        return;
    }
    curl_easy_setopt(e, CURLOPT_URL, p->url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(cfg->timeout_ms > 0 ? cfg->timeout_ms : 1000));
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, hc_discard);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    if (mm_upstream_add(p->hc->up, e, p) != 0) {
        mm_upstream_recycle(p->hc->up, e);
        hc_schedule(p, cfg->interval_ms);
        return;
    }
    p->easy = e;
}

static void hc_done(CURL *easy, CURLcode rc, void *priv)
{
    hc_probe *p = priv;
    long code = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
    mm_upstream_recycle(p->hc->up, easy);
    p->easy = NULL;
    mm_health_result r = MM_HEALTH_FAIL;
    if (rc == CURLE_OK && code >= 200 && code < 300)
        r = MM_HEALTH_OK;
    else if (rc == CURLE_OK && code == 503)
        r = MM_HEALTH_LOADING; /* a worker still loading its model */
    mm_pool_health_result(p->pool, p->backend, r, mm_now_ms());
    pthread_mutex_lock(&p->pool->lock);
    int next = mm_health_next_interval(&p->backend->health, &p->hc->rng);
    pthread_mutex_unlock(&p->pool->lock);
    hc_schedule(p, next);
}

static void probe_free(mm_healthcheck *hc, hc_probe *p)
{
    if (p->easy)
        mm_upstream_cancel(hc->up, p->easy);
    if (p->timer)
        event_free(p->timer);
    mm_pool_unref(p->pool);
    free(p);
}

static int probe_add(mm_healthcheck *hc, mm_pool *pool, size_t j)
{
    hc_probe *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->hc = hc;
    p->pool = pool;
    mm_pool_ref(pool);
    p->backend = &pool->backends[j];
    p->seen = 1;
    snprintf(p->url, sizeof p->url, "%s%s", p->backend->cfg->url, pool->cfg->health.path);
    p->timer = evtimer_new(hc->base, hc_fire, p);
    if (!p->timer) {
        probe_free(hc, p);
        return -ENOMEM;
    }
    p->next = hc->probes;
    hc->probes = p;
    /* Spread the first round over one interval. */
    int iv = pool->cfg->health.interval_ms;
    hc_schedule(p, (int)(mm_rng_next(&hc->rng) % (uint64_t)(iv > 0 ? iv : 1)));
    return 0;
}

int mm_healthcheck_sync(mm_healthcheck *hc, mm_router *r)
{
    for (hc_probe *p = hc->probes; p; p = p->next)
        p->seen = 0;
    int rc = 0;
    for (size_t i = 0; i < mm_router_npools(r) && rc == 0; i++) {
        mm_pool *pool = mm_router_pool(r, i);
        if (!pool || !pool->cfg->health.enabled)
            continue;
        for (size_t j = 0; j < pool->nbackends && rc == 0; j++) {
            hc_probe *p = hc->probes;
            while (p && !(p->pool == pool && p->backend == &pool->backends[j]))
                p = p->next;
            if (p)
                p->seen = 1;
            else
                rc = probe_add(hc, pool, j);
        }
    }
    hc_probe **pp = &hc->probes;
    while (*pp) {
        hc_probe *p = *pp;
        if (p->seen) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        probe_free(hc, p);
    }
    return rc;
}

int mm_healthcheck_start(struct event_base *base, mm_router *r, mm_healthcheck **out)
{
    mm_healthcheck *hc = calloc(1, sizeof *hc);
    if (!hc)
        return -ENOMEM;
    hc->base = base;
    hc->rng = ((uint64_t)time(NULL) << 16) ^ (uint64_t)getpid() ^ 0x9e3779b97f4a7c15ull;
    int rc = mm_upstream_new(base, hc_done, &hc->up);
    if (rc == 0)
        rc = mm_healthcheck_sync(hc, r);
    if (rc) {
        mm_healthcheck_free(hc);
        return rc;
    }
    *out = hc;
    return 0;
}

void mm_healthcheck_free(mm_healthcheck *hc)
{
    if (!hc)
        return;
    while (hc->probes) {
        hc_probe *p = hc->probes;
        hc->probes = p->next;
        probe_free(hc, p);
    }
    mm_upstream_free(hc->up);
    free(hc);
}
