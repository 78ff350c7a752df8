/* jsonutil.h: small JSON helpers shared by gateway and worker. */
#ifndef MM_JSONUTIL_H
#define MM_JSONUTIL_H
#include <stddef.h>

#include "buf.h"

/* Append s[0..n) as a quoted JSON string (escapes ", \, control chars).
 * Returns 0 or the mm_buf error. */
int mm_json_append_str(mm_buf *out, const char *s, size_t n);

/* Build {"error":{"message":...,"type":...,"param":...,"code":status}} into
 * out. type is derived from status (invalid_request_error for 4xx but
 * rate_limit_error for 429, server_error for 5xx); param may be NULL. */
int mm_oai_error_body(mm_buf *out, int status, const char *param, const char *message);
const char *mm_oai_error_type(int status);

/* Locate the value of a top-level key in a JSON object text that is already
 * known to be valid (parsed by jansson first). Sets [*vstart, *vend) to the
 * value's bytes. Returns 0, or -ENOENT when the key is absent or spelled with
 * escapes (callers then fall back to re-serialising). Used to rewrite the
 * model field without touching any other byte of the client's body. */
int mm_json_top_value_span(const char *s, size_t n, const char *key, size_t *vstart,
                           size_t *vend);
#endif
