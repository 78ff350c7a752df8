/* tokenizer.h: Hugging Face tokenizer.json, BPE models, id for id.
 *
 * Supported (anything else in the file is a load error naming it, never a
 * silently different tokenization):
 *   model:          BPE (merges as "a b" or ["a","b"]; ignore_merges;
 *                   byte_fallback; unk_token with fuse_unk)
 *   normalizer:     NFC, Prepend, Replace (String pattern), Sequence
 *   pre_tokenizer:  Split (Regex or String pattern, behavior Isolated),
 *                   ByteLevel (add_prefix_space false, use_regex either),
 *                   Sequence
 *   post_processor: ByteLevel, TemplateProcessing (single), Sequence
 *   decoder:        ByteLevel, Replace (String), ByteFallback, Fuse, Strip,
 *                   Sequence
 * Added tokens are split out first (leftmost-longest), the non-normalized
 * ones on the raw text, the normalized ones on each normalized piece, as the
 * tokenizers library does. Regexes are compiled once with PCRE2 (UTF, UCP,
 * JIT); \s keeps the Unicode White_Space meaning it has in tokenizers.
 *
 * A loaded tokenizer is read-only apart from an internal, locked word cache,
 * so threads may share it. */
#ifndef MM_TOKENIZER_H
#define MM_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

typedef struct mm_tokenizer mm_tokenizer;

/* A growable id array with a hard maximum count. */
typedef struct mm_tok_ids {
    int32_t *v;
    size_t   n, cap, max;
} mm_tok_ids;
void mm_tok_ids_init(mm_tok_ids *ids, size_t max);
/* 0, -E2BIG past max, -ENOMEM. */
int  mm_tok_ids_push(mm_tok_ids *ids, int32_t id);
void mm_tok_ids_free(mm_tok_ids *ids);

/* An entry of added_tokens; content is NUL-terminated. */
typedef struct mm_tok_added {
    int32_t     id;
    const char *content;
    size_t      len;
    int         special;
} mm_tok_added;

/* Load path (a tokenizer.json). Returns 0, or a negative errno with a
 * message in err: -ENOENT/-EIO (file), -EINVAL (malformed JSON or fields),
 * -ENOTSUP (a component or option this implementation does not support). */
int  mm_tokenizer_load(const char *path, mm_tokenizer **out, char *err, size_t errlen);
void mm_tokenizer_free(mm_tokenizer *tok);

/* Encode text[0..len) (must be UTF-8) and append the ids to ids. With
 * add_special_tokens the post_processor's template (e.g. BOS) is applied.
 * Returns 0, -EILSEQ (invalid UTF-8), -E2BIG (ids->max reached), -ENOMEM,
 * or -EIO (regex engine failure); err says which. */
int mm_tokenizer_encode(const mm_tokenizer *tok, const char *text, size_t len,
                        int add_special_tokens, mm_tok_ids *ids, char *err, size_t errlen);

/* Decode ids and append the text to out (tokenizers' decode: unknown ids are
 * skipped, invalid UTF-8 becomes U+FFFD). Returns 0 or the mm_buf error. */
int mm_tokenizer_decode(const mm_tokenizer *tok, const int32_t *ids, size_t n,
                        int skip_special_tokens, mm_buf *out);

/* Incremental decoding for streams. push() appends only complete UTF-8
 * text; everything it appends, followed by what flush() appends, equals
 * mm_tokenizer_decode() of the same ids (the decoder runs as one state
 * machine, and decode() is that machine fed all at once). Bytes of a
 * character split across tokens, a byte-fallback run, or trailing characters
 * a Strip decoder may remove are held until they are settled. */
typedef struct mm_tok_stream {
    const mm_tokenizer *tok;
    int    skip_special;
    /* private */
    int    started;        /* a token went through (the " " joiner) */
    unsigned char pend[4]; /* incomplete UTF-8 sequence (ByteLevel) */
    size_t npend;
    size_t lead_left;      /* leading chars the final Strip may still drop */
    int    lead_done;
    size_t held;           /* trailing Strip chars held back */
    mm_buf run;            /* ByteFallback bytes not yet resolved */
    mm_buf t1, t2;         /* scratch */
} mm_tok_stream;
void mm_tok_stream_init(mm_tok_stream *s, const mm_tokenizer *tok, int skip_special_tokens);
/* 0 or the mm_buf error; unknown ids are skipped like decode() does. */
int  mm_tok_stream_push(mm_tok_stream *s, int32_t id, mm_buf *out);
/* Emit whatever is held (an unfinished sequence becomes U+FFFD) and reset
 * the stream for reuse. */
int  mm_tok_stream_flush(mm_tok_stream *s, mm_buf *out);
void mm_tok_stream_free(mm_tok_stream *s);

/* -1 when absent. Added tokens are looked up before the model vocab. */
int32_t     mm_tokenizer_token_to_id(const mm_tokenizer *tok, const char *token);
/* The token's string (as written in tokenizer.json) or NULL; *len if non-NULL. */
const char *mm_tokenizer_id_to_token(const mm_tokenizer *tok, int32_t id, size_t *len);
/* Size of the id space: highest id (model or added) + 1. */
size_t      mm_tokenizer_vocab_size(const mm_tokenizer *tok);
/* All added tokens, in file order; *n gets the count. */
const mm_tok_added *mm_tokenizer_added_tokens(const mm_tokenizer *tok, size_t *n);
/* 1 when id is an added token marked special (what skip_special_tokens drops). */
int         mm_tokenizer_is_special(const mm_tokenizer *tok, int32_t id);
#endif
