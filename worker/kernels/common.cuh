/* common.cuh: device helpers shared by the kernel files (16-bit types,
 * vector loads, warp reductions) and the dispatch from mm_kdt to a
 * template instantiation. */
#ifndef MM_KERNELS_COMMON_CUH
#define MM_KERNELS_COMMON_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "kernels.h"

__device__ __forceinline__ float mm_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float mm_to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T mm_from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 mm_from_f<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half mm_from_f<__half>(float v)
{
    return __float2half_rn(v);
}

/* 8 packed 16-bit values (one 16-byte load) widened to float. */
template <typename T> __device__ __forceinline__ void mm_unpack8(uint4 u, float *f)
{
    const T *h = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++)
        f[i] = mm_to_f(h[i]);
}

__device__ __forceinline__ float mm_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float mm_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* A reduction over a block of up to 1024 threads; every thread gets the
 * result. red must hold 32 floats; the block synchronizes twice. warp is
 * the matching warp reduction, id the operation's identity. */
template <float (*warp)(float)>
__device__ __forceinline__ float mm_block_reduce(float v, float *red, float id)
{
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp(v);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : id;
    return warp(v);
}

__device__ __forceinline__ float mm_block_sum(float v, float *red)
{
    return mm_block_reduce<mm_warp_sum>(v, red, 0.0f);
}

__device__ __forceinline__ float mm_block_max(float v, float *red)
{
    return mm_block_reduce<mm_warp_max>(v, red, -INFINITY);
}

/* The offset, in elements, of position p's row of kv head h in the paged
 * cache, p being in block blk (rows of hd elements, c.bs positions and
 * c.nkv heads a block): the one layout the cache writes and every
 * attention kernel reads. */
__device__ __forceinline__ size_t mm_kv_row(const mm_k_cache &c, int blk, int h, int p, int hd)
{
    return (((size_t)blk * c.nkv + h) * c.bs + p % c.bs) * hd;
}

/* The rotate-half rotary embedding of one pair (x1 at i, x2 at i + hd/2,
 * bias already added): o1 = x1 cos - x2 sin, o2 = x2 cos + x1 sin, each
 * product rounded on its own (no fused multiply-add, as transformers
 * computes it) - and so the same bits in the cache write
 * (mm_k_rope_store) and in the decode attention that fuses it. */
__device__ __forceinline__ void mm_rope_pair(float x1, float x2, float cs, float sn, float *o1,
                                             float *o2)
{
    *o1 = __fsub_rn(__fmul_rn(x1, cs), __fmul_rn(x2, sn));
    *o2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
}

/* ---- tensor-core helpers (sm_80+: the mma kernels check the device) ---- */

__device__ __forceinline__ uint32_t mm_smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* Four 8x8 16-bit matrices from shared memory (lane t gives the address
 * of row t & 7 of matrix t >> 3); .trans delivers them transposed. With
 * lane t at row (t & 15), column 8 (t >> 4) of a 16 x 16 tile, the four
 * registers are that tile as an m16n8k16 A fragment. */
__device__ __forceinline__ void mm_ldsm4(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mm_ldsm4t(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* d += a (16 x 16, row) b (16 x 8, col) in T (bf16 or f16), float d. */
template <typename T>
__device__ __forceinline__ void mm_mma16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __half>::value)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                     "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                     "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
}

/* Programmatic dependent launch (Hopper): every kernel here is launched
 * with the attribute that lets it start while its predecessor drains. It
 * lets its own dependents launch at once (launch_dependents) and waits
 * (griddepcontrol.wait: the predecessor has finished and its writes are
 * visible) before touching anything a predecessor wrote - and before
 * writing anything at all. Only reads of the weights, which nothing
 * writes, may come before the wait: the products prefetch their first
 * weight tiles there, overlapping the previous kernel's tail. On older
 * GPUs both are no-ops and launches serialize as usual. */
__device__ __forceinline__ void mm_pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void mm_pdl_release(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Programmatic launches at all (mm_k_set_pdl, MM_CUDA_PDL=0 turns them
 * off: every kernel then waits for the whole of its predecessor, for
 * telling a missing griddepcontrol.wait from other faults). */
extern int mm_k_pdl_on;

/* pdl 0: an ordinary launch, which starts only once its predecessor has
 * finished - and with it everything before (see mm_k_embed). */
template <typename... P, typename... A>
static inline void mm_launch_pdl(void (*kern)(P...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t s, int pdl, A... args)
{
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = pdl && mm_k_pdl_on ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kern, args...);
}

template <typename... P, typename... A>
static inline void mm_launch(void (*kern)(P...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t s, A... args)
{
    mm_launch_pdl(kern, grid, block, smem, s, 1, args...);
}

/* Call F<T>(args) with T the 16-bit type dt names. */
#define MM_DISPATCH(dt, F, ...)                                                                  \
    ((dt) == MM_KDT_F16 ? F<__half>(__VA_ARGS__) : F<__nv_bfloat16>(__VA_ARGS__))

static inline int mm_launch_status(void) { return (int)cudaGetLastError(); }
#endif
