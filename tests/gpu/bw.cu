// bw.cu: gpu_bw, the device memory bandwidth a decode step can hope for:
//   - copy: cudaMemcpyAsync device to device of --mib MiB (default 1024),
//     counted as bytes read + written (2x the size), as copy benchmarks
//     and the datasheets' figures do;
//   - read: a kernel that only loads (16-byte vector loads, several in
//     flight per thread) and folds what it read into one word, the access
//     pattern of a weight-streaming GEMV.
// Each: 3 untimed runs, then --iters (default 20) timed with CUDA events;
// the best and the mean are reported. One JSON line per measurement
// (plus one describing the device) on stdout; exit 1 on any CUDA error.
//   gpu_bw [--mib N] [--iters N]
#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                  \
    do {                                                                             \
        cudaError_t e_ = (call);                                                     \
        if (e_ != cudaSuccess) {                                                     \
            fprintf(stderr, "gpu_bw: %s: %s (%s)\n", #call, cudaGetErrorString(e_),  \
                    cudaGetErrorName(e_));                                           \
            printf("{\"bench\":\"bw\",\"error\":\"%s\"}\n", cudaGetErrorName(e_));   \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

// Four independent 16-byte loads per thread per iteration keep enough
// requests in flight to saturate HBM; the xor keeps them from being
// optimised away, and the store happens only on an impossible value.
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n, unsigned *out)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride);
        uint4 c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
        acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        uint4 a = __ldcs(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9e3779b9u)
        out[0] = acc;
}

__global__ void fill_kernel(uint4 *p, size_t n)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned v = (unsigned)(i * 2654435761u);
        p[i] = make_uint4(v, v ^ 1u, v ^ 2u, v ^ 3u);
    }
}

static void report(const char *kind, double bytes, const float *ms, int iters, int blocks)
{
    float best = ms[0];
    double sum = 0;
    for (int i = 0; i < iters; i++) {
        best = ms[i] < best ? ms[i] : best;
        sum += ms[i];
    }
    double mean = sum / iters;
    printf("{\"bench\":\"bw\",\"kind\":\"%s\",\"bytes_counted\":%.0f,\"iters\":%d,"
           "\"best_ms\":%.4f,\"mean_ms\":%.4f,\"best_gbs\":%.1f,\"mean_gbs\":%.1f",
           kind, bytes, iters, best, mean, bytes / best / 1e6, bytes / mean / 1e6);
    if (blocks)
        printf(",\"blocks\":%d", blocks);
    printf("}\n");
}

int main(int argc, char **argv)
{
    size_t mib = 1024;
    int iters = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--mib") == 0)
            mib = (size_t)strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--iters") == 0)
            iters = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: gpu_bw [--mib N] [--iters N]\n");
            return 2;
        }
    }
    if (mib < 1 || mib > 65536 || iters < 1 || iters > 1000) {
        fprintf(stderr, "gpu_bw: --mib 1..65536, --iters 1..1000\n");
        return 2;
    }
    int dev = 0;
    CHECK(cudaSetDevice(dev));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, dev));
    int mem_khz = 0, bus_bits = 0;
    CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev));
    CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
    // Double data rate: two transfers a clock on each bus bit.
    double peak = 2.0 * mem_khz * 1e3 * (bus_bits / 8) / 1e9;
    printf("{\"bench\":\"device\",\"name\":\"%s\",\"sm\":\"%d.%d\",\"sms\":%d,"
           "\"global_mem_bytes\":%zu,\"l2_bytes\":%d,\"mem_clock_khz\":%d,\"bus_bits\":%d,"
           "\"theoretical_gbs\":%.1f}\n",
           prop.name, prop.major, prop.minor, prop.multiProcessorCount, prop.totalGlobalMem,
           prop.l2CacheSize, mem_khz, bus_bits, peak);
    fflush(stdout);

    size_t bytes = mib << 20, n = bytes / sizeof(uint4);
    uint4 *a = NULL, *b = NULL;
    unsigned *sink = NULL;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMalloc(&sink, sizeof *sink));
    fill_kernel<<<prop.multiProcessorCount * 8, 256>>>(a, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemset(b, 0, bytes));
    CHECK(cudaDeviceSynchronize());

    cudaStream_t st;
    cudaEvent_t e0, e1;
    CHECK(cudaStreamCreate(&st));
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float *ms = (float *)malloc(sizeof(float) * (size_t)iters);
    if (!ms)
        return 1;

    for (int i = 0; i < 3 + iters; i++) {
        CHECK(cudaEventRecord(e0, st));
        CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
        CHECK(cudaEventRecord(e1, st));
        CHECK(cudaEventSynchronize(e1));
        if (i >= 3)
            CHECK(cudaEventElapsedTime(&ms[i - 3], e0, e1));
    }
    report("d2d_copy", 2.0 * (double)bytes, ms, iters, 0);
    fflush(stdout);

    // The read kernel at a few grid sizes (blocks per SM), best reported
    // per size: what a well-shaped GEMV could stream.
    static const int per_sm[] = {4, 8, 16, 32};
    for (size_t k = 0; k < sizeof per_sm / sizeof per_sm[0]; k++) {
        int blocks = prop.multiProcessorCount * per_sm[k];
        for (int i = 0; i < 3 + iters; i++) {
            CHECK(cudaEventRecord(e0, st));
            read_kernel<<<blocks, 256, 0, st>>>(a, n, sink);
            CHECK(cudaGetLastError());
            CHECK(cudaEventRecord(e1, st));
            CHECK(cudaEventSynchronize(e1));
            if (i >= 3)
                CHECK(cudaEventElapsedTime(&ms[i - 3], e0, e1));
        }
        report("read", (double)bytes, ms, iters, blocks);
        fflush(stdout);
    }
    free(ms);
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    CHECK(cudaStreamDestroy(st));
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    CHECK(cudaFree(sink));
    return 0;
}
