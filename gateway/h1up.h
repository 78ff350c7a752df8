/* h1up.h: proxied requests to plain http:// backends over our own HTTP/1.1
 * client, without libcurl's per-transfer work.
 *
 * libcurl stays in charge of making connections (DNS, connect timeout,
 * its error messages: a CONNECT_ONLY transfer on the thread's multi
 * handle, see mm_upstream_connect); once a socket is connected this module
 * owns it: it writes the request, parses the answer with a strict parser
 * (status line, headers, Content-Length / chunked / close-delimited, a cap
 * on every buffer) and keeps the connection in a per-thread keep-alive
 * pool. Why: on a small proxied request libcurl's per-transfer work (URL
 * parsing, request building, header matching, two poll() liveness checks
 * per reused connection) cost more than the whole rest of the gateway
 * (docs/ARCHITECTURE.md, docs/BENCHMARKS.md).
 *
 * The callbacks have curl's shape and conventions (header lines one at a
 * time with their CRLF, the final blank line included; body bytes;
 * CURL_WRITEFUNC_PAUSE; any other short return aborts with
 * CURLE_WRITE_ERROR), and completion goes to the mm_upstream's done
 * callback with a CURLcode, so the proxy handles both paths alike. */
#ifndef MM_H1UP_H
#define MM_H1UP_H
#include <stddef.h>

#include "buf.h"
#include "upstream.h"

struct event_base;
typedef struct mm_h1up mm_h1up;           /* one per event-loop thread */
typedef struct mm_h1up_xfer mm_h1up_xfer; /* one request and its answer */

typedef size_t (*mm_h1up_data_fn)(char *p, size_t size, size_t n, void *ud);

typedef struct mm_h1up_req {
    const char     *url;        /* backend base url, http://authority[/base] */
    const char     *body;       /* borrowed until done or cancel */
    size_t          body_len;
    int             head_only;  /* a HEAD request: the answer has no body */
    long            connect_ms; /* 0: none */
    long            timeout_ms; /* whole transfer; 0: none */
    mm_h1up_data_fn on_header;
    mm_h1up_data_fn on_data;
    void           *ud;
    char           *errbuf;     /* CURL_ERROR_SIZE bytes, message on failure */
} mm_h1up_req;

int  mm_h1up_new(struct event_base *base, mm_upstream *u, mm_upstream_done_fn done,
                 mm_h1up **out);
/* Closes every pooled connection; transfers must be finished or
 * cancelled by then. */
void mm_h1up_free(mm_h1up *h);
/* 1 if url can take this path (plain http://). */
int  mm_h1up_url_ok(const char *url);
/* The length of url's authority (host[:port]) and where it starts. */
const char *mm_h1up_authority(const char *url, size_t *len);

/* A transfer to fill and start: NULL when out of memory. */
mm_h1up_xfer *mm_h1up_xfer_get(mm_h1up *h);
/* The request head (request line, headers, blank line) the caller writes. */
mm_buf *mm_h1up_head(mm_h1up_xfer *x);
/* Send head and body to rq->url's backend. priv comes back in the done
 * callback, which is always called later from the event loop, never from
 * inside this call. 0, or -errno (nothing started). */
int  mm_h1up_start(mm_h1up_xfer *x, const mm_h1up_req *rq, void *priv);
/* Abort (no done callback); the connection is closed so the backend sees
 * the abort at once. x is gone afterwards. Safe from inside a callback. */
void mm_h1up_cancel(mm_h1up_xfer *x);
/* Give back a finished (or never started) transfer. */
void mm_h1up_release(mm_h1up_xfer *x);
/* Deliver again after the data callback returned CURL_WRITEFUNC_PAUSE. */
void mm_h1up_resume(mm_h1up_xfer *x);
#endif
