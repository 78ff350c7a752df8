/* balance.c: peer selection (smooth WRR, weighted random, least outstanding,
 * weighted rendezvous) plus the small RNG and hash they rely on.
 *
 * Everything here runs under a pool mutex on the request path, so each call is
 * one O(n) pass with no allocation and no I/O. */
#include "balance.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME  0x100000001b3ULL

static int is_eligible(const uint8_t *eligible, size_t i)
{
    return !eligible || eligible[i];
}

/* Signed overflow is undefined behaviour; a misconfigured huge weight must
 * degrade the split, not the process. Real weights never get near this. */
static int clamp_int(long long v)
{
    if (v > INT_MAX)
        return INT_MAX;
    if (v < INT_MIN)
        return INT_MIN;
    return (int)v;
}

void mm_swrr_init(mm_swrr_peer *peers, size_t n, const int *weights)
{
    for (size_t i = 0; i < n; i++) {
        int w = weights && weights[i] > 0 ? weights[i] : 0;
        peers[i].weight = w;
        peers[i].effective_weight = w;
        peers[i].current_weight = 0;
    }
}

int mm_swrr_pick(mm_swrr_peer *peers, size_t n, const uint8_t *eligible)
{
    long long total = 0;
    mm_swrr_peer *best = NULL;
    size_t best_i = 0;

    if (n > INT_MAX)
        return -1;
    for (size_t i = 0; i < n; i++) {
        mm_swrr_peer *p = &peers[i];
        /* Ineligible peers keep their current_weight frozen, as Nginx's
         * down/tried peers do, so they resume their place in the cycle. */
        if (!is_eligible(eligible, i) || p->weight <= 0)
            continue;
        p->current_weight = clamp_int((long long)p->current_weight + p->effective_weight);
        total += p->effective_weight;
        /* Recovery happens after the add, so a penalised peer's reduced share
         * applies to this pick and it regains one unit per pick it sees. */
        if (p->effective_weight < p->weight)
            p->effective_weight++;
        if (!best || p->current_weight > best->current_weight) {
            best = p;
            best_i = i;
        }
    }
    if (!best)
        return -1;
    best->current_weight = clamp_int((long long)best->current_weight - total);
    return (int)best_i;
}

void mm_swrr_penalize(mm_swrr_peer *peer)
{
    int step;

    if (peer->weight <= 0)
        return;
    step = peer->weight / 4;
    if (step < 1)
        step = 1;
    /* Never to zero: a weight-0 peer would never be probed again and so could
     * never recover through success. */
    if (peer->effective_weight - step < 1)
        peer->effective_weight = 1;
    else
        peer->effective_weight -= step;
}

int mm_balance_random(const int *weights, size_t n, const uint8_t *eligible, uint64_t *rng)
{
    double total = 0, x, acc = 0;
    int last = -1;

    if (n > INT_MAX)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (is_eligible(eligible, i) && weights[i] > 0) {
            total += weights[i];
            last = (int)i;
        }
    }
    if (last < 0)
        return -1;
    x = mm_rng_double(rng) * total;
    for (size_t i = 0; i < (size_t)last; i++) {
        if (!is_eligible(eligible, i) || weights[i] <= 0)
            continue;
        acc += weights[i];
        if (x < acc)
            return (int)i;
    }
    /* Rounding in acc can leave x just past the penultimate boundary; the
     * remaining mass belongs to the last positive peer either way. */
    return last;
}

int mm_balance_least(const int *outstanding, const int *weights, size_t n,
                     const uint8_t *eligible, uint64_t *rng)
{
    int best = -1;
    uint64_t ties = 0;

    if (n > INT_MAX)
        return -1;
    for (size_t i = 0; i < n; i++) {
        long long lhs, rhs;

        if (!is_eligible(eligible, i) || weights[i] <= 0)
            continue;
        if (best < 0) {
            best = (int)i;
            ties = 1;
            continue;
        }
        /* o_i/w_i vs o_b/w_b with both weights positive: cross-multiplying in
         * 64 bits is exact where floats would make near-ties arbitrary. */
        lhs = (long long)outstanding[i] * weights[best];
        rhs = (long long)outstanding[best] * weights[i];
        if (lhs < rhs) {
            best = (int)i;
            ties = 1;
        } else if (lhs == rhs) {
            /* Reservoir sampling: the k-th tied peer replaces the incumbent
             * with probability 1/k, making every tied peer equally likely in
             * one pass. Without an rng the first tied peer wins. */
            ties++;
            if (rng && mm_rng_next(rng) % ties == 0)
                best = (int)i;
        }
    }
    return best;
}

int mm_balance_rendezvous(const char *key, size_t key_len, const char *const *ids,
                          const int *weights, size_t n, const uint8_t *eligible)
{
    uint64_t kseed;
    double best_score = 0;
    int best = -1;

    if (n > INT_MAX)
        return -1;
    /* The key's hash seeds each id's hash, so the pair is hashed jointly and
     * a peer's score depends only on (key, its own id): changing another
     * peer's weight or eligibility cannot reorder the rest. */
    kseed = mm_hash64(key, key ? key_len : 0, 0);
    for (size_t i = 0; i < n; i++) {
        const char *id = ids[i] ? ids[i] : "";
        uint64_t h;
        double u, score;

        if (!is_eligible(eligible, i) || weights[i] <= 0)
            continue;
        h = mm_hash64(id, strlen(id), kseed);
        /* Top 53 bits, centred in their cell: u is never 0 or 1, so log(u)
         * is finite and strictly negative and score is positive. */
        u = ((double)(h >> 11) + 0.5) * 0x1.0p-53;
        /* -w/ln(u) is the weighted form of highest random weight: peer i
         * wins with probability w_i / sum(w), and raising one weight only
         * raises that peer's score. */
        score = -(double)weights[i] / log(u);
        if (best < 0 || score > best_score) {
            best = (int)i;
            best_score = score;
        }
    }
    return best;
}

uint64_t mm_rng_next(uint64_t *state)
{
    uint64_t z;

    /* splitmix64: a Weyl sequence (odd increment, so every state including 0
     * moves on and the period is 2^64) fed through a bijective mixer. */
    *state += 0x9e3779b97f4a7c15ULL;
    z = *state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double mm_rng_double(uint64_t *state)
{
    /* 53 bits fill a double's mantissa exactly: uniform on a 2^-53 grid in
     * [0,1), never 1.0 after rounding. */
    return (double)(mm_rng_next(state) >> 11) * 0x1.0p-53;
}

/* murmur3's 64-bit finaliser: FNV-1a alone avalanches poorly in its high bits,
 * which rendezvous turns into u, so every output bit must depend on every
 * input bit. */
static uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

uint64_t mm_hash64(const void *p, size_t n, uint64_t seed)
{
    const unsigned char *b = p;
    uint64_t h = FNV64_OFFSET;

    /* The seed goes in as eight bytes before the data, so seeded and unseeded
     * hashes go through one code path and the byte order is fixed (little
     * endian) whatever the host. */
    for (int i = 0; i < 8; i++) {
        h ^= (seed >> (8 * i)) & 0xff;
        h *= FNV64_PRIME;
    }
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= FNV64_PRIME;
    }
    return fmix64(h);
}
