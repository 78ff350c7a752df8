/* test_breaker.c: the circuit breaker with exact timings. Time is whatever
 * the test passes, so every boundary is checked on both sides. */
#include "breaker.h"
#include "test.h"

#define F 1   /* failure */
#define S 0   /* success */

/* The documented defaults, written out so a changed default in config.c
 * cannot silently change what these tests mean. */
static mm_breaker_cfg defaults(void)
{
    mm_breaker_cfg c = {
        .consecutive_failures = 5,
        .error_rate = 0.5,
        .window_ms = 10000,
        .min_requests = 20,
        .open_ms = 10000,
        .max_open_ms = 300000,
        .half_open_requests = 1,
        .max_ejection_percent = 50,
    };
    return c;
}

/* n failures in a row at now, now+1, ...; returns the last record()'s value. */
static int fail_n(mm_breaker *b, int n, uint64_t now)
{
    int r = 0;

    for (int i = 0; i < n; i++)
        r = mm_breaker_record(b, F, now + (uint64_t)i, 1);
    return r;
}

TEST(starts_closed)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total = 99;

    mm_breaker_init(&b, &c);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    ASSERT_EQ(b.open_ms, 10000);
    ASSERT_EQ(mm_breaker_allow(&b, 0), 1);
    ASSERT_EQ(mm_breaker_would_allow(&b, 0), 1);
    ASSERT_EQ(mm_breaker_retry_at(&b, 0), 0);
    ASSERT_TRUE(mm_breaker_error_rate(&b, 0, &total) == 0.0);
    ASSERT_EQ(total, 0);
}

TEST(trips_after_exactly_5_consecutive_failures)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    for (int i = 0; i < 4; i++) {
        ASSERT_EQ(mm_breaker_record(&b, F, 1000 + (uint64_t)i, 1), 0);
        ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
        ASSERT_EQ(b.consecutive, i + 1);
    }
    ASSERT_EQ(mm_breaker_allow(&b, 1004), 1);
    ASSERT_EQ(mm_breaker_record(&b, F, 1004, 1), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
    ASSERT_EQ(b.open_until_ms, 11004);
    ASSERT_EQ(b.trips, 1);
    ASSERT_EQ(mm_breaker_allow(&b, 1005), 0);
}

TEST(success_resets_consecutive_count)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    ASSERT_EQ(fail_n(&b, 4, 1000), 0);
    ASSERT_EQ(mm_breaker_record(&b, S, 1010, 1), 0);
    ASSERT_EQ(b.consecutive, 0);
    ASSERT_EQ(fail_n(&b, 4, 1020), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    /* 9 of 10 fail, far under min_requests: the run alone trips it. */
    ASSERT_EQ(mm_breaker_record(&b, F, 1030, 1), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
}

TEST(consecutive_zero_disables_run_trigger)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    c.consecutive_failures = 0;
    mm_breaker_init(&b, &c);
    ASSERT_EQ(fail_n(&b, 19, 0), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    /* Only the rate trigger fires, at min_requests. */
    ASSERT_EQ(mm_breaker_record(&b, F, 100, 1), 1);
}

/* F F S S F F S S ...: half failures, never more than 2 in a row. */
static int pattern(int i)
{
    return i % 4 < 2 ? F : S;
}

TEST(error_rate_trips_at_min_requests_not_before)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;
    double rate;

    mm_breaker_init(&b, &c);
    for (int i = 0; i < 19; i++) {
        ASSERT_EQ(mm_breaker_record(&b, pattern(i), 100 * (uint64_t)i, 1), 0);
        ASSERT_TRUE(b.consecutive < 5);
    }
    /* 10 of 19 is above the threshold; only the request count holds it. */
    rate = mm_breaker_error_rate(&b, 1800, &total);
    ASSERT_EQ(total, 19);
    ASSERT_TRUE(rate > 0.52 && rate < 0.53);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    /* The 20th (a success) brings the count to 20 at exactly 0.5. */
    ASSERT_EQ(pattern(19), S);
    ASSERT_EQ(mm_breaker_record(&b, S, 1900, 1), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
    ASSERT_EQ(b.open_until_ms, 11900);
    rate = mm_breaker_error_rate(&b, 1900, &total);
    ASSERT_EQ(total, 20);
    ASSERT_TRUE(rate == 0.5);
}

TEST(error_rate_below_threshold_stays_closed)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    /* 9 failures in 20, never two in a row. */
    for (int i = 0; i < 20; i++)
        ASSERT_EQ(mm_breaker_record(&b, i % 2 == 0 && i < 18 ? F : S, 10 * (uint64_t)i, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    /* 10 of 21 is still under 0.5, 11 of 22 is exactly 0.5. */
    ASSERT_EQ(mm_breaker_record(&b, F, 200, 1), 0);
    ASSERT_EQ(mm_breaker_record(&b, F, 210, 1), 1);
}

TEST(window_expiry)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    /* 19 requests, 10 failing, all in the first bucket [0, 500). */
    for (int i = 0; i < 19; i++)
        ASSERT_EQ(mm_breaker_record(&b, pattern(i), (uint64_t)i, 1), 0);
    mm_breaker_error_rate(&b, 9999, &total);
    ASSERT_EQ(total, 19);
    mm_breaker_error_rate(&b, 10000, &total);
    ASSERT_EQ(total, 0);
    /* Were the old ones counted, this would be 11 of 20 and trip. */
    ASSERT_EQ(mm_breaker_record(&b, F, 10000, 1), 0);
    ASSERT_TRUE(mm_breaker_error_rate(&b, 10000, &total) == 1.0);
    ASSERT_EQ(total, 1);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
}

TEST(window_slides_per_bucket)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    mm_breaker_record(&b, S, 100, 1);   /* bucket [0, 500) */
    mm_breaker_record(&b, F, 4200, 1);  /* bucket [4000, 4500) */
    mm_breaker_record(&b, S, 9700, 1);  /* bucket [9500, 10000) */
    mm_breaker_error_rate(&b, 9999, &total);
    ASSERT_EQ(total, 3);
    /* The first bucket drops out, the others stay: a sliding window, not a
     * tumbling one. */
    ASSERT_TRUE(mm_breaker_error_rate(&b, 10000, &total) == 0.5);
    ASSERT_EQ(total, 2);
    mm_breaker_error_rate(&b, 13999, &total);
    ASSERT_EQ(total, 2);
    ASSERT_TRUE(mm_breaker_error_rate(&b, 14000, &total) == 0.0);
    ASSERT_EQ(total, 1);
    mm_breaker_error_rate(&b, 19500, &total);
    ASSERT_EQ(total, 0);
}

TEST(stale_bucket_reset_after_idle_gap)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;
    /* Exactly 20 laps of the window later: the same slot index, so a stale
     * bucket that was not reset would add its 19 requests. */
    uint64_t later = 100 + 20 * 10000;

    mm_breaker_init(&b, &c);
    for (int i = 0; i < 19; i++)
        mm_breaker_record(&b, pattern(i), 100, 1);
    ASSERT_EQ(mm_breaker_record(&b, F, later, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    mm_breaker_error_rate(&b, later, &total);
    ASSERT_EQ(total, 1);
    ASSERT_EQ(b.buckets[0].start_ms, 200000);
    ASSERT_EQ(b.buckets[0].total, 1);
}

TEST(late_timestamp_lands_in_current_bucket)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    mm_breaker_record(&b, S, 10000, 1);
    /* A whole window behind: the same slot. It must not wipe the newer
     * bucket; it is filed under the newest time instead. */
    mm_breaker_record(&b, F, 0, 1);
    ASSERT_TRUE(mm_breaker_error_rate(&b, 10000, &total) == 0.5);
    ASSERT_EQ(total, 2);
}

TEST(tiny_window_uses_1ms_buckets)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    c.window_ms = 5;   /* below the bucket count: width floors at 1 ms */
    mm_breaker_init(&b, &c);
    mm_breaker_record(&b, F, 1000, 1);
    mm_breaker_record(&b, F, 1001, 1);
    mm_breaker_error_rate(&b, 1001, &total);
    ASSERT_EQ(total, 2);
    mm_breaker_error_rate(&b, 1020, &total);
    ASSERT_EQ(total, 1);
    mm_breaker_error_rate(&b, 1021, &total);
    ASSERT_EQ(total, 0);
}

TEST(open_period_then_exact_probe_count)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    c.half_open_requests = 3;
    mm_breaker_init(&b, &c);
    ASSERT_EQ(fail_n(&b, 5, 1000), 1);   /* opened at 1004 */
    ASSERT_EQ(b.open_until_ms, 11004);
    ASSERT_EQ(mm_breaker_would_allow(&b, 11003), 0);
    ASSERT_EQ(mm_breaker_allow(&b, 11003), 0);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
    ASSERT_EQ(mm_breaker_would_allow(&b, 11004), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);   /* would_allow changes nothing */
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(mm_breaker_allow(&b, 11004), 1);
        ASSERT_EQ(b.state, MM_BREAKER_HALF_OPEN);
        ASSERT_EQ(b.probes_inflight, i + 1);
    }
    ASSERT_EQ(mm_breaker_would_allow(&b, 11004), 0);
    ASSERT_EQ(mm_breaker_allow(&b, 11004), 0);
    ASSERT_EQ(mm_breaker_allow(&b, 50000), 0);
    ASSERT_EQ(b.probes_inflight, 3);
}

TEST(probe_success_closes_and_resets)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    fail_n(&b, 5, 0);                        /* open until 10004 */
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_record(&b, F, 10010, 1), 1);   /* re-open: 20 s */
    ASSERT_EQ(b.open_ms, 20000);
    ASSERT_EQ(mm_breaker_allow(&b, 30010), 1);
    ASSERT_EQ(mm_breaker_record(&b, S, 30020, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    ASSERT_EQ(b.open_ms, 10000);
    ASSERT_EQ(b.consecutive, 0);
    mm_breaker_error_rate(&b, 30020, &total);
    ASSERT_EQ(total, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 30021), 1);
    /* A fresh count: 4 failures do not re-trip it, the 5th opens it for the
     * base period again. */
    ASSERT_EQ(fail_n(&b, 4, 30030), 0);
    ASSERT_EQ(mm_breaker_record(&b, F, 30040, 1), 1);
    ASSERT_EQ(b.open_until_ms, 40040);
    ASSERT_EQ(b.trips, 3);
}

TEST(all_probes_must_succeed)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    c.half_open_requests = 2;
    mm_breaker_init(&b, &c);
    fail_n(&b, 5, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_record(&b, S, 10005, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_HALF_OPEN);
    /* The succeeded probe keeps its slot: no third probe. */
    ASSERT_EQ(mm_breaker_allow(&b, 10005), 0);
    ASSERT_EQ(mm_breaker_record(&b, S, 10006, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
}

TEST(second_probe_failure_reopens)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    c.half_open_requests = 2;
    mm_breaker_init(&b, &c);
    fail_n(&b, 5, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_record(&b, S, 10005, 1), 0);
    ASSERT_EQ(mm_breaker_record(&b, F, 10006, 1), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
    ASSERT_EQ(b.open_until_ms, 30006);
}

TEST(probe_failure_doubles_period_up_to_cap)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    const int want[7] = {10000, 20000, 40000, 80000, 100000, 100000, 100000};
    uint64_t now = 500;

    c.max_open_ms = 100000;
    mm_breaker_init(&b, &c);
    ASSERT_EQ(fail_n(&b, 5, now), 1);
    now += 4;
    for (int i = 0; i < 7; i++) {
        ASSERT_EQ(b.state, MM_BREAKER_OPEN);
        ASSERT_EQ(b.open_ms, want[i]);
        ASSERT_EQ(b.open_until_ms, now + (uint64_t)want[i]);
        ASSERT_EQ(b.trips, i + 1);
        ASSERT_EQ(mm_breaker_allow(&b, b.open_until_ms - 1), 0);
        now = b.open_until_ms;
        ASSERT_EQ(mm_breaker_allow(&b, now), 1);
        now += 7;   /* the probe takes a while, then fails */
        ASSERT_EQ(mm_breaker_record(&b, F, now, 1), 1);
    }
}

TEST(cannot_eject_stays_closed_but_counts)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    for (int i = 0; i < 30; i++)
        ASSERT_EQ(mm_breaker_record(&b, F, 100 + (uint64_t)i, 0), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
    ASSERT_EQ(b.trips, 0);
    ASSERT_EQ(b.consecutive, 30);
    ASSERT_EQ(mm_breaker_allow(&b, 200), 1);
    ASSERT_TRUE(mm_breaker_error_rate(&b, 200, &total) == 1.0);
    ASSERT_EQ(total, 30);
    /* Once the pool can spare it, the next outcome trips it. */
    ASSERT_EQ(mm_breaker_record(&b, F, 201, 1), 1);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
}

TEST(outcomes_while_open_only_update_window)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;
    uint32_t total;

    mm_breaker_init(&b, &c);
    fail_n(&b, 5, 0);
    ASSERT_EQ(b.open_until_ms, 10004);
    ASSERT_EQ(mm_breaker_record(&b, F, 100, 1), 0);
    ASSERT_EQ(mm_breaker_record(&b, S, 101, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_OPEN);
    ASSERT_EQ(b.open_until_ms, 10004);
    ASSERT_EQ(b.trips, 1);
    ASSERT_EQ(b.consecutive, 0);
    mm_breaker_error_rate(&b, 101, &total);
    ASSERT_EQ(total, 7);
}

TEST(straggler_in_half_open_without_probe_is_not_a_probe)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    fail_n(&b, 5, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    mm_breaker_cancel(&b);
    ASSERT_EQ(b.state, MM_BREAKER_HALF_OPEN);
    /* No probe is in flight, so these predate the opening. */
    ASSERT_EQ(mm_breaker_record(&b, S, 10005, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_HALF_OPEN);
    ASSERT_EQ(mm_breaker_record(&b, F, 10006, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_HALF_OPEN);
    ASSERT_EQ(b.open_ms, 10000);
}

TEST(cancel_frees_probe_slot)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    mm_breaker_cancel(&b);   /* CLOSED: nothing to free */
    ASSERT_EQ(b.probes_inflight, 0);
    fail_n(&b, 5, 0);
    mm_breaker_cancel(&b);   /* OPEN: nothing either */
    ASSERT_EQ(b.probes_inflight, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    ASSERT_EQ(mm_breaker_allow(&b, 10005), 0);
    mm_breaker_cancel(&b);
    ASSERT_EQ(b.probes_inflight, 0);
    mm_breaker_cancel(&b);   /* never below zero */
    ASSERT_EQ(b.probes_inflight, 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10006), 1);
    ASSERT_EQ(mm_breaker_allow(&b, 10006), 0);
    ASSERT_EQ(mm_breaker_record(&b, S, 10007, 1), 0);
    ASSERT_EQ(b.state, MM_BREAKER_CLOSED);
}

TEST(retry_at_values)
{
    mm_breaker_cfg c = defaults();
    mm_breaker b;

    mm_breaker_init(&b, &c);
    ASSERT_EQ(mm_breaker_retry_at(&b, 123), 0);
    fail_n(&b, 5, 0);                           /* open until 10004 */
    ASSERT_EQ(mm_breaker_retry_at(&b, 5), 10004);
    ASSERT_EQ(mm_breaker_retry_at(&b, 10003), 10004);
    ASSERT_EQ(mm_breaker_retry_at(&b, 10004), 0);   /* admits now */
    ASSERT_EQ(mm_breaker_allow(&b, 10004), 1);
    /* The only probe slot is taken: not now, ask again shortly. */
    ASSERT_EQ(mm_breaker_retry_at(&b, 10010), 10011);
    mm_breaker_cancel(&b);
    ASSERT_EQ(mm_breaker_retry_at(&b, 10010), 0);
    ASSERT_EQ(mm_breaker_allow(&b, 10010), 1);
    ASSERT_EQ(mm_breaker_record(&b, F, 10020, 1), 1);   /* 20 s now */
    ASSERT_EQ(mm_breaker_retry_at(&b, 10020), 30020);
}

TEST(state_names)
{
    ASSERT_STR_EQ(mm_breaker_state_name(MM_BREAKER_CLOSED), "closed");
    ASSERT_STR_EQ(mm_breaker_state_name(MM_BREAKER_OPEN), "open");
    ASSERT_STR_EQ(mm_breaker_state_name(MM_BREAKER_HALF_OPEN), "half_open");
    ASSERT_STR_EQ(mm_breaker_state_name((mm_breaker_state)42), "unknown");
}

int main(void)
{
    RUN(starts_closed);
    RUN(trips_after_exactly_5_consecutive_failures);
    RUN(success_resets_consecutive_count);
    RUN(consecutive_zero_disables_run_trigger);
    RUN(error_rate_trips_at_min_requests_not_before);
    RUN(error_rate_below_threshold_stays_closed);
    RUN(window_expiry);
    RUN(window_slides_per_bucket);
    RUN(stale_bucket_reset_after_idle_gap);
    RUN(late_timestamp_lands_in_current_bucket);
    RUN(tiny_window_uses_1ms_buckets);
    RUN(open_period_then_exact_probe_count);
    RUN(probe_success_closes_and_resets);
    RUN(all_probes_must_succeed);
    RUN(second_probe_failure_reopens);
    RUN(probe_failure_doubles_period_up_to_cap);
    RUN(cannot_eject_stays_closed_but_counts);
    RUN(outcomes_while_open_only_update_window);
    RUN(straggler_in_half_open_without_probe_is_not_a_probe);
    RUN(cancel_frees_probe_slot);
    RUN(retry_at_values);
    RUN(state_names);
    return test_summary();
}
