/* backend_cuda.c: the worker's GPU backend (host side).
 *
 * Owns, on the one device CUDA_VISIBLE_DEVICES leaves visible first:
 *  - the weights, in one allocation, as bf16 or f16 (the checkpoint's type;
 *    f32 checkpoints become bf16); q/k/v side by side and gate/up rows
 *    interleaved, so each group is one product;
 *  - the paged KV pool: fixed-size blocks handed to slots by reserve() and
 *    returned by truncate(), sized from --gpu-memory-utilization of the
 *    memory left after the weights and the step's scratch;
 *  - scratch for one step of up to MAX_STEP tokens (bigger batches run as
 *    several sub-steps, a sequence split across them finds its first part
 *    in the cache), and pinned host mirrors of what crosses the bus.
 *
 * A step uploads one metadata block (token ids, positions, slots, which
 * tokens attend through the decode kernel, block-table changes), runs the
 * layers, and copies back argmax ids and the logits rows the scheduler
 * asked for. Decode-only steps of up to MAX_GRAPH sequences replay a CUDA
 * graph captured once per padded batch size and context bucket, so a
 * small model is not bound by kernel launches.
 *
 * Products: our gemv kernel (bandwidth bound) for one or two rows, and up
 * to 8 on small matrices, with SwiGLU in the gate/up product's epilogue;
 * cuBLAS beyond. Attention: the flash-decoding kernel for decodes and
 * short slices (a block per kv head and its query heads, or per query
 * head for small batches), and for longer prompt slices the flash kernel
 * (flash.cu: scores on chip, tensor cores; sm_80+, head_dim 64/128) or
 * else two strided-batched cuBLAS products around a causal softmax (one
 * kv head's group of query heads per call).
 *
 * Every CUDA and cuBLAS call and every launch is checked; a failure is
 * reported with the call and the library's message. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "backend.h"
#include "cuda_rank.h"
#include "dtype.h"
#include "errmsg.h"
#include "kernels/kernels.h"
#include "log.h"
#include "model.h"
#include "nccl_dl.h"

#define MAX_STEP     2048 /* tokens per sub-step (scratch is sized for it) */
#define MAX_GRAPH    256  /* largest decode batch replayed as a graph */
#define DECODE_SLICE 8    /* slices of up to this many tokens use the decode kernel */
#define ATT_S_CAP    (32u << 20) /* floats of prefill scores per product (128 MiB) */
#define BLAS_WS      (32u << 20) /* cuBLAS workspace, set once so graphs can hold it */
#define HEADROOM     (512ull << 20) /* device memory left free beyond the KV pool */

static const int graph_sizes[] = {1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128,
                                  160, 192, 224, 256};
#define N_GRAPH ((int)(sizeof graph_sizes / sizeof graph_sizes[0]))
/* Context buckets of the decode graphs: 512 positions, then x4 up to
 * --max-model-len. A graph for short contexts does not launch the empty
 * attention splits a 32k-position graph would. */
#define N_CTXB 8
static int ctx_bucket(int max_ctx, int max_len, int *bucket_ctx)
{
    int c = 512, i = 0;
    while (c < max_ctx && c < max_len && i < N_CTXB - 1) {
        c *= 4;
        i++;
    }
    *bucket_ctx = i == N_CTXB - 1 ? max_len : c;
    return i;
}

typedef struct cu_layer {
    float *attn_norm, *mlp_norm;
    void  *wqkv, *bqkv, *wo, *bo, *wgu, *wdown;
} cu_layer;

/* A run of tokens of one sequence inside a sub-step. */
typedef struct seg {
    int slot, pos, t0, n;
} seg;

/* Where each logits row of a sub-step goes. */
typedef struct row_dst {
    int seq;      /* batch index */
    int argmax;   /* 1: only the id is wanted */
    size_t out;   /* else: row index in the caller's logits */
} row_dst;

typedef struct cuda_backend {
    mm_backend base;
    const mm_model_config *cfg;
    mm_kdt   dt;
    /* This rank's shapes (with one GPU, the model's): nq query heads from
     * q0, nkv kv heads from kv0, I intermediate rows, logits for the V ids
     * [voff, voff + V) of the Vfull the model has. */
    int      H, I, nq, nkv, hd, qd, qkvw, V, L, window, nsm;
    int      q0, kv0, Vfull, voff;
    /* tensor parallelism (backend_tp.c drives the ranks): rank of tp on
     * device dev, summing the o and down products' outputs through comm */
    int      dev, rank, tp;
    void    *comm;
    uint64_t *seq_keys;          /* tp > 1: each sequence's argmax key of the last step */
    /* Sums over ranks through peer memory (kernels/tp.cu) where every GPU
     * reaches the others' (MM_CUDA_TP_P2P=0: NCCL always, for comparison):
     * the down product writes delta2 so o's and down's outputs alternate,
     * the sums land in dsum; tpbuf holds the two flags and the epoch. */
    int      p2p;
    size_t   p2p_max;            /* floats read from peers past which NCCL sums */
    float   *delta2, *dsum;
    unsigned *tpbuf;
    mm_k_tp  tpk;
    float    eps, scale;
    cudaStream_t   stream;
    cublasHandle_t blas;
    void    *blas_ws;

    char    *wbuf;               /* the one weight allocation */
    void    *embed, *lm_head;
    float   *norm, *inv_freq;
    cu_layer *layers;

    /* KV pool: block 0 is never handed out (padding rows write there) */
    char    *kvbuf;
    size_t   kv_layer_bytes;     /* K (or V) of one layer */
    int      max_blocks;         /* per slot */
    int     *free_blk, n_free;
    int     *slot_blk;           /* [(max_seqs + 1) * max_blocks] host copy */
    int     *slot_nblk, *slot_len;
    int32_t *d_tables;

    /* scratch */
    float   *x, *logits, *part, *S;
    float   *delta;
    void    *h, *qkv, *q, *att, *gu, *act, *kc, *vc, *P, *hrows;
    unsigned long long *keys_d; /* argmax scratch */
    int      Rmax;
    size_t   s_floats;

    /* step metadata, device and pinned host: ids, pos, slot, tok, rows,
     * fresh (MAX_STEP each), then the block-table update list */
    int32_t *meta_d, *meta_h;
    int      n_upd, upd_cap;
    float   *logits_h;
    unsigned long long *keys_h;

    /* one graph per padded batch size and context bucket (the attention's
     * split count is baked into a graph, and depends on the context) */
    cudaGraphExec_t graph[N_GRAPH][N_CTXB];
    int      graph_failed;
    /* Benchmark switch (environment MM_CUDA_GRAPHS=0): measure what the
     * decode graphs bring. */
    int      no_graphs;
    /* MM_CUDA_PROFILE=1 (implies no graphs): device time per stage of the
     * model, summed over every step and logged when the backend is freed.
     * An event between every two stages serializes them, so the sum is a
     * little above the unprofiled step time; it is for finding where the
     * time goes, not for reporting speed. */
    int      prof;
    /* MM_CUDA_SKIP=mask of SKIP_* (measurement only: the results are
     * wrong): leave kernels out of every step to see what each costs
     * inside the chain. Scratch starts zeroed, so what is left stays
     * finite. */
    int      skip;
    /* the device launches thread-block clusters (sm_90+): attention's
     * HEAD_CLUSTER mode; MM_CUDA_CLUSTER=0 turns it off (for comparison) */
    int      cluster_attn;
    /* Early reads (MM_CUDA_EARLY, default on; 0 for comparison): the
     * embedding starts only after the block-table update has finished, so
     * RoPE and attention may read the step metadata, the block tables and
     * the cache rows of earlier steps before griddepcontrol.wait, leaving
     * only what the layer's own products wrote to its chain of round
     * trips. */
    int      early;
    /* RoPE and the cache write inside the cluster decode attention at
     * steps of decode tokens only (MM_CUDA_ROPE_FUSE, default on with
     * early reads; 0 for comparison): one kernel less a layer, the same
     * bits (docs/GPU_NOTES.md v26). */
    int      rope_fuse;
    int      trace; /* MM_CUDA_TRACE=1: log every sub-step (trace_sub); 2: also
                     * check the device's greedy choices, 3: and log every
                     * row's top two (trace_rows) */
    /* Single-sequence decode steps as one persistent kernel (mega.cu),
     * opt-in with MM_CUDA_MEGA=1 where the device and shape allow: it is
     * correct but, measured, slower than the layered kernels (1.39 against
     * 1.25 ms on the 1.5B shape, 4.16 against 3.98 on 7B; docs/GPU_NOTES.md
     * v16-v19), so the layered kernels serve every step by default. */
    int      mega;
    mm_k_mega mk;
    mm_k_mega_layer *mk_layers; /* device */
    char    *mk_scratch;        /* device: its partials and counters */
    /* prompt slices attend through the flash kernel (flash.cu) where the
     * device (sm_80+) and head_dim allow; MM_CUDA_FLASH=0 keeps the cuBLAS
     * products around a softmax kernel (for comparison) */
    int      flash;
    /* a sticky CUDA error happened: every step fails (device_lost) */
    int      lost;
    char     lost_msg[400];
    /* test hook MM_CUDA_TEST_FAULT_STEP=n: the n-th forward launches a
     * kernel that faults (worker/kernels/fault.cu); with tensor
     * parallelism MM_CUDA_TEST_FAULT_RANK=r: on rank r alone */
    long     fault_step, steps_run;
    int      fault_rank;
    cudaEvent_t prof_ev[64];
    int      prof_n, prof_id[64];
    double   prof_ms[16];
    long     prof_steps;

    /* host plan of the current sub-step */
    seg     *segs;
    row_dst *rows;
} cuda_backend;

#define META_IDS(m)  ((m))
#define META_POS(m)  ((m) + MAX_STEP)
#define META_SLOT(m) ((m) + 2 * MAX_STEP)
#define META_TOK(m)  ((m) + 3 * MAX_STEP)
#define META_ROWS(m) ((m) + 4 * MAX_STEP)
#define META_FRESH(m) ((m) + 5 * MAX_STEP) /* first position this step writes */
#define META_NVALID(m) ((m) + 6 * MAX_STEP) /* ARGMAX's id bound, set every step */
#define META_UPD(m)  ((m) + 6 * MAX_STEP + 1)
#define META_INTS(upd) ((size_t)6 * MAX_STEP + 2 + 2 * (size_t)(upd))

/* ---- error reporting ---- */

static int cu_fail(char *err, size_t errlen, const char *what, cudaError_t e)
{
    mm_errf(err, errlen, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

#define CK(call)                                                                                 \
    do {                                                                                         \
        cudaError_t ck_e = (call);                                                               \
        if (ck_e != cudaSuccess) {                                                               \
            rc = cu_fail(err, errlen, #call, ck_e);                                              \
            goto out;                                                                            \
        }                                                                                        \
    } while (0)

#define CKB(call)                                                                                \
    do {                                                                                         \
        cublasStatus_t ck_s = (call);                                                            \
        if (ck_s != CUBLAS_STATUS_SUCCESS) {                                                     \
            mm_errf(err, errlen, "%s: %s", #call, cublasGetStatusString(ck_s));                  \
            rc = -EIO;                                                                           \
            goto out;                                                                            \
        }                                                                                        \
    } while (0)

/* Kernel launchers return a cudaError_t as int. */
#define CKK(call) CK((cudaError_t)(call))

static size_t esz(const cuda_backend *b) { (void)b; return 2; }
static cudaDataType_t cu_type(const cuda_backend *b)
{
    return b->dt == MM_KDT_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

/* ---- weights ---- */

/* Weights are placed at 256-byte aligned offsets of one allocation; the
 * first pass (measure) only counts. Each weight is placed whole or as the
 * rows or columns this rank holds (tensor parallelism: see place_all). */
typedef struct placer {
    cuda_backend *b;
    size_t off;
    int    measure;
    char  *stage;      /* pinned staging buffer */
    size_t stage_cap, fill;
    char  *dst;        /* the matrix being placed, and its bytes flushed so far */
    size_t done;
    char  *err;
    size_t errlen;
} placer;

/* Rows [r0, r0 + nr) and columns [c0, c0 + nc) of a weight (a 1-D weight
 * is one row). */
typedef struct wpart {
    const mm_weight *w;
    int64_t r0, nr, c0, nc;
} wpart;

static wpart whole(const mm_weight *w) { return (wpart){w, 0, w->rows, 0, w->cols}; }
static wpart row_part(const mm_weight *w, int64_t r0, int64_t nr)
{
    return (wpart){w, r0, nr, 0, w->cols};
}
static wpart col_part(const mm_weight *w, int64_t c0, int64_t nc)
{
    return (wpart){w, 0, w->rows, c0, nc};
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* Convert n elements of w from index off into dst (stored type es). */
static void stage_copy(const mm_weight *w, size_t off, size_t n, mm_dtype want, size_t es,
                       char *dst)
{
    if (w->dtype == want) {
        memcpy(dst, (const char *)w->data + off * es, n * es);
        return;
    }
    for (size_t j = 0; j < n; j++) {
        float f = mm_weight_elem(w, (int64_t)(off + j));
        if (want == MM_DT_F32)
            ((float *)dst)[j] = f;
        else if (want == MM_DT_F16)
            ((uint16_t *)dst)[j] = mm_f32_to_f16(f);
        else
            ((uint16_t *)dst)[j] = mm_f32_to_bf16(f);
    }
}

/* Synchronous copies from pinned memory: the staging buffer is reused at
 * once, and loading is not on any hot path. */
static int stage_flush(placer *p)
{
    char *err = p->err;
    size_t errlen = p->errlen;
    int rc = 0;
    if (p->fill)
        CK(cudaMemcpy(p->dst + p->done, p->stage, p->fill, cudaMemcpyHostToDevice));
    p->done += p->fill;
    p->fill = 0;
out:
    return rc;
}

/* Append n elements of w from flat index off, flushing as the stage fills. */
static int stage_put(placer *p, const mm_weight *w, size_t off, size_t n, mm_dtype want,
                     size_t es)
{
    int rc;
    while (n) {
        size_t room = (p->stage_cap - p->fill) / es;
        if (room == 0) {
            if ((rc = stage_flush(p)) < 0)
                return rc;
            continue;
        }
        size_t k = n < room ? n : room;
        stage_copy(w, off, k, want, es, p->stage + p->fill);
        p->fill += k * es;
        off += k;
        n -= k;
    }
    return 0;
}

/* Rows [r, r + nr) of a part: one run when the part spans every column. */
static int stage_rows(placer *p, const wpart *q, int64_t r, int64_t nr, mm_dtype want,
                      size_t es)
{
    const mm_weight *w = q->w;
    if (q->nc == w->cols)
        return stage_put(p, w, (size_t)((q->r0 + r) * w->cols), (size_t)(nr * w->cols), want, es);
    for (int64_t i = 0; i < nr; i++) {
        int rc = stage_put(p, w, (size_t)((q->r0 + r + i) * w->cols + q->c0), (size_t)q->nc,
                           want, es);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Upload a group of parts stacked along rows (q,k,v) into one matrix,
 * converted to the backend's type, or to f32 when as_f32. With interleave
 * (gate,up: same shapes) row r of each part follows row r of the one
 * before: gate 0, up 0, gate 1, up 1, ... */
static int place_parts(placer *p, void **dst, const wpart *ws, int nw, int as_f32, int interleave)
{
    cuda_backend *b = p->b;
    size_t n = 0;
    for (int i = 0; i < nw; i++)
        n += (size_t)ws[i].nr * (size_t)ws[i].nc;
    size_t es = as_f32 ? 4 : esz(b), bytes = n * es;
    int rc = 0;
    if (p->measure || !ws[0].w->data) {
        if (dst)
            *dst = NULL;
        if (ws[0].w->data)
            p->off = align256(p->off + bytes);
        return 0;
    }
    p->dst = b->wbuf + p->off;
    p->done = p->fill = 0;
    *dst = p->dst;
    mm_dtype want = as_f32 ? MM_DT_F32 : (b->dt == MM_KDT_F16 ? MM_DT_F16 : MM_DT_BF16);
    if (interleave) {
        for (int64_t r = 0; r < ws[0].nr; r++)
            for (int i = 0; i < nw; i++)
                if ((rc = stage_rows(p, &ws[i], r, 1, want, es)) < 0)
                    return rc;
    } else {
        for (int i = 0; i < nw; i++)
            if ((rc = stage_rows(p, &ws[i], 0, ws[i].nr, want, es)) < 0)
                return rc;
    }
    if ((rc = stage_flush(p)) < 0)
        return rc;
    p->off = align256(p->off + bytes);
    return 0;
}

/* What this rank holds (Megatron-style sharding; one rank: everything):
 * its query heads' rows of q and their kv heads' rows of k and v (with
 * the biases), the matching columns of o; its slice of the intermediate
 * rows of gate and up and those columns of down; its slice of the
 * vocabulary's rows of the LM head. The embedding and the norms are
 * whole on every rank; so is o's bias, added after the sum. */
static int place_all(placer *p, const mm_model *m)
{
    cuda_backend *b = p->b;
    int rc, hd = b->hd;
    wpart one[1];
#define PLACE1(dst, part, f32)                                                                   \
    do {                                                                                         \
        one[0] = (part);                                                                         \
        if ((rc = place_parts(p, (void **)(dst), one, 1, (f32), 0)) < 0)                         \
            return rc;                                                                           \
    } while (0)
    PLACE1(&b->embed, whole(&m->embed), 0);
    PLACE1(&b->norm, whole(&m->norm), 1);
    if (m->lm_head.data == m->embed.data)
        b->lm_head = b->embed ? (char *)b->embed + (size_t)b->voff * (size_t)b->H * esz(b)
                              : NULL;
    else
        PLACE1(&b->lm_head, row_part(&m->lm_head, b->voff, b->V), 0);
    int64_t q0 = (int64_t)b->q0 * hd, nq = (int64_t)b->qd;
    int64_t k0 = (int64_t)b->kv0 * hd, nk = (int64_t)b->nkv * hd;
    int64_t i0 = (int64_t)b->rank * b->I, ni = b->I;
    for (int l = 0; l < b->L; l++) {
        const mm_layer *s = &m->layers[l];
        cu_layer *d = &b->layers[l];
        const wpart qkv[3] = {row_part(&s->q, q0, nq), row_part(&s->k, k0, nk),
                              row_part(&s->v, k0, nk)};
        const wpart bqkv[3] = {col_part(&s->q_bias, q0, nq), col_part(&s->k_bias, k0, nk),
                               col_part(&s->v_bias, k0, nk)};
        const wpart gu[2] = {row_part(&s->gate, i0, ni), row_part(&s->up, i0, ni)};
        PLACE1(&d->attn_norm, whole(&s->attn_norm), 1);
        PLACE1(&d->mlp_norm, whole(&s->mlp_norm), 1);
        if ((rc = place_parts(p, &d->wqkv, qkv, 3, 0, 0)) < 0 ||
            (rc = place_parts(p, &d->bqkv, bqkv, 3, 0, 0)) < 0 ||
            (rc = place_parts(p, &d->wgu, gu, 2, 0, 1)) < 0)
            return rc;
        PLACE1(&d->wo, col_part(&s->o, q0, nq), 0);
        PLACE1(&d->bo, whole(&s->o_bias), 0);
        PLACE1(&d->wdown, col_part(&s->down, i0, ni), 0);
    }
#undef PLACE1
    return 0;
}

/* ---- KV pool ---- */

static int cuda_reserve(mm_backend *base, int slot, int n)
{
    cuda_backend *b = (cuda_backend *)base;
    if (slot < 0 || slot >= base->max_seqs || n < 0 || n > base->max_len)
        return -EINVAL;
    int need = (n + base->block_size - 1) / base->block_size;
    int have = b->slot_nblk[slot];
    if (need <= have)
        return 0;
    if (need - have > b->n_free)
        return -ENOSPC;
    for (int k = have; k < need; k++) {
        int blk = b->free_blk[--b->n_free];
        int idx = slot * b->max_blocks + k;
        b->slot_blk[idx] = blk;
        /* upd_cap covers every entry of every slot, so this cannot overflow
         * even if nothing runs between many reservations. */
        int32_t *u = META_UPD(b->meta_h);
        u[1 + 2 * b->n_upd] = idx;
        u[2 + 2 * b->n_upd] = blk;
        b->n_upd++;
    }
    b->slot_nblk[slot] = need;
    base->blocks_used += need - have;
    return 0;
}

static void cuda_truncate(mm_backend *base, int slot, int pos)
{
    cuda_backend *b = (cuda_backend *)base;
    if (slot < 0 || slot >= base->max_seqs || pos < 0)
        return;
    int keep = (pos + base->block_size - 1) / base->block_size;
    for (int k = keep; k < b->slot_nblk[slot]; k++)
        b->free_blk[b->n_free++] = b->slot_blk[slot * b->max_blocks + k];
    if (keep < b->slot_nblk[slot]) {
        base->blocks_used -= b->slot_nblk[slot] - keep;
        b->slot_nblk[slot] = keep;
    }
    if (b->slot_len[slot] > pos)
        b->slot_len[slot] = pos;
}

/* ---- stage profiler (MM_CUDA_PROFILE=1) ---- */

enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GU, P_SWIGLU, P_DOWN, P_HEAD, P_EMBED, P_SUM, P_N };
static const char *const prof_names[P_N] = {"norm", "qkv", "rope", "attention", "o", "gate_up",
                                             "swiglu", "down", "head", "embed", "allreduce"};

/* Mark the end of a stage: the time since the previous mark is charged to
 * it. */
static void prof_mark(cuda_backend *b, int id)
{
    if (!b->prof || b->prof_n >= 64)
        return;
    if (!b->prof_ev[b->prof_n] && cudaEventCreate(&b->prof_ev[b->prof_n]) != cudaSuccess)
        return;
    b->prof_id[b->prof_n] = id;
    cudaEventRecord(b->prof_ev[b->prof_n++], b->stream);
}

/* After the stream synchronized: add up the marks (one layer's worth are
 * reused round-robin, so flush at every mark budget). */
static void prof_flush(cuda_backend *b)
{
    for (int i = 1; i < b->prof_n; i++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, b->prof_ev[i - 1], b->prof_ev[i]) == cudaSuccess)
            b->prof_ms[b->prof_id[i]] += ms;
    }
    b->prof_n = 0;
}

/* Logged (and restarted) every 64 steps, so warm-up stays out of the
 * later reports. */
static void prof_report(cuda_backend *b)
{
    double total = 0;
    for (int i = 0; i < P_N; i++)
        total += b->prof_ms[i];
    if (!b->prof || total <= 0)
        return;
    char line[512];
    size_t n = 0;
    for (int i = 0; i < P_N && n < sizeof line; i++)
        n += (size_t)snprintf(line + n, sizeof line - n, " %s %.4f", prof_names[i],
                              b->prof_ms[i] / (double)b->prof_steps);
    mm_info("cuda profile over %ld steps, ms per step:%s", b->prof_steps, line);
    memset(b->prof_ms, 0, sizeof b->prof_ms);
    b->prof_steps = 0;
}

/* ---- one sub-step ---- */

enum {
    SKIP_NORM = 1, SKIP_ROPE = 2, SKIP_ATTN = 4, SKIP_QKV = 8, SKIP_O = 16, SKIP_GU = 32,
    SKIP_DOWN = 64
};

/* Measured on an H200 (docs/GPU_NOTES.md): our kernel beats cuBLAS at one
 * or two rows on every shape, and up to 8 rows on small matrices where
 * cuBLAS's fixed cost dominates. */
static int use_gemv(int M, int N, int K)
{
    return mm_k_gemv_ok(M, K) && (M <= 2 || (size_t)N * (size_t)K <= ((size_t)4 << 20));
}

/* y[M][N] = x[M][K] W[N][K]^T, y in the 16-bit type or float (y_f32).
 * Float products may come back as several partials over K (nparts set;
 * NULL: one), which the next norm sums. */
static int linear(cuda_backend *b, const void *W, const void *x, int M, int N, int K, void *y,
                  int y_f32, int *nparts, char *err, size_t errlen)
{
    int rc = 0;
    if (nparts)
        *nparts = 1;
    if (use_gemv(M, N, K)) {
        int splits = y_f32 && nparts ? mm_k_gemv_splits(N, K, b->nsm) : 1;
        CKK(mm_k_gemv(b->dt, W, x, M, N, K, y, y_f32, splits, b->stream));
        if (nparts)
            *nparts = splits;
        return 0;
    }
    const float one = 1.0f, zero = 0.0f;
    CKB(cublasGemmEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, W, cu_type(b), K, x,
                     cu_type(b), K, &zero, y, y_f32 ? CUDA_R_32F : cu_type(b), N,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
out:
    return rc;
}

/* Tensor parallelism: every rank's o (or down) product covers its heads'
 * (or intermediate rows') share of the sum over K; adding the np partials
 * of every rank gives each rank the whole product, so the residual stream
 * stays the same on all of them. Through peer memory (p2p: into dsum) or
 * NCCL (in place); *sum is where the next norm reads it. */
/* From three GPUs on, a one-shot sum reads n - 1 peers' buffers where
 * NCCL's ring moves under two buffers' worth: there, sums reading more than
 * this many floats go through NCCL (MM_CUDA_TP_P2P_MAX_MB moves the line).
 * With two GPUs both move one buffer, and peer memory was measured faster
 * at every size (7B shape, 2048-token prefill: 33.1-33.3 against
 * 34.6-35.1 ms), so it sums everything. */
#define P2P_MAX_FLOATS ((size_t)4 << 20)

static int tp_sum(cuda_backend *b, int p2p, int slot, int layer, int np, size_t dstride,
                  float *src, const float **sum, char *err, size_t errlen)
{
    int rc = 0;
    *sum = src;
    if (b->tp < 2)
        return 0;
    size_t count = (size_t)np * dstride;
    if (p2p) {
        CKK(mm_k_tp_reduce(&b->tpk, slot, layer, count, b->nsm, b->dsum, b->stream));
        *sum = b->dsum;
    } else {
        rc = mm_nccl_sum_f32(b->comm, src, count, b->stream, err, errlen);
    }
    prof_mark(b, P_SUM);
out:
    return rc;
}

static mm_k_cache layer_cache(const cuda_backend *b, int l)
{
    mm_k_cache c = {.k = b->kvbuf + (size_t)(2 * l) * b->kv_layer_bytes,
                    .v = b->kvbuf + (size_t)(2 * l + 1) * b->kv_layer_bytes,
                    .block_tables = b->d_tables,
                    .max_blocks = b->max_blocks,
                    .bs = b->base.block_size,
                    .nkv = b->nkv,
                    .hd = b->hd};
    return c;
}

/* Small batches attend with one block per query head (a block serving a
 * whole group does its heads' arithmetic in series), larger ones with one
 * per kv head (each K/V row read once per group). */
static int attn_per_head(const cuda_backend *b, int R)
{
    return b->nkv * R < b->nsm / 2;
}

/* Chunks of 128 positions in max_ctx, and up to how many of them the
 * cluster kernel takes (two a block: past that the splits' own chain of
 * chunks costs more than the merge kernel it saves). */
static int ctx_chunks(int max_ctx) { return (max_ctx + 127) / 128; }
#define CLUSTER_CHUNKS (2 * MM_K_ATTN_CLUSTER_MAX)

static int attn_mode(const cuda_backend *b, int R, int max_ctx)
{
    if (!attn_per_head(b, R))
        return MM_K_ATTN_GROUP;
    return b->cluster_attn && b->hd <= 128 && ctx_chunks(max_ctx) <= CLUSTER_CHUNKS
               ? MM_K_ATTN_HEAD_CLUSTER
               : MM_K_ATTN_HEAD;
}

/* Splits of the decode kernel for R queries: enough blocks to cover the
 * SMs twice, no more than the context has chunks of 128, no more than a
 * cluster holds in the cluster mode. */
static int decode_splits(const cuda_backend *b, int R, int max_ctx)
{
    int per = attn_per_head(b, R) ? b->nq : b->nkv;
    int want = (2 * b->nsm + per * R - 1) / (per * R);
    int chunks = ctx_chunks(max_ctx);
    if (want > chunks)
        want = chunks;
    if (attn_mode(b, R, max_ctx) == MM_K_ATTN_HEAD_CLUSTER && want > MM_K_ATTN_CLUSTER_MAX)
        want = MM_K_ATTN_CLUSTER_MAX;
    return want < 1 ? 1 : want;
}

/* Attention of one long prompt slice through cuBLAS. */
static int prefill_attention(cuda_backend *b, const mm_k_cache *c, const seg *g, char *err,
                             size_t errlen)
{
    int rc = 0, ctx = g->pos + g->n, group = b->nq / b->nkv, hd = b->hd;
    size_t es = esz(b);
    CKK(mm_k_gather_kv(b->dt, c, g->slot, ctx, b->kc, b->vc, b->stream));
    if (b->flash) {
        size_t off = (size_t)g->t0 * b->qd * es;
        CKK(mm_k_flash_prefill(b->dt, (const char *)b->q + off, b->qd, b->kc, b->vc, ctx, g->pos,
                               g->n, b->nq, b->nkv, hd, b->window, b->scale,
                               (char *)b->att + off, b->stream));
        return 0;
    }
    int tile = (int)(b->s_floats / ((size_t)group * (size_t)ctx));
    if (tile > g->n)
        tile = g->n;
    if (tile < 1) {
        mm_errf(err, errlen, "prefill attention: context %d exceeds the score buffer", ctx);
        return -EINVAL;
    }
    const float one = 1.0f, zero = 0.0f;
    for (int j = 0; j < b->nkv; j++) {
        const char *kj = (const char *)b->kc + (size_t)j * ctx * hd * es;
        const char *vj = (const char *)b->vc + (size_t)j * ctx * hd * es;
        for (int i0 = 0; i0 < g->n; i0 += tile) {
            int nn = g->n - i0 < tile ? g->n - i0 : tile;
            size_t qoff = ((size_t)(g->t0 + i0) * b->qd + (size_t)j * group * hd) * es;
            CKB(cublasGemmStridedBatchedEx(
                b->blas, CUBLAS_OP_T, CUBLAS_OP_N, ctx, nn, hd, &b->scale, kj, cu_type(b), hd, 0,
                (const char *)b->q + qoff, cu_type(b), b->qd, hd, &zero, b->S, CUDA_R_32F, ctx,
                (long long)nn * ctx, group, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            CKK(mm_k_softmax_causal(b->dt, b->S, group * nn, nn, ctx, ctx, g->pos + i0,
                                    b->window, b->P, b->stream));
            CKB(cublasGemmStridedBatchedEx(
                b->blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, nn, ctx, &one, vj, cu_type(b), hd, 0, b->P,
                cu_type(b), ctx, (long long)nn * ctx, &zero, (char *)b->att + qoff, cu_type(b),
                b->qd, hd, group, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
out:
    return rc;
}

/* The model over T tokens whose metadata is on the device: nd tokens
 * (META_TOK) attend through the decode kernel (its splits and mode sized
 * for contexts up to max_ctx), the segments listed in big[] through
 * cuBLAS; R logits rows (META_ROWS, or all T tokens when rows_all) end in
 * b->logits, and their argmax keys in b->keys_d when argmax. Launches
 * only: capturable when nbig == 0. */
static int run_model(cuda_backend *b, int T, int nd, int single, int max_ctx, const seg *big,
                     int nbig, int R, int rows_all, int argmax, char *err, size_t errlen)
{
    int rc = 0, H = b->H, I = b->I;
    const int32_t *ids = META_IDS(b->meta_d), *pos = META_POS(b->meta_d);
    const int32_t *slot = META_SLOT(b->meta_d), *tok = META_TOK(b->meta_d);
    /* the argmax keys are zeroed by the step's first kernel */
    CKK(mm_k_table_update(b->d_tables, META_UPD(b->meta_d), argmax ? b->keys_d : NULL,
                          argmax ? R : 0, b->stream));
    if (b->mega && T == 1 && nd == 1 && nbig == 0 && R == 1) {
        CKK(mm_k_mega_run(b->dt, &b->mk, b->nsm, b->stream));
        if (argmax)
            CKK(mm_k_argmax(b->logits, 1, b->V, META_NVALID(b->meta_d), b->keys_d, NULL,
                            b->stream));
        goto out;
    }
    prof_mark(b, P_EMBED);
    CKK(mm_k_embed(b->dt, b->embed, ids, T, H, b->x, b->early, b->stream));
    prof_mark(b, P_EMBED);
    /* the float output of the last o or down product (summed over the
     * ranks: dsum), np partials of T x H each, added to the residual by
     * the next norm */
    size_t dstride = (size_t)T * (size_t)H;
    int np = 0;
    int p2p = b->p2p && dstride * (size_t)(b->tp - 1) <= b->p2p_max;
    float *dout_down = p2p ? b->delta2 : b->delta;
    const float *dsum = b->delta;
    if (p2p)
        CKK(mm_k_tp_epoch(b->tpbuf + 2, b->stream));
    int nsplit = decode_splits(b, nd ? nd : 1, max_ctx);
    int amode = attn_mode(b, nd ? nd : 1, max_ctx);
    /* every token a decode token, one per sequence (single): attention
     * rotates q and writes the cache itself */
    int rope_in_attn = b->rope_fuse && single && nd == T && nbig == 0 &&
                       amode == MM_K_ATTN_HEAD_CLUSTER && !(b->skip & (SKIP_ROPE | SKIP_ATTN));
    for (int l = 0; l < b->L; l++) {
        const cu_layer *w = &b->layers[l];
        mm_k_cache c = layer_cache(b, l);
        if (b->prof && b->prof_n > 48) {
            cudaStreamSynchronize(b->stream);
            prof_flush(b);
            prof_mark(b, P_NORM);
        }
        if (!(b->skip & SKIP_NORM))
            CKK(mm_k_add_rmsnorm(b->dt, b->x, l ? dsum : NULL, np, dstride, NULL,
                                 w->attn_norm, b->eps, NULL, T, H, b->h, b->stream));
        prof_mark(b, P_NORM);
        if (!(b->skip & SKIP_QKV) &&
            (rc = linear(b, w->wqkv, b->h, T, b->qkvw, H, b->qkv, 0, NULL, err, errlen)) < 0)
            goto out;
        prof_mark(b, P_QKV);
        if (!(b->skip & SKIP_ROPE) && !rope_in_attn)
            CKK(mm_k_rope_store(b->dt, b->qkv, w->bqkv, b->inv_freq, pos, slot, T, b->nq, &c,
                                b->early, b->q, b->stream));
        prof_mark(b, P_ROPE);
        mm_k_rope_in rope = {b->qkv, w->bqkv, b->inv_freq};
        if (nd && !(b->skip & SKIP_ATTN))
            CKK(mm_k_attn_decode(b->dt, b->q, rope_in_attn ? &rope : NULL, tok, pos, slot,
                                 b->early ? META_FRESH(b->meta_d) : NULL, nd, b->nq, amode,
                                 b->window, b->scale, &c, nsplit, b->part, b->att, b->stream));
        for (int i = 0; i < nbig; i++)
            if ((rc = prefill_attention(b, &c, &big[i], err, errlen)) < 0)
                goto out;
        prof_mark(b, P_ATTN);
        if (!(b->skip & SKIP_O) &&
            (rc = linear(b, w->wo, b->att, T, H, b->qd, b->delta, 1, &np, err, errlen)) < 0)
            goto out;
        prof_mark(b, P_O);
        if ((rc = tp_sum(b, p2p, 0, l, np, dstride, b->delta, &dsum, err, errlen)) < 0)
            goto out;
        if (!(b->skip & SKIP_NORM))
            CKK(mm_k_add_rmsnorm(b->dt, b->x, dsum, np, dstride, w->bo, w->mlp_norm, b->eps,
                                 NULL, T, H, b->h, b->stream));
        prof_mark(b, P_NORM);
        if (b->skip & SKIP_GU) {
            /* measuring: no gate/up */
        } else if (use_gemv(T, 2 * I, H)) { /* SwiGLU in the product's epilogue */
            CKK(mm_k_gemv_swiglu(b->dt, w->wgu, b->h, T, I, H, b->act, b->stream));
            prof_mark(b, P_GU);
        } else {
            if ((rc = linear(b, w->wgu, b->h, T, 2 * I, H, b->gu, 0, NULL, err, errlen)) < 0)
                goto out;
            prof_mark(b, P_GU);
            CKK(mm_k_swiglu(b->dt, b->gu, T, I, b->act, b->stream));
            prof_mark(b, P_SWIGLU);
        }
        if (!(b->skip & SKIP_DOWN) &&
            (rc = linear(b, w->wdown, b->act, T, H, I, dout_down, 1, &np, err, errlen)) < 0)
            goto out;
        prof_mark(b, P_DOWN);
        if ((rc = tp_sum(b, p2p, 1, l, np, dstride, dout_down, &dsum, err, errlen)) < 0)
            goto out;
    }
    if (R == 0)
        goto out;
    CKK(mm_k_add_rmsnorm(b->dt, b->x, dsum, np, dstride, NULL, b->norm, b->eps,
                         rows_all ? NULL : META_ROWS(b->meta_d), R, H, b->hrows, b->stream));
    if ((rc = linear(b, b->lm_head, b->hrows, R, b->V, H, b->logits, 1, NULL, err, errlen)) < 0)
        goto out;
    if (argmax)
        CKK(mm_k_argmax(b->logits, R, b->V, META_NVALID(b->meta_d), b->keys_d, NULL,
                        b->stream));
    prof_mark(b, P_HEAD);
out:
    return rc;
}

static int graph_index(int n)
{
    for (int i = 0; i < N_GRAPH; i++)
        if (graph_sizes[i] >= n)
            return i;
    return -1;
}

/* Upload the metadata block: the five per-token arrays and the pending
 * block-table updates (forgotten by the caller once a launch that applies
 * them succeeded). */
static int upload_meta(cuda_backend *b, char *err, size_t errlen)
{
    int rc = 0;
    int32_t *u = META_UPD(b->meta_h);
    u[0] = b->n_upd;
    /* the ids below n_valid that fall in this rank's slice [voff, voff + V) */
    int nv = b->base.n_valid > 0 && b->base.n_valid < b->Vfull ? b->base.n_valid : b->Vfull;
    nv -= b->voff;
    *META_NVALID(b->meta_h) = nv < 0 ? 0 : nv > b->V ? b->V : nv;
    size_t n = META_INTS(b->n_upd);
    CK(cudaMemcpyAsync(b->meta_d, b->meta_h, n * sizeof(int32_t), cudaMemcpyHostToDevice,
                       b->stream));
out:
    return rc;
}

/* Capture the decode model for a padded batch of gs tokens. A failure to
 * capture is not fatal: steps of that size run eagerly. */
static int capture(cuda_backend *b, int gi, int ci, int bucket_ctx, char *err, size_t errlen)
{
    int gs = graph_sizes[gi], rc = 0;
    cudaGraph_t g = NULL;
    CK(cudaStreamBeginCapture(b->stream, cudaStreamCaptureModeThreadLocal));
    /* replayed for steps of one token per sequence only (run_sub) */
    rc = run_model(b, gs, gs, 1, bucket_ctx, NULL, 0, gs, 1, 1, err, errlen);
    cudaError_t e = cudaStreamEndCapture(b->stream, &g);
    if (rc < 0)
        goto out;
    CK(e);
    CK(cudaGraphInstantiate(&b->graph[gi][ci], g, 0));
out:
    if (g)
        cudaGraphDestroy(g);
    if (rc < 0)
        cudaGetLastError(); /* clear a capture error so eager steps go on */
    return rc;
}

/* Capture every decode graph a step can ask for (each padded batch size
 * up to max_seqs, each context bucket up to max_len) before serving, so no
 * step pays for a capture and nothing is instantiated on the serving path.
 * Capture records launches without running them: the metadata need not be
 * valid yet. A failure leaves decode steps eager. */
static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void capture_all(cuda_backend *b)
{
    char err[256];
    double t0 = mono_s();
    int n = 0, top = graph_index(b->base.max_seqs);
    if (b->no_graphs || top < 0)
        return;
    for (int gi = 0; gi <= top; gi++)
        for (int c = 512;; c *= 4) {
            int bctx, ci = ctx_bucket(c, b->base.max_len, &bctx);
            if (!b->graph[gi][ci]) {
                if (capture(b, gi, ci, bctx, err, sizeof err) < 0) {
                    mm_warn("cuda: graph capture for batch %d failed (%s); decode steps run "
                            "eagerly", graph_sizes[gi], err);
                    b->graph_failed = 1;
                    return;
                }
                n++;
            }
            if (bctx >= b->base.max_len || ci == N_CTXB - 1)
                break;
        }
    mm_info("cuda: captured %d decode graphs in %.2f s", n, mono_s() - t0);
}

/* Fill the plan arrays for padded decode rows gs > n: token 0 at position
 * 0 of the padding slot (max_seqs), whose table row points at block 0. */
static void pad_rows(cuda_backend *b, int n, int gs)
{
    for (int t = n; t < gs; t++) {
        META_IDS(b->meta_h)[t] = 0;
        META_POS(b->meta_h)[t] = 0;
        META_FRESH(b->meta_h)[t] = 0;
        META_SLOT(b->meta_h)[t] = b->base.max_seqs;
        META_TOK(b->meta_h)[t] = t;
        META_ROWS(b->meta_h)[t] = t;
    }
}

/* Copy the wanted rows back and hand them out; syncs the stream. A row
 * of logits goes to its columns [voff, voff + V) of the caller's row; an
 * argmax travels as its key (the value's order bits, then the id's
 * complement: larger values win, then lower ids), so the keys of several
 * ranks' vocabulary slices merge by taking the largest. */
static uint64_t global_key(const cuda_backend *b, unsigned long long k)
{
    if (!k)
        return 0;
    uint32_t id = 0xffffffffu - (uint32_t)(k & 0xffffffffu) + (uint32_t)b->voff;
    return (k & 0xffffffff00000000ull) | (0xffffffffu - id);
}

int32_t mm_cuda_key_id(uint64_t key)
{
    return key ? (int32_t)(0xffffffffu - (uint32_t)(key & 0xffffffffu)) : -1;
}

/* MM_CUDA_TRACE=2: every greedy row's device choice against the host's
 * argmax of the same row of logits (copied back too), mismatches logged;
 * 3: every row's top two logits logged as slot@position. */
static void trace_rows(const cuda_backend *b, int R)
{
    int nv = *META_NVALID(b->meta_h);
    for (int r = 0; r < R; r++) {
        if (!b->rows[r].argmax && b->trace < 3)
            continue;
        const float *row = b->logits_h + (size_t)r * (size_t)b->V;
        int best = -1;
        for (int j = 0; j < nv; j++)
            if (row[j] == row[j] && row[j] != -INFINITY && (best < 0 || row[j] > row[best]))
                best = j;
        int dev = mm_cuda_key_id(b->keys_h[r]);
        if (b->trace >= 3) {
            int t = META_ROWS(b->meta_h)[r], second = -1;
            for (int j = 0; j < nv; j++)
                if (j != best && row[j] == row[j] && (second < 0 || row[j] > row[second]))
                    second = j;
            mm_info("cuda row: %d@%d top %d %.5f second %d %.5f", META_SLOT(b->meta_h)[t],
                    META_POS(b->meta_h)[t], best, best >= 0 ? row[best] : 0.0, second,
                    second >= 0 ? row[second] : 0.0);
        }
        if (b->rows[r].argmax && dev != best)
            mm_warn("cuda trace: row %d (sequence %d): device argmax %d (%g), host %d (%g)", r,
                    b->rows[r].seq, dev, dev >= 0 && dev < b->V ? row[dev] : 0.0,
                    best, best >= 0 ? row[best] : 0.0);
    }
}

static int finish_rows(cuda_backend *b, mm_batch_seq *seqs, int R, int any_argmax, float *logits,
                       char *err, size_t errlen)
{
    int rc = 0;
    size_t V = (size_t)b->V;
    if (any_argmax)
        CK(cudaMemcpyAsync(b->keys_h, b->keys_d, (size_t)R * sizeof *b->keys_h,
                           cudaMemcpyDeviceToHost, b->stream));
    for (int r = 0; r < R;) {
        if (b->rows[r].argmax && b->trace < 2) {
            r++;
            continue;
        }
        int e = r;
        while (e < R && (!b->rows[e].argmax || b->trace >= 2))
            e++;
        CK(cudaMemcpyAsync(b->logits_h + (size_t)r * V, b->logits + (size_t)r * V,
                           (size_t)(e - r) * V * sizeof(float), cudaMemcpyDeviceToHost,
                           b->stream));
        r = e;
    }
    CK(cudaStreamSynchronize(b->stream));
    prof_flush(b);
    if (b->trace >= 2)
        trace_rows(b, R);
    for (int r = 0; r < R; r++) {
        const row_dst *d = &b->rows[r];
        if (d->argmax && b->tp > 1)
            b->seq_keys[d->seq] = global_key(b, b->keys_h[r]);
        else if (d->argmax)
            seqs[d->seq].argmax = mm_cuda_key_id(b->keys_h[r]);
        else
            memcpy(logits + d->out * (size_t)b->Vfull + (size_t)b->voff,
                   b->logits_h + (size_t)r * V, V * sizeof(float));
    }
out:
    return rc;
}

/* The kernels' process-wide settings, read once (tensor-parallel ranks are
 * created by several threads at once). */
static pthread_once_t kernel_knobs_once = PTHREAD_ONCE_INIT;

static void kernel_knobs(void)
{
    const char *env = getenv("MM_CUDA_PIPE");
    if (env)
        mm_k_set_gemv_pipe(atoi(env));
    env = getenv("MM_CUDA_PDL");
    if (env && strcmp(env, "0") == 0)
        mm_k_set_pdl(0);
    env = getenv("MM_CUDA_ONESTEP");
    const char *tiles = getenv("MM_CUDA_ONESTEP_TILES");
    if (env)
        mm_k_set_gemv_onestep(atoi(env), tiles ? atoi(tiles) : 8);
    env = getenv("MM_CUDA_GU_TILES");
    if (env)
        mm_k_set_gemv_swiglu_tiles(atoi(env));
    env = getenv("MM_CUDA_PRE");
    if (env)
        mm_k_set_gemv_pre(atoi(env));
}

/* MM_CUDA_TRACE=1: one log line per sub-step - its tokens, how they run
 * (graph of which batch size and context, or eagerly) and its segments as
 * slot@position+tokens - for finding which step compositions misbehave. */
static void trace_sub(const cuda_backend *b, int T, int nseg, int nd, int nbig, int R,
                      int max_ctx, int gi)
{
    char line[1024];
    size_t n = 0;
    n += (size_t)snprintf(line, sizeof line, "cuda step: T %d nd %d nbig %d R %d ctx %d %s%d", T,
                          nd, nbig, R, max_ctx, gi >= 0 ? "graph " : "eager",
                          gi >= 0 ? graph_sizes[gi] : 0);
    for (int i = 0; i < nseg && n < sizeof line - 32; i++)
        n += (size_t)snprintf(line + n, sizeof line - n, " %d@%d+%d", b->segs[i].slot,
                              b->segs[i].pos, b->segs[i].n);
    mm_info("%s", line);
}

/* Run the planned sub-step: T tokens in nseg segments, R rows. */
static int run_sub(cuda_backend *b, mm_batch_seq *seqs, int T, int nseg, int R, int any_argmax,
                   float *logits, char *err, size_t errlen)
{
    int rc = 0, nd = 0, nbig = 0, max_ctx = 1;
    seg big[64];
    for (int i = 0; i < nseg; i++) {
        const seg *g = &b->segs[i];
        if (g->n <= DECODE_SLICE || nbig == (int)(sizeof big / sizeof big[0])) {
            for (int t = 0; t < g->n; t++)
                META_TOK(b->meta_h)[nd++] = g->t0 + t;
            if (g->pos + g->n > max_ctx)
                max_ctx = g->pos + g->n;
        } else {
            big[nbig++] = *g;
        }
    }
    /* A decode-only step: replay (or first capture) the graph of its size.
     * Graphs are captured for one token per sequence; with RoPE inside
     * the attention, a step where a sequence has several (short prompts
     * asking for every row's logits) runs eagerly. */
    int single = nseg == T;
    int gi = nbig == 0 && nd == T && R == T && (single || !b->rope_fuse) ? graph_index(T) : -1;
    if (b->trace)
        trace_sub(b, T, nseg, nd, nbig, R, max_ctx, gi);
    if (gi >= 0 && !b->graph_failed && !b->no_graphs) {
        int gs = graph_sizes[gi], bctx, ci = ctx_bucket(max_ctx, b->base.max_len, &bctx);
        pad_rows(b, T, gs);
        if ((rc = upload_meta(b, err, errlen)) < 0)
            return rc;
        if (!b->graph[gi][ci] && capture(b, gi, ci, bctx, err, errlen) < 0) {
            mm_warn("cuda: graph capture for batch %d failed (%s); running steps eagerly", gs,
                    err);
            b->graph_failed = 1;
            /* Nothing was launched: the caller runs the step again, eagerly,
             * with the same pending updates. */
            return -EAGAIN;
        }
        CK(cudaGraphLaunch(b->graph[gi][ci], b->stream));
        b->n_upd = 0;
        return finish_rows(b, seqs, T, 1, logits, err, errlen);
    }
    if ((rc = upload_meta(b, err, errlen)) < 0)
        return rc;
    int rows_all = R == T;
    for (int r = 0; r < R && rows_all; r++)
        rows_all = META_ROWS(b->meta_h)[r] == r;
    if ((rc = run_model(b, T, nd, single, max_ctx, big, nbig, R, rows_all, any_argmax, err,
                        errlen)) < 0)
        return rc;
    b->n_upd = 0;
    return finish_rows(b, seqs, R, any_argmax, logits, err, errlen);
out:
    return rc;
}

static int forward_steps(cuda_backend *b, mm_batch_seq *seqs, int nseqs, float *logits,
                         char *err, size_t errlen)
{
    mm_backend *base = &b->base;
    for (int i = 0; i < nseqs; i++) {
        const mm_batch_seq *q = &seqs[i];
        if (q->slot < 0 || q->slot >= base->max_seqs) {
            mm_errf(err, errlen, "sequence %d: slot %d out of range [0, %d)", i, q->slot,
                    base->max_seqs);
            return -EINVAL;
        }
        int cap = b->slot_nblk[q->slot] * base->block_size;
        if (q->n_tokens < 0 || q->pos < 0 || q->pos > b->slot_len[q->slot] ||
            q->n_tokens > cap - q->pos || (q->n_tokens && !q->tokens)) {
            mm_errf(err, errlen,
                    "sequence %d: %d tokens at position %d (slot %d holds %d, reserved %d)", i,
                    q->n_tokens, q->pos, q->slot, b->slot_len[q->slot], cap);
            return -EINVAL;
        }
        if ((q->want == MM_LOGITS_LAST || q->want == MM_LOGITS_ARGMAX) && q->n_tokens == 0) {
            mm_errf(err, errlen, "sequence %d: logits wanted for no tokens", i);
            return -EINVAL;
        }
        for (int j = 0; j < i; j++)
            if (seqs[j].slot == q->slot) {
                mm_errf(err, errlen, "sequences %d and %d share slot %d", j, i, q->slot);
                return -EINVAL;
            }
        for (int t = 0; t < q->n_tokens; t++)
            if (q->tokens[t] < 0 || q->tokens[t] >= b->Vfull) {
                mm_errf(err, errlen, "sequence %d: token %d out of range [0, %d)", i,
                        (int)q->tokens[t], b->Vfull);
                return -EINVAL;
            }
    }
    int T = 0, nseg = 0, R = 0, any_argmax = 0, rc;
    size_t out_row = 0;
    for (int i = 0; i < nseqs; i++) {
        const mm_batch_seq *q = &seqs[i];
        for (int t = 0; t < q->n_tokens; t++) {
            int row = q->want == MM_LOGITS_ALL ||
                      ((q->want == MM_LOGITS_LAST || q->want == MM_LOGITS_ARGMAX) &&
                       t == q->n_tokens - 1);
            if (T == MAX_STEP || (row && R == b->Rmax)) {
                rc = run_sub(b, seqs, T, nseg, R, any_argmax, logits, err, errlen);
                if (rc == -EAGAIN)
                    rc = run_sub(b, seqs, T, nseg, R, any_argmax, logits, err, errlen);
                if (rc < 0)
                    return rc;
                T = nseg = R = any_argmax = 0;
            }
            if (t == 0 || nseg == 0 || b->segs[nseg - 1].slot != q->slot)
                b->segs[nseg++] = (seg){q->slot, q->pos + t, T, 0};
            b->segs[nseg - 1].n++;
            META_IDS(b->meta_h)[T] = q->tokens[t];
            META_POS(b->meta_h)[T] = q->pos + t;
            META_FRESH(b->meta_h)[T] = b->segs[nseg - 1].pos;
            META_SLOT(b->meta_h)[T] = q->slot;
            if (row) {
                int am = q->want == MM_LOGITS_ARGMAX;
                b->rows[R] = (row_dst){i, am, am ? 0 : out_row};
                if (!am)
                    out_row++;
                any_argmax |= am;
                META_ROWS(b->meta_h)[R++] = T;
            }
            T++;
        }
        b->slot_len[q->slot] = q->pos + q->n_tokens;
    }
    if (T) {
        rc = run_sub(b, seqs, T, nseg, R, any_argmax, logits, err, errlen);
        if (rc == -EAGAIN)
            rc = run_sub(b, seqs, T, nseg, R, any_argmax, logits, err, errlen);
        if (rc < 0)
            return rc;
    }
    if (b->prof && ++b->prof_steps == 64)
        prof_report(b);
    return 0;
}

/* After a failed step: is the error sticky (an illegal address, a launch
 * failure, ...)? Such an error stays with the context - every later call
 * returns it again, even after cudaGetLastError - so no step can run
 * until the process restarts. A plain one (a bad launch configuration)
 * clears, and the stream then synchronizes. */
static int device_lost(cuda_backend *b)
{
    cudaGetLastError();
    if (cudaStreamSynchronize(b->stream) == cudaSuccess)
        return 0;
    cudaGetLastError();
    return cudaDeviceSynchronize() != cudaSuccess;
}

static int cuda_forward(mm_backend *base, mm_batch_seq *seqs, int nseqs, float *logits,
                        char *err, size_t errlen)
{
    cuda_backend *b = (cuda_backend *)base;
    if (b->lost) {
        mm_errf(err, errlen, "%s", b->lost_msg);
        return -ENOTRECOVERABLE;
    }
    /* the calling thread's device (a tensor-parallel rank's thread, or the
     * engine's for rank 0) */
    cudaError_t se = cudaSetDevice(b->dev);
    if (se != cudaSuccess) {
        cu_fail(err, errlen, "cudaSetDevice", se);
        return -EIO;
    }
    if (b->fault_step > 0 && ++b->steps_run == b->fault_step &&
        (b->fault_rank < 0 || b->fault_rank == b->rank))
        mm_k_test_fault(b->stream);
    int rc = forward_steps(b, seqs, nseqs, logits, err, errlen);
    if (rc < 0 && rc != -EINVAL && device_lost(b)) {
        b->lost = 1;
        snprintf(b->lost_msg, sizeof b->lost_msg, "the CUDA device is unusable: %s", err);
        mm_errf(err, errlen, "%s", b->lost_msg);
        return -ENOTRECOVERABLE;
    }
    return rc;
}

/* ---- lifetime ---- */

static void cuda_free(mm_backend *base)
{
    cuda_backend *b = (cuda_backend *)base;
    if (!b)
        return;
    cudaSetDevice(b->dev);
    if (b->stream)
        cudaStreamSynchronize(b->stream);
    prof_report(b);
    for (int i = 0; i < 64; i++)
        if (b->prof_ev[i])
            cudaEventDestroy(b->prof_ev[i]);
    for (int i = 0; i < N_GRAPH; i++)
        for (int j = 0; j < N_CTXB; j++)
            if (b->graph[i][j])
                cudaGraphExecDestroy(b->graph[i][j]);
    if (b->blas)
        cublasDestroy(b->blas);
    void *dev[] = {b->wbuf, b->kvbuf, b->d_tables, b->x, b->logits, b->part, b->S, b->h, b->qkv,
                   b->q, b->att, b->delta, b->gu, b->act, b->kc, b->vc, b->P, b->hrows,
                   b->keys_d, b->meta_d, b->blas_ws, b->inv_freq, b->mk_layers, b->mk_scratch,
                   b->delta2, b->dsum, b->tpbuf};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i])
            cudaFree(dev[i]);
    if (b->meta_h)
        cudaFreeHost(b->meta_h);
    if (b->logits_h)
        cudaFreeHost(b->logits_h);
    if (b->keys_h)
        cudaFreeHost(b->keys_h);
    if (b->stream)
        cudaStreamDestroy(b->stream);
    free(b->layers);
    free(b->free_blk);
    free(b->slot_blk);
    free(b->slot_nblk);
    free(b->slot_len);
    free(b->seq_keys);
    free(b->segs);
    free(b->rows);
    free(b);
}

static const mm_backend_ops cuda_ops = {
    .name = "cuda",
    .forward = cuda_forward,
    .reserve = cuda_reserve,
    .truncate = cuda_truncate,
    .free = cuda_free,
};

int mm_backend_cuda_built(void) { return 1; }

int mm_backend_cuda_mega(const mm_backend *base)
{
    return base && base->ops == &cuda_ops && ((const cuda_backend *)base)->mega;
}

int mm_backend_cuda_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

static double gib(size_t n) { return (double)n / (double)(1ull << 30); }

/* The persistent decode kernel, when asked for (MM_CUDA_MEGA=1) and where
 * it applies: sm_90+, a shape mm_k_mega_setup accepts, no measuring switch
 * that it would bypass. Not applying is not an error: the layered kernels
 * serve those steps. */
static int setup_mega(cuda_backend *b, const struct cudaDeviceProp *prop, char *err,
                      size_t errlen)
{
    int rc = 0;
    const char *env = getenv("MM_CUDA_MEGA");
    if (!env || strcmp(env, "1") != 0 || b->skip || b->prof || prop->major < 9)
        return 0;
    mm_k_mega *p = &b->mk;
    *p = (mm_k_mega){.L = b->L, .H = b->H, .I = b->I, .nq = b->nq, .nkv = b->nkv, .hd = b->hd,
                     .V = b->V, .window = b->window, .eps = b->eps, .scale = b->scale,
                     .embed = b->embed, .lm_head = b->lm_head, .norm = b->norm,
                     .inv_freq = b->inv_freq, .kv = b->kvbuf,
                     .kv_layer_bytes = b->kv_layer_bytes, .block_tables = b->d_tables,
                     .max_blocks = b->max_blocks, .bs = b->base.block_size,
                     .ids = META_IDS(b->meta_d), .pos = META_POS(b->meta_d),
                     .slot = META_SLOT(b->meta_d), .x = b->x, .logits = b->logits,
                     .qkv = b->qkv, .att = b->att, .act = b->act};
    env = getenv("MM_CUDA_MEGA_SKIP");
    p->skip = env ? atoi(env) & 15 : 0;
    if (p->skip)
        mm_warn("cuda: MM_CUDA_MEGA_SKIP=%d leaves work out of the persistent kernel: answers "
                "are wrong (for measuring only)", p->skip);
    int e = mm_k_mega_setup(b->dt, p, b->nsm, prop->sharedMemPerBlockOptin);
    if (e) {
        cudaGetLastError();
        mm_info("cuda: single-sequence steps use the layered kernels (the persistent kernel "
                "does not fit this shape: %s)", cudaGetErrorString((cudaError_t)e));
        return 0;
    }
    size_t nl = (size_t)b->L;
    mm_k_mega_layer *hl = calloc(nl, sizeof *hl);
    if (!hl) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (int l = 0; l < b->L; l++) {
        const cu_layer *w = &b->layers[l];
        hl[l] = (mm_k_mega_layer){w->wqkv, w->bqkv, w->wo, w->bo, w->wgu, w->wdown,
                                  w->attn_norm, w->mlp_norm};
    }
    CK(cudaMalloc((void **)&b->mk_layers, nl * sizeof *hl));
    CK(cudaMemcpy(b->mk_layers, hl, nl * sizeof *hl, cudaMemcpyHostToDevice));
    /* the attention splits' partials, then the counters, zeroed */
    size_t part = (size_t)b->nq * (size_t)b->nsm * (size_t)(b->hd + 2) * sizeof(float);
    size_t ctrs = (size_t)b->nq * sizeof(int) + MM_K_MEGA_CTRS * sizeof(unsigned);
    CK(cudaMalloc((void **)&b->mk_scratch, part + ctrs));
    CK(cudaMemset(b->mk_scratch, 0, part + ctrs));
    p->part = (float *)b->mk_scratch;
    p->head_ctr = (int *)(b->mk_scratch + part);
    p->ctr = (unsigned *)(p->head_ctr + b->nq);
    p->layers = b->mk_layers;
    b->mega = 1;
    mm_info("cuda: single-sequence decode steps run as one persistent kernel (%d blocks, "
            "%d stages of %d KiB)", b->nsm, p->nst, p->stg / 1024);
out:
    free(hl);
    return rc;
}

/* Device buffers of the step scratch, allocated in one go. */
static int alloc_scratch(cuda_backend *b, char *err, size_t errlen)
{
    int rc = 0;
    size_t T = MAX_STEP, es = esz(b), group = (size_t)(b->nq / b->nkv);
    size_t L = (size_t)b->base.max_len;
    size_t s_need = group * L; /* one query row of one group */
    b->s_floats = group * (T < L ? T : L) * L;
    if (b->s_floats > ATT_S_CAP)
        b->s_floats = ATT_S_CAP > s_need ? ATT_S_CAP : s_need;
    if (b->flash) /* the scores of the cuBLAS prefill path: unused */
        b->s_floats = 0;
    size_t parts = 0;
    for (int r = 1; r <= MAX_STEP; r++) {
        size_t p = mm_k_attn_part_floats(r, b->nq, b->hd, decode_splits(b, r, b->base.max_len));
        parts = p > parts ? p : parts;
    }
    struct { void **p; size_t bytes; } a[] = {
        {(void **)&b->x, T * b->H * 4},
        {(void **)&b->delta, T * b->H * 4}, /* float partials: at most 8 splits x 8 rows */
        {&b->h, T * b->H * es},
        {&b->qkv, T * b->qkvw * es},
        {&b->q, T * b->qd * es},
        {&b->att, T * b->qd * es},
        {&b->gu, T * 2 * b->I * es},
        {&b->act, T * b->I * es},
        {&b->hrows, (size_t)b->Rmax * b->H * es},
        {(void **)&b->logits, (size_t)b->Rmax * b->V * 4},
        {(void **)&b->keys_d, (size_t)b->Rmax * 8},
        {(void **)&b->part, parts * 4},
        {(void **)&b->S, b->s_floats * 4},
        {&b->P, b->s_floats * es},
        {&b->kc, (size_t)b->nkv * L * b->hd * es},
        {&b->vc, (size_t)b->nkv * L * b->hd * es},
        {&b->blas_ws, BLAS_WS},
        {(void **)&b->meta_d, META_INTS(b->upd_cap) * 4},
        /* tensor parallelism's second output buffer, sums, flags and epoch */
        {(void **)&b->delta2, b->tp > 1 ? T * b->H * 4 : 0},
        {(void **)&b->dsum, b->tp > 1 ? T * b->H * 4 : 0},
        {(void **)&b->tpbuf, b->tp > 1 ? 3 * sizeof(unsigned) : 0},
    };
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) {
        if (a[i].bytes == 0)
            continue;
        CK(cudaMalloc(a[i].p, a[i].bytes));
        CK(cudaMemset(*a[i].p, 0, a[i].bytes));
    }
    CK(cudaMallocHost((void **)&b->meta_h, META_INTS(b->upd_cap) * 4));
    CK(cudaMallocHost((void **)&b->logits_h, (size_t)b->Rmax * b->V * 4));
    CK(cudaMallocHost((void **)&b->keys_h, (size_t)b->Rmax * sizeof *b->keys_h));
    memset(b->meta_h, 0, META_INTS(0) * 4);
out:
    return rc;
}

/* Can this rank read every other GPU's memory (devices 0..tp-1), with
 * atomics? Turns peer access on where it can; MM_CUDA_TP_P2P=0 says no
 * (NCCL then sums everything). */
static int peer_access(cuda_backend *b, int ndev, int tp)
{
    const char *env = getenv("MM_CUDA_TP_P2P");
    if ((env && strcmp(env, "0") == 0) || tp > ndev)
        return 0;
    int ok = 1;
    for (int d = 0; d < tp && ok; d++) {
        int can = 0, atomics = 0;
        if (d == b->dev)
            continue;
        /* the flags are atomic adds into peer memory (NVLink has them; a
         * PCIe path may not) */
        ok = cudaDeviceCanAccessPeer(&can, b->dev, d) == cudaSuccess && can &&
             cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, b->dev,
                                       d) == cudaSuccess &&
             atomics;
        if (ok) {
            cudaError_t e = cudaDeviceEnablePeerAccess(d, 0);
            ok = e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
        }
    }
    cudaGetLastError(); /* "already enabled" or a refusal: not this step's error */
    return ok;
}

/* A rank's share of n things split tp ways (the caller checked that they
 * divide). */
static int share(int n, int tp) { return n / tp; }

int mm_backend_cuda_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                        char *err, size_t errlen)
{
    if (o->tensor_parallel > 1)
        return mm_backend_tp_new(m, o, out, err, errlen);
    mm_cuda_rank one = {.dev = 0, .rank = 0, .tp = 1};
    return mm_cuda_rank_new(m, o, &one, out, err, errlen);
}

uint64_t mm_cuda_rank_key(const mm_backend *base, int seq)
{
    const cuda_backend *b = (const cuda_backend *)base;
    return seq >= 0 && seq <= base->max_seqs ? b->seq_keys[seq] : 0;
}

int mm_cuda_rank_new(const struct mm_model *m, const mm_backend_opts *o, const mm_cuda_rank *r,
                     mm_backend **out, char *err, size_t errlen)
{
    const mm_model_config *c = &m->cfg;
    cuda_backend *b = calloc(1, sizeof *b);
    placer pl = {0};
    int rc = 0, ndev = 0, agreed = 0, warming = 0, tp = r->tp;
    char who[32] = "";
    *out = NULL;
    if (!b) {
        mm_errf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    if (tp > 1)
        snprintf(who, sizeof who, "GPU %d of %d: ", r->rank, tp);
    b->dev = r->dev;
    b->rank = r->rank;
    b->tp = tp;
    b->comm = r->comm;
    b->base.ops = &cuda_ops;
    b->base.model = m;
    b->base.max_seqs = o->max_seqs;
    b->base.max_len = o->max_len;
    b->base.block_size = o->block_size > 0 ? o->block_size : 16;
    b->cfg = c;
    b->H = c->hidden_size;
    b->hd = c->head_dim;
    /* This rank's query heads and the kv heads they read: with fewer kv
     * heads than ranks, each kv head is held by every rank its group of
     * query heads spans. */
    b->nq = share(c->num_attention_heads, tp);
    b->q0 = r->rank * b->nq;
    if (c->num_key_value_heads >= tp) {
        b->nkv = share(c->num_key_value_heads, tp);
        b->kv0 = r->rank * b->nkv;
    } else {
        b->nkv = 1;
        b->kv0 = b->q0 / (c->num_attention_heads / c->num_key_value_heads);
    }
    b->I = share(c->intermediate_size, tp);
    b->qd = b->nq * b->hd;
    b->qkvw = (b->nq + 2 * b->nkv) * b->hd;
    b->Vfull = c->vocab_size;
    {
        int per = (c->vocab_size + tp - 1) / tp;
        b->voff = r->rank * per;
        b->V = c->vocab_size - b->voff < per ? c->vocab_size - b->voff : per;
    }
    b->L = c->num_hidden_layers;
    b->window = c->sliding_window;
    b->eps = (float)c->rms_norm_eps;
    b->scale = 1.0f / sqrtf((float)b->hd);
    b->dt = m->layers[0].q.dtype == MM_DT_F16 ? MM_KDT_F16 : MM_KDT_BF16;
    const char *env = getenv("MM_CUDA_GRAPHS");
    b->no_graphs = env && strcmp(env, "0") == 0;
    env = getenv("MM_CUDA_TEST_FAULT_STEP");
    b->fault_step = env ? atol(env) : 0;
    env = getenv("MM_CUDA_TEST_FAULT_RANK");
    b->fault_rank = env ? atoi(env) : -1;
    env = getenv("MM_CUDA_SKIP");
    b->skip = env ? atoi(env) & 127 : 0;
    if (b->skip)
        mm_warn("cuda: MM_CUDA_SKIP=%d leaves kernels out of every step: answers are wrong "
                "(for measuring only)", b->skip);
    env = getenv("MM_CUDA_PROFILE");
    b->prof = env && strcmp(env, "1") == 0;
    b->no_graphs |= b->prof;
    /* Logits rows per sub-step: a whole decode batch, padded up to its
     * graph size (the graph computes every padded row). */
    b->Rmax = o->max_seqs > 64 ? o->max_seqs : 64;
    if (graph_index(b->Rmax) >= 0)
        b->Rmax = graph_sizes[graph_index(b->Rmax)];
    if (b->Rmax > MAX_STEP)
        b->Rmax = MAX_STEP;

    if (!mm_k_head_dim_ok(b->hd) || b->H % 8 || b->I % 8 || !mm_k_attn_group_ok(b->nq, b->nkv)) {
        mm_errf(err, errlen,
                "model shape not supported by the cuda kernels (head_dim %d: 16/32/64/128/256; "
                "hidden %d and intermediate %d must be multiples of 8; %d query heads per kv "
                "head: at most 8)",
                b->hd, b->H, b->I, b->nkv > 0 ? b->nq / b->nkv : 0);
        rc = -ENOTSUP;
        goto out;
    }
    if (b->H > 12288) {
        mm_errf(err, errlen, "hidden size %d above the 12288 the norm kernel holds", b->H);
        rc = -ENOTSUP;
        goto out;
    }
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev == 0) {
        const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
        mm_errf(err, errlen, "no CUDA device (%s; CUDA_VISIBLE_DEVICES=%s)",
                ce != cudaSuccess ? cudaGetErrorString(ce) : "none found", cvd ? cvd : "unset");
        rc = -ENODEV;
        goto out;
    }
    CK(cudaSetDevice(b->dev));
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, b->dev));
    b->nsm = prop.multiProcessorCount;
    int cl = 0;
    CK(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, b->dev));
    env = getenv("MM_CUDA_CLUSTER");
    b->cluster_attn = cl && !(env && strcmp(env, "0") == 0);
    env = getenv("MM_CUDA_TRACE");
    b->trace = env ? atoi(env) : 0;
    pthread_once(&kernel_knobs_once, kernel_knobs);
    env = getenv("MM_CUDA_EARLY");
    b->early = !(env && strcmp(env, "0") == 0);
    env = getenv("MM_CUDA_ROPE_FUSE");
    b->rope_fuse = b->early && !(env && strcmp(env, "0") == 0);
    env = getenv("MM_CUDA_FLASH");
    b->flash = prop.major >= 8 && !(env && strcmp(env, "0") == 0) &&
              mm_k_flash_setup(b->dt, b->hd) == 0;
    cudaGetLastError(); /* a head size the flash kernel lacks is no error */

    CK(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
    CKB(cublasCreate(&b->blas));
    CKB(cublasSetStream(b->blas, b->stream));

    /* Weights: measure, check the memory, then upload. */
    if (!(b->layers = calloc((size_t)b->L, sizeof *b->layers))) {
        mm_errf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    pl = (placer){.b = b, .measure = 1, .err = err, .errlen = errlen};
    if ((rc = place_all(&pl, m)) < 0)
        goto out;
    size_t wbytes = pl.off, free0 = 0, total = 0;
    CK(cudaMemGetInfo(&free0, &total));
    if (wbytes + HEADROOM > free0) {
        mm_errf(err, errlen,
                "%sout of GPU memory loading weights: need %.2f GiB (+%.2f GiB working room), "
                "%.2f GiB free of %.2f GiB on %s",
                who, gib(wbytes), gib(HEADROOM), gib(free0), gib(total), prop.name);
        rc = -ENOMEM;
        goto out;
    }
    CK(cudaMalloc((void **)&b->wbuf, wbytes));
    pl.measure = 0;
    pl.off = 0;
    pl.stage_cap = 64u << 20;
    CK(cudaMallocHost((void **)&pl.stage, pl.stage_cap));
    if ((rc = place_all(&pl, m)) < 0)
        goto out;
    {
        int half = b->hd / 2;
        float *inv = malloc((size_t)half * sizeof *inv);
        if (!inv) {
            rc = -ENOMEM;
            mm_errf(err, errlen, "out of memory");
            goto out;
        }
        mm_model_rope_inv_freq(c, inv);
        cudaError_t e1 = cudaMalloc((void **)&b->inv_freq, (size_t)half * sizeof *inv);
        cudaError_t e2 = e1 == cudaSuccess ? cudaMemcpy(b->inv_freq, inv, (size_t)half * 4,
                                                        cudaMemcpyHostToDevice) : e1;
        free(inv);
        CK(e2);
    }

    /* Slots, then the scratch, then the KV pool from what is left. */
    b->max_blocks = (o->max_len + b->base.block_size - 1) / b->base.block_size;
    size_t table_n = (size_t)(o->max_seqs + 1) * (size_t)b->max_blocks;
    b->upd_cap = (int)table_n;
    b->slot_blk = calloc(table_n, sizeof *b->slot_blk);
    b->slot_nblk = calloc((size_t)o->max_seqs + 1, sizeof *b->slot_nblk);
    b->slot_len = calloc((size_t)o->max_seqs + 1, sizeof *b->slot_len);
    b->seq_keys = calloc((size_t)o->max_seqs + 1, sizeof *b->seq_keys);
    b->segs = calloc(MAX_STEP, sizeof *b->segs);
    b->rows = calloc(MAX_STEP, sizeof *b->rows);
    if (!b->slot_blk || !b->slot_nblk || !b->slot_len || !b->seq_keys || !b->segs || !b->rows) {
        rc = -ENOMEM;
        mm_errf(err, errlen, "out of memory");
        goto out;
    }
    if ((rc = alloc_scratch(b, err, errlen)) < 0) {
        if (rc == -ENOMEM) {
            size_t f = 0, t = 0;
            cudaMemGetInfo(&f, &t);
            char why[256];
            snprintf(why, sizeof why, "%s", err);
            mm_errf(err, errlen,
                    "%sout of GPU memory for the step buffers after %.2f GiB of weights "
                    "(%.2f GiB free of %.2f GiB): %s; lower --max-model-len or --max-num-seqs",
                    who, gib(wbytes), gib(f), gib(t), why);
        }
        goto out;
    }
    CK(cudaMalloc((void **)&b->d_tables, table_n * sizeof(int32_t)));
    CK(cudaMemset(b->d_tables, 0, table_n * sizeof(int32_t)));
    CKB(cublasSetWorkspace(b->blas, b->blas_ws, BLAS_WS));

    size_t block_bytes = (size_t)b->L * 2 * (size_t)b->nkv * (size_t)b->base.block_size *
                         (size_t)b->hd * esz(b);
    size_t free1 = 0;
    CK(cudaMemGetInfo(&free1, &total));
    size_t budget = (size_t)((double)free1 * (double)o->gpu_memory_utilization);
    if (budget + HEADROOM > free1)
        budget = free1 > HEADROOM ? free1 - HEADROOM : 0;
    long long nblk = o->num_blocks > 0 ? o->num_blocks : (long long)(budget / block_bytes) - 1;
    if (nblk > 0x3fffffff)
        nblk = 0x3fffffff;
    /* Every rank holds the same blocks (of its own kv heads): the pool is
     * the smallest any GPU has room for. */
    if (tp > 1) {
        mm_cuda_rank_info me = {.nblk = nblk, .p2p = peer_access(b, ndev, tp),
                                .delta = {b->delta, b->delta2}, .flags = b->tpbuf};
        mm_cuda_rank_info all[MM_K_TP_MAX];
        agreed++;
        if ((rc = r->agree(r->ctx, 1, &me, all)) < 0) {
            mm_errf(err, errlen, "%sstopped: another GPU failed", who);
            goto out;
        }
        nblk = me.nblk;
        env = getenv("MM_CUDA_TP_P2P_MAX_MB");
        b->p2p_max = env ? (size_t)atol(env) << 18 : tp == 2 ? SIZE_MAX : P2P_MAX_FLOATS;
        if ((b->p2p = me.p2p)) {
            b->tpk = (mm_k_tp){.n = tp, .rank = b->rank, .L = b->L, .epoch = b->tpbuf + 2};
            for (int i = 0; i < tp; i++) {
                b->tpk.src[0][i] = all[i].delta[0];
                b->tpk.src[1][i] = all[i].delta[1];
                b->tpk.flag[i] = all[i].flags;
            }
        }
        /* One sum on every rank before any graph is captured: NCCL sets up
         * its connections on the first one, which a capture must not do. */
        warming = 1;
        CK(cudaMemsetAsync(b->delta, 0, sizeof(float), b->stream));
        if ((rc = mm_nccl_sum_f32(b->comm, b->delta, 1, b->stream, err, errlen)) < 0)
            goto out;
        CK(cudaStreamSynchronize(b->stream));
        warming = 0;
    }
    if (nblk < b->max_blocks) {
        mm_errf(err, errlen,
                "%sKV cache too small: %lld blocks of %d positions (%.1f KiB each) hold fewer "
                "than --max-model-len %d; %.2f GiB free after %.2f GiB of weights, "
                "--gpu-memory-utilization %.2f; lower --max-model-len or raise the utilization",
                who, nblk, b->base.block_size, (double)block_bytes / 1024.0, o->max_len,
                gib(free1), gib(wbytes), o->gpu_memory_utilization);
        rc = -ENOMEM;
        goto out;
    }
    b->kv_layer_bytes = (size_t)(nblk + 1) * (size_t)b->nkv * (size_t)b->base.block_size *
                        (size_t)b->hd * esz(b);
    ce = cudaMalloc((void **)&b->kvbuf, b->kv_layer_bytes * 2 * (size_t)b->L);
    if (ce != cudaSuccess) {
        mm_errf(err, errlen, "%sout of GPU memory for the KV cache: %.2f GiB for %lld blocks (%s)",
                who, gib(b->kv_layer_bytes * 2 * (size_t)b->L), nblk, cudaGetErrorString(ce));
        rc = -ENOMEM;
        goto out;
    }
    CK(cudaMemset(b->kvbuf, 0, b->kv_layer_bytes * 2 * (size_t)b->L));
    b->base.num_blocks = (int)nblk;
    if (!(b->free_blk = malloc((size_t)nblk * sizeof *b->free_blk))) {
        rc = -ENOMEM;
        mm_errf(err, errlen, "out of memory");
        goto out;
    }
    /* Pop order: low block ids first. */
    for (long long i = 0; i < nblk; i++)
        b->free_blk[i] = (int)(nblk - i);
    b->n_free = (int)nblk;
    if (tp > 1) {
        agreed++;
        if ((rc = r->agree(r->ctx, 1, NULL, NULL)) < 0) {
            mm_errf(err, errlen, "%sstopped: another GPU failed", who);
            goto out;
        }
    } else if ((rc = setup_mega(b, &prop, err, errlen)) < 0) {
        goto out;
    }
    CK(cudaDeviceSynchronize());
    capture_all(b);
    mm_info("cuda: %s%s, %d SMs; weights %.2f GiB (%s); KV cache %lld blocks x %d positions = "
            "%lld positions (%.2f GiB)%s",
            who, prop.name, b->nsm, gib(wbytes), b->dt == MM_KDT_F16 ? "f16" : "bf16", nblk,
            b->base.block_size, nblk * b->base.block_size,
            gib(b->kv_layer_bytes * 2 * (size_t)b->L),
            tp < 2     ? ""
            : !b->p2p  ? "; sums over the GPUs through NCCL"
            : b->p2p_max == SIZE_MAX ? "; sums over the GPUs through peer memory"
                                     : "; sums over the GPUs through peer memory (NCCL for large steps)");
    *out = &b->base;
out:
    if (pl.stage)
        cudaFreeHost(pl.stage);
    /* A rank that failed still takes part in the agreements it missed, so
     * the others do not wait for it; failing in the first sum, it may have
     * left them waiting there. */
    if (rc < 0 && warming)
        r->abort(r->ctx);
    while (tp > 1 && agreed < 2) {
        agreed++;
        r->agree(r->ctx, 0, NULL, NULL);
    }
    if (rc < 0 && b)
        cuda_free(&b->base);
    return rc;
}
