/* upstream.h: libcurl's multi-socket API driven by one libevent loop.
 *
 * One mm_upstream per event-loop thread. Its multi handle owns the
 * connection cache, so upstream keep-alive connections are reused across
 * requests of that thread. Easy handles are recycled from a free list because
 * curl_easy_init is costly relative to a small proxied request. It also makes
 * the connections of the direct HTTP/1.1 path (h1up.h, which it owns): a
 * connect-only transfer whose socket it hands over. */
#ifndef MM_UPSTREAM_H
#define MM_UPSTREAM_H
#include <curl/curl.h>

struct event_base;
typedef struct mm_upstream mm_upstream;
struct mm_h1up;

/* Called when a transfer added with mm_upstream_add finishes (success or
 * error), outside any curl callback: the callee may add new transfers. The
 * easy handle has already been removed from the multi handle. */
typedef void (*mm_upstream_done_fn)(CURL *easy, CURLcode rc, void *priv);

int   mm_upstream_new(struct event_base *base, mm_upstream_done_fn done, mm_upstream **out);
void  mm_upstream_free(mm_upstream *u);
/* An easy handle with default options (curl_easy_reset state). */
CURL *mm_upstream_easy(mm_upstream *u);
/* Start the transfer; priv comes back in the done callback. */
int   mm_upstream_add(mm_upstream *u, CURL *easy, void *priv);
/* Abort a running transfer (no done callback) and recycle its handle. The
 * connection is closed, so the upstream sees the abort at once. */
void  mm_upstream_cancel(mm_upstream *u, CURL *easy);
/* Give back a handle that finished (after the done callback). */
void  mm_upstream_recycle(mm_upstream *u, CURL *easy);

/* Connect only (CURLOPT_CONNECT_ONLY) with easy's options and hand the
 * socket over: fn gets its own descriptor of the connected socket (the
 * caller closes it) or -1 with the error, instead of the done callback.
 * The handle is recycled by then. mm_upstream_cancel stops it (no fn). */
typedef void (*mm_upstream_conn_fn)(void *arg, CURLcode rc, int fd);
int   mm_upstream_connect(mm_upstream *u, CURL *easy, mm_upstream_conn_fn fn, void *arg);
/* This thread's direct HTTP/1.1 path (h1up.h), made on first use; NULL when
 * out of memory. */
struct mm_h1up *mm_upstream_h1(mm_upstream *u);
#endif
