/* balance.h: pure peer-selection algorithms. No locking, no I/O: callers own
 * the state and serialise access to it.
 *
 * `eligible` arrays: eligible[i] != 0 means peer i may be picked (healthy,
 * breaker closed or half-open with room, not yet tried by this request). A
 * NULL eligible array means every peer is eligible. Every function returns the
 * chosen index, or -1 when no eligible peer has a positive weight. */
#ifndef MM_BALANCE_H
#define MM_BALANCE_H
#include <stddef.h>
#include <stdint.h>

/* Smooth weighted round robin as Nginx does it: each pick adds every eligible
 * peer's effective_weight to its current_weight, takes the largest (first on
 * ties), and subtracts the total from the winner. Weights 5,1,1 give
 * a a b a c a a. effective_weight recovers by one per pick towards weight
 * after mm_swrr_penalize (Nginx's gradual recovery of a failed peer). */
typedef struct mm_swrr_peer {
    int weight;            /* configured, >= 0 */
    int effective_weight;  /* starts at weight */
    int current_weight;    /* starts at 0 */
} mm_swrr_peer;

void mm_swrr_init(mm_swrr_peer *peers, size_t n, const int *weights);
int  mm_swrr_pick(mm_swrr_peer *peers, size_t n, const uint8_t *eligible);
/* A failure: lower the peer's effective weight by max(1, weight/4), never
 * below 1 while weight > 0 (so it still gets an occasional probe). */
void mm_swrr_penalize(mm_swrr_peer *peer);

/* Weighted random. rng is the caller's mm_rng state. */
int  mm_balance_random(const int *weights, size_t n, const uint8_t *eligible, uint64_t *rng);

/* Least outstanding requests relative to weight (outstanding/weight smallest);
 * ties broken at random through rng so equal peers share load (a NULL rng
 * takes the first tied peer). */
int  mm_balance_least(const int *outstanding, const int *weights, size_t n,
                      const uint8_t *eligible, uint64_t *rng);

/* Weighted rendezvous (highest random weight) hashing for sticky splits:
 * score_i = -weight_i / ln(u_i), u_i in (0,1) from hash(key, ids[i]). The same
 * key always picks the same peer while the set and weights are unchanged, and
 * changing one weight moves only keys to or from that peer. ids must be
 * distinct: they, not indexes, decide where each key lands. */
int  mm_balance_rendezvous(const char *key, size_t key_len, const char *const *ids,
                           const int *weights, size_t n, const uint8_t *eligible);

/* splitmix64: any state, 0 included, is valid and never gets stuck (it is a
 * Weyl sequence); seed one state per pool and advance it under the pool lock. */
uint64_t mm_rng_next(uint64_t *state);
/* Uniform double in [0,1) with 53 random bits. */
double   mm_rng_double(uint64_t *state);
/* 64-bit hash of bytes (FNV-1a folded through a finalizer), stable across
 * runs and machines: sticky assignments survive gateway restarts. */
uint64_t mm_hash64(const void *p, size_t n, uint64_t seed);
#endif
