/* upstream.c: curl multi-socket on libevent (see upstream.h). */
#include "upstream.h"

#include <errno.h>
#include <stdlib.h>

#include <event2/event.h>

#include "log.h"

#define UPSTREAM_FREE_EASY_MAX 256

typedef struct sock_ctx {
    struct event *ev;
    curl_socket_t fd;
    short kind;
} sock_ctx;

struct mm_upstream {
    struct event_base  *base;
    CURLM              *multi;
    struct event       *timer;
    mm_upstream_done_fn done;
    CURL               *free_easy[UPSTREAM_FREE_EASY_MAX];
    int                 nfree;
    int                 running;
};

static void check_done(mm_upstream *u)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(u->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        void *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&priv);
        curl_multi_remove_handle(u->multi, easy);
        u->done(easy, rc, priv);
    }
}

static void on_socket_event(evutil_socket_t fd, short what, void *arg)
{
    mm_upstream *u = arg;
    int flags = 0;
    if (what & EV_READ)
        flags |= CURL_CSELECT_IN;
    if (what & EV_WRITE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(u->multi, fd, flags, &u->running);
    check_done(u);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    mm_upstream *u = arg;
    (void)fd;
    (void)what;
    curl_multi_socket_action(u->multi, CURL_SOCKET_TIMEOUT, 0, &u->running);
    check_done(u);
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    mm_upstream *u = userp;
    sock_ctx *sc = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (sc) {
            event_free(sc->ev);
            free(sc);
            curl_multi_assign(u->multi, fd, NULL);
        }
        return 0;
    }
    short kind = EV_PERSIST;
    if (what & CURL_POLL_IN)
        kind |= EV_READ;
    if (what & CURL_POLL_OUT)
        kind |= EV_WRITE;
    if (!sc) {
        sc = calloc(1, sizeof *sc);
        if (!sc)
            return -1;
        sc->fd = fd;
        sc->ev = event_new(u->base, fd, kind, on_socket_event, u);
        if (!sc->ev) {
            free(sc);
            return -1;
        }
        sc->kind = kind;
        curl_multi_assign(u->multi, fd, sc);
    } else if (sc->kind != kind) {
        /* Re-arm in place: no allocation, and with the changelist the
         * del + add become one epoll_ctl. */
        event_del(sc->ev);
        event_assign(sc->ev, u->base, fd, kind, on_socket_event, u);
        sc->kind = kind;
    } else {
        return 0;
    }
    event_add(sc->ev, NULL);
    return 0;
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    mm_upstream *u = userp;
    (void)multi;
    if (timeout_ms < 0) {
        evtimer_del(u->timer);
        return 0;
    }
    /* A zero timeout still goes through the loop: curl forbids calling
     * socket_action from inside this callback. */
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    evtimer_add(u->timer, &tv);
    return 0;
}

int mm_upstream_new(struct event_base *base, mm_upstream_done_fn done, mm_upstream **out)
{
    mm_upstream *u = calloc(1, sizeof *u);
    if (!u)
        return -ENOMEM;
    u->base = base;
    u->done = done;
    u->multi = curl_multi_init();
    u->timer = evtimer_new(base, on_timer, u);
    if (!u->multi || !u->timer) {
        mm_upstream_free(u);
        return -ENOMEM;
    }
    curl_multi_setopt(u->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(u->multi, CURLMOPT_SOCKETDATA, u);
    curl_multi_setopt(u->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(u->multi, CURLMOPT_TIMERDATA, u);
    /* Keep plenty of idle upstream connections: reconnecting per request is
     * what makes a proxy slow. */
    curl_multi_setopt(u->multi, CURLMOPT_MAXCONNECTS, 1024L);
    *out = u;
    return 0;
}

void mm_upstream_free(mm_upstream *u)
{
    if (!u)
        return;
    for (int i = 0; i < u->nfree; i++)
        curl_easy_cleanup(u->free_easy[i]);
    if (u->multi)
        curl_multi_cleanup(u->multi);
    if (u->timer)
        event_free(u->timer);
    free(u);
}

CURL *mm_upstream_easy(mm_upstream *u)
{
    if (u->nfree > 0)
        return u->free_easy[--u->nfree];
    return curl_easy_init();
}

int mm_upstream_add(mm_upstream *u, CURL *easy, void *priv)
{
    curl_easy_setopt(easy, CURLOPT_PRIVATE, priv);
    CURLMcode mc = curl_multi_add_handle(u->multi, easy);
    if (mc != CURLM_OK) {
        mm_error("upstream: curl_multi_add_handle: %s", curl_multi_strerror(mc));
        return -EIO;
    }
    return 0;
}

void mm_upstream_recycle(mm_upstream *u, CURL *easy)
{
    if (!easy)
        return;
    if (u->nfree < UPSTREAM_FREE_EASY_MAX) {
        curl_easy_reset(easy);
        u->free_easy[u->nfree++] = easy;
    } else {
        curl_easy_cleanup(easy);
    }
}

void mm_upstream_cancel(mm_upstream *u, CURL *easy)
{
    curl_multi_remove_handle(u->multi, easy);
    mm_upstream_recycle(u, easy);
}
