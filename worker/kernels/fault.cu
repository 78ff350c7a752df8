/* fault.cu: a kernel that faults on purpose (a store to an address no
 * allocation has), for testing what follows a lost device: the error it
 * leaves is sticky, as a real illegal address in any kernel would be.
 * Launched only under the test hook MM_CUDA_TEST_FAULT_STEP
 * (backend_cuda.c). */
#include "common.cuh"

__global__ void test_fault_k(int *p) { *p = 1; }

extern "C" int mm_k_test_fault(cudaStream_t s)
{
    test_fault_k<<<1, 1, 0, s>>>((int *)(uintptr_t)8);
    return mm_launch_status();
}
