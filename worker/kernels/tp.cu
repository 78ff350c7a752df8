/* tp.cu: the sum over tensor-parallel ranks of a product's float output,
 * read straight from the peers' memory (NVLink peer access; one process
 * drives every GPU, so each rank knows the others' buffers).
 *
 * For decode-sized messages NCCL's all-reduce costs about 7 us each (on
 * two H200s, inside a CUDA graph; 56 of them per token on 28 layers):
 * mostly fixed latency. Here one kernel does it: its first thread tells
 * every peer "my product is done" (an atomic add on the peer's flag), every
 * block waits until all peers have said the same, then sums the ranks'
 * buffers in rank order - the same order on every rank, so every rank gets
 * the same bits and the residual streams stay equal.
 *
 * Counting instead of resetting: a rank's flag for a slot only grows, by
 * one per peer per layer. The rank's epoch (the run_model calls made in
 * this mode, bumped by mm_k_tp_epoch first thing in each) and the layer
 * give the count every peer has reached once they are all done with this
 * layer: (n - 1) * ((epoch - 1) * L + layer + 1), compared modulo 2^32.
 * Nothing is written back, so a CUDA graph replays it as is.
 *
 * Reuse: the o and down products write slot 0 and 1 of the buffers. A
 * rank writes a slot again only after waiting in the other slot's sum for
 * every peer's signal, which each peer gives after it finished reading the
 * first slot (stream order), so nobody overwrites what a peer still
 * reads. */
#include "common.cuh"

__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__global__ void tp_epoch_k(unsigned *epoch)
{
    mm_pdl_release();
    mm_pdl_wait();
    if (threadIdx.x == 0)
        *epoch += 1;
}

__global__ void __launch_bounds__(256) tp_reduce_k(mm_k_tp p, int slot, int layer, size_t n4,
                                                   float *__restrict__ out)
{
    mm_pdl_release();
    mm_pdl_wait();
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        __threadfence_system(); /* the product's output, before the word that announces it */
        for (int i = 0; i < p.n; i++)
            if (i != p.rank)
                atomicAdd_system(p.flag[i] + slot, 1u);
    }
    if (threadIdx.x == 0) {
        unsigned rounds = (*p.epoch - 1u) * (unsigned)p.L + (unsigned)layer + 1u;
        unsigned want = (unsigned)(p.n - 1) * rounds;
        const unsigned *f = p.flag[p.rank] + slot;
        while ((int)(ld_acquire_sys(f) - want) < 0)
            ;
    }
    __syncthreads();
    for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < n4;
         j += (size_t)gridDim.x * blockDim.x) {
        float4 s = ((const float4 *)p.src[slot][0])[j];
        for (int i = 1; i < p.n; i++) {
            float4 v = ((const float4 *)p.src[slot][i])[j];
            s.x += v.x;
            s.y += v.y;
            s.z += v.z;
            s.w += v.w;
        }
        ((float4 *)out)[j] = s;
    }
}

extern "C" int mm_k_tp_epoch(unsigned *epoch, cudaStream_t s)
{
    mm_launch(tp_epoch_k, 1, 32, 0, s, epoch);
    return mm_launch_status();
}

extern "C" int mm_k_tp_reduce(const mm_k_tp *p, int slot, int layer, size_t count, int nsm,
                              float *out, cudaStream_t s)
{
    if (count % 4 || slot < 0 || slot > 1)
        return (int)cudaErrorInvalidValue;
    size_t n4 = count / 4, blocks = (n4 + 255) / 256;
    /* every block spins until the peers arrive: all of them must be
     * resident at once, so at most one per SM */
    if (blocks > (size_t)nsm)
        blocks = (size_t)nsm;
    if (blocks < 1)
        blocks = 1;
    mm_launch(tp_reduce_k, (unsigned)blocks, 256, 0, s, *p, slot, layer, n4, out);
    return mm_launch_status();
}
