/* backend_tp.c: one model over several GPUs (--tensor-parallel-size N).
 *
 * N ranks, each a cuda backend (backend_cuda.c) holding its shard of the
 * weights and of the KV cache on device i of those CUDA_VISIBLE_DEVICES
 * leaves visible, each driven by a host thread of its own. forward() hands
 * the step to every rank thread and waits: each rank runs the whole step on
 * its shard - its query heads, its slice of the MLP, its slice of the
 * vocabulary - summing the o and down products' outputs over the ranks with
 * NCCL (inside its CUDA graphs too), and writes its columns of the caller's
 * logits rows; the ranks' argmax keys are merged here. reserve/truncate run
 * the same calls in the same order on every rank, so their block tables
 * stay the same.
 *
 * Threads in one process rather than a process per GPU (vLLM's way): the
 * ranks read the engine's batch and write the caller's buffers directly,
 * with no IPC, and one process is one thing for the fleet to supervise.
 *
 * Failure: a rank whose step fails (a lost GPU) leaves its peers waiting in
 * a sum that never completes, so forward() does not wait for them: it gives
 * them a grace period, then reports the device lost (the engine fails every
 * request and the worker exits, to be restarted). After that nothing is
 * torn down: free() leaves threads that never came back where they are,
 * and no communicator is destroyed or aborted (on a GPU with a sticky
 * error, ncclCommAbort was seen to wait forever). */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "cuda_rank.h"
#include "errmsg.h"
#include "kernels/kernels.h"
#include "log.h"
#include "model.h"
#include "nccl_dl.h"

#define TP_MAX   MM_K_TP_MAX
#define GRACE_S  5  /* how long the other ranks get to finish after one failed */

typedef struct tp_backend tp_backend;

typedef struct tp_rank {
    tp_backend *t;
    int         idx;
    pthread_t   th;
    int         started;
    mm_backend *b;
    int         rc;
    char        err[512];
} tp_rank;

struct tp_backend {
    mm_backend     base;
    int            n;
    tp_rank        r[TP_MAX];
    void          *comm[TP_MAX];
    int            comms;      /* 1 while the communicators exist (not aborted) */
    mm_backend_opts o;

    pthread_mutex_t mu;
    pthread_cond_t  go, done;
    unsigned long  gen;        /* bumped for each job: 1 = create, then steps */
    int            pending;    /* ranks still on the current job */
    int            failed;     /* ranks whose current job failed */
    int            first_bad;  /* the first of them */
    int            quit;
    /* the current step */
    mm_batch_seq  *seqs;
    int            nseqs;
    float         *logits;

    /* agreements during creation (see mm_cuda_rank.agree) */
    pthread_barrier_t bar;
    int            agree_ok[TP_MAX];
    mm_cuda_rank_info agree_info[TP_MAX];

    int            lost;       /* a step failed: every later step fails */
    int            stuck;      /* ...and some rank never came back */
    char           lost_msg[600];
};

/* ---- rank threads ---- */

static void job_done(tp_backend *t, int idx, int rc)
{
    pthread_mutex_lock(&t->mu);
    t->pending--;
    if (rc < 0 && t->failed++ == 0)
        t->first_bad = idx;
    pthread_cond_broadcast(&t->done);
    pthread_mutex_unlock(&t->mu);
}

static int agree(void *ctx, int ok, mm_cuda_rank_info *info, mm_cuda_rank_info *all)
{
    tp_rank *r = ctx;
    tp_backend *t = r->t;
    t->agree_ok[r->idx] = ok;
    t->agree_info[r->idx] = info ? *info : (mm_cuda_rank_info){.nblk = LLONG_MAX};
    pthread_barrier_wait(&t->bar);
    int every = 1;
    for (int i = 0; i < t->n; i++)
        every &= t->agree_ok[i];
    if (every && info)
        for (int i = 0; i < t->n; i++) {
            const mm_cuda_rank_info *o = &t->agree_info[i];
            info->nblk = o->nblk < info->nblk ? o->nblk : info->nblk;
            info->p2p &= o->p2p;
        }
    if (every && all)
        memcpy(all, t->agree_info, (size_t)t->n * sizeof *all);
    /* nobody posts the next round's values before everyone has read these */
    pthread_barrier_wait(&t->bar);
    return every ? 0 : -ECANCELED;
}

static void abort_comms(tp_backend *t)
{
    pthread_mutex_lock(&t->mu);
    int live = t->comms;
    t->comms = 0;
    pthread_mutex_unlock(&t->mu);
    for (int i = 0; live && i < t->n; i++)
        mm_nccl_abort(t->comm[i]);
}

static void abort_cb(void *ctx) { abort_comms(((tp_rank *)ctx)->t); }

/* Wait for the next job; 0 to run it, -1 to quit. */
static int next_job(tp_backend *t, unsigned long *seen)
{
    pthread_mutex_lock(&t->mu);
    while (!t->quit && t->gen == *seen)
        pthread_cond_wait(&t->go, &t->mu);
    int quit = t->quit;
    *seen = t->gen;
    pthread_mutex_unlock(&t->mu);
    return quit ? -1 : 0;
}

static void *rank_main(void *arg)
{
    tp_rank *r = arg;
    tp_backend *t = r->t;
    unsigned long seen = 0;
    if (next_job(t, &seen) < 0) /* creation never started */
        return NULL;
    mm_cuda_rank cr = {.dev = r->idx, .rank = r->idx, .tp = t->n, .comm = t->comm[r->idx],
                       .agree = agree, .abort = abort_cb, .ctx = r};
    r->rc = mm_cuda_rank_new(t->base.model, &t->o, &cr, &r->b, r->err, sizeof r->err);
    job_done(t, r->idx, r->rc);
    if (r->rc < 0)
        return NULL;
    while (next_job(t, &seen) == 0) {
        r->rc = r->b->ops->forward(r->b, t->seqs, t->nseqs, t->logits, r->err, sizeof r->err);
        job_done(t, r->idx, r->rc);
    }
    r->b->ops->free(r->b);
    r->b = NULL;
    return NULL;
}

/* Start a job on every rank and wait for it; with grace, the others get
 * GRACE_S seconds after a failure. Returns 1 when one never came back;
 * *bad: the first rank that failed, or -1. */
static int run_job(tp_backend *t, int grace, int *bad)
{
    pthread_mutex_lock(&t->mu);
    t->pending = t->n;
    t->failed = 0;
    t->gen++;
    pthread_cond_broadcast(&t->go);
    while (t->pending > 0 && (t->failed == 0 || !grace))
        pthread_cond_wait(&t->done, &t->mu);
    if (t->pending > 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += GRACE_S;
        while (t->pending > 0 && pthread_cond_timedwait(&t->done, &t->mu, &until) == 0)
            ;
    }
    int stuck = t->pending > 0;
    *bad = t->failed ? t->first_bad : -1;
    pthread_mutex_unlock(&t->mu);
    return stuck;
}

/* ---- backend ops ---- */

static int tp_forward(mm_backend *base, mm_batch_seq *seqs, int nseqs, float *logits, char *err,
                      size_t errlen)
{
    tp_backend *t = (tp_backend *)base;
    if (t->lost) {
        mm_errf(err, errlen, "%s", t->lost_msg);
        return -ENOTRECOVERABLE;
    }
    for (int i = 0; i < t->n; i++)
        t->r[i].b->n_valid = base->n_valid;
    t->seqs = seqs;
    t->nseqs = nseqs;
    t->logits = logits;
    int bad;
    t->stuck = run_job(t, 1, &bad);
    if (bad < 0) { /* every rank finished (only a failure starts the grace) */
        for (int i = 0; i < nseqs; i++) {
            if (seqs[i].want != MM_LOGITS_ARGMAX)
                continue;
            uint64_t key = 0;
            for (int k = 0; k < t->n; k++) {
                uint64_t kk = mm_cuda_rank_key(t->r[k].b, i);
                key = kk > key ? kk : key;
            }
            seqs[i].argmax = mm_cuda_key_id(key);
        }
        return 0;
    }
    /* A bad batch fails the same way on every rank before anything runs
     * (when none is stuck, every rank's rc is this step's). */
    int all_inval = !t->stuck;
    for (int i = 0; i < t->n && all_inval; i++)
        all_inval = t->r[i].rc == -EINVAL;
    if (all_inval) {
        mm_errf(err, errlen, "%s", t->r[0].err);
        return -EINVAL;
    }
    t->lost = 1;
    snprintf(t->lost_msg, sizeof t->lost_msg, "GPU %d of %d: %s%s", bad, t->n, t->r[bad].err,
             t->stuck ? " (another GPU did not finish the step)" : "");
    mm_errf(err, errlen, "%s", t->lost_msg);
    return -ENOTRECOVERABLE;
}

/* Every rank's allocator sees the same calls in the same order, so they
 * answer alike; rank 0's answer is the one reported. */
static int tp_reserve(mm_backend *base, int slot, int n)
{
    tp_backend *t = (tp_backend *)base;
    int rc = t->r[0].b->ops->reserve(t->r[0].b, slot, n);
    for (int i = 1; i < t->n && rc == 0; i++)
        rc = t->r[i].b->ops->reserve(t->r[i].b, slot, n);
    base->blocks_used = t->r[0].b->blocks_used;
    return rc;
}

static void tp_truncate(mm_backend *base, int slot, int pos)
{
    tp_backend *t = (tp_backend *)base;
    for (int i = 0; i < t->n; i++)
        t->r[i].b->ops->truncate(t->r[i].b, slot, pos);
    base->blocks_used = t->r[0].b->blocks_used;
}

static void tp_free(mm_backend *base)
{
    tp_backend *t = (tp_backend *)base;
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->quit = 1;
    pthread_cond_broadcast(&t->go);
    pthread_mutex_unlock(&t->mu);
    /* A rank stuck in a sum after a peer failed never returns: leave the
     * threads and everything they use (the worker is exiting). */
    if (t->stuck)
        return;
    for (int i = 0; i < t->n; i++)
        if (t->r[i].started)
            pthread_join(t->r[i].th, NULL);
    if (t->comms && !t->lost)
        for (int i = 0; i < t->n; i++)
            mm_nccl_destroy(t->comm[i]);
    pthread_barrier_destroy(&t->bar);
    pthread_cond_destroy(&t->go);
    pthread_cond_destroy(&t->done);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

static const mm_backend_ops tp_ops = {
    .name = "cuda",
    .forward = tp_forward,
    .reserve = tp_reserve,
    .truncate = tp_truncate,
    .free = tp_free,
};

/* ---- creation ---- */

/* The shapes the ranks split: query heads, kv heads (or each kv head
 * shared by whole ranks), intermediate rows in multiples of 8 (the
 * kernels' vector width). */
static int check_shape(const mm_model_config *c, int n, char *err, size_t errlen)
{
    int nq = c->num_attention_heads, nkv = c->num_key_value_heads, I = c->intermediate_size;
    if (nq % n || !(nkv % n == 0 || n % nkv == 0) || I % n || (I / n) % 8 ||
        c->vocab_size < n) {
        mm_errf(err, errlen,
                "--tensor-parallel-size %d does not divide this model: it needs query heads "
                "(%d) divisible by %d, kv heads (%d) divisible by %d or dividing it, and the "
                "intermediate size (%d) divisible by %d",
                n, nq, n, nkv, n, I, 8 * n);
        return -EINVAL;
    }
    return 0;
}

int mm_backend_tp_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                      char *err, size_t errlen)
{
    int n = o->tensor_parallel, ndev = 0, rc = 0;
    *out = NULL;
    if (n < 2 || n > TP_MAX) {
        mm_errf(err, errlen, "--tensor-parallel-size %d: 2..%d GPUs", n, TP_MAX);
        return -EINVAL;
    }
    if ((rc = check_shape(&m->cfg, n, err, errlen)) < 0)
        return rc;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev < n) {
        const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
        mm_errf(err, errlen, "--tensor-parallel-size %d needs %d GPUs: %d visible (%s; "
                "CUDA_VISIBLE_DEVICES=%s)", n, n, ce == cudaSuccess ? ndev : 0,
                ce != cudaSuccess ? cudaGetErrorString(ce) : "no CUDA device",
                cvd ? cvd : "unset");
        return ce != cudaSuccess || ndev == 0 ? -ENODEV : -EINVAL;
    }
    tp_backend *t = calloc(1, sizeof *t);
    if (!t) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    t->base.ops = &tp_ops;
    t->base.model = m;
    t->base.max_seqs = o->max_seqs;
    t->base.max_len = o->max_len;
    t->n = n;
    t->o = *o;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->go, NULL);
    pthread_cond_init(&t->done, NULL);
    pthread_barrier_init(&t->bar, NULL, (unsigned)n);
    int devs[TP_MAX];
    for (int i = 0; i < n; i++)
        devs[i] = i;
    if ((rc = mm_nccl_comms(n, devs, t->comm, err, errlen)) < 0)
        goto out;
    t->comms = 1;
    for (int i = 0; i < n; i++) {
        t->r[i] = (tp_rank){.t = t, .idx = i};
        if (pthread_create(&t->r[i].th, NULL, rank_main, &t->r[i]) != 0) {
            mm_errf(err, errlen, "cannot start the thread of GPU %d", i);
            rc = -EAGAIN;
            goto out;
        }
        t->r[i].started = 1;
    }
    /* Every rank comes back: one that fails stops the others at their
     * next agreement. */
    int bad;
    run_job(t, 0, &bad);
    for (int i = 0; i < n; i++) {
        /* the first failure, not the others' "another GPU failed" */
        if (t->r[i].rc < 0 && (rc == 0 || rc == -ECANCELED)) {
            rc = t->r[i].rc;
            mm_errf(err, errlen, "%s", t->r[i].err);
        }
    }
    if (rc < 0)
        goto out;
    t->base.block_size = t->r[0].b->block_size;
    t->base.num_blocks = t->r[0].b->num_blocks;
    mm_info("cuda: tensor parallel over %d GPUs (NCCL %s)", n, mm_nccl_version());
    *out = &t->base;
out:
    if (rc < 0)
        tp_free(&t->base);
    return rc;
}
