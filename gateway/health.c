/* health.c: rise/fall hysteresis over health results (see health.h).
 *
 * One counter pair instead of a history: only the current streak matters,
 * and a result of the opposite kind breaks it, so a flapping backend whose
 * checks alternate never changes state (HAProxy's behaviour). */
#include "health.h"

#include <limits.h>
#include <string.h>

#include "balance.h"

/* Floor of the faster interval: a tiny configured interval must not turn a
 * transition into a busy loop of checks. */
#define FAST_MIN_MS 10

void mm_health_init(mm_health *h, const mm_health_cfg *cfg, int initially_up)
{
    memset(h, 0, sizeof *h);
    h->cfg = cfg;
    h->up = !cfg->enabled || initially_up ? 1 : 0;
}

static int bump(int v)
{
    return v < INT_MAX ? v + 1 : v;
}

int mm_health_record(mm_health *h, mm_health_result r)
{
    const mm_health_cfg *c = h->cfg;

    if (!c->enabled) {
        h->up = 1;
        h->loading = 0;
        return 0;
    }
    /* Reflects the latest result only: a loading backend that then fails
     * outright is reported failed, not loading. */
    h->loading = r == MM_HEALTH_LOADING;
    if (r == MM_HEALTH_OK) {
        h->ok_streak = bump(h->ok_streak);
        h->fail_streak = 0;
        if (!h->up && h->ok_streak >= c->rise) {
            h->up = 1;
            h->changes++;
            return 1;
        }
        return 0;
    }
    h->fail_streak = bump(h->fail_streak);
    h->ok_streak = 0;
    if (h->up && h->fail_streak >= c->fall) {
        h->up = 0;
        h->changes++;
        return 1;
    }
    return 0;
}

int mm_health_next_interval(const mm_health *h, uint64_t *rng)
{
    const mm_health_cfg *c = h->cfg;
    int changing = c->enabled && (h->up ? h->fail_streak > 0 : h->ok_streak > 0);
    long long base = c->interval_ms > 0 ? c->interval_ms : 1;
    long long spread, lo, r;

    if (changing) {
        base /= 4;
        if (base < FAST_MIN_MS)
            base = FAST_MIN_MS;
    }
    if (!rng)
        return (int)base;
    /* Whole ms uniform in [base - base/10, base + base/10]: integer bounds
     * keep every draw inside +-10% whatever the rounding. */
    spread = base / 10;
    lo = base - spread;
    r = lo + (long long)(mm_rng_double(rng) * (double)(2 * spread + 1));
    if (r > INT_MAX)
        r = INT_MAX;
    return r < 1 ? 1 : (int)r;
}

const char *mm_health_state_name(const mm_health *h)
{
    if (h->up)
        return "up";
    return h->loading ? "loading" : "down";
}
