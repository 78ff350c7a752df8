/* ktrace.c: a kernel timeline of any CUDA program, for the GPU machine
 * (which has CUPTI but no Nsight Systems). Built as libktrace.so and
 * loaded by the CUDA driver itself:
 *
 *     CUDA_INJECTION64_PATH=$PWD/build/tests/libktrace.so MM_KTRACE_OUT=t.csv prog
 *
 * It records every kernel through CUPTI's concurrent-kernel activity
 * (kernels of CUDA graphs included, one record per node; kernels that
 * overlap under programmatic dependent launch keep their own times) and
 * writes one CSV row per kernel at exit: start and duration in ns, grid,
 * the shared memory the SM ran it with, registers, and the demangled name
 * - the columns tests/gpu/steptrace.py reads (tests/gpu/run.sh profile).
 * A measuring tool: nothing in the product loads it. */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* libstdc++'s demangler, a C symbol (abi::__cxa_demangle) */
extern char *__cxa_demangle(const char *mangled, char *out, size_t *len, int *status);

#define KT_BUF (8u << 20)        /* bytes of one CUPTI activity buffer */
#define KT_MAX_ROWS (4u << 20)   /* rows kept; beyond it records are dropped */

typedef struct kt_row {
    uint64_t start, end;
    int32_t  gx, gy, gz, regs;
    uint32_t smem;
    char    *name; /* demangled, owned */
} kt_row;

static kt_row  *kt_rows;
static size_t   kt_n, kt_dropped;

static void CUPTIAPI kt_request(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = aligned_alloc(8, KT_BUF);
    *size = *buf ? KT_BUF : 0;
    *max_records = 0;
}

static char *kt_name(const char *mangled)
{
    int st = -1;
    char *d = mangled ? __cxa_demangle(mangled, NULL, NULL, &st) : NULL;
    if (d && st == 0)
        return d;
    free(d);
    return strdup(mangled ? mangled : "?");
}

static void CUPTIAPI kt_complete(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                 size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *rec = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
            continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
        if (kt_n >= KT_MAX_ROWS) {
            kt_dropped++;
            continue;
        }
        kt_rows[kt_n++] = (kt_row){k->start, k->end, k->gridX, k->gridY, k->gridZ,
                                   k->registersPerThread, k->sharedMemoryExecuted,
                                   kt_name(k->name)};
    }
    free(buf);
}

static void kt_quote(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"')
            fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void kt_write(void)
{
    cuptiActivityFlushAll(1);
    const char *path = getenv("MM_KTRACE_OUT");
    FILE *f = fopen(path ? path : "ktrace.csv", "w");
    if (!f) {
        perror("ktrace: output");
        return;
    }
    fprintf(f, "Start (ns),Duration (ns),GrdX,GrdY,GrdZ,Reg/Trd,SmemExecuted,Name\n");
    for (size_t i = 0; i < kt_n; i++) {
        const kt_row *r = &kt_rows[i];
        fprintf(f, "%llu,%llu,%d,%d,%d,%d,%u,", (unsigned long long)r->start,
                (unsigned long long)(r->end - r->start), r->gx, r->gy, r->gz, r->regs, r->smem);
        kt_quote(f, r->name);
        fputc('\n', f);
        free(r->name);
    }
    fclose(f);
    if (kt_dropped)
        fprintf(stderr, "ktrace: %zu kernels past %u not written\n", kt_dropped, KT_MAX_ROWS);
    free(kt_rows);
    kt_rows = NULL;
}

/* The entry point the driver calls for CUDA_INJECTION64_PATH. */
int InitializeInjection(void)
{
    if (!(kt_rows = malloc(sizeof *kt_rows * KT_MAX_ROWS)))
        return 0;
    if (cuptiActivityRegisterCallbacks(kt_request, kt_complete) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "ktrace: CUPTI activity tracing unavailable\n");
        return 0;
    }
    atexit(kt_write);
    return 1;
}
