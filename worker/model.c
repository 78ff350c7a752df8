/* model.c: config.json parsing (classic and rope_parameters layouts) and
 * loading a model directory's weights with every tensor checked up front,
 * so a bad checkpoint fails at start-up with one message instead of
 * crashing mid-request. */
#include "errmsg.h"
#include "model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "log.h"

/* config.json files are a few KB; anything near this is not one. */
#define CONFIG_MAX (4u * 1024 * 1024)


const char *mm_arch_name(mm_arch a)
{
    switch (a) {
    case MM_ARCH_LLAMA: return "llama";
    case MM_ARCH_QWEN2: return "qwen2";
    case MM_ARCH_MISTRAL: return "mistral";
    }
    return "?";
}

/* ---- config ---- */

/* An integer key: absent or null leaves *v (the default) unless required. */
static int get_int(json_t *o, const char *key, int required, long long lo, long long hi, int *v,
                   const char *name, char *err, size_t errlen)
{
    json_t *j = json_object_get(o, key);
    if (!j || json_is_null(j)) {
        if (required) {
            mm_errf(err, errlen, "%s: missing %s", name, key);
            return -EINVAL;
        }
        return 0;
    }
    if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi) {
        mm_errf(err, errlen, "%s: %s must be an integer in [%lld, %lld]", name, key, lo, hi);
        return -EINVAL;
    }
    *v = (int)json_integer_value(j);
    return 0;
}

static int get_num(json_t *o, const char *key, double lo, double hi, double *v, const char *name,
                   char *err, size_t errlen)
{
    json_t *j = json_object_get(o, key);
    if (!j || json_is_null(j))
        return 0;
    if (!json_is_number(j) || !(json_number_value(j) >= lo && json_number_value(j) <= hi)) {
        mm_errf(err, errlen, "%s: %s must be a number in [%g, %g]", name, key, lo, hi);
        return -EINVAL;
    }
    *v = json_number_value(j);
    return 0;
}

static int get_bool(json_t *o, const char *key, int *v, const char *name, char *err,
                    size_t errlen)
{
    json_t *j = json_object_get(o, key);
    if (!j || json_is_null(j))
        return 0;
    if (!json_is_boolean(j)) {
        mm_errf(err, errlen, "%s: %s must be true or false", name, key);
        return -EINVAL;
    }
    *v = json_is_true(j);
    return 0;
}

static int add_stop(mm_model_config *c, int id)
{
    for (int i = 0; i < c->n_stop; i++)
        if (c->stop_ids[i] == id)
            return 0;
    if (c->n_stop == MM_MODEL_MAX_STOP)
        return -E2BIG;
    c->stop_ids[c->n_stop++] = id;
    return 0;
}

/* bos_token_id / eos_token_id: an int, a list of ints (eos), or null. */
static int parse_special_ids(json_t *root, mm_model_config *c, const char *name, char *err,
                             size_t errlen)
{
    json_t *bos = json_object_get(root, "bos_token_id");
    if (json_is_integer(bos) && json_integer_value(bos) >= 0 &&
        json_integer_value(bos) <= INT32_MAX)
        c->bos_token_id = (int)json_integer_value(bos);
    else if (bos && !json_is_null(bos)) {
        mm_errf(err, errlen, "%s: bos_token_id must be a non-negative integer", name);
        return -EINVAL;
    }
    json_t *eos = json_object_get(root, "eos_token_id");
    if (!eos || json_is_null(eos))
        return 0;
    size_t n = json_is_array(eos) ? json_array_size(eos) : 1;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(e) || json_integer_value(e) < 0 ||
            json_integer_value(e) > INT32_MAX) {
            mm_errf(err, errlen, "%s: eos_token_id must be an integer or a list of integers",
                   name);
            return -EINVAL;
        }
        if (add_stop(c, (int)json_integer_value(e)) < 0) {
            mm_errf(err, errlen, "%s: more than %d eos_token_id values", name, MM_MODEL_MAX_STOP);
            return -EINVAL;
        }
    }
    return 0;
}

static int parse_rope(json_t *root, mm_model_config *c, const char *name, char *err,
                      size_t errlen)
{
    int rc;
    /* transformers 5 writes rope_parameters (theta inside); older versions
     * rope_theta beside rope_scaling. Read whichever is there. */
    json_t *rp = json_object_get(root, "rope_parameters");
    json_t *rs = json_object_get(root, "rope_scaling");
    json_t *p = json_is_object(rp) ? rp : json_is_object(rs) ? rs : NULL;
    c->rope.theta = 10000.0;
    if ((rc = get_num(root, "rope_theta", 1e-3, 1e12, &c->rope.theta, name, err, errlen)) < 0)
        return rc;
    if (rp && !json_is_null(rp) && !json_is_object(rp)) {
        mm_errf(err, errlen, "%s: rope_parameters must be an object", name);
        return -EINVAL;
    }
    if (rs && !json_is_null(rs) && !json_is_object(rs)) {
        mm_errf(err, errlen, "%s: rope_scaling must be an object or null", name);
        return -EINVAL;
    }
    c->rope.type = MM_ROPE_DEFAULT;
    if (!p)
        return 0;
    if ((rc = get_num(p, "rope_theta", 1e-3, 1e12, &c->rope.theta, name, err, errlen)) < 0)
        return rc;
    json_t *jt = json_object_get(p, "rope_type");
    if (!jt)
        jt = json_object_get(p, "type");
    const char *type = json_is_string(jt) ? json_string_value(jt) : "default";
    if (strcmp(type, "default") == 0)
        return 0;
    c->rope.factor = 1.0;
    if ((rc = get_num(p, "factor", 1e-6, 1e6, &c->rope.factor, name, err, errlen)) < 0)
        return rc;
    if (strcmp(type, "linear") == 0) {
        c->rope.type = MM_ROPE_LINEAR;
        return 0;
    }
    if (strcmp(type, "llama3") == 0) {
        c->rope.type = MM_ROPE_LLAMA3;
        c->rope.low_freq_factor = 1.0;
        c->rope.high_freq_factor = 4.0;
        c->rope.original_max_position_embeddings = 8192;
        if ((rc = get_num(p, "low_freq_factor", 1e-6, 1e6, &c->rope.low_freq_factor, name, err,
                          errlen)) < 0 ||
            (rc = get_num(p, "high_freq_factor", 1e-6, 1e6, &c->rope.high_freq_factor, name,
                          err, errlen)) < 0 ||
            (rc = get_int(p, "original_max_position_embeddings", 0, 1, 1 << 26,
                          &c->rope.original_max_position_embeddings, name, err, errlen)) < 0)
            return rc;
        if (!(c->rope.high_freq_factor > c->rope.low_freq_factor)) {
            mm_errf(err, errlen, "%s: llama3 rope needs high_freq_factor > low_freq_factor", name);
            return -EINVAL;
        }
        return 0;
    }
    mm_errf(err, errlen, "%s: rope type \"%s\" not supported (default, linear, llama3)", name,
           type);
    return -EINVAL;
}

static int parse_arch(json_t *root, mm_model_config *c, const char *name, char *err,
                      size_t errlen)
{
    static const struct {
        const char *cls, *type;
        mm_arch arch;
    } known[] = {
        {"LlamaForCausalLM", "llama", MM_ARCH_LLAMA},
        {"Qwen2ForCausalLM", "qwen2", MM_ARCH_QWEN2},
        {"MistralForCausalLM", "mistral", MM_ARCH_MISTRAL},
    };
    json_t *archs = json_object_get(root, "architectures");
    json_t *mt = json_object_get(root, "model_type");
    const char *cls = json_string_value(json_array_get(archs, 0));
    const char *type = json_string_value(mt);
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if ((cls && strcmp(cls, known[i].cls) == 0) ||
            (!cls && type && strcmp(type, known[i].type) == 0)) {
            c->arch = known[i].arch;
            snprintf(c->architecture, sizeof c->architecture, "%s", known[i].cls);
            return 0;
        }
    mm_errf(err, errlen,
           "%s: unsupported architecture \"%s\" (supported: LlamaForCausalLM, "
           "Qwen2ForCausalLM, MistralForCausalLM)",
           name, cls ? cls : type ? type : "(none given)");
    return -EINVAL;
}

static int parse_dtype(json_t *root, mm_model_config *c, const char *name, char *err,
                       size_t errlen)
{
    json_t *d = json_object_get(root, "dtype");
    if (!d || json_is_null(d))
        d = json_object_get(root, "torch_dtype");
    if (!d || json_is_null(d))
        return 0;
    const char *s = json_string_value(d);
    if (!s || (strcmp(s, "bfloat16") && strcmp(s, "float16") && strcmp(s, "float32"))) {
        mm_errf(err, errlen, "%s: dtype %s not supported (bfloat16, float16, float32)", name,
               s ? s : "(not a string)");
        return -EINVAL;
    }
    snprintf(c->dtype, sizeof c->dtype, "%s", s);
    return 0;
}

int mm_model_config_parse(const char *text, size_t len, const char *name, mm_model_config *c,
                          char *err, size_t errlen)
{
    json_error_t je;
    int rc = -EINVAL;
    memset(c, 0, sizeof *c);
    c->bos_token_id = -1;
    json_t *root = json_loadb(text, len, 0, &je);
    if (!root || !json_is_object(root)) {
        mm_errf(err, errlen, "%s: %s (line %d)", name, root ? "not a JSON object" : je.text,
               root ? 0 : je.line);
        goto out;
    }
    if ((rc = parse_arch(root, c, name, err, errlen)) < 0 ||
        (rc = parse_dtype(root, c, name, err, errlen)) < 0)
        goto out;
    rc = -EINVAL;
    if (json_object_get(root, "quantization_config")) {
        mm_errf(err, errlen, "%s: quantized checkpoints are not supported", name);
        goto out;
    }
    json_t *act = json_object_get(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0)) {
        mm_errf(err, errlen, "%s: hidden_act must be \"silu\"", name);
        goto out;
    }
    c->max_position_embeddings = c->arch == MM_ARCH_LLAMA ? 2048 : 32768;
    c->rms_norm_eps = 1e-6;
    c->num_key_value_heads = -1;
    c->head_dim = -1;
    if ((rc = get_int(root, "vocab_size", 1, 1, 1 << 24, &c->vocab_size, name, err, errlen)) < 0 ||
        (rc = get_int(root, "hidden_size", 1, 1, 1 << 16, &c->hidden_size, name, err, errlen)) < 0 ||
        (rc = get_int(root, "intermediate_size", 1, 1, 1 << 20, &c->intermediate_size, name, err,
                      errlen)) < 0 ||
        (rc = get_int(root, "num_hidden_layers", 1, 1, 4096, &c->num_hidden_layers, name, err,
                      errlen)) < 0 ||
        (rc = get_int(root, "num_attention_heads", 1, 1, 4096, &c->num_attention_heads, name,
                      err, errlen)) < 0 ||
        (rc = get_int(root, "num_key_value_heads", 0, 1, 4096, &c->num_key_value_heads, name,
                      err, errlen)) < 0 ||
        (rc = get_int(root, "head_dim", 0, 2, 1 << 12, &c->head_dim, name, err, errlen)) < 0 ||
        (rc = get_int(root, "max_position_embeddings", 0, 1, 1 << 26,
                      &c->max_position_embeddings, name, err, errlen)) < 0 ||
        (rc = get_num(root, "rms_norm_eps", 0, 1, &c->rms_norm_eps, name, err, errlen)) < 0 ||
        (rc = get_bool(root, "tie_word_embeddings", &c->tie_word_embeddings, name, err,
                       errlen)) < 0 ||
        (rc = parse_rope(root, c, name, err, errlen)) < 0 ||
        (rc = parse_special_ids(root, c, name, err, errlen)) < 0)
        goto out;
    rc = -EINVAL;
    if (c->num_key_value_heads < 0)
        c->num_key_value_heads = c->num_attention_heads;
    if (c->head_dim < 0) {
        if (c->hidden_size % c->num_attention_heads) {
            mm_errf(err, errlen, "%s: hidden_size %d not divisible by num_attention_heads %d",
                   name, c->hidden_size, c->num_attention_heads);
            goto out;
        }
        c->head_dim = c->hidden_size / c->num_attention_heads;
    }
    if (c->head_dim % 2) {
        mm_errf(err, errlen, "%s: head_dim %d must be even for RoPE", name, c->head_dim);
        goto out;
    }
    if (c->num_attention_heads % c->num_key_value_heads) {
        mm_errf(err, errlen, "%s: num_attention_heads %d not a multiple of num_key_value_heads %d",
               name, c->num_attention_heads, c->num_key_value_heads);
        goto out;
    }
    int attn_bias = 0, mlp_bias = 0, use_sw = 0;
    if ((rc = get_bool(root, "attention_bias", &attn_bias, name, err, errlen)) < 0 ||
        (rc = get_bool(root, "mlp_bias", &mlp_bias, name, err, errlen)) < 0 ||
        (rc = get_bool(root, "use_sliding_window", &use_sw, name, err, errlen)) < 0)
        goto out;
    rc = -EINVAL;
    if (mlp_bias) {
        mm_errf(err, errlen, "%s: mlp_bias is not supported", name);
        goto out;
    }
    if (c->arch == MM_ARCH_QWEN2) {
        c->qkv_bias = 1;
        if (use_sw) {
            mm_errf(err, errlen, "%s: use_sliding_window is not supported for Qwen2", name);
            goto out;
        }
    } else if (c->arch == MM_ARCH_LLAMA) {
        c->qkv_bias = c->o_bias = attn_bias;
    } else {
        if ((rc = get_int(root, "sliding_window", 0, 1, 1 << 26, &c->sliding_window, name, err,
                          errlen)) < 0)
            goto out;
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int mm_model_generation_config_parse(const char *text, size_t len, const char *name,
                                     mm_model_config *c, char *err, size_t errlen)
{
    json_error_t je;
    int rc = -EINVAL;
    json_t *root = json_loadb(text, len, 0, &je);
    if (!root || !json_is_object(root)) {
        mm_errf(err, errlen, "%s: %s (line %d)", name, root ? "not a JSON object" : je.text,
               root ? 0 : je.line);
        goto out;
    }
    int bos = c->bos_token_id;
    rc = parse_special_ids(root, c, name, err, errlen);
    /* config.json's bos wins; generation_config only fills a gap. */
    if (bos >= 0)
        c->bos_token_id = bos;
out:
    json_decref(root);
    return rc;
}

int mm_model_is_stop(const mm_model_config *c, int token)
{
    for (int i = 0; i < c->n_stop; i++)
        if (c->stop_ids[i] == token)
            return 1;
    return 0;
}

void mm_model_rope_inv_freq(const mm_model_config *c, float *inv_freq)
{
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf((float)c->rope.theta, e);
        if (c->rope.type == MM_ROPE_LINEAR) {
            f = (float)(f / c->rope.factor);
        } else if (c->rope.type == MM_ROPE_LLAMA3) {
            /* Long wavelengths (low frequencies) are slowed by factor, short
             * ones kept, the band between blended linearly in
             * old_context/wavelen. */
            double old = c->rope.original_max_position_embeddings;
            double lo = c->rope.low_freq_factor, hi = c->rope.high_freq_factor;
            double wavelen = 2.0 * M_PI / f;
            double low_wl = old / lo, high_wl = old / hi;
            if (wavelen > low_wl) {
                f = (float)(f / c->rope.factor);
            } else if (wavelen >= high_wl) {
                double s = (old / wavelen - lo) / (hi - lo);
                f = (float)((1.0 - s) * f / c->rope.factor + s * f);
            }
        }
        inv_freq[i] = f;
    }
}

/* ---- loading ---- */

static int read_text(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    int rc = 0;
    char *buf = NULL;
    FILE *fp = fopen(path, "rb");
    *out = NULL;
    if (!fp) {
        rc = -errno;
        mm_errf(err, errlen, "%s: %s", path, strerror(errno));
        return rc;
    }
    if (!(buf = malloc(CONFIG_MAX + 1))) {
        rc = -ENOMEM;
        mm_errf(err, errlen, "%s: out of memory", path);
        goto out;
    }
    *len = fread(buf, 1, CONFIG_MAX + 1, fp);
    if (ferror(fp) || *len > CONFIG_MAX) {
        rc = ferror(fp) ? -EIO : -EFBIG;
        mm_errf(err, errlen, "%s: %s", path, ferror(fp) ? "read error" : "too large");
        goto out;
    }
    buf[*len] = 0;
    *out = buf;
    buf = NULL;
out:
    free(buf);
    fclose(fp);
    return rc;
}

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *s = malloc(a + b + 2);
    if (s) {
        memcpy(s, dir, a);
        s[a] = '/';
        memcpy(s + a + 1, name, b + 1);
    }
    return s;
}

typedef struct loader {
    mm_model *m;
    char     *err;
    size_t    errlen;
} loader;

/* Bind one tensor, checking dtype and shape (cols == 0: a vector). */
static int bind(loader *L, mm_weight *w, const char *name, int64_t rows, int64_t cols)
{
    const mm_st_tensor *t = mm_st_set_find(L->m->st, name);
    if (!t) {
        mm_errf(L->err, L->errlen, "%s: tensor %s not found", mm_st_set_origin(L->m->st), name);
        return -ENOENT;
    }
    if (t->dtype != MM_DT_BF16 && t->dtype != MM_DT_F16 && t->dtype != MM_DT_F32) {
        mm_errf(L->err, L->errlen, "%s: tensor %s: dtype %s not supported (BF16, F16, F32)",
               t->file, name, mm_dtype_name(t->dtype));
        return -EINVAL;
    }
    int ok = cols ? t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols
                  : t->ndim == 1 && t->shape[0] == rows;
    if (!ok) {
        char got[96] = "", want[48];
        size_t n = 0;
        for (int i = 0; i < t->ndim && n < sizeof got - 24; i++)
            n += (size_t)snprintf(got + n, sizeof got - n, "%s%lld", i ? ", " : "",
                                  (long long)t->shape[i]);
        if (cols)
            snprintf(want, sizeof want, "%lld, %lld", (long long)rows, (long long)cols);
        else
            snprintf(want, sizeof want, "%lld", (long long)rows);
        mm_errf(L->err, L->errlen, "%s: tensor %s: shape [%s], expected [%s]", t->file, name, got,
               want);
        return -EINVAL;
    }
    /* The kernels read elements in place; safetensors writers align the
     * data section, so a misaligned tensor means a malformed file. */
    if ((uintptr_t)t->data % mm_dtype_size(t->dtype)) {
        mm_errf(L->err, L->errlen, "%s: tensor %s: data not aligned to its element size",
               t->file, name);
        return -EINVAL;
    }
    w->data = t->data;
    w->dtype = t->dtype;
    w->rows = cols ? rows : 1;
    w->cols = cols ? cols : rows;
    L->m->weight_bytes += t->nbytes;
    return 0;
}

static int bind_layer(loader *L, int i)
{
    const mm_model_config *c = &L->m->cfg;
    mm_layer *l = &L->m->layers[i];
    int64_t H = c->hidden_size, I = c->intermediate_size;
    int64_t qd = (int64_t)c->num_attention_heads * c->head_dim;
    int64_t kvd = (int64_t)c->num_key_value_heads * c->head_dim;
    char nm[160];
    int rc;
#define B(field, suffix, r, cc)                                                   \
    do {                                                                          \
        snprintf(nm, sizeof nm, "model.layers.%d.%s", i, suffix);                 \
        if ((rc = bind(L, &l->field, nm, r, cc)) < 0)                              \
            return rc;                                                            \
    } while (0)
    B(attn_norm, "input_layernorm.weight", H, 0);
    B(q, "self_attn.q_proj.weight", qd, H);
    B(k, "self_attn.k_proj.weight", kvd, H);
    B(v, "self_attn.v_proj.weight", kvd, H);
    B(o, "self_attn.o_proj.weight", H, qd);
    if (c->qkv_bias) {
        B(q_bias, "self_attn.q_proj.bias", qd, 0);
        B(k_bias, "self_attn.k_proj.bias", kvd, 0);
        B(v_bias, "self_attn.v_proj.bias", kvd, 0);
    }
    if (c->o_bias)
        B(o_bias, "self_attn.o_proj.bias", H, 0);
    B(mlp_norm, "post_attention_layernorm.weight", H, 0);
    B(gate, "mlp.gate_proj.weight", I, H);
    B(up, "mlp.up_proj.weight", I, H);
    B(down, "mlp.down_proj.weight", H, I);
#undef B
    return 0;
}

void mm_model_progress_stderr(void *ud, uint64_t done, uint64_t total)
{
    int *last = ud;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (isatty(STDERR_FILENO)) {
        if (last && *last == pct)
            return;
        char bar[41];
        int fill = pct * 40 / 100;
        for (int i = 0; i < 40; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[40] = 0;
        fprintf(stderr, "\rloading weights [%s] %3d%% %llu/%llu MiB%s", bar, pct,
                (unsigned long long)(done >> 20), (unsigned long long)(total >> 20),
                done >= total ? "\n" : "");
        fflush(stderr);
    } else {
        /* A log file gets a line per tenth, not a line per update; a small
         * model loads too fast for any but the last to say something. */
        if (done < total && ((last && *last / 10 == pct / 10) || total < (256u << 20)))
            return;
        if (last && *last == 100)
            return;
        mm_info("loading weights: %d%% (%llu/%llu MiB)", pct, (unsigned long long)(done >> 20),
                (unsigned long long)(total >> 20));
    }
    if (last)
        *last = pct;
}

/* Touch every page of every weight so the first request does not pay for
 * reading the checkpoint from disk; this is where loading time goes. */
static void prefault(mm_model *m, const mm_model_load_opts *o)
{
    mm_progress_fn fn = o && o->progress ? o->progress : mm_model_progress_stderr;
    int last = -100;   /* below any percentage, so 0% is reported too */
    void *ud = o && o->progress ? o->progress_ud : &last;
    int quiet = o && o->quiet;
    uint64_t total = 0, done = 0, next = 0;
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg > 0 ? (size_t)pg : 4096;
    for (size_t i = 0; i < mm_st_set_files(m->st); i++) {
        const mm_st_file *f = mm_st_set_file(m->st, i);
        for (size_t j = 0; j < mm_st_file_count(f); j++)
            total += mm_st_file_tensor(f, j)->nbytes;
    }
    if (!quiet)
        fn(ud, 0, total);
    volatile unsigned char sink = 0;
    for (size_t i = 0; i < mm_st_set_files(m->st); i++) {
        const mm_st_file *f = mm_st_set_file(m->st, i);
        for (size_t j = 0; j < mm_st_file_count(f); j++) {
            const mm_st_tensor *t = mm_st_file_tensor(f, j);
            const unsigned char *p = t->data;
            uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1);
            if (t->nbytes)
                madvise((void *)a, t->nbytes + ((uintptr_t)p - a), MADV_WILLNEED);
            for (size_t k = 0; k < t->nbytes; k += page) {
                sink ^= p[k];
                done += (t->nbytes - k < page) ? t->nbytes - k : page;
                if (!quiet && done >= next) {
                    fn(ud, done, total);
                    next = done + (total / 200 > (64u << 20) ? (64u << 20) : total / 200 + 1);
                }
            }
        }
    }
    (void)sink;
    if (!quiet)
        fn(ud, total, total);
}

int mm_model_load(const char *dir, const mm_model_load_opts *o, mm_model **out, char *err,
                  size_t errlen)
{
    int rc = -ENOMEM;
    char *path = NULL, *text = NULL;
    size_t len = 0;
    mm_model *m = calloc(1, sizeof *m);
    loader L = {m, err, errlen};
    *out = NULL;
    if (err && errlen)
        err[0] = 0;
    if (!m || !(m->dir = strdup(dir)) || !(path = path_join(dir, "config.json"))) {
        mm_errf(err, errlen, "%s: out of memory", dir);
        goto fail;
    }
    if ((rc = read_text(path, &text, &len, err, errlen)) < 0 ||
        (rc = mm_model_config_parse(text, len, path, &m->cfg, err, errlen)) < 0)
        goto fail;
    free(path);
    free(text);
    text = NULL;
    if (!(path = path_join(dir, "generation_config.json"))) {
        rc = -ENOMEM;
        goto fail;
    }
    if (access(path, F_OK) == 0 &&
        ((rc = read_text(path, &text, &len, err, errlen)) < 0 ||
         (rc = mm_model_generation_config_parse(text, len, path, &m->cfg, err, errlen)) < 0))
        goto fail;
    if ((rc = mm_st_set_open(dir, &m->st, err, errlen)) < 0)
        goto fail;
    const mm_model_config *c = &m->cfg;
    rc = -ENOMEM;
    if (!(m->layers = calloc((size_t)c->num_hidden_layers, sizeof *m->layers)))
        goto fail;
    if ((rc = bind(&L, &m->embed, "model.embed_tokens.weight", c->vocab_size, c->hidden_size)) < 0 ||
        (rc = bind(&L, &m->norm, "model.norm.weight", c->hidden_size, 0)) < 0)
        goto fail;
    for (int i = 0; i < c->num_hidden_layers; i++)
        if ((rc = bind_layer(&L, i)) < 0)
            goto fail;
    if (c->tie_word_embeddings)
        m->lm_head = m->embed;
    else if ((rc = bind(&L, &m->lm_head, "lm_head.weight", c->vocab_size, c->hidden_size)) < 0)
        goto fail;
    if (!(o && o->no_prefault))
        prefault(m, o);
    free(path);
    free(text);
    *out = m;
    return 0;
fail:
    if (rc == -ENOMEM && err && !err[0])
        mm_errf(err, errlen, "%s: out of memory", dir);
    free(path);
    free(text);
    mm_model_free(m);
    return rc;
}

void mm_model_free(mm_model *m)
{
    if (!m)
        return;
    mm_st_set_close(m->st);
    free(m->layers);
    free(m->dir);
    free(m);
}
