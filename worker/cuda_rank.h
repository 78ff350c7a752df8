/* cuda_rank.h: between backend_tp.c, which runs a model over several GPUs
 * (tensor parallelism: one host thread per GPU), and backend_cuda.c, which
 * builds and runs one rank's shard of it. Internal to the CUDA build. */
#ifndef MM_CUDA_RANK_H
#define MM_CUDA_RANK_H
#include <stdint.h>

#include "backend.h"

/* What a rank tells the others while it is created (see agree). */
typedef struct mm_cuda_rank_info {
    long long nblk;      /* KV blocks it has room for; agreed: the smallest */
    int       p2p;       /* it can read every peer's memory; agreed: all can */
    float    *delta[2];  /* its o and down products' float outputs */
    unsigned *flags;     /* its two arrival flags (kernels/tp.cu) */
} mm_cuda_rank_info;

typedef struct mm_cuda_rank {
    int   dev, rank, tp;  /* CUDA device ordinal; this rank of tp */
    void *comm;           /* its NCCL communicator (tp > 1) */
    /* Called by every rank at the same points of its creation (after its
     * step buffers, then after the KV pool), with ok = 0 once it has
     * failed: waits for all ranks, then returns 0 with info (when not NULL)
     * agreed as its fields say and every rank's info in all[] (when not
     * NULL), or -ECANCELED when a rank failed. */
    int (*agree)(void *ctx, int ok, mm_cuda_rank_info *info, mm_cuda_rank_info *all);
    /* Called by a rank that failed where its peers may be waiting for it
     * in a sum: aborts every rank's communicator, so those sums return. */
    void (*abort)(void *ctx);
    void *ctx;
} mm_cuda_rank;

/* Rank r->rank of the model (backend_cuda.c). Its forward() writes its
 * columns of the caller's logits rows and, with tp > 1, keeps each
 * sequence's argmax key for mm_cuda_rank_key instead of setting argmax. */
int mm_cuda_rank_new(const struct mm_model *m, const mm_backend_opts *o, const mm_cuda_rank *r,
                     mm_backend **out, char *err, size_t errlen);

/* Sequence seq's argmax key in the last step (0: nothing finite). Keys of
 * several ranks merge by taking the largest. */
uint64_t mm_cuda_rank_key(const mm_backend *b, int seq);

/* The id a key stands for, -1 for 0. */
int32_t mm_cuda_key_id(uint64_t key);

/* The tensor-parallel backend (backend_tp.c): o->tensor_parallel ranks on
 * devices 0..n-1, checked against the model's shape and the GPUs visible. */
int mm_backend_tp_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                      char *err, size_t errlen);
#endif
