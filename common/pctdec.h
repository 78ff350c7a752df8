/* pctdec.h: hex digits and %XX-decoding (URL paths and queries, URL
 * userinfo), shared by the HTTP parser, the JSON scanner, the admin API,
 * the config loader and the template lexer. */
#ifndef MM_PCTDEC_H
#define MM_PCTDEC_H
#include <stddef.h>

/* 0..15 for a hex digit, -1 for anything else. */
static inline int mm_hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* %XX-decode s[0..n) into out (cap bytes, always NUL-terminated when cap >
 * 0). Returns the decoded length, -EINVAL for a '%' not followed by two hex
 * digits, -EILSEQ for a NUL byte (encoded or not: the result is a C string),
 * -ENOSPC when the result and its NUL do not fit in cap. */
int mm_pct_decode(const char *s, size_t n, char *out, size_t cap);
#endif
