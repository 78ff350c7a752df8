/* runtime.c: router generations (see runtime.h). */
#include "runtime.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "log.h"

#define RUNTIME_MAX_LISTENERS 8
#define RUNTIME_MAX_CONFIG (16 * 1024 * 1024)

struct mm_runtime {
    pthread_mutex_t     lock;      /* guards current and source */
    mm_router          *current;
    json_t             *source;
    char               *path;
    mm_cfg_holder      *boot;      /* the first configuration, for process settings */
    unsigned long       generation;
    mm_runtime_listener listeners[RUNTIME_MAX_LISTENERS];
    void               *listener_args[RUNTIME_MAX_LISTENERS];
    int                 nlisteners;
};

static int read_file(const char *path, char **out, char *err, size_t errlen)
{
    mm_buf b;
    mm_buf_init(&b, RUNTIME_MAX_CONFIG);
    int rc = mm_buf_read_file(&b, path, err, errlen);
    if (rc) {
        mm_buf_free(&b);
        return rc;
    }
    *out = b.data ? b.data : strdup("");
    return *out ? 0 : -ENOMEM;
}

/* Parse and validate text into a config and its source document. */
static int load_text(const char *text, const char *name, mm_gateway_cfg **cfg, json_t **src,
                     char *err, size_t errlen)
{
    char e[1024] = "";
    int rc = mm_config_load_string(text, cfg, e, sizeof e);
    if (rc) {
        snprintf(err, errlen, "%s%s%s", name ? name : "", name ? ": " : "", e);
        return rc;
    }
    *src = json_loads(text, 0, NULL);
    if (!*src) {
        mm_config_free(*cfg);
        *cfg = NULL;
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

int mm_runtime_new(const char *path, const char *text, mm_runtime **out, char *err, size_t errlen)
{
    char *owned = NULL;
    mm_gateway_cfg *cfg = NULL;
    json_t *src = NULL;
    int rc;
    mm_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&rt->lock, NULL);
    if (path) {
        rt->path = strdup(path);
        rc = read_file(path, &owned, err, errlen);
        if (rc)
            goto fail;
        text = owned;
    }
    rc = load_text(text, path, &cfg, &src, err, errlen);
    if (rc)
        goto fail;
    rt->boot = mm_cfg_holder_new(cfg);
    if (!rt->boot) {
        mm_config_free(cfg);
        rc = -ENOMEM;
        goto fail;
    }
    rc = mm_router_new(rt->boot, NULL, &rt->current, err, errlen);
    if (rc)
        goto fail;
    rt->source = src;
    src = NULL;
    free(owned);
    *out = rt;
    return 0;
fail:
    json_decref(src);
    free(owned);
    mm_runtime_free(rt);
    *out = NULL;
    return rc;
}

void mm_runtime_free(mm_runtime *rt)
{
    if (!rt)
        return;
    mm_router_unref(rt->current);
    mm_cfg_holder_unref(rt->boot);
    json_decref(rt->source);
    free(rt->path);
    pthread_mutex_destroy(&rt->lock);
    free(rt);
}

const mm_gateway_cfg *mm_runtime_boot_cfg(const mm_runtime *rt)
{
    return rt->boot->cfg;
}

mm_router *mm_runtime_acquire(mm_runtime *rt)
{
    pthread_mutex_lock(&rt->lock);
    mm_router *r = rt->current;
    mm_router_ref(r);
    pthread_mutex_unlock(&rt->lock);
    return r;
}

json_t *mm_runtime_source(mm_runtime *rt)
{
    pthread_mutex_lock(&rt->lock);
    json_t *s = json_deep_copy(rt->source);
    pthread_mutex_unlock(&rt->lock);
    return s;
}

unsigned long mm_runtime_generation(mm_runtime *rt)
{
    pthread_mutex_lock(&rt->lock);
    unsigned long g = rt->generation;
    pthread_mutex_unlock(&rt->lock);
    return g;
}

int mm_runtime_add_listener(mm_runtime *rt, mm_runtime_listener fn, void *arg)
{
    if (rt->nlisteners >= RUNTIME_MAX_LISTENERS)
        return -ENOSPC;
    rt->listeners[rt->nlisteners] = fn;
    rt->listener_args[rt->nlisteners] = arg;
    rt->nlisteners++;
    return 0;
}

static int str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Settings only a restart can change: say so instead of half-applying. */
static void warn_process_settings(const mm_gateway_cfg *a, const mm_gateway_cfg *b)
{
    if (!str_eq(a->listen_host, b->listen_host) || a->listen_port != b->listen_port)
        mm_warn("config: \"listen\" changed; it takes effect at the next restart");
    if (!str_eq(a->admin_host, b->admin_host) || a->admin_port != b->admin_port ||
        !str_eq(a->admin_token, b->admin_token))
        mm_warn("config: \"admin_listen\"/\"admin_token\" changed; they take effect at the next restart");
    if (a->threads != b->threads)
        mm_warn("config: \"threads\" changed; it takes effect at the next restart");
    if (a->max_body_bytes != b->max_body_bytes || a->max_header_bytes != b->max_header_bytes ||
        a->max_response_bytes != b->max_response_bytes || a->client_timeout_ms != b->client_timeout_ms)
        mm_warn("config: size limits or client_timeout_ms changed; they take effect at the next restart");
    if (!str_eq(a->redis.url, b->redis.url) || !str_eq(a->access_log, b->access_log))
        mm_warn("config: \"redis\"/\"access_log\" changed; they take effect at the next restart");
}

/* Swap in cfg (ownership taken) with its source document (reference taken). */
static int apply(mm_runtime *rt, mm_gateway_cfg *cfg, json_t *src, char *err, size_t errlen)
{
    mm_cfg_holder *h = mm_cfg_holder_new(cfg);
    if (!h) {
        mm_config_free(cfg);
        json_decref(src);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    warn_process_settings(rt->boot->cfg, cfg);
    mm_router *prev = mm_runtime_acquire(rt);
    mm_router *next = NULL;
    int rc = mm_router_new(h, prev, &next, err, errlen);
    mm_router_unref(prev);
    mm_cfg_holder_unref(h); /* the router keeps its own reference */
    if (rc) {
        json_decref(src);
        return rc;
    }
    pthread_mutex_lock(&rt->lock);
    mm_router *old = rt->current;
    rt->current = next;
    json_decref(rt->source);
    rt->source = src;
    rt->generation++;
    pthread_mutex_unlock(&rt->lock);
    for (int i = 0; i < rt->nlisteners; i++)
        rt->listeners[i](rt->listener_args[i], next);
    mm_router_unref(old);
    mm_info("config: generation %lu applied (%zu models)", rt->generation, next->nroutes);
    return 0;
}

int mm_runtime_reload(mm_runtime *rt, char *err, size_t errlen)
{
    if (!rt->path) {
        snprintf(err, errlen, "no configuration file to reload");
        return -ENOENT;
    }
    char *text = NULL;
    int rc = read_file(rt->path, &text, err, errlen);
    if (rc)
        return rc;
    mm_gateway_cfg *cfg = NULL;
    json_t *src = NULL;
    rc = load_text(text, rt->path, &cfg, &src, err, errlen);
    free(text);
    if (rc)
        return rc;
    return apply(rt, cfg, src, err, errlen);
}

int mm_runtime_apply_json(mm_runtime *rt, const json_t *doc, char *err, size_t errlen)
{
    char *text = json_dumps(doc, JSON_COMPACT);
    if (!text) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    mm_gateway_cfg *cfg = NULL;
    json_t *src = NULL;
    int rc = load_text(text, NULL, &cfg, &src, err, errlen);
    free(text);
    if (rc)
        return rc;
    return apply(rt, cfg, src, err, errlen);
}
