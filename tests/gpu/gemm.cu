// gemm.cu: gpu_gemm, what cuBLAS reaches for bf16 products on this card
// (bf16 inputs and output, float32 accumulation: cublasGemmEx with
// CUBLAS_COMPUTE_32F), the compute ceiling for prefill. Shapes: the square
// 8192^3 peak, 4096 x 4096 x 2048, and the layer products of a 7B-class
// model (hidden 3584, MLP 18944) at decode batch sizes and a 2048-token
// prefill. C[m x n] = A[m x k] . B[k x n] in cuBLAS's column-major terms,
// with A given transposed as a row-major weight is (out = W . x).
// Each: 3 untimed runs, then timed runs (CUDA events) until 0.2 s or 50
// runs; one JSON line per shape with TFLOP/s (2mnk flops) and the bytes
// moved / time, since skinny products are bandwidth bound. Exit 1 on error.
//   gpu_gemm [--quick]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                   \
    do {                                                                              \
        cudaError_t e_ = (call);                                                      \
        if (e_ != cudaSuccess) {                                                      \
            fprintf(stderr, "gpu_gemm: %s: %s\n", #call, cudaGetErrorString(e_));     \
            printf("{\"bench\":\"gemm\",\"error\":\"%s\"}\n", cudaGetErrorName(e_));  \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)
#define CHECK_BLAS(call)                                                              \
    do {                                                                              \
        cublasStatus_t s_ = (call);                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                            \
            fprintf(stderr, "gpu_gemm: %s: cuBLAS status %d\n", #call, (int)s_);      \
            printf("{\"bench\":\"gemm\",\"error\":\"cublas %d\"}\n", (int)s_);         \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

// Values in [-1, 1) from a hash of the index: no curand needed, and no
// zeros (a product of zeros runs faster than real data).
__global__ void fill_kernel(__nv_bfloat16 *p, size_t n, unsigned seed)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2bfloat16((float)(h & 0xffff) / 32768.0f - 1.0f);
    }
}

typedef struct shape {
    const char *what;
    int m, n, k;   // out features, tokens, in features
} shape;

static const shape shapes[] = {
    {"square 8192", 8192, 8192, 8192},
    {"4096x4096x2048", 4096, 4096, 2048},
    {"7b mlp up, 1 token", 18944, 1, 3584},
    {"7b mlp up, 8 tokens", 18944, 8, 3584},
    {"7b mlp up, 64 tokens", 18944, 64, 3584},
    {"7b mlp up, 256 tokens", 18944, 256, 3584},
    {"7b mlp down, 256 tokens", 3584, 256, 18944},
    {"7b qkv, 2048 tokens", 4608, 2048, 3584},
    {"7b mlp up, 2048 tokens", 18944, 2048, 3584},
    {"7b lm head, 64 tokens", 152064, 64, 3584},
};

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (argc > 1 && !quick) {
        fprintf(stderr, "usage: gpu_gemm [--quick]\n");
        return 2;
    }
    cudaDeviceProp prop;
    CHECK(cudaSetDevice(0));
    CHECK(cudaGetDeviceProperties(&prop, 0));
    size_t max_a = 0, max_b = 0, max_c = 0;
    size_t nshapes = quick ? 2 : sizeof shapes / sizeof shapes[0];
    for (size_t i = 0; i < nshapes; i++) {
        const shape *s = &shapes[i];
        size_t a = (size_t)s->m * s->k, b = (size_t)s->k * s->n, c = (size_t)s->m * s->n;
        max_a = a > max_a ? a : max_a;
        max_b = b > max_b ? b : max_b;
        max_c = c > max_c ? c : max_c;
    }
    __nv_bfloat16 *A = NULL, *B = NULL, *C = NULL;
    void *ws = NULL;
    size_t ws_bytes = (size_t)64 << 20;
    CHECK(cudaMalloc(&A, max_a * sizeof *A));
    CHECK(cudaMalloc(&B, max_b * sizeof *B));
    CHECK(cudaMalloc(&C, max_c * sizeof *C));
    CHECK(cudaMalloc(&ws, ws_bytes));
    fill_kernel<<<prop.multiProcessorCount * 8, 256>>>(A, max_a, 1u);
    fill_kernel<<<prop.multiProcessorCount * 8, 256>>>(B, max_b, 2u);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());

    cublasHandle_t h;
    cudaStream_t st;
    cudaEvent_t e0, e1;
    CHECK_BLAS(cublasCreate(&h));
    CHECK(cudaStreamCreate(&st));
    CHECK_BLAS(cublasSetStream(h, st));
    CHECK_BLAS(cublasSetWorkspace(h, ws, ws_bytes));
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    const float alpha = 1.0f, beta = 0.0f;
    printf("{\"bench\":\"gemm_device\",\"name\":\"%s\",\"sms\":%d}\n", prop.name,
           prop.multiProcessorCount);
    for (size_t i = 0; i < nshapes; i++) {
        const shape *s = &shapes[i];
        double best = 1e30, sum = 0;
        int runs = 0;
        for (int r = 0; r < 3 + 50; r++) {
            CHECK(cudaEventRecord(e0, st));
            // out[m x n] = W[m x k] . x[k x n]: W is stored row-major m x k,
            // which cuBLAS (column-major) sees as k x m, hence OP_T.
            CHECK_BLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s->m, s->n, s->k, &alpha, A,
                                    CUDA_R_16BF, s->k, B, CUDA_R_16BF, s->k, &beta, C,
                                    CUDA_R_16BF, s->m, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
            CHECK(cudaEventRecord(e1, st));
            CHECK(cudaEventSynchronize(e1));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            if (r < 3)
                continue;
            best = ms < best ? ms : best;
            sum += ms;
            runs++;
            if (sum > 200.0)
                break;
        }
        double mean = sum / runs, flops = 2.0 * s->m * (double)s->n * s->k;
        double bytes = 2.0 * ((double)s->m * s->k + (double)s->k * s->n + (double)s->m * s->n);
        printf("{\"bench\":\"gemm\",\"what\":\"%s\",\"m\":%d,\"n\":%d,\"k\":%d,\"runs\":%d,"
               "\"best_ms\":%.4f,\"mean_ms\":%.4f,\"best_tflops\":%.1f,\"mean_tflops\":%.1f,"
               "\"best_gbs\":%.1f}\n",
               s->what, s->m, s->n, s->k, runs, best, mean, flops / best / 1e9,
               flops / mean / 1e9, bytes / best / 1e6);
        fflush(stdout);
    }
    CHECK_BLAS(cublasDestroy(h));
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    CHECK(cudaStreamDestroy(st));
    CHECK(cudaFree(A));
    CHECK(cudaFree(B));
    CHECK(cudaFree(C));
    CHECK(cudaFree(ws));
    return 0;
}
