/* config.h: the gateway's configuration, loaded from one JSON file and
 * validated as a whole before anything uses it.
 *
 * Key names are a public contract (see README): add keys, never rename.
 * Unknown keys and bad values are rejected with the JSON path of the
 * offending key, e.g. "models[1].backends[0].weight: must be an integer >= 0".
 * "${NAME}" inside any string value is replaced by the environment variable
 * NAME (an unset variable is an error naming it), so secrets stay out of the
 * file. */
#ifndef MM_CONFIG_H
#define MM_CONFIG_H
#include <stddef.h>
#include <stdint.h>

typedef enum mm_strategy {
    MM_STRATEGY_ROUND_ROBIN = 0,   /* "round_robin": smooth WRR (default) */
    MM_STRATEGY_RANDOM,            /* "random": weighted random */
    MM_STRATEGY_LEAST_OUTSTANDING, /* "least_outstanding" */
} mm_strategy;

typedef enum mm_sticky_kind {
    MM_STICKY_NONE = 0,
    MM_STICKY_HEADER,   /* "header:NAME" */
    MM_STICKY_BODY,     /* "body:FIELD" (top-level string or number field) */
} mm_sticky_kind;

/* Timeouts in ms; 0 means "no limit". Defaults: connect 5000, first_byte
 * 300000 (a long prompt's prefill), idle 120000 (between chunks), total 0:
 * a long generation is bounded by idle, never cut by a total. */
typedef struct mm_timeouts_cfg {
    int connect_ms;
    int first_byte_ms;
    int idle_ms;
    int total_ms;
} mm_timeouts_cfg;

typedef struct mm_health_cfg {
    char *path;          /* "/health" */
    int   interval_ms;   /* 2000 */
    int   timeout_ms;    /* 1000 */
    int   rise;          /* 2 */
    int   fall;          /* 3 */
    int   enabled;       /* 1; "health": false disables active checks */
} mm_health_cfg;

typedef struct mm_breaker_cfg {
    int    consecutive_failures;  /* 5 */
    double error_rate;            /* 0.5, in (0,1] */
    int    window_ms;             /* 10000 */
    int    min_requests;          /* 20 */
    int    open_ms;               /* 10000 */
    int    max_open_ms;           /* 300000: cap of the doubling */
    int    half_open_requests;    /* 1 */
    int    max_ejection_percent;  /* 50, 0..100 */
} mm_breaker_cfg;

/* "launch": the fleet starts this worker (issue: fleet). */
typedef struct mm_launch_cfg {
    char  *model;        /* model directory */
    char  *gpus;         /* "0,1" or "" (no GPU) ; NULL when absent */
    char  *device;       /* "cpu" / "cuda" / NULL */
    int    port;
    char **args;  size_t nargs;      /* extra worker arguments */
    char **command; size_t ncommand; /* run this instead of modelmux-worker */
    int    share_gpus;
    int    startup_timeout_ms;       /* 600000 */
} mm_launch_cfg;

typedef struct mm_backend_cfg {
    char *url;           /* "http://host:port[/base]", no trailing slash */
    char *host;          /* parsed from url */
    int   port;
    int   weight;        /* default 1, >= 0 */
    char *served_model;  /* rewrite the body's model to this; NULL keeps it */
    char *api_key;       /* sent as "Authorization: Bearer ..."; NULL: pass the client's */
    mm_timeouts_cfg timeouts;  /* "timeouts": {...}; defaults from model/top */
    int   max_requests;  /* in flight; 0 = unlimited */
    mm_launch_cfg *launch;     /* NULL unless "launch" given */
} mm_backend_cfg;

typedef struct mm_split_cfg {
    char *model;         /* name of another (non-split) model */
    int   weight;        /* >= 0 */
} mm_split_cfg;

typedef struct mm_model_cfg {
    char          *name;
    mm_strategy    strategy;
    mm_backend_cfg *backends;  size_t nbackends;
    mm_split_cfg   *split;     size_t nsplit;     /* a model has backends XOR split */
    mm_sticky_kind sticky_kind;
    char          *sticky_key; /* header name (lowercase) or body field */
    char         **fallback;   size_t nfallback;  /* names of other models */
    mm_timeouts_cfg timeouts;
    mm_health_cfg  health;
    mm_breaker_cfg breaker;
    int            retries;           /* 2 */
    int            max_requests;      /* per backend in flight; 0 = unlimited */
    int            max_queue;         /* waiting requests per model; 0 = no queue */
    int            queue_timeout_ms;  /* 30000 */
} mm_model_cfg;

typedef struct mm_redis_cfg {
    char *url;           /* "redis://[:password@]host:port/db"; NULL = no Redis */
    char *host;
    int   port;
    int   db;
    char *username;      /* Redis 6 ACL user from "redis://user:pw@..."; NULL = default */
    char *password;
    int   flush_ms;      /* 1000 */
    char *prefix;        /* "modelmux" */
    int   ttl_s;         /* 86400: TTL of per-minute keys */
} mm_redis_cfg;

typedef struct mm_gateway_cfg {
    char  *listen_host;  int listen_port;   /* "listen": "127.0.0.1:8000" */
    char  *admin_host;   int admin_port;    /* "admin_listen"; admin_port 0 = none */
    char  *admin_token;  /* required when admin_host is not loopback */
    int    threads;      /* "threads": N or "auto" (0 here = auto = cores) */
    size_t max_body_bytes;    /* "max_body_bytes": 16 MiB */
    size_t max_header_bytes;  /* "max_header_bytes": 64 KiB */
    size_t max_response_bytes;/* buffered non-streaming answers: 64 MiB */
    int    client_timeout_ms; /* idle keep-alive / slow client: 60000 */
    char  *access_log;   /* path, "-" for stdout, NULL off */
    mm_model_cfg *models; size_t nmodels;
    mm_model_cfg *default_pool; /* NULL when absent; name is "" */
    mm_redis_cfg  redis;
    int    shutdown_grace_ms;  /* 30000 */
} mm_gateway_cfg;

/* Parse and validate. On error returns -EINVAL with "path: reason" in err
 * (and *out NULL); I/O errors return -errno with the file name in err. */
int  mm_config_load_file(const char *path, mm_gateway_cfg **out, char *err, size_t errlen);
int  mm_config_load_string(const char *json, mm_gateway_cfg **out, char *err, size_t errlen);
void mm_config_free(mm_gateway_cfg *cfg);

/* Lookups used by the router. */
const mm_model_cfg *mm_config_find_model(const mm_gateway_cfg *cfg, const char *name);
#endif
