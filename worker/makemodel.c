/* makemodel.c: random-weight model directories, deterministic from a seed.
 *
 * Each tensor draws from its own generator seeded by (seed, tensor index),
 * so a tensor's values do not depend on the others' sizes. Values are the
 * sum of four uniforms (close enough to normal for logits that are not
 * degenerate), scaled to std. Norm weights sit near 1 with visible spread,
 * so a backend that forgot to apply them would disagree with a reference. */
#include "errmsg.h"
#include "makemodel.h"
#include "dtype.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>


void mm_makemodel_defaults(mm_makemodel_opts *o)
{
    memset(o, 0, sizeof *o);
    snprintf(o->arch, sizeof o->arch, "qwen2");
    o->layers = 2;
    o->hidden = 64;
    o->heads = 4;
    o->kv_heads = 2;
    o->intermediate = 128;
    o->vocab = 512;
    o->max_pos = 2048;
    o->tie = -1;
    o->rope_theta = 10000.0;
    o->std = 0.02;
    o->seed = 1;
    o->dtype = MM_DT_BF16;
    o->merges = 200;
}

static int parse_ll(const char *s, long long lo, long long hi, long long *v)
{
    char *end;
    if (!s || !*s)
        return -EINVAL;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return -EINVAL;
    *v = x;
    return 0;
}

int mm_makemodel_arg(mm_makemodel_opts *o, const char *flag, const char *value, char *err,
                     size_t errlen)
{
    static const struct {
        const char *flag;
        size_t off;
        long long lo, hi;
    } ints[] = {
        {"--layers", offsetof(mm_makemodel_opts, layers), 1, 1024},
        {"--hidden", offsetof(mm_makemodel_opts, hidden), 2, 65536},
        {"--heads", offsetof(mm_makemodel_opts, heads), 1, 1024},
        {"--kv-heads", offsetof(mm_makemodel_opts, kv_heads), 1, 1024},
        {"--head-dim", offsetof(mm_makemodel_opts, head_dim), 0, 4096},
        {"--intermediate", offsetof(mm_makemodel_opts, intermediate), 1, 1 << 20},
        {"--vocab", offsetof(mm_makemodel_opts, vocab), 259, 1 << 22},
        {"--max-pos", offsetof(mm_makemodel_opts, max_pos), 1, 1 << 24},
        {"--merges", offsetof(mm_makemodel_opts, merges), 0, 100000},
    };
    long long v;
    if (strcmp(flag, "--tie") == 0 || strcmp(flag, "--no-tie") == 0) {
        o->tie = flag[2] == 't';
        return 0;
    }
    if (strcmp(flag, "--llama3-rope") == 0) {
        o->llama3_rope = 1;
        return 0;
    }
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        if (strcmp(flag, ints[i].flag))
            continue;
        if (parse_ll(value, ints[i].lo, ints[i].hi, &v) < 0) {
            mm_errf(err, errlen, "%s: expected an integer in [%lld, %lld]", flag, ints[i].lo,
                   ints[i].hi);
            return -EINVAL;
        }
        *(int *)((char *)o + ints[i].off) = (int)v;
        return 1;
    }
    if (strcmp(flag, "--seed") == 0) {
        if (parse_ll(value, 0, INT64_MAX, &v) < 0) {
            mm_errf(err, errlen, "--seed: expected a non-negative integer");
            return -EINVAL;
        }
        o->seed = (uint64_t)v;
        return 1;
    }
    if (strcmp(flag, "--arch") == 0) {
        if (!value || (strcmp(value, "llama") && strcmp(value, "qwen2") && strcmp(value, "mistral"))) {
            mm_errf(err, errlen, "--arch: expected llama, qwen2 or mistral");
            return -EINVAL;
        }
        snprintf(o->arch, sizeof o->arch, "%s", value);
        return 1;
    }
    if (strcmp(flag, "--dtype") == 0) {
        if (value && strcmp(value, "bf16") == 0)
            o->dtype = MM_DT_BF16;
        else if (value && strcmp(value, "f16") == 0)
            o->dtype = MM_DT_F16;
        else if (value && strcmp(value, "f32") == 0)
            o->dtype = MM_DT_F32;
        else {
            mm_errf(err, errlen, "--dtype: expected bf16, f16 or f32");
            return -EINVAL;
        }
        return 1;
    }
    if (strcmp(flag, "--std") == 0 || strcmp(flag, "--rope-theta") == 0) {
        char *end;
        double d = value ? strtod(value, &end) : 0;
        if (!value || !*value || *end || !(d > 0 && d < 1e12)) {
            mm_errf(err, errlen, "%s: expected a positive number", flag);
            return -EINVAL;
        }
        *(flag[2] == 's' ? &o->std : &o->rope_theta) = d;
        return 1;
    }
    mm_errf(err, errlen, "unknown option %s", flag);
    return -EINVAL;
}

/* ---- random numbers ---- */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Mean 0, variance 1: four 16-bit uniforms summed (Irwin-Hall). */
static float rnorm(uint64_t *s)
{
    uint64_t r = splitmix(s);
    double sum = (double)(r & 0xffff) + (double)((r >> 16) & 0xffff) +
                 (double)((r >> 32) & 0xffff) + (double)(r >> 48);
    return (float)((sum / 65536.0 - 2.0) * 1.7320508075688772);
}

/* ---- weights ---- */

enum { INIT_NORMAL, INIT_NORM };

typedef struct wdesc {
    char name[96];
    int  init;
    int  ndim;
    int64_t shape[2];
} wdesc;

static int arch_tied(const mm_makemodel_opts *o)
{
    return o->tie >= 0 ? o->tie : strcmp(o->arch, "qwen2") == 0;
}

static int head_dim(const mm_makemodel_opts *o)
{
    return o->head_dim ? o->head_dim : o->hidden / o->heads;
}

static size_t list_weights(const mm_makemodel_opts *o, wdesc *d)
{
    size_t n = 0;
    int64_t H = o->hidden, qd = (int64_t)o->heads * head_dim(o);
    int64_t kvd = (int64_t)o->kv_heads * head_dim(o), I = o->intermediate;
    int bias = strcmp(o->arch, "qwen2") == 0;
/* Names without a layer number pass idx 0 through "%.0d", which prints
 * nothing, so one macro serves both kinds. */
#define W(nm_fmt, idx, in, r, c)                                                       \
    do {                                                                               \
        if (d) {                                                                       \
            snprintf(d[n].name, sizeof d[n].name, nm_fmt, idx);                        \
            d[n].init = in;                                                            \
            d[n].ndim = (c) ? 2 : 1;                                                   \
            d[n].shape[0] = r;                                                         \
            d[n].shape[1] = c;                                                         \
        }                                                                              \
        n++;                                                                           \
    } while (0)
    W("model.embed_tokens.weight%.0d", 0, INIT_NORMAL, o->vocab, H);
    for (int l = 0; l < o->layers; l++) {
        W("model.layers.%d.input_layernorm.weight", l, INIT_NORM, H, 0);
        W("model.layers.%d.self_attn.q_proj.weight", l, INIT_NORMAL, qd, H);
        W("model.layers.%d.self_attn.k_proj.weight", l, INIT_NORMAL, kvd, H);
        W("model.layers.%d.self_attn.v_proj.weight", l, INIT_NORMAL, kvd, H);
        if (bias) {
            W("model.layers.%d.self_attn.q_proj.bias", l, INIT_NORMAL, qd, 0);
            W("model.layers.%d.self_attn.k_proj.bias", l, INIT_NORMAL, kvd, 0);
            W("model.layers.%d.self_attn.v_proj.bias", l, INIT_NORMAL, kvd, 0);
        }
        W("model.layers.%d.self_attn.o_proj.weight", l, INIT_NORMAL, H, qd);
        W("model.layers.%d.post_attention_layernorm.weight", l, INIT_NORM, H, 0);
        W("model.layers.%d.mlp.gate_proj.weight", l, INIT_NORMAL, I, H);
        W("model.layers.%d.mlp.up_proj.weight", l, INIT_NORMAL, I, H);
        W("model.layers.%d.mlp.down_proj.weight", l, INIT_NORMAL, H, I);
    }
    W("model.norm.weight%.0d", 0, INIT_NORM, H, 0);
    if (!arch_tied(o))
        W("lm_head.weight%.0d", 0, INIT_NORMAL, o->vocab, H);
#undef W
    return n;
}

static int write_weights(const char *path, const mm_makemodel_opts *o, char *err, size_t errlen)
{
    int rc = -ENOMEM;
    size_t n = list_weights(o, NULL);
    wdesc *d = calloc(n, sizeof *d);
    mm_st_desc *sd = calloc(n, sizeof *sd);
    enum { CHUNK = 1 << 16 };
    float *buf = malloc(CHUNK * sizeof(float));
    unsigned char *out = malloc(CHUNK * 4);
    FILE *fp = NULL;
    if (!d || !sd || !buf || !out) {
        mm_errf(err, errlen, "%s: out of memory", path);
        goto out;
    }
    list_weights(o, d);
    for (size_t i = 0; i < n; i++) {
        sd[i].name = d[i].name;
        sd[i].dtype = o->dtype;
        sd[i].ndim = d[i].ndim;
        sd[i].shape[0] = d[i].shape[0];
        sd[i].shape[1] = d[i].shape[1];
    }
    if (!(fp = fopen(path, "wb"))) {
        rc = -errno;
        mm_errf(err, errlen, "%s: %s", path, strerror(errno));
        goto out;
    }
    if ((rc = mm_st_write_header(fp, sd, n, err, errlen)) < 0)
        goto out;
    size_t es = mm_dtype_size(o->dtype);
    for (size_t i = 0; i < n; i++) {
        uint64_t st = o->seed * 0x2545f4914f6cdd1dull + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ull;
        int64_t numel = d[i].shape[0] * (d[i].ndim == 2 ? d[i].shape[1] : 1);
        for (int64_t done = 0; done < numel; done += CHUNK) {
            size_t m = (size_t)(numel - done < CHUNK ? numel - done : CHUNK);
            for (size_t k = 0; k < m; k++) {
                float r = rnorm(&st);
                buf[k] = d[i].init == INIT_NORM ? 1.0f + 0.2f * r : (float)o->std * r;
            }
            for (size_t k = 0; k < m; k++) {
                if (o->dtype == MM_DT_F32) {
                    memcpy(out + 4 * k, &buf[k], 4);
                } else {
                    uint16_t h = o->dtype == MM_DT_BF16 ? mm_f32_to_bf16(buf[k]) : mm_f32_to_f16(buf[k]);
                    out[2 * k] = (unsigned char)h;
                    out[2 * k + 1] = (unsigned char)(h >> 8);
                }
            }
            if (fwrite(out, es, m, fp) != m) {
                rc = -EIO;
                mm_errf(err, errlen, "%s: write failed", path);
                goto out;
            }
        }
    }
    rc = 0;
out:
    if (fp && fclose(fp) != 0 && rc == 0) {
        rc = -EIO;
        mm_errf(err, errlen, "%s: write failed", path);
    }
    free(d);
    free(sd);
    free(buf);
    free(out);
    return rc;
}

/* ---- tokenizer ---- */

/* Text the BPE merges are learned from: everyday English, so a demo's
 * prompts tokenize into fewer tokens than bytes. */
static const char corpus[] =
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today? "
    "I am fine, thank you. What is the weather like in the city this morning? "
    "It is sunny and warm, with a light breeze from the west. "
    "Please write a short story about a robot that learns to paint. "
    "Once upon a time there was a small robot who lived in a quiet town. "
    "Every day the robot watched the people of the town as they walked to work, "
    "and every evening it looked at the colors of the sky. "
    "The answer is forty two. Can you explain how this works? "
    "The model reads the prompt, then writes one token at a time until it stops. "
    "You are a helpful assistant. The user asks a question and the assistant answers it. "
    "Numbers like 1, 2, 3, 10, 100 and 2024 appear in text as well. "
    "This is a test of the system, and the test should pass. "
    "There are many things to learn about language, and there is always more to say. "
    "They said that the time for the meeting was not yet set, but that it would be soon. ";

static int byte_to_cp(int b)
{
    /* GPT-2's byte-to-unicode table: printable bytes keep their code point,
     * the rest move to 256 + their rank among the non-printable ones. */
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff))
        return b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff)))
            n++;
    return 256 + n;
}

/* Append byte b, mapped and UTF-8 encoded, to s (room checked by caller). */
static size_t put_mapped(char *s, int b)
{
    int cp = byte_to_cp(b);
    if (cp < 0x80) {
        s[0] = (char)cp;
        return 1;
    }
    s[0] = (char)(0xc0 | (cp >> 6));
    s[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

typedef struct bpe {
    int   ntok;
    char *str[1 << 12];      /* mapped text of each token */
    int   merges;
    int   ma[1 << 12], mb[1 << 12];
} bpe;

static int train_bpe(bpe *t, int want, char *err, size_t errlen)
{
    enum { MAXSYM = sizeof corpus };
    int *sym = malloc(MAXSYM * sizeof *sym), *word = malloc(MAXSYM * sizeof *word);
    int *cnt = NULL, n = 0, rc = -ENOMEM;
    for (int b = 0; b < 256; b++) {
        char s[3] = {0};
        put_mapped(s, b);
        if (!(t->str[b] = strdup(s)))
            goto out;
    }
    t->ntok = 256;
    if (!sym || !word)
        goto out;
    /* Words as a GPT-2 style pre-tokenizer would cut them: a space sticks to
     * the word after it. word[i] numbers the word symbol i belongs to. */
    int w = 0;
    for (size_t i = 0; corpus[i]; i++) {
        int c = (unsigned char)corpus[i];
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        int prev_alpha = n > 0 && word[n - 1] == w && ((corpus[i - 1] >= 'a' && corpus[i - 1] <= 'z') ||
                                                        (corpus[i - 1] >= 'A' && corpus[i - 1] <= 'Z') ||
                                                        corpus[i - 1] == ' ');
        if (!(alpha && prev_alpha))
            w++;
        sym[n] = c;
        word[n++] = w;
    }
    if (want > (int)(sizeof t->ma / sizeof t->ma[0]) - 256)
        want = (int)(sizeof t->ma / sizeof t->ma[0]) - 256;
    size_t cap = (size_t)(256 + want) * (size_t)(256 + want);
    if (!(cnt = calloc(cap ? cap : 1, sizeof *cnt)))
        goto out;
    int V = 256 + want;
    while (t->merges < want) {
        memset(cnt, 0, (size_t)V * V * sizeof *cnt);
        int best = -1, bc = 1;
        for (int i = 0; i + 1 < n; i++)
            if (word[i] == word[i + 1]) {
                int c = ++cnt[sym[i] * V + sym[i + 1]];
                int idx = sym[i] * V + sym[i + 1];
                if (c > bc || (c == bc && best >= 0 && idx < best)) {
                    bc = c;
                    best = idx;
                }
            }
        if (best < 0)
            break;
        int a = best / V, b = best % V, id = t->ntok;
        size_t la = strlen(t->str[a]), lb = strlen(t->str[b]);
        if (!(t->str[id] = malloc(la + lb + 1)))
            goto out;
        memcpy(t->str[id], t->str[a], la);
        memcpy(t->str[id] + la, t->str[b], lb + 1);
        /* Two merges can spell the same string ("a"+"bc", "ab"+"c"); the
         * vocabulary keeps one id for it, as tokenizers' trainer does. */
        for (int k = 256; k < t->ntok; k++)
            if (strcmp(t->str[k], t->str[id]) == 0) {
                free(t->str[id]);
                t->str[id] = NULL;
                id = k;
                break;
            }
        if (id == t->ntok)
            t->ntok++;
        t->ma[t->merges] = a;
        t->mb[t->merges] = b;
        t->merges++;
        int o = 0;
        for (int i = 0; i < n; i++) {
            if (i + 1 < n && sym[i] == a && sym[i + 1] == b && word[i] == word[i + 1]) {
                sym[o] = id;
                word[o++] = word[i];
                i++;
            } else {
                sym[o] = sym[i];
                word[o++] = word[i];
            }
        }
        n = o;
    }
    rc = 0;
out:
    if (rc < 0)
        mm_errf(err, errlen, "tokenizer: out of memory");
    free(sym);
    free(word);
    free(cnt);
    return rc;
}

static const char *const specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};

static const char chat_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* Qwen2's pre-tokenizer split (contractions, letters with one leading
 * non-letter, single digits, punctuation runs, newlines, spaces). */
static const char split_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static json_t *bytelevel(const char *type)
{
    return json_pack("{s:s, s:b, s:b, s:b}", "type", type, "add_prefix_space", 0, "trim_offsets",
                     0, "use_regex", 0);
}

static int dump(json_t *j, const char *dir, const char *name, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (!j || json_dump_file(j, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER) < 0) {
        mm_errf(err, errlen, "%s: cannot write", path);
        json_decref(j);
        return -EIO;
    }
    json_decref(j);
    return 0;
}

static int write_tokenizer(const char *dir, const mm_makemodel_opts *o, int *first_special,
                           char *err, size_t errlen)
{
    bpe *t = calloc(1, sizeof *t);
    int rc = -ENOMEM;
    json_t *tok = NULL;
    if (!t) {
        mm_errf(err, errlen, "tokenizer: out of memory");
        return rc;
    }
    int room = o->vocab - 256 - 3;
    if ((rc = train_bpe(t, o->merges < room ? o->merges : room, err, errlen)) < 0)
        goto out;
    rc = -ENOMEM;
    *first_special = t->ntok;
    json_t *vocab = json_object(), *merges = json_array(), *added = json_array();
    tok = json_object();
    if (!vocab || !merges || !added || !tok) {
        json_decref(vocab);
        json_decref(merges);
        json_decref(added);
        goto fail_json;
    }
    for (int i = 0; i < t->ntok; i++)
        json_object_set_new(vocab, t->str[i], json_integer(i));
    for (int i = 0; i < t->merges; i++) {
        char m[64];
        snprintf(m, sizeof m, "%s %s", t->str[t->ma[i]], t->str[t->mb[i]]);
        json_array_append_new(merges, json_string(m));
    }
    for (int i = 0; i < 3; i++)
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id",
                                               t->ntok + i, "content", specials[i], "single_word", 0,
                                               "lstrip", 0, "rstrip", 0, "normalized", 0,
                                               "special", 1));
    json_object_set_new(tok, "version", json_string("1.0"));
    json_object_set_new(tok, "truncation", json_null());
    json_object_set_new(tok, "padding", json_null());
    json_object_set_new(tok, "added_tokens", added);
    json_object_set_new(tok, "normalizer", json_pack("{s:s}", "type", "NFC"));
    json_object_set_new(
        tok, "pre_tokenizer",
        json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, o]}", "type", "Sequence", "pretokenizers",
                  "type", "Split", "pattern", "Regex", split_regex, "behavior", "Isolated",
                  "invert", 0, bytelevel("ByteLevel")));
    json_object_set_new(tok, "post_processor", bytelevel("ByteLevel"));
    json_object_set_new(tok, "decoder", bytelevel("ByteLevel"));
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b}", "type", "BPE", "dropout",
                              "unk_token", "continuing_subword_prefix", "", "end_of_word_suffix",
                              "", "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 0);
    if (!model) {
        json_decref(vocab);
        json_decref(merges);
        goto fail_json;
    }
    json_object_set_new(model, "vocab", vocab);
    json_object_set_new(model, "merges", merges);
    json_object_set_new(tok, "model", model);
    rc = dump(tok, dir, "tokenizer.json", err, errlen);
    tok = NULL;
    if (rc < 0)
        goto out;

    json_t *dec = json_object();
    for (int i = 0; dec && i < 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", t->ntok + i);
        json_object_set_new(dec, id,
                            json_pack("{s:s, s:b, s:b, s:b, s:b, s:b}", "content", specials[i],
                                      "lstrip", 0, "normalized", 0, "rstrip", 0, "single_word", 0,
                                      "special", 1));
    }
    json_t *cfg = json_pack("{s:b, s:b, s:o, s:n, s:s, s:b, s:s, s:s, s:i, s:s, s:b, s:s, s:n}",
                            "add_bos_token", 0, "add_prefix_space", 0, "added_tokens_decoder", dec,
                            "bos_token", "chat_template", chat_template,
                            "clean_up_tokenization_spaces", 0, "eos_token", "<|im_end|>",
                            "errors", "replace", "model_max_length", o->max_pos, "pad_token",
                            "<|endoftext|>", "split_special_tokens", 0, "tokenizer_class",
                            "Qwen2Tokenizer", "unk_token");
    rc = dump(cfg, dir, "tokenizer_config.json", err, errlen);
    goto out;
fail_json:
    mm_errf(err, errlen, "tokenizer: out of memory");
out:
    json_decref(tok);
    for (int i = 0; i < t->ntok; i++)
        free(t->str[i]);
    free(t);
    return rc;
}

/* ---- config files ---- */

static int write_configs(const char *dir, const mm_makemodel_opts *o, int eot, char *err,
                         size_t errlen)
{
    static const struct {
        const char *arch, *cls;
    } names[] = {{"llama", "LlamaForCausalLM"},
                 {"qwen2", "Qwen2ForCausalLM"},
                 {"mistral", "MistralForCausalLM"}};
    const char *cls = "";
    for (size_t i = 0; i < 3; i++)
        if (strcmp(o->arch, names[i].arch) == 0)
            cls = names[i].cls;
    int im_end = eot + 2;
    const char *dt = o->dtype == MM_DT_BF16 ? "bfloat16" : o->dtype == MM_DT_F16 ? "float16"
                                                                                : "float32";
    json_t *c = json_pack(
        "{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:b, s:s, s:s, s:i, s:i,"
        " s:f, s:b}",
        "architectures", cls, "model_type", o->arch, "vocab_size", o->vocab, "hidden_size",
        o->hidden, "intermediate_size", o->intermediate, "num_hidden_layers", o->layers,
        "num_attention_heads", o->heads, "num_key_value_heads", o->kv_heads, "head_dim",
        head_dim(o), "max_position_embeddings", o->max_pos, "rms_norm_eps", 1e-6, "rope_theta",
        o->rope_theta, "tie_word_embeddings", arch_tied(o), "hidden_act", "silu", "torch_dtype",
        dt, "bos_token_id", eot, "eos_token_id", im_end, "attention_dropout", 0.0, "use_cache", 1);
    if (!c) {
        mm_errf(err, errlen, "config.json: out of memory");
        return -ENOMEM;
    }
    if (strcmp(o->arch, "llama") == 0 && o->llama3_rope)
        json_object_set_new(c, "rope_scaling",
                            json_pack("{s:s, s:f, s:f, s:f, s:i}", "rope_type", "llama3", "factor",
                                      8.0, "low_freq_factor", 1.0, "high_freq_factor", 4.0,
                                      "original_max_position_embeddings",
                                      o->max_pos / 4 > 0 ? o->max_pos / 4 : 1));
    else
        json_object_set_new(c, "rope_scaling", json_null());
    if (strcmp(o->arch, "qwen2") == 0) {
        json_object_set_new(c, "use_sliding_window", json_false());
        json_object_set_new(c, "sliding_window", json_null());
    } else if (strcmp(o->arch, "mistral") == 0) {
        json_object_set_new(c, "sliding_window", json_null());
    } else {
        json_object_set_new(c, "attention_bias", json_false());
        json_object_set_new(c, "mlp_bias", json_false());
    }
    int rc = dump(c, dir, "config.json", err, errlen);
    if (rc < 0)
        return rc;
    json_t *g = json_pack("{s:i, s:[i, i]}", "bos_token_id", eot, "eos_token_id", im_end, eot);
    return dump(g, dir, "generation_config.json", err, errlen);
}

int mm_makemodel(const char *dir, const mm_makemodel_opts *o, char *err, size_t errlen)
{
    int hd = head_dim(o);
    if (strcmp(o->arch, "llama") && strcmp(o->arch, "qwen2") && strcmp(o->arch, "mistral")) {
        mm_errf(err, errlen, "unknown arch \"%s\" (llama, qwen2, mistral)", o->arch);
        return -EINVAL;
    }
    if (o->layers < 1 || o->hidden < 2 || o->heads < 1 || o->kv_heads < 1 ||
        o->heads % o->kv_heads || hd < 2 || hd % 2 || (!o->head_dim && o->hidden % o->heads) ||
        o->intermediate < 1 || o->vocab < 259 || o->max_pos < 1 || !(o->std > 0)) {
        mm_errf(err, errlen,
               "bad shape: layers %d hidden %d heads %d kv_heads %d head_dim %d intermediate %d "
               "vocab %d (>= 259) max_pos %d",
               o->layers, o->hidden, o->heads, o->kv_heads, hd, o->intermediate, o->vocab,
               o->max_pos);
        return -EINVAL;
    }
    if (o->dtype != MM_DT_BF16 && o->dtype != MM_DT_F16 && o->dtype != MM_DT_F32) {
        mm_errf(err, errlen, "dtype must be BF16, F16 or F32");
        return -EINVAL;
    }
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        int e = errno;
        mm_errf(err, errlen, "%s: %s", dir, strerror(e));
        return -e;
    }
    int rc, eot = 0;
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/model.safetensors", dir) >= sizeof path) {
        mm_errf(err, errlen, "%s: path too long", dir);
        return -ENAMETOOLONG;
    }
    if ((rc = write_tokenizer(dir, o, &eot, err, errlen)) < 0 ||
        (rc = write_configs(dir, o, eot, err, errlen)) < 0 ||
        (rc = write_weights(path, o, err, errlen)) < 0)
        return rc;
    return 0;
}
