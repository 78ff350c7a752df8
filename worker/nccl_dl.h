/* nccl_dl.h: the few NCCL calls tensor parallelism makes, with NCCL loaded at
 * run time (dlopen) the first time a worker asks for more than one GPU.
 * libnccl is a 200 MB library that only tensor-parallel workers use: a
 * worker on one GPU, or on a machine without NCCL, does not need it to
 * start. Communicators are opaque pointers here so callers need not
 * include nccl.h. Functions return 0 or -errno with a message in err. */
#ifndef MM_NCCL_DL_H
#define MM_NCCL_DL_H
#include <stddef.h>

#include <cuda_runtime_api.h>

/* Load libnccl.so.2 (environment MM_NCCL_LIBRARY names another file; else
 * the loader's search path and the CUDA toolkit's lib64) and resolve the
 * calls below. Thread-safe; later calls return the first one's result. */
int mm_nccl_load(char *err, size_t errlen);

/* n communicators of one clique, comms[i] on device devs[i] (one process
 * drives every rank). */
int mm_nccl_comms(int n, const int *devs, void **comms, char *err, size_t errlen);

/* In place: buf[0..count) = its sum over every rank, enqueued on stream s
 * (capturable into a CUDA graph). Returns 0, or -EIO with the message. */
int mm_nccl_sum_f32(void *comm, float *buf, size_t count, cudaStream_t s, char *err,
                    size_t errlen);

/* Free a communicator after its work finished, or abort one whose peers
 * may never arrive (the operations in flight return). */
void mm_nccl_destroy(void *comm);
void mm_nccl_abort(void *comm);

/* "2.28.9" after a successful load, else "". */
const char *mm_nccl_version(void);
#endif
