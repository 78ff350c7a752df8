/* test_health.c: rise/fall hysteresis and check intervals. The jitter checks
 * use a fixed seed, so they are reproducible, and assert both the bounds and
 * that the draws really spread over the whole +-10% range. */
#include "health.h"
#include "test.h"

#define DRAWS 1000

static mm_health_cfg defaults(void)
{
    mm_health_cfg c = {
        .path = "/health",
        .interval_ms = 2000,
        .timeout_ms = 1000,
        .rise = 2,
        .fall = 3,
        .enabled = 1,
    };
    return c;
}

TEST(initial_state_follows_argument)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    ASSERT_EQ(h.up, 1);
    ASSERT_STR_EQ(mm_health_state_name(&h), "up");
    mm_health_init(&h, &c, 0);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(h.ok_streak, 0);
    ASSERT_EQ(h.fail_streak, 0);
    ASSERT_EQ(h.changes, 0);
    ASSERT_STR_EQ(mm_health_state_name(&h), "down");
}

TEST(down_after_exactly_fall_failures)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(h.up, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 1);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(h.loading, 0);
    ASSERT_EQ(h.changes, 1);
    ASSERT_STR_EQ(mm_health_state_name(&h), "down");
    /* Already down: more failures change nothing. */
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(h.changes, 1);
}

TEST(up_after_exactly_rise_oks)
{
    mm_health_cfg c = defaults();
    mm_health h;

    c.rise = 3;
    mm_health_init(&h, &c, 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 1);
    ASSERT_EQ(h.up, 1);
    ASSERT_EQ(h.changes, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
}

TEST(loading_marks_loading_and_down)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_LOADING), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_LOADING), 0);
    ASSERT_EQ(h.up, 1);
    ASSERT_STR_EQ(mm_health_state_name(&h), "up");
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_LOADING), 1);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(h.loading, 1);
    ASSERT_STR_EQ(mm_health_state_name(&h), "loading");
    /* A hard failure after loading: failed, not loading. */
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(h.loading, 0);
    ASSERT_STR_EQ(mm_health_state_name(&h), "down");
    /* Loading again, then finished loading: up after rise OKs. */
    mm_health_record(&h, MM_HEALTH_LOADING);
    ASSERT_STR_EQ(mm_health_state_name(&h), "loading");
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 1);
    ASSERT_EQ(h.loading, 0);
    ASSERT_STR_EQ(mm_health_state_name(&h), "up");
}

TEST(loading_and_fail_share_one_streak)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_LOADING), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_LOADING), 1);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(h.loading, 1);
}

TEST(opposite_result_resets_streak)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    /* Flapping never reaches fall = 3. */
    for (int i = 0; i < 10; i++) {
        ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
        ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
        ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
        ASSERT_EQ(h.fail_streak, 0);
    }
    ASSERT_EQ(h.up, 1);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 1);
    /* And back: OK FAIL OK stays down, OK OK comes up. */
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_FAIL), 0);
    ASSERT_EQ(h.ok_streak, 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 0);
    ASSERT_EQ(h.up, 0);
    ASSERT_EQ(mm_health_record(&h, MM_HEALTH_OK), 1);
    ASSERT_EQ(h.changes, 2);
}

TEST(disabled_stays_up)
{
    mm_health_cfg c = defaults();
    mm_health h;

    c.enabled = 0;
    mm_health_init(&h, &c, 0);
    ASSERT_EQ(h.up, 1);
    for (int i = 0; i < 10; i++) {
        ASSERT_EQ(mm_health_record(&h, i % 2 ? MM_HEALTH_FAIL : MM_HEALTH_LOADING), 0);
        ASSERT_EQ(h.up, 1);
    }
    ASSERT_EQ(h.changes, 0);
    ASSERT_STR_EQ(mm_health_state_name(&h), "up");
}

/* DRAWS intervals: every one inside [lo, hi], some below and some above
 * mid, and the extremes close to the ends (within `edge`). */
static int check_jitter_(const mm_health *h, uint64_t seed, int lo, int mid, int hi, int edge,
                         int quiet)
{
    uint64_t rng = seed;
    int mn = hi + 1, mx = lo - 1, below = 0, above = 0;

    for (int i = 0; i < DRAWS; i++) {
        int v = mm_health_next_interval(h, &rng);
        if (v < lo || v > hi) {
            if (!quiet)
                printf("  draw %d = %d outside [%d, %d]\n", i, v, lo, hi);
            return 0;
        }
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        below += v < mid;
        above += v > mid;
    }
    if (below < DRAWS / 4 || above < DRAWS / 4 || mn > lo + edge || mx < hi - edge) {
        if (!quiet)
            printf("  min %d max %d below %d above %d\n", mn, mx, below, above);
        return 0;
    }
    return 1;
}
#define check_jitter(h, seed, lo, mid, hi, edge) check_jitter_(h, seed, lo, mid, hi, edge, 0)
#define rejects_jitter(h, seed, lo, mid, hi, edge) !check_jitter_(h, seed, lo, mid, hi, edge, 1)

TEST(interval_stable_jitter)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    ASSERT_TRUE(check_jitter(&h, 1, 1800, 2000, 2200, 20));
    mm_health_init(&h, &c, 0);   /* down and no OK yet: stable too */
    ASSERT_TRUE(check_jitter(&h, 2, 1800, 2000, 2200, 20));
    /* The check itself has the power to reject: these bounds are wrong. */
    ASSERT_TRUE(rejects_jitter(&h, 3, 1900, 2000, 2100, 20));
    ASSERT_TRUE(rejects_jitter(&h, 3, 1700, 2000, 2300, 20));
}

TEST(interval_changing_is_a_quarter)
{
    mm_health_cfg c = defaults();
    mm_health h;

    mm_health_init(&h, &c, 1);
    mm_health_record(&h, MM_HEALTH_FAIL);   /* heading down */
    ASSERT_TRUE(check_jitter(&h, 4, 450, 500, 550, 5));
    mm_health_record(&h, MM_HEALTH_OK);     /* streak broken: stable */
    ASSERT_TRUE(check_jitter(&h, 5, 1800, 2000, 2200, 20));
    mm_health_record(&h, MM_HEALTH_FAIL);
    mm_health_record(&h, MM_HEALTH_FAIL);
    mm_health_record(&h, MM_HEALTH_FAIL);   /* down now: stable again */
    ASSERT_EQ(h.up, 0);
    ASSERT_TRUE(check_jitter(&h, 6, 1800, 2000, 2200, 20));
    mm_health_record(&h, MM_HEALTH_OK);     /* heading up */
    ASSERT_TRUE(check_jitter(&h, 7, 450, 500, 550, 5));
}

TEST(fast_interval_floor)
{
    mm_health_cfg c = defaults();
    mm_health h;
    uint64_t rng = 9;

    c.interval_ms = 20;   /* a quarter would be 5 ms */
    mm_health_init(&h, &c, 1);
    mm_health_record(&h, MM_HEALTH_FAIL);
    for (int i = 0; i < DRAWS; i++) {
        int v = mm_health_next_interval(&h, &rng);
        ASSERT_TRUE(v >= 9 && v <= 11);
    }
    ASSERT_EQ(mm_health_next_interval(&h, NULL), 10);
}

TEST(interval_seeds_differ)
{
    mm_health_cfg c = defaults();
    mm_health h;
    uint64_t a = 1, b = 2;
    int same = 0;

    /* Backends seeded differently must not fire in lockstep. */
    mm_health_init(&h, &c, 1);
    for (int i = 0; i < 100; i++)
        same += mm_health_next_interval(&h, &a) == mm_health_next_interval(&h, &b);
    ASSERT_TRUE(same < 10);
}

int main(void)
{
    RUN(initial_state_follows_argument);
    RUN(down_after_exactly_fall_failures);
    RUN(up_after_exactly_rise_oks);
    RUN(loading_marks_loading_and_down);
    RUN(loading_and_fail_share_one_streak);
    RUN(opposite_result_resets_streak);
    RUN(disabled_stays_up);
    RUN(interval_stable_jitter);
    RUN(interval_changing_is_a_quarter);
    RUN(fast_interval_floor);
    RUN(interval_seeds_differ);
    return test_summary();
}
