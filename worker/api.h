/* api.h: the worker's HTTP endpoints (OpenAI and vLLM shapes).
 *
 * Runs on the HTTP thread (common/httpd): parses and validates requests,
 * tokenizes (rendering the chat template first for chat), submits one
 * engine sequence per choice, and writes what the engine publishes back to
 * the client, streamed as SSE or whole. Before mm_api_set_ready() only
 * /health (503 "loading"), /metrics, /version and /v1/models answer; the
 * rest get 503.
 *
 *   GET  /health /version /v1/models /metrics
 *   POST /v1/completions /v1/chat/completions /tokenize /detokenize */
#ifndef MM_API_H
#define MM_API_H
#include <jansson.h>
#include <stddef.h>

#include "engine.h"
#include "httpd.h"
#include "model.h"
#include "template.h"
#include "tokenizer.h"

struct event_base;

#define MM_API_MAX_NAMES   8    /* --served-model-name values */
#define MM_API_MAX_N       16   /* n per prompt */
#define MM_API_MAX_CHOICES 64   /* prompts x n per request */
#define MM_API_MAX_PROMPTS 32   /* prompts in one completions request */
#define MM_API_MAX_BODY    (16u << 20)

typedef struct mm_api_opts {
    const char *names[MM_API_MAX_NAMES]; /* served names; the first is the default */
    int         n_names;
    const char *model_dir;
    int         max_model_len;
} mm_api_opts;

/* What loading produced; all of it must outlive the API's use of it. */
typedef struct mm_api_runtime {
    mm_engine             *engine;
    const mm_tokenizer    *tok;
    const mm_model_config *cfg;
    const mm_template     *tpl;      /* NULL: no usable chat template */
    const char            *tpl_err;  /* why not (the 400 chat requests get) */
    const json_t          *specials; /* special_tokens_map (bos_token, ...) or NULL */
    int                    max_model_len;
} mm_api_runtime;

typedef struct mm_api mm_api;

int  mm_api_new(struct event_base *base, const mm_api_opts *o, mm_api **out, char *err,
                size_t errlen);
/* The mm_httpd handler (arg: the mm_api). */
void mm_api_handle(mm_http_exchange *ex, void *arg);
/* Loading finished: serve. Called on the HTTP thread. */
void mm_api_set_ready(mm_api *a, const mm_api_runtime *rt);
/* The engine's notify callback: safe from any thread. */
void mm_api_notify(void *api);
/* Pick up engine output now (the notify event's work; also for shutdown). */
void mm_api_poll(mm_api *a);
void mm_api_free(mm_api *a);
#endif
