/* backend_nocuda.c: what a build without nvcc (or with make CUDA=0) links
 * in place of backend_cuda.c, so --device cuda fails with a message that
 * says how to get the backend rather than at link time. */
#include <errno.h>

#include "backend.h"
#include "errmsg.h"

int mm_backend_cuda_built(void) { return 0; }
int mm_backend_cuda_available(void) { return 0; }
int mm_backend_cuda_mega(const mm_backend *b) { (void)b; return 0; }

int mm_backend_cuda_new(const struct mm_model *m, const mm_backend_opts *o, mm_backend **out,
                        char *err, size_t errlen)
{
    (void)m, (void)o;
    *out = NULL;
    mm_errf(err, errlen, "this build has no CUDA backend (built with CUDA=0 or without nvcc; "
                         "rebuild with the CUDA toolkit installed)");
    return -ENOTSUP;
}
