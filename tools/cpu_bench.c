/* cpu_bench.c: prompt and decode speed of the CPU backend, next to the
 * machine's memory bandwidth (the decode roofline: every weight byte is read
 * once per step).
 *
 *   cpu_bench --membw
 *   cpu_bench --make DIR [makemodel flags...]     generate a model and exit
 *   cpu_bench DIR [--threads N] [--batch B] [--prompt P] [--gen G]
 *
 * Build: gcc -O2 -std=c11 -D_GNU_SOURCE -Icommon -Iworker tools/cpu_bench.c \
 *        worker/{safetensors,model,backend_cpu,makemodel}.c common/log.c \
 *        -o build/cpu_bench -ljansson -lopenblas -lm -pthread */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "makemodel.h"
#include "model.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long arg_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "bad number: %s\n", s);
        exit(2);
    }
    return v;
}

/* Read bandwidth: sum a buffer far larger than the caches, best of several
 * passes; the copy figure counts bytes read plus bytes written. */
static void membw(void)
{
    size_t n = (size_t)1 << 28;   /* 1 GiB of floats */
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    if (!a || !b) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(i & 1023), b[i] = 0;
    double best_read = 0, best_copy = 0;
    volatile float sink = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
        for (size_t i = 0; i < n; i += 8) {
            s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
            s4 += a[i + 4]; s5 += a[i + 5]; s6 += a[i + 6]; s7 += a[i + 7];
        }
        sink = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
        double t1 = now_s();
        memcpy(b, a, n * sizeof *a);
        double t2 = now_s();
        double rd = (double)(n * sizeof *a) / (t1 - t0) / 1e9;
        double cp = 2.0 * (double)(n * sizeof *a) / (t2 - t1) / 1e9;
        best_read = rd > best_read ? rd : best_read;
        best_copy = cp > best_copy ? cp : best_copy;
    }
    (void)sink;
    printf("memory bandwidth (1 thread): read %.1f GB/s, memcpy %.1f GB/s (read+write)\n",
           best_read, best_copy);
    free(a);
    free(b);
}

int main(int argc, char **argv)
{
    char err[512] = "";
    if (argc >= 2 && strcmp(argv[1], "--membw") == 0) {
        membw();
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "--make") == 0) {
        mm_makemodel_opts o;
        mm_makemodel_defaults(&o);
        for (int i = 3; i < argc; i++) {
            int used = mm_makemodel_arg(&o, argv[i], i + 1 < argc ? argv[i + 1] : NULL, err,
                                        sizeof err);
            if (used < 0) {
                fprintf(stderr, "%s\n", err);
                return 2;
            }
            i += used;
        }
        double t0 = now_s();
        if (mm_makemodel(argv[2], &o, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        printf("wrote %s in %.1f s\n", argv[2], now_s() - t0);
        return 0;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: cpu_bench DIR [--threads N] [--batch B] [--prompt P] [--gen G]\n");
        return 2;
    }
    int threads = 2, batch = 1, prompt = 64, gen = 32;
    for (int i = 2; i + 1 < argc; i += 2) {
        long v = arg_long(argv[i + 1], 1, 100000);
        if (strcmp(argv[i], "--threads") == 0)
            threads = (int)v;
        else if (strcmp(argv[i], "--batch") == 0)
            batch = (int)v;
        else if (strcmp(argv[i], "--prompt") == 0)
            prompt = (int)v;
        else if (strcmp(argv[i], "--gen") == 0)
            gen = (int)v;
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    mm_model *m = NULL;
    mm_backend *b = NULL;
    double t0 = now_s();
    if (mm_model_load(argv[1], NULL, &m, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    printf("loaded %s: %.0f MB of weights in %.1f s\n", argv[1], (double)m->weight_bytes / 1e6,
           now_s() - t0);
    mm_backend_opts bo = {.max_seqs = batch, .max_len = prompt + gen + 1, .threads = threads};
    if (mm_backend_cpu_new(m, &bo, &b, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int V = m->cfg.vocab_size;
    int32_t *toks = malloc(sizeof *toks * (size_t)prompt * batch);
    int32_t *next = malloc(sizeof *next * (size_t)batch);
    float *logits = malloc(sizeof *logits * (size_t)V * batch);
    mm_batch_seq *seqs = calloc((size_t)batch, sizeof *seqs);
    if (!toks || !next || !logits || !seqs)
        return 1;
    for (int i = 0; i < prompt * batch; i++)
        toks[i] = (int32_t)((i * 7919) % 300);
    /* Prefill each sequence on its own, the way a scheduler would admit them. */
    double tp = now_s();
    for (int s = 0; s < batch; s++) {
        seqs[0] = (mm_batch_seq){s, toks + (size_t)s * prompt, prompt, 0, MM_LOGITS_LAST};
        if (b->ops->forward(b, seqs, 1, logits + (size_t)s * V, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
    }
    tp = now_s() - tp;
    double td = now_s();
    for (int g = 0; g < gen; g++) {
        for (int s = 0; s < batch; s++) {
            const float *l = logits + (size_t)s * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                best = l[v] > l[best] ? v : best;
            next[s] = best;
            seqs[s] = (mm_batch_seq){s, &next[s], 1, prompt + g, MM_LOGITS_LAST};
        }
        if (b->ops->forward(b, seqs, batch, logits, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
    }
    td = now_s() - td;
    double bytes = (double)m->weight_bytes;
    printf("threads %d batch %d: prompt %d tok in %.3f s = %.1f tok/s; decode %d steps in %.3f s "
           "= %.2f steps/s, %.1f tok/s (%.1f GB/s of weights streamed)\n",
           threads, batch, prompt * batch, tp, prompt * batch / tp, gen, td, gen / td,
           gen * batch / td, bytes * gen / td / 1e9);
    b->ops->free(b);
    mm_model_free(m);
    free(toks);
    free(next);
    free(logits);
    free(seqs);
    return 0;
}
