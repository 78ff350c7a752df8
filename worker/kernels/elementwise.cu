/* elementwise.cu: the row-wise kernels around the GEMMs - embedding
 * lookup, residual add fused with RMSNorm, SwiGLU (over the gate/up
 * product's interleaved output: gate i, up i side by side). Each is one pass over
 * its rows, memory bound; float32 math throughout, rounded to the 16-bit
 * type only where the next GEMM reads it. */
#include "common.cuh"

template <typename T>
__global__ void embed_k(const T *table, const int32_t *ids, int H, float *x)
{
    mm_pdl_release();
    mm_pdl_wait();
    int t = blockIdx.x;
    const T *row = table + (size_t)ids[t] * H;
    float *out = x + (size_t)t * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[i] = mm_to_f(row[i]);
}

template <typename T>
static int embed(const void *table, const int32_t *ids, int T_, int H, float *x, cudaStream_t s)
{
    if (T_ > 0)
        mm_launch(embed_k<T>, T_, 256, 0, s, (const T *)table, ids, H, x);
    return mm_launch_status();
}

extern "C" int mm_k_embed(mm_kdt dt, const void *table, const int32_t *ids, int T, int H,
                          float *x, cudaStream_t s)
{
    return MM_DISPATCH(dt, embed, table, ids, T, H, x, s);
}

/* One block per row; the row is read once into registers-sized chunks of
 * shared memory so the normalization pass does not re-read global memory. */
template <typename T>
__global__ void add_rmsnorm_k(float *x, const float *delta, int nd, size_t dstride,
                              const T *dbias, const float *w, float eps, const int32_t *rows,
                              int H, T *y)
{
    mm_pdl_release();
    mm_pdl_wait();
    extern __shared__ float row[];
    __shared__ float red[32];
    int r = blockIdx.x, t = rows ? rows[r] : r;
    float *xr = x + (size_t)t * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = xr[i];
        for (int p = 0; p < nd; p++)
            v += delta[p * dstride + (size_t)t * H + i];
        if (dbias)
            v += mm_to_f(dbias[i]);
        row[i] = v;
        if (!rows)
            xr[i] = v;
        ss += v * v;
    }
    ss = mm_block_sum(ss, red);
    float inv = rsqrtf(ss / (float)H + eps);
    T *yr = y + (size_t)r * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        yr[i] = mm_from_f<T>(row[i] * inv * w[i]);
}

template <typename T>
static int add_rmsnorm(float *x, const float *delta, int nd, size_t dstride, const void *dbias,
                       const float *w, float eps, const int32_t *rows, int R, int H, void *y,
                       cudaStream_t s)
{
    if (R > 0)
        mm_launch(add_rmsnorm_k<T>, R, H >= 1024 ? 1024 : ((H + 31) / 32) * 32,
                  (size_t)H * sizeof(float), s, x, delta, delta ? nd : 0, dstride,
                  (const T *)dbias, w, eps, rows, H, (T *)y);
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
