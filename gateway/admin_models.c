/* admin_models.c: GET/POST/DELETE/PATCH /admin/models (see admin_models.h). */
#include "admin_models.h"
#include "pctdec.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "router.h"


static json_t *backend_state(mm_pool *p, size_t i)
{
    mm_backend *b = &p->backends[i];
    pthread_mutex_lock(&p->lock);
    json_t *j = json_pack("{s:s, s:i, s:s?, s:s, s:s, s:i, s:b}", "url", b->cfg->url, "weight",
                          p->weights[i], "served_model", b->cfg->served_model, "health",
                          mm_health_state_name(&b->health), "breaker",
                          mm_breaker_state_name(b->breaker.state), "inflight", b->outstanding,
                          "launched", b->cfg->launch != NULL);
    pthread_mutex_unlock(&p->lock);
    return j;
}

static json_t *model_json(mm_router *r, size_t i, mm_admin_workers_fn workers, void *warg)
{
    const mm_route *rt = &r->routes[i];
    const mm_model_cfg *m = rt->cfg;
    json_t *j = json_pack("{s:s, s:s}", "name", m->name, "kind", m->nsplit ? "split" : "pool");
    if (m->nsplit) {
        json_t *sp = json_array();
        for (size_t k = 0; k < m->nsplit; k++)
            json_array_append_new(sp, json_pack("{s:s, s:i}", "model", m->split[k].model, "weight",
                                                m->split[k].weight));
        json_object_set_new(j, "split", sp);
        if (m->sticky_kind != MM_STICKY_NONE)
            json_object_set_new(j, "sticky", json_pack("{s:s, s:s}", "kind",
                                                       m->sticky_kind == MM_STICKY_HEADER ? "header" : "body",
                                                       "key", m->sticky_key));
        json_object_set_new(j, "published", json_true());
    } else {
        static const char *const strat[] = {"round_robin", "random", "least_outstanding"};
        json_object_set_new(j, "strategy", json_string(strat[m->strategy]));
        json_t *bk = json_array();
        for (size_t k = 0; k < rt->pool->nbackends; k++)
            json_array_append_new(bk, backend_state(rt->pool, k));
        json_object_set_new(j, "backends", bk);
        json_object_set_new(j, "published",
                            json_boolean(__atomic_load_n(&rt->pool->published, __ATOMIC_ACQUIRE)));
    }
    json_t *fb = json_array();
    for (size_t k = 0; k < m->nfallback; k++)
        json_array_append_new(fb, json_string(m->fallback[k]));
    json_object_set_new(j, "fallback", fb);
    json_object_set_new(j, "workers", workers ? workers(warg, m->name) : json_array());
    return j;
}

static void list_models(mm_runtime *rt, mm_admin_workers_fn workers, void *warg,
                        mm_http_exchange *ex)
{
    mm_router *r = mm_runtime_acquire(rt);
    json_t *arr = json_array();
    for (size_t i = 0; i < r->nroutes; i++)
        json_array_append_new(arr, model_json(r, i, workers, warg));
    json_t *out = json_pack("{s:I, s:o}", "generation", (json_int_t)mm_runtime_generation(rt),
                            "models", arr);
    mm_router_unref(r);
    mm_admin_reply_json(ex, 200, out);
}

/* The index of the model named name in doc's "models", or -1. */
static long find_model(json_t *doc, const char *name)
{
    json_t *models = json_object_get(doc, "models");
    size_t i;
    json_t *m;
    json_array_foreach(models, i, m) {
        json_t *n = json_object_get(m, "name");
        if (json_is_string(n) && strcmp(json_string_value(n), name) == 0)
            return (long)i;
    }
    return -1;
}

static void apply_doc(mm_runtime *rt, json_t *doc, mm_http_exchange *ex, int status, json_t *ok)
{
    char err[1024] = "";
    int rc = mm_runtime_apply_json(rt, doc, err, sizeof err);
    json_decref(doc);
    if (rc) {
        json_decref(ok);
        /* A change that breaks the configuration (a split or fallback still
         * names a removed model, a bad value) conflicts with what runs. */
        mm_http_respond_error(ex, rc == -EINVAL ? 409 : 500, NULL, NULL,
                              "configuration not changed: %s", err);
        return;
    }
    mm_admin_reply_json(ex, status, ok);
}

static json_t *parse_body(mm_http_exchange *ex)
{
    json_error_t je;
    json_t *j = json_loadb(ex->body.data ? ex->body.data : "", ex->body.len, JSON_REJECT_DUPLICATES, &je);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        mm_http_respond_error(ex, 400, NULL, NULL, "the body must be a JSON object%s%s",
                              j ? "" : ": ", j ? "" : je.text);
        return NULL;
    }
    return j;
}

static void add_model(mm_runtime *rt, mm_http_exchange *ex)
{
    json_t *entry = parse_body(ex);
    if (!entry)
        return;
    json_t *name = json_object_get(entry, "name");
    if (!json_is_string(name)) {
        json_decref(entry);
        mm_http_respond_error(ex, 400, "name", NULL, "the model entry needs a \"name\"");
        return;
    }
    json_t *doc = mm_runtime_source(rt);
    if (!doc) {
        json_decref(entry);
        mm_http_respond_error(ex, 500, NULL, NULL, "out of memory");
        return;
    }
    if (find_model(doc, json_string_value(name)) >= 0) {
        mm_http_respond_error(ex, 409, "name", NULL, "model %s already exists (PATCH or DELETE it)",
                              json_string_value(name));
        json_decref(entry);
        json_decref(doc);
        return;
    }
    json_t *ok = json_pack("{s:O, s:s}", "name", name, "status", "added");
    json_array_append_new(json_object_get(doc, "models"), entry);
    /* 202: launched workers still have to start; the model is listed and
     * routed once one is ready (GET /admin/models shows "published"). */
    apply_doc(rt, doc, ex, 202, ok);
}

static void delete_model(mm_runtime *rt, mm_http_exchange *ex, const char *name)
{
    json_t *doc = mm_runtime_source(rt);
    long i = doc ? find_model(doc, name) : -1;
    if (i < 0) {
        json_decref(doc);
        mm_http_respond_error(ex, 404, "name", NULL, "no model named %s", name);
        return;
    }
    json_array_remove(json_object_get(doc, "models"), (size_t)i);
    apply_doc(rt, doc, ex, 200, json_pack("{s:s, s:s}", "name", name, "status", "removed"));
}

/* PATCH {"split":[{"model","weight"}], "backends":[{"url","weight"}]}:
 * weights only, applied for the next request. */
static void patch_model(mm_runtime *rt, mm_http_exchange *ex, const char *name)
{
    json_t *body = parse_body(ex);
    if (!body)
        return;
    json_t *doc = mm_runtime_source(rt);
    long i = doc ? find_model(doc, name) : -1;
    if (i < 0) {
        json_decref(doc);
        json_decref(body);
        mm_http_respond_error(ex, 404, "name", NULL, "no model named %s", name);
        return;
    }
    json_t *m = json_array_get(json_object_get(doc, "models"), (size_t)i);
    const char *key;
    json_t *val;
    json_object_foreach(body, key, val) {
        int is_split = strcmp(key, "split") == 0, is_backends = strcmp(key, "backends") == 0;
        if ((!is_split && !is_backends) || !json_is_array(val)) {
            mm_http_respond_error(ex, 400, key, NULL,
                                  "PATCH takes \"split\" and/or \"backends\" arrays of weights");
            goto out;
        }
        json_t *target = json_object_get(m, key);
        size_t k;
        json_t *e;
        json_array_foreach(val, k, e) {
            const char *id_key = is_split ? "model" : "url";
            json_t *id = json_object_get(e, id_key), *w = json_object_get(e, "weight");
            if (!json_is_string(id) || !json_is_integer(w)) {
                mm_http_respond_error(ex, 400, key, NULL, "%s[%zu] needs \"%s\" and an integer \"weight\"",
                                      key, k, id_key);
                goto out;
            }
            size_t t;
            json_t *te;
            int found = 0;
            json_array_foreach(target, t, te) {
                json_t *tid = json_object_get(te, id_key);
                char derived[64];
                if (!tid && is_backends) {
                    /* A launched worker without "url" is reached at its port. */
                    json_t *port = json_object_get(json_object_get(te, "launch"), "port");
                    if (json_is_integer(port)) {
                        snprintf(derived, sizeof derived, "http://127.0.0.1:%lld",
                                 (long long)json_integer_value(port));
                        if (strcmp(derived, json_string_value(id)) == 0) {
                            json_object_set(te, "weight", w);
                            found = 1;
                        }
                        continue;
                    }
                }
                if (json_is_string(tid) && strcmp(json_string_value(tid), json_string_value(id)) == 0) {
                    json_object_set(te, "weight", w);
                    found = 1;
                }
            }
            if (!found) {
                mm_http_respond_error(ex, 404, key, NULL, "model %s has no %s entry %s", name, key,
                                      json_string_value(id));
                goto out;
            }
        }
    }
    json_decref(body);
    apply_doc(rt, doc, ex, 200, json_pack("{s:s, s:s}", "name", name, "status", "updated"));
    return;
out:
    json_decref(body);
    json_decref(doc);
}

int mm_admin_models_route(mm_runtime *rt, mm_admin_workers_fn workers, void *warg,
                          mm_http_exchange *ex)
{
    const mm_http_request *q = &ex->req;
    static const char base[] = "/admin/models";
    size_t bl = sizeof base - 1;
    if (q->target_len < bl || memcmp(q->target, base, bl) != 0)
        return 0;
    const char *rest = q->target + bl;
    size_t rl = q->target_len - bl;
    const char *qm = memchr(rest, '?', rl);
    if (qm)
        rl = (size_t)(qm - rest);
    char name[256] = "";
    if (rl > 0) {
        if (rest[0] != '/' || rl - 1 == 0)
            return 0;
        /* Percent-decode: clients encode names with reserved characters. */
        int n = mm_pct_decode(rest + 1, rl - 1, name, sizeof name);
        if (n < 0) {
            mm_http_respond_error(ex, 400, "name", NULL,
                                  n == -EINVAL ? "bad %%-escape in the model name"
                                               : "model name too long or invalid");
            return 1;
        }
    }
    int is = 0;
#define METHOD(m) (q->method_len == sizeof m - 1 && memcmp(q->method, m, sizeof m - 1) == 0)
    if (!name[0] && METHOD("GET")) {
        list_models(rt, workers, warg, ex);
        is = 1;
    } else if (!name[0] && METHOD("POST")) {
        add_model(rt, ex);
        is = 1;
    } else if (name[0] && METHOD("DELETE")) {
        delete_model(rt, ex, name);
        is = 1;
    } else if (name[0] && METHOD("PATCH")) {
        patch_model(rt, ex, name);
        is = 1;
    } else if (name[0] && METHOD("GET")) {
        mm_router *r = mm_runtime_acquire(rt);
        json_t *found = NULL;
        for (size_t i = 0; i < r->nroutes && !found; i++)
            if (strcmp(r->routes[i].name, name) == 0)
                found = model_json(r, i, workers, warg);
        mm_router_unref(r);
        if (found)
            mm_admin_reply_json(ex, 200, found);
        else
            mm_http_respond_error(ex, 404, "name", NULL, "no model named %s", name);
        is = 1;
    } else {
        mm_http_respond_error(ex, 405, NULL, NULL, "method not allowed on %s",
                              name[0] ? "/admin/models/NAME" : "/admin/models");
        is = 1;
    }
#undef METHOD
    return is;
}
