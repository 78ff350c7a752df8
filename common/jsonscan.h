/* jsonscan.h: a strict, allocation-free JSON validator that also reports the
 * members of the top-level object as byte spans.
 *
 * Why: the gateway must validate every request body (400 on bad JSON) and
 * read a few top-level fields (model, stream, stream_options, a sticky key),
 * then forward the body with at most the model value changed. Building a
 * jansson tree for that costs more than all of the gateway's own work per
 * request; a single validating pass with spans does the same job and lets the
 * rewrite splice bytes. Strict RFC 8259: no trailing commas, comments, NaN,
 * leading zeros, bad escapes, lone surrogates, invalid UTF-8 or raw control
 * characters; nesting depth capped. */
#ifndef MM_JSONSCAN_H
#define MM_JSONSCAN_H
#include <stddef.h>

#include "buf.h"

#define MM_JSON_MAX_DEPTH 256

typedef struct mm_json_member {
    const char *key;      /* key bytes without quotes (may hold escapes) */
    size_t      key_len;
    int         key_escaped;
    const char *val;      /* value bytes; strings include their quotes */
    size_t      val_len;
    char        type;     /* 's' string, 'n' number, 'o' object, 'a' array,
                             't' true, 'f' false, 'z' null */
} mm_json_member;

/* Validate s[0..n) as one JSON value (surrounding whitespace allowed).
 * When it is an object, its members go to members[0..max) and *count gets
 * their total number (which may exceed max). Returns 0; -EINVAL for invalid
 * JSON with "at byte N: reason" in err; -EDOM for valid JSON that is not an
 * object. */
int mm_json_scan(const char *s, size_t n, mm_json_member *members, size_t max, size_t *count,
                 char *err, size_t errlen);

/* The member whose (decoded) key equals key, or NULL. With duplicates the
 * first is returned; see mm_json_has_duplicate. */
const mm_json_member *mm_json_find(const mm_json_member *m, size_t n, const char *key);
/* Whether two members have the same decoded key. */
int mm_json_has_duplicate(const mm_json_member *m, size_t n);

/* Decode a JSON string value (with its quotes) into UTF-8, appended to out. */
int mm_json_decode_string(const char *val, size_t len, mm_buf *out);
#endif
