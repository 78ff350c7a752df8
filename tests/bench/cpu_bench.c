/* cpu_bench.c: prompt and decode speed of the CPU backend, next to the
 * machine's memory bandwidth (the decode roofline: every weight byte is read
 * once per step).
 *
 *   cpu_bench --membw [MAX_THREADS]     read bandwidth, 1, 2, 4.. threads
 *   cpu_bench --weights DIR             bytes of weights read per decode step
 *   cpu_bench --make DIR [makemodel flags...]     generate a model and exit
 *   cpu_bench DIR [--threads N] [--batch B] [--prompt P] [--gen G]
 *
 * --membw and --weights end with one "key value" line (best_read_gbs,
 * decode_bytes) that tests/bench/worker.sh reads. Built by the Makefile as
 * $(BUILD)/tests/cpu_bench, linked with libmmworker.a. */
#include <errno.h>
#include <immintrin.h>
#include <pthread.h>
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

/* Read bandwidth: threads sum disjoint slices of a buffer far larger than
 * the caches (AVX2 loads, several accumulators), best of several passes.
 * Each thread reads its slice as one sequential stream or as four at once:
 * the backend's kernels walk four weight rows together, and on some cores
 * (Intel server parts) one stream per core leaves bandwidth unused, which
 * would put the roofline below what the kernels reach. */
typedef struct bw_arg {
    const float *a;
    size_t n;
    int streams;   /* 1 or 4 */
    float sum;
} bw_arg;

__attribute__((target("avx2"))) static void *bw_read(void *p)
{
    bw_arg *b = p;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    if (b->streams == 1) {
        for (size_t i = 0; i + 32 <= b->n; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(b->a + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(b->a + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(b->a + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(b->a + i + 24));
        }
    } else {
        size_t q = b->n / 4 / 16 * 16;
        const float *p0 = b->a, *p1 = p0 + q, *p2 = p1 + q, *p3 = p2 + q;
        __m256 s4 = s0, s5 = s0, s6 = s0, s7 = s0;
        for (size_t i = 0; i + 16 <= q; i += 16) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p0 + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p1 + i));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p2 + i));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p3 + i));
            s4 = _mm256_add_ps(s4, _mm256_loadu_ps(p0 + i + 8));
            s5 = _mm256_add_ps(s5, _mm256_loadu_ps(p1 + i + 8));
            s6 = _mm256_add_ps(s6, _mm256_loadu_ps(p2 + i + 8));
            s7 = _mm256_add_ps(s7, _mm256_loadu_ps(p3 + i + 8));
        }
        s0 = _mm256_add_ps(_mm256_add_ps(s0, s4), _mm256_add_ps(s1, s5));
        s2 = _mm256_add_ps(_mm256_add_ps(s2, s6), _mm256_add_ps(s3, s7));
        s1 = s3 = _mm256_setzero_ps();
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    b->sum = t[0] + t[7];
    return NULL;
}

/* Bytes read per second by nt threads, best of 5 passes; every pass reads
 * exactly the bytes it counts (each slice a multiple of 64 floats). */
static double membw_threads(const float *a, size_t n, int nt, int streams)
{
    pthread_t th[64];
    bw_arg arg[64];
    size_t per = n / (size_t)nt / 64 * 64;
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        for (int i = 0; i < nt; i++) {
            arg[i] = (bw_arg){a + per * (size_t)i, per, streams, 0};
            if (pthread_create(&th[i], NULL, bw_read, &arg[i]) != 0) {
                fprintf(stderr, "pthread_create failed\n");
                exit(1);
            }
        }
        for (int i = 0; i < nt; i++)
            pthread_join(th[i], NULL);
        double gbs = (double)(per * (size_t)nt * sizeof *a) / (now_s() - t0) / 1e9;
        best = gbs > best ? gbs : best;
    }
    return best;
}

static void membw(int maxt)
{
    size_t n = (size_t)1 << 28;   /* 1 GiB of floats */
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    if (!a || !b) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(i & 1023), b[i] = 0;
    double best_copy = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        memcpy(b, a, n * sizeof *a);
        double cp = 2.0 * (double)(n * sizeof *a) / (now_s() - t0) / 1e9;
        best_copy = cp > best_copy ? cp : best_copy;
    }
    printf("memcpy %.1f GB/s (read+write, 1 thread)\n", best_copy);
    double best_read = 0;
    for (int t = 1; t <= maxt; t *= 2)
        for (int streams = 1; streams <= 4; streams += 3) {
            double r = membw_threads(a, n, t, streams);
            printf("read %.1f GB/s (%d thread%s, %d stream%s each)\n", r, t, t > 1 ? "s" : "",
                   streams, streams > 1 ? "s" : "");
            best_read = r > best_read ? r : best_read;
        }
    printf("best_read_gbs %.2f\n", best_read);
    free(a);
    free(b);
}

/* Bytes streamed per decode step: every weight once; an untied embedding
 * table is only gathered from, one row per token. */
static double decode_bytes(const mm_model *m)
{
    double bytes = (double)m->weight_bytes;
    if (m->lm_head.data != m->embed.data)
        bytes -= (double)m->embed.rows * (double)m->embed.cols *
                 (m->embed.dtype == MM_DT_F32 ? 4 : 2);
    return bytes;
}

/* Prefill then greedy decode straight on the backend: what the forward pass
 * alone reaches, without the engine and HTTP around it. */
static int bench_backend(const char *dir, int threads, int batch, int prompt, int gen)
{
    char err[512] = "";
    int rc = 1;
    mm_model *m = NULL;
    mm_backend *b = NULL;
    int32_t *toks = NULL, *next = NULL;
    float *logits = NULL;
    mm_batch_seq *seqs = NULL;
    double t0 = now_s();
    if (mm_model_load(dir, NULL, &m, err, sizeof err) < 0)
        goto out;
    printf("loaded %s: %.0f MB of weights in %.1f s\n", dir, (double)m->weight_bytes / 1e6,
           now_s() - t0);
    mm_backend_opts bo = {.max_seqs = batch, .max_len = prompt + gen + 1, .threads = threads};
    if (mm_backend_cpu_new(m, &bo, &b, err, sizeof err) < 0)
        goto out;
    int V = m->cfg.vocab_size;
    toks = malloc(sizeof *toks * (size_t)prompt * (size_t)batch);
    next = malloc(sizeof *next * (size_t)batch);
    logits = malloc(sizeof *logits * (size_t)V * (size_t)batch);
    seqs = calloc((size_t)batch, sizeof *seqs);
    if (!toks || !next || !logits || !seqs) {
        snprintf(err, sizeof err, "out of memory");
        goto out;
    }
    for (int i = 0; i < prompt * batch; i++)
        toks[i] = (int32_t)((i * 7919) % 300);
    /* Prefill each sequence on its own, the way a scheduler would admit them. */
    double tp = now_s();
    for (int s = 0; s < batch; s++) {
        seqs[0] = (mm_batch_seq){.slot = s, .tokens = toks + (size_t)s * prompt,
                                 .n_tokens = prompt, .pos = 0, .want = MM_LOGITS_LAST};
        if (b->ops->reserve(b, s, prompt + gen) < 0) {
            snprintf(err, sizeof err, "KV pool too small for %d sequences", batch);
            goto out;
        }
        if (b->ops->forward(b, seqs, 1, logits + (size_t)s * V, err, sizeof err) < 0)
            goto out;
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
            seqs[s] = (mm_batch_seq){.slot = s, .tokens = &next[s], .n_tokens = 1,
                                     .pos = prompt + g, .want = MM_LOGITS_LAST};
        }
        if (b->ops->forward(b, seqs, batch, logits, err, sizeof err) < 0)
            goto out;
    }
    td = now_s() - td;
    double bytes = decode_bytes(m);
    printf("threads %d batch %d: prompt %d tok in %.3f s = %.1f tok/s; decode %d steps in %.3f s "
           "= %.2f steps/s, %.1f tok/s (%.1f GB/s of weights streamed; %.0f MB a step)\n",
           threads, batch, prompt * batch, tp, prompt * batch / tp, gen, td, gen / td,
           gen * batch / td, bytes * gen / td / 1e9, bytes / 1e6);
    rc = 0;
out:
    if (rc)
        fprintf(stderr, "%s\n", err);
    if (b)
        b->ops->free(b);
    mm_model_free(m);
    free(toks);
    free(next);
    free(logits);
    free(seqs);
    return rc;
}

int main(int argc, char **argv)
{
    char err[512] = "";
    if (argc >= 2 && strcmp(argv[1], "--membw") == 0) {
        membw(argc >= 3 ? (int)arg_long(argv[2], 1, 64) : 2);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "--weights") == 0) {
        mm_model *m = NULL;
        /* The files are mapped, not read: no prefault, nothing computed. */
        mm_model_load_opts lo = {.quiet = 1, .no_prefault = 1};
        if (mm_model_load(argv[2], &lo, &m, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        printf("weights %.0f bytes, tied embeddings %s\n", (double)m->weight_bytes,
               m->lm_head.data == m->embed.data ? "yes" : "no");
        printf("decode_bytes %.0f\n", decode_bytes(m));
        mm_model_free(m);
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
    return bench_backend(argv[1], threads, batch, prompt, gen);
}
