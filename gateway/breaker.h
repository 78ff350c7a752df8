/* breaker.h: a per-backend circuit breaker as a pure state machine.
 *
 * No clock, no locks: the caller passes the time in milliseconds (monotonic)
 * and serialises access (the pool lock). That keeps every transition
 * testable with exact timings.
 *
 *   CLOSED --(consecutive_failures in a row, or failure rate >= error_rate
 *             over the sliding window with >= min_requests)--> OPEN
 *   OPEN --(open_until passed; next allow())--> HALF_OPEN
 *   HALF_OPEN: admits half_open_requests probes; all of them succeeding
 *             closes it (open_ms back to the configured base); any failing
 *             re-opens it with open_ms doubled, capped at max_open_ms.
 *   Closing also clears the window and the failure run, so the failures that
 *   opened it cannot re-trip it on the next outcome.
 *
 * The window is MM_BREAKER_BUCKETS buckets of window_ms/MM_BREAKER_BUCKETS
 * ms (at least 1 ms), each keyed by its start time: an outcome counts for
 * between window_ms - one bucket and window_ms, and buckets left over from
 * before an idle gap are ignored and reused. consecutive_failures == 0
 * turns the run-length trigger off. */
#ifndef MM_BREAKER_H
#define MM_BREAKER_H
#include <stdint.h>

#include "config.h"

typedef enum mm_breaker_state {
    MM_BREAKER_CLOSED = 0,
    MM_BREAKER_OPEN,
    MM_BREAKER_HALF_OPEN,
} mm_breaker_state;

#define MM_BREAKER_BUCKETS 20   /* the window is split in this many buckets */

typedef struct mm_breaker_bucket {
    uint64_t start_ms;
    uint32_t total;
    uint32_t failures;
} mm_breaker_bucket;

typedef struct mm_breaker {
    const mm_breaker_cfg *cfg;
    mm_breaker_state state;
    int      consecutive;        /* failures in a row */
    uint64_t open_until_ms;
    int      open_ms;            /* current open period (doubles on re-trip) */
    int      trips;              /* times opened, for the admin view */
    int      probes_inflight;    /* HALF_OPEN: admitted and not yet recorded */
    int      probes_ok;          /* HALF_OPEN: successes so far */
    mm_breaker_bucket buckets[MM_BREAKER_BUCKETS];
} mm_breaker;

void mm_breaker_init(mm_breaker *b, const mm_breaker_cfg *cfg);
/* Whether a request may be sent now, without changing anything: allow()
 * at the same now_ms would return 1. */
int  mm_breaker_would_allow(const mm_breaker *b, uint64_t now_ms);
/* Admit a request: returns 1 and, in HALF_OPEN (entered here from OPEN when
 * open_until has passed), counts it as a probe; 0 when refused. */
int  mm_breaker_allow(mm_breaker *b, uint64_t now_ms);
/* The outcome of an admitted request. failure: connect error, reset,
 * timeout, 5xx or 429 (never other 4xx). Every outcome enters the window.
 * CLOSED: the triggers are checked after every outcome, a success included
 * (it can be the one that brings the window to min_requests).
 * can_eject: 0 when opening would exceed the pool's max_ejection_percent (or
 * the pool has one backend); then the breaker stays closed but keeps
 * counting, so it opens on the first outcome after ejecting is allowed.
 * can_eject applies to CLOSED only: a failed probe re-opens a backend that is
 * already out of rotation.
 * OPEN: outcomes of requests admitted before it opened; window only.
 * HALF_OPEN: with no probe in flight, an outcome is such a straggler
 * (window only); with probes in flight a straggler cannot be told from a
 * probe and is taken as one's outcome (it is fresh evidence either way).
 * Returns 1 when this outcome opened the breaker. Timestamps slightly older
 * than one already recorded (read before the pool lock) are filed under the
 * newest bucket. */
int  mm_breaker_record(mm_breaker *b, int failure, uint64_t now_ms, int can_eject);
/* An admitted request that ended without an outcome (client went away):
 * frees its half-open probe slot. */
void mm_breaker_cancel(mm_breaker *b);
/* When the breaker will admit again (ms, monotonic); 0 if it admits now.
 * OPEN: open_until_ms. HALF_OPEN with every probe slot in flight: no fixed
 * time (an outstanding probe decides), so now_ms + 1, "not now, ask again". */
uint64_t mm_breaker_retry_at(const mm_breaker *b, uint64_t now_ms);
/* Failure rate over the window ending at now_ms (0 when empty); *total, if
 * not NULL, gets the number of outcomes in it. */
double mm_breaker_error_rate(const mm_breaker *b, uint64_t now_ms, uint32_t *total);
/* "closed", "open", "half_open". */
const char *mm_breaker_state_name(mm_breaker_state s);
#endif
