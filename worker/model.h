/* model.h: a Hugging Face model directory, loaded.
 *
 * config.json (and generation_config.json) give the architecture and its
 * hyper-parameters; the weights stay in the memory-mapped safetensors files
 * and every tensor the architecture needs is checked for presence, shape
 * and dtype before anything runs. Supported: LlamaForCausalLM (default,
 * linear and llama3 RoPE), Qwen2ForCausalLM (q/k/v biases, tied
 * embeddings) and MistralForCausalLM (explicit head_dim, sliding window). */
#ifndef MM_MODEL_H
#define MM_MODEL_H
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

typedef enum { MM_ARCH_LLAMA, MM_ARCH_QWEN2, MM_ARCH_MISTRAL } mm_arch;
typedef enum { MM_ROPE_DEFAULT, MM_ROPE_LINEAR, MM_ROPE_LLAMA3 } mm_rope_type;

#define MM_MODEL_MAX_STOP 16

typedef struct mm_model_config {
    mm_arch arch;
    char    architecture[64];     /* as config.json spells it */
    char    dtype[16];            /* torch_dtype / dtype, "" if absent */
    int     vocab_size;
    int     hidden_size;
    int     intermediate_size;
    int     num_hidden_layers;
    int     num_attention_heads;
    int     num_key_value_heads;
    int     head_dim;
    int     max_position_embeddings;
    int     sliding_window;       /* 0 = none */
    double  rms_norm_eps;
    int     tie_word_embeddings;
    int     qkv_bias;             /* q/k/v projections have biases */
    int     o_bias;               /* o_proj has a bias (llama attention_bias) */
    struct {
        mm_rope_type type;
        double theta;
        double factor;
        double low_freq_factor;
        double high_freq_factor;
        int    original_max_position_embeddings;
    } rope;
    int     bos_token_id;         /* -1 if none */
    int     n_stop;               /* eos ids of config.json and generation_config.json */
    int     stop_ids[MM_MODEL_MAX_STOP];
} mm_model_config;

/* Parse config.json text (what a loader reads from the directory). name is
 * used in messages. generation_config.json is merged separately. */
int mm_model_config_parse(const char *text, size_t len, const char *name, mm_model_config *c,
                          char *err, size_t errlen);
/* Add generation_config.json's bos/eos to c (absent file is fine). */
int mm_model_generation_config_parse(const char *text, size_t len, const char *name,
                                     mm_model_config *c, char *err, size_t errlen);
int mm_model_is_stop(const mm_model_config *c, int token);

/* RoPE inverse frequencies, head_dim/2 of them, as transformers computes
 * them in float32 (default, linear, or llama3's smoothed scaling), so every
 * backend rotates by the same angles. */
void mm_model_rope_inv_freq(const mm_model_config *c, float *inv_freq);

/* A weight as the backends see it: a row-major matrix (rows = out features)
 * or a vector (rows = 1), in its stored dtype. */
typedef struct mm_weight {
    const void *data;
    mm_dtype    dtype;
    int64_t     rows, cols;
} mm_weight;

typedef struct mm_layer {
    mm_weight attn_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias;
    mm_weight mlp_norm, gate, up, down;
} mm_layer;

typedef struct mm_model {
    mm_model_config cfg;
    char      *dir;
    mm_st_set *st;
    mm_weight  embed, norm, lm_head;   /* lm_head == embed when tied */
    mm_layer  *layers;
    uint64_t   weight_bytes;           /* bytes of all weights used */
} mm_model;

/* Progress while weights are paged in. done/total in bytes. */
typedef void (*mm_progress_fn)(void *ud, uint64_t done, uint64_t total);

typedef struct mm_model_load_opts {
    mm_progress_fn progress;   /* NULL: mm_model_progress_stderr */
    void          *progress_ud;
    int            quiet;      /* no progress at all */
    int            no_prefault; /* leave paging to first use */
} mm_model_load_opts;

/* Default progress: a bar on stderr when it is a terminal, otherwise a log
 * line every 10% (and at the end). ud: NULL, or an int holding the last
 * percentage reported (start it below -10) to skip repeats. */
void mm_model_progress_stderr(void *ud, uint64_t done, uint64_t total);

int  mm_model_load(const char *dir, const mm_model_load_opts *o, mm_model **out, char *err,
                   size_t errlen);
void mm_model_free(mm_model *m);

const char *mm_arch_name(mm_arch a);
#endif
