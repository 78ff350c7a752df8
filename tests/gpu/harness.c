/* harness.c: see harness.h. */
#include "harness.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "errmsg.h"

double mm_gpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int mm_gpu_backend_open(const char *kind, const mm_model *m, const mm_backend_opts *o,
                        mm_backend **out, char *err, size_t errlen)
{
    int rc;
    *out = NULL;
    if (strcmp(kind, "cpu") == 0)
        rc = mm_backend_cpu_new(m, o, out, err, errlen);
    else if (strcmp(kind, "cuda") == 0)
        rc = mm_backend_cuda_new(m, o, out, err, errlen);
    else {
        mm_errf(err, errlen, "unknown backend '%s' (cpu or cuda)", kind);
        return -EINVAL;
    }
    if (rc < 0)
        return rc;
    (*out)->n_valid = m->cfg.vocab_size;
    return 0;
}

int mm_gpu_no_device(int rc, const char *err)
{
    if (!mm_backend_cuda_built() || rc == -ENODEV || rc == -ENXIO)
        return 1;
    /* The CUDA runtime's own words for "no GPU here", whatever errno the
     * backend chose to wrap them in. */
    static const char *const said[] = {"no cuda-capable device", "no cuda device",
                                       "no device", "insufficient driver",
                                       "driver version is insufficient", "libcuda",
                                       "cudaErrorNoDevice", "cudaErrorInsufficientDriver"};
    for (size_t i = 0; err && i < sizeof said / sizeof said[0]; i++)
        if (strcasestr(err, said[i]))
            return 1;
    return 0;
}

int mm_gpu_step(mm_backend *b, int slot, const int32_t *toks, int n, int pos, int want,
                float *logits, int32_t *amx, char *err, size_t errlen)
{
    int rc = b->ops->reserve(b, slot, pos + n);
    if (rc < 0) {
        mm_errf(err, errlen, "reserve(slot %d, %d): %s", slot, pos + n, strerror(-rc));
        return rc;
    }
    mm_batch_seq s = {.slot = slot, .tokens = toks, .n_tokens = n, .pos = pos, .want = want,
                      .argmax = -1};
    if ((rc = b->ops->forward(b, &s, 1, logits, err, errlen)) < 0)
        return rc;
    if (amx)
        *amx = s.argmax;
    return 0;
}

int mm_gpu_argmax(const float *row, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (row[i] > row[best])
            best = i;
    return best;
}

double mm_gpu_margin(const float *row, int n)
{
    int a = mm_gpu_argmax(row, n);
    double second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != a && row[i] > second)
            second = row[i];
    return (double)row[a] - second;
}

void mm_gpu_log_softmax(const float *row, int n, double *out)
{
    double mx = -INFINITY, s = 0;
    for (int i = 0; i < n; i++)
        mx = row[i] > mx ? row[i] : mx;
    for (int i = 0; i < n; i++)
        s += exp((double)row[i] - mx);
    double lse = mx + log(s);
    for (int i = 0; i < n; i++)
        out[i] = (double)row[i] - lse;
}

double mm_gpu_row_diff(const float *a, const float *b, int n, double *scratch)
{
    mm_gpu_log_softmax(a, n, scratch);
    mm_gpu_log_softmax(b, n, scratch + n);
    double d = 0;
    for (int i = 0; i < n; i++) {
        double e = fabs(scratch[i] - scratch[n + i]);
        /* NaN compares false: count it as the worst difference. */
        if (!(e <= d))
            d = isnan(e) ? INFINITY : e;
    }
    return d;
}

int mm_gpu_make_model(const char *const *args, int nargs, char *dir, size_t dirlen, char *err,
                      size_t errlen)
{
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    if ((size_t)snprintf(dir, dirlen, "%s/mm-gpu-model.XXXXXX", tmp) >= dirlen) {
        mm_errf(err, errlen, "TMPDIR too long");
        return -ENAMETOOLONG;
    }
    if (!mkdtemp(dir)) {
        int e = errno;
        mm_errf(err, errlen, "mkdtemp %s: %s", dir, strerror(e));
        return -e;
    }
    mm_makemodel_opts o;
    mm_makemodel_defaults(&o);
    int rc = 0;
    for (int i = 0; i < nargs; i++) {
        int used = mm_makemodel_arg(&o, args[i], i + 1 < nargs ? args[i + 1] : NULL, err, errlen);
        if (used < 0) {
            rc = used;
            goto out;
        }
        i += used;
    }
    rc = mm_makemodel(dir, &o, err, errlen);
out:
    if (rc < 0)
        mm_gpu_remove_model(dir);
    return rc;
}

void mm_gpu_remove_model(const char *dir)
{
    /* Only the flat directory mm_makemodel writes: no recursion needed. */
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[4096];
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") &&
                (size_t)snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < sizeof path)
                unlink(path);
        closedir(d);
    }
    rmdir(dir);
}

static double weight_size(const mm_weight *w)
{
    return (double)w->rows * (double)w->cols * (double)mm_dtype_size(w->dtype);
}

double mm_gpu_weight_bytes_per_step(const mm_model *m)
{
    double bytes = (double)m->weight_bytes;
    if (m->lm_head.data != m->embed.data)
        bytes -= weight_size(&m->embed) - (double)m->embed.cols * mm_dtype_size(m->embed.dtype);
    return bytes;
}

double mm_gpu_kv_bytes_per_pos(const mm_model *m, int kv_elem)
{
    const mm_model_config *c = &m->cfg;
    return 2.0 * c->num_hidden_layers * c->num_key_value_heads * c->head_dim * kv_elem;
}
