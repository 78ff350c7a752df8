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
    mm_pool      *pool;
    mm_backend   *backend;
    struct event *timer;
    CURL         *easy;
    char          url[2048];
} hc_probe;

struct mm_healthcheck {
    struct event_base *base;
    mm_upstream *up;
    hc_probe    *probes;
    size_t       nprobes;
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

int mm_healthcheck_start(struct event_base *base, mm_router *r, mm_healthcheck **out)
{
    mm_healthcheck *hc = calloc(1, sizeof *hc);
    if (!hc)
        return -ENOMEM;
    hc->base = base;
    hc->rng = ((uint64_t)time(NULL) << 16) ^ (uint64_t)getpid() ^ 0x9e3779b97f4a7c15ull;
    size_t total = 0;
    for (size_t i = 0; i < mm_router_npools(r); i++) {
        mm_pool *p = mm_router_pool(r, i);
        if (p && p->cfg->health.enabled)
            total += p->nbackends;
    }
    int rc = mm_upstream_new(base, hc_done, &hc->up);
    if (rc)
        goto fail;
    hc->probes = calloc(total ? total : 1, sizeof *hc->probes);
    if (!hc->probes) {
        rc = -ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < mm_router_npools(r); i++) {
        mm_pool *pool = mm_router_pool(r, i);
        if (!pool || !pool->cfg->health.enabled)
            continue;
        for (size_t j = 0; j < pool->nbackends; j++) {
            hc_probe *p = &hc->probes[hc->nprobes];
            p->hc = hc;
            p->pool = pool;
            p->backend = &pool->backends[j];
            snprintf(p->url, sizeof p->url, "%s%s", p->backend->cfg->url, pool->cfg->health.path);
            p->timer = evtimer_new(base, hc_fire, p);
            if (!p->timer) {
                rc = -ENOMEM;
                goto fail;
            }
            hc->nprobes++;
            /* Spread the first round over one interval. */
            int iv = pool->cfg->health.interval_ms;
            hc_schedule(p, (int)(mm_rng_next(&hc->rng) % (uint64_t)(iv > 0 ? iv : 1)));
        }
    }
    *out = hc;
    return 0;
fail:
    mm_healthcheck_free(hc);
    return rc;
}

void mm_healthcheck_free(mm_healthcheck *hc)
{
    if (!hc)
        return;
    for (size_t i = 0; i < hc->nprobes; i++) {
        if (hc->probes[i].easy)
            mm_upstream_cancel(hc->up, hc->probes[i].easy);
        if (hc->probes[i].timer)
            event_free(hc->probes[i].timer);
    }
    free(hc->probes);
    mm_upstream_free(hc->up);
    free(hc);
}
