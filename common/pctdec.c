/* pctdec.c: %XX-decoding into a caller's capped buffer. */
#include "pctdec.h"

#include <errno.h>
#include <limits.h>

int mm_pct_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    if (cap == 0)
        return -ENOSPC;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            int hi = i + 2 < n ? mm_hexval(s[i + 1]) : -1;
            int lo = i + 2 < n ? mm_hexval(s[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return -EINVAL;
            c = hi << 4 | lo;
            i += 2;
        }
        if (c == 0)
            return -EILSEQ;
        if (o + 1 >= cap || o >= INT_MAX)
            return -ENOSPC;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return (int)o;
}
