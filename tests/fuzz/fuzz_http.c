/* fuzz_http.c: libFuzzer target for the strict request parser (make fuzz).
 *
 * Beyond "no crash", it checks the properties the server relies on: results
 * point inside the input, framing is never both chunked and sized, a valid
 * head is only "need more" when cut short, the max_head cap behaves the same
 * for any window, and the chunked decoder gives the same answer however its
 * input is split. abort() on a broken property makes libFuzzer report it. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_parse.h"

enum { MAX_HEAD = 8192, SMALL_HEAD = 256, MAX_BODY = 1024 };

#define CHECK(c)                                                          \
    do {                                                                  \
        if (!(c)) {                                                       \
            fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__,     \
                    __LINE__, #c);                                        \
            abort();                                                      \
        }                                                                 \
    } while (0)

/* libFuzzer runs one input at a time: static keeps 4 KiB off the stack. */
static mm_http_request req, req2;

static int inside(const char *p, size_t n, const char *buf, size_t len)
{
    return p && p >= buf && n <= len && (size_t)(p - buf) <= len - n;
}

static int parse(const char *buf, size_t len, size_t max_head, mm_http_request *r)
{
    char err[256];
    err[0] = '\0';
    int rc = mm_http_parse_request_head(buf, len, max_head, r, err, sizeof err);
    CHECK(rc >= 0 || rc == -EINVAL || rc == -E2BIG || rc == -ENOTSUP);
    CHECK(rc >= 0 || err[0] != '\0'); /* every rejection carries a reason */
    CHECK(rc != 0 || len < max_head);
    return rc;
}

static void check_head(const char *buf, size_t len, int rc)
{
    CHECK((size_t)rc == req.head_len);
    CHECK(req.head_len <= len && req.head_len >= 4);
    CHECK(memcmp(buf + req.head_len - 4, "\r\n\r\n", 4) == 0);
    CHECK(inside(req.method, req.method_len, buf, req.head_len) && req.method_len > 0);
    CHECK(inside(req.target, req.target_len, buf, req.head_len) && req.target_len > 0);
    CHECK(req.version_minor == 0 || req.version_minor == 1);
    CHECK(req.nheaders <= MM_HTTP_MAX_HEADERS);
    for (size_t i = 0; i < req.nheaders; i++) {
        const mm_http_header *h = &req.headers[i];
        CHECK(inside(h->name, h->name_len, buf, req.head_len) && h->name_len > 0);
        CHECK(inside(h->value, h->value_len, buf, req.head_len));
        CHECK(memchr(h->value, '\r', h->value_len) == NULL);
        CHECK(memchr(h->value, '\n', h->value_len) == NULL);
        CHECK(memchr(h->value, '\0', h->value_len) == NULL);
        if (h->value_len) {
            CHECK(h->value[0] != ' ' && h->value[0] != '\t');
            CHECK(h->value[h->value_len - 1] != ' ' && h->value[h->value_len - 1] != '\t');
        }
    }
    CHECK(req.content_length >= -1);
    CHECK(!(req.chunked && req.content_length >= 0));
    CHECK(req.chunked == 0 || req.chunked == 1);
    CHECK(req.keep_alive == 0 || req.keep_alive == 1);
    CHECK(req.expect_continue == 0 || req.expect_continue == 1);
    CHECK(req.chunked == (mm_http_find_header(&req, "transfer-encoding") != NULL));
    CHECK((req.content_length >= 0) == (mm_http_find_header(&req, "content-length") != NULL));
    CHECK(req.version_minor == 0 || mm_http_find_header(&req, "host") != NULL);
}

/* A valid head has no invalid byte, so any shorter view of it needs more,
 * and a window too small for it is -E2BIG, never a different error. */
static void check_prefixes(const char *buf, size_t len, int rc)
{
    size_t hl = (size_t)rc;
    CHECK(parse(buf, hl - 1, MAX_HEAD, &req2) == 0);
    CHECK(parse(buf, hl / 2, MAX_HEAD, &req2) == 0);
    CHECK(parse(buf, hl, hl, &req2) == rc);
    CHECK(parse(buf, len, hl - 1, &req2) == -E2BIG);
}

static void check_small_window(const char *buf, size_t len, int rc_big)
{
    int rc = parse(buf, len, SMALL_HEAD, &req2);
    if (len < SMALL_HEAD)
        CHECK(rc == rc_big);
    else if (rc_big > 0 && rc_big <= SMALL_HEAD)
        CHECK(rc == rc_big);
    else if (rc_big >= 0)
        CHECK(rc == -E2BIG);
    else
        CHECK(rc == rc_big || rc == -E2BIG);
}

struct decoded {
    int    rc;
    size_t used;
    mm_buf out;
};

/* Feed `in` to a fresh decoder in pieces of `step` bytes (0: all at once). */
static void decode(const char *in, size_t len, size_t step, struct decoded *d)
{
    mm_chunked c;
    char err[256];
    mm_chunked_init(&c);
    mm_buf_init(&d->out, MAX_BODY);
    d->rc = 0;
    d->used = 0;
    size_t off = 0;
    do {
        size_t n = step && len - off > step ? step : len - off;
        size_t u = (size_t)-1;
        err[0] = '\0';
        d->rc = mm_chunked_feed(&c, in + off, n, &u, &d->out, err, sizeof err);
        CHECK(u <= n);
        CHECK(d->rc != 0 || u == n);
        CHECK(d->rc == 1 || d->rc == 0 || d->rc == -EINVAL || d->rc == -E2BIG);
        CHECK(d->rc >= 0 || err[0] != '\0');
        CHECK(d->out.len <= MAX_BODY);
        d->used += u;
        off += n;
    } while (d->rc == 0 && off < len);
    CHECK(d->used <= len);
    if (d->rc == 1) {
        /* the decoder never reads past the terminating CRLF */
        CHECK(d->used >= 5 && memcmp(in + d->used - 2, "\r\n", 2) == 0);
        size_t u = (size_t)-1;
        CHECK(mm_chunked_feed(&c, in, len, &u, &d->out, err, sizeof err) == 1 && u == 0);
    }
}

static void same(const struct decoded *a, const struct decoded *b)
{
    CHECK(a->rc == b->rc);
    CHECK(a->used == b->used);
    if (a->rc >= 0) {
        CHECK(a->out.len == b->out.len);
        CHECK(a->out.len == 0 || memcmp(a->out.data, b->out.data, a->out.len) == 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    int rc = parse(buf, size, MAX_HEAD, &req);
    check_small_window(buf, size, rc);
    if (rc <= 0)
        return 0;
    check_head(buf, size, rc);
    check_prefixes(buf, size, rc);
    /* check_prefixes reused only req2, so req is still this input's head */
    if (!req.chunked)
        return 0;

    const char *body = buf + req.head_len;
    size_t blen = size - req.head_len;
    struct decoded all, bytes, halves;
    decode(body, blen, 0, &all);
    decode(body, blen, 1, &bytes);
    decode(body, blen, blen / 2 + 1, &halves);
    same(&all, &bytes);
    same(&all, &halves);
    mm_buf_free(&all.out);
    mm_buf_free(&bytes.out);
    mm_buf_free(&halves.out);
    return 0;
}
