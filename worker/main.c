/* main.c: modelmux-worker, one process serving one model.
 *
 * The listener comes up first and answers /health with 503 "loading" while
 * a background thread loads the weights, the tokenizer and the chat
 * template and builds the backend and the engine; then the API switches to
 * serving. Flag names are vLLM's, so a fleet can launch either. */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "api.h"
#include "backend.h"
#include "engine.h"
#include "httpd.h"
#include "log.h"
#include "makemodel.h"
#include "model.h"
#include "template.h"
#include "tokenizer.h"

#define PROG "modelmux-worker"
/* Files a model directory's text metadata may not exceed. */
#define META_MAX (64u << 20)

typedef struct worker_opts {
    const char *model;
    const char *names[MM_API_MAX_NAMES];
    int         n_names;
    const char *host;
    int         port;
    const char *device;
    const char *dtype;
    int         max_model_len;   /* 0: the model's max_position_embeddings */
    int         max_num_seqs;    /* 0 until given: the device picks the default */
    int         max_batched;     /* --max-num-batched-tokens, likewise */
    int         block_size;      /* --block-size: positions per KV block */
    int         num_blocks;      /* --num-gpu-blocks-override; 0 = the backend sizes the pool */
    int         tp;
    double      gpu_util;
    long long   seed;
    int         threads;
} worker_opts;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: " PROG " --model DIR [options]\n"
        "       " PROG " --make-model DIR [--arch qwen2|llama|mistral] [--layers N] [--hidden N]\n"
        "              [--heads N] [--kv-heads N] [--head-dim N] [--intermediate N] [--vocab N]\n"
        "              [--max-pos N] [--seed N] [--tie|--no-tie] [--llama3-rope] [--rope-theta F]\n"
        "              [--std F] [--dtype bf16|f16|f32] [--merges N]\n"
        "options (vLLM's names):\n"
        "  --model DIR                    Hugging Face model directory (required)\n"
        "  --served-model-name NAME...    names clients use (default: DIR's last component)\n"
        "  --host H                       listen address (default 0.0.0.0)\n"
        "  --port P                       listen port (default 8000; 0 = any free port)\n"
        "  --device cpu|cuda|auto         (default cpu; auto: cuda if a GPU is visible)\n"
        "  --dtype auto|bfloat16|float16|float32   (default auto)\n"
        "  --max-model-len N              context length (default: the model's)\n"
        "  --max-num-seqs N               sequences in a batch at once (default 16 on cpu,\n"
        "                                 256 on cuda)\n"
        "  --max-num-batched-tokens N     tokens per forward step (default 512 on cpu,\n"
        "                                 2048 on cuda)\n"
        "  --block-size N                 positions per KV-cache block, 1..256 (default 16)\n"
        "  --num-gpu-blocks-override N    KV-cache blocks in the pool (default: cpu, enough for\n"
        "                                 every sequence at --max-model-len; cuda, what\n"
        "                                 --gpu-memory-utilization leaves); fewer means\n"
        "                                 preemption when the pool runs out\n"
        "  --tensor-parallel-size N       GPUs to split the model over (cuda; default 1)\n"
        "  --gpu-memory-utilization F     (0, 1] share of GPU memory to use (default 0.9;\n"
        "                                 unused on cpu)\n"
        "  --seed N                       seeds requests that bring no seed (default 0)\n"
        "  --threads N                    CPU threads (default: one per core)\n"
        "  --trust-remote-code, --disable-log-requests, --disable-log-stats   accepted, no effect\n"
        "  -v, --verbose                  debug logging\n"
        "  -h, --help                     this help\n");
}

static int bad_flag(const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, PROG ": ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    fprintf(stderr, "run '" PROG " --help' for the options\n");
    return 2;
}

static int parse_ll(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    if (!s || !*s)
        return -EINVAL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -EINVAL;
    *out = v;
    return 0;
}

/* ---- --make-model ---- */

static int make_model(int argc, char **argv, int i)
{
    const char *dir = argv[i];
    mm_makemodel_opts o;
    mm_makemodel_defaults(&o);
    char err[512] = "";
    for (i++; i < argc; i++) {
        const char *flag = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        int n = mm_makemodel_arg(&o, flag, val, err, sizeof err);
        if (n < 0)
            return bad_flag("--make-model: %s%s", err, "");
        i += n;
    }
    if (mm_makemodel(dir, &o, err, sizeof err) < 0) {
        fprintf(stderr, PROG ": --make-model %s: %s\n", dir, err);
        return 1;
    }
    printf("%s: %s model, %d layers, hidden %d, vocab %d, seed %llu\n", dir, o.arch, o.layers,
           o.hidden, o.vocab, (unsigned long long)o.seed);
    return 0;
}

/* ---- flags ---- */

/* Returns -1 to go on, else the exit status. */
static int parse_args(int argc, char **argv, worker_opts *w)
{
    memset(w, 0, sizeof *w);
    w->host = "0.0.0.0";
    w->port = 8000;
    w->device = "cpu";
    w->dtype = "auto";
    w->block_size = 16;
    w->tp = 1;
    w->gpu_util = 0.9;
    for (int i = 1; i < argc; i++) {
        char flagbuf[64];
        const char *a = argv[i], *v = NULL;
        const char *eq = strncmp(a, "--", 2) == 0 ? strchr(a, '=') : NULL;
        if (eq) {
            size_t n = (size_t)(eq - a);
            if (n >= sizeof flagbuf)
                return bad_flag("unknown flag '%s'%s", a, "");
            memcpy(flagbuf, a, n);
            flagbuf[n] = '\0';
            v = eq + 1;
            a = flagbuf;
        }
        long long x;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            mm_log_set_level(MM_LOG_DEBUG);
            continue;
        }
        if (strcmp(a, "--trust-remote-code") == 0 || strcmp(a, "--disable-log-requests") == 0 ||
            strcmp(a, "--disable-log-stats") == 0)
            continue;
        if (strcmp(a, "--make-model") == 0) {
            if (v || i + 1 >= argc)
                return bad_flag("%s needs a directory%s", a, "");
            if (i != 1)
                return bad_flag("--make-model must come first%s%s", "", "");
            return make_model(argc, argv, i + 1);
        }
        /* Every other flag takes a value. */
        static const char *const valued[] = {
            "--model", "--served-model-name", "--host", "--port", "--device", "--dtype",
            "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
            "--tensor-parallel-size", "-tp", "--gpu-memory-utilization", "--seed",
            "--block-size", "--num-gpu-blocks-override", "--threads"};
        size_t k = 0;
        while (k < sizeof valued / sizeof valued[0] && strcmp(a, valued[k]))
            k++;
        if (k == sizeof valued / sizeof valued[0])
            return bad_flag(a[0] == '-' ? "unknown flag '%s'%s" : "unexpected argument '%s'%s",
                            a, "");
        if (!v) {
            if (i + 1 >= argc)
                return bad_flag("%s needs a value%s", a, "");
            v = argv[++i];
        }
        if (strcmp(a, "--model") == 0) {
            w->model = v;
        } else if (strcmp(a, "--served-model-name") == 0) {
            w->n_names = 0;
            for (;;) {
                if (!*v || strlen(v) > 256 || strpbrk(v, " \t\r\n"))
                    return bad_flag("--served-model-name: invalid name '%s'%s", v, "");
                if (w->n_names == MM_API_MAX_NAMES)
                    return bad_flag("--served-model-name: at most 8 names%s%s", "", "");
                w->names[w->n_names++] = v;
                if (eq || i + 1 >= argc || argv[i + 1][0] == '-')
                    break;
                v = argv[++i];
            }
        } else if (strcmp(a, "--host") == 0) {
            w->host = v;
        } else if (strcmp(a, "--port") == 0) {
            if (parse_ll(v, 0, 65535, &x))
                return bad_flag("--port: expected 0..65535, got '%s'%s", v, "");
            w->port = (int)x;
        } else if (strcmp(a, "--device") == 0) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda") && strcmp(v, "auto"))
                return bad_flag("--device: expected cpu or cuda, got '%s'%s", v, "");
            /* auto: the GPU when this build has the CUDA backend and one is
             * visible, else the CPU */
            w->device = strcmp(v, "auto") != 0 ? v : mm_backend_cuda_available() ? "cuda" : "cpu";
        } else if (strcmp(a, "--dtype") == 0) {
            if (strcmp(v, "auto") && strcmp(v, "bfloat16") && strcmp(v, "float16") &&
                strcmp(v, "float32") && strcmp(v, "half") && strcmp(v, "float"))
                return bad_flag("--dtype: expected auto, bfloat16, float16 or float32, got '%s'%s",
                                v, "");
            w->dtype = v;
        } else if (strcmp(a, "--max-model-len") == 0) {
            if (parse_ll(v, 1, 1 << 24, &x))
                return bad_flag("--max-model-len: expected 1..16777216, got '%s'%s", v, "");
            w->max_model_len = (int)x;
        } else if (strcmp(a, "--max-num-seqs") == 0) {
            if (parse_ll(v, 1, 4096, &x))
                return bad_flag("--max-num-seqs: expected 1..4096, got '%s'%s", v, "");
            w->max_num_seqs = (int)x;
        } else if (strcmp(a, "--max-num-batched-tokens") == 0) {
            if (parse_ll(v, 1, 1 << 20, &x))
                return bad_flag("--max-num-batched-tokens: expected 1..1048576, got '%s'%s", v, "");
            w->max_batched = (int)x;
        } else if (strcmp(a, "--tensor-parallel-size") == 0 || strcmp(a, "-tp") == 0) {
            if (parse_ll(v, 1, 1024, &x))
                return bad_flag("--tensor-parallel-size: expected 1..1024, got '%s'%s", v, "");
            w->tp = (int)x;
        } else if (strcmp(a, "--gpu-memory-utilization") == 0) {
            char *end;
            errno = 0;
            double d = strtod(v, &end);
            if (errno || end == v || *end || !(d > 0 && d <= 1))
                return bad_flag("--gpu-memory-utilization: expected a number in (0, 1], got "
                                "'%s'%s", v, "");
            w->gpu_util = d;
        } else if (strcmp(a, "--seed") == 0) {
            if (parse_ll(v, 0, INT64_MAX, &x))
                return bad_flag("--seed: expected a non-negative integer, got '%s'%s", v, "");
            w->seed = x;
        } else if (strcmp(a, "--block-size") == 0) {
            if (parse_ll(v, 1, 256, &x))
                return bad_flag("--block-size: expected 1..256, got '%s'%s", v, "");
            w->block_size = (int)x;
        } else if (strcmp(a, "--num-gpu-blocks-override") == 0) {
            if (parse_ll(v, 1, 1 << 30, &x))
                return bad_flag("--num-gpu-blocks-override: expected 1..1073741824, got '%s'%s",
                                v, "");
            w->num_blocks = (int)x;
        } else {  /* --threads: the last of the valued flags */
            if (parse_ll(v, 0, 1024, &x))
                return bad_flag("--threads: expected 0..1024, got '%s'%s", v, "");
            w->threads = (int)x;
        }
    }
    if (!w->model)
        return bad_flag("--model DIR is required%s%s", "", "");
    int cuda = strcmp(w->device, "cuda") == 0;
    if (cuda && !mm_backend_cuda_built()) {
        fprintf(stderr, PROG ": --device cuda: CUDA backend not available in this build\n");
        return 2;
    }
    if (w->tp > 1 && !cuda) {
        fprintf(stderr, PROG ": --tensor-parallel-size %d: the cpu device runs on one process "
                "(tensor parallelism needs the CUDA backend)\n", w->tp);
        return 2;
    }
    /* vLLM's defaults on a GPU; the CPU backend computes a step's tokens
     * far more slowly, so it batches fewer. */
    if (!w->max_num_seqs)
        w->max_num_seqs = cuda ? 256 : 16;
    if (!w->max_batched)
        w->max_batched = cuda ? 2048 : 512;
    return -1;
}

/* The default served name: the directory's last component. */
static const char *dir_basename(const char *dir, char *buf, size_t n)
{
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && dir[start - 1] != '/')
        start--;
    size_t k = len - start;
    if (k >= n)
        k = n - 1;
    memcpy(buf, dir + start, k);
    buf[k] = '\0';
    return buf;
}

/* ---- loading (background thread) ---- */

typedef struct loader {
    const worker_opts *w;
    mm_api            *api;
    int                max_model_len;
    struct event      *done_ev;
    struct event      *dead_ev;    /* the engine reported its device lost */
    /* results */
    int                rc;
    char               err[1024];
    mm_model          *model;
    mm_tokenizer      *tok;
    mm_template       *tpl;
    char               tpl_err[600];
    json_t            *specials;
    mm_backend        *be;
    mm_engine         *engine;
    pthread_t          thread;
    int                joined;
} loader;

static int read_file(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    mm_buf b;
    mm_buf_init(&b, META_MAX);
    *out = NULL;
    int rc = mm_buf_read_file(&b, path, err, errlen);
    if (rc) {
        mm_buf_free(&b);
        return rc;
    }
    *out = b.data ? b.data : calloc(1, 1);
    *len = b.len;
    return *out ? 0 : -ENOMEM;
}

/* The chat template: chat_template.jinja when present (what transformers
 * saves today), else tokenizer_config.json's chat_template. A missing or
 * unusable template is not fatal: chat requests get a 400 saying why. */
static void load_template(loader *L, const char *dir)
{
    char path[4096], err[512] = "";
    char *text = NULL;
    size_t len = 0;
    json_t *cfg = NULL;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (read_file(path, &text, &len, err, sizeof err) == 0) {
        json_error_t je;
        /* Llama-3 writes model_max_length as 1e30 in integer notation,
         * beyond json_int_t: read integers as doubles (only strings are
         * used from this file) so such a file still parses. */
        cfg = json_loadb(text, len, JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg)
            mm_warn("%s: %s (line %d)", path, je.text, je.line);
        free(text);
        text = NULL;
    }
    if (cfg && mm_chat_special_tokens(cfg, &L->specials, err, sizeof err) < 0) {
        mm_warn("%s: %s", path, err);
        L->specials = NULL;
    }
    const char *src = NULL;
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    if (read_file(path, &text, &len, err, sizeof err) == 0) {
        src = text;
    } else if (!cfg) {
        snprintf(L->tpl_err, sizeof L->tpl_err, "no tokenizer_config.json in %s", dir);
    } else if (mm_chat_template_source(cfg, NULL, &src, err, sizeof err) < 0) {
        snprintf(L->tpl_err, sizeof L->tpl_err, "tokenizer_config.json: %s", err);
        src = NULL;
    }
    if (src && mm_template_compile(src, &L->tpl, err, sizeof err) < 0) {
        snprintf(L->tpl_err, sizeof L->tpl_err, "the chat template does not compile: %s", err);
        mm_warn("%s", L->tpl_err);
        L->tpl = NULL;
    }
    free(text);
    json_decref(cfg);
}

/* The engine's "something was published" (its thread): wake the API,
 * and the main loop too once the engine is dead. */
static void worker_notify(void *arg)
{
    loader *L = arg;
    mm_api_notify(L->api);
    if (mm_engine_dead(L->engine, NULL, 0))
        event_active(L->dead_ev, EV_READ, 1);
}

static void *load_main(void *arg)
{
    loader *L = arg;
    const worker_opts *w = L->w;
    char path[4096];
    uint64_t t0 = mm_now_ns();
    /* A test hook: hold the "loading" state long enough to observe it. */
    const char *delay = getenv("MM_WORKER_TEST_LOAD_DELAY_MS");
    long long ms;
    if (delay && parse_ll(delay, 0, 600000, &ms) == 0 && ms > 0) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
    }
    mm_info("loading %s", w->model);
    int last_pct = -100;
    mm_model_load_opts lo = {.progress = mm_model_progress_stderr, .progress_ud = &last_pct};
    if ((L->rc = mm_model_load(w->model, &lo, &L->model, L->err, sizeof L->err)) < 0)
        goto out;
    snprintf(path, sizeof path, "%s/tokenizer.json", w->model);
    if ((L->rc = mm_tokenizer_load(path, &L->tok, L->err, sizeof L->err)) < 0)
        goto out;
    load_template(L, w->model);
    mm_backend_opts bo = {.max_seqs = w->max_num_seqs, .max_len = L->max_model_len,
                          .threads = w->threads, .gpu_memory_utilization = (float)w->gpu_util,
                          .tensor_parallel = w->tp, .block_size = w->block_size,
                          .num_blocks = w->num_blocks};
    if (strcmp(w->device, "cuda") == 0)
        L->rc = mm_backend_cuda_new(L->model, &bo, &L->be, L->err, sizeof L->err);
    else
        L->rc = mm_backend_cpu_new(L->model, &bo, &L->be, L->err, sizeof L->err);
    if (L->rc < 0)
        goto out;
    /* A test hook: lose the "device" after this many steps (backend_fault.c). */
    const char *fault = getenv("MM_WORKER_TEST_FAULT_STEPS");
    long long steps;
    if (fault && parse_ll(fault, 0, 1000000000, &steps) == 0) {
        mm_backend *wrapped = NULL;
        if ((L->rc = mm_backend_fault_wrap(L->be, (long)steps, &wrapped, L->err,
                                           sizeof L->err)) < 0)
            goto out;
        L->be = wrapped;
        mm_warn("MM_WORKER_TEST_FAULT_STEPS=%lld: every step after that many fails as on a "
                "lost device", steps);
    }
    mm_engine_opts eo = {.step_tokens = w->max_batched, .seed = (uint64_t)w->seed,
                         .notify = worker_notify, .notify_ud = L};
    if ((L->rc = mm_engine_new(L->be, L->tok, &L->model->cfg, &eo, &L->engine, L->err,
                               sizeof L->err)) < 0 ||
        (L->rc = mm_engine_start(L->engine, L->err, sizeof L->err)) < 0)
        goto out;
    mm_info("model ready in %.2f s: %s, %d layers, hidden %d, vocab %d, max_model_len %d, "
            "max_num_seqs %d, %s backend, KV cache %d blocks of %d positions",
            (double)(mm_now_ns() - t0) / 1e9, L->model->cfg.architecture,
            L->model->cfg.num_hidden_layers, L->model->cfg.hidden_size,
            L->model->cfg.vocab_size, L->max_model_len, w->max_num_seqs, L->be->ops->name,
            L->be->num_blocks, L->be->block_size);
out:
    event_active(L->done_ev, EV_READ, 1);
    return NULL;
}

static void loader_free(loader *L)
{
    mm_engine_free(L->engine);
    if (L->be)
        L->be->ops->free(L->be);
    mm_template_free(L->tpl);
    json_decref(L->specials);
    mm_tokenizer_free(L->tok);
    mm_model_free(L->model);
}

/* ---- the event loop ---- */

typedef struct worker {
    struct event_base *base;
    mm_api            *api;
    loader             L;
    int                exit_code;
    int                lost;      /* the device can run no step again */
} worker;

static void loaded_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker *W = arg;
    pthread_join(W->L.thread, NULL);
    W->L.joined = 1;
    if (W->L.rc < 0) {
        mm_error("cannot load the model: %s", W->L.err);
        W->exit_code = 1;
        event_base_loopbreak(W->base);
        return;
    }
    mm_api_runtime rt = {.engine = W->L.engine, .tok = W->L.tok, .cfg = &W->L.model->cfg,
                         .tpl = W->L.tpl, .tpl_err = W->L.tpl_err[0] ? W->L.tpl_err : NULL,
                         .specials = W->L.specials, .max_model_len = W->L.max_model_len};
    mm_api_set_ready(W->api, &rt);
}

/* The device is lost for good: the engine failed every request it held
 * and refuses new ones; /health says 503. Exit 1 shortly (the error
 * responses get out first) so that a supervisor - the gateway's fleet,
 * systemd, Kubernetes - starts a fresh process on a fresh device context. */
static void dead_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker *W = arg;
    char msg[320] = "";
    mm_engine_dead(W->L.engine, msg, sizeof msg);
    mm_error("%s: the device cannot run again; exiting so that the worker is restarted", msg);
    W->exit_code = 1;
    W->lost = 1;
    struct timeval flush = {0, 300 * 1000};
    event_base_loopexit(W->base, &flush);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    worker *W = arg;
    mm_info("signal %d: shutting down", (int)sig);
    event_base_loopbreak(W->base);
}

/* config.json is read up front so that a --max-model-len beyond the
 * model's is a flag error (exit 2) before anything is served. */
static int check_model_dir(worker_opts *w, int *max_len)
{
    char path[4096], err[512] = "", *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/config.json", w->model);
    if (read_file(path, &text, &len, err, sizeof err) < 0) {
        fprintf(stderr, PROG ": --model %s: %s\n", w->model, err);
        return 2;
    }
    mm_model_config c;
    int rc = mm_model_config_parse(text, len, path, &c, err, sizeof err);
    free(text);
    if (rc < 0) {
        fprintf(stderr, PROG ": %s\n", err);
        return 1;
    }
    int limit = c.max_position_embeddings > 0 ? c.max_position_embeddings : 2048;
    if (w->max_model_len > limit) {
        fprintf(stderr, PROG ": --max-model-len %d exceeds the model's max_position_embeddings "
                "(%d)\n", w->max_model_len, limit);
        return 2;
    }
    *max_len = w->max_model_len ? w->max_model_len : limit;
    if (strcmp(w->dtype, "auto") != 0 && strcmp(w->device, "cpu") == 0)
        mm_info("--dtype %s: the cpu backend computes in float32 over the stored %s weights",
                w->dtype, c.dtype[0] ? c.dtype : "(unknown)");
    return -1;
}

int main(int argc, char **argv)
{
    worker_opts w;
    int rc = parse_args(argc, argv, &w);
    if (rc >= 0)
        return rc;
    char namebuf[257];
    if (w.n_names == 0)
        w.names[w.n_names++] = dir_basename(w.model, namebuf, sizeof namebuf);
    int max_len = 0;
    if ((rc = check_model_dir(&w, &max_len)) >= 0)
        return rc;

    signal(SIGPIPE, SIG_IGN);
    if (evthread_use_pthreads() < 0) {
        fprintf(stderr, PROG ": libevent threading unavailable\n");
        return 1;
    }
    worker W;
    memset(&W, 0, sizeof W);
    char err[1024] = "";
    mm_httpd *h = NULL;
    struct event *sigterm = NULL, *sigint = NULL;
    W.base = event_base_new();
    if (!W.base) {
        fprintf(stderr, PROG ": cannot create the event loop\n");
        return 1;
    }
    mm_api_opts ao = {.n_names = w.n_names, .model_dir = w.model, .max_model_len = max_len};
    memcpy(ao.names, w.names, sizeof ao.names);
    mm_httpd_limits lim = {.max_header_bytes = 64 * 1024, .max_body_bytes = MM_API_MAX_BODY,
                           .idle_timeout_ms = 120000, .max_pipelined_bytes = 0};
    W.exit_code = 1;
    if (mm_api_new(W.base, &ao, &W.api, err, sizeof err) < 0 ||
        mm_httpd_new(W.base, &lim, mm_api_handle, W.api, &h) < 0 ||
        mm_httpd_listen(h, w.host, w.port, 0, err, sizeof err) < 0) {
        fprintf(stderr, PROG ": %s\n", err[0] ? err : "out of memory");
        goto out;
    }
    mm_info("serving %s as \"%s\" on http://%s:%d (loading)", w.model, w.names[0], w.host,
            mm_httpd_port(h));
    sigterm = evsignal_new(W.base, SIGTERM, signal_cb, &W);
    sigint = evsignal_new(W.base, SIGINT, signal_cb, &W);
    W.L.w = &w;
    W.L.api = W.api;
    W.L.max_model_len = max_len;
    W.L.done_ev = event_new(W.base, -1, 0, loaded_cb, &W);
    W.L.dead_ev = event_new(W.base, -1, 0, dead_cb, &W);
    if (!sigterm || !sigint || !W.L.done_ev || !W.L.dead_ev || evsignal_add(sigterm, NULL) < 0 ||
        evsignal_add(sigint, NULL) < 0) {
        fprintf(stderr, PROG ": cannot set up events\n");
        goto out;
    }
    if ((rc = pthread_create(&W.L.thread, NULL, load_main, &W.L)) != 0) {
        fprintf(stderr, PROG ": loader thread: %s\n", strerror(rc));
        W.L.joined = 1;
        goto out;
    }
    W.exit_code = 0;
    event_base_dispatch(W.base);
    /* (dead_cb set exit_code 1: a lost device) */
    if (!W.L.joined) {
        /* Interrupted while loading: the loader cannot be stopped midway
         * and owns nothing the OS will not reclaim. */
        mm_info("exiting before the model finished loading");
        _exit(W.exit_code);
    }
out:
    /* Clients first (their sequences are cancelled), then the engine. */
    mm_httpd_free(h);
    mm_engine_free(W.L.engine);
    W.L.engine = NULL;
    loader_free(&W.L);
    mm_api_free(W.api);
    if (W.L.done_ev)
        event_free(W.L.done_ev);
    if (W.L.dead_ev)
        event_free(W.L.dead_ev);
    if (sigterm)
        event_free(sigterm);
    if (sigint)
        event_free(sigint);
    event_base_free(W.base);
    /* A lost device's context may hold work that never finishes (with
     * tensor parallelism, a GPU waiting in a sum for a dead peer); the CUDA
     * runtime's exit handlers would wait for it, so skip them. */
    if (W.lost) {
        fflush(NULL);
        _exit(W.exit_code);
    }
    return W.exit_code;
}
