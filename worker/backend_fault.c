/* backend_fault.c: a backend that wraps another and, after a number of
 * steps, fails every step as a lost GPU does (-ENOTRECOVERABLE). It exists
 * for the tests of what follows a lost device - every held request fails
 * with the error, /health turns 503, the worker exits 1 for its
 * supervisor to restart it - which no CPU can produce for real. Enabled
 * only by the test hook MM_WORKER_TEST_FAULT_STEPS (worker/main.c). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"
#include "errmsg.h"

typedef struct fault_backend {
    mm_backend     base;
    mm_backend    *inner;
    long           steps_left;
    mm_backend_ops ops;  /* fault_ops, named as the inner backend ("cpu", "cuda") */
} fault_backend;

/* The engine reads the pool figures from the wrapper: keep them equal. */
static void sync_pool(fault_backend *f)
{
    f->base.blocks_used = f->inner->blocks_used;
}

static int fault_forward(mm_backend *b, mm_batch_seq *seqs, int nseqs, float *logits, char *err,
                         size_t errlen)
{
    fault_backend *f = (fault_backend *)b;
    if (f->steps_left <= 0) {
        mm_errf(err, errlen, "device lost (injected by MM_WORKER_TEST_FAULT_STEPS)");
        return -ENOTRECOVERABLE;
    }
    f->steps_left--;
    f->inner->n_valid = b->n_valid;
    return f->inner->ops->forward(f->inner, seqs, nseqs, logits, err, errlen);
}

static int fault_reserve(mm_backend *b, int slot, int n)
{
    fault_backend *f = (fault_backend *)b;
    int rc = f->inner->ops->reserve(f->inner, slot, n);
    sync_pool(f);
    return rc;
}

static void fault_truncate(mm_backend *b, int slot, int pos)
{
    fault_backend *f = (fault_backend *)b;
    f->inner->ops->truncate(f->inner, slot, pos);
    sync_pool(f);
}

static void fault_free(mm_backend *b)
{
    fault_backend *f = (fault_backend *)b;
    if (!f)
        return;
    f->inner->ops->free(f->inner);
    free(f);
}

static const mm_backend_ops fault_ops = {
    .name = NULL, /* the inner backend's, set per instance below */
    .forward = fault_forward,
    .reserve = fault_reserve,
    .truncate = fault_truncate,
    .free = fault_free,
};

int mm_backend_fault_wrap(mm_backend *inner, long steps, mm_backend **out, char *err,
                          size_t errlen)
{
    fault_backend *f = calloc(1, sizeof *f);
    if (!f) {
        mm_errf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    f->ops = fault_ops;
    f->ops.name = inner->ops->name;
    f->base = *inner;
    f->base.ops = &f->ops;
    f->inner = inner;
    f->steps_left = steps;
    *out = &f->base;
    return 0;
}
