/* gemv.cu: matrix-vector products for decode steps of up to 8 rows.
 *
 * At batch sizes this small a product is bound by reading the weight once,
 * so the kernel is built around that read: one warp per output feature,
 * 16-byte streaming loads, three or four of them in flight per lane before
 * any arithmetic (up to eight for rows short enough to load in one step),
 * float32 accumulation, a warp reduction at the end. The few
 * input rows are re-read from L1/L2 (they are tiny and hot). Larger
 * batches go to cuBLAS, which wins once the product is compute bound.
 *
 * Products with few output rows and long inputs (down, o: 1536 rows on a
 * 1.5B model) would leave most SMs idle with one warp per row, so they
 * split K over gridDim.y blocks, each writing a float partial that the
 * next norm kernel sums. (SwiGLU folded into the down product's input read
 * was tried and measured slower: every output row recomputes the whole
 * input vector's activations, 1536 x 8960 exponentials per token.) */
#include "common.cuh"

#define GEMV_WARPS 4
#define GEMV_UNROLL 4 /* tiles in flight per lane, gemv_swiglu_k: 2 per row */

/* One 16-byte weight tile of each of NR rows (8 weights at column k)
 * against the M input rows: acc[r * M + m] += w[r] . x[m][k..k+8). Each input
 * tile is loaded once for all NR rows. */
template <typename T, int M, int NR>
__device__ __forceinline__ void gemv_tile(const uint4 *w, const T *__restrict__ x, int K, int k,
                                          float *acc)
{
    float wf[NR][8];
#pragma unroll
    for (int r = 0; r < NR; r++)
        mm_unpack8<T>(w[r], wf[r]);
#pragma unroll
    for (int m = 0; m < M; m++) {
        float xf[8];
        mm_unpack8<T>(__ldg((const uint4 *)(x + (size_t)m * K + k)), xf);
#pragma unroll
        for (int r = 0; r < NR; r++)
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc[r * M + m] += wf[r][i] * xf[i];
    }
}

/* Pipelined products for single rows (mm_k_set_gemv_pipe): each step's
 * inputs, then the next step's weight tiles, are requested before this
 * step's arithmetic. Measured (docs/GPU_NOTES.md v23): a gain on long rows
 * (7B's down product, 18944 long: 3.93 -> 3.84 ms a token), a loss on
 * short ones (1.5B's q/k/v and gate/up: 1.22 -> 1.25, the extra registers
 * cost blocks per SM), so by default only rows longer than PIPE_K. */
static int gemv_pipe = 1; /* 0 off, 1 rows longer than PIPE_K, 2 all */
#define PIPE_K 4096

extern "C" void mm_k_set_gemv_pipe(int mode) { gemv_pipe = mode; }

/* One-step products (mm_k_set_gemv_onestep, docs/GPU_NOTES.md v25): a
 * single row's share of at most gemv_onestep_tiles whole tiles is
 * requested at once, so each warp makes one round trip to memory instead
 * of steps and single leftover tiles (1.5B's down product, split in 3
 * shares of 2992: 2 steps and 4 leftovers a warp; now 5 shares of 7 tiles,
 * one step). 1: splits over K are chosen among those that cut the row into
 * equal shares of whole tiles that fit; 2 (the default): unsplit single
 * rows that fit, too. Measured on the 1.5B shape 1.218 -> 1.194 ms a
 * token, on 7B (whose long rows do not fit) 3.818 -> 3.810. */
static int gemv_onestep = 2, gemv_onestep_tiles = 8; /* tiles at most: 1-8 */

extern "C" void mm_k_set_gemv_onestep(int mode, int max_tiles)
{
    gemv_onestep = mode;
    gemv_onestep_tiles = max_tiles < 1 ? 1 : max_tiles > 8 ? 8 : max_tiles;
}

static bool gemv_onestep_row(int K, int KS, int splits)
{
    return gemv_onestep && KS % 256 == 0 && K % KS == 0 && KS / 256 <= gemv_onestep_tiles &&
           (splits > 1 || gemv_onestep >= 2);
}

static bool gemv_pipe_row(int K) { return gemv_pipe == 2 || (gemv_pipe == 1 && K > PIPE_K); }

/* ONE: every share is exactly one step of U tiles (one-step products,
 * gemv_onestep_row), and the kernel holds only that path: these kernels
 * start on SMs whose instruction cache does not hold them, so their code's
 * length is latency (docs/GPU_NOTES.md v32). The same sums in the same
 * order as the general path. */
template <typename T, int M, bool F32, int U, bool P, bool ONE = false, bool ALLPRE = false>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_k(const T *__restrict__ W, const T *__restrict__ x, int N, int K, int KS, void *y)
{
    static_assert(!P || M == 1, "the pipelined product serves single rows");
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) {
        mm_pdl_release();
        return;
    }
    int kb = blockIdx.y * KS, ke = kb + KS < K ? kb + KS : K;
    const T *wr = W + (size_t)n * K;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++)
        acc[m] = 0.0f;
    constexpr int STEP = 32 * 8 * U;
    /* tiles of the first step requested before the wait: at most 4 (more
     * would queue ahead of the previous kernel's loads, v13b), the rest
     * right after it; ALLPRE: all of them (gemv_pre) */
    constexpr int PRE = ALLPRE || U < 4 ? U : 4;
    int k0 = kb;
    uint4 wv[U];
    bool first = kb + STEP <= ke;
    if (first)
#pragma unroll
        for (int u = 0; u < PRE; u++)
            wv[u] = __ldcs((const uint4 *)(wr + kb + u * 256 + lane * 8));
    mm_pdl_release();
    mm_pdl_wait();
    if (first)
#pragma unroll
        for (int u = PRE; u < U; u++)
            wv[u] = __ldcs((const uint4 *)(wr + kb + u * 256 + lane * 8));
    if constexpr (ONE) {
#pragma unroll
        for (int u = 0; u < U; u++)
            gemv_tile<T, M, 1>(&wv[u], x, K, kb + u * 256 + lane * 8, acc);
        k0 = ke;
    }
    for (; !ONE && k0 + STEP <= ke; k0 += STEP) {
        if constexpr (P) {
            /* this step's inputs first (loads queued behind the next step's
             * weight misses would wait for them), then those weights */
            bool more = k0 + 2 * STEP <= ke;
            uint4 xv[U], wn[U];
#pragma unroll
            for (int u = 0; u < U; u++)
                xv[u] = __ldg((const uint4 *)(x + k0 + u * 256 + lane * 8));
            if (more)
#pragma unroll
                for (int u = 0; u < U; u++)
                    wn[u] = __ldcs((const uint4 *)(wr + k0 + STEP + u * 256 + lane * 8));
#pragma unroll
            for (int u = 0; u < U; u++) {
                float wf[8], xf[8];
                mm_unpack8<T>(wv[u], wf);
                mm_unpack8<T>(xv[u], xf);
#pragma unroll
                for (int i = 0; i < 8; i++)
                    acc[0] += wf[i] * xf[i];
            }
            if (more)
#pragma unroll
                for (int u = 0; u < U; u++)
                    wv[u] = wn[u];
            continue;
        }
        if (k0 != kb)
#pragma unroll
            for (int u = 0; u < U; u++)
                wv[u] = __ldcs((const uint4 *)(wr + k0 + u * 256 + lane * 8));
#pragma unroll
        for (int u = 0; u < U; u++)
            gemv_tile<T, M, 1>(&wv[u], x, K, k0 + u * 256 + lane * 8, acc);
    }
    for (int k = k0 + lane * 8; !ONE && k < ke; k += 256) {
        uint4 w = __ldcs((const uint4 *)(wr + k));
        gemv_tile<T, M, 1>(&w, x, K, k, acc);
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v = mm_warp_sum(acc[m]);
        if (lane == 0) {
            if (F32)
                ((float *)y)[((size_t)blockIdx.y * M + m) * N + n] = v;
            else
                ((T *)y)[(size_t)m * N + n] = mm_from_f<T>(v);
        }
    }
}

/* Unsplit one-step products (q/k/v and the LM head, whose predecessor is
 * a norm that streams nothing) request all their tiles before the wait.
 * Measured with gate/up in one step (gu_step_tiles): 1.5B 1.294 -> 1.281
 * ms a token on an H100, 8 rounds; neutral with 2-tile gate/up steps, a
 * loss on split products such as down (docs/GPU_NOTES.md session 10).
 * MM_CUDA_PRE=0 (a measuring knob) turns it off. */
static int gemv_pre = 1;

extern "C" void mm_k_set_gemv_pre(int on) { gemv_pre = on != 0; }

template <typename T, int M, int U, bool P, bool ONE, bool ALLPRE>
static void gemv_launch_out(dim3 grid, const T *w, const T *x, int N, int K, int KS, void *y,
                            int y_f32, cudaStream_t s)
{
    if (y_f32)
        mm_launch(gemv_k<T, M, true, U, P, ONE, ALLPRE>, grid, GEMV_WARPS * 32, 0, s, w, x, N, K,
                  KS, y);
    else
        mm_launch(gemv_k<T, M, false, U, P, ONE, ALLPRE>, grid, GEMV_WARPS * 32, 0, s, w, x, N, K,
                  KS, y);
}

template <typename T, int M, int U, bool P, bool ONE = false>
static void gemv_launch(dim3 grid, const T *w, const T *x, int N, int K, int KS, void *y,
                        int y_f32, cudaStream_t s)
{
    if constexpr (ONE && U > 4)
        if (gemv_pre && KS >= K) {
            gemv_launch_out<T, M, U, P, ONE, true>(grid, w, x, N, K, KS, y, y_f32, s);
            return;
        }
    gemv_launch_out<T, M, U, P, ONE, false>(grid, w, x, N, K, KS, y, y_f32, s);
}

template <typename T, int M>
static void gemv_m(const void *W, const void *x, int N, int K, int KS, int splits, void *y,
                   int y_f32, cudaStream_t s)
{
    dim3 grid((N + GEMV_WARPS - 1) / GEMV_WARPS, splits);
    const T *w = (const T *)W, *xx = (const T *)x;
    /* Short rows whose tiles come in threes (K = 1536: every product of
     * Qwen2.5-1.5B but down) take two steps of 3 tiles instead of one of
     * 4 and two single leftovers: measured 1.244 vs 1.272 ms per token
     * (docs/GPU_NOTES.md, v13). */
    bool threes = KS == K && K <= 2048 && (K / 256) % 3 == 0 && K % 256 == 0;
    if constexpr (M == 1) {
        if (gemv_onestep_row(K, KS, splits)) {
            switch (KS / 256) {
            case 1: gemv_launch<T, 1, 1, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 2: gemv_launch<T, 1, 2, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 3: gemv_launch<T, 1, 3, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 4: gemv_launch<T, 1, 4, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 5: gemv_launch<T, 1, 5, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 6: gemv_launch<T, 1, 6, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            case 7: gemv_launch<T, 1, 7, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            default: gemv_launch<T, 1, 8, false, true>(grid, w, xx, N, K, KS, y, y_f32, s); break;
            }
            return;
        }
        if (gemv_pipe_row(KS)) {
            if (threes)
                gemv_launch<T, 1, 3, true>(grid, w, xx, N, K, KS, y, y_f32, s);
            else
                gemv_launch<T, 1, GEMV_UNROLL, true>(grid, w, xx, N, K, KS, y, y_f32, s);
            return;
        }
    }
    if (threes)
        gemv_launch<T, M, 3, false>(grid, w, xx, N, K, KS, y, y_f32, s);
    else
        gemv_launch<T, M, GEMV_UNROLL, false>(grid, w, xx, N, K, KS, y, y_f32, s);
}

template <typename T>
static int gemv(const void *W, const void *x, int M, int N, int K, int KS, int splits, void *y,
                int y_f32, cudaStream_t s)
{
    switch (M) {
    case 1: gemv_m<T, 1>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 2: gemv_m<T, 2>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 3: gemv_m<T, 3>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 4: gemv_m<T, 4>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 5: gemv_m<T, 5>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 6: gemv_m<T, 6>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 7: gemv_m<T, 7>(W, x, N, K, KS, splits, y, y_f32, s); break;
    case 8: gemv_m<T, 8>(W, x, N, K, KS, splits, y, y_f32, s); break;
    default: return (int)cudaErrorInvalidValue;
    }
    return mm_launch_status();
}

extern "C" int mm_k_gemv_ok(int M, int K)
{
    return M >= 1 && M <= MM_K_GEMV_MAX_M && K % 8 == 0;
}

extern "C" int mm_k_gemv_splits(int N, int K, int nsm)
{
    /* Aim at 32 warps per SM */
    int want = (32 * nsm + N - 1) / N;
    if (gemv_onestep && K % 256 == 0) /* the fewest equal shares of whole
                                       * tiles from there, one step each */
        for (int s = want < 1 ? 1 : want; s <= 8; s++)
            if ((K / 256) % s == 0 && K / 256 / s <= gemv_onestep_tiles)
                return s;
    /* else each split keeps at least two unrolled steps (2048 inputs) so
     * the partials stay few */
    int most = K / 2048;
    if (want > most)
        want = most;
    if (want > 8)
        want = 8;
    return want < 1 ? 1 : want;
}

extern "C" int mm_k_gemv(mm_kdt dt, const void *W, const void *x, int M, int N, int K, void *y,
                         int y_f32, int splits, cudaStream_t s)
{
    if (!mm_k_gemv_ok(M, K) || splits < 1 || (splits > 1 && !y_f32))
        return (int)cudaErrorInvalidValue;
    int KS = ((K + splits - 1) / splits + 7) / 8 * 8;
    splits = (K + KS - 1) / KS;
    return MM_DISPATCH(dt, gemv, W, x, M, N, K, KS, splits, y, y_f32, s);
}

/* ---- gate/up with SwiGLU: one warp per (gate row, up row) pair ---- */

/* UT: tiles of each row a step, the first step's all requested before the
 * wait (a lane's 2 x UT loads in flight): 2, or for single rows 6 or 7
 * (gu_step_tiles). */
template <typename T, int M, bool P, int UT = 2>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_swiglu_k(const T *__restrict__ W, const T *__restrict__ x, int I, int K, T *act)
{
    static_assert(!P || M == 1, "the pipelined product serves single rows");
    static_assert(!P || UT == 2, "the pipelined product takes two tiles a step");
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= I) {
        mm_pdl_release();
        return;
    }
    const T *wg = W + (size_t)(2 * n) * K, *wu = wg + K;
    float acc[2 * M]; /* gate rows, then up rows */
#pragma unroll
    for (int m = 0; m < 2 * M; m++)
        acc[m] = 0.0f;
    constexpr int STEP = 32 * 8 * UT; /* UT tiles of each row in flight */
    int k0 = 0;
    uint4 wv[UT][2];                  /* [tile][gate, up] */
    if (STEP <= K)
#pragma unroll
        for (int u = 0; u < UT; u++) {
            wv[u][0] = __ldcs((const uint4 *)(wg + u * 256 + lane * 8));
            wv[u][1] = __ldcs((const uint4 *)(wu + u * 256 + lane * 8));
        }
    mm_pdl_release();
    mm_pdl_wait();
    for (; k0 + STEP <= K; k0 += STEP) {
        if constexpr (P) { /* M == 1: the next step's tiles requested before
                            * this step's sums, after its inputs */
            uint4 wn[2][2], xv[2];
            bool more = k0 + 2 * STEP <= K;
#pragma unroll
            for (int u = 0; u < 2; u++)
                xv[u] = __ldg((const uint4 *)(x + k0 + u * 256 + lane * 8));
            if (more)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    wn[u][0] = __ldcs((const uint4 *)(wg + k0 + STEP + u * 256 + lane * 8));
                    wn[u][1] = __ldcs((const uint4 *)(wu + k0 + STEP + u * 256 + lane * 8));
                }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                float g[8], up[8], xf[8];
                mm_unpack8<T>(wv[u][0], g);
                mm_unpack8<T>(wv[u][1], up);
                mm_unpack8<T>(xv[u], xf);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[0] += g[i] * xf[i];
                    acc[M] += up[i] * xf[i];
                }
            }
            if (more)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    wv[u][0] = wn[u][0];
                    wv[u][1] = wn[u][1];
                }
            continue;
        }
        if (k0)
#pragma unroll
            for (int u = 0; u < UT; u++) {
                wv[u][0] = __ldcs((const uint4 *)(wg + k0 + u * 256 + lane * 8));
                wv[u][1] = __ldcs((const uint4 *)(wu + k0 + u * 256 + lane * 8));
            }
#pragma unroll
        for (int u = 0; u < UT; u++)
            gemv_tile<T, M, 2>(wv[u], x, K, k0 + u * 256 + lane * 8, acc);
    }
    for (int k = k0 + lane * 8; k < K; k += 256) {
        uint4 w[2] = {__ldcs((const uint4 *)(wg + k)), __ldcs((const uint4 *)(wu + k))};
        gemv_tile<T, M, 2>(w, x, K, k, acc);
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float g = mm_warp_sum(acc[m]), u = mm_warp_sum(acc[M + m]);
        if (lane == 0) {
            g = mm_to_f(mm_from_f<T>(g));
            u = mm_to_f(mm_from_f<T>(u));
            act[(size_t)m * I + n] = mm_from_f<T>(g / (1.0f + __expf(-g)) * u);
        }
    }
}

/* Single-row gate/up in steps of 6 or 7 tiles of each row (all of the
 * first step requested before the wait) where they divide the row: the
 * row pair in one step on the 1.5B shape (6 tiles), two on 7B (14), with
 * 80 or 96 registers - fewer warps a SM, each with 12 or 14 loads in
 * flight where 2-tile steps have 4 (1.5B 1.300 -> 1.281 ms a token, 7B
 * 4.972 -> 4.950 on an H100, docs/GPU_NOTES.md session 10; 3-tile steps,
 * or 6 with only 2 requested before the wait, were slower). Otherwise 2.
 * MM_CUDA_GU_TILES (a measuring knob) forces 2, 6 or 7 where they divide. */
static int gu_tiles = 0; /* 0: that rule */

extern "C" void mm_k_set_gemv_swiglu_tiles(int tiles) { gu_tiles = tiles; }

static int gu_step_tiles(int K)
{
    if (K <= 0 || K % 256 != 0)
        return 2;
    int tiles = K / 256;
    if (gu_tiles)
        return (gu_tiles == 6 || gu_tiles == 7) && tiles % gu_tiles == 0 ? gu_tiles : 2;
    return tiles % 7 == 0 ? 7 : tiles % 6 == 0 ? 6 : 2;
}

template <typename T>
static int gemv_swiglu(const void *W, const void *x, int M, int I, int K, void *act,
                       cudaStream_t s)
{
    dim3 grid((I + GEMV_WARPS - 1) / GEMV_WARPS);
    const T *w = (const T *)W, *xx = (const T *)x;
    T *a = (T *)act;
    constexpr int TH = GEMV_WARPS * 32;
    switch (M) {
    case 1: {
        int ut = gu_step_tiles(K);
        if (gemv_pipe_row(K))
            mm_launch(gemv_swiglu_k<T, 1, true>, grid, TH, 0, s, w, xx, I, K, a);
        else if (ut == 6)
            mm_launch(gemv_swiglu_k<T, 1, false, 6>, grid, TH, 0, s, w, xx, I, K, a);
        else if (ut == 7)
            mm_launch(gemv_swiglu_k<T, 1, false, 7>, grid, TH, 0, s, w, xx, I, K, a);
        else
            mm_launch(gemv_swiglu_k<T, 1, false>, grid, TH, 0, s, w, xx, I, K, a);
        break;
    }
    case 2: mm_launch(gemv_swiglu_k<T, 2, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 3: mm_launch(gemv_swiglu_k<T, 3, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 4: mm_launch(gemv_swiglu_k<T, 4, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 5: mm_launch(gemv_swiglu_k<T, 5, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 6: mm_launch(gemv_swiglu_k<T, 6, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 7: mm_launch(gemv_swiglu_k<T, 7, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    case 8: mm_launch(gemv_swiglu_k<T, 8, false>, grid, TH, 0, s, w, xx, I, K, a); break;
    default: return (int)cudaErrorInvalidValue;
    }
    return mm_launch_status();
}

extern "C" int mm_k_gemv_swiglu(mm_kdt dt, const void *W, const void *x, int M, int I, int K,
                                void *act, cudaStream_t s)
{
    if (!mm_k_gemv_ok(M, K))
        return (int)cudaErrorInvalidValue;
    return MM_DISPATCH(dt, gemv_swiglu, W, x, M, I, K, act, s);
}
