/* stopstr.h: stop strings over streamed text.
 *
 * Generated text arrives in pieces (one token's worth at a time) and must
 * reach the client as soon as it is certain, but a stop string may be
 * split across tokens and must never be emitted. The tail of the text that
 * could still be the beginning of a stop string is held back until the
 * next piece settles it.
 *
 *   mm_stopstr_init(&ss, strings, lens, n);
 *   on each piece:  mm_stopstr_feed(&ss, piece, len, &out, &stopped)
 *   at the end:     mm_stopstr_finish(&ss, &out)   (releases the held tail)
 *
 * Invariant: bytes before the held tail can never be part of a match,
 * since the held tail is the longest suffix that is a prefix of a stop
 * string; so a search only ever needs to look at the held bytes. */
#ifndef MM_STOPSTR_H
#define MM_STOPSTR_H
#include <stddef.h>

#include "buf.h"

typedef struct mm_stopstr {
    const char *const *str;   /* borrowed; must outlive the matcher */
    const size_t      *len;
    int                n;
    size_t             maxlen;
    mm_buf             held;  /* text not yet emitted */
    int                which; /* index of the matched string, -1 none */
} mm_stopstr;

/* Empty strings are ignored. */
void mm_stopstr_init(mm_stopstr *ss, const char *const *str, const size_t *len, int n);
void mm_stopstr_free(mm_stopstr *ss);

/* Append piece; append to out what is now certain. *stopped becomes 1 when
 * a stop string completed: out then ends right before it and ss->which says
 * which one (the earliest match in the text wins; at the same position the
 * first in the list). Returns 0 or an mm_buf error. */
int mm_stopstr_feed(mm_stopstr *ss, const char *piece, size_t len, mm_buf *out, int *stopped);

/* The sequence ended for another reason: release the held text. */
int mm_stopstr_finish(mm_stopstr *ss, mm_buf *out);

/* Length of the longest proper suffix of text[0..n) that is a prefix of one
 * of the strings (what must be held back). */
size_t mm_stopstr_holdback(const mm_stopstr *ss, const char *text, size_t n);
#endif
