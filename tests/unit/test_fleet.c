/* test_fleet.c: the fleet (gateway/fleet.c) against real processes: small
 * shell scripts, sleep and a node HTTP server stand in for workers. Checks
 * the child's environment, signal state, fds and session through /proc;
 * restarts, crash loops, readiness, syncs, draining, stop and the parent
 * death signal. All waits poll with a deadline. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/thread.h>
#include <jansson.h>

#include "config.h"
#include "fleet.h"
#include "log.h"
#include "test.h"

static struct event_base *base;
static mm_fleet *cur;      /* the fleet SIGCHLD is forwarded to */
static char dir[64];       /* this run's temp dir */
static char err[1024];

/* ---- helpers ------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void pump(void)
{
    event_base_loop(base, EVLOOP_NONBLOCK);
}

/* Run the loop until cond holds or ms pass; the caller asserts cond. */
#define WAIT(cond, ms)                                                      \
    for (int64_t end_ = now_ms() + (ms); pump(), !(cond) && now_ms() < end_; sleep_ms(5)) \
        ;

/* Captured fleet lines. */
#define MAX_LINES 4096
static char *lines[MAX_LINES];
static size_t nlines;

static void sink(void *arg, int level, const char *line)
{
    (void)arg;
    (void)level;
    if (nlines < MAX_LINES)
        lines[nlines++] = strdup(line);
}

static void lines_clear(void)
{
    for (size_t i = 0; i < nlines; i++)
        free(lines[i]);
    nlines = 0;
}

static int has_line(const char *needle)
{
    for (size_t i = 0; i < nlines; i++)
        if (lines[i] && strstr(lines[i], needle))
            return 1;
    return 0;
}

static const char *line_exact(const char *s)
{
    for (size_t i = 0; i < nlines; i++)
        if (lines[i] && strcmp(lines[i], s) == 0)
            return lines[i];
    return NULL;
}

/* Lines of x's (the 5000-byte line) and their total length. */
static size_t x_pieces(size_t *total, size_t *longest)
{
    size_t n = 0;
    *total = *longest = 0;
    for (size_t i = 0; i < nlines; i++) {
        const char *x = strstr(lines[i], "] x");
        if (!x)
            continue;
        size_t l = strlen(x + 2);
        n++;
        *total += l;
        if (l > *longest)
            *longest = l;
    }
    return n;
}

static int in_flight_value;
static char probed_url[256];
static int probe(void *arg, const char *url)
{
    (void)arg;
    snprintf(probed_url, sizeof probed_url, "%s", url);
    return in_flight_value;
}

static void on_sigchld(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (cur)
        mm_fleet_child_exited(cur);
}

/* Fast tunables so real-process tests stay short; reap_poll is long so
 * exits are seen through SIGCHLD (or pipe EOF), not the backstop. */
static mm_fleet *fleet_new(const char *worker_path)
{
    mm_fleet *f = NULL;
    mm_fleet_opts o;
    if (mm_fleet_new(base, worker_path ? worker_path : "/bin/false", &f, err, sizeof err) != 0)
        return NULL;
    mm_fleet_opts_default(&o);
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 200;
    o.crash_max = 3;
    o.drain_poll_ms = 10;
    o.drain_timeout_ms = 10000;
    o.stop_timeout_ms = 300;
    o.probe_interval_ms = 30;
    o.reap_poll_ms = 60000;
    if (mm_fleet_set_opts(f, &o, err, sizeof err) != 0) {
        mm_fleet_free(f);
        return NULL;
    }
    mm_fleet_set_log_sink(f, sink, NULL);
    lines_clear();
    cur = f;
    return f;
}

static void fleet_done(mm_fleet *f)
{
    mm_fleet_stop_all(f, 2000);
    cur = NULL;
    mm_fleet_free(f);
    lines_clear();
}

/* printf into a config, ' written for " so the JSON stays readable. */
static mm_gateway_cfg *cfg_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static mm_gateway_cfg *cfg_fmt(const char *fmt, ...)
{
    char js[8192];
    mm_gateway_cfg *c = NULL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(js, sizeof js, fmt, ap);
    va_end(ap);
    for (char *p = js; *p; p++)
        if (*p == '\'')
            *p = '"';
    if (mm_config_load_string(js, &c, err, sizeof err) != 0) {
        printf("  config error: %s\n  in %s\n", err, js);
        return NULL;
    }
    return c;
}

static int sync_cfg(mm_fleet *f, mm_gateway_cfg *c)
{
    if (!c)
        return -EINVAL;
    int rc = mm_fleet_sync(f, c, err, sizeof err);
    mm_config_free(c);   /* the fleet keeps copies */
    return rc;
}

static const char *script(const char *name, const char *body)
{
    static char path[8][128];
    static int k;
    char *p = path[k++ % 8];
    snprintf(p, 128, "%s/%s", dir, name);
    FILE *fp = fopen(p, "w");
    if (!fp)
        return p;
    fprintf(fp, "#!/bin/sh\n%s\n", body);
    fclose(fp);
    chmod(p, 0755);
    return p;
}

static int free_port(void)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = ntohs(sa.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

/* One worker's status, found by port (newest, or oldest, when a draining
 * one and its successor share the port). */
typedef struct ws {
    int  found, pid, restarts, crashes, ready, code, sig, port, worker;
    long id;
    long long started_at;
    char state[16], gpus[64], device[16], model[64], url[128], cmd[512];
} ws;

static ws snap_sel(mm_fleet *f, int port, int oldest)
{
    ws s;
    json_t *a = mm_fleet_status(f), *o;
    size_t i;
    memset(&s, 0, sizeof s);
    s.code = s.sig = -1;
    json_array_foreach(a, i, o) {
        if (json_integer_value(json_object_get(o, "port")) != port)
            continue;
        long id = (long)json_integer_value(json_object_get(o, "id"));
        if (s.found && (oldest ? id > s.id : id < s.id))
            continue;
        s.found = 1;
        s.id = id;
        s.port = port;
        s.pid = (int)json_integer_value(json_object_get(o, "pid"));
        s.worker = (int)json_integer_value(json_object_get(o, "worker"));
        s.restarts = (int)json_integer_value(json_object_get(o, "restarts"));
        s.crashes = (int)json_integer_value(json_object_get(o, "crashes"));
        s.ready = json_is_true(json_object_get(o, "ready"));
        s.started_at = json_integer_value(json_object_get(o, "started_at"));
        json_t *le = json_object_get(o, "last_exit");
        if (json_is_object(le)) {
            json_t *c = json_object_get(le, "code"), *g = json_object_get(le, "signal");
            s.code = json_is_integer(c) ? (int)json_integer_value(c) : -1;
            s.sig = json_is_integer(g) ? (int)json_integer_value(g) : -1;
        }
        snprintf(s.state, sizeof s.state, "%s", json_string_value(json_object_get(o, "state")));
        snprintf(s.gpus, sizeof s.gpus, "%s", json_string_value(json_object_get(o, "gpus")));
        snprintf(s.device, sizeof s.device, "%s", json_string_value(json_object_get(o, "device")));
        snprintf(s.model, sizeof s.model, "%s", json_string_value(json_object_get(o, "model")));
        snprintf(s.url, sizeof s.url, "%s", json_string_value(json_object_get(o, "url")));
        s.cmd[0] = '\0';
        size_t j;
        json_t *e;
        json_array_foreach(json_object_get(o, "command"), j, e) {
            size_t l = strlen(s.cmd);
            snprintf(s.cmd + l, sizeof s.cmd - l, "%s%s", l ? " " : "", json_string_value(e));
        }
    }
    json_decref(a);
    return s;
}

static ws snap(mm_fleet *f, int port)
{
    return snap_sel(f, port, 0);
}

static size_t nworkers(mm_fleet *f)
{
    json_t *a = mm_fleet_status(f);
    size_t n = json_array_size(a);
    json_decref(a);
    return n;
}

static int read_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return (int)n;
}

/* /proc/PID/cmdline's first word is name (exec has happened). */
static int execd(int pid, const char *name)
{
    char p[64], b[256];
    snprintf(p, sizeof p, "/proc/%d/cmdline", pid);
    return pid > 0 && read_file(p, b, sizeof b) > 0 && strstr(b, name) != NULL;
}

/* Alive = exists and is not a zombie (an orphan's zombie may wait for a
 * container's init that never reaps). */
static int alive(int pid)
{
    char p[64], b[512];
    snprintf(p, sizeof p, "/proc/%d/stat", pid);
    if (pid <= 0 || read_file(p, b, sizeof b) <= 0)
        return 0;
    char *rp = strrchr(b, ')');
    return rp && rp[1] == ' ' && rp[2] != 'Z' && rp[2] != 'X';
}

static int not_our_child(int pid)
{
    return waitpid(pid, NULL, WNOHANG) == -1 && errno == ECHILD;
}

static int read_pid_file(const char *name)
{
    char p[160], b[32];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (read_file(p, b, sizeof b) <= 0)
        return 0;
    return (int)strtol(b, NULL, 10);
}

/* ---- tests ---------------------------------------------------------- */

TEST(opts_are_validated)
{
    mm_fleet *f = NULL;
    mm_fleet_opts o;
    ASSERT_EQ(mm_fleet_new(base, "", &f, err, sizeof err), -EINVAL);
    ASSERT_TRUE(f == NULL);
    ASSERT_EQ(mm_fleet_new(base, "/bin/true", &f, err, sizeof err), 0);
    mm_fleet_opts_default(&o);
    ASSERT_EQ(o.backoff_initial_ms, 1000);
    ASSERT_EQ(o.backoff_max_ms, 60000);
    ASSERT_EQ(o.drain_timeout_ms, 30000);
    o.crash_max = 0;
    ASSERT_EQ(mm_fleet_set_opts(f, &o, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "crash_max");
    json_t *st = mm_fleet_status(f);
    ASSERT_EQ(json_array_size(st), 0);
    json_decref(st);
    mm_fleet_free(f);
}

/* The child's environment, signal state, fds and session, and the status
 * fields, for a GPU worker, a cpu worker and one of default_pool. */
TEST(child_is_pinned_and_clean)
{
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'envm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41011,'gpus':'1,3'}},"
                                  "{'launch':{'command':['sleep','60'],'port':41012,'gpus':'2','device':'cpu'}}]}],"
                                  "'default_pool':{'backends':[{'launch':{'command':['sleep','61'],'port':41013,'gpus':''}}]}}")),
              0);
    ASSERT_EQ(nworkers(f), 0);   /* applied by the loop, not by the caller */
    WAIT(execd(snap(f, 41011).pid, "sleep") && execd(snap(f, 41012).pid, "sleep") &&
             execd(snap(f, 41013).pid, "sleep"), 5000);
    ws a = snap(f, 41011), b = snap(f, 41012), d = snap(f, 41013);
    ASSERT_TRUE(execd(a.pid, "sleep") && execd(b.pid, "sleep") && execd(d.pid, "sleep"));

    char p[64], env[65536];
    snprintf(p, sizeof p, "/proc/%d/environ", a.pid);
    int n = read_file(p, env, sizeof env);
    ASSERT_TRUE(n > 0);
    int cvd = 0, kept = 0, order = 0;
    for (char *e = env; e < env + n; e += strlen(e) + 1) {
        if (strncmp(e, "CUDA_VISIBLE_DEVICES=", 21) == 0) {
            cvd++;
            ASSERT_STR_EQ(e, "CUDA_VISIBLE_DEVICES=1,3");
        }
        ASSERT_TRUE(strncmp(e, "NVIDIA_VISIBLE_DEVICES=", 23) != 0);
        ASSERT_TRUE(strncmp(e, "HIP_VISIBLE_DEVICES=", 20) != 0);
        ASSERT_TRUE(strncmp(e, "ROCR_VISIBLE_DEVICES=", 21) != 0);
        kept += strcmp(e, "MM_TEST_KEEP=yes") == 0;
        if (strncmp(e, "CUDA_DEVICE_ORDER=", 18) == 0) {
            order++;
            ASSERT_STR_EQ(e, "CUDA_DEVICE_ORDER=PCI_BUS_ID");
        }
    }
    ASSERT_EQ(cvd, 1);
    ASSERT_EQ(order, 1);
    ASSERT_EQ(kept, 1);
    for (int k = 0; k < 2; k++) {   /* cpu worker and gpus "": no GPU visible */
        snprintf(p, sizeof p, "/proc/%d/environ", k ? d.pid : b.pid);
        n = read_file(p, env, sizeof env);
        ASSERT_TRUE(n > 0);
        cvd = 0;
        for (char *e = env; e < env + n; e += strlen(e) + 1)
            if (strncmp(e, "CUDA_VISIBLE_DEVICES=", 21) == 0) {
                cvd++;
                ASSERT_STR_EQ(e, "CUDA_VISIBLE_DEVICES=");
            }
        ASSERT_EQ(cvd, 1);
    }

    /* No blocked or ignored signal inherited from us (we block SIGTERM and
     * ignore SIGPIPE, as the gateway does). */
    char st[4096];
    snprintf(p, sizeof p, "/proc/%d/status", a.pid);
    ASSERT_TRUE(read_file(p, st, sizeof st) > 0);
    ASSERT_CONTAINS(st, "SigBlk:\t0000000000000000");
    ASSERT_CONTAINS(st, "SigIgn:\t0000000000000000");
    /* Only stdio is open. */
    snprintf(p, sizeof p, "/proc/%d/fd", a.pid);
    DIR *dd = opendir(p);
    ASSERT_TRUE(dd != NULL);
    int nfd = 0, high = 0;
    struct dirent *de;
    while ((de = readdir(dd))) {
        if (de->d_name[0] == '.')
            continue;
        nfd++;
        high |= strtol(de->d_name, NULL, 10) > 2;
    }
    closedir(dd);
    ASSERT_EQ(nfd, 3);
    ASSERT_EQ(high, 0);
    /* Its own session (field 6 of stat), so a terminal's ^C skips it. */
    snprintf(p, sizeof p, "/proc/%d/stat", a.pid);
    ASSERT_TRUE(read_file(p, st, sizeof st) > 0);
    int sid = -1;
    char *rp = strrchr(st, ')');
    ASSERT_TRUE(rp != NULL);
    ASSERT_EQ(sscanf(rp + 2, "%*c %*d %*d %d", &sid), 1);
    ASSERT_EQ(sid, a.pid);

    ASSERT_STR_EQ(a.state, "starting");   /* sleep never answers /health */
    ASSERT_STR_EQ(a.gpus, "1,3");
    ASSERT_STR_EQ(a.device, "cuda");
    ASSERT_STR_EQ(a.model, "envm");
    ASSERT_STR_EQ(a.url, "http://127.0.0.1:41011");
    ASSERT_STR_EQ(a.cmd, "sleep 60");
    ASSERT_EQ(a.restarts, 0);
    ASSERT_EQ(a.code, -1);
    ASSERT_EQ(a.worker, 0);
    ASSERT_TRUE(a.started_at > 1700000000000LL);
    ASSERT_STR_EQ(b.gpus, "");
    ASSERT_STR_EQ(b.device, "cpu");
    ASSERT_EQ(b.worker, 1);
    ASSERT_STR_EQ(d.model, "");
    ASSERT_TRUE(has_line("[default_pool worker#0 "));
    fleet_done(f);
}

/* modelmux-worker's command line, built from the launch spec. */
TEST(worker_command_line)
{
    const char *fake = script("fake_worker.sh", "printf '%s\\n' \"$@\" > \"$MM_TEST_DIR/args.$4\"\nexec sleep 60");
    mm_fleet *f = fleet_new(fake);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'qwen-14b','backends':["
                                  "{'launch':{'model':'/data/m14','gpus':'0,1','port':41021,"
                                  "'args':['--max-model-len','8192','--api-key','sekrit']},"
                                  "'served_model':'Qwen-14B'},"
                                  "{'launch':{'model':'/data/m14c','gpus':'','port':41022}}]}]}")),
              0);
    char a1[512] = "", a2[512] = "", p[160];
    snprintf(p, sizeof p, "%s/args.41021", dir);
    WAIT(read_file(p, a1, sizeof a1) > 0 && strstr(a1, "sekrit\n"), 5000);
    snprintf(p, sizeof p, "%s/args.41022", dir);
    WAIT(read_file(p, a2, sizeof a2) > 0 && strstr(a2, "cpu\n"), 5000);
    ASSERT_STR_EQ(a1, "--model\n/data/m14\n--port\n41021\n--host\n127.0.0.1\n"
                      "--served-model-name\nQwen-14B\n--tensor-parallel-size\n2\n--device\ncuda\n"
                      "--max-model-len\n8192\n--api-key\nsekrit\n");
    ASSERT_STR_EQ(a2, "--model\n/data/m14c\n--port\n41022\n--host\n127.0.0.1\n"
                      "--served-model-name\nqwen-14b\n--tensor-parallel-size\n1\n--device\ncpu\n");
    /* The credential is shown nowhere. */
    ws s = snap(f, 41021);
    ASSERT_CONTAINS(s.cmd, "--max-model-len 8192 --api-key ***");
    ASSERT_TRUE(strstr(s.cmd, "sekrit") == NULL);
    ASSERT_TRUE(has_line("started: "));
    ASSERT_TRUE(!has_line("sekrit"));
    fleet_done(f);
}

/* Output lines come through prefixed, split at 4 KiB, control bytes made
 * visible, and a last line without newline is flushed when the worker ends. */
TEST(output_lines_are_prefixed)
{
    const char *sh = script("chatty.sh", "echo hello\nprintf 'a\\033b\\r\\n'\n"
                                         "head -c 5000 /dev/zero | tr '\\000' x\necho\n"
                                         "printf partial\nexec sleep 60");
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'logm','backends':["
                                  "{'launch':{'command':['%s'],'port':41031}}]}]}", sh)),
              0);
    char want[128];
    WAIT(snap(f, 41031).pid > 0 && has_line("] a?b"), 5000);
    ws s = snap(f, 41031);
    snprintf(want, sizeof want, "[logm worker#0 %d] hello", s.pid);
    ASSERT_TRUE(line_exact(want) != NULL);
    snprintf(want, sizeof want, "[logm worker#0 %d] a?b", s.pid);
    ASSERT_TRUE(line_exact(want) != NULL);
    size_t xs = 0, longest = 0;
    WAIT(x_pieces(&xs, &longest) == 2 && xs == 5000, 5000);
    ASSERT_EQ(x_pieces(&xs, &longest), 2);
    ASSERT_EQ(xs, 5000);
    ASSERT_EQ(longest, 4096);
    ASSERT_TRUE(!has_line("partial"));   /* no newline yet */
    ASSERT_EQ(mm_fleet_stop_all(f, 2000), 0);
    snprintf(want, sizeof want, "[logm worker#0 %d] partial", s.pid);
    ASSERT_TRUE(line_exact(want) != NULL);
    fleet_done(f);
}

/* Without a sink, lines go through mm_log to stderr, in pieces that fit
 * its 2 KiB line. */
TEST(default_sink_is_mm_log)
{
    const char *sh = script("long.sh", "head -c 3000 /dev/zero | tr '\\000' y\necho\nexec sleep 60");
    char p[160], buf[16384];
    snprintf(p, sizeof p, "%s/stderr.txt", dir);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), saved = dup(STDERR_FILENO);
    ASSERT_TRUE(fd >= 0 && saved >= 0);
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    mm_fleet_set_log_sink(f, NULL, NULL);
    dup2(fd, STDERR_FILENO);
    int rc = sync_cfg(f, cfg_fmt("{'models':[{'name':'ml','backends':["
                                 "{'launch':{'command':['%s'],'port':41131}}]}]}", sh));
    int64_t end = now_ms() + 5000;
    size_t ys = 0;
    int pieces = 0;
    while (rc == 0 && now_ms() < end && ys < 3000) {
        pump();
        sleep_ms(5);
        ys = 0;
        pieces = 0;
        if (read_file(p, buf, sizeof buf) <= 0)
            continue;
        for (char *l = buf; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
            char *y = strstr(l, "] y"), *nl = strchr(l, '\n');
            if (y && nl && y < nl && strstr(l, "[ml worker#0 ") && strstr(l, "[ml worker#0 ") < y) {
                pieces++;
                ys += (size_t)(nl - y - 2);
            }
        }
    }
    mm_fleet_stop_all(f, 2000);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fd);
    unlink(p);
    ASSERT_EQ(rc, 0);
    ASSERT_EQ(ys, 3000);
    ASSERT_EQ(pieces, 2);
    fleet_done(f);
}

TEST(restart_after_kill)
{
    /* The second one closes its output, so only SIGCHLD tells its exit. */
    const char *quiet = script("quiet.sh", "exec >/dev/null 2>&1\nexec sleep 60");
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'rm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41041}},"
                                  "{'launch':{'command':['%s'],'port':41042}}]}]}", quiet)),
              0);
    WAIT(execd(snap(f, 41041).pid, "sleep") && execd(snap(f, 41042).pid, "sleep"), 5000);
    int q = snap(f, 41042).pid;
    ASSERT_TRUE(execd(q, "sleep"));
    kill(q, SIGKILL);
    WAIT(snap(f, 41042).pid > 0 && snap(f, 41042).pid != q, 5000);
    ASSERT_EQ(snap(f, 41042).restarts, 1);
    ASSERT_TRUE(not_our_child(q));
    int old = snap(f, 41041).pid;
    ASSERT_TRUE(execd(old, "sleep"));
    kill(old, SIGKILL);
    WAIT(snap(f, 41041).pid > 0 && snap(f, 41041).pid != old, 5000);
    ws s = snap(f, 41041);
    ASSERT_TRUE(s.pid > 0 && s.pid != old);
    ASSERT_EQ(s.restarts, 1);
    ASSERT_EQ(s.crashes, 1);
    ASSERT_EQ(s.sig, SIGKILL);
    ASSERT_STR_EQ(s.state, "starting");
    ASSERT_TRUE(not_our_child(old));   /* reaped, no zombie */
    ASSERT_TRUE(has_line("killed by signal 9"));
    ASSERT_TRUE(has_line("restarting in 20 ms"));
    fleet_done(f);
}

/* What the leader leaves in its group dies with it. */
TEST(group_dies_with_leader)
{
    const char *sh = script("forks.sh", "sleep 1000 &\necho $! > \"$MM_TEST_DIR/grandchild\"\nwait");
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'gm','backends':["
                                  "{'launch':{'command':['%s'],'port':41051}}]}]}", sh)),
              0);
    WAIT(read_pid_file("grandchild") > 0 && alive(read_pid_file("grandchild")), 5000);
    int gc = read_pid_file("grandchild"), leader = snap(f, 41051).pid;
    ASSERT_TRUE(alive(gc));
    ASSERT_TRUE(leader > 0);
    kill(leader, SIGKILL);
    WAIT(!alive(gc), 3000);
    ASSERT_TRUE(!alive(gc));
    fleet_done(f);
    char p[160];
    snprintf(p, sizeof p, "%s/grandchild", dir);
    unlink(p);
}

TEST(crash_loop_fails_and_reload_retries)
{
    const char *sh = script("crash.sh", "echo dying\nexit 3");
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{'models':[{'name':'cm','backends':["
             "{'launch':{'command':['%s'],'port':41061}},"
             "{'launch':{'command':['/nonexistent/worker'],'port':41062}},"
             "{'launch':{'command':['no-such-command-xyz'],'port':41063}}]}]}", sh);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("%s", cfg)), 0);
    WAIT(!strcmp(snap(f, 41061).state, "failed") && !strcmp(snap(f, 41062).state, "failed") &&
             !strcmp(snap(f, 41063).state, "failed"), 5000);
    ws s = snap(f, 41061), x = snap(f, 41062), y = snap(f, 41063);
    ASSERT_STR_EQ(s.state, "failed");
    ASSERT_EQ(s.crashes, 3);
    ASSERT_EQ(s.restarts, 2);
    ASSERT_EQ(s.code, 3);
    ASSERT_EQ(s.pid, 0);
    ASSERT_TRUE(has_line("] dying"));
    ASSERT_TRUE(has_line("restarting in 20 ms"));
    ASSERT_TRUE(has_line("restarting in 40 ms"));   /* doubled */
    ASSERT_TRUE(has_line("[cm worker#0] failed: exited with code 3, 3 times in a row"));
    ASSERT_STR_EQ(x.state, "failed");
    ASSERT_EQ(x.code, 127);
    ASSERT_TRUE(has_line("cannot execute /nonexistent/worker: errno 2"));
    ASSERT_STR_EQ(y.state, "failed");
    ASSERT_EQ(y.code, 127);
    ASSERT_TRUE(has_line("no-such-command-xyz: command not found"));
    /* Nothing restarts any more. */
    for (int i = 0; i < 10; i++) {
        pump();
        sleep_ms(10);
    }
    ASSERT_EQ(snap(f, 41061).restarts, 2);
    /* The same spec again retries it from a clean slate. */
    ASSERT_EQ(sync_cfg(f, cfg_fmt("%s", cfg)), 0);
    WAIT(snap(f, 41061).restarts > 2, 2000);
    WAIT(!strcmp(snap(f, 41061).state, "failed"), 5000);
    s = snap(f, 41061);
    ASSERT_STR_EQ(s.state, "failed");
    ASSERT_EQ(s.restarts, 5);
    ASSERT_EQ(s.crashes, 3);
    fleet_done(f);
}

/* Readiness: GET <health path> 2xx makes it running; never ready within
 * startup_timeout_ms restarts it; health disabled: running once started. */
TEST(readiness_and_startup_timeout)
{
    char js[160];
    snprintf(js, sizeof js, "%s/server.js", dir);
    FILE *fp = fopen(js, "w");
    ASSERT_TRUE(fp != NULL);
    fprintf(fp, "const code = +process.argv[3];\n"
                "require('http').createServer((q, s) => { s.statusCode = q.url === '/ready' ? code : 404;"
                " s.end('x'); }).listen(+process.argv[2], '127.0.0.1', () => console.log('listening'));\n");
    fclose(fp);
    int p1 = free_port(), p2 = free_port();
    ASSERT_TRUE(p1 > 0 && p2 > 0 && p1 != p2);
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':["
                                  "{'name':'ok','health':{'path':'/ready'},'backends':["
                                  "{'launch':{'command':['node','%s','%d','200'],'port':%d}}]},"
                                  "{'name':'slow','health':{'path':'/ready'},'backends':["
                                  "{'launch':{'command':['node','%s','%d','503'],'port':%d,'startup_timeout_ms':1500}}]},"
                                  "{'name':'nohc','health':false,'backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41071}}]}]}",
                                  js, p1, p1, js, p2, p2)),
              0);
    WAIT(snap(f, p2).pid > 0, 2000);
    int first = snap(f, p2).pid;
    ASSERT_TRUE(first > 0);
    WAIT(!strcmp(snap(f, 41071).state, "running"), 2000);
    ASSERT_STR_EQ(snap(f, 41071).state, "running");
    WAIT(!strcmp(snap(f, p1).state, "running"), 8000);
    ws s = snap(f, p1);
    ASSERT_STR_EQ(s.state, "running");
    ASSERT_EQ(s.ready, 1);
    ASSERT_EQ(s.restarts, 0);
    ASSERT_TRUE(has_line("ready after"));
    /* 503 (loading) is not ready: after 1.5 s it is restarted. */
    WAIT(snap(f, p2).restarts >= 1 && snap(f, p2).pid > 0, 6000);
    s = snap(f, p2);
    ASSERT_TRUE(s.restarts >= 1);
    ASSERT_TRUE(s.pid != first);
    ASSERT_TRUE(has_line("[slow worker#0 "));
    ASSERT_TRUE(has_line("not ready within 1500 ms: restarting"));
    ASSERT_TRUE(!alive(first));
    fleet_done(f);
}

/* Unchanged specs keep their process; a changed one drains (while the probe
 * says requests are in flight) and its successor waits for its port; a
 * removed one stops and disappears. */
TEST(sync_keeps_drains_and_replaces)
{
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    mm_fleet_set_drain_probe(f, probe, NULL);
    in_flight_value = 1;
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'sm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41081}},"
                                  "{'launch':{'command':['sleep','60'],'port':41082}}]}]}")),
              0);
    WAIT(execd(snap(f, 41081).pid, "sleep") && execd(snap(f, 41082).pid, "sleep"), 5000);
    int keep = snap(f, 41081).pid, old = snap(f, 41082).pid;
    ASSERT_TRUE(keep > 0 && old > 0);
    /* Same spec for 41081 (now second, other weight and timeout); 41082's
     * args change. */
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'sm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41082,'args':['1']}},"
                                  "{'weight':5,'launch':{'command':['sleep','60'],'port':41081,"
                                  "'startup_timeout_ms':99999}}]}]}")),
              0);
    WAIT(!strcmp(snap_sel(f, 41082, 1).state, "draining"), 2000);
    ws o = snap_sel(f, 41082, 1), n = snap(f, 41082), k = snap(f, 41081);
    ASSERT_STR_EQ(o.state, "draining");
    ASSERT_EQ(o.pid, old);
    ASSERT_TRUE(n.id != o.id);
    ASSERT_STR_EQ(n.state, "starting");
    ASSERT_EQ(n.pid, 0);          /* waits for the port */
    ASSERT_EQ(k.pid, keep);       /* untouched */
    ASSERT_EQ(k.worker, 1);       /* its index follows the config */
    ASSERT_EQ(k.restarts, 0);
    for (int i = 0; i < 10; i++) {   /* in flight: stays */
        pump();
        sleep_ms(10);
    }
    ASSERT_TRUE(alive(old));
    ASSERT_STR_EQ(probed_url, "http://127.0.0.1:41082");
    in_flight_value = 0;
    WAIT(!alive(old) && execd(snap(f, 41082).pid, "sleep"), 5000);
    ASSERT_TRUE(!alive(old));
    ASSERT_TRUE(not_our_child(old));
    n = snap(f, 41082);
    ASSERT_TRUE(n.pid > 0 && n.pid != old);
    ASSERT_STR_EQ(n.cmd, "sleep 60 1");
    ASSERT_EQ(nworkers(f), 2);    /* the stopped one is gone */
    ASSERT_TRUE(has_line("removed from the configuration: stopping (drained)"));
    ASSERT_EQ(snap(f, 41081).pid, keep);
    /* Remove 41081 entirely. */
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'sm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41082,'args':['1']}}]}]}")),
              0);
    WAIT(!snap(f, 41081).found && !alive(keep), 5000);
    ASSERT_TRUE(!snap(f, 41081).found);
    ASSERT_TRUE(!alive(keep));
    ASSERT_TRUE(not_our_child(keep));
    ASSERT_EQ(snap(f, 41082).pid, n.pid);
    ASSERT_EQ(nworkers(f), 1);
    fleet_done(f);
}

TEST(drain_timeout_stops_anyway)
{
    mm_fleet *f = fleet_new(NULL);
    mm_fleet_opts o;
    ASSERT_TRUE(f != NULL);
    mm_fleet_opts_default(&o);
    o.drain_poll_ms = 10;
    o.drain_timeout_ms = 200;
    o.stop_timeout_ms = 300;
    o.reap_poll_ms = 60000;
    ASSERT_EQ(mm_fleet_set_opts(f, &o, err, sizeof err), 0);
    mm_fleet_set_drain_probe(f, probe, NULL);
    in_flight_value = 7;
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'dm','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41091}}]}]}")),
              0);
    WAIT(execd(snap(f, 41091).pid, "sleep"), 5000);
    int pid = snap(f, 41091).pid;
    int64_t t0 = now_ms();
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'other','backends':[{'url':'http://127.0.0.1:9'}]}]}")), 0);
    WAIT(!alive(pid), 3000);
    ASSERT_TRUE(!alive(pid));
    ASSERT_TRUE(now_ms() - t0 >= 200);
    ASSERT_TRUE(has_line("drain timeout, requests still in flight"));
    ASSERT_EQ(nworkers(f), 0);
    fleet_done(f);
}

/* stop_all: SIGTERM to all, SIGKILL for one that ignores it (and for its
 * group), nothing left behind, nothing restarted. */
TEST(stop_all_terms_then_kills)
{
    const char *term_ignoring = script("term_ignoring.sh", "trap '' TERM\nsleep 1000 &\n"
                                                 "echo $! > \"$MM_TEST_DIR/term_ignoring_child\"\n"
                                                 "while :; do wait; done");
    char p[160];
    snprintf(p, sizeof p, "%s/term_ignoring_child", dir);
    unlink(p);
    mm_fleet *f = fleet_new(NULL);
    ASSERT_TRUE(f != NULL);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'st','backends':["
                                  "{'launch':{'command':['sleep','60'],'port':41101}},"
                                  "{'launch':{'command':['%s'],'port':41102}}]}]}", term_ignoring)),
              0);
    WAIT(execd(snap(f, 41101).pid, "sleep") && read_pid_file("term_ignoring_child") > 0, 5000);
    int a = snap(f, 41101).pid, b = snap(f, 41102).pid, gc = read_pid_file("term_ignoring_child");
    ASSERT_TRUE(a > 0 && b > 0 && gc > 0);
    int64_t t0 = now_ms();
    ASSERT_EQ(mm_fleet_stop_all(f, 400), 0);
    int64_t took = now_ms() - t0;
    ASSERT_TRUE(took >= 400);
    ASSERT_TRUE(took < 3000);
    ws sa = snap(f, 41101), sb = snap(f, 41102);
    ASSERT_STR_EQ(sa.state, "stopped");
    ASSERT_EQ(sa.sig, SIGTERM);
    ASSERT_STR_EQ(sb.state, "stopped");
    ASSERT_EQ(sb.sig, SIGKILL);
    ASSERT_TRUE(not_our_child(a));
    ASSERT_TRUE(not_our_child(b));
    ASSERT_TRUE(!alive(a) && !alive(b));
    WAIT(!alive(gc), 2000);
    ASSERT_TRUE(!alive(gc));
    ASSERT_TRUE(has_line("still running 400 ms after SIGTERM: SIGKILL"));
    /* Nothing comes back, and the fleet refuses new work. */
    for (int i = 0; i < 10; i++) {
        pump();
        sleep_ms(10);
    }
    ASSERT_EQ(snap(f, 41101).pid, 0);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'x','backends':[{'url':'http://127.0.0.1:9'}]}]}")),
              -ECANCELED);
    fleet_done(f);
    unlink(p);
}

/* As wired in the gateway: the loop runs in its own thread; sync, status
 * and the SIGCHLD notification come from another, stop_all after the loop
 * stopped. */
static void *loop_thread(void *arg)
{
    event_base_dispatch(arg);
    return NULL;
}

TEST(loop_in_another_thread)
{
    const char *quiet = script("quiet2.sh", "exec >/dev/null 2>&1\nexec sleep 60");
    struct event_base *b2 = event_base_new();
    mm_fleet *f = NULL;
    pthread_t th;
    mm_fleet_opts o;
    ASSERT_TRUE(b2 != NULL);
    ASSERT_EQ(mm_fleet_new(b2, "/bin/false", &f, err, sizeof err), 0);
    mm_fleet_opts_default(&o);
    o.backoff_initial_ms = 20;
    o.reap_poll_ms = 60000;   /* only the notification can tell the exit */
    ASSERT_EQ(mm_fleet_set_opts(f, &o, err, sizeof err), 0);
    mm_fleet_set_log_sink(f, sink, NULL);
    ASSERT_EQ(pthread_create(&th, NULL, loop_thread, b2), 0);
    ASSERT_EQ(sync_cfg(f, cfg_fmt("{'models':[{'name':'th','backends':["
                                  "{'launch':{'command':['%s'],'port':41121}}]}]}", quiet)),
              0);
    int64_t end = now_ms() + 5000;
    while (!execd(snap(f, 41121).pid, "sleep") && now_ms() < end)
        sleep_ms(5);
    int old = snap(f, 41121).pid;
    ASSERT_TRUE(execd(old, "sleep"));
    kill(old, SIGKILL);
    end = now_ms() + 5000;
    while (alive(old) && now_ms() < end)
        sleep_ms(1);
    mm_fleet_child_exited(f);   /* what the main thread's sigwait loop does */
    /* generous: a loaded 2-core machine once took over 5 s to fork again */
    end = now_ms() + 20000;
    while (!(snap(f, 41121).pid > 0 && snap(f, 41121).pid != old) && now_ms() < end)
        sleep_ms(5);
    ws s = snap(f, 41121);
    ASSERT_TRUE(s.pid > 0 && s.pid != old);
    ASSERT_EQ(s.restarts, 1);
    event_base_loopbreak(b2);
    pthread_join(th, NULL);
    ASSERT_EQ(mm_fleet_stop_all(f, 2000), 0);
    ASSERT_TRUE(not_our_child(s.pid));
    mm_fleet_free(f);
    event_base_free(b2);
    lines_clear();
}

/* A gateway killed outright takes its workers along (PR_SET_PDEATHSIG):
 * a sub-process runs a fleet and is SIGKILLed; as child subreaper we
 * inherit the orphaned worker and see it die of SIGTERM. */
TEST(workers_die_with_the_gateway)
{
    int pfd[2];
    ASSERT_EQ(pipe(pfd), 0);
    ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    pid_t sub = fork();
    ASSERT_TRUE(sub >= 0);
    if (sub == 0) {
        /* Never touch the parent's loop: its epoll is shared after fork. */
        struct event_base *b2 = event_base_new();
        mm_fleet *f = NULL;
        mm_gateway_cfg *c = cfg_fmt("{'models':[{'name':'pd','backends':["
                                    "{'launch':{'command':['sleep','60'],'port':41111}}]}]}");
        if (!b2 || !c || mm_fleet_new(b2, "/bin/false", &f, err, sizeof err))
            _exit(1);
        mm_fleet_set_log_sink(f, sink, NULL);
        if (mm_fleet_sync(f, c, err, sizeof err))
            _exit(1);
        int64_t end = now_ms() + 5000;
        for (;;) {
            event_base_loop(b2, EVLOOP_NONBLOCK);
            json_t *a = mm_fleet_status(f);
            int pid = (int)json_integer_value(json_object_get(json_array_get(a, 0), "pid"));
            json_decref(a);
            if (execd(pid, "sleep")) {
                ssize_t w = write(pfd[1], &pid, sizeof pid);
                (void)w;
                for (;;)
                    pause();
            }
            if (now_ms() > end)
                _exit(1);
            sleep_ms(5);
        }
    }
    close(pfd[1]);
    int wpid = 0;
    ssize_t r = read(pfd[0], &wpid, sizeof wpid);
    close(pfd[0]);
    ASSERT_EQ(r, (long long)sizeof wpid);
    ASSERT_TRUE(alive(wpid));
    kill(sub, SIGKILL);
    ASSERT_EQ(waitpid(sub, NULL, 0), sub);
    int status = 0;
    pid_t got = 0;
    for (int64_t end = now_ms() + 3000; (got = waitpid(wpid, &status, WNOHANG)) == 0 && now_ms() < end;)
        sleep_ms(5);
    prctl(PR_SET_CHILD_SUBREAPER, 0);
    ASSERT_EQ(got, wpid);
    ASSERT_TRUE(WIFSIGNALED(status));
    ASSERT_EQ(WTERMSIG(status), SIGTERM);
}

static void rm_dir(void)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    char p[512];
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        unlink(p);
    }
    if (d)
        closedir(d);
    rmdir(dir);
}

int main(void)
{
    sigset_t s;
    /* As the gateway: termination signals blocked (sigwait), SIGPIPE
     * ignored; workers must start with neither. */
    sigemptyset(&s);
    sigaddset(&s, SIGTERM);
    sigaddset(&s, SIGINT);
    sigaddset(&s, SIGHUP);
    sigprocmask(SIG_BLOCK, &s, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Pinning must not leak from our environment. */
    setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3", 1);
    setenv("NVIDIA_VISIBLE_DEVICES", "all", 1);
    setenv("HIP_VISIBLE_DEVICES", "0", 1);
    setenv("ROCR_VISIBLE_DEVICES", "0", 1);
    setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST", 1);
    setenv("MM_TEST_KEEP", "yes", 1);
    snprintf(dir, sizeof dir, "/tmp/test_fleet.XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    setenv("MM_TEST_DIR", dir, 1);
    if (evthread_use_pthreads() != 0) {
        printf("libevent without pthreads\n");
        return 1;
    }
    base = event_base_new();
    struct event *sc = evsignal_new(base, SIGCHLD, on_sigchld, NULL);
    if (!base || !sc || event_add(sc, NULL) != 0) {
        printf("cannot set up the event loop\n");
        return 1;
    }

    RUN(opts_are_validated);
    RUN(child_is_pinned_and_clean);
    RUN(worker_command_line);
    RUN(output_lines_are_prefixed);
    RUN(default_sink_is_mm_log);
    RUN(restart_after_kill);
    RUN(group_dies_with_leader);
    RUN(crash_loop_fails_and_reload_retries);
    RUN(readiness_and_startup_timeout);
    RUN(sync_keeps_drains_and_replaces);
    RUN(drain_timeout_stops_anyway);
    RUN(stop_all_terms_then_kills);
    RUN(loop_in_another_thread);
    RUN(workers_die_with_the_gateway);

    event_free(sc);
    event_base_free(base);
    rm_dir();
    return test_summary();
}
