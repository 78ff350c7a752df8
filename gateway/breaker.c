/* breaker.c: the per-backend circuit breaker (see breaker.h).
 *
 * Runs under the pool lock on every request, so each call is O(buckets) at
 * worst, allocates nothing and reads no clock. */
#include "breaker.h"

#include <limits.h>
#include <string.h>

/* Bucket width in ms. A window shorter than the bucket count would give
 * zero-width buckets (every time maps to one start), so floor it at 1 ms. */
static uint64_t bucket_width(const mm_breaker *b)
{
    int w = b->cfg->window_ms / MM_BREAKER_BUCKETS;
    return w > 0 ? (uint64_t)w : 1;
}

static int probe_slots(const mm_breaker *b)
{
    /* The config enforces >= 1; a zero here would wedge HALF_OPEN forever. */
    return b->cfg->half_open_requests > 0 ? b->cfg->half_open_requests : 1;
}

/* Newest bucket start that holds data, or 0. Callers read the clock before
 * taking the pool lock, so a thread can arrive with a `now` a few ms older
 * than one already recorded; clamping to this keeps such a late outcome in
 * the current bucket instead of wiping a bucket a whole lap ahead. */
static uint64_t newest_start(const mm_breaker *b)
{
    uint64_t m = 0;

    for (int i = 0; i < MM_BREAKER_BUCKETS; i++)
        if (b->buckets[i].total && b->buckets[i].start_ms > m)
            m = b->buckets[i].start_ms;
    return m;
}

/* A bucket counts when it started within the last MM_BREAKER_BUCKETS widths
 * up to and including the bucket holding now. Written as a difference so a
 * huge monotonic clock cannot overflow; stale buckets (from before an idle
 * gap of any length) simply fail the test and are reused when their slot
 * comes round again. */
static int bucket_live(const mm_breaker_bucket *k, uint64_t cur_start, uint64_t span)
{
    return k->total && k->start_ms <= cur_start && cur_start - k->start_ms < span;
}

/* Returns the time the outcome was filed under (now_ms, or later when
 * clamped), so the trip check reads the same window it just wrote. */
static uint64_t window_add(mm_breaker *b, int failure, uint64_t now_ms)
{
    uint64_t w = bucket_width(b);
    uint64_t newest = newest_start(b);
    uint64_t start, slot;
    mm_breaker_bucket *k;

    if (now_ms < newest)
        now_ms = newest;
    start = now_ms - now_ms % w;
    slot = (now_ms / w) % MM_BREAKER_BUCKETS;
    k = &b->buckets[slot];
    if (k->start_ms != start || !k->total) {
        k->start_ms = start;
        k->total = 0;
        k->failures = 0;
    }
    /* Saturate rather than wrap: a wrapped total would read as a tiny,
     * failure-free window. */
    if (k->total < UINT32_MAX)
        k->total++;
    if (failure && k->failures < UINT32_MAX)
        k->failures++;
    return now_ms;
}

static void window_clear(mm_breaker *b)
{
    memset(b->buckets, 0, sizeof b->buckets);
}

static void open_now(mm_breaker *b, uint64_t now_ms)
{
    b->state = MM_BREAKER_OPEN;
    b->open_until_ms = now_ms + (uint64_t)(b->open_ms > 0 ? b->open_ms : 0);
    if (b->trips < INT_MAX)
        b->trips++;
    b->consecutive = 0;
    b->probes_inflight = 0;
    b->probes_ok = 0;
}

void mm_breaker_init(mm_breaker *b, const mm_breaker_cfg *cfg)
{
    memset(b, 0, sizeof *b);
    b->cfg = cfg;
    b->state = MM_BREAKER_CLOSED;
    b->open_ms = cfg->open_ms;
}

int mm_breaker_would_allow(const mm_breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case MM_BREAKER_CLOSED:
        return 1;
    case MM_BREAKER_OPEN:
        /* allow() would move to HALF_OPEN with every probe slot free. */
        return now_ms >= b->open_until_ms;
    case MM_BREAKER_HALF_OPEN:
        return b->probes_inflight + b->probes_ok < probe_slots(b);
    }
    return 0;
}

int mm_breaker_allow(mm_breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case MM_BREAKER_CLOSED:
        return 1;
    case MM_BREAKER_OPEN:
        if (now_ms < b->open_until_ms)
            return 0;
        b->state = MM_BREAKER_HALF_OPEN;
        b->probes_inflight = 0;
        b->probes_ok = 0;
        break;
    case MM_BREAKER_HALF_OPEN:
        break;
    }
    /* A probe slot stays taken once its probe succeeds: exactly
     * half_open_requests successes are needed, never more admitted. */
    if (b->probes_inflight + b->probes_ok >= probe_slots(b))
        return 0;
    b->probes_inflight++;
    return 1;
}

static int should_trip(const mm_breaker *b, uint64_t now_ms)
{
    const mm_breaker_cfg *c = b->cfg;
    uint32_t total;
    double rate;

    /* consecutive_failures == 0 turns the run-length trigger off. */
    if (c->consecutive_failures > 0 && b->consecutive >= c->consecutive_failures)
        return 1;
    rate = mm_breaker_error_rate(b, now_ms, &total);
    return c->min_requests > 0 && total >= (uint32_t)c->min_requests && rate >= c->error_rate;
}

int mm_breaker_record(mm_breaker *b, int failure, uint64_t now_ms, int can_eject)
{
    long long next;
    uint64_t filed = window_add(b, failure, now_ms);

    switch (b->state) {
    case MM_BREAKER_CLOSED:
        if (!failure)
            b->consecutive = 0;
        else if (b->consecutive < INT_MAX)
            b->consecutive++;
        /* Checked after successes too: the trigger is a property of the
         * window, and a success can be the request that brings it up to
         * min_requests while the rate is still at the threshold. When the
         * pool cannot spare this backend we keep counting, so it trips on
         * the first outcome after ejecting becomes allowed again. */
        if (can_eject && should_trip(b, filed)) {
            open_now(b, now_ms);
            return 1;
        }
        return 0;
    case MM_BREAKER_OPEN:
        /* Requests admitted before it opened: history only. */
        return 0;
    case MM_BREAKER_HALF_OPEN:
        /* With no probe in flight this can only be a straggler admitted
         * while CLOSED. With one in flight the two cannot be told apart;
         * either way it is fresh evidence from this backend, so it is taken
         * as the probe's outcome (see breaker.h). */
        if (b->probes_inflight <= 0)
            return 0;
        b->probes_inflight--;
        if (failure) {
            /* The backend is already out of rotation, so re-opening ejects
             * nothing new and can_eject does not apply. */
            next = (long long)b->open_ms * 2;
            if (next > b->cfg->max_open_ms)
                next = b->cfg->max_open_ms;
            if (next < b->cfg->open_ms)
                next = b->cfg->open_ms;
            b->open_ms = (int)next;
            open_now(b, now_ms);
            return 1;
        }
        b->probes_ok++;
        if (b->probes_ok >= probe_slots(b)) {
            /* A clean slate: the failures that opened it are still inside
             * the window and would re-trip it on the next outcome. */
            b->state = MM_BREAKER_CLOSED;
            b->open_ms = b->cfg->open_ms;
            b->consecutive = 0;
            b->probes_inflight = 0;
            b->probes_ok = 0;
            window_clear(b);
        }
        return 0;
    }
    return 0;
}

void mm_breaker_cancel(mm_breaker *b)
{
    if (b->state == MM_BREAKER_HALF_OPEN && b->probes_inflight > 0)
        b->probes_inflight--;
}

uint64_t mm_breaker_retry_at(const mm_breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case MM_BREAKER_CLOSED:
        return 0;
    case MM_BREAKER_OPEN:
        return now_ms >= b->open_until_ms ? 0 : b->open_until_ms;
    case MM_BREAKER_HALF_OPEN:
        if (b->probes_inflight + b->probes_ok < probe_slots(b))
            return 0;
        /* No fixed time: an in-flight probe decides. One ms ahead says "not
         * now, ask again" without inventing a deadline. */
        return now_ms == UINT64_MAX ? now_ms : now_ms + 1;
    }
    return 0;
}

double mm_breaker_error_rate(const mm_breaker *b, uint64_t now_ms, uint32_t *total)
{
    uint64_t w = bucket_width(b);
    uint64_t span = w * MM_BREAKER_BUCKETS;
    uint64_t cur = now_ms - now_ms % w;
    uint64_t t = 0, f = 0;

    for (int i = 0; i < MM_BREAKER_BUCKETS; i++) {
        const mm_breaker_bucket *k = &b->buckets[i];
        if (!bucket_live(k, cur, span))
            continue;
        t += k->total;
        f += k->failures;
    }
    if (total)
        *total = t > UINT32_MAX ? UINT32_MAX : (uint32_t)t;
    return t ? (double)f / (double)t : 0.0;
}

const char *mm_breaker_state_name(mm_breaker_state s)
{
    switch (s) {
    case MM_BREAKER_CLOSED:
        return "closed";
    case MM_BREAKER_OPEN:
        return "open";
    case MM_BREAKER_HALF_OPEN:
        return "half_open";
    }
    return "unknown";
}
