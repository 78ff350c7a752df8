/* sample.cu: greedy choice on the GPU, so a greedy decode step copies back
 * one id per sequence instead of a vocabulary-wide row of logits. The rules
 * are the CPU sampler's: NaN and -inf never win, the lowest id wins ties,
 * -1 when no logit is finite. */
#include "common.cuh"

__global__ void argmax_k(const float *logits, int ld, int n_valid, int32_t *ids)
{
    mm_pdl_release();
    mm_pdl_wait();
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float *row = logits + (size_t)blockIdx.x * ld;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < n_valid; j += blockDim.x) {
        float v = row[j];
        if (v > best) { /* j rises, so the first of equals is kept */
            best = v;
            idx = j;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) {
        bv[w] = best;
        bi[w] = idx;
    }
    __syncthreads();
    if (w == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? bv[lane] : -INFINITY;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) {
                best = ov;
                idx = oi;
            }
        }
        if (lane == 0)
            ids[blockIdx.x] = idx == 0x7fffffff ? -1 : idx; /* nothing finite: the
                                                              * engine fails the row */
    }
}

extern "C" int mm_k_argmax(const float *logits, int R, int ld, int n_valid, int32_t *ids,
                           cudaStream_t s)
{
    if (R > 0)
        mm_launch(argmax_k, R, 1024, 0, s, logits, ld, n_valid, ids);
    return mm_launch_status();
}
