/* unicode.h: UTF-8 helpers and Unicode NFC normalization for the tokenizer.
 *
 * NFC follows UAX #15 (canonical decomposition, canonical ordering, canonical
 * composition, Hangul done algorithmically), driven by tables generated from
 * the UCD into unicode_data.c by tools/gen_unicode_data.py. */
#ifndef MM_UNICODE_H
#define MM_UNICODE_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* Decode one code point from s[0..n). Returns its length (1..4), or 0 when
 * the bytes there are not a complete, well-formed UTF-8 sequence (overlong
 * forms, surrogates and values past U+10FFFF are rejected). */
size_t mm_utf8_decode(const char *s, size_t n, uint32_t *cp);
/* Encode cp (<= U+10FFFF, not a surrogate) into out; returns 1..4, 0 if invalid. */
size_t mm_utf8_encode(uint32_t cp, char out[4]);
/* 1 when s[0..n) is entirely well-formed UTF-8. */
int    mm_utf8_valid(const char *s, size_t n);

/* Append the NFC form of s[0..n) to out. s must be valid UTF-8 (-EILSEQ
 * otherwise, with out unchanged in length). Returns 0, -EILSEQ, or the
 * mm_buf error (-E2BIG, -ENOMEM). */
int mm_unicode_nfc(const char *s, size_t n, mm_buf *out);
/* NFC as an implementation with Unicode `version` tables computes it
 * (major * 100 + minor; 0 = these tables): code points assigned later are
 * unassigned there, so starters without decomposition or composition. For
 * text whose code points all predate `version` the result is plain NFC. */
int mm_unicode_nfc_version(const char *s, size_t n, unsigned version, mm_buf *out);

/* Canonical combining class of cp (0 for starters). */
unsigned mm_unicode_ccc(uint32_t cp);

/* Append, in PCRE2 class syntax ("\x{A}-\x{B}..."), the code points of
 * general category gc (one letter: the whole major class, e.g. "L"; two
 * letters: exactly that category) assigned by a Unicode version newer than
 * `since` (major * 100 + minor). A regex engine with tables of version
 * `since` sees them as unassigned; adding them to its \p{gc} brings it up to
 * the version of these tables. Returns 0 or the mm_buf error. */
int mm_unicode_class_additions(const char *gc, unsigned since, mm_buf *out);

/* Internal: the generated tables (unicode_data.c). qc value per code point:
 * 0 = NFC-safe starter, 1..254 = canonical combining class, 255 = a starter
 * that may change under NFC or combine with what precedes it. */
enum { MM_UCD_QC_BLOCK = 128, MM_UCD_QC_UNSAFE = 255 };
extern const uint32_t mm_ucd_qc_limit;
extern const uint8_t  mm_ucd_qc_stage1[];
extern const uint8_t  mm_ucd_qc_stage2[];
extern const size_t   mm_ucd_decomp_count;
extern const uint32_t mm_ucd_decomp_cp[];   /* sorted */
extern const uint16_t mm_ucd_decomp_pos[];  /* pool offset << 2 | (length - 1) */
extern const uint32_t mm_ucd_decomp_pool[];
extern const size_t   mm_ucd_comp_count;
extern const uint64_t mm_ucd_comp_key[];    /* first << 21 | second, sorted */
extern const uint32_t mm_ucd_comp_val[];
/* Version (major * 100 + minor) that assigned each code point NFC looks up:
 * ranges starting at mm_ucd_age_lo[i], sorted. */
extern const size_t   mm_ucd_age_count;
extern const uint32_t mm_ucd_age_lo[];
extern const uint16_t mm_ucd_age_ver[];

/* Code points assigned since Unicode 13.0: [lo, hi], general category (two
 * letters), and the version that assigned them as major * 100 + minor. */
typedef struct mm_ucd_new_range {
    uint32_t lo, hi;
    char     gc[3];
    unsigned age;
} mm_ucd_new_range;
extern const unsigned         mm_ucd_version; /* of these tables, major * 100 + minor */
extern const size_t           mm_ucd_new_count;
extern const mm_ucd_new_range mm_ucd_new[];
#endif
