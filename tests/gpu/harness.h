/* harness.h: what the GPU check (check.c) and benchmark (bench.c) share:
 * opening a backend by name with the no-GPU case told apart from a real
 * failure, one-sequence steps, row arithmetic (argmax, log-softmax, top-2
 * margin), generated models in a scratch directory and the decode
 * byte count behind the roofline. Both programs drive the backend
 * interface (worker/backend.h) directly, no engine or HTTP. */
#ifndef MM_GPU_HARNESS_H
#define MM_GPU_HARNESS_H
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "makemodel.h"
#include "model.h"

double mm_gpu_now(void);

/* Open backend kind "cpu" or "cuda" over m; n_valid is set to the whole
 * vocabulary. Returns 0 or -errno (message in err). */
int mm_gpu_backend_open(const char *kind, const mm_model *m, const mm_backend_opts *o,
                        mm_backend **out, char *err, size_t errlen);
/* 1 when a failed mm_backend_cuda_new (rc, err) means "this build or this
 * machine has no GPU" rather than a broken backend: the build has no CUDA
 * backend, or the runtime found no device or driver. */
int mm_gpu_no_device(int rc, const char *err);

/* reserve() then one forward of a single sequence. amx (may be NULL)
 * receives seqs.argmax for want == ARGMAX. */
int mm_gpu_step(mm_backend *b, int slot, const int32_t *toks, int n, int pos, int want,
                float *logits, int32_t *amx, char *err, size_t errlen);

/* Largest entry of row[0..n), the lowest index on ties. */
int mm_gpu_argmax(const float *row, int n);
/* Largest minus second largest entry of row[0..n). */
double mm_gpu_margin(const float *row, int n);
/* out[i] = row[i] - logsumexp(row), in double. */
void mm_gpu_log_softmax(const float *row, int n, double *out);
/* max |log_softmax(a) - log_softmax(b)| over the n entries (scratch: 2n). */
double mm_gpu_row_diff(const float *a, const float *b, int n, double *scratch);

/* Write a generated model into a fresh directory under $TMPDIR (or /tmp);
 * dir receives its path (dirlen >= 64). args: makemodel flags. */
int mm_gpu_make_model(const char *const *args, int nargs, char *dir, size_t dirlen, char *err,
                      size_t errlen);
/* Remove a directory made by mm_gpu_make_model (its files, then it). */
void mm_gpu_remove_model(const char *dir);

/* Bytes a decode step reads, per sequence and per step: weights once (an
 * untied embedding table is only gathered from, one row a token; a tied
 * one is read whole as the LM head) and the KV cache's bytes per cached
 * position (every layer's keys and values, kv_elem bytes an element). */
double mm_gpu_weight_bytes_per_step(const mm_model *m);
double mm_gpu_kv_bytes_per_pos(const mm_model *m, int kv_elem);
#endif
