/* test_backend_cpu.c: the CPU forward pass against a plain reference
 * written here (straight loops, double accumulation, the formulas as
 * transformers documents them), against itself (decode vs prefill, batched
 * vs alone, truncated vs fresh, argmax rows vs the sampler's pick, the KV
 * block accounting), and against transformers' goldens in
 * tests/fixtures/models/<arch>/golden.json once those are committed. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "makemodel.h"
#include "model.h"
#include "sampler.h"
#include "test.h"

static char root[64];

static void test_opts(mm_makemodel_opts *o, const char *arch)
{
    mm_makemodel_defaults(o);
    snprintf(o->arch, sizeof o->arch, "%s", arch);
    o->std = 0.15;    /* logits of order 1, so errors show */
    o->seed = 7;
    o->max_pos = 1024;
}

/* Generate a model under root/name and load it. */
static mm_model *gen_model(const char *name, const mm_makemodel_opts *o)
{
    char dir[256], err[512];
    snprintf(dir, sizeof dir, "%s/%s", root, name);
    if (mm_makemodel(dir, o, err, sizeof err) < 0) {
        printf("  makemodel: %s\n", err);
        return NULL;
    }
    mm_model *m = NULL;
    mm_model_load_opts lo = {.quiet = 1};
    if (mm_model_load(dir, &lo, &m, err, sizeof err) < 0) {
        printf("  load: %s\n", err);
        return NULL;
    }
    return m;
}

static mm_backend *new_backend(const mm_model *m, int max_seqs, int max_len, int threads)
{
    char err[512];
    mm_backend *b = NULL;
    mm_backend_opts bo = {.max_seqs = max_seqs, .max_len = max_len, .threads = threads};
    if (mm_backend_cpu_new(m, &bo, &b, err, sizeof err) < 0)
        printf("  backend: %s\n", err);
    return b;
}

/* forward() after reserving what each sequence is about to write, as the
 * scheduler does (the backend refuses unreserved positions). A reserve
 * that fails leaves forward to report the bad input. */
static int fwd(mm_backend *b, mm_batch_seq *s, int n, float *lg, char *err, size_t errlen)
{
    for (int i = 0; i < n; i++)
        b->ops->reserve(b, s[i].slot, s[i].pos + s[i].n_tokens);
    return b->ops->forward(b, s, n, lg, err, errlen);
}

/* ---- the reference ---- */

static double half_to_double(uint16_t h)
{
    int e = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v = e ? ldexp(1.0 + man / 1024.0, e - 15) : ldexp(man / 1024.0, -14);
    return (h & 0x8000) ? -v : v;
}

static double wv(const mm_weight *w, int64_t i)
{
    if (w->dtype == MM_DT_F32)
        return ((const float *)w->data)[i];
    uint16_t h = ((const uint16_t *)w->data)[i];
    if (w->dtype == MM_DT_F16)
        return half_to_double(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void ref_linear(const mm_weight *w, const mm_weight *bias, const double *x, double *y)
{
    for (int64_t r = 0; r < w->rows; r++) {
        double s = bias && bias->data ? wv(bias, r) : 0;
        for (int64_t c = 0; c < w->cols; c++)
            s += wv(w, r * w->cols + c) * x[c];
        y[r] = s;
    }
}

static void ref_rmsnorm(const double *x, const mm_weight *w, int n, double eps, double *y)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * r * wv(w, i);
}

/* inv_freq as transformers defines it, written out independently. */
static void ref_inv_freq(const mm_model_config *c, double *f)
{
    for (int i = 0; i < c->head_dim / 2; i++) {
        double x = 1.0 / pow(c->rope.theta, 2.0 * i / c->head_dim);
        if (c->rope.type == MM_ROPE_LINEAR)
            x /= c->rope.factor;
        if (c->rope.type == MM_ROPE_LLAMA3) {
            double old = c->rope.original_max_position_embeddings, wl = 2 * M_PI / x;
            double lo = c->rope.low_freq_factor, hi = c->rope.high_freq_factor;
            if (wl > old / lo)
                x /= c->rope.factor;
            else if (wl >= old / hi) {
                double s = (old / wl - lo) / (hi - lo);
                x = (1 - s) * x / c->rope.factor + s * x;
            }
        }
        f[i] = (float)x;
    }
}

static void ref_rope(double *v, int hd, int pos, const double *inv)
{
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        /* transformers forms the angle as a float32 product */
        float ang = (float)pos * (float)inv[i];
        double c = cos(ang), s = sin(ang);
        double a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/* logits[n][V] for a prompt run from position 0. */
static double *ref_forward(const mm_model *m, const int32_t *tok, int n)
{
    const mm_model_config *c = &m->cfg;
    int H = c->hidden_size, IS = c->intermediate_size, hd = c->head_dim;
    int nh = c->num_attention_heads, kvh = c->num_key_value_heads, V = c->vocab_size;
    int qd = nh * hd, kvd = kvh * hd, group = nh / kvh;
    double *x = calloc((size_t)n * H, sizeof *x);
    double *q = calloc((size_t)n * qd, sizeof *q), *k = calloc((size_t)n * kvd, sizeof *k);
    double *v = calloc((size_t)n * kvd, sizeof *v), *att = calloc(qd, sizeof *att);
    double *o = calloc(H, sizeof *o), *g = calloc(IS, sizeof *g), *u = calloc(IS, sizeof *u);
    double *sc = calloc(n, sizeof *sc), *inv = calloc(hd / 2, sizeof *inv);
    double *xn2 = calloc(H > IS ? H : IS, sizeof *xn2);
    double *logits = calloc((size_t)n * V, sizeof *logits);
    ref_inv_freq(c, inv);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < H; i++)
            x[(size_t)t * H + i] = wv(&m->embed, (int64_t)tok[t] * H + i);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const mm_layer *L = &m->layers[l];
        for (int t = 0; t < n; t++) {
            ref_rmsnorm(x + (size_t)t * H, &L->attn_norm, H, c->rms_norm_eps, xn2);
            ref_linear(&L->q, &L->q_bias, xn2, q + (size_t)t * qd);
            ref_linear(&L->k, &L->k_bias, xn2, k + (size_t)t * kvd);
            ref_linear(&L->v, &L->v_bias, xn2, v + (size_t)t * kvd);
            for (int h = 0; h < nh; h++)
                ref_rope(q + (size_t)t * qd + h * hd, hd, t, inv);
            for (int h = 0; h < kvh; h++)
                ref_rope(k + (size_t)t * kvd + h * hd, hd, t, inv);
        }
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < nh; h++) {
                const double *qh = q + (size_t)t * qd + h * hd;
                int kh = h / group, lo = 0;
                if (c->sliding_window > 0 && t - c->sliding_window + 1 > 0)
                    lo = t - c->sliding_window + 1;
                double mx = -INFINITY, sum = 0;
                for (int j = lo; j <= t; j++) {
                    double s = 0;
                    for (int d = 0; d < hd; d++)
                        s += qh[d] * k[(size_t)j * kvd + kh * hd + d];
                    sc[j] = s / sqrt((double)hd);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (int j = lo; j <= t; j++)
                    sum += (sc[j] = exp(sc[j] - mx));
                for (int d = 0; d < hd; d++) {
                    double a = 0;
                    for (int j = lo; j <= t; j++)
                        a += sc[j] / sum * v[(size_t)j * kvd + kh * hd + d];
                    att[h * hd + d] = a;
                }
            }
            ref_linear(&L->o, &L->o_bias, att, o);
            double *xt = x + (size_t)t * H;
            for (int i = 0; i < H; i++)
                xt[i] += o[i];
        }
        for (int t = 0; t < n; t++) {
            double *xt = x + (size_t)t * H;
            ref_rmsnorm(xt, &L->mlp_norm, H, c->rms_norm_eps, xn2);
            ref_linear(&L->gate, NULL, xn2, g);
            ref_linear(&L->up, NULL, xn2, u);
            for (int i = 0; i < IS; i++)
                g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_linear(&L->down, NULL, g, o);
            for (int i = 0; i < H; i++)
                xt[i] += o[i];
        }
    }
    for (int t = 0; t < n; t++) {
        ref_rmsnorm(x + (size_t)t * H, &m->norm, H, c->rms_norm_eps, xn2);
        ref_linear(&m->lm_head, NULL, xn2, logits + (size_t)t * V);
    }
    free(x), free(q), free(k), free(v), free(att), free(o), free(g), free(u);
    free(sc), free(inv), free(xn2);
    return logits;
}

static void prompt_ids(int32_t *t, int n, int vocab, int salt)
{
    for (int i = 0; i < n; i++)
        t[i] = (int32_t)(((i + 3) * 7919 + salt * 104729) % vocab);
}

static double max_diff_fd(const float *a, const double *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m))
            m = d;   /* NaN propagates as a failure */
    }
    return m;
}

static double max_diff_ff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m))
            m = d;
    }
    return m;
}

static double max_abs(const double *a, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* Prefill n tokens in one step with every row's logits, against the
 * reference. Returns the max abs difference (or 1e9 on error). */
static double prefill_vs_ref(const mm_model *m, int n, int threads, double *scale)
{
    int V = m->cfg.vocab_size;
    int32_t *tok = malloc(sizeof *tok * n);
    float *lg = malloc(sizeof *lg * (size_t)n * V);
    prompt_ids(tok, n, V, 1);
    double *ref = ref_forward(m, tok, n), d = 1e9;
    mm_backend *b = new_backend(m, 2, n + 8, threads);
    char err[256];
    mm_batch_seq s = {0, tok, n, 0, MM_LOGITS_ALL, 0};
    if (b && fwd(b, &s, 1, lg, err, sizeof err) == 0)
        d = max_diff_fd(lg, ref, (size_t)n * V);
    else if (b)
        printf("  forward: %s\n", err);
    if (scale)
        *scale = max_abs(ref, (size_t)n * V);
    if (b)
        b->ops->free(b);
    free(tok), free(lg), free(ref);
    return d;
}

TEST(qwen2_tied_bias_matches_reference)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2", &o);
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->cfg.tie_word_embeddings && m->cfg.qkv_bias);
    double scale = 0, d = prefill_vs_ref(m, 20, 2, &scale);
    printf("  qwen2: max |logit| %.3f, max diff %.2g\n", scale, d);
    ASSERT_LT(0.5, scale);   /* the comparison means something */
    ASSERT_LT(d, 1e-4);
    /* GEMV path: fewer tokens than the sgemm threshold */
    ASSERT_LT(prefill_vs_ref(m, 3, 2, NULL), 1e-4);
    mm_model_free(m);
}

TEST(llama3_rope_untied_matches_reference)
{
    mm_makemodel_opts o;
    test_opts(&o, "llama");
    o.llama3_rope = 1;
    o.max_pos = 256;   /* original context 64: scaling touches several bands */
    o.hidden = 96, o.heads = 6, o.kv_heads = 2, o.head_dim = 0;
    mm_model *m = gen_model("llama3", &o);
    ASSERT_TRUE(m);
    ASSERT_EQ(m->cfg.rope.type, MM_ROPE_LLAMA3);
    ASSERT_TRUE(!m->cfg.tie_word_embeddings && m->lm_head.data != m->embed.data);
    double scale = 0, d = prefill_vs_ref(m, 40, 2, &scale);
    printf("  llama3: max |logit| %.3f, max diff %.2g\n", scale, d);
    ASSERT_LT(0.5, scale);
    ASSERT_LT(d, 1e-4);
    mm_model_free(m);
}

TEST(mistral_head_dim_matches_reference)
{
    mm_makemodel_opts o;
    test_opts(&o, "mistral");
    o.head_dim = 32;   /* hidden 64 / 4 heads would be 16 */
    mm_model *m = gen_model("mistral", &o);
    ASSERT_TRUE(m);
    ASSERT_EQ(m->cfg.head_dim, 32);
    ASSERT_EQ(m->layers[0].q.rows, 128);
    double d = prefill_vs_ref(m, 17, 3, NULL);
    printf("  mistral: max diff %.2g\n", d);
    ASSERT_LT(d, 1e-4);
    mm_model_free(m);
}

TEST(f16_and_f32_weights_match_reference)
{
    static const mm_dtype dts[] = {MM_DT_F16, MM_DT_F32};
    for (int i = 0; i < 2; i++) {
        mm_makemodel_opts o;
        test_opts(&o, "qwen2");
        o.dtype = dts[i];
        o.hidden = 40, o.heads = 5, o.kv_heads = 1;  /* widths not multiples of 8 */
        o.intermediate = 72;
        mm_model *m = gen_model(i ? "f32" : "f16", &o);
        ASSERT_TRUE(m);
        ASSERT_EQ(m->embed.dtype, dts[i]);
        ASSERT_LT(prefill_vs_ref(m, 12, 2, NULL), 1e-4);
        ASSERT_LT(prefill_vs_ref(m, 2, 2, NULL), 1e-4);
        mm_model_free(m);
    }
}

/* Each kernel family (capped with MM_CPU_ISA) on each weight dtype, with
 * widths that leave tails after the vector loops (K = 40, 72). */
TEST(every_isa_and_dtype_matches_reference)
{
    static const char *const isas[] = {"avx512", "avx2", "scalar"};
    static const mm_dtype dts[] = {MM_DT_BF16, MM_DT_F16, MM_DT_F32};
    for (int d = 0; d < 3; d++) {
        mm_makemodel_opts o;
        test_opts(&o, "llama");
        o.dtype = dts[d];
        o.hidden = 40, o.heads = 5, o.kv_heads = 5, o.intermediate = 72, o.vocab = 300;
        char name[32];
        snprintf(name, sizeof name, "isa%d", d);
        mm_model *m = gen_model(name, &o);
        ASSERT_TRUE(m);
        for (int i = 0; i < 3; i++) {
            setenv("MM_CPU_ISA", isas[i], 1);
            double d1 = prefill_vs_ref(m, 1, 2, NULL), d4 = prefill_vs_ref(m, 4, 1, NULL);
            double d12 = prefill_vs_ref(m, 12, 2, NULL);
            if (!(d1 < 1e-4 && d4 < 1e-4 && d12 < 1e-4))
                printf("  %s, dtype %d: diff %.2g / %.2g / %.2g\n", isas[i], (int)dts[d], d1, d4,
                       d12);
            ASSERT_LT(d1, 1e-4);
            ASSERT_LT(d4, 1e-4);
            ASSERT_LT(d12, 1e-4);
        }
        unsetenv("MM_CPU_ISA");
        mm_model_free(m);
    }
}

TEST(sliding_window_matches_reference)
{
    mm_makemodel_opts o;
    test_opts(&o, "mistral");
    mm_model *m = gen_model("mistral_sw", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size, n = 30;
    int32_t tok[30];
    prompt_ids(tok, n, V, 2);
    double *full = ref_forward(m, tok, n);
    m->cfg.sliding_window = 8;
    double *ref = ref_forward(m, tok, n);
    /* the window changes the answer past position 8 ... */
    double change = 0;
    for (int i = 0; i < V; i++)
        change = fmax(change, fabs(full[(size_t)25 * V + i] - ref[(size_t)25 * V + i]));
    ASSERT_LT(1e-2, change);
    /* ... and the backend follows it, in prefill and in decode */
    float *lg = malloc(sizeof *lg * (size_t)n * V);
    mm_backend *b = new_backend(m, 1, 64, 2);
    ASSERT_TRUE(b);
    char err[256];
    mm_batch_seq s = {0, tok, n, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
    ASSERT_LT(max_diff_fd(lg, ref, (size_t)n * V), 1e-4);
    b->ops->truncate(b, 0, 0);
    for (int t = 0; t < n; t++) {
        s = (mm_batch_seq){0, tok + t, 1, t, MM_LOGITS_LAST, 0};
        ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
        ASSERT_LT(max_diff_fd(lg, ref + (size_t)t * V, V), 1e-4);
    }
    b->ops->free(b);
    free(lg), free(ref), free(full);
    mm_model_free(m);
}

TEST(decode_one_token_at_a_time_equals_prefill)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2_dec", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size, n = 24;
    int32_t tok[24];
    prompt_ids(tok, n, V, 3);
    float *all = malloc(sizeof *all * (size_t)n * V), *one = malloc(sizeof *one * V);
    mm_backend *b = new_backend(m, 2, 64, 2);
    ASSERT_TRUE(b);
    char err[256];
    mm_batch_seq s = {1, tok, n, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b, &s, 1, all, err, sizeof err), 0);
    double worst = 0;
    for (int t = 0; t < n; t++) {
        s = (mm_batch_seq){0, tok + t, 1, t, MM_LOGITS_LAST, 0};
        ASSERT_EQ(fwd(b, &s, 1, one, err, sizeof err), 0);
        double d = max_diff_ff(one, all + (size_t)t * V, V);
        worst = d > worst ? d : worst;
    }
    printf("  decode vs prefill: max diff %.2g\n", worst);
    ASSERT_LT(worst, 1e-4);
    /* a mixed step: prefill a chunk of 5 on top of the 24 cached */
    int32_t more[5];
    prompt_ids(more, 5, V, 4);
    s = (mm_batch_seq){0, more, 5, n, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, one, err, sizeof err), 0);
    int32_t cat[29];
    memcpy(cat, tok, sizeof tok);
    memcpy(cat + 24, more, sizeof more);
    double *ref = ref_forward(m, cat, 29);
    ASSERT_LT(max_diff_fd(one, ref + (size_t)28 * V, V), 1e-4);
    b->ops->free(b);
    free(all), free(one), free(ref);
    mm_model_free(m);
}

TEST(batched_sequences_equal_separate_runs)
{
    mm_makemodel_opts o;
    test_opts(&o, "llama");
    mm_model *m = gen_model("llama_batch", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size;
    int32_t a[9], bb[14], c[6];
    prompt_ids(a, 9, V, 5);
    prompt_ids(bb, 14, V, 6);
    prompt_ids(c, 6, V, 7);
    char err[256];
    /* alone: each in a fresh backend; c first gets 5 tokens of history */
    float *sep = malloc(sizeof *sep * (size_t)V * 12);
    mm_backend *b = new_backend(m, 4, 64, 2);
    ASSERT_TRUE(b);
    mm_batch_seq s = {0, a, 9, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b, &s, 1, sep, err, sizeof err), 0);
    s = (mm_batch_seq){1, bb, 14, 0, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, sep + (size_t)9 * V, err, sizeof err), 0);
    s = (mm_batch_seq){2, c, 5, 0, MM_LOGITS_NONE, 0};
    ASSERT_EQ(fwd(b, &s, 1, NULL, err, sizeof err), 0);
    s = (mm_batch_seq){2, c + 5, 1, 5, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, sep + (size_t)10 * V, err, sizeof err), 0);
    b->ops->free(b);
    /* together: one step with a decode between two prefills */
    b = new_backend(m, 4, 64, 3);
    ASSERT_TRUE(b);
    s = (mm_batch_seq){3, c, 5, 0, MM_LOGITS_NONE, 0};
    ASSERT_EQ(fwd(b, &s, 1, NULL, err, sizeof err), 0);
    float *tog = malloc(sizeof *tog * (size_t)V * 12);
    mm_batch_seq batch[3] = {{1, a, 9, 0, MM_LOGITS_ALL, 0},
                             {3, c + 5, 1, 5, MM_LOGITS_LAST, 0},
                             {0, bb, 14, 0, MM_LOGITS_LAST, 0}};
    ASSERT_EQ(fwd(b, batch, 3, tog, err, sizeof err), 0);
    /* rows in batch order: a's 9, then c's 1, then b's 1 */
    ASSERT_LT(max_diff_ff(tog, sep, (size_t)9 * V), 1e-5);
    ASSERT_LT(max_diff_ff(tog + (size_t)9 * V, sep + (size_t)10 * V, V), 1e-5);
    ASSERT_LT(max_diff_ff(tog + (size_t)10 * V, sep + (size_t)9 * V, V), 1e-5);
    b->ops->free(b);
    free(sep), free(tog);
    mm_model_free(m);
}

TEST(long_prompt_spans_substeps)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    o.layers = 1;
    mm_model *m = gen_model("qwen2_long", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size, n = 300;   /* more than one internal sub-step */
    int32_t *tok = malloc(sizeof *tok * n);
    prompt_ids(tok, n, V, 8);
    double *ref = ref_forward(m, tok, n);
    float *lg = malloc(sizeof *lg * (size_t)n * V);
    mm_backend *b = new_backend(m, 1, 512, 2);
    ASSERT_TRUE(b);
    char err[256];
    mm_batch_seq s = {0, tok, n, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
    double d = max_diff_fd(lg, ref, (size_t)n * V);
    printf("  300-token prefill: max diff %.2g\n", d);
    ASSERT_LT(d, 2e-4);
    b->ops->free(b);
    free(tok), free(ref), free(lg);
    mm_model_free(m);
}

TEST(truncate_then_refill_equals_fresh)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2_trunc", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size;
    int32_t a[10], bb[6], cat[10];
    prompt_ids(a, 10, V, 9);
    prompt_ids(bb, 6, V, 10);
    memcpy(cat, a, 4 * sizeof *a);
    memcpy(cat + 4, bb, sizeof bb);
    float *lg = malloc(sizeof *lg * (size_t)V);
    mm_backend *b = new_backend(m, 1, 32, 2);
    ASSERT_TRUE(b);
    char err[256];
    mm_batch_seq s = {0, a, 10, 0, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
    b->ops->truncate(b, 0, 4);
    /* position 10 is no longer reachable: the slot holds 4 */
    s = (mm_batch_seq){0, bb, 1, 10, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), -EINVAL);
    s = (mm_batch_seq){0, bb, 6, 4, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
    double *ref = ref_forward(m, cat, 10);
    ASSERT_LT(max_diff_fd(lg, ref + (size_t)9 * V, V), 1e-4);
    b->ops->free(b);
    free(lg), free(ref);
    mm_model_free(m);
}

TEST(forward_rejects_bad_input)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2_bad", &o);
    ASSERT_TRUE(m);
    mm_backend *b = new_backend(m, 2, 16, 1);
    ASSERT_TRUE(b);
    char err[256];
    float *lg = malloc(sizeof *lg * (size_t)m->cfg.vocab_size * 2);
    int32_t ok[2] = {1, 2}, bad[1] = {m->cfg.vocab_size};
    mm_batch_seq s = {2, ok, 1, 0, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "slot 2");
    s = (mm_batch_seq){0, bad, 1, 0, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "token 512");
    s = (mm_batch_seq){0, ok, 1, 3, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), -EINVAL);
    s = (mm_batch_seq){0, ok, 2, 15, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), -EINVAL);
    mm_batch_seq two[2] = {{1, ok, 1, 0, MM_LOGITS_LAST, 0}, {1, ok + 1, 1, 0, MM_LOGITS_LAST, 0}};
    ASSERT_EQ(fwd(b, two, 2, lg, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "share slot 1");
    b->ops->free(b);
    free(lg);
    mm_model_free(m);
}

TEST(rope_inv_freq_default_linear_llama3)
{
    mm_model_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = 8;
    c.rope.theta = 10000;
    float f[4];
    mm_model_rope_inv_freq(&c, f);
    ASSERT_LT(fabs(f[0] - 1.0), 1e-7);
    ASSERT_LT(fabs(f[1] - 0.1), 1e-7);
    ASSERT_LT(fabs(f[2] - 0.01), 1e-8);
    ASSERT_LT(fabs(f[3] - 0.001), 1e-9);
    c.rope.type = MM_ROPE_LINEAR;
    c.rope.factor = 4;
    mm_model_rope_inv_freq(&c, f);
    ASSERT_LT(fabs(f[1] - 0.025), 1e-8);
    /* llama3, factor 8, low 1, high 4, original context 2048: wavelengths
     * 2pi, 62.8 stay (< 512), 628.3 lies in [512, 2048] and is blended with
     * s = (2048/628.3 - 1)/3 = 0.75316: (1-s)*0.01/8 + s*0.01 = 0.0078402;
     * 6283 > 2048 is divided by 8: 0.000125. */
    c.rope.type = MM_ROPE_LLAMA3;
    c.rope.factor = 8;
    c.rope.low_freq_factor = 1;
    c.rope.high_freq_factor = 4;
    c.rope.original_max_position_embeddings = 2048;
    mm_model_rope_inv_freq(&c, f);
    ASSERT_LT(fabs(f[0] - 1.0), 1e-7);
    ASSERT_LT(fabs(f[1] - 0.1), 1e-7);
    ASSERT_LT(fabs(f[2] - 0.0078401886), 1e-8);
    ASSERT_LT(fabs(f[3] - 0.000125), 1e-10);
}

TEST(thread_counts_agree)
{
    mm_makemodel_opts o;
    test_opts(&o, "mistral");
    o.vocab = 1000;
    mm_model *m = gen_model("mistral_thr", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size, n = 33;
    int32_t tok[33];
    prompt_ids(tok, n, V, 11);
    float *l1 = malloc(sizeof *l1 * (size_t)n * V), *l4 = malloc(sizeof *l4 * (size_t)n * V);
    char err[256];
    mm_backend *b1 = new_backend(m, 1, 64, 1), *b4 = new_backend(m, 1, 64, 4);
    ASSERT_TRUE(b1 && b4);
    mm_batch_seq s = {0, tok, n, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b1, &s, 1, l1, err, sizeof err), 0);
    ASSERT_EQ(fwd(b4, &s, 1, l4, err, sizeof err), 0);
    ASSERT_LT(max_diff_ff(l1, l4, (size_t)n * V), 1e-5);
    b1->ops->free(b1);
    b4->ops->free(b4);
    free(l1), free(l4);
    mm_model_free(m);
}

/* ---- the KV block pool and the argmax rows ---- */

TEST(reserve_accounts_blocks)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2_pool", &o);
    ASSERT_TRUE(m);
    char err[256];
    mm_backend *b = NULL;
    /* the default pool: every slot at max_len, in blocks of 16 */
    mm_backend_opts bo = {.max_seqs = 2, .max_len = 40, .threads = 1};
    ASSERT_EQ(mm_backend_cpu_new(m, &bo, &b, err, sizeof err), 0);
    ASSERT_EQ(b->block_size, 16);
    ASSERT_EQ(b->num_blocks, 2 * 3);
    ASSERT_EQ(b->blocks_used, 0);
    b->ops->free(b);
    bo.block_size = 300;
    ASSERT_EQ(mm_backend_cpu_new(m, &bo, &b, err, sizeof err), -EINVAL);
    bo = (mm_backend_opts){.max_seqs = 2, .max_len = 64, .threads = 1, .block_size = 8,
                           .num_blocks = 10};
    ASSERT_EQ(mm_backend_cpu_new(m, &bo, &b, err, sizeof err), 0);
    ASSERT_EQ(b->block_size, 8);
    ASSERT_EQ(b->num_blocks, 10);
    ASSERT_EQ(b->ops->reserve(b, 0, 17), 0);
    ASSERT_EQ(b->blocks_used, 3);
    ASSERT_EQ(b->ops->reserve(b, 0, 10), 0);      /* already held */
    ASSERT_EQ(b->blocks_used, 3);
    ASSERT_EQ(b->ops->reserve(b, 1, 57), -ENOSPC); /* 8 blocks, 7 free */
    ASSERT_EQ(b->blocks_used, 3);
    ASSERT_EQ(b->ops->reserve(b, 1, 56), 0);
    ASSERT_EQ(b->blocks_used, 10);
    ASSERT_EQ(b->ops->reserve(b, 0, 25), -ENOSPC);
    ASSERT_EQ(b->ops->reserve(b, 0, 65), -EINVAL); /* beyond max_len */
    ASSERT_EQ(b->ops->reserve(b, 2, 1), -EINVAL);  /* no such slot */
    /* forward writes only what was reserved */
    int32_t tok[25];
    prompt_ids(tok, 25, m->cfg.vocab_size, 12);
    float *lg = malloc(sizeof *lg * (size_t)m->cfg.vocab_size);
    mm_batch_seq s = {0, tok, 25, 0, MM_LOGITS_LAST, 0};   /* 3 blocks hold 24 */
    ASSERT_EQ(b->ops->forward(b, &s, 1, lg, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "reserve");
    s.n_tokens = 17;
    ASSERT_EQ(b->ops->forward(b, &s, 1, lg, err, sizeof err), 0);
    /* truncate gives back the blocks wholly past pos, all of them at 0 */
    b->ops->truncate(b, 0, 9);
    ASSERT_EQ(b->blocks_used, 9);
    s = (mm_batch_seq){0, tok + 9, 8, 9, MM_LOGITS_LAST, 0};   /* needs 17 again */
    ASSERT_EQ(b->ops->forward(b, &s, 1, lg, err, sizeof err), -EINVAL);
    b->ops->truncate(b, 1, 0);
    ASSERT_EQ(b->blocks_used, 2);
    ASSERT_EQ(b->ops->reserve(b, 0, 17), 0);
    ASSERT_EQ(b->ops->forward(b, &s, 1, lg, err, sizeof err), 0);
    b->ops->truncate(b, 0, 0);
    ASSERT_EQ(b->blocks_used, 0);
    b->ops->free(b);
    free(lg);
    mm_model_free(m);
}

/* The sampler's greedy pick from a row (what the argmax rows must match). */
static int32_t sampler_greedy(const float *row, int V, int n_valid)
{
    mm_sampler_ws ws;
    if (mm_sampler_ws_init(&ws, V) < 0)
        return -2;
    mm_sampling sp;
    mm_sampling_defaults(&sp);
    sp.temperature = 0;
    mm_xrng rng;
    mm_xrng_seed(&rng, 1);
    int32_t t = mm_sample(row, V, n_valid, &sp, NULL, &rng, &ws);
    mm_sampler_ws_free(&ws);
    return t;
}

TEST(argmax_rows_match_the_sampler)
{
    mm_makemodel_opts o;
    test_opts(&o, "qwen2");
    mm_model *m = gen_model("qwen2_argmax", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size;
    int32_t a[11], c[7];
    prompt_ids(a, 11, V, 13);
    prompt_ids(c, 7, V, 14);
    float *sep = malloc(sizeof *sep * (size_t)V * 8), *tog = malloc(sizeof *tog * (size_t)V * 8);
    char err[256];
    mm_backend *b = new_backend(m, 4, 64, 2);
    ASSERT_TRUE(b);
    /* rows without any argmax: a's last, c's all */
    mm_batch_seq s[3] = {{0, a, 11, 0, MM_LOGITS_LAST, 0}, {1, c, 7, 0, MM_LOGITS_ALL, 0}};
    ASSERT_EQ(fwd(b, s, 2, sep, err, sizeof err), 0);
    b->ops->truncate(b, 0, 0);
    b->ops->truncate(b, 1, 0);
    /* the same with a's twin asking for the argmax in between: it takes no
     * row, the others' rows are unchanged */
    s[0] = (mm_batch_seq){0, a, 11, 0, MM_LOGITS_LAST, 0};
    s[1] = (mm_batch_seq){2, a, 11, 0, MM_LOGITS_ARGMAX, -7};
    s[2] = (mm_batch_seq){1, c, 7, 0, MM_LOGITS_ALL, 0};
    ASSERT_EQ(fwd(b, s, 3, tog, err, sizeof err), 0);
    ASSERT_LT(max_diff_ff(tog, sep, (size_t)8 * V), 1e-5);
    int32_t want = sampler_greedy(tog, V, V);
    ASSERT_TRUE(want >= 0);
    ASSERT_EQ(s[1].argmax, want);
    /* a decode step of the twin with the valid ids cut below its pick */
    int n_valid = want > 1 ? want : 2;
    b->n_valid = n_valid;
    s[0] = (mm_batch_seq){0, &want, 1, 11, MM_LOGITS_LAST, 0};
    s[1] = (mm_batch_seq){2, &want, 1, 11, MM_LOGITS_ARGMAX, -7};
    ASSERT_EQ(fwd(b, s, 2, tog, err, sizeof err), 0);
    ASSERT_EQ(s[1].argmax, sampler_greedy(tog, V, n_valid));
    ASSERT_TRUE(s[1].argmax < n_valid);
    /* argmax for no tokens is refused like logits for none */
    s[0] = (mm_batch_seq){3, a, 0, 0, MM_LOGITS_ARGMAX, 0};
    ASSERT_EQ(fwd(b, s, 1, tog, err, sizeof err), -EINVAL);
    b->ops->free(b);
    free(sep), free(tog);
    mm_model_free(m);
}

TEST(argmax_ties_go_to_the_lowest_id)
{
    mm_makemodel_opts o;
    test_opts(&o, "llama");   /* untied: lm_head is its own matrix */
    mm_model *m = gen_model("llama_ties", &o);
    ASSERT_TRUE(m);
    int V = m->cfg.vocab_size;
    int32_t a[9];
    prompt_ids(a, 9, V, 15);
    float *lg = malloc(sizeof *lg * (size_t)V);
    char err[256];
    mm_backend *b = new_backend(m, 2, 32, 2);
    ASSERT_TRUE(b);
    mm_batch_seq s = {0, a, 9, 0, MM_LOGITS_LAST, 0};
    ASSERT_EQ(fwd(b, &s, 1, lg, err, sizeof err), 0);
    int32_t best = sampler_greedy(lg, V, V);
    b->ops->free(b);
    ASSERT_TRUE(best > 3);
    /* Copy the winner's lm_head row onto id 3: both logits are now equal
     * (the backend copies the weights when it starts). */
    const mm_weight saved = m->lm_head;
    size_t es = saved.dtype == MM_DT_F32 ? 4 : 2, rowb = (size_t)saved.cols * es;
    char *w = malloc((size_t)saved.rows * rowb);
    ASSERT_TRUE(w);
    memcpy(w, saved.data, (size_t)saved.rows * rowb);
    memcpy(w + 3 * rowb, w + (size_t)best * rowb, rowb);
    m->lm_head.data = w;
    b = new_backend(m, 2, 32, 2);
    m->lm_head = saved;
    ASSERT_TRUE(b);
    mm_batch_seq two[2] = {{0, a, 9, 0, MM_LOGITS_LAST, 0}, {1, a, 9, 0, MM_LOGITS_ARGMAX, 0}};
    ASSERT_EQ(fwd(b, two, 2, lg, err, sizeof err), 0);
    ASSERT_TRUE(lg[3] == lg[best]);
    ASSERT_EQ(sampler_greedy(lg, V, V), 3);
    ASSERT_EQ(two[1].argmax, 3);
    b->ops->free(b);
    free(w);
    free(lg);
    mm_model_free(m);
}

/* ---- goldens from transformers ---- */

static void log_softmax(const float *l, int V, double *out)
{
    double mx = -INFINITY, s = 0;
    for (int i = 0; i < V; i++)
        mx = l[i] > mx ? l[i] : mx;
    for (int i = 0; i < V; i++)
        s += exp(l[i] - mx);
    double lse = mx + log(s);
    for (int i = 0; i < V; i++)
        out[i] = l[i] - lse;
}

/* 1: compared and agreed, 0: no goldens, -1: disagreed (message printed). */
static int check_golden(const char *arch)
{
    char dir[256], path[300], err[512];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", arch);
    snprintf(path, sizeof path, "%s/golden.json", dir);
    if (access(path, F_OK) != 0) {
        printf("  SKIP: no goldens yet for %s (%s; made by tests/fixtures/models/"
               "make_fixtures.py)\n", arch, path);
        return 0;
    }
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    mm_model *m = NULL;
    mm_backend *b = NULL;
    int rc = -1;
    float *lg = NULL;
    double *lp = NULL;
    int32_t *seq = NULL;
    mm_model_load_opts lo = {.quiet = 1};
    if (!g) {
        printf("  %s: %s\n", path, je.text);
        goto out;
    }
    if (mm_model_load(dir, &lo, &m, err, sizeof err) < 0) {
        printf("  %s\n", err);
        goto out;
    }
    json_t *jp = json_object_get(g, "prompt"), *jl = json_object_get(g, "logprobs");
    json_t *jtop = json_object_get(g, "top5"), *jg = json_object_get(g, "greedy");
    json_t *jm = json_object_get(g, "greedy_margin");
    int n = (int)json_array_size(jp), ng = (int)json_array_size(jg), V = m->cfg.vocab_size;
    if (n < 2 || (int)json_array_size(jl) != n - 1 || (int)json_array_size(jtop) != n || !ng ||
        (int)json_array_size(jm) != ng) {
        printf("  %s: malformed (prompt/logprobs/top5/greedy/greedy_margin)\n", path);
        goto out;
    }
    seq = malloc(sizeof *seq * (size_t)(n + ng));
    lg = malloc(sizeof *lg * (size_t)n * V);
    lp = malloc(sizeof *lp * (size_t)V);
    for (int i = 0; i < n; i++)
        seq[i] = (int32_t)json_integer_value(json_array_get(jp, i));
    b = new_backend(m, 1, n + ng + 1, 2);
    mm_batch_seq s = {0, seq, n, 0, MM_LOGITS_ALL, 0};
    if (!b || fwd(b, &s, 1, lg, err, sizeof err) < 0) {
        printf("  forward failed\n");
        goto out;
    }
    double worst = 0;
    for (int i = 0; i < n; i++) {
        log_softmax(lg + (size_t)i * V, V, lp);
        if (i + 1 < n) {
            double d = fabs(lp[seq[i + 1]] - json_real_value(json_array_get(jl, i)));
            worst = d > worst ? d : worst;
        }
        json_t *top = json_array_get(jtop, i), *e;
        size_t k;
        json_array_foreach(top, k, e) {
            int id = (int)json_integer_value(json_array_get(e, 0));
            double d = fabs(lp[id] - json_real_value(json_array_get(e, 1)));
            worst = d > worst ? d : worst;
        }
    }
    printf("  %s: prompt logprobs max diff %.2g over %d positions\n", arch, worst, n);
    if (!(worst < 1e-3)) {
        printf("  %s: logprobs differ from transformers by %.3g (limit 1e-3)\n", arch, worst);
        goto out;
    }
    /* greedy: the argmax of the last row, fed back one token at a time */
    const float *last = lg + (size_t)(n - 1) * V;
    for (int gi = 0; gi < ng; gi++) {
        int best = 0;
        for (int v = 1; v < V; v++)
            best = last[v] > last[best] ? v : best;
        int want = (int)json_integer_value(json_array_get(jg, gi));
        if (best != want) {
            double margin = json_real_value(json_array_get(jm, gi));
            printf("  %s: greedy token %d: %d, transformers %d (its top-2 margin %.2g)\n", arch,
                   gi, best, want, margin);
            if (margin > 1e-3)
                goto out;
            break;   /* a near tie: the rest of the continuation may differ */
        }
        seq[n + gi] = best;
        s = (mm_batch_seq){0, &seq[n + gi], 1, n + gi, MM_LOGITS_LAST, 0};
        if (fwd(b, &s, 1, lg, err, sizeof err) < 0) {
            printf("  forward failed: %s\n", err);
            goto out;
        }
        last = lg;
    }
    rc = 1;
out:
    if (b)
        b->ops->free(b);
    mm_model_free(m);
    json_decref(g);
    free(lg), free(lp), free(seq);
    return rc;
}

TEST(golden_llama) { ASSERT_TRUE(check_golden("llama") >= 0); }
TEST(golden_qwen2) { ASSERT_TRUE(check_golden("qwen2") >= 0); }
TEST(golden_mistral) { ASSERT_TRUE(check_golden("mistral") >= 0); }

int main(void)
{
    snprintf(root, sizeof root, "/tmp/mm_test_backend_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(qwen2_tied_bias_matches_reference);
    RUN(llama3_rope_untied_matches_reference);
    RUN(mistral_head_dim_matches_reference);
    RUN(f16_and_f32_weights_match_reference);
    RUN(every_isa_and_dtype_matches_reference);
    RUN(sliding_window_matches_reference);
    RUN(decode_one_token_at_a_time_equals_prefill);
    RUN(batched_sequences_equal_separate_runs);
    RUN(long_prompt_spans_substeps);
    RUN(truncate_then_refill_equals_fresh);
    RUN(forward_rejects_bad_input);
    RUN(rope_inv_freq_default_linear_llama3);
    RUN(thread_counts_agree);
    RUN(reserve_accounts_blocks);
    RUN(argmax_rows_match_the_sampler);
    RUN(argmax_ties_go_to_the_lowest_id);
    RUN(golden_llama);
    RUN(golden_qwen2);
    RUN(golden_mistral);
    test_rm_tree(root);
    return test_summary();
}
