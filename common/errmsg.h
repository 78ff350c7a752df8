/* errmsg.h: the one error convention's message side. Functions return 0 or
 * -errno and, when the caller passed a buffer, say why in it. */
#ifndef MM_ERRMSG_H
#define MM_ERRMSG_H
#include <stddef.h>

/* printf into err[0..errlen) when err is non-NULL; always NUL-terminated. */
void mm_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#endif
