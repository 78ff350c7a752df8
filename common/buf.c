/* buf.c: growable byte buffer with a hard cap (see buf.h). */
#include "buf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void mm_buf_init(mm_buf *b, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

/* Ensure room for `need` more bytes plus a NUL terminator. */
static int buf_reserve(mm_buf *b, size_t need)
{
    if (need > b->max - b->len)
        return -E2BIG;
    size_t want = b->len + need + 1;
    if (want <= b->cap)
        return 0;
    size_t ncap = b->cap ? b->cap : 256;
    while (ncap < want)
        ncap *= 2;
    char *p = realloc(b->data, ncap);
    if (!p)
        return -ENOMEM;
    b->data = p;
    b->cap = ncap;
    return 0;
}

int mm_buf_append(mm_buf *b, const void *p, size_t n)
{
    int rc = buf_reserve(b, n);
    if (rc)
        return rc;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int mm_buf_append_str(mm_buf *b, const char *s)
{
    return mm_buf_append(b, s, strlen(s));
}

int mm_buf_printf(mm_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -EINVAL;
    int rc = buf_reserve(b, (size_t)n);
    if (rc)
        return rc;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void mm_buf_consume(mm_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    if (b->data)
        b->data[b->len] = '\0';
}

void mm_buf_reset(mm_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

const char *mm_buf_cstr(mm_buf *b)
{
    if (!b->data && buf_reserve(b, 0))
        return "";
    return b->data;
}

void mm_buf_free(mm_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int mm_buf_read_file(mm_buf *b, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        if (err && errlen)
            snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    char chunk[65536];
    size_t n;
    int rc = 0;
    while (rc == 0 && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
        rc = mm_buf_append(b, chunk, n);
    if (rc == 0 && ferror(f))
        rc = -EIO;
    fclose(f);
    if (rc && err && errlen)
        snprintf(err, errlen, "%s: %s", path, rc == -E2BIG ? "file too large" : strerror(-rc));
    return rc;
}
