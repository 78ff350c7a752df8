/* sampler.h: from one row of logits to the next token, and log-probabilities.
 *
 * Pure functions over caller-owned memory, so the engine can run them on
 * any row and the unit tests can check them exactly. The pipeline follows
 * vLLM's order:
 *
 *   raw logits ─▶ mask (ids >= the tokenizer's vocabulary, banned ids)
 *              ─▶ logit_bias ─▶ repetition, frequency, presence penalties
 *              ─▶ temperature == 0 ? argmax
 *                 : / temperature ─▶ min_p ─▶ top_k ─▶ top_p ─▶ draw
 *
 * Randomness comes only from the caller's mm_xrng, one draw per sampled
 * token, so a sequence seeded the same way gives the same tokens whatever
 * else shares its batch. Log-probabilities are computed from the raw logits
 * (vLLM's default "raw_logprobs"), restricted to the valid vocabulary. */
#ifndef MM_SAMPLER_H
#define MM_SAMPLER_H
#include <stddef.h>
#include <stdint.h>

/* OpenAI's bound on logprobs / top_logprobs. */
#define MM_MAX_LOGPROBS 20
/* Below this a temperature means greedy (as vLLM's _SAMPLING_EPS). */
#define MM_GREEDY_EPS 1e-5f

/* xoshiro256**, seeded through splitmix64: small, fast, and the same
 * sequence on every platform. */
typedef struct mm_xrng {
    uint64_t s[4];
} mm_xrng;
void     mm_xrng_seed(mm_xrng *r, uint64_t seed);
uint64_t mm_xrng_next(mm_xrng *r);
/* Uniform in [0, 1), 53 bits. */
double   mm_xrng_uniform(mm_xrng *r);

typedef struct mm_sampling {
    float temperature;        /* < MM_GREEDY_EPS: greedy */
    float top_p;              /* (0, 1]; 1 = off */
    int   top_k;              /* <= 0: off */
    float min_p;              /* [0, 1]; 0 = off */
    float presence_penalty;   /* OpenAI: minus this once for each token already generated */
    float frequency_penalty;  /* OpenAI: minus this times the token's count in the output */
    float repetition_penalty; /* HF/vLLM: 1 = off; tokens of prompt or output are
                                 divided (positive logit) or multiplied (negative) */
    const int32_t *bias_ids;  /* logit_bias: added to the raw logit */
    const float   *bias_val;
    int            n_bias;
} mm_sampling;

void mm_sampling_defaults(mm_sampling *sp);

/* What the penalties look at. banned ids (e.g. the stop tokens while fewer
 * than min_tokens were generated) get -inf. */
typedef struct mm_sample_hist {
    const int32_t *prompt;
    size_t         n_prompt;
    const int32_t *output;
    size_t         n_output;
    const int32_t *banned;
    size_t         n_banned;
} mm_sample_hist;

/* Scratch memory for one vocabulary size; one per thread that samples.
 * counts stays all-zero between calls. */
typedef struct mm_sampler_ws {
    int       n_vocab; /* capacity */
    int       n_x;     /* ids in x (the last mm_sampler_process's n_vocab) */
    float    *x;       /* processed logits */
    int32_t  *ids;     /* candidate ids (mm_sampler_dist's result) */
    float    *p;       /* their probabilities (mm_sampler_dist's result) */
    uint32_t *counts;  /* per-id output counts (zero between calls) */
    uint8_t  *seen;    /* per-id prompt-or-output marks (zero between calls) */
} mm_sampler_ws;
int  mm_sampler_ws_init(mm_sampler_ws *ws, int n_vocab);
void mm_sampler_ws_free(mm_sampler_ws *ws);

/* A token and its log-probability with the top alternatives. */
typedef struct mm_tok_lp {
    int32_t id;
    float   lp;
} mm_tok_lp;

/* Step 1: x[0..n_vocab) = logits with the mask, bias and penalties applied
 * (ids >= n_valid and banned ids are -inf). */
void mm_sampler_process(const float *logits, int n_vocab, int n_valid, const mm_sampling *sp,
                        const mm_sample_hist *h, mm_sampler_ws *ws);

/* Step 2 (temperature > 0): the candidates that survive temperature, min_p,
 * top_k and top_p from ws->x, renormalised, into ws->ids / ws->p: highest
 * probability first when top_k or top_p sorted them, else in id order.
 * Returns their count (>= 1 when any id is finite, 0 when none is). */
int  mm_sampler_dist(const mm_sampling *sp, mm_sampler_ws *ws);

/* The whole pipeline. Returns the token, or -1 when every id is masked. */
int32_t mm_sample(const float *logits, int n_vocab, int n_valid, const mm_sampling *sp,
                  const mm_sample_hist *h, mm_xrng *rng, mm_sampler_ws *ws);

/* 1 when mm_sample(logits, n_vocab, n_valid, sp, h, ...) is, whatever the
 * logits, the plain argmax of the raw row over [0, n_valid): the largest
 * value that is neither -inf nor NaN, the lowest id on ties, -1 if none,
 * with no draw taken. That is greedy (temperature < MM_GREEDY_EPS) with no
 * logit_bias entry, no repetition / frequency / presence penalty and no
 * banned id in h (min_tokens not reached yet). top_p, top_k and min_p do
 * not matter to greedy. Then a backend may pick the token itself
 * (MM_LOGITS_ARGMAX), when nothing else needs the row (logprobs). */
int mm_sampling_plain_greedy(const mm_sampling *sp, const mm_sample_hist *h);
/* The greedy choice over x[0..n): the largest logit that is not -inf or
 * NaN, the lowest id on ties; -1 when there is none. Backends that pick on
 * their own (MM_LOGITS_ARGMAX) follow this rule. */
int32_t mm_sampler_argmax(const float *x, int n);

/* log_softmax of the raw logits over [0, n_valid): the chosen token's
 * log-probability into *chosen_lp, and the k (<= MM_MAX_LOGPROBS) most
 * likely tokens, best first (ties by id), into top. Returns k actually
 * written. */
int  mm_sampler_logprobs(const float *logits, int n_valid, int32_t chosen, int k,
                         mm_sampler_ws *ws, float *chosen_lp, mm_tok_lp *top);
#endif
