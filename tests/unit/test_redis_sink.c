/* test_redis_sink.c: the Redis key schema shared by the sink and `stats`,
 * the A/B report computed from hash fields, and, when redis-server is
 * installed, one live round trip: the sink on a libevent loop flushes into
 * a private redis-server and the report read back matches what was
 * recorded, including a batch resent after its outcome was unknown. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/thread.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "config.h"
#include "metrics.h"
#include "redis_sink.h"
#include "stats_cli.h"
#include "test.h"

static int metric(const char *name)
{
    return mm_redis_metric_find(name, strlen(name));
}

TEST(metric_names_round_trip)
{
    char name[64], other[64];
    ASSERT_EQ(MM_REDIS_NMETRICS, 79);
    for (size_t i = 0; i < MM_REDIS_NMETRICS; i++) {
        ASSERT_EQ(mm_redis_metric_name(i, name, sizeof name), 0);
        ASSERT_EQ(metric(name), (long long)i);
        for (size_t j = 0; j < i; j++) {
            mm_redis_metric_name(j, other, sizeof other);
            ASSERT_TRUE(strcmp(name, other) != 0);
        }
    }
    ASSERT_EQ(mm_redis_metric_name(MM_REDIS_NMETRICS, name, sizeof name), -EINVAL);
    ASSERT_EQ(mm_redis_metric_name(0, name, 4), -EINVAL);   /* "requests" does not fit */
}

TEST(metric_names_are_the_documented_ones)
{
    char name[64];
    mm_redis_metric_name(0, name, sizeof name);
    ASSERT_STR_EQ(name, "requests");
    ASSERT_TRUE(metric("resp_none") >= 0);
    ASSERT_TRUE(metric("resp_5xx") >= 0);
    ASSERT_TRUE(metric("err_breaker_open") >= 0);
    ASSERT_TRUE(metric("err_client_abort") >= 0);
    ASSERT_TRUE(metric("latency_b0") >= 0);
    ASSERT_TRUE(metric("latency_b17") >= 0);
    ASSERT_TRUE(metric("ttft_count") >= 0);
    ASSERT_TRUE(metric("itl_sum_us") >= 0);
    ASSERT_TRUE(metric("completion_tokens") >= 0);
    /* near misses */
    ASSERT_EQ(metric("latency_b18"), -1);
    ASSERT_EQ(metric("latency_b01"), -1);
    ASSERT_EQ(metric("latency_b"), -1);
    ASSERT_EQ(metric("latency_"), -1);
    ASSERT_EQ(metric("err_none"), -1);
    ASSERT_EQ(metric("err_"), -1);
    ASSERT_EQ(metric("requests "), -1);
    ASSERT_EQ(metric("Requests"), -1);
    ASSERT_EQ(metric(""), -1);
    ASSERT_EQ(mm_redis_metric_find("requestsX", 8), 0);   /* length, not NUL, ends it */
}

/* Every counter of mm_series_stats has exactly one metric (errors[NONE]
 * aside): a field added to the struct without a name here fails this. */
TEST(metric_slots_cover_the_struct)
{
    mm_series_stats st;
    memset(&st, 0, sizeof st);
    for (size_t i = 0; i < MM_REDIS_NMETRICS; i++) {
        uint64_t *p = mm_redis_metric_slot(&st, i);
        ASSERT_TRUE(p != NULL);
        ASSERT_EQ(*p, 0);   /* not used twice */
        *p = i + 1;
    }
    ASSERT_EQ(MM_REDIS_NMETRICS, sizeof st / sizeof(uint64_t) - 1);
    ASSERT_EQ(st.errors[MM_ERR_NONE], 0);
    ASSERT_EQ(st.requests, metric("requests") + 1);
    ASSERT_EQ(st.responses[0], metric("resp_none") + 1);
    ASSERT_EQ(st.responses[5], metric("resp_5xx") + 1);
    ASSERT_EQ(st.errors[MM_ERR_MIDSTREAM], metric("err_midstream") + 1);
    ASSERT_EQ(st.errors[MM_ERR_429], metric("err_429") + 1);
    ASSERT_EQ(st.retries, metric("retries") + 1);
    ASSERT_EQ(st.prompt_tokens, metric("prompt_tokens") + 1);
    ASSERT_EQ(st.hist[MM_H_LATENCY].bucket[0], metric("latency_b0") + 1);
    ASSERT_EQ(st.hist[MM_H_TTFT].bucket[3], metric("ttft_b3") + 1);
    ASSERT_EQ(st.hist[MM_H_TTFT].count, metric("ttft_count") + 1);
    ASSERT_EQ(st.hist[MM_H_ITL].sum_us, metric("itl_sum_us") + 1);
    ASSERT_STR_EQ(mm_redis_err_name(MM_ERR_BREAKER_OPEN), "breaker_open");
    ASSERT_STR_EQ(mm_redis_err_name(MM_ERR_NONE), "");
}

TEST(field_format_and_sanitising)
{
    mm_buf b;
    mm_buf_init(&b, 1024);
    mm_series_info info = {"chat", "qwen-14b", "http://127.0.0.1:8001"};
    ASSERT_EQ(mm_redis_field(&b, &info, (size_t)metric("latency_b3")), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&b), "chat\tqwen-14b\thttp://127.0.0.1:8001\tlatency_b3");
    mm_buf_reset(&b);
    mm_series_info bad = {"a\tb", "c\nd", ""};
    ASSERT_EQ(mm_redis_field(&b, &bad, 0), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&b), "a_b\tc_d\t\trequests");
    /* A field that does not fit leaves the buffer as it was. */
    mm_buf small;
    mm_buf_init(&small, 8);
    ASSERT_EQ(mm_buf_append_str(&small, "xy"), 0);
    ASSERT_EQ(mm_redis_field(&small, &info, 0), -E2BIG);
    ASSERT_EQ(small.len, 2);
    mm_buf_free(&small);
    mm_buf_free(&b);
}

TEST(weights_from_config)
{
    const char *json =
        "{\"models\": ["
        " {\"name\": \"a\", \"backends\": [{\"url\": \"http://127.0.0.1:1\"}]},"
        " {\"name\": \"b\", \"backends\": [{\"url\": \"http://127.0.0.1:2\"}]},"
        " {\"name\": \"chat\", \"split\": [{\"model\": \"a\", \"weight\": 90}, {\"model\": \"b\", \"weight\": 10}]}]}";
    char err[256] = "";
    mm_gateway_cfg *cfg = NULL;
    ASSERT_EQ(mm_config_load_string(json, &cfg, err, sizeof err), 0);
    mm_redis_weights w;
    ASSERT_EQ(mm_redis_weights_from_cfg(cfg, &w), 0);
    ASSERT_EQ(w.n, 2);
    ASSERT_STR_EQ(w.v[0].model, "chat");
    ASSERT_STR_EQ(w.v[0].variant, "a");
    ASSERT_EQ(w.v[0].weight, 90);
    ASSERT_STR_EQ(w.v[1].variant, "b");
    ASSERT_EQ(w.v[1].weight, 10);
    mm_redis_weights_free(&w);
    ASSERT_EQ(w.n, 0);
    mm_config_free(cfg);
}

/* ---- the report ------------------------------------------------------ */

/* Feed every non-zero counter of st as the sink would write it. */
static int feed_series(mm_stats_report *r, const char *model, const char *variant, const char *backend,
                       mm_series_stats *st)
{
    mm_series_info info = {model, variant, backend};
    for (size_t i = 0; i < MM_REDIS_NMETRICS; i++) {
        uint64_t v = *mm_redis_metric_slot(st, i);
        if (!v)
            continue;
        mm_buf f;
        char num[24];
        mm_buf_init(&f, 4096);
        if (mm_redis_field(&f, &info, i))
            return -1;
        snprintf(num, sizeof num, "%llu", (unsigned long long)v);
        int rc = mm_stats_report_add(r, f.data, f.len, num, strlen(num));
        mm_buf_free(&f);
        if (rc)
            return rc;
    }
    return 0;
}

static void observe(mm_series_stats *st, int status, uint64_t latency_ms, uint64_t ttft_ms, uint64_t tokens)
{
    st->requests++;
    st->responses[status / 100]++;
    st->completion_tokens += tokens;
    mm_hist_observe(&st->hist[MM_H_LATENCY], latency_ms * 1000);
    if (ttft_ms)
        mm_hist_observe(&st->hist[MM_H_TTFT], ttft_ms * 1000);
}

static json_t *find_variant(json_t *doc, const char *model, const char *variant)
{
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(doc, "variants"), i, v) {
        if (strcmp(json_string_value(json_object_get(v, "model")), model) == 0 &&
            strcmp(json_string_value(json_object_get(v, "variant")), variant) == 0)
            return v;
    }
    return NULL;
}

static double num(json_t *v, const char *k)
{
    return json_number_value(json_object_get(v, k));
}

/* JSON carries 10 significant digits. */
#define ASSERT_NEAR(a, b)                                                  \
    do {                                                                   \
        double x_ = (a), y_ = (b), d_ = x_ > y_ ? x_ - y_ : y_ - x_;       \
        if (!(d_ <= 1e-8 * (y_ < 0 ? -y_ : y_) + 1e-12)) {                 \
            TEST_FAIL_("%s ~= %s: %.12g != %.12g", #a, #b, x_, y_);        \
            return;                                                        \
        }                                                                  \
    } while (0)

TEST(report_merges_backends_minutes_and_computes_figures)
{
    mm_stats_report *r;
    ASSERT_EQ(mm_stats_report_new(&r), 0);
    /* Variant a: 8 requests over two backends and two minutes (the same
     * series fed twice, as two minute hashes would). */
    mm_series_stats a1 = {0}, a2 = {0}, b1 = {0};
    for (int i = 0; i < 3; i++)
        observe(&a1, 200, 1000, 100, 50);          /* 1 s, 50 tokens */
    observe(&a1, 502, 20, 0, 0);
    a1.errors[MM_ERR_5XX] = 2;                      /* per attempt: more than answers */
    for (int i = 0; i < 4; i++)
        observe(&a2, 200, 1000, 300, 50);
    a2.errors[MM_ERR_MIDSTREAM] = 1;                /* one of those broke mid-stream */
    observe(&b1, 200, 2000, 400, 100);
    observe(&b1, 200, 2000, 400, 100);
    ASSERT_EQ(feed_series(r, "chat", "a", "http://b1", &a1), 0);
    ASSERT_EQ(feed_series(r, "chat", "a", "http://b2", &a2), 0);
    ASSERT_EQ(feed_series(r, "chat", "a", "http://b2", &a2), 0);   /* minute 2 */
    ASSERT_EQ(feed_series(r, "chat", "b", "http://b3", &b1), 0);
    ASSERT_EQ(mm_stats_report_weight(r, "chat\ta", 6, "90", 2), 0);
    ASSERT_EQ(mm_stats_report_weight(r, "chat\tb", 6, "10", 2), 0);
    ASSERT_EQ(mm_stats_report_weight(r, "chat\tc", 6, "0", 1), 0);   /* parked variant */
    ASSERT_EQ(mm_stats_report_gateway(r, "gw1", 3, "6000", 4), 0);
    ASSERT_EQ(mm_stats_report_gateway(r, "gw2", 3, "10", 2), 0);
    /* malformed input is skipped and counted, never fatal */
    ASSERT_EQ(mm_stats_report_add(r, "chat\ta\tx\tbogus", 15, "1", 1), 0);
    ASSERT_EQ(mm_stats_report_add(r, "chat\ta\trequests", 16, "1", 1), 0);
    ASSERT_EQ(mm_stats_report_add(r, "chat\ta\tx\trequests", 17, "-1", 2), 0);
    ASSERT_EQ(mm_stats_report_add(r, "chat\ta\tx\trequests", 17, "99999999999999999999", 20), 0);
    ASSERT_EQ(mm_stats_report_weight(r, "chat", 4, "1", 1), 0);

    mm_stats_window w = {"modelmux", 15, 100, 114};
    mm_buf out;
    mm_buf_init(&out, 1 << 20);
    ASSERT_EQ(mm_stats_report_render(r, &w, 1, &out), 0);
    json_error_t jerr;
    json_t *doc = json_loads(out.data, 0, &jerr);
    ASSERT_TRUE(doc != NULL);
    ASSERT_EQ(json_integer_value(json_object_get(doc, "skipped_fields")), 5);
    ASSERT_EQ(json_array_size(json_object_get(doc, "gateways")), 2);
    json_t *g0 = json_array_get(json_object_get(doc, "gateways"), 0);
    ASSERT_TRUE(json_is_true(json_object_get(g0, "active")));   /* 6000 >= 100 * 60 */
    ASSERT_TRUE(json_is_false(json_object_get(json_array_get(json_object_get(doc, "gateways"), 1), "active")));

    json_t *va = find_variant(doc, "chat", "a"), *vb = find_variant(doc, "chat", "b"),
           *vc = find_variant(doc, "chat", "c");
    ASSERT_TRUE(va && vb && vc);
    ASSERT_EQ(json_integer_value(json_object_get(va, "requests")), 12);   /* 4 + 4 + 4 */
    ASSERT_EQ(json_integer_value(json_object_get(vb, "requests")), 2);
    ASSERT_EQ(json_integer_value(json_object_get(vc, "requests")), 0);
    /* failed = 5xx answers (1) + mid-stream breaks (2: one per minute) */
    ASSERT_EQ(json_integer_value(json_object_get(va, "failed")), 3);
    ASSERT_NEAR(num(va, "error_rate"), 3.0 / 12);
    ASSERT_EQ(json_integer_value(json_object_get(json_object_get(va, "errors"), "5xx")), 2);
    ASSERT_EQ(json_integer_value(json_object_get(json_object_get(va, "responses"), "2xx")), 11);
    /* share of the model's requests vs share of the configured weights */
    ASSERT_NEAR(num(va, "share"), 12.0 / 14);
    ASSERT_NEAR(num(vb, "weight_share"), 0.1);
    ASSERT_EQ(json_integer_value(json_object_get(va, "weight")), 90);
    ASSERT_EQ(num(vc, "weight_share"), 0);
    ASSERT_TRUE(json_is_null(json_object_get(vc, "error_rate")));
    ASSERT_TRUE(json_is_null(json_object_get(vc, "latency_p50_ms")));
    /* quantiles come from the merged histogram */
    mm_series_stats merged = a1;
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < MM_REDIS_NMETRICS; i++)
            *mm_redis_metric_slot(&merged, i) += *mm_redis_metric_slot(&a2, i);
    ASSERT_NEAR(num(va, "latency_p50_ms"), mm_hist_quantile_ms(&merged.hist[MM_H_LATENCY], 0.5));
    ASSERT_NEAR(num(va, "ttft_p95_ms"), mm_hist_quantile_ms(&merged.hist[MM_H_TTFT], 0.95));
    ASSERT_TRUE(num(va, "ttft_p95_ms") > 100);   /* the 300 ms requests dominate */
    /* tokens/s: 550 tokens over 11.02 s of request time */
    ASSERT_NEAR(num(va, "tokens_per_s"), 550.0 / 11.02);
    ASSERT_NEAR(num(vb, "throughput_tokens_per_s"), 200.0 / 900);
    json_decref(doc);

    /* the table: sorted rows, the weight column, the parked variant */
    mm_buf_reset(&out);
    ASSERT_EQ(mm_stats_report_render(r, &w, 0, &out), 0);
    const char *t = mm_buf_cstr(&out);
    ASSERT_TRUE(strstr(t, "1 gateway(s) reporting") != NULL);
    ASSERT_CONTAINS(t, "MODEL");
    ASSERT_CONTAINS(t, "90.0% (90)");
    ASSERT_CONTAINS(t, "85.7%");           /* a's observed share */
    ASSERT_CONTAINS(t, "25.0%");           /* a's error rate */
    ASSERT_TRUE(strstr(t, "chat   a") < strstr(t, "chat   b"));
    ASSERT_CONTAINS(t, "5 hash fields did not follow the schema");
    mm_buf_free(&out);
    mm_stats_report_free(r);
}

TEST(report_default_pool_and_empty)
{
    mm_stats_report *r;
    mm_stats_window w = {"p", 1, 5, 5};
    mm_buf out;
    mm_buf_init(&out, 1 << 16);
    ASSERT_EQ(mm_stats_report_new(&r), 0);
    ASSERT_EQ(mm_stats_report_render(r, &w, 0, &out), 0);
    ASSERT_CONTAINS(mm_buf_cstr(&out), "no traffic recorded");
    mm_series_stats st = {0};
    observe(&st, 200, 5, 1, 0);
    ASSERT_EQ(feed_series(r, "", "pool", "", &st), 0);
    mm_buf_reset(&out);
    ASSERT_EQ(mm_stats_report_render(r, &w, 0, &out), 0);
    ASSERT_CONTAINS(mm_buf_cstr(&out), "(default)");
    ASSERT_CONTAINS(mm_buf_cstr(&out), "100.0%");
    mm_buf_reset(&out);
    ASSERT_EQ(mm_stats_report_render(r, &w, 1, &out), 0);
    json_t *doc = json_loads(out.data, 0, NULL);
    ASSERT_TRUE(doc != NULL);
    json_t *v = find_variant(doc, "", "pool");
    ASSERT_TRUE(v != NULL);
    ASSERT_TRUE(json_is_null(json_object_get(v, "weight")));
    ASSERT_TRUE(json_is_null(json_object_get(v, "tokens_per_s")) == 0);   /* 0 tokens / 5 ms = 0 */
    ASSERT_EQ(num(v, "tokens_per_s"), 0);
    json_decref(doc);
    mm_buf_free(&out);
    mm_stats_report_free(r);
}

/* ---- the command line ------------------------------------------------ */

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

TEST(stats_command_usage_and_unreachable)
{
    char url[64];
    int port = free_port();
    ASSERT_TRUE(port > 0);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", port);
    char *a1[] = {"stats", "--redis", url, NULL};
    ASSERT_EQ(mm_stats_main(3, a1), 1);                   /* nobody listens there */
    char *a2[] = {"stats", NULL};
    ASSERT_EQ(mm_stats_main(1, a2), 2);                   /* neither -c nor --redis */
    char *a3[] = {"stats", "--redis", url, "--minutes", "0", NULL};
    ASSERT_EQ(mm_stats_main(5, a3), 2);
    char *a4[] = {"stats", "--redis", "http://x", NULL};
    ASSERT_EQ(mm_stats_main(3, a4), 1);                   /* checked like redis.url */
    char *a5[] = {"stats", "--redis", url, "--bogus", NULL};
    ASSERT_EQ(mm_stats_main(4, a5), 2);
}

/* ---- live, against a private redis-server ---------------------------- */

typedef struct live {
    struct event_base *base;
    mm_metrics *m;
    uint64_t want_flushes;
    int timed_out;
} live;

static void live_check(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    live *l = arg;
    mm_metrics_sink_stats st;
    mm_metrics_get_sink(l->m, &st);
    if (st.redis_flushes >= l->want_flushes)
        event_base_loopbreak(l->base);
}

static void live_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    live *l = arg;
    l->timed_out = 1;
    event_base_loopbreak(l->base);
}

/* Run the loop until the sink has acknowledged `n` batches (or 10 s). */
static int run_until_flushes(live *l, uint64_t n)
{
    struct timeval poll = {0, 10000}, dl = {10, 0};
    struct event *p = event_new(l->base, -1, EV_PERSIST, live_check, l);
    struct event *d = evtimer_new(l->base, live_deadline, l);
    l->want_flushes = n;
    l->timed_out = 0;
    event_add(p, &poll);
    evtimer_add(d, &dl);
    event_base_dispatch(l->base);
    event_free(p);
    event_free(d);
    return l->timed_out ? -ETIMEDOUT : 0;
}

static pid_t start_redis(int port)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    pid_t pid = fork();
    if (pid == 0) {
        int nul = open("/dev/null", O_WRONLY);
        if (nul >= 0) {
            dup2(nul, 1);
            dup2(nul, 2);
        }
        execlp("redis-server", "redis-server", "--port", ps, "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no", (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Readiness: the server answers PING (a refused connect is retried). */
static redisContext *wait_redis(int port, pid_t pid)
{
    for (int i = 0; i < 500; i++) {
        struct timeval tv = {1, 0};
        redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            int ok = r && r->type == REDIS_REPLY_STATUS;
            freeReplyObject(r);
            if (ok)
                return c;
        }
        if (c)
            redisFree(c);
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return NULL;   /* it exited: not installed, or the port was taken */
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void record(mm_metrics *m, const char *variant, int status, int n)
{
    for (int i = 0; i < n; i++) {
        mm_request_record r = {
            .model = "chat", .variant = variant, .backend = "http://127.0.0.1:9",
            .status = status, .prompt_tokens = 7, .completion_tokens = 11,
            .latency_us = 250000, .ttft_us = 40000,
        };
        mm_metrics_record(m, &r);
    }
}

/* Sum requests per variant over every minute hash of prefix "t". */
static int read_back(redisContext *c, json_t **doc)
{
    mm_stats_report *rep;
    redisReply *keys = redisCommand(c, "KEYS t:v1:m:*");
    if (!keys || keys->type != REDIS_REPLY_ARRAY || mm_stats_report_new(&rep))
        return -1;
    for (size_t k = 0; k < keys->elements; k++) {
        redisReply *h = redisCommand(c, "HGETALL %s", keys->element[k]->str);
        for (size_t i = 0; h && i + 1 < h->elements; i += 2)
            mm_stats_report_add(rep, h->element[i]->str, h->element[i]->len, h->element[i + 1]->str,
                                h->element[i + 1]->len);
        freeReplyObject(h);
    }
    redisReply *wts = redisCommand(c, "HGETALL t:v1:weights");
    for (size_t i = 0; wts && i + 1 < wts->elements; i += 2)
        mm_stats_report_weight(rep, wts->element[i]->str, wts->element[i]->len, wts->element[i + 1]->str,
                               wts->element[i + 1]->len);
    freeReplyObject(wts);
    freeReplyObject(keys);
    mm_stats_window w = {"t", 60, 0, 0};
    mm_buf out;
    mm_buf_init(&out, 1 << 20);
    int rc = mm_stats_report_render(rep, &w, 1, &out);
    *doc = rc ? NULL : json_loads(out.data, 0, NULL);
    mm_buf_free(&out);
    mm_stats_report_free(rep);
    return *doc ? 0 : -1;
}

static json_int_t requests_of(json_t *doc, const char *variant)
{
    json_t *v = find_variant(doc, "chat", variant);
    return v ? json_integer_value(json_object_get(v, "requests")) : -1;
}

TEST(live_flush_and_final_flush)
{
    int port = free_port();
    ASSERT_TRUE(port > 0);
    pid_t pid = start_redis(port);
    ASSERT_TRUE(pid > 0);
    redisContext *c = wait_redis(port, pid);
    if (!c) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        printf("  (skipped: redis-server is not installed or did not start)\n");
        return;
    }
    live l = {0};
    l.base = event_base_new();
    mm_metrics_new(100, &l.m);
    mm_redis_cfg cfg = {.url = "redis://127.0.0.1", .host = "127.0.0.1", .port = port,
                        .flush_ms = 20, .prefix = "t", .ttl_s = 600};
    mm_redis_weight wv[] = {{"chat", "a", 3}, {"chat", "b", 1}};
    mm_redis_weights ws = {wv, 2};
    mm_redis_sink *s = NULL;
    char err[128];
    int ok = mm_redis_sink_start(l.base, &cfg, l.m, "gw-unit", &ws, &s, err, sizeof err) == 0 && s;
    json_t *doc = NULL;
    json_int_t ra = -2, rb = -2, ra2 = -2, rb2 = -2, wa = -2;
    int flushed = -1, final = -1;
    if (ok) {
        record(l.m, "a", 200, 30);
        record(l.m, "b", 503, 10);
        flushed = run_until_flushes(&l, 2);   /* the second batch saw everything */
        if (read_back(c, &doc) == 0) {
            ra = requests_of(doc, "a");
            rb = requests_of(doc, "b");
            wa = json_integer_value(json_object_get(find_variant(doc, "chat", "a"), "weight"));
            json_decref(doc);
        }
        /* Counts recorded after the loop stopped go out with the final
         * flush; a second final flush has nothing left to add. */
        record(l.m, "a", 200, 5);
        final = mm_redis_sink_final_flush(s, 2000);
        if (final == 0)
            final = mm_redis_sink_final_flush(s, 2000);
        if (read_back(c, &doc) == 0) {
            ra2 = requests_of(doc, "a");
            rb2 = requests_of(doc, "b");
            json_decref(doc);
        }
    }
    mm_redis_sink_free(s);
    mm_metrics_free(l.m);
    event_base_free(l.base);
    redisFree(c);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    ASSERT_TRUE(ok);
    ASSERT_EQ(flushed, 0);
    ASSERT_EQ(ra, 30);
    ASSERT_EQ(rb, 10);
    ASSERT_EQ(wa, 3);
    ASSERT_EQ(final, 0);
    ASSERT_EQ(ra2, 35);
    ASSERT_EQ(rb2, 10);
}

TEST(no_redis_configured_starts_nothing)
{
    struct event_base *base = event_base_new();
    mm_metrics *m;
    mm_metrics_new(10, &m);
    mm_redis_cfg cfg = {0};
    mm_redis_sink *s = (mm_redis_sink *)&cfg;
    char err[64];
    ASSERT_EQ(mm_redis_sink_start(base, &cfg, m, "gw", NULL, &s, err, sizeof err), 0);
    ASSERT_TRUE(s == NULL);
    mm_metrics_sink_stats st;
    mm_metrics_get_sink(m, &st);
    ASSERT_EQ(st.redis_configured, 0);
    ASSERT_EQ(mm_redis_sink_final_flush(NULL, 10), 0);
    mm_redis_sink_free(NULL);
    mm_metrics_free(m);
    event_base_free(base);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads();
    RUN(metric_names_round_trip);
    RUN(metric_names_are_the_documented_ones);
    RUN(metric_slots_cover_the_struct);
    RUN(field_format_and_sanitising);
    RUN(weights_from_config);
    RUN(report_merges_backends_minutes_and_computes_figures);
    RUN(report_default_pool_and_empty);
    RUN(stats_command_usage_and_unreachable);
    RUN(no_redis_configured_starts_nothing);
    RUN(live_flush_and_final_flush);
    return test_summary();
}
