/* sse_latency.c: per-chunk latency of an SSE relay, measured with one clock.
 *
 * One process plays both ends of a stream: a fake upstream that answers a
 * POST with chunked text/event-stream, and a client that asks for that
 * stream either directly (--target self) or through a proxy such as the
 * gateway (--target HOST:PORT, the proxy routing to --port). Events go
 * ping-pong: event k+1 leaves the upstream only after the client has parsed
 * event k, so every sample is the one-way latency of one small chunk through
 * the path under test and never includes queueing behind earlier chunks.
 * Send and receive times come from the same CLOCK_MONOTONIC, so there is no
 * clock skew to correct for.
 *
 * Single-threaded, plain sockets + poll(). Every network-fed buffer has a
 * cap; the run fails (exit 1) after --timeout-ms without any I/O progress.
 * Output: one line on stdout, "label=... events=N p50_us=... p90_us=...".
 *
 *   sse_latency --port 0 --target self
 *   sse_latency --port 9101 --target 127.0.0.1:9100 --label gateway
 */
#include "buf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD      (64 * 1024)        /* request or response header section */
#define MAX_REQ_BODY  (1024 * 1024)      /* request body the fake upstream accepts */
#define MAX_SSE       (256 * 1024)       /* decoded, not yet parsed SSE bytes */
#define MAX_OUT       (1024 * 1024)      /* pending output per socket */
#define MAX_UP_CONNS  16
#define MAX_EVENTS    1000000L
#define MAX_NAME      128

/* ---------- options ---------- */

typedef struct opts {
    int   port;                 /* upstream listen port, 0 = any */
    int   target_self;          /* client connects to our own upstream */
    char  thost[256];
    char  tport[16];
    long  events;               /* measured events */
    long  warmup;               /* unmeasured events sent first */
    long  timeout_ms;           /* give up after this long without progress */
    char  model[MAX_NAME];
    char  path[512];
    char  label[MAX_NAME];
} opts;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: sse_latency [--port P] [--target self|HOST:PORT] [--events N]\n"
        "                   [--warmup N] [--timeout-ms MS] [--model NAME]\n"
        "                   [--path PATH] [--label NAME]\n"
        "  --port P        fake upstream listens on 127.0.0.1:P (0 = any, default)\n"
        "  --target T      where the client connects: 'self' (direct, default)\n"
        "                  or a proxy's HOST:PORT that routes --model to --port\n"
        "  --events N      measured events (default 2000)\n"
        "  --warmup N      events sent first and not measured (default 200)\n"
        "  --timeout-ms MS fail after MS without any I/O progress (default 10000)\n"
        "  --model NAME    model field of the request (default sse-model)\n"
        "  --path PATH     request path (default /v1/chat/completions)\n"
        "  --label NAME    label of the result line (default direct or proxied)\n");
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    if (!s || !*s)
        return -EINVAL;
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -EINVAL;
    *out = (long)v;
    return 0;
}

/* Names end up inside JSON and HTTP lines we write; keep them to a charset
 * that needs no escaping rather than escaping. */
static int copy_name(char *dst, size_t cap, const char *s, const char *extra)
{
    size_t n = strlen(s);
    if (n == 0 || n >= cap)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                 (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' ||
                 (extra && c && strchr(extra, c));
        if (!ok)
            return -EINVAL;
    }
    memcpy(dst, s, n + 1);
    return 0;
}

static int parse_target(opts *o, const char *s)
{
    if (strcmp(s, "self") == 0) {
        o->target_self = 1;
        return 0;
    }
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s)
        return -EINVAL;
    size_t hl = (size_t)(colon - s);
    long port;
    if (hl >= sizeof(o->thost) || parse_long(colon + 1, 1, 65535, &port))
        return -EINVAL;
    memcpy(o->thost, s, hl);
    o->thost[hl] = '\0';
    snprintf(o->tport, sizeof(o->tport), "%ld", port);
    o->target_self = 0;
    return 0;
}

static int parse_opts(opts *o, int argc, char **argv)
{
    memset(o, 0, sizeof(*o));
    o->target_self = 1;
    o->events = 2000;
    o->warmup = 200;
    o->timeout_ms = 10000;
    memcpy(o->model, "sse-model", sizeof("sse-model"));
    memcpy(o->path, "/v1/chat/completions", sizeof("/v1/chat/completions"));
    int have_label = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if (!v) {
            fprintf(stderr, "sse_latency: %s needs a value\n", a);
            return -EINVAL;
        }
        i++;
        if (strcmp(a, "--port") == 0) {
            if (parse_long(v, 0, 65535, &n))
                goto bad;
            o->port = (int)n;
        } else if (strcmp(a, "--target") == 0) {
            if (parse_target(o, v))
                goto bad;
        } else if (strcmp(a, "--events") == 0) {
            if (parse_long(v, 1, MAX_EVENTS, &o->events))
                goto bad;
        } else if (strcmp(a, "--warmup") == 0) {
            if (parse_long(v, 0, MAX_EVENTS, &o->warmup))
                goto bad;
        } else if (strcmp(a, "--timeout-ms") == 0) {
            if (parse_long(v, 1, 3600000, &o->timeout_ms))
                goto bad;
        } else if (strcmp(a, "--model") == 0) {
            if (copy_name(o->model, sizeof(o->model), v, ":/"))
                goto bad;
        } else if (strcmp(a, "--path") == 0) {
            if (v[0] != '/' || copy_name(o->path, sizeof(o->path), v, "/?&=%:"))
                goto bad;
        } else if (strcmp(a, "--label") == 0) {
            if (copy_name(o->label, sizeof(o->label), v, NULL))
                goto bad;
            have_label = 1;
        } else {
            fprintf(stderr, "sse_latency: unknown option %s\n", a);
            return -EINVAL;
        }
        continue;
bad:
        fprintf(stderr, "sse_latency: bad value for %s: '%s'\n", a, v);
        return -EINVAL;
    }
    if (!have_label)
        memcpy(o->label, o->target_self ? "direct" : "proxied",
               o->target_self ? sizeof("direct") : sizeof("proxied"));
    return 0;
}

/* ---------- small helpers ---------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int set_socket_opts(int fd)
{
    int one = 1;
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    /* Without NODELAY, Nagle holds event k+1 until event k is acked, and
     * the peer delays that ack: 40 ms samples that measure TCP, not us. */
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        return -errno;
    return 0;
}

static const char *memmem_str(const char *p, size_t n, const char *needle)
{
    return memmem(p, n, needle, strlen(needle));
}

/* Finds header `name` in a header section (lines after the first, CRLF
 * separated, ending at the blank line) and returns its trimmed value. */
static int header_value(const char *head, size_t hlen, const char *name,
                        const char **val, size_t *vlen)
{
    size_t nl = strlen(name);
    const char *p = memmem_str(head, hlen, "\r\n");
    const char *end = head + hlen;
    int found = 0;
    while (p && p + 2 < end) {
        const char *line = p + 2;
        const char *eol = memmem_str(line, (size_t)(end - line), "\r\n");
        if (!eol || eol == line)
            break;
        if ((size_t)(eol - line) > nl && line[nl] == ':' &&
            strncasecmp(line, name, nl) == 0) {
            const char *v = line + nl + 1;
            const char *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            /* A repeated framing header is ambiguous; refuse it. */
            if (found)
                return -EPROTO;
            *val = v;
            *vlen = (size_t)(ve - v);
            found = 1;
        }
        p = eol;
    }
    return found ? 0 : -ENOENT;
}

static int value_is(const char *v, size_t vl, const char *want)
{
    return vl == strlen(want) && strncasecmp(v, want, vl) == 0;
}

/* Content-Length: plain digits only, bounded. */
static int parse_content_length(const char *v, size_t vl, uint64_t max, uint64_t *out)
{
    if (vl == 0 || vl > 18)
        return -EPROTO;
    uint64_t n = 0;
    for (size_t i = 0; i < vl; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -EPROTO;
        n = n * 10 + (uint64_t)(v[i] - '0');
    }
    if (n > max)
        return -E2BIG;
    *out = n;
    return 0;
}

/* ---------- chunked transfer decoding (RFC 9112 section 7.1) ---------- */

enum { CD_SIZE, CD_DATA, CD_DATA_CRLF, CD_TRAILER, CD_DONE };

typedef struct chunk_dec {
    int      state;
    uint64_t remain;        /* bytes left in the current chunk */
    char     line[256];     /* size or trailer line being collected */
    size_t   linelen;
} chunk_dec;

/* Parses "HEX[;ext]" (the CRLF already stripped). */
static int chunk_size_line(const char *l, size_t n, uint64_t *size)
{
    uint64_t v = 0;
    size_t i = 0;
    for (; i < n; i++) {
        char c = l[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            break;
        if (i >= 15)        /* 15 hex digits: no overflow, far beyond any cap */
            return -EPROTO;
        v = v * 16 + (uint64_t)d;
    }
    if (i == 0)
        return -EPROTO;
    if (i < n && l[i] != ';')
        return -EPROTO;
    *size = v;
    return 0;
}

/* Collects one CRLF-terminated line into d->line. Returns 1 when complete
 * (CRLF stripped, length in d->linelen), 0 when more input is needed. */
static int chunk_line(chunk_dec *d, char c)
{
    if (c == '\n') {
        if (d->linelen == 0 || d->line[d->linelen - 1] != '\r')
            return -EPROTO;         /* bare LF */
        d->linelen--;
        return 1;
    }
    if (d->linelen >= sizeof(d->line) - 1)
        return -EPROTO;
    d->line[d->linelen++] = c;
    return 0;
}

/* Feeds n bytes; payload bytes are appended to `out` (NULL discards them).
 * Returns the bytes consumed (stops right after the last chunk's trailer
 * section) or a negative errno on bad framing or a full `out`. */
static long chunk_feed(chunk_dec *d, const char *p, size_t n, mm_buf *out)
{
    size_t i = 0;
    while (i < n && d->state != CD_DONE) {
        if (d->state == CD_DATA) {
            size_t take = n - i;
            if (take > d->remain)
                take = (size_t)d->remain;
            if (out && mm_buf_append(out, p + i, take))
                return -E2BIG;
            i += take;
            d->remain -= take;
            if (d->remain == 0) {
                d->state = CD_DATA_CRLF;
                d->linelen = 0;
            }
            continue;
        }
        int rc = chunk_line(d, p[i++]);
        if (rc < 0)
            return rc;
        if (rc == 0)
            continue;
        size_t ll = d->linelen;
        d->linelen = 0;
        if (d->state == CD_DATA_CRLF) {
            if (ll != 0)
                return -EPROTO;     /* chunk longer than its size */
            d->state = CD_SIZE;
        } else if (d->state == CD_SIZE) {
            if (chunk_size_line(d->line, ll, &d->remain))
                return -EPROTO;
            d->state = d->remain ? CD_DATA : CD_TRAILER;
        } else if (d->state == CD_TRAILER) {
            if (ll == 0)
                d->state = CD_DONE;
        }
    }
    return (long)i;
}

/* ---------- shared state ---------- */

enum { UP_READ_HEAD, UP_READ_BODY, UP_STREAM, UP_CLOSING };
enum { CL_CONNECTING, CL_HEAD, CL_BODY, CL_DONE };
enum { FR_CHUNKED, FR_LENGTH, FR_CLOSE };

typedef struct up_conn {
    int       fd;           /* -1 when the slot is free */
    int       state;
    mm_buf    in;
    mm_buf    out;
    size_t    head_len;     /* request header section incl. blank line */
    int       chunked_req;
    uint64_t  body_len;     /* Content-Length of the request */
    chunk_dec body_dec;
    size_t    body_seen;    /* body bytes already fed to body_dec */
    int       is_get;
} up_conn;

typedef struct bench {
    opts      o;
    int       lfd;
    up_conn   up[MAX_UP_CONNS];
    int       stream_up;    /* index in up[] of the streaming connection */
    long      total;        /* warmup + events */
    long      next_seq;     /* next event the upstream will send */
    uint64_t *sent_ns;
    uint64_t *lat_ns;       /* measured samples */
    long      nlat;
    int       done_sent;

    int       cfd;
    int       cstate;
    mm_buf    cout;
    mm_buf    cin;          /* raw response bytes not consumed yet */
    int       framing;
    uint64_t  cremain;      /* FR_LENGTH: body bytes left */
    chunk_dec cdec;
    mm_buf    sse;          /* decoded body not yet split into events */
    long      expect_seq;
    int       got_done;

    uint64_t  last_progress;
    const char *stage;
} bench;

static void up_close(up_conn *u)
{
    if (u->fd >= 0)
        close(u->fd);
    u->fd = -1;
    mm_buf_free(&u->in);
    mm_buf_free(&u->out);
}

/* Writes as much pending output as the socket takes. */
static int flush_out(int fd, mm_buf *out, bench *b)
{
    while (out->len) {
        ssize_t w = send(fd, out->data, out->len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        mm_buf_consume(out, (size_t)w);
        b->last_progress = now_ns();
    }
    return 0;
}

/* ---------- fake upstream ---------- */

static int up_send_event(bench *b, long seq, char *err, size_t errlen)
{
    up_conn *u = &b->up[b->stream_up];
    char ev[512];
    int n;
    if (seq < b->total)
        n = snprintf(ev, sizeof(ev),
                     "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\","
                     "\"created\":0,\"model\":\"%s\",\"choices\":[{\"index\":0,"
                     "\"delta\":{\"content\":\"tok\"},\"finish_reason\":null}],"
                     "\"seq\":%ld}\n\n", b->o.model, seq);
    else
        n = snprintf(ev, sizeof(ev), "data: [DONE]\n\n");
    if (n < 0 || (size_t)n >= sizeof(ev)) {
        snprintf(err, errlen, "event does not fit");
        return -EOVERFLOW;
    }
    int rc = mm_buf_printf(&u->out, "%x\r\n%s\r\n", (unsigned)n, ev);
    if (rc == 0 && seq >= b->total) {
        rc = mm_buf_append_str(&u->out, "0\r\n\r\n");
        b->done_sent = 1;
    }
    if (rc) {
        snprintf(err, errlen, "upstream output buffer full");
        return rc;
    }
    if (seq < b->total)
        b->sent_ns[seq] = now_ns();
    rc = flush_out(u->fd, &u->out, b);
    if (rc) {
        snprintf(err, errlen, "upstream send: %s", strerror(-rc));
        return rc;
    }
    return 0;
}

/* A complete request arrived on u: a POST starts the (only) stream, a GET
 * gets a tiny health answer so a checking proxy stays happy. */
static int up_request_done(bench *b, int idx, char *err, size_t errlen)
{
    up_conn *u = &b->up[idx];
    int rc;
    if (u->is_get || b->stream_up >= 0) {
        const char *r = u->is_get
            ? "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              "Content-Length: 15\r\nConnection: close\r\n\r\n{\"status\":\"ok\"}"
            : "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              "Content-Length: 2\r\nConnection: close\r\n\r\n{}";
        if (!u->is_get)
            fprintf(stderr, "sse_latency: upstream: a second stream request, refused\n");
        u->state = UP_CLOSING;
        if ((rc = mm_buf_append_str(&u->out, r)) == 0)
            rc = flush_out(u->fd, &u->out, b);
        if (rc || u->out.len == 0)
            up_close(u);
        return 0;
    }
    const char *body = u->in.data + u->head_len;
    size_t blen = u->in.len - u->head_len;
    if (!u->chunked_req && !memmem_str(body, blen, "\"stream\"")) {
        snprintf(err, errlen, "upstream: request body has no \"stream\" field");
        return -EPROTO;
    }
    b->stream_up = idx;
    u->state = UP_STREAM;
    rc = mm_buf_append_str(&u->out,
                           "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n");
    if (rc) {
        snprintf(err, errlen, "upstream output buffer full");
        return rc;
    }
    b->stage = "waiting for the first event";
    return up_send_event(b, b->next_seq++, err, errlen);
}

static int up_parse(bench *b, int idx, char *err, size_t errlen)
{
    up_conn *u = &b->up[idx];
    if (u->state == UP_READ_HEAD) {
        const char *e = memmem_str(u->in.data, u->in.len, "\r\n\r\n");
        if (!e) {
            if (u->in.len >= MAX_HEAD) {
                snprintf(err, errlen, "upstream: request header section too large");
                return -E2BIG;
            }
            return 0;
        }
        u->head_len = (size_t)(e - u->in.data) + 4;
        const char *h = u->in.data;
        size_t hl = u->head_len - 2;
        const char *v;
        size_t vl;
        u->is_get = strncmp(h, "GET ", 4) == 0;
        int rc_te = header_value(h, hl, "Transfer-Encoding", &v, &vl);
        if (rc_te == 0) {
            if (!value_is(v, vl, "chunked")) {
                snprintf(err, errlen, "upstream: unsupported Transfer-Encoding");
                return -EPROTO;
            }
            u->chunked_req = 1;
        }
        int rc_cl = header_value(h, hl, "Content-Length", &v, &vl);
        if (rc_cl == 0) {
            if (u->chunked_req ||
                parse_content_length(v, vl, MAX_REQ_BODY, &u->body_len)) {
                snprintf(err, errlen, "upstream: bad request framing");
                return -EPROTO;
            }
        } else if (rc_cl != -ENOENT || (rc_te != 0 && rc_te != -ENOENT)) {
            snprintf(err, errlen, "upstream: repeated framing header");
            return -EPROTO;
        }
        /* libcurl waits a while for this before sending a large body. */
        if (header_value(h, hl, "Expect", &v, &vl) == 0 && value_is(v, vl, "100-continue")) {
            int rc = mm_buf_append_str(&u->out, "HTTP/1.1 100 Continue\r\n\r\n");
            if (rc == 0)
                rc = flush_out(u->fd, &u->out, b);
            if (rc) {
                snprintf(err, errlen, "upstream: cannot send 100 Continue");
                return rc;
            }
        }
        u->state = UP_READ_BODY;
        u->body_seen = 0;
        memset(&u->body_dec, 0, sizeof(u->body_dec));
    }
    if (u->state == UP_READ_BODY) {
        size_t have = u->in.len - u->head_len;
        if (u->chunked_req) {
            long c = chunk_feed(&u->body_dec, u->in.data + u->head_len + u->body_seen,
                                have - u->body_seen, NULL);
            if (c < 0) {
                snprintf(err, errlen, "upstream: bad chunked request body");
                return (int)c;
            }
            u->body_seen += (size_t)c;
            if (u->body_dec.state != CD_DONE)
                return 0;
        } else if (have < u->body_len) {
            return 0;
        }
        return up_request_done(b, idx, err, errlen);
    }
    return 0;
}

static int up_accept(bench *b)
{
    for (;;) {
        int fd = accept(b->lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        int slot = -1;
        for (int i = 0; i < MAX_UP_CONNS; i++)
            if (b->up[i].fd < 0) {
                slot = i;
                break;
            }
        if (slot < 0 || set_socket_opts(fd)) {
            close(fd);
            continue;
        }
        up_conn *u = &b->up[slot];
        memset(u, 0, sizeof(*u));
        u->fd = fd;
        u->state = UP_READ_HEAD;
        mm_buf_init(&u->in, MAX_HEAD + MAX_REQ_BODY);
        mm_buf_init(&u->out, MAX_OUT);
        b->last_progress = now_ns();
    }
}

static int up_readable(bench *b, int idx, char *err, size_t errlen)
{
    up_conn *u = &b->up[idx];
    char tmp[16384];
    for (;;) {
        ssize_t r = recv(u->fd, tmp, sizeof(tmp), 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            r = 0;      /* a reset counts as a close */
        }
        if (r == 0) {
            if (idx == b->stream_up && !b->done_sent) {
                snprintf(err, errlen, "upstream: proxy closed the stream connection early");
                return -ECONNRESET;
            }
            up_close(u);
            return 0;
        }
        b->last_progress = now_ns();
        /* While streaming, a request pipelined behind ours is not expected. */
        if (u->state == UP_STREAM || u->state == UP_CLOSING)
            continue;
        if (mm_buf_append(&u->in, tmp, (size_t)r)) {
            snprintf(err, errlen, "upstream: request too large");
            return -E2BIG;
        }
        int rc = up_parse(b, idx, err, errlen);
        if (rc)
            return rc;
        if (u->fd < 0)
            return 0;
    }
}

/* ---------- client ---------- */

static int cl_event(bench *b, const char *ev, size_t n, uint64_t t, char *err, size_t errlen)
{
    if (memmem_str(ev, n, "data: [DONE]")) {
        if (b->expect_seq != b->total) {
            snprintf(err, errlen, "client: [DONE] after %ld of %ld events", b->expect_seq, b->total);
            return -EPROTO;
        }
        b->got_done = 1;
        return 0;
    }
    const char *s = memmem_str(ev, n, "\"seq\":");
    if (!s) {
        snprintf(err, errlen, "client: event without seq: %.*s", (int)(n > 200 ? 200 : n), ev);
        return -EPROTO;
    }
    s += 6;
    long seq = 0;
    size_t digits = 0;
    while (s + digits < ev + n && s[digits] >= '0' && s[digits] <= '9' && digits < 9) {
        seq = seq * 10 + (s[digits] - '0');
        digits++;
    }
    if (digits == 0 || seq != b->expect_seq || seq >= b->total) {
        snprintf(err, errlen, "client: got event seq %ld, expected %ld", seq, b->expect_seq);
        return -EPROTO;
    }
    if (seq >= b->o.warmup)
        b->lat_ns[b->nlat++] = t - b->sent_ns[seq];
    b->expect_seq++;
    b->stage = "relaying events";
    /* The ping-pong step: only now may the next event leave the upstream. */
    return up_send_event(b, b->next_seq++, err, errlen);
}

/* Splits the decoded body into SSE events (blank-line terminated). */
static int cl_sse(bench *b, uint64_t t, char *err, size_t errlen)
{
    for (;;) {
        const char *e = memmem_str(b->sse.data ? b->sse.data : "", b->sse.len, "\n\n");
        if (!e)
            return 0;
        size_t n = (size_t)(e - b->sse.data);
        int rc = cl_event(b, b->sse.data, n, t, err, errlen);
        if (rc)
            return rc;
        mm_buf_consume(&b->sse, n + 2);
    }
}

static int cl_parse_head(bench *b, char *err, size_t errlen)
{
    for (;;) {
        const char *e = memmem_str(b->cin.data, b->cin.len, "\r\n\r\n");
        if (!e) {
            if (b->cin.len >= MAX_HEAD) {
                snprintf(err, errlen, "client: response header section too large");
                return -E2BIG;
            }
            return 0;
        }
        size_t hlen = (size_t)(e - b->cin.data) + 4;
        const char *h = b->cin.data;
        long status;
        char code[4];
        if (hlen < 12 || strncmp(h, "HTTP/1.", 7) != 0 || h[8] != ' ') {
            snprintf(err, errlen, "client: bad status line");
            return -EPROTO;
        }
        memcpy(code, h + 9, 3);
        code[3] = '\0';
        if (parse_long(code, 100, 599, &status)) {
            snprintf(err, errlen, "client: bad status code");
            return -EPROTO;
        }
        if (status >= 100 && status < 200) {    /* interim: skip it */
            mm_buf_consume(&b->cin, hlen);
            continue;
        }
        if (status != 200) {
            size_t show = b->cin.len > 600 ? 600 : b->cin.len;
            snprintf(err, errlen, "client: status %ld: %.*s", status, (int)show, h);
            return -EPROTO;
        }
        const char *v;
        size_t vl;
        int rc_te = header_value(h, hlen - 2, "Transfer-Encoding", &v, &vl);
        int rc_cl;
        if (rc_te == 0) {
            if (!value_is(v, vl, "chunked")) {
                snprintf(err, errlen, "client: unsupported Transfer-Encoding");
                return -EPROTO;
            }
            b->framing = FR_CHUNKED;
        } else if ((rc_cl = header_value(h, hlen - 2, "Content-Length", &v, &vl)) == 0) {
            if (parse_content_length(v, vl, UINT64_MAX / 2, &b->cremain)) {
                snprintf(err, errlen, "client: bad Content-Length");
                return -EPROTO;
            }
            b->framing = FR_LENGTH;
        } else if (rc_te == -ENOENT && rc_cl == -ENOENT) {
            b->framing = FR_CLOSE;
        } else {
            snprintf(err, errlen, "client: ambiguous response framing");
            return -EPROTO;
        }
        if (header_value(h, hlen - 2, "Content-Type", &v, &vl) != 0 ||
            vl < 17 || strncasecmp(v, "text/event-stream", 17) != 0) {
            snprintf(err, errlen, "client: response is not text/event-stream");
            return -EPROTO;
        }
        mm_buf_consume(&b->cin, hlen);
        b->cstate = CL_BODY;
        return 0;
    }
}

static int cl_body(bench *b, uint64_t t, char *err, size_t errlen)
{
    size_t n = b->cin.len;
    if (n == 0)
        return 0;
    if (b->framing == FR_CHUNKED) {
        long c = chunk_feed(&b->cdec, b->cin.data, n, &b->sse);
        if (c < 0) {
            snprintf(err, errlen, "client: bad chunked framing in the response");
            return (int)c;
        }
        n = (size_t)c;
    } else {
        if (b->framing == FR_LENGTH && n > b->cremain)
            n = (size_t)b->cremain;
        if (mm_buf_append(&b->sse, b->cin.data, n)) {
            snprintf(err, errlen, "client: event larger than %d bytes", MAX_SSE);
            return -E2BIG;
        }
        if (b->framing == FR_LENGTH)
            b->cremain -= n;
    }
    mm_buf_consume(&b->cin, n);
    int rc = cl_sse(b, t, err, errlen);
    if (rc)
        return rc;
    int body_over = (b->framing == FR_CHUNKED && b->cdec.state == CD_DONE) ||
                    (b->framing == FR_LENGTH && b->cremain == 0);
    if (b->got_done && (b->framing == FR_CLOSE || body_over))
        b->cstate = CL_DONE;
    else if (body_over) {
        snprintf(err, errlen, "client: body ended before [DONE]");
        return -EPROTO;
    }
    return 0;
}

static int cl_readable(bench *b, char *err, size_t errlen)
{
    char tmp[16384];
    for (;;) {
        ssize_t r = recv(b->cfd, tmp, sizeof(tmp), 0);
        /* Taken before any parsing so it is the arrival time of these bytes. */
        uint64_t t = now_ns();
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            snprintf(err, errlen, "client: recv: %s", strerror(errno));
            return -errno;
        }
        if (r == 0) {
            if (b->cstate == CL_BODY && b->framing == FR_CLOSE && b->got_done) {
                b->cstate = CL_DONE;
                return 0;
            }
            snprintf(err, errlen, "client: connection closed while %s", b->stage);
            return -ECONNRESET;
        }
        b->last_progress = t;
        if (mm_buf_append(&b->cin, tmp, (size_t)r)) {
            snprintf(err, errlen, "client: receive buffer full");
            return -E2BIG;
        }
        int rc = 0;
        if (b->cstate == CL_HEAD)
            rc = cl_parse_head(b, err, errlen);
        if (rc == 0 && b->cstate == CL_BODY)
            rc = cl_body(b, t, err, errlen);
        if (rc)
            return rc;
        if (b->cstate == CL_DONE)
            return 0;
    }
}

static int cl_start(bench *b, char *err, size_t errlen)
{
    char host[256], port[16];
    if (b->o.target_self) {
        snprintf(host, sizeof(host), "127.0.0.1");
        snprintf(port, sizeof(port), "%d", b->o.port);
    } else {
        snprintf(host, sizeof(host), "%s", b->o.thost);
        snprintf(port, sizeof(port), "%s", b->o.tport);
    }
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        snprintf(err, errlen, "client: resolve %s: %s", host, gai_strerror(g));
        return -EINVAL;
    }
    int rc = 0;
    b->cfd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (b->cfd < 0 || set_socket_opts(b->cfd)) {
        rc = -errno;
        snprintf(err, errlen, "client: socket: %s", strerror(errno));
        goto out;
    }
    if (connect(b->cfd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
        rc = -errno;
        snprintf(err, errlen, "client: connect %s:%s: %s", host, port, strerror(errno));
        goto out;
    }
    char body[512];
    int bl = snprintf(body, sizeof(body),
                      "{\"model\":\"%s\",\"stream\":true,"
                      "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", b->o.model);
    if (bl < 0 || (size_t)bl >= sizeof(body)) {
        rc = -EOVERFLOW;
        snprintf(err, errlen, "client: request body does not fit");
        goto out;
    }
    rc = mm_buf_printf(&b->cout,
                       "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                       "Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s",
                       b->o.path, host, port, bl, body);
    if (rc) {
        snprintf(err, errlen, "client: request does not fit");
        goto out;
    }
    b->cstate = CL_CONNECTING;
    b->stage = "connecting";
out:
    freeaddrinfo(ai);
    return rc;
}

/* ---------- main loop ---------- */

static int listen_upstream(bench *b, char *err, size_t errlen)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int one = 1;
    b->lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (b->lfd < 0)
        goto fail;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)b->o.port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (setsockopt(b->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(b->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        listen(b->lfd, 64) < 0 ||
        fcntl(b->lfd, F_SETFL, O_NONBLOCK) < 0 ||
        getsockname(b->lfd, (struct sockaddr *)&sa, &sl) < 0)
        goto fail;
    b->o.port = ntohs(sa.sin_port);
    fprintf(stderr, "sse_latency: upstream listening on 127.0.0.1:%d\n", b->o.port);
    return 0;
fail:
    snprintf(err, errlen, "upstream: listen on 127.0.0.1:%d: %s", b->o.port, strerror(errno));
    return -errno;
}

static int run(bench *b, char *err, size_t errlen)
{
    struct pollfd pf[2 + MAX_UP_CONNS];
    int map[2 + MAX_UP_CONNS];
    int rc;
    b->last_progress = now_ns();
    while (b->cstate != CL_DONE) {
        int n = 0;
        pf[n] = (struct pollfd){ .fd = b->lfd, .events = POLLIN };
        map[n++] = -1;
        short cev = b->cstate == CL_CONNECTING ? POLLOUT : POLLIN;
        if (b->cout.len)
            cev |= POLLOUT;
        pf[n] = (struct pollfd){ .fd = b->cfd, .events = cev };
        map[n++] = -2;
        for (int i = 0; i < MAX_UP_CONNS; i++) {
            if (b->up[i].fd < 0)
                continue;
            pf[n] = (struct pollfd){ .fd = b->up[i].fd,
                                     .events = POLLIN | (b->up[i].out.len ? POLLOUT : 0) };
            map[n++] = i;
        }
        uint64_t idle_ms = (now_ns() - b->last_progress) / 1000000u;
        if (idle_ms >= (uint64_t)b->o.timeout_ms) {
            snprintf(err, errlen, "no progress for %ld ms while %s (%ld of %ld events received)",
                     b->o.timeout_ms, b->stage, b->expect_seq, b->total);
            return -ETIMEDOUT;
        }
        int pr = poll(pf, (nfds_t)n, (int)((uint64_t)b->o.timeout_ms - idle_ms));
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            snprintf(err, errlen, "poll: %s", strerror(errno));
            return -errno;
        }
        for (int k = 0; k < n && b->cstate != CL_DONE; k++) {
            short re = pf[k].revents;
            if (!re)
                continue;
            if (map[k] == -1) {
                if ((rc = up_accept(b)) != 0) {
                    snprintf(err, errlen, "upstream: accept: %s", strerror(-rc));
                    return rc;
                }
            } else if (map[k] == -2) {
                if (b->cstate == CL_CONNECTING) {
                    int soerr = 0;
                    socklen_t sl = sizeof(soerr);
                    if (getsockopt(b->cfd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
                        soerr = errno;
                    if (soerr) {
                        snprintf(err, errlen, "client: connect: %s", strerror(soerr));
                        return -soerr;
                    }
                    b->cstate = CL_HEAD;
                    b->stage = "waiting for the response head";
                }
                if ((rc = flush_out(b->cfd, &b->cout, b)) != 0) {
                    snprintf(err, errlen, "client: send: %s", strerror(-rc));
                    return rc;
                }
                if (re & (POLLIN | POLLHUP | POLLERR))
                    if ((rc = cl_readable(b, err, errlen)) != 0)
                        return rc;
            } else {
                up_conn *u = &b->up[map[k]];
                if (u->fd < 0 || u->fd != pf[k].fd)
                    continue;
                if ((re & POLLOUT) && (rc = flush_out(u->fd, &u->out, b)) != 0) {
                    if (map[k] == b->stream_up) {
                        snprintf(err, errlen, "upstream: send: %s", strerror(-rc));
                        return rc;
                    }
                    up_close(u);
                    continue;
                }
                if (u->state == UP_CLOSING && u->out.len == 0) {
                    up_close(u);
                    continue;
                }
                if (re & (POLLIN | POLLHUP | POLLERR))
                    if ((rc = up_readable(b, map[k], err, errlen)) != 0)
                        return rc;
            }
        }
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted samples, in microseconds. */
static double pct_us(const uint64_t *v, long n, double p)
{
    long rank = (long)((p / 100.0) * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)v[rank - 1] / 1000.0;
}

int main(int argc, char **argv)
{
    bench *b = calloc(1, sizeof(*b));
    char err[1024] = "";
    int rc = 2;
    if (!b) {
        fprintf(stderr, "sse_latency: out of memory\n");
        return 1;
    }
    b->lfd = -1;
    b->cfd = -1;
    b->stream_up = -1;
    for (int i = 0; i < MAX_UP_CONNS; i++)
        b->up[i].fd = -1;
    mm_buf_init(&b->cout, MAX_OUT);
    mm_buf_init(&b->cin, MAX_HEAD + MAX_SSE);
    mm_buf_init(&b->sse, MAX_SSE);
    if (parse_opts(&b->o, argc, argv)) {
        usage(stderr);
        goto out;
    }
    rc = 1;
    signal(SIGPIPE, SIG_IGN);
    b->total = b->o.warmup + b->o.events;
    b->sent_ns = calloc((size_t)b->total, sizeof(uint64_t));
    b->lat_ns = calloc((size_t)b->o.events, sizeof(uint64_t));
    if (!b->sent_ns || !b->lat_ns) {
        snprintf(err, sizeof(err), "out of memory");
        goto out;
    }
    if (listen_upstream(b, err, sizeof(err)) || cl_start(b, err, sizeof(err)) ||
        run(b, err, sizeof(err)))
        goto out;
    if (b->nlat != b->o.events) {
        snprintf(err, sizeof(err), "%ld samples, expected %ld", b->nlat, b->o.events);
        goto out;
    }
    double sum = 0;
    for (long i = 0; i < b->nlat; i++)
        sum += (double)b->lat_ns[i];
    qsort(b->lat_ns, (size_t)b->nlat, sizeof(uint64_t), cmp_u64);
    printf("label=%s events=%ld p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f mean_us=%.1f\n",
           b->o.label, b->nlat, pct_us(b->lat_ns, b->nlat, 50), pct_us(b->lat_ns, b->nlat, 90),
           pct_us(b->lat_ns, b->nlat, 99), (double)b->lat_ns[b->nlat - 1] / 1000.0,
           sum / (double)b->nlat / 1000.0);
    rc = 0;
out:
    if (rc == 1)
        fprintf(stderr, "sse_latency: %s\n", err);
    for (int i = 0; i < MAX_UP_CONNS; i++)
        up_close(&b->up[i]);
    if (b->cfd >= 0)
        close(b->cfd);
    if (b->lfd >= 0)
        close(b->lfd);
    mm_buf_free(&b->cout);
    mm_buf_free(&b->cin);
    mm_buf_free(&b->sse);
    free(b->sent_ns);
    free(b->lat_ns);
    free(b);
    return rc;
}
