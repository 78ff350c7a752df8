/* sample.cu: greedy choice on the GPU, so a greedy decode step copies back
 * one id per sequence instead of a vocabulary-wide row of logits. The rules
 * are the CPU sampler's: NaN and -inf never win, the lowest id wins ties,
 * -1 when no logit is finite. */
#include "common.cuh"

/* A float's bits as an unsigned integer that orders like the float. */
__device__ __forceinline__ uint32_t ord_bits(float v)
{
    uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Grid (slices, rows): each block finds its slice's best (largest value,
 * then lowest id) and merges it into the row's key with one atomicMax; a
 * key is ord(value) << 32 | ~id, so larger values win and, among equals,
 * lower ids. One block per row streamed 600 KB through one SM at batch 1
 * (63 us under the profiler); slices spread it over the GPU. A slice is at
 * most ARGMAX_SLICE columns, one 16-byte load a thread where rows are
 * 16-byte aligned: the loads of a block are one round trip (32 slices
 * of 4748 columns took 6.8 us of the 1.5B shape's step, H100). */
#define ARGMAX_THREADS 256
#define ARGMAX_SLICE (4 * ARGMAX_THREADS)

__device__ __forceinline__ void argmax_take(float v, int j, unsigned long long *best)
{
    if (v != v || v == -INFINITY) /* NaN and -inf never win */
        return;
    unsigned long long k = ((unsigned long long)ord_bits(v) << 32) | (0xffffffffu - (uint32_t)j);
    *best = k > *best ? k : *best;
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_k(const float *logits, int ld, const int *n_valid_p, unsigned long long *keys)
{
    __shared__ unsigned long long best_w[ARGMAX_THREADS / 32];
    mm_pdl_release();
    mm_pdl_wait();
    int n_valid = *n_valid_p;
    const float *row = logits + (size_t)blockIdx.y * ld;
    /* slices of a multiple of 4 columns, so each 16-byte load stays aligned */
    int per = ((n_valid + gridDim.x - 1) / gridDim.x + 3) / 4 * 4;
    int lo = blockIdx.x * per, hi = lo + per < n_valid ? lo + per : n_valid;
    unsigned long long best = 0;
    if (ld % 4 == 0) {
        for (int j = lo + 4 * threadIdx.x; j < hi; j += 4 * blockDim.x) {
            float4 v = *(const float4 *)(row + j);
            argmax_take(v.x, j, &best);
            if (j + 1 < hi)
                argmax_take(v.y, j + 1, &best);
            if (j + 2 < hi)
                argmax_take(v.z, j + 2, &best);
            if (j + 3 < hi)
                argmax_take(v.w, j + 3, &best);
        }
    } else {
        for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
            argmax_take(row[j], j, &best);
    }
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long x = __shfl_xor_sync(0xffffffffu, best, o);
        best = x > best ? x : best;
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0)
        best_w[w] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < (int)(blockDim.x >> 5); i++)
            best = best_w[i] > best ? best_w[i] : best;
        if (best)
            atomicMax(&keys[blockIdx.y], best);
    }
}

__global__ void argmax_ids_k(const unsigned long long *keys, int R, int32_t *ids)
{
    mm_pdl_release();
    mm_pdl_wait();
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < R) /* nothing finite: -1, the engine fails the row */
        ids[r] = keys[r] ? (int32_t)(0xffffffffu - (uint32_t)(keys[r] & 0xffffffffu)) : -1;
}

extern "C" int mm_k_argmax(const float *logits, int R, int ld, const int *n_valid,
                           unsigned long long *keys, int32_t *ids, cudaStream_t s)
{
    if (R <= 0)
        return 0;
    /* slices sized for ld columns; fewer valid ones make them shorter */
    int slices = (ld + ARGMAX_SLICE - 1) / ARGMAX_SLICE;
    mm_launch(argmax_k, dim3(slices < 1 ? 1 : slices, R), ARGMAX_THREADS, 0, s, logits, ld,
              n_valid, keys);
    if (ids)
        mm_launch(argmax_ids_k, (R + 127) / 128, 128, 0, s, (const unsigned long long *)keys, R,
                  ids);
    return mm_launch_status();
}
