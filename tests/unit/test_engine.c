/* test_engine.c: the scheduler on a tiny generated model and the CPU
 * backend: batching must not change greedy or seeded outputs, queued
 * sequences wait for slots, a cancelled one frees its slot, stops and
 * lengths end sequences where they should, and the streamed text equals
 * the tokenizer's decode of the same ids. */
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

static void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char p[512];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(p, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(p);
        else
            unlink(p);
    }
    if (d)
        closedir(d);
    rmdir(dir);
}

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

static int rig_new(rig *r, int max_seqs, int max_len, int step_tokens)
{
    char err[512], path[256];
    memset(r, 0, sizeof *r);
    mm_model_load_opts lo = {.quiet = 1};
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    mm_backend_opts bo = {.max_seqs = max_seqs, .max_len = max_len, .threads = 2};
    mm_engine_opts eo = {.step_tokens = step_tokens, .seed = 1, .notify = notify};
    if (mm_model_load(model_dir, &lo, &r->m, err, sizeof err) < 0 ||
        mm_tokenizer_load(path, &r->tok, err, sizeof err) < 0 ||
        mm_backend_cpu_new(r->m, &bo, &r->be, err, sizeof err) < 0 ||
        mm_engine_new(r->be, r->tok, &r->m->cfg, &eo, &r->e, err, sizeof err) < 0 ||
        mm_engine_start(r->e, err, sizeof err) < 0) {
        printf("  rig: %s\n", err);
        return -1;
    }
    return 0;
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
    rm_tree(root);
    return test_summary();
}
