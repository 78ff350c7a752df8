/* redis_sink.c: the metrics flush to Redis (see redis_sink.h and the key
 * schema in docs/METRICS.md).
 *
 * State machine, all on the sink's loop:
 *   IDLE --retry timer--> RESOLVING --(thread)--> CONNECTING --connect cb-->
 *   HANDSHAKE (AUTH, SELECT) --> READY --(tick)--> batch in flight --> READY
 * Any failure goes back to IDLE through conn_lost(), which schedules the
 * retry timer with backoff. One watchdog timer bounds every wait (resolve,
 * connect, handshake, batch): when it fires the connection is dropped.
 *
 * The hiredis context is only ever freed from our own libevent callbacks
 * (watchdog, kick), never from inside a hiredis callback: hiredis 0.14 does
 * not defer a free issued from its connect callback. Reply callbacks that
 * want the connection gone set a reason and activate the kick event. */
#include "redis_sink.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/adapters/libevent.h>

#include "log.h"

/* ---- key schema ------------------------------------------------------ */

_Static_assert(MM_ERR__COUNT == 9, "a new mm_err_kind needs a name in err_names (and docs/METRICS.md)");
_Static_assert(MM_H__COUNT == 3, "a new mm_hist_kind needs a name in hist_names (and docs/METRICS.md)");

static const char *const err_names[MM_ERR__COUNT] = {
    [MM_ERR_CONNECT] = "connect",           [MM_ERR_TIMEOUT] = "timeout",
    [MM_ERR_5XX] = "5xx",                   [MM_ERR_429] = "429",
    [MM_ERR_BREAKER_OPEN] = "breaker_open", [MM_ERR_CLIENT_ABORT] = "client_abort",
    [MM_ERR_MIDSTREAM] = "midstream",       [MM_ERR_CLIENT] = "client",
};
static const char *const hist_names[MM_H__COUNT] = {
    [MM_H_LATENCY] = "latency", [MM_H_TTFT] = "ttft", [MM_H_ITL] = "itl",
};
static const char *const fixed_names[] = {
    "requests", "resp_none", "resp_1xx", "resp_2xx", "resp_3xx", "resp_4xx", "resp_5xx",
};
static const char *const tail_names[] = {"retries", "fallbacks", "prompt_tokens", "completion_tokens"};

#define M_ERR0  7                                   /* first err_* */
#define M_TAIL0 (M_ERR0 + MM_ERR__COUNT - 1)        /* retries */
#define M_HIST0 (M_TAIL0 + 4)                       /* first histogram metric */
#define M_HISTN (MM_HIST_BUCKETS + 2)               /* metrics per histogram */

int mm_redis_metric_name(size_t i, char *buf, size_t len)
{
    int n;
    if (i < M_ERR0)
        n = snprintf(buf, len, "%s", fixed_names[i]);
    else if (i < M_TAIL0)
        n = snprintf(buf, len, "err_%s", err_names[i - M_ERR0 + 1]);
    else if (i < M_HIST0)
        n = snprintf(buf, len, "%s", tail_names[i - M_TAIL0]);
    else if (i < MM_REDIS_NMETRICS) {
        size_t h = (i - M_HIST0) / M_HISTN, j = (i - M_HIST0) % M_HISTN;
        if (j < MM_HIST_BUCKETS)
            n = snprintf(buf, len, "%s_b%zu", hist_names[h], j);
        else
            n = snprintf(buf, len, "%s_%s", hist_names[h], j == MM_HIST_BUCKETS ? "count" : "sum_us");
    } else
        return -EINVAL;
    return n < 0 || (size_t)n >= len ? -EINVAL : 0;
}

uint64_t *mm_redis_metric_slot(mm_series_stats *s, size_t i)
{
    if (i == 0)
        return &s->requests;
    if (i < M_ERR0)
        return &s->responses[i - 1];
    if (i < M_TAIL0)
        return &s->errors[i - M_ERR0 + 1];
    if (i < M_HIST0) {
        uint64_t *tail[] = {&s->retries, &s->fallbacks, &s->prompt_tokens, &s->completion_tokens};
        return tail[i - M_TAIL0];
    }
    if (i >= MM_REDIS_NMETRICS)
        return NULL;
    mm_hist *h = &s->hist[(i - M_HIST0) / M_HISTN];
    size_t j = (i - M_HIST0) % M_HISTN;
    return j < MM_HIST_BUCKETS ? &h->bucket[j] : j == MM_HIST_BUCKETS ? &h->count : &h->sum_us;
}

const char *mm_redis_err_name(mm_err_kind k)
{
    return k > MM_ERR_NONE && k < MM_ERR__COUNT ? err_names[k] : "";
}

static int name_is(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && memcmp(name, want, len) == 0;
}

/* Parsed rather than compared against all names: `stats` looks up every
 * field of every minute. */
int mm_redis_metric_find(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof fixed_names / sizeof *fixed_names; i++)
        if (name_is(name, len, fixed_names[i]))
            return (int)i;
    if (len > 4 && memcmp(name, "err_", 4) == 0) {
        for (size_t k = 1; k < MM_ERR__COUNT; k++)
            if (name_is(name + 4, len - 4, err_names[k]))
                return (int)(M_ERR0 + k - 1);
        return -1;
    }
    for (size_t i = 0; i < 4; i++)
        if (name_is(name, len, tail_names[i]))
            return (int)(M_TAIL0 + i);
    for (size_t h = 0; h < MM_H__COUNT; h++) {
        size_t hl = strlen(hist_names[h]);
        if (len <= hl + 1 || memcmp(name, hist_names[h], hl) != 0 || name[hl] != '_')
            continue;
        const char *r = name + hl + 1;
        size_t rl = len - hl - 1;
        size_t base = M_HIST0 + h * M_HISTN;
        if (name_is(r, rl, "count"))
            return (int)(base + MM_HIST_BUCKETS);
        if (name_is(r, rl, "sum_us"))
            return (int)(base + MM_HIST_BUCKETS + 1);
        /* "b<j>": decimal without leading zeros, j < MM_HIST_BUCKETS */
        if (rl < 2 || rl > 3 || r[0] != 'b' || (rl == 3 && r[1] == '0'))
            return -1;
        size_t j = 0;
        for (size_t k = 1; k < rl; k++) {
            if (r[k] < '0' || r[k] > '9')
                return -1;
            j = j * 10 + (size_t)(r[k] - '0');
        }
        return j < MM_HIST_BUCKETS ? (int)(base + j) : -1;
    }
    return -1;
}

static int append_clean(mm_buf *out, const char *s)
{
    size_t start = out->len;
    int rc = mm_buf_append_str(out, s ? s : "");
    if (rc)
        return rc;
    for (size_t k = start; k < out->len; k++)
        if ((unsigned char)out->data[k] < 0x20 || out->data[k] == 0x7f)
            out->data[k] = '_';
    return 0;
}

int mm_redis_field(mm_buf *out, const mm_series_info *info, size_t i)
{
    char name[64];
    int rc = mm_redis_metric_name(i, name, sizeof name);
    if (rc)
        return rc;
    size_t start = out->len;
    if ((rc = append_clean(out, info->model)) || (rc = mm_buf_append(out, "\t", 1)) ||
        (rc = append_clean(out, info->variant)) || (rc = mm_buf_append(out, "\t", 1)) ||
        (rc = append_clean(out, info->backend)) || (rc = mm_buf_append(out, "\t", 1)) ||
        (rc = mm_buf_append_str(out, name)))
        out->len = start;
    return rc;
}

/* ---- split weights --------------------------------------------------- */

int mm_redis_weights_from_cfg(const mm_gateway_cfg *cfg, mm_redis_weights *out)
{
    size_t n = 0, k = 0;
    out->v = NULL;
    out->n = 0;
    for (size_t i = 0; i < cfg->nmodels; i++)
        n += cfg->models[i].nsplit;
    if (!n)
        return 0;
    if (!(out->v = calloc(n, sizeof *out->v)))
        return -ENOMEM;
    for (size_t i = 0; i < cfg->nmodels; i++)
        for (size_t j = 0; j < cfg->models[i].nsplit; j++)
            out->v[k++] = (mm_redis_weight){cfg->models[i].name, cfg->models[i].split[j].model,
                                            cfg->models[i].split[j].weight};
    out->n = n;
    return 0;
}

void mm_redis_weights_free(mm_redis_weights *w)
{
    free(w->v);
    w->v = NULL;
    w->n = 0;
}

/* ---- the sink -------------------------------------------------------- */

/* The batch: one EVAL of this script. It applies a batch only if its
 * sequence number is above the last one applied for this gateway run
 * (KEYS[1]), which makes sending the same batch again harmless. The
 * sequence key is set with redis.call, first: if that fails nothing was
 * written. Everything after uses pcall, so one damaged key (someone wrote a
 * string where a hash belongs) cannot leave the batch half applied and
 * retried forever; such failures are counted in the reply instead.
 * KEYS: seq key, minute hash, weights hash, gateways hash.
 * ARGV: seq, seq ttl, key ttl, gateway id, unix time, nweights,
 *       nweights x (field, weight), then (field, delta) pairs. */
static const char batch_script[] =
    "local last = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "local seq = tonumber(ARGV[1])\n"
    "if last >= seq then return {0, 0} end\n"
    "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])\n"
    "local bad = 0\n"
    "local function try(...)\n"
    "  local r = redis.pcall(...)\n"
    "  if type(r) == 'table' and r.err then bad = bad + 1 end\n"
    "end\n"
    "local nw = tonumber(ARGV[6])\n"
    "local i = 7\n"
    "if nw > 0 then\n"
    "  try('DEL', KEYS[3])\n"
    "  for _ = 1, nw do try('HSET', KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end\n"
    "  try('EXPIRE', KEYS[3], ARGV[3])\n"
    "end\n"
    "local n = #ARGV\n"
    "while i < n do try('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end\n"
    "try('EXPIRE', KEYS[2], ARGV[3])\n"
    "try('HSET', KEYS[4], ARGV[4], ARGV[5])\n"
    "try('EXPIRE', KEYS[4], ARGV[3])\n"
    "return {1, bad}\n";

/* A resent batch can only arrive late while we still retry it, i.e. within
 * seconds of Redis coming back; an hour leaves a wide margin. */
#define SEQ_TTL_S        3600
#define BATCH_MAX_BYTES  (16u << 20)
#define WEIGHTS_MAX      4096
#define BACKOFF_MIN_MS   100
#define BACKOFF_MAX_MS   10000
#define IO_TIMEOUT_MIN_MS 5000
#define IO_TIMEOUT_MAX_MS 60000

enum { S_IDLE, S_RESOLVING, S_CONNECTING, S_HANDSHAKE, S_READY };

/* What the last log line said; a line is written only when it changes. */
enum {
    K_NONE, K_OK, K_DNS, K_CONNECT, K_TIMEOUT, K_CLOSED, K_AUTH, K_LOADING, K_READONLY,
    K_OOM, K_BUSY, K_REPLY, K_SCRIPT, K_FIELDS, K_INTERNAL,
};

/* A name lookup on its own thread: getaddrinfo cannot be bounded or
 * cancelled, and a slow DNS must not stall the loop. The job outlives the
 * sink if the lookup hangs; whoever drops the last reference frees it. */
typedef struct dns_job {
    pthread_mutex_t lock;
    int   refs;
    int   finished;
    int   gai_rc;
    struct event *done;     /* NULL once the sink no longer waits */
    char  addr[INET6_ADDRSTRLEN];
    char  host[];
} dns_job;

typedef struct batch {
    mm_buf   args;          /* argument bytes back to back */
    size_t  *off, *len;     /* per argument */
    const char **argv;
    size_t   argc, cap;
    size_t  *ids;           /* series carried, whose snap[] is acked on success */
    size_t   nids;
    size_t   nfields;
    int      partial;       /* some series did not fit */
    uint64_t seq;
} batch;

struct mm_redis_sink {
    struct event_base *base;
    mm_metrics *m;
    char *host, *user, *pass, *prefix, *gwid;
    int   port, db, flush_ms, ttl_s, io_timeout_ms;
    int   numeric_host;
    mm_redis_weight *weights;
    size_t nweights;
    char  nonce[17];

    struct event *tick, *watchdog, *retry, *kick, *dns_ev;
    dns_job *job;
    char  addr[INET6_ADDRSTRLEN];   /* last resolved address */
    redisAsyncContext *ac;
    int   state;
    int   handshake_left;
    int   backoff_ms;
    uint64_t rng;

    mm_series_stats *acked, *snap;  /* indexed by series id */
    size_t nseries;                 /* entries allocated in both */
    size_t cursor;                  /* where the next batch starts */

    batch b;
    int   have_batch;               /* b is built and not yet acknowledged */
    int   inflight;                 /* b sent, no answer yet */
    uint64_t next_seq;

    int   kick_kind;
    char  kick_msg[256];
    int   logged;                   /* K_* of the last log line */
    int   was_ready;
    uint64_t failed_streak;
    mm_metrics_sink_stats st;
};

static void conn_lost(mm_redis_sink *s, int kind, const char *msg);
static void flush_now(mm_redis_sink *s);

static void publish(mm_redis_sink *s)
{
    s->st.redis_connected = s->state == S_READY;
    mm_metrics_set_sink(s->m, &s->st);
}

static const char *kind_what(int kind)
{
    switch (kind) {
    case K_DNS:      return "cannot resolve";
    case K_CONNECT:  return "cannot connect";
    case K_TIMEOUT:  return "no answer in time";
    case K_CLOSED:   return "connection lost";
    case K_AUTH:     return "AUTH/SELECT refused";
    case K_LOADING:  return "server is loading its dataset";
    case K_READONLY: return "server is a read-only replica";
    case K_OOM:      return "server out of memory";
    case K_BUSY:     return "server busy";
    case K_SCRIPT:   return "unexpected answer to a batch";
    case K_FIELDS:   return "some counters were refused (damaged keys?)";
    case K_INTERNAL: return "internal error";
    default:         return "error reply";
    }
}

/* One line per change of state, so an outage of hours logs two lines. */
static void note(mm_redis_sink *s, int kind, const char *msg)
{
    if (kind == s->logged)
        return;
    int was = s->logged;
    s->logged = kind;
    if (kind == K_OK) {
        if (was == K_FIELDS)
            mm_info("redis: every counter accepted again");
        else if (s->st.redis_flushes <= 1)
            mm_info("redis: flushing metrics to %s:%d db %d", s->host, s->port, s->db);
        else if (s->failed_streak)
            mm_info("redis: flushing metrics to %s:%d db %d again (%" PRIu64
                    " failed batches meanwhile; their counts went with this one)",
                    s->host, s->port, s->db, s->failed_streak);
        else
            mm_info("redis: flushing metrics to %s:%d db %d again", s->host, s->port, s->db);
        return;
    }
    mm_warn("redis %s:%d: %s%s%s; metrics stay in memory and are retried", s->host, s->port,
            kind_what(kind), msg && *msg ? ": " : "", msg ? msg : "");
}

static uint32_t rnd(mm_redis_sink *s)
{
    /* xorshift64*: jitter only needs to desynchronise gateways. */
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return (uint32_t)((s->rng * 2685821657736338717ull) >> 32);
}

static void arm(struct event *ev, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(ev, &tv);
}

/* ---- batches --------------------------------------------------------- */

/* Record the bytes args[at..len) as the next argument. Offsets, not
 * pointers: args.data moves while the batch grows. */
static int arg_end(batch *b, size_t at)
{
    if (b->argc == b->cap) {
        size_t ncap = b->cap ? b->cap * 2 : 256;
        size_t *no = realloc(b->off, ncap * sizeof *no);
        if (!no)
            return -ENOMEM;
        b->off = no;
        size_t *nl = realloc(b->len, ncap * sizeof *nl);
        if (!nl)
            return -ENOMEM;
        b->len = nl;
        b->cap = ncap;
    }
    b->off[b->argc] = at;
    b->len[b->argc++] = b->args.len - at;
    return 0;
}

static int arg_add(batch *b, const void *p, size_t n)
{
    size_t at = b->args.len;
    int rc = mm_buf_append(&b->args, p, n);
    return rc ? rc : arg_end(b, at);
}

static int arg_str(batch *b, const char *str)
{
    return arg_add(b, str, strlen(str));
}

static int arg_u64(batch *b, uint64_t v)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, v);
    return arg_str(b, num);
}

static int arg_key(batch *b, const mm_redis_sink *s, const char *what, const char *suffix)
{
    char key[512];
    int n = snprintf(key, sizeof key, "%s:v1:%s%s", s->prefix, what, suffix);
    if (n < 0 || (size_t)n >= sizeof key)
        return -E2BIG;
    return arg_add(b, key, (size_t)n);
}

static int arg_field(batch *b, const mm_series_info *info, size_t metric, uint64_t delta)
{
    size_t at = b->args.len;
    int rc = mm_redis_field(&b->args, info, metric);
    if (!rc)
        rc = arg_end(b, at);
    return rc ? rc : arg_u64(b, delta);
}

static int grow_series(mm_redis_sink *s, size_t n)
{
    if (n <= s->nseries)
        return 0;
    size_t ncap = s->nseries ? s->nseries : 64;
    while (ncap < n)
        ncap *= 2;
    mm_series_stats *a = realloc(s->acked, ncap * sizeof *a);
    if (!a)
        return -ENOMEM;
    s->acked = a;
    memset(a + s->nseries, 0, (ncap - s->nseries) * sizeof *a);
    mm_series_stats *p = realloc(s->snap, ncap * sizeof *p);
    if (!p)
        return -ENOMEM;
    s->snap = p;
    size_t *ids = realloc(s->b.ids, ncap * sizeof *ids);
    if (!ids)
        return -ENOMEM;
    s->b.ids = ids;
    s->nseries = ncap;
    return 0;
}

/* Snapshot every series, and put the difference against what Redis has
 * acknowledged into a new batch. The minute is the one in which the batch
 * is built: a batch sent again after an outage still lands there. */
static int build_batch(mm_redis_sink *s)
{
    batch *b = &s->b;
    size_t n = mm_metrics_count(s->m);
    int rc = grow_series(s, n);
    if (rc)
        return rc;
    mm_buf_reset(&b->args);
    b->argc = b->nids = b->nfields = 0;
    b->partial = 0;
    b->seq = ++s->next_seq;

    time_t now = time(NULL);
    char minute[32], seqsuffix[600];
    snprintf(minute, sizeof minute, "%lld", (long long)(now / 60));
    int sn = snprintf(seqsuffix, sizeof seqsuffix, "%s:%s", s->gwid, s->nonce);
    if (sn < 0 || (size_t)sn >= sizeof seqsuffix)
        return -E2BIG;
    if ((rc = arg_str(b, "EVAL")) || (rc = arg_str(b, batch_script)) || (rc = arg_str(b, "4")) ||
        (rc = arg_key(b, s, "seq:", seqsuffix)) || (rc = arg_key(b, s, "m:", minute)) ||
        (rc = arg_key(b, s, "weights", "")) || (rc = arg_key(b, s, "gateways", "")) ||
        (rc = arg_u64(b, b->seq)) || (rc = arg_u64(b, SEQ_TTL_S)) ||
        (rc = arg_u64(b, (uint64_t)s->ttl_s)) || (rc = arg_str(b, s->gwid)) ||
        (rc = arg_u64(b, (uint64_t)now)) || (rc = arg_u64(b, s->nweights)))
        return rc;
    for (size_t w = 0; w < s->nweights; w++) {
        size_t at = b->args.len;
        /* "<model>\t<variant>": the first two parts of a series field */
        if ((rc = append_clean(&b->args, s->weights[w].model)) ||
            (rc = mm_buf_append(&b->args, "\t", 1)) ||
            (rc = append_clean(&b->args, s->weights[w].variant)) || (rc = arg_end(b, at)) ||
            (rc = arg_u64(b, (uint64_t)s->weights[w].weight)))
            return rc;
    }

    for (size_t k = 0; k < n; k++) {
        size_t id = (s->cursor + k) % n;
        mm_series_info info;
        if (mm_metrics_get(s->m, id, &s->snap[id], &info) != 0)
            continue;
        size_t argc0 = b->argc, len0 = b->args.len, nf = 0;
        for (size_t i = 0; i < MM_REDIS_NMETRICS && !rc; i++) {
            uint64_t now_v = *mm_redis_metric_slot(&s->snap[id], i);
            uint64_t old_v = *mm_redis_metric_slot(&s->acked[id], i);
            if (now_v > old_v) {
                if (b->nfields + nf + 1 > MM_REDIS_BATCH_FIELDS)
                    rc = -E2BIG;
                else
                    rc = arg_field(b, &info, i, now_v - old_v);
                nf++;
            }
        }
        if (rc == -E2BIG && b->nids > 0) {
            /* Full: roll this series back; the next batch starts with it. */
            b->argc = argc0;
            b->args.len = len0;
            b->partial = 1;
            s->cursor = id;
            rc = 0;
            break;
        }
        if (rc)
            return rc;
        if (nf) {
            b->ids[b->nids++] = id;
            b->nfields += nf;
        }
    }
    /* argv last: args.data may have moved while growing. */
    const char **argv = realloc(b->argv, b->argc * sizeof *argv);
    if (!argv)
        return -ENOMEM;
    b->argv = argv;
    for (size_t i = 0; i < b->argc; i++)
        b->argv[i] = b->args.data + b->off[i];
    s->have_batch = 1;
    return 0;
}

static int reply_kind(const redisReply *r)
{
    static const struct { const char *code; int kind; } codes[] = {
        {"LOADING ", K_LOADING}, {"READONLY ", K_READONLY}, {"NOAUTH ", K_AUTH},
        {"WRONGPASS ", K_AUTH},  {"NOPERM ", K_AUTH},       {"OOM ", K_OOM},
        {"BUSY ", K_BUSY},       {"MASTERDOWN ", K_READONLY},
    };
    for (size_t i = 0; i < sizeof codes / sizeof *codes; i++)
        if (r->str && strncmp(r->str, codes[i].code, strlen(codes[i].code)) == 0)
            return codes[i].kind;
    return K_REPLY;
}

/* The verdict on a batch reply: 0 acknowledged (applied now or earlier),
 * else the K_* of the failure. Only an acknowledged batch moves acked[]. */
static int batch_result(mm_redis_sink *s, const redisReply *r, char *msg, size_t msglen)
{
    msg[0] = '\0';
    if (!r)
        return K_CLOSED;
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(msg, msglen, "%s", r->str ? r->str : "");
        return reply_kind(r);
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER) {
        snprintf(msg, msglen, "reply type %d", r->type);
        return K_SCRIPT;
    }
    batch *b = &s->b;
    for (size_t k = 0; k < b->nids; k++)
        s->acked[b->ids[k]] = s->snap[b->ids[k]];
    s->have_batch = 0;
    s->st.redis_flushes++;
    s->backoff_ms = BACKOFF_MIN_MS;
    if (r->element[1]->integer > 0) {
        snprintf(msg, msglen, "%lld of %zu writes failed", r->element[1]->integer, b->nfields);
        note(s, K_FIELDS, msg);
    } else {
        note(s, K_OK, NULL);
    }
    s->failed_streak = 0;
    if (r->element[0]->integer == 0)
        mm_debug("redis: batch %" PRIu64 " had already been applied", b->seq);
    return 0;
}

static void batch_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    mm_redis_sink *s = ac->data;
    uint64_t seq = (uint64_t)(uintptr_t)priv;
    char msg[256];
    if (!s || !s->inflight || seq != s->b.seq)
        return;
    s->inflight = 0;
    evtimer_del(s->watchdog);
    int kind = batch_result(s, reply, msg, sizeof msg);
    if (kind) {
        s->st.redis_failed_flushes++;
        s->failed_streak++;
        if (reply) {
            /* NULL: the connection is going away and says why itself. */
            note(s, kind, msg);
            if (kind == K_READONLY || kind == K_AUTH || kind == K_SCRIPT) {
                /* A failover or a restart with new credentials: only a new
                 * connection (and a fresh name lookup) can heal this. */
                s->kick_kind = kind;
                snprintf(s->kick_msg, sizeof s->kick_msg, "%s", msg);
                event_active(s->kick, EV_TIMEOUT, 0);
            }
        }
    }
    publish(s);
    /* A batch that could not carry every series leaves the rest for now,
     * not for the next tick, so a backlog drains at the speed of Redis. */
    if (!kind && s->b.partial)
        flush_now(s);
}

static void flush_now(mm_redis_sink *s)
{
    if (s->state != S_READY || s->inflight || !s->ac)
        return;
    if (!s->have_batch) {
        int rc = build_batch(s);
        if (rc) {
            s->have_batch = 0;
            note(s, K_INTERNAL, strerror(-rc));
            return;
        }
    }
    batch *b = &s->b;
    if (redisAsyncCommandArgv(s->ac, batch_cb, (void *)(uintptr_t)b->seq, (int)b->argc, b->argv,
                              b->len) != REDIS_OK) {
        s->kick_kind = K_CLOSED;
        snprintf(s->kick_msg, sizeof s->kick_msg, "cannot queue a command");
        event_active(s->kick, EV_TIMEOUT, 0);
        return;
    }
    s->inflight = 1;
    arm(s->watchdog, s->io_timeout_ms);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mm_redis_sink *s = arg;
    flush_now(s);
}

/* ---- connection ------------------------------------------------------ */

static void ready(mm_redis_sink *s)
{
    s->state = S_READY;
    evtimer_del(s->watchdog);
    /* "Connected" is logged with the first acknowledged batch: a server
     * that accepts connections but refuses every batch (a replica) must
     * not log two lines per reconnect. */
    if (s->was_ready)
        s->st.redis_reconnects++;
    s->was_ready = 1;
    publish(s);
    flush_now(s);   /* do not wait a tick to send the backlog */
}

static void handshake_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    mm_redis_sink *s = ac->data;
    redisReply *r = reply;
    if (!s || s->ac != ac || s->state != S_HANDSHAKE || !r)
        return;
    if (r->type == REDIS_REPLY_ERROR) {
        s->kick_kind = reply_kind(r) == K_LOADING ? K_LOADING : K_AUTH;
        snprintf(s->kick_msg, sizeof s->kick_msg, "%s", r->str ? r->str : "");
        event_active(s->kick, EV_TIMEOUT, 0);
        return;
    }
    if (--s->handshake_left == 0)
        ready(s);
}

static int handshake_cmd(mm_redis_sink *s, int argc, const char **argv)
{
    size_t len[3];
    for (int i = 0; i < argc; i++)
        len[i] = strlen(argv[i]);
    if (redisAsyncCommandArgv(s->ac, handshake_cb, NULL, argc, argv, len) != REDIS_OK)
        return -EIO;
    s->handshake_left++;
    return 0;
}

static void connect_cb(const redisAsyncContext *cac, int status)
{
    mm_redis_sink *s = cac->data;
    if (!s || s->ac != cac)
        return;
    if (status != REDIS_OK) {
        /* hiredis frees the context when we return. */
        s->ac = NULL;
        conn_lost(s, K_CONNECT, cac->errstr);
        return;
    }
    s->state = S_HANDSHAKE;
    s->handshake_left = 0;
    char dbs[16];
    snprintf(dbs, sizeof dbs, "%d", s->db);
    int rc = 0;
    if (s->pass && s->user)
        rc = handshake_cmd(s, 3, (const char *[]){"AUTH", s->user, s->pass});
    else if (s->pass)
        rc = handshake_cmd(s, 2, (const char *[]){"AUTH", s->pass});
    if (!rc && s->db)
        rc = handshake_cmd(s, 2, (const char *[]){"SELECT", dbs});
    if (rc) {
        s->kick_kind = K_CLOSED;
        snprintf(s->kick_msg, sizeof s->kick_msg, "cannot queue a command");
        event_active(s->kick, EV_TIMEOUT, 0);
    } else if (s->handshake_left == 0) {
        ready(s);
    }
}

static void disconnect_cb(const redisAsyncContext *cac, int status)
{
    mm_redis_sink *s = cac->data;
    if (!s || s->ac != cac)
        return;   /* we freed it ourselves */
    s->ac = NULL;
    conn_lost(s, K_CLOSED, status == REDIS_OK ? "closed" : cac->errstr);
}

static void connect_addr(mm_redis_sink *s, const char *addr)
{
    redisAsyncContext *ac = redisAsyncConnect(addr, s->port);
    if (!ac) {
        conn_lost(s, K_INTERNAL, "out of memory");
        return;
    }
    if (ac->err) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s", ac->errstr);
        redisAsyncFree(ac);
        conn_lost(s, K_CONNECT, msg);
        return;
    }
    ac->data = s;
    if (redisLibeventAttach(ac, s->base) != REDIS_OK) {
        redisAsyncFree(ac);
        conn_lost(s, K_INTERNAL, "cannot attach to the event loop");
        return;
    }
    redisAsyncSetConnectCallback(ac, connect_cb);
    redisAsyncSetDisconnectCallback(ac, disconnect_cb);
    s->ac = ac;
    s->state = S_CONNECTING;
}

static void job_release(dns_job *j)
{
    pthread_mutex_lock(&j->lock);
    int last = --j->refs == 0;
    j->done = NULL;
    pthread_mutex_unlock(&j->lock);
    if (last) {
        pthread_mutex_destroy(&j->lock);
        free(j);
    }
}

static void *dns_thread(void *arg)
{
    dns_job *j = arg;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int rc = getaddrinfo(j->host, NULL, &hints, &ai);
    char addr[INET6_ADDRSTRLEN] = "";
    if (rc == 0) {
        void *a = ai->ai_family == AF_INET6 ? (void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                                            : (void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
        if (!inet_ntop(ai->ai_family, a, addr, sizeof addr))
            rc = EAI_FAIL;
        freeaddrinfo(ai);
    }
    pthread_mutex_lock(&j->lock);
    j->gai_rc = rc;
    memcpy(j->addr, addr, sizeof addr);
    j->finished = 1;
    if (j->done)
        event_active(j->done, EV_TIMEOUT, 0);
    pthread_mutex_unlock(&j->lock);
    job_release(j);
    return NULL;
}

static void dns_done_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mm_redis_sink *s = arg;
    dns_job *j = s->job;
    if (!j || s->state != S_RESOLVING)
        return;
    pthread_mutex_lock(&j->lock);
    int finished = j->finished, rc = j->gai_rc;
    if (finished)
        memcpy(s->addr, j->addr, sizeof s->addr);
    pthread_mutex_unlock(&j->lock);
    if (!finished)
        return;   /* a stale activation from an abandoned job */
    s->job = NULL;
    job_release(j);
    if (rc)
        conn_lost(s, K_DNS, gai_strerror(rc));
    else
        connect_addr(s, s->addr);
}

static void start_connect(mm_redis_sink *s)
{
    s->state = S_RESOLVING;
    arm(s->watchdog, s->io_timeout_ms);
    if (s->numeric_host) {
        connect_addr(s, s->host);
        return;
    }
    size_t hl = strlen(s->host);
    dns_job *j = calloc(1, sizeof *j + hl + 1);
    if (!j) {
        conn_lost(s, K_INTERNAL, "out of memory");
        return;
    }
    pthread_mutex_init(&j->lock, NULL);
    memcpy(j->host, s->host, hl + 1);
    j->refs = 2;
    j->done = s->dns_ev;
    pthread_attr_t attr;
    pthread_t tid;
    int rc = pthread_attr_init(&attr);
    if (!rc) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&tid, &attr, dns_thread, j);
        pthread_attr_destroy(&attr);
    }
    if (rc) {
        pthread_mutex_destroy(&j->lock);
        free(j);
        conn_lost(s, K_INTERNAL, "cannot start the resolver thread");
        return;
    }
    s->job = j;
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    start_connect(arg);
}

static void conn_lost(mm_redis_sink *s, int kind, const char *msg)
{
    s->state = S_IDLE;
    s->inflight = 0;
    evtimer_del(s->watchdog);
    note(s, kind, msg);
    publish(s);
    int d = s->backoff_ms;
    s->backoff_ms = d * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : d * 2;
    /* +-20% so that gateways cut off together do not come back together */
    d = (int)((double)d * (0.8 + 0.4 * (double)rnd(s) / 4294967295.0));
    arm(s->retry, d);
}

/* Let go of the connection from outside any hiredis callback. */
static void drop(mm_redis_sink *s, int kind, const char *msg)
{
    redisAsyncContext *ac = s->ac;
    s->ac = NULL;
    if (s->job) {
        job_release(s->job);
        s->job = NULL;
    }
    if (ac)
        redisAsyncFree(ac);   /* runs batch_cb(NULL) if a batch was out */
    conn_lost(s, kind, msg);
}

static void watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mm_redis_sink *s = arg;
    char msg[96];
    snprintf(msg, sizeof msg, "%s took over %d ms",
             s->state == S_RESOLVING ? "name lookup" : s->state == S_CONNECTING ? "connect"
             : s->state == S_HANDSHAKE ? "AUTH/SELECT" : "a batch", s->io_timeout_ms);
    if (s->inflight) {
        s->st.redis_failed_flushes++;
        s->failed_streak++;
    }
    s->inflight = 0;   /* its callback, run by the free below, is stale now */
    drop(s, K_TIMEOUT, msg);
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mm_redis_sink *s = arg;
    if (s->state == S_IDLE)
        return;
    drop(s, s->kick_kind, s->kick_msg);
}

/* ---- lifecycle ------------------------------------------------------- */

static char *dup_or_null(const char *p, int *rc)
{
    if (!p)
        return NULL;
    char *d = strdup(p);
    if (!d)
        *rc = -ENOMEM;
    return d;
}

int mm_redis_sink_start(struct event_base *base, const mm_redis_cfg *cfg, mm_metrics *m,
                        const char *gateway_id, const mm_redis_weights *weights,
                        mm_redis_sink **out, char *err, size_t errlen)
{
    mm_metrics_sink_stats none = {0};
    int rc = 0;
    *out = NULL;
    if (!cfg->url || !cfg->host) {
        mm_metrics_set_sink(m, &none);
        return 0;
    }
    if (!gateway_id || !*gateway_id || strlen(gateway_id) > 256) {
        snprintf(err, errlen, "redis: gateway id must be 1..256 characters");
        return -EINVAL;
    }
    mm_redis_sink *s = calloc(1, sizeof *s);
    if (!s)
        goto nomem;
    s->base = base;
    s->m = m;
    s->port = cfg->port;
    s->db = cfg->db;
    s->flush_ms = cfg->flush_ms > 0 ? cfg->flush_ms : 1000;
    s->ttl_s = cfg->ttl_s > 0 ? cfg->ttl_s : 86400;
    s->io_timeout_ms = 5 * s->flush_ms;
    if (s->io_timeout_ms < IO_TIMEOUT_MIN_MS)
        s->io_timeout_ms = IO_TIMEOUT_MIN_MS;
    if (s->io_timeout_ms > IO_TIMEOUT_MAX_MS)
        s->io_timeout_ms = IO_TIMEOUT_MAX_MS;
    s->backoff_ms = BACKOFF_MIN_MS;
    s->host = dup_or_null(cfg->host, &rc);
    s->user = dup_or_null(cfg->username, &rc);
    s->pass = dup_or_null(cfg->password, &rc);
    s->prefix = dup_or_null(cfg->prefix ? cfg->prefix : "modelmux", &rc);
    s->gwid = dup_or_null(gateway_id, &rc);
    if (rc)
        goto nomem;
    unsigned char a6[16];
    s->numeric_host = inet_pton(AF_INET, s->host, a6) == 1 || inet_pton(AF_INET6, s->host, a6) == 1;
    mm_buf_init(&s->b.args, BATCH_MAX_BYTES);

    if (weights && weights->n) {
        s->nweights = weights->n > WEIGHTS_MAX ? WEIGHTS_MAX : weights->n;
        if (weights->n > WEIGHTS_MAX)
            mm_warn("redis: only the first %d split weights are published", WEIGHTS_MAX);
        if (!(s->weights = calloc(s->nweights, sizeof *s->weights)))
            goto nomem;
        for (size_t i = 0; i < s->nweights; i++) {
            s->weights[i].model = dup_or_null(weights->v[i].model ? weights->v[i].model : "", &rc);
            s->weights[i].variant = dup_or_null(weights->v[i].variant ? weights->v[i].variant : "", &rc);
            s->weights[i].weight = weights->v[i].weight;
        }
        if (rc)
            goto nomem;
    }

    /* A per-run nonce in the sequence key: a restarted gateway starts its
     * sequence at 1 again and must not look like a replay of its last run. */
    uint64_t r[2] = {0, 0};
    if (getrandom(r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        r[0] = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)getpid() << 40);
        r[1] = r[0] * 0x9E3779B97F4A7C15ull;
    }
    snprintf(s->nonce, sizeof s->nonce, "%016" PRIx64, r[0]);
    s->rng = r[1] | 1;

    s->tick = event_new(base, -1, EV_PERSIST, tick_cb, s);
    s->watchdog = evtimer_new(base, watchdog_cb, s);
    s->retry = evtimer_new(base, retry_cb, s);
    s->kick = evtimer_new(base, kick_cb, s);
    s->dns_ev = evtimer_new(base, dns_done_cb, s);
    if (!s->tick || !s->watchdog || !s->retry || !s->kick || !s->dns_ev)
        goto nomem;
    arm(s->tick, s->flush_ms);
    arm(s->retry, 0);   /* first connect from the loop: start never blocks */
    s->st.redis_configured = 1;
    publish(s);
    *out = s;
    return 0;
nomem:
    snprintf(err, errlen, "redis: out of memory");
    mm_redis_sink_free(s);
    return -ENOMEM;
}

/* Synchronous resend for shutdown: the loops are stopped, blocking is fine
 * (bounded by the timeout), and without it the last flush_ms of counts
 * would be lost on every clean stop. */
int mm_redis_sink_final_flush(mm_redis_sink *s, int timeout_ms)
{
    if (!s)
        return 0;
    const char *addr = s->numeric_host ? s->host : s->addr;
    if (!*addr)
        return -ENOTCONN;   /* never resolved: do not block on DNS now */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(addr, s->port, tv);
    redisReply *r = NULL;
    int rc = 0;
    char msg[256];
    if (!c || c->err) {
        rc = -ECONNREFUSED;
        goto out;
    }
    redisSetTimeout(c, tv);
    char dbs[16];
    snprintf(dbs, sizeof dbs, "%d", s->db);
    if (s->pass) {
        r = s->user ? redisCommand(c, "AUTH %s %s", s->user, s->pass)
                    : redisCommand(c, "AUTH %s", s->pass);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            rc = -EACCES;
            goto out;
        }
        freeReplyObject(r);
        r = NULL;
    }
    if (s->db) {
        r = redisCommand(c, "SELECT %s", dbs);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            rc = -EINVAL;
            goto out;
        }
        freeReplyObject(r);
        r = NULL;
    }
    /* The async batch, if any, is resent as is (same sequence number). */
    s->inflight = 0;
    for (int i = 0; i < 1000; i++) {
        if (!s->have_batch && (rc = build_batch(s)))
            goto out;
        r = redisCommandArgv(c, (int)s->b.argc, s->b.argv, s->b.len);
        if (batch_result(s, r, msg, sizeof msg) != 0) {
            rc = -EIO;
            goto out;
        }
        freeReplyObject(r);
        r = NULL;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        if (!s->b.partial)
            break;
        if (ms > timeout_ms) {
            rc = -ETIMEDOUT;
            break;
        }
    }
out:
    if (r)
        freeReplyObject(r);
    if (c)
        redisFree(c);
    publish(s);
    return rc;
}

void mm_redis_sink_free(mm_redis_sink *s)
{
    if (!s)
        return;
    redisAsyncContext *ac = s->ac;
    s->ac = NULL;
    s->inflight = 0;
    if (ac) {
        ac->data = NULL;   /* its callbacks, run by the free, ignore us */
        redisAsyncFree(ac);
    }
    if (s->job)
        job_release(s->job);
    if (s->tick)
        event_free(s->tick);
    if (s->watchdog)
        event_free(s->watchdog);
    if (s->retry)
        event_free(s->retry);
    if (s->kick)
        event_free(s->kick);
    if (s->dns_ev)
        event_free(s->dns_ev);
    if (s->st.redis_configured) {
        s->st.redis_connected = 0;
        mm_metrics_set_sink(s->m, &s->st);
    }
    for (size_t i = 0; i < s->nweights && s->weights; i++) {
        free((char *)s->weights[i].model);
        free((char *)s->weights[i].variant);
    }
    free(s->weights);
    mm_buf_free(&s->b.args);
    free(s->b.off);
    free(s->b.len);
    free(s->b.argv);
    free(s->b.ids);
    free(s->acked);
    free(s->snap);
    free(s->host);
    free(s->user);
    free(s->pass);
    free(s->prefix);
    free(s->gwid);
    free(s);
}
