/* proxy.h: the request path of the gateway: classify, route, forward over
 * libcurl, relay the answer. One mm_proxy_thread per event-loop thread. */
#ifndef MM_PROXY_H
#define MM_PROXY_H
#include <stdint.h>

#include "config.h"
#include "httpd.h"
#include "metrics.h"
#include "router.h"
#include "runtime.h"
#include "upstream.h"

struct event_base;

typedef struct mm_proxy_thread {
    struct event_base    *base;
    mm_upstream          *up;
    mm_runtime           *rt;       /* the current router, swapped at runtime */
    const mm_gateway_cfg *cfg;
    uint64_t              rng;
    int                   index;
    unsigned long long    seq;      /* request counter for ids */
    mm_metrics           *metrics;  /* shared by all threads */
    int                   access_fd;/* JSON access log, -1 off */
} mm_proxy_thread;

/* The httpd handler; arg is the mm_proxy_thread. */
void mm_proxy_handle(mm_http_exchange *ex, void *arg);
/* The upstream completion callback (registered with mm_upstream_new). */
void mm_proxy_upstream_done(CURL *easy, CURLcode rc, void *priv);
#endif
