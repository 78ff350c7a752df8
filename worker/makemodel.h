/* makemodel.h: write a small random-weight model directory, deterministic
 * from a seed, in the layout Hugging Face uses: config.json,
 * generation_config.json, model.safetensors and a byte-level BPE tokenizer
 * (tokenizer.json, tokenizer_config.json with a ChatML template). For demos,
 * tests and benchmarks where no real checkpoint can be downloaded. */
#ifndef MM_MAKEMODEL_H
#define MM_MAKEMODEL_H
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

typedef struct mm_makemodel_opts {
    char     arch[16];       /* "llama", "qwen2", "mistral" */
    int      layers, hidden, heads, kv_heads;
    int      head_dim;       /* 0: hidden / heads */
    int      intermediate, vocab, max_pos;
    int      tie;            /* -1: the architecture's usual (qwen2 tied) */
    int      llama3_rope;    /* llama: write llama3 rope_scaling */
    double   rope_theta;
    double   std;            /* weight scale (normal-ish, mean 0) */
    uint64_t seed;
    mm_dtype dtype;          /* BF16 (default), F16 or F32 */
    int      merges;         /* BPE merges to learn for the tokenizer (at most) */
} mm_makemodel_opts;

void mm_makemodel_defaults(mm_makemodel_opts *o);
/* Apply one command-line option ("--layers", "4"). Flags: --arch --layers
 * --hidden --heads --kv-heads --head-dim --intermediate --vocab --max-pos
 * --seed --tie --no-tie --llama3-rope --rope-theta --std --dtype --merges.
 * Returns the number of arguments consumed from value (0 for the boolean
 * flags, 1 otherwise), or -EINVAL (unknown flag, bad value). */
int mm_makemodel_arg(mm_makemodel_opts *o, const char *flag, const char *value, char *err,
                     size_t errlen);
/* Create dir (if needed) and write the files. Returns 0 or -errno. */
int mm_makemodel(const char *dir, const mm_makemodel_opts *o, char *err, size_t errlen);
#endif
