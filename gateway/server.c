/* server.c: threads, listeners and lifecycle of the gateway. */
#include "server.h"

#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <event2/thread.h>

#include "admin.h"
#include "fleet.h"
#include "healthcheck.h"
#include "httpd.h"
#include "log.h"
#include "metrics.h"
#include "proxy.h"
#include "redis_sink.h"
#include "router.h"
#include "runtime.h"
#include "upstream.h"

#define SERVER_MAX_THREADS 256

typedef struct srv_thread {
    pthread_t        tid;
    struct event_base *base;
    mm_httpd        *httpd;
    mm_proxy_thread  px;
    int              started;
    /* Thread 0 forks the workers, and their parent-death signal fires when
     * that thread ends: it must outlive the orderly stop of the workers. */
    sem_t           *loop_done;   /* posted when the loop returned (thread 0) */
    sem_t           *may_exit;    /* waited on before the thread ends (thread 0) */
} srv_thread;

static void *thread_main(void *arg)
{
    srv_thread *st = arg;
    event_base_dispatch(st->base);
    if (st->loop_done) {
        sem_post(st->loop_done);
        while (sem_wait(st->may_exit) != 0)
            ;
    }
    return NULL;
}

static void thread_free(srv_thread *st)
{
    mm_httpd_free(st->httpd);      /* aborts exchanges, which cancel transfers */
    mm_upstream_free(st->px.up);
    if (st->base)
        event_base_free(st->base);
}

static int thread_init(srv_thread *st, int index, const mm_gateway_cfg *cfg, mm_runtime *rt,
                       mm_metrics *metrics, int access_fd, char *err, size_t errlen)
{
    st->px.metrics = metrics;
    st->px.access_fd = access_fd;
    /* The changelist folds an event_del + event_add on one fd within a loop
     * turn into one epoll_ctl (or none): libcurl re-registers its sockets
     * often. */
    struct event_config *ec = event_config_new();
    if (ec) {
        event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
        st->base = event_base_new_with_config(ec);
        event_config_free(ec);
    }
    if (!st->base) {
        snprintf(err, errlen, "event_base_new failed");
        return -ENOMEM;
    }
    st->px.base = st->base;
    st->px.rt = rt;
    st->px.cfg = cfg;
    st->px.index = index;
    st->px.rng = ((uint64_t)time(NULL) << 20) ^ ((uint64_t)getpid() << 8) ^ (uint64_t)(index + 1);
    if (mm_upstream_new(st->base, mm_proxy_upstream_done, &st->px.up) != 0) {
        snprintf(err, errlen, "cannot create the upstream client");
        return -ENOMEM;
    }
    mm_httpd_limits lim = {
        .max_header_bytes = cfg->max_header_bytes,
        .max_body_bytes = cfg->max_body_bytes,
        .idle_timeout_ms = cfg->client_timeout_ms,
    };
    if (mm_httpd_new(st->base, &lim, mm_proxy_handle, &st->px, &st->httpd) != 0) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return mm_httpd_listen(st->httpd, cfg->listen_host, cfg->listen_port, 1, err, errlen);
}

static int cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > SERVER_MAX_THREADS ? SERVER_MAX_THREADS : (int)n;
}

/* What the thread-0 callbacks (reload, swap listeners) need. */
typedef struct srv_ctx {
    mm_runtime     *rt;
    mm_healthcheck *hc;
    mm_fleet       *fleet;
    struct event   *reload_ev;
} srv_ctx;

/* A new router is current: checks and workers follow its backends. */
static void on_swap(void *arg, mm_router *now)
{
    srv_ctx *c = arg;
    char err[512] = "";
    if (c->hc && mm_healthcheck_sync(c->hc, now) != 0)
        mm_error("health checks: out of memory while following the new configuration");
    if (c->fleet && mm_fleet_sync(c->fleet, now->cfg, err, sizeof err) != 0)
        mm_error("fleet: cannot follow the new configuration: %s", err);
}

/* The fleet stops a removed worker once no request runs on it, in any
 * router generation still alive. */
static int in_flight_by_url(void *arg, const char *url)
{
    (void)arg;
    return mm_pools_in_flight(url);
}

/* GET /admin/models: the workers of one model. */
static json_t *workers_of(void *arg, const char *model)
{
    srv_ctx *c = arg;
    json_t *all = c->fleet ? mm_fleet_status(c->fleet) : NULL, *out = json_array();
    size_t i;
    json_t *w;
    json_array_foreach(all, i, w) {
        json_t *m = json_object_get(w, "model");
        if (json_is_string(m) && strcmp(json_string_value(m), model) == 0)
            json_array_append(out, w);
    }
    json_decref(all);
    return out;
}

/* <directory of this executable>/modelmux-worker */
static void worker_path(char *out, size_t n)
{
    char self[4096];
    ssize_t l = readlink("/proc/self/exe", self, sizeof self - 1);
    if (l <= 0) {
        snprintf(out, n, "modelmux-worker");
        return;
    }
    self[l] = '\0';
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = '\0';
    snprintf(out, n, "%s/modelmux-worker", self);
}

/* SIGHUP, relayed by the main thread to thread 0's loop. */
static void on_reload(evutil_socket_t fd, short what, void *arg)
{
    srv_ctx *c = arg;
    char err[1024] = "";
    (void)fd;
    (void)what;
    if (mm_runtime_reload(c->rt, err, sizeof err) != 0)
        mm_error("SIGHUP: configuration not applied, nothing changed: %s", err);
}

static void on_drain(evutil_socket_t fd, short what, void *arg)
{
    srv_thread *st = arg;
    (void)fd;
    (void)what;
    mm_httpd_drain(st->httpd);
}

int mm_server_run(const char *config_path, char *err, size_t errlen)
{
    int rc = 0, nthreads = 1;
    srv_thread *threads = NULL;
    mm_runtime *rt = NULL;
    mm_router *router = NULL;
    mm_admin *admin = NULL;
    mm_metrics *metrics = NULL;
    mm_redis_sink *sink = NULL;
    int access_fd = -1;
    srv_ctx ctx = {0};
    sem_t loop_done, may_exit;
    struct event **drain_ev = NULL;
    sigset_t sigs;

    /* Signals are taken synchronously by this thread with sigwait; every
     * event-loop thread inherits the blocked mask. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGCHLD); /* workers exit: relayed to the fleet */
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (evthread_use_pthreads() != 0) {
        snprintf(err, errlen, "libevent without pthreads support");
        return -ENOTSUP;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(err, errlen, "curl_global_init failed");
        return -EIO;
    }
    rc = mm_runtime_new(config_path, NULL, &rt, err, errlen);
    if (rc)
        goto out_curl;
    ctx.rt = rt;
    const mm_gateway_cfg *cfg = mm_runtime_boot_cfg(rt);
    nthreads = cfg->threads > 0 ? cfg->threads : cpu_count();
    router = mm_runtime_acquire(rt);
    rc = mm_metrics_new(10000, &metrics);
    if (rc) {
        snprintf(err, errlen, "out of memory");
        goto out_router;
    }
    if (cfg->access_log && strcmp(cfg->access_log, "-") == 0) {
        access_fd = STDOUT_FILENO;
    } else if (cfg->access_log) {
        access_fd = open(cfg->access_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (access_fd < 0) {
            rc = -errno;
            snprintf(err, errlen, "access_log %s: %s", cfg->access_log, strerror(errno));
            goto out_router;
        }
    }
    threads = calloc((size_t)nthreads, sizeof *threads);
    drain_ev = calloc((size_t)nthreads, sizeof *drain_ev);
    if (!threads || !drain_ev) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto out_router;
    }
    for (int i = 0; i < nthreads; i++) {
        rc = thread_init(&threads[i], i, cfg, rt, metrics, access_fd, err, errlen);
        if (rc)
            goto out_threads;
        drain_ev[i] = event_new(threads[i].base, -1, 0, on_drain, &threads[i]);
        if (!drain_ev[i]) {
            rc = -ENOMEM;
            goto out_threads;
        }
    }
    /* The Redis sink, health checks, reloads and the admin API live on the
     * first loop. Without redis.url the sink is NULL (metrics stay in
     * memory). */
    {
        mm_redis_weights wts = {0};
        char host[256] = "", gwid[320];
        gethostname(host, sizeof host - 1);
        snprintf(gwid, sizeof gwid, "%s:%d", host, mm_httpd_port(threads[0].httpd));
        if (mm_redis_weights_from_cfg(cfg, &wts)) {
            rc = -ENOMEM;
            snprintf(err, errlen, "out of memory");
            goto out_threads;
        }
        rc = mm_redis_sink_start(threads[0].base, &cfg->redis, metrics, gwid, &wts, &sink, err, errlen);
        mm_redis_weights_free(&wts); /* the sink keeps its own copy */
        if (rc)
            goto out_threads;
    }
    rc = mm_healthcheck_start(threads[0].base, router, &ctx.hc);
    if (rc) {
        snprintf(err, errlen, "cannot start health checks");
        goto out_threads;
    }
    ctx.reload_ev = event_new(threads[0].base, -1, 0, on_reload, &ctx);
    if (!ctx.reload_ev || mm_runtime_add_listener(rt, on_swap, &ctx) != 0) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto out_threads;
    }
    {
        char wp[4200];
        worker_path(wp, sizeof wp);
        rc = mm_fleet_new(threads[0].base, wp, &ctx.fleet, err, errlen);
        if (rc)
            goto out_threads;
        mm_fleet_set_drain_probe(ctx.fleet, in_flight_by_url, NULL);
        rc = mm_fleet_sync(ctx.fleet, router->cfg, err, errlen);
        if (rc)
            goto out_threads;
    }
    if (cfg->admin_port > 0) {
        rc = mm_admin_start(threads[0].base, cfg, rt, metrics, &admin, err, errlen);
        if (rc)
            goto out_threads;
        mm_admin_set_workers(admin, workers_of, &ctx);
    }
    sem_init(&loop_done, 0, 0);
    sem_init(&may_exit, 0, 0);
    threads[0].loop_done = &loop_done;
    threads[0].may_exit = &may_exit;
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&threads[i].tid, NULL, thread_main, &threads[i]) != 0) {
            rc = -EAGAIN;
            snprintf(err, errlen, "pthread_create failed");
            goto out_stop;
        }
        threads[i].started = 1;
    }
    mm_info("listening on %s:%d (%d threads, %zu models)", cfg->listen_host,
            mm_httpd_port(threads[0].httpd), nthreads, cfg->nmodels);

    for (;;) {
        int sig = 0;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGCHLD) {
            mm_fleet_child_exited(ctx.fleet);
            continue;
        }
        if (sig == SIGHUP) {
            mm_info("SIGHUP: reloading %s", config_path);
            event_active(ctx.reload_ev, EV_TIMEOUT, 0);
            continue;
        }
        mm_info("signal %d: shutting down (grace %d ms)", sig, cfg->shutdown_grace_ms);
        break;
    }
    /* Graceful: stop accepting, close idle connections, let running
     * requests finish within the grace period. */
    for (int i = 0; i < nthreads; i++)
        event_active(drain_ev[i], EV_TIMEOUT, 0);
    {
        uint64_t deadline = mm_now_ms() + (uint64_t)(cfg->shutdown_grace_ms > 0 ? cfg->shutdown_grace_ms : 0);
        struct timespec step = {0, 20 * 1000000L};
        for (;;) {
            size_t active = 0;
            for (int i = 0; i < nthreads; i++)
                active += mm_httpd_active(threads[i].httpd);
            if (active == 0 || mm_now_ms() >= deadline)
                break;
            nanosleep(&step, NULL);
        }
    }
out_stop:
    for (int i = 0; i < nthreads; i++)
        if (threads[i].started)
            event_base_loopbreak(threads[i].base);
    for (int i = 1; i < nthreads; i++)
        if (threads[i].started)
            pthread_join(threads[i].tid, NULL);
    if (threads[0].started)
        while (sem_wait(&loop_done) != 0)
            ;
    /* Loops are stopped: push the last counts out (bounded wait), then
     * stop the workers (SIGTERM, SIGKILL after the timeout, all reaped)
     * while thread 0, their parent, is still alive. */
    mm_redis_sink_final_flush(sink, 2000);
    if (ctx.fleet)
        mm_fleet_stop_all(ctx.fleet, 10000);
    if (threads[0].started) {
        sem_post(&may_exit);
        pthread_join(threads[0].tid, NULL);
    }
out_threads:
    mm_redis_sink_free(sink);
    sink = NULL;
    mm_admin_free(admin);
    if (ctx.fleet && rc) /* start-up failed after workers may have started */
        mm_fleet_stop_all(ctx.fleet, 5000);
    mm_fleet_free(ctx.fleet);
    mm_healthcheck_free(ctx.hc);
    if (ctx.reload_ev)
        event_free(ctx.reload_ev);
    for (int i = 0; threads && i < nthreads; i++) {
        if (drain_ev[i])
            event_free(drain_ev[i]);
        thread_free(&threads[i]);
    }
    free(threads);
    free(drain_ev);
out_router:
    if (access_fd > STDERR_FILENO)
        close(access_fd);
    mm_router_unref(router);
    mm_metrics_free(metrics);
    mm_runtime_free(rt);
out_curl:
    curl_global_cleanup();
    return rc;
}
