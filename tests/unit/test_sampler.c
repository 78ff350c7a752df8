/* test_sampler.c: the sampler (worker/sampler.c) on hand-made logits whose
 * right answers are computed here by hand, and the stop-string matcher
 * (worker/stopstr.c) on strings split across pieces. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"
#include "stopstr.h"
#include "test.h"

#define NEAR(a, b, tol) (fabs((double)(a) - (double)(b)) <= (tol))
#define ASSERT_NEAR(a, b, tol)                                                     \
    do {                                                                          \
        if (!NEAR(a, b, tol)) {                                                   \
            TEST_FAIL_("%s ~= %s: %.9g != %.9g", #a, #b, (double)(a), (double)(b)); \
            return;                                                               \
        }                                                                         \
    } while (0)

static mm_sampler_ws ws;

static mm_sampling samp(float temp)
{
    mm_sampling sp;
    mm_sampling_defaults(&sp);
    sp.temperature = temp;
    return sp;
}

/* Logits whose softmax is exactly probs (up to rounding). */
static void from_probs(const double *p, int n, float *x)
{
    for (int i = 0; i < n; i++)
        x[i] = (float)log(p[i]);
}

/* The probability mm_sampler_dist gave id, 0 if filtered out. */
static double dist_p(int n, int32_t id)
{
    for (int i = 0; i < n; i++)
        if (ws.ids[i] == id)
            return ws.p[i];
    return 0;
}

TEST(greedy_is_argmax)
{
    float x[6] = {0.1f, 2.0f, -1.0f, 1.9f, 2.0f, -5.0f};
    mm_sampling sp = samp(0);
    mm_xrng r;
    mm_xrng_seed(&r, 1);
    /* A tie goes to the lower id. */
    ASSERT_EQ(mm_sample(x, 6, 6, &sp, NULL, &r, &ws), 1);
    x[3] = 2.5f;
    ASSERT_EQ(mm_sample(x, 6, 6, &sp, NULL, &r, &ws), 3);
    sp.temperature = 5e-6f; /* below the epsilon: still greedy */
    ASSERT_EQ(mm_sample(x, 6, 6, &sp, NULL, &r, &ws), 3);
}

TEST(top_k_1_equals_greedy)
{
    mm_xrng r;
    mm_xrng_seed(&r, 42);
    float x[64];
    for (int trial = 0; trial < 50; trial++) {
        for (int i = 0; i < 64; i++)
            x[i] = (float)(mm_xrng_uniform(&r) * 4 - 2);
        mm_sampling g = samp(0), k1 = samp(1.5f);
        k1.top_k = 1;
        int32_t a = mm_sample(x, 64, 64, &g, NULL, &r, &ws);
        int32_t b = mm_sample(x, 64, 64, &k1, NULL, &r, &ws);
        ASSERT_EQ(a, b);
    }
}

TEST(same_seed_same_tokens)
{
    float x[50];
    for (int i = 0; i < 50; i++)
        x[i] = (float)sin(i * 0.7) * 0.5f;
    mm_sampling sp = samp(1.0f);
    sp.top_p = 0.9f;
    int32_t a[40], b[40], c[40];
    mm_xrng r1, r2, r3;
    mm_xrng_seed(&r1, 1234);
    mm_xrng_seed(&r2, 1234);
    mm_xrng_seed(&r3, 1235);
    for (int i = 0; i < 40; i++) {
        a[i] = mm_sample(x, 50, 50, &sp, NULL, &r1, &ws);
        b[i] = mm_sample(x, 50, 50, &sp, NULL, &r2, &ws);
        c[i] = mm_sample(x, 50, 50, &sp, NULL, &r3, &ws);
    }
    ASSERT_TRUE(memcmp(a, b, sizeof a) == 0);
    ASSERT_TRUE(memcmp(a, c, sizeof a) != 0);
}

TEST(rng_is_uniformish_and_reproducible)
{
    mm_xrng r;
    mm_xrng_seed(&r, 7);
    uint64_t first = mm_xrng_next(&r);
    mm_xrng_seed(&r, 7);
    ASSERT_EQ(mm_xrng_next(&r), first);
    double sum = 0;
    for (int i = 0; i < 100000; i++) {
        double u = mm_xrng_uniform(&r);
        ASSERT_TRUE(u >= 0 && u < 1);
        sum += u;
    }
    ASSERT_NEAR(sum / 100000, 0.5, 0.01);
}

TEST(top_p_keeps_the_smallest_prefix_reaching_p)
{
    const double p[5] = {0.05, 0.5, 0.15, 0.3, 0.0};  /* id 4: p = 0 (-inf) */
    float x[5];
    from_probs(p, 4, x);
    x[4] = -INFINITY;
    mm_sampling sp = samp(1.0f);
    mm_sampler_process(x, 5, 5, &sp, NULL, &ws);

    sp.top_p = 0.7f;   /* 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep {1, 3} */
    int n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 2);
    ASSERT_EQ(ws.ids[0], 1);
    ASSERT_EQ(ws.ids[1], 3);
    ASSERT_NEAR(ws.p[0], 0.5 / 0.8, 1e-6);
    ASSERT_NEAR(ws.p[1], 0.3 / 0.8, 1e-6);

    sp.top_p = 0.85f;  /* 0.8 < 0.85: the third (id 2) is kept too */
    n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 3);
    ASSERT_NEAR(dist_p(n, 2), 0.15 / 0.95, 1e-6);
    ASSERT_NEAR(dist_p(n, 0), 0, 0);

    sp.top_p = 0.4f;   /* the best alone */
    n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 1);
    ASSERT_EQ(ws.ids[0], 1);
    ASSERT_NEAR(ws.p[0], 1.0, 1e-7);

    sp.top_p = 1.0f;   /* off: everything finite, in id order */
    n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 4);
    ASSERT_EQ(ws.ids[0], 0);
    ASSERT_NEAR(dist_p(n, 3), 0.3, 1e-6);
}

TEST(top_p_on_a_large_flat_vocabulary)
{
    /* 1000 equal logits: top_p 0.5 keeps exactly 500 (growing the sorted
     * prefix past its first guess), lowest ids first. */
    enum { V = 1000 };
    static float x[V];
    for (int i = 0; i < V; i++)
        x[i] = 0.25f;
    mm_sampling sp = samp(1.0f);
    sp.top_p = 0.5f;
    mm_sampler_process(x, V, V, &sp, NULL, &ws);
    int n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 500);
    for (int i = 0; i < n; i++)
        ASSERT_EQ(ws.ids[i], i);
}

TEST(min_p_filters_relative_to_the_best)
{
    const double p[4] = {0.5, 0.3, 0.15, 0.05};
    float x[4];
    from_probs(p, 4, x);
    mm_sampling sp = samp(1.0f);
    mm_sampler_process(x, 4, 4, &sp, NULL, &ws);
    sp.min_p = 0.2f;   /* threshold 0.1: drops 0.05 */
    int n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 3);
    ASSERT_NEAR(dist_p(n, 3), 0, 0);
    ASSERT_NEAR(dist_p(n, 0), 0.5 / 0.95, 1e-6);
    sp.min_p = 0.5f;   /* threshold 0.25: {0.5, 0.3} */
    n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 2);
    ASSERT_NEAR(dist_p(n, 1), 0.3 / 0.8, 1e-6);
}

TEST(top_k_and_temperature)
{
    const double p[4] = {0.1, 0.4, 0.2, 0.3};
    float x[4];
    from_probs(p, 4, x);
    mm_sampling sp = samp(1.0f);
    sp.top_k = 2;
    mm_sampler_process(x, 4, 4, &sp, NULL, &ws);
    int n = mm_sampler_dist(&sp, &ws);
    ASSERT_EQ(n, 2);
    ASSERT_EQ(ws.ids[0], 1);
    ASSERT_EQ(ws.ids[1], 3);
    ASSERT_NEAR(ws.p[0], 0.4 / 0.7, 1e-6);
    /* Temperature 2: p ~ sqrt(p). */
    sp.top_k = 0;
    sp.temperature = 2.0f;
    n = mm_sampler_dist(&sp, &ws);
    double z = sqrt(0.1) + sqrt(0.4) + sqrt(0.2) + sqrt(0.3);
    ASSERT_EQ(n, 4);
    ASSERT_NEAR(dist_p(n, 2), sqrt(0.2) / z, 1e-6);
    ASSERT_NEAR(dist_p(n, 0), sqrt(0.1) / z, 1e-6);
}

TEST(draws_follow_the_distribution)
{
    const double p[3] = {0.5, 0.3, 0.2};
    float x[3];
    from_probs(p, 3, x);
    mm_sampling sp = samp(1.0f);
    mm_xrng r;
    mm_xrng_seed(&r, 99);
    int cnt[3] = {0};
    enum { N = 30000 };
    for (int i = 0; i < N; i++) {
        int32_t t = mm_sample(x, 3, 3, &sp, NULL, &r, &ws);
        ASSERT_TRUE(t >= 0 && t < 3);
        cnt[t]++;
    }
    double chi = 0;
    for (int i = 0; i < 3; i++)
        chi += pow(cnt[i] - N * p[i], 2) / (N * p[i]);
    /* 2 degrees of freedom: 13.8 is the 0.1% tail. */
    ASSERT_LT(chi, 13.8);
}

TEST(penalties_exact_values)
{
    float x[4] = {2.0f, -2.0f, 1.0f, 0.5f};
    int32_t prompt[] = {0};
    int32_t out[] = {1, 2, 2};
    mm_sample_hist h = {prompt, 1, out, 3, NULL, 0};
    mm_sampling sp = samp(1.0f);
    sp.repetition_penalty = 2.0f;
    sp.frequency_penalty = 0.5f;
    sp.presence_penalty = 0.25f;
    mm_sampler_process(x, 4, 4, &sp, &h, &ws);
    ASSERT_NEAR(ws.x[0], 1.0, 1e-7);          /* prompt only: 2 / 2 */
    ASSERT_NEAR(ws.x[1], -4.75, 1e-6);        /* -2 * 2 - 0.5 * 1 - 0.25 */
    ASSERT_NEAR(ws.x[2], -0.75, 1e-6);        /* 1 / 2 - 0.5 * 2 - 0.25 */
    ASSERT_NEAR(ws.x[3], 0.5, 0);             /* untouched */
    /* The scratch counts were cleared: without history nothing changes. */
    sp.repetition_penalty = 1.0f;
    mm_sampler_process(x, 4, 4, &sp, NULL, &ws);
    ASSERT_NEAR(ws.x[1], -2.0, 0);
    mm_sample_hist empty = {NULL, 0, NULL, 0, NULL, 0};
    sp.repetition_penalty = 2.0f;
    mm_sampler_process(x, 4, 4, &sp, &empty, &ws);
    ASSERT_NEAR(ws.x[0], 2.0, 0);
    ASSERT_NEAR(ws.x[2], 1.0, 0);
    /* A repeated token is penalised once by repetition_penalty. */
    int32_t rep[] = {3, 3, 3};
    mm_sample_hist h2 = {rep, 3, rep, 3, NULL, 0};
    sp.frequency_penalty = sp.presence_penalty = 0;
    mm_sampler_process(x, 4, 4, &sp, &h2, &ws);
    ASSERT_NEAR(ws.x[3], 0.25, 1e-7);
}

TEST(vocab_mask_bias_and_banned)
{
    /* ids 6..7 exist in the model's rows but not in the tokenizer. */
    float x[8] = {0.0f, 0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 50.0f, 60.0f};
    mm_sampling sp = samp(0);
    mm_xrng r;
    mm_xrng_seed(&r, 3);
    ASSERT_EQ(mm_sample(x, 8, 6, &sp, NULL, &r, &ws), 5);
    ASSERT_TRUE(isinf(ws.x[6]) && ws.x[6] < 0);
    sp.temperature = 100.0f;   /* nearly uniform: masked ids still never come */
    for (int i = 0; i < 5000; i++) {
        int32_t t = mm_sample(x, 8, 6, &sp, NULL, &r, &ws);
        ASSERT_TRUE(t >= 0 && t < 6);
    }
    sp.temperature = 0;
    int32_t ids[] = {2};
    float val[] = {10.0f};
    sp.bias_ids = ids;
    sp.bias_val = val;
    sp.n_bias = 1;
    ASSERT_EQ(mm_sample(x, 8, 6, &sp, NULL, &r, &ws), 2);
    int32_t banned[] = {2, 5};
    mm_sample_hist h = {NULL, 0, NULL, 0, banned, 2};
    ASSERT_EQ(mm_sample(x, 8, 6, &sp, &h, &r, &ws), 4);
    /* Everything masked: no token. */
    int32_t all[] = {0, 1, 2, 3, 4, 5};
    mm_sample_hist h3 = {NULL, 0, NULL, 0, all, 6};
    ASSERT_EQ(mm_sample(x, 8, 6, &sp, &h3, &r, &ws), -1);
    sp.temperature = 1;
    ASSERT_EQ(mm_sample(x, 8, 6, &sp, &h3, &r, &ws), -1);
}

TEST(logprobs_are_raw_log_softmax)
{
    const double p[5] = {0.1, 0.2, 0.4, 0.2, 0.1};
    float x[6];
    from_probs(p, 5, x);
    x[5] = 100.0f;             /* beyond the valid vocabulary: ignored */
    mm_tok_lp top[MM_MAX_LOGPROBS];
    float lp = 0;
    int k = mm_sampler_logprobs(x, 5, 3, 3, &ws, &lp, top);
    ASSERT_EQ(k, 3);
    ASSERT_NEAR(lp, log(0.2), 1e-6);
    ASSERT_EQ(top[0].id, 2);
    ASSERT_NEAR(top[0].lp, log(0.4), 1e-6);
    /* Equal values: lower id first. */
    ASSERT_EQ(top[1].id, 1);
    ASSERT_EQ(top[2].id, 3);
    /* The shift of all logits changes nothing. */
    for (int i = 0; i < 5; i++)
        x[i] += 7.0f;
    mm_sampler_logprobs(x, 5, 0, 0, &ws, &lp, top);
    ASSERT_NEAR(lp, log(0.1), 1e-5);
    ASSERT_EQ(mm_sampler_logprobs(x, 5, 0, 50, &ws, &lp, top), 5);
}

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

TEST(selection_matches_a_full_sort)
{
    enum { V = 3000 };
    static float x[V], sorted[V];
    mm_xrng r;
    mm_xrng_seed(&r, 5);
    for (int trial = 0; trial < 20; trial++) {
        for (int i = 0; i < V; i++)
            x[i] = (float)(int)(mm_xrng_uniform(&r) * 200) / 10.0f; /* many ties */
        memcpy(sorted, x, sizeof x);
        qsort(sorted, V, sizeof *sorted, cmp_desc);
        mm_tok_lp top[MM_MAX_LOGPROBS];
        float lp;
        int k = mm_sampler_logprobs(x, V, 0, MM_MAX_LOGPROBS, &ws, &lp, top);
        ASSERT_EQ(k, MM_MAX_LOGPROBS);
        for (int i = 0; i < k; i++) {
            ASSERT_NEAR(x[top[i].id], sorted[i], 0);
            if (i && x[top[i].id] == x[top[i - 1].id])
                ASSERT_TRUE(top[i].id > top[i - 1].id);
        }
        mm_sampling sp = samp(1.0f);
        sp.top_k = 137;
        mm_sampler_process(x, V, V, &sp, NULL, &ws);
        int n = mm_sampler_dist(&sp, &ws);
        ASSERT_EQ(n, 137);
        for (int i = 0; i < n; i++)
            ASSERT_NEAR(x[ws.ids[i]], sorted[i], 0);
    }
}

/* ---- stop strings ---- */

typedef struct feed_res {
    char out[256];
    int  stopped_at;   /* piece index that completed a stop, -1 */
    int  which;
} feed_res;

/* Feed the pieces (NULL-terminated); finish when no stop matched. */
static feed_res feed(const char *const *stops, int nstops, const char *const *pieces)
{
    size_t lens[8];
    for (int i = 0; i < nstops; i++)
        lens[i] = strlen(stops[i]);
    mm_stopstr ss;
    mm_stopstr_init(&ss, stops, lens, nstops);
    mm_buf out;
    mm_buf_init(&out, 1024);
    feed_res r = {"", -1, -1};
    for (int i = 0; pieces[i]; i++) {
        int stopped = 0;
        mm_stopstr_feed(&ss, pieces[i], strlen(pieces[i]), &out, &stopped);
        if (stopped) {
            r.stopped_at = i;
            r.which = ss.which;
            break;
        }
    }
    if (r.stopped_at < 0)
        mm_stopstr_finish(&ss, &out);
    snprintf(r.out, sizeof r.out, "%s", mm_buf_cstr(&out));
    mm_buf_free(&out);
    mm_stopstr_free(&ss);
    return r;
}

TEST(stop_string_split_across_pieces)
{
    const char *stops[] = {"STOP"};
    const char *pieces[] = {"hello S", "T", "O", "P and more", NULL};
    feed_res r = feed(stops, 1, pieces);
    ASSERT_STR_EQ(r.out, "hello ");
    ASSERT_EQ(r.stopped_at, 3);
    ASSERT_EQ(r.which, 0);
}

TEST(stop_string_holdback_is_released)
{
    const char *stops[] = {"cd"};
    size_t lens[] = {2};
    mm_stopstr ss;
    mm_stopstr_init(&ss, stops, lens, 1);
    mm_buf out;
    mm_buf_init(&out, 1024);
    int stopped;
    mm_stopstr_feed(&ss, "abc", 3, &out, &stopped);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "ab");   /* "c" might start "cd" */
    ASSERT_EQ(stopped, 0);
    mm_stopstr_feed(&ss, "x", 1, &out, &stopped);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "abcx"); /* settled: not a stop */
    mm_stopstr_feed(&ss, "c", 1, &out, &stopped);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "abcx");
    mm_stopstr_finish(&ss, &out);             /* the sequence ended otherwise */
    ASSERT_STR_EQ(mm_buf_cstr(&out), "abcxc");
    mm_buf_free(&out);
    mm_stopstr_free(&ss);
}

TEST(stop_string_earliest_match_wins)
{
    const char *stops[] = {"world", "lo w"};
    const char *pieces[] = {"hel", "lo world", NULL};
    feed_res r = feed(stops, 2, pieces);
    ASSERT_STR_EQ(r.out, "hel");
    ASSERT_EQ(r.which, 1);
    const char *p2[] = {"xxSTOPyy", NULL};
    const char *s2[] = {"STOP"};
    r = feed(s2, 1, p2);
    ASSERT_STR_EQ(r.out, "xx");
}

TEST(stop_string_never_emitted_and_no_false_stop)
{
    const char *stops[] = {"</s>", "\n\n"};
    const char *pieces[] = {"a <", "/", "b>", " c\n", "d\n", "\n", "e", NULL};
    feed_res r = feed(stops, 2, pieces);
    ASSERT_STR_EQ(r.out, "a </b> c\nd");
    ASSERT_EQ(r.which, 1);
    const char *none[] = {"zzz"};
    const char *p2[] = {"z", "z", "y", "zz", NULL};
    r = feed(none, 1, p2);
    ASSERT_STR_EQ(r.out, "zzyzz");
    ASSERT_EQ(r.stopped_at, -1);
    /* No stop strings: pass-through. */
    r = feed(NULL, 0, p2);
    ASSERT_STR_EQ(r.out, "zzyzz");
}

TEST(stop_string_utf8_and_overlap)
{
    const char *stops[] = {"\xc3\xa9t\xc3\xa9"};      /* "été" */
    const char *pieces[] = {"un \xc3\xa9", "t", "\xc3\xa9!", NULL};
    feed_res r = feed(stops, 1, pieces);
    ASSERT_STR_EQ(r.out, "un ");
    /* Overlapping self-prefix: "aab" in "aaab". */
    const char *s2[] = {"aab"};
    const char *p2[] = {"a", "a", "a", "b", NULL};
    r = feed(s2, 1, p2);
    ASSERT_STR_EQ(r.out, "a");
    ASSERT_EQ(r.stopped_at, 3);
}

TEST(holdback_length)
{
    const char *stops[] = {"abc", "xy"};
    size_t lens[] = {3, 2};
    mm_stopstr ss;
    mm_stopstr_init(&ss, stops, lens, 2);
    ASSERT_EQ(mm_stopstr_holdback(&ss, "zzab", 4), 2);
    ASSERT_EQ(mm_stopstr_holdback(&ss, "zzx", 3), 1);
    ASSERT_EQ(mm_stopstr_holdback(&ss, "zzz", 3), 0);
    ASSERT_EQ(mm_stopstr_holdback(&ss, "a", 1), 1);
    ASSERT_EQ(mm_stopstr_holdback(&ss, "abc", 3), 0); /* whole: a match, not a hold */
    mm_stopstr_free(&ss);
}

int main(void)
{
    if (mm_sampler_ws_init(&ws, 4096) < 0)
        return 1;
    RUN(greedy_is_argmax);
    RUN(top_k_1_equals_greedy);
    RUN(same_seed_same_tokens);
    RUN(rng_is_uniformish_and_reproducible);
    RUN(top_p_keeps_the_smallest_prefix_reaching_p);
    RUN(top_p_on_a_large_flat_vocabulary);
    RUN(min_p_filters_relative_to_the_best);
    RUN(top_k_and_temperature);
    RUN(draws_follow_the_distribution);
    RUN(penalties_exact_values);
    RUN(vocab_mask_bias_and_banned);
    RUN(logprobs_are_raw_log_softmax);
    RUN(selection_matches_a_full_sort);
    RUN(stop_string_split_across_pieces);
    RUN(stop_string_holdback_is_released);
    RUN(stop_string_earliest_match_wins);
    RUN(stop_string_never_emitted_and_no_false_stop);
    RUN(stop_string_utf8_and_overlap);
    RUN(holdback_length);
    mm_sampler_ws_free(&ws);
    return test_summary();
}
