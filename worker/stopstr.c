/* stopstr.c: stop-string matching with hold-back (see stopstr.h). */
#include "stopstr.h"

#include <string.h>

/* The held text never exceeds the longest stop string plus one piece; a
 * piece is one token's text, which real vocabularies keep short, but the
 * cap only bounds memory, it never cuts text (a piece longer than this is
 * matched by the same code). */
#define STOPSTR_HELD_MAX (1u << 24)

void mm_stopstr_init(mm_stopstr *ss, const char *const *str, const size_t *len, int n)
{
    memset(ss, 0, sizeof *ss);
    ss->str = str;
    ss->len = len;
    ss->n = n;
    ss->which = -1;
    for (int i = 0; i < n; i++)
        if (len[i] > ss->maxlen)
            ss->maxlen = len[i];
    mm_buf_init(&ss->held, STOPSTR_HELD_MAX);
}

void mm_stopstr_free(mm_stopstr *ss) { mm_buf_free(&ss->held); }

size_t mm_stopstr_holdback(const mm_stopstr *ss, const char *text, size_t n)
{
    size_t best = 0;
    for (int s = 0; s < ss->n; s++) {
        size_t l = ss->len[s];
        if (l == 0)
            continue;
        /* Proper prefixes only: a whole occurrence is a match, not a hold. */
        size_t k = l - 1 < n ? l - 1 : n;
        for (; k > best; k--)
            if (memcmp(text + n - k, ss->str[s], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

int mm_stopstr_feed(mm_stopstr *ss, const char *piece, size_t len, mm_buf *out, int *stopped)
{
    *stopped = 0;
    if (ss->n == 0 || ss->maxlen == 0)
        return mm_buf_append(out, piece, len);
    int rc = mm_buf_append(&ss->held, piece, len);
    if (rc)
        return rc;
    const char *t = ss->held.data;
    size_t n = ss->held.len;
    size_t at = n;
    int which = -1;
    for (int s = 0; s < ss->n; s++) {
        size_t l = ss->len[s];
        if (l == 0 || l > n)
            continue;
        const char *hit = memmem(t, n, ss->str[s], l);
        if (hit && (size_t)(hit - t) < at) {
            at = (size_t)(hit - t);
            which = s;
        }
    }
    if (which >= 0) {
        rc = mm_buf_append(out, t, at);
        ss->which = which;
        mm_buf_reset(&ss->held);
        *stopped = 1;
        return rc;
    }
    size_t keep = mm_stopstr_holdback(ss, t, n);
    rc = mm_buf_append(out, t, n - keep);
    if (rc == 0)
        mm_buf_consume(&ss->held, n - keep);
    return rc;
}

int mm_stopstr_finish(mm_stopstr *ss, mm_buf *out)
{
    int rc = mm_buf_append(out, ss->held.data, ss->held.len);
    mm_buf_reset(&ss->held);
    return rc;
}
