/* http_parse.c: strict HTTP/1.1 request head parser and chunked body decoder
 * (see http_parse.h for the contract).
 *
 * Both run in one pass over the bytes with a character-class table and never
 * allocate (the chunked decoder only appends to the caller's capped mm_buf).
 * The head parser is restartable rather than incremental: the caller calls it
 * again on the grown buffer, which is cheap because heads are small and the
 * common case is a head that arrives in one read. */
#include "http_parse.h"
#include "pctdec.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Character classes (RFC 9110 5.6.2, 5.5, 5.6.4; RFC 3986 for the target). */
enum {
    CC_TCHAR  = 1,  /* token character */
    CC_VALUE  = 2,  /* field-vchar, SP, HTAB: anything allowed in a field value */
    CC_TARGET = 4,  /* visible ASCII: allowed in the request-target */
    CC_HEX    = 8,  /* HEXDIG */
    CC_QDTEXT = 16, /* qdtext inside a quoted-string */
};

static const unsigned char cc[256] = {
    /* 00 */  0,  0,  0,  0,  0,  0,  0,  0,  0, 18,  0,  0,  0,  0,  0,  0,
    /* 10 */  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
    /* 20 */ 18, 23,  6, 23, 23, 23, 23, 23, 22, 22, 23, 23, 22, 23, 23, 22,
    /* 30 */ 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 22, 22, 22, 22, 22, 22,
    /* 40 */ 22, 31, 31, 31, 31, 31, 31, 23, 23, 23, 23, 23, 23, 23, 23, 23,
    /* 50 */ 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 22,  6, 22, 23, 23,
    /* 60 */ 23, 31, 31, 31, 31, 31, 31, 23, 23, 23, 23, 23, 23, 23, 23, 23,
    /* 70 */ 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 23, 22, 23, 22, 23,  0,
    /* 80 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* 90 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* a0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* b0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* c0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* d0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* e0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
    /* f0 */ 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18, 18,
};

#define IS(c, cls) (cc[(unsigned char)(c)] & (cls))
#define IS_WS(c) ((c) == ' ' || (c) == '\t')

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

/* ASCII-only on purpose: strncasecmp follows the locale, and field names and
 * tokens are ASCII by definition. `lit` must be lowercase. */
static int ieq(const char *s, size_t n, const char *lit, size_t litlen)
{
    if (n != litlen)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)s[i]) != (unsigned char)lit[i])
            return 0;
    return 1;
}
#define IEQ(s, n, lit) ieq((s), (n), lit, sizeof(lit) - 1)

/* Content-Length = 1*DIGIT, within int64. Anything else ("+5", "5,5", a
 * list of equal values, an empty value) is a framing ambiguity. */
static int parse_content_length(const char *v, size_t n, int64_t *out)
{
    if (n == 0)
        return -EINVAL;
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -EINVAL;
        uint64_t d = (uint64_t)(v[i] - '0');
        if (acc > ((uint64_t)INT64_MAX - d) / 10)
            return -EINVAL;
        acc = acc * 10 + d;
    }
    *out = (int64_t)acc;
    return 0;
}

/* Connection = #connection-option: a comma list of tokens; empty elements
 * are allowed by the list syntax (RFC 9110 5.6.1). */
static int parse_connection(const char *v, size_t n, int *saw_close, int *saw_keep)
{
    size_t i = 0;
    while (i < n) {
        while (i < n && (IS_WS(v[i]) || v[i] == ','))
            i++;
        size_t start = i;
        while (i < n && IS(v[i], CC_TCHAR))
            i++;
        size_t tlen = i - start;
        while (i < n && IS_WS(v[i]))
            i++;
        if (i < n && v[i] != ',')
            return -EINVAL;
        if (IEQ(v + start, tlen, "close"))
            *saw_close = 1;
        else if (IEQ(v + start, tlen, "keep-alive"))
            *saw_keep = 1;
    }
    return 0;
}

int mm_http_parse_request_head(const char *buf, size_t len, size_t max_head,
                               mm_http_request *req, char *err, size_t errlen)
{
    /* The result is returned as an int, so a head can never be longer. */
    if (max_head > INT_MAX)
        max_head = INT_MAX;
    const char *p = buf;
    const char *end = buf + (len < max_head ? len : max_head);
    int cl_seen = 0, te_seen = 0, hosts = 0, saw_close = 0, saw_keep = 0, expect = 0;
    int rc = -EINVAL;

    req->method = req->target = NULL;
    req->method_len = req->target_len = 0;
    req->version_minor = 0;
    req->nheaders = 0;
    req->content_length = -1;
    req->chunked = 0;
    req->keep_alive = 0;
    req->expect_continue = 0;
    req->head_len = 0;

    /* request-line = method SP request-target SP HTTP-version CRLF. Leading
     * empty lines (which RFC 9112 2.2 lets a server skip) are rejected too:
     * after a body they mean the peer's framing disagrees with ours. */
    const char *m = p;
    while (p < end && IS(*p, CC_TCHAR))
        p++;
    if (p == end)
        goto more;
    if (*p != ' ' || p == m) {
        set_err(err, errlen, "invalid method in request line");
        goto fail;
    }
    req->method = m;
    req->method_len = (size_t)(p - m);
    p++;

    const char *t = p;
    while (p < end && IS(*p, CC_TARGET))
        p++;
    if (p == end)
        goto more;
    if (*p != ' ' || p == t) {
        set_err(err, errlen, "invalid request-target");
        goto fail;
    }
    req->target = t;
    req->target_len = (size_t)(p - t);
    p++;

    /* "HTTP/" DIGIT "." DIGIT CRLF: exactly 10 bytes, case-sensitive. */
    if (end - p < 10)
        goto more;
    if (memcmp(p, "HTTP/", 5) != 0 || p[5] < '0' || p[5] > '9' || p[6] != '.' ||
        p[7] < '0' || p[7] > '9' || p[8] != '\r' || p[9] != '\n') {
        set_err(err, errlen, "invalid HTTP version in request line");
        goto fail;
    }
    /* A higher 1.x minor could be served as 1.1 (RFC 9112 2.3), but only 1.0
     * and 1.1 have framing rules we have verified, so anything else is 505. */
    if (p[5] != '1' || p[7] > '1') {
        set_err(err, errlen, "unsupported HTTP version %.8s", p);
        rc = -ENOTSUP;
        goto fail;
    }
    req->version_minor = p[7] - '0';
    p += 10;

    for (;;) {
        if (p == end)
            goto more;
        if (*p == '\r') {
            if (p + 1 == end)
                goto more;
            if (p[1] != '\n') {
                set_err(err, errlen, "bare CR in header section");
                goto fail;
            }
            p += 2;
            break;
        }
        if (IS_WS(*p)) {
            set_err(err, errlen, "obsolete line folding or whitespace before a field");
            goto fail;
        }

        const char *name = p;
        while (p < end && IS(*p, CC_TCHAR))
            p++;
        if (p == end)
            goto more;
        if (*p != ':' || p == name) {
            if (IS_WS(*p) && p != name)
                set_err(err, errlen, "whitespace between field name and colon");
            else if (*p == '\n')
                set_err(err, errlen, "bare LF in header section");
            else
                set_err(err, errlen, "invalid field name");
            goto fail;
        }
        size_t name_len = (size_t)(p - name);
        p++;

        while (p < end && IS_WS(*p))
            p++;
        const char *v = p;
        while (p < end && IS(*p, CC_VALUE))
            p++;
        if (p == end)
            goto more;
        if (*p != '\r') {
            if (*p == '\n')
                set_err(err, errlen, "bare LF in header section");
            else
                set_err(err, errlen, "invalid character 0x%02x in field value",
                        (unsigned char)*p);
            goto fail;
        }
        if (p + 1 == end)
            goto more;
        if (p[1] != '\n') {
            set_err(err, errlen, "bare CR in field value");
            goto fail;
        }
        const char *ve = p;
        while (ve > v && IS_WS(ve[-1]))
            ve--;
        size_t vlen = (size_t)(ve - v);
        p += 2;

        if (req->nheaders == MM_HTTP_MAX_HEADERS) {
            set_err(err, errlen, "more than %d header fields", MM_HTTP_MAX_HEADERS);
            goto fail;
        }
        mm_http_header *h = &req->headers[req->nheaders++];
        h->name = name;
        h->name_len = name_len;
        h->value = v;
        h->value_len = vlen;

        /* Dispatch on length first: most fields match none of these. */
        switch (name_len) {
        case 4:
            if (IEQ(name, name_len, "host") && ++hosts > 1) {
                set_err(err, errlen, "more than one Host field");
                goto fail;
            }
            break;
        case 6:
            if (IEQ(name, name_len, "expect") && IEQ(v, vlen, "100-continue"))
                expect = 1;
            break;
        case 10:
            if (IEQ(name, name_len, "connection") &&
                parse_connection(v, vlen, &saw_close, &saw_keep) != 0) {
                set_err(err, errlen, "invalid Connection field");
                goto fail;
            }
            break;
        case 14:
            if (!IEQ(name, name_len, "content-length"))
                break;
            if (cl_seen++) {
                set_err(err, errlen, "more than one Content-Length field");
                goto fail;
            }
            if (parse_content_length(v, vlen, &req->content_length) != 0) {
                set_err(err, errlen, "invalid Content-Length");
                goto fail;
            }
            break;
        case 17:
            if (!IEQ(name, name_len, "transfer-encoding"))
                break;
            if (te_seen++) {
                set_err(err, errlen, "more than one Transfer-Encoding field");
                goto fail;
            }
            /* Only a lone "chunked": any other coding list is a framing we
             * do not implement, and guessing is how smuggling starts. */
            if (!IEQ(v, vlen, "chunked")) {
                set_err(err, errlen, "Transfer-Encoding other than chunked");
                goto fail;
            }
            break;
        default:
            break;
        }
    }

    if (cl_seen && te_seen) {
        set_err(err, errlen, "both Content-Length and Transfer-Encoding");
        goto fail;
    }
    /* RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing. */
    if (te_seen && req->version_minor == 0) {
        set_err(err, errlen, "Transfer-Encoding in an HTTP/1.0 request");
        goto fail;
    }
    if (req->version_minor == 1 && hosts == 0) {
        set_err(err, errlen, "HTTP/1.1 request without Host");
        goto fail;
    }
    req->chunked = te_seen;
    if (saw_close)
        req->keep_alive = 0;
    else
        req->keep_alive = req->version_minor == 1 || saw_keep;
    /* RFC 9110 10.1.1: a 100-continue expectation in HTTP/1.0 is ignored. */
    req->expect_continue = expect && req->version_minor == 1;
    req->head_len = (size_t)(p - buf);
    return (int)req->head_len;

more:
    if (len >= max_head) {
        set_err(err, errlen, "request head larger than %zu bytes", max_head);
        return -E2BIG;
    }
    return 0;
fail:
    return rc;
}

const mm_http_header *mm_http_find_header(const mm_http_request *req, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < req->nheaders; i++) {
        const mm_http_header *h = &req->headers[i];
        if (h->name_len != n)
            continue;
        size_t j = 0;
        while (j < n && ascii_lower((unsigned char)h->name[j]) ==
                            ascii_lower((unsigned char)name[j]))
            j++;
        if (j == n)
            return h;
    }
    return NULL;
}

/* ---- chunked body ------------------------------------------------------ */

/* States. CK_SIZE is 0 so that a zeroed mm_chunked is a fresh decoder. The
 * size-line states come first and the trailer states last so that the line
 * and section caps can be applied by range. */
enum {
    CK_SIZE = 0,     /* chunk-size hex digits */
    CK_SIZE_BWS,     /* BWS after the size or a value: must lead to ';' */
    CK_EXT_PRE_NAME, /* after ';': BWS then an extension name */
    CK_EXT_NAME,
    CK_EXT_NAME_BWS, /* BWS after a name: must lead to '=' or ';' */
    CK_EXT_PRE_VAL,  /* after '=': BWS then a token or quoted-string */
    CK_EXT_TOKVAL,
    CK_EXT_QSTR,
    CK_EXT_QESC,     /* after a backslash inside a quoted-string */
    CK_EXT_QEND,     /* after the closing quote */
    CK_SIZE_LF,      /* CR seen at the end of the size line */
    CK_DATA,
    CK_DATA_CR,
    CK_DATA_LF,
    CK_TR_START,     /* start of a trailer line or the final CRLF */
    CK_TR_NAME,
    CK_TR_VALUE,
    CK_TR_LF,
    CK_TR_END_LF,
    CK_DONE,
    CK_FAILED,
};

enum {
    CK_MAX_DIGITS = 15,       /* 15 hex digits < 2^60: no overflow checks needed */
    CK_MAX_LINE = 4096,       /* a size line or a trailer line, CRLF included */
    CK_MAX_TRAILERS = 16384,  /* the whole trailer section */
};

void mm_chunked_init(mm_chunked *c)
{
    c->state = CK_SIZE;
    c->remaining = 0;
    c->line_len = 0;
    c->size_digits = 0;
}

int mm_chunked_feed(mm_chunked *c, const char *in, size_t len, size_t *used,
                    mm_buf *out, char *err, size_t errlen)
{
    size_t i = 0;
    int rc = -EINVAL;

    if (c->state == CK_DONE) {
        *used = 0;
        return 1;
    }
    if (c->state == CK_FAILED) {
        set_err(err, errlen, "chunked decoder used after an error");
        *used = 0;
        return -EINVAL;
    }

    while (i < len) {
        if (c->state == CK_DATA) {
            size_t n = len - i;
            if (n > c->remaining)
                n = (size_t)c->remaining;
            if (n > out->max - out->len) {
                set_err(err, errlen, "chunked body larger than %zu bytes", out->max);
                rc = -E2BIG;
                goto fail;
            }
            int arc = mm_buf_append(out, in + i, n);
            if (arc != 0) {
                set_err(err, errlen, "cannot store chunk data");
                rc = arc;
                goto fail;
            }
            i += n;
            c->remaining -= n;
            if (c->remaining == 0)
                c->state = CK_DATA_CR;
            continue;
        }

        unsigned char ch = (unsigned char)in[i++];
        if (c->state < CK_DATA || (c->state >= CK_TR_START && c->state <= CK_TR_END_LF)) {
            if (++c->line_len > CK_MAX_LINE) {
                set_err(err, errlen, "chunk size or trailer line longer than %d bytes",
                        CK_MAX_LINE);
                goto fail;
            }
        }
        /* In the trailer section `remaining` is free: it counts the section. */
        if (c->state >= CK_TR_START && c->state <= CK_TR_END_LF &&
            ++c->remaining > CK_MAX_TRAILERS) {
            set_err(err, errlen, "trailer section longer than %d bytes", CK_MAX_TRAILERS);
            goto fail;
        }

        switch (c->state) {
        case CK_SIZE:
            if (IS(ch, CC_HEX)) {
                if (c->size_digits == CK_MAX_DIGITS) {
                    set_err(err, errlen, "chunk size longer than %d hex digits",
                            CK_MAX_DIGITS);
                    goto fail;
                }
                c->size_digits++;
                c->remaining = (c->remaining << 4) | (unsigned)mm_hexval(ch);
                break;
            }
            if (c->size_digits == 0) {
                set_err(err, errlen, "chunk size is not a hex number");
                goto fail;
            }
            if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (IS_WS(ch))
                c->state = CK_SIZE_BWS;
            else if (ch == '\r')
                c->state = CK_SIZE_LF;
            else {
                set_err(err, errlen, "invalid character after chunk size");
                goto fail;
            }
            break;
        case CK_SIZE_BWS:
            if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (!IS_WS(ch)) {
                set_err(err, errlen, "whitespace in chunk line not followed by ';'");
                goto fail;
            }
            break;
        case CK_EXT_PRE_NAME:
            if (IS(ch, CC_TCHAR))
                c->state = CK_EXT_NAME;
            else if (!IS_WS(ch)) {
                set_err(err, errlen, "invalid chunk extension name");
                goto fail;
            }
            break;
        case CK_EXT_NAME:
            if (IS(ch, CC_TCHAR))
                break;
            if (ch == '=')
                c->state = CK_EXT_PRE_VAL;
            else if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (IS_WS(ch))
                c->state = CK_EXT_NAME_BWS;
            else if (ch == '\r')
                c->state = CK_SIZE_LF;
            else {
                set_err(err, errlen, "invalid character in chunk extension name");
                goto fail;
            }
            break;
        case CK_EXT_NAME_BWS:
            if (ch == '=')
                c->state = CK_EXT_PRE_VAL;
            else if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (!IS_WS(ch)) {
                set_err(err, errlen, "invalid chunk extension");
                goto fail;
            }
            break;
        case CK_EXT_PRE_VAL:
            if (ch == '"')
                c->state = CK_EXT_QSTR;
            else if (IS(ch, CC_TCHAR))
                c->state = CK_EXT_TOKVAL;
            else if (!IS_WS(ch)) {
                set_err(err, errlen, "invalid chunk extension value");
                goto fail;
            }
            break;
        case CK_EXT_TOKVAL:
            if (IS(ch, CC_TCHAR))
                break;
            if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (IS_WS(ch))
                c->state = CK_SIZE_BWS;
            else if (ch == '\r')
                c->state = CK_SIZE_LF;
            else {
                set_err(err, errlen, "invalid character in chunk extension value");
                goto fail;
            }
            break;
        case CK_EXT_QSTR:
            if (ch == '"')
                c->state = CK_EXT_QEND;
            else if (ch == '\\')
                c->state = CK_EXT_QESC;
            else if (!IS(ch, CC_QDTEXT)) {
                set_err(err, errlen, "invalid character in quoted chunk extension");
                goto fail;
            }
            break;
        case CK_EXT_QESC:
            /* quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text ) */
            if (!IS(ch, CC_VALUE)) {
                set_err(err, errlen, "invalid quoted-pair in chunk extension");
                goto fail;
            }
            c->state = CK_EXT_QSTR;
            break;
        case CK_EXT_QEND:
            if (ch == ';')
                c->state = CK_EXT_PRE_NAME;
            else if (IS_WS(ch))
                c->state = CK_SIZE_BWS;
            else if (ch == '\r')
                c->state = CK_SIZE_LF;
            else {
                set_err(err, errlen, "invalid character after quoted chunk extension");
                goto fail;
            }
            break;
        case CK_SIZE_LF:
            if (ch != '\n') {
                set_err(err, errlen, "bare CR in chunk size line");
                goto fail;
            }
            c->line_len = 0;
            if (c->remaining == 0) {
                c->state = CK_TR_START;
                break;
            }
            /* Refuse before reading the data: the answer (413) comes sooner. */
            if (c->remaining > out->max - out->len) {
                set_err(err, errlen, "chunked body larger than %zu bytes", out->max);
                rc = -E2BIG;
                goto fail;
            }
            c->state = CK_DATA;
            break;
        case CK_DATA_CR:
            if (ch != '\r') {
                set_err(err, errlen, "missing CRLF after chunk data");
                goto fail;
            }
            c->state = CK_DATA_LF;
            break;
        case CK_DATA_LF:
            if (ch != '\n') {
                set_err(err, errlen, "missing CRLF after chunk data");
                goto fail;
            }
            c->state = CK_SIZE;
            c->remaining = 0;
            c->size_digits = 0;
            c->line_len = 0;
            break;
        case CK_TR_START:
            if (ch == '\r')
                c->state = CK_TR_END_LF;
            else if (IS(ch, CC_TCHAR))
                c->state = CK_TR_NAME;
            else {
                set_err(err, errlen, "invalid trailer field");
                goto fail;
            }
            break;
        case CK_TR_NAME:
            if (ch == ':')
                c->state = CK_TR_VALUE;
            else if (!IS(ch, CC_TCHAR)) {
                if (IS_WS(ch))
                    set_err(err, errlen, "whitespace between trailer name and colon");
                else
                    set_err(err, errlen, "invalid trailer field name");
                goto fail;
            }
            break;
        case CK_TR_VALUE:
            if (ch == '\r')
                c->state = CK_TR_LF;
            else if (!IS(ch, CC_VALUE)) {
                set_err(err, errlen, "invalid character in trailer value");
                goto fail;
            }
            break;
        case CK_TR_LF:
            if (ch != '\n') {
                set_err(err, errlen, "bare CR in trailer section");
                goto fail;
            }
            c->state = CK_TR_START;
            c->line_len = 0;
            break;
        case CK_TR_END_LF:
            if (ch != '\n') {
                set_err(err, errlen, "bare CR at the end of the chunked body");
                goto fail;
            }
            c->state = CK_DONE;
            *used = i;
            return 1;
        default:
            set_err(err, errlen, "chunked decoder in an invalid state");
            goto fail;
        }
    }
    *used = i;
    return 0;

fail:
    c->state = CK_FAILED;
    *used = i;
    return rc;
}

void mm_http_request_rebase(mm_http_request *req, const char *old_base, const char *new_base)
{
#define MM_REBASE(ptr) ((ptr) ? new_base + ((ptr) - old_base) : NULL)
    req->method = MM_REBASE(req->method);
    req->target = MM_REBASE(req->target);
    for (size_t i = 0; i < req->nheaders; i++) {
        req->headers[i].name = MM_REBASE(req->headers[i].name);
        req->headers[i].value = MM_REBASE(req->headers[i].value);
    }
#undef MM_REBASE
}
