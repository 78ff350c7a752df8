/* buf.h: a growable byte buffer created with a hard maximum.
 *
 * Every buffer fed by the network is an mm_buf: appends past `max` fail with
 * -E2BIG and leave the buffer unchanged, so a peer can never make us grow
 * without bound. */
#ifndef MM_BUF_H
#define MM_BUF_H
#include <stddef.h>

typedef struct mm_buf {
    char  *data;   /* NUL-terminated when len > 0 or after mm_buf_cstr() */
    size_t len;
    size_t cap;
    size_t max;    /* hard limit on len */
} mm_buf;

void  mm_buf_init(mm_buf *b, size_t max);
/* 0, -E2BIG past max, -ENOMEM. */
int   mm_buf_append(mm_buf *b, const void *p, size_t n);
int   mm_buf_append_str(mm_buf *b, const char *s);
int   mm_buf_printf(mm_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drop the first n bytes. */
void  mm_buf_consume(mm_buf *b, size_t n);
void  mm_buf_reset(mm_buf *b);
const char *mm_buf_cstr(mm_buf *b);
void  mm_buf_free(mm_buf *b);
/* Append the whole file at path (up to b->max). 0, or -errno with
 * "path: reason" in err (-E2BIG: larger than the cap). */
int   mm_buf_read_file(mm_buf *b, const char *path, char *err, size_t errlen);
#endif
