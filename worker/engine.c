/* engine.c: continuous batching on one inference thread (see engine.h).
 *
 * Locks (never two held at once):
 *   e->lock        submit queue, stop flag, dirty list, the engine's RNG
 *   s->lock        one sequence's outbox
 *   e->stats_lock  counters and histograms
 * Everything else about a sequence admitted to the engine (slot, cache
 * position, generated ids, decoder, stop matcher) is touched only by the
 * engine thread.
 *
 * KV blocks: before each step every sequence in the batch reserves the
 * positions it is about to write (backend->reserve). When the shared pool
 * runs dry the youngest running sequence is preempted: its slot and blocks
 * are given back and it waits again, first in line, to recompute its cache
 * (prompt + generated tokens but the last) and carry on decoding where it
 * stopped. Its output does not change: the recompute samples nothing, and
 * the sequence's generator is its own. */
#include "engine.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "errmsg.h"
#include "httpd.h"
#include "log.h"
#include "stopstr.h"

/* Logit rows a step may ask for beyond one per sequence: prompt
 * log-probabilities need every prompt row, which for a 150k vocabulary is
 * 600 KB each, so those prefills go in slices of at most this many. */
#define ALL_ROWS_MAX 64
/* Text one sequence may hold published but not yet taken (a client that
 * reads slowly is bounded by httpd's write timeout long before this). */
#define OUTBOX_TEXT_MAX (64u << 20)

enum seq_state { SEQ_NEW, SEQ_WAITING, SEQ_PREFILL, SEQ_DECODE, SEQ_DONE };

struct mm_seq {
    atomic_int  refs;
    atomic_int  cancelled;
    void       *udata;
    mm_engine  *engine;

    /* immutable after mm_seq_new */
    int32_t      *prompt;
    size_t        n_prompt;
    mm_seq_params p;
    char         *stop_mem;
    int32_t      *bias_ids;
    float        *bias_val;
    uint64_t      submit_ns;

    /* published: s->lock */
    pthread_mutex_t lock;
    mm_seq_outbox   pub;
    /* e->lock */
    int             dirty;
    mm_seq         *next_dirty;
    /* the draining thread's own link: once a drain detached the list, the
     * engine may mark the sequence dirty again (rewriting next_dirty) while
     * the drain still walks it */
    mm_seq         *next_drain;

    /* engine thread */
    enum seq_state state;
    int            admitted;  /* the one-time setup of the first admission is done */
    int            recompute; /* prefilling ctx after a preemption: no logits, no sampling */
    int            slot;
    size_t         n_cached;
    const int32_t *pf;       /* what prefill runs over: the prompt, or ctx */
    size_t         n_pf;
    int32_t       *ctx;      /* prompt + generated tokens but the last (recompute) */
    size_t         ctx_cap;
    int32_t       *out;
    size_t         n_out, out_cap;
    mm_xrng         rng;
    int            dec_live;
    mm_tok_stream  dec;
    mm_stopstr     stop;
    mm_gen_tok    *plp;      /* prompt log-probabilities */
    mm_tok_lp     *plp_top;
    size_t         plp_ntop;
    uint64_t       last_tok_ns;
    mm_seq        *next;     /* submit queue / waiting list / running list */
};

struct mm_engine {
    mm_backend            *be;
    const mm_tokenizer    *tok;
    const mm_model_config *cfg;
    mm_engine_opts         o;
    int                    n_vocab;   /* logits row width */
    int                    n_valid;   /* sampled ids are below this */
    int                    max_seqs, max_len;

    pthread_t       thread;
    int             started;
    pthread_mutex_t lock;
    pthread_cond_t  cond;
    int             stop;
    /* the backend reported its device lost (-ENOTRECOVERABLE): every
     * sequence then and after fails with dead_msg (written under lock
     * before dead is set; dead is atomic so the per-step check in the
     * notify path takes no lock) */
    atomic_int      dead;
    char            dead_msg[320];
    mm_seq         *sub_head, *sub_tail;
    mm_seq         *dirty_head;
    mm_xrng          seed_rng;

    /* engine thread */
    mm_seq        **slots;        /* slot -> sequence */
    mm_seq         *wait_head, *wait_tail;
    mm_seq         *run_head, *run_tail; /* admission order */
    int             n_running, n_waiting;
    mm_batch_seq   *batch;
    mm_seq        **batch_seq;
    float          *logits;
    mm_sampler_ws   ws;
    mm_tok_lp       top[MM_MAX_LOGPROBS];
    mm_buf          piece, text;
    int             published;    /* this step published something */
    int             preempted;    /* this step preempted a sequence */

    pthread_mutex_t stats_lock;
    mm_engine_stats stats;
};

const double mm_engine_ttft_bounds[MM_HIST_BUCKETS] = {
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0};
const double mm_engine_itl_bounds[MM_HIST_BUCKETS] = {
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5,
    1.0, 2.5};
const double mm_engine_e2e_bounds[MM_HIST_BUCKETS] = {
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0};

const char *mm_finish_name(mm_finish f)
{
    switch (f) {
    case MM_FINISH_STOP: return "stop";
    case MM_FINISH_LENGTH: return "length";
    case MM_FINISH_ABORT: return "abort";
    case MM_FINISH_ERROR: return "error";
    default: return "none";
    }
}

static void seterr(char *err, size_t errlen, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
}

/* ---- params, outbox, sequence ---- */

void mm_seq_params_defaults(mm_seq_params *p)
{
    memset(p, 0, sizeof *p);
    mm_sampling_defaults(&p->samp);
    p->max_tokens = 16;
    p->skip_special = 1;
    p->logprobs = -1;
    p->prompt_logprobs = -1;
}

void mm_seq_outbox_init(mm_seq_outbox *o)
{
    memset(o, 0, sizeof *o);
    mm_buf_init(&o->text, OUTBOX_TEXT_MAX);
    o->stop_str = -1;
    o->stop_tok = -1;
}

void mm_seq_outbox_clear(mm_seq_outbox *o)
{
    mm_buf_reset(&o->text);
    o->ntoks = 0;
    o->ntop = 0;
}

void mm_seq_outbox_free(mm_seq_outbox *o)
{
    mm_buf_free(&o->text);
    free(o->toks);
    free(o->top);
    o->toks = NULL;
    o->top = NULL;
    o->ntoks = o->toks_cap = o->ntop = o->top_cap = 0;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

/* Append one token (and its alternatives) to an outbox. */
static int outbox_push_tok(mm_seq_outbox *o, const mm_gen_tok *t, const mm_tok_lp *top)
{
    if (grow((void **)&o->toks, &o->toks_cap, o->ntoks + 1, sizeof *o->toks) ||
        grow((void **)&o->top, &o->top_cap, o->ntop + t->ntop, sizeof *o->top))
        return -ENOMEM;
    mm_gen_tok g = *t;
    g.top_off = (uint32_t)o->ntop;
    if (t->ntop)
        memcpy(o->top + o->ntop, top, t->ntop * sizeof *top);
    o->ntop += t->ntop;
    o->toks[o->ntoks++] = g;
    return 0;
}

int mm_seq_new(const int32_t *prompt, size_t n_prompt, const mm_seq_params *p, mm_seq **out)
{
    *out = NULL;
    if (p->n_stop < 0 || p->n_stop > MM_SEQ_MAX_STOP || p->n_stop_ids < 0 ||
        p->n_stop_ids > MM_SEQ_MAX_STOP_IDS || p->samp.n_bias < 0 ||
        p->samp.n_bias > MM_SEQ_MAX_BIAS)
        return -EINVAL;
    mm_seq *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    atomic_init(&s->refs, 1);
    atomic_init(&s->cancelled, 0);
    pthread_mutex_init(&s->lock, NULL);
    mm_seq_outbox_init(&s->pub);
    s->slot = -1;
    s->p = *p;
    size_t stop_bytes = 0;
    for (int i = 0; i < p->n_stop; i++)
        stop_bytes += p->stop_len[i] + 1;
    s->prompt = malloc((n_prompt ? n_prompt : 1) * sizeof *s->prompt);
    s->stop_mem = malloc(stop_bytes ? stop_bytes : 1);
    s->bias_ids = malloc((size_t)(p->samp.n_bias ? p->samp.n_bias : 1) * sizeof *s->bias_ids);
    s->bias_val = malloc((size_t)(p->samp.n_bias ? p->samp.n_bias : 1) * sizeof *s->bias_val);
    if (!s->prompt || !s->stop_mem || !s->bias_ids || !s->bias_val) {
        mm_seq_release(s);
        return -ENOMEM;
    }
    if (n_prompt)
        memcpy(s->prompt, prompt, n_prompt * sizeof *prompt);
    s->n_prompt = n_prompt;
    s->pf = s->prompt;
    s->n_pf = n_prompt;
    size_t off = 0;
    for (int i = 0; i < p->n_stop; i++) {
        memcpy(s->stop_mem + off, p->stop[i], p->stop_len[i]);
        s->stop_mem[off + p->stop_len[i]] = '\0';
        s->p.stop[i] = s->stop_mem + off;
        off += p->stop_len[i] + 1;
    }
    if (p->samp.n_bias) {
        memcpy(s->bias_ids, p->samp.bias_ids, (size_t)p->samp.n_bias * sizeof *s->bias_ids);
        memcpy(s->bias_val, p->samp.bias_val, (size_t)p->samp.n_bias * sizeof *s->bias_val);
    }
    s->p.samp.bias_ids = s->bias_ids;
    s->p.samp.bias_val = s->bias_val;
    mm_stopstr_init(&s->stop, s->p.stop, s->p.stop_len, s->p.n_stop);
    *out = s;
    return 0;
}

void mm_seq_release(mm_seq *s)
{
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    if (s->dec_live)
        mm_tok_stream_free(&s->dec);
    mm_stopstr_free(&s->stop);
    mm_seq_outbox_free(&s->pub);
    pthread_mutex_destroy(&s->lock);
    free(s->prompt);
    free(s->stop_mem);
    free(s->bias_ids);
    free(s->bias_val);
    free(s->out);
    free(s->ctx);
    free(s->plp);
    free(s->plp_top);
    free(s);
}

static void seq_ref(mm_seq *s) { atomic_fetch_add(&s->refs, 1); }

void mm_seq_cancel(mm_seq *s)
{
    atomic_store(&s->cancelled, 1);
    mm_engine *e = s->engine;
    if (e) {
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->cond);
        pthread_mutex_unlock(&e->lock);
    }
}

void mm_seq_set_udata(mm_seq *s, void *ud) { s->udata = ud; }
void *mm_seq_udata(const mm_seq *s) { return s->udata; }
size_t mm_seq_prompt_len(const mm_seq *s) { return s->n_prompt; }

int mm_seq_take(mm_seq *s, mm_seq_outbox *dst)
{
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    mm_seq_outbox *src = &s->pub;
    if (src->text.len && mm_buf_append(&dst->text, src->text.data, src->text.len) == 0)
        mm_buf_reset(&src->text);
    for (size_t i = 0; i < src->ntoks; i++)
        if (outbox_push_tok(dst, &src->toks[i], src->top + src->toks[i].top_off) < 0)
            break;
    src->ntoks = 0;
    src->ntop = 0;
    dst->prompt_lp_ready = src->prompt_lp_ready;
    dst->n_gen = src->n_gen;
    dst->first_tok_ns = src->first_tok_ns;
    if (src->finish != MM_FINISH_NONE) {
        dst->finish = src->finish;
        dst->stop_str = src->stop_str;
        dst->stop_tok = src->stop_tok;
        memcpy(dst->error, src->error, sizeof dst->error);
        rc = 1;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

const mm_gen_tok *mm_seq_prompt_logprobs(const mm_seq *s, const mm_tok_lp **top)
{
    *top = s->plp_top;
    return s->plp;
}

/* ---- publishing (engine thread) ---- */

static void mark_dirty(mm_engine *e, mm_seq *s)
{
    pthread_mutex_lock(&e->lock);
    if (!s->dirty) {
        s->dirty = 1;
        seq_ref(s);
        s->next_dirty = e->dirty_head;
        e->dirty_head = s;
    }
    pthread_mutex_unlock(&e->lock);
    e->published = 1;
}

void mm_engine_drain(mm_engine *e, void (*fn)(mm_seq *s, void *arg), void *arg)
{
    /* The list was built newest first; answer in arrival order. */
    mm_seq *rev = NULL;
    pthread_mutex_lock(&e->lock);
    for (mm_seq *s = e->dirty_head; s; s = s->next_dirty) {
        s->dirty = 0;
        s->next_drain = rev;
        rev = s;
    }
    e->dirty_head = NULL;
    pthread_mutex_unlock(&e->lock);
    while (rev) {
        mm_seq *n = rev->next_drain;
        if (fn)
            fn(rev, arg);
        mm_seq_release(rev);
        rev = n;
    }
}

static void hist_add(mm_hist *h, const double *bounds, double v)
{
    int i = 0;
    while (i < MM_HIST_BUCKETS && v > bounds[i])
        i++;
    h->count[i]++;
    h->sum += v;
    h->n++;
}

/* The sequence leaves the engine: slot freed, outcome published, the
 * engine's reference dropped. */
/* Take s off the running list and give its slot and KV blocks back. */
static void seq_unslot(mm_engine *e, mm_seq *s)
{
    e->be->ops->truncate(e->be, s->slot, 0);
    e->slots[s->slot] = NULL;
    s->slot = -1;
    mm_seq **pp = &e->run_head;
    mm_seq *prev = NULL;
    while (*pp && *pp != s) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = s->next;
        if (e->run_tail == s)
            e->run_tail = prev;
        e->n_running--;
    }
    s->next = NULL;
}

static void seq_finish(mm_engine *e, mm_seq *s, mm_finish why, const char *msg)
{
    if (s->slot >= 0)
        seq_unslot(e, s);
    s->state = SEQ_DONE;
    pthread_mutex_lock(&s->lock);
    s->pub.finish = why;
    if (msg)
        snprintf(s->pub.error, sizeof s->pub.error, "%s", msg);
    pthread_mutex_unlock(&s->lock);
    mark_dirty(e, s);
    pthread_mutex_lock(&e->stats_lock);
    e->stats.finished[why]++;
    hist_add(&e->stats.e2e, mm_engine_e2e_bounds, (double)(mm_now_ns() - s->submit_ns) / 1e9);
    pthread_mutex_unlock(&e->stats_lock);
    mm_seq_release(s);
}

/* ---- submission ---- */

int mm_engine_submit(mm_engine *e, mm_seq *s)
{
    pthread_mutex_lock(&e->lock);
    if (e->stop || atomic_load(&e->dead)) {
        int rc = e->stop ? -ESHUTDOWN : -ENOTRECOVERABLE;
        pthread_mutex_unlock(&e->lock);
        return rc;
    }
    seq_ref(s);
    s->engine = e;
    s->submit_ns = mm_now_ns();
    mm_xrng_seed(&s->rng, s->p.has_seed ? s->p.seed : mm_xrng_next(&e->seed_rng));
    s->state = SEQ_WAITING;
    s->next = NULL;
    if (e->sub_tail)
        e->sub_tail->next = s;
    else
        e->sub_head = s;
    e->sub_tail = s;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&e->stats_lock);
    e->stats.waiting++;
    pthread_mutex_unlock(&e->stats_lock);
    return 0;
}

/* ---- the step ---- */

static int is_stop_id(const mm_seq *s, int32_t t)
{
    for (int i = 0; i < s->p.n_stop_ids; i++)
        if (s->p.stop_ids[i] == t)
            return 1;
    return 0;
}

/* Run pieces of text through the stop matcher into e->text. Returns 1 when
 * a stop string matched. */
static int feed_text(mm_engine *e, mm_seq *s, const char *p, size_t n)
{
    int stopped = 0;
    if (mm_stopstr_feed(&s->stop, p, n, &e->text, &stopped) < 0)
        return 0;
    if (stopped && s->p.include_stop_str) {
        int w = s->stop.which;
        mm_buf_append(&e->text, s->p.stop[w], s->p.stop_len[w]);
    }
    return stopped;
}

/* The ids sampling must not pick now: EOS and the stop ids while fewer
 * than min_tokens were generated. Returns their count. */
static size_t seq_banned(const mm_engine *e, const mm_seq *s,
                         int32_t banned[MM_MODEL_MAX_STOP + MM_SEQ_MAX_STOP_IDS])
{
    size_t nb = 0;
    if ((int)s->n_out >= s->p.min_tokens)
        return 0;
    for (int i = 0; i < e->cfg->n_stop && !s->p.ignore_eos; i++)
        banned[nb++] = e->cfg->stop_ids[i];
    for (int i = 0; i < s->p.n_stop_ids; i++)
        banned[nb++] = s->p.stop_ids[i];
    return nb;
}

/* Whether s's next token is the plain argmax of its logits row and nothing
 * else reads the row, so the backend may pick it (MM_LOGITS_ARGMAX). */
static int seq_plain_greedy(const mm_engine *e, const mm_seq *s)
{
    if (s->p.logprobs >= 0)
        return 0;
    int32_t banned[MM_MODEL_MAX_STOP + MM_SEQ_MAX_STOP_IDS];
    mm_sample_hist h = {s->prompt, s->n_prompt, s->out, s->n_out, banned,
                        seq_banned(e, s, banned)};
    return mm_sampling_plain_greedy(&s->p.samp, &h);
}

static void seq_emit(mm_engine *e, mm_seq *s, const mm_gen_tok *gt);

/* Sample the next token of s from one row of logits and publish it. */
static void seq_sample(mm_engine *e, mm_seq *s, const float *row)
{
    int32_t banned[MM_MODEL_MAX_STOP + MM_SEQ_MAX_STOP_IDS];
    mm_sample_hist h = {s->prompt, s->n_prompt, s->out, s->n_out, banned,
                        seq_banned(e, s, banned)};
    int32_t t = mm_sample(row, e->n_vocab, e->n_valid, &s->p.samp, &h, &s->rng, &e->ws);
    if (t < 0) {
        seq_finish(e, s, MM_FINISH_ERROR, "no token can be sampled: every id is masked");
        return;
    }
    mm_gen_tok g = {t, NAN, 0, 0};
    if (s->p.logprobs >= 0)
        g.ntop = (uint32_t)mm_sampler_logprobs(row, e->n_valid, t, s->p.logprobs, &e->ws, &g.lp,
                                               e->top);
    seq_emit(e, s, &g);
}

/* The backend's pick for a plain greedy sequence: what seq_sample would
 * have chosen from the same row (same tie rule, same id bound). */
static void seq_take_argmax(mm_engine *e, mm_seq *s, int32_t t)
{
    if (t < 0) {
        seq_finish(e, s, MM_FINISH_ERROR, "no token can be sampled: every id is masked");
        return;
    }
    if (t >= e->n_valid) {
        char msg[128];
        snprintf(msg, sizeof msg, "backend argmax %d out of range [0, %d)", (int)t, e->n_valid);
        mm_error("engine: %s", msg);
        seq_finish(e, s, MM_FINISH_ERROR, msg);
        return;
    }
    mm_gen_tok g = {t, NAN, 0, 0};
    seq_emit(e, s, &g);
}

/* Append a chosen token: stop checks, detokenize, publish. */
static void seq_emit(mm_engine *e, mm_seq *s, const mm_gen_tok *gt)
{
    mm_gen_tok g = *gt;
    int32_t t = g.id;
    if (grow((void **)&s->out, &s->out_cap, s->n_out + 1, sizeof *s->out) < 0) {
        seq_finish(e, s, MM_FINISH_ERROR, "out of memory");
        return;
    }
    s->out[s->n_out++] = t;

    uint64_t now = mm_now_ns();
    pthread_mutex_lock(&e->stats_lock);
    e->stats.generation_tokens++;
    if (s->n_out == 1)
        hist_add(&e->stats.ttft, mm_engine_ttft_bounds, (double)(now - s->submit_ns) / 1e9);
    else
        hist_add(&e->stats.itl, mm_engine_itl_bounds, (double)(now - s->last_tok_ns) / 1e9);
    pthread_mutex_unlock(&e->stats_lock);
    s->last_tok_ns = now;

    mm_finish why = MM_FINISH_NONE;
    int stop_tok = -1, stop_str = -1;
    mm_buf_reset(&e->text);
    if ((!s->p.ignore_eos && mm_model_is_stop(e->cfg, t)) || is_stop_id(s, t)) {
        why = MM_FINISH_STOP;
        stop_tok = is_stop_id(s, t) ? t : -1;
    } else {
        mm_buf_reset(&e->piece);
        mm_tok_stream_push(&s->dec, t, &e->piece);
        if (feed_text(e, s, e->piece.data, e->piece.len)) {
            why = MM_FINISH_STOP;
            stop_str = s->stop.which;
        }
    }
    if (why == MM_FINISH_NONE &&
        ((int)s->n_out >= s->p.max_tokens || s->n_prompt + s->n_out >= (size_t)e->max_len))
        why = MM_FINISH_LENGTH;
    if (why != MM_FINISH_NONE && stop_str < 0) {
        /* Release what the decoder and the matcher still hold; the flushed
         * tail may itself complete a stop string. */
        mm_buf_reset(&e->piece);
        mm_tok_stream_flush(&s->dec, &e->piece);
        if (feed_text(e, s, e->piece.data, e->piece.len)) {
            why = MM_FINISH_STOP;
            stop_str = s->stop.which;
        } else {
            mm_stopstr_finish(&s->stop, &e->text);
        }
    }

    pthread_mutex_lock(&s->lock);
    if (e->text.len)
        mm_buf_append(&s->pub.text, e->text.data, e->text.len);
    outbox_push_tok(&s->pub, &g, e->top);
    s->pub.n_gen = s->n_out;
    if (s->n_out == 1)
        s->pub.first_tok_ns = now;
    s->pub.stop_str = stop_str;
    s->pub.stop_tok = stop_tok;
    pthread_mutex_unlock(&s->lock);
    mark_dirty(e, s);
    if (why != MM_FINISH_NONE)
        seq_finish(e, s, why, NULL);
}

/* Prompt log-probabilities for the slice [pos, pos + n) whose rows are in
 * rows: row t predicts prompt token pos + t + 1. */
static void seq_prompt_lp(mm_engine *e, mm_seq *s, size_t pos, int n, const float *rows)
{
    int k = s->p.prompt_logprobs;
    for (int t = 0; t < n; t++) {
        size_t q = pos + (size_t)t + 1;
        if (q >= s->n_prompt)
            break;
        mm_gen_tok *g = &s->plp[q];
        g->id = s->prompt[q];
        g->top_off = (uint32_t)s->plp_ntop;
        g->ntop = (uint32_t)mm_sampler_logprobs(rows + (size_t)t * (size_t)e->n_vocab, e->n_valid,
                                                g->id, k, &e->ws, &g->lp,
                                                s->plp_top + s->plp_ntop);
        s->plp_ntop += g->ntop;
    }
}

/* The first admission's setup, once per sequence (a preempted one keeps
 * its decoder, prompt log-probabilities and accounting). Returns 0, or
 * -1 when the sequence was finished instead. */
static int seq_setup(mm_engine *e, mm_seq *s)
{
    if (s->admitted)
        return 0;
    if (s->n_prompt == 0 || s->n_prompt > (size_t)e->max_len) {
        seq_finish(e, s, MM_FINISH_ERROR, "prompt length out of range");
        return -1;
    }
    if (s->p.prompt_logprobs >= 0) {
        int k = s->p.prompt_logprobs > MM_MAX_LOGPROBS ? MM_MAX_LOGPROBS : s->p.prompt_logprobs;
        s->plp = calloc(s->n_prompt, sizeof *s->plp);
        s->plp_top = malloc((s->n_prompt * (size_t)k + 1) * sizeof *s->plp_top);
        if (!s->plp || !s->plp_top) {
            seq_finish(e, s, MM_FINISH_ERROR, "out of memory");
            return -1;
        }
        s->plp[0].id = s->prompt[0];
        s->plp[0].lp = NAN;
    }
    mm_tok_stream_init(&s->dec, e->tok, s->p.skip_special);
    s->dec_live = 1;
    s->admitted = 1;
    pthread_mutex_lock(&e->stats_lock);
    e->stats.prompt_tokens += s->n_prompt;
    pthread_mutex_unlock(&e->stats_lock);
    return 0;
}

/* Give s a slot (whose blocks the caller reserved) at the running tail. */
static void seq_admit(mm_engine *e, mm_seq *s, int slot)
{
    s->slot = slot;
    s->n_cached = 0;
    s->state = SEQ_PREFILL;
    e->slots[slot] = s;
    s->next = NULL;
    if (e->run_tail)
        e->run_tail->next = s;
    else
        e->run_head = s;
    e->run_tail = s;
    e->n_running++;
}

static mm_seq *wait_pop(mm_engine *e)
{
    mm_seq *s = e->wait_head;
    e->wait_head = s->next;
    if (!e->wait_head)
        e->wait_tail = NULL;
    s->next = NULL;
    e->n_waiting--;
    return s;
}

/* Preemption by recompute: s gives its slot and blocks back and waits at
 * the front of the line. Once admitted again it prefills its prompt and
 * every generated token but the last, with no logits, then decodes on
 * from that last token; a sequence still in its prompt simply starts over
 * (prompt log-probabilities are published only once complete, so they are
 * recomputed from scratch). */
static void seq_preempt(mm_engine *e, mm_seq *s)
{
    seq_unslot(e, s);
    s->n_cached = 0;
    s->recompute = 0;
    s->pf = s->prompt;
    s->n_pf = s->n_prompt;
    s->plp_ntop = 0;
    if (s->n_out > 0) {
        size_t n = s->n_prompt + s->n_out - 1;
        if (grow((void **)&s->ctx, &s->ctx_cap, n, sizeof *s->ctx) < 0) {
            seq_finish(e, s, MM_FINISH_ERROR, "out of memory");
            return;
        }
        memcpy(s->ctx, s->prompt, s->n_prompt * sizeof *s->ctx);
        memcpy(s->ctx + s->n_prompt, s->out, (s->n_out - 1) * sizeof *s->ctx);
        s->pf = s->ctx;
        s->n_pf = n;
        s->recompute = 1;
    }
    s->state = SEQ_WAITING;
    s->next = e->wait_head;
    e->wait_head = s;
    if (!e->wait_tail)
        e->wait_tail = s;
    e->n_waiting++;
    e->preempted = 1;
    mm_debug("engine: preempted a sequence at %zu cached positions (%d of %d KV blocks in use)",
             s->n_pf, e->be->blocks_used, e->be->num_blocks);
    pthread_mutex_lock(&e->stats_lock);
    e->stats.preemptions++;
    pthread_mutex_unlock(&e->stats_lock);
}

/* Reserve n positions for the running sequence s, preempting the youngest
 * running sequences while the pool is short. 1: reserved; 0: s itself was
 * preempted (it was the youngest) or finished. */
static int reserve_or_preempt(mm_engine *e, mm_seq *s, size_t n)
{
    for (;;) {
        int rc = e->be->ops->reserve(e->be, s->slot, (int)n);
        if (rc == 0)
            return 1;
        if (rc != -ENOSPC) {
            char msg[160];
            snprintf(msg, sizeof msg, "KV cache: cannot reserve %zu positions: %s", n,
                     strerror(-rc));
            mm_error("engine: %s", msg);
            seq_finish(e, s, MM_FINISH_ERROR, msg);
            return 0;
        }
        mm_seq *v = e->run_tail;
        seq_preempt(e, v);
        if (v == s)
            return 0;
    }
}

/* How much of s's prefill runs this step and what it wants back. */
static int plan_prefill(const mm_engine *e, const mm_seq *s, int budget, int all_left, int *want)
{
    int remain = (int)(s->n_pf - s->n_cached);
    int take = remain < budget ? remain : budget;
    if (s->recompute) {
        *want = MM_LOGITS_NONE;
    } else if (s->p.prompt_logprobs >= 0) {
        if (take > all_left)
            take = all_left;
        *want = MM_LOGITS_ALL;
    } else if (take == remain && s->p.max_tokens > 0) {
        *want = seq_plain_greedy(e, s) ? MM_LOGITS_ARGMAX : MM_LOGITS_LAST;
    } else {
        *want = MM_LOGITS_NONE;
    }
    return take;
}

static void batch_add(mm_engine *e, int *nb, mm_seq *s, const int32_t *tok, int n, int want)
{
    e->batch[*nb] = (mm_batch_seq){s->slot, tok, n, (int)s->n_cached, want, -1};
    e->batch_seq[(*nb)++] = s;
}

static int free_slot(const mm_engine *e)
{
    for (int i = 0; i < e->max_seqs; i++)
        if (!e->slots[i])
            return i;
    return -1;
}

/* Build the step's batch; returns its size. Decodes come first, oldest
 * first, each reserving one more position (and preempting the youngest
 * when the pool is dry); then prompt slices of running sequences in
 * admission order; then new admissions in arrival order. A prompt slice
 * that does not fit waits for a later step when the batch already has
 * work; one that does not fit an empty batch preempts younger sequences. */
static int build_batch(mm_engine *e)
{
    int nb = 0, budget = e->o.step_tokens, all_left = ALL_ROWS_MAX;
    e->preempted = 0;
    mm_seq *s = e->run_head;
    while (s) {
        if (s->state != SEQ_DECODE) {
            s = s->next;
            continue;
        }
        mm_seq *n = s->next;
        if (!reserve_or_preempt(e, s, s->n_cached + 1)) {
            if (s->state == SEQ_WAITING)
                break;   /* s was the youngest: nothing runs after it */
            s = n;
            continue;
        }
        batch_add(e, &nb, s, &s->out[s->n_out - 1], 1,
                  seq_plain_greedy(e, s) ? MM_LOGITS_ARGMAX : MM_LOGITS_LAST);
        budget--;
        s = s->next;
    }

    int blocked = 0;
    for (s = e->run_head; s && budget > 0 && !blocked;) {
        if (s->state != SEQ_PREFILL) {
            s = s->next;
            continue;
        }
        int want, take = plan_prefill(e, s, budget, all_left, &want);
        if (take == 0) {
            s = s->next;
            continue;
        }
        size_t need = s->n_cached + (size_t)take;
        int rc;
        while ((rc = e->be->ops->reserve(e->be, s->slot, (int)need)) == -ENOSPC && nb == 0 &&
               e->run_tail != s)
            seq_preempt(e, e->run_tail);
        if (rc == -ENOSPC && nb > 0) {
            blocked = 1;
            break;
        }
        if (rc < 0) {
            /* Alone and still short: the pool is smaller than one sequence,
             * which mm_engine_new refuses, so this is a backend fault. */
            mm_seq *n = s->next;
            char msg[160];
            snprintf(msg, sizeof msg, "KV cache: cannot reserve %zu positions: %s", need,
                     strerror(-rc));
            mm_error("engine: %s", msg);
            seq_finish(e, s, MM_FINISH_ERROR, msg);
            s = n;
            continue;
        }
        if (want == MM_LOGITS_ALL)
            all_left -= take;
        batch_add(e, &nb, s, s->pf + s->n_cached, take, want);
        budget -= take;
        s = s->next;
    }

    /* Admissions, unless this step had to preempt (the pool is tight: a
     * newcomer would only be preempted in turn). With an empty batch
     * nothing runs and the whole pool is free, so the first in line
     * always fits. */
    while (e->wait_head && budget > 0 && !blocked && !e->preempted) {
        int slot = free_slot(e);
        if (slot < 0)
            break;
        s = e->wait_head;
        if (!s->admitted && (s->n_prompt == 0 || s->n_prompt > (size_t)e->max_len)) {
            wait_pop(e);
            seq_finish(e, s, MM_FINISH_ERROR, "prompt length out of range");
            continue;
        }
        int want, take = plan_prefill(e, s, budget, all_left, &want);
        if (take == 0)
            break;
        int rc = e->be->ops->reserve(e->be, slot, take);
        if (rc == -ENOSPC && nb > 0)
            break;
        wait_pop(e);
        if (rc < 0) {
            e->be->ops->truncate(e->be, slot, 0);
            char msg[160];
            snprintf(msg, sizeof msg, "KV cache: cannot reserve %d positions: %s", take,
                     strerror(-rc));
            mm_error("engine: %s", msg);
            seq_finish(e, s, MM_FINISH_ERROR, msg);
            continue;
        }
        if (seq_setup(e, s) < 0) {
            e->be->ops->truncate(e->be, slot, 0);
            continue;
        }
        seq_admit(e, s, slot);
        if (want == MM_LOGITS_ALL)
            all_left -= take;
        batch_add(e, &nb, s, s->pf, take, want);
        budget -= take;
    }
    return nb;
}

static void engine_die(mm_engine *e, const char *msg);

/* Append submitted sequences (detached from sub_head under the lock) to
 * the waiting list (engine thread). */
static void wait_append(mm_engine *e, mm_seq *list)
{
    while (list) {
        mm_seq *n = list->next;
        list->next = NULL;
        if (e->wait_tail)
            e->wait_tail->next = list;
        else
            e->wait_head = list;
        e->wait_tail = list;
        e->n_waiting++;
        list = n;
    }
}

static void engine_step(mm_engine *e)
{
    /* Cancelled sequences leave first, so their slots serve this step. */
    for (mm_seq *s = e->run_head, *n; s; s = n) {
        n = s->next;
        if (atomic_load(&s->cancelled))
            seq_finish(e, s, MM_FINISH_ABORT, NULL);
    }
    for (mm_seq **pp = &e->wait_head, *prev = NULL; *pp;) {
        mm_seq *s = *pp;
        if (!atomic_load(&s->cancelled)) {
            prev = s;
            pp = &s->next;
            continue;
        }
        *pp = s->next;
        if (e->wait_tail == s)
            e->wait_tail = prev;
        s->next = NULL;
        e->n_waiting--;
        seq_finish(e, s, MM_FINISH_ABORT, NULL);
    }

    int nb = build_batch(e);
    if (nb == 0)
        return;

    char err[256] = "";
    int rc = e->be->ops->forward(e->be, e->batch, nb, e->logits, err, sizeof err);
    pthread_mutex_lock(&e->stats_lock);
    e->stats.steps++;
    pthread_mutex_unlock(&e->stats_lock);
    if (rc < 0) {
        char msg[320];
        snprintf(msg, sizeof msg, "forward pass failed: %s", err);
        mm_error("engine: %s", msg);
        for (int i = 0; i < nb; i++)
            seq_finish(e, e->batch_seq[i], MM_FINISH_ERROR, msg);
        if (rc == -ENOTRECOVERABLE)
            engine_die(e, msg);
        return;
    }

    size_t row = 0, V = (size_t)e->n_vocab;
    for (int i = 0; i < nb; i++) {
        mm_seq *s = e->batch_seq[i];
        const mm_batch_seq *q = &e->batch[i];
        const float *last = NULL;
        if (q->want == MM_LOGITS_ALL) {
            seq_prompt_lp(e, s, (size_t)q->pos, q->n_tokens, e->logits + row * V);
            last = e->logits + (row + (size_t)q->n_tokens - 1) * V;
            row += (size_t)q->n_tokens;
        } else if (q->want == MM_LOGITS_LAST) {
            last = e->logits + row * V;
            row++;
        }
        s->n_cached += (size_t)q->n_tokens;
        if (s->state == SEQ_PREFILL) {
            if (s->n_cached < s->n_pf)
                continue;
            if (s->recompute) {
                /* The cache is back; the last generated token is the next
                 * decode's input, as before the preemption. */
                s->recompute = 0;
                s->state = SEQ_DECODE;
                continue;
            }
            if (s->plp) {
                pthread_mutex_lock(&s->lock);
                s->pub.prompt_lp_ready = 1;
                pthread_mutex_unlock(&s->lock);
                mark_dirty(e, s);
            }
            if (s->p.max_tokens <= 0) {
                seq_finish(e, s, MM_FINISH_LENGTH, NULL);
                continue;
            }
            s->state = SEQ_DECODE;
        }
        if (last)
            seq_sample(e, s, last);
        else if (q->want == MM_LOGITS_ARGMAX)
            seq_take_argmax(e, s, q->argmax);
    }
}

/* The device is lost: no step can run again. Fail every sequence the
 * engine holds or is handed, and say so (mm_engine_dead) so the process
 * can exit and be restarted by its supervisor. */
static void engine_die(mm_engine *e, const char *msg)
{
    pthread_mutex_lock(&e->lock);
    snprintf(e->dead_msg, sizeof e->dead_msg, "%s", msg);
    atomic_store(&e->dead, 1);
    mm_seq *list = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    wait_append(e, list);
    while (e->run_head)
        seq_finish(e, e->run_head, MM_FINISH_ERROR, msg);
    while (e->wait_head)
        seq_finish(e, wait_pop(e), MM_FINISH_ERROR, msg);
    e->published = 1;
}

int mm_engine_dead(mm_engine *e, char *msg, size_t len)
{
    if (!atomic_load(&e->dead))
        return 0;
    if (msg && len) {
        pthread_mutex_lock(&e->lock);
        snprintf(msg, len, "%s", e->dead_msg);
        pthread_mutex_unlock(&e->lock);
    }
    return 1;
}

static void publish_gauges(mm_engine *e)
{
    pthread_mutex_lock(&e->lock);
    int submitted = 0;
    for (mm_seq *s = e->sub_head; s; s = s->next)
        submitted++;
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&e->stats_lock);
    e->stats.running = e->n_running;
    e->stats.waiting = e->n_waiting + submitted;
    e->stats.kv_usage = (double)e->be->blocks_used / (double)e->be->num_blocks;
    pthread_mutex_unlock(&e->stats_lock);
}

static void *engine_main(void *arg)
{
    mm_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        while (!e->stop &&
               (atomic_load(&e->dead) || (!e->sub_head && !e->run_head && !e->wait_head)))
            pthread_cond_wait(&e->cond, &e->lock);
        if (e->stop) {
            pthread_mutex_unlock(&e->lock);
            break;
        }
        mm_seq *list = e->sub_head;
        e->sub_head = e->sub_tail = NULL;
        pthread_mutex_unlock(&e->lock);
        wait_append(e, list);
        e->published = 0;
        engine_step(e);
        publish_gauges(e);
        if (e->published && e->o.notify)
            e->o.notify(e->o.notify_ud);
    }
    return NULL;
}

/* ---- life cycle ---- */

int mm_engine_new(mm_backend *b, const mm_tokenizer *tok, const mm_model_config *cfg,
                  const mm_engine_opts *o, mm_engine **out, char *err, size_t errlen)
{
    *out = NULL;
    /* The longest sequence must fit the pool alone, or it could never
     * finish however many others were preempted. */
    if (b->block_size < 1 || b->num_blocks < 1 ||
        (long long)b->num_blocks * b->block_size < (long long)b->max_len) {
        mm_errf(err, errlen, "the KV cache holds %lld positions (%d blocks of %d), fewer than one "
                "sequence of --max-model-len %d: lower --max-model-len or give the cache more "
                "blocks (--num-gpu-blocks-override, --gpu-memory-utilization)",
                (long long)b->num_blocks * b->block_size, b->num_blocks, b->block_size,
                b->max_len);
        return -EINVAL;
    }
    mm_engine *e = calloc(1, sizeof *e);
    if (!e) {
        seterr(err, errlen, "out of memory");
        return -ENOMEM;
    }
    atomic_init(&e->dead, 0);
    e->be = b;
    e->tok = tok;
    e->cfg = cfg;
    e->o = *o;
    e->max_seqs = b->max_seqs;
    e->max_len = b->max_len;
    e->n_vocab = cfg->vocab_size;
    size_t tv = mm_tokenizer_vocab_size(tok);
    e->n_valid = tv < (size_t)e->n_vocab ? (int)tv : e->n_vocab;
    /* The backend's argmax must choose among the ids the sampler would. */
    b->n_valid = e->n_valid;
    if (e->o.step_tokens < e->max_seqs)
        e->o.step_tokens = e->max_seqs;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    pthread_mutex_init(&e->stats_lock, NULL);
    mm_xrng_seed(&e->seed_rng, o->seed);
    mm_buf_init(&e->piece, OUTBOX_TEXT_MAX);
    mm_buf_init(&e->text, OUTBOX_TEXT_MAX);
    e->stats.max_seqs = e->max_seqs;
    e->stats.max_len = e->max_len;
    size_t rows = (size_t)e->max_seqs + ALL_ROWS_MAX;
    e->slots = calloc((size_t)e->max_seqs, sizeof *e->slots);
    e->batch = calloc((size_t)e->max_seqs, sizeof *e->batch);
    e->batch_seq = calloc((size_t)e->max_seqs, sizeof *e->batch_seq);
    e->logits = malloc(rows * (size_t)e->n_vocab * sizeof *e->logits);
    if (!e->slots || !e->batch || !e->batch_seq || !e->logits ||
        mm_sampler_ws_init(&e->ws, e->n_vocab) < 0) {
        seterr(err, errlen, "engine: out of memory");
        mm_engine_free(e);
        return -ENOMEM;
    }
    *out = e;
    return 0;
}

int mm_engine_start(mm_engine *e, char *err, size_t errlen)
{
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc) {
        if (err && errlen)
            snprintf(err, errlen, "engine thread: %s", strerror(rc));
        return -rc;
    }
    e->started = 1;
    return 0;
}

void mm_engine_free(mm_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    pthread_cond_signal(&e->cond);
    mm_seq *sub = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    if (e->started)
        pthread_join(e->thread, NULL);
    /* Whatever is left never ran to the end. */
    while (e->run_head)
        seq_finish(e, e->run_head, MM_FINISH_ABORT, "server shutting down");
    while (e->wait_head) {
        mm_seq *s = e->wait_head;
        e->wait_head = s->next;
        s->next = NULL;
        seq_finish(e, s, MM_FINISH_ABORT, "server shutting down");
    }
    while (sub) {
        mm_seq *n = sub->next;
        sub->next = NULL;
        seq_finish(e, sub, MM_FINISH_ABORT, "server shutting down");
        sub = n;
    }
    mm_engine_drain(e, NULL, NULL);
    mm_sampler_ws_free(&e->ws);
    mm_buf_free(&e->piece);
    mm_buf_free(&e->text);
    free(e->slots);
    free(e->batch);
    free(e->batch_seq);
    free(e->logits);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->cond);
    pthread_mutex_destroy(&e->stats_lock);
    free(e);
}

void mm_engine_get_stats(mm_engine *e, mm_engine_stats *out)
{
    pthread_mutex_lock(&e->stats_lock);
    *out = e->stats;
    pthread_mutex_unlock(&e->stats_lock);
}

int mm_engine_valid_vocab(const mm_engine *e) { return e->n_valid; }
