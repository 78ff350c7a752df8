/* nccl_dl.c: NCCL through dlopen (see nccl_dl.h for why). nccl.h is included
 * only for its types, so the function pointers are checked against the
 * declarations of the toolkit the worker was built with; the calls used
 * here have kept their signatures since NCCL 2.0, and capturing them into
 * CUDA graphs needs 2.9 (checked at load). */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <nccl.h>

#include "errmsg.h"
#include "nccl_dl.h"

#ifndef MM_CUDA_LIB64
#define MM_CUDA_LIB64 "/usr/local/cuda/lib64"
#endif

static struct {
    ncclResult_t (*comm_init_all)(ncclComm_t *, int, const int *);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t,
                               ncclComm_t, cudaStream_t);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    ncclResult_t (*comm_abort)(ncclComm_t);
    ncclResult_t (*get_version)(int *);
    const char *(*error_string)(ncclResult_t);
} fn;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int  load_rc;
static char load_msg[512];
static char version[32];

static void load(void)
{
    const char *env = getenv("MM_NCCL_LIBRARY");
    const char *tried[3] = {env && *env ? env : NULL, "libnccl.so.2",
                            MM_CUDA_LIB64 "/libnccl.so.2"};
    void *h = NULL;
    char first[256] = "";
    for (int i = 0; i < 3 && !h; i++) {
        if (!tried[i])
            continue;
        h = dlopen(tried[i], RTLD_NOW | RTLD_LOCAL);
        if (!h && !first[0])
            snprintf(first, sizeof first, "%s", dlerror());
    }
    if (!h) {
        snprintf(load_msg, sizeof load_msg,
                 "tensor parallelism needs NCCL, which did not load (%s); install libnccl2 or "
                 "set MM_NCCL_LIBRARY to its libnccl.so.2", first);
        load_rc = -ENOENT;
        return;
    }
    /* dlsym's void * is stored through each function pointer's object:
     * POSIX gives function and object pointers one representation. */
    struct { void **slot; const char *name; } want[] = {
        {(void **)&fn.comm_init_all, "ncclCommInitAll"},
        {(void **)&fn.all_reduce, "ncclAllReduce"},
        {(void **)&fn.comm_destroy, "ncclCommDestroy"},
        {(void **)&fn.comm_abort, "ncclCommAbort"},
        {(void **)&fn.get_version, "ncclGetVersion"},
        {(void **)&fn.error_string, "ncclGetErrorString"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!(*want[i].slot = dlsym(h, want[i].name))) {
            snprintf(load_msg, sizeof load_msg, "NCCL: %s not found in the library (%s)",
                     want[i].name, dlerror());
            load_rc = -ENOENT;
            return;
        }
    }
    int v = 0;
    fn.get_version(&v);
    /* 2.9+ codes are X*10000 + Y*100 + Z; older ones X*1000 + Y*100 + Z */
    int major = v >= 10000 ? v / 10000 : v / 1000;
    int minor = v >= 10000 ? v / 100 % 100 : v / 100 % 10;
    snprintf(version, sizeof version, "%d.%d.%d", major, minor, v % 100);
    if (major < 2 || (major == 2 && minor < 9)) {
        snprintf(load_msg, sizeof load_msg,
                 "NCCL %s is too old: tensor parallelism captures its calls into CUDA graphs, "
                 "which needs 2.9 or later", version);
        load_rc = -ENOTSUP;
    }
}

int mm_nccl_load(char *err, size_t errlen)
{
    pthread_once(&load_once, load);
    if (load_rc < 0)
        mm_errf(err, errlen, "%s", load_msg);
    return load_rc;
}

const char *mm_nccl_version(void) { return load_rc == 0 ? version : ""; }

int mm_nccl_comms(int n, const int *devs, void **comms, char *err, size_t errlen)
{
    int rc = mm_nccl_load(err, errlen);
    if (rc < 0)
        return rc;
    ncclComm_t c[64];
    if (n < 1 || n > 64) {
        mm_errf(err, errlen, "NCCL: %d ranks (1..64)", n);
        return -EINVAL;
    }
    ncclResult_t r = fn.comm_init_all(c, n, devs);
    if (r != ncclSuccess) {
        mm_errf(err, errlen, "ncclCommInitAll over %d GPUs: %s", n, fn.error_string(r));
        return -EIO;
    }
    for (int i = 0; i < n; i++)
        comms[i] = c[i];
    return 0;
}

int mm_nccl_sum_f32(void *comm, float *buf, size_t count, cudaStream_t s, char *err,
                    size_t errlen)
{
    ncclResult_t r = fn.all_reduce(buf, buf, count, ncclFloat32, ncclSum, (ncclComm_t)comm, s);
    if (r != ncclSuccess) {
        mm_errf(err, errlen, "ncclAllReduce of %zu floats: %s", count, fn.error_string(r));
        return -EIO;
    }
    return 0;
}

void mm_nccl_destroy(void *comm)
{
    if (comm && fn.comm_destroy)
        fn.comm_destroy((ncclComm_t)comm);
}

void mm_nccl_abort(void *comm)
{
    if (comm && fn.comm_abort)
        fn.comm_abort((ncclComm_t)comm);
}
