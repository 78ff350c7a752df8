/* test_config.c: loading and validating the gateway config (gateway/config.c).
 * Run from the repository root: fixtures are read from tests/fixtures/config. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "config.h"
#include "test.h"

#define FIX "tests/fixtures/config/"

static char err[1024];

/* Test JSON is written with ' for " so it stays readable in C strings. */
static char *q(const char *s)
{
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    for (size_t i = 0; i <= n; i++)
        p[i] = s[i] == '\'' ? '"' : s[i];
    return p;
}

static int load_q(const char *s, mm_gateway_cfg **out)
{
    char *j = q(s);
    int rc;
    err[0] = '\0';
    rc = mm_config_load_string(j, out, err, sizeof err);
    free(j);
    return rc;
}

/* The config must fail with -EINVAL, *out NULL, and err must begin with
 * "PATH: " and contain REASON. */
#define EXPECT_ERR(json, path, reason)                                      \
    do {                                                                    \
        mm_gateway_cfg *c_ = (mm_gateway_cfg *)1;                           \
        int rc_ = load_q(json, &c_);                                        \
        ASSERT_EQ(rc_, -EINVAL);                                            \
        ASSERT_TRUE(c_ == NULL);                                            \
        ASSERT_CONTAINS(err, path ": ");                                    \
        if (strncmp(err, path ": ", strlen(path ": ")) != 0) {              \
            TEST_FAIL_("\"%s\" does not start with \"%s: \"", err, path);  \
            return;                                                         \
        }                                                                   \
        ASSERT_CONTAINS(err, reason);                                       \
    } while (0)

/* One valid model, to surround the piece under test. */
#define MA "{'name':'a','backends':[{'url':'http://127.0.0.1:9001'}]}"
#define MB "{'name':'b','backends':[{'url':'http://127.0.0.1:9002'}]}"

static const char *contract =
    "{\"listen\": \"127.0.0.1:8000\", \"threads\": 2,\n"
    " \"models\": [\n"
    "   {\"name\": \"qwen-14b\", \"strategy\": \"round_robin\",\n"
    "    \"backends\": [{\"url\": \"http://127.0.0.1:8001\", \"weight\": 1},\n"
    "                 {\"url\": \"http://127.0.0.1:8002\", \"weight\": 3, \"served_model\": "
    "\"DeepSeek-R1-Distill-Qwen-14B\"}]},\n"
    "   {\"name\": \"qwen-32b\", \"backends\": [{\"url\": \"http://127.0.0.1:8003\"}]},\n"
    "   {\"name\": \"chat\", \"split\": [{\"model\": \"qwen-14b\", \"weight\": 90}, "
    "{\"model\": \"qwen-32b\", \"weight\": 10}],\n"
    "    \"sticky\": \"header:x-user-id\"}],\n"
    " \"default_pool\": {\"strategy\": \"round_robin\", \"backends\": [{\"url\": "
    "\"http://127.0.0.1:8001\"}]}}";

/* Everything the contract example says, and the defaults of what it omits. */
static int check_contract(const mm_gateway_cfg *c)
{
    const mm_model_cfg *m;
#define CHK(cond) do { if (!(cond)) { TEST_FAIL_("contract: %s", #cond); return 0; } } while (0)
    CHK(c->listen_host && strcmp(c->listen_host, "127.0.0.1") == 0);
    CHK(c->listen_port == 8000);
    CHK(c->threads == 2);
    CHK(c->admin_host == NULL && c->admin_port == 0);
    CHK(c->nmodels == 3);

    m = &c->models[0];
    CHK(strcmp(m->name, "qwen-14b") == 0);
    CHK(m->strategy == MM_STRATEGY_ROUND_ROBIN);
    CHK(m->nbackends == 2 && m->nsplit == 0 && m->sticky_kind == MM_STICKY_NONE);
    CHK(strcmp(m->backends[0].url, "http://127.0.0.1:8001") == 0);
    CHK(strcmp(m->backends[0].host, "127.0.0.1") == 0 && m->backends[0].port == 8001);
    CHK(m->backends[0].weight == 1 && m->backends[0].served_model == NULL);
    CHK(m->backends[0].api_key == NULL && m->backends[0].launch == NULL);
    CHK(strcmp(m->backends[1].url, "http://127.0.0.1:8002") == 0 && m->backends[1].port == 8002);
    CHK(m->backends[1].weight == 3);
    CHK(strcmp(m->backends[1].served_model, "DeepSeek-R1-Distill-Qwen-14B") == 0);

    m = &c->models[1];
    CHK(strcmp(m->name, "qwen-32b") == 0 && m->nbackends == 1);
    CHK(m->backends[0].weight == 1 && m->backends[0].port == 8003);

    m = &c->models[2];
    CHK(strcmp(m->name, "chat") == 0 && m->nbackends == 0 && m->nsplit == 2);
    CHK(strcmp(m->split[0].model, "qwen-14b") == 0 && m->split[0].weight == 90);
    CHK(strcmp(m->split[1].model, "qwen-32b") == 0 && m->split[1].weight == 10);
    CHK(m->sticky_kind == MM_STICKY_HEADER && strcmp(m->sticky_key, "x-user-id") == 0);
    CHK(m->nfallback == 0);

    CHK(c->default_pool != NULL);
    CHK(strcmp(c->default_pool->name, "") == 0);
    CHK(c->default_pool->strategy == MM_STRATEGY_ROUND_ROBIN);
    CHK(c->default_pool->nbackends == 1 && c->default_pool->backends[0].port == 8001);
    CHK(c->redis.url == NULL);
#undef CHK
    return 1;
}

TEST(contract_example_loads)
{
    mm_gateway_cfg *c = NULL;
    int rc = mm_config_load_string(contract, &c, err, sizeof err);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_TRUE(c != NULL);
    ASSERT_TRUE(check_contract(c));
    ASSERT_TRUE(mm_config_find_model(c, "chat") == &c->models[2]);
    ASSERT_TRUE(mm_config_find_model(c, "qwen-32b") == &c->models[1]);
    ASSERT_TRUE(mm_config_find_model(c, "qwen-99") == NULL);
    ASSERT_TRUE(mm_config_find_model(c, "") == NULL);   /* the default pool is not a model */
    mm_config_free(c);
}

TEST(fixture_file_valid)
{
    mm_gateway_cfg *c = NULL;
    int rc = mm_config_load_file(FIX "valid.json", &c, err, sizeof err);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_TRUE(check_contract(c));
    mm_config_free(c);
}

TEST(builtin_defaults)
{
    mm_gateway_cfg *c = NULL;
    const mm_model_cfg *m;
    ASSERT_EQ(load_q("{'models':[" MA "]}", &c), 0);
    ASSERT_STR_EQ(c->listen_host, "127.0.0.1");
    ASSERT_EQ(c->listen_port, 8000);
    ASSERT_TRUE(c->admin_host == NULL);
    ASSERT_EQ(c->admin_port, 0);
    ASSERT_TRUE(c->admin_token == NULL);
    ASSERT_EQ(c->threads, 0);
    ASSERT_EQ(c->max_body_bytes, 16 << 20);
    ASSERT_EQ(c->max_header_bytes, 64 << 10);
    ASSERT_EQ(c->max_response_bytes, 64 << 20);
    ASSERT_EQ(c->client_timeout_ms, 60000);
    ASSERT_TRUE(c->access_log == NULL);
    ASSERT_EQ(c->shutdown_grace_ms, 30000);
    ASSERT_TRUE(c->default_pool == NULL);
    ASSERT_TRUE(c->redis.url == NULL);
    ASSERT_STR_EQ(c->redis.prefix, "modelmux");
    ASSERT_EQ(c->redis.flush_ms, 1000);
    ASSERT_EQ(c->redis.ttl_s, 86400);

    m = &c->models[0];
    ASSERT_EQ(m->strategy, MM_STRATEGY_ROUND_ROBIN);
    ASSERT_EQ(m->timeouts.connect_ms, 5000);
    ASSERT_EQ(m->timeouts.first_byte_ms, 300000);
    ASSERT_EQ(m->timeouts.idle_ms, 120000);
    ASSERT_EQ(m->timeouts.total_ms, 0);
    ASSERT_EQ(m->health.enabled, 1);
    ASSERT_STR_EQ(m->health.path, "/health");
    ASSERT_EQ(m->health.interval_ms, 2000);
    ASSERT_EQ(m->health.timeout_ms, 1000);
    ASSERT_EQ(m->health.rise, 2);
    ASSERT_EQ(m->health.fall, 3);
    ASSERT_EQ(m->breaker.consecutive_failures, 5);
    ASSERT_TRUE(m->breaker.error_rate == 0.5);
    ASSERT_EQ(m->breaker.window_ms, 10000);
    ASSERT_EQ(m->breaker.min_requests, 20);
    ASSERT_EQ(m->breaker.open_ms, 10000);
    ASSERT_EQ(m->breaker.max_open_ms, 300000);
    ASSERT_EQ(m->breaker.half_open_requests, 1);
    ASSERT_EQ(m->breaker.max_ejection_percent, 50);
    ASSERT_EQ(m->retries, 2);
    ASSERT_EQ(m->max_requests, 0);
    ASSERT_EQ(m->max_queue, 0);
    ASSERT_EQ(m->queue_timeout_ms, 30000);
    ASSERT_EQ(m->backends[0].weight, 1);
    ASSERT_EQ(m->backends[0].timeouts.connect_ms, 5000);
    ASSERT_EQ(m->backends[0].timeouts.first_byte_ms, 300000);
    ASSERT_EQ(m->backends[0].max_requests, 0);
    mm_config_free(c);
}

/* built-in < "defaults" < model, per key; backend timeouts over the model's
 * per key; backend max_requests inherits the model's. */
TEST(defaults_precedence)
{
    mm_gateway_cfg *c = NULL;
    const mm_model_cfg *a, *b, *p;
    int rc = load_q(
        "{'defaults':{'strategy':'random','retries':5,'max_requests':7,"
        "             'timeouts':{'connect_ms':100,'idle_ms':200},"
        "             'health':{'interval_ms':50},'breaker':{'error_rate':0.9}},"
        " 'models':["
        "  {'name':'a','strategy':'least_outstanding','timeouts':{'idle_ms':300},"
        "   'health':{'rise':4},"
        "   'backends':[{'url':'http://h1:1','timeouts':{'connect_ms':9},'max_requests':3},"
        "               {'url':'http://h2:2'}]},"
        "  {'name':'b','retries':0,'backends':[{'url':'http://h3:3'}]}],"
        " 'default_pool':{'backends':[{'url':'http://h4:4'}]}}", &c);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    a = &c->models[0];
    b = &c->models[1];
    p = c->default_pool;
    ASSERT_EQ(a->strategy, MM_STRATEGY_LEAST_OUTSTANDING);   /* model wins */
    ASSERT_EQ(b->strategy, MM_STRATEGY_RANDOM);              /* from defaults */
    ASSERT_EQ(p->strategy, MM_STRATEGY_RANDOM);              /* pool too */
    ASSERT_EQ(a->retries, 5);
    ASSERT_EQ(b->retries, 0);
    ASSERT_EQ(a->timeouts.connect_ms, 100);                  /* defaults */
    ASSERT_EQ(a->timeouts.idle_ms, 300);                     /* model, per key */
    ASSERT_EQ(a->timeouts.first_byte_ms, 300000);            /* built-in */
    ASSERT_EQ(b->timeouts.idle_ms, 200);
    ASSERT_EQ(a->health.interval_ms, 50);
    ASSERT_EQ(a->health.rise, 4);
    ASSERT_EQ(b->health.rise, 2);
    ASSERT_STR_EQ(b->health.path, "/health");
    ASSERT_TRUE(a->breaker.error_rate == 0.9);
    ASSERT_EQ(a->breaker.window_ms, 10000);
    /* backend over model over defaults */
    ASSERT_EQ(a->backends[0].timeouts.connect_ms, 9);
    ASSERT_EQ(a->backends[0].timeouts.idle_ms, 300);
    ASSERT_EQ(a->backends[1].timeouts.connect_ms, 100);
    ASSERT_EQ(a->backends[0].max_requests, 3);
    ASSERT_EQ(a->backends[1].max_requests, 7);
    ASSERT_EQ(b->backends[0].max_requests, 7);
    ASSERT_EQ(p->backends[0].max_requests, 7);
    mm_config_free(c);
}

TEST(health_toggle)
{
    mm_gateway_cfg *c = NULL;
    ASSERT_EQ(load_q("{'defaults':{'health':false},'models':["
                     "{'name':'a','backends':[{'url':'http://h:1'}]},"
                     "{'name':'b','health':{'path':'/ready'},'backends':[{'url':'http://h:2'}]},"
                     "{'name':'c','health':true,'backends':[{'url':'http://h:3'}]},"
                     "{'name':'d','health':{'enabled':false,'fall':9},'backends':[{'url':'http://h:4'}]}]}",
                     &c), 0);
    ASSERT_EQ(c->models[0].health.enabled, 0);
    ASSERT_EQ(c->models[1].health.enabled, 1);
    ASSERT_STR_EQ(c->models[1].health.path, "/ready");
    ASSERT_EQ(c->models[2].health.enabled, 1);
    ASSERT_STR_EQ(c->models[2].health.path, "/health");
    ASSERT_EQ(c->models[3].health.enabled, 0);
    ASSERT_EQ(c->models[3].health.fall, 9);
    mm_config_free(c);
}

TEST(full_fixture)
{
    mm_gateway_cfg *c = NULL;
    const mm_model_cfg *m;
    const mm_backend_cfg *b;
    int rc = mm_config_load_file(FIX "full.json", &c, err, sizeof err);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_STR_EQ(c->listen_host, "::1");
    ASSERT_EQ(c->listen_port, 8100);
    ASSERT_STR_EQ(c->admin_host, "0.0.0.0");
    ASSERT_EQ(c->admin_port, 8101);
    ASSERT_STR_EQ(c->admin_token, "s3cret-token");
    ASSERT_EQ(c->threads, 0);
    ASSERT_EQ(c->max_body_bytes, 1048576);
    ASSERT_EQ(c->max_header_bytes, 16384);
    ASSERT_EQ(c->max_response_bytes, 2097152);
    ASSERT_EQ(c->client_timeout_ms, 15000);
    ASSERT_STR_EQ(c->access_log, "-");
    ASSERT_EQ(c->shutdown_grace_ms, 5000);
    ASSERT_EQ(c->nmodels, 3);

    m = &c->models[0];
    ASSERT_STR_EQ(m->name, "local-qwen");
    ASSERT_EQ(m->strategy, MM_STRATEGY_RANDOM);
    ASSERT_EQ(m->timeouts.connect_ms, 1000);
    ASSERT_EQ(m->timeouts.first_byte_ms, 60000);
    ASSERT_EQ(m->timeouts.idle_ms, 45000);
    ASSERT_STR_EQ(m->health.path, "/v1/models");
    ASSERT_EQ(m->health.interval_ms, 500);
    ASSERT_EQ(m->health.timeout_ms, 250);
    ASSERT_EQ(m->health.rise, 1);
    ASSERT_EQ(m->health.fall, 2);
    ASSERT_EQ(m->breaker.consecutive_failures, 3);
    ASSERT_TRUE(m->breaker.error_rate == 0.25);
    ASSERT_EQ(m->breaker.window_ms, 5000);
    ASSERT_EQ(m->breaker.min_requests, 10);
    ASSERT_EQ(m->breaker.open_ms, 2000);
    ASSERT_EQ(m->breaker.max_open_ms, 60000);
    ASSERT_EQ(m->breaker.half_open_requests, 2);
    ASSERT_EQ(m->breaker.max_ejection_percent, 34);
    ASSERT_EQ(m->retries, 3);
    ASSERT_EQ(m->max_requests, 64);
    ASSERT_EQ(m->max_queue, 128);
    ASSERT_EQ(m->queue_timeout_ms, 10000);
    ASSERT_EQ(m->nfallback, 1);
    ASSERT_STR_EQ(m->fallback[0], "remote");
    ASSERT_EQ(m->nbackends, 2);

    b = &m->backends[0];   /* launch only: url from launch.port */
    ASSERT_STR_EQ(b->url, "http://127.0.0.1:9001");
    ASSERT_STR_EQ(b->host, "127.0.0.1");
    ASSERT_EQ(b->port, 9001);
    ASSERT_TRUE(b->launch != NULL);
    ASSERT_STR_EQ(b->launch->model, "/models/qwen2.5-7b");
    ASSERT_STR_EQ(b->launch->gpus, "0,1");
    ASSERT_STR_EQ(b->launch->device, "cuda");
    ASSERT_EQ(b->launch->port, 9001);
    ASSERT_EQ(b->launch->nargs, 2);
    ASSERT_STR_EQ(b->launch->args[0], "--max-num-seqs");
    ASSERT_STR_EQ(b->launch->args[1], "64");
    ASSERT_EQ(b->launch->ncommand, 0);
    ASSERT_EQ(b->launch->share_gpus, 1);
    ASSERT_EQ(b->launch->startup_timeout_ms, 120000);
    ASSERT_EQ(b->timeouts.idle_ms, 45000);
    ASSERT_EQ(b->max_requests, 64);

    b = &m->backends[1];   /* https, path prefix, trailing slash dropped */
    ASSERT_STR_EQ(b->url, "https://gpu-2.internal:9443/base");
    ASSERT_STR_EQ(b->host, "gpu-2.internal");
    ASSERT_EQ(b->port, 9443);
    ASSERT_EQ(b->weight, 2);
    ASSERT_STR_EQ(b->api_key, "k-123");
    ASSERT_EQ(b->timeouts.connect_ms, 250);
    ASSERT_EQ(b->timeouts.first_byte_ms, 60000);
    ASSERT_EQ(b->max_requests, 8);
    ASSERT_EQ(b->launch->port, 9443);   /* from the url */
    ASSERT_TRUE(b->launch->model == NULL);
    ASSERT_EQ(b->launch->ncommand, 2);
    ASSERT_STR_EQ(b->launch->command[0], "/opt/bin/worker");
    ASSERT_EQ(b->launch->startup_timeout_ms, 600000);

    m = &c->models[1];
    ASSERT_STR_EQ(m->name, "remote");
    ASSERT_EQ(m->health.enabled, 0);
    ASSERT_EQ(m->max_requests, 0);
    ASSERT_EQ(m->strategy, MM_STRATEGY_LEAST_OUTSTANDING);
    ASSERT_STR_EQ(m->backends[0].host, "fd00::2");
    ASSERT_EQ(m->backends[0].port, 8080);
    ASSERT_STR_EQ(m->backends[0].url, "http://[fd00::2]:8080/v1-proxy");
    ASSERT_STR_EQ(m->backends[0].served_model, "gpt-x");

    m = &c->models[2];
    ASSERT_EQ(m->nsplit, 2);
    ASSERT_EQ(m->split[1].weight, 1);   /* default */
    ASSERT_EQ(m->sticky_kind, MM_STICKY_BODY);
    ASSERT_STR_EQ(m->sticky_key, "user");

    ASSERT_EQ(c->default_pool->retries, 0);
    ASSERT_EQ(c->default_pool->strategy, MM_STRATEGY_ROUND_ROBIN);
    ASSERT_STR_EQ(c->default_pool->backends[0].host, "localhost");
    ASSERT_EQ(c->default_pool->backends[0].port, 80);

    ASSERT_STR_EQ(c->redis.url, "redis://app:p%40ss@redis.local:6380/3");
    ASSERT_STR_EQ(c->redis.host, "redis.local");
    ASSERT_EQ(c->redis.port, 6380);
    ASSERT_EQ(c->redis.db, 3);
    ASSERT_STR_EQ(c->redis.username, "app");
    ASSERT_STR_EQ(c->redis.password, "p@ss");
    ASSERT_EQ(c->redis.flush_ms, 250);
    ASSERT_STR_EQ(c->redis.prefix, "mmx");
    ASSERT_EQ(c->redis.ttl_s, 3600);
    mm_config_free(c);
}

TEST(listen_forms)
{
    static const struct { const char *in; const char *host; int port; } ok[] = {
        { "127.0.0.1:8000", "127.0.0.1", 8000 },
        { "[::1]:9000", "::1", 9000 },
        { "[::]:80", "::", 80 },
        { ":8080", "0.0.0.0", 8080 },
        { "8081", "0.0.0.0", 8081 },
        { "localhost:1", "localhost", 1 },
        { "127.0.0.1:0", "127.0.0.1", 0 },
    };
    char json[256];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        mm_gateway_cfg *c = NULL;
        snprintf(json, sizeof json, "{'listen':'%s','models':[" MA "]}", ok[i].in);
        int rc = load_q(json, &c);
        if (rc)
            TEST_FAIL_("%s: %s", ok[i].in, err);
        ASSERT_EQ(rc, 0);
        ASSERT_STR_EQ(c->listen_host, ok[i].host);
        ASSERT_EQ(c->listen_port, ok[i].port);
        mm_config_free(c);
    }
    EXPECT_ERR("{'listen':'::1:8000','models':[" MA "]}", "listen", "needs brackets");
    EXPECT_ERR("{'listen':'host','models':[" MA "]}", "listen", "missing \":port\"");
    EXPECT_ERR("{'listen':'h:70000','models':[" MA "]}", "listen", "bad port");
    EXPECT_ERR("{'listen':'1.2.3.999:80','models':[" MA "]}", "listen", "bad host name");
    EXPECT_ERR("{'listen':'[::g]:80','models':[" MA "]}", "listen", "bad IPv6");
    EXPECT_ERR("{'listen':8000,'models':[" MA "]}", "listen", "expected a string, got 8000");
    EXPECT_ERR("{'admin_listen':'127.0.0.1:0','models':[" MA "]}", "admin_listen", "bad port");
}

TEST(admin_rules)
{
    mm_gateway_cfg *c = NULL;
    ASSERT_EQ(load_q("{'admin_listen':'127.0.0.1:8001','models':[" MA "]}", &c), 0);
    ASSERT_STR_EQ(c->admin_host, "127.0.0.1");
    ASSERT_EQ(c->admin_port, 8001);
    mm_config_free(c);
    EXPECT_ERR("{'admin_listen':'0.0.0.0:8001','models':[" MA "]}", "admin_token",
               "not a loopback address");
    EXPECT_ERR("{'listen':'0.0.0.0:8000','admin_listen':'127.0.0.1:8000','models':[" MA "]}",
               "admin_listen", "already taken");
}

TEST(threads_values)
{
    mm_gateway_cfg *c = NULL;
    ASSERT_EQ(load_q("{'threads':'auto','models':[" MA "]}", &c), 0);
    ASSERT_EQ(c->threads, 0);
    mm_config_free(c);
    ASSERT_EQ(load_q("{'threads':256,'models':[" MA "]}", &c), 0);
    ASSERT_EQ(c->threads, 256);
    mm_config_free(c);
    EXPECT_ERR("{'threads':0,'models':[" MA "]}", "threads", "1..256 or \"auto\", got 0");
    EXPECT_ERR("{'threads':257,'models':[" MA "]}", "threads", "got 257");
    EXPECT_ERR("{'threads':'many','models':[" MA "]}", "threads", "got \"many\"");
    EXPECT_ERR("{'threads':2.5,'models':[" MA "]}", "threads", "got 2.5");
}

TEST(error_paths_values)
{
    EXPECT_ERR("{'models':[" MA ",{'name':'b','backends':[{'url':'http://h:1','weight':-3}]}]}",
               "models[1].backends[0].weight", "expected an integer >= 0, got -3");
    EXPECT_ERR("{'models':[{'name':'a','strategy':'fastest','backends':[{'url':'http://h:1'}]}]}",
               "models[0].strategy",
               "unknown value \"fastest\" (expected round_robin, random, least_outstanding)");
    EXPECT_ERR("{'models':[{'name':'a','retries':11,'backends':[{'url':'http://h:1'}]}]}",
               "models[0].retries", "expected an integer <= 10, got 11");
    EXPECT_ERR("{'models':[{'name':'a','retries':'2','backends':[{'url':'http://h:1'}]}]}",
               "models[0].retries", "expected an integer in 0..10, got \"2\"");
    EXPECT_ERR("{'models':[{'name':'a','timeouts':{'idle_ms':86400001},"
               "'backends':[{'url':'http://h:1'}]}]}",
               "models[0].timeouts.idle_ms", "<= 86400000");
    EXPECT_ERR("{'models':[{'name':'a','health':{'interval_ms':5},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].health.interval_ms", ">= 10, got 5");
    EXPECT_ERR("{'models':[{'name':'a','health':{'rise':0},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].health.rise", ">= 1, got 0");
    EXPECT_ERR("{'models':[{'name':'a','health':{'path':'health'},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].health.path", "must start with \"/\"");
    EXPECT_ERR("{'models':[{'name':'a','health':'yes','backends':[{'url':'http://h:1'}]}]}",
               "models[0].health", "expected an object, true or false");
    EXPECT_ERR("{'models':[{'name':'a','breaker':{'error_rate':0},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].breaker.error_rate", "expected a number in (0, 1], got 0");
    EXPECT_ERR("{'models':[{'name':'a','breaker':{'error_rate':1.5},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].breaker.error_rate", "got 1.5");
    EXPECT_ERR("{'models':[{'name':'a','breaker':{'max_ejection_percent':101},"
               "'backends':[{'url':'http://h:1'}]}]}",
               "models[0].breaker.max_ejection_percent", "<= 100");
    EXPECT_ERR("{'models':[{'name':'a','breaker':{'open_ms':5000,'max_open_ms':1000},"
               "'backends':[{'url':'http://h:1'}]}]}",
               "models[0].breaker.max_open_ms", "must be >= open_ms (5000), got 1000");
    EXPECT_ERR("{'max_body_bytes':0,'models':[" MA "]}", "max_body_bytes", ">= 1, got 0");
    EXPECT_ERR("{'max_body_bytes':1073741825,'models':[" MA "]}", "max_body_bytes",
               "<= 1073741824");
    EXPECT_ERR("{'max_header_bytes':1023,'models':[" MA "]}", "max_header_bytes", ">= 1024");
    EXPECT_ERR("{'client_timeout_ms':-1,'models':[" MA "]}", "client_timeout_ms", "got -1");
    EXPECT_ERR("{'access_log':'','models':[" MA "]}", "access_log", "must not be empty");
    EXPECT_ERR("{'defaults':{'retries':-1},'models':[" MA "]}", "defaults.retries", "got -1");
    EXPECT_ERR("{'redis':{'flush_ms':1},'models':[" MA "]}", "redis.flush_ms", ">= 10");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1','api_key':'a\\nb'}]}]}",
               "models[0].backends[0].api_key", "control characters");
    EXPECT_ERR("{'models':[{'name':'a','max_queue':null,'backends':[{'url':'http://h:1'}]}]}",
               "models[0].max_queue", "got null");
}

TEST(error_paths_unknown_keys)
{
    mm_gateway_cfg *c = (mm_gateway_cfg *)1;
    int rc = mm_config_load_file(FIX "unknown_key.json", &c, err, sizeof err);
    ASSERT_EQ(rc, -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, FIX "unknown_key.json: models[2]: unknown key \"backend\"");
    ASSERT_CONTAINS(err, "did you mean \"backends\"");

    EXPECT_ERR("{'models':[" MA "],'colour':1}", "(top level)", "unknown key \"colour\"");
    EXPECT_ERR("{'models':[{'name':'a','timeouts':{'conect_ms':1},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].timeouts", "unknown key \"conect_ms\" (did you mean \"connect_ms\"?)");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1','zzz':1}]}]}",
               "models[0].backends[0]", "unknown key \"zzz\" (expected one of: launch, url,");
    EXPECT_ERR("{'models':[{'name':'a','health':{'uri':'/'},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].health", "unknown key \"uri\"");
    EXPECT_ERR("{'models':[{'name':'a','breaker':{'x':1},'backends':[{'url':'http://h:1'}]}]}",
               "models[0].breaker", "unknown key \"x\"");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':1,'gpu':'0'}}]}]}",
               "models[0].backends[0].launch", "unknown key \"gpu\" (did you mean \"gpus\"?)");
    EXPECT_ERR("{'models':[" MA "," MB ",{'name':'s','split':[{'model':'a','weigth':1}]}]}",
               "models[2].split[0]", "unknown key \"weigth\"");
    EXPECT_ERR("{'redis':{'host':'x'},'models':[" MA "]}", "redis", "unknown key \"host\"");
    /* keys known elsewhere but not allowed in this place */
    EXPECT_ERR("{'defaults':{'fallback':['a']},'models':[" MA "]}", "defaults",
               "key \"fallback\" is not allowed in \"defaults\"");
    EXPECT_ERR("{'defaults':{'backends':[]},'models':[" MA "]}", "defaults",
               "key \"backends\" is not allowed in \"defaults\"");
    EXPECT_ERR("{'default_pool':{'name':'x','backends':[{'url':'http://h:1'}]}}", "default_pool",
               "key \"name\" is not allowed in \"default_pool\"");
    EXPECT_ERR("{'default_pool':{'sticky':'body:u','backends':[{'url':'http://h:1'}]}}",
               "default_pool", "key \"sticky\" is not allowed");
    EXPECT_ERR("{'default_pool':{'fallback':['a'],'backends':[{'url':'http://h:1'}]},'models':[" MA "]}",
               "default_pool", "key \"fallback\" is not allowed");
}

TEST(error_paths_models)
{
    EXPECT_ERR("{'models':[{'backends':[{'url':'http://h:1'}]}]}", "models[0].name",
               "required key is missing");
    EXPECT_ERR("{'models':[{'name':'','backends':[{'url':'http://h:1'}]}]}", "models[0].name",
               "must not be empty");
    EXPECT_ERR("{'models':[{'name':'a b','backends':[{'url':'http://h:1'}]}]}", "models[0].name",
               "whitespace");
    EXPECT_ERR("{'models':[" MA "," MB ",{'name':'a','backends':[{'url':'http://h:1'}]}]}",
               "models[2].name", "duplicate model name \"a\" (also models[0])");
    EXPECT_ERR("{'models':[{'name':'a'}]}", "models[0]", "needs \"backends\" or \"split\"");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','backends':[{'url':'http://h:1'}],"
               "'split':[{'model':'a'}]}]}", "models[1]", "cannot be used together");
    EXPECT_ERR("{'models':[{'name':'a','backends':[]}]}", "models[0].backends", "must not be empty");
    EXPECT_ERR("{'models':[{'name':'a','backends':{'url':'http://h:1'}}]}", "models[0].backends",
               "expected an array");
    EXPECT_ERR("{'models':[]}", "models", "at least one model");
    EXPECT_ERR("{}", "models", "at least one model");
    EXPECT_ERR("[]", "(top level)", "expected an object, got an array");
    EXPECT_ERR("{'models':[" MA ",{'name':'b','sticky':'header:x','backends':[{'url':'http://h:1'}]}]}",
               "models[1].sticky", "only allowed on a model with \"split\"");
    EXPECT_ERR("{'default_pool':{'strategy':'random'}}", "default_pool", "needs \"backends\"");
}

TEST(error_paths_backends)
{
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'weight':1}]}]}", "models[0].backends[0].url",
               "required key is missing");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'ftp://h:1'}]}]}",
               "models[0].backends[0].url", "unsupported scheme");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://:80'}]}]}",
               "models[0].backends[0].url", "empty host");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://'}]}]}",
               "models[0].backends[0].url", "empty host");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:0'}]}]}",
               "models[0].backends[0].url", "bad port");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:65536'}]}]}",
               "models[0].backends[0].url", "bad port");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:'}]}]}",
               "models[0].backends[0].url", "bad port");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:8x'}]}]}",
               "models[0].backends[0].url", "bad port");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://u:p@h:1'}]}]}",
               "models[0].backends[0].url", "credentials");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1/x?y=1'}]}]}",
               "models[0].backends[0].url", "query");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1','served_model':''}]}]}",
               "models[0].backends[0].served_model", "must not be empty");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m'}}]}]}",
               "models[0].backends[0].url", "\"launch\" needs a \"port\"");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'port':9001}}]}]}",
               "models[0].backends[0].launch", "needs \"model\"");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':9001,'gpus':'0,,1'}}]}]}",
               "models[0].backends[0].launch.gpus", "got \"0,,1\"");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':9001,'gpus':'1,1'}}]}]}",
               "models[0].backends[0].launch.gpus", "distinct");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':9001,'device':'tpu'}}]}]}",
               "models[0].backends[0].launch.device", "unknown value \"tpu\" (expected cpu, cuda)");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':9001,'args':['-x',3]}}]}]}",
               "models[0].backends[0].launch.args[1]", "expected a string, got 3");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'command':[],'port':9001}}]}]}",
               "models[0].backends[0].launch.command", "must not be empty");
}

TEST(url_forms)
{
    mm_gateway_cfg *c = NULL;
    int rc = load_q("{'models':[{'name':'a','backends':["
                    "{'url':'https://api.example.com'},"
                    "{'url':'HTTP://h:81/'},"
                    "{'url':'http://[::1]/a/b//'},"
                    "{'url':'http://10.0.0.1:8000/v1'}]}]}", &c);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_STR_EQ(c->models[0].backends[0].url, "https://api.example.com");
    ASSERT_EQ(c->models[0].backends[0].port, 443);
    ASSERT_STR_EQ(c->models[0].backends[1].url, "http://h:81");
    ASSERT_EQ(c->models[0].backends[1].port, 81);
    ASSERT_STR_EQ(c->models[0].backends[2].url, "http://[::1]/a/b");
    ASSERT_STR_EQ(c->models[0].backends[2].host, "::1");
    ASSERT_EQ(c->models[0].backends[2].port, 80);
    ASSERT_STR_EQ(c->models[0].backends[3].url, "http://10.0.0.1:8000/v1");
    mm_config_free(c);
}

TEST(split_checks)
{
    EXPECT_ERR("{'models':[" MA "," MB ",{'name':'s','split':[{'model':'a'},{'model':'qwen-99'}]}]}",
               "models[2].split[1].model", "no model named \"qwen-99\"");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'a'}]},"
               "{'name':'t','split':[{'model':'s'}]}]}",
               "models[2].split[0].model", "model \"s\" is itself a split");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'s'}]}]}",
               "models[1].split[0].model", "itself a split");
    EXPECT_ERR("{'models':[" MA "," MB ",{'name':'s','split':[{'model':'a'},{'model':'b'},{'model':'a'}]}]}",
               "models[2].split[2].model", "duplicate variant \"a\"");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'a','weight':-1}]}]}",
               "models[1].split[0].weight", ">= 0, got -1");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'weight':1}]}]}",
               "models[1].split[0].model", "required key is missing");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[]}]}", "models[1].split", "must not be empty");
}

TEST(sticky_forms)
{
    mm_gateway_cfg *c = NULL;
    ASSERT_EQ(load_q("{'models':[" MA ",{'name':'s','split':[{'model':'a'}],'sticky':'header:X-User-ID'},"
                     "{'name':'t','split':[{'model':'a'}],'sticky':'body:user'}]}", &c), 0);
    ASSERT_EQ(c->models[1].sticky_kind, MM_STICKY_HEADER);
    ASSERT_STR_EQ(c->models[1].sticky_key, "x-user-id");
    ASSERT_EQ(c->models[2].sticky_kind, MM_STICKY_BODY);
    ASSERT_STR_EQ(c->models[2].sticky_key, "user");
    mm_config_free(c);
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'a'}],'sticky':'header:x user'}]}",
               "models[1].sticky", "not a valid header name");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'a'}],'sticky':'header:'}]}",
               "models[1].sticky", "expected \"header:NAME\" or \"body:FIELD\"");
    EXPECT_ERR("{'models':[" MA ",{'name':'s','split':[{'model':'a'}],'sticky':'cookie:x'}]}",
               "models[1].sticky", "got \"cookie:x\"");
}

TEST(fallback_checks)
{
    mm_gateway_cfg *c = NULL;
    /* a chain (no cycle) and a diamond are fine */
    ASSERT_EQ(load_q("{'models':[{'name':'a','backends':[{'url':'http://h:1'}],'fallback':['b','c']},"
                     "{'name':'b','backends':[{'url':'http://h:2'}],'fallback':['c']},"
                     "{'name':'c','backends':[{'url':'http://h:3'}]}]}", &c), 0);
    ASSERT_EQ(c->models[0].nfallback, 2);
    ASSERT_STR_EQ(c->models[0].fallback[1], "c");
    mm_config_free(c);

    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1'}],'fallback':['b']},"
               "{'name':'b','backends':[{'url':'http://h:2'}],'fallback':['a']}]}",
               "models[1].fallback[0]", "fallback cycle: b -> a -> b");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1'}],'fallback':['zz']}]}",
               "models[0].fallback[0]", "no model named \"zz\"");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1'}],'fallback':['a']}]}",
               "models[0].fallback[0]", "cannot fall back to itself");
    EXPECT_ERR("{'models':[" MA "," MB ",{'name':'c','backends':[{'url':'http://h:1'}],"
               "'fallback':['a','b','a']}]}",
               "models[2].fallback[2]", "\"a\" is listed twice");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1'}],'fallback':'b'}]}",
               "models[0].fallback", "expected an array of strings");

    /* the three-model cycle from the fixture: every name on the path */
    c = (mm_gateway_cfg *)1;
    ASSERT_EQ(mm_config_load_file(FIX "fallback_cycle.json", &c, err, sizeof err), -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, "models[2].fallback[0]: fallback cycle: c -> a -> b -> c");
}

TEST(launch_checks)
{
    mm_gateway_cfg *c = (mm_gateway_cfg *)1;
    ASSERT_EQ(mm_config_load_file(FIX "gpu_overlap.json", &c, err, sizeof err), -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, "models[1].backends[0].launch.gpus: GPU 1 is also used by "
                         "models[0].backends[0]");
    ASSERT_CONTAINS(err, "share_gpus");

    /* only one side sharing is not enough; both sides is */
    EXPECT_ERR("{'models':[{'name':'a','backends':["
               "{'launch':{'model':'/m','gpus':'0','port':9001,'share_gpus':true}},"
               "{'launch':{'model':'/m','gpus':'3,0','port':9002}}]}]}",
               "models[0].backends[1].launch.gpus", "GPU 0 is also used by models[0].backends[0]");
    c = NULL;
    ASSERT_EQ(load_q("{'models':[{'name':'a','backends':["
                     "{'launch':{'model':'/m','gpus':'0','port':9001,'share_gpus':true}},"
                     "{'launch':{'model':'/m','gpus':'0','port':9002,'share_gpus':true}},"
                     "{'launch':{'model':'/m','gpus':'','port':9003}},"
                     "{'launch':{'model':'/m','port':9004}}]}],"
                     "'default_pool':{'backends':[{'launch':{'model':'/m','gpus':'1','port':9005}}]}}",
                     &c), 0);
    ASSERT_EQ(c->models[0].nbackends, 4);
    ASSERT_STR_EQ(c->models[0].backends[2].launch->gpus, "");
    ASSERT_TRUE(c->models[0].backends[3].launch->gpus == NULL);
    ASSERT_STR_EQ(c->models[0].backends[3].url, "http://127.0.0.1:9004");
    mm_config_free(c);

    EXPECT_ERR("{'models':[" MA "],'default_pool':{'backends':["
               "{'launch':{'model':'/m','gpus':'2','port':9001}},"
               "{'launch':{'model':'/m','gpus':'2','port':9002}}]}}",
               "default_pool.backends[1].launch.gpus", "GPU 2 is also used by default_pool.backends[0]");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'launch':{'model':'/m','port':9001}}]},"
               "{'name':'b','backends':[{'url':'http://127.0.0.1:9001','launch':{'model':'/n'}}]}]}",
               "models[1].backends[0].launch.port", "port 9001 is also used by models[0].backends[0]");
}

TEST(env_substitution)
{
    mm_gateway_cfg *c = NULL;
    int rc;
    setenv("MMTEST_KEY", "sk-abc", 1);
    setenv("MMTEST_HOST", "10.1.2.3", 1);
    setenv("MMTEST_EMPTY", "", 1);
    rc = load_q("{'listen':'${MMTEST_HOST}:7000','models':[{'name':'a','backends':["
                "{'url':'http://${MMTEST_HOST}:9001/p${MMTEST_EMPTY}','api_key':'Key ${MMTEST_KEY}!',"
                " 'served_model':'lit-$${X}-$$-$'}]}],"
                "'redis':{'prefix':'${MMTEST_KEY}${MMTEST_KEY}'}}", &c);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_STR_EQ(c->listen_host, "10.1.2.3");
    ASSERT_STR_EQ(c->models[0].backends[0].url, "http://10.1.2.3:9001/p");
    ASSERT_STR_EQ(c->models[0].backends[0].host, "10.1.2.3");
    ASSERT_STR_EQ(c->models[0].backends[0].api_key, "Key sk-abc!");
    ASSERT_STR_EQ(c->models[0].backends[0].served_model, "lit-${X}-$$-$");
    ASSERT_STR_EQ(c->redis.prefix, "sk-abcsk-abc");
    mm_config_free(c);

    unsetenv("MMTEST_UNSET");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1','api_key':'${MMTEST_UNSET}'}]}]}",
               "models[0].backends[0].api_key", "environment variable \"MMTEST_UNSET\" is not set");
    EXPECT_ERR("{'models':[{'name':'a','backends':[{'url':'http://h:1','launch':{'model':'/m',"
               "'args':['--x','${MMTEST_UNSET}']}}]}]}",
               "models[0].backends[0].launch.args[1]", "\"MMTEST_UNSET\" is not set");
    EXPECT_ERR("{'models':[" MA "],'access_log':'${MMTEST_KEY'}", "access_log", "unterminated \"${\"");
    EXPECT_ERR("{'models':[" MA "],'access_log':'${1X}'}", "access_log", "bad variable name");
    EXPECT_ERR("{'models':[" MA "],'access_log':'${}'}", "access_log", "bad variable name");
    /* the value is validated after expansion */
    EXPECT_ERR("{'models':[" MA "],'access_log':'${MMTEST_EMPTY}'}", "access_log", "must not be empty");

    /* expansion is capped: a 40000-byte value used twice passes 64 KiB */
    {
        char *big = malloc(40001);
        memset(big, 'x', 40000);
        big[40000] = '\0';
        setenv("MMTEST_BIG", big, 1);
        free(big);
        EXPECT_ERR("{'models':[" MA "],'access_log':'${MMTEST_BIG}${MMTEST_BIG}'}", "access_log",
                   "longer than 65536 bytes after ${} expansion");
        unsetenv("MMTEST_BIG");
    }
}

TEST(redis_urls)
{
    mm_gateway_cfg *c = NULL;
    ASSERT_EQ(load_q("{'models':[" MA "],'redis':{'url':'redis://127.0.0.1'}}", &c), 0);
    ASSERT_STR_EQ(c->redis.host, "127.0.0.1");
    ASSERT_EQ(c->redis.port, 6379);
    ASSERT_EQ(c->redis.db, 0);
    ASSERT_TRUE(c->redis.password == NULL && c->redis.username == NULL);
    mm_config_free(c);
    ASSERT_EQ(load_q("{'models':[" MA "],'redis':{'url':'redis://:pw@[::1]:7000/'}}", &c), 0);
    ASSERT_STR_EQ(c->redis.host, "::1");
    ASSERT_EQ(c->redis.port, 7000);
    ASSERT_TRUE(c->redis.username == NULL);
    ASSERT_STR_EQ(c->redis.password, "pw");
    mm_config_free(c);
    EXPECT_ERR("{'models':[" MA "],'redis':{'url':'http://h'}}", "redis.url", "redis://");
    EXPECT_ERR("{'models':[" MA "],'redis':{'url':'redis://pw@h'}}", "redis.url", "[user]:password@");
    EXPECT_ERR("{'models':[" MA "],'redis':{'url':'redis://:p%4@h'}}", "redis.url", "bad %-escape");
    EXPECT_ERR("{'models':[" MA "],'redis':{'url':'redis://h/x'}}", "redis.url", "bad database");
    EXPECT_ERR("{'models':[" MA "],'redis':{'url':'redis://h:99999'}}", "redis.url", "bad port");
    EXPECT_ERR("{'models':[" MA "],'redis':{'ttl_s':0}}", "redis.ttl_s", ">= 60");
}

TEST(json_syntax_error_line_column)
{
    mm_gateway_cfg *c = (mm_gateway_cfg *)1;
    int rc = mm_config_load_file(FIX "syntax_error.json", &c, err, sizeof err);
    ASSERT_EQ(rc, -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, FIX "syntax_error.json: line 3, column");
    c = (mm_gateway_cfg *)1;
    ASSERT_EQ(load_q("{'models':[" MA "], 'threads': 1, 'threads': 2}", &c), -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, "line 1, column");
    ASSERT_CONTAINS(err, "duplicate");
    ASSERT_EQ(load_q("{\n\n  'models': [,]}", &c), -EINVAL);
    ASSERT_CONTAINS(err, "line 3, column 14: ");
}

TEST(load_file_io)
{
    char path[] = "/tmp/mm_test_config_XXXXXX";
    mm_gateway_cfg *c = (mm_gateway_cfg *)1;
    int fd, rc;
    FILE *f;

    rc = mm_config_load_file("/nonexistent/dir/modelmux.json", &c, err, sizeof err);
    ASSERT_EQ(rc, -ENOENT);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, "/nonexistent/dir/modelmux.json");
    ASSERT_CONTAINS(err, "No such file");

    fd = mkstemp(path);
    ASSERT_TRUE(fd >= 0);
    f = fdopen(fd, "w");
    ASSERT_TRUE(f != NULL);
    fputs(contract, f);
    fclose(f);
    c = NULL;
    rc = mm_config_load_file(path, &c, err, sizeof err);
    if (rc)
        TEST_FAIL_("err: %s", err);
    ASSERT_EQ(rc, 0);
    ASSERT_TRUE(check_contract(c));
    mm_config_free(c);

    /* a bad file: the error names the file and then the JSON path */
    f = fopen(path, "w");
    ASSERT_TRUE(f != NULL);
    fputs("{\"models\": [{\"name\": \"a\", \"strategy\": \"fastest\", "
          "\"backends\": [{\"url\": \"http://h:1\"}]}]}", f);
    fclose(f);
    c = (mm_gateway_cfg *)1;
    rc = mm_config_load_file(path, &c, err, sizeof err);
    unlink(path);
    ASSERT_EQ(rc, -EINVAL);
    ASSERT_TRUE(c == NULL);
    ASSERT_CONTAINS(err, path);
    ASSERT_CONTAINS(err, ": models[0].strategy: unknown value \"fastest\"");

    c = (mm_gateway_cfg *)1;
    ASSERT_EQ(mm_config_load_file(FIX "bad_weight.json", &c, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "models[1].backends[0].weight: expected an integer >= 0, got -3");
}

TEST(free_null)
{
    mm_config_free(NULL);
    ASSERT_TRUE(mm_config_find_model(NULL, "x") == NULL);
}

/* Every weight 0 is a drained model (answered 503), not a config error. */
TEST(all_zero_weights_drain)
{
    char emsg[512] = "";
    mm_gateway_cfg *cfg = NULL;
    int rc = mm_config_load_string(
        "{\"models\":[{\"name\":\"a\",\"backends\":[{\"url\":\"http://h:1\",\"weight\":0}]},"
        "{\"name\":\"s\",\"split\":[{\"model\":\"a\",\"weight\":0}]}]}",
        &cfg, emsg, sizeof emsg);
    ASSERT_EQ(rc, 0);
    ASSERT_EQ(cfg->models[0].backends[0].weight, 0);
    ASSERT_EQ(cfg->models[1].split[0].weight, 0);
    mm_config_free(cfg);
}

int main(void)
{
    RUN(contract_example_loads);
    RUN(fixture_file_valid);
    RUN(builtin_defaults);
    RUN(defaults_precedence);
    RUN(health_toggle);
    RUN(full_fixture);
    RUN(listen_forms);
    RUN(admin_rules);
    RUN(threads_values);
    RUN(error_paths_values);
    RUN(error_paths_unknown_keys);
    RUN(error_paths_models);
    RUN(error_paths_backends);
    RUN(url_forms);
    RUN(split_checks);
    RUN(sticky_forms);
    RUN(fallback_checks);
    RUN(launch_checks);
    RUN(env_substitution);
    RUN(redis_urls);
    RUN(json_syntax_error_line_column);
    RUN(load_file_io);
    RUN(free_null);
    RUN(all_zero_weights_drain);
    return test_summary();
}
