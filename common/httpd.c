/* httpd.c: HTTP/1.1 server connections on libevent bufferevents.
 *
 * Per connection: read bytes, find a complete head, parse it strictly, read
 * the body by its framing (Content-Length or chunked, each capped), then hand
 * the exchange to the handler. While a response runs, further input (a
 * pipelined request) stays in the bufferevent's input, bounded by
 * max_pipelined_bytes, and reading goes on so that a client disconnect is
 * seen at once (the gateway must abort the upstream transfer then). */
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

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "jsonutil.h"
#include "log.h"

#define HTTPD_MAX_LISTENERS 8
/* Output above this is "high": on_drain fires when it falls below LOW. */
#define HTTPD_OUT_LOW (64 * 1024)

enum conn_state { ST_HEAD, ST_BODY_CL, ST_BODY_CHUNKED, ST_ACTIVE, ST_CLOSING };

struct mm_http_conn {
    mm_httpd           *httpd;
    struct bufferevent *bev;
    enum conn_state     state;
    mm_http_exchange   *ex;
    mm_chunked          chunk;
    uint64_t            body_need;     /* Content-Length bytes still to read */
    size_t              scan_from;     /* input bytes already known to hold no '\n' */
    int                 close_after;   /* close once the current response ends */
    int                 close_delimited; /* HTTP/1.0 streamed body */
    int                 in_process;    /* re-entrancy guard for process() */
    int                 dead;          /* free when process() unwinds */
    char                peer[64];
    mm_http_conn       *prev, *next;
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

static void conn_read_cb(struct bufferevent *bev, void *ctx);
static void conn_write_cb(struct bufferevent *bev, void *ctx);
static void conn_event_cb(struct bufferevent *bev, short what, void *ctx);
static void conn_process(mm_http_conn *c);

static void set_timeouts(mm_http_conn *c, int reading)
{
    int ms = c->httpd->lim.idle_timeout_ms;
    if (ms <= 0) {
        bufferevent_set_timeouts(c->bev, NULL, NULL);
        return;
    }
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    /* While a response runs the client legitimately sends nothing, so only
     * writes are bounded then (a client that stops reading). */
    bufferevent_set_timeouts(c->bev, reading ? &tv : NULL, &tv);
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
        bufferevent_disable(c->bev, EV_READ | EV_WRITE);
        return;
    }
    mm_httpd *h = c->httpd;
    if (c->ex) {
        mm_http_exchange *ex = c->ex;
        c->ex = NULL;
        h->active--;
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
    bufferevent_free(c->bev);
    free(c);
}

/* Finish the current exchange: keep-alive goes back to reading heads, else
 * the connection closes once its output is flushed. */
static void conn_exchange_done(mm_http_conn *c)
{
    mm_http_exchange *ex = c->ex;
    c->ex = NULL;
    c->httpd->active--;
    exchange_free(ex);
    if (c->close_after) {
        c->state = ST_CLOSING;
        bufferevent_disable(c->bev, EV_READ);
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            conn_free(c);
        return;
    }
    c->state = ST_HEAD;
    c->scan_from = 0;
    set_timeouts(c, 1);
    bufferevent_enable(c->bev, EV_READ);
    if (!c->in_process)
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
        c->httpd->active++;
    }
    c->close_after = 1;
    c->state = ST_ACTIVE;
    bufferevent_disable(c->bev, EV_READ);
    mm_http_respond_error(c->ex, status, NULL, NULL, "%s", msg);
}

static void conn_dispatch(mm_http_conn *c)
{
    mm_http_exchange *ex = c->ex;
    c->state = ST_ACTIVE;
    set_timeouts(c, 0);
    ex->start_ns = ex->start_ns ? ex->start_ns : mm_now_ns();
    c->httpd->handler(ex, c->httpd->arg);
}

/* Try to parse a head from the input. Returns 1 when an exchange was set up
 * (state moved on), 0 when more bytes are needed, -1 when the connection
 * failed. */
static int conn_parse_head(mm_http_conn *c, struct evbuffer *in)
{
    mm_httpd *h = c->httpd;
    size_t len = evbuffer_get_length(in);
    size_t max = h->lim.max_header_bytes;
    size_t n = len < max ? len : max;
    /* Only re-run the parser when a new line end arrived: a head trickling in
     * byte by byte must not cost quadratic time. */
    if (len < max && c->scan_from < n) {
        struct evbuffer_ptr pos;
        evbuffer_ptr_set(in, &pos, c->scan_from, EVBUFFER_PTR_SET);
        struct evbuffer_ptr lf = evbuffer_search(in, "\n", 1, &pos);
        if (lf.pos < 0) {
            c->scan_from = n;
            return 0;
        }
    } else if (len < max) {
        return 0;
    }
    c->scan_from = n;
    const char *p = (const char *)evbuffer_pullup(in, (ssize_t)n);
    mm_http_exchange *ex = calloc(1, sizeof *ex);
    if (!ex || !p) {
        free(ex);
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
    h->active++;
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
     * input buffer, which moves as more bytes arrive. */
    size_t head_len = (size_t)rc;
    if (mm_buf_append(&ex->head, p, head_len) != 0) {
        conn_fail(c, 500, "out of memory");
        return -1;
    }
    evbuffer_drain(in, head_len);
    c->scan_from = 0;
    rc = mm_http_parse_request_head(ex->head.data, head_len, max, &ex->req, err, sizeof err);
    if (rc <= 0) { /* cannot happen: same bytes parsed before */
        conn_fail(c, 400, "malformed request");
        return -1;
    }
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
    if (ex->req.expect_continue && evbuffer_get_length(in) == 0)
        bufferevent_write(c->bev, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 1;
}

static void conn_process(mm_http_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    c->in_process = 1;
    for (;;) {
        if (c->dead)
            break;
        size_t len = evbuffer_get_length(in);
        if (c->state == ST_HEAD) {
            if (len == 0 || conn_parse_head(c, in) <= 0)
                break;
        } else if (c->state == ST_BODY_CL) {
            if (len == 0)
                break;
            size_t take = len < c->body_need ? len : (size_t)c->body_need;
            const char *p = (const char *)evbuffer_pullup(in, (ssize_t)take);
            if (!p || mm_buf_append(&c->ex->body, p, take) != 0) {
                conn_fail(c, 413, "request body too large");
                break;
            }
            evbuffer_drain(in, take);
            c->body_need -= take;
            if (c->body_need == 0)
                conn_dispatch(c);
        } else if (c->state == ST_BODY_CHUNKED) {
            if (len == 0)
                break;
            const char *p = (const char *)evbuffer_pullup(in, -1);
            size_t used = 0;
            char err[160] = "";
            int rc = mm_chunked_feed(&c->chunk, p, len, &used, &c->ex->body, err, sizeof err);
            evbuffer_drain(in, used);
            if (rc == -E2BIG) {
                conn_fail(c, 413, "request body too large");
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
                bufferevent_disable(c->bev, EV_READ);
            break;
        }
    }
    c->in_process = 0;
    if (c->dead)
        conn_free(c);
}

static void conn_read_cb(struct bufferevent *bev, void *ctx)
{
    (void)bev;
    conn_process(ctx);
}

static void conn_write_cb(struct bufferevent *bev, void *ctx)
{
    mm_http_conn *c = ctx;
    size_t pending = evbuffer_get_length(bufferevent_get_output(bev));
    if (c->state == ST_CLOSING) {
        if (pending == 0)
            conn_free(c);
        return;
    }
    if (c->ex && c->ex->on_drain && pending <= HTTPD_OUT_LOW)
        c->ex->on_drain(c->ex, c->ex->udata);
}

static void conn_event_cb(struct bufferevent *bev, short what, void *ctx)
{
    mm_http_conn *c = ctx;
    (void)bev;
    if (what & BEV_EVENT_TIMEOUT)
        mm_debug("httpd: %s timed out", c->peer);
    /* EOF, error or timeout: the client is gone (or too slow); any running
     * exchange is aborted through its on_abort in conn_free. */
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
    c->httpd = h;
    c->bev = bufferevent_socket_new(h->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
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
    bufferevent_setcb(c->bev, conn_read_cb, conn_write_cb, conn_event_cb, c);
    bufferevent_setwatermark(c->bev, EV_WRITE, HTTPD_OUT_LOW, 0);
    set_timeouts(c, 1);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
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
size_t mm_httpd_active(const mm_httpd *h) { return h->active; }

void mm_httpd_stop_accepting(mm_httpd *h)
{
    for (size_t i = 0; i < h->nlisteners; i++)
        evconnlistener_free(h->listeners[i]);
    h->nlisteners = 0;
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
    struct evbuffer *out = bufferevent_get_output(c->bev);
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
    struct evbuffer *out = bufferevent_get_output(ex->conn->bev);
    if (ex->chunked_out) {
        char sz[24];
        int k = snprintf(sz, sizeof sz, "%zx\r\n", n);
        evbuffer_add(out, sz, (size_t)k);
        evbuffer_add(out, p, n);
        evbuffer_add(out, "\r\n", 2);
    } else {
        evbuffer_add(out, p, n);
    }
    return 0;
}

size_t mm_http_pending(const mm_http_exchange *ex)
{
    return evbuffer_get_length(bufferevent_get_output(ex->conn->bev));
}

void mm_http_set_close(mm_http_exchange *ex)
{
    ex->conn->close_after = 1;
}

void mm_http_end(mm_http_exchange *ex)
{
    mm_http_conn *c = ex->conn;
    if (ex->chunked_out && !ex->no_body)
        bufferevent_write(c->bev, "0\r\n\r\n", 5);
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
