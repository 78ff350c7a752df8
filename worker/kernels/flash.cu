/* flash.cu: causal attention of a prompt slice with its scores kept on
 * chip (flash attention), on the tensor cores.
 *
 * Why: the cuBLAS path writes every score of a slice to memory in float,
 * runs a softmax kernel over them, multiplies the rounded probabilities by
 * V, and computes the masked upper half too - about 40% of a 2048-token
 * prefill on the 1.5B shape (docs/BENCHMARKS.md). Here a block takes 64
 * query rows of one head (16 per warp) and walks the key tiles of 64 that
 * its rows can see, causal tiles beyond the diagonal never loaded:
 * S = Q K^T and O += P V as m16n8k16 mma with float accumulation, the
 * softmax online in registers (running max and sum per row, the
 * probabilities rounded to the 16-bit type as the cuBLAS path rounds P).
 * K and V tiles pass through two shared-memory buffers with a 16-byte row
 * padding (ldmatrix reads them without bank conflicts): the next tile's
 * copies run while the current one is multiplied.
 *
 * Inputs as the cuBLAS path has them: q rows of the slice (stride qd), the
 * slice's contiguous K and V [nkv][ctx][hd] (mm_k_gather_kv). */
#include "common.cuh"

#define FA_BM 64 /* query rows a block */
#define FA_BN 64 /* keys a tile */
#define FA_THREADS 128

__device__ __forceinline__ uint32_t fa_pack(float a, float b, __nv_bfloat16 *)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *(uint32_t *)&v;
}
__device__ __forceinline__ uint32_t fa_pack(float a, float b, __half *)
{
    __half2 v = __floats2half2_rn(a, b);
    return *(uint32_t *)&v;
}

/* Start copying rows rows of HD 16-bit values from src (row stride ld
 * elements; rows at or past valid are zero-filled) into shared memory of
 * pitch HD + 8. fa_commit() closes a group of such copies; fa_wait1()
 * waits for every group but the newest. */
template <int HD>
__device__ __forceinline__ void fa_tile(uint16_t *dst, const uint16_t *src, size_t ld, int rows,
                                        int valid)
{
    constexpr int CH = HD / 8; /* 16-byte chunks a row */
    for (int c = threadIdx.x; c < rows * CH; c += FA_THREADS) {
        int r = c / CH, k = c % CH;
        const uint16_t *g = src + (size_t)(r < valid ? r : 0) * ld + k * 8;
        uint32_t d = mm_smem_u32(dst + r * (HD + 8) + k * 8);
        int bytes = r < valid ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(g),
                     "r"(bytes)
                     : "memory");
    }
}

__device__ __forceinline__ void fa_commit(void)
{
    asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void fa_wait1(void)
{
    asm volatile("cp.async.wait_group 1;" ::: "memory");
}

template <typename T, int HD>
__global__ void __launch_bounds__(FA_THREADS)
flash_k(const T *__restrict__ q, int qd, const T *__restrict__ kc, const T *__restrict__ vc,
        int ctx, int pos0, int n, int group, int window, float scale_log2, T *__restrict__ out)
{
    constexpr int P = HD + 8; /* shared row pitch, elements */
    extern __shared__ uint4 fa_raw[];
    uint16_t *sq = (uint16_t *)fa_raw, *skv = sq + FA_BM * P; /* then K0, V0, K1, V1 */
    mm_pdl_release();
    mm_pdl_wait();
    int i0 = blockIdx.x * FA_BM, h = blockIdx.y, kvh = h / group;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const uint16_t *kh = (const uint16_t *)kc + (size_t)kvh * ctx * HD;
    const uint16_t *vh = (const uint16_t *)vc + (size_t)kvh * ctx * HD;

    uint32_t qf[HD / 16][4]; /* this warp's 16 query rows as A fragments */

    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++)
        o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    int qp[2] = {pos0 + i0 + w * 16 + g, pos0 + i0 + w * 16 + g + 8};
    /* the keys the block's rows can see: up to its last row's position,
     * from its first row's window */
    int jend = pos0 + i0 + FA_BM < ctx ? pos0 + i0 + FA_BM : ctx;
    int jbeg = 0;
    if (window > 0 && pos0 + i0 - window + 1 > 0)
        jbeg = (pos0 + i0 - window + 1) / FA_BN * FA_BN;
    /* the first group: Q and the first K/V tile (there is always one: the
     * block's first row sees its own position) */
    fa_tile<HD>(sq, (const uint16_t *)q + (size_t)i0 * qd + (size_t)h * HD, (size_t)qd, FA_BM,
                n - i0);
    fa_tile<HD>(skv, kh + (size_t)jbeg * HD, HD, FA_BN, ctx - jbeg);
    fa_tile<HD>(skv + FA_BN * P, vh + (size_t)jbeg * HD, HD, FA_BN, ctx - jbeg);
    fa_commit();
    for (int j0 = jbeg, buf = 0; j0 < jend; j0 += FA_BN, buf ^= 1) {
        uint16_t *sk = skv + 2 * buf * FA_BN * P, *sv = sk + FA_BN * P;
        if (j0 + FA_BN < jend) { /* the next tile into the other buffer */
            uint16_t *nk = skv + 2 * (buf ^ 1) * FA_BN * P;
            fa_tile<HD>(nk, kh + (size_t)(j0 + FA_BN) * HD, HD, FA_BN, ctx - j0 - FA_BN);
            fa_tile<HD>(nk + FA_BN * P, vh + (size_t)(j0 + FA_BN) * HD, HD, FA_BN,
                        ctx - j0 - FA_BN);
        }
        fa_commit();
        fa_wait1();
        __syncthreads();
        if (j0 == jbeg)
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++)
                mm_ldsm4(qf[ks],
                         mm_smem_u32(sq + (w * 16 + (lane & 15)) * P + ks * 16 + (lane >> 4) * 8));
        /* S = Q K^T: 8 blocks of 8 keys, two at a time */
        float s[FA_BN / 8][4];
#pragma unroll
        for (int nb = 0; nb < FA_BN / 8; nb++)
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
        for (int nb = 0; nb < FA_BN / 8; nb += 2)
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) {
                uint32_t b[4];
                mm_ldsm4(b, mm_smem_u32(sk + (nb * 8 + (lane & 7) + (lane >> 4) * 8) * P + ks * 16 +
                                    ((lane >> 3) & 1) * 8));
                mm_mma16816<T>(s[nb], qf[ks], b[0], b[1]);
                mm_mma16816<T>(s[nb + 1], qf[ks], b[2], b[3]);
            }
        /* mask, scale (log2 domain), the rows' new maxima */
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nb = 0; nb < FA_BN / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e >> 1, kp = j0 + nb * 8 + 2 * c + (e & 1);
                bool ok = kp <= qp[r] && kp < ctx && (window <= 0 || kp > qp[r] - window);
                s[nb][e] = ok ? s[nb][e] * scale_log2 : -INFINITY;
                mx[r] = fmaxf(mx[r], s[nb][e]);
            }
        float corr[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float mn = fmaxf(m[r], mx[r]);
            mu[r] = mn == -INFINITY ? 0.0f : mn; /* a row with nothing visible yet */
            corr[r] = exp2f(m[r] - mu[r]);
            m[r] = mn;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int d = 0; d < HD / 8; d++) {
            o[d][0] *= corr[0];
            o[d][1] *= corr[0];
            o[d][2] *= corr[1];
            o[d][3] *= corr[1];
        }
        /* P = exp2(S - max), rounded to T as A fragments: the S tile's
         * accumulator layout is the next mma's A layout */
        uint32_t pa[FA_BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                float *sv2 = s[2 * kk + half];
                float p0 = exp2f(sv2[0] - mu[0]), p1 = exp2f(sv2[1] - mu[0]);
                float p2 = exp2f(sv2[2] - mu[1]), p3 = exp2f(sv2[3] - mu[1]);
                uint32_t lo = fa_pack(p0, p1, (T *)NULL), hi = fa_pack(p2, p3, (T *)NULL);
                /* the sum counts the probabilities as rounded */
                const T *rl = (const T *)&lo, *rh = (const T *)&hi;
                l[0] += mm_to_f(rl[0]) + mm_to_f(rl[1]);
                l[1] += mm_to_f(rh[0]) + mm_to_f(rh[1]);
                pa[kk][2 * half] = lo;
                pa[kk][2 * half + 1] = hi;
            }
        /* O += P V: V's rows are keys, so B comes transposed */
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++)
#pragma unroll
            for (int d = 0; d < HD / 8; d += 2) {
                uint32_t b[4];
                mm_ldsm4t(b, mm_smem_u32(sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * P +
                                     d * 8 + (lane >> 4) * 8));
                mm_mma16816<T>(o[d], pa[kk], b[0], b[1]);
                mm_mma16816<T>(o[d + 1], pa[kk], b[2], b[3]);
            }
        __syncthreads(); /* this buffer is refilled by the next iteration */
    }
    /* the 4 lanes of a row hold parts of its sum */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        l[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = i0 + w * 16 + g + 8 * r;
        if (row >= n)
            continue;
        T *dst = out + (size_t)row * qd + (size_t)h * HD + 2 * c;
#pragma unroll
        for (int d = 0; d < HD / 8; d++)
            *(uint32_t *)(dst + d * 8) =
                fa_pack(o[d][2 * r] * l[r], o[d][2 * r + 1] * l[r], (T *)NULL);
    }
}

/* Q, two K tiles and two V tiles, padded */
template <typename T, int HD> static size_t flash_smem(void)
{
    return (size_t)(FA_BM + 4 * FA_BN) * (HD + 8) * sizeof(T);
}

template <typename T, int HD>
static int flash_hd(const void *q, int qd, const void *kc, const void *vc, int ctx, int pos0,
                    int n, int nq, int nkv, int window, float scale, void *out, cudaStream_t s)
{
    size_t smem = flash_smem<T, HD>();
    if (n > 0)
        mm_launch(flash_k<T, HD>, dim3((n + FA_BM - 1) / FA_BM, nq), FA_THREADS, smem, s,
                  (const T *)q, qd, (const T *)kc, (const T *)vc, ctx, pos0, n, nq / nkv,
                  window, scale * 1.4426950408889634f, (T *)out);
    return mm_launch_status();
}

template <typename T>
static int flash(const void *q, int qd, const void *kc, const void *vc, int ctx, int pos0, int n,
                 int nq, int nkv, int hd, int window, float scale, void *out, cudaStream_t s)
{
    if (hd == 64)
        return flash_hd<T, 64>(q, qd, kc, vc, ctx, pos0, n, nq, nkv, window, scale, out, s);
    if (hd == 128)
        return flash_hd<T, 128>(q, qd, kc, vc, ctx, pos0, n, nq, nkv, window, scale, out, s);
    return (int)cudaErrorInvalidValue;
}

/* Once per process and type: the kernel's shared memory is above the 48
 * KiB default for head_dim 128. */
template <typename T> static int flash_setup(int hd)
{
    if (hd == 64)
        return (int)cudaFuncSetAttribute(flash_k<T, 64>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)flash_smem<T, 64>());
    if (hd == 128)
        return (int)cudaFuncSetAttribute(flash_k<T, 128>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)flash_smem<T, 128>());
    return (int)cudaErrorInvalidValue;
}

extern "C" int mm_k_flash_setup(mm_kdt dt, int hd) { return MM_DISPATCH(dt, flash_setup, hd); }

extern "C" int mm_k_flash_prefill(mm_kdt dt, const void *q, int qd, const void *kc,
                                  const void *vc, int ctx, int pos0, int n, int nq, int nkv,
                                  int hd, int window, float scale, void *out, cudaStream_t s)
{
    return MM_DISPATCH(dt, flash, q, qd, kc, vc, ctx, pos0, n, nq, nkv, hd, window, scale, out,
                       s);
}
