/* health.h: a backend's health as a pure state machine with HAProxy
 * semantics: down after `fall` consecutive failed checks, up after `rise`
 * consecutive good ones. Active checks and passive outcomes of proxied
 * requests feed the same state. A backend answering 503 while it loads its
 * model is down but not failed ("loading"). Caller serialises access. */
#ifndef MM_HEALTH_H
#define MM_HEALTH_H
#include <stdint.h>

#include "config.h"

typedef enum mm_health_result {
    MM_HEALTH_OK = 0,
    MM_HEALTH_FAIL,
    MM_HEALTH_LOADING,   /* 503 from the health endpoint */
} mm_health_result;

typedef struct mm_health {
    const mm_health_cfg *cfg;
    int up;            /* receives traffic */
    int loading;       /* last check said 503 */
    int ok_streak;     /* consecutive OK results */
    int fail_streak;   /* consecutive FAIL/LOADING results */
    uint64_t changes;  /* number of up/down transitions */
} mm_health;

void mm_health_init(mm_health *h, const mm_health_cfg *cfg, int initially_up);
/* Feed one result; returns 1 when up/down changed. LOADING counts towards
 * going down like a failure but marks the backend loading instead of failed;
 * `loading` always reflects the latest result. A result of the other kind
 * resets the streak. With cfg->enabled == 0 the backend stays up whatever
 * is fed (returns 0). */
int  mm_health_record(mm_health *h, mm_health_result r);
/* Milliseconds until the next active check: interval_ms while stable, a
 * faster interval (interval/4, at least 10 ms) while a transition is in
 * progress (a streak towards the other state has started), each with +-10%
 * jitter drawn from rng (see balance.h mm_rng_next) so checks of many
 * backends do not fire together. */
int  mm_health_next_interval(const mm_health *h, uint64_t *rng);
const char *mm_health_state_name(const mm_health *h); /* "up", "down", "loading" */
#endif
