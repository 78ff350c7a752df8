/* test_http_parse.c: the strict request head parser and the chunked decoder. */
#include "http_parse.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"

enum { MAX_HEAD = 8192, MAX_BODY = 1 << 20 };

/* Big (128 headers): one static instance rather than one per stack frame. */
static mm_http_request req;
static char err[256];

static int parse_n(const char *s, size_t n, size_t max_head)
{
    err[0] = '\0';
    int rc = mm_http_parse_request_head(s, n, max_head, &req, err, sizeof err);
    /* Every rejection must say why: the server logs it. */
    if (rc < 0 && err[0] == '\0')
        return -9999;
    return rc;
}

/* sizeof, not strlen: literals with embedded NUL bytes keep them. */
#define PARSE(lit) parse_n((lit), sizeof(lit) - 1, MAX_HEAD)
#define LEN(lit) ((long long)sizeof(lit) - 1)

static int span_eq(const char *p, size_t n, const char *s)
{
    return p && strlen(s) == n && memcmp(p, s, n) == 0;
}

static const char *hval(const char *name)
{
    static char tmp[256];
    const mm_http_header *h = mm_http_find_header(&req, name);
    if (!h || h->value_len >= sizeof tmp)
        return NULL;
    memcpy(tmp, h->value, h->value_len);
    tmp[h->value_len] = '\0';
    return tmp;
}

/* ---- valid requests ---------------------------------------------------- */

TEST(get_simple)
{
    static const char r[] = "GET /v1/models?x=1 HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\r\n";
    ASSERT_EQ(PARSE(r), LEN(r));
    ASSERT_EQ(req.head_len, LEN(r));
    ASSERT_TRUE(span_eq(req.method, req.method_len, "GET"));
    ASSERT_TRUE(span_eq(req.target, req.target_len, "/v1/models?x=1"));
    ASSERT_EQ(req.version_minor, 1);
    ASSERT_EQ(req.nheaders, 2);
    ASSERT_TRUE(span_eq(req.headers[0].name, req.headers[0].name_len, "Host"));
    ASSERT_TRUE(span_eq(req.headers[1].value, req.headers[1].value_len, "*/*"));
    ASSERT_EQ(req.content_length, -1);
    ASSERT_EQ(req.chunked, 0);
    ASSERT_EQ(req.keep_alive, 1);
    ASSERT_EQ(req.expect_continue, 0);
    /* zero-copy: pointers into the caller's buffer */
    ASSERT_TRUE(req.method == r);
    ASSERT_TRUE(req.headers[0].name == r + 29);
}

TEST(post_content_length)
{
    static const char r[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                            "Content-Length: 13\r\n\r\n{\"model\":\"m\"}";
    int rc = PARSE(r);
    ASSERT_EQ(rc, LEN(r) - 13);
    ASSERT_EQ(req.content_length, 13);
    ASSERT_EQ(req.chunked, 0);
    ASSERT_TRUE(span_eq(req.method, req.method_len, "POST"));
    ASSERT_TRUE(memcmp(r + rc, "{\"model\"", 8) == 0);
}

TEST(content_length_limits)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"), 47);
    ASSERT_EQ(req.content_length, 0);
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n") > 0);
    ASSERT_TRUE(req.content_length == INT64_MAX);
    /* OWS around the value is not part of it */
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \t 7 \t\r\n\r\n") > 0);
    ASSERT_EQ(req.content_length, 7);
}

TEST(post_chunked)
{
    static const char r[] = "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "5\r\nhello\r\n0\r\n\r\n";
    int rc = PARSE(r);
    ASSERT_EQ(rc, LEN(r) - 15);
    ASSERT_EQ(req.chunked, 1);
    ASSERT_EQ(req.content_length, -1);

    mm_chunked c;
    mm_buf out;
    size_t used = 0;
    mm_chunked_init(&c);
    mm_buf_init(&out, MAX_BODY);
    int drc = mm_chunked_feed(&c, r + rc, (size_t)(LEN(r) - rc), &used, &out, err, sizeof err);
    ASSERT_EQ(drc, 1);
    ASSERT_EQ(used, 15);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "hello");
    mm_buf_free(&out);
}

TEST(pipelined)
{
    static const char r[] = "GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"
                            "POST /b HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi"
                            "GET /c HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    size_t off = 0, n = (size_t)LEN(r);
    int rc = parse_n(r + off, n - off, MAX_HEAD);
    ASSERT_EQ(rc, 29);
    ASSERT_TRUE(span_eq(req.target, req.target_len, "/a"));
    off += (size_t)rc;
    rc = parse_n(r + off, n - off, MAX_HEAD);
    ASSERT_TRUE(rc > 0);
    ASSERT_TRUE(span_eq(req.target, req.target_len, "/b"));
    ASSERT_EQ(req.content_length, 2);
    off += (size_t)rc + 2;
    rc = parse_n(r + off, n - off, MAX_HEAD);
    ASSERT_EQ(rc, n - off);
    ASSERT_TRUE(span_eq(req.target, req.target_len, "/c"));
    ASSERT_EQ(req.keep_alive, 0);
}

TEST(http10_and_misc_forms)
{
    ASSERT_EQ(PARSE("GET /old HTTP/1.0\r\n\r\n"), 21);
    ASSERT_EQ(req.version_minor, 0);
    ASSERT_EQ(req.nheaders, 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_TRUE(PARSE("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    ASSERT_TRUE(span_eq(req.target, req.target_len, "*"));
    /* a custom method is a token like any other */
    ASSERT_TRUE(PARSE("M-SEARCH /x HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    ASSERT_TRUE(span_eq(req.method, req.method_len, "M-SEARCH"));
}

TEST(value_ows_stripped)
{
    static const char r[] = "GET / HTTP/1.1\r\nHost:gw\r\nX-Pad: \t  a  b \t\r\n"
                            "X-None:\r\nX-Ws: \t \r\nX-Hi: caf\xc3\xa9\r\n\r\n";
    ASSERT_EQ(PARSE(r), LEN(r));
    ASSERT_STR_EQ(hval("host"), "gw");
    ASSERT_STR_EQ(hval("x-pad"), "a  b");
    ASSERT_STR_EQ(hval("x-none"), "");
    ASSERT_STR_EQ(hval("x-ws"), "");
    ASSERT_STR_EQ(hval("x-hi"), "caf\xc3\xa9"); /* obs-text is allowed */
}

TEST(header_names_case_insensitive)
{
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nhOsT: a\r\ncontent-LENGTH: 3\r\n\r\n") > 0);
    ASSERT_EQ(req.content_length, 3);
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHOST: a\r\nTRANSFER-encoding: ChUnKeD\r\n\r\n") > 0);
    ASSERT_EQ(req.chunked, 1);
    /* case-folding still finds the duplicate */
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n"),
              -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"), -EINVAL);
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-Thing: 1\r\nx-thing: 2\r\n\r\n") > 0);
    ASSERT_STR_EQ(hval("X-THING"), "1"); /* the first of several */
    ASSERT_TRUE(hval("X-Thin") == NULL);
    ASSERT_TRUE(hval("X-Things") == NULL);
    ASSERT_TRUE(mm_http_find_header(&req, "missing") == NULL);
}

TEST(keep_alive_logic)
{
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 1);
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: CLOSE\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n"
                      "Connection: close\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0); /* close wins */
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 1); /* a different token */
    ASSERT_TRUE(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 1);
    ASSERT_TRUE(PARSE("GET / HTTP/1.0\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_TRUE(PARSE("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 1);
    ASSERT_TRUE(PARSE("GET / HTTP/1.0\r\nConnection: ,x , keep-alive ,\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 1);
    ASSERT_TRUE(PARSE("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n") > 0);
    ASSERT_EQ(req.keep_alive, 0);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep alive\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nConnection: close;x\r\n\r\n"), -EINVAL);
}

TEST(expect_continue)
{
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                      "Content-Length: 1\r\n\r\n") > 0);
    ASSERT_EQ(req.expect_continue, 1);
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHost: a\r\nexpect: 100-Continue\r\n\r\n") > 0);
    ASSERT_EQ(req.expect_continue, 1);
    ASSERT_TRUE(PARSE("POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n") > 0);
    ASSERT_EQ(req.expect_continue, 0);
    ASSERT_TRUE(PARSE("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n") > 0);
    ASSERT_EQ(req.expect_continue, 0); /* ignored in HTTP/1.0 */
}

/* ---- need more / too big ------------------------------------------------ */

TEST(every_prefix_needs_more)
{
    static const char r[] = "POST /x HTTP/1.1\r\nHost: a\r\nX-A: \t b \r\nContent-Length: 3\r\n\r\n";
    for (size_t n = 0; n < (size_t)LEN(r); n++) {
        int rc = parse_n(r, n, MAX_HEAD);
        if (rc != 0) {
            TEST_FAIL_("prefix of %zu bytes gave %d (%s)", n, rc, err);
            return;
        }
    }
    ASSERT_EQ(parse_n(r, (size_t)LEN(r), MAX_HEAD), LEN(r));
}

TEST(head_too_big)
{
    static const char r[] = "GET / HTTP/1.1\r\nHost: a\r\nX-Long: aaaaaaaaaaaaaaaa\r\n\r\n";
    size_t n = (size_t)LEN(r);
    ASSERT_EQ(parse_n(r, n, n), (long long)n);          /* exactly fits */
    ASSERT_EQ(parse_n(r, n, n - 1), -E2BIG);            /* one byte over */
    ASSERT_EQ(parse_n(r, n - 1, n), 0);                 /* short, still may fit */
    ASSERT_EQ(parse_n(r, n - 1, n - 1), -E2BIG);        /* full window, no end */
    ASSERT_EQ(parse_n(r, 20, 10), -E2BIG);
    ASSERT_EQ(parse_n(r, 5, 10), 0);
    ASSERT_EQ(parse_n(r, n, 0), -E2BIG);
    /* the bytes after the window do not matter */
    ASSERT_EQ(parse_n("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27, 20), -E2BIG);
}

TEST(max_headers)
{
    static char r[8192];
    size_t n = 0;
    n += (size_t)snprintf(r + n, sizeof r - n, "GET / HTTP/1.1\r\nHost: a\r\n");
    for (int i = 1; i < MM_HTTP_MAX_HEADERS; i++)
        n += (size_t)snprintf(r + n, sizeof r - n, "X-%d: v\r\n", i);
    size_t body = n;
    n += (size_t)snprintf(r + n, sizeof r - n, "\r\n");
    ASSERT_EQ(parse_n(r, n, sizeof r), (long long)n);
    ASSERT_EQ(req.nheaders, MM_HTTP_MAX_HEADERS);
    n = body + (size_t)snprintf(r + body, sizeof r - body, "X-last: v\r\n\r\n");
    ASSERT_EQ(parse_n(r, n, sizeof r), -EINVAL);
}

/* ---- rejections --------------------------------------------------------- */

TEST(reject_cl_and_te)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"), -EINVAL);
}

TEST(reject_two_content_lengths)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX: y\r\nContent-Length: 0\r\n\r\n"), -EINVAL);
}

TEST(reject_bad_content_length_values)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  \r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551621\r\n\r\n"), -EINVAL);
}

TEST(reject_whitespace_before_colon)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length\t: 5\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), -EINVAL);
    ASSERT_CONTAINS(err, "colon");
}

TEST(reject_transfer_encodings)
{
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunkedx\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked x\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;q=1\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"), -EINVAL);
    /* RFC 9112 6.1: faulty framing in HTTP/1.0 */
    ASSERT_EQ(PARSE("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), -EINVAL);
}

TEST(reject_ctl_in_values)
{
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: \0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\nb\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7f\r\n\r\n"), -EINVAL);
    /* NUL/CR in a Content-Length value cannot sneak past either */
    ASSERT_EQ(PARSE("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\0\r\n\r\n"), -EINVAL);
}

TEST(reject_bare_line_ends)
{
    ASSERT_EQ(PARSE("GET / HTTP/1.1\nHost: a\n\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\n\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\rHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\n\rX"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost\n: a\r\n\r\n"), -EINVAL);
    /* a bare LF is rejected at once, not waited on until the cap */
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\n"), -EINVAL);
}

TEST(reject_obs_fold_and_leading_ws)
{
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\n Host: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
}

TEST(reject_field_names)
{
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX\"A: b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX/A: b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX\xc3\xa9: b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nX\0A: b\r\n\r\n"), -EINVAL);
}

TEST(reject_request_lines)
{
    ASSERT_EQ(PARSE("GET /\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE(" GET / HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET /  HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1 \r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / http/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.x\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/11\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.10\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("G@T / HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET /a\0 HTTP/1.1\r\nHost: a\r\n\r\n"), -EINVAL);
}

TEST(reject_versions)
{
    ASSERT_EQ(PARSE("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), -ENOTSUP);
    ASSERT_EQ(PARSE("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), -ENOTSUP);
    ASSERT_EQ(PARSE("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), -ENOTSUP);
    ASSERT_EQ(PARSE("GET / HTTP/0.9\r\n\r\n"), -ENOTSUP);
    ASSERT_EQ(PARSE("GET / HTTP/3.0\r\n\r\n"), -ENOTSUP);
}

TEST(reject_host_rules)
{
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nX-Host: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(PARSE("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"), -EINVAL);
}

/* ---- chunked decoder ---------------------------------------------------- */

static mm_buf cout;
static size_t cused;

/* Decode all at once into cout; returns the decoder's result. */
static int chunk_all(const char *s, size_t n, size_t max)
{
    mm_chunked c;
    mm_chunked_init(&c);
    mm_buf_free(&cout);
    mm_buf_init(&cout, max);
    cused = 0;
    err[0] = '\0';
    int rc = mm_chunked_feed(&c, s, n, &cused, &cout, err, sizeof err);
    if (rc < 0 && err[0] == '\0')
        return -9999;
    return rc;
}
#define CHUNK(lit) chunk_all((lit), sizeof(lit) - 1, MAX_BODY)

TEST(chunked_valid)
{
    ASSERT_EQ(CHUNK("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), 1);
    ASSERT_STR_EQ(mm_buf_cstr(&cout), "hello world");
    ASSERT_EQ(cused, 26);
    ASSERT_EQ(CHUNK("0\r\n\r\n"), 1);
    ASSERT_EQ(cout.len, 0);
    ASSERT_EQ(CHUNK("a\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\n\r\n"), 1);
    ASSERT_EQ(cout.len, 20);
    ASSERT_EQ(CHUNK("000000000000001\r\nx\r\n000000000000000\r\n\r\n"), 1); /* 15 digits */
    ASSERT_STR_EQ(mm_buf_cstr(&cout), "x");
    ASSERT_EQ(CHUNK("5\r\nhel"), 0);
    ASSERT_EQ(cused, 6);
    ASSERT_EQ(cout.len, 3);
}

TEST(chunked_pipelined_bytes_not_consumed)
{
    static const char r[] = "3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    ASSERT_EQ(CHUNK(r), 1);
    ASSERT_EQ(cused, 13);
    ASSERT_TRUE(memcmp(r + cused, "GET ", 4) == 0);
    ASSERT_EQ(CHUNK("0\r\nX-T: 1\r\n\r\n0\r\n\r\n"), 1);
    ASSERT_EQ(cused, 13);
    /* once complete the decoder consumes nothing more */
    mm_chunked c;
    size_t u = 99;
    mm_chunked_init(&c);
    ASSERT_EQ(mm_chunked_feed(&c, "0\r\n\r\n", 5, &u, &cout, err, sizeof err), 1);
    ASSERT_EQ(mm_chunked_feed(&c, "0\r\n\r\n", 5, &u, &cout, err, sizeof err), 1);
    ASSERT_EQ(u, 0);
}

TEST(chunked_extensions)
{
    ASSERT_EQ(CHUNK("3;a=b\r\nabc\r\n0\r\n\r\n"), 1);
    ASSERT_STR_EQ(mm_buf_cstr(&cout), "abc");
    ASSERT_EQ(CHUNK("3;a=\"quoted\"\r\nabc\r\n0\r\n\r\n"), 1);
    ASSERT_EQ(CHUNK("3;a=\"q \\\"x\\\\ ;=\"\r\nabc\r\n0\r\n\r\n"), 1);
    ASSERT_EQ(CHUNK("3;a\r\nabc\r\n0;b;c=d\r\n\r\n"), 1);
    ASSERT_EQ(CHUNK("3 ; a = b ;c\r\nabc\r\n0\r\n\r\n"), 1); /* BWS */
    ASSERT_EQ(CHUNK("3;a=\"\"\r\nabc\r\n0\r\n\r\n"), 1);
    ASSERT_STR_EQ(mm_buf_cstr(&cout), "abc");
}

TEST(chunked_reject_extensions)
{
    ASSERT_EQ(CHUNK("3;\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a@b\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=b c\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a b\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=\"x\rb\"\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=\"x\nb\"\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=\"unterminated\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=\"x\"y\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=b\rX\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=b\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=b\0\r\nabc\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("3;a=b \r\nabc\r\n0\r\n\r\n"), -EINVAL);
}

TEST(chunked_reject_sizes)
{
    ASSERT_EQ(CHUNK("0x5\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("+5\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("-5\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK(" 5\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK(";a=b\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5 \r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("g\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5g\r\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0000000000000005\r\nhello\r\n0\r\n\r\n"), -EINVAL); /* 16 digits */
    ASSERT_EQ(CHUNK("ffffffffffffffffff\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\nhello\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\rhello\r\n0\r\n\r\n"), -EINVAL);
}

TEST(chunked_reject_data_framing)
{
    ASSERT_EQ(CHUNK("5\r\nhelloX\r\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhelloX\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhello\n\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhello\n0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhello\r0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhello0\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("5\r\nhell\r\n0\r\n\r\n"), -EINVAL); /* too short: eats CRLF */
    ASSERT_EQ(CHUNK("0\r\n\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\n\rX"), -EINVAL);
    /* errors stick */
    mm_chunked c;
    size_t u;
    mm_chunked_init(&c);
    ASSERT_EQ(mm_chunked_feed(&c, "x", 1, &u, &cout, err, sizeof err), -EINVAL);
    ASSERT_EQ(mm_chunked_feed(&c, "0\r\n\r\n", 5, &u, &cout, err, sizeof err), -EINVAL);
}

TEST(chunked_trailers)
{
    ASSERT_EQ(CHUNK("0\r\nX-Sum: abc\r\nX-Empty:\r\nX-Ws: \t a b \r\n\r\n"), 1);
    ASSERT_EQ(cused, 41);
    ASSERT_EQ(CHUNK("0\r\nX-Sum : abc\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX-Sum\t: abc\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX-Sum: a\r\n b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\n X-Sum: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX(Sum): a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\n: a\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nNoColon\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX-Sum: a\0b\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX-Sum: a\rb\r\n\r\n"), -EINVAL);
    ASSERT_EQ(CHUNK("0\r\nX-Sum: a\n\r\n"), -EINVAL);
}

TEST(chunked_body_cap)
{
    ASSERT_EQ(chunk_all("5\r\nhello\r\n0\r\n\r\n", 15, 5), 1);
    ASSERT_EQ(chunk_all("5\r\nhello\r\n0\r\n\r\n", 15, 4), -E2BIG);
    ASSERT_EQ(cout.len, 0); /* refused at the size line, before the data */
    ASSERT_EQ(chunk_all("3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", 23, 5), -E2BIG);
    ASSERT_EQ(cout.len, 3);
    ASSERT_EQ(chunk_all("fffffffffffffff\r\n", 17, MAX_BODY), -E2BIG);
}

TEST(chunked_line_caps)
{
    static char r[20000];
    size_t n = 0;
    r[n++] = '1';
    r[n++] = ';';
    memset(r + n, 'a', 4100);
    n += 4100;
    memcpy(r + n, "\r\nx\r\n0\r\n\r\n", 10);
    n += 10;
    ASSERT_EQ(chunk_all(r, n, MAX_BODY), -EINVAL);
    /* just under the cap is fine: "1;" + 4090 + CRLF = 4094 */
    n = 2 + 4090;
    memcpy(r + n, "\r\nx\r\n0\r\n\r\n", 10);
    ASSERT_EQ(chunk_all(r, n + 10, MAX_BODY), 1);
    /* a trailer section of many short lines is capped as a whole */
    n = 0;
    memcpy(r, "0\r\n", 3);
    n = 3;
    while (n + 10 < sizeof r - 2) {
        memcpy(r + n, "X-Ab: 12\r\n", 10);
        n += 10;
    }
    memcpy(r + n, "\r\n", 2);
    n += 2;
    ASSERT_EQ(chunk_all(r, n, MAX_BODY), -EINVAL);
    ASSERT_CONTAINS(err, "trailer section");
}

/* Feed `s` in three pieces split at i <= j (every pair), and byte by byte;
 * each must match the all-at-once result: return code, bytes used, output. */
static int split_equivalent(const char *s, size_t n, size_t max)
{
    int want = chunk_all(s, n, max);
    size_t want_used = cused;
    mm_buf ref;
    mm_buf_init(&ref, max);
    if (mm_buf_append(&ref, cout.data ? cout.data : "", cout.len) != 0)
        return 0;
    int ok = 1;
    for (size_t i = 0; i <= n && ok; i++) {
        for (size_t j = i; j <= n && ok; j++) {
            size_t cuts[4] = { 0, i, j, n };
            mm_chunked c;
            mm_buf o;
            mm_chunked_init(&c);
            mm_buf_init(&o, max);
            int rc = 0;
            size_t total = 0;
            for (int k = 0; k < 3 && rc == 0; k++) {
                size_t u = (size_t)-1, len = cuts[k + 1] - cuts[k];
                rc = mm_chunked_feed(&c, s + cuts[k], len, &u, &o, err, sizeof err);
                if (u > len || (rc == 0 && u != len))
                    ok = 0;
                total += u;
            }
            if (rc != want || total != want_used ||
                (rc >= 0 && (o.len != ref.len || (o.len && memcmp(o.data, ref.data, o.len))))) {
                printf("  split %zu/%zu of \"%.*s\": rc %d vs %d, used %zu vs %zu\n",
                       i, j, (int)n, s, rc, want, total, want_used);
                ok = 0;
            }
            mm_buf_free(&o);
        }
    }
    /* byte by byte */
    mm_chunked c;
    mm_buf o;
    mm_chunked_init(&c);
    mm_buf_init(&o, max);
    int rc = 0;
    size_t total = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        size_t u = (size_t)-1;
        rc = mm_chunked_feed(&c, s + i, 1, &u, &o, err, sizeof err);
        if (u > 1)
            ok = 0;
        total += u;
    }
    if (rc != want || total != want_used ||
        (rc >= 0 && (o.len != ref.len || (o.len && memcmp(o.data, ref.data, o.len)))))
        ok = 0;
    mm_buf_free(&o);
    mm_buf_free(&ref);
    return ok;
}

TEST(chunked_split_everywhere)
{
    static const char *const in[] = {
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "3;a=b\r\nabc\r\n2 ; q=\"x\\\"y\" ;z\r\nde\r\n0;last\r\nX-T: v\r\nY:\r\n\r\nGET /",
        "1\r\nx\r\n0\r\n\r\n0\r\n\r\n",
        "A\r\n0123456789\r\n0\r\n\r\n",
        "5\r\nhello\r\n3\r\nabc",          /* incomplete */
        "5\r\nhelloXX\r\n0\r\n\r\n",       /* missing CRLF */
        "3;a=\"x\rb\"\r\nabc\r\n",         /* CR in quoted extension */
        "0\r\nX-T : v\r\n\r\n",            /* bad trailer */
        "0000000000000001\r\nx\r\n",       /* 16 digits */
        "4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n", /* over the cap of 6 below */
    };
    for (size_t k = 0; k < sizeof in / sizeof in[0]; k++)
        ASSERT_TRUE(split_equivalent(in[k], strlen(in[k]), k == 9 ? 6 : MAX_BODY));
    /* and that the cases above do end the way the comments say */
    ASSERT_EQ(chunk_all(in[1], strlen(in[1]), MAX_BODY), 1);
    ASSERT_EQ(strlen(in[1]) - cused, 5);
    ASSERT_EQ(chunk_all(in[4], strlen(in[4]), MAX_BODY), 0);
    ASSERT_EQ(chunk_all(in[5], strlen(in[5]), MAX_BODY), -EINVAL);
    ASSERT_EQ(chunk_all(in[9], strlen(in[9]), 6), -E2BIG);
}

/* ---- seed corpus -------------------------------------------------------- */

/* Replays tests/fuzz/corpus/http_request. ok-* files must be entirely valid
 * requests back to back; bad-* files must be rejected somewhere in the first
 * request (see tests/fuzz/make_corpus.sh). */
static int replay(const char *data, size_t n, int want_ok, char *why, size_t whylen)
{
    size_t off = 0;
    do {
        int rc = parse_n(data + off, n - off, MAX_HEAD);
        if (rc <= 0) {
            snprintf(why, whylen, "head at %zu: %d %s", off, rc, err);
            return rc < 0 ? -1 : 0;
        }
        off += (size_t)rc;
        if (req.chunked) {
            mm_chunked c;
            mm_buf o;
            size_t u = 0;
            mm_chunked_init(&c);
            mm_buf_init(&o, MAX_BODY);
            int drc = mm_chunked_feed(&c, data + off, n - off, &u, &o, err, sizeof err);
            mm_buf_free(&o);
            if (drc != 1) {
                snprintf(why, whylen, "chunked body at %zu: %d %s", off, drc, err);
                return drc < 0 ? -1 : 0;
            }
            off += u;
        } else if (req.content_length > 0) {
            if ((uint64_t)req.content_length > n - off) {
                snprintf(why, whylen, "body at %zu shorter than Content-Length", off);
                return 0;
            }
            off += (size_t)req.content_length;
        }
    } while (want_ok && off < n);
    snprintf(why, whylen, "accepted");
    return 1;
}

TEST(seed_corpus_replays)
{
    const char *dirname = "tests/fuzz/corpus/http_request";
    DIR *d = opendir(dirname);
    if (!d) {
        TEST_FAIL_("cannot open %s (run from the repository root)", dirname);
        return;
    }
    int files = 0, oks = 0, bads = 0, failed = 0;
    static char data[65536];
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dirname, de->d_name);
        FILE *f = fopen(path, "rb");
        if (!f) {
            TEST_FAIL_("cannot open %s", path);
            failed = 1;
            continue;
        }
        size_t n = fread(data, 1, sizeof data, f);
        fclose(f);
        files++;
        int want_ok = strncmp(de->d_name, "ok-", 3) == 0;
        int want_bad = strncmp(de->d_name, "bad-", 4) == 0;
        char why[300];
        int got = replay(data, n, want_ok, why, sizeof why);
        if (want_ok) {
            oks++;
            if (got != 1) {
                TEST_FAIL_("%s should be valid: %s", de->d_name, why);
                failed = 1;
            }
        } else if (want_bad) {
            bads++;
            if (got != -1) {
                TEST_FAIL_("%s should be rejected: %s", de->d_name, why);
                failed = 1;
            }
        }
    }
    closedir(d);
    if (failed)
        return;
    ASSERT_TRUE(oks >= 10);
    ASSERT_TRUE(bads >= 20);
    ASSERT_EQ(files, oks + bads);
}

int main(void)
{
    RUN(get_simple);
    RUN(post_content_length);
    RUN(content_length_limits);
    RUN(post_chunked);
    RUN(pipelined);
    RUN(http10_and_misc_forms);
    RUN(value_ows_stripped);
    RUN(header_names_case_insensitive);
    RUN(keep_alive_logic);
    RUN(expect_continue);
    RUN(every_prefix_needs_more);
    RUN(head_too_big);
    RUN(max_headers);
    RUN(reject_cl_and_te);
    RUN(reject_two_content_lengths);
    RUN(reject_bad_content_length_values);
    RUN(reject_whitespace_before_colon);
    RUN(reject_transfer_encodings);
    RUN(reject_ctl_in_values);
    RUN(reject_bare_line_ends);
    RUN(reject_obs_fold_and_leading_ws);
    RUN(reject_field_names);
    RUN(reject_request_lines);
    RUN(reject_versions);
    RUN(reject_host_rules);
    RUN(chunked_valid);
    RUN(chunked_pipelined_bytes_not_consumed);
    RUN(chunked_extensions);
    RUN(chunked_reject_extensions);
    RUN(chunked_reject_sizes);
    RUN(chunked_reject_data_framing);
    RUN(chunked_trailers);
    RUN(chunked_body_cap);
    RUN(chunked_line_caps);
    RUN(chunked_split_everywhere);
    RUN(seed_corpus_replays);
    mm_buf_free(&cout);
    return test_summary();
}
