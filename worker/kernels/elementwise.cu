/* elementwise.cu: the row-wise kernels around the GEMMs - embedding
 * lookup, residual add fused with RMSNorm, SwiGLU (over the gate/up
 * product's interleaved output: gate i, up i side by side). Each is one pass over
 * its rows, memory bound; float32 math throughout, rounded to the 16-bit
 * type only where the next GEMM reads it. */
#include "common.cuh"

int mm_k_pdl_on = 1;

extern "C" void mm_k_set_pdl(int on) { mm_k_pdl_on = on != 0; }

/* One block per token. Rows of a multiple of 8 elements (every model
 * here) go as one 16-byte load a thread: the row is one memory round trip
 * (1536 elements as 6 dependent 2-byte loads a thread took 4.9 us of the
 * 1.5B shape's step on an H100). */
#define EMBED_MAX_THREADS 1024

template <typename T>
__global__ void __launch_bounds__(EMBED_MAX_THREADS)
embed_k(const T *table, const int32_t *ids, int H, float *x)
{
    mm_pdl_release();
    mm_pdl_wait();
    int t = blockIdx.x;
    const T *row = table + (size_t)ids[t] * H;
    float *out = x + (size_t)t * H;
    if (H % 8 == 0) {
        for (int i = 8 * threadIdx.x; i < H; i += 8 * blockDim.x) {
            float f[8];
            mm_unpack8<T>(*(const uint4 *)(row + i), f);
            *(float4 *)(out + i) = make_float4(f[0], f[1], f[2], f[3]);
            *(float4 *)(out + i + 4) = make_float4(f[4], f[5], f[6], f[7]);
        }
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[i] = mm_to_f(row[i]);
}

template <typename T>
static int embed(const void *table, const int32_t *ids, int T_, int H, float *x, int serial,
                 cudaStream_t s)
{
    int threads = H % 8 == 0 ? (H / 8 + 31) / 32 * 32 : 256;
    threads = threads > EMBED_MAX_THREADS ? EMBED_MAX_THREADS : threads;
    if (T_ > 0)
        mm_launch_pdl(embed_k<T>, T_, threads, 0, s, !serial, (const T *)table, ids, H, x);
    return mm_launch_status();
}

extern "C" int mm_k_embed(mm_kdt dt, const void *table, const int32_t *ids, int T, int H,
                          float *x, int serial, cudaStream_t s)
{
    return MM_DISPATCH(dt, embed, table, ids, T, H, x, serial, s);
}

/* One block per row. At decode sizes this kernel is a latency chain
 * (measured: 2.4 us of each 54 us layer on Qwen2.5-1.5B, 5 us of 158 on
 * the 7B shape, where a loop of dependent loads made four round trips):
 * so with ND, the number of partials, known at compile time, and rows of
 * up to NU x blockDim elements held in registers, every load of the row
 * (x, partials, bias, norm weights) is issued before the first is used.
 * Longer rows go through shared memory in a loop (LONG). Rows of at most
 * two elements a thread take an instantiation with NU = 2 and no loop:
 * half the code, which matters because a norm is one block on an SM that
 * has not run it yet in the step, its code fetched on the way (1.5B:
 * 1.344 -> 1.335 ms a token on an H100, docs/GPU_NOTES.md v31). */
#define NORM_U 4
template <typename T, int ND, int NU, bool LONG>
__global__ void __launch_bounds__(1024)
add_rmsnorm_k(float *__restrict__ x, const float *__restrict__ delta, size_t dstride,
              const T *__restrict__ dbias, const float *__restrict__ w, float eps,
              const int32_t *__restrict__ rows, int H, T *__restrict__ y)
{
    mm_pdl_release();
    /* the norm's weights before the wait: nothing writes them, and with a
     * weight stream just gone through L2 they come from memory - a round
     * trip the predecessor's drain now hides (1.5B: -0.8% a token,
     * docs/GPU_NOTES.md session 10) */
    float wv[NU];
    const bool reg = !LONG || H <= NU * (int)blockDim.x; /* the row in registers */
    if (reg)
#pragma unroll
        for (int u = 0; u < NU; u++) {
            int i = threadIdx.x + u * blockDim.x;
            wv[u] = i < H ? w[i] : 0.0f;
        }
    mm_pdl_wait();
    extern __shared__ float row[];
    __shared__ float red[32];
    int r = blockIdx.x, t = rows ? rows[r] : r;
    float *xr = x + (size_t)t * H;
    const float *dr = delta ? delta + (size_t)t * H : NULL;
    T *yr = y + (size_t)r * H;
    float ss = 0.0f;
    if (reg) {
        float v[NU];
#pragma unroll
        for (int u = 0; u < NU; u++) {
            int i = threadIdx.x + u * blockDim.x;
            v[u] = i < H ? xr[i] : 0.0f;
        }
#pragma unroll
        for (int p = 0; p < ND; p++)
#pragma unroll
            for (int u = 0; u < NU; u++) {
                int i = threadIdx.x + u * blockDim.x;
                if (i < H)
                    v[u] += dr[p * dstride + i];
            }
        if (dbias)
#pragma unroll
            for (int u = 0; u < NU; u++) {
                int i = threadIdx.x + u * blockDim.x;
                if (i < H)
                    v[u] += mm_to_f(dbias[i]);
            }
#pragma unroll
        for (int u = 0; u < NU; u++)
            ss += v[u] * v[u];
        ss = mm_block_sum(ss, red);
        float inv = rsqrtf(ss / (float)H + eps);
#pragma unroll
        for (int u = 0; u < NU; u++) {
            int i = threadIdx.x + u * blockDim.x;
            if (i < H) {
                if (!rows)
                    xr[i] = v[u];
                yr[i] = mm_from_f<T>(v[u] * inv * wv[u]);
            }
        }
        return;
    }
    if constexpr (LONG) {
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            float v = xr[i];
#pragma unroll
            for (int p = 0; p < ND; p++)
                v += dr[p * dstride + i];
            if (dbias)
                v += mm_to_f(dbias[i]);
            row[i] = v;
            ss += v * v;
        }
        ss = mm_block_sum(ss, red);
        float inv = rsqrtf(ss / (float)H + eps);
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            if (!rows)
                xr[i] = row[i];
            yr[i] = mm_from_f<T>(row[i] * inv * w[i]);
        }
    }
}

template <typename T, int ND>
static void add_rmsnorm_nd(float *x, const float *delta, size_t dstride, const void *dbias,
                           const float *w, float eps, const int32_t *rows, int R, int H, void *y,
                           cudaStream_t s)
{
    int threads = H >= 1024 ? 1024 : ((H + 31) / 32) * 32;
    if (H <= 2 * threads) /* Qwen2.5-1.5B: half the code (v31) */
        mm_launch(add_rmsnorm_k<T, ND, 2, false>, R, threads, 0, s, x, delta, dstride,
                  (const T *)dbias, w, eps, rows, H, (T *)y);
    else
        mm_launch(add_rmsnorm_k<T, ND, NORM_U, true>, R, threads, (size_t)H * sizeof(float), s, x,
                  delta, dstride, (const T *)dbias, w, eps, rows, H, (T *)y);
}

template <typename T>
static int add_rmsnorm(float *x, const float *delta, int nd, size_t dstride, const void *dbias,
                       const float *w, float eps, const int32_t *rows, int R, int H, void *y,
                       cudaStream_t s)
{
    if (R <= 0)
        return mm_launch_status();
    switch (delta ? nd : 0) {
    case 0: add_rmsnorm_nd<T, 0>(x, NULL, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 1: add_rmsnorm_nd<T, 1>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 2: add_rmsnorm_nd<T, 2>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 3: add_rmsnorm_nd<T, 3>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 4: add_rmsnorm_nd<T, 4>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 5: add_rmsnorm_nd<T, 5>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 6: add_rmsnorm_nd<T, 6>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 7: add_rmsnorm_nd<T, 7>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    case 8: add_rmsnorm_nd<T, 8>(x, delta, dstride, dbias, w, eps, rows, R, H, y, s); break;
    default: return (int)cudaErrorInvalidValue;
    }
    return mm_launch_status();
}

extern "C" int mm_k_add_rmsnorm(mm_kdt dt, float *x, const float *delta, int nd, size_t dstride,
                                const void *dbias, const float *w, float eps,
                                const int32_t *rows, int R, int H, void *y, cudaStream_t s)
{
    /* The row lives in shared memory: 48 KiB holds 12288 floats, more than
     * any hidden size served here needs; refuse rather than overrun. */
    if ((size_t)H * sizeof(float) > 48 * 1024)
        return (int)cudaErrorInvalidValue;
    return MM_DISPATCH(dt, add_rmsnorm, x, delta, nd, dstride, dbias, w, eps, rows, R, H, y, s);
}

template <typename T>
__global__ void swiglu_k(const T *gu, int I, T *act)
{
    mm_pdl_release();
    mm_pdl_wait();
    int t = blockIdx.y;
    const T *row = gu + (size_t)t * 2 * I;
    T *a = act + (size_t)t * I;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < I; i += gridDim.x * blockDim.x) {
        float gv = mm_to_f(row[2 * i]), uv = mm_to_f(row[2 * i + 1]);
        a[i] = mm_from_f<T>(gv / (1.0f + __expf(-gv)) * uv);
    }
}

template <typename T>
static int swiglu(const void *gu, int T_, int I, void *act, cudaStream_t s)
{
    if (T_ > 0) {
        int bx = (I + 255) / 256;
        mm_launch(swiglu_k<T>, dim3(bx > 64 ? 64 : bx, T_), 256, 0, s, (const T *)gu, I,
                  (T *)act);
    }
    return mm_launch_status();
}

extern "C" int mm_k_swiglu(mm_kdt dt, const void *gu, int T, int I, void *act, cudaStream_t s)
{
    return MM_DISPATCH(dt, swiglu, gu, T, I, act, s);
}
