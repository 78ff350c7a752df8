/* backend_cpu.c: the forward pass on the CPU.
 *
 * Weights keep their stored dtype (copied once into huge-page memory the
 * backend owns): decode is memory bound, and converting bf16 to f32 at load
 * would double the bytes streamed per token. Math is float32 throughout.
 *
 * Weight products take one of two paths:
 *  - our kernels (AVX-512 or AVX2, scalar fallback): each group of four
 *    weight rows is loaded once and used for every token of the step (up to
 *    four at a time in registers for bf16 on AVX-512);
 *  - widen + OpenBLAS sgemm, for f16/f32 weights from GEMM_MIN_TOKENS
 *    tokens on (and bf16 where AVX-512 is missing).
 * Attention uses OpenBLAS (sgemm for prefill blocks, sgemv or a grouped
 * sgemm for decode). Work is split over a small pthread pool by output rows
 * or heads; OpenBLAS runs single-threaded inside each task so the two never
 * fight over cores. MM_CPU_ISA=avx2|scalar caps the kernels (tests run
 * every path on one machine).
 *
 * KV cache: float32, one region per (layer, slot, kv head) holding max_len
 * positions contiguously, so attention reads each head's keys as one
 * matrix. It is an anonymous mapping: untouched slots cost no memory.
 * The block pool of backend.h is bookkeeping only here (blocks held per
 * slot against num_blocks): the layout needs no blocks, but the scheduler
 * must meet the same limits as on a GPU, so preemption runs in CI. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cblas.h>
#include <immintrin.h>

#include "errmsg.h"
#include "backend.h"
#include "dtype.h"
#include "model.h"
#include "sampler.h"

/* Tokens per internal sub-step: bounds the activation buffers whatever the
 * scheduler sends (a long prefill is processed in slices, each appending to
 * the cache before the next reads it). */
#define STEP_TOKENS 256
/* From this many tokens in a step, widening f16/f32 rows for sgemm beats
 * streaming them through GEMV. bf16 on AVX-512 always takes the 4x4 kernel:
 * measured (Qwen2.5-0.5B shape, 2 threads) at twice the widen+sgemm rate
 * for a 200-token prefill and three times for an 8-sequence decode step.
 * MM_CPU_GEMM_MIN=N forces sgemm from N tokens on for every dtype. */
#define GEMM_MIN_TOKENS 6
/* Weight rows widened per sgemm call (the per-thread f32 buffer). */
#define GEMM_CHUNK_ROWS 64
/* Query rows per attention task in prefill. */
#define ATT_QBLOCK 64
/* How long an idle worker spins before sleeping: a decode step issues a
 * parallel region every few microseconds, and a futex wake-up each time
 * would cost more than the work. */
#define SPIN_NS 200000


static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- thread pool: parallel-for over task indices ---- */

typedef void (*task_fn)(void *ctx, int task, int tid);

typedef struct pool {
    int             n;          /* threads including the caller */
    pthread_t      *th;
    int             started;
    pthread_mutex_t mu;
    pthread_cond_t  cv_work, cv_done;
    atomic_uint     gen;        /* bumped per job; workers wait for a change */
    atomic_int      next;       /* next task index to claim */
    atomic_int      done;       /* workers finished with the current job */
    int             ntasks;
    task_fn         fn;
    void           *ctx;
    atomic_int      stop;
} pool;

typedef struct worker_arg {
    pool *p;
    int   tid;
} worker_arg;

/* Mostly a pause; now and then a yield, so that on a machine with more
 * runnable threads than cores a spinner hands its core to the thread it is
 * waiting for instead of burning the time slice. */
static inline void spin_pause(int spins)
{
    if ((spins & 63) == 63)
        sched_yield();
    else
        _mm_pause();
}

static void pool_drain(pool *p, int tid)
{
    int i;
    while ((i = atomic_fetch_add(&p->next, 1)) < p->ntasks)
        p->fn(p->ctx, i, tid);
}

static void *pool_worker(void *arg)
{
    worker_arg *wa = arg;
    pool *p = wa->p;
    int tid = wa->tid;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load(&p->gen);
        if (g == seen) {
            uint64_t t0 = now_ns();
            for (int spins = 0; (g = atomic_load(&p->gen)) == seen; spins++) {
                spin_pause(spins);
                if ((spins & 255) == 255 && now_ns() - t0 > SPIN_NS)
                    break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop))
            break;
        seen = g;
        pool_drain(p, tid);
        if (atomic_fetch_add(&p->done, 1) + 1 == p->n - 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static void pool_run(pool *p, task_fn fn, void *ctx, int ntasks)
{
    if (ntasks <= 0)
        return;
    if (p->n == 1 || ntasks == 1) {
        for (int i = 0; i < ntasks; i++)
            fn(ctx, i, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->done, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    pool_drain(p, 0);
    uint64_t t0 = now_ns();
    for (int spins = 0; atomic_load(&p->done) < p->n - 1; spins++) {
        spin_pause(spins);
        if ((spins & 255) == 255 && now_ns() - t0 > SPIN_NS)
            break;
    }
    if (atomic_load(&p->done) < p->n - 1) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->done) < p->n - 1)
            pthread_cond_wait(&p->cv_done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

static void pool_free(pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->started; i++)
        pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->th);
    free(p);
}

static int pool_new(int n, pool **out)
{
    pool *p = calloc(1, sizeof *p);
    *out = NULL;
    if (!p)
        return -ENOMEM;
    p->n = n;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    if (n > 1 && !(p->th = calloc((size_t)n - 1, sizeof *p->th))) {
        pool_free(p);
        return -ENOMEM;
    }
    for (int i = 1; i < n; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->p = p;
            wa->tid = i;
        }
        int rc = wa ? pthread_create(&p->th[i - 1], NULL, pool_worker, wa) : ENOMEM;
        if (rc) {
            free(wa);
            pool_free(p);
            return -rc;
        }
        p->started++;
    }
    *out = p;
    return 0;
}

/* Widen n elements starting at element off of w into dst. */
static void widen(const mm_weight *w, int64_t off, int64_t n, float *dst)
{
    if (w->dtype == MM_DT_F32) {
        memcpy(dst, (const float *)w->data + off, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)w->data + off;
    if (w->dtype == MM_DT_BF16) {
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)s[i] << 16;
            memcpy(&dst[i], &u, 4);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            dst[i] = mm_f16_to_f32(s[i]);
    }
}

/* ---- GEMV kernels: out[j] = dot(row j of W, x) for j < nr (nr <= 4) ----
 *
 * xe/xo are x's even and odd elements (x[2i], x[2i+1]), prepared once per
 * step for bf16 weights: a 32-bit lane loaded from bf16 data holds elements
 * 2i (low half) and 2i+1 (high half), so one shift and one mask widen a
 * whole vector of pairs to float, each half multiplied by its own x. That
 * halves the instructions per weight byte compared with zero-extending. */

typedef void (*dot_fn)(const void *w, size_t ldw, int nr, const float *x, const float *xe,
                       const float *xo, int k, float *out);

#define DOT_SCALAR(NAME, T, CONV)                                                       \
    static void NAME(const void *w, size_t ldw, int nr, const float *x, const float *xe, \
                     const float *xo, int k, float *out)                                \
    {                                                                                   \
        for (int j = 0; j < nr; j++) {                                                  \
            const T *r = (const T *)w + (size_t)j * ldw;                                \
            float s = 0;                                                                \
            for (int i = 0; i < k; i++)                                                 \
                s += CONV(r[i]) * x[i];                                                 \
            out[j] = s;                                                                 \
        }                                                                               \
    }

#define CONV_F32(v) (v)
DOT_SCALAR(dot_scalar_bf16, uint16_t, mm_bf16_to_f32)
DOT_SCALAR(dot_scalar_f16, uint16_t, mm_f16_to_f32)
DOT_SCALAR(dot_scalar_f32, float, CONV_F32)

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

/* Rows r0..r3 of a group of nr: a partial group repeats its last row so the
 * loops have no branches; only nr results are stored. */
#define ROWS(T)                                                                         \
    const T *r0 = (const T *)w;                                                         \
    const T *r1 = r0 + (nr > 1 ? ldw : 0);                                              \
    const T *r2 = r0 + (nr > 2 ? 2 * ldw : (nr > 1 ? ldw : 0));                         \
    const T *r3 = r0 + (nr > 3 ? 3 * ldw : (nr > 2 ? 2 * ldw : (nr > 1 ? ldw : 0)));    \
    const size_t ahead = 4 * ldw /* same columns of the next group */

/* The hardware prefetcher does not run far enough ahead on four streams to
 * saturate memory from one core, so each cache line of the next group of
 * rows is requested explicitly (a prefetch past the end is harmless). */
#define PREFETCH4(i)                                                                    \
    do {                                                                                \
        _mm_prefetch((const char *)(r0 + ahead + (i)), _MM_HINT_T0);                    \
        _mm_prefetch((const char *)(r1 + ahead + (i)), _MM_HINT_T0);                    \
        _mm_prefetch((const char *)(r2 + ahead + (i)), _MM_HINT_T0);                    \
        _mm_prefetch((const char *)(r3 + ahead + (i)), _MM_HINT_T0);                    \
    } while (0)

#define TAIL_AND_STORE(CONV)                                                            \
    for (; i < k; i++) {                                                                \
        s[0] += CONV(r0[i]) * x[i];                                                     \
        s[1] += CONV(r1[i]) * x[i];                                                     \
        s[2] += CONV(r2[i]) * x[i];                                                     \
        s[3] += CONV(r3[i]) * x[i];                                                     \
    }                                                                                   \
    for (int j = 0; j < nr; j++)                                                        \
        out[j] = s[j]

AVX2 static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define EO256(r, a, bb)                                                                 \
    do {                                                                                \
        __m256i v_ = _mm256_loadu_si256((const __m256i *)((r) + i));                    \
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v_, 16)), ve, a);     \
        bb = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v_, hi)), vo, bb);    \
    } while (0)

AVX2 static void dot_avx2_bf16(const void *w, size_t ldw, int nr, const float *x,
                               const float *xe, const float *xo, int k, float *out)
{
    ROWS(uint16_t);
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
           b3 = a0;
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        if ((i & 31) == 0)
            PREFETCH4(i);
        __m256 ve = _mm256_loadu_ps(xe + i / 2), vo = _mm256_loadu_ps(xo + i / 2);
        EO256(r0, a0, b0);
        EO256(r1, a1, b1);
        EO256(r2, a2, b2);
        EO256(r3, a3, b3);
    }
    float s[4] = {hsum256(_mm256_add_ps(a0, b0)), hsum256(_mm256_add_ps(a1, b1)),
                  hsum256(_mm256_add_ps(a2, b2)), hsum256(_mm256_add_ps(a3, b3))};
    TAIL_AND_STORE(mm_bf16_to_f32);
}

#define DOT_AVX2_8(NAME, T, LOAD, CONV)                                                 \
    AVX2 static void NAME(const void *w, size_t ldw, int nr, const float *x,             \
                          const float *xe, const float *xo, int k, float *out)          \
    {                                                                                   \
        ROWS(T);                                                                        \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                     \
        int i = 0;                                                                      \
        for (; i + 8 <= k; i += 8) {                                                    \
            if ((i * sizeof(T)) % 64 == 0)                                              \
                PREFETCH4(i);                                                           \
            __m256 xv = _mm256_loadu_ps(x + i);                                         \
            a0 = _mm256_fmadd_ps(LOAD(r0 + i), xv, a0);                                 \
            a1 = _mm256_fmadd_ps(LOAD(r1 + i), xv, a1);                                 \
            a2 = _mm256_fmadd_ps(LOAD(r2 + i), xv, a2);                                 \
            a3 = _mm256_fmadd_ps(LOAD(r3 + i), xv, a3);                                 \
        }                                                                               \
        float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};              \
        TAIL_AND_STORE(CONV);                                                           \
    }

#define LOAD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
DOT_AVX2_8(dot_avx2_f16, uint16_t, LOAD8_F16, mm_f16_to_f32)
DOT_AVX2_8(dot_avx2_f32, float, _mm256_loadu_ps, CONV_F32)

#define EO512(r, a, bb)                                                                 \
    do {                                                                                \
        __m512i v_ = _mm512_loadu_si512((const void *)((r) + i));                       \
        a = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v_, 16)), ve, a);     \
        bb = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v_, hi)), vo, bb);    \
    } while (0)

AVX512 static void dot_avx512_bf16(const void *w, size_t ldw, int nr, const float *x,
                                   const float *xe, const float *xo, int k, float *out)
{
    ROWS(uint16_t);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
           b3 = a0;
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        PREFETCH4(i);
        __m512 ve = _mm512_loadu_ps(xe + i / 2), vo = _mm512_loadu_ps(xo + i / 2);
        EO512(r0, a0, b0);
        EO512(r1, a1, b1);
        EO512(r2, a2, b2);
        EO512(r3, a3, b3);
    }
    float s[4] = {_mm512_reduce_add_ps(_mm512_add_ps(a0, b0)),
                  _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)),
                  _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)),
                  _mm512_reduce_add_ps(_mm512_add_ps(a3, b3))};
    TAIL_AND_STORE(mm_bf16_to_f32);
}

#define DOT_AVX512_16(NAME, T, LOAD, CONV)                                              \
    AVX512 static void NAME(const void *w, size_t ldw, int nr, const float *x,           \
                            const float *xe, const float *xo, int k, float *out)        \
    {                                                                                   \
        ROWS(T);                                                                        \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                     \
        int i = 0;                                                                      \
        for (; i + 16 <= k; i += 16) {                                                  \
            if ((i * sizeof(T)) % 64 == 0)                                              \
                PREFETCH4(i);                                                           \
            __m512 xv = _mm512_loadu_ps(x + i);                                         \
            a0 = _mm512_fmadd_ps(LOAD(r0 + i), xv, a0);                                 \
            a1 = _mm512_fmadd_ps(LOAD(r1 + i), xv, a1);                                 \
            a2 = _mm512_fmadd_ps(LOAD(r2 + i), xv, a2);                                 \
            a3 = _mm512_fmadd_ps(LOAD(r3 + i), xv, a3);                                 \
        }                                                                               \
        float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),               \
                      _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};              \
        TAIL_AND_STORE(CONV);                                                           \
    }

/* Four rows by up to four tokens: each weight vector, loaded and widened
 * once, feeds eight FMAs, so a few-token step (batched decode, short
 * prefill) costs little more memory traffic than one token. out[t * ldo + j]
 * receives row j for token t. xeo holds each token's even/odd split at
 * stride ldxe; x (for the tail) at stride ldx. */
AVX512 static void dot4x4_avx512_bf16(const uint16_t *w, size_t ldw, int nr, const float *x,
                                      size_t ldx, const float *xeo, size_t ldxe, int nt, int k,
                                      float *out, size_t ldo)
{
    ROWS(uint16_t);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const float *xe[4], *xo[4];
    for (int t = 0; t < 4; t++) {
        int tt = t < nt ? t : nt - 1;
        xe[t] = xeo + (size_t)tt * ldxe;
        xo[t] = xe[t] + k / 2;
    }
    __m512 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int t = 0; t < 4; t++)
            acc[j][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        PREFETCH4(i);
        __m512i v0 = _mm512_loadu_si512((const void *)(r0 + i));
        __m512i v1 = _mm512_loadu_si512((const void *)(r1 + i));
        __m512i v2 = _mm512_loadu_si512((const void *)(r2 + i));
        __m512i v3 = _mm512_loadu_si512((const void *)(r3 + i));
        __m512 e[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)),
                       _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)),
                       _mm512_castsi512_ps(_mm512_slli_epi32(v2, 16)),
                       _mm512_castsi512_ps(_mm512_slli_epi32(v3, 16))};
        __m512 o[4] = {_mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
                       _mm512_castsi512_ps(_mm512_and_si512(v1, hi)),
                       _mm512_castsi512_ps(_mm512_and_si512(v2, hi)),
                       _mm512_castsi512_ps(_mm512_and_si512(v3, hi))};
        for (int t = 0; t < 4; t++) {
            __m512 ve = _mm512_loadu_ps(xe[t] + i / 2), vo = _mm512_loadu_ps(xo[t] + i / 2);
            for (int j = 0; j < 4; j++)
                acc[j][t] = _mm512_fmadd_ps(o[j], vo, _mm512_fmadd_ps(e[j], ve, acc[j][t]));
        }
    }
    const uint16_t *rr[4] = {r0, r1, r2, r3};
    for (int t = 0; t < nt; t++) {
        const float *xt = x + (size_t)t * ldx;
        for (int j = 0; j < nr; j++) {
            float sum = _mm512_reduce_add_ps(acc[j][t]);
            for (int q = i; q < k; q++)
                sum += mm_bf16_to_f32(rr[j][q]) * xt[q];
            out[(size_t)t * ldo + j] = sum;
        }
    }
}

#define LOAD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
DOT_AVX512_16(dot_avx512_f16, uint16_t, LOAD16_F16, mm_f16_to_f32)
DOT_AVX512_16(dot_avx512_f32, float, _mm512_loadu_ps, CONV_F32)

/* ---- the backend ---- */

/* The backend's own copy of the weights (see copy_weights). */
typedef struct cpu_weights {
    mm_weight  embed, norm, lm_head;
    mm_layer  *layers;
    void      *map;
    size_t     map_bytes;
} cpu_weights;

typedef struct cpu_backend {
    mm_backend  base;
    cpu_weights w;
    const mm_model_config *cfg;
    pool       *pool;
    int         threads;
    dot_fn      dot[3];           /* bf16, f16, f32 */
    const char *isa;              /* "avx512", "avx2" or "scalar" */
    int         gemm_min;         /* GEMM_MIN_TOKENS unless overridden */
    int         gemm_forced;      /* MM_CPU_GEMM_MIN was given */
    float      *xeo;              /* even/odd split inputs, STEP_TOKENS rows */
    size_t      xeo_ld;
    float      *kc, *vc;          /* KV cache mappings */
    size_t      cache_bytes;
    int        *slot_len;         /* positions cached per slot */
    int        *slot_blocks;      /* pool blocks reserved per slot */
    float      *head;             /* head_rows logits rows for MM_LOGITS_ARGMAX steps */
    int         head_rows;
    float      *rope_cos, *rope_sin;   /* [max_len][head_dim/2] */
    /* activations for one sub-step of up to STEP_TOKENS tokens */
    float      *x, *xn, *q, *k, *v, *att, *gate, *up;
    /* per-thread scratch */
    float     **wbuf;             /* GEMM_CHUNK_ROWS x max in-features */
    float     **sbuf;             /* ATT_QBLOCK x max_len attention scores */
    int         max_in;
} cpu_backend;

static dot_fn pick_dot(const cpu_backend *b, mm_dtype dt)
{
    return b->dot[dt == MM_DT_BF16 ? 0 : dt == MM_DT_F16 ? 1 : 2];
}

static size_t dtsize(mm_dtype dt) { return dt == MM_DT_F32 ? 4 : 2; }

/* ---- linear layers ---- */

typedef struct lin_mat {
    const mm_weight *w, *bias;
    float *y;
    int    ldy;
} lin_mat;

typedef struct lin_job {
    cpu_backend *b;
    const float *x;
    int          ldx, n;
    const float *xeo;         /* per token: K/2 even then K/2 odd elements */
    lin_mat      m[3];
    int          nm;
    int          chunk;
    int          first[4];    /* task index where matrix i starts */
    int          accumulate;  /* y += W x (+ bias) */
    int          swiglu;      /* m[0] = gate, m[1] = up: m[0].y = silu(gate) * up */
} lin_job;

/* Whether an n-token product with w runs on our kernels (else sgemm). */
static int own_kernel(const cpu_backend *b, const mm_weight *w, int n)
{
    if (n < b->gemm_min)
        return 1;
    return w->dtype == MM_DT_BF16 && b->dot[0] == dot_avx512_bf16 && !b->gemm_forced;
}

/* y[t][r0..r1) (+)= W[r0..r1) x[t] + bias for every token t. */
static void lin_rows(cpu_backend *b, int tid, const lin_job *j, const lin_mat *m, int r0, int r1)
{
    const mm_weight *w = m->w;
    int K = (int)w->cols, n = j->n;
    size_t es = dtsize(w->dtype);
    const char *base = (const char *)w->data + (size_t)r0 * (size_t)K * es;
    int own = own_kernel(b, w, n);
    if (own && n > 1 && w->dtype == MM_DT_BF16 && b->dot[0] == dot_avx512_bf16) {
        float o[16];
        for (int r = r0; r < r1; r += 4) {
            int nr = r1 - r < 4 ? r1 - r : 4;
            const char *wr = base + (size_t)(r - r0) * (size_t)K * es;
            for (int t0 = 0; t0 < n; t0 += 4) {
                int nt = n - t0 < 4 ? n - t0 : 4;
                dot4x4_avx512_bf16((const uint16_t *)wr, (size_t)K, nr,
                                   j->x + (size_t)t0 * (size_t)j->ldx, (size_t)j->ldx,
                                   j->xeo + (size_t)t0 * b->xeo_ld, b->xeo_ld, nt, K, o, 4);
                for (int t = 0; t < nt; t++) {
                    float *y = m->y + (size_t)(t0 + t) * (size_t)m->ldy + r;
                    for (int q = 0; q < nr; q++)
                        y[q] = j->accumulate ? y[q] + o[t * 4 + q] : o[t * 4 + q];
                }
            }
        }
    } else if (own) {
        dot_fn dot = pick_dot(b, w->dtype);
        float o[4];
        for (int r = r0; r < r1; r += 4) {
            int nr = r1 - r < 4 ? r1 - r : 4;
            const char *wr = base + (size_t)(r - r0) * (size_t)K * es;
            for (int t = 0; t < n; t++) {
                float *y = m->y + (size_t)t * (size_t)m->ldy + r;
                const float *xe = j->xeo + (size_t)t * b->xeo_ld;
                dot(wr, (size_t)K, nr, j->x + (size_t)t * (size_t)j->ldx, xe, xe + K / 2, K, o);
                for (int q = 0; q < nr; q++)
                    y[q] = j->accumulate ? y[q] + o[q] : o[q];
            }
        }
    } else {
        const float *wf = (const float *)base;
        if (w->dtype != MM_DT_F32) {
            widen(w, (int64_t)r0 * K, (int64_t)(r1 - r0) * K, b->wbuf[tid]);
            wf = b->wbuf[tid];
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1 - r0, K, 1.0f, j->x, j->ldx,
                    wf, K, j->accumulate ? 1.0f : 0.0f, m->y + r0, m->ldy);
    }
    if (m->bias && m->bias->data)
        for (int t = 0; t < n; t++) {
            float *y = m->y + (size_t)t * (size_t)m->ldy;
            for (int r = r0; r < r1; r++)
                y[r] += mm_weight_elem(m->bias, r);
        }
}

static void lin_task(void *ctx, int task, int tid)
{
    const lin_job *j = ctx;
    int i = 0;
    while (i + 1 < j->nm && task >= j->first[i + 1])
        i++;
    if (j->swiglu)
        i = 0;
    const lin_mat *m = &j->m[i];
    int r0 = (task - j->first[i]) * j->chunk;
    int r1 = r0 + j->chunk;
    if (r1 > m->w->rows)
        r1 = (int)m->w->rows;
    lin_rows(j->b, tid, j, m, r0, r1);
    if (!j->swiglu)
        return;
    lin_rows(j->b, tid, j, &j->m[1], r0, r1);
    for (int t = 0; t < j->n; t++) {
        float *g = j->m[0].y + (size_t)t * (size_t)j->m[0].ldy;
        const float *u = j->m[1].y + (size_t)t * (size_t)j->m[1].ldy;
        for (int r = r0; r < r1; r++)
            g[r] = g[r] / (1.0f + expf(-g[r])) * u[r];
    }
}

/* Rows per task: enough tasks to balance threads, multiples of 4 for the
 * GEMV kernel, and no more than the sgemm buffer holds. */
static int pick_chunk(const cpu_backend *b, int rows, int gemm)
{
    int want = rows / (b->threads * 8);
    if (gemm) {
        want = GEMM_CHUNK_ROWS;
        if (rows / want < b->threads * 2)
            want = rows / (b->threads * 2);
    }
    want = (want + 3) & ~3;
    if (want < 16)
        want = 16;
    if (want > GEMM_CHUNK_ROWS && gemm)
        want = GEMM_CHUNK_ROWS;
    return want;
}

static void lin_run(cpu_backend *b, lin_job *j)
{
    int rows = 0;
    for (int i = 0; i < j->nm; i++)
        if (j->m[i].w->rows > rows)
            rows = (int)j->m[i].w->rows;
    j->b = b;
    int gemm = 0, own = 0;
    for (int i = 0; i < j->nm; i++) {
        gemm |= !own_kernel(b, j->m[i].w, j->n);
        own |= own_kernel(b, j->m[i].w, j->n);
    }
    j->chunk = pick_chunk(b, rows, gemm);
    if (own) {
        int K = (int)j->m[0].w->cols;
        for (int t = 0; t < j->n; t++) {
            const float *x = j->x + (size_t)t * (size_t)j->ldx;
            float *xe = b->xeo + (size_t)t * b->xeo_ld, *xo = xe + K / 2;
            for (int i = 0; i + 1 < K; i += 2) {
                xe[i / 2] = x[i];
                xo[i / 2] = x[i + 1];
            }
        }
        j->xeo = b->xeo;
    }
    int total = 0;
    for (int i = 0; i < j->nm; i++) {
        j->first[i] = total;
        if (!j->swiglu || i == 0)
            total += (int)((j->m[i].w->rows + j->chunk - 1) / j->chunk);
    }
    j->first[j->nm] = total;
    pool_run(b->pool, lin_task, j, total);
}

/* ---- one sub-step ---- */

typedef struct seg {
    int slot, pos, t0, n;     /* tokens t0..t0+n-1 of the sub-step, at pos.. */
    int ntask, task0;         /* attention tasks */
} seg;

typedef struct step {
    int32_t tok[STEP_TOKENS];
    int     T;
    seg     segs[STEP_TOKENS];
    int     nseg;
    int     out_first;        /* first logits row produced, -1 if none */
    int     out_tok[STEP_TOKENS];   /* tokens whose logits are wanted, in row order */
    int     out_row[STEP_TOKENS];   /* their row in logits, -1 for an argmax */
    int32_t *out_amx[STEP_TOKENS];  /* where an argmax goes */
    int     nout, namx;
} step;

static void rmsnorm(const float *x, const mm_weight *w, int H, double eps, float *y)
{
    double ss = 0;
    for (int i = 0; i < H; i++)
        ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / H) + (float)eps);
    for (int i = 0; i < H; i++)
        y[i] = x[i] * r * mm_weight_elem(w, i);
}

static float *cache_at(const cpu_backend *b, float *c, int layer, int slot, int head)
{
    const mm_model_config *cfg = b->cfg;
    size_t region = (size_t)b->base.max_len * (size_t)cfg->head_dim;
    size_t idx = ((size_t)layer * (size_t)b->base.max_seqs + (size_t)slot) *
                 (size_t)cfg->num_key_value_heads + (size_t)head;
    return c + idx * region;
}

/* HF's rotate_half pairing: element i turns with element i + head_dim/2. */
static void rope(float *v, const float *cs, const float *sn, int half)
{
    for (int i = 0; i < half; i++) {
        float a = v[i], c = v[i + half];
        v[i] = a * cs[i] - c * sn[i];
        v[i + half] = c * cs[i] + a * sn[i];
    }
}

typedef struct att_job {
    cpu_backend *b;
    const step  *s;
    int          layer;
} att_job;

/* A segment of one token (a decode) attends with all query heads of a KV
 * head at once: their rows are adjacent in q, so one product reads the
 * keys and values once for the whole group instead of once per head. */
static int att_grouped(const mm_model_config *c, const seg *g)
{
    return g->n == 1 && c->num_attention_heads / c->num_key_value_heads <= ATT_QBLOCK;
}

static void att_task(void *ctx, int task, int tid)
{
    const att_job *aj = ctx;
    cpu_backend *b = aj->b;
    const step *s = aj->s;
    const mm_model_config *c = b->cfg;
    int nh = c->num_attention_heads, hd = c->head_dim, qd = nh * hd;
    int group = nh / c->num_key_value_heads, sw = c->sliding_window;
    int si = 0;
    while (si + 1 < s->nseg && task >= s->segs[si + 1].task0)
        si++;
    const seg *g = &s->segs[si];
    int local = task - g->task0, grouped = att_grouped(c, g);
    /* rows: query rows of this task; row r sits at position pos_r and
     * lives in q (and att) at Q + r * ldq. */
    int h, kvh, i0, rows, ldq, step_pos;
    if (grouped) {
        kvh = local, h = kvh * group, i0 = 0, rows = group, ldq = hd, step_pos = 0;
    } else {
        h = local % nh, kvh = h / group, i0 = (local / nh) * ATT_QBLOCK;
        rows = g->n - i0 < ATT_QBLOCK ? g->n - i0 : ATT_QBLOCK;
        ldq = qd, step_pos = 1;
    }
    const float *K = cache_at(b, b->kc, aj->layer, g->slot, kvh);
    const float *V = cache_at(b, b->vc, aj->layer, g->slot, kvh);
    int first = g->pos + i0, last = first + (rows - 1) * step_pos;
    int jmin = sw > 0 && first - sw + 1 > 0 ? first - sw + 1 : 0;
    int L = last + 1 - jmin;
    const float *Q = b->q + (size_t)(g->t0 + i0) * (size_t)qd + (size_t)h * hd;
    float *O = b->att + (size_t)(g->t0 + i0) * (size_t)qd + (size_t)h * hd;
    float *S = b->sbuf[tid];
    float scale = 1.0f / sqrtf((float)hd);
    if (rows == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, L, hd, scale, K + (size_t)jmin * hd, hd, Q, 1,
                    0.0f, S, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, L, hd, scale, Q, ldq,
                    K + (size_t)jmin * hd, hd, 0.0f, S, L);
    for (int r = 0; r < rows; r++) {
        float *sr = S + (size_t)r * L;
        int p = first + r * step_pos;
        int lo = 0, hi = p - jmin;            /* valid keys, relative to jmin */
        if (sw > 0 && p - sw + 1 > jmin)
            lo = p - sw + 1 - jmin;
        float mx = -INFINITY;
        for (int j = lo; j <= hi; j++)
            mx = sr[j] > mx ? sr[j] : mx;
        float sum = 0;
        for (int j = 0; j < L; j++) {
            float e = j >= lo && j <= hi ? expf(sr[j] - mx) : 0.0f;
            sr[j] = e;
            sum += e;
        }
        float inv = 1.0f / sum;
        for (int j = lo; j <= hi; j++)
            sr[j] *= inv;
    }
    if (rows == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, L, hd, 1.0f, V + (size_t)jmin * hd, hd, S, 1, 0.0f,
                    O, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, L, 1.0f, S, L,
                    V + (size_t)jmin * hd, hd, 0.0f, O, ldq);
}

static void run_step(cpu_backend *b, const cpu_weights *m, step *s, float *logits)
{
    const mm_model_config *c = b->cfg;
    int H = c->hidden_size, IS = c->intermediate_size, hd = c->head_dim, half = hd / 2;
    int nh = c->num_attention_heads, kvh = c->num_key_value_heads;
    int qd = nh * hd, kvd = kvh * hd, T = s->T;
    double eps = c->rms_norm_eps;

    for (int t = 0; t < T; t++)
        widen(&m->embed, (int64_t)s->tok[t] * H, H, b->x + (size_t)t * H);
    int ntask = 0;
    for (int i = 0; i < s->nseg; i++) {
        seg *g = &s->segs[i];
        g->task0 = ntask;
        g->ntask = att_grouped(c, g) ? kvh : nh * ((g->n + ATT_QBLOCK - 1) / ATT_QBLOCK);
        ntask += g->ntask;
    }
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const mm_layer *L = &m->layers[l];
        for (int t = 0; t < T; t++)
            rmsnorm(b->x + (size_t)t * H, &L->attn_norm, H, eps, b->xn + (size_t)t * H);
        lin_job qkv = {.x = b->xn, .ldx = H, .n = T, .nm = 3,
                       .m = {{&L->q, &L->q_bias, b->q, qd},
                             {&L->k, &L->k_bias, b->k, kvd},
                             {&L->v, &L->v_bias, b->v, kvd}}};
        lin_run(b, &qkv);
        for (int si = 0; si < s->nseg; si++) {
            const seg *g = &s->segs[si];
            for (int i = 0; i < g->n; i++) {
                int t = g->t0 + i, p = g->pos + i;
                const float *cs = b->rope_cos + (size_t)p * half, *sn = b->rope_sin + (size_t)p * half;
                for (int h = 0; h < nh; h++)
                    rope(b->q + (size_t)t * qd + (size_t)h * hd, cs, sn, half);
                for (int h = 0; h < kvh; h++) {
                    float *kk = b->k + (size_t)t * kvd + (size_t)h * hd;
                    rope(kk, cs, sn, half);
                    memcpy(cache_at(b, b->kc, l, g->slot, h) + (size_t)p * hd, kk,
                           (size_t)hd * sizeof(float));
                    memcpy(cache_at(b, b->vc, l, g->slot, h) + (size_t)p * hd,
                           b->v + (size_t)t * kvd + (size_t)h * hd, (size_t)hd * sizeof(float));
                }
            }
        }
        att_job aj = {b, s, l};
        pool_run(b->pool, att_task, &aj, ntask);
        lin_job o = {.x = b->att, .ldx = qd, .n = T, .nm = 1, .accumulate = 1,
                     .m = {{&L->o, &L->o_bias, b->x, H}}};
        lin_run(b, &o);
        for (int t = 0; t < T; t++)
            rmsnorm(b->x + (size_t)t * H, &L->mlp_norm, H, eps, b->xn + (size_t)t * H);
        lin_job gu = {.x = b->xn, .ldx = H, .n = T, .nm = 2, .swiglu = 1,
                      .m = {{&L->gate, NULL, b->gate, IS}, {&L->up, NULL, b->up, IS}}};
        lin_run(b, &gu);
        lin_job dn = {.x = b->gate, .ldx = IS, .n = T, .nm = 1, .accumulate = 1,
                      .m = {{&L->down, NULL, b->x, H}}};
        lin_run(b, &dn);
    }
    if (!s->nout)
        return;
    if (!s->namx) {
        for (int r = 0; r < s->nout; r++)
            rmsnorm(b->x + (size_t)s->out_tok[r] * H, &m->norm, H, eps, b->xn + (size_t)r * H);
        lin_job head = {.x = b->xn, .ldx = H, .n = s->nout, .nm = 1,
                        .m = {{&m->lm_head, NULL, logits + (size_t)s->out_first * c->vocab_size,
                               c->vocab_size}}};
        lin_run(b, &head);
        return;
    }
    /* Some rows are argmaxes: every row goes through the scratch rows, in
     * one product per head_rows (a decode step's rows all fit), so each row
     * comes out of the same kernel, bit for bit, as without the argmax. */
    size_t V = (size_t)c->vocab_size;
    int n_valid = b->base.n_valid > 0 && b->base.n_valid < c->vocab_size ? b->base.n_valid
                                                                         : c->vocab_size;
    for (int r0 = 0; r0 < s->nout; r0 += b->head_rows) {
        int n = s->nout - r0 < b->head_rows ? s->nout - r0 : b->head_rows;
        for (int r = 0; r < n; r++)
            rmsnorm(b->x + (size_t)s->out_tok[r0 + r] * H, &m->norm, H, eps,
                    b->xn + (size_t)r * H);
        lin_job head = {.x = b->xn, .ldx = H, .n = n, .nm = 1,
                        .m = {{&m->lm_head, NULL, b->head, c->vocab_size}}};
        lin_run(b, &head);
        for (int r = 0; r < n; r++) {
            const float *y = b->head + (size_t)r * V;
            if (s->out_row[r0 + r] < 0)
                *s->out_amx[r0 + r] = mm_sampler_argmax(y, n_valid);
            else
                memcpy(logits + (size_t)s->out_row[r0 + r] * V, y, V * sizeof *y);
        }
    }
}

/* Positions a slot may hold: its reserved blocks, at most max_len. */
static int slot_room(const cpu_backend *b, int slot)
{
    long long n = (long long)b->slot_blocks[slot] * b->base.block_size;
    return n < b->base.max_len ? (int)n : b->base.max_len;
}

static int cpu_forward(mm_backend *base, mm_batch_seq *seqs, int nseqs, float *logits,
                       char *err, size_t errlen)
{
    cpu_backend *b = (cpu_backend *)base;
    const cpu_weights *m = &b->w;
    const mm_model_config *c = b->cfg;
    for (int i = 0; i < nseqs; i++) {
        const mm_batch_seq *q = &seqs[i];
        if (q->slot < 0 || q->slot >= base->max_seqs) {
            mm_errf(err, errlen, "sequence %d: slot %d out of range [0, %d)", i, q->slot,
                   base->max_seqs);
            return -EINVAL;
        }
        if (q->n_tokens < 0 || q->pos < 0 || q->pos > b->slot_len[q->slot] ||
            q->n_tokens > base->max_len - q->pos || (q->n_tokens && !q->tokens)) {
            mm_errf(err, errlen, "sequence %d: %d tokens at position %d (slot %d holds %d, max %d)",
                   i, q->n_tokens, q->pos, q->slot, b->slot_len[q->slot], base->max_len);
            return -EINVAL;
        }
        if (q->want < MM_LOGITS_NONE || q->want > MM_LOGITS_ARGMAX) {
            mm_errf(err, errlen, "sequence %d: unknown want %d", i, q->want);
            return -EINVAL;
        }
        if ((q->want == MM_LOGITS_LAST || q->want == MM_LOGITS_ARGMAX) && q->n_tokens == 0) {
            mm_errf(err, errlen, "sequence %d: logits wanted for no tokens", i);
            return -EINVAL;
        }
        /* A scheduler that forgot to reserve would, on a paged GPU cache,
         * write into blocks it does not own: refuse it here too. */
        if (q->pos + q->n_tokens > slot_room(b, q->slot)) {
            mm_errf(err, errlen, "sequence %d: slot %d is reserved for %d positions, the step "
                    "needs %d (reserve() first)", i, q->slot, slot_room(b, q->slot),
                    q->pos + q->n_tokens);
            return -EINVAL;
        }
        for (int j = 0; j < i; j++)
            if (seqs[j].slot == q->slot) {
                mm_errf(err, errlen, "sequences %d and %d share slot %d", j, i, q->slot);
                return -EINVAL;
            }
        for (int t = 0; t < q->n_tokens; t++)
            if (q->tokens[t] < 0 || q->tokens[t] >= c->vocab_size) {
                mm_errf(err, errlen, "sequence %d: token %d out of range [0, %d)", i,
                       (int)q->tokens[t], c->vocab_size);
                return -EINVAL;
            }
    }
    step *s = malloc(sizeof *s);
    if (!s) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->T = s->nseg = s->nout = s->namx = 0;
    s->out_first = -1;
    int row = 0;
    /* Walk the batch's tokens in order, cutting a sub-step whenever it is
     * full; a sequence split across two sub-steps finds its first part in
     * the cache when the second runs. */
    for (int i = 0; i < nseqs; i++) {
        mm_batch_seq *q = &seqs[i];
        for (int t = 0; t < q->n_tokens; t++) {
            if (s->T == STEP_TOKENS) {
                run_step(b, m, s, logits);
                s->T = s->nseg = s->nout = s->namx = 0;
                s->out_first = -1;
            }
            if (t == 0 || s->nseg == 0 || s->segs[s->nseg - 1].slot != q->slot)
                s->segs[s->nseg++] = (seg){q->slot, q->pos + t, s->T, 0, 0, 0};
            s->segs[s->nseg - 1].n++;
            int want = q->want == MM_LOGITS_ALL ||
                       (q->want != MM_LOGITS_NONE && t == q->n_tokens - 1);
            if (want && q->want == MM_LOGITS_ARGMAX) {
                s->out_row[s->nout] = -1;
                s->out_amx[s->nout] = &q->argmax;
                s->out_tok[s->nout++] = s->T;
                s->namx++;
            } else if (want) {
                if (s->out_first < 0)
                    s->out_first = row;
                s->out_row[s->nout] = row++;
                s->out_tok[s->nout++] = s->T;
            }
            s->tok[s->T] = q->tokens[t];
            s->T++;
        }
        b->slot_len[q->slot] = q->pos + q->n_tokens;
    }
    if (s->T)
        run_step(b, m, s, logits);
    free(s);
    return 0;
}

/* Copy every weight, in its stored dtype, into one anonymous mapping with
 * transparent huge pages. Streaming weights from the file mapping (4 KiB
 * page-cache pages) measured at about half the rate: each page ends the
 * hardware prefetcher's run and costs a TLB miss. */
static size_t place(const mm_weight *src, mm_weight *dst, char *base, size_t off)
{
    *dst = *src;
    if (!src->data)
        return off;
    size_t n = (size_t)src->rows * (size_t)src->cols * dtsize(src->dtype);
    if (base) {
        memcpy(base + off, src->data, n);
        dst->data = base + off;
    }
    return (off + n + 63) & ~(size_t)63;
}

static size_t place_all(cpu_backend *b, const mm_model *m, char *base)
{
    const mm_model_config *c = &m->cfg;
    size_t off = 0;
    off = place(&m->embed, &b->w.embed, base, off);
    off = place(&m->norm, &b->w.norm, base, off);
    if (m->lm_head.data == m->embed.data)
        b->w.lm_head = b->w.embed;
    else
        off = place(&m->lm_head, &b->w.lm_head, base, off);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const mm_layer *s = &m->layers[l];
        mm_layer *d = &b->w.layers[l];
        off = place(&s->attn_norm, &d->attn_norm, base, off);
        off = place(&s->q, &d->q, base, off);
        off = place(&s->k, &d->k, base, off);
        off = place(&s->v, &d->v, base, off);
        off = place(&s->o, &d->o, base, off);
        off = place(&s->q_bias, &d->q_bias, base, off);
        off = place(&s->k_bias, &d->k_bias, base, off);
        off = place(&s->v_bias, &d->v_bias, base, off);
        off = place(&s->o_bias, &d->o_bias, base, off);
        off = place(&s->mlp_norm, &d->mlp_norm, base, off);
        off = place(&s->gate, &d->gate, base, off);
        off = place(&s->up, &d->up, base, off);
        off = place(&s->down, &d->down, base, off);
    }
    return off;
}

static int copy_weights(cpu_backend *b, const mm_model *m, char *err, size_t errlen)
{
    if (!(b->w.layers = calloc((size_t)m->cfg.num_hidden_layers, sizeof *b->w.layers))) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    size_t huge = (size_t)2 << 20;
    b->w.map_bytes = (place_all(b, m, NULL) + huge - 1) & ~(huge - 1);
    void *p = mmap(NULL, b->w.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                   0);
    if (p == MAP_FAILED) {
        int e = errno;
        mm_errf(err, errlen, "weights: cannot map %zu bytes: %s", b->w.map_bytes, strerror(e));
        return -e;
    }
    b->w.map = p;
    madvise(p, b->w.map_bytes, MADV_HUGEPAGE);
    place_all(b, m, p);
    return 0;
}

static int cpu_reserve(mm_backend *base, int slot, int n)
{
    cpu_backend *b = (cpu_backend *)base;
    if (slot < 0 || slot >= base->max_seqs || n < 0 || n > base->max_len)
        return -EINVAL;
    int need = (int)(((long long)n + base->block_size - 1) / base->block_size);
    int have = b->slot_blocks[slot];
    if (need <= have)
        return 0;
    if (need - have > base->num_blocks - base->blocks_used)
        return -ENOSPC;
    base->blocks_used += need - have;
    b->slot_blocks[slot] = need;
    return 0;
}

/* Blocks wholly past pos go back to the pool (all of them for pos 0). */
static void cpu_truncate(mm_backend *base, int slot, int pos)
{
    cpu_backend *b = (cpu_backend *)base;
    if (slot < 0 || slot >= base->max_seqs || pos < 0)
        return;
    if (b->slot_len[slot] > pos)
        b->slot_len[slot] = pos;
    int keep = (int)(((long long)pos + base->block_size - 1) / base->block_size);
    if (keep < b->slot_blocks[slot]) {
        base->blocks_used -= b->slot_blocks[slot] - keep;
        b->slot_blocks[slot] = keep;
    }
}

static void cpu_free(mm_backend *base)
{
    cpu_backend *b = (cpu_backend *)base;
    if (!b)
        return;
    pool_free(b->pool);
    if (b->w.map)
        munmap(b->w.map, b->w.map_bytes);
    free(b->w.layers);
    if (b->kc)
        munmap(b->kc, b->cache_bytes);
    if (b->vc)
        munmap(b->vc, b->cache_bytes);
    for (int i = 0; b->wbuf && i < b->threads; i++)
        free(b->wbuf[i]);
    for (int i = 0; b->sbuf && i < b->threads; i++)
        free(b->sbuf[i]);
    free(b->wbuf);
    free(b->sbuf);
    free(b->slot_len);
    free(b->slot_blocks);
    free(b->head);
    free(b->rope_cos);
    free(b->rope_sin);
    free(b->x);
    free(b->xn);
    free(b->q);
    free(b->k);
    free(b->v);
    free(b->att);
    free(b->gate);
    free(b->up);
    free(b->xeo);
    free(b);
}

static const mm_backend_ops cpu_ops = {
    .name = "cpu",
    .forward = cpu_forward,
    .reserve = cpu_reserve,
    .truncate = cpu_truncate,
    .free = cpu_free,
};

static float *falloc(size_t n) { return malloc((n ? n : 1) * sizeof(float)); }

int mm_backend_cpu_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                       char *err, size_t errlen)
{
    const mm_model_config *c = &m->cfg;
    int rc = -EINVAL;
    *out = NULL;
    if (o->max_seqs < 1 || o->max_seqs > 4096 || o->max_len < 1 || o->max_len > (1 << 24)) {
        mm_errf(err, errlen, "max_seqs %d / max_len %d out of range", o->max_seqs, o->max_len);
        return -EINVAL;
    }
    if (o->block_size < 0 || o->block_size > 256 || o->num_blocks < 0) {
        mm_errf(err, errlen, "block_size %d (1..256) / num_blocks %d out of range", o->block_size,
                o->num_blocks);
        return -EINVAL;
    }
    cpu_backend *b = calloc(1, sizeof *b);
    if (!b) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    b->base.ops = &cpu_ops;
    b->base.model = m;
    b->base.max_seqs = o->max_seqs;
    b->base.max_len = o->max_len;
    b->base.n_valid = c->vocab_size;
    b->base.block_size = o->block_size ? o->block_size : 16;
    /* Default: a full max_len for every slot, so the pool never runs short
     * (the cache is reserved per slot anyway). */
    long long per_slot = ((long long)o->max_len + b->base.block_size - 1) / b->base.block_size;
    long long nb = o->num_blocks ? o->num_blocks : per_slot * o->max_seqs;
    b->base.num_blocks = nb < INT_MAX ? (int)nb : INT_MAX;
    b->cfg = c;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    b->threads = o->threads > 0 ? o->threads : ncpu > 0 ? (int)ncpu : 1;
    if (b->threads > 256)
        b->threads = 256;
    /* MM_CPU_ISA=avx2|scalar caps the kernels below what the CPU offers,
     * so tests and benchmarks can run every path on one machine. */
    __builtin_cpu_init();
    const char *cap = getenv("MM_CPU_ISA");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c") && !(cap && strcmp(cap, "scalar") == 0);
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                 !(cap && strcmp(cap, "avx2") == 0);
    if (avx512) {
        b->isa = "avx512";
        b->dot[0] = dot_avx512_bf16;
        b->dot[1] = dot_avx512_f16;
        b->dot[2] = dot_avx512_f32;
    } else if (avx2) {
        b->isa = "avx2";
        b->dot[0] = dot_avx2_bf16;
        b->dot[1] = dot_avx2_f16;
        b->dot[2] = dot_avx2_f32;
    } else {
        b->isa = "scalar";
        b->dot[0] = dot_scalar_bf16;
        b->dot[1] = dot_scalar_f16;
        b->dot[2] = dot_scalar_f32;
    }
    /* Our pool provides the parallelism; OpenBLAS threads on top would
     * oversubscribe the cores. */
    openblas_set_num_threads(1);

    int H = c->hidden_size, IS = c->intermediate_size, hd = c->head_dim, half = hd / 2;
    size_t qd = (size_t)c->num_attention_heads * hd, kvd = (size_t)c->num_key_value_heads * hd;
    b->cache_bytes = (size_t)c->num_hidden_layers * (size_t)o->max_seqs * kvd *
                     (size_t)o->max_len * sizeof(float);
    rc = -ENOMEM;
    b->kc = mmap(NULL, b->cache_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b->kc == MAP_FAILED) {
        b->kc = NULL;
        mm_errf(err, errlen, "KV cache: cannot map %zu bytes", b->cache_bytes);
        goto fail;
    }
    b->vc = mmap(NULL, b->cache_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b->vc == MAP_FAILED) {
        b->vc = NULL;
        mm_errf(err, errlen, "KV cache: cannot map %zu bytes", b->cache_bytes);
        goto fail;
    }
    b->max_in = H > IS ? H : IS;
    if ((int)qd > b->max_in)
        b->max_in = (int)qd;
    b->xeo_ld = (size_t)b->max_in + 64;
    b->gemm_min = GEMM_MIN_TOKENS;
    const char *gm = getenv("MM_CPU_GEMM_MIN");
    if (gm) {
        char *end;
        long v = strtol(gm, &end, 10);
        if (*gm && !*end && v >= 1 && v <= STEP_TOKENS + 1) {
            b->gemm_min = (int)v;
            b->gemm_forced = 1;
        }
    }
    size_t T = STEP_TOKENS;
    b->head_rows = o->max_seqs < STEP_TOKENS ? o->max_seqs : STEP_TOKENS;
    if (!(b->slot_len = calloc((size_t)o->max_seqs, sizeof *b->slot_len)) ||
        !(b->slot_blocks = calloc((size_t)o->max_seqs, sizeof *b->slot_blocks)) ||
        !(b->head = falloc((size_t)b->head_rows * (size_t)c->vocab_size)) ||
        !(b->rope_cos = falloc((size_t)o->max_len * half)) ||
        !(b->rope_sin = falloc((size_t)o->max_len * half)) ||
        !(b->x = falloc(T * H)) || !(b->xn = falloc(T * H)) || !(b->q = falloc(T * qd)) ||
        !(b->k = falloc(T * kvd)) || !(b->v = falloc(T * kvd)) || !(b->att = falloc(T * qd)) ||
        !(b->gate = falloc(T * IS)) || !(b->up = falloc(T * IS)) ||
        !(b->xeo = falloc((size_t)STEP_TOKENS * b->xeo_ld)) ||
        !(b->wbuf = calloc((size_t)b->threads, sizeof *b->wbuf)) ||
        !(b->sbuf = calloc((size_t)b->threads, sizeof *b->sbuf))) {
        mm_errf(err, errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < b->threads; i++)
        if (!(b->wbuf[i] = falloc((size_t)GEMM_CHUNK_ROWS * b->max_in)) ||
            !(b->sbuf[i] = falloc((size_t)ATT_QBLOCK * o->max_len))) {
            mm_errf(err, errlen, "out of memory");
            goto fail;
        }
    float *inv = falloc((size_t)half);
    if (!inv) {
        mm_errf(err, errlen, "out of memory");
        goto fail;
    }
    mm_model_rope_inv_freq(c, inv);
    /* The angle is rounded to float before cos/sin, as transformers does,
     * so positions far out rotate exactly as in the reference. */
    for (int p = 0; p < o->max_len; p++)
        for (int i = 0; i < half; i++) {
            float a = (float)p * inv[i];
            b->rope_cos[(size_t)p * half + i] = (float)cos((double)a);
            b->rope_sin[(size_t)p * half + i] = (float)sin((double)a);
        }
    free(inv);
    if ((rc = copy_weights(b, m, err, errlen)) < 0)
        goto fail;
    if ((rc = pool_new(b->threads, &b->pool)) < 0) {
        mm_errf(err, errlen, "thread pool: %s", strerror(-rc));
        goto fail;
    }
    *out = &b->base;
    return 0;
fail:
    cpu_free(&b->base);
    return rc;
}
