/* mega.cu: the decode step of one sequence as one persistent kernel
 * (opt-in: MM_CUDA_MEGA=1; measured slower than the layered kernels, see
 * the status at the end of this comment).
 *
 * Why: at batch 1 a step is ~140 dependent kernels (1.5B shape), and each
 * product pays ~2 us of ramp and tail at its boundaries while the memory
 * idles; measured, the products alone ran at 78% of the copy-bandwidth
 * roofline in that chain (docs/GPU_NOTES.md). Here one block per SM runs
 * the whole step, and the weights - which no step writes - are streamed
 * by a producer warp that never waits for activations: it copies each of
 * its block's weight slices, product after product and layer after
 * layer, into a ring of shared-memory stages (TMA bulk copies completing
 * on mbarriers), held back only by free stages. The other warps
 * (consumers) multiply on the tensor cores and do the dependent parts -
 * norms, attention, epilogues - between exchanges with the other blocks.
 * While an exchange or the attention holds the consumers, the ring keeps
 * filling.
 *
 * Work split (nb blocks = one per SM): every product's output rows are cut
 * in nb contiguous ranges, one per block, so each block's slice of a
 * weight is contiguous rows (gate/up by row pairs: SwiGLU needs gate i
 * and up i together). Per layer:
 *   A  norm of the residual (every block, redundantly: H floats) and the
 *      q/k/v rows                 -> every block counts its rows written
 *   B  attention: (query head, context split) work items, which wait for
 *      every block's q/k/v; RoPE and the cache write done by the items;
 *      the last split of a head merges the splits -> counts the head done
 *   C  (all heads done) o rows, added to the residual     -> grid barrier
 *   D  norm, gate/up row pairs with SwiGLU                -> grid barrier
 *   E  down rows, added to the residual                   -> grid barrier
 * then the final norm and the LM head's rows into the logits.
 *
 * Rounding follows the layered kernels (q/k/v, gate and up outputs,
 * attention output and normed rows in the 16-bit type; residual and
 * products' sums in float), so the two paths differ only by summation
 * order. Data written by other blocks inside the kernel is read with
 * ld.global.cg: L1 is not coherent across SMs.
 *
 * Status (H200, docs/GPU_NOTES.md v16-v19): correct (gpu_check compares it
 * with the layered kernels on two generated shapes), 1.39 ms a token
 * on the 1.5B shape against the layered 1.25, 4.16 against 3.98 on 7B. The
 * streaming alone runs at 101% of the copy roofline (0.72 ms) and the
 * tensor-core products add 0.12 ms, but each layer's chain of dependent
 * exchanges (~12 round trips through the L2 under full load, ~18 us) is
 * far longer than the ~5 us of streaming the ring can hold, so it is
 * exposed; even with no waiting at all (results wrong) the step takes
 * 1.17 ms.
 *
 * sm_90+ only (TMA bulk copies); the host checks before using it. */
#include "common.cuh"

#define MK_CW      8               /* consumer warps */
#define MK_CT      (MK_CW * 32)
#define MK_THREADS (MK_CT + 32)    /* + the producer warp */
#define MK_NV      24              /* norm: values per consumer thread, H <= 24 x 256 */
#define MK_PASS    4               /* attention: K (then V) rows in flight per thread */
#define MK_NST     4               /* ring stages (2 and 3 measured no better) */
#define MK_RED     (MK_CT * 8)     /* attention: floats of the cross-group reduction */
#define MK_CAPMAX  (MK_CT / 8 * MK_PASS) /* attention: positions a round (head_dim 64) */

/* ---- PTX wrappers (sm_90) ---- */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mk_bar_init(uint64_t *b, uint32_t count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(mm_smem_u32(b)), "r"(count)
                 : "memory");
}

__device__ __forceinline__ bool mk_bar_try(uint64_t *b, uint32_t parity)
{
    uint32_t ok;
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(ok)
                 : "r"(mm_smem_u32(b)), "r"(parity)
                 : "memory");
    return ok != 0;
}

__device__ __forceinline__ void mk_bar_wait(uint64_t *b, uint32_t parity)
{
    while (!mk_bar_try(b, parity)) {
    }
}

__device__ __forceinline__ void mk_bar_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(mm_smem_u32(b)) : "memory");
}

/* The producer's arrival on a stage's mbarrier, announcing the bytes the
 * copies below will complete on it. */
__device__ __forceinline__ void mk_expect(uint64_t *b, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mm_smem_u32(b)),
                 "r"(bytes)
                 : "memory");
}

/* Copy bytes (multiple of 16, 16-byte aligned ends) from global to shared
 * memory, completing on mbarrier b. Weights are read once a step: evict
 * them from the L2 first. */
__device__ __forceinline__ void mk_load(void *dst, const void *src, uint32_t bytes, uint64_t *b,
                                        uint64_t policy)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], %4;" ::"r"(mm_smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(mm_smem_u32(b)), "l"(policy)
                 : "memory");
}

__device__ __forceinline__ uint64_t mk_evict_first(void)
{
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
#endif

__device__ __forceinline__ void mk_sync(void)
{
    asm volatile("bar.sync 1, %0;" ::"n"(MK_CT) : "memory");
}

/* ---- the plan every block derives alike ---- */

enum { MK_QKV, MK_O, MK_GU, MK_DOWN, MK_LM };

/* One block's rows [r0, r1) of a product with K inputs, weights w. */
struct mk_task {
    const char *w;
    int r0, r1, K;
};

__device__ __forceinline__ int mk_cut(int n, int b, int nb)
{
    return (int)((long long)n * b / nb);
}

__device__ __forceinline__ mk_task mk_task_of(const mm_k_mega &p, int l, int kind, int b, int nb)
{
    mk_task t;
    int N;
    if (kind == MK_LM) {
        t.w = (const char *)p.lm_head;
        t.K = p.H;
        N = p.V;
    } else {
        const mm_k_mega_layer &w = p.layers[l];
        if (kind == MK_QKV) {
            t.w = (const char *)w.wqkv;
            t.K = p.H;
            N = (p.nq + 2 * p.nkv) * p.hd;
        } else if (kind == MK_O) {
            t.w = (const char *)w.wo;
            t.K = p.nq * p.hd;
            N = p.H;
        } else if (kind == MK_GU) {
            t.w = (const char *)w.wgu; /* gate i and up i together */
            t.K = p.H;
            t.r0 = 2 * mk_cut(p.I, b, nb);
            t.r1 = 2 * mk_cut(p.I, b + 1, nb);
            return t;
        } else {
            t.w = (const char *)w.wdown;
            t.K = p.I;
            N = p.H;
        }
    }
    t.r0 = mk_cut(N, b, nb);
    t.r1 = mk_cut(N, b + 1, nb);
    return t;
}

/* A task's stages: its rows in groups of 16 (the mma's M), each group's
 * columns in nch chunks of C (16 rows of C columns, padded, fill at most a
 * stage: cmax is the widest that fits). Stage (grp, ch) holds rows
 * r0 + 16 grp ... (at most 16, fewer at the end) and columns ch C ... */
struct mk_geo {
    int ngrp, nch, C;
};

__device__ __forceinline__ mk_geo mk_geo_of(const mk_task &t, int cmax)
{
    mk_geo g;
    g.ngrp = (t.r1 - t.r0 + 15) / 16;
    g.nch = (t.K + cmax - 1) / cmax;
    g.C = ((t.K + g.nch - 1) / g.nch + 15) / 16 * 16;
    return g;
}

/* Row pitch of a stage holding width columns: the 16 bytes of padding
 * make it an odd number of 16-byte units, so the 8 rows an ldmatrix reads
 * at once fall in 8 different bank groups. */
__device__ __forceinline__ int mk_pitch(int width) { return width * 2 + 16; }

/* ---- the producer ---- */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
struct mk_ring {
    unsigned char *stage; /* nst x stg bytes */
    uint64_t *full, *empty;
    int nst, stg;
    int it; /* stages used so far */
};

/* The producer's walk over every stage of the step: task q = 4 l + kind
 * for the layers' products, q = 4 L for the LM head. */
struct mk_cur {
    int q, grp, ch;
    mk_task t;
    mk_geo g;
};

__device__ void mk_cur_load(mk_cur &c, const mm_k_mega &p, int b, int nb)
{
    for (; c.q <= 4 * p.L; c.q++) {
        c.t = c.q == 4 * p.L ? mk_task_of(p, 0, MK_LM, b, nb)
                             : mk_task_of(p, c.q / 4, c.q % 4, b, nb);
        if (c.t.r1 > c.t.r0)
            break;
    }
    c.grp = c.ch = 0;
    c.g = mk_geo_of(c.t, p.cmax);
}

__device__ void mk_cur_next(mk_cur &c, const mm_k_mega &p, int b, int nb)
{
    if (++c.ch < c.g.nch)
        return;
    c.ch = 0;
    if (++c.grp < c.g.ngrp)
        return;
    c.q++;
    mk_cur_load(c, p, b, nb);
}

__device__ void mk_produce(const mm_k_mega &p, mk_ring &rg, int b, int nb)
{
    uint64_t pol = mk_evict_first();
    mk_cur ld;
    ld.q = 0;
    mk_cur_load(ld, p, b, nb);
    for (; ld.q <= 4 * p.L; mk_cur_next(ld, p, b, nb), rg.it++) {
        int r = ld.t.r0 + 16 * ld.grp, nr = ld.t.r1 - r < 16 ? ld.t.r1 - r : 16;
        int c0 = ld.ch * ld.g.C, wd = ld.t.K - c0 < ld.g.C ? ld.t.K - c0 : ld.g.C;
        int s = rg.it % rg.nst, pitch = mk_pitch(wd);
        unsigned char *dst = rg.stage + (size_t)s * rg.stg;
        mk_bar_wait(&rg.empty[s], ((rg.it / rg.nst) & 1) ^ 1);
        mk_expect(&rg.full[s], (uint32_t)(nr * wd * 2));
        for (int i = 0; i < nr; i++)
            mk_load(dst + (size_t)i * pitch, ld.t.w + ((size_t)(r + i) * ld.t.K + c0) * 2,
                    (uint32_t)wd * 2, &rg.full[s], pol);
    }
}

/* ---- the consumers: products ---- */

/* acc[r - t.r0] += row r of the weight . xs, for the block's rows, on the
 * tensor cores: per stage, each warp takes 1/MK_CW of the chunk's 16-column
 * steps; a step is one ldmatrix of 16 rows x 16 weights and one m16n8k16
 * mma against x broadcast to all 8 columns of B (7 of them wasted: the
 * tensor cores have throughput to spare, the issue slots do not). The
 * first two versions on the CUDA cores (docs/GPU_NOTES.md, v16, v17)
 * spent 27-70 instructions per 512 bytes where this spends about 4, and
 * the consumers, not the memory, were the bound. */
template <typename T>
__device__ void mk_consume(mk_ring &rg, const mk_task &t, int cmax, const T *xs, float *acc,
                           int skip)
{
    if (t.r1 <= t.r0)
        return;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    mk_geo g = mk_geo_of(t, cmax);
    int mrow = (lane & 7) + ((lane >> 3) & 1) * 8, mcol = (lane >> 4) * 8;
    int gq = lane >> 2, cq = lane & 3;
    for (int grp = 0; grp < g.ngrp; grp++) {
        float d0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int nr = t.r1 - t.r0 - grp * 16 < 16 ? t.r1 - t.r0 - grp * 16 : 16;
        for (int ch = 0; ch < g.nch; ch++) {
            int c0 = ch * g.C, wd = t.K - c0 < g.C ? t.K - c0 : g.C, S = wd / 16;
            int s = rg.it % rg.nst;
            uint32_t base = mm_smem_u32(rg.stage + (size_t)s * rg.stg) +
                            (uint32_t)(mrow * mk_pitch(wd) + mcol * 2);
            const T *xc = xs + c0 + 2 * cq;
            int k = S * w / MK_CW, k1 = S * (w + 1) / MK_CW;
            if (skip & MM_K_MEGA_SKIP_DOT)
                k1 = k;
            mk_bar_wait(&rg.full[s], (rg.it / rg.nst) & 1);
            for (; k + 1 < k1; k += 2) {
                uint32_t a0[4], a1[4];
                mm_ldsm4(a0, base + (uint32_t)k * 32);
                mm_ldsm4(a1, base + (uint32_t)k * 32 + 32);
                const uint32_t *xw = (const uint32_t *)(xc + k * 16);
                mm_mma16816<T>(d0, a0, xw[0], xw[4]);
                mm_mma16816<T>(d1, a1, xw[8], xw[12]);
            }
            if (k < k1) {
                uint32_t a0[4];
                mm_ldsm4(a0, base + (uint32_t)k * 32);
                const uint32_t *xw = (const uint32_t *)(xc + k * 16);
                mm_mma16816<T>(d0, a0, xw[0], xw[4]);
            }
            __syncwarp();
            if (lane == 0)
                mk_bar_arrive(&rg.empty[s]);
            rg.it++;
        }
        /* every column of the result is the product: lane (g, 0) holds
         * rows g and g + 8 */
        if (cq == 0) {
            if (gq < nr)
                atomicAdd(&acc[grp * 16 + gq], d0[0] + d1[0]);
            if (gq + 8 < nr)
                atomicAdd(&acc[grp * 16 + gq + 8], d0[2] + d1[2]);
        }
    }
}
#endif

/* ---- the consumers: the rest ---- */

struct mk_shared {
    float red[MK_CW];
    float qs[256];
    float sc[MK_CAPMAX];
    float ared[MK_RED];
    int last;
};

/* Counters (p.ctr, zero when a launch begins; the last block out zeroes
 * them again). A full barrier is an arrival of every block and a wait
 * for all of them; the two exchanges around attention are split:
 * every block arrives once its q/k/v rows are written but only the
 * attention work items wait for that, and every block waits only for
 * the heads, not for blocks that had no attention to do. (Tagged words
 * polled in place of counters - one round trip instead of three - were
 * measured slower, docs/GPU_NOTES.md v19.) */
enum {
    MK_FULL,  /* grid barriers */
    MK_QKV_C, /* blocks whose q/k/v rows are written (attention waits for nb) */
    MK_HEADS, /* heads whose attention output is written (all wait for nq) */
    MK_EXIT,  /* blocks done */
    MK_NCTR
};
static_assert(MK_NCTR == MM_K_MEGA_CTRS, "kernels.h sizes the counters");

/* Arrive on counter c once the block's consumers are done writing: a
 * fence makes their writes visible before the count says so. */
__device__ void mk_arrive(unsigned *c)
{
    mk_sync();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(c, 1u);
    }
}

/* Wait until counter c reaches target (one thread polls). A count that
 * never comes is a bug (or blocks that are not all resident): trap after
 * seconds of polling - a sticky error the worker reports and exits on -
 * rather than hold the GPU forever. */
#define MK_SPIN_MAX (1u << 26)
__device__ void mk_wait(const unsigned *c, unsigned target, int skip)
{
    if (threadIdx.x == 0 && !(skip & MM_K_MEGA_SKIP_SYNC)) {
        unsigned v, spins = 0;
        for (;;) {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
            if (v >= target)
                break;
            if (++spins > MK_SPIN_MAX)
                __trap();
        }
    }
    mk_sync();
}

__device__ float mk_sum(float v, mk_shared &sh)
{
    v = mm_warp_sum(v);
    mk_sync();
    if ((threadIdx.x & 31) == 0)
        sh.red[threadIdx.x >> 5] = v;
    mk_sync();
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < MK_CW; i++)
        s += sh.red[i];
    return s;
}

/* xs = RMSNorm(src) * w in T, src either the residual (float, written by
 * other blocks) or an embedding row (T). */
template <typename T>
__device__ void mk_norm(const float *x, const T *emb, const float *w, int H, float eps, T *xs,
                        mk_shared &sh, int skip)
{
    if (skip & MM_K_MEGA_SKIP_NORM)
        return;
    float v[MK_NV], ss = 0.0f;
#pragma unroll
    for (int u = 0; u < MK_NV; u++) {
        int i = threadIdx.x + u * MK_CT;
        v[u] = i < H ? (emb ? mm_to_f(emb[i]) : __ldcg(x + i)) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < MK_NV; u++)
        ss += v[u] * v[u];
    float inv = rsqrtf(mk_sum(ss, sh) / (float)H + eps);
#pragma unroll
    for (int u = 0; u < MK_NV; u++) {
        int i = threadIdx.x + u * MK_CT;
        if (i < H)
            xs[i] = mm_from_f<T>(v[u] * inv * w[i]);
    }
    mk_sync();
}

/* xs[0, n) = src (16-bit, written by other blocks). */
template <typename T> __device__ void mk_fetch(const T *src, int n, T *xs, int skip)
{
    if (skip & MM_K_MEGA_SKIP_NORM)
        return;
    for (int i = threadIdx.x * 8; i < n; i += MK_CT * 8)
        *(uint4 *)(xs + i) = __ldcg((const uint4 *)(src + i));
    mk_sync();
}

template <typename T> __device__ __forceinline__ float mk_ldf(const T *p)
{
    unsigned short u = __ldcg((const unsigned short *)p);
    return mm_to_f(*reinterpret_cast<const T *>(&u));
}

/* Attention of query head h over context split sp of nsp, at position P.
 * kv, vv: this step's rotated k and v of the head's kv head (shared
 * memory: position P is not read from the cache, which its writer may
 * not have reached). With several splits the last to finish merges them
 * (head_ctr) and counts the head done. */
template <typename T>
__device__ void mk_attend(const mm_k_mega &p, int l, int h, int sp, int nsp, int P, int slot,
                          int nb, T *kv, T *vv, mk_shared &sh)
{
    int hd = p.hd, half = hd / 2, g = h / (p.nq / p.nkv);
    int tid = threadIdx.x;
    const T *qkv = (const T *)p.qkv;
    const mm_k_mega_layer &lw = p.layers[l];
    const T *bias = (const T *)lw.bqkv;
    T *kc = (T *)((char *)p.kv + (size_t)(2 * l) * p.kv_layer_bytes);
    T *vc = (T *)((char *)p.kv + (size_t)(2 * l + 1) * p.kv_layer_bytes);
    const int32_t *table = p.block_tables + (size_t)slot * p.max_blocks;
    int lo = p.window > 0 && P - p.window + 1 > 0 ? P - p.window + 1 : 0, n = P - lo + 1;
    int a = lo + mk_cut(n, sp, nsp), e = lo + mk_cut(n, sp + 1, nsp);
    int tpp = hd / 8, ppp = MK_CT / tpp, cap = ppp * MK_PASS;
    int pi = tid / tpp, dc = (tid % tpp) * 8;
    /* The first round's K and V rows of earlier positions are in the
     * cache already: their loads go out before the wait for this step's
     * q/k/v, off the chain of dependent steps. */
    uint4 kr[MK_PASS], vr[MK_PASS];
#pragma unroll
    for (int u = 0; u < MK_PASS; u++) {
        int j = a + u * ppp + pi;
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
        if (j < e && j < a + cap && j != P) {
            size_t off = (((size_t)table[j / p.bs] * p.nkv + g) * p.bs + j % p.bs) * hd + dc;
            kr[u] = *(const uint4 *)(kc + off);
            vr[u] = *(const uint4 *)(vc + off);
        }
    }
    mk_wait(p.ctr + MK_QKV_C, (unsigned)nb * (l + 1), p.skip);
    /* RoPE of q (head h) and k (kv head g); v plus its bias */
    for (int j = tid; j < 2 * half; j += MK_CT) {
        int i = j % half, base = j < half ? h * hd : (p.nq + g) * hd;
        float x1 = mk_ldf(qkv + base + i), x2 = mk_ldf(qkv + base + i + half);
        if (bias) {
            x1 += mm_to_f(bias[base + i]);
            x2 += mm_to_f(bias[base + i + half]);
        }
        float sn, cs;
        sincosf((float)P * p.inv_freq[i], &sn, &cs);
        T o1 = mm_from_f<T>(x1 * cs - x2 * sn), o2 = mm_from_f<T>(x2 * cs + x1 * sn);
        if (j < half) {
            sh.qs[i] = mm_to_f(o1) * p.scale;
            sh.qs[i + half] = mm_to_f(o2) * p.scale;
        } else {
            kv[i] = o1;
            kv[i + half] = o2;
        }
    }
    for (int d = tid; d < hd; d += MK_CT) {
        int col = (p.nq + p.nkv + g) * hd + d;
        float v = mk_ldf(qkv + col);
        if (bias)
            v += mm_to_f(bias[col]);
        vv[d] = mm_from_f<T>(v);
    }
    mk_sync();
    /* the first head of the group, split 0, writes position P */
    if (h % (p.nq / p.nkv) == 0 && sp == 0 && tid < hd) {
        size_t off = (((size_t)table[P / p.bs] * p.nkv + g) * p.bs + P % p.bs) * hd + tid;
        kc[off] = kv[tid];
        vc[off] = vv[tid];
    }
    float m = -INFINITY, lsum = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
        acc[i] = 0.0f;
    for (int s0 = a; s0 < e; s0 += cap) {
        int cnt = e - s0 < cap ? e - s0 : cap;
#pragma unroll
        for (int u = 0; u < MK_PASS; u++) {
            int j = s0 + u * ppp + pi;
            if (j == P) { /* this step's own k and v */
                kr[u] = *(const uint4 *)(kv + dc);
                vr[u] = *(const uint4 *)(vv + dc);
            } else if (s0 != a && j < s0 + cnt) {
                size_t off = (((size_t)table[j / p.bs] * p.nkv + g) * p.bs + j % p.bs) * hd + dc;
                kr[u] = *(const uint4 *)(kc + off);
                vr[u] = *(const uint4 *)(vc + off);
            } else if (s0 != a) {
                kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
            }
        }
        float mr = -INFINITY;
#pragma unroll
        for (int u = 0; u < MK_PASS; u++) {
            float f[8], sc = 0.0f;
            mm_unpack8<T>(kr[u], f);
#pragma unroll
            for (int i = 0; i < 8; i++)
                sc += f[i] * sh.qs[dc + i];
            for (int o = tpp / 2; o > 0; o >>= 1)
                sc += __shfl_xor_sync(0xffffffffu, sc, o);
            if (u * ppp + pi < cnt) {
                mr = fmaxf(mr, sc);
                if (dc == 0)
                    sh.sc[u * ppp + pi] = sc;
            }
        }
        /* the round's max over the block: per warp, then across warps */
        mr = mm_warp_max(mr);
        mk_sync();
        if ((tid & 31) == 0)
            sh.red[tid >> 5] = mr;
        mk_sync();
#pragma unroll
        for (int i = 0; i < MK_CW; i++)
            mr = fmaxf(mr, sh.red[i]);
        float mn = fmaxf(m, mr), corr = __expf(m - mn), ls = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++)
            acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < MK_PASS; u++) {
            if (u * ppp + pi >= cnt)
                continue;
            float f[8], pj = __expf(sh.sc[u * ppp + pi] - mn);
            ls += pj;
            mm_unpack8<T>(vr[u], f);
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc[i] += pj * f[i];
        }
        /* every group of tpp lanes summed the same positions' weights */
        if (dc != 0)
            ls = 0.0f;
        lsum = lsum * corr + mk_sum(ls, sh);
        m = mn;
    }
    /* sum the ppp position groups' partial outputs */
#pragma unroll
    for (int i = 0; i < 8; i++)
        sh.ared[pi * hd + dc + i] = acc[i];
    mk_sync();
    float o = 0.0f;
    if (tid < hd)
        for (int q = 0; q < ppp; q++)
            o += sh.ared[q * hd + tid];
    T *out = (T *)p.att + (size_t)h * hd;
    if (nsp == 1) {
        if (tid < hd)
            out[tid] = mm_from_f<T>(o / lsum);
        mk_arrive(p.ctr + MK_HEADS);
        return;
    }
    /* several splits: publish (m, l, o); the last split of the head to
     * arrive merges them */
    float *part = p.part + ((size_t)h * nb + sp) * (hd + 2);
    if (tid < hd)
        part[2 + tid] = o;
    if (tid == 0) {
        part[0] = m;
        part[1] = lsum;
    }
    __threadfence();
    mk_sync();
    if (tid == 0)
        sh.last = atomicAdd(&p.head_ctr[h], 1) == nsp - 1;
    mk_sync();
    if (!sh.last)
        return;
    __threadfence();
    if (tid < hd) {
        const float *ph = p.part + (size_t)h * nb * (hd + 2);
        float M = -INFINITY;
        for (int q = 0; q < nsp; q++)
            M = fmaxf(M, __ldcg(ph + (size_t)q * (hd + 2)));
        float Ls = 0.0f, O = 0.0f;
        for (int q = 0; q < nsp; q++) {
            const float *pq = ph + (size_t)q * (hd + 2);
            float f = __expf(__ldcg(pq) - M);
            Ls += __ldcg(pq + 1) * f;
            O += __ldcg(pq + 2 + tid) * f;
        }
        out[tid] = mm_from_f<T>(O / Ls);
    }
    if (tid == 0)
        p.head_ctr[h] = 0;
    mk_arrive(p.ctr + MK_HEADS);
}

template <typename T>
__global__ void __launch_bounds__(MK_THREADS, 1) mega_k(const mm_k_mega p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) uint64_t full[MK_NST], empty[MK_NST];
    __shared__ mk_shared sh;
    /* this step's rotated k and v of one kv head (16-bit raw: the 16-bit
     * types have constructors, which __shared__ variables may not run) */
    __shared__ __align__(16) unsigned short kvraw[256], vvraw[256];
    T *kv = (T *)kvraw, *vv = (T *)vvraw;
    int b = blockIdx.x, nb = gridDim.x, tid = threadIdx.x;
    mk_ring rg = {smem, full, empty, p.nst, p.stg, 0};
    T *xs = (T *)(smem + (size_t)p.nst * p.stg);
    float *acc = (float *)((unsigned char *)xs + p.xs_bytes);
    if (tid == 0) {
        for (int s = 0; s < p.nst; s++) {
            mk_bar_init(&full[s], 1);
            mk_bar_init(&empty[s], MK_CW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    for (int i = tid; i < p.acc_floats; i += blockDim.x)
        acc[i] = 0.0f;
    __syncthreads();

    if (tid >= MK_CT) { /* the producer warp: one lane streams every weight slice */
        if (tid == MK_CT)
            mk_produce(p, rg, b, nb);
        return;
    }

    const int P = p.pos[0], slot = p.slot[0];
    const T *emb = (const T *)p.embed + (size_t)p.ids[0] * p.H;
    unsigned *ctr = p.ctr, nfull = 0;
    int lo = p.window > 0 && P - p.window + 1 > 0 ? P - p.window + 1 : 0;
    int tpp = p.hd / 8, cap = MK_CT / tpp * MK_PASS, n = P - lo + 1;
    /* context splits: at most half a round of positions each (so a
     * thread's K and V loads are half of MK_PASS) while blocks last */
    int nsp = nb / p.nq < 1 ? 1 : nb / p.nq, want = (n + cap / 2 - 1) / (cap / 2);
    nsp = want < nsp ? want : nsp;
    float *x = p.x;
    for (int l = 0; l < p.L; l++) {
        const mm_k_mega_layer &w = p.layers[l];
        /* A: norm, q/k/v */
        mk_norm<T>(x, l ? NULL : emb, w.attn_norm, p.H, p.eps, xs, sh, p.skip);
        mk_task t = mk_task_of(p, l, MK_QKV, b, nb);
        mk_consume<T>(rg, t, p.cmax, xs, acc, p.skip);
        mk_sync();
        for (int r = t.r0 + tid; r < t.r1; r += MK_CT) {
            ((T *)p.qkv)[r] = mm_from_f<T>(acc[r - t.r0]);
            acc[r - t.r0] = 0.0f;
        }
        mk_arrive(ctr + MK_QKV_C);
        /* B: attention (its work items wait for every block's q/k/v rows;
         * the other blocks go on to wait for the heads) */
        for (int wi = b; wi < p.nq * nsp && !(p.skip & MM_K_MEGA_SKIP_ATTN); wi += nb) {
            mk_attend<T>(p, l, wi / nsp, wi % nsp, nsp, P, slot, nb, kv, vv, sh);
            mk_sync();
        }
        for (int h = b; h < p.nq && (p.skip & MM_K_MEGA_SKIP_ATTN); h += nb)
            mk_arrive(ctr + MK_HEADS);
        /* C: o, into the residual */
        mk_wait(ctr + MK_HEADS, (unsigned)p.nq * (l + 1), p.skip);
        mk_fetch<T>((const T *)p.att, p.nq * p.hd, xs, p.skip);
        t = mk_task_of(p, l, MK_O, b, nb);
        mk_consume<T>(rg, t, p.cmax, xs, acc, p.skip);
        mk_sync();
        for (int r = t.r0 + tid; r < t.r1; r += MK_CT) {
            float v = (l ? __ldcg(x + r) : mm_to_f(emb[r])) + acc[r - t.r0];
            if (w.bo)
                v += mm_to_f(((const T *)w.bo)[r]);
            x[r] = v;
            acc[r - t.r0] = 0.0f;
        }
        mk_arrive(ctr + MK_FULL);
        mk_wait(ctr + MK_FULL, nfull += nb, p.skip);
        /* D: norm, gate/up with SwiGLU */
        mk_norm<T>(x, NULL, w.mlp_norm, p.H, p.eps, xs, sh, p.skip);
        t = mk_task_of(p, l, MK_GU, b, nb);
        mk_consume<T>(rg, t, p.cmax, xs, acc, p.skip);
        mk_sync();
        for (int i = t.r0 / 2 + tid; i < t.r1 / 2; i += MK_CT) {
            int j = 2 * i - t.r0;
            float gv = mm_to_f(mm_from_f<T>(acc[j])), uv = mm_to_f(mm_from_f<T>(acc[j + 1]));
            ((T *)p.act)[i] = mm_from_f<T>(gv / (1.0f + __expf(-gv)) * uv);
            acc[j] = acc[j + 1] = 0.0f;
        }
        mk_arrive(ctr + MK_FULL);
        mk_wait(ctr + MK_FULL, nfull += nb, p.skip);
        /* E: down, into the residual */
        mk_fetch<T>((const T *)p.act, p.I, xs, p.skip);
        t = mk_task_of(p, l, MK_DOWN, b, nb);
        mk_consume<T>(rg, t, p.cmax, xs, acc, p.skip);
        mk_sync();
        for (int r = t.r0 + tid; r < t.r1; r += MK_CT) {
            x[r] = __ldcg(x + r) + acc[r - t.r0];
            acc[r - t.r0] = 0.0f;
        }
        mk_arrive(ctr + MK_FULL);
        mk_wait(ctr + MK_FULL, nfull += nb, p.skip);
    }
    mk_norm<T>(x, NULL, p.norm, p.H, p.eps, xs, sh, p.skip);
    mk_task t = mk_task_of(p, 0, MK_LM, b, nb);
    mk_consume<T>(rg, t, p.cmax, xs, acc, p.skip);
    mk_sync();
    for (int r = t.r0 + tid; r < t.r1; r += MK_CT)
        p.logits[r] = acc[r - t.r0];
    /* The last block out zeroes the counters for the next launch: every
     * other block has passed its last wait. */
    mk_sync();
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(ctr + MK_EXIT, 1u) == (unsigned)nb - 1)
            for (int i = 0; i < MK_NCTR; i++)
                ctr[i] = 0;
    }
#else
    (void)p;
    __trap();
#endif
}

/* ---- host side ---- */

static int mk_cdiv(int a, int b) { return (a + b - 1) / b; }

template <typename T> static int mega_setup(mm_k_mega *p, int nb, size_t smem_optin)
{
    cudaFuncAttributes fa;
    cudaError_t e = cudaFuncGetAttributes(&fa, mega_k<T>);
    if (e != cudaSuccess)
        return (int)e;
    /* shared memory: the stages, xs (the widest product input), acc (the
     * most rows a block owns in one product) */
    int widest = p->H > p->I ? p->H : p->I;
    if (p->nq * p->hd > widest)
        widest = p->nq * p->hd;
    p->xs_bytes = (widest * 2 + 15) / 16 * 16;
    int rows = mk_cdiv(p->V, nb);
    int q = mk_cdiv((p->nq + 2 * p->nkv) * p->hd, nb), pairs = 2 * mk_cdiv(p->I, nb);
    rows = rows > q ? rows : q;
    rows = rows > pairs ? rows : pairs;
    p->acc_floats = (rows + 3) / 4 * 4;
    long long ring = (long long)smem_optin - (long long)fa.sharedSizeBytes - p->xs_bytes -
                     (long long)p->acc_floats * 4 - 1024;
    /* a stage holds 16 rows of cmax columns with their padding */
    p->nst = MK_NST;
    p->stg = (int)(ring / p->nst) / 16 * 16;
    p->cmax = (p->stg / 16 - 16) / 2 / 16 * 16;
    if (ring <= 0 || p->cmax < 64)
        return (int)cudaErrorInvalidValue;
    size_t dyn = (size_t)p->nst * p->stg + p->xs_bytes + (size_t)p->acc_floats * 4;
    e = cudaFuncSetAttribute(mega_k<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn);
    if (e != cudaSuccess)
        return (int)e;
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mega_k<T>, MK_THREADS, dyn);
    if (e != cudaSuccess)
        return (int)e;
    return per_sm >= 1 ? 0 : (int)cudaErrorInvalidConfiguration;
}

extern "C" int mm_k_mega_setup(mm_kdt dt, mm_k_mega *p, int nb, size_t smem_optin)
{
    if (p->hd != 64 && p->hd != 128 && p->hd != 256)
        return (int)cudaErrorInvalidValue;
    /* the norm's registers, 16-column mma steps */
    if (p->H > MK_NV * MK_CT || p->H % 16 || p->I % 16 || p->nq % p->nkv)
        return (int)cudaErrorInvalidValue;
    return MM_DISPATCH(dt, mega_setup, p, nb, smem_optin);
}

template <typename T> static int mega_run(const mm_k_mega *p, int nb, cudaStream_t s)
{
    size_t dyn = (size_t)p->nst * p->stg + p->xs_bytes + (size_t)p->acc_floats * 4;
    mega_k<T><<<nb, MK_THREADS, dyn, s>>>(*p);
    return mm_launch_status();
}

extern "C" int mm_k_mega_run(mm_kdt dt, const mm_k_mega *p, int nb, cudaStream_t s)
{
    return MM_DISPATCH(dt, mega_run, p, nb, s);
}
