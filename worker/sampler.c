/* sampler.c: penalties, filters, the draw and log-probabilities.
 *
 * Full sorts of a 150k vocabulary per token would cost more than a small
 * model's forward pass, so the filters that need an order (top_k, top_p)
 * use a quickselect of the best k candidates and sort only those; top_p
 * grows k until the kept mass reaches p. Every order is total (ties broken
 * by the lower id), so results never depend on the selection's path. */
#include "sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- random numbers ---- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void mm_xrng_seed(mm_xrng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t mm_xrng_next(mm_xrng *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

double mm_xrng_uniform(mm_xrng *r) { return (double)(mm_xrng_next(r) >> 11) * 0x1.0p-53; }

/* ---- setup ---- */

void mm_sampling_defaults(mm_sampling *sp)
{
    memset(sp, 0, sizeof *sp);
    sp->temperature = 1.0f;
    sp->top_p = 1.0f;
    sp->repetition_penalty = 1.0f;
}

int mm_sampler_ws_init(mm_sampler_ws *ws, int n_vocab)
{
    memset(ws, 0, sizeof *ws);
    if (n_vocab < 1)
        return -EINVAL;
    size_t n = (size_t)n_vocab;
    ws->n_vocab = n_vocab;
    ws->x = malloc(n * sizeof *ws->x);
    ws->p = malloc(n * sizeof *ws->p);
    ws->ids = malloc(n * sizeof *ws->ids);
    ws->counts = calloc(n, sizeof *ws->counts);
    ws->seen = calloc(n, sizeof *ws->seen);
    if (!ws->x || !ws->p || !ws->ids || !ws->counts || !ws->seen) {
        mm_sampler_ws_free(ws);
        return -ENOMEM;
    }
    return 0;
}

void mm_sampler_ws_free(mm_sampler_ws *ws)
{
    free(ws->x);
    free(ws->p);
    free(ws->ids);
    free(ws->counts);
    free(ws->seen);
    memset(ws, 0, sizeof *ws);
}

/* ---- ordering ---- */

/* a ranks before b: higher value, then lower id. */
static inline int better(const float *x, int32_t a, int32_t b)
{
    return x[a] > x[b] || (x[a] == x[b] && a < b);
}

static int cmp_ids(const void *pa, const void *pb, void *arg)
{
    const float *x = arg;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    if (a == b)
        return 0;
    return better(x, a, b) ? -1 : 1;
}

static inline void swap_ids(int32_t *v, int i, int j)
{
    int32_t t = v[i];
    v[i] = v[j];
    v[j] = t;
}

/* Rearrange ids[0..n) so that ids[0..k) are the k best by x, sorted. */
static void select_top(const float *x, int32_t *ids, int n, int k)
{
    if (k <= 0)
        return;
    if (k > n)
        k = n;
    int lo = 0, hi = n - 1, target = k - 1;
    while (hi > lo && k < n) {
        int mid = lo + (hi - lo) / 2;
        /* Median of three: sorted data (ids often arrive in id order) stays
         * linear. */
        int32_t a = ids[lo], b = ids[mid], c = ids[hi], pivot;
        if (better(x, a, b))
            pivot = better(x, b, c) ? b : (better(x, a, c) ? c : a);
        else
            pivot = better(x, a, c) ? a : (better(x, b, c) ? c : b);
        int i = lo, j = hi;
        while (i <= j) {
            while (better(x, ids[i], pivot))
                i++;
            while (better(x, pivot, ids[j]))
                j--;
            if (i <= j)
                swap_ids(ids, i++, j--);
        }
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            break;
    }
    qsort_r(ids, (size_t)k, sizeof *ids, cmp_ids, (void *)x);
}

/* ---- step 1: mask, bias, penalties ---- */

void mm_sampler_process(const float *logits, int n_vocab, int n_valid, const mm_sampling *sp,
                        const mm_sample_hist *h, mm_sampler_ws *ws)
{
    float *x = ws->x;
    if (n_vocab > ws->n_vocab)
        n_vocab = ws->n_vocab;
    ws->n_x = n_vocab;
    if (n_valid > n_vocab)
        n_valid = n_vocab;
    if (n_valid < 0)
        n_valid = 0;
    memcpy(x, logits, (size_t)n_valid * sizeof *x);
    for (int i = n_valid; i < n_vocab; i++)
        x[i] = -INFINITY;
    for (size_t i = 0; h && i < h->n_banned; i++)
        if (h->banned[i] >= 0 && h->banned[i] < n_valid)
            x[h->banned[i]] = -INFINITY;
    for (int i = 0; i < sp->n_bias; i++)
        if (sp->bias_ids[i] >= 0 && sp->bias_ids[i] < n_valid)
            x[sp->bias_ids[i]] += sp->bias_val[i];
    if (!h)
        return;

    if (sp->repetition_penalty != 1.0f && sp->repetition_penalty > 0) {
        /* Once per distinct token, whether it appeared once or often. */
        float rp = sp->repetition_penalty;
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *v = pass ? h->output : h->prompt;
            size_t n = pass ? h->n_output : h->n_prompt;
            for (size_t i = 0; i < n; i++) {
                int32_t t = v[i];
                if (t < 0 || t >= n_valid || ws->seen[t])
                    continue;
                ws->seen[t] = 1;
                x[t] = x[t] > 0 ? x[t] / rp : x[t] * rp;
            }
        }
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *v = pass ? h->output : h->prompt;
            size_t n = pass ? h->n_output : h->n_prompt;
            for (size_t i = 0; i < n; i++)
                if (v[i] >= 0 && v[i] < n_valid)
                    ws->seen[v[i]] = 0;
        }
    }

    if (sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f) {
        for (size_t i = 0; i < h->n_output; i++)
            if (h->output[i] >= 0 && h->output[i] < n_valid)
                ws->counts[h->output[i]]++;
        for (size_t i = 0; i < h->n_output; i++) {
            int32_t t = h->output[i];
            if (t < 0 || t >= n_valid || !ws->counts[t])
                continue;
            x[t] -= sp->frequency_penalty * (float)ws->counts[t] + sp->presence_penalty;
            ws->counts[t] = 0;
        }
    }
}

/* ---- step 2: the distribution ---- */

int mm_sampler_dist(const mm_sampling *sp, mm_sampler_ws *ws)
{
    const float *x = ws->x;
    int32_t *ids = ws->ids;
    float *p = ws->p;
    int n = 0;
    float m = -INFINITY;
    for (int i = 0; i < ws->n_x; i++) {
        if (!(x[i] > -INFINITY))
            continue;
        ids[n++] = i;
        if (x[i] > m)
            m = x[i];
    }
    if (n == 0)
        return 0;
    double inv_t = 1.0 / (double)sp->temperature;

    /* min_p: p_i / p_max = exp((x_i - max) / T), no normalisation needed. */
    if (sp->min_p > 0.0f) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (exp(((double)x[ids[i]] - m) * inv_t) >= (double)sp->min_p)
                ids[k++] = ids[i];
        n = k;
    }
    int sorted = 0;
    if (sp->top_k > 0 && sp->top_k < n) {
        select_top(x, ids, n, sp->top_k);
        n = sp->top_k;
        sorted = n;
    }
    if (sp->top_p < 1.0f) {
        double z = 0;
        for (int i = 0; i < n; i++)
            z += exp(((double)x[ids[i]] - m) * inv_t);
        double target = (double)sp->top_p * z;
        /* Keep token i while the mass of the better ones is below p. Grow
         * the sorted prefix until the cut falls inside it. */
        int k = sorted ? sorted : (n < 64 ? n : 64);
        for (;;) {
            if (sorted < k) {
                select_top(x, ids, n, k);
                sorted = k;
            }
            double cum = 0;
            int cut = -1;
            for (int i = 0; i < k; i++) {
                if (i > 0 && cum >= target) {
                    cut = i;
                    break;
                }
                cum += exp(((double)x[ids[i]] - m) * inv_t);
            }
            if (cut > 0) {
                n = cut;
                break;
            }
            if (k == n)
                break;
            k = k > n / 4 ? n : k * 4;
        }
    }
    double z = 0;
    for (int i = 0; i < n; i++) {
        double e = exp(((double)x[ids[i]] - m) * inv_t);
        p[i] = (float)e;
        z += e;
    }
    for (int i = 0; i < n; i++)
        p[i] = (float)((double)p[i] / z);
    return n;
}

int32_t mm_sampler_argmax(const float *x, int n)
{
    int32_t best = -1;
    for (int i = 0; i < n; i++)
        if (x[i] > -INFINITY && (best < 0 || x[i] > x[best]))
            best = i;
    return best;
}

int32_t mm_sample(const float *logits, int n_vocab, int n_valid, const mm_sampling *sp,
                  const mm_sample_hist *h, mm_xrng *rng, mm_sampler_ws *ws)
{
    mm_sampler_process(logits, n_vocab, n_valid, sp, h, ws);
    if (!(sp->temperature >= MM_GREEDY_EPS))
        return mm_sampler_argmax(ws->x, ws->n_x);
    int n = mm_sampler_dist(sp, ws);
    if (n == 0)
        return -1;
    double u = mm_xrng_uniform(rng), acc = 0;
    for (int i = 0; i < n; i++) {
        acc += (double)ws->p[i];
        if (u < acc)
            return ws->ids[i];
    }
    /* Rounding left the sum a hair under 1. */
    return ws->ids[n - 1];
}

/* Mirrors mm_sampler_process and mm_sample above: each condition is one
 * step that could move a logit or skip the argmax. */
int mm_sampling_plain_greedy(const mm_sampling *sp, const mm_sample_hist *h)
{
    if (sp->temperature >= MM_GREEDY_EPS)   /* NaN is greedy there too */
        return 0;
    if (sp->n_bias > 0)
        return 0;
    if (!h)
        return 1;
    if (h->n_banned > 0)
        return 0;
    if (sp->repetition_penalty != 1.0f && sp->repetition_penalty > 0)
        return 0;
    if (sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f)
        return 0;
    return 1;
}

/* ---- log-probabilities ---- */

int mm_sampler_logprobs(const float *logits, int n_valid, int32_t chosen, int k,
                        mm_sampler_ws *ws, float *chosen_lp, mm_tok_lp *top)
{
    if (n_valid > ws->n_vocab)
        n_valid = ws->n_vocab;
    float m = -INFINITY;
    for (int i = 0; i < n_valid; i++)
        if (logits[i] > m)
            m = logits[i];
    double s = 0;
    for (int i = 0; i < n_valid; i++)
        s += exp((double)logits[i] - m);
    double lse = (double)m + log(s);
    if (chosen_lp)
        *chosen_lp = chosen >= 0 && chosen < n_valid ? (float)((double)logits[chosen] - lse)
                                                     : -INFINITY;
    if (k > MM_MAX_LOGPROBS)
        k = MM_MAX_LOGPROBS;
    if (k > n_valid)
        k = n_valid;
    if (k <= 0 || !top)
        return 0;
    for (int i = 0; i < n_valid; i++)
        ws->ids[i] = i;
    select_top(logits, ws->ids, n_valid, k);
    for (int i = 0; i < k; i++) {
        top[i].id = ws->ids[i];
        top[i].lp = (float)((double)logits[ws->ids[i]] - lse);
    }
    return k;
}
