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

/* What a sequence wants back from a step. ARGMAX is for plain greedy
 * decoding: the backend picks the last token's largest logit itself (on the
 * GPU, so no vocabulary-wide row crosses the bus) and reports only its id. */
enum { MM_LOGITS_NONE = 0, MM_LOGITS_LAST = 1, MM_LOGITS_ALL = 2, MM_LOGITS_ARGMAX = 3 };

typedef struct mm_batch_seq {
    int            slot;       /* KV-cache slot owned by this sequence */
    const int32_t *tokens;     /* tokens to process this step */
    int            n_tokens;
    int            pos;        /* position of tokens[0] = tokens already cached */
    int            want;       /* MM_LOGITS_*: none, last token's row, every token's row, argmax */
    int32_t        argmax;     /* out (want == ARGMAX): id of the last token's largest logit
                                * among ids < mm_backend.n_valid, the lowest id on ties;
                                * -1 when none is finite (NaN and -inf never win) */
} mm_batch_seq;

typedef struct mm_backend mm_backend;

typedef struct mm_backend_ops {
    const char *name;   /* "cpu", "cuda" */
    /* Run one step. logits receives, in batch order, 1 row per sequence with
     * want == LAST and n_tokens rows with want == ALL, each row vocab_size
     * floats (the model's config vocab_size); ARGMAX sequences take no row
     * and get seqs[i].argmax instead. Every slot in the batch must have been
     * reserve()d for pos + n_tokens positions. Returns 0 or -errno;
     * -ENOTRECOVERABLE when the device can run no step again (a sticky
     * CUDA error): the engine then fails everything and the worker exits,
     * to be restarted. */
    int  (*forward)(mm_backend *b, mm_batch_seq *seqs, int nseqs, float *logits,
                    char *err, size_t errlen);
    /* Make a slot's cache able to hold n positions (n <= max_len), taking
     * blocks from the shared pool. 0, or -ENOSPC when the pool is out of
     * free blocks: the scheduler then preempts a sequence (truncate(slot, 0)
     * gives its blocks back) and tries again. */
    int  (*reserve)(mm_backend *b, int slot, int n);
    /* Forget a slot's cache from position pos on (0 = free the slot and give
     * all its blocks back). */
    void (*truncate)(mm_backend *b, int slot, int pos);
    void (*free)(mm_backend *b);
} mm_backend_ops;

struct mm_backend {
    const mm_backend_ops *ops;
    const struct mm_model *model;
    int max_seqs;
    int max_len;
    int n_valid;        /* ARGMAX looks at ids below this (set by the engine) */
    /* The KV pool: num_blocks blocks of block_size positions shared by all
     * slots (a slot of n positions holds ceil(n / block_size) blocks);
     * blocks_used is kept by reserve/truncate. Read by the engine thread. */
    int block_size;
    int num_blocks;
    int blocks_used;
};

typedef struct mm_backend_opts {
    int max_seqs;        /* --max-num-seqs */
    int max_len;         /* --max-model-len */
    int threads;         /* --threads (CPU) */
    float gpu_memory_utilization;
    int tensor_parallel;
    int block_size;      /* --block-size (positions per KV block) */
    int num_blocks;      /* --num-gpu-blocks-override: 0 = sized by the backend (CPU:
                          * max_seqs * max_len positions; CUDA: from free memory) */
} mm_backend_opts;

/* The CPU backend: float32 math over the model's bf16/f16/f32 weights
 * (copied once, in their dtype, into huge-page memory it owns), OpenBLAS for
 * multi-token steps, its own thread pool (o->threads, 0 = one per online
 * CPU). The model must outlive the backend (it reads the config). */
int mm_backend_cpu_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                       char *err, size_t errlen);

/* Test hook (backend_fault.c): wrap inner so that every step after the
 * first steps fails with -ENOTRECOVERABLE, as on a lost GPU. The wrapper
 * owns inner from then on (its free frees both). */
int mm_backend_fault_wrap(mm_backend *inner, long steps, mm_backend **out, char *err,
                          size_t errlen);

/* The CUDA backend (backend_cuda.c, kernels in worker/kernels/): weights in
 * one device allocation, a paged KV pool sized from
 * o->gpu_memory_utilization, cuBLAS GEMMs, CUDA graphs for decode steps.
 * Built when nvcc is found (make CUDA=0 leaves it out); without it this
 * returns -ENOTSUP with a message. */
int mm_backend_cuda_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                        char *err, size_t errlen);
/* 1 when this build has the CUDA backend. */
int mm_backend_cuda_built(void);
/* 1 when it has and at least one GPU is visible (--device auto). */
int mm_backend_cuda_available(void);
/* 1 when b (a cuda backend) runs single-sequence decode steps as the one
 * persistent kernel (opt-in: MM_CUDA_MEGA=1, sm_90+, shapes it fits). */
int mm_backend_cuda_mega(const mm_backend *b);
#endif
