/* fleet.h: the workers the gateway starts itself ("launch" in a backend):
 * spawn with GPU pinning, readiness, log forwarding, restart with backoff,
 * crash-loop detection, draining on config change, and stopping. See
 * docs/FLEET.md for the whole contract.
 *
 * Threads: all supervision runs on one libevent loop (the one given to
 * mm_fleet_new). mm_fleet_sync, mm_fleet_child_exited and mm_fleet_status
 * may be called from any thread; mm_fleet_stop_all and mm_fleet_free only
 * once that loop no longer runs. */
#ifndef MM_FLEET_H
#define MM_FLEET_H
#include <stddef.h>

#include <jansson.h>

#include "config.h"

struct event_base;
typedef struct mm_fleet mm_fleet;

/* Tunables; mm_fleet_opts_default gives the documented defaults. Tests
 * shrink them to keep real-process tests fast. */
typedef struct mm_fleet_opts {
    int backoff_initial_ms;  /* 1000: first restart delay, doubled per crash */
    int backoff_max_ms;      /* 60000: cap of the doubling */
    int crash_max;           /* 5: this many consecutive crashes -> "failed" */
    int crash_window_ms;     /* 60000: a worker ready this long resets the count */
    int drain_timeout_ms;    /* 30000: a removed worker is stopped after this at the latest */
    int drain_poll_ms;       /* 250: how often the drain probe is asked */
    int stop_timeout_ms;     /* 10000: SIGTERM -> SIGKILL for workers stopped at run time */
    int probe_interval_ms;   /* 500: readiness probe (GET health path) while starting */
    int reap_poll_ms;        /* 1000: backstop check for exited workers (SIGCHLD is primary) */
} mm_fleet_opts;

void mm_fleet_opts_default(mm_fleet_opts *o);

/* A fleet on base (the lead passes thread 0's loop). worker_path is the
 * modelmux-worker binary, used for launches without "command". */
int  mm_fleet_new(struct event_base *base, const char *worker_path, mm_fleet **out,
                  char *err, size_t errlen);
/* Replace the tunables (-EINVAL with a message when one is out of range).
 * Takes effect for timers armed from now on. */
int  mm_fleet_set_opts(mm_fleet *f, const mm_fleet_opts *o, char *err, size_t errlen);

/* Make the running workers equal to the launch specs of cfg (every backend
 * of every model and of default_pool with a "launch"). Everything needed is
 * copied, so cfg may be freed as soon as this returns. The copy is made
 * here; the fleet's loop applies it at its next turn (so before the loop
 * runs, nothing starts yet). Identical specs keep running untouched; new
 * ones start; removed ones drain, then stop. A failed worker whose spec is
 * given again is retried. Returns -ENOMEM, or -ECANCELED after
 * mm_fleet_stop_all. */
int  mm_fleet_sync(mm_fleet *f, const mm_gateway_cfg *cfg, char *err, size_t errlen);

/* Asked (on the fleet's loop, with the fleet's lock held: do not call back
 * into the fleet) how many requests are in flight to url, the backend url of
 * a draining worker. 0 lets the worker stop. Without a probe a removed
 * worker stops at once. */
typedef int (*mm_fleet_in_flight_fn)(void *arg, const char *url);
void mm_fleet_set_drain_probe(mm_fleet *f, mm_fleet_in_flight_fn in_flight, void *arg);

/* Where the fleet's lines go (workers' output, prefixed, and the fleet's
 * own events). Default NULL: mm_log. Called on the fleet's loop (or in
 * mm_fleet_stop_all's thread) with the fleet's lock held. */
typedef void (*mm_fleet_log_fn)(void *arg, int level, const char *line);
void mm_fleet_set_log_sink(mm_fleet *f, mm_fleet_log_fn sink, void *arg);

/* SIGCHLD arrived: thread-safe and cheap (activates an event on the fleet's
 * loop, which reaps only the fleet's own children by pid). */
void mm_fleet_child_exited(mm_fleet *f);

/* Stop every worker: SIGTERM to each worker's process group, wait up to
 * timeout_ms, then SIGKILL and reap. Blocking; needs no loop. Afterwards no
 * worker process or zombie is left and nothing restarts. Returns 0, or
 * -ETIMEDOUT when a process could not be reaped even after SIGKILL (5 s). */
int  mm_fleet_stop_all(mm_fleet *f, int timeout_ms);

/* Admin API view: an array of {id, model, worker, url, pid, gpus, port,
 * device, state, restarts, crashes, last_exit, started_at, command}.
 * NULL on allocation failure. */
json_t *mm_fleet_status(mm_fleet *f);

/* Frees the fleet; workers still alive are killed (SIGKILL) and reaped
 * first. Call before freeing the event base. */
void mm_fleet_free(mm_fleet *f);
#endif
