/* test_model.c: config.json in both layouts, generation_config stop ids,
 * and loading model directories: generated ones, sharded ones, and broken
 * ones (missing tensor, wrong shape, bad dtype, truncated weights), each
 * refused with one message naming the file and the tensor. */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "makemodel.h"
#include "model.h"
#include "test.h"

static char root[64];

static int parse(const char *json, mm_model_config *c, char *err, size_t errlen)
{
    return mm_model_config_parse(json, strlen(json), "config.json", c, err, errlen);
}

TEST(classic_layout_llama3)
{
    mm_model_config c;
    char err[256];
    ASSERT_EQ(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\","
                    "\"vocab_size\":128256,\"hidden_size\":2048,\"intermediate_size\":8192,"
                    "\"num_hidden_layers\":16,\"num_attention_heads\":32,"
                    "\"num_key_value_heads\":8,\"rms_norm_eps\":1e-05,"
                    "\"max_position_embeddings\":131072,\"rope_theta\":500000.0,"
                    "\"rope_scaling\":{\"factor\":32.0,\"high_freq_factor\":4.0,"
                    "\"low_freq_factor\":1.0,\"original_max_position_embeddings\":8192,"
                    "\"rope_type\":\"llama3\"},\"tie_word_embeddings\":true,"
                    "\"torch_dtype\":\"bfloat16\",\"bos_token_id\":128000,"
                    "\"eos_token_id\":[128001,128008,128009],\"hidden_act\":\"silu\"}",
                    &c, err, sizeof err),
              0);
    ASSERT_EQ(c.arch, MM_ARCH_LLAMA);
    ASSERT_STR_EQ(c.architecture, "LlamaForCausalLM");
    ASSERT_STR_EQ(c.dtype, "bfloat16");
    ASSERT_EQ(c.vocab_size, 128256);
    ASSERT_EQ(c.head_dim, 64);
    ASSERT_EQ(c.num_key_value_heads, 8);
    ASSERT_EQ(c.rope.type, MM_ROPE_LLAMA3);
    ASSERT_EQ((long long)c.rope.theta, 500000);
    ASSERT_EQ((long long)c.rope.factor, 32);
    ASSERT_EQ((long long)c.rope.high_freq_factor, 4);
    ASSERT_EQ(c.rope.original_max_position_embeddings, 8192);
    ASSERT_EQ(c.tie_word_embeddings, 1);
    ASSERT_EQ(c.qkv_bias, 0);
    ASSERT_EQ(c.bos_token_id, 128000);
    ASSERT_EQ(c.n_stop, 3);
    ASSERT_TRUE(mm_model_is_stop(&c, 128009) && !mm_model_is_stop(&c, 128000));
    ASSERT_LT(c.rms_norm_eps, 1.1e-5);
    ASSERT_LT(0.9e-5, c.rms_norm_eps);
}

TEST(new_layout_rope_parameters_and_dtype)
{
    mm_model_config c;
    char err[256];
    ASSERT_EQ(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":512,"
                    "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"dtype\":\"float32\","
                    "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":20000.0,"
                    "\"factor\":8.0,\"low_freq_factor\":2.0,\"high_freq_factor\":4.0,"
                    "\"original_max_position_embeddings\":64},\"eos_token_id\":2}",
                    &c, err, sizeof err),
              0);
    ASSERT_STR_EQ(c.dtype, "float32");
    ASSERT_EQ(c.rope.type, MM_ROPE_LLAMA3);
    ASSERT_EQ((long long)c.rope.theta, 20000);
    ASSERT_EQ((long long)c.rope.low_freq_factor, 2);
    ASSERT_EQ(c.rope.original_max_position_embeddings, 64);
    ASSERT_EQ(c.n_stop, 1);
    ASSERT_EQ(c.stop_ids[0], 2);
    ASSERT_EQ(c.tie_word_embeddings, 0);   /* absent: false */
    /* default rope in the new layout: theta only inside rope_parameters */
    ASSERT_EQ(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":512,"
                    "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"default\","
                    "\"rope_theta\":1000000.0},\"layer_types\":[\"full_attention\","
                    "\"full_attention\"]}",
                    &c, err, sizeof err),
              0);
    ASSERT_EQ(c.rope.type, MM_ROPE_DEFAULT);
    ASSERT_EQ((long long)c.rope.theta, 1000000);
    ASSERT_EQ(c.num_key_value_heads, 4);   /* absent: one per head */
}

TEST(qwen2_and_mistral_specifics)
{
    mm_model_config c;
    char err[256];
    ASSERT_EQ(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":151936,"
                    "\"hidden_size\":896,\"intermediate_size\":4864,\"num_hidden_layers\":24,"
                    "\"num_attention_heads\":14,\"num_key_value_heads\":2,"
                    "\"tie_word_embeddings\":true,\"use_sliding_window\":false,"
                    "\"sliding_window\":32768,\"rope_theta\":1000000.0,"
                    "\"torch_dtype\":\"bfloat16\",\"eos_token_id\":151645}",
                    &c, err, sizeof err),
              0);
    ASSERT_EQ(c.arch, MM_ARCH_QWEN2);
    ASSERT_EQ(c.qkv_bias, 1);
    ASSERT_EQ(c.o_bias, 0);
    ASSERT_EQ(c.head_dim, 64);
    ASSERT_EQ(c.tie_word_embeddings, 1);
    ASSERT_EQ(c.sliding_window, 0);   /* off unless use_sliding_window */
    /* Mistral-Nemo style: head_dim 128 although 5120 / 32 = 160 */
    ASSERT_EQ(parse("{\"architectures\":[\"MistralForCausalLM\"],\"vocab_size\":131072,"
                    "\"hidden_size\":5120,\"intermediate_size\":14336,\"num_hidden_layers\":40,"
                    "\"num_attention_heads\":32,\"num_key_value_heads\":8,\"head_dim\":128,"
                    "\"sliding_window\":null,\"rope_theta\":1000000.0}",
                    &c, err, sizeof err),
              0);
    ASSERT_EQ(c.arch, MM_ARCH_MISTRAL);
    ASSERT_EQ(c.head_dim, 128);
    ASSERT_EQ(c.sliding_window, 0);
    ASSERT_EQ(parse("{\"model_type\":\"mistral\",\"vocab_size\":100,\"hidden_size\":64,"
                    "\"intermediate_size\":128,\"num_hidden_layers\":1,"
                    "\"num_attention_heads\":4,\"head_dim\":null,\"sliding_window\":4096}",
                    &c, err, sizeof err),
              0);
    ASSERT_EQ(c.head_dim, 16);
    ASSERT_EQ(c.sliding_window, 4096);
}

TEST(config_errors)
{
    mm_model_config c;
    char err[256];
    ASSERT_EQ(parse("{\"architectures\":[\"GPT2LMHeadModel\"],\"vocab_size\":1}", &c, err,
                    sizeof err),
              -EINVAL);
    ASSERT_CONTAINS(err, "config.json: unsupported architecture \"GPT2LMHeadModel\"");
    ASSERT_EQ(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":512,"
                    "\"intermediate_size\":128,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4}",
                    &c, err, sizeof err),
              -EINVAL);
    ASSERT_CONTAINS(err, "missing hidden_size");
    const char *base = "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":512,"
                       "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
                       "\"num_attention_heads\":4,";
    static const struct {
        const char *tail, *msg;
    } cases[] = {
        {"\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0}}", "rope type \"yarn\""},
        {"\"torch_dtype\":\"float8_e4m3fn\"}", "dtype float8_e4m3fn not supported"},
        {"\"hidden_act\":\"gelu\"}", "hidden_act"},
        {"\"num_key_value_heads\":3}", "not a multiple"},
        {"\"eos_token_id\":[1,\"x\"]}", "eos_token_id"},
        {"\"mlp_bias\":true}", "mlp_bias"},
        {"\"quantization_config\":{}}", "quantized"},
        {"\"hidden_size\":-4}", "hidden_size"},
        {"\"head_dim\":7}", "head_dim"},
    };
    char text[1024];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(text, sizeof text, "%s%s", base, cases[i].tail);
        err[0] = 0;
        ASSERT_EQ(parse(text, &c, err, sizeof err), -EINVAL);
        ASSERT_CONTAINS(err, cases[i].msg);
    }
    ASSERT_EQ(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":512,"
                    "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"use_sliding_window\":true}",
                    &c, err, sizeof err),
              -EINVAL);
    ASSERT_CONTAINS(err, "use_sliding_window");
    ASSERT_EQ(parse("not json", &c, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "config.json");
}

TEST(generation_config_stop_ids)
{
    mm_model_config c;
    char err[256];
    ASSERT_EQ(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":512,"
                    "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"bos_token_id\":10,\"eos_token_id\":11}",
                    &c, err, sizeof err),
              0);
    const char *g = "{\"bos_token_id\":99,\"eos_token_id\":[12,11],\"do_sample\":true}";
    ASSERT_EQ(mm_model_generation_config_parse(g, strlen(g), "generation_config.json", &c, err,
                                               sizeof err),
              0);
    ASSERT_EQ(c.n_stop, 2);   /* 11 once, plus 12 */
    ASSERT_TRUE(mm_model_is_stop(&c, 11) && mm_model_is_stop(&c, 12));
    ASSERT_EQ(c.bos_token_id, 10);   /* config.json's wins */
    g = "{\"eos_token_id\":\"x\"}";
    ASSERT_EQ(mm_model_generation_config_parse(g, strlen(g), "generation_config.json", &c, err,
                                               sizeof err),
              -EINVAL);
    ASSERT_CONTAINS(err, "generation_config.json");
}

/* ---- loading directories ---- */

static int gen(const char *name, const char *arch, char *dir, size_t dirlen)
{
    mm_makemodel_opts o;
    char err[256];
    mm_makemodel_defaults(&o);
    snprintf(o.arch, sizeof o.arch, "%s", arch);
    snprintf(dir, dirlen, "%s/%s", root, name);
    if (mm_makemodel(dir, &o, err, sizeof err) < 0) {
        printf("  makemodel: %s\n", err);
        return -1;
    }
    return 0;
}

/* Set one key of DIR/config.json. */
static void set_config(const char *dir, const char *key, json_t *value)
{
    char p[320];
    snprintf(p, sizeof p, "%s/config.json", dir);
    json_t *c = json_load_file(p, 0, NULL);
    json_object_set_new(c, key, value);
    json_dump_file(c, p, JSON_INDENT(1));
    json_decref(c);
}

static int load_fails(const char *dir, const char *n1, const char *n2)
{
    char err[512] = "";
    mm_model *m = NULL;
    mm_model_load_opts lo = {.quiet = 1};
    int rc = mm_model_load(dir, &lo, &m, err, sizeof err);
    if (rc >= 0 || m) {
        mm_model_free(m);
        printf("  loaded, expected \"%s\"\n", n1);
        return 0;
    }
    if (!strstr(err, n1) || (n2 && !strstr(err, n2))) {
        printf("  error \"%s\" lacks \"%s\" / \"%s\"\n", err, n1, n2 ? n2 : "");
        return 0;
    }
    return 1;
}

typedef struct prog {
    uint64_t last, total;
    int calls, backwards;
} prog;

static void on_progress(void *ud, uint64_t done, uint64_t total)
{
    prog *p = ud;
    if (done < p->last)
        p->backwards = 1;
    p->last = done;
    p->total = total;
    p->calls++;
}

TEST(load_generated_models)
{
    static const char *const archs[] = {"llama", "qwen2", "mistral"};
    for (int i = 0; i < 3; i++) {
        char dir[256], err[512];
        ASSERT_EQ(gen(archs[i], archs[i], dir, sizeof dir), 0);
        mm_model *m = NULL;
        prog p = {0};
        mm_model_load_opts lo = {.progress = on_progress, .progress_ud = &p};
        ASSERT_EQ(mm_model_load(dir, &lo, &m, err, sizeof err), 0);
        ASSERT_STR_EQ(mm_arch_name(m->cfg.arch), archs[i]);
        ASSERT_EQ(m->cfg.num_hidden_layers, 2);
        ASSERT_EQ(m->embed.dtype, MM_DT_BF16);
        ASSERT_EQ(m->embed.rows, 512);
        ASSERT_EQ(m->embed.cols, 64);
        ASSERT_EQ(m->layers[1].k.rows, 32);   /* 2 kv heads x 16 */
        ASSERT_EQ(m->layers[0].attn_norm.rows, 1);
        ASSERT_EQ(m->layers[0].attn_norm.cols, 64);
        ASSERT_EQ(m->layers[0].q_bias.data != NULL, i == 1);
        ASSERT_EQ(m->lm_head.data == m->embed.data, i == 1);   /* qwen2 ties */
        ASSERT_EQ(m->cfg.n_stop, 2);   /* <|im_end|>, <|endoftext|> */
        ASSERT_TRUE(p.calls >= 2 && !p.backwards);
        ASSERT_EQ(p.last, p.total);
        ASSERT_LT(0, p.total);
        mm_model_free(m);
    }
}

TEST(missing_tensor_and_wrong_shape)
{
    char dir[256];
    ASSERT_EQ(gen("miss", "llama", dir, sizeof dir), 0);
    set_config(dir, "num_hidden_layers", json_integer(3));
    ASSERT_TRUE(load_fails(dir, "model.safetensors: tensor model.layers.2.input_layernorm.weight "
                                "not found", NULL));
    set_config(dir, "num_hidden_layers", json_integer(2));
    set_config(dir, "intermediate_size", json_integer(96));
    ASSERT_TRUE(load_fails(dir, "tensor model.layers.0.mlp.gate_proj.weight: shape [128, 64], "
                                "expected [96, 64]", "model.safetensors"));
    set_config(dir, "intermediate_size", json_integer(128));
    set_config(dir, "attention_bias", json_true());
    ASSERT_TRUE(load_fails(dir, "tensor model.layers.0.self_attn.q_proj.bias not found", NULL));
    set_config(dir, "attention_bias", json_false());
    set_config(dir, "vocab_size", json_integer(600));
    ASSERT_TRUE(load_fails(dir, "tensor model.embed_tokens.weight: shape [512, 64], expected "
                                "[600, 64]", NULL));
    /* a tied model told it is untied has no lm_head */
    ASSERT_EQ(gen("untie", "qwen2", dir, sizeof dir), 0);
    set_config(dir, "tie_word_embeddings", json_false());
    ASSERT_TRUE(load_fails(dir, "tensor lm_head.weight not found", NULL));
    set_config(dir, "architectures", json_pack("[s]", "PhiForCausalLM"));
    ASSERT_TRUE(load_fails(dir, "config.json: unsupported architecture \"PhiForCausalLM\"", NULL));
}

/* Overwrite the first occurrence of from (same length) in DIR/model.safetensors. */
static int patch_weights(const char *dir, const char *from, const char *to)
{
    char p[320];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    FILE *fp = fopen(p, "r+b");
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, fp);
    int rc = -1;
    for (size_t i = 0; i + strlen(from) <= n; i++)
        if (memcmp(buf + i, from, strlen(from)) == 0) {
            fseek(fp, (long)i, SEEK_SET);
            fwrite(to, 1, strlen(to), fp);
            rc = 0;
            break;
        }
    fclose(fp);
    return rc;
}

TEST(bad_dtype_and_truncated_weights)
{
    char dir[256], p[320];
    mm_makemodel_opts o;
    char err[256];
    mm_makemodel_defaults(&o);
    o.dtype = MM_DT_F32;
    snprintf(dir, sizeof dir, "%s/dt", root);
    ASSERT_EQ(mm_makemodel(dir, &o, err, sizeof err), 0);
    /* the first tensor in the header is the embedding */
    ASSERT_EQ(patch_weights(dir, "\"F32\"", "\"I32\""), 0);
    ASSERT_TRUE(load_fails(dir, "tensor model.embed_tokens.weight: dtype I32 not supported",
                           "model.safetensors"));
    ASSERT_EQ(gen("trunc", "mistral", dir, sizeof dir), 0);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    struct stat st;
    ASSERT_EQ(stat(p, &st), 0);
    ASSERT_EQ(truncate(p, st.st_size - 100), 0);
    ASSERT_TRUE(load_fails(dir, "model.safetensors: tensor", "beyond the end of the data"));
    ASSERT_EQ(truncate(p, 5), 0);
    ASSERT_TRUE(load_fails(dir, "model.safetensors: file too short", NULL));
    snprintf(p, sizeof p, "%s/nodir", root);
    ASSERT_TRUE(load_fails(p, "nodir/config.json", NULL));
}

TEST(sharded_model_loads)
{
    char dir[256], sdir[256], err[512], p[512];
    ASSERT_EQ(gen("whole", "qwen2", dir, sizeof dir), 0);
    snprintf(sdir, sizeof sdir, "%s/sharded", root);
    ASSERT_EQ(gen("sharded", "qwen2", sdir, sizeof sdir), 0);
    snprintf(p, sizeof p, "%s/model.safetensors", sdir);
    ASSERT_EQ(unlink(p), 0);
    /* split the whole model's tensors over two shards */
    mm_st_file *f = NULL;
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    ASSERT_EQ(mm_st_open(p, &f, err, sizeof err), 0);
    size_t n = mm_st_file_count(f), half = n / 2;
    json_t *map = json_object();
    for (int s = 0; s < 2; s++) {
        size_t lo = s ? half : 0, hi = s ? n : half;
        mm_st_desc d[64];
        char name[64];
        snprintf(name, sizeof name, "model-0000%d-of-00002.safetensors", s + 1);
        for (size_t i = lo; i < hi; i++) {
            const mm_st_tensor *t = mm_st_file_tensor(f, i);
            d[i - lo] = (mm_st_desc){t->name, t->dtype, t->ndim, {t->shape[0], t->shape[1]}};
            json_object_set_new(map, t->name, json_string(name));
        }
        snprintf(p, sizeof p, "%s/%s", sdir, name);
        FILE *fp = fopen(p, "wb");
        ASSERT_EQ(mm_st_write_header(fp, d, hi - lo, err, sizeof err), 0);
        for (size_t i = lo; i < hi; i++)
            fwrite(mm_st_file_tensor(f, i)->data, 1, mm_st_file_tensor(f, i)->nbytes, fp);
        fclose(fp);
    }
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", sdir);
    json_t *idx = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", map);
    ASSERT_EQ(json_dump_file(idx, p, 0), 0);
    json_decref(idx);
    mm_model *a = NULL, *b = NULL;
    mm_model_load_opts lo = {.quiet = 1};
    ASSERT_EQ(mm_model_load(dir, &lo, &a, err, sizeof err), 0);
    ASSERT_EQ(mm_model_load(sdir, &lo, &b, err, sizeof err), 0);
    ASSERT_EQ(mm_st_set_files(b->st), 2);
    ASSERT_EQ(a->weight_bytes, b->weight_bytes);
    ASSERT_EQ(memcmp(a->norm.data, b->norm.data, 64 * 2), 0);
    ASSERT_EQ(memcmp(a->layers[1].down.data, b->layers[1].down.data, 64 * 128 * 2), 0);
    mm_model_free(a);
    mm_model_free(b);
    mm_st_close(f);
}

TEST(makemodel_tokenizer_files)
{
    char dir[256], p[300];
    ASSERT_EQ(gen("tok", "qwen2", dir, sizeof dir), 0);
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    json_t *t = json_load_file(p, 0, NULL);
    ASSERT_TRUE(t);
    json_t *model = json_object_get(t, "model"), *vocab = json_object_get(model, "vocab");
    ASSERT_STR_EQ(json_string_value(json_object_get(model, "type")), "BPE");
    size_t nv = json_object_size(vocab), nm = json_array_size(json_object_get(model, "merges"));
    ASSERT_TRUE(nm > 50);
    ASSERT_EQ(nv, 256 + nm);   /* the corpus yields distinct merged strings */
    ASSERT_EQ(json_integer_value(json_object_get(vocab, "\xc4\xa0")), 32);   /* "Ġ" = space */
    json_t *added = json_object_get(t, "added_tokens");
    ASSERT_EQ(json_array_size(added), 3);
    ASSERT_STR_EQ(json_string_value(json_object_get(json_array_get(added, 2), "content")),
                  "<|im_end|>");
    int im_end = (int)json_integer_value(json_object_get(json_array_get(added, 2), "id"));
    ASSERT_EQ(im_end, (int)nv + 2);
    json_decref(t);
    mm_model *m = NULL;
    char err[256];
    mm_model_load_opts lo = {.quiet = 1};
    ASSERT_EQ(mm_model_load(dir, &lo, &m, err, sizeof err), 0);
    ASSERT_TRUE(mm_model_is_stop(&m->cfg, im_end));
    ASSERT_TRUE(mm_model_is_stop(&m->cfg, im_end - 2));
    mm_model_free(m);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", dir);
    t = json_load_file(p, 0, NULL);
    ASSERT_CONTAINS(json_string_value(json_object_get(t, "chat_template")), "<|im_start|>");
    ASSERT_STR_EQ(json_string_value(json_object_get(t, "eos_token")), "<|im_end|>");
    json_decref(t);
}

TEST(makemodel_is_deterministic)
{
    char a[256], b[256], p[300], q[300];
    mm_makemodel_opts o;
    char err[256];
    mm_makemodel_defaults(&o);
    snprintf(a, sizeof a, "%s/det_a", root);
    snprintf(b, sizeof b, "%s/det_b", root);
    ASSERT_EQ(mm_makemodel(a, &o, err, sizeof err), 0);
    ASSERT_EQ(mm_makemodel(b, &o, err, sizeof err), 0);
    snprintf(p, sizeof p, "%s/model.safetensors", a);
    snprintf(q, sizeof q, "%s/model.safetensors", b);
    mm_st_file *fa = NULL, *fb = NULL;
    ASSERT_EQ(mm_st_open(p, &fa, err, sizeof err), 0);
    ASSERT_EQ(mm_st_open(q, &fb, err, sizeof err), 0);
    const mm_st_tensor *ta = mm_st_file_find(fa, "model.layers.1.mlp.up_proj.weight");
    const mm_st_tensor *tb = mm_st_file_find(fb, "model.layers.1.mlp.up_proj.weight");
    ASSERT_TRUE(ta && tb);
    ASSERT_EQ(memcmp(ta->data, tb->data, ta->nbytes), 0);
    mm_st_close(fb);
    o.seed = 2;
    ASSERT_EQ(mm_makemodel(b, &o, err, sizeof err), 0);
    ASSERT_EQ(mm_st_open(q, &fb, err, sizeof err), 0);
    tb = mm_st_file_find(fb, "model.layers.1.mlp.up_proj.weight");
    ASSERT_NE(memcmp(ta->data, tb->data, ta->nbytes), 0);
    mm_st_close(fa);
    mm_st_close(fb);
}

TEST(makemodel_args)
{
    mm_makemodel_opts o;
    char err[256];
    mm_makemodel_defaults(&o);
    ASSERT_EQ(mm_makemodel_arg(&o, "--layers", "24", err, sizeof err), 1);
    ASSERT_EQ(mm_makemodel_arg(&o, "--arch", "mistral", err, sizeof err), 1);
    ASSERT_EQ(mm_makemodel_arg(&o, "--no-tie", NULL, err, sizeof err), 0);
    ASSERT_EQ(mm_makemodel_arg(&o, "--dtype", "f16", err, sizeof err), 1);
    ASSERT_EQ(o.layers, 24);
    ASSERT_STR_EQ(o.arch, "mistral");
    ASSERT_EQ(o.tie, 0);
    ASSERT_EQ(o.dtype, MM_DT_F16);
    ASSERT_EQ(mm_makemodel_arg(&o, "--layers", "2x", err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "--layers");
    ASSERT_EQ(mm_makemodel_arg(&o, "--vocab", "100", err, sizeof err), -EINVAL);
    ASSERT_EQ(mm_makemodel_arg(&o, "--arch", "gpt2", err, sizeof err), -EINVAL);
    ASSERT_EQ(mm_makemodel_arg(&o, "--frobnicate", "1", err, sizeof err), -EINVAL);
    o.heads = 5;   /* 64 / 5 is no head_dim */
    char dir[256];
    snprintf(dir, sizeof dir, "%s/badshape", root);
    ASSERT_EQ(mm_makemodel(dir, &o, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "bad shape");
}

int main(void)
{
    snprintf(root, sizeof root, "/tmp/mm_test_model_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(classic_layout_llama3);
    RUN(new_layout_rope_parameters_and_dtype);
    RUN(qwen2_and_mistral_specifics);
    RUN(config_errors);
    RUN(generation_config_stop_ids);
    RUN(load_generated_models);
    RUN(missing_tensor_and_wrong_shape);
    RUN(bad_dtype_and_truncated_weights);
    RUN(sharded_model_loads);
    RUN(makemodel_tokenizer_files);
    RUN(makemodel_is_deterministic);
    RUN(makemodel_args);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    if (system(cmd) != 0)
        printf("cleanup of %s failed\n", root);
    return test_summary();
}
