/* attention.cu: attention over the paged KV cache.
 *
 * Decode (and short prompt slices): flash-decoding. Grid (kv head, query,
 * split); a block of 128 threads walks chunks of 128 positions, chunk
 * s, s + nsplit, ..., so short contexts use one split and long ones spread
 * over many blocks even at batch 1. Scores are one thread per position (a
 * whole K row each, dotted with every query head of the group); P.V is one
 * warp per 32 positions with the lanes over the head's dimensions. Serving
 * the group from one block reads each K/V row once instead of once per
 * query head (6x less cache traffic on Qwen2.5-1.5B). Small batches launch
 * one block per query head instead (MM_K_ATTN_HEAD): there are too few (kv head,
 * query) pairs to fill the GPU, and a block serving a group does the
 * group's arithmetic in series (measured: 35 us vs ~6 us per layer at
 * batch 1 on Qwen2.5-1.5B). Each block leaves an unnormalized partial (o, max,
 * sum) and a second kernel merges them. (Merging in the last block to
 * finish, with an arrival counter, measured slower: 1.49 vs 1.44 ms per
 * token.) On sm_90+ the small-batch case has a third kernel,
 * attn_head_cluster_k below, whose splits merge inside a thread-block
 * cluster instead. The grid depends only on the
 * number of queries and nsplit, never on context lengths (read from pos on
 * the device), so a decode step can be replayed as a CUDA graph.
 *
 * Long prompt slices go through cuBLAS instead (backend_cuda.c): the causal
 * softmax between the two GEMMs is here. */
#include <cooperative_groups.h>

#include "common.cuh"

#define CHUNK 128

extern "C" int mm_k_head_dim_ok(int hd)
{
    return hd == 16 || hd == 32 || hd == 64 || hd == 128 || hd == 256;
}

extern "C" int mm_k_attn_group_ok(int nq, int nkv)
{
    return nkv > 0 && nq % nkv == 0 && nq / nkv <= 8;
}

extern "C" size_t mm_k_attn_part_floats(int R, int nq, int hd, int nsplit)
{
    return (size_t)R * nq * nsplit * (size_t)(hd + 2);
}

__device__ __forceinline__ size_t att_off(const mm_k_cache &c, int slot, int p, int h)
{
    int blk = c.block_tables[(size_t)slot * c.max_blocks + p / c.bs];
    return (((size_t)blk * c.nkv + h) * c.bs + p % c.bs) * c.hd;
}

template <typename T, int N> __device__ __forceinline__ void load_n(const T *src, float *f)
{
    if constexpr (N == 8) {
        mm_unpack8<T>(*(const uint4 *)src, f);
    } else if constexpr (N == 4) {
        uint2 u = *(const uint2 *)src;
        const T *h = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int i = 0; i < 4; i++)
            f[i] = mm_to_f(h[i]);
    } else if constexpr (N == 2) {
        uint32_t u = *(const uint32_t *)src;
        const T *h = reinterpret_cast<const T *>(&u);
        f[0] = mm_to_f(h[0]);
        f[1] = mm_to_f(h[1]);
    } else {
        f[0] = mm_to_f(src[0]);
    }
}

/* GMAX: the largest group of query heads per kv head served (Qwen2.5-7B:
 * 7, Llama-3-70B: 8). */
#define GMAX 8

/* A score q.k is summed as four interleaved partial sums (element i into
 * sum i % 4), added pairwise: at batch 1 the score is on attention's
 * critical path, and four chains of HD / 4 fused multiply-adds finish
 * sooner than one of HD (measured -1.2% a token on the 1.5B shape,
 * docs/GPU_NOTES.md v29). The cluster kernel and the one-head-per-block
 * kernel both sum this way, so they agree bit for bit; blocks serving a
 * group of heads (large batches) keep one chain a head, as four would
 * cost them a third more registers. */
__device__ __forceinline__ float attn_sum4(const float *s4)
{
    return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

/* GM: the most query heads one block serves (GMAX, or 1 for the
 * one-head-per-block launch of small batches); hpc: how many it does. */
template <typename T, int HD, int GM>
__global__ void __launch_bounds__(CHUNK)
attn_decode_k(const T *q, const int32_t *tok, const int32_t *pos, const int32_t *slot, int nq,
              int hpc, int window, float scale, mm_k_cache c, int nsplit, float *part_o,
              float *part_ml)
{
    constexpr int DPL = HD >= 32 ? HD / 32 : 1; /* dims per lane in P.V */
    constexpr int LANES = HD / DPL;
    constexpr int NW = CHUNK / 32;
    __shared__ float qs[GM][HD];
    __shared__ float p[GM][CHUNK];
    __shared__ float red[GM][NW];
    __shared__ float accs[NW][HD];
    mm_pdl_release();
    mm_pdl_wait();
    int G = hpc, h0 = blockIdx.x * hpc, kvh = h0 / (nq / c.nkv);
    int r = blockIdx.y, sp = blockIdx.z;
    int t = tok[r], P = pos[t], sl = slot[t];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int lo = window > 0 && P - window + 1 > 0 ? P - window + 1 : 0;
    const T *K = (const T *)c.k, *V = (const T *)c.v;
    const int32_t *table = c.block_tables + (size_t)sl * c.max_blocks;

    for (int i = threadIdx.x; i < G * HD; i += blockDim.x)
        qs[i / HD][i % HD] =
            mm_to_f(q[((size_t)t * nq + h0 + i / HD) * HD + i % HD]) * scale;
    __syncthreads();

    float m[GM], l[GM], acc[GM][DPL];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < DPL; e++)
            acc[g][e] = 0.0f;
    }
    for (int ch = lo / CHUNK + sp; ch <= P / CHUNK; ch += nsplit) {
        /* scores: one position per thread, its K row read once for the
         * whole group */
        int j = ch * CHUNK + threadIdx.x;
        /* the warp's block ids for P.V, fetched now so the load overlaps
         * the scores (positions clamped into [lo, P]; p is 0 outside) */
        int j0 = ch * CHUNK + w * 32;
        int jl = j0 + lane < lo ? lo : (j0 + lane > P ? P : j0 + lane);
        int myblk = table[jl / c.bs];
        float s[GM];
#pragma unroll
        for (int g = 0; g < GM; g++)
            s[g] = -INFINITY;
        if (j >= lo && j <= P) {
            const T *kr = K + mm_kv_row(c, table[j / c.bs], kvh, j, HD);
            float s4[GM][4];
#pragma unroll
            for (int g = 0; g < GM; g++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    s4[g][i] = 0.0f;
            /* all of the row's loads first (one memory round trip) */
            uint4 kv[HD / 8];
#pragma unroll
            for (int d = 0; d < HD / 8; d++)
                kv[d] = *(const uint4 *)(kr + d * 8);
#pragma unroll
            for (int d = 0; d < HD; d += 8) {
                float f[8];
                mm_unpack8<T>(kv[d / 8], f);
#pragma unroll
                for (int g = 0; g < GM; g++)
                    if (g < G)
#pragma unroll
                        for (int i = 0; i < 8; i++)
                            s4[g][GM == 1 ? i & 3 : 0] += f[i] * qs[g][d + i];
            }
#pragma unroll
            for (int g = 0; g < GM; g++)
                if (g < G)
                    s[g] = GM == 1 ? attn_sum4(s4[g]) : s4[g][0];
        }
        /* per-head max and sum over the chunk: one shared round each */
#pragma unroll
        for (int g = 0; g < GM; g++)
            if (g < G) {
                float v = mm_warp_max(s[g]);
                if (lane == 0)
                    red[g][w] = v;
            }
        __syncthreads();
        float fac[GM];
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g >= G)
                continue;
            float cm = red[g][0];
#pragma unroll
            for (int x = 1; x < NW; x++)
                cm = fmaxf(cm, red[g][x]);
            float mn = fmaxf(m[g], cm);
            float e = s[g] == -INFINITY ? 0.0f : __expf(s[g] - mn);
            p[g][threadIdx.x] = e;
            fac[g] = m[g] == -INFINITY ? 0.0f : __expf(m[g] - mn);
            m[g] = mn;
            s[g] = e;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < GM; g++)
            if (g < G) {
                float v = mm_warp_sum(s[g]);
                if (lane == 0)
                    red[g][w] = v;
            }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g >= G)
                continue;
            float cs = 0.0f;
#pragma unroll
            for (int x = 0; x < NW; x++)
                cs += red[g][x];
            l[g] = l[g] * fac[g] + cs;
#pragma unroll
            for (int e = 0; e < DPL; e++)
                acc[g][e] *= fac[g];
        }
        /* P.V: each warp its 32 positions, the lanes over the dimensions,
         * each V row read once for the group. The warp's block ids come in
         * one coalesced load and go round by shuffle, and eight rows are
         * loaded before any is used: at batch 1 this loop is a chain of
         * memory latencies, not of bandwidth. Positions outside [lo, P]
         * have p = 0; their address is clamped into the range. */
#pragma unroll
        for (int i0 = 0; i0 < 32; i0 += 8) {
            float v[8][DPL];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int jj = j0 + i0 + i;
                jj = jj < lo ? lo : (jj > P ? P : jj);
                int blk = __shfl_sync(0xffffffffu, myblk, jj - j0 < 0 ? 0 : (jj - j0 > 31 ? 31 : jj - j0));
                /* (jj - j0 is outside 0..31 only when clamped to lo or P
                 * from another warp's range; p is 0 there, any block will do
                 * as long as it is a valid one: use this lane's own) */
                if (jj - j0 < 0 || jj - j0 > 31)
                    blk = myblk;
                if (lane < LANES)
                    load_n<T, DPL>(V + mm_kv_row(c, blk, kvh, jj, HD) + lane * DPL, v[i]);
            }
            if (lane < LANES)
#pragma unroll
                for (int i = 0; i < 8; i++)
#pragma unroll
                    for (int g = 0; g < GM; g++)
                        if (g < G) {
                            float pg = p[g][w * 32 + i0 + i];
#pragma unroll
                            for (int x = 0; x < DPL; x++)
                                acc[g][x] += pg * v[i][x];
                        }
        }
        __syncthreads();
    }
#pragma unroll
    for (int g = 0; g < GM; g++) {
        if (g >= G) /* the same for the whole block: the barriers below stay uniform */
            break;
        if (lane < LANES)
#pragma unroll
            for (int x = 0; x < DPL; x++)
                accs[w][lane * DPL + x] = acc[g][x];
        __syncthreads();
        int h = h0 + g;
        size_t idx = ((size_t)r * nq + h) * nsplit + sp;
        for (int d = threadIdx.x; d < HD; d += blockDim.x) {
            float o = 0.0f;
#pragma unroll
            for (int ww = 0; ww < NW; ww++)
                o += accs[ww][d];
            part_o[idx * HD + d] = o;
        }
        if (threadIdx.x == 0) {
            part_ml[idx * 2] = m[g];
            part_ml[idx * 2 + 1] = l[g];
        }
        __syncthreads();
    }
}

/* HEAD_CLUSTER (small batches, hd <= 128): one query head a block, the
 * head's splits one cluster. Built for latency, since at batch 1 this
 * kernel is a chain of memory round trips inside every layer (measured:
 * 13 us of a 54 us layer on Qwen2.5-1.5B with HEAD and its merge kernel):
 * a thread's block-table entry, then its K row and its warp's 32 V rows
 * (lanes over the dimensions) all in flight at once, the softmax weights
 * passed to P.V by shuffle, and the splits merged by cluster rank 0 in its
 * own shared memory, where every block puts its part, instead of by a
 * second kernel. */
template <int BYTES> struct vraw_t; /* one lane's raw V elements */
template <> struct vraw_t<2> { typedef uint16_t t; };
template <> struct vraw_t<4> { typedef uint32_t t; };
template <> struct vraw_t<8> { typedef uint2 t; };

template <typename T, int HD, bool FUSED>
__global__ void __launch_bounds__(CHUNK)
attn_head_cluster_k(const T *q, mm_k_rope_in rope, const int32_t *tok, const int32_t *pos,
                    const int32_t *slot, const int32_t *fresh, int nq, int window, float scale,
                    mm_k_cache c, int nsplit, T *out)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    constexpr int DPL = HD >= 32 ? HD / 32 : 1; /* dims per lane in P.V */
    constexpr int LANES = HD / DPL;
    constexpr int NW = CHUNK / 32;
    typedef typename vraw_t<(int)sizeof(T) * DPL>::t vraw;
    __shared__ float qs[HD];
    __shared__ float red[2][NW];
    __shared__ float accs[NW][HD];
    /* rank 0's: every block's o, m, l (rank k at row k), put there by the
     * blocks themselves before the cluster barrier */
    __shared__ float gath[MM_K_ATTN_CLUSTER_MAX][HD + 2];
    constexpr int HALF = HD / 2;
    __shared__ float rcs[HALF], rsn[HALF];            /* rope: the token's rotation */
    __shared__ __align__(16) T kfresh[HD], vfresh[HD]; /* rope: this step's K, V rows */
    /* FUSED: rope.qkv is set and so is fresh (the host checks). A template
     * parameter, not a test of rope.qkv: each instantiation then holds one
     * of the two paths around the wait, and this code runs from a cold
     * instruction cache (docs/GPU_NOTES.md v34) */
    constexpr bool fused = FUSED;
    mm_pdl_release();
    /* fresh: the first chunk's cache rows written before this step (below
     * fresh[t]) load before griddepcontrol.wait, with the step metadata and
     * the block table (see mm_k_embed); only q and this step's rows wait */
    bool waited = !FUSED && fresh == NULL;
    if (waited)
        mm_pdl_wait();
    int h = blockIdx.x, r = blockIdx.y, sp = blockIdx.z;
    int kvh = h / (nq / c.nkv);
    int t = tok[r], P = pos[t], sl = slot[t];
    /* rows from F on: after the wait; fused, from kfresh/vfresh (the only
     * such row of a decode token is P, and clamped positions copy it) */
    int F = fused ? P : fresh ? fresh[t] : INT_MAX;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const T *qkv_row = fused ? (const T *)rope.qkv + (size_t)t * (nq + 2 * c.nkv) * HD : NULL;
    const T *qkv_bias = (const T *)rope.bias;
    if (fused) {
        /* as mm_k_rope_store: angle P * inv_freq[i], full-precision sincosf */
        if (threadIdx.x < HALF)
            sincosf((float)P * rope.inv_freq[threadIdx.x], &rsn[threadIdx.x],
                    &rcs[threadIdx.x]);
        __syncthreads();
    }
    /* this thread's bias elements (weights: loaded before the wait, which
     * takes a memory round trip off the path after it): q head h's and k
     * head kvh's pair for element threadIdx.x, and v's element */
    float bq[2] = {0.0f, 0.0f}, bk[2] = {0.0f, 0.0f}, bv = 0.0f;
    if (fused && qkv_bias && threadIdx.x < HD) {
        int i = threadIdx.x % HALF;
        bq[0] = mm_to_f(qkv_bias[h * HD + i]);
        bq[1] = mm_to_f(qkv_bias[h * HD + i + HALF]);
        bk[0] = mm_to_f(qkv_bias[(nq + kvh) * HD + i]);
        bk[1] = mm_to_f(qkv_bias[(nq + kvh) * HD + i + HALF]);
        bv = mm_to_f(qkv_bias[(nq + c.nkv + kvh) * HD + threadIdx.x]);
    }
    /* element d of head column block col (q head h, k head nq + kvh) of the
     * q/k/v row, bias b (that pair's) added, rotated and rounded as
     * mm_k_rope_store stores it */
    auto rotated = [&](int col, int d, const float *b) {
        int i = d % HALF, base = col * HD;
        float x1 = mm_to_f(qkv_row[base + i]), x2 = mm_to_f(qkv_row[base + i + HALF]);
        if (qkv_bias) {
            x1 += b[0];
            x2 += b[1];
        }
        float o1, o2;
        mm_rope_pair(x1, x2, rcs[i], rsn[i], &o1, &o2);
        return mm_from_f<T>(d < HALF ? o1 : o2);
    };
    int lo = window > 0 && P - window + 1 > 0 ? P - window + 1 : 0;
    const T *K = (const T *)c.k, *V = (const T *)c.v;
    const int32_t *table = c.block_tables + (size_t)sl * c.max_blocks;
    const T *qh = q + ((size_t)t * nq + h) * HD;
    float qv = waited && threadIdx.x < HD ? mm_to_f(qh[threadIdx.x]) * scale : 0.0f; /* !fused */
    bool first = true;
    float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
    for (int e = 0; e < DPL; e++)
        acc[e] = 0.0f;
    for (int ch = lo / CHUNK + sp; ch <= P / CHUNK; ch += nsplit) {
        /* every position of the chunk lies in [lo, P] or is clamped into
         * it (its weight is then 0): the chunk always has a valid one */
        int j = ch * CHUNK + threadIdx.x;
        bool valid = j >= lo && j <= P;
        int jc = j < lo ? lo : (j > P ? P : j);
        int blk = table[jc / c.bs];
        /* the row's offset in the K (and V) pool */
        unsigned long long roff = mm_kv_row(c, blk, kvh, jc, HD);
        const T *kr = K + roff;
        uint4 kv[HD / 8];
        if (jc < F)
#pragma unroll
            for (int d = 0; d < HD / 8; d++)
                kv[d] = *(const uint4 *)(kr + d * 8);
        /* lane i of the warp holds the warp's i-th position (clamped): its
         * row offset and position come by shuffle - a few instructions a row where
         * computing them took ~45 (this unrolled code runs once a launch,
         * mostly from a cold instruction cache: docs/GPU_NOTES.md v30) */
        vraw vr[32];
        auto vpos = [&](int i) { return __shfl_sync(0xffffffffu, jc, i); };
        auto vrow = [&](int i) {
            return (const vraw *)(V + __shfl_sync(0xffffffffu, roff, i) + lane * DPL);
        };
#pragma unroll
        for (int i = 0; i < 32; i++) { /* every lane shuffles, then some load */
            const vraw *vp = vrow(i);
            int pi = vpos(i);
            if (lane < LANES && pi < F)
                vr[i] = *vp;
        }
        if (!waited && fused) {
            mm_pdl_wait();
            waited = true;
            if (threadIdx.x < HD) {
                qv = mm_to_f(rotated(h, threadIdx.x, bq)) * scale;
                int d = threadIdx.x, vcol = (nq + c.nkv + kvh) * HD + d;
                kfresh[d] = rotated(nq + kvh, d, bk);
                float v = mm_to_f(qkv_row[vcol]);
                if (qkv_bias)
                    v += bv;
                vfresh[d] = mm_from_f<T>(v);
            }
            __syncthreads();
            /* one block per (token, kv head) writes the rows to the cache,
             * for the steps to come; nothing in this kernel reads them there */
            if (h % (nq / c.nkv) == 0 && sp == 0 && threadIdx.x < HD) {
                size_t off = mm_kv_row(c, table[P / c.bs], kvh, P, HD) + threadIdx.x;
                ((T *)c.k)[off] = kfresh[threadIdx.x];
                ((T *)c.v)[off] = vfresh[threadIdx.x];
            }
        } else if (!waited) {
            mm_pdl_wait();
            waited = true;
            if (threadIdx.x < HD)
                qv = mm_to_f(qh[threadIdx.x]) * scale;
            if (jc >= F)
#pragma unroll
                for (int d = 0; d < HD / 8; d++)
                    kv[d] = *(const uint4 *)(kr + d * 8);
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const vraw *vp = vrow(i);
                int pi = vpos(i);
                if (lane < LANES && pi >= F)
                    vr[i] = *vp;
            }
            F = INT_MAX;
        }
        if (fused) { /* this step's rows, in every chunk that holds them */
            if (jc >= F)
#pragma unroll
                for (int d = 0; d < HD / 8; d++)
                    kv[d] = *(const uint4 *)(kfresh + d * 8);
            if (vpos(31) >= F) /* only a warp whose (clamped) rows reach F */
#pragma unroll
                for (int i = 0; i < 32; i++) {
                    int pi = vpos(i);
                    if (lane < LANES && pi >= F)
                        vr[i] = *(const vraw *)(vfresh + lane * DPL);
                }
        }
        if (first) {
            if (threadIdx.x < HD)
                qs[threadIdx.x] = qv;
            __syncthreads();
            first = false;
        }
        float s = -INFINITY;
        if (valid) {
            float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int d = 0; d < HD; d += 8) {
                float f[8];
                mm_unpack8<T>(kv[d / 8], f);
#pragma unroll
                for (int i = 0; i < 8; i++)
                    s4[i & 3] += f[i] * qs[d + i];
            }
            s = attn_sum4(s4);
        }
        float wm = mm_warp_max(s);
        if (lane == 0)
            red[0][w] = wm;
        __syncthreads();
        float cm = red[0][0];
#pragma unroll
        for (int x = 1; x < NW; x++)
            cm = fmaxf(cm, red[0][x]);
        float mn = fmaxf(m, cm);
        float e = valid ? __expf(s - mn) : 0.0f;
        float fac = m == -INFINITY ? 0.0f : __expf(m - mn);
        m = mn;
        float ws = mm_warp_sum(e);
        if (lane == 0)
            red[1][w] = ws;
#pragma unroll
        for (int x = 0; x < DPL; x++)
            acc[x] *= fac;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            float pi = __shfl_sync(0xffffffffu, e, i);
            const T *hv = reinterpret_cast<const T *>(&vr[i]);
#pragma unroll
            for (int x = 0; x < DPL; x++)
                acc[x] += pi * mm_to_f(hv[x]);
        }
        __syncthreads();
        float cs = 0.0f;
#pragma unroll
        for (int x = 0; x < NW; x++)
            cs += red[1][x];
        l = l * fac + cs;
    }
    if (!waited) /* no chunk: nothing read, but out is written below */
        mm_pdl_wait();
    /* the warps' sums share the block's running max: add them up */
    if (lane < LANES)
#pragma unroll
        for (int x = 0; x < DPL; x++)
            accs[w][lane * DPL + x] = acc[x];
    __syncthreads();
    float o = 0.0f;
    if (threadIdx.x < HD)
#pragma unroll
        for (int x = 0; x < NW; x++)
            o += accs[x][threadIdx.x];
    T *dst = out + ((size_t)t * nq + h) * HD;
    if (nsplit == 1) {
        if (threadIdx.x < HD)
            dst[threadIdx.x] = mm_from_f<T>(o / l);
        return;
    }
    /* Each block stores its o, m, l into rank 0's shared memory and the
     * barrier (release, then acquire) publishes them: rank 0 merges from
     * its own memory and the others leave at once, where rank 0 reading
     * the others' memory took a remote round trip per split and a second
     * barrier to keep that memory alive (docs/GPU_NOTES.md v29). */
    cg::cluster_group cl = cg::this_cluster();
    float *put = cl.map_shared_rank(&gath[0][0], 0) + cl.block_rank() * (HD + 2);
    if (threadIdx.x < HD)
        put[threadIdx.x] = o;
    if (threadIdx.x == 0) {
        put[HD] = m;
        put[HD + 1] = l;
    }
    cl.sync();
    if (cl.block_rank() == 0 && threadIdx.x < HD) {
        float M = -INFINITY;
        for (int k = 0; k < nsplit; k++)
            M = fmaxf(M, gath[k][HD]);
        float L = 0.0f, O = 0.0f;
        for (int k = 0; k < nsplit; k++) {
            float lk = gath[k][HD + 1];
            if (lk <= 0.0f)
                continue;
            float wgt = __expf(gath[k][HD] - M);
            L += lk * wgt;
            O += gath[k][threadIdx.x] * wgt;
        }
        dst[threadIdx.x] = mm_from_f<T>(O / L);
    }
#else
    (void)q, (void)tok, (void)pos, (void)slot, (void)nq, (void)window, (void)scale, (void)c;
    (void)nsplit, (void)out, (void)rope, (void)fresh;
#endif
}

template <typename T>
__global__ void attn_merge_k(const int32_t *tok, int nq, int hd, int nsplit,
                             const float *part_o, const float *part_ml, T *out)
{
    mm_pdl_release();
    mm_pdl_wait();
    int h = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
    size_t base = ((size_t)r * nq + h) * nsplit;
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++)
        M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.0f, o = 0.0f;
    for (int s = 0; s < nsplit; s++) {
        float ms = part_ml[(base + s) * 2], ls = part_ml[(base + s) * 2 + 1];
        if (ls <= 0.0f)
            continue;
        float wgt = __expf(ms - M);
        L += ls * wgt;
        o += part_o[(base + s) * hd + d] * wgt;
    }
    out[((size_t)tok[r] * nq + h) * hd + d] = mm_from_f<T>(o / L);
}

template <typename T, int HD>
static void decode_hd(const void *q, const mm_k_rope_in &rope, const int32_t *tok,
                      const int32_t *pos, const int32_t *slot,
                      const int32_t *fresh, int R, int nq, int mode, int window, float scale,
                      const mm_k_cache *c,
                      int nsplit, float *part, void *out, cudaStream_t s)
{
    if constexpr (HD <= 128) {
    if (mode == MM_K_ATTN_HEAD_CLUSTER && nsplit <= MM_K_ATTN_CLUSTER_MAX) {
        cudaLaunchAttribute at[2];
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = mm_k_pdl_on;
        at[1].id = cudaLaunchAttributeClusterDimension;
        at[1].val.clusterDim.x = 1;
        at[1].val.clusterDim.y = 1;
        at[1].val.clusterDim.z = (unsigned)nsplit;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(nq, R, nsplit);
        cfg.blockDim = dim3(CHUNK);
        cfg.stream = s;
        cfg.attrs = at;
        cfg.numAttrs = 2;
        if (rope.qkv)
            cudaLaunchKernelEx(&cfg, attn_head_cluster_k<T, HD, true>, (const T *)q, rope, tok,
                               pos, slot, fresh, nq, window, scale, *c, nsplit, (T *)out);
        else
            cudaLaunchKernelEx(&cfg, attn_head_cluster_k<T, HD, false>, (const T *)q, rope, tok,
                               pos, slot, fresh, nq, window, scale, *c, nsplit, (T *)out);
        return;
    }
    }
    float *part_ml = part + (size_t)R * nq * nsplit * HD;
    if (mode != MM_K_ATTN_GROUP)
        mm_launch(attn_decode_k<T, HD, 1>, dim3(nq, R, nsplit), CHUNK, 0, s, (const T *)q, tok,
                  pos, slot, nq, 1, window, scale, *c, nsplit, part, part_ml);
    else
        mm_launch(attn_decode_k<T, HD, GMAX>, dim3(c->nkv, R, nsplit), CHUNK, 0, s,
                  (const T *)q, tok, pos, slot, nq, nq / c->nkv, window, scale, *c, nsplit,
                  part, part_ml);
    mm_launch(attn_merge_k<T>, dim3(nq, R), HD, 0, s, tok, nq, HD, nsplit, part, part_ml,
              (T *)out);
}

template <typename T>
static int decode(const void *q, const mm_k_rope_in &rope, const int32_t *tok,
                  const int32_t *pos, const int32_t *slot,
                  const int32_t *fresh, int R, int nq, int mode, int window, float scale,
                  const mm_k_cache *c,
                  int nsplit, float *part, void *out, cudaStream_t s)
{
    if (R <= 0)
        return 0;
    auto go = [&](auto hd) {
        decode_hd<T, decltype(hd)::value>(q, rope, tok, pos, slot, fresh, R, nq, mode, window,
                                          scale, c, nsplit, part, out, s);
    };
    switch (c->hd) {
    case 16: go(std::integral_constant<int, 16>()); break;
    case 32: go(std::integral_constant<int, 32>()); break;
    case 64: go(std::integral_constant<int, 64>()); break;
    case 128: go(std::integral_constant<int, 128>()); break;
    case 256: go(std::integral_constant<int, 256>()); break;
    default: return (int)cudaErrorInvalidValue;
    }
    return mm_launch_status();
}

extern "C" int mm_k_attn_decode(mm_kdt dt, const void *q, const mm_k_rope_in *rope,
                                const int32_t *tok, const int32_t *pos, const int32_t *slot,
                                const int32_t *fresh, int R, int nq, int mode, int window,
                                float scale, const mm_k_cache *c, int nsplit, float *part,
                                void *out, cudaStream_t s)
{
    /* the fused rotation exists in the cluster kernel only, and needs the
     * early reads' fresh positions */
    if (rope && (mode != MM_K_ATTN_HEAD_CLUSTER || nsplit > MM_K_ATTN_CLUSTER_MAX ||
                 c->hd > 128 || !fresh || !rope->qkv || !rope->inv_freq))
        return (int)cudaErrorInvalidValue;
    mm_k_rope_in none = {NULL, NULL, NULL};
    return MM_DISPATCH(dt, decode, q, rope ? *rope : none, tok, pos, slot, fresh, R, nq, mode,
                       window, scale, c, nsplit, part, out, s);
}

template <typename T>
__global__ void softmax_causal_k(const float *S, int n, int ncols, int ld, int pos0, int window,
                                 T *P)
{
    mm_pdl_release();
    mm_pdl_wait();
    __shared__ float red[32];
    int r = blockIdx.x, p = pos0 + r % n;
    int lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    int hi = p < ncols - 1 ? p : ncols - 1;
    const float *sr = S + (size_t)r * ld;
    T *pr = P + (size_t)r * ld;
    float m = -INFINITY;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x)
        m = fmaxf(m, sr[j]);
    m = mm_block_max(m, red);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x)
        sum += __expf(sr[j] - m);
    sum = mm_block_sum(sum, red);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < ncols; j += blockDim.x)
        pr[j] = mm_from_f<T>(j >= lo && j <= hi ? __expf(sr[j] - m) * inv : 0.0f);
}

template <typename T>
static int softmax_causal(const float *S, int rows, int n, int ncols, int ld, int pos0,
                          int window, void *P, cudaStream_t s)
{
    if (rows > 0)
        mm_launch(softmax_causal_k<T>, rows, 256, 0, s, S, n, ncols, ld, pos0, window, (T *)P);
    return mm_launch_status();
}

extern "C" int mm_k_softmax_causal(mm_kdt dt, const float *S, int rows, int n, int ncols,
                                   int ld, int pos0, int window, void *P, cudaStream_t s)
{
    return MM_DISPATCH(dt, softmax_causal, S, rows, n, ncols, ld, pos0, window, P, s);
}
