/* bench.c: gpu_bench, decode and prefill speed of a backend, driven
 * directly (no engine, no HTTP), with the bytes a decode step reads so the
 * memory roofline can be computed (tests/gpu/run.sh divides by gpu_bw's
 * bandwidth).
 *
 *   gpu_bench --model DIR [--backend cuda|cpu] [--name LABEL]
 *             [--batches 1,8,32,64,256] [--prompt 128] [--steps 128]
 *             [--single-steps 256] [--warmup 8] [--prefill 2048] [--chunk 2048]
 *             [--ttft-prompt 128] [--reps 3] [--block-size 16] [--kv-bytes N]
 *             [--only single,batch,prefill,ttft] [--gpu-memory-utilization F]
 *             [--verify N]
 *
 * Measurements (each after untimed warm-up work of the same shape):
 *  - single: one sequence, --prompt tokens prefilled, then --single-steps
 *    greedy decode steps with MM_LOGITS_ARGMAX, timed;
 *  - batch B: B sequences of --prompt tokens (prefilled --chunk tokens a
 *    forward), then --steps decode steps with all B in every forward;
 *  - prefill: one --prefill-token prompt, --chunk tokens a forward, the
 *    last slice asking for the first token (median and best of --reps);
 *  - ttft: a --ttft-prompt prefill that returns the first token;
 *  - verify (--verify N, first): N greedy tokens against the CPU backend
 *    on this model (see bench_verify); a mismatch makes the exit status 1
 *    after the other measurements.
 * Each prints one JSON line on stdout ({"bench": ...}); a table follows.
 * Bytes per decode step = weights (harness.h: an untied embedding table
 * counts one row, a tied one once) + batch x KV bytes per position x mean
 * context; --kv-bytes is the cache's element size (default 2 for cuda, 4
 * for cpu, the CPU backend's float32 cache). Exit 1 on any error; a build
 * without the CUDA backend says so and exits 1 for --backend cuda. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errmsg.h"
#include "harness.h"

#define MAX_BATCHES 16
#define TABLE_ROWS 32

typedef struct bench {
    const char *kind, *name;
    mm_model   *m;
    mm_backend *b;
    int         batches[MAX_BATCHES], nbatches;
    int         prompt, steps, single_steps, warmup, prefill, chunk, ttft_prompt, reps;
    int         kv_elem;
    double      weight_bytes, kv_per_pos;
    int         tp;          /* GPUs the model is split over (--tp) */
    int32_t    *toks;      /* prompts: max batch x max(prompt, prefill) */
    int32_t    *next;      /* per sequence: the last token */
    mm_batch_seq *seqs;
    float      *logits;    /* one row: no step here asks for rows, but the
                            * interface has a buffer */
    char        table[TABLE_ROWS][160];
    int         nrows;
} bench;

static void row(bench *B, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void row(bench *B, const char *fmt, ...)
{
    if (B->nrows >= TABLE_ROWS)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(B->table[B->nrows++], sizeof B->table[0], fmt, ap);
    va_end(ap);
}

static void fill(int32_t *t, int n, int V, unsigned salt)
{
    uint64_t s = 0x9e3779b97f4a7c15ull * (salt + 1);
    for (int i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        t[i] = (int32_t)(3 + s % (uint64_t)(V - 3));
    }
}

static int forward(bench *B, int n, char *err, size_t errlen)
{
    return B->b->ops->forward(B->b, B->seqs, n, B->logits, err, errlen);
}

static int reserve(bench *B, int slot, int n, char *err, size_t errlen)
{
    int rc = B->b->ops->reserve(B->b, slot, n);
    if (rc < 0)
        mm_errf(err, errlen, "reserve(slot %d, %d positions): %s (pool of %d blocks of %d, %d "
                "used)", slot, n, strerror(-rc), B->b->num_blocks, B->b->block_size,
                B->b->blocks_used);
    return rc;
}

static void free_slots(bench *B, int n)
{
    for (int s = 0; s < n; s++)
        B->b->ops->truncate(B->b, s, 0);
}

/* Prefill nseq prompts of len tokens, as many whole prompts a forward as
 * fit in --chunk tokens (at least one), each returning its first token. */
static int prefill_all(bench *B, int nseq, int len, char *err, size_t errlen)
{
    int per = B->chunk / len > 0 ? B->chunk / len : 1;
    for (int s0 = 0; s0 < nseq; s0 += per) {
        int n = nseq - s0 < per ? nseq - s0 : per;
        for (int k = 0; k < n; k++) {
            int s = s0 + k;
            if (reserve(B, s, len, err, errlen) < 0)
                return -ENOSPC;
            B->seqs[k] = (mm_batch_seq){.slot = s, .tokens = B->toks + (size_t)s * len,
                                        .n_tokens = len, .pos = 0, .want = MM_LOGITS_ARGMAX,
                                        .argmax = -1};
        }
        int rc = forward(B, n, err, errlen);
        if (rc < 0)
            return rc;
        for (int k = 0; k < n; k++)
            B->next[s0 + k] = B->seqs[k].argmax;
    }
    return 0;
}

/* nstep decode steps of sequences 0..nseq-1, whose caches hold pos
 * positions, all in each forward. */
static int decode_steps(bench *B, int nseq, int pos, int nstep, char *err, size_t errlen)
{
    int V = B->m->cfg.vocab_size;
    for (int t = 0; t < nstep; t++) {
        for (int s = 0; s < nseq; s++) {
            if (reserve(B, s, pos + t + 1, err, errlen) < 0)
                return -ENOSPC;
            B->seqs[s] = (mm_batch_seq){.slot = s, .tokens = &B->next[s], .n_tokens = 1,
                                        .pos = pos + t, .want = MM_LOGITS_ARGMAX, .argmax = -1};
        }
        int rc = forward(B, nseq, err, errlen);
        if (rc < 0)
            return rc;
        for (int s = 0; s < nseq; s++) {
            if (B->seqs[s].argmax < 0 || B->seqs[s].argmax >= V) {
                mm_errf(err, errlen, "step %d: ARGMAX returned %d", t, B->seqs[s].argmax);
                return -ERANGE;
            }
            B->next[s] = B->seqs[s].argmax;
        }
    }
    return 0;
}

static void json_common(bench *B, const char *what)
{
    printf("{\"bench\":\"%s\",\"backend\":\"%s\",\"model\":\"%s\",\"tp\":%d", what, B->kind,
           B->name, B->tp);
}

/* One decode measurement: nseq sequences, nstep timed steps. */
static int bench_decode(bench *B, const char *what, int nseq, int nstep, char *err,
                        size_t errlen)
{
    double t0 = mm_gpu_now();
    int rc = prefill_all(B, nseq, B->prompt, err, errlen);
    double tp = mm_gpu_now() - t0;
    if (rc == 0)
        rc = decode_steps(B, nseq, B->prompt, B->warmup, err, errlen);
    if (rc < 0)
        goto out;
    int pos = B->prompt + B->warmup;
    t0 = mm_gpu_now();
    if ((rc = decode_steps(B, nseq, pos, nstep, err, errlen)) < 0)
        goto out;
    double t = mm_gpu_now() - t0;
    double mean_ctx = pos + nstep / 2.0;
    double step_bytes = B->weight_bytes + (double)nseq * B->kv_per_pos * mean_ctx;
    double tok_s = (double)nseq * nstep / t, ms = t / nstep * 1e3;
    json_common(B, what);
    printf(",\"batch\":%d,\"prompt\":%d,\"steps\":%d,\"seconds\":%.6f,\"tok_s\":%.2f,"
           "\"ms_per_step\":%.4f,\"prefill_s\":%.4f,\"prefill_tok_s\":%.1f,\"mean_ctx\":%.1f,"
           "\"weight_bytes_per_step\":%.0f,\"kv_bytes_per_pos\":%.0f,\"bytes_per_step\":%.0f,"
           "\"bytes_per_token\":%.0f,\"step_gbs\":%.2f}\n",
           nseq, B->prompt, nstep, t, tok_s, ms, tp, nseq * B->prompt / tp, mean_ctx,
           B->weight_bytes, B->kv_per_pos, step_bytes, step_bytes / nseq, step_bytes / ms / 1e6);
    row(B, "%-22s %6d %10.1f %9.3f %12.0f %9.1f", what, nseq, tok_s, ms, step_bytes / nseq,
        step_bytes / ms / 1e6);
out:
    free_slots(B, nseq);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One prompt of len tokens, chunk tokens a forward, the last slice
 * returning the first token. */
static int prefill_one(bench *B, int len, int chunk, double *secs, char *err, size_t errlen)
{
    double t0 = mm_gpu_now();
    for (int p = 0; p < len; p += chunk) {
        int n = len - p < chunk ? len - p : chunk;
        if (reserve(B, 0, p + n, err, errlen) < 0)
            return -ENOSPC;
        B->seqs[0] = (mm_batch_seq){.slot = 0, .tokens = B->toks + p, .n_tokens = n, .pos = p,
                                    .want = p + n == len ? MM_LOGITS_ARGMAX : MM_LOGITS_NONE,
                                    .argmax = -1};
        int rc = forward(B, 1, err, errlen);
        if (rc < 0)
            return rc;
    }
    *secs = mm_gpu_now() - t0;
    B->b->ops->truncate(B->b, 0, 0);
    return 0;
}

static int bench_prefill(bench *B, const char *what, int len, int chunk, int reps, char *err,
                         size_t errlen)
{
    double t[64], warm;
    reps = reps > 64 ? 64 : reps;
    int rc = prefill_one(B, len, chunk, &warm, err, errlen);
    for (int r = 0; rc == 0 && r < reps; r++)
        rc = prefill_one(B, len, chunk, &t[r], err, errlen);
    if (rc < 0)
        return rc;
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    double med = reps % 2 ? t[reps / 2] : (t[reps / 2 - 1] + t[reps / 2]) / 2;
    json_common(B, what);
    printf(",\"tokens\":%d,\"chunk\":%d,\"reps\":%d,\"median_s\":%.6f,\"best_s\":%.6f,"
           "\"warmup_s\":%.6f,\"tok_s\":%.1f,\"best_tok_s\":%.1f,\"median_ms\":%.3f}\n",
           len, chunk, reps, med, t[0], warm, len / med, len / t[0], med * 1e3);
    if (strcmp(what, "ttft") == 0)
        row(B, "%-22s %6d %10.1f %9.3f   (median of %d; warm-up %.1f ms)", what, 1, len / med,
            med * 1e3, reps, warm * 1e3);
    else
        row(B, "%-22s %6d %10.1f %9.3f   (%d tokens, chunk %d, best %.1f tok/s)", what, 1,
            len / med, med * 1e3, len, chunk, len / t[0]);
    return 0;
}

/* --verify N: the backend's greedy continuation of the first prompt
 * against the CPU backend's (float32), on this very model: its real
 * shapes and vocabulary, which the small models of gpu_check lack. The
 * first row's log-probabilities (LAST) give the numeric noise d0; a token
 * may differ only where the CPU's top-1/top-2 gap is within max(0.05,
 * 3 d0), and d0 above 0.5 is a failure by itself. */
static int bench_verify(bench *B, int n, char *err, size_t errlen)
{
    const mm_model *m = B->m;
    int V = m->cfg.vocab_size, P = B->prompt, rc = -ENOMEM;
    mm_backend *cpu = NULL;
    float *first = malloc(sizeof *first * (size_t)V), *row_c = malloc(sizeof *row_c * (size_t)V);
    float *row_b = malloc(sizeof *row_b * (size_t)V);
    double *scratch = malloc(sizeof *scratch * 2 * (size_t)V), *mg = malloc(sizeof *mg * (size_t)n);
    int32_t *tc = malloc(sizeof *tc * (size_t)n), *tb = malloc(sizeof *tb * (size_t)n);
    if (!first || !row_c || !row_b || !scratch || !mg || !tc || !tb) {
        mm_errf(err, errlen, "out of memory");
        goto out;
    }
    double t0 = mm_gpu_now();
    mm_backend_opts o = {.max_seqs = 1, .max_len = P + n + 1, .block_size = 16};
    if ((rc = mm_gpu_backend_open("cpu", m, &o, &cpu, err, errlen)) < 0)
        goto out;
    /* The CPU's greedy steps, with rows for the margins. */
    if ((rc = mm_gpu_step(cpu, 0, B->toks, P, 0, MM_LOGITS_LAST, row_c, NULL, err, errlen)) < 0)
        goto out;
    memcpy(first, row_c, sizeof *first * (size_t)V);
    for (int i = 0; i < n; i++) {
        tc[i] = mm_gpu_argmax(row_c, V);
        mg[i] = mm_gpu_margin(row_c, V);
        if (i + 1 < n && (rc = mm_gpu_step(cpu, 0, &tc[i], 1, P + i, MM_LOGITS_LAST, row_c, NULL,
                                           err, errlen)) < 0)
            goto out;
    }
    double tcpu = mm_gpu_now() - t0;
    /* The backend: the first row (LAST), then its own ARGMAX steps. */
    if ((rc = mm_gpu_step(B->b, 0, B->toks, P, 0, MM_LOGITS_LAST, row_b, NULL, err, errlen)) < 0)
        goto out;
    double d0 = mm_gpu_row_diff(row_b, first, V, scratch);
    tb[0] = mm_gpu_argmax(row_b, V);
    for (int i = 1; i < n; i++) {
        int32_t amx = -1;
        if ((rc = mm_gpu_step(B->b, 0, &tb[i - 1], 1, P + i - 1, MM_LOGITS_ARGMAX, row_b, &amx,
                              err, errlen)) < 0)
            goto out;
        tb[i] = amx;
    }
    B->b->ops->truncate(B->b, 0, 0);
    double tie = 3 * d0 > 0.05 ? 3 * d0 : 0.05;
    int agree = 0, tie_at = -1, bad_at = -1;
    for (int i = 0; i < n; i++) {
        if (tb[i] == tc[i]) {
            agree++;
            continue;
        }
        if (mg[i] < tie)
            tie_at = i;
        else
            bad_at = i;
        break;
    }
    int ok = bad_at < 0 && d0 <= 0.5;
    json_common(B, "verify");
    printf(",\"steps\":%d,\"first_row_max_diff\":%.5f,\"tie\":%.4f,\"agree\":%d,\"tie_at\":%d,"
           "\"bad_at\":%d,\"ok\":%s,\"cpu_s\":%.2f}\n",
           n, d0, tie, agree, tie_at, bad_at, ok ? "true" : "false", tcpu);
    row(B, "%-22s %6d  greedy vs cpu: %d/%d equal%s, first row max |dlogprob| %.4f%s", "verify",
        1, agree, n, tie_at >= 0 ? " then a near tie" : "", d0, ok ? "" : "  FAILED");
    rc = ok ? 0 : -EDOM;
    if (!ok)
        mm_errf(err, errlen, "verify: %s (first row max |dlogprob| %.4f, step %d, cpu gap %.4f)",
                d0 > 0.5 ? "log-probabilities differ from the CPU backend's"
                         : "greedy tokens differ from the CPU backend's",
                d0, bad_at, bad_at >= 0 ? mg[bad_at] : 0.0);
out:
    if (cpu)
        cpu->ops->free(cpu);
    free(first);
    free(row_c);
    free(row_b);
    free(scratch);
    free(mg);
    free(tc);
    free(tb);
    return rc;
}

static int parse_int(const char *s, int lo, int hi, int *v)
{
    char *end;
    if (!s || !*s)
        return -1;
    errno = 0;
    long x = strtol(s, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return -1;
    *v = (int)x;
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: gpu_bench --model DIR [--backend cuda|cpu] [--name LABEL]\n"
            "         [--batches 1,8,32,64,256] [--prompt 128] [--steps 128] [--single-steps 256]\n"
            "         [--warmup 8] [--prefill 2048] [--chunk 2048] [--ttft-prompt 128] [--reps 3]\n"
            "         [--block-size 16] [--kv-bytes N] [--only single,batch,prefill,ttft]\n"
            "         [--gpu-memory-utilization F] [--verify N] [--tp N]\n");
}

static int has(const char *list, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = list; (p = strstr(p, word)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ','))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    bench B = {.kind = "cuda", .prompt = 128, .steps = 128, .single_steps = 256, .warmup = 8,
               .prefill = 2048, .chunk = 2048, .ttft_prompt = 128, .reps = 3, .tp = 1};
    const char *dir = NULL, *only = "single,batch,prefill,ttft";
    const char *batches = "1,8,32,64,256";
    int block_size = 16, kv_elem = 0, verify = 0, rc = 1;
    double util = 0.9;
    char err[1024] = "";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = !v;
        i++;
        if (bad)
            ;
        else if (strcmp(a, "--model") == 0)
            dir = v;
        else if (strcmp(a, "--backend") == 0)
            bad = strcmp(v, "cuda") && strcmp(v, "cpu"), B.kind = v;
        else if (strcmp(a, "--name") == 0)
            B.name = v;
        else if (strcmp(a, "--batches") == 0)
            batches = v;
        else if (strcmp(a, "--only") == 0)
            only = v;
        else if (strcmp(a, "--prompt") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.prompt);
        else if (strcmp(a, "--steps") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.steps);
        else if (strcmp(a, "--single-steps") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.single_steps);
        else if (strcmp(a, "--warmup") == 0)
            bad = parse_int(v, 0, 1 << 20, &B.warmup);
        else if (strcmp(a, "--prefill") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.prefill);
        else if (strcmp(a, "--chunk") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.chunk);
        else if (strcmp(a, "--ttft-prompt") == 0)
            bad = parse_int(v, 1, 1 << 20, &B.ttft_prompt);
        else if (strcmp(a, "--reps") == 0)
            bad = parse_int(v, 1, 64, &B.reps);
        else if (strcmp(a, "--block-size") == 0)
            bad = parse_int(v, 1, 4096, &block_size);
        else if (strcmp(a, "--tp") == 0)
            bad = parse_int(v, 1, 16, &B.tp);
        else if (strcmp(a, "--verify") == 0)
            bad = parse_int(v, 1, 4096, &verify);
        else if (strcmp(a, "--kv-bytes") == 0)
            bad = parse_int(v, 1, 8, &kv_elem);
        else if (strcmp(a, "--gpu-memory-utilization") == 0)
            util = strtod(v, NULL), bad = !(util > 0 && util <= 1);
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "gpu_bench: bad or unknown option %s\n", a);
            usage();
            return 2;
        }
    }
    if (!dir) {
        usage();
        return 2;
    }
    for (const char *p = batches; *p && B.nbatches < MAX_BATCHES;) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 1 || x > 4096 || (*end && *end != ',')) {
            fprintf(stderr, "gpu_bench: --batches: expected numbers 1..4096 separated by commas\n");
            return 2;
        }
        B.batches[B.nbatches++] = (int)x;
        p = *end ? end + 1 : end;
    }
    if (!B.name) {
        const char *s = strrchr(dir, '/');
        B.name = s && s[1] ? s + 1 : dir;
    }
    if (strcmp(B.kind, "cuda") == 0 && !mm_backend_cuda_built()) {
        fprintf(stderr, "gpu_bench: this build has no CUDA backend (built with CUDA=0 or "
                        "without nvcc)\n");
        return 1;
    }
    B.kv_elem = kv_elem ? kv_elem : strcmp(B.kind, "cuda") == 0 ? 2 : 4;

    /* Sizes: every measurement runs alone, its slots truncated after. */
    int maxb = 1;
    for (int i = 0; i < B.nbatches; i++)
        maxb = B.batches[i] > maxb ? B.batches[i] : maxb;
    int dec_len = B.prompt + B.warmup + (B.steps > B.single_steps ? B.steps : B.single_steps) + 1;
    int max_len = dec_len;
    max_len = B.prefill > max_len ? B.prefill : max_len;
    max_len = B.ttft_prompt > max_len ? B.ttft_prompt : max_len;
    int per_seq = (dec_len + block_size - 1) / block_size;
    long long blocks = (long long)maxb * per_seq;
    long long pre_blocks = (max_len + block_size - 1) / block_size;
    blocks = (blocks > pre_blocks ? blocks : pre_blocks) + 16;
    int maxtok = B.prefill > B.prompt ? B.prefill : B.prompt;
    maxtok = B.ttft_prompt > maxtok ? B.ttft_prompt : maxtok;

    double t0 = mm_gpu_now();
    mm_model_load_opts lo = {.quiet = 1};
    if (mm_model_load(dir, &lo, &B.m, err, sizeof err) < 0)
        goto out;
    double tl = mm_gpu_now() - t0;
    int V = B.m->cfg.vocab_size;
    B.weight_bytes = mm_gpu_weight_bytes_per_step(B.m);
    B.kv_per_pos = mm_gpu_kv_bytes_per_pos(B.m, B.kv_elem);
    mm_backend_opts o = {.max_seqs = maxb, .max_len = max_len, .threads = 0,
                         .gpu_memory_utilization = (float)util, .tensor_parallel = B.tp,
                         .block_size = block_size, .num_blocks = (int)blocks};
    t0 = mm_gpu_now();
    if (mm_gpu_backend_open(B.kind, B.m, &o, &B.b, err, sizeof err) < 0)
        goto out;
    double tb = mm_gpu_now() - t0;
    json_common(&B, "setup");
    printf(",\"load_s\":%.3f,\"backend_s\":%.3f,\"weight_bytes\":%llu,\"weight_bytes_per_step\":"
           "%.0f,\"kv_bytes_per_pos\":%.0f,\"kv_elem\":%d,\"max_seqs\":%d,\"max_len\":%d,"
           "\"block_size\":%d,\"num_blocks\":%d,\"layers\":%d,\"hidden\":%d,\"vocab\":%d,"
           "\"tied\":%s}\n",
           tl, tb, (unsigned long long)B.m->weight_bytes, B.weight_bytes, B.kv_per_pos,
           B.kv_elem, maxb, max_len, B.b->block_size, B.b->num_blocks,
           B.m->cfg.num_hidden_layers, B.m->cfg.hidden_size, V,
           B.m->lm_head.data == B.m->embed.data ? "true" : "false");
    fflush(stdout);

    B.toks = malloc(sizeof *B.toks * (size_t)maxb * (size_t)maxtok);
    B.next = malloc(sizeof *B.next * (size_t)maxb);
    B.seqs = calloc((size_t)maxb, sizeof *B.seqs);
    B.logits = malloc(sizeof *B.logits * (size_t)V);
    if (!B.toks || !B.next || !B.seqs || !B.logits) {
        mm_errf(err, sizeof err, "out of memory");
        goto out;
    }
    for (int s = 0; s < maxb; s++)
        fill(B.toks + (size_t)s * maxtok, maxtok, V, (unsigned)s);
    /* The prompts of a batch are laid out prompt tokens apart. */
    for (int s = 0; s < maxb; s++)
        memmove(B.toks + (size_t)s * B.prompt, B.toks + (size_t)s * maxtok,
                sizeof *B.toks * (size_t)B.prompt);

    /* Warm-up: one short sequence end to end (first kernels, graphs). */
    if (prefill_all(&B, 1, B.prompt, err, sizeof err) < 0 ||
        decode_steps(&B, 1, B.prompt, 16, err, sizeof err) < 0)
        goto out;
    free_slots(&B, 1);
    /* A failed verification is reported at the end: the speeds are still
     * worth the device time already spent. */
    char verr[1024] = "";
    int vrc = verify ? bench_verify(&B, verify, verr, sizeof verr) : 0;
    if (vrc < 0 && vrc != -EDOM) {
        snprintf(err, sizeof err, "%s", verr);
        goto out;
    }

    if (has(only, "single") &&
        bench_decode(&B, "decode_single", 1, B.single_steps, err, sizeof err) < 0)
        goto out;
    if (has(only, "batch"))
        for (int i = 0; i < B.nbatches; i++)
            if (bench_decode(&B, "decode_batch", B.batches[i], B.steps, err, sizeof err) < 0)
                goto out;
    /* The long prompt uses the first sequence's tokens, re-filled. */
    fill(B.toks, maxtok, V, 999);
    if (has(only, "prefill") &&
        bench_prefill(&B, "prefill", B.prefill, B.chunk, B.reps, err, sizeof err) < 0)
        goto out;
    if (has(only, "ttft") &&
        bench_prefill(&B, "ttft", B.ttft_prompt, B.ttft_prompt, B.reps > 5 ? B.reps : 5, err,
                      sizeof err) < 0)
        goto out;

    printf("\n%s on %s: %.0f MB of weights read per decode step, %.0f KB of KV cache per "
           "position (%d-byte elements)\n",
           B.name, B.kind, B.weight_bytes / 1e6, B.kv_per_pos / 1e3, B.kv_elem);
    printf("%-22s %6s %10s %9s %12s %9s\n", "measurement", "batch", "tok/s", "ms/step",
           "bytes/token", "GB/s");
    for (int i = 0; i < B.nrows; i++)
        printf("%s\n", B.table[i]);
    rc = 0;
    if (vrc < 0) {
        snprintf(err, sizeof err, "%s", verr);
        rc = 1;
    }
out:
    if (rc)
        fprintf(stderr, "gpu_bench: %s\n", err);
    if (B.b)
        B.b->ops->free(B.b);
    mm_model_free(B.m);
    free(B.toks);
    free(B.next);
    free(B.seqs);
    free(B.logits);
    return rc;
}
