/* httpd.h: the HTTP/1.1 server side, on one libevent event_base.
 *
 * Owns listeners and client connections; parses requests with the strict
 * parser (http_parse.h); hands each complete request (head + whole body) to a
 * handler as an mm_http_exchange; writes the response the handler produces,
 * whole or streamed. One exchange at a time per connection: pipelined
 * requests wait in the input buffer and are answered in order.
 *
 * Used by the gateway (one mm_httpd per event-loop thread, SO_REUSEPORT) and
 * by the worker. Not thread-safe: everything runs on the base's thread. */
#ifndef MM_HTTPD_H
#define MM_HTTPD_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "http_parse.h"

struct event_base;
typedef struct mm_httpd mm_httpd;
typedef struct mm_http_conn mm_http_conn;
typedef struct mm_http_exchange mm_http_exchange;

typedef struct mm_httpd_limits {
    size_t max_header_bytes;   /* 431 past this */
    size_t max_body_bytes;     /* 413 past this */
    int    idle_timeout_ms;    /* keep-alive idle and slow-client write bound */
    size_t max_pipelined_bytes;/* input buffered while a response is running */
} mm_httpd_limits;

/* Called once per complete request. The handler answers through
 * mm_http_respond() or mm_http_begin()/write()/end(), now or later. */
typedef void (*mm_httpd_handler)(mm_http_exchange *ex, void *arg);

struct mm_http_exchange {
    mm_http_request req;       /* pointers into this exchange's own copy of the head */
    mm_buf          body;      /* decoded request body */
    char            peer[64];  /* client address, "ip:port" */
    uint64_t        start_ns;  /* monotonic time the head was complete */
    /* Set by the handler. on_abort is called if the client goes away (or the
     * server shuts down) before the response ends; the exchange is freed
     * right after it returns, so the handler must drop every reference to it.
     * on_drain is called when queued output fell below the low watermark
     * after mm_http_pending() was high (flow control of streamed bodies). */
    void           *udata;
    uint64_t       *bytes_sink;  /* if set, body bytes written are added here */
    void          (*on_abort)(mm_http_exchange *ex, void *udata);
    void          (*on_drain)(mm_http_exchange *ex, void *udata);
    /* private */
    mm_http_conn   *conn;
    mm_buf          head;
    int             began;       /* status line written */
    int             chunked_out; /* response uses chunked framing */
    int             no_body;     /* HEAD request or bodiless status */
    int             head_only_method;
};

int  mm_httpd_new(struct event_base *base, const mm_httpd_limits *lim,
                  mm_httpd_handler handler, void *arg, mm_httpd **out);
/* Bind and listen on host:port (IPv4/IPv6 literal or name). reuseport lets
 * several threads' listeners share the port. Returns 0 or -errno. */
int  mm_httpd_listen(mm_httpd *h, const char *host, int port, int reuseport,
                     char *err, size_t errlen);
/* The port actually bound by the first listener (useful with port 0). */
int  mm_httpd_port(const mm_httpd *h);
/* Stop accepting new connections (graceful shutdown). */
void mm_httpd_stop_accepting(mm_httpd *h);
/* Graceful shutdown: stop accepting, close idle keep-alive connections, and
 * end every running exchange's connection after its response
 * (Connection: close). */
void mm_httpd_drain(mm_httpd *h);
/* Number of exchanges in flight (safe to read from any thread). */
size_t mm_httpd_active(const mm_httpd *h);
/* Close every connection (aborting exchanges) and free. */
void mm_httpd_free(mm_httpd *h);

/* Answer in one go. `headers` holds extra "Name: value\r\n" lines or NULL.
 * Content-Length and Connection are added here. */
int  mm_http_respond(mm_http_exchange *ex, int status, const char *headers,
                     const void *body, size_t len);
/* Answer with an OpenAI-shaped error {"error":{message,type,param,code}}. */
int  mm_http_respond_error(mm_http_exchange *ex, int status, const char *param,
                           const char *extra_headers, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* Start a response: content_length >= 0 sends Content-Length, -1 streams with
 * chunked framing. */
int  mm_http_begin(mm_http_exchange *ex, int status, const char *headers,
                   int64_t content_length);
int  mm_http_write(mm_http_exchange *ex, const void *p, size_t n);
/* Bytes queued for the client and not yet written by the kernel. */
size_t mm_http_pending(const mm_http_exchange *ex);
/* Finish the response; the exchange is freed (keep-alive goes on). */
void mm_http_end(mm_http_exchange *ex);
/* Give up on a started response: close the connection without finishing the
 * framing, the only way HTTP/1.1 can tell the client the body is incomplete.
 * The exchange is freed. */
void mm_http_abort(mm_http_exchange *ex);
/* Force Connection: close on this response (e.g. during shutdown). */
void mm_http_set_close(mm_http_exchange *ex);

const char *mm_http_status_text(int status);
/* Monotonic clock in nanoseconds. */
uint64_t mm_now_ns(void);
#endif
