/* template.c: the public face of the template engine (see template.h): the
 * template object and its arena, and the chat-specific context building that
 * mirrors transformers' apply_chat_template. */
#include "template.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"

/* ---- arena ---- */
struct mm_tpl_chunk {
    struct mm_tpl_chunk *next;
    size_t used, size;
    max_align_t data[];
};

#define ARENA_CHUNK (64u * 1024)

void *mm_tpl_alloc(mm_tpl_arena *a, size_t n)
{
    size_t al = _Alignof(max_align_t);
    n = (n + al - 1) / al * al;
    struct mm_tpl_chunk *c = a->head;
    if (!c || c->size - c->used < n) {
        size_t sz = n > ARENA_CHUNK ? n : ARENA_CHUNK;
        c = malloc(sizeof(*c) + sz);
        if (!c)
            return NULL;
        c->next = a->head;
        c->used = 0;
        c->size = sz;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

char *mm_tpl_strndup(mm_tpl_arena *a, const char *s, size_t n)
{
    char *p = mm_tpl_alloc(a, n + 1);
    if (!p)
        return NULL;
    if (n)
        memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void mm_tpl_arena_free(mm_tpl_arena *a)
{
    struct mm_tpl_chunk *c = a->head;
    while (c) {
        struct mm_tpl_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
}

/* ---- compile / render / free ---- */
int mm_template_compile(const char *src, mm_template **out, char *err, size_t errlen)
{
    int rc;
    mm_tpl_tokens toks = {0};
    *out = NULL;
    size_t len = strlen(src);
    if (len > MM_TPL_MAX_SOURCE) {
        snprintf(err, errlen, "template is %zu bytes, over the %u-byte limit", len,
                 MM_TPL_MAX_SOURCE);
        return -E2BIG;
    }
    if (!mm_tpl_u8_valid(src, len)) {
        snprintf(err, errlen, "template is not valid UTF-8");
        return -EINVAL;
    }
    mm_template *t = calloc(1, sizeof(*t));
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = mm_tpl_lex(src, len, &t->arena, &toks, err, errlen);
    if (rc)
        goto fail;
    rc = mm_tpl_parse(t, &toks, err, errlen);
    if (rc)
        goto fail;
    rc = mm_tpl_scope(t, err, errlen);
    if (rc)
        goto fail;
    free(toks.v);
    *out = t;
    return 0;
fail:
    free(toks.v);
    mm_template_free(t);
    return rc;
}

void mm_template_free(mm_template *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->nconsts; i++)
        json_decref(t->consts[i]);
    free(t->consts);
    mm_tpl_arena_free(&t->arena);
    free(t);
}

int mm_template_render(const mm_template *tpl, const json_t *ctx, mm_buf *out,
                       char *err, size_t errlen)
{
    if (ctx && !json_is_object(ctx)) {
        snprintf(err, errlen, "template context must be a JSON object");
        return -EINVAL;
    }
    size_t mark = out->len;
    int rc = mm_tpl_eval_render(tpl, ctx, out, err, errlen);
    if (rc) {
        /* never hand back half a prompt */
        out->len = mark;
        if (out->data)
            out->data[mark] = '\0';
    }
    return rc;
}

/* ---- chat ---- */
int mm_chat_render(const mm_template *tpl, const json_t *messages,
                   int add_generation_prompt, const char *bos_token,
                   const char *eos_token, const json_t *extra, mm_buf *out,
                   char *err, size_t errlen)
{
    int rc = -ENOMEM;
    if (!json_is_array(messages)) {
        snprintf(err, errlen, "messages must be a JSON array");
        return -EINVAL;
    }
    if (extra && !json_is_object(extra)) {
        snprintf(err, errlen, "template variables must be a JSON object");
        return -EINVAL;
    }
    if (json_array_size(messages) == 0) {
        /* transformers refuses these too */
        snprintf(err, errlen, "cannot apply a chat template to an empty conversation");
        return -EINVAL;
    }
    json_t *ctx = json_object();
    if (!ctx)
        goto oom;
    /* transformers passes tools and documents even when absent (as None), so
     * `tools is defined` holds and `tools is none` tells "no tools". */
    if (json_object_set_new(ctx, "messages", json_incref((json_t *)messages)) ||
        json_object_set_new(ctx, "tools", json_null()) ||
        json_object_set_new(ctx, "documents", json_null()) ||
        json_object_set_new(ctx, "add_generation_prompt",
                            json_boolean(add_generation_prompt)))
        goto oom;
    if (bos_token && json_object_set_new(ctx, "bos_token", json_string(bos_token)))
        goto oom;
    if (eos_token && json_object_set_new(ctx, "eos_token", json_string(eos_token)))
        goto oom;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)extra, k, v) {
        if (!strcmp(k, "messages") || !strcmp(k, "add_generation_prompt")) {
            /* Python: "got multiple values for keyword argument" */
            snprintf(err, errlen, "template variable '%s' may not be overridden", k);
            rc = -EINVAL;
            goto out;
        }
        if (json_object_set(ctx, k, v))
            goto oom;
    }
    rc = mm_template_render(tpl, ctx, out, err, errlen);
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
    rc = -ENOMEM;
out:
    json_decref(ctx);
    return rc;
}

/* A special token's text: a string, or an AddedToken object's "content". */
static int token_text(const json_t *v, const char **s)
{
    if (json_is_string(v)) {
        *s = json_string_value(v);
        return 0;
    }
    if (json_is_object(v)) {
        json_t *c = json_object_get(v, "content");
        if (json_is_string(c)) {
            *s = json_string_value(c);
            return 0;
        }
    }
    return -EINVAL;
}

int mm_chat_special_tokens(const json_t *cfg, json_t **out, char *err, size_t errlen)
{
    static const char *const names[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                        "pad_token", "cls_token", "mask_token"};
    int rc = -ENOMEM;
    *out = NULL;
    if (!json_is_object(cfg)) {
        snprintf(err, errlen, "tokenizer config must be a JSON object");
        return -EINVAL;
    }
    json_t *m = json_object();
    if (!m)
        goto oom;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        json_t *v = json_object_get(cfg, names[i]);
        const char *s;
        if (!v || json_is_null(v))
            continue;
        if (token_text(v, &s)) {
            snprintf(err, errlen, "tokenizer config: %s is neither a string nor a token object",
                     names[i]);
            rc = -EINVAL;
            goto fail;
        }
        /* special_tokens_map keeps only truthy values */
        if (!*s)
            continue;
        if (json_object_set_new(m, names[i], json_string(s)))
            goto oom;
    }
    *out = m;
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    json_decref(m);
    return rc;
}

int mm_chat_template_source(const json_t *cfg, const char *name, const char **src,
                            char *err, size_t errlen)
{
    const char *want = name ? name : "default";
    json_t *t = json_is_object(cfg) ? json_object_get(cfg, "chat_template") : NULL;
    *src = NULL;
    if (!t || json_is_null(t)) {
        snprintf(err, errlen, "tokenizer config has no chat_template");
        return -ENOENT;
    }
    if (json_is_string(t)) {
        if (name && strcmp(name, "default")) {
            snprintf(err, errlen, "tokenizer config has no chat template named '%s'", name);
            return -ENOENT;
        }
        *src = json_string_value(t);
        return 0;
    }
    if (!json_is_array(t)) {
        snprintf(err, errlen, "chat_template is neither a string nor a list");
        return -EINVAL;
    }
    size_t i;
    json_t *v;
    json_array_foreach(t, i, v) {
        json_t *n = json_object_get(v, "name"), *s = json_object_get(v, "template");
        if (!json_is_string(n) || !json_is_string(s)) {
            snprintf(err, errlen, "chat_template[%zu] lacks a string name or template", i);
            return -EINVAL;
        }
        if (!strcmp(json_string_value(n), want)) {
            *src = json_string_value(s);
            return 0;
        }
    }
    snprintf(err, errlen, "tokenizer config has no chat template named '%s'", want);
    return -ENOENT;
}
