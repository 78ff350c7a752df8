/* test_engine.c: the scheduler on a tiny generated model and the CPU
 * backend: batching must not change greedy or seeded outputs, queued
 * sequences wait for slots, a cancelled one frees its slot, stops and
 * lengths end sequences where they should, and the streamed text equals
 * the tokenizer's decode of the same ids. With a KV pool far too small,
 * preemption and recompute must not change any output either; the greedy
 * fast path (the backend's argmax) must pick what the sampler picks. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "makemodel.h"
#include "model.h"
#include "test.h"
#include "tokenizer.h"

static char root[64];
static char model_dir[128];

/* ---- a model, a backend and an engine ---- */

static pthread_mutex_t poke_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t poke_c = PTHREAD_COND_INITIALIZER;
static int pokes;

static void notify(void *ud)
{
    (void)ud;
    pthread_mutex_lock(&poke_m);
    pokes++;
    pthread_cond_signal(&poke_c);
    pthread_mutex_unlock(&poke_m);
}

typedef struct rig {
    mm_model     *m;
    mm_tokenizer *tok;
    mm_backend   *be;
    mm_engine    *e;
} rig;

/* block_size / num_blocks 0: the backend's defaults (a pool that never
 * runs short). fault_steps >= 0: the backend loses its "device" after that
 * many steps (backend_fault.c). */
static int rig_new_fault(rig *r, int max_seqs, int max_len, int step_tokens, int block_size,
                         int num_blocks, long fault_steps)
{
    char err[512], path[256];
    memset(r, 0, sizeof *r);
    mm_model_load_opts lo = {.quiet = 1};
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    mm_backend_opts bo = {.max_seqs = max_seqs, .max_len = max_len, .threads = 2,
                          .block_size = block_size, .num_blocks = num_blocks};
    mm_engine_opts eo = {.step_tokens = step_tokens, .seed = 1, .notify = notify};
    if (mm_model_load(model_dir, &lo, &r->m, err, sizeof err) < 0 ||
        mm_tokenizer_load(path, &r->tok, err, sizeof err) < 0 ||
        mm_backend_cpu_new(r->m, &bo, &r->be, err, sizeof err) < 0 ||
        (fault_steps >= 0 &&
         mm_backend_fault_wrap(r->be, fault_steps, &r->be, err, sizeof err) < 0) ||
        mm_engine_new(r->be, r->tok, &r->m->cfg, &eo, &r->e, err, sizeof err) < 0 ||
        mm_engine_start(r->e, err, sizeof err) < 0) {
        printf("  rig: %s\n", err);
        return -1;
    }
    return 0;
}

static int rig_new_pool(rig *r, int max_seqs, int max_len, int step_tokens, int block_size,
                        int num_blocks)
{
    return rig_new_fault(r, max_seqs, max_len, step_tokens, block_size, num_blocks, -1);
}

static int rig_new(rig *r, int max_seqs, int max_len, int step_tokens)
{
    return rig_new_pool(r, max_seqs, max_len, step_tokens, 0, 0);
}

static void rig_free(rig *r)
{
    mm_engine_free(r->e);
    if (r->be)
        r->be->ops->free(r->be);
    mm_tokenizer_free(r->tok);
    mm_model_free(r->m);
}

/* ---- sequences under test ---- */

typedef struct tseq {
    mm_seq       *s;
    mm_seq_outbox got;
    int           done;
} tseq;

static void on_take(mm_seq *s, void *arg)
{
    (void)arg;
    tseq *t = mm_seq_udata(s);
    if (t && !t->done && mm_seq_take(s, &t->got))
        t->done = 1;
}

static int tseq_new(rig *r, tseq *t, const char *prompt, const mm_seq_params *p)
{
    char err[256];
    mm_tok_ids ids;
    mm_tok_ids_init(&ids, 4096);
    memset(t, 0, sizeof *t);
    mm_seq_outbox_init(&t->got);
    int rc = mm_tokenizer_encode(r->tok, prompt, strlen(prompt), 0, &ids, err, sizeof err);
    if (rc == 0)
        rc = mm_seq_new(ids.v, ids.n, p, &t->s);
    mm_tok_ids_free(&ids);
    if (rc == 0)
        mm_seq_set_udata(t->s, t);
    return rc;
}

static void tseq_free(tseq *t)
{
    if (t->s) {
        mm_seq_set_udata(t->s, NULL);
        mm_seq_release(t->s);
    }
    mm_seq_outbox_free(&t->got);
    memset(t, 0, sizeof *t);
}

/* A slow consumer: the engine publishes (and re-marks sequences) while a
 * drain is still walking the list it detached. */
static void on_take_slow(mm_seq *s, void *arg)
{
    on_take(s, arg);
    usleep(200);
}

/* Drain until every sequence finished; -1 after timeout_ms. */
static void (*take_fn)(mm_seq *s, void *arg) = on_take;

static int wait_all(rig *r, tseq *ts, int n, int timeout_ms)
{
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        mm_engine_drain(r->e, take_fn, NULL);
        int left = 0;
        for (int i = 0; i < n; i++)
            left += !ts[i].done;
        if (!left)
            return 0;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms > timeout_ms)
            return -1;
        pthread_mutex_lock(&poke_m);
        if (!pokes) {
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += 20 * 1000000;
            if (dl.tv_nsec >= 1000000000) {
                dl.tv_sec++;
                dl.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&poke_c, &poke_m, &dl);
        }
        pokes = 0;
        pthread_mutex_unlock(&poke_m);
    }
}

static const char *prompts[] = {
    "Hello there, how are you today?",
    "The quick brown fox",
    "a",
    "Once upon a time in a land far away, there lived a",
    "1 2 3 4 5 6",
    "What is the capital of France? The capital of France is",
};
#define NPROMPTS 6

static mm_seq_params greedy(int max_tokens)
{
    mm_seq_params p;
    mm_seq_params_defaults(&p);
    p.samp.temperature = 0;
    p.max_tokens = max_tokens;
    p.ignore_eos = 1;
    return p;
}

static int same_ids(const mm_seq_outbox *a, const mm_seq_outbox *b)
{
    if (a->ntoks != b->ntoks)
        return 0;
    for (size_t i = 0; i < a->ntoks; i++)
        if (a->toks[i].id != b->toks[i].id)
            return 0;
    return 1;
}

/* ---- tests ---- */

TEST(greedy_alone_equals_batched)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 8, 256, 512), 0);
    tseq alone[NPROMPTS], batch[NPROMPTS];
    mm_seq_params p = greedy(12);
    for (int i = 0; i < NPROMPTS; i++) {
        ASSERT_EQ(tseq_new(&r, &alone[i], prompts[i], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, alone[i].s), 0);
        ASSERT_EQ(wait_all(&r, &alone[i], 1, 10000), 0);
        ASSERT_EQ(alone[i].got.finish, MM_FINISH_LENGTH);
        ASSERT_EQ(alone[i].got.n_gen, 12);
    }
    for (int i = 0; i < NPROMPTS; i++) {
        ASSERT_EQ(tseq_new(&r, &batch[i], prompts[i], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, batch[i].s), 0);
    }
    ASSERT_EQ(wait_all(&r, batch, NPROMPTS, 10000), 0);
    for (int i = 0; i < NPROMPTS; i++)
        ASSERT_TRUE(same_ids(&alone[i].got, &batch[i].got));
    mm_engine_stats st;
    mm_engine_get_stats(r.e, &st);
    ASSERT_EQ(st.finished[MM_FINISH_LENGTH], 2 * NPROMPTS);
    ASSERT_EQ(st.generation_tokens, 2 * NPROMPTS * 12);
    ASSERT_EQ(st.ttft.n, 2 * NPROMPTS);
    ASSERT_EQ(st.running, 0);
    for (int i = 0; i < NPROMPTS; i++) {
        tseq_free(&alone[i]);
        tseq_free(&batch[i]);
    }
    rig_free(&r);
}

TEST(seeded_sampling_is_batch_independent)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 4, 256, 512), 0);
    mm_seq_params p;
    mm_seq_params_defaults(&p);
    p.samp.temperature = 1.0f;
    p.samp.top_p = 0.95f;
    p.max_tokens = 16;
    p.ignore_eos = 1;
    p.has_seed = 1;
    p.seed = 1234;
    tseq a, b[3], c, d;
    ASSERT_EQ(tseq_new(&r, &a, prompts[0], &p), 0);
    ASSERT_EQ(mm_engine_submit(r.e, a.s), 0);
    ASSERT_EQ(wait_all(&r, &a, 1, 10000), 0);
    /* The same request among others. */
    ASSERT_EQ(tseq_new(&r, &b[0], prompts[3], &p), 0);
    ASSERT_EQ(tseq_new(&r, &b[1], prompts[0], &p), 0);
    mm_seq_params q = p;
    q.seed = 99;
    ASSERT_EQ(tseq_new(&r, &b[2], prompts[1], &q), 0);
    for (int i = 0; i < 3; i++)
        ASSERT_EQ(mm_engine_submit(r.e, b[i].s), 0);
    ASSERT_EQ(wait_all(&r, b, 3, 10000), 0);
    ASSERT_TRUE(same_ids(&a.got, &b[1].got));
    /* Another seed gives another text. */
    ASSERT_EQ(tseq_new(&r, &c, prompts[0], &q), 0);
    ASSERT_EQ(mm_engine_submit(r.e, c.s), 0);
    ASSERT_EQ(wait_all(&r, &c, 1, 10000), 0);
    ASSERT_TRUE(!same_ids(&a.got, &c.got));
    /* No seed: the engine's generator picks one (different from 1234's). */
    mm_seq_params u = p;
    u.has_seed = 0;
    ASSERT_EQ(tseq_new(&r, &d, prompts[0], &u), 0);
    ASSERT_EQ(mm_engine_submit(r.e, d.s), 0);
    ASSERT_EQ(wait_all(&r, &d, 1, 10000), 0);
    ASSERT_EQ(d.got.n_gen, 16);
    tseq_free(&a);
    tseq_free(&c);
    tseq_free(&d);
    for (int i = 0; i < 3; i++)
        tseq_free(&b[i]);
    rig_free(&r);
}

TEST(sequences_beyond_max_seqs_wait_their_turn)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 2, 128, 64), 0);
    tseq t[5];
    mm_seq_params p = greedy(20);
    for (int i = 0; i < 5; i++) {
        ASSERT_EQ(tseq_new(&r, &t[i], prompts[i], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, t[i].s), 0);
    }
    ASSERT_EQ(wait_all(&r, t, 5, 20000), 0);
    for (int i = 0; i < 5; i++) {
        ASSERT_EQ(t[i].got.finish, MM_FINISH_LENGTH);
        ASSERT_EQ(t[i].got.n_gen, 20);
        tseq_free(&t[i]);
    }
    mm_engine_stats st;
    mm_engine_get_stats(r.e, &st);
    ASSERT_EQ(st.finished[MM_FINISH_LENGTH], 5);
    ASSERT_EQ(st.running, 0);
    ASSERT_EQ(st.waiting, 0);
    rig_free(&r);
}

TEST(cancel_frees_the_slot)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 1, 4096, 512), 0);
    tseq a, b;
    mm_seq_params long_p = greedy(4000), short_p = greedy(5);
    ASSERT_EQ(tseq_new(&r, &a, prompts[0], &long_p), 0);
    ASSERT_EQ(tseq_new(&r, &b, prompts[1], &short_p), 0);
    ASSERT_EQ(mm_engine_submit(r.e, a.s), 0);
    /* Wait until a is producing, then queue b behind it and cancel a. */
    for (int i = 0; i < 500 && a.got.n_gen < 3; i++) {
        mm_engine_drain(r.e, on_take, NULL);
        usleep(2000);
    }
    ASSERT_TRUE(a.got.n_gen >= 3);
    ASSERT_EQ(mm_engine_submit(r.e, b.s), 0);
    mm_seq_cancel(a.s);
    ASSERT_EQ(wait_all(&r, &b, 1, 10000), 0);
    ASSERT_EQ(wait_all(&r, &a, 1, 10000), 0);
    ASSERT_EQ(a.got.finish, MM_FINISH_ABORT);
    ASSERT_TRUE(a.got.n_gen < 4000);
    ASSERT_EQ(b.got.finish, MM_FINISH_LENGTH);
    ASSERT_EQ(b.got.n_gen, 5);
    tseq_free(&a);
    tseq_free(&b);
    rig_free(&r);
}

/* A printable ASCII pair in text at or after byte 1 (a stop string that
 * cannot be confused with a partial UTF-8 character). */
static int find_ascii_pair(const char *t, size_t n)
{
    for (size_t i = 1; i + 1 < n; i++)
        if (t[i] > 0x20 && t[i] < 0x7f && t[i + 1] > 0x20 && t[i + 1] < 0x7f)
            return (int)i;
    return -1;
}

TEST(stop_string_and_stop_ids_end_the_sequence)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 4, 256, 512), 0);
    mm_seq_params p = greedy(40);
    p.skip_special = 1;
    tseq ref, st, sid;
    int found = -1, which = 0;
    for (which = 0; which < NPROMPTS && found < 0; which++) {
        ASSERT_EQ(tseq_new(&r, &ref, prompts[which], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, ref.s), 0);
        ASSERT_EQ(wait_all(&r, &ref, 1, 10000), 0);
        found = find_ascii_pair(ref.got.text.data ? ref.got.text.data : "", ref.got.text.len);
        if (found < 0)
            tseq_free(&ref);
    }
    ASSERT_TRUE(found >= 0);
    which--;
    char stop[3] = {ref.got.text.data[found], ref.got.text.data[found + 1], 0};
    const char *first = strstr(ref.got.text.data, stop);
    size_t cut = (size_t)(first - ref.got.text.data);
    mm_seq_params ps = p;
    ps.n_stop = 1;
    ps.stop[0] = stop;
    ps.stop_len[0] = 2;
    ASSERT_EQ(tseq_new(&r, &st, prompts[which], &ps), 0);
    ASSERT_EQ(mm_engine_submit(r.e, st.s), 0);
    ASSERT_EQ(wait_all(&r, &st, 1, 10000), 0);
    ASSERT_EQ(st.got.finish, MM_FINISH_STOP);
    ASSERT_EQ(st.got.stop_str, 0);
    ASSERT_EQ(st.got.text.len, cut);
    ASSERT_TRUE(cut == 0 || memcmp(st.got.text.data, ref.got.text.data, cut) == 0);

    /* A stop token id: the sequence ends on its first occurrence, and the
     * token's text is not part of the output. */
    int32_t target = ref.got.toks[5].id;
    size_t first_at = 0;
    while (ref.got.toks[first_at].id != target)
        first_at++;
    mm_seq_params pi = p;
    pi.n_stop_ids = 1;
    pi.stop_ids[0] = target;
    ASSERT_EQ(tseq_new(&r, &sid, prompts[which], &pi), 0);
    ASSERT_EQ(mm_engine_submit(r.e, sid.s), 0);
    ASSERT_EQ(wait_all(&r, &sid, 1, 10000), 0);
    ASSERT_EQ(sid.got.finish, MM_FINISH_STOP);
    ASSERT_EQ(sid.got.stop_tok, target);
    ASSERT_EQ(sid.got.n_gen, first_at + 1);
    mm_buf dec;
    mm_buf_init(&dec, 1 << 20);
    int32_t ids[64];
    for (size_t i = 0; i < first_at; i++)
        ids[i] = ref.got.toks[i].id;
    mm_tokenizer_decode(r.tok, ids, first_at, 1, &dec);
    ASSERT_EQ(sid.got.text.len, dec.len);
    ASSERT_TRUE(dec.len == 0 || memcmp(sid.got.text.data, dec.data, dec.len) == 0);
    mm_buf_free(&dec);
    tseq_free(&ref);
    tseq_free(&st);
    tseq_free(&sid);
    rig_free(&r);
}

TEST(streamed_text_equals_decode)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 4, 256, 512), 0);
    mm_seq_params p;
    mm_seq_params_defaults(&p);
    p.samp.temperature = 1.5f;     /* wild: many partial UTF-8 sequences */
    p.max_tokens = 60;
    p.ignore_eos = 1;
    p.has_seed = 1;
    for (int k = 0; k < 4; k++) {
        p.seed = (uint64_t)k;
        tseq t;
        ASSERT_EQ(tseq_new(&r, &t, prompts[k], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, t.s), 0);
        ASSERT_EQ(wait_all(&r, &t, 1, 10000), 0);
        int32_t ids[60];
        for (size_t i = 0; i < t.got.ntoks; i++)
            ids[i] = t.got.toks[i].id;
        mm_buf dec;
        mm_buf_init(&dec, 1 << 20);
        mm_tokenizer_decode(r.tok, ids, t.got.ntoks, 1, &dec);
        ASSERT_EQ(t.got.ntoks, 60);
        ASSERT_EQ(t.got.text.len, dec.len);
        ASSERT_TRUE(memcmp(t.got.text.data, dec.data, dec.len) == 0);
        mm_buf_free(&dec);
        tseq_free(&t);
    }
    rig_free(&r);
}

TEST(prompt_logprobs_agree_with_generation)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 4, 256, 512), 0);
    mm_seq_params p = greedy(1);
    p.logprobs = 3;
    tseq g, e;
    ASSERT_EQ(tseq_new(&r, &g, prompts[0], &p), 0);
    ASSERT_EQ(mm_engine_submit(r.e, g.s), 0);
    ASSERT_EQ(wait_all(&r, &g, 1, 10000), 0);
    ASSERT_EQ(g.got.ntoks, 1);
    ASSERT_EQ(g.got.toks[0].ntop, 3);
    /* Greedy picks the most likely token: its logprob is the top one. */
    ASSERT_EQ(g.got.top[0].id, g.got.toks[0].id);
    ASSERT_TRUE(fabsf(g.got.top[0].lp - g.got.toks[0].lp) < 1e-6f);
    ASSERT_TRUE(g.got.toks[0].lp < 0);

    /* Prompt + that token, scored: the last entry is the same number. */
    mm_tok_ids ids;
    char err[128];
    mm_tok_ids_init(&ids, 4096);
    mm_tokenizer_encode(r.tok, prompts[0], strlen(prompts[0]), 0, &ids, err, sizeof err);
    mm_tok_ids_push(&ids, g.got.toks[0].id);
    mm_seq_params q = greedy(0);
    q.prompt_logprobs = 2;
    memset(&e, 0, sizeof e);
    mm_seq_outbox_init(&e.got);
    ASSERT_EQ(mm_seq_new(ids.v, ids.n, &q, &e.s), 0);
    mm_seq_set_udata(e.s, &e);
    ASSERT_EQ(mm_engine_submit(r.e, e.s), 0);
    ASSERT_EQ(wait_all(&r, &e, 1, 10000), 0);
    ASSERT_EQ(e.got.finish, MM_FINISH_LENGTH);
    ASSERT_EQ(e.got.n_gen, 0);
    ASSERT_EQ(e.got.prompt_lp_ready, 1);
    const mm_tok_lp *top;
    const mm_gen_tok *pl = mm_seq_prompt_logprobs(e.s, &top);
    ASSERT_TRUE(pl != NULL);
    ASSERT_TRUE(isnan(pl[0].lp));
    ASSERT_EQ(pl[ids.n - 1].id, g.got.toks[0].id);
    ASSERT_TRUE(fabsf(pl[ids.n - 1].lp - g.got.toks[0].lp) < 1e-3f);
    ASSERT_EQ(pl[ids.n - 1].ntop, 2);
    for (size_t i = 1; i < ids.n; i++)
        ASSERT_TRUE(pl[i].lp <= 0 && pl[i].id == ids.v[i]);
    mm_tok_ids_free(&ids);
    tseq_free(&g);
    tseq_free(&e);
    rig_free(&r);
}

TEST(context_limit_ends_with_length)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 2, 24, 512), 0);
    mm_seq_params p = greedy(1000);
    tseq t;
    ASSERT_EQ(tseq_new(&r, &t, prompts[1], &p), 0);
    size_t n_prompt = mm_seq_prompt_len(t.s);
    ASSERT_TRUE(n_prompt < 24);
    ASSERT_EQ(mm_engine_submit(r.e, t.s), 0);
    ASSERT_EQ(wait_all(&r, &t, 1, 10000), 0);
    ASSERT_EQ(t.got.finish, MM_FINISH_LENGTH);
    ASSERT_EQ(t.got.n_gen, 24 - n_prompt);
    tseq_free(&t);
    rig_free(&r);
}

TEST(drain_while_the_engine_publishes)
{
    rig r;
    ASSERT_EQ(rig_new(&r, 8, 512, 512), 0);
    tseq t[8];
    mm_seq_params p = greedy(300);
    for (int i = 0; i < 8; i++) {
        ASSERT_EQ(tseq_new(&r, &t[i], prompts[i % NPROMPTS], &p), 0);
        ASSERT_EQ(mm_engine_submit(r.e, t[i].s), 0);
    }
    take_fn = on_take_slow;
    int rc = wait_all(&r, t, 8, 60000);
    take_fn = on_take;
    ASSERT_EQ(rc, 0);
    for (int i = 0; i < 8; i++) {
        ASSERT_EQ(t[i].got.ntoks, 300);
        ASSERT_EQ(t[i].got.finish, MM_FINISH_LENGTH);
        tseq_free(&t[i]);
    }
    rig_free(&r);
}

/* ---- the KV pool: preemption and recompute ---- */

static int same_text(const mm_seq_outbox *a, const mm_seq_outbox *b)
{
    return a->text.len == b->text.len &&
           (a->text.len == 0 || memcmp(a->text.data, b->text.data, a->text.len) == 0);
}

/* Run each sequence alone (one at a time) on r. */
static int run_alone(rig *r, tseq *t, const char *const *text, const mm_seq_params *p, int n)
{
    for (int i = 0; i < n; i++)
        if (tseq_new(r, &t[i], text[i], &p[i]) < 0 || mm_engine_submit(r->e, t[i].s) < 0 ||
            wait_all(r, &t[i], 1, 20000) < 0)
            return -1;
    return 0;
}

/* The engine is stopped (its thread joined) before reading the pool. */
static int blocks_left(rig *r)
{
    mm_engine_free(r->e);
    r->e = NULL;
    return r->be->blocks_used;
}

#define NPRE 16

TEST(preemption_keeps_every_output)
{
    /* 16 sequences of 9..54 positions each against a pool of 128 positions
     * (the least a max_len of 128 allows): most steps must preempt. Some
     * take the argmax path, some the sampler (logprobs, a penalty). */
    const char *text[NPRE];
    mm_seq_params p[NPRE];
    size_t prompt_sum = 0;
    for (int i = 0; i < NPRE; i++) {
        text[i] = prompts[i % NPROMPTS];
        p[i] = greedy(30 + i);
        if (i % 4 == 3)
            p[i].logprobs = 2;
        if (i % 4 == 2)
            p[i].samp.repetition_penalty = 1.3f;
    }
    rig big, tight;
    ASSERT_EQ(rig_new(&big, 16, 128, 512), 0);
    tseq alone[NPRE], t[NPRE];
    ASSERT_EQ(run_alone(&big, alone, text, p, NPRE), 0);
    rig_free(&big);

    ASSERT_EQ(rig_new_pool(&tight, 16, 128, 512, 4, 32), 0);
    ASSERT_EQ(tight.be->num_blocks, 32);
    for (int i = 0; i < NPRE; i++) {
        ASSERT_EQ(tseq_new(&tight, &t[i], text[i], &p[i]), 0);
        prompt_sum += mm_seq_prompt_len(t[i].s);
        ASSERT_EQ(mm_engine_submit(tight.e, t[i].s), 0);
    }
    ASSERT_EQ(wait_all(&tight, t, NPRE, 60000), 0);
    for (int i = 0; i < NPRE; i++) {
        if (!same_ids(&alone[i].got, &t[i].got) || !same_text(&alone[i].got, &t[i].got))
            printf("  sequence %d differs\n", i);
        ASSERT_EQ(t[i].got.finish, MM_FINISH_LENGTH);
        ASSERT_EQ(t[i].got.n_gen, 30 + i);
        ASSERT_TRUE(same_ids(&alone[i].got, &t[i].got));
        ASSERT_TRUE(same_text(&alone[i].got, &t[i].got));
        for (size_t k = 0; k < t[i].got.ntoks && p[i].logprobs >= 0; k++)
            ASSERT_LT(fabsf(t[i].got.toks[k].lp - alone[i].got.toks[k].lp), 1e-3);
    }
    mm_engine_stats st;
    mm_engine_get_stats(tight.e, &st);
    printf("  %llu preemptions in %llu steps\n", (unsigned long long)st.preemptions,
           (unsigned long long)st.steps);
    ASSERT_TRUE(st.preemptions > 0);
    /* counted once per sequence, however often it was recomputed */
    ASSERT_EQ(st.prompt_tokens, prompt_sum);
    ASSERT_EQ(st.ttft.n, NPRE);
    ASSERT_EQ(st.finished[MM_FINISH_LENGTH], NPRE);
    ASSERT_EQ(st.finished[MM_FINISH_ERROR], 0);
    ASSERT_EQ(blocks_left(&tight), 0);
    for (int i = 0; i < NPRE; i++) {
        tseq_free(&alone[i]);
        tseq_free(&t[i]);
    }
    rig_free(&tight);
}

TEST(preemption_keeps_seeded_sampling)
{
    /* g (older) and s (younger) decode side by side until the pool of 96
     * positions is full: then s, the youngest, is preempted part way and
     * recomputes once g is done. Its draws must not move. */
    mm_seq_params pg = greedy(80), ps;
    mm_seq_params_defaults(&ps);
    ps.samp.temperature = 0.9f;
    ps.samp.top_k = 40;
    ps.samp.presence_penalty = 0.3f;
    ps.max_tokens = 60;
    ps.ignore_eos = 1;
    ps.has_seed = 1;
    ps.seed = 4242;
    rig big, tight;
    tseq alone, g, s;
    ASSERT_EQ(rig_new(&big, 2, 96, 512), 0);
    ASSERT_EQ(tseq_new(&big, &alone, prompts[2], &ps), 0);
    ASSERT_EQ(mm_engine_submit(big.e, alone.s), 0);
    ASSERT_EQ(wait_all(&big, &alone, 1, 20000), 0);
    rig_free(&big);

    ASSERT_EQ(rig_new_pool(&tight, 2, 96, 512, 4, 24), 0);
    ASSERT_EQ(tseq_new(&tight, &g, prompts[1], &pg), 0);
    ASSERT_EQ(tseq_new(&tight, &s, prompts[2], &ps), 0);
    ASSERT_TRUE(mm_seq_prompt_len(g.s) + 80 <= 96);
    ASSERT_TRUE(mm_seq_prompt_len(g.s) + mm_seq_prompt_len(s.s) + 80 + 60 > 96 + 40);
    ASSERT_EQ(mm_engine_submit(tight.e, g.s), 0);
    ASSERT_EQ(mm_engine_submit(tight.e, s.s), 0);
    ASSERT_EQ(wait_all(&tight, &g, 1, 20000), 0);
    ASSERT_EQ(wait_all(&tight, &s, 1, 20000), 0);
    mm_engine_stats st;
    mm_engine_get_stats(tight.e, &st);
    ASSERT_TRUE(st.preemptions > 0);
    ASSERT_EQ(g.got.n_gen, 80);
    ASSERT_EQ(s.got.finish, MM_FINISH_LENGTH);
    ASSERT_EQ(s.got.n_gen, 60);
    ASSERT_TRUE(same_ids(&alone.got, &s.got));
    ASSERT_TRUE(same_text(&alone.got, &s.got));
    ASSERT_EQ(blocks_left(&tight), 0);
    tseq_free(&alone);
    tseq_free(&g);
    tseq_free(&s);
    rig_free(&tight);
}

TEST(pool_smaller_than_one_sequence_is_refused)
{
    char err[512], path[256];
    mm_model *m = NULL;
    mm_tokenizer *tok = NULL;
    mm_backend *be = NULL;
    mm_engine *e = NULL;
    mm_model_load_opts lo = {.quiet = 1};
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    ASSERT_EQ(mm_model_load(model_dir, &lo, &m, err, sizeof err), 0);
    ASSERT_EQ(mm_tokenizer_load(path, &tok, err, sizeof err), 0);
    mm_backend_opts bo = {.max_seqs = 4, .max_len = 100, .threads = 1, .block_size = 8,
                          .num_blocks = 12};
    ASSERT_EQ(mm_backend_cpu_new(m, &bo, &be, err, sizeof err), 0);
    mm_engine_opts eo = {.step_tokens = 64};
    ASSERT_EQ(mm_engine_new(be, tok, &m->cfg, &eo, &e, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "--max-model-len 100");
    ASSERT_CONTAINS(err, "--num-gpu-blocks-override");
    be->ops->free(be);
    bo.num_blocks = 13;   /* 104 positions */
    ASSERT_EQ(mm_backend_cpu_new(m, &bo, &be, err, sizeof err), 0);
    ASSERT_EQ(mm_engine_new(be, tok, &m->cfg, &eo, &e, err, sizeof err), 0);
    /* the engine bounds the backend's argmax as it bounds sampling */
    ASSERT_EQ(be->n_valid, mm_engine_valid_vocab(e));
    ASSERT_TRUE(be->n_valid < m->cfg.vocab_size);
    mm_engine_free(e);
    be->ops->free(be);
    mm_tokenizer_free(tok);
    mm_model_free(m);
}

/* ---- the greedy fast path ---- */

TEST(plain_greedy_predicate)
{
    mm_sampling sp;
    mm_sampling_defaults(&sp);
    int32_t ban = 2, bias_id = 5;
    float bias_val = 1.0f;
    mm_sample_hist h = {NULL, 0, NULL, 0, NULL, 0};
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, &h), 0);        /* temperature 1 */
    sp.temperature = 0;
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, &h), 1);
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, NULL), 1);
    sp.top_p = 0.5f, sp.top_k = 3, sp.min_p = 0.2f;         /* no effect on greedy */
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, &h), 1);
    sp.repetition_penalty = 0;                             /* ignored by the sampler */
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, &h), 1);
    mm_sampling q = sp;
    q.repetition_penalty = 1.1f;
    ASSERT_EQ(mm_sampling_plain_greedy(&q, &h), 0);
    ASSERT_EQ(mm_sampling_plain_greedy(&q, NULL), 1);        /* no history: not applied */
    q = sp;
    q.presence_penalty = 0.5f;
    ASSERT_EQ(mm_sampling_plain_greedy(&q, &h), 0);
    q = sp;
    q.frequency_penalty = -0.5f;
    ASSERT_EQ(mm_sampling_plain_greedy(&q, &h), 0);
    q = sp;
    q.bias_ids = &bias_id, q.bias_val = &bias_val, q.n_bias = 1;
    ASSERT_EQ(mm_sampling_plain_greedy(&q, &h), 0);
    ASSERT_EQ(mm_sampling_plain_greedy(&q, NULL), 0);
    mm_sample_hist hb = {NULL, 0, NULL, 0, &ban, 1};        /* min_tokens not reached */
    ASSERT_EQ(mm_sampling_plain_greedy(&sp, &hb), 0);
    /* where it says plain, mm_sample is the first best finite id below n_valid */
    mm_sampler_ws ws;
    ASSERT_EQ(mm_sampler_ws_init(&ws, 8), 0);
    mm_xrng rng;
    mm_xrng_seed(&rng, 3);
    float row[8] = {1, 3, NAN, 3, -INFINITY, 3, 9, 2};
    ASSERT_EQ(mm_sample(row, 8, 6, &sp, &h, &rng, &ws), 1);
    ASSERT_EQ(mm_sample(row, 8, 8, &sp, &h, &rng, &ws), 6);
    mm_sampler_ws_free(&ws);
}

TEST(argmax_path_picks_what_the_sampler_picks)
{
    /* Plain greedy goes through the backend's argmax; logprobs = 0 makes
     * the same choice go through the logits row and the sampler. Together
     * in one batch and each alone, the tokens agree. */
    rig r;
    ASSERT_EQ(rig_new(&r, 12, 256, 512), 0);
    tseq fast[NPROMPTS], full[NPROMPTS];
    mm_seq_params pf = greedy(40), pl = greedy(40);
    pl.logprobs = 0;
    for (int i = 0; i < NPROMPTS; i++) {
        ASSERT_EQ(tseq_new(&r, &fast[i], prompts[i], &pf), 0);
        ASSERT_EQ(tseq_new(&r, &full[i], prompts[i], &pl), 0);
        ASSERT_EQ(mm_engine_submit(r.e, fast[i].s), 0);
        ASSERT_EQ(mm_engine_submit(r.e, full[i].s), 0);
    }
    ASSERT_EQ(wait_all(&r, fast, NPROMPTS, 20000), 0);
    ASSERT_EQ(wait_all(&r, full, NPROMPTS, 20000), 0);
    for (int i = 0; i < NPROMPTS; i++) {
        ASSERT_EQ(fast[i].got.ntoks, 40);
        ASSERT_TRUE(same_ids(&fast[i].got, &full[i].got));
        ASSERT_TRUE(same_text(&fast[i].got, &full[i].got));
        ASSERT_TRUE(isnan(fast[i].got.toks[0].lp));     /* no row was read */
        ASSERT_TRUE(full[i].got.toks[0].lp <= 0);
        tseq_free(&fast[i]);
        tseq_free(&full[i]);
    }
    for (int i = 0; i < NPROMPTS; i++) {
        ASSERT_EQ(tseq_new(&r, &fast[0], prompts[i], &pf), 0);
        ASSERT_EQ(tseq_new(&r, &full[0], prompts[i], &pl), 0);
        ASSERT_EQ(mm_engine_submit(r.e, fast[0].s), 0);
        ASSERT_EQ(wait_all(&r, &fast[0], 1, 20000), 0);
        ASSERT_EQ(mm_engine_submit(r.e, full[0].s), 0);
        ASSERT_EQ(wait_all(&r, &full[0], 1, 20000), 0);
        ASSERT_TRUE(same_ids(&fast[0].got, &full[0].got));
        tseq_free(&fast[0]);
        tseq_free(&full[0]);
    }
    rig_free(&r);
}

/* A backend that reports its device lost, as the CUDA backend does on a
 * sticky error (here injected after 3 steps): the sequences held then -
 * the running one and the one waiting for its slot - fail with the error,
 * the engine says it is dead, and it refuses new sequences. */
TEST(lost_device_fails_everything_and_refuses_more)
{
    rig r;
    ASSERT_EQ(rig_new_fault(&r, 1, 128, 512, 0, 0, 3), 0);
    mm_seq_params p = greedy(20);
    tseq t[2], late;
    ASSERT_EQ(tseq_new(&r, &t[0], prompts[0], &p), 0);
    ASSERT_EQ(tseq_new(&r, &t[1], prompts[1], &p), 0);
    ASSERT_EQ(mm_engine_submit(r.e, t[0].s), 0);
    ASSERT_EQ(mm_engine_submit(r.e, t[1].s), 0);
    ASSERT_EQ(wait_all(&r, t, 2, 10000), 0);
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ(t[i].got.finish, MM_FINISH_ERROR);
        ASSERT_TRUE(strstr(t[i].got.error, "device lost") != NULL);
    }
    /* one slot: the first ran (prefill and two decode steps' worth of
     * tokens at most), the second never started */
    ASSERT_TRUE(t[0].got.n_gen >= 1 && t[0].got.n_gen < 20);
    ASSERT_EQ(t[1].got.n_gen, 0);
    char msg[320] = "";
    ASSERT_EQ(mm_engine_dead(r.e, msg, sizeof msg), 1);
    ASSERT_TRUE(strstr(msg, "device lost") != NULL);
    ASSERT_EQ(tseq_new(&r, &late, prompts[2], &p), 0);
    ASSERT_EQ(mm_engine_submit(r.e, late.s), -ENOTRECOVERABLE);
    tseq_free(&late);
    tseq_free(&t[0]);
    tseq_free(&t[1]);
    rig_free(&r);
}

int main(void)
{
    snprintf(root, sizeof root, "/tmp/mm_test_engine_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(model_dir, sizeof model_dir, "%s/m", root);
    mm_makemodel_opts o;
    mm_makemodel_defaults(&o);
    o.std = 0.5;   /* peaked distributions: greedy choices far from ties */
    o.seed = 11;
    char err[256];
    if (mm_makemodel(model_dir, &o, err, sizeof err) < 0) {
        printf("makemodel: %s\n", err);
        return 1;
    }
    RUN(greedy_alone_equals_batched);
    RUN(seeded_sampling_is_batch_independent);
    RUN(sequences_beyond_max_seqs_wait_their_turn);
    RUN(cancel_frees_the_slot);
    RUN(stop_string_and_stop_ids_end_the_sequence);
    RUN(streamed_text_equals_decode);
    RUN(prompt_logprobs_agree_with_generation);
    RUN(context_limit_ends_with_length);
    RUN(drain_while_the_engine_publishes);
    RUN(preemption_keeps_every_output);
    RUN(preemption_keeps_seeded_sampling);
    RUN(pool_smaller_than_one_sequence_is_refused);
    RUN(plain_greedy_predicate);
    RUN(argmax_path_picks_what_the_sampler_picks);
    RUN(lost_device_fails_everything_and_refuses_more);
    test_rm_tree(root);
    return test_summary();
}
