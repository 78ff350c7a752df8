/* config.c: load the gateway's JSON config and validate it as a whole.
 *
 * Shape of the work:
 *   1. parse with jansson (duplicate keys rejected, line/column on error);
 *   2. expand "${NAME}" in every string value, in place in the JSON tree, so
 *      validation sees the final values;
 *   3. walk the tree with tables (one row per key: kind, bounds, default,
 *      offset into the target struct), rejecting unknown keys at every level;
 *   4. cross-checks that need the whole config (split and fallback targets,
 *      fallback cycles, GPU and port clashes of launched workers, admin).
 *
 * Per-model settings get their precedence for free from the tables: the
 * built-in defaults are applied to a "base" model, "defaults" is walked onto
 * that base, and each model starts as a copy of the base before its own
 * object is walked onto it. Nested objects merge per key the same way.
 *
 * Every error is "path: reason" where path is the JSON path of the offending
 * key; on any error the partly built config is freed with mm_config_free, so
 * every array is allocated zeroed with its count set up front. */
#include "config.h"
#include "pctdec.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "buf.h"

#define CFG_MAX_FILE     (4u << 20) /* a config is small; refuse to slurp a disk */
#define CFG_MAX_STRING   65536      /* one string value after ${} expansion */
#define CFG_MAX_VARNAME  128
#define CFG_MAX_NAME     256        /* model names, header names, body fields */
#define CFG_MAX_MODELS   4096
#define CFG_MAX_BACKENDS 1024
#define CFG_MAX_SPLIT    256
#define CFG_MAX_FALLBACK 16
#define CFG_MAX_ARGS     256
#define CFG_MAX_GPU      1024       /* GPU indices are 0..CFG_MAX_GPU-1 */
#define MS_MAX           86400000   /* one day: the upper bound of every *_ms */
#define MIB              (1LL << 20)
#define GIB              (1LL << 30)

/* ------------------------------------------------------------------ */
/* The walk: current JSON path, error sink, scope and the base model.  */

enum { SC_DEFAULTS = 1, SC_MODEL = 2, SC_POOL = 4 };

typedef struct walk {
    char   path[512];
    size_t plen;
    char  *err;
    size_t errlen;
    unsigned scope;        /* which of SC_* the model table is walked for */
    mm_gateway_cfg *cfg;
    mm_model_cfg base;     /* built-in defaults overlaid with "defaults" */
} walk;

static void path_set_len(walk *w, size_t old, int n)
{
    size_t room = sizeof w->path - 1 - old;
    w->plen = old + (n < 0 ? 0 : ((size_t)n < room ? (size_t)n : room));
    w->path[w->plen] = '\0';
}

static size_t path_key(walk *w, const char *key)
{
    size_t old = w->plen;
    int n = snprintf(w->path + old, sizeof w->path - old, "%s%s", old ? "." : "", key);
    path_set_len(w, old, n);
    return old;
}

static size_t path_index(walk *w, size_t i)
{
    size_t old = w->plen;
    int n = snprintf(w->path + old, sizeof w->path - old, "[%zu]", i);
    path_set_len(w, old, n);
    return old;
}

static void path_pop(walk *w, size_t old)
{
    w->plen = old;
    w->path[old] = '\0';
}

__attribute__((format(printf, 2, 3)))
static int fail(walk *w, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (w->errlen)
        snprintf(w->err, w->errlen, "%s: %s", w->plen ? w->path : "(top level)", msg);
    return -EINVAL;
}

static int nomem(walk *w)
{
    if (w->errlen)
        snprintf(w->err, w->errlen, "out of memory");
    return -ENOMEM;
}

/* A short rendering of a JSON value for "got ..." in messages. */
static const char *describe(const json_t *v, char *buf, size_t n)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:  return "an object";
    case JSON_ARRAY:   return "an array";
    case JSON_TRUE:    return "true";
    case JSON_FALSE:   return "false";
    case JSON_NULL:    return "null";
    case JSON_INTEGER: snprintf(buf, n, "%lld", (long long)json_integer_value(v)); return buf;
    case JSON_REAL:    snprintf(buf, n, "%g", json_real_value(v)); return buf;
    case JSON_STRING: {
        size_t len = json_string_length(v);
        snprintf(buf, n, "\"%.*s%s\"", (int)(len > 40 ? 40 : len), json_string_value(v),
                 len > 40 ? "..." : "");
        return buf;
    }
    }
    return "?";
}

static int fail_type(walk *w, const char *expected, const json_t *v)
{
    char d[64];
    return fail(w, "expected %s, got %s", expected, describe(v, d, sizeof d));
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* Replace *dst with a copy of s[0..n). */
static int set_str(walk *w, char **dst, const char *s, size_t n)
{
    char *p = xstrndup(s, n);
    if (!p)
        return nomem(w);
    free(*dst);
    *dst = p;
    return 0;
}

static int has_ctl(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return 1;
    return 0;
}

static int has_space_or_ctl(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || s[i] == 0x7f)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Tables.                                                             */

typedef enum kind {
    K_INT,     /* int, bounds [min, max] */
    K_SIZE,    /* size_t, bounds [min, max] */
    K_DOUBLE,  /* double, bounds (dmin, dmax] */
    K_BOOL,    /* int 0/1 */
    K_STR,     /* char *, length bounds [min, max], optional names[] */
    K_ENUM,    /* int index into names[] */
    K_OBJ,     /* nested struct walked with sub */
    K_FN,      /* custom: fn(walk, value or NULL when absent, parent) */
} kind;

enum {
    F_NOSPACE  = 1, /* K_STR: no whitespace either (control chars never) */
    F_SLASH    = 2, /* K_STR: must start with "/" */
    F_NODEF    = 4, /* apply_defaults skips it: the value is inherited */
    F_REQUIRED = 8, /* absent is an error */
};

typedef struct walk_table walk_table;
typedef int (*row_fn)(walk *w, json_t *v, void *obj);

typedef struct row {
    const char *key;
    kind        kind;
    size_t      off;
    long long   min, max;
    double      dmin, dmax;
    long long   idef;
    double      ddef;
    const char *sdef;
    const char *const *names;
    const walk_table  *sub;
    row_fn      fn;
    unsigned    scope;  /* 0: allowed everywhere, else a mask of SC_* */
    unsigned    flags;
} row;

struct walk_table {
    const row *rows;
    size_t     nrows;
    int (*post)(walk *w, void *obj);  /* checks across keys, after the walk */
};

#define R_INT(T, k, f, lo, hi, def, fl) \
    { .key = k, .kind = K_INT, .off = offsetof(T, f), .min = lo, .max = hi, .idef = def, .flags = fl }
#define R_SIZE(T, k, f, lo, hi, def) \
    { .key = k, .kind = K_SIZE, .off = offsetof(T, f), .min = lo, .max = hi, .idef = def }
#define R_DBL(T, k, f, lo, hi, def) \
    { .key = k, .kind = K_DOUBLE, .off = offsetof(T, f), .dmin = lo, .dmax = hi, .ddef = def }
#define R_BOOL(T, k, f, def) \
    { .key = k, .kind = K_BOOL, .off = offsetof(T, f), .idef = def }
#define R_STR(T, k, f, lo, hi, def, fl) \
    { .key = k, .kind = K_STR, .off = offsetof(T, f), .min = lo, .max = hi, .sdef = def, .flags = fl }
#define R_STRNAMES(T, k, f, nm) \
    { .key = k, .kind = K_STR, .off = offsetof(T, f), .min = 1, .max = CFG_MAX_NAME, .names = nm }
#define R_ENUM(T, k, f, nm, def) \
    { .key = k, .kind = K_ENUM, .off = offsetof(T, f), .names = nm, .idef = def }
#define R_OBJ(T, k, f, tb, fl) \
    { .key = k, .kind = K_OBJ, .off = offsetof(T, f), .sub = &tb, .flags = fl }
#define R_FN(k, fn_, sc) \
    { .key = k, .kind = K_FN, .fn = fn_, .scope = sc }
#define R_FNSUB(T, k, f, fn_, tb) \
    { .key = k, .kind = K_FN, .off = offsetof(T, f), .fn = fn_, .sub = &tb }
#define TABLE(name, rows_, post_) \
    static const walk_table name = { rows_, sizeof rows_ / sizeof rows_[0], post_ }

static int walk_obj(walk *w, const walk_table *t, json_t *v, void *obj);

/* Set every row's built-in default (nested tables too). */
static int apply_defaults(walk *w, const walk_table *t, void *obj)
{
    for (size_t i = 0; i < t->nrows; i++) {
        const row *r = &t->rows[i];
        char *p = (char *)obj + r->off;
        if (r->flags & F_NODEF)
            continue;
        switch (r->kind) {
        case K_INT:
        case K_ENUM:
        case K_BOOL:
            *(int *)p = (int)r->idef;
            break;
        case K_SIZE:
            *(size_t *)p = (size_t)r->idef;
            break;
        case K_DOUBLE:
            *(double *)p = r->ddef;
            break;
        case K_STR:
            if (r->sdef) {
                int rc = set_str(w, (char **)p, r->sdef, strlen(r->sdef));
                if (rc)
                    return rc;
            }
            break;
        case K_OBJ:
        case K_FN:
            if (r->sub) {
                int rc = apply_defaults(w, r->sub, p);
                if (rc)
                    return rc;
            }
            break;
        }
    }
    return 0;
}

static int get_int(walk *w, const json_t *v, long long lo, long long hi, long long *out)
{
    if (!json_is_integer(v)) {
        char d[64];
        return fail(w, "expected an integer in %lld..%lld, got %s", lo, hi,
                    describe(v, d, sizeof d));
    }
    long long x = json_integer_value(v);
    if (x < lo)
        return fail(w, "expected an integer >= %lld, got %lld", lo, x);
    if (x > hi)
        return fail(w, "expected an integer <= %lld, got %lld", hi, x);
    *out = x;
    return 0;
}

static int names_index(const char *const *names, const char *s)
{
    for (int i = 0; names[i]; i++)
        if (strcmp(names[i], s) == 0)
            return i;
    return -1;
}

static int fail_names(walk *w, const char *const *names, const char *s)
{
    char list[256];
    size_t len = 0;
    list[0] = '\0';
    for (int i = 0; names[i] && len < sizeof list; i++) {
        int n = snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", names[i]);
        if (n < 0)
            break;
        len += (size_t)n;
    }
    return fail(w, "unknown value \"%.64s\" (expected %s)", s, list);
}

/* A string value: type, length, characters. On success *s and *n. */
static int get_str(walk *w, const json_t *v, long long lo, long long hi, unsigned flags,
                   const char **s, size_t *n)
{
    if (!json_is_string(v))
        return fail_type(w, "a string", v);
    *s = json_string_value(v);
    *n = json_string_length(v);
    if ((long long)*n < lo)
        return lo == 1 ? fail(w, "must not be empty")
                       : fail(w, "must be at least %lld characters long", lo);
    if ((long long)*n > hi)
        return fail(w, "longer than %lld characters", hi);
    if ((flags & F_NOSPACE) && has_space_or_ctl(*s, *n))
        return fail(w, "must not contain whitespace or control characters");
    if (has_ctl(*s, *n))
        return fail(w, "must not contain control characters");
    if ((flags & F_SLASH) && (*s)[0] != '/')
        return fail(w, "must start with \"/\", got \"%.64s\"", *s);
    return 0;
}

static int set_row(walk *w, const row *r, json_t *v, void *obj)
{
    char *p = (char *)obj + r->off;
    long long x;
    int rc;

    switch (r->kind) {
    case K_INT:
        if ((rc = get_int(w, v, r->min, r->max, &x)))
            return rc;
        *(int *)p = (int)x;
        return 0;
    case K_SIZE:
        if ((rc = get_int(w, v, r->min, r->max, &x)))
            return rc;
        *(size_t *)p = (size_t)x;
        return 0;
    case K_DOUBLE: {
        char d[64];
        double dv;
        if (!json_is_number(v))
            return fail(w, "expected a number in (%g, %g], got %s", r->dmin, r->dmax,
                        describe(v, d, sizeof d));
        dv = json_number_value(v);
        if (!(dv > r->dmin && dv <= r->dmax))
            return fail(w, "expected a number in (%g, %g], got %g", r->dmin, r->dmax, dv);
        *(double *)p = dv;
        return 0;
    }
    case K_BOOL:
        if (!json_is_boolean(v))
            return fail_type(w, "true or false", v);
        *(int *)p = json_is_true(v);
        return 0;
    case K_STR: {
        const char *s;
        size_t n;
        if ((rc = get_str(w, v, r->min, r->max, r->flags, &s, &n)))
            return rc;
        if (r->names && names_index(r->names, s) < 0)
            return fail_names(w, r->names, s);
        return set_str(w, (char **)p, s, n);
    }
    case K_ENUM: {
        int i;
        if (!json_is_string(v))
            return fail_type(w, "a string", v);
        if ((i = names_index(r->names, json_string_value(v))) < 0)
            return fail_names(w, r->names, json_string_value(v));
        *(int *)p = i;
        return 0;
    }
    case K_OBJ:
        return walk_obj(w, r->sub, v, p);
    case K_FN:
        return r->fn(w, v, obj);
    }
    return fail(w, "internal error: bad row kind");
}

static int in_scope(const walk *w, const row *r)
{
    return r->scope == 0 || (r->scope & w->scope);
}

static const char *scope_name(unsigned scope)
{
    switch (scope) {
    case SC_DEFAULTS: return "\"defaults\"";
    case SC_POOL:     return "\"default_pool\"";
    default:          return "a model";
    }
}

/* Edit distance of short strings, for "did you mean". */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), prev[65], cur[65];
    if (la > 64 || lb > 64)
        return (size_t)-1;
    for (size_t j = 0; j <= lb; j++)
        prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t del = prev[j] + 1, ins = cur[j - 1] + 1;
            size_t sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
            size_t m = del < ins ? del : ins;
            cur[j] = m < sub ? m : sub;
        }
        memcpy(prev, cur, (lb + 1) * sizeof prev[0]);
    }
    return prev[lb];
}

static int fail_unknown_key(walk *w, const walk_table *t, const char *key)
{
    const char *best = NULL;
    size_t bestd = (size_t)-1, klen = strlen(key);
    char list[512];
    size_t len = 0;

    list[0] = '\0';
    for (size_t i = 0; i < t->nrows; i++) {
        const row *r = &t->rows[i];
        if (!in_scope(w, r))
            continue;
        size_t d = edit_distance(key, r->key);
        if (d < bestd) {
            bestd = d;
            best = r->key;
        }
        if (len < sizeof list) {
            int n = snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "", r->key);
            if (n > 0)
                len += (size_t)n;
        }
    }
    if (best && bestd <= 2 && bestd < klen)
        return fail(w, "unknown key \"%.64s\" (did you mean \"%s\"?)", key, best);
    return fail(w, "unknown key \"%.64s\" (expected one of: %s)", key, list);
}

static const row *find_row(const walk_table *t, const char *key)
{
    for (size_t i = 0; i < t->nrows; i++)
        if (strcmp(t->rows[i].key, key) == 0)
            return &t->rows[i];
    return NULL;
}

/* Walk one JSON object onto obj: reject unknown and out-of-scope keys, then
 * apply rows in table order (so a row may rely on the rows above it), then
 * the table's cross-key checks. */
static int walk_obj(walk *w, const walk_table *t, json_t *v, void *obj)
{
    const char *key;
    json_t *val;
    int rc;

    if (!json_is_object(v))
        return fail_type(w, "an object", v);
    json_object_foreach(v, key, val) {
        const row *r = find_row(t, key);
        if (!r)
            return fail_unknown_key(w, t, key);
        if (!in_scope(w, r))
            return fail(w, "key \"%s\" is not allowed in %s", key, scope_name(w->scope));
    }
    for (size_t i = 0; i < t->nrows; i++) {
        const row *r = &t->rows[i];
        if (!in_scope(w, r))
            continue;
        val = json_object_get(v, r->key);
        if (!val && r->kind != K_FN && !(r->flags & F_REQUIRED))
            continue;
        size_t old = path_key(w, r->key);
        if (!val && r->kind != K_FN)
            rc = fail(w, "required key is missing");
        else
            rc = set_row(w, r, val, obj);
        path_pop(w, old);
        if (rc)
            return rc;
    }
    return t->post ? t->post(w, obj) : 0;
}

/* ------------------------------------------------------------------ */
/* Addresses: "host:port", "[v6]:port", URLs.                          */

/* Decimal port of exactly s[0..n), in lo..65535. */
static int parse_port(const char *s, size_t n, int lo, int *out)
{
    int v = 0;
    if (n == 0 || n > 5)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > 65535)
        return -1;
    *out = v;
    return 0;
}

static int is_ipv6(const char *h, size_t n)
{
    char buf[64];
    unsigned char addr[16];
    if (n == 0 || n >= sizeof buf)
        return 0;
    memcpy(buf, h, n);
    buf[n] = '\0';
    return inet_pton(AF_INET6, buf, addr) == 1;
}

/* A DNS name or a dotted IPv4 address (checked strictly when all digits). */
static int is_hostname(const char *h, size_t n)
{
    int digits_only = 1;
    size_t label = 0;
    if (n == 0 || n > 253)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = h[i];
        if (c == '.') {
            if (label == 0)
                return 0;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_'))
            return 0;
        if (c < '0' || c > '9')
            digits_only = 0;
        if (++label > 63)
            return 0;
    }
    if (label == 0)
        return 0;
    if (digits_only) {
        char buf[16];
        unsigned char addr[4];
        if (n >= sizeof buf)
            return 0;
        memcpy(buf, h, n);
        buf[n] = '\0';
        return inet_pton(AF_INET, buf, addr) == 1;
    }
    return 1;
}

/* Split an authority "host", "host:port", "[v6]" or "[v6]:port" and check
 * both halves. *port keeps def_port when no port is written (def_port < 0:
 * a port is required). Returns NULL or the reason. */
static const char *parse_authority(const char *a, size_t n, int def_port, int port_lo,
                                   const char **host, size_t *hostn, int *port)
{
    const char *ps = NULL;
    size_t pn = 0;

    if (n == 0)
        return "empty host";
    if (a[0] == '[') {
        const char *rb = memchr(a, ']', n);
        if (!rb)
            return "missing \"]\" after an IPv6 address";
        *host = a + 1;
        *hostn = (size_t)(rb - a - 1);
        if (!is_ipv6(*host, *hostn))
            return "bad IPv6 address";
        if ((size_t)(rb - a) + 1 < n) {
            if (rb[1] != ':')
                return "expected \":port\" after \"]\"";
            ps = rb + 2;
            pn = n - (size_t)(ps - a);
        }
    } else {
        const char *colon = NULL;
        for (size_t i = 0; i < n; i++)
            if (a[i] == ':') {
                if (colon)
                    return "an IPv6 address needs brackets, as in [::1]:8000";
                colon = a + i;
            }
        *host = a;
        *hostn = colon ? (size_t)(colon - a) : n;
        if (*hostn == 0)
            return "empty host";
        if (!is_hostname(*host, *hostn))
            return "bad host name";
        if (colon) {
            ps = colon + 1;
            pn = n - (size_t)(ps - a);
        }
    }
    if (ps) {
        if (parse_port(ps, pn, port_lo, port) < 0)
            return port_lo ? "bad port (expected 1..65535)" : "bad port (expected 0..65535)";
    } else if (def_port < 0) {
        return "missing \":port\"";
    } else {
        *port = def_port;
    }
    return NULL;
}

static int all_digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* "host:port", "[v6]:port", ":port" or "port" (both: every IPv4 address). */
static int parse_listen(walk *w, const json_t *v, int port_lo, char **host, int *port)
{
    const char *s, *h, *why;
    size_t n, hn;
    int rc;

    if ((rc = get_str(w, v, 1, 300, F_NOSPACE, &s, &n)))
        return rc;
    if ((s[0] == ':' && all_digits(s + 1)) || all_digits(s)) {
        const char *p = s[0] == ':' ? s + 1 : s;
        if (parse_port(p, strlen(p), port_lo, port) < 0)
            return fail(w, "bad port in \"%s\" (expected %d..65535)", s, port_lo);
        h = "0.0.0.0";
        hn = 7;
    } else if ((why = parse_authority(s, n, -1, port_lo, &h, &hn, port))) {
        return fail(w, "%s in \"%s\" (expected \"host:port\", \"[v6]:port\" or \":port\")",
                    why, s);
    }
    return set_str(w, host, h, hn);
}

/* %XX-decode s[0..n) into a new string *out (a password may hold "@" or
 * "/"). -EINVAL for a bad escape or a NUL. */
static int pct_decode(const char *s, size_t n, char **out)
{
    if (!(*out = malloc(n + 1)))
        return -ENOMEM;
    if (mm_pct_decode(s, n, *out, n + 1) < 0) {
        free(*out);
        *out = NULL;
        return -EINVAL;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Custom rows.                                                        */

static const char *const strategy_names[] = { "round_robin", "random", "least_outstanding", NULL };
static const char *const device_names[] = { "cpu", "cuda", NULL };

static int row_listen(walk *w, json_t *v, void *obj)
{
    mm_gateway_cfg *c = obj;
    if (!v) {
        json_t *d = json_string("127.0.0.1:8000");
        int rc = d ? parse_listen(w, d, 0, &c->listen_host, &c->listen_port) : nomem(w);
        json_decref(d);
        return rc;
    }
    /* Port 0 lets the kernel pick: handy for tests, which read the bound
     * port back from the server. */
    return parse_listen(w, v, 0, &c->listen_host, &c->listen_port);
}

static int row_admin_listen(walk *w, json_t *v, void *obj)
{
    mm_gateway_cfg *c = obj;
    if (!v)
        return 0;
    /* admin_port 0 means "no admin listener", so 0 cannot mean "any". */
    return parse_listen(w, v, 1, &c->admin_host, &c->admin_port);
}

static int row_threads(walk *w, json_t *v, void *obj)
{
    mm_gateway_cfg *c = obj;
    if (!v) {
        c->threads = 0;
        return 0;
    }
    if (json_is_string(v) && strcmp(json_string_value(v), "auto") == 0) {
        c->threads = 0;
        return 0;
    }
    if (json_is_integer(v) && json_integer_value(v) >= 1 && json_integer_value(v) <= 256) {
        c->threads = (int)json_integer_value(v);
        return 0;
    }
    return fail_type(w, "an integer in 1..256 or \"auto\"", v);
}

/* A GPU list: "" or comma-separated distinct indices "0,1,3". */
static int gpus_parse(const char *s, uint64_t mask[CFG_MAX_GPU / 64])
{
    memset(mask, 0, CFG_MAX_GPU / 8);
    if (!*s)
        return 0;
    for (;;) {
        int v = 0, nd = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (*s++ - '0');
            if (++nd > 4)
                return -1;
        }
        if (nd == 0 || v >= CFG_MAX_GPU)
            return -1;
        if (mask[v / 64] & (1ull << (v % 64)))
            return -1;
        mask[v / 64] |= 1ull << (v % 64);
        if (*s == '\0')
            return 0;
        if (*s++ != ',')
            return -1;
    }
}

static int row_gpus(walk *w, json_t *v, void *obj)
{
    mm_launch_cfg *l = obj;
    uint64_t mask[CFG_MAX_GPU / 64];
    const char *s;
    size_t n;
    int rc;
    if (!v)
        return 0;
    if ((rc = get_str(w, v, 0, 4096, F_NOSPACE, &s, &n)))
        return rc;
    if (gpus_parse(s, mask) < 0)
        return fail(w, "expected distinct comma-separated GPU indices in 0..%d like \"0,1\" "
                       "(or \"\" for none), got \"%.64s\"", CFG_MAX_GPU - 1, s);
    return set_str(w, &l->gpus, s, n);
}

/* An array of strings; each non-empty when nonempty is set. */
static int str_array(walk *w, json_t *v, int nonempty, size_t maxn, char ***arr, size_t *narr)
{
    size_t i;
    json_t *e;
    int rc = 0;

    if (!json_is_array(v))
        return fail_type(w, "an array of strings", v);
    if (json_array_size(v) > maxn)
        return fail(w, "more than %zu entries", maxn);
    if (nonempty && json_array_size(v) == 0)
        return fail(w, "must not be empty");
    /* A repeated key is impossible (duplicates are rejected by the parser),
     * so *arr is still NULL here. */
    if (json_array_size(v)) {
        *arr = calloc(json_array_size(v), sizeof **arr);
        if (!*arr)
            return nomem(w);
        *narr = json_array_size(v);
    }
    json_array_foreach(v, i, e) {
        const char *s;
        size_t n, old = path_index(w, i);
        rc = get_str(w, e, nonempty ? 1 : 0, CFG_MAX_STRING, 0, &s, &n);
        if (!rc)
            rc = set_str(w, &(*arr)[i], s, n);
        path_pop(w, old);
        if (rc)
            break;
    }
    return rc;
}

static int row_args(walk *w, json_t *v, void *obj)
{
    mm_launch_cfg *l = obj;
    return v ? str_array(w, v, 0, CFG_MAX_ARGS, &l->args, &l->nargs) : 0;
}

static int row_command(walk *w, json_t *v, void *obj)
{
    mm_launch_cfg *l = obj;
    return v ? str_array(w, v, 1, CFG_MAX_ARGS, &l->command, &l->ncommand) : 0;
}

static int launch_post(walk *w, void *obj)
{
    mm_launch_cfg *l = obj;
    if (!l->model && !l->ncommand)
        return fail(w, "needs \"model\" (or a \"command\" to run)");
    return 0;
}

static const row launch_rows[] = {
    R_STR(mm_launch_cfg, "model", model, 1, 4096, NULL, 0),
    R_FN("gpus", row_gpus, 0),
    R_STRNAMES(mm_launch_cfg, "device", device, device_names),
    R_INT(mm_launch_cfg, "port", port, 1, 65535, 0, 0),
    R_FN("args", row_args, 0),
    R_FN("command", row_command, 0),
    R_BOOL(mm_launch_cfg, "share_gpus", share_gpus, 0),
    R_INT(mm_launch_cfg, "startup_timeout_ms", startup_timeout_ms, 1, MS_MAX, 600000, 0),
};
TABLE(launch_table, launch_rows, launch_post);

static int row_launch(walk *w, json_t *v, void *obj)
{
    mm_backend_cfg *b = obj;
    int rc;
    if (!v)
        return 0;
    if (!(b->launch = calloc(1, sizeof *b->launch)))
        return nomem(w);
    if ((rc = apply_defaults(w, &launch_table, b->launch)))
        return rc;
    return walk_obj(w, &launch_table, v, b->launch);
}

/* "http[s]://host[:port][/base]": host and port parsed, trailing "/"
 * dropped so callers can append "/v1/...". */
static int parse_backend_url(walk *w, const char *s, mm_backend_cfg *b)
{
    const char *scheme, *a, *end, *h, *why;
    size_t hn, pathn;
    int def_port;
    mm_buf u;

    if (strncasecmp(s, "http://", 7) == 0) {
        scheme = "http://";
        def_port = 80;
    } else if (strncasecmp(s, "https://", 8) == 0) {
        scheme = "https://";
        def_port = 443;
    } else {
        return fail(w, "unsupported scheme in \"%.128s\" (expected http:// or https://)", s);
    }
    a = s + strlen(scheme);
    end = a + strcspn(a, "/?#");
    if (strpbrk(a, "?#"))
        return fail(w, "a query or fragment is not allowed in \"%.128s\"", s);
    if (memchr(a, '@', (size_t)(end - a)))
        return fail(w, "credentials in the url are not supported (use \"api_key\")");
    if ((why = parse_authority(a, (size_t)(end - a), def_port, 1, &h, &hn, &b->port)))
        return fail(w, "%s in \"%.128s\"", why, s);
    pathn = strlen(end);
    while (pathn && end[pathn - 1] == '/')
        pathn--;
    if (has_space_or_ctl(end, pathn))
        return fail(w, "whitespace or control characters in \"%.128s\"", s);

    mm_buf_init(&u, CFG_MAX_STRING + 16);
    if (mm_buf_append_str(&u, scheme) || mm_buf_append(&u, a, (size_t)(end - a)) ||
        mm_buf_append(&u, end, pathn)) {
        mm_buf_free(&u);
        return nomem(w);
    }
    free(b->url);
    b->url = u.data;
    return set_str(w, &b->host, h, hn);
}

static int row_url(walk *w, json_t *v, void *obj)
{
    mm_backend_cfg *b = obj;
    const char *s;
    size_t n;
    int rc;

    if (!v) {
        char u[64];
        if (!b->launch)
            return fail(w, "required key is missing (or give \"launch\" with a \"port\")");
        if (!b->launch->port)
            return fail(w, "missing, so \"launch\" needs a \"port\"");
        snprintf(u, sizeof u, "http://127.0.0.1:%d", b->launch->port);
        b->port = b->launch->port;
        if ((rc = set_str(w, &b->url, u, strlen(u))))
            return rc;
        return set_str(w, &b->host, "127.0.0.1", 9);
    }
    if ((rc = get_str(w, v, 1, CFG_MAX_STRING, F_NOSPACE, &s, &n)))
        return rc;
    if ((rc = parse_backend_url(w, s, b)))
        return rc;
    if (b->launch && !b->launch->port)
        b->launch->port = b->port;
    return 0;
}

static const row timeouts_rows[] = {
    R_INT(mm_timeouts_cfg, "connect_ms", connect_ms, 0, MS_MAX, 5000, 0),
    R_INT(mm_timeouts_cfg, "first_byte_ms", first_byte_ms, 0, MS_MAX, 300000, 0),
    R_INT(mm_timeouts_cfg, "idle_ms", idle_ms, 0, MS_MAX, 120000, 0),
    R_INT(mm_timeouts_cfg, "total_ms", total_ms, 0, MS_MAX, 0, 0),
};
TABLE(timeouts_table, timeouts_rows, NULL);

static const row backend_rows[] = {
    R_FN("launch", row_launch, 0),   /* before url: url may come from it */
    R_FN("url", row_url, 0),
    R_INT(mm_backend_cfg, "weight", weight, 0, 1000000, 1, 0),
    R_STR(mm_backend_cfg, "served_model", served_model, 1, CFG_MAX_NAME, NULL, 0),
    R_STR(mm_backend_cfg, "api_key", api_key, 1, 4096, NULL, 0),
    R_OBJ(mm_backend_cfg, "timeouts", timeouts, timeouts_table, F_NODEF),
    R_INT(mm_backend_cfg, "max_requests", max_requests, 0, 1000000, 0, F_NODEF),
};
TABLE(backend_table, backend_rows, NULL);

static int row_backends(walk *w, json_t *v, void *obj)
{
    mm_model_cfg *m = obj;
    size_t i, nz = 0;
    json_t *e;
    int rc;

    if (!v)
        return 0;
    if (!json_is_array(v))
        return fail_type(w, "an array of backends", v);
    if (json_array_size(v) == 0)
        return fail(w, "must not be empty");
    if (json_array_size(v) > CFG_MAX_BACKENDS)
        return fail(w, "more than %d backends", CFG_MAX_BACKENDS);
    if (!(m->backends = calloc(json_array_size(v), sizeof *m->backends)))
        return nomem(w);
    m->nbackends = json_array_size(v);
    json_array_foreach(v, i, e) {
        mm_backend_cfg *b = &m->backends[i];
        size_t old = path_index(w, i);
        /* Inherit first; the backend's own keys then override per key. */
        b->timeouts = m->timeouts;
        b->max_requests = m->max_requests;
        rc = apply_defaults(w, &backend_table, b);
        if (!rc)
            rc = walk_obj(w, &backend_table, e, b);
        path_pop(w, old);
        if (rc)
            return rc;
        nz += b->weight > 0;
    }
    /* All weights 0 is allowed: a drained model, answered with 503. */
    (void)nz;
    return 0;
}

static const row split_rows[] = {
    R_STR(mm_split_cfg, "model", model, 1, CFG_MAX_NAME, NULL, F_NOSPACE | F_REQUIRED),
    R_INT(mm_split_cfg, "weight", weight, 0, 1000000, 1, 0),
};
TABLE(split_table, split_rows, NULL);

static int row_split(walk *w, json_t *v, void *obj)
{
    mm_model_cfg *m = obj;
    size_t i;
    json_t *e;
    int rc;

    if (!v)
        return 0;
    if (!json_is_array(v))
        return fail_type(w, "an array of {\"model\", \"weight\"}", v);
    if (json_array_size(v) == 0)
        return fail(w, "must not be empty");
    if (json_array_size(v) > CFG_MAX_SPLIT)
        return fail(w, "more than %d entries", CFG_MAX_SPLIT);
    if (!(m->split = calloc(json_array_size(v), sizeof *m->split)))
        return nomem(w);
    m->nsplit = json_array_size(v);
    json_array_foreach(v, i, e) {
        size_t old = path_index(w, i);
        rc = apply_defaults(w, &split_table, &m->split[i]);
        if (!rc)
            rc = walk_obj(w, &split_table, e, &m->split[i]);
        path_pop(w, old);
        if (rc)
            return rc;
    }
    return 0;
}

/* RFC 9110 token characters (a header field name). */
static int is_tchar(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int row_sticky(walk *w, json_t *v, void *obj)
{
    mm_model_cfg *m = obj;
    const char *s;
    size_t n;
    int rc;

    if (!v)
        return 0;
    if ((rc = get_str(w, v, 1, CFG_MAX_NAME + 8, 0, &s, &n)))
        return rc;
    if (strncmp(s, "header:", 7) == 0 && n > 7) {
        for (size_t i = 7; i < n; i++)
            if (!is_tchar(s[i]))
                return fail(w, "\"%.64s\" is not a valid header name", s + 7);
        if ((rc = set_str(w, &m->sticky_key, s + 7, n - 7)))
            return rc;
        /* Header names are case-insensitive; the parser hands them lowercase. */
        for (char *p = m->sticky_key; *p; p++)
            if (*p >= 'A' && *p <= 'Z')
                *p = (char)(*p - 'A' + 'a');
        m->sticky_kind = MM_STICKY_HEADER;
        return 0;
    }
    if (strncmp(s, "body:", 5) == 0 && n > 5) {
        m->sticky_kind = MM_STICKY_BODY;
        return set_str(w, &m->sticky_key, s + 5, n - 5);
    }
    return fail(w, "expected \"header:NAME\" or \"body:FIELD\", got \"%.64s\"", s);
}

static int row_fallback(walk *w, json_t *v, void *obj)
{
    mm_model_cfg *m = obj;
    int rc;

    if (!v)
        return 0;
    if ((rc = str_array(w, v, 1, CFG_MAX_FALLBACK, &m->fallback, &m->nfallback)))
        return rc;
    for (size_t i = 0; i < m->nfallback; i++)
        for (size_t j = 0; j < i; j++)
            if (strcmp(m->fallback[i], m->fallback[j]) == 0) {
                size_t old = path_index(w, i);
                rc = fail(w, "\"%.64s\" is listed twice", m->fallback[i]);
                path_pop(w, old);
                return rc;
            }
    return 0;
}

static const row health_rows[] = {
    R_BOOL(mm_health_cfg, "enabled", enabled, 1),
    R_STR(mm_health_cfg, "path", path, 1, 1024, "/health", F_NOSPACE | F_SLASH),
    R_INT(mm_health_cfg, "interval_ms", interval_ms, 10, MS_MAX, 2000, 0),
    R_INT(mm_health_cfg, "timeout_ms", timeout_ms, 1, MS_MAX, 1000, 0),
    R_INT(mm_health_cfg, "rise", rise, 1, 1000, 2, 0),
    R_INT(mm_health_cfg, "fall", fall, 1, 1000, 3, 0),
};
TABLE(health_table, health_rows, NULL);

static int row_health(walk *w, json_t *v, void *obj)
{
    mm_model_cfg *m = obj;
    if (!v)
        return 0;
    if (json_is_boolean(v)) {
        m->health.enabled = json_is_true(v);
        return 0;
    }
    if (!json_is_object(v))
        return fail_type(w, "an object, true or false", v);
    /* Writing the object means "check, with these settings"; it turns checks
     * back on when "defaults" turned them off, unless it says otherwise. */
    m->health.enabled = 1;
    return walk_obj(w, &health_table, v, &m->health);
}

static int breaker_post(walk *w, void *obj)
{
    mm_breaker_cfg *b = obj;
    if (b->max_open_ms < b->open_ms) {
        size_t old = path_key(w, "max_open_ms");
        int rc = fail(w, "must be >= open_ms (%d), got %d", b->open_ms, b->max_open_ms);
        path_pop(w, old);
        return rc;
    }
    return 0;
}

static const row breaker_rows[] = {
    R_INT(mm_breaker_cfg, "consecutive_failures", consecutive_failures, 0, 1000000, 5, 0),
    R_DBL(mm_breaker_cfg, "error_rate", error_rate, 0.0, 1.0, 0.5),
    R_INT(mm_breaker_cfg, "window_ms", window_ms, 100, MS_MAX, 10000, 0),
    R_INT(mm_breaker_cfg, "min_requests", min_requests, 1, 1000000, 20, 0),
    R_INT(mm_breaker_cfg, "open_ms", open_ms, 1, MS_MAX, 10000, 0),
    R_INT(mm_breaker_cfg, "max_open_ms", max_open_ms, 1, MS_MAX, 300000, 0),
    R_INT(mm_breaker_cfg, "half_open_requests", half_open_requests, 1, 1000, 1, 0),
    R_INT(mm_breaker_cfg, "max_ejection_percent", max_ejection_percent, 0, 100, 50, 0),
};
TABLE(breaker_table, breaker_rows, breaker_post);

static int model_post(walk *w, void *obj)
{
    mm_model_cfg *m = obj;
    if (w->scope == SC_POOL && !m->nbackends)
        return fail(w, "needs \"backends\"");
    if (w->scope != SC_MODEL)
        return 0;
    if (!m->nbackends && !m->nsplit)
        return fail(w, "needs \"backends\" or \"split\"");
    if (m->nbackends && m->nsplit)
        return fail(w, "\"backends\" and \"split\" cannot be used together");
    if (m->sticky_kind != MM_STICKY_NONE && !m->nsplit) {
        size_t old = path_key(w, "sticky");
        int rc = fail(w, "only allowed on a model with \"split\"");
        path_pop(w, old);
        return rc;
    }
    return 0;
}

/* One table for "defaults", models[] and "default_pool"; scope says which
 * keys each accepts. Order matters: backends inherit the settings above. */
static const row model_rows[] = {
    { .key = "name", .kind = K_STR, .off = offsetof(mm_model_cfg, name), .min = 1,
      .max = CFG_MAX_NAME, .flags = F_NOSPACE | F_REQUIRED, .scope = SC_MODEL },
    R_ENUM(mm_model_cfg, "strategy", strategy, strategy_names, MM_STRATEGY_ROUND_ROBIN),
    R_OBJ(mm_model_cfg, "timeouts", timeouts, timeouts_table, 0),
    R_FNSUB(mm_model_cfg, "health", health, row_health, health_table),
    R_OBJ(mm_model_cfg, "breaker", breaker, breaker_table, 0),
    R_INT(mm_model_cfg, "retries", retries, 0, 10, 2, 0),
    R_INT(mm_model_cfg, "max_requests", max_requests, 0, 1000000, 0, 0),
    R_INT(mm_model_cfg, "max_queue", max_queue, 0, 1000000, 0, 0),
    R_INT(mm_model_cfg, "queue_timeout_ms", queue_timeout_ms, 0, MS_MAX, 30000, 0),
    R_FN("backends", row_backends, SC_MODEL | SC_POOL),
    R_FN("split", row_split, SC_MODEL),
    R_FN("sticky", row_sticky, SC_MODEL),
    R_FN("fallback", row_fallback, SC_MODEL),
};
TABLE(model_table, model_rows, model_post);

/* A fresh model: the base settings, with its own copy of the strings. */
static int model_init(walk *w, mm_model_cfg *m)
{
    *m = w->base;
    m->health.path = NULL;
    if (w->base.health.path && !(m->health.path = strdup(w->base.health.path)))
        return nomem(w);
    return 0;
}

static int row_defaults(walk *w, json_t *v, void *obj)
{
    (void)obj;
    if (!v)
        return 0;
    w->scope = SC_DEFAULTS;
    return walk_obj(w, &model_table, v, &w->base);
}

static long model_index(const mm_gateway_cfg *c, const char *name)
{
    for (size_t i = 0; i < c->nmodels; i++)
        if (c->models[i].name && strcmp(c->models[i].name, name) == 0)
            return (long)i;
    return -1;
}

enum { WHITE, GREY, BLACK };

/* Depth-first search over fallback edges (the path is "models" here). A grey
 * target closes a cycle, reported at the closing edge as the chain of names
 * from that model around to itself. */
static int fallback_dfs(walk *w, const mm_gateway_cfg *c, size_t i, unsigned char *color,
                        size_t *stack, size_t depth)
{
    const mm_model_cfg *m = &c->models[i];
    color[i] = GREY;
    stack[depth] = i;
    for (size_t j = 0; j < m->nfallback; j++) {
        size_t k = (size_t)model_index(c, m->fallback[j]);
        if (color[k] == GREY) {
            char chain[768];
            size_t len, p = 0, old;
            int rc, n;
            while (stack[p] != k)
                p++;
            n = snprintf(chain, sizeof chain, "%s", m->name);
            len = n > 0 ? (size_t)n : 0;
            for (size_t q = p; q <= depth && len < sizeof chain; q++) {
                n = snprintf(chain + len, sizeof chain - len, " -> %s",
                             c->models[stack[q]].name);
                if (n > 0)
                    len += (size_t)n;
            }
            old = path_index(w, i);
            path_key(w, "fallback");
            path_index(w, j);
            rc = fail(w, "fallback cycle: %s", chain);
            path_pop(w, old);
            return rc;
        }
        if (color[k] == WHITE) {
            int rc = fallback_dfs(w, c, k, color, stack, depth + 1);
            if (rc)
                return rc;
        }
    }
    color[i] = BLACK;
    return 0;
}

/* Names unique; split and fallback targets exist; no fallback cycles. */
static int check_models(walk *w, mm_gateway_cfg *c)
{
    unsigned char *color = NULL;
    size_t *stack = NULL;
    int rc = 0;

    for (size_t i = 0; i < c->nmodels && !rc; i++) {
        mm_model_cfg *m = &c->models[i];
        size_t o1 = path_index(w, i);
        long other = model_index(c, m->name);
        if (other >= 0 && (size_t)other != i) {
            size_t o2 = path_key(w, "name");
            rc = fail(w, "duplicate model name \"%s\" (also models[%ld])", m->name, other);
            path_pop(w, o2);
        }
        for (size_t j = 0; j < m->nsplit && !rc; j++) {
            size_t o2 = path_key(w, "split");
            path_index(w, j);
            path_key(w, "model");
            long k = model_index(c, m->split[j].model);
            if (k < 0)
                rc = fail(w, "no model named \"%s\"", m->split[j].model);
            else if (c->models[k].nsplit)
                rc = fail(w, "model \"%s\" is itself a split", m->split[j].model);
            for (size_t q = 0; q < j && !rc; q++)
                if (strcmp(m->split[q].model, m->split[j].model) == 0)
                    rc = fail(w, "duplicate variant \"%s\" (also split[%zu])",
                              m->split[j].model, q);
            path_pop(w, o2);
        }
        /* A split whose weights are all 0 is drained: 503, like a pool. */
        for (size_t j = 0; j < m->nfallback && !rc; j++) {
            size_t o2 = path_key(w, "fallback");
            path_index(w, j);
            long k = model_index(c, m->fallback[j]);
            if (k < 0)
                rc = fail(w, "no model named \"%s\"", m->fallback[j]);
            else if ((size_t)k == i)
                rc = fail(w, "a model cannot fall back to itself");
            path_pop(w, o2);
        }
        path_pop(w, o1);
    }
    if (rc || !c->nmodels)
        return rc;

    color = calloc(c->nmodels, 1);
    stack = calloc(c->nmodels, sizeof *stack);
    if (!color || !stack) {
        rc = nomem(w);
        goto out;
    }
    for (size_t i = 0; i < c->nmodels && !rc; i++)
        if (color[i] == WHITE)
            rc = fallback_dfs(w, c, i, color, stack, 0);
out:
    free(color);
    free(stack);
    return rc;
}

static int row_models(walk *w, json_t *v, void *obj)
{
    mm_gateway_cfg *c = obj;
    size_t i;
    json_t *e;
    int rc;

    if (!v)
        return 0;
    if (!json_is_array(v))
        return fail_type(w, "an array of models", v);
    if (json_array_size(v) > CFG_MAX_MODELS)
        return fail(w, "more than %d models", CFG_MAX_MODELS);
    if (json_array_size(v)) {
        if (!(c->models = calloc(json_array_size(v), sizeof *c->models)))
            return nomem(w);
        c->nmodels = json_array_size(v);
    }
    json_array_foreach(v, i, e) {
        size_t old = path_index(w, i);
        rc = model_init(w, &c->models[i]);
        w->scope = SC_MODEL;
        if (!rc)
            rc = walk_obj(w, &model_table, e, &c->models[i]);
        path_pop(w, old);
        if (rc)
            return rc;
    }
    return check_models(w, c);
}

static int row_default_pool(walk *w, json_t *v, void *obj)
{
    mm_gateway_cfg *c = obj;
    int rc;

    if (!v)
        return 0;
    if (!(c->default_pool = calloc(1, sizeof *c->default_pool)))
        return nomem(w);
    if ((rc = model_init(w, c->default_pool)))
        return rc;
    if ((rc = set_str(w, &c->default_pool->name, "", 0)))
        return rc;
    w->scope = SC_POOL;
    return walk_obj(w, &model_table, v, c->default_pool);
}

static int row_redis_url(walk *w, json_t *v, void *obj)
{
    mm_redis_cfg *r = obj;
    const char *s, *a, *end, *at = NULL, *h, *why;
    size_t n, hn;
    int rc;

    if (!v)
        return 0;
    if ((rc = get_str(w, v, 1, 4096, F_NOSPACE, &s, &n)))
        return rc;
    if (strncasecmp(s, "redis://", 8) != 0)
        return fail(w, "expected \"redis://[[user]:password@]host[:port][/db]\"");
    a = s + 8;
    end = a + strcspn(a, "/?#");
    if (strpbrk(a, "?#"))
        return fail(w, "a query or fragment is not supported");
    for (const char *p = a; p < end; p++)
        if (*p == '@')
            at = p;
    if (at) {
        const char *colon = memchr(a, ':', (size_t)(at - a));
        if (!colon)
            return fail(w, "credentials must be written \"[user]:password@\"");
        if (colon + 1 == at)
            return fail(w, "empty password");
        free(r->username);
        free(r->password);
        r->username = r->password = NULL;
        if (colon > a && (rc = pct_decode(a, (size_t)(colon - a), &r->username)))
            return rc == -ENOMEM ? nomem(w) : fail(w, "bad %%-escape in the user name");
        if ((rc = pct_decode(colon + 1, (size_t)(at - colon - 1), &r->password)))
            return rc == -ENOMEM ? nomem(w) : fail(w, "bad %%-escape in the password");
        a = at + 1;
    }
    if ((why = parse_authority(a, (size_t)(end - a), 6379, 1, &h, &hn, &r->port)))
        return fail(w, "%s in the redis url", why);
    r->db = 0;
    if (*end == '/' && end[1]) {
        int db;
        if (parse_port(end + 1, strlen(end + 1), 0, &db) < 0)
            return fail(w, "bad database number \"%.16s\" (expected 0..65535)", end + 1);
        r->db = db;
    }
    if ((rc = set_str(w, &r->host, h, hn)))
        return rc;
    return set_str(w, &r->url, s, n);
}

static const row redis_rows[] = {
    R_FN("url", row_redis_url, 0),
    R_INT(mm_redis_cfg, "flush_ms", flush_ms, 10, 60000, 1000, 0),
    R_STR(mm_redis_cfg, "prefix", prefix, 1, 64, "modelmux", F_NOSPACE),
    R_INT(mm_redis_cfg, "ttl_s", ttl_s, 60, 31536000, 86400, 0),
};
TABLE(redis_table, redis_rows, NULL);

/* ------------------------------------------------------------------ */
/* Whole-config checks.                                                */

static int is_loopback(const char *h)
{
    unsigned char a4[4];
    if (strcmp(h, "localhost") == 0 || strcmp(h, "::1") == 0)
        return 1;
    return inet_pton(AF_INET, h, a4) == 1 && a4[0] == 127;
}

static int is_wildcard(const char *h)
{
    return strcmp(h, "0.0.0.0") == 0 || strcmp(h, "::") == 0;
}

static void backend_path(const mm_gateway_cfg *c, size_t mi, size_t bi, char *buf, size_t n)
{
    if (mi < c->nmodels)
        snprintf(buf, n, "models[%zu].backends[%zu]", mi, bi);
    else
        snprintf(buf, n, "default_pool.backends[%zu]", bi);
}

typedef struct launched {
    const mm_backend_cfg *b;
    size_t mi, bi;
    uint64_t gpus[CFG_MAX_GPU / 64];
} launched;

/* Workers the fleet starts must not collide: one port each, and a GPU shared
 * only when both sides say so. */
static int check_launches(walk *w, const mm_gateway_cfg *c)
{
    launched *l = NULL;
    size_t nl = 0, cap = 0;
    int rc = 0;

    for (size_t mi = 0; mi <= c->nmodels; mi++) {
        const mm_model_cfg *m = mi < c->nmodels ? &c->models[mi] : c->default_pool;
        for (size_t bi = 0; m && bi < m->nbackends; bi++) {
            if (!m->backends[bi].launch)
                continue;
            if (nl == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                launched *p = realloc(l, ncap * sizeof *l);
                if (!p) {
                    rc = nomem(w);
                    goto out;
                }
                l = p;
                cap = ncap;
            }
            l[nl].b = &m->backends[bi];
            l[nl].mi = mi;
            l[nl].bi = bi;
            gpus_parse(l[nl].b->launch->gpus ? l[nl].b->launch->gpus : "", l[nl].gpus);
            nl++;
        }
    }
    for (size_t i = 0; i < nl && !rc; i++) {
        for (size_t j = 0; j < i && !rc; j++) {
            char here[96], there[96];
            const mm_launch_cfg *a = l[i].b->launch, *b = l[j].b->launch;
            backend_path(c, l[i].mi, l[i].bi, here, sizeof here);
            backend_path(c, l[j].mi, l[j].bi, there, sizeof there);
            if (a->port == b->port) {
                size_t old = path_key(w, here);
                path_key(w, "launch.port");
                rc = fail(w, "port %d is also used by %s", a->port, there);
                path_pop(w, old);
                break;
            }
            if (a->share_gpus && b->share_gpus)
                continue;
            for (int g = 0; g < CFG_MAX_GPU; g++) {
                if (!(l[i].gpus[g / 64] & l[j].gpus[g / 64] & (1ull << (g % 64))))
                    continue;
                size_t old = path_key(w, here);
                path_key(w, "launch.gpus");
                rc = fail(w, "GPU %d is also used by %s (set \"share_gpus\": true on both "
                             "to allow this)", g, there);
                path_pop(w, old);
                break;
            }
        }
    }
out:
    free(l);
    return rc;
}

static int top_post(walk *w, void *obj)
{
    mm_gateway_cfg *c = obj;
    size_t old;
    int rc = 0;

    if (!c->nmodels && !c->default_pool) {
        old = path_key(w, "models");
        rc = fail(w, "at least one model (or a \"default_pool\") is required");
        path_pop(w, old);
        return rc;
    }
    if (c->admin_host && !is_loopback(c->admin_host) && !c->admin_token) {
        old = path_key(w, "admin_token");
        rc = fail(w, "required when admin_listen (\"%s\") is not a loopback address",
                  c->admin_host);
        path_pop(w, old);
        return rc;
    }
    if (c->admin_host && c->listen_port && c->admin_port == c->listen_port &&
        (strcmp(c->admin_host, c->listen_host) == 0 || is_wildcard(c->admin_host) ||
         is_wildcard(c->listen_host))) {
        old = path_key(w, "admin_listen");
        rc = fail(w, "port %d is already taken by \"listen\"", c->admin_port);
        path_pop(w, old);
        return rc;
    }
    return check_launches(w, c);
}

static const row top_rows[] = {
    R_FN("listen", row_listen, 0),
    R_FN("admin_listen", row_admin_listen, 0),
    R_STR(mm_gateway_cfg, "admin_token", admin_token, 1, 4096, NULL, F_NOSPACE),
    R_FN("threads", row_threads, 0),
    R_SIZE(mm_gateway_cfg, "max_body_bytes", max_body_bytes, 1, GIB, 16 * MIB),
    R_SIZE(mm_gateway_cfg, "max_header_bytes", max_header_bytes, 1024, MIB, 64 * 1024),
    R_SIZE(mm_gateway_cfg, "max_response_bytes", max_response_bytes, 1, GIB, 64 * MIB),
    R_INT(mm_gateway_cfg, "client_timeout_ms", client_timeout_ms, 1, MS_MAX, 60000, 0),
    R_STR(mm_gateway_cfg, "access_log", access_log, 1, 4096, NULL, 0),
    R_INT(mm_gateway_cfg, "shutdown_grace_ms", shutdown_grace_ms, 0, MS_MAX, 30000, 0),
    /* "defaults" before the models: they start from it. */
    R_FN("defaults", row_defaults, 0),
    R_FN("models", row_models, 0),
    R_FN("default_pool", row_default_pool, 0),
    R_OBJ(mm_gateway_cfg, "redis", redis, redis_table, 0),
};
TABLE(top_table, top_rows, top_post);

/* ------------------------------------------------------------------ */
/* ${NAME} expansion.                                                  */

static int env_string(walk *w, json_t *v)
{
    const char *s = json_string_value(v);
    size_t n = json_string_length(v), i = 0;
    mm_buf b;
    int rc = 0;

    if (!memchr(s, '$', n))
        return 0;
    mm_buf_init(&b, CFG_MAX_STRING);
    while (i < n && !rc) {
        const char *dollar = memchr(s + i, '$', n - i);
        size_t run = dollar ? (size_t)(dollar - (s + i)) : n - i;
        if (run) {
            rc = mm_buf_append(&b, s + i, run);
            i += run;
            continue;
        }
        if (i + 2 < n && s[i + 1] == '$' && s[i + 2] == '{') {
            rc = mm_buf_append(&b, "${", 2);   /* "$${" is a literal "${" */
            i += 3;
        } else if (i + 1 < n && s[i + 1] == '{') {
            const char *close = memchr(s + i + 2, '}', n - i - 2);
            char name[CFG_MAX_VARNAME + 1];
            size_t nn;
            const char *val;
            if (!close) {
                rc = fail(w, "unterminated \"${\" (write \"$${\" for a literal \"${\")");
                break;
            }
            nn = (size_t)(close - (s + i + 2));
            if (nn == 0 || nn > CFG_MAX_VARNAME) {
                rc = fail(w, "bad variable name in \"${...}\" (1..%d characters)",
                          CFG_MAX_VARNAME);
                break;
            }
            memcpy(name, s + i + 2, nn);
            name[nn] = '\0';
            for (size_t k = 0; k < nn && !rc; k++) {
                char c = name[k];
                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' ||
                      (k > 0 && c >= '0' && c <= '9')))
                    rc = fail(w, "bad variable name \"%s\" (letters, digits, _)", name);
            }
            if (rc)
                break;
            if (!(val = getenv(name))) {
                rc = fail(w, "environment variable \"%s\" is not set", name);
                break;
            }
            rc = mm_buf_append_str(&b, val);
            i = (size_t)(close - s) + 1;
        } else {
            rc = mm_buf_append(&b, "$", 1);
            i++;
        }
    }
    if (rc == -E2BIG)
        rc = fail(w, "longer than %d bytes after ${} expansion", CFG_MAX_STRING);
    else if (rc == -ENOMEM)
        rc = nomem(w);
    if (!rc && json_string_setn(v, mm_buf_cstr(&b), b.len) < 0)
        rc = fail(w, "the expanded value is not valid UTF-8");
    mm_buf_free(&b);
    return rc;
}

static int env_expand(walk *w, json_t *v)
{
    const char *key;
    json_t *e;
    size_t i, old;
    int rc = 0;

    switch (json_typeof(v)) {
    case JSON_OBJECT:
        json_object_foreach(v, key, e) {
            old = path_key(w, key);
            rc = env_expand(w, e);
            path_pop(w, old);
            if (rc)
                return rc;
        }
        return 0;
    case JSON_ARRAY:
        json_array_foreach(v, i, e) {
            old = path_index(w, i);
            rc = env_expand(w, e);
            path_pop(w, old);
            if (rc)
                return rc;
        }
        return 0;
    case JSON_STRING:
        return env_string(w, v);
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------ */
/* Public API.                                                         */

static void launch_free(mm_launch_cfg *l)
{
    if (!l)
        return;
    free(l->model);
    free(l->gpus);
    free(l->device);
    for (size_t i = 0; i < l->nargs; i++)
        free(l->args[i]);
    free(l->args);
    for (size_t i = 0; i < l->ncommand; i++)
        free(l->command[i]);
    free(l->command);
    free(l);
}

static void model_free_fields(mm_model_cfg *m)
{
    free(m->name);
    for (size_t i = 0; i < m->nbackends; i++) {
        mm_backend_cfg *b = &m->backends[i];
        free(b->url);
        free(b->host);
        free(b->served_model);
        free(b->api_key);
        launch_free(b->launch);
    }
    free(m->backends);
    for (size_t i = 0; i < m->nsplit; i++)
        free(m->split[i].model);
    free(m->split);
    free(m->sticky_key);
    for (size_t i = 0; i < m->nfallback; i++)
        free(m->fallback[i]);
    free(m->fallback);
    free(m->health.path);
}

void mm_config_free(mm_gateway_cfg *cfg)
{
    if (!cfg)
        return;
    free(cfg->listen_host);
    free(cfg->admin_host);
    free(cfg->admin_token);
    free(cfg->access_log);
    for (size_t i = 0; i < cfg->nmodels; i++)
        model_free_fields(&cfg->models[i]);
    free(cfg->models);
    if (cfg->default_pool) {
        model_free_fields(cfg->default_pool);
        free(cfg->default_pool);
    }
    free(cfg->redis.url);
    free(cfg->redis.host);
    free(cfg->redis.username);
    free(cfg->redis.password);
    free(cfg->redis.prefix);
    free(cfg);
}

static int load_buf(const char *data, size_t len, mm_gateway_cfg **out, char *err, size_t errlen)
{
    walk w;
    json_error_t je;
    json_t *root;
    mm_gateway_cfg *cfg = NULL;
    int rc;

    memset(&w, 0, sizeof w);
    w.err = err;
    w.errlen = errlen;
    root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (errlen)
            snprintf(err, errlen, "line %d, column %d: %s", je.line, je.column, je.text);
        return -EINVAL;
    }
    if (!(cfg = calloc(1, sizeof *cfg))) {
        rc = nomem(&w);
        goto out;
    }
    w.cfg = cfg;
    if ((rc = apply_defaults(&w, &model_table, &w.base)))
        goto out;
    if ((rc = apply_defaults(&w, &top_table, cfg)))
        goto out;
    if ((rc = env_expand(&w, root)))
        goto out;
    if ((rc = walk_obj(&w, &top_table, root, cfg)))
        goto out;
    *out = cfg;
    cfg = NULL;
out:
    mm_config_free(cfg);
    model_free_fields(&w.base);
    json_decref(root);
    return rc;
}

int mm_config_load_string(const char *json, mm_gateway_cfg **out, char *err, size_t errlen)
{
    size_t len;

    *out = NULL;
    if (!json) {
        if (errlen)
            snprintf(err, errlen, "no config text");
        return -EINVAL;
    }
    len = strnlen(json, (size_t)CFG_MAX_FILE + 1);
    if (len > CFG_MAX_FILE) {
        if (errlen)
            snprintf(err, errlen, "config larger than %u bytes", CFG_MAX_FILE);
        return -E2BIG;
    }
    return load_buf(json, len, out, err, errlen);
}

int mm_config_load_file(const char *path, mm_gateway_cfg **out, char *err, size_t errlen)
{
    char local[1024], chunk[8192];
    FILE *f;
    mm_buf b;
    size_t n;
    int rc = 0;

    *out = NULL;
    mm_buf_init(&b, CFG_MAX_FILE);
    if (!(f = fopen(path, "rb"))) {
        rc = -errno;
        if (errlen)
            snprintf(err, errlen, "%s: %s", path, strerror(-rc));
        return rc;
    }
    while (!rc && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
        rc = mm_buf_append(&b, chunk, n);
    if (!rc && ferror(f))
        rc = errno ? -errno : -EIO;
    fclose(f);
    if (rc) {
        if (errlen)
            snprintf(err, errlen, "%s: %s", path,
                     rc == -E2BIG ? "larger than the 4 MiB a config may have" : strerror(-rc));
        goto out;
    }
    if ((rc = load_buf(mm_buf_cstr(&b), b.len, out, local, sizeof local)) && errlen)
        snprintf(err, errlen, "%s: %s", path, local);
out:
    mm_buf_free(&b);
    return rc;
}

const mm_model_cfg *mm_config_find_model(const mm_gateway_cfg *cfg, const char *name)
{
    if (!cfg || !name)
        return NULL;
    for (size_t i = 0; i < cfg->nmodels; i++)
        if (strcmp(cfg->models[i].name, name) == 0)
            return &cfg->models[i];
    return NULL;
}
