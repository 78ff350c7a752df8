/* engine.h: the scheduler and its inference thread (continuous batching).
 *
 * One engine thread runs the step loop: take new sequences from the submit
 * queue, give waiting ones a free KV-cache slot (0..max_seqs-1), build one
 * batch of every running sequence's next token plus prefill slices of new
 * prompts (a token budget per step), reserve the KV blocks the batch will
 * write (preempting the youngest sequences when the backend's pool runs
 * out; they recompute later), run backend->forward, sample (or take the
 * backend's argmax for plain greedy rows), detokenize, check stops, and
 * publish what each sequence produced to its outbox.
 *
 * Threads: mm_engine_submit / mm_seq_cancel / mm_seq_take / mm_engine_drain
 * may be called from any one other thread (the HTTP loop); everything else
 * about a running sequence belongs to the engine thread. The engine calls
 * opts.notify (from its own thread) after a step published output; the
 * caller then drains the list of sequences with news.
 *
 * A sequence (mm_seq) is shared by the API and the engine and freed when
 * both have released it (reference counted). */
#ifndef MM_ENGINE_H
#define MM_ENGINE_H
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "buf.h"
#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

/* Caps on what one sequence may ask for (the API validates against them). */
#define MM_SEQ_MAX_STOP      16
#define MM_SEQ_MAX_STOP_LEN  256
#define MM_SEQ_MAX_STOP_IDS  64
#define MM_SEQ_MAX_BIAS      300

typedef enum {
    MM_FINISH_NONE = 0,
    MM_FINISH_STOP,     /* EOS, a stop token id or a stop string */
    MM_FINISH_LENGTH,   /* max_tokens or max_model_len */
    MM_FINISH_ABORT,    /* cancelled (client gone) or engine shut down */
    MM_FINISH_ERROR     /* the backend failed; outbox.error says why */
} mm_finish;

const char *mm_finish_name(mm_finish f);

typedef struct mm_seq_params {
    mm_sampling samp;          /* bias arrays are copied */
    int      max_tokens;       /* tokens to generate at most (>= 0) */
    int      min_tokens;       /* EOS and stop ids are banned before this many */
    int      ignore_eos;
    int      skip_special;     /* detokenize without special tokens */
    int      logprobs;         /* -1: none; 0..20: chosen token + this many alternatives */
    int      prompt_logprobs;  /* -1: none; else as logprobs, for the prompt's tokens */
    int      include_stop_str; /* keep a matched stop string in the text */
    int      has_seed;
    uint64_t seed;
    int      n_stop;           /* stop strings (copied) */
    const char *stop[MM_SEQ_MAX_STOP];
    size_t   stop_len[MM_SEQ_MAX_STOP];
    int      n_stop_ids;       /* stop token ids (copied) */
    int32_t  stop_ids[MM_SEQ_MAX_STOP_IDS];
} mm_seq_params;

void mm_seq_params_defaults(mm_seq_params *p);

/* One token produced: id, log-probability (when asked for) and the range of
 * its alternatives in the outbox's top array. */
typedef struct mm_gen_tok {
    int32_t  id;
    float    lp;
    uint32_t top_off;
    uint32_t ntop;
} mm_gen_tok;

/* What a sequence published since the last take. */
typedef struct mm_seq_outbox {
    mm_buf      text;        /* new final text (stop strings removed) */
    mm_gen_tok *toks;        /* new tokens, in order */
    size_t      ntoks, toks_cap;
    mm_tok_lp  *top;         /* their alternatives */
    size_t      ntop, top_cap;
    int         prompt_lp_ready; /* mm_seq_prompt_logprobs() may be read */
    mm_finish   finish;
    int         stop_str;    /* index of the stop string matched, -1 none */
    int32_t     stop_tok;    /* stop token id (from stop_token_ids) matched, -1 none */
    size_t      n_gen;       /* tokens generated so far (all, including EOS) */
    uint64_t    first_tok_ns;/* when the first token came (0: not yet) */
    char        error[256];
} mm_seq_outbox;

void mm_seq_outbox_init(mm_seq_outbox *o);
void mm_seq_outbox_clear(mm_seq_outbox *o); /* forget contents, keep memory */
void mm_seq_outbox_free(mm_seq_outbox *o);

typedef struct mm_seq mm_seq;

/* A new sequence holding one reference (the caller's). The prompt and the
 * params' strings and arrays are copied. */
int   mm_seq_new(const int32_t *prompt, size_t n_prompt, const mm_seq_params *p,
                 mm_seq **out);
void  mm_seq_release(mm_seq *s);
/* Ask the engine to stop this sequence; its slot is freed at the next step. */
void  mm_seq_cancel(mm_seq *s);
/* Opaque pointer of the API (touched only by the API's thread). */
void  mm_seq_set_udata(mm_seq *s, void *ud);
void *mm_seq_udata(const mm_seq *s);
size_t mm_seq_prompt_len(const mm_seq *s);
/* Move the published output into dst (appended; dst keeps its own memory)
 * and mark it taken. Returns 1 when the sequence has finished (dst->finish
 * set), else 0. */
int   mm_seq_take(mm_seq *s, mm_seq_outbox *dst);
/* The prompt's log-probabilities once outbox.prompt_lp_ready was seen:
 * n_prompt entries, the first with lp = NAN (no context), and the
 * alternatives they point into. */
const mm_gen_tok *mm_seq_prompt_logprobs(const mm_seq *s, const mm_tok_lp **top);

typedef struct mm_engine mm_engine;

typedef struct mm_engine_opts {
    int      step_tokens;  /* tokens per forward step (prefill budget), >= max_seqs */
    uint64_t seed;         /* seeds the sequences that bring none */
    void   (*notify)(void *ud);
    void    *notify_ud;
} mm_engine_opts;

/* The engine samples ids below min(tokenizer vocabulary, model vocabulary)
 * and sets b->n_valid to that bound; stop ids are the model config's EOS
 * set. The backend gives max_seqs, max_len and the KV pool, which must hold
 * at least max_len positions (-EINVAL otherwise, naming the flags). */
int  mm_engine_new(mm_backend *b, const mm_tokenizer *tok, const mm_model_config *cfg,
                   const mm_engine_opts *o, mm_engine **out, char *err, size_t errlen);
int  mm_engine_start(mm_engine *e, char *err, size_t errlen);
/* Stop the thread (running sequences finish as ABORT) and free. */
void mm_engine_free(mm_engine *e);

/* Queue a sequence; the engine takes its own reference. -ESHUTDOWN after
 * mm_engine_free began, -ENOTRECOVERABLE once the engine is dead. */
int  mm_engine_submit(mm_engine *e, mm_seq *s);
/* 1 once the backend reported its device lost (forward returned
 * -ENOTRECOVERABLE): every sequence held then failed with the error, and
 * every later one is refused. msg (may be NULL) receives the error. The
 * process should exit so that its supervisor starts a fresh one. */
int  mm_engine_dead(mm_engine *e, char *msg, size_t len);
/* Call fn for every sequence with unseen output (each at most once per
 * call), in the caller's thread. */
void mm_engine_drain(mm_engine *e, void (*fn)(mm_seq *s, void *arg), void *arg);

/* Histograms as Prometheus wants them: cumulative counts per upper bound. */
#define MM_HIST_BUCKETS 16
typedef struct mm_hist {
    uint64_t count[MM_HIST_BUCKETS + 1]; /* per bucket (last: +Inf), not cumulative */
    double   sum;
    uint64_t n;
} mm_hist;
extern const double mm_engine_ttft_bounds[MM_HIST_BUCKETS];
extern const double mm_engine_itl_bounds[MM_HIST_BUCKETS];
extern const double mm_engine_e2e_bounds[MM_HIST_BUCKETS];

typedef struct mm_engine_stats {
    int      running, waiting;
    int      max_seqs, max_len;
    double   kv_usage;              /* KV blocks in use / blocks in the pool */
    uint64_t preemptions;           /* sequences preempted (to recompute) when blocks ran out */
    uint64_t prompt_tokens, generation_tokens;
    uint64_t finished[MM_FINISH_ERROR + 1];
    uint64_t steps;
    mm_hist  ttft, itl, e2e;
} mm_engine_stats;
void mm_engine_get_stats(mm_engine *e, mm_engine_stats *out);
int  mm_engine_valid_vocab(const mm_engine *e);
#endif
