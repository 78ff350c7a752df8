/* unicode.c: UTF-8 helpers and NFC (see unicode.h).
 *
 * NFC runs in segments. A code point whose table value is 0 is a starter that
 * NFC leaves alone and that never combines with what precedes it, so text
 * can be cut just before it: runs of such characters (all of ASCII, most
 * CJK) are copied verbatim, and only the stretch from the last safe starter
 * through the following unsafe characters is decomposed, reordered and
 * recomposed. */
#include "unicode.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum {
    S_BASE = 0xAC00, L_BASE = 0x1100, V_BASE = 0x1161, T_BASE = 0x11A7,
    L_COUNT = 19, V_COUNT = 21, T_COUNT = 28,
    N_COUNT = V_COUNT * T_COUNT, S_COUNT = L_COUNT * N_COUNT,
};

/* Runs of combining marks longer than this are sorted with a merge sort, so
 * a hostile string of thousands of marks stays O(n log n). */
enum { INSERTION_MAX = 32 };

size_t mm_utf8_decode(const char *s, size_t n, uint32_t *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0)
        return 0;
    unsigned c = u[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t len;
    uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((u[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (u[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return len;
}

size_t mm_utf8_encode(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF)
        return 0;
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp > 0x10FFFF)
        return 0;
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

int mm_utf8_valid(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if ((unsigned char)s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        size_t l = mm_utf8_decode(s + i, n - i, &cp);
        if (!l)
            return 0;
        i += l;
    }
    return 1;
}

static unsigned qc_value(uint32_t cp)
{
    if (cp >= mm_ucd_qc_limit)
        return 0;
    size_t blk = mm_ucd_qc_stage1[cp / MM_UCD_QC_BLOCK];
    return mm_ucd_qc_stage2[blk * MM_UCD_QC_BLOCK + cp % MM_UCD_QC_BLOCK];
}

unsigned mm_unicode_ccc(uint32_t cp)
{
    unsigned v = qc_value(cp);
    return v == MM_UCD_QC_UNSAFE ? 0 : v;
}

/* Unicode version that assigned cp; only meaningful for code points with a
 * table entry (mark, decomposable or composite). */
static unsigned age_of(uint32_t cp)
{
    size_t lo = 0, hi = mm_ucd_age_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mm_ucd_age_lo[mid] <= cp)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo ? mm_ucd_age_ver[lo - 1] : 0;
}

/* Whether cp is unassigned for tables of `version` (0: never). */
static int too_new(uint32_t cp, unsigned version)
{
    return version && age_of(cp) > version;
}

static unsigned ccc_at(uint32_t cp, unsigned version)
{
    unsigned c = mm_unicode_ccc(cp);
    return c && too_new(cp, version) ? 0 : c;
}

int mm_unicode_class_additions(const char *gc, unsigned since, mm_buf *out)
{
    size_t gl = strlen(gc);
    if (gl < 1 || gl > 2)
        return 0;
    for (size_t i = 0; i < mm_ucd_new_count; i++) {
        const mm_ucd_new_range *r = &mm_ucd_new[i];
        if (r->age <= since || memcmp(r->gc, gc, gl) != 0)
            continue;
        int rc = r->lo == r->hi ? mm_buf_printf(out, "\\x{%X}", (unsigned)r->lo)
                                : mm_buf_printf(out, "\\x{%X}-\\x{%X}", (unsigned)r->lo, (unsigned)r->hi);
        if (rc)
            return rc;
    }
    return 0;
}

/* A growable array of code points for one segment. */
typedef struct cpvec {
    uint32_t *v;
    size_t n, cap;
} cpvec;

static int cpvec_reserve(cpvec *a, size_t extra)
{
    if (a->n + extra <= a->cap)
        return 0;
    size_t ncap = a->cap ? a->cap : 64;
    while (ncap < a->n + extra)
        ncap *= 2;
    uint32_t *p = realloc(a->v, ncap * sizeof *p);
    if (!p)
        return -ENOMEM;
    a->v = p;
    a->cap = ncap;
    return 0;
}

static int decomp_find(uint32_t cp)
{
    size_t lo = 0, hi = mm_ucd_decomp_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mm_ucd_decomp_cp[mid] < cp)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < mm_ucd_decomp_count && mm_ucd_decomp_cp[lo] == cp ? (int)lo : -1;
}

/* Append the full canonical decomposition of cp. */
static int decompose(cpvec *a, uint32_t cp, unsigned version)
{
    int rc = cpvec_reserve(a, 4);
    if (rc)
        return rc;
    if (cp >= S_BASE && cp < S_BASE + S_COUNT) {
        uint32_t s = cp - S_BASE;
        a->v[a->n++] = L_BASE + s / N_COUNT;
        a->v[a->n++] = V_BASE + (s % N_COUNT) / T_COUNT;
        if (s % T_COUNT)
            a->v[a->n++] = T_BASE + s % T_COUNT;
        return 0;
    }
    /* Below U+00C0 nothing decomposes; skip the search for ASCII-heavy text. */
    int i = cp < 0xC0 ? -1 : decomp_find(cp);
    if (i < 0 || too_new(cp, version)) {
        a->v[a->n++] = cp;
        return 0;
    }
    unsigned pos = mm_ucd_decomp_pos[i];
    size_t off = pos >> 2, len = (pos & 3) + 1;
    memcpy(a->v + a->n, mm_ucd_decomp_pool + off, len * sizeof(uint32_t));
    a->n += len;
    return 0;
}

static void sort_insertion(uint32_t *v, size_t n, unsigned ver)
{
    for (size_t i = 1; i < n; i++) {
        uint32_t x = v[i];
        unsigned cx = ccc_at(x, ver);
        size_t j = i;
        while (j > 0 && ccc_at(v[j - 1], ver) > cx) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = x;
    }
}

/* Stable bottom-up merge sort by combining class; tmp holds n entries. */
static void sort_merge(uint32_t *v, uint32_t *tmp, size_t n, unsigned ver)
{
    for (size_t w = 1; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n;
            size_t hi = lo + 2 * w < n ? lo + 2 * w : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                tmp[k++] = ccc_at(v[j], ver) < ccc_at(v[i], ver) ? v[j++] : v[i++];
            while (i < mid)
                tmp[k++] = v[i++];
            while (j < hi)
                tmp[k++] = v[j++];
        }
        memcpy(v, tmp, n * sizeof *v);
    }
}

/* Canonical ordering: stable sort of every run of non-starters. */
static int reorder(cpvec *a, unsigned ver)
{
    uint32_t *tmp = NULL;
    size_t i = 0;
    while (i < a->n) {
        if (ccc_at(a->v[i], ver) == 0) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < a->n && ccc_at(a->v[j], ver) != 0)
            j++;
        size_t len = j - i;
        if (len > INSERTION_MAX) {
            if (!tmp) {
                tmp = malloc(a->n * sizeof *tmp);
                if (!tmp)
                    return -ENOMEM;
            }
            sort_merge(a->v + i, tmp, len, ver);
        } else if (len > 1) {
            sort_insertion(a->v + i, len, ver);
        }
        i = j;
    }
    free(tmp);
    return 0;
}

/* The primary composite of (a, b), or 0 when there is none. */
static uint32_t compose_pair(uint32_t a, uint32_t b, unsigned ver)
{
    if (a >= L_BASE && a < L_BASE + L_COUNT && b >= V_BASE && b < V_BASE + V_COUNT)
        return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
    if (a >= S_BASE && a < S_BASE + S_COUNT && (a - S_BASE) % T_COUNT == 0 &&
        b > T_BASE && b < T_BASE + T_COUNT)
        return a + (b - T_BASE);
    uint64_t key = ((uint64_t)a << 21) | b;
    size_t lo = 0, hi = mm_ucd_comp_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mm_ucd_comp_key[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == mm_ucd_comp_count || mm_ucd_comp_key[lo] != key || too_new(mm_ucd_comp_val[lo], ver))
        return 0;
    return mm_ucd_comp_val[lo];
}

/* Canonical composition in place. last_cc is the class of the last kept
 * character after the current starter; 256 before any starter, so a leading
 * non-starter composes with nothing. A pair composes when nothing between
 * them is blocking: either they are adjacent (last_cc == 0) or every mark in
 * between has a lower class. */
static void compose(cpvec *a, unsigned ver)
{
    if (a->n == 0)
        return;
    size_t starter = 0, w = 1;
    unsigned last_cc = ccc_at(a->v[0], ver) ? 256 : 0;
    for (size_t r = 1; r < a->n; r++) {
        uint32_t ch = a->v[r];
        unsigned cc = ccc_at(ch, ver);
        uint32_t comp = last_cc == 256 ? 0 : compose_pair(a->v[starter], ch, ver);
        if (comp && (last_cc < cc || last_cc == 0)) {
            a->v[starter] = comp;
            continue;
        }
        if (cc == 0)
            starter = w;
        last_cc = cc;
        a->v[w++] = ch;
    }
    a->n = w;
}

static int normalize_segment(const char *s, size_t n, unsigned ver, cpvec *a, mm_buf *out)
{
    a->n = 0;
    size_t i = 0;
    int rc;
    while (i < n) {
        uint32_t cp;
        size_t l = mm_utf8_decode(s + i, n - i, &cp);
        if (!l)
            return -EILSEQ;
        if ((rc = decompose(a, cp, ver)))
            return rc;
        i += l;
    }
    if ((rc = reorder(a, ver)))
        return rc;
    compose(a, ver);
    for (size_t k = 0; k < a->n; k++) {
        char enc[4];
        size_t l = mm_utf8_encode(a->v[k], enc);
        if ((rc = mm_buf_append(out, enc, l)))
            return rc;
    }
    return 0;
}

int mm_unicode_nfc(const char *s, size_t n, mm_buf *out)
{
    return mm_unicode_nfc_version(s, n, 0, out);
}

/* A code point safe in the full tables is safe at any older version too
 * (there it is either the same or unassigned), so the fast path needs no
 * version check; the slow path applies the version. */
int mm_unicode_nfc_version(const char *s, size_t n, unsigned version, mm_buf *out)
{
    size_t orig = out->len;
    cpvec a = {0};
    size_t seg = 0, last_safe = 0, i = 0;
    int complex = 0, rc = 0;

    while (i < n) {
        size_t l = 1;
        unsigned v = 0;
        if ((unsigned char)s[i] >= 0x80) {
            uint32_t cp;
            l = mm_utf8_decode(s + i, n - i, &cp);
            if (!l) {
                rc = -EILSEQ;
                goto out;
            }
            v = qc_value(cp);
        }
        if (v == 0) {
            if (complex) {
                if ((rc = normalize_segment(s + seg, i - seg, version, &a, out)))
                    goto out;
                seg = i;
                complex = 0;
            }
            last_safe = i;
        } else if (!complex) {
            /* The last safe starter may compose with what follows, so the
             * segment to normalize begins there. */
            if ((rc = mm_buf_append(out, s + seg, last_safe - seg)))
                goto out;
            seg = last_safe;
            complex = 1;
        }
        i += l;
    }
    if (complex)
        rc = normalize_segment(s + seg, n - seg, version, &a, out);
    else
        rc = mm_buf_append(out, s + seg, n - seg);
out:
    free(a.v);
    if (rc) {
        out->len = orig;
        if (out->data)
            out->data[orig] = '\0';
    }
    return rc;
}
