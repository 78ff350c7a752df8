/* httpd.c: HTTP/1.1 server connections on raw sockets and libevent events.
 *
 * Per connection: read bytes into one capped buffer, find a complete head,
 * parse it strictly, read the body by its framing (Content-Length or
 * chunked, each capped), then hand the exchange to the handler. While a
 * response runs, further input (a pipelined request) waits in the buffer,
 * bounded by max_pipelined_bytes, and reading goes on so that a client
 * disconnect is seen at once (the gateway must abort the upstream then).
 *
 * Why not bufferevents: a bufferevent arms and disarms its write event for
 * every response (two epoll_ctl calls) and asks FIONREAD before each read.
 * Here responses are written straight away with one writev; the write event
 * is armed only when the kernel did not take everything. That halves the
 * system calls per proxied request. */
#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "jsonutil.h"
#include "log.h"

#define HTTPD_MAX_LISTENERS 8
/* Output above this is "high": on_drain fires when it falls below LOW. */
#define HTTPD_OUT_LOW (64 * 1024)
#define HTTPD_READ_CHUNK (16 * 1024)

enum conn_state { ST_HEAD, ST_BODY_CL, ST_BODY_CHUNKED, ST_ACTIVE, ST_CLOSING };

struct mm_http_conn {
    mm_httpd        *httpd;
    evutil_socket_t  fd;
    struct event    *rev;           /* persistent read event */
    struct event    *wev;           /* armed only while output is pending */
    struct event    *timer;         /* idle / slow-client timeout, lazily re-armed */
    struct evbuffer *out;
    mm_buf           in;            /* bytes read, from in_off on not consumed */
    size_t           in_off;
    enum conn_state  state;
    mm_http_exchange *ex;
    mm_chunked       chunk;
    uint64_t         body_need;     /* Content-Length bytes still to read */
    size_t           scan_from;     /* unconsumed input already known to hold no '\n' */
    uint64_t         last_ns;       /* last read or write progress */
    int              reading;       /* rev is added */
    int              close_after;   /* close once the current response ends */
    int              close_delimited; /* HTTP/1.0 streamed body */
    int              in_process;    /* re-entrancy guard for process() */
    int              dead;          /* free when process() unwinds */
    int              out_high;      /* pending output went above LOW */
    int              broken;        /* a write failed; closed from the timer */
    char             peer[64];
    mm_http_conn    *prev, *next;
};

struct mm_httpd {
    struct event_base     *base;
    mm_httpd_limits        lim;
    mm_httpd_handler       handler;
    void                  *arg;
    struct evconnlistener *listeners[HTTPD_MAX_LISTENERS];
    size_t                 nlisteners;
    int                    port;
    mm_http_conn          *conns;
    size_t                 active;
    int                    draining;
};

uint64_t mm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

const char *mm_http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default:  return "Unknown";
    }
}

static void conn_process(mm_http_conn *c);
static void conn_free(mm_http_conn *c);

static void conn_read_enable(mm_http_conn *c, int on)
{
    if (on && !c->reading)
        event_add(c->rev, NULL);
    else if (!on && c->reading)
        event_del(c->rev);
    c->reading = on;
}

/* Unconsumed input. */
static const char *in_data(const mm_http_conn *c) { return c->in.data + c->in_off; }
static size_t in_len(const mm_http_conn *c) { return c->in.len - c->in_off; }

static void in_consume(mm_http_conn *c, size_t n)
{
    c->in_off += n;
    if (c->in_off == c->in.len) {
        c->in.len = 0;
        c->in_off = 0;
    }
}

/* Write queued output now; arm the write event only for what the kernel did
 * not take. Returns -1 when the connection failed: freed at once when
 * can_free, else (we are inside the handler, which must not see its
 * exchange vanish under it) closed from the timer callback right after. */
static int conn_flush_ex(mm_http_conn *c, int can_free)
{
    if (c->broken)
        return -1;
    while (evbuffer_get_length(c->out) > 0) {
        int n = evbuffer_write(c->out, c->fd);
        if (n > 0) {
            c->last_ns = mm_now_ns();
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            if (!event_pending(c->wev, EV_WRITE, NULL))
                event_add(c->wev, NULL);
            return 0;
        }
        /* the peer is gone */
        if (can_free) {
            conn_free(c);
        } else {
            c->broken = 1;
            conn_read_enable(c, 0);
            event_active(c->timer, EV_TIMEOUT, 0);
        }
        return -1;
    }
    if (event_pending(c->wev, EV_WRITE, NULL))
        event_del(c->wev);
    if (!can_free)
        return 0;
    if (c->state == ST_CLOSING) {
        conn_free(c);
        return -1;
    }
    if (c->out_high && c->ex && c->ex->on_drain) {
        c->out_high = 0;
        c->ex->on_drain(c->ex, c->ex->udata);
    }
    return 0;
}

static int conn_flush(mm_http_conn *c)
{
    return conn_flush_ex(c, 1);
}

static void conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
    mm_http_conn *c = arg;
    (void)fd;
    (void)what;
    if (conn_flush(c) < 0)
        return;
    if (c->out_high && c->ex && c->ex->on_drain && evbuffer_get_length(c->out) <= HTTPD_OUT_LOW) {
        c->out_high = 0;
        c->ex->on_drain(c->ex, c->ex->udata);
    }
}

static void conn_arm_timer(mm_http_conn *c);

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    mm_http_conn *c = arg;
    (void)fd;
    (void)what;
    if (c->broken) {
        conn_free(c);
        return;
    }
    int ms = c->httpd->lim.idle_timeout_ms;
    /* While a response runs the client legitimately sends nothing: only a
     * client that stops reading our output is timed out then. */
    int bounded = c->state != ST_ACTIVE || evbuffer_get_length(c->out) > 0;
    if (bounded && mm_now_ns() - c->last_ns >= (uint64_t)ms * 1000000ull) {
        mm_debug("httpd: %s timed out", c->peer);
        conn_free(c);
        return;
    }
    conn_arm_timer(c);
}

static void conn_arm_timer(mm_http_conn *c)
{
    int ms = c->httpd->lim.idle_timeout_ms;
    if (ms <= 0)
        return;
    uint64_t now = mm_now_ns(), due = c->last_ns + (uint64_t)ms * 1000000ull;
    uint64_t left = due > now ? due - now : (uint64_t)ms * 1000000ull;
    struct timeval tv = {(time_t)(left / 1000000000ull), (suseconds_t)(left % 1000000000ull / 1000)};
    evtimer_add(c->timer, &tv);
}

static void exchange_free(mm_http_exchange *ex)
{
    if (!ex)
        return;
    mm_buf_free(&ex->body);
    mm_buf_free(&ex->head);
    free(ex);
}

static void conn_free(mm_http_conn *c)
{
    if (c->in_process) {
        c->dead = 1;
        conn_read_enable(c, 0);
        return;
    }
    mm_httpd *h = c->httpd;
    if (c->ex) {
        mm_http_exchange *ex = c->ex;
        c->ex = NULL;
        __atomic_sub_fetch(&h->active, 1, __ATOMIC_RELAXED);
        if (ex->on_abort)
            ex->on_abort(ex, ex->udata);
        exchange_free(ex);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    event_free(c->rev);
    event_free(c->wev);
    event_free(c->timer);
    evbuffer_free(c->out);
    mm_buf_free(&c->in);
    evutil_closesocket(c->fd);
    free(c);
}

/* Finish the current exchange: keep-alive goes back to reading heads, else
 * the connection closes once its output is flushed. */
static void conn_exchange_done(mm_http_conn *c)
{
    mm_http_exchange *ex = c->ex;
    c->ex = NULL;
    __atomic_sub_fetch(&c->httpd->active, 1, __ATOMIC_RELAXED);
    exchange_free(ex);
    if (c->close_after || c->httpd->draining) {
        c->state = ST_CLOSING;
        conn_read_enable(c, 0);
        conn_flush(c);
        return;
    }
    c->state = ST_HEAD;
    c->scan_from = 0;
    c->last_ns = mm_now_ns();
    if (conn_flush(c) < 0)
        return;
    conn_read_enable(c, 1);
    if (!c->in_process && in_len(c) > 0)
        conn_process(c);
}

/* An error before the handler ran: answer and close. */
static void conn_fail(mm_http_conn *c, int status, const char *msg)
{
    if (!c->ex) {
        mm_http_exchange *ex = calloc(1, sizeof *ex);
        if (!ex) {
            conn_free(c);
            return;
        }
        ex->conn = c;
        mm_buf_init(&ex->head, 0);
        mm_buf_init(&ex->body, 0);
        ex->req.keep_alive = 0;
        ex->req.version_minor = 1;
        c->ex = ex;
        __atomic_add_fetch(&c->httpd->active, 1, __ATOMIC_RELAXED);
    }
    c->close_after = 1;
    c->state = ST_ACTIVE;
    conn_read_enable(c, 0);
    mm_http_respond_error(c->ex, status, NULL, NULL, "%s", msg);
}

static void conn_dispatch(mm_http_conn *c)
{
    mm_http_exchange *ex = c->ex;
    c->state = ST_ACTIVE;
    ex->start_ns = ex->start_ns ? ex->start_ns : mm_now_ns();
    c->httpd->handler(ex, c->httpd->arg);
}

/* Try to parse a head from the input. Returns 1 when an exchange was set up
 * (state moved on), 0 when more bytes are needed, -1 when the connection
 * failed. */
static int conn_parse_head(mm_http_conn *c)
{
    mm_httpd *h = c->httpd;
    size_t len = in_len(c);
    size_t max = h->lim.max_header_bytes;
    size_t n = len < max ? len : max;
    const char *p = in_data(c);
    /* Only re-run the parser when a new line end arrived: a head trickling in
     * byte by byte must not cost quadratic time. */
    if (len < max) {
        if (c->scan_from >= n || !memchr(p + c->scan_from, '\n', n - c->scan_from)) {
            c->scan_from = n;
            return 0;
        }
    }
    c->scan_from = n;
    mm_http_exchange *ex = calloc(1, sizeof *ex);
    if (!ex) {
        conn_free(c);
        return -1;
    }
    char err[160] = "";
    int rc = mm_http_parse_request_head(p, n, max, &ex->req, err, sizeof err);
    if (rc == 0) {
        free(ex);
        return 0;
    }
    mm_buf_init(&ex->head, max + 1);
    mm_buf_init(&ex->body, h->lim.max_body_bytes);
    ex->conn = c;
    c->ex = ex;
    __atomic_add_fetch(&h->active, 1, __ATOMIC_RELAXED);
    if (rc < 0) {
        if (rc == -E2BIG)
            conn_fail(c, 431, "request header section too large");
        else if (rc == -ENOTSUP)
            conn_fail(c, 505, "HTTP version not supported");
        else {
            char msg[256];
            snprintf(msg, sizeof msg, "malformed request: %s", err[0] ? err : "bad framing");
            conn_fail(c, 400, msg);
        }
        return -1;
    }
    /* Keep our own copy of the head: the parser's pointers must outlive the
     * input buffer, which moves as more bytes arrive. Rebase them. */
    size_t head_len = (size_t)rc;
    if (mm_buf_append(&ex->head, p, head_len) != 0) {
        conn_fail(c, 500, "out of memory");
        return -1;
    }
    mm_http_request_rebase(&ex->req, p, ex->head.data);
    in_consume(c, head_len);
    c->scan_from = 0;
    snprintf(ex->peer, sizeof ex->peer, "%s", c->peer);
    ex->start_ns = mm_now_ns();
    ex->head_only_method = ex->req.method_len == 4 && memcmp(ex->req.method, "HEAD", 4) == 0;
    c->close_after = !ex->req.keep_alive;
    if (ex->req.chunked) {
        mm_chunked_init(&c->chunk);
        c->state = ST_BODY_CHUNKED;
    } else if (ex->req.content_length > 0) {
        if ((uint64_t)ex->req.content_length > h->lim.max_body_bytes) {
            conn_fail(c, 413, "request body too large");
            return -1;
        }
        c->body_need = (uint64_t)ex->req.content_length;
        c->state = ST_BODY_CL;
    } else {
        conn_dispatch(c);
        return 1;
    }
    if (ex->req.expect_continue && in_len(c) == 0) {
        evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
        if (conn_flush(c) < 0)
            return -1;
    }
    return 1;
}

static void conn_process(mm_http_conn *c)
{
    c->in_process = 1;
    for (;;) {
        if (c->dead)
            break;
        size_t len = in_len(c);
        if (c->state == ST_HEAD) {
            if (len == 0 || conn_parse_head(c) <= 0)
                break;
        } else if (c->state == ST_BODY_CL) {
            if (len == 0)
                break;
            size_t take = len < c->body_need ? len : (size_t)c->body_need;
            if (mm_buf_append(&c->ex->body, in_data(c), take) != 0) {
                conn_fail(c, 413, "request body too large");
                break;
            }
            in_consume(c, take);
            c->body_need -= take;
            if (c->body_need == 0)
                conn_dispatch(c);
        } else if (c->state == ST_BODY_CHUNKED) {
            if (len == 0)
                break;
            size_t used = 0;
            char err[160] = "";
            int rc = mm_chunked_feed(&c->chunk, in_data(c), len, &used, &c->ex->body, err, sizeof err);
            in_consume(c, used);
            if (rc == -E2BIG) {
                conn_fail(c, 413, "request body too large");
                break;
            } else if (rc == -ENOMEM) {
                conn_fail(c, 500, "out of memory");
                break;
            } else if (rc < 0) {
                char msg[256];
                snprintf(msg, sizeof msg, "malformed chunked body: %s", err[0] ? err : "bad framing");
                conn_fail(c, 400, msg);
                break;
            } else if (rc == 1) {
                conn_dispatch(c);
            } else {
                break;
            }
        } else {
            /* ST_ACTIVE / ST_CLOSING: a pipelined request waits its turn. */
            if (c->state == ST_ACTIVE && len > c->httpd->lim.max_pipelined_bytes)
                conn_read_enable(c, 0);
            break;
        }
    }
    c->in_process = 0;
    if (c->dead)
        conn_free(c);
}

static void conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
    mm_http_conn *c = arg;
    (void)what;
    /* Room for the next read; compact consumed bytes first. */
    if (c->in_off > 0 && (c->in_off == c->in.len || c->in_off >= c->in.len / 2)) {
        memmove(c->in.data, c->in.data + c->in_off, c->in.len - c->in_off);
        c->in.len -= c->in_off;
        c->in_off = 0;
    }
    size_t room = c->in.max - c->in.len;
    if (room == 0) {
        /* A head or pipelined burst over the cap while busy: stop reading
         * until the current response ends. */
        conn_read_enable(c, 0);
        if (c->state == ST_HEAD)
            conn_fail(c, 431, "request header section too large");
        return;
    }
    if (room > HTTPD_READ_CHUNK)
        room = HTTPD_READ_CHUNK;
    if (c->in.cap < c->in.len + room + 1) {
        /* mm_buf grows by doubling; reserve through an empty append. */
        size_t want = c->in.len + room;
        char *nd = realloc(c->in.data, want + 1);
        if (!nd) {
            conn_free(c);
            return;
        }
        c->in.data = nd;
        c->in.cap = want + 1;
    }
    ssize_t n = recv(fd, c->in.data + c->in.len, room, 0);
    if (n > 0) {
        c->in.len += (size_t)n;
        c->in.data[c->in.len] = '\0';
        c->last_ns = mm_now_ns();
        conn_process(c);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    /* EOF or error: the client is gone; a running exchange is aborted
     * through its on_abort in conn_free. */
    conn_free(c);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    mm_httpd *h = arg;
    (void)l;
    (void)salen;
    mm_http_conn *c = calloc(1, sizeof *c);
    if (!c) {
        evutil_closesocket(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    evutil_make_socket_nonblocking(fd);
    c->httpd = h;
    c->fd = fd;
    c->rev = event_new(h->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
    c->wev = event_new(h->base, fd, EV_WRITE | EV_PERSIST, conn_write_cb, c);
    c->timer = evtimer_new(h->base, conn_timer_cb, c);
    c->out = evbuffer_new();
    /* The input cap: a full head plus pipelined bytes; bodies move on to the
     * exchange's own capped buffer as they arrive. */
    mm_buf_init(&c->in, h->lim.max_header_bytes + h->lim.max_pipelined_bytes + HTTPD_READ_CHUNK);
    if (!c->rev || !c->wev || !c->timer || !c->out) {
        if (c->rev) event_free(c->rev);
        if (c->wev) event_free(c->wev);
        if (c->timer) event_free(c->timer);
        if (c->out) evbuffer_free(c->out);
        evutil_closesocket(fd);
        free(c);
        return;
    }
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        port = ntohs(s4->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        port = ntohs(s6->sin6_port);
    }
    snprintf(c->peer, sizeof c->peer, "%s:%d", ip, port);
    c->next = h->conns;
    if (h->conns)
        h->conns->prev = c;
    h->conns = c;
    c->last_ns = mm_now_ns();
    conn_read_enable(c, 1);
    conn_arm_timer(c);
}

int mm_httpd_new(struct event_base *base, const mm_httpd_limits *lim, mm_httpd_handler handler,
                 void *arg, mm_httpd **out)
{
    mm_httpd *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->base = base;
    h->lim = *lim;
    if (h->lim.max_pipelined_bytes == 0)
        h->lim.max_pipelined_bytes = h->lim.max_header_bytes + 64 * 1024;
    h->handler = handler;
    h->arg = arg;
    *out = h;
    return 0;
}

int mm_httpd_listen(mm_httpd *h, const char *host, int port, int reuseport, char *err,
                    size_t errlen)
{
    if (h->nlisteners >= HTTPD_MAX_LISTENERS) {
        snprintf(err, errlen, "too many listeners");
        return -ENOSPC;
    }
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    int gai = getaddrinfo(host && host[0] ? host : NULL, portstr, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "resolve %s: %s", host ? host : "*", gai_strerror(gai));
        return -EINVAL;
    }
    unsigned flags = LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC;
    if (reuseport)
        flags |= LEV_OPT_REUSEABLE_PORT;
    struct evconnlistener *l = evconnlistener_new_bind(h->base, accept_cb, h, flags, 1024,
                                                       res->ai_addr, (int)res->ai_addrlen);
    int e = errno;
    freeaddrinfo(res);
    if (!l) {
        snprintf(err, errlen, "listen on %s:%d: %s", host ? host : "*", port, strerror(e));
        return -(e ? e : EINVAL);
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (h->nlisteners == 0 &&
        getsockname(evconnlistener_get_fd(l), (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            h->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            h->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    h->listeners[h->nlisteners++] = l;
    return 0;
}

int mm_httpd_port(const mm_httpd *h) { return h->port; }
size_t mm_httpd_active(const mm_httpd *h) { return __atomic_load_n(&h->active, __ATOMIC_RELAXED); }

void mm_httpd_stop_accepting(mm_httpd *h)
{
    for (size_t i = 0; i < h->nlisteners; i++)
        evconnlistener_free(h->listeners[i]);
    h->nlisteners = 0;
}

void mm_httpd_drain(mm_httpd *h)
{
    mm_httpd_stop_accepting(h);
    h->draining = 1;
    mm_http_conn *c = h->conns;
    while (c) {
        mm_http_conn *next = c->next;
        if (c->ex)
            c->close_after = 1;
        else if (c->state == ST_HEAD && in_len(c) == 0 && evbuffer_get_length(c->out) == 0)
            conn_free(c); /* idle keep-alive: nothing is lost */
        c = next;
    }
}

void mm_httpd_free(mm_httpd *h)
{
    if (!h)
        return;
    mm_httpd_stop_accepting(h);
    while (h->conns)
        conn_free(h->conns);
    free(h);
}

/* ---- responses ---- */

int mm_http_begin(mm_http_exchange *ex, int status, const char *headers, int64_t content_length)
{
    mm_http_conn *c = ex->conn;
    if (ex->began)
        return -EALREADY;
    ex->began = 1;
    ex->no_body = ex->head_only_method || status == 204 || status == 304 ||
                  (status >= 100 && status < 200);
    c->close_delimited = 0;
    if (content_length < 0 && !ex->no_body) {
        if (ex->req.version_minor >= 1) {
            ex->chunked_out = 1;
        } else {
            /* HTTP/1.0 has no chunked framing: the body ends at close. */
            c->close_delimited = 1;
            c->close_after = 1;
        }
    }
    struct evbuffer *out = c->out;
    char line[512];
    int n = snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, mm_http_status_text(status));
    evbuffer_add(out, line, (size_t)n);
    if (headers)
        evbuffer_add(out, headers, strlen(headers));
    if (ex->chunked_out)
        n = snprintf(line, sizeof line, "Transfer-Encoding: chunked\r\n");
    else if (content_length >= 0 && status != 204 && status != 304)
        n = snprintf(line, sizeof line, "Content-Length: %lld\r\n", (long long)content_length);
    else
        n = 0;
    evbuffer_add(out, line, (size_t)n);
    if (c->httpd->draining)
        c->close_after = 1;
    if (c->close_after)
        evbuffer_add(out, "Connection: close\r\n\r\n", 21);
    else if (ex->req.version_minor == 0)
        evbuffer_add(out, "Connection: keep-alive\r\n\r\n", 26);
    else
        evbuffer_add(out, "\r\n", 2);
    return 0;
}

int mm_http_write(mm_http_exchange *ex, const void *p, size_t n)
{
    if (!ex->began)
        return -EINVAL;
    if (n == 0 || ex->no_body)
        return 0;
    mm_http_conn *c = ex->conn;
    struct evbuffer *out = c->out;
    if (ex->bytes_sink)
        *ex->bytes_sink += n;
    if (ex->chunked_out) {
        char sz[24];
        int k = snprintf(sz, sizeof sz, "%zx\r\n", n);
        evbuffer_add(out, sz, (size_t)k);
        evbuffer_add(out, p, n);
        evbuffer_add(out, "\r\n", 2);
    } else {
        evbuffer_add(out, p, n);
    }
    /* Stream it now: a token must not wait for the next loop turn. */
    if (conn_flush_ex(c, 0) < 0)
        return -EPIPE;
    if (evbuffer_get_length(out) > HTTPD_OUT_LOW)
        c->out_high = 1;
    return 0;
}

size_t mm_http_pending(const mm_http_exchange *ex)
{
    return evbuffer_get_length(ex->conn->out);
}

void mm_http_set_close(mm_http_exchange *ex)
{
    ex->conn->close_after = 1;
}

void mm_http_end(mm_http_exchange *ex)
{
    mm_http_conn *c = ex->conn;
    if (ex->chunked_out && !ex->no_body)
        evbuffer_add(c->out, "0\r\n\r\n", 5);
    conn_exchange_done(c);
}

void mm_http_abort(mm_http_exchange *ex)
{
    mm_http_conn *c = ex->conn;
    /* Flush what was sent, then close without the final chunk. */
    c->close_after = 1;
    ex->on_abort = NULL;
    conn_exchange_done(c);
}

int mm_http_respond(mm_http_exchange *ex, int status, const char *headers, const void *body,
                    size_t len)
{
    int rc = mm_http_begin(ex, status, headers, (int64_t)len);
    if (rc)
        return rc;
    mm_http_write(ex, body, len);
    mm_http_end(ex);
    return 0;
}

int mm_http_respond_error(mm_http_exchange *ex, int status, const char *param,
                          const char *extra_headers, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mm_buf body, hdr;
    mm_buf_init(&body, 64 * 1024);
    mm_buf_init(&hdr, 8 * 1024);
    mm_oai_error_body(&body, status, param, msg);
    mm_buf_append_str(&hdr, "Content-Type: application/json\r\n");
    if (extra_headers)
        mm_buf_append_str(&hdr, extra_headers);
    int rc = mm_http_respond(ex, status, mm_buf_cstr(&hdr), body.data, body.len);
    mm_buf_free(&body);
    mm_buf_free(&hdr);
    return rc;
}
