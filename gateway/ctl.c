/* ctl.c: `modelmux-gateway ctl` (see ctl.h). */
#include "ctl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>

#include "buf.h"
#include "config.h"

#define PROG "modelmux-gateway ctl"
#define CTL_DEFAULT_ADMIN "http://127.0.0.1:8001"
/* Hard caps. An answer is bounded like a buffered upstream answer (the
 * default max_response_bytes); an input file like a config file. */
#define CTL_MAX_RESPONSE   ((size_t)64 << 20)
#define CTL_MAX_INPUT      ((size_t)4 << 20)
#define CTL_MAX_URL        2048
#define CTL_MAX_NAME       256       /* a model name's own bound */
#define CTL_MAX_TOKEN      4096      /* admin_token's bound */
#define CTL_MAX_SHOWN      300       /* bytes of a non-JSON error body shown */
#define CTL_CONNECT_MS     5000L
#define CTL_REQUEST_MS     30000L
#define CTL_POLL_MS        250
#define CTL_WAIT_DEFAULT_S 300
#define CTL_WAIT_MAX_S     86400
#define CTL_MAX_COLS       11

enum { CTL_OK = 0, CTL_FAILED = 1, CTL_USAGE = 2 };

/* A positional argument; backend: it came after --backend (weights). */
typedef struct ctl_arg {
    const char *s;
    int         backend;
} ctl_arg;

typedef struct ctl {
    char               admin[CTL_MAX_URL];   /* no trailing '/' */
    CURL              *curl;
    struct curl_slist *hdr;        /* every request */
    struct curl_slist *hdr_body;   /* requests with a JSON body */
    int                json;
    int                wait;
    long long          timeout_s;
} ctl;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: " PROG " [--admin URL | -c CONFIG] [--token TOKEN] [--json] COMMAND ...\n"
            "commands:\n"
            "  models [NAME]                 models (or one): kind, published, backends or split\n"
            "                                with weights and state, launched workers (pid/state)\n"
            "  backends                      every backend: health, breaker, in flight, failures\n"
            "  add FILE.json|- [--wait [--timeout S]]\n"
            "                                add a model entry (one item of \"models\"); --wait polls\n"
            "                                until it is published (default timeout %d s)\n"
            "  remove NAME                   remove a model (its backends drain)\n"
            "  weights NAME MODEL=W ...      set a split's weights\n"
            "  weights NAME --backend URL=W ...\n"
            "                                set backend weights (0 drains a backend)\n"
            "options:\n"
            "  --admin URL       the admin listener (default $MODELMUX_ADMIN_URL, else %s)\n"
            "  -c, --config F    take admin_listen and admin_token from the gateway's config\n"
            "  --token T         admin token (default $MODELMUX_ADMIN_TOKEN, else the config's);\n"
            "                    the environment keeps it out of the process list\n"
            "  --json            print the API's JSON instead of tables\n"
            "Reloading the config file is not an API call: kill -HUP PID (systemctl reload).\n"
            "API changes last until the next reload or restart: put them in the file to keep them.\n"
            "exit status: 0 ok, 1 refused by the API or unreachable, 2 bad usage\n",
            CTL_WAIT_DEFAULT_S, CTL_DEFAULT_ADMIN);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, PROG ": ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nrun '" PROG " --help' for the commands\n");
    va_end(ap);
    return CTL_USAGE;
}

/* ---- terminal safety ---- */

/* Server strings go to a terminal: control bytes (and the C1 controls,
 * encoded C2 80..C2 9F) become '?', so an answer cannot move the cursor or
 * retitle the window. */
static void clean_into(char *dst, const char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == 0xc2 && i + 1 < n && (unsigned char)s[i + 1] >= 0x80 &&
            (unsigned char)s[i + 1] <= 0x9f) {
            dst[o++] = '?';
            i++;
        } else {
            dst[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
        }
    }
    dst[o] = '\0';
}

static char *clean_dup(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d)
        clean_into(d, s, n);
    return d;
}

static void put_clean(FILE *f, const char *s, size_t n)
{
    char tmp[256];
    while (n > 0) {
        /* Never cut a C2 xx pair at the chunk's end. */
        size_t k = n < sizeof tmp - 1 ? n : sizeof tmp - 2;
        if (k < n && (unsigned char)s[k - 1] == 0xc2)
            k--;
        clean_into(tmp, s, k);
        fputs(tmp, f);
        s += k;
        n -= k;
    }
}

/* ---- argument checks ---- */

static int parse_ll(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -EINVAL;
    *out = v;
    return 0;
}

/* The API addresses a model by its name written raw in the path (the
 * gateway does not percent-decode), so only names made of characters a
 * request target may carry literally can be used there. */
static int name_ok(const char *name)
{
    static const char extra[] = "-._~!$&'()*+,;=:@/";
    size_t n = strlen(name);
    if (n == 0 || n > CTL_MAX_NAME)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        int alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
        if (!alnum && !(ch && strchr(extra, ch)))
            return 0;
    }
    return 1;
}

static int check_name(const char *name)
{
    if (name_ok(name))
        return 0;
    return usage_error("model name '%s' cannot be written in an admin API path (1..256 of "
                       "A-Z a-z 0-9 - . _ ~ ! $ & ' ( ) * + , ; = : @ /)", name);
}

/* http(s)://host[:port][/base]: no credentials (the token goes in a
 * header), query or fragment; stored without trailing '/'. */
static int set_admin(ctl *c, const char *url)
{
    size_t n = strlen(url);
    size_t skip = strncasecmp(url, "http://", 7) == 0 ? 7 : strncasecmp(url, "https://", 8) == 0 ? 8 : 0;
    if (!skip || n == skip || n >= sizeof c->admin)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)url[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == '?' || ch == '#' || ch == '@' || ch == '\\')
            return -EINVAL;
    }
    while (n > skip && url[n - 1] == '/')
        n--;
    if (n == skip || url[skip] == '/')
        return -EINVAL;
    memcpy(c->admin, url, n);
    c->admin[n] = '\0';
    return 0;
}

static int token_ok(const char *t)
{
    size_t n = strlen(t);
    if (n == 0 || n > CTL_MAX_TOKEN)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)t[i] <= 0x20 || (unsigned char)t[i] >= 0x7f)
            return 0;
    return 1;
}

/* admin_listen and admin_token of a gateway config. The token is copied
 * into *token (caller frees). */
static int from_config(ctl *c, const char *path, int need_url, char **token)
{
    char err[1024] = "", url[CTL_MAX_URL];
    mm_gateway_cfg *cfg = NULL;
    int rc = CTL_FAILED;
    if (mm_config_load_file(path, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, PROG ": config error: ");
        put_clean(stderr, err, strlen(err));
        fputc('\n', stderr);
        goto out;
    }
    if (need_url) {
        const char *h = cfg->admin_host ? cfg->admin_host : "";
        if (cfg->admin_port <= 0) {
            fprintf(stderr, PROG ": %s has no admin_listen (give --admin URL)\n", path);
            goto out;
        }
        /* A wildcard listener is reached on loopback. */
        if (!h[0] || strcmp(h, "0.0.0.0") == 0)
            h = "127.0.0.1";
        else if (strcmp(h, "::") == 0)
            h = "::1";
        int v6 = strchr(h, ':') != NULL;
        int n = snprintf(url, sizeof url, "http://%s%s%s:%d", v6 ? "[" : "", h, v6 ? "]" : "",
                         cfg->admin_port);
        if (n < 0 || (size_t)n >= sizeof url || set_admin(c, url) != 0) {
            fprintf(stderr, PROG ": %s: admin_listen gives no usable URL\n", path);
            goto out;
        }
    }
    if (cfg->admin_token && !(*token = strdup(cfg->admin_token))) {
        fprintf(stderr, PROG ": out of memory\n");
        goto out;
    }
    rc = CTL_OK;
out:
    mm_config_free(cfg);
    return rc;
}

/* ---- HTTP ---- */

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    /* Returning short aborts the transfer: past the cap we stop reading
     * rather than grow. */
    return mm_buf_append(arg, p, size * n) == 0 ? size * n : 0;
}

/* One request to the admin API. *status: the HTTP status. Returns 0, or
 * -EIO when no complete answer arrived (message printed). */
static int http(ctl *c, const char *method, const char *path, const char *body, size_t blen,
                long *status, mm_buf *out)
{
    char url[CTL_MAX_URL + CTL_MAX_NAME + 64], cerr[CURL_ERROR_SIZE] = "";
    int n = snprintf(url, sizeof url, "%s%s", c->admin, path);
    if (n < 0 || (size_t)n >= sizeof url) {
        fprintf(stderr, PROG ": URL too long\n");
        return -EIO;
    }
    CURL *h = c->curl;
    curl_easy_reset(h);
    mm_buf_reset(out);
    int bad = 0;
    bad |= curl_easy_setopt(h, CURLOPT_URL, url) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr) != CURLE_OK;
#if LIBCURL_VERSION_NUM >= 0x075500
    bad |= curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK;
#endif
    /* The token must not travel to a proxy from the environment. */
    bad |= curl_easy_setopt(h, CURLOPT_PROXY, "") != CURLE_OK;
    /* Model names are sent as written: "a/../b" is a name, not a path. */
    bad |= curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, CTL_CONNECT_MS) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, CTL_REQUEST_MS) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)CTL_MAX_RESPONSE) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_USERAGENT, "modelmux-gateway-ctl") != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_HTTPHEADER, body ? c->hdr_body : c->hdr) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body) != CURLE_OK;
    bad |= curl_easy_setopt(h, CURLOPT_WRITEDATA, out) != CURLE_OK;
    if (body) {
        bad |= curl_easy_setopt(h, CURLOPT_POSTFIELDS, body) != CURLE_OK;
        bad |= curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen) != CURLE_OK;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
        bad |= curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method) != CURLE_OK;
    if (bad) {
        fprintf(stderr, PROG ": libcurl refused an option\n");
        return -EIO;
    }
    CURLcode rc = curl_easy_perform(h);
    if (rc == CURLE_WRITE_ERROR || rc == CURLE_FILESIZE_EXCEEDED) {
        fprintf(stderr, PROG ": %s %s: the answer is larger than %zu bytes\n", method, path,
                CTL_MAX_RESPONSE);
        return -EIO;
    }
    if (rc != CURLE_OK) {
        const char *why = cerr[0] ? cerr : curl_easy_strerror(rc);
        fprintf(stderr, PROG ": cannot reach the admin API at %s: ", c->admin);
        put_clean(stderr, why, strlen(why));
        fputc('\n', stderr);
        return -EIO;
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    mm_buf_cstr(out);
    return 0;
}

/* A refused call: the API's OpenAI-shaped message on stderr (and, with
 * --json, the body on stdout for scripts). Returns the exit status. */
static int api_error(const ctl *c, long status, const mm_buf *body)
{
    const char *data = body->len ? body->data : "";
    if (c->json && body->len) {
        fwrite(data, 1, body->len, stdout);
        fputc('\n', stdout);
    }
    json_t *j = json_loadb(data, body->len, 0, NULL);
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    fprintf(stderr, PROG ": ");
    if (msg) {
        put_clean(stderr, msg, strlen(msg));
    } else {
        fprintf(stderr, "unexpected answer: ");
        put_clean(stderr, data, body->len < CTL_MAX_SHOWN ? body->len : CTL_MAX_SHOWN);
    }
    fprintf(stderr, " (HTTP %ld)\n", status);
    if (status == 401)
        fprintf(stderr, PROG ": give the admin token: --token or MODELMUX_ADMIN_TOKEN\n");
    json_decref(j);
    return CTL_FAILED;
}

/* GET path into *out (parsed into *doc unless doc is NULL). Returns 0 or
 * an exit status (message printed). */
static int get_json(ctl *c, const char *path, mm_buf *raw, json_t **doc)
{
    long status = 0;
    if (http(c, "GET", path, NULL, 0, &status, raw) != 0)
        return CTL_FAILED;
    if (status != 200)
        return api_error(c, status, raw);
    if (!doc)
        return CTL_OK;
    json_error_t je;
    *doc = json_loadb(raw->len ? raw->data : "", raw->len, 0, &je);
    if (!*doc || !json_is_object(*doc)) {
        json_decref(*doc);
        *doc = NULL;
        fprintf(stderr, PROG ": GET %s: the answer is not a JSON object\n", path);
        return CTL_FAILED;
    }
    return CTL_OK;
}

static void print_raw(const mm_buf *b)
{
    if (b->len)
        fwrite(b->data, 1, b->len, stdout);
    fputc('\n', stdout);
}

/* ---- tables ---- */

typedef struct ctl_table {
    size_t ncols, nrows, cap;
    char **cells;                 /* row-major, cleaned copies */
    size_t width[CTL_MAX_COLS];
} ctl_table;

/* Terminal columns taken by s: one per UTF-8 lead byte (good enough for
 * names; wide characters are rare in them). */
static size_t display_width(const char *s)
{
    size_t w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

static int table_row(ctl_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 16;
        char **nv = realloc(t->cells, nc * t->ncols * sizeof *nv);
        if (!nv)
            return -ENOMEM;
        t->cells = nv;
        t->cap = nc;
    }
    char **row = t->cells + t->nrows * t->ncols;
    for (size_t i = 0; i < t->ncols; i++) {
        const char *s = cells[i] && cells[i][0] ? cells[i] : "-";
        if (!(row[i] = clean_dup(s, strlen(s)))) {
            while (i-- > 0)
                free(row[i]);
            return -ENOMEM;
        }
        size_t w = display_width(row[i]);
        if (w > t->width[i])
            t->width[i] = w;
    }
    t->nrows++;
    return 0;
}

static void table_print(const ctl_table *t)
{
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t i = 0; i < t->ncols; i++) {
            const char *s = t->cells[r * t->ncols + i];
            fputs(s, stdout);
            if (i + 1 < t->ncols)
                for (size_t pad = display_width(s); pad < t->width[i] + 2; pad++)
                    fputc(' ', stdout);
        }
        fputc('\n', stdout);
    }
}

static void table_free(ctl_table *t)
{
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
}

static const char *jstr(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

static void jint(char *dst, size_t n, json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (json_is_integer(v))
        snprintf(dst, n, "%lld", (long long)json_integer_value(v));
    else
        snprintf(dst, n, "-");
}

/* ---- models ---- */

/* "pid/state" of a launched worker. */
static void worker_cell(char *dst, size_t n, json_t *w)
{
    char pid[32];
    jint(pid, sizeof pid, w, "pid");
    const char *st = jstr(w, "state");
    snprintf(dst, n, "%s/%.64s", pid, st ? st : "?");
}

static int model_rows(ctl_table *t, json_t *m)
{
    char weight[32], inflight[32], state[160], worker[128];
    const char *name = jstr(m, "name"), *kind = jstr(m, "kind");
    json_t *pub = json_object_get(m, "published");
    const char *published = json_is_boolean(pub) ? (json_is_true(pub) ? "yes" : "no") : "-";
    json_t *workers = json_object_get(m, "workers");
    size_t nw = json_array_size(workers), rows = 0;
    char *used = calloc(nw ? nw : 1, 1);
    int rc = 0;
    if (!used)
        return -ENOMEM;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(m, "split"), i, e) {
        jint(weight, sizeof weight, e, "weight");
        const char *row[] = {name, kind, published, jstr(e, "model"), weight, NULL, NULL, NULL};
        if ((rc = table_row(t, row)))
            goto out;
        rows++;
    }
    json_array_foreach(json_object_get(m, "backends"), i, e) {
        const char *url = jstr(e, "url"), *h = jstr(e, "health"), *b = jstr(e, "breaker");
        jint(weight, sizeof weight, e, "weight");
        jint(inflight, sizeof inflight, e, "inflight");
        snprintf(state, sizeof state, "%.64s/%.64s", h ? h : "?", b ? b : "?");
        worker[0] = '\0';
        size_t k;
        json_t *w;
        json_array_foreach(workers, k, w) {
            const char *wu = jstr(w, "url");
            if (!used[k] && url && wu && strcmp(url, wu) == 0) {
                worker_cell(worker, sizeof worker, w);
                used[k] = 1;
                break;
            }
        }
        const char *row[] = {name, kind, published, url, weight, state, inflight, worker};
        if ((rc = table_row(t, row)))
            goto out;
        rows++;
    }
    /* A worker whose url matches no backend (e.g. one still draining after
     * its backend left the config) is shown on a row of its own. */
    json_array_foreach(workers, i, e) {
        if (used[i])
            continue;
        worker_cell(worker, sizeof worker, e);
        const char *row[] = {name, kind, published, jstr(e, "url"), NULL, NULL, NULL, worker};
        if ((rc = table_row(t, row)))
            goto out;
        rows++;
    }
    if (!rows) {
        const char *row[] = {name, kind, published, NULL, NULL, NULL, NULL, NULL};
        rc = table_row(t, row);
    }
out:
    free(used);
    return rc;
}

static int cmd_models(ctl *c, const ctl_arg *a, size_t n)
{
    char path[64 + CTL_MAX_NAME];
    if (n > 1)
        return usage_error("models takes at most one NAME, got '%s' too", a[1].s);
    if (n == 1 && check_name(a[0].s))
        return CTL_USAGE;
    snprintf(path, sizeof path, "/admin/models%s%s", n ? "/" : "", n ? a[0].s : "");
    mm_buf raw;
    mm_buf_init(&raw, CTL_MAX_RESPONSE);
    json_t *doc = NULL;
    ctl_table t = {.ncols = 8};
    int rc = get_json(c, path, &raw, c->json ? NULL : &doc);
    if (rc)
        goto out;
    if (c->json) {
        print_raw(&raw);
        goto out;
    }
    const char *head[] = {"MODEL", "KIND", "PUBLISHED", "TARGET", "WEIGHT", "STATE", "INFLIGHT",
                          "WORKER"};
    int e = table_row(&t, head);
    if (n == 1) {
        if (!e)
            e = model_rows(&t, doc);
    } else {
        size_t i;
        json_t *m;
        json_array_foreach(json_object_get(doc, "models"), i, m) {
            if (!e)
                e = model_rows(&t, m);
        }
    }
    if (e) {
        fprintf(stderr, PROG ": out of memory\n");
        rc = CTL_FAILED;
        goto out;
    }
    table_print(&t);
out:
    table_free(&t);
    json_decref(doc);
    mm_buf_free(&raw);
    return rc;
}

/* ---- backends ---- */

static int cmd_backends(ctl *c, const ctl_arg *a, size_t n)
{
    if (n)
        return usage_error("backends takes no arguments, got '%s'", a[0].s);
    mm_buf raw;
    mm_buf_init(&raw, CTL_MAX_RESPONSE);
    json_t *doc = NULL;
    ctl_table t = {.ncols = 11};
    int rc = get_json(c, "/admin/backends", &raw, c->json ? NULL : &doc);
    if (rc)
        goto out;
    if (c->json) {
        print_raw(&raw);
        goto out;
    }
    const char *head[] = {"MODEL", "URL", "WEIGHT", "HEALTH", "BREAKER", "INFLIGHT", "REQUESTS",
                          "FAILURES", "ERRORS", "RETRY_IN", "QUEUED"};
    int e = table_row(&t, head);
    size_t i, k;
    json_t *m, *b;
    json_array_foreach(json_object_get(doc, "models"), i, m) {
        const char *name = json_is_true(json_object_get(m, "default_pool")) ? "(default_pool)"
                                                                             : jstr(m, "model");
        char queued[32];
        jint(queued, sizeof queued, m, "queued");
        json_array_foreach(json_object_get(m, "backends"), k, b) {
            char w[32], inf[32], req[32], fail[32], rate[32], retry[32];
            jint(w, sizeof w, b, "weight");
            jint(inf, sizeof inf, b, "inflight");
            jint(req, sizeof req, b, "requests");
            jint(fail, sizeof fail, b, "failures");
            json_t *er = json_object_get(b, "error_rate"), *ri = json_object_get(b, "retry_in_ms");
            if (json_is_number(er))
                snprintf(rate, sizeof rate, "%.1f%%", 100.0 * json_number_value(er));
            else
                snprintf(rate, sizeof rate, "-");
            if (json_is_integer(ri) && json_integer_value(ri) > 0)
                snprintf(retry, sizeof retry, "%.1fs", (double)json_integer_value(ri) / 1000.0);
            else
                snprintf(retry, sizeof retry, "-");
            const char *row[] = {name, jstr(b, "url"), w, jstr(b, "health"), jstr(b, "breaker"),
                                 inf, req, fail, rate, retry, queued};
            if (!e)
                e = table_row(&t, row);
        }
    }
    if (e) {
        fprintf(stderr, PROG ": out of memory\n");
        rc = CTL_FAILED;
        goto out;
    }
    table_print(&t);
out:
    table_free(&t);
    json_decref(doc);
    mm_buf_free(&raw);
    return rc;
}

/* ---- add ---- */

static int read_input(const char *path, mm_buf *out)
{
    int is_stdin = strcmp(path, "-") == 0;
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    char chunk[65536];
    int rc = 0;
    if (!f) {
        fprintf(stderr, PROG ": %s: %s\n", path, strerror(errno));
        return -errno;
    }
    for (;;) {
        size_t k = fread(chunk, 1, sizeof chunk, f);
        if (k && (rc = mm_buf_append(out, chunk, k))) {
            if (rc == -E2BIG)
                fprintf(stderr, PROG ": %s: larger than %zu bytes\n", is_stdin ? "stdin" : path,
                        CTL_MAX_INPUT);
            else
                fprintf(stderr, PROG ": out of memory\n");
            break;
        }
        if (k < sizeof chunk) {
            if (ferror(f)) {
                fprintf(stderr, PROG ": %s: read error\n", is_stdin ? "stdin" : path);
                rc = -EIO;
            }
            break;
        }
    }
    if (!is_stdin)
        fclose(f);
    return rc;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Workers as "pid/state ..." for messages, into dst (cut to fit). */
static void workers_summary(char *dst, size_t n, json_t *m)
{
    size_t o = 0, i;
    json_t *w;
    dst[0] = '\0';
    json_array_foreach(json_object_get(m, "workers"), i, w) {
        char cell[128];
        worker_cell(cell, sizeof cell, w);
        int k = snprintf(dst + o, n - o, "%s%s", o ? " " : "", cell);
        if (k < 0 || (size_t)k >= n - o)
            break;
        o += (size_t)k;
    }
    if (!o)
        snprintf(dst, n, "none reported");
}

/* Poll GET /admin/models/NAME until "published" (a launched worker passed
 * its health check), a worker failed for good, or the timeout. */
static int wait_published(ctl *c, const char *name)
{
    char path[64 + CTL_MAX_NAME], ws[512];
    snprintf(path, sizeof path, "/admin/models/%s", name);
    mm_buf raw;
    mm_buf_init(&raw, CTL_MAX_RESPONSE);
    int64_t deadline = mono_ms() + c->timeout_s * 1000;
    int rc;
    for (;;) {
        json_t *m = NULL;
        if ((rc = get_json(c, path, &raw, &m)))
            break;
        int published = json_is_true(json_object_get(m, "published")), failed = 0;
        size_t i;
        json_t *w;
        json_array_foreach(json_object_get(m, "workers"), i, w) {
            const char *st = jstr(w, "state");
            failed |= st && strcmp(st, "failed") == 0;
        }
        workers_summary(ws, sizeof ws, m);
        json_decref(m);
        if (published) {
            if (c->json)
                print_raw(&raw);
            else
                printf("%s: published\n", name);
            break;
        }
        if (failed || mono_ms() >= deadline) {
            fprintf(stderr, PROG ": %s: ", name);
            if (failed)
                fprintf(stderr, "a worker failed and will not be restarted");
            else
                fprintf(stderr, "not published within %lld s", c->timeout_s);
            fprintf(stderr, " (workers: ");
            put_clean(stderr, ws, strlen(ws));
            fprintf(stderr, ")\n");
            rc = CTL_FAILED;
            break;
        }
        int64_t left = deadline - mono_ms();
        sleep_ms(left < CTL_POLL_MS ? (left > 0 ? left : 0) : CTL_POLL_MS);
    }
    mm_buf_free(&raw);
    return rc;
}

static int cmd_add(ctl *c, const ctl_arg *a, size_t n)
{
    if (n != 1)
        return usage_error("add takes one FILE.json (or - for stdin)");
    mm_buf in, raw;
    mm_buf_init(&in, CTL_MAX_INPUT);
    mm_buf_init(&raw, CTL_MAX_RESPONSE);
    json_t *entry = NULL;
    json_error_t je;
    long status = 0;
    int rc = CTL_FAILED;
    const char *label = strcmp(a[0].s, "-") == 0 ? "stdin" : a[0].s;
    if (read_input(a[0].s, &in) != 0)
        goto out;
    /* Checked here only for the name (--wait needs it, and a typo is
     * cheaper to report before the round trip); the bytes sent are the
     * file's own, judged by the gateway. */
    entry = json_loadb(in.len ? in.data : "", in.len, JSON_REJECT_DUPLICATES, &je);
    if (!entry) {
        fprintf(stderr, PROG ": %s: line %d, column %d: ", label, je.line, je.column);
        put_clean(stderr, je.text, strlen(je.text));
        fputc('\n', stderr);
        goto out;
    }
    const char *name = jstr(entry, "name");
    if (!json_is_object(entry) || !name) {
        fprintf(stderr, PROG ": %s: expected one model entry, a JSON object with a \"name\"\n",
                label);
        goto out;
    }
    if (c->wait && check_name(name)) {
        rc = CTL_USAGE;
        goto out;
    }
    if (http(c, "POST", "/admin/models", in.data, in.len, &status, &raw) != 0)
        goto out;
    if (status / 100 != 2) {
        rc = api_error(c, status, &raw);
        goto out;
    }
    if (c->wait) {
        rc = wait_published(c, name);
        goto out;
    }
    if (c->json) {
        print_raw(&raw);
    } else {
        fputs("added ", stdout);
        put_clean(stdout, name, strlen(name));
        fputc('\n', stdout);
    }
    rc = CTL_OK;
out:
    json_decref(entry);
    mm_buf_free(&in);
    mm_buf_free(&raw);
    return rc;
}

/* ---- remove, weights ---- */

/* A change to one model: METHOD /admin/models/NAME [body]; prints verb. */
static int change(ctl *c, const char *method, const char *name, const char *body, const char *verb)
{
    char path[64 + CTL_MAX_NAME];
    snprintf(path, sizeof path, "/admin/models/%s", name);
    mm_buf raw;
    mm_buf_init(&raw, CTL_MAX_RESPONSE);
    long status = 0;
    int rc = CTL_FAILED;
    if (http(c, method, path, body, body ? strlen(body) : 0, &status, &raw) != 0)
        goto out;
    if (status / 100 != 2) {
        rc = api_error(c, status, &raw);
        goto out;
    }
    if (c->json)
        print_raw(&raw);
    else
        printf("%s %s\n", verb, name);
    rc = CTL_OK;
out:
    mm_buf_free(&raw);
    return rc;
}

static int cmd_remove(ctl *c, const ctl_arg *a, size_t n)
{
    if (n != 1)
        return usage_error("remove takes one model NAME");
    if (check_name(a[0].s))
        return CTL_USAGE;
    return change(c, "DELETE", a[0].s, NULL, "removed");
}

/* KEY=W, split at the last '=' (a URL may hold '=' in its path, a weight
 * never does). */
static int weight_pair(json_t *arr, const ctl_arg *a)
{
    const char *eq = strrchr(a->s, '=');
    long long w;
    if (!eq || eq == a->s || parse_ll(eq + 1, INT32_MIN, INT32_MAX, &w) != 0)
        return usage_error("expected %s=WEIGHT (an integer), got '%s'",
                           a->backend ? "URL" : "MODEL", a->s);
    json_t *e = json_object();
    if (!e || json_object_set_new(e, a->backend ? "url" : "model",
                                  json_stringn(a->s, (size_t)(eq - a->s))) ||
        json_object_set_new(e, "weight", json_integer(w)) || json_array_append_new(arr, e)) {
        fprintf(stderr, PROG ": out of memory\n");
        return CTL_FAILED;
    }
    return CTL_OK;
}

static int cmd_weights(ctl *c, const ctl_arg *a, size_t n)
{
    if (n < 2)
        return usage_error("weights takes NAME and MODEL=W ... (or --backend URL=W ...)");
    if (check_name(a[0].s))
        return CTL_USAGE;
    json_t *split = json_array(), *backends = json_array(), *body = json_object();
    char *text = NULL;
    int rc = CTL_FAILED;
    if (!split || !backends || !body) {
        fprintf(stderr, PROG ": out of memory\n");
        goto out;
    }
    for (size_t i = 1; i < n; i++)
        if ((rc = weight_pair(a[i].backend ? backends : split, &a[i])))
            goto out;
    rc = CTL_FAILED;
    if ((json_array_size(split) && json_object_set(body, "split", split)) ||
        (json_array_size(backends) && json_object_set(body, "backends", backends)) ||
        !(text = json_dumps(body, JSON_COMPACT))) {
        fprintf(stderr, PROG ": out of memory\n");
        goto out;
    }
    rc = change(c, "PATCH", a[0].s, text, "updated");
out:
    free(text);
    json_decref(split);
    json_decref(backends);
    json_decref(body);
    return rc;
}

/* ---- command line ---- */

typedef struct ctl_cmd {
    const char *name;
    int (*run)(ctl *c, const ctl_arg *a, size_t n);
} ctl_cmd;

static const ctl_cmd commands[] = {
    {"models", cmd_models}, {"backends", cmd_backends}, {"add", cmd_add},
    {"remove", cmd_remove}, {"weights", cmd_weights},
};

typedef struct ctl_opts {
    const char *admin, *token, *config;
    int json, wait, backend, timeout_given;
    long long timeout_s;
    ctl_arg *pos;
    size_t npos;
} ctl_opts;

/* Options may come before or after the command; "--" ends them. Returns
 * -1 to go on, else an exit status. */
static int parse_args(int argc, char **argv, ctl_opts *o)
{
    int opts_done = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL, *val = NULL;
        if (opts_done || a[0] != '-' || strcmp(a, "-") == 0) {
            o->pos[o->npos].s = a;
            o->pos[o->npos++].backend = o->backend;
            continue;
        }
#define OPT(long_name) (strcmp(a, long_name) == 0 || \
                        (strncmp(a, long_name "=", sizeof long_name) == 0 && (val = a + sizeof long_name)))
#define VALUE() (val ? val : next ? (i++, next) : NULL)
        if (strcmp(a, "--") == 0) {
            opts_done = 1;
        } else if (OPT("--admin")) {
            if (!(o->admin = VALUE()))
                return usage_error("%s needs a URL", "--admin");
        } else if (OPT("--token")) {
            if (!(o->token = VALUE()))
                return usage_error("%s needs a value", "--token");
        } else if (strcmp(a, "-c") == 0 || OPT("--config")) {
            if (!(o->config = VALUE()))
                return usage_error("%s needs a file", a);
        } else if (OPT("--timeout")) {
            const char *v = VALUE();
            if (!v || parse_ll(v, 0, CTL_WAIT_MAX_S, &o->timeout_s) != 0)
                return usage_error("--timeout: expected seconds, 0..86400, got '%s'", v ? v : "");
            o->timeout_given = 1;
        } else if (strcmp(a, "--json") == 0) {
            o->json = 1;
        } else if (strcmp(a, "--wait") == 0) {
            o->wait = 1;
        } else if (strcmp(a, "--backend") == 0) {
            o->backend = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return CTL_OK;
        } else {
            return usage_error("unknown or incomplete option '%s'", a);
        }
#undef VALUE
#undef OPT
    }
    return -1;
}

int mm_ctl_main(int argc, char **argv)
{
    ctl c = {.timeout_s = CTL_WAIT_DEFAULT_S};
    ctl_opts o = {.timeout_s = CTL_WAIT_DEFAULT_S};
    char *cfg_token = NULL, *auth = NULL;
    const ctl_cmd *cmd = NULL;
    int rc = CTL_USAGE, curl_up = 0;
    if (!(o.pos = calloc((size_t)argc, sizeof *o.pos))) {
        fprintf(stderr, PROG ": out of memory\n");
        return CTL_FAILED;
    }
    int pr = parse_args(argc, argv, &o);
    if (pr >= 0) {
        rc = pr;
        goto out;
    }
    if (o.npos == 0) {
        rc = usage_error("a COMMAND is required (models, backends, add, remove, weights)");
        goto out;
    }
    const char *verb = o.pos[0].s;
    if (strcmp(verb, "reload") == 0) {
        fprintf(stderr, PROG ": reload is not an admin API call: the gateway re-reads its config "
                        "file on SIGHUP (kill -HUP PID, or systemctl reload modelmux-gateway)\n");
        goto out;
    }
    if (strcmp(verb, "help") == 0) {
        usage(stdout);
        rc = CTL_OK;
        goto out;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(verb, commands[i].name) == 0)
            cmd = &commands[i];
    if (!cmd) {
        rc = usage_error("unknown command '%s' (models, backends, add, remove, weights)", verb);
        goto out;
    }
    /* Flags that belong to one command are refused elsewhere: a misplaced
     * --backend silently changing nothing would be worse. */
    if ((o.wait || o.timeout_given) && cmd->run != cmd_add) {
        rc = usage_error("--wait and --timeout go with add, not %s", verb);
        goto out;
    }
    if (o.timeout_given && !o.wait) {
        rc = usage_error("--timeout needs --wait");
        goto out;
    }
    if (o.backend && cmd->run != cmd_weights) {
        rc = usage_error("--backend goes with weights, not %s", verb);
        goto out;
    }
    /* The URL: --admin, else the config's admin_listen, else the
     * environment, else the default. The config may give the token alone. */
    const char *admin = o.admin ? o.admin : getenv("MODELMUX_ADMIN_URL");
    if (o.config && (rc = from_config(&c, o.config, !o.admin, &cfg_token)) != CTL_OK)
        goto out;
    if (!c.admin[0] && set_admin(&c, admin && *admin ? admin : CTL_DEFAULT_ADMIN) != 0) {
        rc = usage_error("--admin: expected http(s)://HOST[:PORT][/PATH] without user, query or "
                         "fragment, got '%s'", admin);
        goto out;
    }
    const char *env_token = getenv("MODELMUX_ADMIN_TOKEN");
    const char *token = o.token ? o.token : env_token && *env_token ? env_token : cfg_token;
    if (token && !token_ok(token)) {
        rc = usage_error("the admin token must be 1..4096 printable characters without spaces");
        goto out;
    }
    c.json = o.json;
    c.wait = o.wait;
    c.timeout_s = o.timeout_s;

    rc = CTL_FAILED;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, PROG ": libcurl failed to initialise\n");
        goto out;
    }
    curl_up = 1;
    size_t alen = token ? strlen(token) + 32 : 0;
    if (token && (auth = malloc(alen)))
        snprintf(auth, alen, "Authorization: Bearer %s", token);
    const char *common[] = {"Accept: application/json", "Expect:", auth};
    int bad = !(c.curl = curl_easy_init()) || (token && !auth);
    for (size_t i = 0; !bad && i < 3; i++) {
        if (!common[i])
            continue;
        struct curl_slist *h = curl_slist_append(c.hdr, common[i]);
        struct curl_slist *hb = h ? curl_slist_append(c.hdr_body, common[i]) : NULL;
        bad = !h || !hb;
        c.hdr = h ? h : c.hdr;
        c.hdr_body = hb ? hb : c.hdr_body;
    }
    if (!bad) {
        struct curl_slist *hb = curl_slist_append(c.hdr_body, "Content-Type: application/json");
        bad = !hb;
        c.hdr_body = hb ? hb : c.hdr_body;
    }
    if (bad) {
        fprintf(stderr, PROG ": out of memory\n");
        goto out;
    }
    rc = cmd->run(&c, o.pos + 1, o.npos - 1);
    if (fflush(stdout) != 0 && rc == CTL_OK) {
        fprintf(stderr, PROG ": writing the output: %s\n", strerror(errno));
        rc = CTL_FAILED;
    }
out:
    curl_slist_free_all(c.hdr);
    curl_slist_free_all(c.hdr_body);
    if (c.curl)
        curl_easy_cleanup(c.curl);
    if (curl_up)
        curl_global_cleanup();
    free(auth);
    free(cfg_token);
    free(o.pos);
    return rc;
}
