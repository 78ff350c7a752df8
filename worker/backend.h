/* backend.h: the boundary between the worker's serving layers (API,
 * scheduler, sampler) and the code that runs the model (CPU now, CUDA later).
 *
 * A backend owns the weights in its own memory and a KV cache for up to
 * max_seqs sequences (slots 0..max_seqs-1, each up to max_len positions).
 * The scheduler calls forward() once per step with a batch mixing decodes
 * (1 new token) and prefill slices (several tokens); the backend appends the
 * new tokens' keys/values to each slot's cache and returns logits for the
 * rows asked for. Everything the scheduler needs is here, so a new backend
 * plugs in without touching the rest. */
#ifndef MM_BACKEND_H
#define MM_BACKEND_H
#include <stddef.h>
#include <stdint.h>

struct mm_model;

enum { MM_LOGITS_NONE = 0, MM_LOGITS_LAST = 1, MM_LOGITS_ALL = 2 };

typedef struct mm_batch_seq {
    int            slot;       /* KV-cache slot owned by this sequence */
    const int32_t *tokens;     /* tokens to process this step */
    int            n_tokens;
    int            pos;        /* position of tokens[0] = tokens already cached */
    int            want;       /* MM_LOGITS_*: none, last token's row, or every token's row */
} mm_batch_seq;

typedef struct mm_backend mm_backend;

typedef struct mm_backend_ops {
    const char *name;   /* "cpu", "cuda" */
    /* Run one step. logits receives, in batch order, 1 row per sequence with
     * want == LAST and n_tokens rows with want == ALL, each row vocab_size
     * floats (the model's config vocab_size). Returns 0 or -errno. */
    int  (*forward)(mm_backend *b, const mm_batch_seq *seqs, int nseqs, float *logits,
                    char *err, size_t errlen);
    /* Forget a slot's cache from position pos on (0 = reuse the slot). */
    void (*truncate)(mm_backend *b, int slot, int pos);
    void (*free)(mm_backend *b);
} mm_backend_ops;

struct mm_backend {
    const mm_backend_ops *ops;
    const struct mm_model *model;
    int max_seqs;
    int max_len;
};

typedef struct mm_backend_opts {
    int max_seqs;        /* --max-num-seqs */
    int max_len;         /* --max-model-len */
    int threads;         /* --threads (CPU) */
    float gpu_memory_utilization;
    int tensor_parallel;
} mm_backend_opts;

/* The CPU backend: float32 math over the model's bf16/f16/f32 weights
 * (copied once, in their dtype, into huge-page memory it owns), OpenBLAS for
 * multi-token steps, its own thread pool (o->threads, 0 = one per online
 * CPU). The model must outlive the backend (it reads the config). */
int mm_backend_cpu_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                       char *err, size_t errlen);
#endif
