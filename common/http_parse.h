/* http_parse.h: a strict HTTP/1.1 request parser (RFC 9112).
 *
 * Why our own: the evhttp in Debian 12's libevent 2.1.12 accepts framing that
 * enables request smuggling (a space before the colon of Content-Length; two
 * differing Content-Length values, first one wins). Here every ambiguity is a
 * hard error: the caller answers 400 and closes the connection, so the bytes
 * after a bad head are never read as a second request.
 *
 * The parser is zero-copy: names and values point into the caller's buffer,
 * which must stay unchanged while the mm_http_request is in use. */
#ifndef MM_HTTP_PARSE_H
#define MM_HTTP_PARSE_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define MM_HTTP_MAX_HEADERS 128

typedef struct mm_http_header {
    const char *name;
    size_t      name_len;
    const char *value;      /* leading/trailing OWS stripped */
    size_t      value_len;
} mm_http_header;

typedef struct mm_http_request {
    const char *method;
    size_t      method_len;
    const char *target;     /* request-target as sent (origin-form expected) */
    size_t      target_len;
    int         version_minor;   /* HTTP/1.x: 0 or 1 */
    mm_http_header headers[MM_HTTP_MAX_HEADERS];
    size_t      nheaders;
    int64_t     content_length;  /* -1 when absent */
    int         chunked;         /* Transfer-Encoding: chunked */
    int         keep_alive;      /* from version and Connection */
    int         expect_continue; /* Expect: 100-continue */
    size_t      head_len;        /* bytes of the head including the final CRLFCRLF */
} mm_http_request;

/* Parse a request head at the start of buf[0..len).
 * Returns:
 *   > 0       the head is complete and valid; value is head_len.
 *   0         need more bytes (no CRLFCRLF yet and len < max_head).
 *   -E2BIG    the head is longer than max_head (answer 431).
 *   -EINVAL   malformed or ambiguous framing (answer 400 and close); a
 *             human-readable reason goes to err.
 *   -ENOTSUP  HTTP version other than 1.0/1.1 (answer 505).
 * Rejected (each -EINVAL): Content-Length with Transfer-Encoding; several
 * Content-Length headers (even equal ones) or a list value; a Content-Length
 * that is not 1*DIGIT or overflows int64; whitespace between a field name and
 * its colon; a field name that is not a token; Transfer-Encoding other than
 * exactly one "chunked" (case-insensitive); NUL, CR or LF inside a value; bare
 * LF or bare CR as line ends; obsolete line folding; a request line that is
 * not "METHOD SP target SP HTTP/1.x"; a method that is not a token; control
 * characters or spaces in the target; more than MM_HTTP_MAX_HEADERS fields;
 * empty lines before the request line (RFC 9112 2.2 allows skipping them, but
 * after a body they mean the peer's framing disagrees with ours); a Connection
 * value that is not a token list; Transfer-Encoding in an HTTP/1.0 request
 * (RFC 9112 6.1); an HTTP/1.1 request without Host, or any request with two.
 * -ENOTSUP: every version but HTTP/1.0 and HTTP/1.1, HTTP/1.2 included (only
 * these two have framing rules we verified). expect_continue is set only for
 * HTTP/1.1 (RFC 9110 10.1.1). Without Content-Length and Transfer-Encoding,
 * content_length is -1 and chunked 0: the request has no body. */
int mm_http_parse_request_head(const char *buf, size_t len, size_t max_head,
                               mm_http_request *req, char *err, size_t errlen);

/* The head was copied from old_base to new_base: move every pointer of req
 * along, so it refers to the copy. */
void mm_http_request_rebase(mm_http_request *req, const char *old_base, const char *new_base);

/* Case-insensitive lookup of a header; NULL when absent. With several fields
 * of the same name the first is returned. */
const mm_http_header *mm_http_find_header(const mm_http_request *req, const char *name);

/* Incremental decoder of a chunked body (RFC 9112 section 7.1). */
typedef struct mm_chunked {
    int      state;
    uint64_t remaining;      /* bytes left in the current chunk */
    size_t   line_len;       /* bytes of the current size/trailer line seen */
    int      size_digits;
} mm_chunked;

void mm_chunked_init(mm_chunked *c);
/* Feed in[0..len). Decoded data is appended to out (whose max caps the body).
 * *used is set to the bytes of in consumed.
 * Returns 1 when the last chunk and trailers are complete (bytes after *used
 * belong to the next request), 0 when more input is needed (all of in used),
 * -E2BIG when out's cap is exceeded (answer 413), -EINVAL on a framing error:
 * a chunk size that is not 1*HEXDIG, overflows (more than 15 hex digits), a
 * missing CRLF after chunk data, bare LF, an invalid chunk extension, or an
 * invalid trailer field. Chunk extensions (";name=value") are parsed and
 * ignored; trailer fields are validated and discarded. Size and trailer lines
 * are capped at 4096 bytes and the trailer section at 16384 (-EINVAL past
 * either). -ENOMEM if out cannot grow. A chunk size that does not fit out is
 * refused (-E2BIG) when its size line ends, before its data is read.
 * Feeding in pieces of any size gives the same result as feeding it at once.
 * After 1, further calls return 1 with *used = 0; after an error, -EINVAL.
 * A zeroed mm_chunked is also a freshly initialised one. */
int mm_chunked_feed(mm_chunked *c, const char *in, size_t len, size_t *used,
                    mm_buf *out, char *err, size_t errlen);
#endif
