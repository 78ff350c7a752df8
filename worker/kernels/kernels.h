/* kernels.h: the CUDA kernels of the worker's GPU backend, as C launchers.
 *
 * Everything here is asynchronous on the given stream and returns the
 * launch status (0 = cudaSuccess) so the caller checks every launch; no
 * launcher allocates, so all of them can be captured in a CUDA graph.
 *
 * Conventions: activations and weights share one 16-bit type (dt: bf16 or
 * f16); the residual stream, norms' weights, RoPE frequencies, softmax and
 * logits are float32. Matrices are row-major, a weight [rows = out
 * features, cols = in features] as Hugging Face stores it.
 *
 * The KV cache is paged: per layer, K and V are [num_blocks][n_kv][bs][hd]
 * in dt; a slot's block table row (max_blocks int32) maps position p to
 * block row[p / bs], offset p % bs. */
#ifndef MM_KERNELS_H
#define MM_KERNELS_H
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MM_KDT_BF16 = 0, MM_KDT_F16 = 1 } mm_kdt;

/* Head sizes the attention kernels are built for, and query heads per kv
 * head (at most 8). */
int mm_k_head_dim_ok(int hd);
int mm_k_attn_group_ok(int nq, int nkv);

/* Launch kernels programmatically (the default; each then starts while its
 * predecessor drains and waits for it with griddepcontrol.wait) or as
 * ordinary launches (0: for ruling out ordering faults). Process-wide. */
void mm_k_set_pdl(int on);

/* x[t, :] = table[ids[t], :] widened to float (T rows of H). serial: an
 * ordinary launch instead of a programmatic one, so it starts only after
 * the kernels before it (the block-table update) have finished; every
 * kernel after it then starts later still, and may read the block tables
 * before its griddepcontrol.wait (mm_k_rope_store's and mm_k_attn_decode's
 * early reads). */
int mm_k_embed(mm_kdt dt, const void *table, const int32_t *ids, int T, int H, float *x,
               int serial, cudaStream_t s);

/* The residual add fused with RMSNorm. For r < R, t = rows ? rows[r] : r:
 * v = x[t] + sum over the nd (<= 8) partials of delta[p * dstride + t * H] +
 * dbias (delta float, dbias dt; either may be NULL); when rows is NULL
 * x[t] = v is stored; y[r] = v / sqrt(mean(v^2) + eps) * w, in dt. */
int mm_k_add_rmsnorm(mm_kdt dt, float *x, const float *delta, int nd, size_t dstride,
                     const void *dbias, const float *w, float eps, const int32_t *rows, int R,
                     int H, void *y, cudaStream_t s);

/* act[t, i] = silu(gu[t, 2i]) * gu[t, 2i + 1]: the gate/up weight is laid
 * out with gate row i and up row i interleaved, so its product's output
 * pairs them too (and the gemv below can finish SwiGLU itself). */
int mm_k_swiglu(mm_kdt dt, const void *gu, int T, int I, void *act, cudaStream_t s);

/* Bias, rotary embedding (rotate-half form, angle pos * inv_freq[i]) and
 * the cache write for T tokens of qkv [T][(nq + 2 nkv) hd]: q goes to
 * q_out [T][nq hd], k and v into the paged cache at (slot[t], pos[t]).
 * early: pos, slot and the block tables are read before
 * griddepcontrol.wait (after a serial mm_k_embed in the same step only). */
typedef struct mm_k_cache {
    void          *k, *v;        /* this layer's pools */
    const int32_t *block_tables; /* [n_slots][max_blocks] */
    int            max_blocks, bs, nkv, hd;
} mm_k_cache;
int mm_k_rope_store(mm_kdt dt, const void *qkv, const void *bias, const float *inv_freq,
                    const int32_t *pos, const int32_t *slot, int T, int nq,
                    const mm_k_cache *c, int early, void *q_out, cudaStream_t s);

/* Attention of R query tokens (token indices tok[r]) against their slot's
 * cache, each seeing positions [max(0, pos - window + 1), pos] (window 0 =
 * no limit): q [T][nq hd], out [T][nq hd]. The context is split over
 * nsplit blocks per (head or kv head, query) (flash-decoding). Modes:
 *  - GROUP: one block serves all the query heads of a kv head, so each
 *    K/V row is read once per group; a second kernel merges the splits;
 *  - HEAD (small batches: more, lighter blocks): one query head a block,
 *    merged by the second kernel;
 *  - HEAD_CLUSTER: as HEAD, but the splits of a head form one thread-block
 *    cluster (sm_90+) and merge through distributed shared memory, with
 *    each block's K and V rows all loaded before any arithmetic: no
 *    second kernel and one memory round trip a chunk. Needs nsplit <=
 *    MM_K_ATTN_CLUSTER_MAX and hd <= 128 (else HEAD is used).
 * part needs mm_k_attn_part_floats(R, nq, hd, nsplit) floats (unused by
 * HEAD_CLUSTER). fresh (HEAD_CLUSTER; may be NULL): per token, the first
 * position whose cache rows this step writes; the rows before it, the
 * step metadata and the block tables are then read before
 * griddepcontrol.wait, so the kernel must follow a serial mm_k_embed in
 * the same step.
 * rope (HEAD_CLUSTER with fresh, steps of decode tokens only; NULL: q comes
 * rotated from mm_k_rope_store): the kernel does mm_k_rope_store's work
 * itself - q rotated from this layer's q/k/v product, this step's K and V
 * rows computed from it, used from shared memory and written to the
 * cache by one block per kv head - with the same arithmetic, so one
 * kernel less a layer and the same bits; q is then unused. */
enum { MM_K_ATTN_GROUP = 0, MM_K_ATTN_HEAD = 1, MM_K_ATTN_HEAD_CLUSTER = 2 };
#define MM_K_ATTN_CLUSTER_MAX 8
typedef struct mm_k_rope_in {
    const void  *qkv;      /* [T][(nq + 2 nkv) hd] in dt */
    const void  *bias;     /* [(nq + 2 nkv) hd] in dt, or NULL */
    const float *inv_freq; /* [hd / 2] */
} mm_k_rope_in;
size_t mm_k_attn_part_floats(int R, int nq, int hd, int nsplit);
int mm_k_attn_decode(mm_kdt dt, const void *q, const mm_k_rope_in *rope, const int32_t *tok,
                     const int32_t *pos,
                     const int32_t *slot, const int32_t *fresh, int R, int nq, int mode,
                     int window, float scale, const mm_k_cache *c, int nsplit, float *part,
                     void *out, cudaStream_t s);

/* Tensor parallelism's sum over ranks through peer memory (tp.cu): rank
 * `rank` of n; src[slot][i] is rank i's float buffer of slot 0 (the o
 * product) or 1 (down), flag[i] rank i's two flags, epoch this rank's
 * counter of model runs in this mode, L the layers. mm_k_tp_epoch once at
 * the start of each run; then, after a slot's product, mm_k_tp_reduce
 * signals the peers, waits for all of them, and writes the sum over ranks
 * of the count (a multiple of 4) floats into out. */
#define MM_K_TP_MAX 16
typedef struct mm_k_tp {
    int             n, rank, L;
    const float    *src[2][MM_K_TP_MAX];
    unsigned       *flag[MM_K_TP_MAX];
    const unsigned *epoch;
} mm_k_tp;
int mm_k_tp_epoch(unsigned *epoch, cudaStream_t s);
int mm_k_tp_reduce(const mm_k_tp *p, int slot, int layer, size_t count, int nsm, float *out,
                   cudaStream_t s);

/* Block-table updates: upd[0] = count (read on the device, so a captured
 * graph replays whatever the host wrote before launching it), then count
 * pairs (index, value): table[index] = value. The same kernel zeroes nzero
 * words at zero: the step's argmax keys (mm_k_argmax), which a memset
 * node right before the argmax kept ~2 us from its start. */
int mm_k_table_update(int32_t *table, const int32_t *upd, unsigned long long *zero, int nzero,
                      cudaStream_t s);

/* Copy positions [0, n) of one slot's cache into contiguous kc, vc
 * [nkv][n][hd] for the GEMM-based prefill attention. */
int mm_k_gather_kv(mm_kdt dt, const mm_k_cache *c, int slot, int n, void *kc, void *vc,
                   cudaStream_t s);

/* Causal attention of one prompt slice, flash style (flash.cu: scores
 * kept on chip, tensor cores, sm_80+): the n query rows q + i * qd (i <
 * n, positions pos0 + i, nq heads of hd) against the slice's contiguous K
 * and V [nkv][ctx][hd] (mm_k_gather_kv; ctx = pos0 + n), each seeing
 * positions [max(0, pos - window + 1), pos] (window 0 = no limit), into
 * out + i * qd. hd 64 or 128: mm_k_flash_setup (once, before any launch)
 * returns 0 when the kernel serves this type and head size. */
int mm_k_flash_setup(mm_kdt dt, int hd);
int mm_k_flash_prefill(mm_kdt dt, const void *q, int qd, const void *kc, const void *vc, int ctx,
                       int pos0, int n, int nq, int nkv, int hd, int window, float scale,
                       void *out, cudaStream_t s);

/* Causal softmax of scores S [rows][ld] f32 into P (dt, same shape): row
 * r = h * n + i is query i (position pos0 + i) of head h; columns above the
 * position, or below it by window or more, get 0. */
int mm_k_softmax_causal(mm_kdt dt, const float *S, int rows, int n, int ncols, int ld,
                        int pos0, int window, void *P, cudaStream_t s);

/* y[m][n] = sum_k x[m][k] W[n][k] for M <= MM_K_GEMV_MAX_M rows: a
 * bandwidth-bound kernel for decode steps (K % 8 == 0). y is float when
 * y_f32, else dt. With splits > 1 (float output only) K is cut in that
 * many ranges and y receives splits partials [splits][M][N] to be summed
 * by the reader (mm_k_add_rmsnorm). */
#define MM_K_GEMV_MAX_M 8
int mm_k_gemv_ok(int M, int K);
/* Single-row products' weight pipelining (process-wide; MM_CUDA_PIPE): 0
 * off, 1 rows longer than 4096 (the default), 2 every row. */
void mm_k_set_gemv_pipe(int mode);
/* One-step products (process-wide; MM_CUDA_ONESTEP, MM_CUDA_ONESTEP_TILES):
 * 0 off, 1 splits over K in equal shares of at most max_tiles (1-8) whole
 * tiles of 256, each loaded in one step, 2 (the default, with 8 tiles)
 * also unsplit single rows of at most max_tiles tiles. */
void mm_k_set_gemv_onestep(int mode, int max_tiles);
/* How many splits suit an N x K product on nsm SMs (with one-step
 * products, mm_k_set_gemv_onestep: equal shares of whole tiles where
 * that fits). */
int mm_k_gemv_splits(int N, int K, int nsm);
int mm_k_gemv(mm_kdt dt, const void *W, const void *x, int M, int N, int K, void *y, int y_f32,
              int splits, cudaStream_t s);

/* The gate/up product with SwiGLU in its epilogue, for M <= 8 rows: W
 * [2I][K] interleaved (gate i, up i), act[m][i] = silu(g) * u, each of g
 * and u rounded to dt first as if stored (same results as the product
 * followed by mm_k_swiglu). */
int mm_k_gemv_swiglu(mm_kdt dt, const void *W, const void *x, int M, int I, int K, void *act,
                     cudaStream_t s);
/* Tiles of each row a single-row gate/up step loads (process-wide;
 * MM_CUDA_GU_TILES, for measuring): 0 (the default) 7 or 6 where they
 * divide K, else 2; 2, 6 or 7 force that (where it divides K). */
void mm_k_set_gemv_swiglu_tiles(int tiles);
/* Unsplit one-step products request all their weight tiles before
 * griddepcontrol.wait (process-wide; MM_CUDA_PRE=0, for measuring, caps
 * them at 4 as split ones are): 1 (the default) or 0. */
void mm_k_set_gemv_pre(int on);

/* ids[r] = argmax over columns < *n_valid of logits row r (lowest id on
 * ties, NaN and -inf never win, -1 when nothing is finite), R rows of ld
 * floats. keys[r] holds the winner as a 64-bit key (the value's order
 * bits above the id's complement, 0 when nothing is finite); with ids
 * NULL only the keys are written. n_valid is read on the device, so a
 * graph captured before it is known still uses the right one. The keys
 * must hold 0 when it runs: mm_k_table_update zeroes them at the start of
 * the step. */
int mm_k_argmax(const float *logits, int R, int ld, const int *n_valid, unsigned long long *keys,
                int32_t *ids, cudaStream_t s);

/* The decode step of one sequence (token ids[0] at position pos[0] of
 * slot[0]) as one persistent kernel of nb blocks, one per SM (mega.cu):
 * from the embedding to logits[0, V) in float. Needs sm_90 (TMA bulk
 * copies, mma), head_dim 64/128/256, H <= 6144, H and I multiples of 16.
 * mm_k_mega_setup fills nst, stg, cmax, xs_bytes and acc_floats from the
 * shared memory a block may use and sets the kernel's attributes; it
 * fails (non-zero) when the shape does not fit. Scratch: x H floats, qkv,
 * att, act as the layered path's (one token); part nq x nb x (hd + 2)
 * floats; head_ctr nq ints and ctr MM_K_MEGA_CTRS counters, both zeroed
 * once at allocation (the kernel leaves them zeroed). */
#define MM_K_MEGA_CTRS 4
typedef struct mm_k_mega_layer {
    const void  *wqkv, *bqkv, *wo, *bo, *wgu, *wdown;
    const float *attn_norm, *mlp_norm;
} mm_k_mega_layer;
typedef struct mm_k_mega {
    int L, H, I, nq, nkv, hd, V, window;
    float eps, scale;
    const void *embed, *lm_head;
    const float *norm, *inv_freq;
    const mm_k_mega_layer *layers; /* device array of L */
    void *kv;                      /* the pool: layer l's K at 2l, V at 2l + 1 */
    size_t kv_layer_bytes;
    const int32_t *block_tables;
    int max_blocks, bs;
    const int32_t *ids, *pos, *slot;
    float *x, *logits, *part;
    void *qkv, *att, *act;
    int *head_ctr;
    unsigned *ctr;
    int nst, stg, cmax, xs_bytes, acc_floats; /* set by mm_k_mega_setup */
    int skip; /* measuring only (results wrong): MM_K_MEGA_SKIP_* */
} mm_k_mega;
enum {
    MM_K_MEGA_SKIP_ATTN = 1, /* no attention work items */
    MM_K_MEGA_SKIP_DOT = 2,  /* consumers take stages without the arithmetic */
    MM_K_MEGA_SKIP_SYNC = 4, /* no waiting for other blocks */
    MM_K_MEGA_SKIP_NORM = 8  /* no norms or input fetches */
};
int mm_k_mega_setup(mm_kdt dt, mm_k_mega *p, int nb, size_t smem_optin);
int mm_k_mega_run(mm_kdt dt, const mm_k_mega *p, int nb, cudaStream_t s);

/* Test hook: a kernel that stores to an invalid address, leaving the
 * context with a sticky illegal-address error (fault.cu). */
int mm_k_test_fault(cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
