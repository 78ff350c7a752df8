/* kvcache.cu: what goes into and comes out of the paged KV cache - the
 * rotary embedding fused with the q/k/v bias and the cache write, and the
 * gather of one slot's cache into contiguous matrices for the GEMM-based
 * prefill attention. */
#include "common.cuh"

__device__ __forceinline__ size_t cache_off(const mm_k_cache &c, int slot, int p, int h)
{
    int blk = c.block_tables[(size_t)slot * c.max_blocks + p / c.bs];
    return mm_kv_row(c, blk, h, p, c.hd);
}

/* One block per token. The angle is pos * inv_freq[i] in float32 with a
 * full-precision sincosf, as transformers computes its cos/sin tables.
 * early: the step metadata, the block table (see mm_k_embed) and the first
 * pair's angle are read and computed before griddepcontrol.wait, which
 * then leaves only the q/k/v row's loads to the chain of the layer. */
template <typename T>
__global__ void rope_store_k(const T *qkv, const T *bias, const float *inv_freq,
                             const int32_t *pos, const int32_t *slot, int nq, mm_k_cache c,
                             int early, T *q_out)
{
    mm_pdl_release();
    if (!early)
        mm_pdl_wait();
    int t = blockIdx.x, hd = c.hd, half = hd / 2, nkv = c.nkv;
    int width = (nq + 2 * nkv) * hd, p = pos[t], sl = slot[t];
    /* every head's row at (slot, p) lies in the same cache block */
    int blk = c.block_tables[(size_t)sl * c.max_blocks + p / c.bs];
    size_t cbase = ((size_t)blk * nkv * c.bs + p % c.bs) * hd, hstride = (size_t)c.bs * hd;
    float sn0 = 0.0f, cs0 = 0.0f;
    if ((int)threadIdx.x < (nq + nkv) * half)
        sincosf((float)p * inv_freq[threadIdx.x % half], &sn0, &cs0);
    if (early)
        mm_pdl_wait();
    const T *row = qkv + (size_t)t * width;
    T *kc = (T *)c.k, *vc = (T *)c.v;
    /* q and k heads: one thread per rotated pair */
    for (int j = threadIdx.x; j < (nq + nkv) * half; j += blockDim.x) {
        int h = j / half, i = j % half, base = h * hd;
        float x1 = mm_to_f(row[base + i]), x2 = mm_to_f(row[base + i + half]);
        if (bias) {
            x1 += mm_to_f(bias[base + i]);
            x2 += mm_to_f(bias[base + i + half]);
        }
        float sn = sn0, cs = cs0;
        if (j != (int)threadIdx.x)
            sincosf((float)p * inv_freq[i], &sn, &cs);
        float r1, r2;
        mm_rope_pair(x1, x2, cs, sn, &r1, &r2);
        T o1 = mm_from_f<T>(r1), o2 = mm_from_f<T>(r2);
        if (h < nq) {
            T *q = q_out + (size_t)t * nq * hd + base;
            q[i] = o1;
            q[i + half] = o2;
        } else {
            T *k = kc + cbase + (size_t)(h - nq) * hstride;
            k[i] = o1;
            k[i + half] = o2;
        }
    }
    for (int j = threadIdx.x; j < nkv * hd; j += blockDim.x) {
        int h = j / hd, d = j % hd, col = (nq + nkv) * hd + j;
        float v = mm_to_f(row[col]);
        if (bias)
            v += mm_to_f(bias[col]);
        vc[cbase + (size_t)h * hstride + d] = mm_from_f<T>(v);
    }
}

template <typename T>
static int rope_store(const void *qkv, const void *bias, const float *inv_freq,
                      const int32_t *pos, const int32_t *slot, int T_, int nq,
                      const mm_k_cache *c, int early, void *q_out, cudaStream_t s)
{
    /* one thread per rotated pair where possible: at batch 1 this kernel
     * is a latency chain, not a throughput problem */
    int threads = (nq + c->nkv) * (c->hd / 2);
    threads = threads > 1024 ? 1024 : (threads + 31) / 32 * 32;
    if (T_ > 0)
        mm_launch(rope_store_k<T>, T_, threads, 0, s, (const T *)qkv, (const T *)bias, inv_freq,
                  pos, slot, nq, *c, early, (T *)q_out);
    return mm_launch_status();
}

extern "C" int mm_k_rope_store(mm_kdt dt, const void *qkv, const void *bias,
                               const float *inv_freq, const int32_t *pos, const int32_t *slot,
                               int T, int nq, const mm_k_cache *c, int early, void *q_out,
                               cudaStream_t s)
{
    return MM_DISPATCH(dt, rope_store, qkv, bias, inv_freq, pos, slot, T, nq, c, early, q_out,
                       s);
}

/* Grid (positions / 8, nkv); 16-byte copies (hd is a multiple of 8). */
template <typename T>
__global__ void gather_k(mm_k_cache c, int slot, int n, T *kc, T *vc)
{
    mm_pdl_release();
    mm_pdl_wait();
    int h = blockIdx.y, vec = c.hd / 8;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * vec)
        return;
    int p = idx / vec, d = (idx % vec) * 8;
    size_t src = cache_off(c, slot, p, h) + d, dst = ((size_t)h * n + p) * c.hd + d;
    *(uint4 *)(kc + dst) = *(const uint4 *)((const T *)c.k + src);
    *(uint4 *)(vc + dst) = *(const uint4 *)((const T *)c.v + src);
}

template <typename T>
static int gather(const mm_k_cache *c, int slot, int n, void *kc, void *vc, cudaStream_t s)
{
    int total = n * (c->hd / 8);
    if (total > 0)
        mm_launch(gather_k<T>, dim3((total + 255) / 256, c->nkv), 256, 0, s, *c, slot, n,
                  (T *)kc, (T *)vc);
    return mm_launch_status();
}

extern "C" int mm_k_gather_kv(mm_kdt dt, const mm_k_cache *c, int slot, int n, void *kc,
                              void *vc, cudaStream_t s)
{
    return MM_DISPATCH(dt, gather, c, slot, n, kc, vc, s);
}

__global__ void table_update_k(int32_t *table, const int32_t *upd, unsigned long long *zero,
                               int nzero)
{
    mm_pdl_release();
    mm_pdl_wait();
    int n = upd[0];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        table[upd[1 + 2 * i]] = upd[2 + 2 * i];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nzero; i += gridDim.x * blockDim.x)
        zero[i] = 0;
}

extern "C" int mm_k_table_update(int32_t *table, const int32_t *upd, unsigned long long *zero,
                                 int nzero, cudaStream_t s)
{
    mm_launch(table_update_k, 16, 256, 0, s, table, upd, zero, nzero);
    return mm_launch_status();
}
