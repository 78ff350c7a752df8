/* h1up.c: the direct HTTP/1.1 path to plain http:// backends (see h1up.h).
 *
 * A connection's read event stays registered for its whole life, idle or
 * busy: an idle one that becomes readable was closed by the server (or sent
 * garbage) and is dropped then, so reuse needs no liveness check, and a
 * request costs one sendmsg and (for a small answer) one recv.
 *
 * Like libcurl, a request whose *reused* connection turns out dead (EOF or
 * reset before a single answer byte) is sent once more over a fresh
 * connection: that is the race with a server closing an idle connection,
 * not a failure of the backend (docs/RESILIENCE.md). */
#include "h1up.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/event.h>

#include "httpd.h"
#include "log.h"

#define H1_RBUF_INIT      (16 * 1024)
/* Status line and headers of one answer, interim (1xx) answers included;
 * the proxy keeps at most 64 KiB of them. */
#define H1_MAX_HEAD       (64 * 1024 + 8192)
#define H1_RBUF_MAX       (H1_MAX_HEAD + 16 * 1024)
#define H1_MAX_LINE       4096            /* chunk-size and chunk-end lines */
#define H1_MAX_HEAD_REQ   (4 * 1024 * 1024)
#define H1_MAX_IDLE_HOST  256             /* pooled connections per backend */
#define H1_MAX_HOSTS      4096
#define H1_SWEEP_MS       2000
#define H1_MAX_AUTHORITY  512
#define H1_FREE_XFER_MAX  256
/* Do not reuse a connection idle longer than this: servers close idle
 * keep-alive connections (uvicorn after 5 s). The curl path's MAXAGE_CONN. */
#define H1_MAX_IDLE_NS    (4ull * 1000000000ull)

enum { PS_STATUS, PS_HEADER, PS_BODY, PS_CHUNK_SIZE, PS_CHUNK_DATA, PS_CHUNK_END, PS_TRAILER };
enum { X_FREE, X_READY, X_CONNECTING, X_ACTIVE, X_DONE };
/* x_parse results */
enum { P_MORE, P_DONE, P_PAUSED, P_FAILED, P_GONE };

typedef struct h1_conn h1_conn;

typedef struct h1_host {
    char    *key;        /* authority, host[:port] */
    size_t   keylen;
    char    *connect_url;/* http://authority/ for the CONNECT_ONLY transfer */
    h1_conn *idle;       /* most recently used first */
    int      nidle;
    int      refs;       /* connections and transfers using it */
} h1_host;

struct h1_conn {
    mm_h1up      *h;
    h1_host      *host;
    int           fd;
    struct event *rev;       /* EV_READ|EV_PERSIST, while the fd lives */
    struct event *wev;       /* a request only partly written */
    h1_conn      *prev, *next;     /* host's idle list */
    h1_conn      *all_prev, *all_next;
    uint64_t      idle_since;
    unsigned long nreq;      /* answers completed on it */
    mm_h1up_xfer *x;         /* NULL while idle */
    char         *rbuf;
    size_t        rpos, rlen, rcap;
};

struct mm_h1up_xfer {
    mm_h1up      *h;
    int           state;
    mm_buf        head;
    mm_h1up_req   rq;
    void         *priv;
    h1_host      *host;
    h1_conn      *conn;
    CURL         *connecting;
    struct event *timer;     /* rq.timeout_ms */
    struct event *kick;      /* resume delivery from the loop */
    size_t        sent;      /* bytes of head + body written */
    int           reused;    /* conn served an answer before */
    int           retried;   /* the stale-connection resend happened */
    int           in_cb;
    int           cancelled;
    int           paused;
    CURLcode      fail_rc;   /* with P_FAILED */
    /* the answer */
    uint64_t      got;       /* bytes received for this attempt */
    int           ps;
    int           status;
    int           minor;     /* HTTP/1.x */
    int           interim;
    int           have_cl;
    int64_t       cl;
    int           te, chunked;
    int           conn_close, keep_alive;
    int64_t       remain;    /* body or chunk bytes left; -1: until close */
    size_t        head_bytes;
    mm_h1up_xfer *next_free;
};

struct mm_h1up {
    struct event_base  *base;
    mm_upstream        *u;
    mm_upstream_done_fn done;
    h1_host           **hosts;
    size_t              nhosts, hcap;
    size_t              last_host;
    h1_conn            *all;
    mm_h1up_xfer       *free_x;
    int                 nfree;
    struct event       *sweep;   /* closes idle connections past their age */
};

static void c_on_read(evutil_socket_t fd, short what, void *arg);
static void c_on_write(evutil_socket_t fd, short what, void *arg);
static void x_on_timer(evutil_socket_t fd, short what, void *arg);
static void x_on_kick(evutil_socket_t fd, short what, void *arg);
static void x_send(mm_h1up_xfer *x);
static void x_connect(mm_h1up_xfer *x);

/* ---- urls and hosts ---- */

int mm_h1up_url_ok(const char *url)
{
    return url && strncasecmp(url, "http://", 7) == 0;
}

const char *mm_h1up_authority(const char *url, size_t *len)
{
    const char *a = url + 7;
    *len = strcspn(a, "/");
    return a;
}

static void host_free(h1_host *t)
{
    free(t->key);
    free(t->connect_url);
    free(t);
}

/* Forget backends nothing uses any more (a reload replaced them). */
static void hosts_prune(mm_h1up *h)
{
    size_t k = 0;
    for (size_t i = 0; i < h->nhosts; i++) {
        if (h->hosts[i]->refs == 0)
            host_free(h->hosts[i]);
        else
            h->hosts[k++] = h->hosts[i];
    }
    h->nhosts = k;
    h->last_host = 0;
}

static h1_host *host_find(mm_h1up *h, const char *url)
{
    size_t klen;
    const char *key = mm_h1up_authority(url, &klen);
    if (h->last_host < h->nhosts) {
        h1_host *t = h->hosts[h->last_host];
        if (t->keylen == klen && memcmp(t->key, key, klen) == 0)
            return t;
    }
    for (size_t i = 0; i < h->nhosts; i++) {
        h1_host *t = h->hosts[i];
        if (t->keylen == klen && memcmp(t->key, key, klen) == 0) {
            h->last_host = i;
            return t;
        }
    }
    if (h->nhosts >= H1_MAX_HOSTS)
        hosts_prune(h);
    if (klen == 0 || klen > H1_MAX_AUTHORITY || h->nhosts >= H1_MAX_HOSTS)
        return NULL;
    if (h->nhosts == h->hcap) {
        size_t n = h->hcap ? h->hcap * 2 : 16;
        h1_host **t = realloc(h->hosts, n * sizeof *t);
        if (!t)
            return NULL;
        h->hosts = t;
        h->hcap = n;
    }
    h1_host *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->key = strndup(key, klen);
    t->keylen = klen;
    t->connect_url = malloc(klen + 9);
    if (!t->key || !t->connect_url) {
        host_free(t);
        return NULL;
    }
    memcpy(t->connect_url, "http://", 7);
    memcpy(t->connect_url + 7, key, klen);
    memcpy(t->connect_url + 7 + klen, "/", 2);
    h->last_host = h->nhosts;
    h->hosts[h->nhosts++] = t;
    return t;
}

/* ---- connections ---- */

static void idle_unlink(h1_conn *c)
{
    h1_host *t = c->host;
    if (c->prev)
        c->prev->next = c->next;
    else
        t->idle = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    t->nidle--;
}

static void conn_close(h1_conn *c)
{
    mm_h1up *h = c->h;
    if (!c->x && (c->prev || c->host->idle == c))
        idle_unlink(c);
    if (c->all_prev)
        c->all_prev->all_next = c->all_next;
    else
        h->all = c->all_next;
    if (c->all_next)
        c->all_next->all_prev = c->all_prev;
    event_free(c->rev);
    event_free(c->wev);
    close(c->fd);
    free(c->rbuf);
    c->host->refs--;
    free(c);
}

static h1_conn *conn_new(mm_h1up *h, h1_host *t, int fd)
{
    h1_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->h = h;
    c->host = t;
    c->fd = fd;
    c->rcap = H1_RBUF_INIT;
    c->rbuf = malloc(c->rcap);
    c->rev = event_new(h->base, fd, EV_READ | EV_PERSIST, c_on_read, c);
    c->wev = event_new(h->base, fd, EV_WRITE, c_on_write, c);
    if (!c->rbuf || !c->rev || !c->wev || event_add(c->rev, NULL) != 0) {
        if (c->rev)
            event_free(c->rev);
        if (c->wev)
            event_free(c->wev);
        free(c->rbuf);
        free(c);
        return NULL;
    }
    c->all_next = h->all;
    if (h->all)
        h->all->all_prev = c;
    h->all = c;
    t->refs++;
    return c;
}

/* The most recently used live connection to t, or NULL. */
static h1_conn *pool_take(h1_host *t)
{
    h1_conn *c = t->idle;
    if (!c)
        return NULL;
    if (mm_now_ns() - c->idle_since > H1_MAX_IDLE_NS) {
        /* The most recent is too old, so are all the others. */
        while (t->idle)
            conn_close(t->idle);
        return NULL;
    }
    idle_unlink(c);
    return c;
}

static void pool_put(h1_conn *c)
{
    h1_host *t = c->host;
    if (t->nidle >= H1_MAX_IDLE_HOST) {
        conn_close(c);
        return;
    }
    c->rpos = c->rlen = 0;
    c->idle_since = mm_now_ns();
    c->prev = NULL;
    c->next = t->idle;
    if (t->idle)
        t->idle->prev = c;
    t->idle = c;
    t->nidle++;
    if (!evtimer_pending(c->h->sweep, NULL)) {
        struct timeval tv = {H1_SWEEP_MS / 1000, (H1_SWEEP_MS % 1000) * 1000};
        evtimer_add(c->h->sweep, &tv);
    }
}

/* Every few seconds while connections are pooled: close those idle past
 * H1_MAX_IDLE_NS (a server may keep them forever, a dead backend's would
 * linger) and forget unused backends. */
static void h_on_sweep(evutil_socket_t fd, short what, void *arg)
{
    mm_h1up *h = arg;
    uint64_t now = mm_now_ns();
    int left = 0;
    (void)fd;
    (void)what;
    for (size_t i = 0; i < h->nhosts; i++) {
        h1_conn *c = h->hosts[i]->idle;
        while (c && now - c->idle_since <= H1_MAX_IDLE_NS)
            c = c->next;
        while (c) { /* older ones follow: most recent first */
            h1_conn *n = c->next;
            conn_close(c);
            c = n;
        }
        left += h->hosts[i]->nidle;
    }
    hosts_prune(h);
    if (left) {
        struct timeval tv = {H1_SWEEP_MS / 1000, (H1_SWEEP_MS % 1000) * 1000};
        evtimer_add(h->sweep, &tv);
    }
}

/* ---- transfers ---- */

static void x_reset_answer(mm_h1up_xfer *x)
{
    x->got = 0;
    x->ps = PS_STATUS;
    x->status = 0;
    x->minor = 1;
    x->interim = 0;
    x->have_cl = 0;
    x->cl = 0;
    x->te = x->chunked = 0;
    x->conn_close = x->keep_alive = 0;
    x->remain = 0;
    x->head_bytes = 0;
    x->paused = 0;
}

static void x_err(mm_h1up_xfer *x, const char *fmt, const char *arg)
{
    if (x->rq.errbuf)
        snprintf(x->rq.errbuf, CURL_ERROR_SIZE, fmt, arg);
}

/* The transfer is over: the connection goes back to the pool if its
 * framing is intact, and the owner hears the result. */
static void x_finish(mm_h1up_xfer *x, CURLcode rc)
{
    h1_conn *c = x->conn;
    evtimer_del(x->timer);
    event_del(x->kick);
    x->conn = NULL;
    if (c) {
        c->x = NULL;
        event_del(c->wev);
        /* Content-Length next to Transfer-Encoding: the framing was
         * ambiguous, do not bet the next answer on it (RFC 9112 6.3). */
        int reuse = rc == CURLE_OK && x->remain != -1 && !x->conn_close &&
                    !(x->te && x->have_cl) &&
                    (x->minor >= 1 || x->keep_alive) && c->rpos == c->rlen &&
                    x->sent == x->head.len + x->rq.body_len;
        if (reuse) {
            c->nreq++;
            if (!event_pending(c->rev, EV_READ, NULL))
                event_add(c->rev, NULL);
            pool_put(c);
        } else {
            conn_close(c);
        }
    }
    x->state = X_DONE;
    x->h->done(NULL, rc, x->priv);
}

/* A failure: resent once over a fresh connection when it can only be the
 * stale-connection race, else the end of the transfer. */
static void x_fail_io(mm_h1up_xfer *x, CURLcode rc, const char *fmt, const char *arg)
{
    if (x->reused && !x->retried && x->got == 0) {
        h1_conn *c = x->conn;
        mm_debug("h1up: reused connection to %s died before an answer, resending once",
                 x->host->key);
        x->conn = NULL;
        c->x = NULL;
        conn_close(c);
        x->retried = 1;
        x->reused = 0;
        x->sent = 0;
        x_reset_answer(x);
        x_connect(x);
        return;
    }
    x_err(x, fmt, arg);
    x_finish(x, rc);
}

static void x_on_timer(evutil_socket_t fd, short what, void *arg)
{
    mm_h1up_xfer *x = arg;
    char ms[32];
    (void)fd;
    (void)what;
    if (x->connecting) {
        mm_upstream_cancel(x->h->u, x->connecting);
        x->connecting = NULL;
    }
    snprintf(ms, sizeof ms, "%ld", x->rq.timeout_ms);
    x_err(x, "Operation timed out after %s milliseconds", ms);
    x_finish(x, CURLE_OPERATION_TIMEDOUT);
}

/* Deliver body bytes; returns P_MORE to go on. */
static int x_deliver(mm_h1up_xfer *x, char *p, size_t n)
{
    x->in_cb = 1;
    size_t w = x->rq.on_data(p, 1, n, x->rq.ud);
    x->in_cb = 0;
    if (x->cancelled)
        return P_GONE;
    if (w == CURL_WRITEFUNC_PAUSE) {
        x->paused = 1;
        return P_PAUSED;
    }
    if (w != n) {
        x_err(x, "%s", "Failure writing output to destination");
        x->fail_rc = CURLE_WRITE_ERROR;
        return P_FAILED;
    }
    return P_MORE;
}

static int x_header_cb(mm_h1up_xfer *x, char *p, size_t n)
{
    x->in_cb = 1;
    size_t w = x->rq.on_header(p, 1, n, x->rq.ud);
    x->in_cb = 0;
    if (x->cancelled)
        return P_GONE;
    if (w != n) {
        x_err(x, "%s", "Failed writing header");
        x->fail_rc = CURLE_WRITE_ERROR;
        return P_FAILED;
    }
    return P_MORE;
}

static int is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Does the comma-separated list v[0..n) hold token tok? */
static int has_token(const char *v, size_t n, const char *tok)
{
    size_t tl = strlen(tok), i = 0;
    while (i < n) {
        while (i < n && (is_ows(v[i]) || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && is_ows(v[e - 1]))
            e--;
        if (e - s == tl && strncasecmp(v + s, tok, tl) == 0)
            return 1;
    }
    return 0;
}

/* Is "chunked" the last coding of v[0..n)? */
static int last_is_chunked(const char *v, size_t n)
{
    while (n && is_ows(v[n - 1]))
        n--;
    if (n < 7 || strncasecmp(v + n - 7, "chunked", 7) != 0)
        return 0;
    return n == 7 || v[n - 8] == ',' || is_ows(v[n - 8]);
}

static int ieq(const char *a, size_t alen, const char *b, size_t blen)
{
    return alen == blen && strncasecmp(a, b, alen) == 0;
}

/* One header line (without its line end): notes what frames the body.
 * 0, or -1 for a line that is not a header. */
static int x_header_line(mm_h1up_xfer *x, const char *p, size_t n)
{
    if (is_ows(p[0]))
        return -1; /* obsolete line folding */
    const char *colon = memchr(p, ':', n);
    if (!colon || colon == p)
        return -1;
    size_t nlen = (size_t)(colon - p);
    for (size_t i = 0; i < nlen; i++)
        if (p[i] <= ' ' || p[i] >= 127)
            return -1;
    const char *v = colon + 1, *end = p + n;
    while (v < end && is_ows(*v))
        v++;
    while (end > v && is_ows(end[-1]))
        end--;
    size_t vlen = (size_t)(end - v);
    if (ieq(p, nlen, "content-length", 14)) {
        if (vlen == 0 || vlen > 18)
            return -1;
        int64_t cl = 0;
        for (size_t i = 0; i < vlen; i++) {
            if (v[i] < '0' || v[i] > '9')
                return -1;
            cl = cl * 10 + (v[i] - '0');
        }
        if (x->have_cl && x->cl != cl)
            return -1; /* two different lengths: no framing to trust */
        x->have_cl = 1;
        x->cl = cl;
    } else if (ieq(p, nlen, "transfer-encoding", 17)) {
        x->te = 1;
        x->chunked = last_is_chunked(v, vlen);
    } else if (ieq(p, nlen, "connection", 10)) {
        if (has_token(v, vlen, "close"))
            x->conn_close = 1;
        if (has_token(v, vlen, "keep-alive"))
            x->keep_alive = 1;
    }
    return 0;
}

/* The status line, without its line end. */
static int x_status_line(mm_h1up_xfer *x, const char *p, size_t n)
{
    if (n < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[7] < '0' || p[7] > '9' || p[8] != ' ' ||
        p[9] < '1' || p[9] > '9' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9' ||
        (n > 12 && p[12] != ' '))
        return -1;
    x->minor = p[7] - '0';
    x->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (x->status == 101)
        return -1; /* we never ask to switch protocols */
    x->interim = x->status < 200;
    x->have_cl = 0;
    x->te = x->chunked = 0;
    x->conn_close = x->keep_alive = 0;
    return 0;
}

/* After the blank line of a final answer: how its body is framed. */
static int x_body_start(mm_h1up_xfer *x)
{
    if (x->rq.head_only || x->status == 204 || x->status == 304)
        return P_DONE;
    if (x->te) {
        if (x->chunked) {
            x->ps = PS_CHUNK_SIZE;
            return P_MORE;
        }
        x->remain = -1; /* another coding last: the body runs until close */
    } else if (x->have_cl) {
        if (x->cl == 0)
            return P_DONE;
        x->remain = x->cl;
    } else {
        x->remain = -1;
    }
    x->ps = PS_BODY;
    return P_MORE;
}

/* Run the parser over the buffered bytes. */
static int x_parse(mm_h1up_xfer *x)
{
    h1_conn *c = x->conn;
    /* Framing errors; the callbacks set their own. */
    x->fail_rc = CURLE_WEIRD_SERVER_REPLY;
    for (;;) {
        char *p = c->rbuf + c->rpos;
        size_t n = c->rlen - c->rpos;
        if (x->ps == PS_BODY || x->ps == PS_CHUNK_DATA) {
            if (n == 0)
                return P_MORE;
            size_t d = n;
            if (x->remain >= 0 && (uint64_t)x->remain < d)
                d = (size_t)x->remain;
            int r = x_deliver(x, p, d);
            if (r != P_MORE)
                return r;
            c->rpos += d;
            if (x->remain >= 0) {
                x->remain -= (int64_t)d;
                if (x->remain == 0) {
                    if (x->ps == PS_BODY)
                        return P_DONE;
                    x->ps = PS_CHUNK_END;
                }
            }
            continue;
        }
        /* Line-based states. */
        if (x->ps == PS_STATUS && n >= 5 && memcmp(p, "HTTP/", 5) != 0) {
            x_err(x, "%s", "the upstream's answer is not HTTP");
            return P_FAILED;
        }
        int in_head = x->ps == PS_STATUS || x->ps == PS_HEADER || x->ps == PS_TRAILER;
        char *nl = memchr(p, '\n', n);
        if (!nl) {
            if (in_head ? x->head_bytes + n > H1_MAX_HEAD : n > H1_MAX_LINE) {
                x_err(x, "%s", "the upstream's header section or a chunk line is too long");
                return P_FAILED;
            }
            return P_MORE;
        }
        size_t full = (size_t)(nl - p) + 1, len = full - 1;
        if (len && p[len - 1] == '\r')
            len--;
        int r = P_MORE;
        if (in_head) {
            x->head_bytes += full;
            if (x->head_bytes > H1_MAX_HEAD) {
                x_err(x, "%s", "the upstream's header section is too long");
                return P_FAILED;
            }
        }
        switch (x->ps) {
        case PS_STATUS:
            if (x_status_line(x, p, len) != 0) {
                x_err(x, "%s", "invalid status line from the upstream");
                return P_FAILED;
            }
            r = x_header_cb(x, p, full);
            x->ps = PS_HEADER;
            break;
        case PS_HEADER:
            if (len == 0) {
                r = x_header_cb(x, p, full);
                if (r != P_MORE)
                    return r;
                c->rpos += full;
                if (x->interim) {
                    x->ps = PS_STATUS;
                    continue;
                }
                r = x_body_start(x);
                if (r != P_MORE)
                    return r;
                continue;
            }
            if (x_header_line(x, p, len) != 0) {
                x_err(x, "%s", "invalid header line from the upstream");
                return P_FAILED;
            }
            r = x_header_cb(x, p, full);
            break;
        case PS_CHUNK_SIZE: {
            uint64_t sz = 0;
            size_t i = 0;
            for (; i < len && i < 16; i++) {
                char ch = p[i];
                int d = ch >= '0' && ch <= '9' ? ch - '0'
                      : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                      : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
                if (d < 0)
                    break;
                sz = sz * 16 + (uint64_t)d;
            }
            /* At least one hex digit, at most 15, then nothing or an
             * extension. */
            if (i == 0 || i > 15 || (i < len && p[i] != ';' && !is_ows(p[i]))) {
                x_err(x, "%s", "invalid chunk size from the upstream");
                return P_FAILED;
            }
            if (sz == 0) {
                x->ps = PS_TRAILER;
            } else {
                x->remain = (int64_t)sz;
                x->ps = PS_CHUNK_DATA;
            }
            break;
        }
        case PS_CHUNK_END:
            if (len != 0) {
                x_err(x, "%s", "invalid chunk framing from the upstream");
                return P_FAILED;
            }
            x->ps = PS_CHUNK_SIZE;
            break;
        case PS_TRAILER:
            /* Trailer fields are dropped: the client's head is gone. */
            if (len == 0) {
                c->rpos += full;
                return P_DONE;
            }
            break;
        default:
            break;
        }
        if (r != P_MORE)
            return r;
        c->rpos += full;
    }
}

/* Act on a parser result. */
static void x_after_parse(mm_h1up_xfer *x, int r)
{
    h1_conn *c = x->conn;
    switch (r) {
    case P_MORE:
        if (c->rpos == c->rlen) {
            c->rpos = c->rlen = 0;
        } else if (c->rpos > 0) {
            memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
            c->rlen -= c->rpos;
            c->rpos = 0;
        }
        break;
    case P_DONE:
        x_finish(x, CURLE_OK);
        break;
    case P_PAUSED:
        /* Level-triggered: stop listening until resumed. */
        event_del(c->rev);
        break;
    case P_FAILED:
        x_finish(x, x->fail_rc);
        break;
    default: /* P_GONE: cancelled from a callback, already cleaned up */
        break;
    }
}

/* The connection was cancelled by the owner while inside a callback. */
static void x_free_cancelled(mm_h1up_xfer *x);

static void c_on_read(evutil_socket_t fd, short what, void *arg)
{
    h1_conn *c = arg;
    mm_h1up_xfer *x = c->x;
    (void)what;
    if (!x) {
        /* Idle: EOF, a reset or bytes nobody asked for. Either way the
         * connection cannot carry another request. */
        char tmp[256];
        ssize_t n = recv(fd, tmp, sizeof tmp, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        conn_close(c);
        return;
    }
    if (x->paused)
        return;
    if (c->rpos < c->rlen) {
        /* Resumed after a pause: what was read already goes first. */
        int r = x_parse(x);
        if (r == P_GONE) {
            x_free_cancelled(x);
            return;
        }
        x_after_parse(x, r);
        if (r != P_MORE)
            return;
    }
    if (c->rlen == c->rcap) {
        size_t ncap = c->rcap * 2 > H1_RBUF_MAX ? H1_RBUF_MAX : c->rcap * 2;
        char *nb = ncap > c->rcap ? realloc(c->rbuf, ncap) : NULL;
        if (!nb) {
            x_err(x, "%s", "the upstream's header section is too long");
            x_finish(x, CURLE_WEIRD_SERVER_REPLY);
            return;
        }
        c->rbuf = nb;
        c->rcap = ncap;
    }
    ssize_t n = recv(fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (n > 0) {
        c->rlen += (size_t)n;
        x->got += (uint64_t)n;
        int r = x_parse(x);
        if (r == P_GONE) {
            x_free_cancelled(x);
            return;
        }
        x_after_parse(x, r);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n < 0) {
        x_fail_io(x, CURLE_RECV_ERROR, "Recv failure: %s", strerror(errno));
        return;
    }
    /* EOF */
    if (x->ps == PS_BODY && x->remain == -1) {
        x_finish(x, CURLE_OK); /* close-delimited body: complete */
        return;
    }
    if (x->got == 0) {
        x_fail_io(x, CURLE_GOT_NOTHING, "%s", "Empty reply from server");
        return;
    }
    if (x->ps == PS_BODY) {
        char left[32];
        snprintf(left, sizeof left, "%lld", (long long)x->remain);
        x_err(x, "transfer closed with %s bytes remaining to read", left);
        x_finish(x, CURLE_PARTIAL_FILE);
        return;
    }
    if (x->ps >= PS_CHUNK_SIZE) {
        x_err(x, "%s", "transfer closed with outstanding read data remaining");
        x_finish(x, CURLE_PARTIAL_FILE);
        return;
    }
    x_err(x, "%s", "connection closed in the middle of the answer's header");
    x_finish(x, CURLE_RECV_ERROR);
}

static void c_on_write(evutil_socket_t fd, short what, void *arg)
{
    h1_conn *c = arg;
    (void)fd;
    (void)what;
    if (c->x)
        x_send(c->x);
}

/* Write what is left of head and body; waits for EV_WRITE on a full
 * socket buffer. */
static void x_send(mm_h1up_xfer *x)
{
    h1_conn *c = x->conn;
    size_t hl = x->head.len, total = hl + x->rq.body_len;
    while (x->sent < total) {
        struct iovec iov[2];
        int k = 0;
        if (x->sent < hl) {
            iov[k].iov_base = x->head.data + x->sent;
            iov[k++].iov_len = hl - x->sent;
        }
        if (x->rq.body_len) {
            size_t off = x->sent > hl ? x->sent - hl : 0;
            iov[k].iov_base = (char *)x->rq.body + off;
            iov[k++].iov_len = x->rq.body_len - off;
        }
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)k};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (w > 0) {
            x->sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            event_add(c->wev, NULL);
            return;
        }
        x_fail_io(x, CURLE_SEND_ERROR, "Send failure: %s", strerror(w < 0 ? errno : EPIPE));
        return;
    }
}

/* Attach connection c (pooled or just made) and send. */
static void x_attach(mm_h1up_xfer *x, h1_conn *c)
{
    x->conn = c;
    c->x = x;
    c->rpos = c->rlen = 0;
    x->reused = c->nreq > 0;
    x->state = X_ACTIVE;
    x_send(x);
}

static void x_on_connected(void *arg, CURLcode rc, int fd)
{
    mm_h1up_xfer *x = arg;
    x->connecting = NULL;
    if (rc != CURLE_OK) {
        if (x->rq.errbuf && !x->rq.errbuf[0])
            x_err(x, "%s", curl_easy_strerror(rc));
        x_finish(x, rc);
        return;
    }
    h1_conn *c = conn_new(x->h, x->host, fd);
    if (!c) {
        close(fd);
        x_err(x, "%s", "out of memory");
        x_finish(x, CURLE_OUT_OF_MEMORY);
        return;
    }
    x_attach(x, c);
}

/* A fresh connection through libcurl (DNS, connect timeout, messages). */
static void x_connect(mm_h1up_xfer *x)
{
    mm_upstream *u = x->h->u;
    CURL *e = mm_upstream_easy(u);
    if (!e) {
        x_err(x, "%s", "out of memory");
        event_active(x->kick, EV_TIMEOUT, 0);
        x->state = X_CONNECTING; /* the kick reports it */
        return;
    }
    curl_easy_setopt(e, CURLOPT_URL, x->host->connect_url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http");
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->rq.errbuf);
    if (x->rq.connect_ms > 0)
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, x->rq.connect_ms);
    x->state = X_CONNECTING;
    if (mm_upstream_connect(u, e, x_on_connected, x) != 0) {
        mm_upstream_recycle(u, e);
        x_err(x, "%s", "cannot start the connect");
        event_active(x->kick, EV_TIMEOUT, 0);
        return;
    }
    x->connecting = e;
}

static void x_on_kick(evutil_socket_t fd, short what, void *arg)
{
    mm_h1up_xfer *x = arg;
    (void)fd;
    (void)what;
    if (x->state == X_CONNECTING && !x->connecting) {
        x_finish(x, CURLE_OUT_OF_MEMORY); /* x_connect could not start */
        return;
    }
    if (x->state != X_ACTIVE || x->paused || !x->conn)
        return;
    h1_conn *c = x->conn;
    if (!event_pending(c->rev, EV_READ, NULL))
        event_add(c->rev, NULL);
    /* Buffered bytes first (c_on_read does), then whatever else came. */
    c_on_read(c->fd, EV_READ, c);
}

/* ---- API ---- */

int mm_h1up_new(struct event_base *base, mm_upstream *u, mm_upstream_done_fn done, mm_h1up **out)
{
    mm_h1up *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->base = base;
    h->u = u;
    h->done = done;
    h->sweep = evtimer_new(base, h_on_sweep, h);
    if (!h->sweep) {
        free(h);
        return -ENOMEM;
    }
    *out = h;
    return 0;
}

static void x_destroy(mm_h1up_xfer *x)
{
    mm_buf_free(&x->head);
    if (x->timer)
        event_free(x->timer);
    if (x->kick)
        event_free(x->kick);
    free(x);
}

void mm_h1up_free(mm_h1up *h)
{
    if (!h)
        return;
    while (h->all) {
        h1_conn *c = h->all;
        if (c->x) {
            c->x->conn = NULL;
            c->x = NULL;
        }
        conn_close(c);
    }
    for (size_t i = 0; i < h->nhosts; i++)
        host_free(h->hosts[i]);
    free(h->hosts);
    event_free(h->sweep);
    while (h->free_x) {
        mm_h1up_xfer *x = h->free_x;
        h->free_x = x->next_free;
        x_destroy(x);
    }
    free(h);
}

mm_h1up_xfer *mm_h1up_xfer_get(mm_h1up *h)
{
    mm_h1up_xfer *x = h->free_x;
    if (x) {
        h->free_x = x->next_free;
        h->nfree--;
    } else {
        x = calloc(1, sizeof *x);
        if (!x)
            return NULL;
        x->h = h;
        mm_buf_init(&x->head, H1_MAX_HEAD_REQ);
        x->timer = evtimer_new(h->base, x_on_timer, x);
        x->kick = event_new(h->base, -1, 0, x_on_kick, x);
        if (!x->timer || !x->kick) {
            x_destroy(x);
            return NULL;
        }
    }
    x->state = X_READY;
    x->next_free = NULL;
    x->conn = NULL;
    x->connecting = NULL;
    x->sent = 0;
    x->retried = x->reused = 0;
    x->in_cb = x->cancelled = 0;
    x_reset_answer(x);
    mm_buf_reset(&x->head);
    return x;
}

mm_buf *mm_h1up_head(mm_h1up_xfer *x)
{
    return &x->head;
}

int mm_h1up_start(mm_h1up_xfer *x, const mm_h1up_req *rq, void *priv)
{
    mm_h1up *h = x->h;
    if (x->state != X_READY || !mm_h1up_url_ok(rq->url) || !rq->on_header || !rq->on_data)
        return -EINVAL;
    h1_host *t = host_find(h, rq->url);
    if (!t)
        return -ENOMEM;
    x->rq = *rq;
    x->priv = priv;
    x->host = t;
    t->refs++;
    if (rq->errbuf)
        rq->errbuf[0] = '\0';
    if (rq->timeout_ms > 0) {
        struct timeval tv = {rq->timeout_ms / 1000, (rq->timeout_ms % 1000) * 1000};
        evtimer_add(x->timer, &tv);
    }
    h1_conn *c = pool_take(t);
    if (c)
        x_attach(x, c);
    else
        x_connect(x);
    return 0;
}

/* Back to the free list (or freed past its cap). */
static void x_put(mm_h1up_xfer *x)
{
    mm_h1up *h = x->h;
    if (x->host) {
        x->host->refs--;
        x->host = NULL;
    }
    x->state = X_FREE;
    if (h->nfree >= H1_FREE_XFER_MAX) {
        x_destroy(x);
        return;
    }
    /* A big request head is not kept around. */
    if (x->head.cap > 64 * 1024) {
        mm_buf_free(&x->head);
        mm_buf_init(&x->head, H1_MAX_HEAD_REQ);
    }
    x->next_free = h->free_x;
    h->free_x = x;
    h->nfree++;
}

static void x_free_cancelled(mm_h1up_xfer *x)
{
    h1_conn *c = x->conn;
    x->conn = NULL;
    if (c) {
        c->x = NULL;
        conn_close(c);
    }
    x_put(x);
}

void mm_h1up_cancel(mm_h1up_xfer *x)
{
    if (!x)
        return;
    evtimer_del(x->timer);
    event_del(x->kick);
    if (x->connecting) {
        mm_upstream_cancel(x->h->u, x->connecting);
        x->connecting = NULL;
    }
    if (x->in_cb) {
        /* The parser is below us on the stack: it frees x on return. */
        x->cancelled = 1;
        return;
    }
    x_free_cancelled(x);
}

void mm_h1up_release(mm_h1up_xfer *x)
{
    if (!x)
        return;
    if (x->state == X_CONNECTING || x->state == X_ACTIVE) {
        mm_h1up_cancel(x);
        return;
    }
    x_put(x);
}

void mm_h1up_resume(mm_h1up_xfer *x)
{
    if (!x || !x->paused)
        return;
    x->paused = 0;
    /* From the loop, not from here: the caller is inside the client's
     * drain callback and delivery may finish the transfer. */
    event_active(x->kick, EV_TIMEOUT, 0);
}
