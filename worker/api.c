/* api.c: OpenAI / vLLM endpoints on top of the engine (see api.h).
 *
 * A generation request becomes one engine sequence per choice (prompts x
 * n). Each sequence points back at its request through its udata; when the
 * client leaves (httpd's on_abort) or the request completes, every
 * sequence's udata is cleared first, so output the engine published in the
 * meantime finds no request and is dropped. Responses are built with
 * jansson (escaping and number formatting done once, right). */
#include "api.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "jsonutil.h"
#include "log.h"
#include "sampler.h"

#define MM_WORKER_VERSION "0.1.0"
#define JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))
#define MAX_MESSAGES 10000
#define CT_JSON "Content-Type: application/json\r\n"
#define CT_SSE "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
/* A rendered chat prompt may not exceed this (the body cap bounds the
 * messages; tools and templates add a little). */
#define MAX_RENDERED (MM_API_MAX_BODY + (1u << 20))
/* One choice's text in a response: echoed prompt plus generated text (each
 * already bounded by the body cap and the outbox cap). */
#define MAX_CHOICE_TEXT (256u << 20)

struct mm_api {
    struct event_base *base;
    struct event      *notify_ev;
    mm_api_opts        o;
    int                ready;
    mm_api_runtime     rt;
    mm_xrng             id_rng;
    long long          started;
};

/* ---- errors ---- */

typedef struct api_err {
    int         status;
    const char *param;
    char        msg[512];
} api_err;

static int fail(api_err *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(api_err *e, int status, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = status;
    e->param = param;
    return -1;
}

static void respond_err(mm_http_exchange *ex, const api_err *e)
{
    mm_http_respond_error(ex, e->status, e->param, NULL, "%s", e->msg);
}

static void respond_json(mm_http_exchange *ex, int status, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_FLAGS) : NULL;
    json_decref(j);
    if (!s) {
        mm_http_respond_error(ex, 500, NULL, NULL, "out of memory");
        return;
    }
    mm_http_respond(ex, status, CT_JSON, s, strlen(s));
    free(s);
}

/* ---- typed request fields (absent or null keeps the default) ---- */

static json_t *field(json_t *b, const char *k)
{
    json_t *v = json_object_get(b, k);
    return v && !json_is_null(v) ? v : NULL;
}

static int opt_num(json_t *b, const char *k, double lo, double hi, double *out, api_err *e)
{
    json_t *v = field(b, k);
    if (!v)
        return 0;
    if (!json_is_number(v))
        return fail(e, 400, k, "'%s' must be a number", k);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return fail(e, 400, k, "'%s' must be in [%g, %g], got %g", k, lo, hi, d);
    *out = d;
    return 0;
}

static int opt_int(json_t *b, const char *k, long long lo, long long hi, long long *out,
                   api_err *e)
{
    json_t *v = field(b, k);
    if (!v)
        return 0;
    long long x;
    if (json_is_integer(v))
        x = json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 9e15)
        x = (long long)json_real_value(v);
    else
        return fail(e, 400, k, "'%s' must be an integer", k);
    if (x < lo || x > hi)
        return fail(e, 400, k, "'%s' must be in [%lld, %lld], got %lld", k, lo, hi, x);
    *out = x;
    return 0;
}

static int opt_bool(json_t *b, const char *k, int *out, api_err *e)
{
    json_t *v = field(b, k);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return fail(e, 400, k, "'%s' must be a boolean", k);
    *out = json_is_true(v);
    return 0;
}

/* ---- tokens <-> text ---- */

static int tokenize(mm_api *a, const char *s, size_t n, int add_special, mm_tok_ids *ids,
                    const char *param, api_err *e)
{
    char err[256] = "";
    /* Byte-level tokens hold at least one byte each; templates add a few. */
    mm_tok_ids_init(ids, 2 * n + 64);
    int rc = mm_tokenizer_encode(a->rt.tok, s, n, add_special, ids, err, sizeof err);
    if (rc == -EILSEQ)
        return fail(e, 400, param, "'%s' is not valid UTF-8", param);
    if (rc < 0)
        return fail(e, rc == -ENOMEM ? 500 : 400, param, "tokenization failed: %s", err);
    return 0;
}

/* The text of one token, for logprobs (special tokens kept). */
static json_t *tok_json(mm_api *a, int32_t id, mm_buf *scratch)
{
    mm_buf_reset(scratch);
    mm_tokenizer_decode(a->rt.tok, &id, 1, 0, scratch);
    json_t *s = json_stringn(scratch->data ? scratch->data : "", scratch->len);
    return s ? s : json_string("");
}

static size_t utf8_chars(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

/* vLLM reports -inf as -9999.0: JSON has no infinities. */
static json_t *lp_json(float lp)
{
    if (isnan(lp))
        return json_null();
    return json_real(isfinite(lp) ? (double)lp : -9999.0);
}

/* ---- requests in flight ---- */

typedef struct api_choice {
    mm_seq       *seq;
    int           index;
    int           prompt;     /* which prompt */
    mm_seq_outbox got;        /* taken, not yet written */
    int           done;
    int           started;    /* stream: first chunk (echo / role) written */
    size_t        lp_offset;  /* completions text_offset so far */
} api_choice;

typedef struct api_prompt {
    mm_tok_ids  ids;
    const char *text;         /* echo: the prompt as given, or decoded */
    size_t      text_len;
    mm_buf      decoded;
} api_prompt;

typedef struct api_req {
    mm_api           *a;
    mm_http_exchange *ex;
    json_t           *body;   /* kept: stop strings and the model name point into it */
    int               chat;
    int               stream, include_usage;
    int               echo;
    int               logprobs;  /* -1 none, else the number of alternatives */
    char              id[48];
    long long         created;
    const char       *model;
    api_prompt       *prompts;
    int               n_prompts;
    api_choice       *ch;
    int               n_ch, remaining;
    mm_seq_params     sp;
    mm_buf            scratch;
} api_req;

static void req_free(api_req *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_ch; i++) {
        api_choice *c = &r->ch[i];
        if (c->seq) {
            mm_seq_set_udata(c->seq, NULL);
            if (!c->done)
                mm_seq_cancel(c->seq);
            mm_seq_release(c->seq);
        }
        mm_seq_outbox_free(&c->got);
    }
    for (int i = 0; i < r->n_prompts; i++) {
        mm_tok_ids_free(&r->prompts[i].ids);
        mm_buf_free(&r->prompts[i].decoded);
    }
    free(r->prompts);
    free(r->ch);
    mm_buf_free(&r->scratch);
    json_decref(r->body);
    free(r);
}

static void req_on_abort(mm_http_exchange *ex, void *ud)
{
    (void)ex;
    api_req *r = ud;
    r->ex = NULL;
    req_free(r);
}

static void new_id(mm_api *a, const char *prefix, char *out, size_t n)
{
    snprintf(out, n, "%s%016llx%016llx", prefix, (unsigned long long)mm_xrng_next(&a->id_rng),
             (unsigned long long)mm_xrng_next(&a->id_rng));
}

/* ---- sampling parameters (both endpoints) ---- */

static int parse_stop(json_t *b, mm_seq_params *sp, api_err *e)
{
    json_t *v = field(b, "stop");
    if (!v)
        return 0;
    json_t *one[1] = {v};
    size_t n = 1;
    if (json_is_array(v)) {
        n = json_array_size(v);
        if (n > MM_SEQ_MAX_STOP)
            return fail(e, 400, "stop", "at most %d stop strings are allowed, got %zu",
                        MM_SEQ_MAX_STOP, n);
    } else if (!json_is_string(v)) {
        return fail(e, 400, "stop", "'stop' must be a string or an array of strings");
    }
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_is_array(v) ? json_array_get(v, i) : one[0];
        if (!json_is_string(s))
            return fail(e, 400, "stop", "'stop' must be a string or an array of strings");
        size_t len = json_string_length(s);
        if (len == 0 || len > MM_SEQ_MAX_STOP_LEN)
            return fail(e, 400, "stop", "each stop string must be 1 to %d bytes long",
                        MM_SEQ_MAX_STOP_LEN);
        sp->stop[sp->n_stop] = json_string_value(s);
        sp->stop_len[sp->n_stop++] = len;
    }
    return 0;
}

typedef struct gen_opts {
    int     n;
    int     stream, include_usage;
    int     max_tokens_given;
    int32_t bias_ids[MM_SEQ_MAX_BIAS];
    float   bias_val[MM_SEQ_MAX_BIAS];
} gen_opts;

static int parse_sampling(mm_api *a, json_t *b, int chat, mm_seq_params *sp, gen_opts *g,
                          api_err *e)
{
    double d;
    long long x;
    int flag;
    int n_vocab = a->rt.cfg->vocab_size;
    mm_seq_params_defaults(sp);
    memset(g, 0, sizeof *g);
    g->n = 1;

    d = sp->samp.temperature;
    if (opt_num(b, "temperature", 0, 100, &d, e))
        return -1;
    sp->samp.temperature = (float)d;
    d = 1.0;
    if (opt_num(b, "top_p", 0, 1, &d, e))
        return -1;
    if (!(d > 0))
        return fail(e, 400, "top_p", "'top_p' must be in (0, 1], got %g", d);
    sp->samp.top_p = (float)d;
    x = -1;
    if (opt_int(b, "top_k", -1, 1 << 30, &x, e))
        return -1;
    sp->samp.top_k = x > 0 ? (int)x : 0;
    d = 0;
    if (opt_num(b, "min_p", 0, 1, &d, e))
        return -1;
    sp->samp.min_p = (float)d;
    d = 0;
    if (opt_num(b, "presence_penalty", -2, 2, &d, e))
        return -1;
    sp->samp.presence_penalty = (float)d;
    d = 0;
    if (opt_num(b, "frequency_penalty", -2, 2, &d, e))
        return -1;
    sp->samp.frequency_penalty = (float)d;
    d = 1;
    if (opt_num(b, "repetition_penalty", 0, 100, &d, e))
        return -1;
    if (!(d > 0))
        return fail(e, 400, "repetition_penalty", "'repetition_penalty' must be > 0, got %g", d);
    sp->samp.repetition_penalty = (float)d;

    json_t *seed = field(b, "seed");
    if (seed) {
        if (!json_is_integer(seed))
            return fail(e, 400, "seed", "'seed' must be an integer");
        sp->has_seed = 1;
        sp->seed = (uint64_t)json_integer_value(seed);
    }
    x = 1;
    if (opt_int(b, "n", 1, MM_API_MAX_N, &x, e))
        return -1;
    g->n = (int)x;
    x = g->n;
    if (opt_int(b, "best_of", 1, MM_API_MAX_N, &x, e))
        return -1;
    if (x != g->n)
        return fail(e, 400, "best_of", "'best_of' must equal 'n' (%d): ranking is not supported",
                    g->n);

    if (chat) {
        x = -1;
        if (opt_int(b, "max_tokens", 1, 1 << 30, &x, e) ||
            opt_int(b, "max_completion_tokens", 1, 1 << 30, &x, e))
            return -1;
    } else {
        x = -1;
        if (opt_int(b, "max_tokens", 0, 1 << 30, &x, e))
            return -1;
    }
    g->max_tokens_given = x >= 0;
    sp->max_tokens = x >= 0 ? (int)x : (chat ? -1 : 16);
    x = 0;
    if (opt_int(b, "min_tokens", 0, 1 << 30, &x, e))
        return -1;
    sp->min_tokens = (int)x;
    if (g->max_tokens_given && sp->min_tokens > sp->max_tokens)
        return fail(e, 400, "min_tokens", "'min_tokens' (%d) must not exceed 'max_tokens' (%d)",
                    sp->min_tokens, sp->max_tokens);

    if (opt_bool(b, "ignore_eos", &sp->ignore_eos, e) ||
        opt_bool(b, "skip_special_tokens", &sp->skip_special, e) ||
        opt_bool(b, "include_stop_str_in_output", &sp->include_stop_str, e))
        return -1;
    if (parse_stop(b, sp, e))
        return -1;
    json_t *ids = field(b, "stop_token_ids");
    if (ids) {
        if (!json_is_array(ids) || json_array_size(ids) > MM_SEQ_MAX_STOP_IDS)
            return fail(e, 400, "stop_token_ids", "'stop_token_ids' must be an array of at most %d "
                        "token ids", MM_SEQ_MAX_STOP_IDS);
        for (size_t i = 0; i < json_array_size(ids); i++) {
            json_t *t = json_array_get(ids, i);
            if (!json_is_integer(t) || json_integer_value(t) < 0 ||
                json_integer_value(t) >= n_vocab)
                return fail(e, 400, "stop_token_ids", "stop_token_ids[%zu] is not a token id in "
                            "[0, %d)", i, n_vocab);
            sp->stop_ids[sp->n_stop_ids++] = (int32_t)json_integer_value(t);
        }
    }
    json_t *bias = field(b, "logit_bias");
    if (bias) {
        if (!json_is_object(bias) || json_object_size(bias) > MM_SEQ_MAX_BIAS)
            return fail(e, 400, "logit_bias", "'logit_bias' must be an object of at most %d "
                        "entries", MM_SEQ_MAX_BIAS);
        const char *k;
        json_t *v;
        int nb = 0;
        json_object_foreach(bias, k, v) {
            char *end;
            errno = 0;
            long long id = strtoll(k, &end, 10);
            if (errno || end == k || *end || id < 0 || id >= mm_engine_valid_vocab(a->rt.engine))
                return fail(e, 400, "logit_bias", "logit_bias key '%s' is not a token id in "
                            "[0, %d)", k, mm_engine_valid_vocab(a->rt.engine));
            if (!json_is_number(v) || json_number_value(v) < -100 || json_number_value(v) > 100)
                return fail(e, 400, "logit_bias", "logit_bias values must be numbers in "
                            "[-100, 100]");
            g->bias_ids[nb] = (int32_t)id;
            g->bias_val[nb++] = (float)json_number_value(v);
        }
        sp->samp.bias_ids = g->bias_ids;
        sp->samp.bias_val = g->bias_val;
        sp->samp.n_bias = nb;
    }

    if (opt_bool(b, "stream", &g->stream, e))
        return -1;
    json_t *so = field(b, "stream_options");
    if (so) {
        if (!g->stream)
            return fail(e, 400, "stream_options", "'stream_options' is only allowed when "
                        "'stream' is true");
        if (!json_is_object(so))
            return fail(e, 400, "stream_options", "'stream_options' must be an object");
        if (opt_bool(so, "include_usage", &g->include_usage, e))
            return -1;
    }

    if (chat) {
        flag = 0;
        x = -1;
        if (opt_bool(b, "logprobs", &flag, e) ||
            opt_int(b, "top_logprobs", 0, MM_MAX_LOGPROBS, &x, e))
            return -1;
        if (x >= 0 && !flag)
            return fail(e, 400, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
        sp->logprobs = flag ? (x >= 0 ? (int)x : 0) : -1;
    } else {
        x = -1;
        if (opt_int(b, "logprobs", 0, MM_MAX_LOGPROBS, &x, e))
            return -1;
        sp->logprobs = (int)x;
    }
    return 0;
}

/* ---- the model field ---- */

static const char *check_model(mm_api *a, json_t *b, api_err *e)
{
    json_t *m = field(b, "model");
    if (!m)
        return a->o.names[0];
    if (!json_is_string(m)) {
        fail(e, 400, "model", "'model' must be a string");
        return NULL;
    }
    for (int i = 0; i < a->o.n_names; i++)
        if (strcmp(json_string_value(m), a->o.names[i]) == 0)
            return a->o.names[i];
    fail(e, 404, "model", "The model `%s` does not exist.", json_string_value(m));
    return NULL;
}

static json_t *parse_body(mm_http_exchange *ex, api_err *e)
{
    json_error_t je;
    json_t *b = json_loadb(ex->body.data ? ex->body.data : "", ex->body.len,
                           JSON_REJECT_DUPLICATES, &je);
    if (!b) {
        fail(e, 400, NULL, "invalid JSON body: %s (line %d, column %d)", je.text, je.line,
             je.column);
        return NULL;
    }
    if (!json_is_object(b)) {
        json_decref(b);
        fail(e, 400, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return b;
}

/* ---- chat template ---- */

/* vLLM's "string" content format: text parts joined by newlines. */
static int flatten_content(json_t *msg, size_t i, api_err *e)
{
    json_t *c = json_object_get(msg, "content");
    if (!c || json_is_string(c) || json_is_null(c))
        return 0;
    if (!json_is_array(c))
        return fail(e, 400, "messages", "messages[%zu].content must be a string or an array "
                    "of content parts", i);
    mm_buf t;
    mm_buf_init(&t, MM_API_MAX_BODY);
    for (size_t k = 0; k < json_array_size(c); k++) {
        json_t *part = json_array_get(c, k);
        json_t *type = json_object_get(part, "type");
        json_t *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) ||
            strcmp(json_string_value(type), "text") || !json_is_string(text)) {
            mm_buf_free(&t);
            return fail(e, 400, "messages", "messages[%zu].content[%zu]: only text parts "
                        "({\"type\": \"text\", \"text\": ...}) are supported", i, k);
        }
        if ((k && mm_buf_append(&t, "\n", 1)) ||
            mm_buf_append(&t, json_string_value(text), json_string_length(text))) {
            mm_buf_free(&t);
            return fail(e, 500, NULL, "out of memory");
        }
    }
    json_object_set_new(msg, "content", json_stringn(t.data ? t.data : "", t.len));
    mm_buf_free(&t);
    return 0;
}

static char *strip_dup(const char *s, size_t n, size_t *out_n)
{
    while (n && (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')) {
        s++;
        n--;
    }
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        n--;
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    *out_n = n;
    return d;
}

/* Render body.messages with the model's template into out. */
static int render_chat(mm_api *a, json_t *b, mm_buf *out, api_err *e)
{
    json_t *msgs = json_object_get(b, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return fail(e, 400, "messages", "'messages' must be a non-empty array");
    if (json_array_size(msgs) > MAX_MESSAGES)
        return fail(e, 400, "messages", "at most %d messages are allowed", MAX_MESSAGES);
    if (!a->rt.tpl)
        return fail(e, 400, "messages", "this model has no usable chat template: %s",
                    a->rt.tpl_err ? a->rt.tpl_err : "none in tokenizer_config.json");
    if (field(b, "chat_template"))
        return fail(e, 400, "chat_template", "a per-request 'chat_template' is not supported");
    int add_gen = 1, cont = 0;
    if (opt_bool(b, "add_generation_prompt", &add_gen, e) ||
        opt_bool(b, "continue_final_message", &cont, e))
        return -1;
    if (add_gen && cont)
        return fail(e, 400, "continue_final_message", "'continue_final_message' and "
                    "'add_generation_prompt' cannot both be true");
    int rc = -1;
    json_t *copy = json_array(), *extra = NULL;
    char *final = NULL;
    if (!copy) {
        fail(e, 500, NULL, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        if (!json_is_object(m) || !json_is_string(json_object_get(m, "role"))) {
            fail(e, 400, "messages", "messages[%zu] must be an object with a string 'role'", i);
            goto out;
        }
        json_t *mc = json_deep_copy(m);
        if (!mc || json_array_append_new(copy, mc) < 0) {
            fail(e, 500, NULL, "out of memory");
            goto out;
        }
        if (flatten_content(mc, i, e))
            goto out;
    }
    extra = a->rt.specials ? json_deep_copy(a->rt.specials) : json_object();
    if (!extra) {
        fail(e, 500, NULL, "out of memory");
        goto out;
    }
    static const char *const passed[] = {"tools", "documents"};
    for (size_t i = 0; i < 2; i++) {
        json_t *v = field(b, passed[i]);
        if (v && !json_is_array(v)) {
            fail(e, 400, passed[i], "'%s' must be an array", passed[i]);
            goto out;
        }
        if (v)
            json_object_set(extra, passed[i], v);
    }
    json_t *kw = field(b, "chat_template_kwargs");
    if (kw) {
        if (!json_is_object(kw)) {
            fail(e, 400, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
            goto out;
        }
        json_object_update(extra, kw);
    }
    const json_t *sp = a->rt.specials;
    const char *bos = sp ? json_string_value(json_object_get(sp, "bos_token")) : NULL;
    const char *eos = sp ? json_string_value(json_object_get(sp, "eos_token")) : NULL;
    char err[512] = "";
    int r = mm_chat_render(a->rt.tpl, copy, add_gen, bos, eos, extra, out, err, sizeof err);
    if (r == -ENOMEM) {
        fail(e, 500, NULL, "out of memory rendering the chat template");
        goto out;
    }
    if (r == -EBADMSG) {
        fail(e, 400, "messages", "%s", err);
        goto out;
    }
    if (r == -ENOTSUP) {
        /* The template is valid Jinja our engine does not implement: the
         * request is fine, the server falls short, so not a 400 (a client
         * must not "fix" its request; an operator must see it). */
        mm_warn("chat template: %s", err);
        fail(e, 500, NULL, "the chat template cannot be rendered by this server: %s", err);
        goto out;
    }
    if (r < 0) {
        fail(e, 400, "messages", "chat template error: %s", err);
        goto out;
    }
    if (cont) {
        /* transformers: cut the rendering right after the final message's
         * (stripped) content, so the model continues it. */
        json_t *last = json_array_get(copy, json_array_size(copy) - 1);
        json_t *c = json_object_get(last, "content");
        size_t fn = 0;
        final = json_is_string(c) ? strip_dup(json_string_value(c), json_string_length(c), &fn)
                                  : NULL;
        const char *hit = NULL;
        if (final && fn <= out->len)
            for (size_t i = out->len - fn + 1; i-- > 0;)
                if (memcmp(out->data + i, final, fn) == 0) {
                    hit = out->data + i;
                    break;
                }
        if (!hit) {
            fail(e, 400, "continue_final_message", "the final message's content was not found "
                 "in the rendered chat");
            goto out;
        }
        out->len = (size_t)(hit - out->data) + fn;
        out->data[out->len] = '\0';
    }
    rc = 0;
out:
    free(final);
    json_decref(copy);
    json_decref(extra);
    return rc;
}

/* ---- prompts ---- */

static int check_ids(mm_api *a, const mm_tok_ids *ids, const char *param, api_err *e)
{
    int nv = mm_engine_valid_vocab(a->rt.engine);
    for (size_t i = 0; i < ids->n; i++)
        if (ids->v[i] < 0 || ids->v[i] >= nv)
            return fail(e, 400, param, "token id %d is out of vocabulary [0, %d)",
                        (int)ids->v[i], nv);
    return 0;
}

static int ids_from_json(mm_api *a, json_t *arr, mm_tok_ids *ids, const char *param, api_err *e)
{
    size_t n = json_array_size(arr);
    mm_tok_ids_init(ids, n + 1);
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(arr, i);
        if (!json_is_integer(t) || json_integer_value(t) < INT32_MIN ||
            json_integer_value(t) > INT32_MAX)
            return fail(e, 400, param, "'%s' must hold integer token ids", param);
        if (mm_tok_ids_push(ids, (int32_t)json_integer_value(t)) < 0)
            return fail(e, 500, NULL, "out of memory");
    }
    return check_ids(a, ids, param, e);
}

static int is_int_array(json_t *v)
{
    if (!json_is_array(v) || json_array_size(v) == 0)
        return 0;
    return json_is_integer(json_array_get(v, 0));
}

/* completions' prompt: a string, strings, token ids, or lists of them. */
static int load_prompts(mm_api *a, api_req *r, json_t *b, int add_special, api_err *e)
{
    json_t *p = json_object_get(b, "prompt");
    json_t *one[1] = {p};
    json_t **items = one;
    size_t n = 1;
    int multi = 0;
    if (!p || json_is_null(p))
        return fail(e, 400, "prompt", "'prompt' is required");
    if (json_is_array(p) && !is_int_array(p)) {
        n = json_array_size(p);
        multi = 1;
        if (n == 0)
            return fail(e, 400, "prompt", "'prompt' must not be empty");
        if (n > MM_API_MAX_PROMPTS)
            return fail(e, 400, "prompt", "at most %d prompts per request, got %zu",
                        MM_API_MAX_PROMPTS, n);
    }
    r->prompts = calloc(n, sizeof *r->prompts);
    if (!r->prompts)
        return fail(e, 500, NULL, "out of memory");
    r->n_prompts = (int)n;
    for (size_t i = 0; i < n; i++)
        mm_buf_init(&r->prompts[i].decoded, MM_API_MAX_BODY * 4);
    for (size_t i = 0; i < n; i++) {
        json_t *it = multi ? json_array_get(p, i) : items[0];
        api_prompt *ap = &r->prompts[i];
        if (json_is_string(it)) {
            if (tokenize(a, json_string_value(it), json_string_length(it), add_special, &ap->ids,
                         "prompt", e))
                return -1;
            ap->text = json_string_value(it);
            ap->text_len = json_string_length(it);
        } else if (json_is_array(it) && (json_array_size(it) == 0 || is_int_array(it))) {
            if (ids_from_json(a, it, &ap->ids, "prompt", e))
                return -1;
            if (mm_tokenizer_decode(a->rt.tok, ap->ids.v, ap->ids.n, 0, &ap->decoded) < 0)
                return fail(e, 400, "prompt", "prompt %zu decodes to more text than allowed", i);
            ap->text = ap->decoded.data ? ap->decoded.data : "";
            ap->text_len = ap->decoded.len;
        } else {
            return fail(e, 400, "prompt", "'prompt' must be a string, an array of strings, an "
                        "array of token ids or an array of such arrays");
        }
        if (ap->ids.n == 0)
            return fail(e, 400, "prompt", "the prompt is empty (0 tokens)");
    }
    return 0;
}

/* Prompt + completion must fit the context; vLLM's wording, naming the
 * flag that sets the limit. */
static int check_length(mm_api *a, api_req *r, int max_tokens_given, api_err *e)
{
    int M = a->rt.max_model_len;
    const char *what = r->chat ? "messages" : "prompt";
    for (int i = 0; i < r->n_prompts; i++) {
        size_t n = r->prompts[i].ids.n;
        if (!max_tokens_given && r->sp.max_tokens < 0) {
            if (n >= (size_t)M)
                return fail(e, 400, what, "This model's maximum context length is %d tokens "
                            "(max_model_len). However, your %s has %zu tokens, leaving no room "
                            "for the completion. Please reduce the length of the %s.", M, what, n,
                            what);
            continue;
        }
        if (n + (size_t)r->sp.max_tokens > (size_t)M)
            return fail(e, 400, what, "This model's maximum context length is %d tokens "
                        "(max_model_len). However, you requested %zu tokens (%zu in the %s, "
                        "%d in the completion). Please reduce the length of the %s or "
                        "completion.", M, n + (size_t)r->sp.max_tokens, n, what,
                        r->sp.max_tokens, what);
    }
    return 0;
}

/* ---- output: JSON pieces ---- */

static const char *finish_str(mm_finish f)
{
    return f == MM_FINISH_STOP ? "stop" : f == MM_FINISH_LENGTH ? "length" : "abort";
}

static json_t *stop_reason(const api_req *r, const mm_seq_outbox *o)
{
    if (o->finish == MM_FINISH_STOP && o->stop_str >= 0 && o->stop_str < r->sp.n_stop)
        return json_stringn(r->sp.stop[o->stop_str], r->sp.stop_len[o->stop_str]);
    if (o->finish == MM_FINISH_STOP && o->stop_tok >= 0)
        return json_integer(o->stop_tok);
    return json_null();
}

/* completions' logprobs: parallel arrays. */
typedef struct lp_arrays {
    json_t *tokens, *lps, *tops, *offs;
} lp_arrays;

static int lp_arrays_init(lp_arrays *l)
{
    l->tokens = json_array();
    l->lps = json_array();
    l->tops = json_array();
    l->offs = json_array();
    return l->tokens && l->lps && l->tops && l->offs ? 0 : -ENOMEM;
}

static void lp_arrays_add(mm_api *a, lp_arrays *l, const mm_gen_tok *g, const mm_tok_lp *top,
                          size_t *offset, mm_buf *scratch)
{
    json_t *ts = tok_json(a, g->id, scratch);
    json_array_append_new(l->offs, json_integer((json_int_t)*offset));
    *offset += utf8_chars(json_string_value(ts), json_string_length(ts));
    json_array_append_new(l->tokens, ts);
    json_array_append_new(l->lps, lp_json(g->lp));
    if (isnan(g->lp)) {
        json_array_append_new(l->tops, json_null());
        return;
    }
    json_t *o = json_object();
    for (uint32_t i = 0; o && i < g->ntop; i++) {
        json_t *k = tok_json(a, top[i].id, scratch);
        json_object_set_new(o, json_string_value(k), lp_json(top[i].lp));
        json_decref(k);
    }
    /* vLLM lists the chosen token too, even outside the top n. */
    json_t *k = tok_json(a, g->id, scratch);
    if (o && !json_object_get(o, json_string_value(k)))
        json_object_set_new(o, json_string_value(k), lp_json(g->lp));
    json_decref(k);
    json_array_append_new(l->tops, o ? o : json_null());
}

static json_t *lp_arrays_json(lp_arrays *l)
{
    return json_pack("{s:o, s:o, s:o, s:o}", "text_offset", l->offs, "token_logprobs", l->lps,
                     "tokens", l->tokens, "top_logprobs", l->tops);
}

/* The completions logprobs of a choice: prompt entries (echo) and new
 * tokens. */
static json_t *completion_lps(api_req *r, api_choice *c, int with_prompt)
{
    lp_arrays l;
    if (lp_arrays_init(&l) < 0) {
        json_decref(l.tokens);
        json_decref(l.lps);
        json_decref(l.tops);
        json_decref(l.offs);
        return json_null();
    }
    if (with_prompt) {
        const mm_tok_lp *ptop;
        const mm_gen_tok *pl = mm_seq_prompt_logprobs(c->seq, &ptop);
        size_t n = mm_seq_prompt_len(c->seq);
        for (size_t i = 0; pl && i < n; i++)
            lp_arrays_add(r->a, &l, &pl[i], ptop + pl[i].top_off, &c->lp_offset, &r->scratch);
    }
    for (size_t i = 0; i < c->got.ntoks; i++)
        lp_arrays_add(r->a, &l, &c->got.toks[i], c->got.top + c->got.toks[i].top_off,
                      &c->lp_offset, &r->scratch);
    return lp_arrays_json(&l);
}

static json_t *chat_lp_item(mm_api *a, int32_t id, float lp, mm_buf *scratch)
{
    json_t *ts = tok_json(a, id, scratch);
    json_t *bytes = json_array();
    const unsigned char *p = (const unsigned char *)json_string_value(ts);
    for (size_t i = 0; bytes && i < json_string_length(ts); i++)
        json_array_append_new(bytes, json_integer(p[i]));
    return json_pack("{s:o, s:o, s:o}", "token", ts, "logprob", lp_json(lp), "bytes",
                     bytes ? bytes : json_null());
}

static json_t *chat_lps(api_req *r, api_choice *c)
{
    json_t *content = json_array();
    for (size_t i = 0; content && i < c->got.ntoks; i++) {
        const mm_gen_tok *g = &c->got.toks[i];
        json_t *item = chat_lp_item(r->a, g->id, g->lp, &r->scratch);
        json_t *tops = json_array();
        for (uint32_t k = 0; tops && k < g->ntop; k++) {
            const mm_tok_lp *t = &c->got.top[g->top_off + k];
            json_array_append_new(tops, chat_lp_item(r->a, t->id, t->lp, &r->scratch));
        }
        if (item)
            json_object_set_new(item, "top_logprobs", tops ? tops : json_array());
        json_array_append_new(content, item);
    }
    return content ? json_pack("{s:o}", "content", content) : json_null();
}

static json_t *usage_json(api_req *r)
{
    size_t prompt = 0, gen = 0;
    for (int i = 0; i < r->n_prompts; i++)
        prompt += r->prompts[i].ids.n;
    for (int i = 0; i < r->n_ch; i++)
        gen += r->ch[i].got.n_gen;
    return json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)prompt, "total_tokens",
                     (json_int_t)(prompt + gen), "completion_tokens", (json_int_t)gen);
}

static json_t *envelope(api_req *r, const char *object)
{
    return json_pack("{s:s, s:s, s:I, s:s}", "id", r->id, "object", object, "created",
                     (json_int_t)r->created, "model", r->model);
}

/* ---- output: whole responses ---- */

static void respond_final(api_req *r)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < r->n_ch; i++) {
        api_choice *c = &r->ch[i];
        json_t *ch;
        if (r->chat) {
            json_t *msg = json_pack("{s:s, s:s%}", "role", "assistant", "content",
                                    c->got.text.data ? c->got.text.data : "", c->got.text.len);
            ch = json_pack("{s:i, s:o, s:o, s:s, s:o}", "index", c->index, "message", msg,
                           "logprobs", r->sp.logprobs >= 0 ? chat_lps(r, c) : json_null(),
                           "finish_reason", finish_str(c->got.finish), "stop_reason",
                           stop_reason(r, &c->got));
        } else {
            api_prompt *p = &r->prompts[c->prompt];
            mm_buf text;
            mm_buf_init(&text, MAX_CHOICE_TEXT);
            if (r->echo)
                mm_buf_append(&text, p->text, p->text_len);
            mm_buf_append(&text, c->got.text.data ? c->got.text.data : "", c->got.text.len);
            json_t *lps = r->logprobs >= 0 ? completion_lps(r, c, r->echo) : json_null();
            ch = json_pack("{s:i, s:s%, s:o, s:s, s:o}", "index", c->index, "text",
                           text.data ? text.data : "", text.len, "logprobs", lps,
                           "finish_reason", finish_str(c->got.finish), "stop_reason",
                           stop_reason(r, &c->got));
            mm_buf_free(&text);
        }
        json_array_append_new(choices, ch);
    }
    json_t *resp = envelope(r, r->chat ? "chat.completion" : "text_completion");
    if (resp) {
        json_object_set_new(resp, "choices", choices ? choices : json_array());
        json_object_set_new(resp, "usage", usage_json(r));
    } else {
        json_decref(choices);
    }
    respond_json(r->ex, 200, resp);
}

/* ---- output: streams ---- */

static void sse_write(api_req *r, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_FLAGS) : NULL;
    json_decref(j);
    if (!s)
        return;
    mm_http_write(r->ex, "data: ", 6);
    mm_http_write(r->ex, s, strlen(s));
    mm_http_write(r->ex, "\n\n", 2);
    free(s);
}

static json_t *chunk(api_req *r, json_t *choice)
{
    json_t *j = envelope(r, r->chat ? "chat.completion.chunk" : "text_completion");
    json_t *arr = json_array();
    if (!j || !arr) {
        json_decref(j);
        json_decref(arr);
        json_decref(choice);
        return NULL;
    }
    if (choice)
        json_array_append_new(arr, choice);
    json_object_set_new(j, "choices", arr);
    if (r->include_usage)
        json_object_set_new(j, "usage", json_null());
    return j;
}

static void stream_begin(api_req *r)
{
    mm_http_begin(r->ex, 200, CT_SSE, -1);
    if (!r->chat)
        return;
    for (int i = 0; i < r->n_ch; i++) {
        json_t *delta = json_pack("{s:s, s:s}", "role", "assistant", "content", "");
        sse_write(r, chunk(r, json_pack("{s:i, s:o, s:n, s:n}", "index", r->ch[i].index,
                                        "delta", delta, "logprobs", "finish_reason")));
        r->ch[i].started = 1;
    }
}

/* Write what choice c got since the last call. */
static void stream_emit(api_req *r, api_choice *c, int fin)
{
    mm_seq_outbox *o = &c->got;
    int echo_lp = r->echo && r->logprobs >= 0;
    if (!r->chat && !c->started && echo_lp && !o->prompt_lp_ready && !fin)
        return;   /* wait for the prompt's logprobs to go out with the echo */
    int first = !c->started;
    if (o->text.len == 0 && o->ntoks == 0 && !fin && !(first && r->echo))
        return;
    if (fin && (o->finish == MM_FINISH_ERROR || o->finish == MM_FINISH_ABORT)) {
        mm_buf b;
        mm_buf_init(&b, 8192);
        mm_buf_append_str(&b, "data: ");
        mm_oai_error_body(&b, o->finish == MM_FINISH_ERROR ? 500 : 503, NULL,
                          o->error[0] ? o->error : "generation aborted");
        mm_buf_append_str(&b, "\n\n");
        mm_http_write(r->ex, b.data, b.len);
        mm_buf_free(&b);
        return;
    }
    json_t *ch;
    const char *text = o->text.data ? o->text.data : "";
    if (r->chat) {
        json_t *delta = o->text.len ? json_pack("{s:s%}", "content", text, o->text.len)
                                    : json_object();
        ch = json_pack("{s:i, s:o, s:o}", "index", c->index, "delta", delta, "logprobs",
                       r->sp.logprobs >= 0 && o->ntoks ? chat_lps(r, c) : json_null());
    } else {
        mm_buf t;
        mm_buf_init(&t, MAX_CHOICE_TEXT);
        if (first && r->echo)
            mm_buf_append(&t, r->prompts[c->prompt].text, r->prompts[c->prompt].text_len);
        mm_buf_append(&t, text, o->text.len);
        ch = json_pack("{s:i, s:s%, s:o}", "index", c->index, "text", t.data ? t.data : "",
                       t.len, "logprobs",
                       r->logprobs >= 0 ? completion_lps(r, c, first && r->echo) : json_null());
        mm_buf_free(&t);
    }
    c->started = 1;
    if (ch) {
        json_object_set_new(ch, "finish_reason", fin ? json_string(finish_str(o->finish))
                                                     : json_null());
        json_object_set_new(ch, "stop_reason", fin ? stop_reason(r, o) : json_null());
    }
    sse_write(r, chunk(r, ch));
    /* Keep the counters (usage needs n_gen); drop what was written. */
    mm_seq_outbox_clear(o);
}

static void stream_end(api_req *r)
{
    if (r->include_usage) {
        json_t *j = chunk(r, NULL);
        if (j)
            json_object_set_new(j, "usage", usage_json(r));
        sse_write(r, j);
    }
    mm_http_write(r->ex, "data: [DONE]\n\n", 14);
    mm_http_end(r->ex);
}

/* ---- engine output ---- */

static void on_seq(mm_seq *s, void *arg)
{
    (void)arg;
    api_req *r = mm_seq_udata(s);
    if (!r)
        return;
    api_choice *c = NULL;
    for (int i = 0; i < r->n_ch; i++)
        if (r->ch[i].seq == s)
            c = &r->ch[i];
    if (!c || c->done)
        return;
    int fin = mm_seq_take(s, &c->got);
    if (r->stream)
        stream_emit(r, c, fin);
    if (fin) {
        c->done = 1;
        r->remaining--;
        if (!r->stream &&
            (c->got.finish == MM_FINISH_ERROR || c->got.finish == MM_FINISH_ABORT)) {
            int st = c->got.finish == MM_FINISH_ERROR ? 500 : 503;
            r->ex->on_abort = NULL;
            mm_http_respond_error(r->ex, st, NULL, NULL, "%s",
                                  c->got.error[0] ? c->got.error : "generation aborted");
            req_free(r);
            return;
        }
    }
    if (r->remaining > 0)
        return;
    mm_http_exchange *ex = r->ex;
    ex->on_abort = NULL;
    if (r->stream)
        stream_end(r);
    else
        respond_final(r);
    req_free(r);
}

void mm_api_poll(mm_api *a)
{
    if (a->rt.engine)
        mm_engine_drain(a->rt.engine, on_seq, a);
}

static void notify_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mm_api_poll(arg);
}

void mm_api_notify(void *api)
{
    mm_api *a = api;
    event_active(a->notify_ev, EV_READ, 1);
}

/* ---- generation endpoints ---- */

/* Features a client may rely on that this worker does not implement: a
 * refusal is better than an answer that silently ignores them. */
static int unsupported(json_t *b, api_err *e)
{
    json_t *rf = field(b, "response_format");
    if (rf) {
        json_t *t = json_object_get(rf, "type");
        if (!json_is_object(rf) || !json_is_string(t) || strcmp(json_string_value(t), "text"))
            return fail(e, 400, "response_format", "'response_format' other than {\"type\": "
                        "\"text\"} (structured output) is not supported");
    }
    json_t *tc = field(b, "tool_choice");
    if (tc && !(json_is_string(tc) && (strcmp(json_string_value(tc), "none") == 0 ||
                                       strcmp(json_string_value(tc), "auto") == 0)))
        return fail(e, 400, "tool_choice", "'tool_choice' other than \"none\" or \"auto\" is "
                    "not supported (tool calls are not parsed)");
    if (field(b, "guided_json") || field(b, "guided_regex") || field(b, "guided_choice") ||
        field(b, "guided_grammar") || field(b, "structured_outputs"))
        return fail(e, 400, NULL, "guided decoding is not supported");
    return 0;
}

static void handle_generate(mm_api *a, mm_http_exchange *ex, int chat)
{
    api_err e = {0};
    gen_opts g;
    mm_buf rendered;
    mm_buf_init(&rendered, MAX_RENDERED);
    api_req *r = calloc(1, sizeof *r);
    if (!r) {
        fail(&e, 500, NULL, "out of memory");
        goto fail;
    }
    r->a = a;
    r->chat = chat;
    mm_buf_init(&r->scratch, 1 << 16);
    if (!(r->body = parse_body(ex, &e)) || !(r->model = check_model(a, r->body, &e)) ||
        parse_sampling(a, r->body, chat, &r->sp, &g, &e))
        goto fail;
    if (unsupported(r->body, &e))
        goto fail;
    r->stream = g.stream;
    r->include_usage = g.include_usage;
    r->logprobs = r->sp.logprobs;
    if (chat) {
        int add_special = 0;
        if (opt_bool(r->body, "add_special_tokens", &add_special, &e) ||
            render_chat(a, r->body, &rendered, &e))
            goto fail;
        if (!(r->prompts = calloc(1, sizeof *r->prompts))) {
            fail(&e, 500, NULL, "out of memory");
            goto fail;
        }
        r->n_prompts = 1;
        mm_buf_init(&r->prompts[0].decoded, 0);
        if (tokenize(a, rendered.data ? rendered.data : "", rendered.len, add_special,
                     &r->prompts[0].ids, "messages", &e))
            goto fail;
        if (r->prompts[0].ids.n == 0) {
            fail(&e, 400, "messages", "the rendered chat is empty (0 tokens)");
            goto fail;
        }
    } else {
        int add_special = 1;
        if (field(r->body, "suffix")) {
            fail(&e, 400, "suffix", "'suffix' is not supported");
            goto fail;
        }
        if (opt_bool(r->body, "echo", &r->echo, &e) ||
            opt_bool(r->body, "add_special_tokens", &add_special, &e) ||
            load_prompts(a, r, r->body, add_special, &e))
            goto fail;
    }
    if (check_length(a, r, g.max_tokens_given, &e))
        goto fail;
    if ((size_t)r->n_prompts * (size_t)g.n > MM_API_MAX_CHOICES) {
        fail(&e, 400, "n", "prompts x n must be at most %d, got %d x %d", MM_API_MAX_CHOICES,
             r->n_prompts, g.n);
        goto fail;
    }
    r->ch = calloc((size_t)r->n_prompts * (size_t)g.n, sizeof *r->ch);
    if (!r->ch) {
        fail(&e, 500, NULL, "out of memory");
        goto fail;
    }
    new_id(a, chat ? "chatcmpl-" : "cmpl-", r->id, sizeof r->id);
    r->created = (long long)time(NULL);
    r->ex = ex;
    for (int p = 0; p < r->n_prompts; p++) {
        api_prompt *ap = &r->prompts[p];
        for (int k = 0; k < g.n; k++) {
            mm_seq_params sp = r->sp;
            if (sp.max_tokens < 0)
                sp.max_tokens = a->rt.max_model_len - (int)ap->ids.n;
            /* n > 1 with a seed: distinct but reproducible choices. */
            if (sp.has_seed)
                sp.seed += (uint64_t)k;
            if (r->echo && r->logprobs >= 0)
                sp.prompt_logprobs = r->logprobs;
            api_choice *c = &r->ch[r->n_ch];
            mm_seq_outbox_init(&c->got);
            c->index = r->n_ch;
            c->prompt = p;
            r->n_ch++;
            int rc = mm_seq_new(ap->ids.v, ap->ids.n, &sp, &c->seq);
            if (rc < 0) {
                fail(&e, 500, NULL, "cannot create a sequence: %s", strerror(-rc));
                goto fail;
            }
            mm_seq_set_udata(c->seq, r);
        }
    }
    /* The sequences hold copies; g (on this stack) goes away. */
    r->sp.samp.bias_ids = NULL;
    r->sp.samp.bias_val = NULL;
    r->sp.samp.n_bias = 0;
    for (int i = 0; i < r->n_ch; i++) {
        int src = mm_engine_submit(a->rt.engine, r->ch[i].seq);
        if (src == -ENOTRECOVERABLE) {
            fail(&e, 503, NULL, "the GPU failed; the worker is exiting to be restarted");
            goto fail;
        }
        if (src < 0) {
            fail(&e, 503, NULL, "the server is shutting down");
            goto fail;
        }
        r->remaining++;
    }
    mm_buf_free(&rendered);
    ex->udata = r;
    ex->on_abort = req_on_abort;
    if (r->stream)
        stream_begin(r);
    return;
fail:
    mm_buf_free(&rendered);
    req_free(r);
    respond_err(ex, &e);
}

/* ---- tokenize / detokenize ---- */

static void handle_tokenize(mm_api *a, mm_http_exchange *ex)
{
    api_err e = {0};
    mm_tok_ids ids;
    mm_buf rendered;
    mm_tok_ids_init(&ids, 0);
    mm_buf_init(&rendered, MAX_RENDERED);
    json_t *b = parse_body(ex, &e);
    if (!b || !check_model(a, b, &e))
        goto fail;
    int strs = 0;
    if (opt_bool(b, "return_token_strs", &strs, &e))
        goto fail;
    if (json_object_get(b, "messages")) {
        int add_special = 0;
        if (opt_bool(b, "add_special_tokens", &add_special, &e) ||
            render_chat(a, b, &rendered, &e) ||
            tokenize(a, rendered.data ? rendered.data : "", rendered.len, add_special, &ids,
                     "messages", &e))
            goto fail;
    } else {
        json_t *p = json_object_get(b, "prompt");
        int add_special = 1;
        if (!json_is_string(p)) {
            fail(&e, 400, "prompt", "'prompt' (a string) or 'messages' is required");
            goto fail;
        }
        if (opt_bool(b, "add_special_tokens", &add_special, &e) ||
            tokenize(a, json_string_value(p), json_string_length(p), add_special, &ids, "prompt",
                     &e))
            goto fail;
    }
    json_t *arr = json_array(), *sarr = strs ? json_array() : json_null();
    for (size_t i = 0; arr && i < ids.n; i++) {
        json_array_append_new(arr, json_integer(ids.v[i]));
        if (strs && sarr) {
            size_t len = 0;
            const char *t = mm_tokenizer_id_to_token(a->rt.tok, ids.v[i], &len);
            json_t *js = t ? json_stringn(t, len) : NULL;
            json_array_append_new(sarr, js ? js : json_string(""));
        }
    }
    respond_json(ex, 200, json_pack("{s:I, s:i, s:o, s:o}", "count", (json_int_t)ids.n,
                                    "max_model_len", a->rt.max_model_len, "tokens",
                                    arr ? arr : json_array(), "token_strs",
                                    sarr ? sarr : json_null()));
    goto out;
fail:
    respond_err(ex, &e);
out:
    json_decref(b);
    mm_tok_ids_free(&ids);
    mm_buf_free(&rendered);
}

static void handle_detokenize(mm_api *a, mm_http_exchange *ex)
{
    api_err e = {0};
    mm_tok_ids ids;
    mm_buf text;
    mm_tok_ids_init(&ids, 0);
    mm_buf_init(&text, MM_API_MAX_BODY * 4);
    json_t *b = parse_body(ex, &e);
    if (!b || !check_model(a, b, &e))
        goto fail;
    json_t *t = json_object_get(b, "tokens");
    if (!json_is_array(t)) {
        fail(&e, 400, "tokens", "'tokens' must be an array of token ids");
        goto fail;
    }
    if (ids_from_json(a, t, &ids, "tokens", &e))
        goto fail;
    if (mm_tokenizer_decode(a->rt.tok, ids.v, ids.n, 0, &text) < 0) {
        fail(&e, 400, "tokens", "the decoded text is too long");
        goto fail;
    }
    respond_json(ex, 200, json_pack("{s:s%}", "prompt", text.data ? text.data : "", text.len));
    goto out;
fail:
    respond_err(ex, &e);
out:
    json_decref(b);
    mm_tok_ids_free(&ids);
    mm_buf_free(&text);
}

/* ---- informational endpoints ---- */

static void handle_models(mm_api *a, mm_http_exchange *ex)
{
    json_t *data = json_array();
    for (int i = 0; data && i < a->o.n_names; i++)
        json_array_append_new(data, json_pack("{s:s, s:s, s:I, s:s, s:s, s:n, s:i, s:[]}", "id",
                                              a->o.names[i], "object", "model", "created",
                                              (json_int_t)a->started, "owned_by", "modelmux",
                                              "root", a->o.model_dir, "parent", "max_model_len",
                                              a->o.max_model_len, "permission"));
    respond_json(ex, 200, json_pack("{s:s, s:o}", "object", "list", "data",
                                    data ? data : json_array()));
}

static void prom_escape(mm_buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            mm_buf_append(b, "\\", 1);
        if (*s == '\n')
            mm_buf_append(b, "\\n", 2);
        else
            mm_buf_append(b, s, 1);
    }
}

static void prom_hist(mm_buf *b, const char *name, const char *help, const char *lbl,
                      const mm_hist *h, const double *bounds)
{
    mm_buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < MM_HIST_BUCKETS; i++) {
        cum += h->count[i];
        mm_buf_printf(b, "%s_bucket{%s,le=\"%g\"} %llu\n", name, lbl, bounds[i],
                      (unsigned long long)cum);
    }
    cum += h->count[MM_HIST_BUCKETS];
    mm_buf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, lbl, (unsigned long long)cum);
    mm_buf_printf(b, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, lbl, h->sum, name, lbl,
                  (unsigned long long)h->n);
}

static void handle_metrics(mm_api *a, mm_http_exchange *ex)
{
    mm_engine_stats st;
    memset(&st, 0, sizeof st);
    if (a->ready)
        mm_engine_get_stats(a->rt.engine, &st);
    mm_buf b, lbl;
    mm_buf_init(&b, 1 << 20);
    mm_buf_init(&lbl, 4096);
    mm_buf_append_str(&lbl, "model_name=\"");
    prom_escape(&lbl, a->o.names[0]);
    mm_buf_append_str(&lbl, "\"");
    const char *l = mm_buf_cstr(&lbl);
    static const struct {
        const char *name, *type, *help;
    } g[] = {
        {"modelmux_worker_model_ready", "gauge", "1 once the model is loaded and serving."},
        {"modelmux_worker_requests_running", "gauge", "Sequences in the running batch."},
        {"modelmux_worker_requests_waiting", "gauge", "Sequences waiting for a free slot."},
        {"modelmux_worker_kv_cache_usage_perc", "gauge",
         "KV-cache use: blocks in use over the blocks of the pool (0..1)."},
        {"modelmux_worker_prompt_tokens_total", "counter", "Prompt tokens prefilled."},
        {"modelmux_worker_generation_tokens_total", "counter", "Tokens generated."},
        {"modelmux_worker_engine_steps_total", "counter", "Forward steps run."},
        {"modelmux_worker_num_preemptions_total", "counter",
         "Sequences preempted (to be recomputed) because the KV pool ran out."},
        /* vLLM's own name too, for dashboards built on vLLM's metrics */
        {"vllm:num_preemptions_total", "counter",
         "Cumulative number of preemptions from the engine."},
    };
    double v[] = {a->ready, st.running, st.waiting, st.kv_usage, (double)st.prompt_tokens,
                  (double)st.generation_tokens, (double)st.steps, (double)st.preemptions,
                  (double)st.preemptions};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        mm_buf_printf(&b, "# HELP %s %s\n# TYPE %s %s\n%s{%s} %.9g\n", g[i].name, g[i].help,
                      g[i].name, g[i].type, g[i].name, l, v[i]);
    mm_buf_append_str(&b, "# HELP modelmux_worker_request_success_total Sequences finished, by "
                          "reason.\n# TYPE modelmux_worker_request_success_total counter\n");
    for (int f = MM_FINISH_STOP; f <= MM_FINISH_ERROR; f++)
        mm_buf_printf(&b, "modelmux_worker_request_success_total{%s,finished_reason=\"%s\"} %llu\n",
                      l, mm_finish_name((mm_finish)f), (unsigned long long)st.finished[f]);
    prom_hist(&b, "modelmux_worker_time_to_first_token_seconds",
              "Time from submission to the first token.", l, &st.ttft, mm_engine_ttft_bounds);
    prom_hist(&b, "modelmux_worker_inter_token_latency_seconds",
              "Time between consecutive tokens of a sequence.", l, &st.itl,
              mm_engine_itl_bounds);
    prom_hist(&b, "modelmux_worker_e2e_request_latency_seconds",
              "Time from submission to the end of a sequence.", l, &st.e2e,
              mm_engine_e2e_bounds);
    mm_http_respond(ex, 200, "Content-Type: text/plain; version=0.0.4\r\n", b.data, b.len);
    mm_buf_free(&b);
    mm_buf_free(&lbl);
}

/* ---- routing ---- */

static int target_is(const mm_http_request *q, const char *path)
{
    size_t n = q->target_len;
    for (size_t i = 0; i < q->target_len; i++)
        if (q->target[i] == '?') {
            n = i;
            break;
        }
    return n == strlen(path) && memcmp(q->target, path, n) == 0;
}

static int method_is(const mm_http_request *q, const char *m)
{
    return q->method_len == strlen(m) && memcmp(q->method, m, q->method_len) == 0;
}

void mm_api_handle(mm_http_exchange *ex, void *arg)
{
    mm_api *a = arg;
    const mm_http_request *q = &ex->req;
    static const struct {
        const char *path, *method;
        int needs_model;
    } routes[] = {
        {"/health", "GET", 0},        {"/version", "GET", 0},
        {"/v1/models", "GET", 0},     {"/metrics", "GET", 0},
        {"/v1/completions", "POST", 1}, {"/v1/chat/completions", "POST", 1},
        {"/tokenize", "POST", 1},     {"/detokenize", "POST", 1},
    };
    size_t i, n = sizeof routes / sizeof routes[0];
    for (i = 0; i < n; i++)
        if (target_is(q, routes[i].path))
            break;
    if (i == n) {
        mm_http_respond_error(ex, 404, NULL, NULL, "no such endpoint: %.*s",
                              (int)(q->target_len > 200 ? 200 : q->target_len), q->target);
        return;
    }
    int head = method_is(q, "HEAD") && strcmp(routes[i].method, "GET") == 0;
    if (!method_is(q, routes[i].method) && !head) {
        char allow[64];
        snprintf(allow, sizeof allow, "Allow: %s\r\n", routes[i].method);
        mm_http_respond_error(ex, 405, NULL, allow, "method not allowed; use %s",
                              routes[i].method);
        return;
    }
    if (routes[i].needs_model && !a->ready) {
        mm_http_respond_error(ex, 503, NULL, "Retry-After: 1\r\n", "the model is still loading");
        return;
    }
    switch (i) {
    case 0:
        if (a->ready && mm_engine_dead(a->rt.engine, NULL, 0))
            mm_http_respond(ex, 503, CT_JSON, "{\"status\":\"failed\"}", 19);
        else if (a->ready)
            mm_http_respond(ex, 200, CT_JSON, "{\"status\":\"ok\"}", 15);
        else
            mm_http_respond(ex, 503, CT_JSON "Retry-After: 1\r\n", "{\"status\":\"loading\"}", 20);
        break;
    case 1:
        respond_json(ex, 200, json_pack("{s:s}", "version", MM_WORKER_VERSION));
        break;
    case 2: handle_models(a, ex); break;
    case 3: handle_metrics(a, ex); break;
    case 4: handle_generate(a, ex, 0); break;
    case 5: handle_generate(a, ex, 1); break;
    case 6: handle_tokenize(a, ex); break;
    default: handle_detokenize(a, ex); break;
    }
}

/* ---- life cycle ---- */

int mm_api_new(struct event_base *base, const mm_api_opts *o, mm_api **out, char *err,
               size_t errlen)
{
    *out = NULL;
    if (o->n_names < 1 || o->n_names > MM_API_MAX_NAMES) {
        snprintf(err, errlen, "1 to %d served model names", MM_API_MAX_NAMES);
        return -EINVAL;
    }
    mm_api *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    a->base = base;
    a->o = *o;
    a->started = (long long)time(NULL);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    mm_xrng_seed(&a->id_rng, (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^
                                (uint64_t)getpid() << 40);
    a->notify_ev = event_new(base, -1, 0, notify_cb, a);
    if (!a->notify_ev) {
        free(a);
        snprintf(err, errlen, "cannot create the notify event");
        return -ENOMEM;
    }
    *out = a;
    return 0;
}

void mm_api_set_ready(mm_api *a, const mm_api_runtime *rt)
{
    a->rt = *rt;
    a->o.max_model_len = rt->max_model_len;
    a->ready = 1;
}

void mm_api_free(mm_api *a)
{
    if (!a)
        return;
    if (a->notify_ev)
        event_free(a->notify_ev);
    free(a);
}
