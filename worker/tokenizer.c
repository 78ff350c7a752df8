/* tokenizer.c: tokenizer.json BPE tokenizers (see tokenizer.h).
 *
 * Encoding mirrors the tokenizers library step by step, because "close" is
 * not good enough for a model: added tokens out first, normalizer per piece,
 * pre-tokenizer splits, BPE per word by merge rank, post-processor template.
 *
 * Byte-level models (pre-tokenizer ends in ByteLevel) never materialise the
 * byte-to-unicode mapped text: BPE works on raw bytes, with the vocab
 * re-keyed by each token's raw bytes at load time. Mapping is a bijection on
 * the tokens that can occur, so this is the same computation, minus a copy.
 *
 * Decoding is one streaming state machine (per-token steps, ByteFallback
 * grouping, a join, a final Strip); decode() feeds it all ids at once, which
 * is why stream output always adds up to decode(). */
#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

enum {
    ID_SPACE_MAX   = 1 << 24,   /* refuse files claiming more ids than this */
    CACHE_SLOTS    = 1 << 14,   /* word cache: direct-mapped, bounded memory */
    CACHE_WORD_MAX = 256,       /* longer words are not cached */
    CHUNK_MIN      = 64,        /* plain-mode words longer than this are chunked */
    RUN_MAX        = 1 << 20,   /* ByteFallback bytes a stream may hold */
    SCRATCH_MAX    = 1 << 30,
    JIT_STACK_MAX  = 8 << 20,
    /* tokenizers' NFC normalizer (the unicode-normalization-alignments
     * crate) has Unicode 9.0 tables: marks assigned later (U+1DF6..U+1DFA,
     * ...) are starters there and block reordering. Measured against
     * tokenizers 0.23.2: version 9.0 matched 3000 of 3000 mark-heavy random
     * strings, any other version hundreds fewer. */
    TOKENIZERS_NFC_UNICODE = 900,
};

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

/* ---- ids ---------------------------------------------------------------- */

void mm_tok_ids_init(mm_tok_ids *ids, size_t max)
{
    ids->v = NULL;
    ids->n = ids->cap = 0;
    ids->max = max;
}

int mm_tok_ids_push(mm_tok_ids *ids, int32_t id)
{
    if (ids->n >= ids->max)
        return -E2BIG;
    if (ids->n == ids->cap) {
        size_t ncap = ids->cap ? ids->cap * 2 : 64;
        if (ncap > ids->max)
            ncap = ids->max;
        int32_t *p = realloc(ids->v, ncap * sizeof *p);
        if (!p)
            return -ENOMEM;
        ids->v = p;
        ids->cap = ncap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

void mm_tok_ids_free(mm_tok_ids *ids)
{
    free(ids->v);
    ids->v = NULL;
    ids->n = ids->cap = 0;
}

/* ---- strings, hashing, maps --------------------------------------------- */

/* Strings packed in one allocation; entries are addressed by offset because
 * the block moves while the file loads. */
typedef struct arena {
    char  *p;
    size_t len, cap;
} arena;

static int arena_add(arena *a, const char *s, size_t n, uint32_t *off)
{
    if (n >= UINT32_MAX || a->len + n + 1 >= UINT32_MAX)
        return -E2BIG;
    if (a->len + n + 1 > a->cap) {
        size_t ncap = a->cap ? a->cap : 1 << 16;
        while (ncap < a->len + n + 1)
            ncap *= 2;
        char *p = realloc(a->p, ncap);
        if (!p)
            return -ENOMEM;
        a->p = p;
        a->cap = ncap;
    }
    memcpy(a->p + a->len, s, n);
    a->p[a->len + n] = '\0';
    *off = (uint32_t)a->len;
    a->len += n + 1;
    return 0;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0x100000001B3ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ (w * 0x87c37b91114253d5ULL)) * 0x4cf5ad432745937fULL;
        h = (h << 31) | (h >> 33);
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    return mix64(h ^ w);
}

/* Open-addressing map from a byte string (kept in an arena) to an id; sized
 * once for a known count, never resized. */
typedef struct kslot {
    uint32_t off, len, hash;
    int32_t  id; /* < 0: empty */
} kslot;

typedef struct keymap {
    kslot       *s;
    size_t       mask, n;
    const arena *ar;
} keymap;

static int keymap_init(keymap *m, const arena *ar, size_t expect)
{
    size_t cap = 16;
    while (cap < expect * 2 + 1)
        cap *= 2;
    m->s = malloc(cap * sizeof *m->s);
    if (!m->s)
        return -ENOMEM;
    for (size_t i = 0; i < cap; i++)
        m->s[i].id = -1;
    m->mask = cap - 1;
    m->n = 0;
    m->ar = ar;
    return 0;
}

static int32_t keymap_get(const keymap *m, const char *k, size_t n)
{
    if (!m->s)
        return -1;
    uint64_t h = hash_bytes(k, n);
    uint32_t h32 = (uint32_t)(h >> 32);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        const kslot *e = &m->s[i];
        if (e->id < 0)
            return -1;
        if (e->hash == h32 && e->len == n && memcmp(m->ar->p + e->off, k, n) == 0)
            return e->id;
    }
}

/* Key bytes live at ar->p + off. -EEXIST (map unchanged) when present. */
static int keymap_put(keymap *m, uint32_t off, uint32_t len, int32_t id)
{
    if ((m->n + 1) * 4 > (m->mask + 1) * 3)
        return -ENOSPC;
    const char *k = m->ar->p + off;
    uint64_t h = hash_bytes(k, len);
    uint32_t h32 = (uint32_t)(h >> 32);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        kslot *e = &m->s[i];
        if (e->id < 0) {
            e->off = off;
            e->len = len;
            e->hash = h32;
            e->id = id;
            m->n++;
            return 0;
        }
        if (e->hash == h32 && e->len == len && memcmp(m->ar->p + e->off, k, len) == 0)
            return -EEXIST;
    }
}

/* (left id, right id) -> (rank, merged id). */
typedef struct mslot {
    uint64_t key;
    uint32_t rank;
    int32_t  id; /* < 0: empty */
} mslot;

typedef struct mergemap {
    mslot *s;
    size_t mask;
} mergemap;

static uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static const mslot *merge_get(const mergemap *m, int32_t a, int32_t b)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        const mslot *e = &m->s[i];
        if (e->id < 0)
            return NULL;
        if (e->key == key)
            return e;
    }
}

/* A repeated pair takes the later rank, as the tokenizers library does when
 * it collects the merges into its map. */
static void merge_put(mergemap *m, int32_t a, int32_t b, uint32_t rank, int32_t id)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        mslot *e = &m->s[i];
        if (e->id < 0 || e->key == key) {
            e->key = key;
            e->rank = rank;
            e->id = id;
            return;
        }
    }
}

/* A set of code point pairs: every two adjacent characters inside some
 * vocab token. Between two characters that never sit side by side in any
 * token no merge can ever join, so a long word can be cut there and its
 * pieces tokenized apart with the same result (see bpe_word). */
typedef struct pairset {
    uint64_t *s; /* 0: empty (no pair of two NULs is stored) */
    size_t    mask, n;
} pairset;

static int pairset_has(const pairset *p, uint32_t a, uint32_t b)
{
    uint64_t key = ((uint64_t)a << 32) | b;
    if (!key)
        return 1;
    for (size_t i = mix64(key) & p->mask;; i = (i + 1) & p->mask) {
        if (p->s[i] == key)
            return 1;
        if (!p->s[i])
            return 0;
    }
}

static int pairset_add(pairset *p, uint32_t a, uint32_t b)
{
    uint64_t key = ((uint64_t)a << 32) | b;
    if (!key)
        return 0;
    if ((p->n + 1) * 2 > p->mask + 1) {
        size_t ncap = p->s ? (p->mask + 1) * 2 : 1 << 12;
        uint64_t *ns = calloc(ncap, sizeof *ns);
        if (!ns)
            return -ENOMEM;
        for (size_t i = 0; p->s && i <= p->mask; i++) {
            if (!p->s[i])
                continue;
            size_t j = mix64(p->s[i]) & (ncap - 1);
            while (ns[j])
                j = (j + 1) & (ncap - 1);
            ns[j] = p->s[i];
        }
        free(p->s);
        p->s = ns;
        p->mask = ncap - 1;
    }
    size_t i = mix64(key) & p->mask;
    while (p->s[i] && p->s[i] != key)
        i = (i + 1) & p->mask;
    if (!p->s[i]) {
        p->s[i] = key;
        p->n++;
    }
    return 0;
}

/* ---- added-token trie ----------------------------------------------------- */

typedef struct tnode {
    int32_t child, sibling, tok; /* tok: index into added[], or -1 */
    unsigned char byte;
} tnode;

typedef struct trie {
    tnode  *n;
    size_t  len, cap;
    int32_t root[256];
    int     empty;
} trie;

static void trie_init(trie *t)
{
    memset(t, 0, sizeof *t);
    for (int i = 0; i < 256; i++)
        t->root[i] = -1;
    t->empty = 1;
}

static int trie_node(trie *t, unsigned char b)
{
    if (t->len == t->cap) {
        size_t ncap = t->cap ? t->cap * 2 : 256;
        tnode *p = realloc(t->n, ncap * sizeof *p);
        if (!p)
            return -ENOMEM;
        t->n = p;
        t->cap = ncap;
    }
    t->n[t->len] = (tnode){.child = -1, .sibling = -1, .tok = -1, .byte = b};
    return (int)t->len++;
}

static int trie_add(trie *t, const char *s, size_t n, int32_t tok)
{
    int32_t *slot = &t->root[(unsigned char)s[0]];
    int cur = -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        if (i > 0)
            slot = &t->n[cur].child;
        int k = *slot;
        while (k >= 0 && t->n[k].byte != b)
            k = t->n[k].sibling;
        if (k < 0) {
            int nk = trie_node(t, b);
            if (nk < 0)
                return nk;
            /* trie_node may have moved t->n; recompute the slot. */
            slot = i == 0 ? &t->root[b] : &t->n[cur].child;
            t->n[nk].sibling = *slot;
            *slot = nk;
            k = nk;
        }
        cur = k;
    }
    t->n[cur].tok = tok;
    t->empty = 0;
    return 0;
}

/* Longest added token starting at s; its index, or -1. */
static int trie_longest(const trie *t, const char *s, size_t n, size_t *mlen)
{
    int k = t->root[(unsigned char)s[0]];
    int best = -1;
    size_t i = 0;
    while (k >= 0) {
        i++;
        if (t->n[k].tok >= 0) {
            best = t->n[k].tok;
            *mlen = i;
        }
        if (i == n)
            break;
        unsigned char b = (unsigned char)s[i];
        k = t->n[k].child;
        while (k >= 0 && t->n[k].byte != b)
            k = t->n[k].sibling;
    }
    return best;
}

static void trie_free(trie *t)
{
    free(t->n);
    t->n = NULL;
}

/* ---- components ----------------------------------------------------------- */

enum { NORM_NFC, NORM_PREPEND, NORM_REPLACE };

typedef struct norm_op {
    int    kind;
    char  *a, *b; /* Prepend: a; Replace: pattern a -> content b */
    size_t alen, blen;
} norm_op;

enum { DEC_REPLACE, DEC_STRIP };
enum { JOIN_CONCAT, JOIN_BYTELEVEL, JOIN_SPACE };

typedef struct dec_step {
    int      kind;
    char    *a, *b;   /* Replace: pattern a -> content b */
    size_t   alen, blen;
    char     c[4];    /* Strip: the content character */
    size_t   clen;
    size_t   start, stop;
} dec_step;

typedef struct centry {
    uint64_t hash;
    uint32_t klen, nids;
    char    *mem; /* key bytes, then the ids (memcpy'd) */
} centry;

struct mm_tokenizer {
    arena     str;          /* token strings: vocab and added contents */
    arena     raw;          /* byte-level: each token's raw bytes */
    size_t    nids;         /* id space */
    uint32_t *str_off, *str_len; /* per id; str_len UINT32_MAX: no token */
    uint32_t *raw_off, *raw_len;
    int16_t  *byte_val;     /* per id: value of a "<0xNN>" token, else -1 */
    uint8_t  *special;      /* per id: special added token */
    keymap    vocab;        /* model vocab, by string */
    keymap    vocab_raw;    /* byte-level: model vocab, by raw bytes */
    keymap    added_map;    /* added tokens, by content */
    mergemap  merges;
    pairset   pairs;        /* plain mode: adjacent characters inside tokens */
    int32_t  *char_id;      /* plain mode: id of each BMP character's token, or -1 */
    mm_tok_added *added;
    size_t    nadded;
    trie      trie_raw, trie_norm;

    norm_op  *norm;
    size_t    nnorm;
    pcre2_code **split;
    size_t    nsplit;
    int       byte_level;

    int       byte_fallback, fuse_unk, ignore_merges;
    int32_t   unk_id;
    int32_t   byte_tok[256];   /* id of "<0xNN>", or -1 */
    int32_t   unit_id[256];    /* byte-level: id of each byte's mapped char */
    int32_t   unit_fb[256][2]; /* byte-level: fallback ids of that char */
    uint8_t   unit_nfb[256];   /* 0: no fallback */

    int32_t  *prefix, *suffix;
    size_t    nprefix, nsuffix;

    uint32_t  fwd[256];        /* byte -> unicode map and its inverse */
    int16_t   inv[324];

    dec_step *pre, *mid;     /* per-token steps before/after ByteFallback */
    size_t    npre, nmid;
    int       has_bf, join, has_post;
    dec_step  post;          /* Strip after the join */

    pthread_mutex_t lock;
    centry   *cache;
};

/* GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for
 * themselves, the rest are shifted to U+0100 onwards in byte order. */
static void byte_map(uint32_t fwd[256], int16_t inv[324])
{
    int n = 0;
    for (int i = 0; i < 324; i++)
        inv[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        fwd[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
        inv[fwd[b]] = (int16_t)b;
    }
}

/* Map a byte-level string back to bytes; 0 when some character is not in
 * the map (then ByteLevel decoding uses the string's own UTF-8). */
static int byte_unmap(const int16_t inv[324], const char *s, size_t n, char *out, size_t *olen)
{
    size_t i = 0, o = 0;
    while (i < n) {
        uint32_t cp;
        size_t l = mm_utf8_decode(s + i, n - i, &cp);
        if (!l || cp >= 324 || inv[cp] < 0)
            return 0;
        out[o++] = (char)inv[cp];
        i += l;
    }
    *olen = o;
    return 1;
}

/* ---- regex ----------------------------------------------------------------- */

/* tokenizers runs these patterns on Oniguruma, where \s is exactly Unicode
 * White_Space (measured: 25 code points); PCRE2 10.42's \s with UCP also
 * takes U+180E, White_Space only before Unicode 6.3. Spell it out. A few
 * escapes that mean different things in the two engines are refused. */
#define WS_CLASS "\\t-\\r\\x{85}\\p{Z}"

/* PCRE2's Unicode version as major * 100 + minor ("14.0.0" -> 1400). */
static unsigned pcre2_unicode_version(void)
{
    char v[32] = "", *dot, *end;
    if (pcre2_config(PCRE2_CONFIG_UNICODE_VERSION, v) <= 0)
        return 0;
    unsigned long major = strtoul(v, &dot, 10);
    if (dot == v || *dot != '.')
        return 0;
    unsigned long minor = strtoul(dot + 1, &end, 10);
    if (end == dot + 1 || major > 99 || minor > 99)
        return 0;
    return (unsigned)(major * 100 + minor);
}

/* \p{X} where X is a general category: PCRE2's property tables may be older
 * than our UCD (Debian 12's PCRE2 has Unicode 14), and tokenizers' engine
 * knows newer letters, digits and symbols. Add the code points assigned since
 * PCRE2's version to the class. *i is at the 'p'/'P'. */
static int emit_property(const char *name, int neg, int in_class, unsigned uver, const char *orig,
                         size_t origlen, mm_buf *out, char *err, size_t errlen)
{
    size_t nl = strlen(name);
    mm_buf add;
    mm_buf_init(&add, 1 << 20);
    int rc = 0;
    if (nl >= 1 && nl <= 2 && strchr("LMNPSZ", name[0]) && uver < mm_ucd_version)
        rc = mm_unicode_class_additions(name, uver, &add);
    if (!rc && add.len == 0 && orig) {
        /* Nothing newer: copy the escape as written. */
        rc = mm_buf_append(out, orig, origlen);
    } else if (!rc && in_class && neg) {
        rc = fail(err, errlen, -ENOTSUP,
                  "regex: a negated \\p{%s} inside a class is not supported", name);
    } else if (!rc) {
        if (!in_class)
            rc = mm_buf_append_str(out, neg ? "[^" : "[");
        if (!rc)
            rc = mm_buf_printf(out, "\\p{%s}", name);
        if (!rc)
            rc = mm_buf_append(out, add.data, add.len);
        if (!rc && !in_class)
            rc = mm_buf_append_str(out, "]");
    }
    mm_buf_free(&add);
    return rc;
}

static int regex_property(const char *p, size_t n, size_t *i, int in_class, unsigned uver,
                          mm_buf *out, char *err, size_t errlen)
{
    size_t at = *i;
    int neg = p[at] == 'P';
    char name[8];
    size_t nl = 0, end;
    if (at + 1 < n && p[at + 1] == '{') {
        const char *close = memchr(p + at + 2, '}', n - at - 2);
        if (!close)
            return fail(err, errlen, -EINVAL, "regex: unterminated \\p{");
        size_t b = at + 2;
        end = (size_t)(close - p);
        if (b < end && p[b] == '^') {
            neg = !neg;
            b++;
        }
        nl = end - b;
        if (nl < sizeof name) {
            memcpy(name, p + b, nl);
            name[nl] = '\0';
        } else {
            nl = 0;
        }
    } else if (at + 1 < n) {
        end = at + 1;
        name[0] = p[end];
        name[1] = '\0';
        nl = 1;
    } else {
        return fail(err, errlen, -EINVAL, "regex: truncated \\p");
    }
    if (nl == 0)
        name[0] = '\0';
    *i = end;
    return emit_property(name, neg, in_class, uver, p + at - 1, end - at + 2, out, err, errlen);
}

static int regex_translate(const char *p, size_t n, mm_buf *out, char *err, size_t errlen)
{
    unsigned uver = pcre2_unicode_version();
    int in_class = 0, rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char e = p[++i];
            switch (e) {
            case 's':
                rc = mm_buf_append_str(out, in_class ? WS_CLASS : "[" WS_CLASS "]");
                break;
            case 'S':
                if (in_class)
                    return fail(err, errlen, -ENOTSUP, "regex: \\S inside a class is not supported");
                rc = mm_buf_append_str(out, "[^" WS_CLASS "]");
                break;
            case 'p':
            case 'P':
                rc = regex_property(p, n, &i, in_class, uver, out, err, errlen);
                break;
            case 'd': /* Unicode decimal digits in both; \p{Nd} gets newer ones */
            case 'D':
                rc = emit_property("Nd", e == 'D', in_class, uver, p + i - 1, 2, out, err, errlen);
                break;
            case 'h': /* Oniguruma: a hex digit (PCRE2: horizontal space) */
                rc = mm_buf_append_str(out, in_class ? "0-9a-fA-F" : "[0-9a-fA-F]");
                break;
            case 'H':
                if (in_class)
                    return fail(err, errlen, -ENOTSUP, "regex: \\H inside a class is not supported");
                rc = mm_buf_append_str(out, "[^0-9a-fA-F]");
                break;
            case 'v': /* Oniguruma: vertical tab; PCRE2: any vertical space */
                rc = mm_buf_append_str(out, "\\x{0B}");
                break;
            case 'u': { /* Oniguruma \uHHHH */
                if (i + 4 >= n || strspn(p + i + 1, "0123456789abcdefABCDEF") < 4)
                    return fail(err, errlen, -EINVAL, "regex: malformed \\u escape");
                rc = mm_buf_append_str(out, "\\x{");
                if (!rc)
                    rc = mm_buf_append(out, p + i + 1, 4);
                if (!rc)
                    rc = mm_buf_append_str(out, "}");
                i += 4;
                break;
            }
            /* \w in Oniguruma also takes marks and more; \b, \B follow it. */
            case 'w': case 'W': case 'b': case 'B':
            case 'X': case 'R': case 'N': case 'O': case 'y': case 'Y':
                return fail(err, errlen, -ENOTSUP,
                            "regex: \\%c differs between Oniguruma and PCRE2 and is not supported", e);
            default:
                rc = mm_buf_append(out, p + i - 1, 2);
            }
            continue;
        }
        if (in_class) {
            if (c == '[')
                return fail(err, errlen, -ENOTSUP, "regex: nested character classes are not supported");
            if (c == '&' && i + 1 < n && p[i + 1] == '&')
                return fail(err, errlen, -ENOTSUP, "regex: class intersection (&&) is not supported");
            if (c == ']')
                in_class = 0;
            rc = mm_buf_append(out, &c, 1);
            continue;
        }
        if (c == '[') {
            in_class = 1;
            rc = mm_buf_append(out, &c, 1);
            /* A ']' right after '[' or '[^' is a literal in both engines. */
            if (!rc && i + 1 < n && p[i + 1] == '^')
                rc = mm_buf_append(out, p + ++i, 1);
            if (!rc && i + 1 < n && p[i + 1] == ']')
                rc = mm_buf_append(out, p + ++i, 1);
            continue;
        }
        rc = mm_buf_append(out, &c, 1);
    }
    if (!rc && in_class)
        return fail(err, errlen, -EINVAL, "regex: unterminated character class");
    return rc;
}

static int regex_compile(const char *pat, size_t n, int literal, pcre2_code **out, char *err,
                         size_t errlen)
{
    mm_buf tr;
    mm_buf_init(&tr, 1 << 20);
    int rc = 0;
    if (literal)
        rc = mm_buf_append(&tr, pat, n);
    else
        rc = regex_translate(pat, n, &tr, err, errlen);
    if (rc) {
        if (rc == -E2BIG || rc == -ENOMEM)
            fail(err, errlen, rc, "regex: pattern too large");
        goto out;
    }
    int ecode;
    PCRE2_SIZE eoff;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK |
                    (literal ? PCRE2_LITERAL : PCRE2_MULTILINE);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)mm_buf_cstr(&tr), tr.len, opts, &ecode, &eoff, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof msg);
        rc = fail(err, errlen, -EINVAL, "regex: %s at offset %zu of \"%.200s\"", (char *)msg,
                  (size_t)eoff, mm_buf_cstr(&tr));
        goto out;
    }
    /* JIT is an optimisation: without it (or if it fails) the interpreter
     * gives the same matches. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    *out = re;
out:
    mm_buf_free(&tr);
    return rc;
}

/* ---- loading ----------------------------------------------------------------- */

typedef struct loader {
    mm_tokenizer *t;
    char         *err;
    size_t        errlen;
} loader;

static const char *jtype(json_t *o)
{
    json_t *ty = json_object_get(o, "type");
    return json_is_string(ty) ? json_string_value(ty) : NULL;
}

static int jbool(json_t *o, const char *key, int dflt)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return dflt;
    return json_is_true(v);
}

/* Copy a JSON string (it may hold NULs) into a malloc'd, NUL-terminated block. */
static int jdup(json_t *s, char **out, size_t *len)
{
    size_t n = json_string_length(s);
    char *p = malloc(n + 1);
    if (!p)
        return -ENOMEM;
    memcpy(p, json_string_value(s), n);
    p[n] = '\0';
    *out = p;
    *len = n;
    return 0;
}

/* A {"String": "..."} pattern; Regex patterns are refused where unsupported. */
static int string_pattern(loader *L, json_t *o, const char *what, char **out, size_t *len)
{
    json_t *pat = json_object_get(o, "pattern");
    json_t *s = json_object_get(pat, "String");
    if (json_is_string(s))
        return jdup(s, out, len);
    if (json_object_get(pat, "Regex"))
        return fail(L->err, L->errlen, -ENOTSUP, "%s with a Regex pattern is not supported", what);
    return fail(L->err, L->errlen, -EINVAL, "%s: missing pattern", what);
}

static int set_token(mm_tokenizer *t, int32_t id, const char *s, size_t n)
{
    uint32_t off;
    int rc = arena_add(&t->str, s, n, &off);
    if (rc)
        return rc;
    t->str_off[id] = off;
    t->str_len[id] = (uint32_t)n;
    return 0;
}

static int check_id(loader *L, json_int_t id, const char *what)
{
    if (id < 0 || id >= ID_SPACE_MAX)
        return fail(L->err, L->errlen, -EINVAL, "%s: id %lld out of range", what, (long long)id);
    return 0;
}

static int load_vocab(loader *L, json_t *model, json_t *added)
{
    mm_tokenizer *t = L->t;
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return fail(L->err, L->errlen, -EINVAL, "model.vocab: expected an object");

    /* Size the id space first: the highest id of vocab or added tokens. */
    json_int_t maxid = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v))
            return fail(L->err, L->errlen, -EINVAL, "model.vocab[\"%.100s\"]: expected an integer", key);
        int rc = check_id(L, json_integer_value(v), "model.vocab");
        if (rc)
            return rc;
        if (json_integer_value(v) > maxid)
            maxid = json_integer_value(v);
    }
    size_t i;
    json_t *a;
    json_array_foreach(added, i, a) {
        json_t *id = json_object_get(a, "id");
        if (!json_is_integer(id))
            return fail(L->err, L->errlen, -EINVAL, "added_tokens[%zu].id: expected an integer", i);
        int rc = check_id(L, json_integer_value(id), "added_tokens");
        if (rc)
            return rc;
        if (json_integer_value(id) > maxid)
            maxid = json_integer_value(id);
    }
    t->nids = (size_t)(maxid + 1);
    t->str_off = calloc(t->nids + 1, sizeof *t->str_off);
    t->str_len = malloc((t->nids + 1) * sizeof *t->str_len);
    t->special = calloc(t->nids + 1, 1);
    t->byte_val = malloc((t->nids + 1) * sizeof *t->byte_val);
    if (!t->str_off || !t->str_len || !t->special || !t->byte_val)
        return -ENOMEM;
    for (size_t k = 0; k <= t->nids; k++) {
        t->str_len[k] = UINT32_MAX;
        t->byte_val[k] = -1;
    }
    int rc = keymap_init(&t->vocab, &t->str, json_object_size(vocab));
    if (rc)
        return rc;
    void *it;
    for (it = json_object_iter(vocab); it; it = json_object_iter_next(vocab, it)) {
        size_t klen = json_object_iter_key_len(it);
        key = json_object_iter_key(it);
        int32_t id = (int32_t)json_integer_value(json_object_iter_value(it));
        if (t->str_len[id] != UINT32_MAX)
            return fail(L->err, L->errlen, -EINVAL, "model.vocab: id %d appears twice", (int)id);
        if ((rc = set_token(t, id, key, klen)))
            return rc;
        if ((rc = keymap_put(&t->vocab, t->str_off[id], (uint32_t)klen, id)))
            return rc;
    }
    return 0;
}

static int load_added(loader *L, json_t *added)
{
    mm_tokenizer *t = L->t;
    size_t n = json_array_size(added), i;
    json_t *a;
    int rc;
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added)
        return -ENOMEM;
    if ((rc = keymap_init(&t->added_map, &t->str, n)))
        return rc;
    json_array_foreach(added, i, a) {
        json_t *content = json_object_get(a, "content");
        if (!json_is_string(content) || json_string_length(content) == 0)
            return fail(L->err, L->errlen, -EINVAL, "added_tokens[%zu].content: expected a non-empty string", i);
        static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
        for (size_t k = 0; k < 3; k++)
            if (jbool(a, unsupported[k], 0))
                return fail(L->err, L->errlen, -ENOTSUP,
                            "added_tokens[%zu] (\"%.100s\"): %s is not supported", i,
                            json_string_value(content), unsupported[k]);
        mm_tok_added *ad = &t->added[t->nadded];
        char *c;
        size_t clen;
        if ((rc = jdup(content, &c, &clen)))
            return rc;
        ad->content = c;
        ad->len = clen;
        ad->id = (int32_t)json_integer_value(json_object_get(a, "id"));
        ad->special = jbool(a, "special", 0);
        t->nadded++;
        /* The added token's own content is what id_to_token reports. */
        if ((rc = set_token(t, ad->id, c, clen)))
            return rc;
        if (ad->special)
            t->special[ad->id] = 1;
        /* Two added tokens with one content would make the match ambiguous. */
        rc = keymap_put(&t->added_map, t->str_off[ad->id], (uint32_t)clen, ad->id);
        if (rc == -EEXIST)
            return fail(L->err, L->errlen, -EINVAL, "added_tokens[%zu]: content \"%.100s\" appears twice",
                        i, c);
        if (rc)
            return rc;
    }
    return 0;
}

/* Build the tries once the normalizer is known: normalized tokens are
 * matched on normalized text, so their content is normalized too. */
static int normalize(const mm_tokenizer *t, const char *s, size_t n, mm_buf *a, mm_buf *b,
                     const char **res, size_t *rlen);

static int build_tries(loader *L, json_t *added)
{
    mm_tokenizer *t = L->t;
    mm_buf a, b;
    mm_buf_init(&a, SCRATCH_MAX);
    mm_buf_init(&b, SCRATCH_MAX);
    int rc = 0;
    trie_init(&t->trie_raw);
    trie_init(&t->trie_norm);
    for (size_t i = 0; i < t->nadded && !rc; i++) {
        mm_tok_added *ad = &t->added[i];
        if (!jbool(json_array_get(added, i), "normalized", !ad->special)) {
            rc = trie_add(&t->trie_raw, ad->content, ad->len, (int32_t)i);
            continue;
        }
        const char *s;
        size_t n;
        if ((rc = normalize(t, ad->content, ad->len, &a, &b, &s, &n)))
            break;
        if (n)
            rc = trie_add(&t->trie_norm, s, n, (int32_t)i);
    }
    mm_buf_free(&a);
    mm_buf_free(&b);
    return rc;
}

static int parse_merge(loader *L, json_t *m, size_t idx, const char **a, size_t *alen,
                       const char **b, size_t *blen, int *skip)
{
    *skip = 0;
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0));
        *alen = json_string_length(json_array_get(m, 0));
        *b = json_string_value(json_array_get(m, 1));
        *blen = json_string_length(json_array_get(m, 1));
        return 0;
    }
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t n = json_string_length(m);
        if (n >= 8 && memcmp(s, "#version", 8) == 0) {
            *skip = 1;
            return 0;
        }
        /* Exactly one space, as tokenizers requires of the legacy form. */
        const char *sp = memchr(s, ' ', n);
        if (sp && !memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s))) {
            *a = s;
            *alen = (size_t)(sp - s);
            *b = sp + 1;
            *blen = n - *alen - 1;
            return 0;
        }
    }
    return fail(L->err, L->errlen, -EINVAL, "model.merges[%zu]: expected \"a b\" or [\"a\", \"b\"]", idx);
}

static int load_merges(loader *L, json_t *model)
{
    mm_tokenizer *t = L->t;
    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges))
        return fail(L->err, L->errlen, -EINVAL, "model.merges: expected an array");
    size_t n = json_array_size(merges), cap = 16;
    while (cap < n * 2 + 1)
        cap *= 2;
    t->merges.s = malloc(cap * sizeof *t->merges.s);
    if (!t->merges.s)
        return -ENOMEM;
    for (size_t i = 0; i < cap; i++)
        t->merges.s[i].id = -1;
    t->merges.mask = cap - 1;

    char *cat = NULL;
    size_t catcap = 0;
    uint32_t rank = 0;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        const char *a = NULL, *b = NULL;
        size_t alen = 0, blen = 0;
        int skip;
        if ((rc = parse_merge(L, json_array_get(merges, i), i, &a, &alen, &b, &blen, &skip)))
            break;
        if (skip)
            continue;
        int32_t ia = keymap_get(&t->vocab, a, alen), ib = keymap_get(&t->vocab, b, blen);
        if (alen + blen > catcap) {
            catcap = (alen + blen) * 2;
            char *p = realloc(cat, catcap);
            if (!p) {
                rc = -ENOMEM;
                break;
            }
            cat = p;
        }
        memcpy(cat, a, alen);
        memcpy(cat + alen, b, blen);
        int32_t im = keymap_get(&t->vocab, cat, alen + blen);
        if (ia < 0 || ib < 0 || im < 0) {
            rc = fail(L->err, L->errlen, -EINVAL, "model.merges[%zu]: \"%.*s\" + \"%.*s\" not in the vocab",
                      i, (int)(alen > 100 ? 100 : alen), a, (int)(blen > 100 ? 100 : blen), b);
            break;
        }
        merge_put(&t->merges, ia, ib, rank++, im);
    }
    free(cat);
    return rc;
}

static int load_model(loader *L, json_t *model)
{
    mm_tokenizer *t = L->t;
    const char *ty = jtype(model);
    if (!json_is_object(model))
        return fail(L->err, L->errlen, -EINVAL, "model: expected an object");
    if (ty ? strcmp(ty, "BPE") != 0 : !json_object_get(model, "merges"))
        return fail(L->err, L->errlen, -ENOTSUP, "model type '%s' is not supported (only BPE)",
                    ty ? ty : "(none)");
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) && json_number_value(dropout) != 0.0)
        return fail(L->err, L->errlen, -ENOTSUP, "model.dropout is not supported");
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t k = 0; k < 2; k++) {
        json_t *v = json_object_get(model, affixes[k]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0))
            return fail(L->err, L->errlen, -ENOTSUP, "model.%s is not supported", affixes[k]);
    }
    t->byte_fallback = jbool(model, "byte_fallback", 0);
    t->fuse_unk = jbool(model, "fuse_unk", 0);
    t->ignore_merges = jbool(model, "ignore_merges", 0);
    t->unk_id = -1;
    json_t *unk = json_object_get(model, "unk_token");
    if (json_is_string(unk)) {
        t->unk_id = keymap_get(&t->vocab, json_string_value(unk), json_string_length(unk));
        if (t->unk_id < 0)
            return fail(L->err, L->errlen, -EINVAL, "model.unk_token \"%.100s\" is not in the vocab",
                        json_string_value(unk));
    }
    int rc = load_merges(L, model);
    if (rc)
        return rc;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_tok[b] = keymap_get(&t->vocab, name, 6);
    }
    return 0;
}

static int load_normalizer(loader *L, json_t *n)
{
    mm_tokenizer *t = L->t;
    if (!n || json_is_null(n))
        return 0;
    const char *ty = jtype(n);
    if (!ty)
        return fail(L->err, L->errlen, -EINVAL, "normalizer: missing type");
    if (strcmp(ty, "Sequence") == 0) {
        json_t *list = json_object_get(n, "normalizers");
        size_t i;
        json_t *c;
        int rc;
        json_array_foreach(list, i, c)
            if ((rc = load_normalizer(L, c)))
                return rc;
        return 0;
    }
    norm_op op = {0};
    int rc = 0;
    if (strcmp(ty, "NFC") == 0) {
        op.kind = NORM_NFC;
    } else if (strcmp(ty, "Prepend") == 0) {
        json_t *p = json_object_get(n, "prepend");
        if (!json_is_string(p))
            return fail(L->err, L->errlen, -EINVAL, "normalizer Prepend: missing prepend");
        op.kind = NORM_PREPEND;
        rc = jdup(p, &op.a, &op.alen);
    } else if (strcmp(ty, "Replace") == 0) {
        json_t *c = json_object_get(n, "content");
        if (!json_is_string(c))
            return fail(L->err, L->errlen, -EINVAL, "normalizer Replace: missing content");
        op.kind = NORM_REPLACE;
        if (!(rc = string_pattern(L, n, "normalizer Replace", &op.a, &op.alen)) && op.alen == 0)
            rc = fail(L->err, L->errlen, -ENOTSUP, "normalizer Replace: empty pattern");
        if (!rc)
            rc = jdup(c, &op.b, &op.blen);
    } else {
        return fail(L->err, L->errlen, -ENOTSUP, "normalizer '%s' is not supported", ty);
    }
    if (!rc) {
        norm_op *p = realloc(t->norm, (t->nnorm + 1) * sizeof *p);
        if (!p) {
            rc = -ENOMEM;
        } else {
            t->norm = p;
            t->norm[t->nnorm++] = op;
            return 0;
        }
    }
    free(op.a);
    free(op.b);
    return rc;
}

static int add_split(loader *L, const char *pat, size_t n, int literal)
{
    mm_tokenizer *t = L->t;
    pcre2_code *re = NULL;
    int rc = regex_compile(pat, n, literal, &re, L->err, L->errlen);
    if (rc)
        return rc;
    pcre2_code **p = realloc(t->split, (t->nsplit + 1) * sizeof *p);
    if (!p) {
        pcre2_code_free(re);
        return -ENOMEM;
    }
    t->split = p;
    t->split[t->nsplit++] = re;
    return 0;
}

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretok(loader *L, json_t *p)
{
    mm_tokenizer *t = L->t;
    if (!p || json_is_null(p))
        return 0;
    const char *ty = jtype(p);
    if (!ty)
        return fail(L->err, L->errlen, -EINVAL, "pre_tokenizer: missing type");
    if (t->byte_level)
        return fail(L->err, L->errlen, -ENOTSUP,
                    "pre_tokenizer '%s' after ByteLevel is not supported", ty);
    if (strcmp(ty, "Sequence") == 0) {
        json_t *list = json_object_get(p, "pretokenizers");
        size_t i;
        json_t *c;
        int rc;
        json_array_foreach(list, i, c)
            if ((rc = load_pretok(L, c)))
                return rc;
        return 0;
    }
    if (strcmp(ty, "Split") == 0) {
        json_t *beh = json_object_get(p, "behavior");
        if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated") != 0)
            return fail(L->err, L->errlen, -ENOTSUP, "pre_tokenizer Split: behavior '%s' is not supported",
                        json_is_string(beh) ? json_string_value(beh) : "(none)");
        if (jbool(p, "invert", 0))
            return fail(L->err, L->errlen, -ENOTSUP, "pre_tokenizer Split: invert is not supported");
        json_t *pat = json_object_get(p, "pattern");
        json_t *re = json_object_get(pat, "Regex"), *s = json_object_get(pat, "String");
        if (json_is_string(re))
            return add_split(L, json_string_value(re), json_string_length(re), 0);
        if (json_is_string(s) && json_string_length(s))
            return add_split(L, json_string_value(s), json_string_length(s), 1);
        return fail(L->err, L->errlen, -EINVAL, "pre_tokenizer Split: missing pattern");
    }
    if (strcmp(ty, "ByteLevel") == 0) {
        if (jbool(p, "add_prefix_space", 1))
            return fail(L->err, L->errlen, -ENOTSUP,
                        "pre_tokenizer ByteLevel: add_prefix_space is not supported");
        int rc = 0;
        if (jbool(p, "use_regex", 1))
            rc = add_split(L, GPT2_PATTERN, sizeof GPT2_PATTERN - 1, 0);
        t->byte_level = 1;
        return rc;
    }
    return fail(L->err, L->errlen, -ENOTSUP, "pre_tokenizer '%s' is not supported", ty);
}

static int push_ids(int32_t **v, size_t *n, const int32_t *src, size_t k, int front)
{
    if (k == 0)
        return 0;
    int32_t *p = realloc(*v, (*n + k + 1) * sizeof *p);
    if (!p)
        return -ENOMEM;
    if (front) {
        memmove(p + k, p, *n * sizeof *p);
        memcpy(p, src, k * sizeof *p);
    } else {
        memcpy(p + *n, src, k * sizeof *p);
    }
    *v = p;
    *n += k;
    return 0;
}

static int load_template(loader *L, json_t *p)
{
    mm_tokenizer *t = L->t;
    json_t *single = json_object_get(p, "single"), *specials = json_object_get(p, "special_tokens");
    if (!json_is_array(single))
        return fail(L->err, L->errlen, -EINVAL, "post_processor TemplateProcessing: missing single");
    int32_t *pre = NULL, *suf = NULL;
    size_t npre = 0, nsuf = 0, i;
    int seen_a = 0, rc = 0;
    json_t *item;
    json_array_foreach(single, i, item) {
        json_t *sp = json_object_get(item, "SpecialToken"), *sq = json_object_get(item, "Sequence");
        if (sq) {
            json_t *id = json_object_get(sq, "id");
            if (seen_a || !json_is_string(id) || strcmp(json_string_value(id), "A") != 0) {
                rc = fail(L->err, L->errlen, -ENOTSUP,
                          "post_processor TemplateProcessing: single must hold sequence A once");
                break;
            }
            seen_a = 1;
            continue;
        }
        json_t *name = json_object_get(sp, "id");
        json_t *ids = json_object_get(json_object_get(specials, json_string_value(name) ?
                                                      json_string_value(name) : ""), "ids");
        if (!json_is_string(name) || !json_is_array(ids)) {
            rc = fail(L->err, L->errlen, -EINVAL,
                      "post_processor TemplateProcessing: single[%zu] names no known special token", i);
            break;
        }
        size_t k;
        json_t *idv;
        json_array_foreach(ids, k, idv) {
            json_int_t id = json_integer_value(idv);
            if (!json_is_integer(idv) || id < 0 || (size_t)id >= t->nids) {
                rc = fail(L->err, L->errlen, -EINVAL,
                          "post_processor TemplateProcessing: bad id for \"%.100s\"", json_string_value(name));
                break;
            }
            int32_t v32 = (int32_t)id;
            if ((rc = push_ids(seen_a ? &suf : &pre, seen_a ? &nsuf : &npre, &v32, 1, 0)))
                break;
        }
        if (rc)
            break;
    }
    if (!rc && !seen_a)
        rc = fail(L->err, L->errlen, -EINVAL, "post_processor TemplateProcessing: single lacks sequence A");
    /* A later processor wraps what the earlier ones produced. */
    if (!rc)
        rc = push_ids(&t->prefix, &t->nprefix, pre, npre, 1);
    if (!rc)
        rc = push_ids(&t->suffix, &t->nsuffix, suf, nsuf, 0);
    free(pre);
    free(suf);
    return rc;
}

static int load_post(loader *L, json_t *p)
{
    if (!p || json_is_null(p))
        return 0;
    const char *ty = jtype(p);
    if (!ty)
        return fail(L->err, L->errlen, -EINVAL, "post_processor: missing type");
    if (strcmp(ty, "Sequence") == 0) {
        json_t *list = json_object_get(p, "processors");
        size_t i;
        json_t *c;
        int rc;
        json_array_foreach(list, i, c)
            if ((rc = load_post(L, c)))
                return rc;
        return 0;
    }
    if (strcmp(ty, "ByteLevel") == 0)
        return 0; /* only adjusts offsets */
    if (strcmp(ty, "TemplateProcessing") == 0)
        return load_template(L, p);
    return fail(L->err, L->errlen, -ENOTSUP, "post_processor '%s' is not supported", ty);
}

static int add_dec_step(dec_step **v, size_t *n, const dec_step *s)
{
    dec_step *p = realloc(*v, (*n + 1) * sizeof *p);
    if (!p)
        return -ENOMEM;
    *v = p;
    p[(*n)++] = *s;
    return 0;
}

static int load_decoder(loader *L, json_t *d, int *joined)
{
    mm_tokenizer *t = L->t;
    const char *ty = jtype(d);
    if (!ty)
        return fail(L->err, L->errlen, -EINVAL, "decoder: missing type");
    if (strcmp(ty, "Sequence") == 0) {
        json_t *list = json_object_get(d, "decoders");
        size_t i;
        json_t *c;
        int rc;
        json_array_foreach(list, i, c)
            if ((rc = load_decoder(L, c, joined)))
                return rc;
        return 0;
    }
    if (*joined && strcmp(ty, "Strip") != 0)
        return fail(L->err, L->errlen, -ENOTSUP,
                    "decoder '%s' after Fuse/ByteLevel is not supported", ty);
    dec_step s = {0};
    int rc = 0;
    if (strcmp(ty, "ByteLevel") == 0) {
        t->join = JOIN_BYTELEVEL;
        *joined = 1;
        return 0;
    }
    if (strcmp(ty, "Fuse") == 0) {
        t->join = JOIN_CONCAT;
        *joined = 1;
        return 0;
    }
    if (strcmp(ty, "ByteFallback") == 0) {
        if (t->has_bf)
            return fail(L->err, L->errlen, -ENOTSUP, "decoder ByteFallback twice is not supported");
        t->has_bf = 1;
        return 0;
    }
    if (strcmp(ty, "Replace") == 0) {
        json_t *c = json_object_get(d, "content");
        if (!json_is_string(c))
            return fail(L->err, L->errlen, -EINVAL, "decoder Replace: missing content");
        s.kind = DEC_REPLACE;
        if (!(rc = string_pattern(L, d, "decoder Replace", &s.a, &s.alen)) && s.alen == 0)
            rc = fail(L->err, L->errlen, -ENOTSUP, "decoder Replace: empty pattern");
        if (!rc)
            rc = jdup(c, &s.b, &s.blen);
    } else if (strcmp(ty, "Strip") == 0) {
        json_t *c = json_object_get(d, "content"), *st = json_object_get(d, "start"),
               *sp = json_object_get(d, "stop");
        uint32_t cp;
        if (!json_is_string(c) || !json_is_integer(st) || !json_is_integer(sp) ||
            json_integer_value(st) < 0 || json_integer_value(sp) < 0 ||
            json_integer_value(st) > 1 << 20 || json_integer_value(sp) > 1 << 20 ||
            mm_utf8_decode(json_string_value(c), json_string_length(c), &cp) != json_string_length(c))
            return fail(L->err, L->errlen, -EINVAL, "decoder Strip: expected one content char, start, stop");
        s.kind = DEC_STRIP;
        s.clen = json_string_length(c);
        memcpy(s.c, json_string_value(c), s.clen);
        s.start = (size_t)json_integer_value(st);
        s.stop = (size_t)json_integer_value(sp);
        if (*joined) {
            if (t->has_post)
                return fail(L->err, L->errlen, -ENOTSUP, "decoder: two Strip steps after Fuse are not supported");
            t->post = s;
            t->has_post = 1;
            return 0;
        }
    } else {
        return fail(L->err, L->errlen, -ENOTSUP, "decoder '%s' is not supported", ty);
    }
    if (!rc)
        rc = t->has_bf ? add_dec_step(&t->mid, &t->nmid, &s) : add_dec_step(&t->pre, &t->npre, &s);
    if (rc) {
        free(s.a);
        free(s.b);
    }
    return rc;
}

/* Per-id tables that depend on the byte-level decision. */
static int finish_tables(loader *L)
{
    mm_tokenizer *t = L->t;
    int rc = 0;
    for (size_t id = 0; id < t->nids; id++) {
        const char *s = t->str.p + t->str_off[id];
        if (t->str_len[id] == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>') {
            char *end;
            long v = strtol(s + 3, &end, 16);
            if (end == s + 5 && v >= 0 && v <= 255)
                t->byte_val[id] = (int16_t)v;
        }
    }
    if (t->join == JOIN_BYTELEVEL) {
        t->raw_off = malloc(t->nids * sizeof *t->raw_off);
        t->raw_len = malloc(t->nids * sizeof *t->raw_len);
        if (!t->raw_off || !t->raw_len)
            return -ENOMEM;
        char *tmp = malloc(1 << 16);
        if (!tmp)
            return -ENOMEM;
        rc = 0;
        for (size_t id = 0; id < t->nids && !rc; id++) {
            t->raw_len[id] = UINT32_MAX;
            if (t->str_len[id] == UINT32_MAX)
                continue;
            const char *s = t->str.p + t->str_off[id];
            size_t n = t->str_len[id], rl;
            if (n > 1 << 16 || !byte_unmap(t->inv, s, n, tmp, &rl)) {
                rl = n;
                rc = arena_add(&t->raw, s, n, &t->raw_off[id]);
            } else {
                rc = arena_add(&t->raw, tmp, rl, &t->raw_off[id]);
            }
            t->raw_len[id] = (uint32_t)rl;
        }
        free(tmp);
        if (rc)
            return rc;
    }
    if (!t->byte_level) {
        /* Words are split into characters and looked up one by one; a
         * direct table spares the hashing for the BMP. */
        t->char_id = malloc(0x10000 * sizeof *t->char_id);
        if (!t->char_id)
            return -ENOMEM;
        for (uint32_t cp = 0; cp < 0x10000; cp++) {
            char u[4];
            size_t ul = mm_utf8_encode(cp, u);
            t->char_id[cp] = ul ? keymap_get(&t->vocab, u, ul) : -1;
        }
        for (size_t i = 0; i <= t->vocab.mask && !rc; i++) {
            const kslot *e = &t->vocab.s[i];
            if (e->id < 0)
                continue;
            const char *s = t->str.p + e->off;
            uint32_t prev = 0, cp;
            for (size_t k = 0, l; k < e->len && !rc; k += l, prev = cp) {
                if (!(l = mm_utf8_decode(s + k, e->len - k, &cp)))
                    break; /* not UTF-8: cannot match text, no pair needed */
                if (k)
                    rc = pairset_add(&t->pairs, prev, cp);
            }
        }
        if (rc)
            return rc;
    }
    if (t->byte_level) {
        /* BPE on raw bytes: key the model vocab by raw bytes. Tokens holding a
         * character outside the byte map can never match a byte-level word. */
        if ((rc = keymap_init(&t->vocab_raw, &t->raw, t->vocab.n)))
            return rc;
        char *tmp = malloc(1 << 16);
        if (!tmp)
            return -ENOMEM;
        for (size_t i = 0; i <= t->vocab.mask && !rc; i++) {
            const kslot *e = &t->vocab.s[i];
            size_t rl;
            uint32_t off;
            if (e->id < 0 || e->len > 1 << 16 || !byte_unmap(t->inv, t->str.p + e->off, e->len, tmp, &rl))
                continue;
            if (!(rc = arena_add(&t->raw, tmp, rl, &off))) {
                rc = keymap_put(&t->vocab_raw, off, (uint32_t)rl, e->id);
                if (rc == -EEXIST)
                    rc = 0;
            }
        }
        free(tmp);
        if (rc)
            return rc;
        for (int b = 0; b < 256; b++) {
            char u[4];
            size_t ul = mm_utf8_encode(t->fwd[b], u);
            t->unit_id[b] = keymap_get(&t->vocab, u, ul);
            t->unit_nfb[b] = 0;
            if (t->byte_fallback && t->byte_tok[(unsigned char)u[0]] >= 0 &&
                (ul == 1 || t->byte_tok[(unsigned char)u[1]] >= 0)) {
                for (size_t k = 0; k < ul; k++)
                    t->unit_fb[b][k] = t->byte_tok[(unsigned char)u[k]];
                t->unit_nfb[b] = (uint8_t)ul;
            }
        }
    }
    return 0;
}

int mm_tokenizer_load(const char *path, mm_tokenizer **out, char *err, size_t errlen)
{
    int rc;
    json_t *root = NULL;
    loader L = {.err = err, .errlen = errlen};
    *out = NULL;
    if (err && errlen)
        err[0] = '\0';

    FILE *f = fopen(path, "rb");
    if (!f) {
        rc = -errno;
        return fail(err, errlen, rc, "%s: %s", path, strerror(-rc));
    }
    json_error_t jerr;
    root = json_loadf(f, JSON_ALLOW_NUL, &jerr);
    fclose(f);
    if (!root)
        return fail(err, errlen, -EINVAL, "%s: line %d: %s", path, jerr.line, jerr.text);

    mm_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return -ENOMEM;
    }
    L.t = t;
    pthread_mutex_init(&t->lock, NULL);
    byte_map(t->fwd, t->inv);
    /* tokenizers joins with spaces when there is no decoder, and with
     * nothing when the decoder chain ends without Fuse/ByteLevel. */
    json_t *dec = json_object_get(root, "decoder");
    t->join = dec && !json_is_null(dec) ? JOIN_CONCAT : JOIN_SPACE;

    if (!json_is_object(root)) {
        rc = fail(err, errlen, -EINVAL, "%s: expected a JSON object", path);
        goto fail_t;
    }
    static const char *const unsupported[] = {"truncation", "padding"};
    for (size_t k = 0; k < 2; k++) {
        json_t *v = json_object_get(root, unsupported[k]);
        if (v && !json_is_null(v)) {
            rc = fail(err, errlen, -ENOTSUP, "%s is not supported", unsupported[k]);
            goto fail_t;
        }
    }
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added)) {
        rc = fail(err, errlen, -EINVAL, "added_tokens: expected an array");
        goto fail_t;
    }
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        rc = fail(err, errlen, -EINVAL, "model: expected an object");
        goto fail_t;
    }
    /* Refuse an unsupported model type before reading its vocab. */
    const char *mty = jtype(model);
    if (mty && strcmp(mty, "BPE") != 0) {
        rc = fail(err, errlen, -ENOTSUP, "model type '%s' is not supported (only BPE)", mty);
        goto fail_t;
    }
    int joined = 0;
    if ((rc = load_vocab(&L, model, added)) || (rc = load_added(&L, added)) ||
        (rc = load_model(&L, model)) ||
        (rc = load_normalizer(&L, json_object_get(root, "normalizer"))) ||
        (rc = load_pretok(&L, json_object_get(root, "pre_tokenizer"))) ||
        (rc = load_post(&L, json_object_get(root, "post_processor"))) ||
        (t->join != JOIN_SPACE && (rc = load_decoder(&L, dec, &joined))) ||
        (rc = build_tries(&L, added)) || (rc = finish_tables(&L)))
        goto fail_t;
    t->cache = calloc(CACHE_SLOTS, sizeof *t->cache);
    if (!t->cache) {
        rc = -ENOMEM;
        goto fail_t;
    }
    json_decref(root);
    *out = t;
    return 0;

fail_t:
    if (err && errlen) {
        /* Name the file in front of whatever the component said. */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", err[0] ? err : strerror(-rc));
        fail(err, errlen, rc, "%s: %s", path, msg);
    }
    json_decref(root);
    mm_tokenizer_free(t);
    return rc;
}

void mm_tokenizer_free(mm_tokenizer *t)
{
    if (!t)
        return;
    free(t->str.p);
    free(t->raw.p);
    free(t->str_off);
    free(t->str_len);
    free(t->raw_off);
    free(t->raw_len);
    free(t->byte_val);
    free(t->special);
    free(t->vocab.s);
    free(t->vocab_raw.s);
    free(t->added_map.s);
    free(t->merges.s);
    free(t->pairs.s);
    free(t->char_id);
    for (size_t i = 0; i < t->nadded; i++)
        free((char *)t->added[i].content);
    free(t->added);
    trie_free(&t->trie_raw);
    trie_free(&t->trie_norm);
    for (size_t i = 0; i < t->nnorm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    free(t->norm);
    for (size_t i = 0; i < t->nsplit; i++)
        pcre2_code_free(t->split[i]);
    free(t->split);
    free(t->prefix);
    free(t->suffix);
    for (size_t i = 0; i < t->npre; i++) {
        free(t->pre[i].a);
        free(t->pre[i].b);
    }
    for (size_t i = 0; i < t->nmid; i++) {
        free(t->mid[i].a);
        free(t->mid[i].b);
    }
    free(t->pre);
    free(t->mid);
    if (t->cache)
        for (size_t i = 0; i < CACHE_SLOTS; i++)
            free(t->cache[i].mem);
    free(t->cache);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* ---- normalizer ----------------------------------------------------------------- */

/* Replace every non-overlapping occurrence of pat, left to right. */
static int replace_all(const char *s, size_t n, const char *pat, size_t plen, const char *with,
                       size_t wlen, mm_buf *out)
{
    size_t i = 0, last = 0;
    int rc = 0;
    while (i + plen <= n && !rc) {
        const char *hit = memmem(s + i, n - i, pat, plen);
        if (!hit)
            break;
        size_t at = (size_t)(hit - s);
        if (!(rc = mm_buf_append(out, s + last, at - last)))
            rc = mm_buf_append(out, with, wlen);
        i = last = at + plen;
    }
    if (!rc)
        rc = mm_buf_append(out, s + last, n - last);
    return rc;
}

/* Run the normalizer chain; *res points into a or b (or at s when there is
 * nothing to do). */
static int normalize(const mm_tokenizer *t, const char *s, size_t n, mm_buf *a, mm_buf *b,
                     const char **res, size_t *rlen)
{
    const char *cur = s;
    size_t curn = n;
    mm_buf *dst = a;
    for (size_t i = 0; i < t->nnorm; i++) {
        const norm_op *op = &t->norm[i];
        int rc = 0;
        mm_buf_reset(dst);
        switch (op->kind) {
        case NORM_NFC:
            rc = mm_unicode_nfc_version(cur, curn, TOKENIZERS_NFC_UNICODE, dst);
            break;
        case NORM_PREPEND:
            if (curn && !(rc = mm_buf_append(dst, op->a, op->alen)))
                rc = mm_buf_append(dst, cur, curn);
            break;
        case NORM_REPLACE:
            rc = replace_all(cur, curn, op->a, op->alen, op->b, op->blen, dst);
            break;
        }
        if (rc)
            return rc;
        cur = dst->data ? dst->data : "";
        curn = dst->len;
        dst = dst == a ? b : a;
    }
    *res = cur;
    *rlen = curn;
    return 0;
}

/* ---- encoding ------------------------------------------------------------------------ */

typedef struct sym {
    int32_t id, prev, next;
    int     alive;
} sym;

typedef struct hent {
    uint32_t rank, pos;
    int32_t  id;
} hent;

typedef struct enc {
    const mm_tokenizer *t;
    mm_tok_ids   *ids;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    mm_buf        na, nb;
    sym          *sym;
    size_t        sym_cap;
    hent         *heap;
    size_t        heap_n, heap_cap;
    int32_t      *tmp_ids;
    size_t        tmp_cap;
    char         *err;
    size_t        errlen;
} enc;

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : 64;
    while (ncap < need)
        ncap *= 2;
    void *q = realloc(*p, ncap * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = ncap;
    return 0;
}

static int hent_less(const hent *a, const hent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int heap_push(enc *e, hent h)
{
    int rc = grow((void **)&e->heap, &e->heap_cap, e->heap_n + 1, sizeof *e->heap);
    if (rc)
        return rc;
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!hent_less(&h, &e->heap[p]))
            break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = h;
    return 0;
}

static hent heap_pop(enc *e)
{
    hent top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && hent_less(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!hent_less(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

static int sym_add(enc *e, size_t *n, int32_t id)
{
    int rc = grow((void **)&e->sym, &e->sym_cap, *n + 1, sizeof *e->sym);
    if (rc)
        return rc;
    e->sym[*n] = (sym){.id = id, .prev = (int32_t)*n - 1, .next = (int32_t)*n + 1, .alive = 1};
    (*n)++;
    return 0;
}

/* Plain mode: the id of the one-character token w[0..l) holding cp, or -1. */
static int32_t char_token(const mm_tokenizer *t, const char *w, size_t l, uint32_t cp)
{
    return cp < 0x10000 ? t->char_id[cp] : keymap_get(&t->vocab, w, l);
}

/* Initial symbols of a word, the way tokenizers builds them: each unit (a
 * byte in byte-level mode, a character otherwise) is its vocab id, else its
 * <0xNN> tokens with byte_fallback, else unk (fused when fuse_unk). A pending
 * unk is emitted only by a later in-vocab unit or the end of the word. */
static int word_symbols(enc *e, const char *w, size_t n, size_t *nsym)
{
    const mm_tokenizer *t = e->t;
    int32_t unk = -1;
    size_t i = 0;
    int rc = 0;
    *nsym = 0;
    while (i < n && !rc) {
        int32_t id;
        int32_t fb[4];
        size_t nfb = 0, l;
        if (t->byte_level) {
            unsigned char b = (unsigned char)w[i];
            l = 1;
            id = t->unit_id[b];
            if (id < 0 && t->unit_nfb[b]) {
                nfb = t->unit_nfb[b];
                memcpy(fb, t->unit_fb[b], nfb * sizeof *fb);
            }
        } else {
            uint32_t cp;
            l = mm_utf8_decode(w + i, n - i, &cp);
            if (!l)
                return -EILSEQ;
            id = char_token(t, w + i, l, cp);
            if (id < 0 && t->byte_fallback) {
                for (nfb = 0; nfb < l && t->byte_tok[(unsigned char)w[i + nfb]] >= 0; nfb++)
                    fb[nfb] = t->byte_tok[(unsigned char)w[i + nfb]];
                if (nfb < l)
                    nfb = 0;
            }
        }
        i += l;
        if (id >= 0) {
            if (unk >= 0 && !(rc = sym_add(e, nsym, unk)))
                unk = -1;
            if (!rc)
                rc = sym_add(e, nsym, id);
        } else if (nfb) {
            for (size_t k = 0; k < nfb && !rc; k++)
                rc = sym_add(e, nsym, fb[k]);
        } else if (t->unk_id >= 0) {
            if (unk >= 0 && !t->fuse_unk)
                rc = sym_add(e, nsym, unk);
            unk = t->unk_id;
        }
    }
    if (!rc && unk >= 0)
        rc = sym_add(e, nsym, unk);
    if (!rc && *nsym)
        e->sym[*nsym - 1].next = -1;
    return rc;
}

/* Apply merges lowest rank first (leftmost among equals), as tokenizers'
 * Word::merge_all does; stale queue entries are skipped on pop. */
static int merge_all(enc *e, size_t n)
{
    const mergemap *mm = &e->t->merges;
    e->heap_n = 0;
    int rc;
    for (size_t i = 0; i + 1 < n; i++) {
        const mslot *m = merge_get(mm, e->sym[i].id, e->sym[i + 1].id);
        if (m && (rc = heap_push(e, (hent){m->rank, (uint32_t)i, m->id})))
            return rc;
    }
    while (e->heap_n) {
        hent top = heap_pop(e);
        sym *s = &e->sym[top.pos];
        if (!s->alive || s->next < 0)
            continue;
        sym *r = &e->sym[s->next];
        const mslot *m = merge_get(mm, s->id, r->id);
        if (!m || m->id != top.id)
            continue;
        s->id = top.id;
        r->alive = 0;
        s->next = r->next;
        if (s->next >= 0)
            e->sym[s->next].prev = (int32_t)top.pos;
        if (s->prev >= 0 && (m = merge_get(mm, e->sym[s->prev].id, s->id)) &&
            (rc = heap_push(e, (hent){m->rank, (uint32_t)s->prev, m->id})))
            return rc;
        if (s->next >= 0 && (m = merge_get(mm, s->id, e->sym[s->next].id)) &&
            (rc = heap_push(e, (hent){m->rank, top.pos, m->id})))
            return rc;
    }
    return 0;
}

static int cache_get(enc *e, const char *w, size_t n, uint64_t h, size_t *nids)
{
    mm_tokenizer *t = (mm_tokenizer *)e->t;
    int hit = 0;
    pthread_mutex_lock(&t->lock);
    centry *c = &t->cache[h & (CACHE_SLOTS - 1)];
    if (c->mem && c->hash == h && c->klen == n && memcmp(c->mem, w, n) == 0 &&
        !grow((void **)&e->tmp_ids, &e->tmp_cap, c->nids, sizeof *e->tmp_ids)) {
        memcpy(e->tmp_ids, c->mem + n, c->nids * sizeof *e->tmp_ids);
        *nids = c->nids;
        hit = 1;
    }
    pthread_mutex_unlock(&t->lock);
    return hit;
}

static void cache_put(enc *e, const char *w, size_t n, uint64_t h, const int32_t *ids, size_t k)
{
    mm_tokenizer *t = (mm_tokenizer *)e->t;
    char *mem = malloc(n + k * sizeof *ids);
    if (!mem)
        return; /* the cache is only an optimisation */
    memcpy(mem, w, n);
    memcpy(mem + n, ids, k * sizeof *ids);
    pthread_mutex_lock(&t->lock);
    centry *c = &t->cache[h & (CACHE_SLOTS - 1)];
    char *old = c->mem;
    *c = (centry){.hash = h, .klen = (uint32_t)n, .nids = (uint32_t)k, .mem = mem};
    pthread_mutex_unlock(&t->lock);
    free(old);
}

static int emit_ids(enc *e, const int32_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int rc = mm_tok_ids_push(e->ids, v[i]);
        if (rc)
            return rc;
    }
    return 0;
}

static int bpe_chunk(enc *e, const char *w, size_t n)
{
    int rc;
    uint64_t h = 0;
    size_t k;
    if (n < CACHE_WORD_MAX) {
        h = hash_bytes(w, n);
        if (cache_get(e, w, n, h, &k))
            return emit_ids(e, e->tmp_ids, k);
    }
    size_t nsym;
    if ((rc = word_symbols(e, w, n, &nsym)))
        return rc;
    if ((rc = merge_all(e, nsym)))
        return rc;
    if ((rc = grow((void **)&e->tmp_ids, &e->tmp_cap, nsym, sizeof *e->tmp_ids)))
        return rc;
    k = 0;
    for (int32_t i = nsym ? 0 : -1; i >= 0; i = e->sym[i].next)
        e->tmp_ids[k++] = e->sym[i].id;
    if (n < CACHE_WORD_MAX)
        cache_put(e, w, n, h, e->tmp_ids, k);
    return emit_ids(e, e->tmp_ids, k);
}

/* Without a pre-tokenizer (SentencePiece-style files) a whole text is one
 * word. It is cut between two in-vocab characters that are adjacent in no
 * vocab token: a merge there would create a token holding that pair, so
 * none exists, merges on either side never interact, and the pieces give
 * exactly the ids of the whole (and can use the word cache). */
static int bpe_word(enc *e, const char *w, size_t n)
{
    const mm_tokenizer *t = e->t;
    const keymap *vm = t->byte_level ? &t->vocab_raw : &t->vocab;
    if (n == 0)
        return 0;
    if (t->byte_level && n == 1 && t->unit_id[(unsigned char)w[0]] >= 0)
        return mm_tok_ids_push(e->ids, t->unit_id[(unsigned char)w[0]]);
    if (t->ignore_merges) {
        int32_t id = keymap_get(vm, w, n);
        if (id >= 0)
            return mm_tok_ids_push(e->ids, id);
    }
    if (t->byte_level || n <= CHUNK_MIN)
        return bpe_chunk(e, w, n);
    size_t start = 0, i = 0;
    uint32_t prev = 0;
    int prev_known = 0, rc;
    while (i < n) {
        uint32_t cp;
        size_t l = mm_utf8_decode(w + i, n - i, &cp);
        if (!l)
            return -EILSEQ;
        int known = char_token(t, w + i, l, cp) >= 0;
        if (i > start && known && prev_known && !pairset_has(&t->pairs, prev, cp)) {
            if ((rc = bpe_chunk(e, w + start, i - start)))
                return rc;
            start = i;
        }
        prev = cp;
        prev_known = known;
        i += l;
    }
    return bpe_chunk(e, w + start, n - start);
}

static int regex_match(enc *e, pcre2_code *re, const char *s, size_t n, size_t start)
{
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !e->jit) {
        e->mctx = pcre2_match_context_create(NULL);
        e->jit = pcre2_jit_stack_create(32 << 10, JIT_STACK_MAX, NULL);
        if (!e->mctx || !e->jit)
            return fail(e->err, e->errlen, -ENOMEM, "out of memory");
        pcre2_jit_stack_assign(e->mctx, NULL, e->jit);
        rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    }
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return fail(e->err, e->errlen, -EIO, "pre-tokenizer regex: %s", (char *)msg);
    }
    return 1;
}

/* Split s by pre-tokenizer regex `level` (Isolated: matches and the gaps
 * between them are separate pieces, empty ones dropped), then recurse into
 * the next regex; past the last one each piece is a BPE word. */
static int pretok(enc *e, const char *s, size_t n, size_t level)
{
    if (n == 0)
        return 0;
    if (level == e->t->nsplit)
        return bpe_word(e, s, n);
    pcre2_code *re = e->t->split[level];
    size_t prev = 0, start = 0;
    int rc;
    while (start <= n) {
        if ((rc = regex_match(e, re, s, n, start)) <= 0) {
            if (rc < 0)
                return rc;
            break;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > prev && (rc = pretok(e, s + prev, ms - prev, level + 1)))
            return rc;
        if (me > ms && (rc = pretok(e, s + ms, me - ms, level + 1)))
            return rc;
        prev = me > prev ? me : prev;
        if (me > ms) {
            start = me;
        } else {
            /* An empty match: step over one character. */
            if (ms >= n)
                break;
            uint32_t cp;
            size_t l = mm_utf8_decode(s + ms, n - ms, &cp);
            start = ms + (l ? l : 1);
        }
    }
    return pretok(e, s + prev, n - prev, level + 1);
}

/* Split s by an added-token trie; gaps go to fn, matches become ids. */
static int split_added(enc *e, const trie *tr, const char *s, size_t n,
                       int (*fn)(enc *, const char *, size_t))
{
    size_t i = 0, last = 0;
    int rc;
    if (!tr->empty) {
        while (i < n) {
            size_t mlen = 0;
            int k = tr->root[(unsigned char)s[i]] >= 0 ? trie_longest(tr, s + i, n - i, &mlen) : -1;
            if (k < 0) {
                i++;
                continue;
            }
            if (i > last && (rc = fn(e, s + last, i - last)))
                return rc;
            if ((rc = mm_tok_ids_push(e->ids, e->t->added[k].id)))
                return rc;
            i += mlen;
            last = i;
        }
    }
    return n > last ? fn(e, s + last, n - last) : 0;
}

static int pretok_piece(enc *e, const char *s, size_t n)
{
    return pretok(e, s, n, 0);
}

/* A gap between raw added tokens: normalize it, then split out the
 * normalized added tokens. The normalized text lives in na/nb; pieces of it
 * are consumed before the next gap reuses them. */
static int normalize_piece(enc *e, const char *s, size_t n)
{
    const char *ns;
    size_t nn;
    int rc = normalize(e->t, s, n, &e->na, &e->nb, &ns, &nn);
    if (rc == -EILSEQ)
        return fail(e->err, e->errlen, rc, "input is not valid UTF-8");
    if (rc)
        return rc;
    return split_added(e, &e->t->trie_norm, ns, nn, pretok_piece);
}

int mm_tokenizer_encode(const mm_tokenizer *t, const char *text, size_t len,
                        int add_special_tokens, mm_tok_ids *ids, char *err, size_t errlen)
{
    enc e = {.t = t, .ids = ids, .err = err, .errlen = errlen};
    size_t orig = ids->n;
    int rc;
    if (!mm_utf8_valid(text, len))
        return fail(err, errlen, -EILSEQ, "input is not valid UTF-8");
    mm_buf_init(&e.na, SCRATCH_MAX);
    mm_buf_init(&e.nb, SCRATCH_MAX);
    if (t->nsplit) {
        uint32_t pairs = 0;
        for (size_t i = 0; i < t->nsplit; i++) {
            uint32_t c;
            pcre2_pattern_info(t->split[i], PCRE2_INFO_CAPTURECOUNT, &c);
            if (c > pairs)
                pairs = c;
        }
        e.md = pcre2_match_data_create(pairs + 1, NULL);
        if (!e.md) {
            rc = -ENOMEM;
            goto out;
        }
    }
    if (add_special_tokens && (rc = emit_ids(&e, t->prefix, t->nprefix)))
        goto out;
    if ((rc = split_added(&e, &t->trie_raw, text, len, normalize_piece)))
        goto out;
    if (add_special_tokens)
        rc = emit_ids(&e, t->suffix, t->nsuffix);
out:
    if (rc == -E2BIG)
        fail(err, errlen, rc, "more than %zu tokens", ids->max);
    else if (rc == -ENOMEM)
        fail(err, errlen, rc, "out of memory");
    if (rc)
        ids->n = orig;
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_jit_stack_free(e.jit);
    mm_buf_free(&e.na);
    mm_buf_free(&e.nb);
    free(e.sym);
    free(e.heap);
    free(e.tmp_ids);
    return rc;
}

/* ---- decoding ------------------------------------------------------------------------ */

static const char FFFD[] = "\xEF\xBF\xBD";

void mm_tok_stream_init(mm_tok_stream *s, const mm_tokenizer *tok, int skip_special_tokens)
{
    memset(s, 0, sizeof *s);
    s->tok = tok;
    s->skip_special = skip_special_tokens;
    s->lead_left = tok->has_post ? tok->post.start : 0;
    mm_buf_init(&s->run, RUN_MAX);
    mm_buf_init(&s->t1, SCRATCH_MAX);
    mm_buf_init(&s->t2, SCRATCH_MAX);
}

void mm_tok_stream_free(mm_tok_stream *s)
{
    mm_buf_free(&s->run);
    mm_buf_free(&s->t1);
    mm_buf_free(&s->t2);
}

/* Final stage: the Strip that follows Fuse/ByteLevel, on the joined text.
 * Leading content characters are dropped while allowed; trailing ones are
 * held back, since only the end of the stream says whether they trail. */
static int emit_final(mm_tok_stream *s, const char *p, size_t n, mm_buf *out)
{
    const mm_tokenizer *t = s->tok;
    if (!t->has_post)
        return mm_buf_append(out, p, n);
    const dec_step *st = &t->post;
    size_t i = 0;
    int rc = 0;
    while (!s->lead_done && i < n) {
        if (s->lead_left > 0 && n - i >= st->clen && memcmp(p + i, st->c, st->clen) == 0) {
            s->lead_left--;
            i += st->clen;
        } else {
            s->lead_done = 1;
        }
    }
    if (st->stop == 0)
        return mm_buf_append(out, p + i, n - i);
    while (i < n && !rc) {
        if (n - i >= st->clen && memcmp(p + i, st->c, st->clen) == 0) {
            if (s->held < st->stop)
                s->held++;
            else
                rc = mm_buf_append(out, st->c, st->clen);
            i += st->clen;
            continue;
        }
        for (; s->held && !rc; s->held--)
            rc = mm_buf_append(out, st->c, st->clen);
        uint32_t cp;
        size_t l = mm_utf8_decode(p + i, n - i, &cp);
        if (!l)
            l = 1;
        if (!rc)
            rc = mm_buf_append(out, p + i, l);
        i += l;
    }
    return rc;
}

/* Expected range of continuation byte k (1-based) after lead byte c. */
static int utf8_cont_ok(unsigned char c, size_t k, unsigned char b)
{
    if (k == 1) {
        if (c == 0xE0)
            return b >= 0xA0 && b <= 0xBF;
        if (c == 0xED)
            return b >= 0x80 && b <= 0x9F;
        if (c == 0xF0)
            return b >= 0x90 && b <= 0xBF;
        if (c == 0xF4)
            return b >= 0x80 && b <= 0x8F;
    }
    return b >= 0x80 && b <= 0xBF;
}

static size_t utf8_need(unsigned char c)
{
    if (c >= 0xC2 && c <= 0xDF)
        return 2;
    if (c >= 0xE0 && c <= 0xEF)
        return 3;
    if (c >= 0xF0 && c <= 0xF4)
        return 4;
    return 0;
}

/* Lossy UTF-8 over a byte stream, equal to decoding the whole stream with
 * U+FFFD for each maximal invalid subpart (Rust's from_utf8_lossy): complete
 * characters go out, an unfinished one waits in pend. Valid runs go straight
 * from p to the final stage, so no scratch buffer is involved. */
static int utf8_feed(mm_tok_stream *s, const char *p, size_t n, mm_buf *out)
{
    size_t i = 0;
    int rc = 0;
    while (i < n && !rc) {
        unsigned char b = (unsigned char)p[i];
        if (s->npend) {
            if (utf8_cont_ok(s->pend[0], s->npend, b)) {
                s->pend[s->npend++] = b;
                i++;
                if (s->npend == utf8_need(s->pend[0])) {
                    rc = emit_final(s, (const char *)s->pend, s->npend, out);
                    s->npend = 0;
                }
            } else {
                /* The byte that breaks the sequence starts over on its own. */
                rc = emit_final(s, FFFD, 3, out);
                s->npend = 0;
            }
            continue;
        }
        size_t j = i;
        for (;;) {
            uint32_t cp;
            size_t l = j < n && (unsigned char)p[j] < 0x80 ? 1 : mm_utf8_decode(p + j, n - j, &cp);
            if (!l || j >= n)
                break;
            j += l;
        }
        if (j > i) {
            rc = emit_final(s, p + i, j - i, out);
            i = j;
        } else if (utf8_need(b)) {
            s->pend[s->npend++] = b;
            i++;
        } else {
            rc = emit_final(s, FFFD, 3, out);
            i++;
        }
    }
    return rc;
}

/* The join stage: ByteLevel turns each unit back into bytes, Fuse or an
 * implicit join concatenates, no decoder at all joins with spaces. */
static int dec_join(mm_tok_stream *s, const char *p, size_t n, int32_t id, mm_buf *out)
{
    const mm_tokenizer *t = s->tok;
    int rc;
    switch (t->join) {
    case JOIN_BYTELEVEL:
        if (id >= 0)
            return utf8_feed(s, t->raw.p + t->raw_off[id], t->raw_len[id], out);
        {
            char *tmp = malloc(n ? n : 1);
            size_t rl;
            if (!tmp)
                return -ENOMEM;
            rc = byte_unmap(t->inv, p, n, tmp, &rl) ? utf8_feed(s, tmp, rl, out)
                                                    : utf8_feed(s, p, n, out);
            free(tmp);
            return rc;
        }
    case JOIN_SPACE:
        if (s->started && (rc = emit_final(s, " ", 1, out)))
            return rc;
        s->started = 1;
        return emit_final(s, p, n, out);
    default:
        return emit_final(s, p, n, out);
    }
}

/* Per-token Replace/Strip steps; the result lands in t1 or t2. */
static int apply_steps(mm_tok_stream *s, const dec_step *steps, size_t nsteps, const char **p,
                       size_t *n)
{
    for (size_t i = 0; i < nsteps; i++) {
        const dec_step *st = &steps[i];
        mm_buf *dst = *p == s->t1.data ? &s->t2 : &s->t1;
        mm_buf_reset(dst);
        int rc = 0;
        if (st->kind == DEC_REPLACE) {
            rc = replace_all(*p, *n, st->a, st->alen, st->b, st->blen, dst);
        } else {
            size_t a = 0, b = *n;
            for (size_t k = 0; k < st->start && b - a >= st->clen &&
                               memcmp(*p + a, st->c, st->clen) == 0; k++)
                a += st->clen;
            for (size_t k = 0; k < st->stop && b - a >= st->clen &&
                               memcmp(*p + b - st->clen, st->c, st->clen) == 0; k++)
                b -= st->clen;
            rc = mm_buf_append(dst, *p + a, b - a);
        }
        if (rc)
            return rc;
        *p = dst->data ? dst->data : "";
        *n = dst->len;
    }
    return 0;
}

static int dec_unit(mm_tok_stream *s, const char *p, size_t n, int32_t id, mm_buf *out)
{
    const mm_tokenizer *t = s->tok;
    if (t->nmid) {
        int rc = apply_steps(s, t->mid, t->nmid, &p, &n);
        if (rc)
            return rc;
        id = -1;
    }
    return dec_join(s, p, n, id, out);
}

/* A finished ByteFallback run: one string when it is valid UTF-8, else one
 * U+FFFD per byte. */
static int flush_run(mm_tok_stream *s, mm_buf *out)
{
    int rc = 0;
    if (!s->run.len)
        return 0;
    if (mm_utf8_valid(s->run.data, s->run.len)) {
        rc = dec_unit(s, s->run.data, s->run.len, -1, out);
    } else {
        for (size_t i = 0; i < s->run.len && !rc; i++)
            rc = dec_unit(s, FFFD, 3, -1, out);
    }
    mm_buf_reset(&s->run);
    return rc;
}

int mm_tok_stream_push(mm_tok_stream *s, int32_t id, mm_buf *out)
{
    const mm_tokenizer *t = s->tok;
    if (id < 0 || (size_t)id >= t->nids || t->str_len[id] == UINT32_MAX)
        return 0;
    if (s->skip_special && t->special[id])
        return 0;
    const char *p = t->str.p + t->str_off[id];
    size_t n = t->str_len[id];
    int rc;
    if (t->npre) {
        if ((rc = apply_steps(s, t->pre, t->npre, &p, &n)))
            return rc;
        id = -1;
    }
    if (t->has_bf) {
        int bv = id >= 0 ? t->byte_val[id] : -1;
        if (id < 0 && n == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>') {
            char hex[3] = {p[3], p[4], 0}, *end;
            long v = strtol(hex, &end, 16);
            if (end == hex + 2 && v >= 0)
                bv = (int)v;
        }
        if (bv >= 0) {
            unsigned char b = (unsigned char)bv;
            return mm_buf_append(&s->run, &b, 1);
        }
        /* p may point into t1/t2, which flush_run reuses: copy it out. */
        if (s->run.len) {
            char *copy = malloc(n ? n : 1);
            if (!copy)
                return -ENOMEM;
            memcpy(copy, p, n);
            rc = flush_run(s, out);
            if (!rc)
                rc = dec_unit(s, copy, n, id, out);
            free(copy);
            return rc;
        }
    }
    return dec_unit(s, p, n, id, out);
}

int mm_tok_stream_flush(mm_tok_stream *s, mm_buf *out)
{
    int rc = flush_run(s, out);
    if (!rc && s->npend) {
        s->npend = 0;
        rc = emit_final(s, FFFD, 3, out);
    }
    /* Trailing Strip characters still held are the ones it removes. */
    s->held = 0;
    s->started = 0;
    s->lead_done = 0;
    s->lead_left = s->tok->has_post ? s->tok->post.start : 0;
    return rc;
}

int mm_tokenizer_decode(const mm_tokenizer *tok, const int32_t *ids, size_t n,
                        int skip_special_tokens, mm_buf *out)
{
    mm_tok_stream s;
    mm_tok_stream_init(&s, tok, skip_special_tokens);
    int rc = 0;
    size_t orig = out->len;
    for (size_t i = 0; i < n && !rc; i++)
        rc = mm_tok_stream_push(&s, ids[i], out);
    if (!rc)
        rc = mm_tok_stream_flush(&s, out);
    mm_tok_stream_free(&s);
    if (rc) {
        out->len = orig;
        if (out->data)
            out->data[orig] = '\0';
    }
    return rc;
}

/* ---- lookups ------------------------------------------------------------------------- */

int32_t mm_tokenizer_token_to_id(const mm_tokenizer *t, const char *token)
{
    size_t n = strlen(token);
    int32_t id = keymap_get(&t->added_map, token, n);
    return id >= 0 ? id : keymap_get(&t->vocab, token, n);
}

const char *mm_tokenizer_id_to_token(const mm_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || (size_t)id >= t->nids || t->str_len[id] == UINT32_MAX)
        return NULL;
    if (len)
        *len = t->str_len[id];
    return t->str.p + t->str_off[id];
}

size_t mm_tokenizer_vocab_size(const mm_tokenizer *t)
{
    return t->nids;
}

const mm_tok_added *mm_tokenizer_added_tokens(const mm_tokenizer *t, size_t *n)
{
    *n = t->nadded;
    return t->added;
}

int mm_tokenizer_is_special(const mm_tokenizer *t, int32_t id)
{
    return id >= 0 && (size_t)id < t->nids && t->special[id];
}
