/* test_balance.c: peer selection. Statistical checks use fixed seeds (so they
 * are reproducible) and chi-square at the 99.9% level, and each one is paired
 * with a wrong expectation that the same check must reject, proving it has
 * the power to catch a skewed balancer. */
#include "balance.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* 99.9% critical values of the chi-square distribution. */
#define CHI2_DF1 10.83
#define CHI2_DF2 13.82
#define CHI2_DF9 27.88

#define NKEYS 100000

static double chi2(const long *obs, const double *w, size_t n)
{
    double total = 0, wsum = 0, x = 0;

    for (size_t i = 0; i < n; i++) {
        total += (double)obs[i];
        wsum += w[i];
    }
    for (size_t i = 0; i < n; i++) {
        double e = total * w[i] / wsum;
        double d = (double)obs[i] - e;
        x += d * d / e;
    }
    return x;
}

static size_t make_key(char *buf, size_t cap, int i)
{
    int k = snprintf(buf, cap, "user-%d", i);
    return k > 0 ? (size_t)k : 0;
}

/* ---- smooth weighted round robin ---- */

TEST(swrr_5_1_1_exact_sequence)
{
    const int w[3] = {5, 1, 1};
    const int want[14] = {0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    for (int i = 0; i < 14; i++)
        ASSERT_EQ(mm_swrr_pick(p, 3, NULL), want[i]);
    /* One full cycle returns every current_weight to zero. */
    for (int i = 0; i < 3; i++)
        ASSERT_EQ(p[i].current_weight, 0);
}

TEST(swrr_equal_weights_round_robin)
{
    const int w[3] = {1, 1, 1};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    for (int i = 0; i < 6; i++)
        ASSERT_EQ(mm_swrr_pick(p, 3, NULL), i % 3);
}

TEST(swrr_weight_zero_never_picked)
{
    const int w[3] = {2, 0, 1};
    long cnt[3] = {0};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    for (int i = 0; i < 300; i++) {
        int k = mm_swrr_pick(p, 3, NULL);
        ASSERT_TRUE(k >= 0 && k < 3);
        cnt[k]++;
    }
    ASSERT_EQ(cnt[1], 0);
    ASSERT_EQ(cnt[0], 200);
    ASSERT_EQ(cnt[2], 100);
    /* Penalising a weight-0 peer must not give it a weight. */
    mm_swrr_penalize(&p[1]);
    ASSERT_EQ(p[1].effective_weight, 0);
    ASSERT_EQ(mm_swrr_pick(p, 3, (const uint8_t[]){0, 1, 0}), -1);
}

TEST(swrr_ineligible_peer_skipped)
{
    const int w1[3] = {1, 1, 1};
    const int w2[3] = {3, 1, 2};
    const uint8_t el[3] = {1, 0, 1};
    long cnt[3] = {0};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w1);
    for (int i = 0; i < 10; i++)
        ASSERT_EQ(mm_swrr_pick(p, 3, el), i % 2 ? 2 : 0);
    ASSERT_EQ(p[1].current_weight, 0);

    /* 3:2 between the eligible peers, exactly, in every block of 5. */
    mm_swrr_init(p, 3, w2);
    for (int blk = 0; blk < 1000; blk++) {
        long b[3] = {0};
        for (int i = 0; i < 5; i++) {
            int k = mm_swrr_pick(p, 3, el);
            ASSERT_TRUE(k == 0 || k == 2);
            b[k]++;
            cnt[k]++;
        }
        ASSERT_EQ(b[0], 3);
        ASSERT_EQ(b[2], 2);
    }
    ASSERT_EQ(cnt[0], 3000);
    ASSERT_EQ(cnt[2], 2000);
    ASSERT_EQ(cnt[1], 0);

    /* Going ineligible mid-stream freezes the peer's current_weight (so it
     * resumes its place later) and the rest keep their ratio. */
    mm_swrr_init(p, 3, w2);
    for (int i = 0; i < 4; i++)
        mm_swrr_pick(p, 3, NULL);
    int frozen = p[1].current_weight;
    cnt[0] = cnt[1] = cnt[2] = 0;
    for (int i = 0; i < 5000; i++)
        cnt[mm_swrr_pick(p, 3, el)]++;
    ASSERT_EQ(p[1].current_weight, frozen);
    ASSERT_EQ(cnt[1], 0);
    ASSERT_TRUE(labs(cnt[0] - 3000) <= 3);
    ASSERT_TRUE(labs(cnt[2] - 2000) <= 3);
}

TEST(swrr_nothing_eligible)
{
    const int w[3] = {5, 1, 1};
    const int z[2] = {0, 0};
    const uint8_t none[3] = {0, 0, 0};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    ASSERT_EQ(mm_swrr_pick(p, 3, none), -1);
    for (int i = 0; i < 3; i++)
        ASSERT_EQ(p[i].current_weight, 0);
    ASSERT_EQ(mm_swrr_pick(p, 0, NULL), -1);
    mm_swrr_init(p, 2, z);
    ASSERT_EQ(mm_swrr_pick(p, 2, NULL), -1);
}

TEST(swrr_penalize_steps_and_floor)
{
    const int w[3] = {8, 1, 3};
    const int want8[6] = {6, 4, 2, 1, 1, 1};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    for (int i = 0; i < 6; i++) {
        mm_swrr_penalize(&p[0]);
        ASSERT_EQ(p[0].effective_weight, want8[i]);
    }
    mm_swrr_penalize(&p[1]);
    ASSERT_EQ(p[1].effective_weight, 1);
    mm_swrr_penalize(&p[2]); /* 3/4 == 0, so the step is 1 */
    ASSERT_EQ(p[2].effective_weight, 2);
    mm_swrr_penalize(&p[2]);
    mm_swrr_penalize(&p[2]);
    ASSERT_EQ(p[2].effective_weight, 1);
}

TEST(swrr_penalize_then_recover)
{
    const int w[3] = {5, 1, 1};
    long cnt[3] = {0};
    mm_swrr_peer p[3];

    mm_swrr_init(p, 3, w);
    for (int i = 0; i < 4; i++)
        mm_swrr_penalize(&p[0]);
    ASSERT_EQ(p[0].effective_weight, 1);
    /* Recovery is one unit per pick: 4 picks to get back to 5. */
    for (int i = 0; i < 4; i++) {
        cnt[mm_swrr_pick(p, 3, NULL)]++;
        ASSERT_EQ(p[0].effective_weight, 2 + i);
    }
    /* While recovering it had less than its 5/7 share. */
    ASSERT_TRUE(cnt[0] < 3);
    for (int i = 0; i < 100; i++)
        mm_swrr_pick(p, 3, NULL);
    ASSERT_EQ(p[0].effective_weight, 5);

    /* Back to the exact proportion over a long run. */
    cnt[0] = cnt[1] = cnt[2] = 0;
    for (int i = 0; i < 70000; i++)
        cnt[mm_swrr_pick(p, 3, NULL)]++;
    ASSERT_TRUE(labs(cnt[0] - 50000) <= 2);
    ASSERT_TRUE(labs(cnt[1] - 10000) <= 2);
    ASSERT_TRUE(labs(cnt[2] - 10000) <= 2);
    /* Every eligible pick adds total and subtracts it once, so with all peers
     * eligible the current weights keep summing to zero. */
    ASSERT_EQ(p[0].current_weight + p[1].current_weight + p[2].current_weight, 0);
}

/* ---- rng and hash ---- */

TEST(rng_splitmix64_and_double)
{
    uint64_t s = 0, s2 = 0;
    long bins[10] = {0};
    const double flat[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const double skew[10] = {1.1, 1, 1, 1, 1, 1, 1, 1, 1, 0.9};

    /* Published first outputs of splitmix64 seeded with 0: a zero state is
     * valid and the generator is the real one, not a look-alike. */
    ASSERT_EQ(mm_rng_next(&s), (long long)0xe220a8397b1dcdafULL);
    ASSERT_EQ(mm_rng_next(&s), (long long)0x6e789e6aa1b965f4ULL);
    ASSERT_NE(s, 0);

    for (int i = 0; i < NKEYS; i++) {
        double d = mm_rng_double(&s2);
        ASSERT_TRUE(d >= 0.0 && d < 1.0);
        bins[(int)(d * 10)]++;
    }
    double x = chi2(bins, flat, 10), bad = chi2(bins, skew, 10);
    printf("  rng_double 10 bins: chi2 %.2f (crit %.2f), vs skewed %.1f\n",
           x, CHI2_DF9, bad);
    ASSERT_LT(x, CHI2_DF9);
    ASSERT_LT(CHI2_DF9 * 5, bad);
}

TEST(hash64_pinned_values)
{
    /* These constants pin mm_hash64. Rendezvous stickiness (a session staying
     * on its backend across restarts and releases) depends on the function
     * never changing; if one of these fails, sticky assignments would
     * silently move in production. Change them only on purpose. */
    ASSERT_EQ(mm_hash64("", 0, 0), (long long)0x7bd3144f29c0cc9eULL);
    ASSERT_EQ(mm_hash64("a", 1, 0), (long long)0x6df9901ee878b6beULL);
    ASSERT_EQ(mm_hash64("backend-a", 9, 0), (long long)0x674a3ba59c978941ULL);
    ASSERT_EQ(mm_hash64("a", 1, 1), (long long)0xdea13a43162696b9ULL);
    ASSERT_EQ(mm_hash64("user-42", 7, 0x0123456789abcdefULL),
              (long long)0xd8a3d5848dd86867ULL);
    /* NULL with length 0 is the empty string. */
    ASSERT_EQ(mm_hash64(NULL, 0, 0), mm_hash64("", 0, 0));
    /* Length matters: a trailing NUL is data. */
    ASSERT_NE(mm_hash64("a", 1, 0), mm_hash64("a\0", 2, 0));
}

TEST(hash64_avalanche)
{
    uint64_t s = 7;
    long flips = 0, trials = 0;

    /* Flipping any one input bit should flip half the output bits on
     * average; FNV-1a without the finaliser fails this badly. */
    for (int t = 0; t < 500; t++) {
        uint64_t in = mm_rng_next(&s), seed = mm_rng_next(&s);
        uint64_t h = mm_hash64(&in, sizeof in, seed);
        for (int b = 0; b < 64; b++) {
            uint64_t in2 = in ^ (1ULL << b);
            flips += __builtin_popcountll(h ^ mm_hash64(&in2, sizeof in2, seed));
            flips += __builtin_popcountll(h ^ mm_hash64(&in, sizeof in, seed ^ (1ULL << b)));
            trials += 2;
        }
    }
    double avg = (double)flips / (double)trials;
    printf("  hash64 avalanche: %.3f of 64 bits flip per input bit\n", avg);
    ASSERT_LT(31.5, avg);
    ASSERT_LT(avg, 32.5);
}

/* ---- weighted random ---- */

TEST(random_90_10_chi_square)
{
    const int w[2] = {90, 10};
    const double ew[2] = {90, 10}, wrong[2] = {88, 12};
    long cnt[2] = {0};
    uint64_t rng = 12345;

    for (int i = 0; i < NKEYS; i++) {
        int k = mm_balance_random(w, 2, NULL, &rng);
        ASSERT_TRUE(k == 0 || k == 1);
        cnt[k]++;
    }
    double x = chi2(cnt, ew, 2), bad = chi2(cnt, wrong, 2);
    printf("  random 90/10: %ld/%ld chi2 %.3f (crit %.2f), vs 88/12 %.1f\n",
           cnt[0], cnt[1], x, CHI2_DF1, bad);
    ASSERT_LT(x, CHI2_DF1);
    ASSERT_LT(CHI2_DF1 * 10, bad);
}

TEST(random_5_3_2_chi_square)
{
    const int w[3] = {5, 3, 2};
    const double ew[3] = {5, 3, 2}, wrong[3] = {5, 2.8, 2.2};
    long cnt[3] = {0};
    uint64_t rng = 99;

    for (int i = 0; i < NKEYS; i++)
        cnt[mm_balance_random(w, 3, NULL, &rng)]++;
    double x = chi2(cnt, ew, 3), bad = chi2(cnt, wrong, 3);
    printf("  random 5/3/2: %ld/%ld/%ld chi2 %.3f (crit %.2f), vs 5/2.8/2.2 %.1f\n",
           cnt[0], cnt[1], cnt[2], x, CHI2_DF2, bad);
    ASSERT_LT(x, CHI2_DF2);
    ASSERT_LT(CHI2_DF2 * 10, bad);
}

TEST(random_eligibility_and_zero_weight)
{
    const int w[4] = {5, 3, 0, 2};
    const uint8_t el[4] = {1, 0, 1, 1};
    const double ew[2] = {5, 2};
    long cnt[4] = {0}, two[2];
    uint64_t rng = 1;

    for (int i = 0; i < NKEYS; i++) {
        int k = mm_balance_random(w, 4, el, &rng);
        ASSERT_TRUE(k >= 0 && k < 4);
        cnt[k]++;
    }
    ASSERT_EQ(cnt[1], 0);
    ASSERT_EQ(cnt[2], 0);
    two[0] = cnt[0];
    two[1] = cnt[3];
    double x = chi2(two, ew, 2);
    printf("  random 5/-/0/2 masked: %ld/%ld chi2 %.3f\n", cnt[0], cnt[3], x);
    ASSERT_LT(x, CHI2_DF1);

    ASSERT_EQ(mm_balance_random(w, 4, (const uint8_t[]){0, 0, 1, 0}, &rng), -1);
    ASSERT_EQ(mm_balance_random(w, 0, NULL, &rng), -1);
    /* A single positive peer is always chosen. */
    for (int i = 0; i < 100; i++)
        ASSERT_EQ(mm_balance_random(w, 4, (const uint8_t[]){0, 0, 1, 1}, &rng), 3);
}

/* ---- least outstanding ---- */

TEST(least_picks_minimum)
{
    const int out[4] = {3, 1, 2, 0};
    const int w[4] = {1, 1, 1, 1};
    const uint8_t el[4] = {1, 1, 1, 0};
    uint64_t rng = 5;

    ASSERT_EQ(mm_balance_least(out, w, 4, NULL, &rng), 3);
    ASSERT_EQ(mm_balance_least(out, w, 4, el, &rng), 1);
    ASSERT_EQ(mm_balance_least(out, w, 4, (const uint8_t[]){0, 0, 0, 0}, &rng), -1);
    ASSERT_EQ(mm_balance_least(out, w, 0, NULL, &rng), -1);
}

TEST(least_respects_weights)
{
    const int out[2] = {4, 2};
    const int w[2] = {4, 1};
    const int out0[2] = {0, 5};
    const int w0[2] = {0, 1};
    uint64_t rng = 5;

    /* 4/4 = 1 beats 2/1 = 2 although 4 > 2 in raw count. */
    ASSERT_EQ(mm_balance_least(out, w, 2, NULL, &rng), 0);
    /* Weight 0 is never picked, even when idle. */
    for (int i = 0; i < 100; i++)
        ASSERT_EQ(mm_balance_least(out0, w0, 2, NULL, &rng), 1);
    ASSERT_EQ(mm_balance_least(out0, w0, 1, NULL, &rng), -1);
    /* Huge counts must not overflow the cross-multiplication. */
    const int big[2] = {2000000000, 1999999999};
    const int bw[2] = {2000000000, 2000000000};
    ASSERT_EQ(mm_balance_least(big, bw, 2, NULL, &rng), 1);
}

TEST(least_ties_spread)
{
    const int out[4] = {2, 5, 2, 2};
    const int w[4] = {1, 1, 1, 1};
    /* 2/1 and 4/2 tie exactly; a float compare could not promise that. */
    const int outw[2] = {2, 4};
    const int ww[2] = {1, 2};
    const double flat[3] = {1, 1, 1}, wrong[3] = {2, 1, 1};
    long cnt[4] = {0}, tied[3], cw[2] = {0};
    uint64_t rng = 77;

    for (int i = 0; i < 1000; i++)
        cnt[mm_balance_least(out, w, 4, NULL, &rng)]++;
    ASSERT_EQ(cnt[1], 0);
    ASSERT_TRUE(cnt[0] > 0 && cnt[2] > 0 && cnt[3] > 0);
    tied[0] = cnt[0];
    tied[1] = cnt[2];
    tied[2] = cnt[3];
    double x = chi2(tied, flat, 3), bad = chi2(tied, wrong, 3);
    printf("  least ties: %ld/%ld/%ld chi2 %.3f (crit %.2f), vs 2/1/1 %.1f\n",
           cnt[0], cnt[2], cnt[3], x, CHI2_DF2, bad);
    ASSERT_LT(x, CHI2_DF2);
    ASSERT_LT(CHI2_DF2 * 5, bad);

    for (int i = 0; i < 1000; i++)
        cw[mm_balance_least(outw, ww, 2, NULL, &rng)]++;
    ASSERT_TRUE(cw[0] > 0 && cw[1] > 0);

    /* Without an rng the first tied peer wins, deterministically. */
    ASSERT_EQ(mm_balance_least(out, w, 4, NULL, NULL), 0);
}

/* ---- rendezvous ---- */

static const char *const ids3[3] = {"backend-a", "backend-b", "backend-c"};

TEST(rendezvous_stable)
{
    const int w[2] = {90, 10};
    char key[32];
    long cnt[2] = {0};

    for (int i = 0; i < 10000; i++) {
        size_t n = make_key(key, sizeof key, i);
        int a = mm_balance_rendezvous(key, n, ids3, w, 2, NULL);
        int b = mm_balance_rendezvous(key, n, ids3, w, 2, NULL);
        ASSERT_TRUE(a == 0 || a == 1);
        ASSERT_EQ(a, b);
        cnt[a]++;
    }
    ASSERT_TRUE(cnt[0] > 0 && cnt[1] > 0);
    /* Pinned picks: with mm_hash64 pinned these catch a change in the
     * scoring itself. */
    const int we[3] = {1, 1, 1};
    ASSERT_EQ(mm_balance_rendezvous("user-0", 6, ids3, we, 3, NULL), 2);
    ASSERT_EQ(mm_balance_rendezvous("user-1", 6, ids3, we, 3, NULL), 2);
    ASSERT_EQ(mm_balance_rendezvous("user-2", 6, ids3, we, 3, NULL), 1);
    ASSERT_EQ(mm_balance_rendezvous("session-xyz", 11, ids3, we, 3, NULL), 0);
}

TEST(rendezvous_proportions_chi_square)
{
    const int w[2] = {90, 10};
    const double ew[2] = {90, 10}, wrong[2] = {88, 12};
    char key[32];
    long cnt[2] = {0};

    for (int i = 0; i < NKEYS; i++) {
        size_t n = make_key(key, sizeof key, i);
        cnt[mm_balance_rendezvous(key, n, ids3, w, 2, NULL)]++;
    }
    double x = chi2(cnt, ew, 2), bad = chi2(cnt, wrong, 2);
    printf("  rendezvous 90/10: %ld/%ld chi2 %.3f (crit %.2f), vs 88/12 %.1f\n",
           cnt[0], cnt[1], x, CHI2_DF1, bad);
    ASSERT_LT(x, CHI2_DF1);
    ASSERT_LT(CHI2_DF1 * 10, bad);

    /* Three peers 5/3/2, df=2. */
    const int w3[3] = {5, 3, 2};
    const double e3[3] = {5, 3, 2};
    long c3[3] = {0};
    for (int i = 0; i < NKEYS; i++) {
        size_t n = make_key(key, sizeof key, i);
        c3[mm_balance_rendezvous(key, n, ids3, w3, 3, NULL)]++;
    }
    x = chi2(c3, e3, 3);
    printf("  rendezvous 5/3/2: %ld/%ld/%ld chi2 %.3f (crit %.2f)\n",
           c3[0], c3[1], c3[2], x, CHI2_DF2);
    ASSERT_LT(x, CHI2_DF2);
}

TEST(rendezvous_weight_change_minimal_movement)
{
    const int before[2] = {90, 10}, after[2] = {80, 20};
    char key[32];
    long on0 = 0, moved01 = 0, moved10 = 0;

    for (int i = 0; i < NKEYS; i++) {
        size_t n = make_key(key, sizeof key, i);
        int a = mm_balance_rendezvous(key, n, ids3, before, 2, NULL);
        int b = mm_balance_rendezvous(key, n, ids3, after, 2, NULL);
        if (a == 0)
            on0++;
        if (a == 0 && b == 1)
            moved01++;
        if (a == 1 && b == 0)
            moved10++;
    }
    /* Of peer 0's keys, (0.9 - 0.8) / 0.9 = 1/9 must move; the binomial
     * standard deviation at this size is about 0.001, so 0.005 is 5 sigma. */
    double frac = (double)moved01 / (double)on0;
    printf("  rendezvous 90/10 -> 80/20: %ld of %ld peer-0 keys moved (%.4f, "
           "expected %.4f), %ld moved back\n", moved01, on0, frac, 1.0 / 9, moved10);
    ASSERT_EQ(moved10, 0);
    ASSERT_LT(fabs(frac - 1.0 / 9), 0.005);
}

TEST(rendezvous_add_peer_moves_only_to_it)
{
    const int w[3] = {50, 50, 50};
    char key[32];
    long moved = 0;

    for (int i = 0; i < NKEYS; i++) {
        size_t n = make_key(key, sizeof key, i);
        int a = mm_balance_rendezvous(key, n, ids3, w, 2, NULL);
        int b = mm_balance_rendezvous(key, n, ids3, w, 3, NULL);
        if (a != b) {
            ASSERT_EQ(b, 2);
            moved++;
        }
    }
    double frac = (double)moved / NKEYS;
    printf("  rendezvous add third peer: %.4f of keys moved (expected %.4f)\n",
           frac, 1.0 / 3);
    ASSERT_LT(fabs(frac - 1.0 / 3), 0.007);
}

TEST(rendezvous_ineligible_peer)
{
    const int w[3] = {1, 1, 1};
    const uint8_t el[3] = {1, 0, 1};
    char key[32];
    long to[3] = {0};

    for (int i = 0; i < NKEYS; i++) {
        size_t n = make_key(key, sizeof key, i);
        int a = mm_balance_rendezvous(key, n, ids3, w, 3, NULL);
        int b = mm_balance_rendezvous(key, n, ids3, w, 3, el);
        ASSERT_NE(b, 1);
        if (a != 1)
            ASSERT_EQ(b, a);
        else
            to[b]++;
    }
    /* The orphaned keys spread over the survivors rather than piling onto
     * one: each should get about half. */
    printf("  rendezvous ineligible peer 1: its keys went %ld to 0, %ld to 2\n",
           to[0], to[2]);
    const double half[2] = {1, 1};
    long two[2] = {to[0], to[2]};
    ASSERT_LT(chi2(two, half, 2), CHI2_DF1);

    /* Weight 0 is never picked; nothing eligible gives -1. */
    const int wz[3] = {0, 1, 0};
    for (int i = 0; i < 1000; i++) {
        size_t n = make_key(key, sizeof key, i);
        ASSERT_EQ(mm_balance_rendezvous(key, n, ids3, wz, 3, NULL), 1);
    }
    ASSERT_EQ(mm_balance_rendezvous("k", 1, ids3, w, 3, (const uint8_t[]){0, 0, 0}), -1);
    ASSERT_EQ(mm_balance_rendezvous("k", 1, ids3, wz, 3, el), -1);
    /* An empty key is a key like any other. */
    ASSERT_TRUE(mm_balance_rendezvous(NULL, 0, ids3, w, 3, NULL) >= 0);
}

int main(void)
{
    RUN(swrr_5_1_1_exact_sequence);
    RUN(swrr_equal_weights_round_robin);
    RUN(swrr_weight_zero_never_picked);
    RUN(swrr_ineligible_peer_skipped);
    RUN(swrr_nothing_eligible);
    RUN(swrr_penalize_steps_and_floor);
    RUN(swrr_penalize_then_recover);
    RUN(rng_splitmix64_and_double);
    RUN(hash64_pinned_values);
    RUN(hash64_avalanche);
    RUN(random_90_10_chi_square);
    RUN(random_5_3_2_chi_square);
    RUN(random_eligibility_and_zero_weight);
    RUN(least_picks_minimum);
    RUN(least_respects_weights);
    RUN(least_ties_spread);
    RUN(rendezvous_stable);
    RUN(rendezvous_proportions_chi_square);
    RUN(rendezvous_weight_change_minimal_movement);
    RUN(rendezvous_add_peer_moves_only_to_it);
    RUN(rendezvous_ineligible_peer);
    return test_summary();
}
