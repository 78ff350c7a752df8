/* upstream.c: curl multi-socket on libevent (see upstream.h).
 *
 * Socket registrations are kept across transfers. libcurl drops interest in
 * a pooled keep-alive connection when a transfer ends and asks for it again
 * when the next one starts: deleting and re-adding the epoll registration
 * each time costs two epoll_ctl calls per proxied request. Instead a
 * read-only registration stays in place while the connection is idle
 * ("dormant"); if it fires then (the server closed the connection), it is
 * dropped at that moment. Registrations are indexed by fd and removed in
 * libcurl's close-socket callback, before the fd number can be reused. */
#include "upstream.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "h1up.h"
#include "log.h"

#define UPSTREAM_FREE_EASY_MAX 256
#define UPSTREAM_MAX_FD (1 << 20)

typedef struct sock_ctx {
    struct mm_upstream *u;
    struct event *ev;
    curl_socket_t fd;
    short kind;        /* registered event flags */
    int   registered;  /* ev is added */
    int   active;      /* libcurl wants events on this fd */
} sock_ctx;

/* A connect-only transfer for the direct path (mm_upstream_connect). */
typedef struct conn_hook {
    CURL                *easy;
    mm_upstream_conn_fn  fn;
    void                *arg;
    struct conn_hook    *next;
} conn_hook;

struct mm_upstream {
    struct event_base  *base;
    CURLM              *multi;
    struct event       *timer;
    mm_upstream_done_fn done;
    CURL               *free_easy[UPSTREAM_FREE_EASY_MAX];
    int                 nfree;
    int                 running;
    sock_ctx          **by_fd;
    size_t              nfd;
    conn_hook          *hooks;   /* connects in flight: few, and short-lived */
    curl_socket_t       adopt_fd;/* close_cb keeps this one open (hook_done) */
    int                 adopted;
    mm_h1up            *h1;
};

static conn_hook *hook_take(mm_upstream *u, CURL *easy)
{
    for (conn_hook **pp = &u->hooks; *pp; pp = &(*pp)->next) {
        if ((*pp)->easy == easy) {
            conn_hook *k = *pp;
            *pp = k->next;
            return k;
        }
    }
    return NULL;
}

/* A connect-only transfer ended: take its socket over. Removing the handle
 * makes libcurl drop the connection, and its close goes through close_cb,
 * which leaves this one descriptor open for us (and unregisters libcurl's
 * interest in it). Not a dup: the event loop defers epoll changes
 * (changelist), so a registration of a closed duplicate would outlive the
 * close and keep firing on the shared socket. */
static void hook_done(mm_upstream *u, conn_hook *k, CURLcode rc)
{
    int fd = -1;
    curl_socket_t s = CURL_SOCKET_BAD;
    if (rc == CURLE_OK &&
        (curl_easy_getinfo(k->easy, CURLINFO_ACTIVESOCKET, &s) != CURLE_OK || s == CURL_SOCKET_BAD))
        rc = CURLE_COULDNT_CONNECT;
    u->adopt_fd = rc == CURLE_OK ? s : CURL_SOCKET_BAD;
    u->adopted = 0;
    curl_multi_remove_handle(u->multi, k->easy);
    if (u->adopted) {
        fd = s;
    } else if (rc == CURLE_OK) {
        /* A libcurl that keeps connect-only connections after the removal
         * (7.88 does not): share the socket, it stays open for us. */
        if ((fd = fcntl(s, F_DUPFD_CLOEXEC, 0)) < 0)
            rc = CURLE_OUT_OF_MEMORY;
    }
    u->adopt_fd = CURL_SOCKET_BAD;
    mm_upstream_recycle(u, k->easy);
    mm_upstream_conn_fn fn = k->fn;
    void *arg = k->arg;
    free(k);
    fn(arg, rc, fd);
}

static void check_done(mm_upstream *u)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(u->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        conn_hook *k = u->hooks ? hook_take(u, easy) : NULL;
        if (k) {
            hook_done(u, k, rc);
            continue;
        }
        void *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&priv);
        curl_multi_remove_handle(u->multi, easy);
        u->done(easy, rc, priv);
    }
}

static void on_socket_event(evutil_socket_t fd, short what, void *arg)
{
    sock_ctx *sc = arg;
    if (!sc->active) {
        /* An idle pooled connection became readable: the server closed it
         * (or misbehaved). libcurl finds out at its reuse check; stop
         * listening so a level-triggered EOF does not spin. */
        event_del(sc->ev);
        sc->registered = 0;
        return;
    }
    mm_upstream *u = sc->u;
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

static sock_ctx *ctx_for(mm_upstream *u, curl_socket_t fd, int create)
{
    if (fd < 0 || (size_t)fd >= UPSTREAM_MAX_FD)
        return NULL;
    if ((size_t)fd >= u->nfd) {
        if (!create)
            return NULL;
        size_t n = u->nfd ? u->nfd : 256;
        while (n <= (size_t)fd)
            n *= 2;
        sock_ctx **t = realloc(u->by_fd, n * sizeof *t);
        if (!t)
            return NULL;
        memset(t + u->nfd, 0, (n - u->nfd) * sizeof *t);
        u->by_fd = t;
        u->nfd = n;
    }
    sock_ctx *sc = u->by_fd[fd];
    if (!sc && create) {
        sc = calloc(1, sizeof *sc);
        if (!sc)
            return NULL;
        sc->u = u;
        sc->fd = fd;
        sc->ev = event_new(u->base, fd, EV_READ | EV_PERSIST, on_socket_event, sc);
        if (!sc->ev) {
            free(sc);
            return NULL;
        }
        u->by_fd[fd] = sc;
    }
    return sc;
}

static void ctx_drop(mm_upstream *u, curl_socket_t fd)
{
    sock_ctx *sc = ctx_for(u, fd, 0);
    if (!sc)
        return;
    event_free(sc->ev);
    free(sc);
    u->by_fd[fd] = NULL;
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    mm_upstream *u = userp;
    (void)easy;
    (void)socketp;
    if (what == CURL_POLL_REMOVE) {
        sock_ctx *sc = ctx_for(u, fd, 0);
        if (!sc)
            return 0;
        sc->active = 0;
        /* Keep a read registration (idle connections are quiet); a write
         * registration would fire at once on a writable socket. */
        if (sc->registered && (sc->kind & EV_WRITE)) {
            event_del(sc->ev);
            sc->registered = 0;
        }
        return 0;
    }
    short kind = EV_PERSIST;
    if (what & CURL_POLL_IN)
        kind |= EV_READ;
    if (what & CURL_POLL_OUT)
        kind |= EV_WRITE;
    sock_ctx *sc = ctx_for(u, fd, 1);
    if (!sc)
        return -1;
    sc->active = 1;
    if (sc->registered && sc->kind == kind)
        return 0;
    if (sc->registered)
        event_del(sc->ev);
    event_assign(sc->ev, u->base, fd, kind, on_socket_event, sc);
    sc->kind = kind;
    sc->registered = 1;
    event_add(sc->ev, NULL);
    return 0;
}

/* libcurl closes a connection: forget its registration before the fd number
 * can be handed out again. */
static int close_cb(void *clientp, curl_socket_t fd)
{
    mm_upstream *u = clientp;
    ctx_drop(u, fd);
    if (fd == u->adopt_fd) {
        u->adopted = 1; /* handed to the direct path, see hook_done */
        return 0;
    }
    return close(fd);
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
    u->adopt_fd = CURL_SOCKET_BAD;
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
    mm_h1up_free(u->h1);
    while (u->hooks) {
        conn_hook *k = u->hooks;
        u->hooks = k->next;
        curl_multi_remove_handle(u->multi, k->easy);
        curl_easy_cleanup(k->easy);
        free(k);
    }
    for (int i = 0; i < u->nfree; i++)
        curl_easy_cleanup(u->free_easy[i]);
    /* Closing the multi handle closes its pooled connections through
     * close_cb, which still needs the table. */
    if (u->multi)
        curl_multi_cleanup(u->multi);
    for (size_t i = 0; i < u->nfd; i++)
        if (u->by_fd[i]) {
            event_free(u->by_fd[i]->ev);
            free(u->by_fd[i]);
        }
    free(u->by_fd);
    if (u->timer)
        event_free(u->timer);
    free(u);
}

static void easy_defaults(mm_upstream *u, CURL *e)
{
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_cb);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, u);
}

CURL *mm_upstream_easy(mm_upstream *u)
{
    CURL *e = u->nfree > 0 ? u->free_easy[--u->nfree] : curl_easy_init();
    if (e)
        easy_defaults(u, e);
    return e;
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
    free(u->hooks ? hook_take(u, easy) : NULL);
    curl_multi_remove_handle(u->multi, easy);
    mm_upstream_recycle(u, easy);
}

int mm_upstream_connect(mm_upstream *u, CURL *easy, mm_upstream_conn_fn fn, void *arg)
{
    conn_hook *k = calloc(1, sizeof *k);
    if (!k)
        return -ENOMEM;
    k->easy = easy;
    k->fn = fn;
    k->arg = arg;
    curl_easy_setopt(easy, CURLOPT_CONNECT_ONLY, 1L);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, arg);
    CURLMcode mc = curl_multi_add_handle(u->multi, easy);
    if (mc != CURLM_OK) {
        mm_error("upstream: curl_multi_add_handle: %s", curl_multi_strerror(mc));
        free(k);
        return -EIO;
    }
    k->next = u->hooks;
    u->hooks = k;
    return 0;
}

mm_h1up *mm_upstream_h1(mm_upstream *u)
{
    if (!u->h1 && mm_h1up_new(u->base, u, u->done, &u->h1) != 0)
        return NULL;
    return u->h1;
}
