/* fleet.c: spawn and supervise the workers of "launch" backends (fleet.h,
 * docs/FLEET.md).
 *
 * Every state change happens on the fleet's loop or, once that loop has
 * stopped, in mm_fleet_stop_all; the mutex only orders those against
 * mm_fleet_status and the hand-over of a new spec list by mm_fleet_sync.
 * Freeing libevent events from a thread other than the loop's could wait
 * forever on a callback that waits on our mutex, which is why mm_fleet_sync
 * only hands its copy over instead of applying it itself. */
#include "fleet.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"

extern char **environ;

#define FL_LINE_MAX      4096   /* a longer output line is split in pieces */
#define FL_MMLOG_PIECE   1536   /* what fits one mm_log line with its prefix */
#define FL_MAX_GPU       1024   /* as the config loader's bound */
#define FL_GPU_WORDS     (FL_MAX_GPU / 64)
#define FL_KILL_WAIT_MS  5000   /* stop_all: how long SIGKILLed processes may take */
#define FL_PROBE_TIMEOUT_MS 1000
#define FL_MAX_FD_LOOP   65536  /* close loop bound when close_range is missing */

enum { FL_STARTING, FL_RUNNING, FL_RESTARTING, FL_FAILED, FL_DRAINING, FL_STOPPED };
static const char *const fl_state_names[] = {"starting", "running", "restarting",
                                              "failed",   "draining", "stopped"};

/* Why a live worker was sent SIGTERM: decides what its exit leads to. */
enum { FL_KILL_NONE, FL_KILL_RESTART, FL_KILL_STOP };

/* A worker's identity: a change to any field is a different worker. */
typedef struct fl_spec {
    char  *model;        /* public model name; "" for default_pool */
    char  *served;       /* the backend's served_model, or NULL */
    char  *dir;          /* launch.model, or NULL */
    char  *gpus;         /* never NULL: "" when absent */
    char  *device;       /* NULL when absent */
    int    port;
    char **args;    size_t nargs;
    char **command; size_t ncommand;
    int    share_gpus;
} fl_spec;

/* What may change under a running worker without touching it. */
typedef struct fl_live {
    char  *url;          /* the backend's url: the drain probe's key */
    char  *health_path;  /* NULL: checks disabled, ready once started */
    char   probe_ip[INET_ADDRSTRLEN];
    size_t index;        /* backend index within its model */
    int    startup_timeout_ms;
} fl_live;

typedef struct fl_want {
    fl_spec spec;
    fl_live live;
    int     taken;
} fl_want;

typedef struct fl_worker {
    mm_fleet *f;
    unsigned  id;
    fl_spec   spec;
    fl_live   live;
    uint64_t  gpumask[FL_GPU_WORDS];
    size_t    ngpus;
    char    **argv;          /* NULL-terminated, owned strings */
    char     *env_gpus;      /* "CUDA_VISIBLE_DEVICES=..." */
    int       state;
    int       removed;       /* no longer in the config: never restarted */
    int       ready;
    pid_t     pid;           /* 0 when no process */
    int       kill_why;
    int       term_sent, kill_sent;
    int64_t   term_at, started_mono, started_wall, ready_at, drain_deadline;
    int       restarts, crashes;
    int       has_exit, exit_known, exit_code, exit_signal;
    struct event *timer;
    int       log_fd;
    pid_t     log_pid;       /* pid shown on lines of the open pipe */
    struct event *log_ev;
    char      line[FL_LINE_MAX];
    size_t    line_len;
    int       probe_fd, probe_sent;
    struct event *probe_ev;
    char      probe_buf[16];
    size_t    probe_len;
} fl_worker;

struct mm_fleet {
    struct event_base *base;
    pthread_mutex_t lock;
    char          *worker_path;
    mm_fleet_opts  o;
    mm_fleet_in_flight_fn in_flight;
    void          *in_flight_arg;
    mm_fleet_log_fn sink;
    void          *sink_arg;
    struct event  *child_ev, *sync_ev, *reap_timer;
    fl_worker    **w;
    size_t         nw, cap;
    fl_want       *pending;
    size_t         npending;
    int            has_pending;
    unsigned       next_id;
    int            stopped;
};

static char env_order[] = "CUDA_DEVICE_ORDER=PCI_BUS_ID";

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fl_log(mm_fleet *f, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fl_log(mm_fleet *f, int level, const char *fmt, ...)
{
    char line[FL_LINE_MAX + 512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (f->sink)
        f->sink(f->sink_arg, level, line);
    else
        mm_log(level, "%s", line);
}

static const char *w_model(const fl_worker *w)
{
    return w->spec.model[0] ? w->spec.model : "default_pool";
}

static void w_arm(fl_worker *w, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(w->timer, &tv);
}

/* ---- specs ---------------------------------------------------------- */

static void strv_free(char **v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

static int strv_dup(char *const *src, size_t n, char ***dst)
{
    *dst = NULL;
    if (!n)
        return 0;
    char **v = calloc(n, sizeof *v);
    if (!v)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (!(v[i] = strdup(src[i]))) {
            strv_free(v, n);
            return -ENOMEM;
        }
    }
    *dst = v;
    return 0;
}

static int strv_eq(char *const *a, size_t na, char *const *b, size_t nb)
{
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a[i], b[i]) != 0)
            return 0;
    return 1;
}

static int str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int dup_opt(const char *s, char **out)
{
    *out = NULL;
    return s && !(*out = strdup(s)) ? -ENOMEM : 0;
}

static void spec_free(fl_spec *s)
{
    free(s->model);
    free(s->served);
    free(s->dir);
    free(s->gpus);
    free(s->device);
    strv_free(s->args, s->nargs);
    strv_free(s->command, s->ncommand);
    memset(s, 0, sizeof *s);
}

static void live_free(fl_live *l)
{
    free(l->url);
    free(l->health_path);
    memset(l, 0, sizeof *l);
}

static int spec_eq(const fl_spec *a, const fl_spec *b)
{
    return strcmp(a->model, b->model) == 0 && str_eq(a->served, b->served) &&
           str_eq(a->dir, b->dir) && strcmp(a->gpus, b->gpus) == 0 &&
           str_eq(a->device, b->device) && a->port == b->port &&
           a->share_gpus == b->share_gpus && strv_eq(a->args, a->nargs, b->args, b->nargs) &&
           strv_eq(a->command, a->ncommand, b->command, b->ncommand);
}

static int want_copy(fl_want *d, const mm_model_cfg *m, size_t index, const mm_backend_cfg *b)
{
    const mm_launch_cfg *l = b->launch;
    struct in_addr tmp;
    int rc = 0;
    d->spec.port = l->port;
    d->spec.share_gpus = l->share_gpus;
    d->live.index = index;
    d->live.startup_timeout_ms = l->startup_timeout_ms > 0 ? l->startup_timeout_ms : 600000;
    /* The worker is local; a url naming this machine by an IPv4 literal is
     * probed there, anything else on loopback. */
    snprintf(d->live.probe_ip, sizeof d->live.probe_ip, "%s",
             b->host && inet_pton(AF_INET, b->host, &tmp) == 1 ? b->host : "127.0.0.1");
    if (!(d->spec.model = strdup(m->name ? m->name : "")) ||
        !(d->spec.gpus = strdup(l->gpus ? l->gpus : "")))
        rc = -ENOMEM;
    if (!rc)
        rc = dup_opt(b->served_model, &d->spec.served);
    if (!rc)
        rc = dup_opt(l->model, &d->spec.dir);
    if (!rc)
        rc = dup_opt(l->device, &d->spec.device);
    if (!rc && (rc = strv_dup(l->args, l->nargs, &d->spec.args)) == 0)
        d->spec.nargs = l->nargs;
    if (!rc && (rc = strv_dup(l->command, l->ncommand, &d->spec.command)) == 0)
        d->spec.ncommand = l->ncommand;
    if (!rc)
        rc = dup_opt(b->url, &d->live.url);
    if (!rc && m->health.enabled)
        rc = dup_opt(m->health.path ? m->health.path : "/health", &d->live.health_path);
    return rc;
}

static void wants_free(fl_want *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++) {
        spec_free(&v[i].spec);
        live_free(&v[i].live);
    }
    free(v);
}

static size_t count_launches(const mm_model_cfg *m)
{
    size_t n = 0;
    for (size_t i = 0; m && i < m->nbackends; i++)
        n += m->backends[i].launch != NULL;
    return n;
}

static int add_wants(fl_want *v, size_t *n, const mm_model_cfg *m)
{
    for (size_t i = 0; m && i < m->nbackends; i++) {
        if (!m->backends[i].launch)
            continue;
        int rc = want_copy(&v[(*n)++], m, i, &m->backends[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* "0,2" -> bits; the loader validated the syntax, so bad pieces are skipped. */
static size_t gpus_mask(const char *s, uint64_t *mask)
{
    size_t n = 0;
    memset(mask, 0, FL_GPU_WORDS * sizeof *mask);
    while (*s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end != s && !errno && v >= 0 && v < FL_MAX_GPU) {
            uint64_t bit = 1ull << (v % 64);
            if (!(mask[v / 64] & bit))
                n++;
            mask[v / 64] |= bit;
        }
        s = end == s ? s + 1 : end;
        if (*s == ',')
            s++;
    }
    return n;
}

static int spec_cpu(const fl_spec *s)
{
    return s->device && strcmp(s->device, "cpu") == 0;
}

/* ---- command lines -------------------------------------------------- */

static int argv_push(char ***v, size_t *n, const char *s)
{
    char **nv = realloc(*v, (*n + 2) * sizeof **v);
    if (!nv)
        return -ENOMEM;
    *v = nv;
    if (!(nv[*n] = strdup(s)))
        return -ENOMEM;
    nv[++*n] = NULL;
    return 0;
}

static const char *w_device(const fl_worker *w)
{
    if (w->spec.device)
        return w->spec.device;
    return w->ngpus ? "cuda" : "cpu";
}

/* modelmux-worker's flags are vLLM's, so "command" users can copy them. */
static int build_argv(fl_worker *w, const char *worker_path)
{
    const fl_spec *s = &w->spec;
    char **v = NULL, num[32];
    size_t n = 0;
    int rc = 0;

    if (s->ncommand) {
        for (size_t i = 0; !rc && i < s->ncommand; i++)
            rc = argv_push(&v, &n, s->command[i]);
    } else {
        const char *served = s->served ? s->served : s->model[0] ? s->model : NULL;
        rc = argv_push(&v, &n, worker_path);
        if (!rc)
            rc = argv_push(&v, &n, "--model");
        if (!rc)
            rc = argv_push(&v, &n, s->dir ? s->dir : "");
        snprintf(num, sizeof num, "%d", s->port);
        if (!rc)
            rc = argv_push(&v, &n, "--port");
        if (!rc)
            rc = argv_push(&v, &n, num);
        if (!rc)
            rc = argv_push(&v, &n, "--host");
        if (!rc)
            rc = argv_push(&v, &n, "127.0.0.1");
        if (!rc && served)
            rc = argv_push(&v, &n, "--served-model-name");
        if (!rc && served)
            rc = argv_push(&v, &n, served);
        snprintf(num, sizeof num, "%zu", w->ngpus ? w->ngpus : 1);
        if (!rc)
            rc = argv_push(&v, &n, "--tensor-parallel-size");
        if (!rc)
            rc = argv_push(&v, &n, num);
        if (!rc)
            rc = argv_push(&v, &n, "--device");
        if (!rc)
            rc = argv_push(&v, &n, w_device(w));
    }
    for (size_t i = 0; !rc && i < s->nargs; i++)
        rc = argv_push(&v, &n, s->args[i]);
    if (rc) {
        strv_free(v, n);
        return rc;
    }
    w->argv = v;
    return 0;
}

static size_t argv_len(char *const *v)
{
    size_t n = 0;
    while (v && v[n])
        n++;
    return n;
}

/* A flag whose value is a credential (vLLM's --api-key, --hf-token) is
 * masked wherever the command line is shown. Whole words of the flag only:
 * --max-num-batched-tokens and --tokenizer are not secrets. */
static int secret_flag(const char *a, size_t n)
{
    static const char *const words[] = {"key", "token", "secret", "password", "passwd"};
    size_t i = 0;
    if (n < 2 || a[0] != '-')
        return 0;
    while (i < n) {
        while (i < n && (a[i] == '-' || a[i] == '_'))
            i++;
        size_t s = i;
        while (i < n && a[i] != '-' && a[i] != '_')
            i++;
        for (size_t k = 0; k < sizeof words / sizeof words[0]; k++)
            if (i - s == strlen(words[k]) && strncasecmp(a + s, words[k], i - s) == 0)
                return 1;
    }
    return 0;
}

/* Calls fn for each shown argument; returns nonzero when fn does. */
static int argv_shown(char *const *v, int (*fn)(void *, const char *), void *arg)
{
    char masked[256];
    int hide_next = 0;
    for (size_t i = 0; v && v[i]; i++) {
        const char *a = v[i], *eq = strchr(a, '=');
        int rc;
        if (hide_next) {
            rc = fn(arg, "***");
            hide_next = 0;
        } else if (eq && secret_flag(a, (size_t)(eq - a))) {
            snprintf(masked, sizeof masked, "%.*s=***", (int)(eq - a) > 200 ? 200 : (int)(eq - a), a);
            rc = fn(arg, masked);
        } else {
            hide_next = !eq && secret_flag(a, strlen(a));
            rc = fn(arg, a);
        }
        if (rc)
            return rc;
    }
    return 0;
}

typedef struct fl_strbuf {
    char  *p;
    size_t cap, len;
} fl_strbuf;

static int strbuf_word(void *arg, const char *s)
{
    fl_strbuf *b = arg;
    int n = snprintf(b->p + b->len, b->cap - b->len, "%s%s", b->len ? " " : "", s);
    if (n > 0)
        b->len += (size_t)n < b->cap - b->len ? (size_t)n : b->cap - b->len - 1;
    return 0;
}

static int json_word(void *arg, const char *s)
{
    return json_array_append_new(arg, json_string(s)) ? -ENOMEM : 0;
}

/* ---- process control ------------------------------------------------ */

/* The worker leads its own process group (setsid), so the whole group,
 * including anything it forked, gets the signal. ESRCH: the child has not
 * reached setsid yet, so the group does not exist; it still has the pid. */
static void group_signal(pid_t pid, int sig)
{
    if (kill(-pid, sig) != 0 && errno == ESRCH)
        kill(pid, sig);
}

/* 1 reaped (status set), 0 still running, -1 not our child any more. Only
 * this pid is waited for: other code may have children of its own. */
static int reap(pid_t pid, int *status)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0)
        return errno == EINTR ? 0 : -1;
    if (si.si_pid == 0)
        return 0;
    /* Still a zombie, so its pid (its group's id) cannot be reused yet:
     * what it left running in its group goes with it. */
    kill(-pid, SIGKILL);
    while (waitpid(pid, status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return 1;
}

/* Async-signal-safe decimal, for the child. */
static size_t fmt_uint(char *buf, unsigned v)
{
    char tmp[16];
    size_t n = 0, k = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < sizeof tmp);
    while (n)
        buf[k++] = tmp[--n];
    return k;
}

typedef struct fl_child {
    const char *path;
    char      **argv, **envp;
    int         devnull, out_fd, maxfd;
    pid_t       parent;
    const char *errmsg;
    size_t      errlen;
} fl_child;

/* Between fork and exec in a threaded parent: async-signal-safe calls only,
 * everything was prepared before fork. */
static void child_exec(const fl_child *c) __attribute__((noreturn));
static void child_exec(const fl_child *c)
{
    struct sigaction sa;
    sigset_t none;
    char num[16];
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    /* Ignored signals (the gateway ignores SIGPIPE) and the blocked mask
     * (the gateway blocks SIGTERM for sigwait) survive exec: a worker must
     * start with neither, or SIGTERM would not stop it. Dispositions first,
     * so nothing pending runs a handler of ours on unblocking. */
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        if (sigaction(s, &sa, NULL) != 0) {
            /* glibc refuses its reserved real-time signals (32, 33), which a
             * parent may still have ignored: reset those with the kernel's
             * own call. */
            struct {
                void (*handler)(int);
                unsigned long flags;
                void (*restorer)(void);
                unsigned long mask;
            } k = {SIG_DFL, 0, NULL, 0};
            syscall(SYS_rt_sigaction, s, &k, NULL, sizeof k.mask);
        }
    }
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Die with the gateway. The parent may have died before prctl: then the
     * signal never comes, and getppid() no longer is the parent. */
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != c->parent)
        _exit(126);
    /* Own session: a terminal's Ctrl-C reaches only the gateway, which
     * drains and stops workers itself; the group is what we signal. */
    if (setsid() < 0)
        _exit(126);
    if (dup2(c->devnull, STDIN_FILENO) < 0 || dup2(c->out_fd, STDOUT_FILENO) < 0 ||
        dup2(c->out_fd, STDERR_FILENO) < 0)
        _exit(126);
    if (close_range(3, ~0u, 0) != 0)
        for (int fd = 3; fd < c->maxfd; fd++)
            close(fd);
    execve(c->path, c->argv, c->envp);
    ssize_t wr = write(STDERR_FILENO, c->errmsg, c->errlen);
    wr = write(STDERR_FILENO, num, fmt_uint(num, (unsigned)errno));
    wr = write(STDERR_FILENO, "\n", 1);
    (void)wr;
    _exit(127);
}

/* execve does not search PATH; execvpe may allocate, so resolve here. */
static int resolve_exec(const char *name, char *out, size_t outlen)
{
    if (strchr(name, '/')) {
        if ((size_t)snprintf(out, outlen, "%s", name) >= outlen)
            return -ENAMETOOLONG;
        return 0;
    }
    const char *p = getenv("PATH");
    if (!p || !*p)
        p = "/usr/local/bin:/usr/bin:/bin";
    while (*p) {
        size_t dl = strcspn(p, ":");
        int n = snprintf(out, outlen, "%.*s%s%s", (int)dl, p, dl ? "/" : "./", name);
        if (n > 0 && (size_t)n < outlen && access(out, X_OK) == 0)
            return 0;
        p += dl;
        if (*p == ':')
            p++;
    }
    return -ENOENT;
}

static int pinning_var(const char *e)
{
    static const char *const names[] = {"CUDA_VISIBLE_DEVICES=", "NVIDIA_VISIBLE_DEVICES=",
                                        "ROCR_VISIBLE_DEVICES=", "HIP_VISIBLE_DEVICES=",
                                        "GPU_DEVICE_ORDINAL=",   "CUDA_DEVICE_ORDER="};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strncmp(e, names[i], strlen(names[i])) == 0)
            return 1;
    return 0;
}

/* The gateway's environment minus every variable that selects devices,
 * plus exactly this worker's GPUs, numbered as nvidia-smi numbers them. */
static char **build_env(char *gpus_entry)
{
    size_t n = 0, k = 0;
    for (char **e = environ; e && *e; e++)
        n++;
    char **envp = calloc(n + 3, sizeof *envp);
    if (!envp)
        return NULL;
    for (char **e = environ; e && *e; e++)
        if (!pinning_var(*e))
            envp[k++] = *e;
    envp[k++] = gpus_entry;
    envp[k++] = env_order;
    envp[k] = NULL;
    return envp;
}

/* The child's stdio must come from fds above 2, or dup2 onto them would be
 * a no-op that keeps FD_CLOEXEC (a gateway started with a closed stdin). */
static int fd_above_stdio(int fd)
{
    if (fd > STDERR_FILENO)
        return fd;
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    close(fd);
    return nfd;
}

static void w_log_cb(evutil_socket_t fd, short what, void *arg);

static int w_spawn(fl_worker *w)
{
    mm_fleet *f = w->f;
    char path[PATH_MAX], errmsg[PATH_MAX + 96], shown[1024];
    char **envp = NULL;
    int pfd[2] = {-1, -1}, devnull = -1, rc = 0;
    struct rlimit rl;
    fl_strbuf sb = {shown, sizeof shown, 0};
    pid_t pid;

    shown[0] = '\0';
    argv_shown(w->argv, strbuf_word, &sb);
    if ((rc = resolve_exec(w->argv[0], path, sizeof path))) {
        fl_log(f, MM_LOG_ERROR, "[%s worker#%zu] cannot start: %s: %s", w_model(w),
               w->live.index, w->argv[0], rc == -ENOENT ? "command not found" : strerror(-rc));
        return rc;
    }
    if (!(envp = build_env(w->env_gpus))) {
        rc = -ENOMEM;
        goto out;
    }
    devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0 || pipe2(pfd, O_CLOEXEC) != 0) {
        rc = -errno;
        goto out;
    }
    devnull = fd_above_stdio(devnull);
    pfd[0] = fd_above_stdio(pfd[0]);
    pfd[1] = fd_above_stdio(pfd[1]);
    if (devnull < 0 || pfd[0] < 0 || pfd[1] < 0) {
        rc = -EMFILE;
        goto out;
    }
    /* Only our end is non-blocking: a worker writing faster than the loop
     * reads is slowed down, never handed EAGAIN. */
    if (fcntl(pfd[0], F_SETFL, O_NONBLOCK) != 0) {
        rc = -errno;
        goto out;
    }
    if (!(w->log_ev = event_new(f->base, pfd[0], EV_READ | EV_PERSIST, w_log_cb, w))) {
        rc = -ENOMEM;
        goto out;
    }
    fl_child c = {
        .path = path, .argv = w->argv, .envp = envp, .devnull = devnull, .out_fd = pfd[1],
        .maxfd = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < FL_MAX_FD_LOOP
                     ? (int)rl.rlim_cur : FL_MAX_FD_LOOP,
        .parent = getpid(), .errmsg = errmsg,
    };
    c.errlen = (size_t)snprintf(errmsg, sizeof errmsg, "modelmux fleet: cannot execute %s: errno ", path);
    if (c.errlen >= sizeof errmsg)
        c.errlen = sizeof errmsg - 1;
    pid = fork();
    if (pid == 0)
        child_exec(&c);
    if (pid < 0) {
        rc = -errno;
        event_free(w->log_ev);
        w->log_ev = NULL;
        goto out;
    }
    w->log_fd = pfd[0];
    pfd[0] = -1;
    event_add(w->log_ev, NULL);
    w->pid = w->log_pid = pid;
    w->line_len = 0;
    w->started_mono = mono_ms();
    w->started_wall = wall_ms();
    w->ready = 0;
    w->term_sent = w->kill_sent = 0;
    w->kill_why = FL_KILL_NONE;
    fl_log(f, MM_LOG_INFO, "[%s worker#%zu %d] started: %s (%s)", w_model(w), w->live.index,
           (int)pid, shown, w->env_gpus);
out:
    if (rc)
        fl_log(f, MM_LOG_ERROR, "[%s worker#%zu] cannot start %s: %s", w_model(w),
               w->live.index, path, strerror(-rc));
    if (pfd[0] >= 0)
        close(pfd[0]);
    if (pfd[1] >= 0)
        close(pfd[1]);
    if (devnull >= 0)
        close(devnull);
    free(envp);
    return rc;
}

/* ---- worker output -------------------------------------------------- */

static void w_log_emit(fl_worker *w)
{
    size_t n = w->line_len;
    if (n && w->line[n - 1] == '\r')
        n--;
    /* Control bytes (terminal colours, stray NULs) must not reach the log
     * as they are: one output line stays one log line. */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)w->line[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            w->line[i] = '?';
    }
    /* mm_log cuts lines at 2 KiB; cut here instead, so nothing is lost. */
    size_t piece = w->f->sink ? FL_LINE_MAX : FL_MMLOG_PIECE, off = 0;
    do {
        size_t k = n - off < piece ? n - off : piece;
        fl_log(w->f, MM_LOG_INFO, "[%s worker#%zu %d] %.*s", w_model(w), w->live.index,
               (int)w->log_pid, (int)k, w->line + off);
        off += k;
    } while (off < n);
    w->line_len = 0;
}

static void w_log_feed(fl_worker *w, const char *p, size_t n)
{
    while (n) {
        const char *nl = memchr(p, '\n', n);
        size_t take = nl ? (size_t)(nl - p) : n, room = FL_LINE_MAX - w->line_len;
        if (take > room)
            take = room;
        memcpy(w->line + w->line_len, p, take);
        w->line_len += take;
        p += take;
        n -= take;
        if (n && *p == '\n') {
            p++;
            n--;
            w_log_emit(w);
        } else if (w->line_len == FL_LINE_MAX) {
            w_log_emit(w);
        }
    }
}

/* Reads at most rounds buffers; 1 when the pipe is finished (EOF/error). */
static int w_log_read(fl_worker *w, int rounds)
{
    char buf[8192];
    while (rounds-- > 0) {
        ssize_t n = read(w->log_fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n <= 0)
            return 1;
        w_log_feed(w, buf, (size_t)n);
    }
    return 0;
}

static void w_log_close(fl_worker *w)
{
    if (w->log_ev) {
        event_free(w->log_ev);
        w->log_ev = NULL;
    }
    if (w->log_fd >= 0) {
        close(w->log_fd);
        w->log_fd = -1;
    }
    if (w->line_len)
        w_log_emit(w);   /* a last line without its newline */
}

/* ---- readiness probe ------------------------------------------------ */

static void w_probe_close(fl_worker *w)
{
    if (w->probe_ev) {
        event_free(w->probe_ev);
        w->probe_ev = NULL;
    }
    if (w->probe_fd >= 0) {
        close(w->probe_fd);
        w->probe_fd = -1;
    }
    w->probe_sent = 0;
    w->probe_len = 0;
}

static void w_ready(fl_worker *w)
{
    w->ready = 1;
    w->ready_at = mono_ms();
    w->state = FL_RUNNING;
    event_del(w->timer);
    fl_log(w->f, MM_LOG_INFO, "[%s worker#%zu %d] ready after %lld ms", w_model(w),
           w->live.index, (int)w->pid, (long long)(w->ready_at - w->started_mono));
}

/* "HTTP/1.x NNN": 1 for 2xx, 0 otherwise, -1 when more bytes are needed. */
static int status_ok(const char *b, size_t n)
{
    if (n < 12)
        return -1;
    if (memcmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ' || b[9] < '0' || b[9] > '9' ||
        b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return 0;
    return b[9] == '2';
}

static void w_probe_cb(evutil_socket_t fd, short what, void *arg)
{
    fl_worker *w = arg;
    mm_fleet *f = w->f;
    struct timeval tv = {FL_PROBE_TIMEOUT_MS / 1000, (FL_PROBE_TIMEOUT_MS % 1000) * 1000};
    pthread_mutex_lock(&f->lock);
    if (what & EV_TIMEOUT)
        goto done;
    if (!w->probe_sent) {
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        char req[1400];
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr)
            goto done;   /* not listening yet */
        int n = snprintf(req, sizeof req,
                         "GET %s HTTP/1.0\r\nHost: %s:%d\r\nUser-Agent: modelmux-fleet\r\n\r\n",
                         w->live.health_path, w->live.probe_ip, w->spec.port);
        if (n <= 0 || (size_t)n >= sizeof req || write(fd, req, (size_t)n) != n)
            goto done;
        w->probe_sent = 1;
        event_assign(w->probe_ev, f->base, fd, EV_READ, w_probe_cb, w);
        event_add(w->probe_ev, &tv);
        pthread_mutex_unlock(&f->lock);
        return;
    }
    ssize_t n = read(fd, w->probe_buf + w->probe_len, sizeof w->probe_buf - w->probe_len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        event_add(w->probe_ev, &tv);
        pthread_mutex_unlock(&f->lock);
        return;
    }
    if (n > 0) {
        w->probe_len += (size_t)n;
        int ok = status_ok(w->probe_buf, w->probe_len);
        if (ok < 0) {
            event_add(w->probe_ev, &tv);
            pthread_mutex_unlock(&f->lock);
            return;
        }
        if (ok && w->state == FL_STARTING && w->pid > 0 && !w->term_sent) {
            w_probe_close(w);
            w_ready(w);
            pthread_mutex_unlock(&f->lock);
            return;
        }
    }
done:
    w_probe_close(w);
    pthread_mutex_unlock(&f->lock);
}

static void w_probe_start(fl_worker *w)
{
    struct sockaddr_in sa;
    struct timeval tv = {FL_PROBE_TIMEOUT_MS / 1000, (FL_PROBE_TIMEOUT_MS % 1000) * 1000};
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)w->spec.port);
    if (inet_pton(AF_INET, w->live.probe_ip, &sa.sin_addr) != 1)
        return;
    w->probe_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (w->probe_fd < 0)
        return;
    if (connect(w->probe_fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
        w_probe_close(w);
        return;
    }
    w->probe_ev = event_new(w->f->base, w->probe_fd, EV_WRITE, w_probe_cb, w);
    if (!w->probe_ev || event_add(w->probe_ev, &tv) != 0)
        w_probe_close(w);
}

/* ---- lifecycle ------------------------------------------------------ */

static void w_tick(evutil_socket_t fd, short what, void *arg);

static void w_free(fl_worker *w)
{
    if (!w)
        return;
    w_probe_close(w);
    w_log_close(w);
    if (w->timer)
        event_free(w->timer);
    spec_free(&w->spec);
    live_free(&w->live);
    strv_free(w->argv, argv_len(w->argv));
    free(w->env_gpus);
    free(w);
}

static fl_worker *w_new(mm_fleet *f, fl_want *want)
{
    fl_worker *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->f = f;
    w->pid = 0;
    w->log_fd = -1;
    w->probe_fd = -1;
    w->spec = want->spec;
    w->live = want->live;
    memset(&want->spec, 0, sizeof want->spec);
    memset(&want->live, 0, sizeof want->live);
    w->ngpus = spec_cpu(&w->spec) ? 0 : gpus_mask(w->spec.gpus, w->gpumask);
    if (!w->ngpus)
        memset(w->gpumask, 0, sizeof w->gpumask);
    size_t el = strlen(w->spec.gpus) + 32;
    w->env_gpus = malloc(el);
    w->timer = evtimer_new(f->base, w_tick, w);
    if (!w->env_gpus || !w->timer || build_argv(w, f->worker_path) != 0) {
        w_free(w);
        return NULL;
    }
    snprintf(w->env_gpus, el, "CUDA_VISIBLE_DEVICES=%s", w->ngpus ? w->spec.gpus : "");
    w->id = ++f->next_id;
    w->state = FL_STARTING;
    return w;
}

/* A new worker must not start on a port or GPU a draining one still holds. */
static int w_blocked(const fl_worker *w)
{
    mm_fleet *f = w->f;
    for (size_t i = 0; i < f->nw; i++) {
        const fl_worker *o = f->w[i];
        if (o == w || !o->removed || o->pid <= 0)
            continue;
        if (o->spec.port == w->spec.port)
            return 1;
        if (o->spec.share_gpus && w->spec.share_gpus)
            continue;
        for (size_t k = 0; k < FL_GPU_WORDS; k++)
            if (o->gpumask[k] & w->gpumask[k])
                return 1;
    }
    return 0;
}

static int backoff_ms(const mm_fleet *f, int crashes)
{
    int64_t d = f->o.backoff_initial_ms;
    for (int i = 1; i < crashes && d < f->o.backoff_max_ms; i++)
        d *= 2;
    return (int)(d < f->o.backoff_max_ms ? d : f->o.backoff_max_ms);
}

static void w_after_exit(fl_worker *w, const char *how);

static void w_start(fl_worker *w)
{
    mm_fleet *f = w->f;
    event_del(w->timer);
    w->state = FL_STARTING;
    if (w_blocked(w)) {
        w_arm(w, f->o.drain_poll_ms);   /* also kicked when the blocker exits */
        return;
    }
    if (w->started_wall)
        w->restarts++;
    if (w_spawn(w) != 0) {
        /* As if it had exited at once: backoff, then "failed". */
        w->started_mono = mono_ms();
        w->has_exit = 1;
        w->exit_known = 1;
        w->exit_code = 127;
        w->exit_signal = 0;
        if (!w->started_wall)
            w->started_wall = wall_ms();
        w_after_exit(w, "could not be started");
        return;
    }
    if (!w->live.health_path)
        w_ready(w);
    else
        w_arm(w, f->o.probe_interval_ms);
}

static void w_stop(fl_worker *w, int why)
{
    w->kill_why = why;
    w_probe_close(w);
    if (w->pid > 0 && !w->term_sent) {
        group_signal(w->pid, SIGTERM);
        w->term_sent = 1;
        w->term_at = mono_ms();
    }
    w_arm(w, w->f->o.stop_timeout_ms);
}

/* Crash bookkeeping once the process is gone (it was not stopped on
 * purpose): backoff restart, or "failed" after too many in a row. */
static void w_after_exit(fl_worker *w, const char *how)
{
    mm_fleet *f = w->f;
    int64_t now = mono_ms();
    /* Only a worker that served for a whole window earns a clean slate, so
     * one that never becomes ready ends as failed even if each try is slow. */
    if (w->ready && now - w->ready_at >= f->o.crash_window_ms)
        w->crashes = 0;
    w->crashes++;
    w->ready = 0;
    if (w->crashes >= f->o.crash_max) {
        w->state = FL_FAILED;
        fl_log(f, MM_LOG_ERROR,
               "[%s worker#%zu] failed: %s, %d times in a row; not restarting "
               "(a configuration reload retries it)",
               w_model(w), w->live.index, how, w->crashes);
        return;
    }
    int delay = backoff_ms(f, w->crashes);
    w->state = FL_RESTARTING;
    fl_log(f, MM_LOG_WARN, "[%s worker#%zu] %s after %lld ms; restarting in %d ms", w_model(w),
           w->live.index, how, (long long)(now - w->started_mono), delay);
    w_arm(w, delay);
}

static void describe_exit(const fl_worker *w, char *buf, size_t len)
{
    if (!w->exit_known)
        snprintf(buf, len, "exited (status unknown)");
    else if (w->exit_signal)
        snprintf(buf, len, "killed by signal %d (%s)", w->exit_signal, strsignal(w->exit_signal));
    else
        snprintf(buf, len, "exited with code %d", w->exit_code);
}

static void w_exited(fl_worker *w, int status, int known)
{
    mm_fleet *f = w->f;
    char how[128];
    int why = w->kill_why;
    w->has_exit = 1;
    w->exit_known = known;
    w->exit_code = known && WIFEXITED(status) ? WEXITSTATUS(status) : 0;
    w->exit_signal = known && WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    w->pid = 0;
    w->kill_why = FL_KILL_NONE;
    w->term_sent = w->kill_sent = 0;
    w_probe_close(w);
    event_del(w->timer);
    /* Whatever it wrote before dying is in the pipe: pass it on, then close
     * (a grandchild that escaped its group must not keep the pipe open). */
    if (w->log_fd >= 0)
        w_log_read(w, 64);
    w_log_close(w);
    describe_exit(w, how, sizeof how);
    if (f->stopped || w->removed || why == FL_KILL_STOP) {
        if (w->state != FL_FAILED)
            w->state = FL_STOPPED;
        w->ready = 0;
        fl_log(f, MM_LOG_INFO, "[%s worker#%zu %d] stopped (%s)", w_model(w), w->live.index,
               (int)w->log_pid, how);
        return;
    }
    if (why == FL_KILL_RESTART)
        snprintf(how, sizeof how, "did not become ready in time");
    w_after_exit(w, how);
}

/* Reap our exited children, drop removed workers that are gone, and let
 * workers waiting for a draining one's port or GPUs start. */
static void fl_check_exits(mm_fleet *f)
{
    int freed = 0;
    for (size_t i = 0; i < f->nw; i++) {
        fl_worker *w = f->w[i];
        int status = 0, r;
        if (w->pid <= 0 || (r = reap(w->pid, &status)) == 0)
            continue;
        w_exited(w, status, r > 0);
    }
    size_t k = 0;
    for (size_t i = 0; i < f->nw; i++) {
        fl_worker *w = f->w[i];
        if (w->removed && w->pid <= 0) {
            w_free(w);
            freed = 1;
        } else {
            f->w[k++] = w;
        }
    }
    f->nw = k;
    if (!freed || f->stopped)
        return;
    for (size_t i = 0; i < f->nw; i++) {
        fl_worker *w = f->w[i];
        if (w->state == FL_STARTING && w->pid <= 0 && !w->removed)
            w_arm(w, 0);
    }
}

static void w_tick(evutil_socket_t fd, short what, void *arg)
{
    fl_worker *w = arg;
    mm_fleet *f = w->f;
    (void)fd;
    (void)what;
    pthread_mutex_lock(&f->lock);
    int64_t now = mono_ms();
    if (f->stopped) {
        /* nothing: stop_all owns the processes now */
    } else if (w->pid > 0 && w->term_sent) {
        /* Being stopped; its exit arrives through SIGCHLD. */
        if (!w->kill_sent && now - w->term_at >= f->o.stop_timeout_ms) {
            fl_log(f, MM_LOG_WARN, "[%s worker#%zu %d] still running %d ms after SIGTERM: SIGKILL",
                   w_model(w), w->live.index, (int)w->pid, f->o.stop_timeout_ms);
            group_signal(w->pid, SIGKILL);
            w->kill_sent = 1;
        }
        int64_t left = f->o.stop_timeout_ms - (now - w->term_at);
        w_arm(w, w->kill_sent ? f->o.drain_poll_ms : left > 1 ? (int)left : 1);
    } else if (w->state == FL_DRAINING && w->pid > 0) {
        int busy = f->in_flight ? f->in_flight(f->in_flight_arg, w->live.url) : 0;
        if (busy <= 0 || now >= w->drain_deadline) {
            fl_log(f, MM_LOG_INFO, "[%s worker#%zu %d] removed from the configuration: stopping (%s)",
                   w_model(w), w->live.index, (int)w->pid,
                   busy <= 0 ? "drained" : "drain timeout, requests still in flight");
            w_stop(w, FL_KILL_STOP);
        } else {
            w_arm(w, f->o.drain_poll_ms);
        }
    } else if (w->state == FL_STARTING && w->pid > 0) {
        if (now - w->started_mono >= w->live.startup_timeout_ms) {
            fl_log(f, MM_LOG_WARN, "[%s worker#%zu %d] not ready within %d ms: restarting",
                   w_model(w), w->live.index, (int)w->pid, w->live.startup_timeout_ms);
            w->state = FL_RESTARTING;
            w_stop(w, FL_KILL_RESTART);
        } else {
            if (w->probe_fd < 0)
                w_probe_start(w);
            w_arm(w, f->o.probe_interval_ms);
        }
    } else if ((w->state == FL_STARTING || w->state == FL_RESTARTING) && w->pid <= 0 &&
               !w->removed) {
        w_start(w);
    }
    pthread_mutex_unlock(&f->lock);
}

/* ---- applying a configuration -------------------------------------- */

static void w_remove(fl_worker *w)
{
    mm_fleet *f = w->f;
    w->removed = 1;
    if (w->pid <= 0) {
        event_del(w->timer);
        w->state = FL_STOPPED;
        return;
    }
    w->state = FL_DRAINING;
    if (w->term_sent) {
        w->kill_why = FL_KILL_STOP;   /* a restart kill in progress now ends it */
        return;
    }
    w_probe_close(w);
    w->drain_deadline = mono_ms() + f->o.drain_timeout_ms;
    w_arm(w, 0);
}

static void w_keep(fl_worker *w, fl_want *want)
{
    live_free(&w->live);
    w->live = want->live;
    memset(&want->live, 0, sizeof want->live);
    want->taken = 1;
    if (w->removed) {
        /* Back in the configuration before it was stopped: keep it. */
        w->removed = 0;
        event_del(w->timer);
        w->state = w->ready ? FL_RUNNING : FL_STARTING;
        if (!w->ready)
            w_arm(w, 0);
        fl_log(w->f, MM_LOG_INFO, "[%s worker#%zu %d] back in the configuration: kept",
               w_model(w), w->live.index, (int)w->pid);
    } else if (w->state == FL_FAILED) {
        w->crashes = 0;
        fl_log(w->f, MM_LOG_INFO, "[%s worker#%zu] failed before: retrying", w_model(w),
               w->live.index);
        w_start(w);
    }
}

static int w_can_keep(const fl_worker *w, const fl_want *want)
{
    if (want->taken || (w->removed && (w->pid <= 0 || w->term_sent)))
        return 0;
    return spec_eq(&w->spec, &want->spec);
}

static void fl_apply(mm_fleet *f)
{
    fl_want *want = f->pending;
    size_t n = f->npending;
    f->pending = NULL;
    f->npending = 0;
    f->has_pending = 0;

    /* Live workers first, so a draining twin is matched only when no live
     * one is. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < f->nw; i++) {
            fl_worker *w = f->w[i];
            if (w->removed != pass || (pass == 0 && w->state == FL_STOPPED))
                continue;
            size_t j = 0;
            while (j < n && !w_can_keep(w, &want[j]))
                j++;
            if (j < n)
                w_keep(w, &want[j]);
            else if (!pass)
                w_remove(w);
        }
    }
    for (size_t j = 0; j < n; j++) {
        if (want[j].taken)
            continue;
        if (f->nw == f->cap) {
            size_t ncap = f->cap ? f->cap * 2 : 8;
            fl_worker **nv = realloc(f->w, ncap * sizeof *nv);
            if (!nv) {
                fl_log(f, MM_LOG_ERROR, "fleet: out of memory: worker for %s not started",
                       want[j].spec.model);
                continue;
            }
            f->w = nv;
            f->cap = ncap;
        }
        fl_worker *w = w_new(f, &want[j]);
        if (!w) {
            fl_log(f, MM_LOG_ERROR, "fleet: out of memory: worker for %s not started",
                   want[j].spec.model);
            continue;
        }
        f->w[f->nw++] = w;
        w_start(w);
    }
    wants_free(want, n);
    fl_check_exits(f);   /* frees removed workers that had no process */
}

/* ---- loop callbacks ------------------------------------------------- */

static void w_log_cb(evutil_socket_t fd, short what, void *arg)
{
    fl_worker *w = arg;
    mm_fleet *f = w->f;
    (void)fd;
    (void)what;
    pthread_mutex_lock(&f->lock);
    if (w_log_read(w, 16)) {
        w_log_close(w);
        fl_check_exits(f);   /* EOF usually means it exited; may free w */
    }
    pthread_mutex_unlock(&f->lock);
}

static void fl_child_cb(evutil_socket_t fd, short what, void *arg)
{
    mm_fleet *f = arg;
    (void)fd;
    (void)what;
    pthread_mutex_lock(&f->lock);
    if (!f->stopped)
        fl_check_exits(f);
    pthread_mutex_unlock(&f->lock);
}

static void fl_sync_cb(evutil_socket_t fd, short what, void *arg)
{
    mm_fleet *f = arg;
    (void)fd;
    (void)what;
    pthread_mutex_lock(&f->lock);
    if (f->has_pending && !f->stopped)
        fl_apply(f);
    pthread_mutex_unlock(&f->lock);
}

/* ---- public API ----------------------------------------------------- */

void mm_fleet_opts_default(mm_fleet_opts *o)
{
    o->backoff_initial_ms = 1000;
    o->backoff_max_ms = 60000;
    o->crash_max = 5;
    o->crash_window_ms = 60000;
    o->drain_timeout_ms = 30000;
    o->drain_poll_ms = 250;
    o->stop_timeout_ms = 10000;
    o->probe_interval_ms = 500;
    o->reap_poll_ms = 1000;
}

int mm_fleet_set_opts(mm_fleet *f, const mm_fleet_opts *o, char *err, size_t errlen)
{
    static const struct { const char *name; size_t off; int min, max; } rows[] = {
        {"backoff_initial_ms", offsetof(mm_fleet_opts, backoff_initial_ms), 1, 3600000},
        {"backoff_max_ms", offsetof(mm_fleet_opts, backoff_max_ms), 1, 3600000},
        {"crash_max", offsetof(mm_fleet_opts, crash_max), 1, 1000},
        {"crash_window_ms", offsetof(mm_fleet_opts, crash_window_ms), 1, 86400000},
        {"drain_timeout_ms", offsetof(mm_fleet_opts, drain_timeout_ms), 0, 86400000},
        {"drain_poll_ms", offsetof(mm_fleet_opts, drain_poll_ms), 1, 60000},
        {"stop_timeout_ms", offsetof(mm_fleet_opts, stop_timeout_ms), 0, 3600000},
        {"probe_interval_ms", offsetof(mm_fleet_opts, probe_interval_ms), 1, 60000},
        {"reap_poll_ms", offsetof(mm_fleet_opts, reap_poll_ms), 1, 3600000},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        int v;
        memcpy(&v, (const char *)o + rows[i].off, sizeof v);
        if (v < rows[i].min || v > rows[i].max) {
            snprintf(err, errlen, "fleet option %s: %d is outside %d..%d", rows[i].name, v,
                     rows[i].min, rows[i].max);
            return -EINVAL;
        }
    }
    pthread_mutex_lock(&f->lock);
    f->o = *o;
    struct timeval tv = {o->reap_poll_ms / 1000, (o->reap_poll_ms % 1000) * 1000};
    evtimer_add(f->reap_timer, &tv);
    pthread_mutex_unlock(&f->lock);
    return 0;
}

int mm_fleet_new(struct event_base *base, const char *worker_path, mm_fleet **out, char *err,
                 size_t errlen)
{
    mm_fleet *f = NULL;
    *out = NULL;
    if (!base || !worker_path || !*worker_path) {
        snprintf(err, errlen, "fleet: an event base and the worker binary's path are required");
        return -EINVAL;
    }
    if (!(f = calloc(1, sizeof *f)))
        goto nomem;
    pthread_mutex_init(&f->lock, NULL);
    f->base = base;
    mm_fleet_opts_default(&f->o);
    if (!(f->worker_path = strdup(worker_path)))
        goto nomem;
    f->child_ev = event_new(base, -1, 0, fl_child_cb, f);
    f->sync_ev = event_new(base, -1, 0, fl_sync_cb, f);
    f->reap_timer = event_new(base, -1, EV_PERSIST, fl_child_cb, f);
    if (!f->child_ev || !f->sync_ev || !f->reap_timer)
        goto nomem;
    struct timeval tv = {f->o.reap_poll_ms / 1000, (f->o.reap_poll_ms % 1000) * 1000};
    evtimer_add(f->reap_timer, &tv);
    *out = f;
    return 0;
nomem:
    snprintf(err, errlen, "fleet: out of memory");
    mm_fleet_free(f);
    return -ENOMEM;
}

int mm_fleet_sync(mm_fleet *f, const mm_gateway_cfg *cfg, char *err, size_t errlen)
{
    size_t n = count_launches(cfg->default_pool), k = 0;
    fl_want *want;
    int rc = 0;
    for (size_t i = 0; i < cfg->nmodels; i++)
        n += count_launches(&cfg->models[i]);
    if (!(want = calloc(n ? n : 1, sizeof *want))) {
        snprintf(err, errlen, "fleet: out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; !rc && i < cfg->nmodels; i++)
        rc = add_wants(want, &k, &cfg->models[i]);
    if (!rc)
        rc = add_wants(want, &k, cfg->default_pool);
    if (rc) {
        snprintf(err, errlen, "fleet: out of memory");
        wants_free(want, k);
        return rc;
    }
    pthread_mutex_lock(&f->lock);
    if (f->stopped) {
        rc = -ECANCELED;
        snprintf(err, errlen, "fleet: already stopped");
    } else {
        /* A newer list replaces one the loop has not applied yet. */
        wants_free(f->pending, f->npending);
        f->pending = want;
        f->npending = n;
        f->has_pending = 1;
        want = NULL;
    }
    pthread_mutex_unlock(&f->lock);
    if (rc)
        wants_free(want, n);
    else
        event_active(f->sync_ev, EV_READ, 1);
    return rc;
}

void mm_fleet_set_drain_probe(mm_fleet *f, mm_fleet_in_flight_fn in_flight, void *arg)
{
    pthread_mutex_lock(&f->lock);
    f->in_flight = in_flight;
    f->in_flight_arg = arg;
    pthread_mutex_unlock(&f->lock);
}

void mm_fleet_set_log_sink(mm_fleet *f, mm_fleet_log_fn sink, void *arg)
{
    pthread_mutex_lock(&f->lock);
    f->sink = sink;
    f->sink_arg = arg;
    pthread_mutex_unlock(&f->lock);
}

void mm_fleet_child_exited(mm_fleet *f)
{
    if (f)
        event_active(f->child_ev, EV_READ, 1);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int mm_fleet_stop_all(mm_fleet *f, int timeout_ms)
{
    int rc = 0, killed = 0;
    pthread_mutex_lock(&f->lock);
    f->stopped = 1;
    wants_free(f->pending, f->npending);
    f->pending = NULL;
    f->npending = 0;
    f->has_pending = 0;
    for (size_t i = 0; i < f->nw; i++) {
        fl_worker *w = f->w[i];
        event_del(w->timer);
        w_probe_close(w);
        if (w->pid > 0) {
            w->kill_why = FL_KILL_STOP;
            if (!w->term_sent) {
                group_signal(w->pid, SIGTERM);
                w->term_sent = 1;
                w->term_at = mono_ms();
            }
        } else if (w->state != FL_FAILED) {
            w->state = FL_STOPPED;
        }
    }
    int64_t deadline = mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        size_t alive = 0;
        for (size_t i = 0; i < f->nw; i++) {
            fl_worker *w = f->w[i];
            int status = 0, r;
            if (w->pid <= 0)
                continue;
            if (w->log_fd >= 0 && w_log_read(w, 4))
                w_log_close(w);
            if ((r = reap(w->pid, &status)) != 0)
                w_exited(w, status, r > 0);
            else
                alive++;
        }
        if (!alive)
            break;
        int64_t now = mono_ms();
        if (now >= deadline && !killed) {
            for (size_t i = 0; i < f->nw; i++) {
                fl_worker *w = f->w[i];
                if (w->pid <= 0)
                    continue;
                fl_log(f, MM_LOG_WARN, "[%s worker#%zu %d] still running %d ms after SIGTERM: SIGKILL",
                       w_model(w), w->live.index, (int)w->pid, timeout_ms);
                group_signal(w->pid, SIGKILL);
                w->kill_sent = 1;
            }
            killed = 1;
            deadline = now + FL_KILL_WAIT_MS;
        } else if (now >= deadline) {
            fl_log(f, MM_LOG_ERROR, "fleet: %zu worker(s) not reaped %d ms after SIGKILL",
                   alive, FL_KILL_WAIT_MS);
            rc = -ETIMEDOUT;
            break;
        }
        sleep_ms(5);
    }
    pthread_mutex_unlock(&f->lock);
    return rc;
}

static json_t *w_status(const fl_worker *w)
{
    json_t *o = json_object(), *cmd = json_array(), *le = json_null();
    if (!o || !cmd || argv_shown(w->argv, json_word, cmd) != 0)
        goto fail;
    if (w->has_exit && w->exit_known && w->exit_signal)
        le = json_pack("{s:n,s:i}", "code", "signal", w->exit_signal);
    else if (w->has_exit && w->exit_known)
        le = json_pack("{s:i,s:n}", "code", w->exit_code, "signal");
    else if (w->has_exit)   /* reaped by someone else: status unknown */
        le = json_pack("{s:n,s:n}", "code", "signal");
    if (!le)
        goto fail;
    if (json_object_set_new(o, "id", json_integer(w->id)) ||
        json_object_set_new(o, "model", json_string(w->spec.model)) ||
        json_object_set_new(o, "worker", json_integer((json_int_t)w->live.index)) ||
        json_object_set_new(o, "url", w->live.url ? json_string(w->live.url) : json_null()) ||
        json_object_set_new(o, "pid", w->pid > 0 ? json_integer(w->pid) : json_null()) ||
        json_object_set_new(o, "gpus", json_string(w->ngpus ? w->spec.gpus : "")) ||
        json_object_set_new(o, "port", json_integer(w->spec.port)) ||
        json_object_set_new(o, "device", json_string(w_device(w))) ||
        json_object_set_new(o, "state", json_string(fl_state_names[w->state])) ||
        json_object_set_new(o, "ready", json_boolean(w->ready)) ||
        json_object_set_new(o, "restarts", json_integer(w->restarts)) ||
        json_object_set_new(o, "crashes", json_integer(w->crashes)) ||
        json_object_set_new(o, "last_exit", le) ||
        json_object_set_new(o, "started_at",
                            w->started_wall ? json_integer(w->started_wall) : json_null()) ||
        json_object_set_new(o, "command", cmd)) {
        json_decref(o);
        return NULL;
    }
    return o;
fail:
    json_decref(le);
    json_decref(cmd);
    json_decref(o);
    return NULL;
}

json_t *mm_fleet_status(mm_fleet *f)
{
    json_t *arr = json_array();
    if (!arr)
        return NULL;
    pthread_mutex_lock(&f->lock);
    for (size_t i = 0; i < f->nw; i++) {
        json_t *o = w_status(f->w[i]);
        if (!o || json_array_append_new(arr, o)) {
            json_decref(arr);
            arr = NULL;
            break;
        }
    }
    pthread_mutex_unlock(&f->lock);
    return arr;
}

void mm_fleet_free(mm_fleet *f)
{
    if (!f)
        return;
    int alive = 0;
    for (size_t i = 0; i < f->nw; i++)
        alive |= f->w[i]->pid > 0;
    if (alive)
        mm_fleet_stop_all(f, 0);
    for (size_t i = 0; i < f->nw; i++)
        w_free(f->w[i]);
    free(f->w);
    wants_free(f->pending, f->npending);
    if (f->child_ev)
        event_free(f->child_ev);
    if (f->sync_ev)
        event_free(f->sync_ev);
    if (f->reap_timer)
        event_free(f->reap_timer);
    free(f->worker_path);
    pthread_mutex_destroy(&f->lock);
    free(f);
}
