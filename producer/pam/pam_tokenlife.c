/*
 * pam_tokenlife.so: tokenlife's login path without a process.
 *
 *   session optional pam_tokenlife.so [socket=PATH] [timeout=SECONDS]
 *       [fallback=PROGRAM|none] [config=PATH] [fallback_timeout=SECONDS]
 *
 * On open_session it asks the mint service for PAM_USER's token in this
 * process: one connect to the service's Unix socket, one request line, one
 * reply line ("OK" or "ERR <required 0|1> <message>", the line mode of
 * producer/service.py).  The service checks that the caller is root (by
 * SO_PEERCRED), mints or reuses the token and writes the user's login file.
 *
 * Why C: pam_exec forks, closes every descriptor below the hard
 * RLIMIT_NOFILE (up to 65535 close() calls) and starts a Python interpreter
 * for each login; that alone is more than the 3 % of a login that tokenlife
 * may cost (docs/producer.md, "Login cost").  This module does nothing but
 * the round trip; every decision (who may have a token, its claims, the
 * file) stays in the Python service.
 *
 * When the service does not answer (not running, wedged past the timeout,
 * or it says the trouble is its own: busy, store down), the module runs
 * "PROGRAM [-c CONFIG] pam --no-service" as pam_exec would, with a clean
 * environment holding the PAM items, so the login still gets its token by
 * the Python fallback (docs/producer.md).  close_session does nothing.
 *
 * It never fails a login unless the service says [pam] required = true
 * (then PAM_SESSION_ERR, which fails the login only on a "required" line).
 * It never sees a token: the reply says only OK or why not.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define PAM_SM_SESSION
#include <security/pam_ext.h>
#include <security/pam_modules.h>

#define DEFAULT_SOCKET "/run/tokenlife/mint.sock"
#define DEFAULT_FALLBACK "/usr/bin/tokenlife"
#define DEFAULT_TIMEOUT_MS 5000
/* how long the fallback may take before it is killed: it mints locally */
#define DEFAULT_FALLBACK_TIMEOUT_MS 30000
#define MAX_NAME 32
#define MAX_REPLY 4096

struct options {
    const char *socket;
    const char *fallback; /* NULL: none */
    const char *config;   /* NULL: the fallback's default */
    int timeout_ms;
    int fallback_timeout_ms;
};

/* The answer of one round trip. */
enum answer { ANSWER_OK, ANSWER_REFUSED, ANSWER_NONE };

/* Refusals that are the service's trouble, not the login's: the fallback
 * mints (the same list as tokenlife/app/pam.py). */
static const char *const service_trouble[] = {
    "mint service busy",
    "internal error",
    "too many connections",
    "token store failed",
    "cannot open the token store",
    NULL,
};

/* Whole seconds from 1 to max, as milliseconds. */
static int parse_seconds(pam_handle_t *pamh, const char *arg, const char *text, long max, int *ms)
{
    char *end = NULL;
    errno = 0;
    long seconds = strtol(text, &end, 10);
    if (errno || end == text || *end || seconds < 1 || seconds > max) {
        pam_syslog(pamh, LOG_ERR, "bad option %s (whole seconds, 1 to %ld)", arg, max);
        return -1;
    }
    *ms = (int)seconds * 1000;
    return 0;
}

static int parse_options(pam_handle_t *pamh, int argc, const char **argv, struct options *opt)
{
    opt->socket = DEFAULT_SOCKET;
    opt->fallback = DEFAULT_FALLBACK;
    opt->config = NULL;
    opt->timeout_ms = DEFAULT_TIMEOUT_MS;
    opt->fallback_timeout_ms = DEFAULT_FALLBACK_TIMEOUT_MS;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "socket=", 7) == 0 && arg[7] == '/') {
            opt->socket = arg + 7;
        } else if (strncmp(arg, "fallback=", 9) == 0 && (arg[9] == '/' || strcmp(arg + 9, "none") == 0)) {
            opt->fallback = strcmp(arg + 9, "none") == 0 ? NULL : arg + 9;
        } else if (strncmp(arg, "config=", 7) == 0 && arg[7] == '/') {
            opt->config = arg + 7;
        } else if (strncmp(arg, "timeout=", 8) == 0) {
            if (parse_seconds(pamh, arg, arg + 8, 60, &opt->timeout_ms) < 0)
                return -1;
        } else if (strncmp(arg, "fallback_timeout=", 17) == 0) {
            if (parse_seconds(pamh, arg, arg + 17, 300, &opt->fallback_timeout_ms) < 0)
                return -1;
        } else {
            pam_syslog(pamh, LOG_ERR, "unknown or bad option %s", arg);
            return -1;
        }
    }
    if (strlen(opt->socket) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        pam_syslog(pamh, LOG_ERR, "socket path too long: %s", opt->socket);
        return -1;
    }
    return 0;
}

/* A name the service accepts: the portable user name characters, 1 to 32. */
static int good_name(const char *user)
{
    size_t n = strlen(user);
    if (n == 0 || n > MAX_NAME)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = user[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events or the deadline passes; 1 ready, 0 not. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, (int)left);
        if (n > 0)
            return 1;
        if (n < 0 && errno != EINTR)
            return 0;
    }
}

/* One round trip.  On ANSWER_REFUSED, message holds the service's reason and
 * *required its [pam] required. */
static enum answer ask_service(pam_handle_t *pamh, const struct options *opt, const char *user,
                               char *message, size_t size, int *required)
{
    long long deadline = now_ms() + opt->timeout_ms;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        pam_syslog(pamh, LOG_WARNING, "%s: socket: %m; minting here", user);
        return ANSWER_NONE;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, opt->socket, strlen(opt->socket) + 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        /* A full backlog says EAGAIN on a non-blocking Unix socket: the
         * service is swamped, and this login must not wait for it. */
        if (errno != ENOENT && errno != ECONNREFUSED)
            pam_syslog(pamh, LOG_WARNING, "%s: mint service at %s: %m; minting here", user,
                       opt->socket);
        close(fd);
        return ANSWER_NONE;
    }
    char request[128];
    int len = snprintf(request, sizeof(request), "{\"op\":\"pam\",\"reply\":\"line\",\"user\":\"%s\"}\n",
                       user); /* user holds name characters only: no escaping needed */
    int sent = 0;
    while (sent < len) {
        if (!wait_fd(fd, POLLOUT, deadline))
            goto silent;
        ssize_t n = send(fd, request + sent, (size_t)(len - sent), MSG_NOSIGNAL);
        if (n < 0 && errno != EINTR && errno != EAGAIN)
            goto silent;
        if (n > 0)
            sent += (int)n;
    }
    char reply[MAX_REPLY + 1];
    size_t got = 0;
    for (;;) {
        if (got == MAX_REPLY)
            break; /* a reply is one short line: the rest is not read */
        if (!wait_fd(fd, POLLIN, deadline))
            goto silent;
        ssize_t n = recv(fd, reply + got, MAX_REPLY - got, 0);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            goto silent;
        }
        got += (size_t)n;
    }
    close(fd);
    reply[got] = '\0';
    char *end = strchr(reply, '\n');
    if (end)
        *end = '\0';
    if (got == 0)
        return ANSWER_NONE; /* closed without a word: the fallback decides */
    if (strcmp(reply, "OK") == 0)
        return ANSWER_OK;
    if (strncmp(reply, "ERR ", 4) == 0 && (reply[4] == '0' || reply[4] == '1') && reply[5] == ' ') {
        *required = reply[4] == '1';
        snprintf(message, size, "%s", reply + 6);
        for (const char *const *t = service_trouble; *t; t++) {
            if (strncmp(message, *t, strlen(*t)) == 0) {
                pam_syslog(pamh, LOG_WARNING, "%s: mint service: %s; minting here", user, message);
                return ANSWER_NONE;
            }
        }
        return ANSWER_REFUSED;
    }
    pam_syslog(pamh, LOG_WARNING, "%s: mint service at %s sent a malformed reply; minting here",
               user, opt->socket);
    return ANSWER_NONE;
silent:
    pam_syslog(pamh, LOG_WARNING, "%s: mint service at %s did not answer; minting here", user,
               opt->socket);
    close(fd);
    return ANSWER_NONE;
}

/* Close every descriptor from low up: one call on Linux >= 5.9, otherwise
 * pam_exec's loop (up to the hard limit, at most 65536). */
static void close_from(int low)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)low, ~0U, 0) == 0)
        return;
#endif
    struct rlimit rl;
    rlim_t top = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max < 65536 ? rl.rlim_max : 65536;
    for (rlim_t fd = (rlim_t)low; fd < top; fd++)
        close((int)fd);
}

/* Run "FALLBACK [-c CONFIG] pam --no-service" as root with the PAM items in a
 * clean environment; its exit status (1: [pam] required and no token), or 0
 * when it could not be run or timed out (logged). */
static int spawn(pam_handle_t *pamh, const struct options *opt, const char *label, char **envp);

static int run_fallback(pam_handle_t *pamh, const struct options *opt, const char *user,
                        const char *label)
{
    /* Whole values, never cut: a cut user name could name somebody else. */
    static const struct {
        int item;
        const char *name;
    } items[] = {
        {PAM_SERVICE, "PAM_SERVICE"},
        {PAM_RHOST, "PAM_RHOST"},
        {PAM_TTY, "PAM_TTY"},
        {PAM_RUSER, "PAM_RUSER"},
    };
    char *envp[8] = {"PAM_TYPE=open_session", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};
    char *owned[5] = {NULL};
    int k = 2, o = 0;
    if (asprintf(&owned[o], "PAM_USER=%s", user) < 0) {
        pam_syslog(pamh, LOG_ERR, "%s: out of memory; no token for this login", label);
        return 0;
    }
    envp[k++] = owned[o++];
    for (size_t i = 0; i < sizeof(items) / sizeof(items[0]); i++) {
        const void *value = NULL;
        if (pam_get_item(pamh, items[i].item, &value) == PAM_SUCCESS && value != NULL &&
            asprintf(&owned[o], "%s=%s", items[i].name, (const char *)value) >= 0)
            envp[k++] = owned[o++];
    }
    envp[k] = NULL;
    int result = spawn(pamh, opt, label, envp);
    for (int i = 0; i < o; i++)
        free(owned[i]);
    return result;
}

/* Fork and exec the fallback; see run_fallback. */
static int spawn(pam_handle_t *pamh, const struct options *opt, const char *label, char **envp)
{
    char *argv[6];
    int a = 0;
    argv[a++] = (char *)opt->fallback;
    if (opt->config) {
        argv[a++] = "-c";
        argv[a++] = (char *)opt->config;
    }
    argv[a++] = "pam";
    argv[a++] = "--no-service";
    argv[a] = NULL;

    pid_t pid = fork();
    if (pid < 0) {
        pam_syslog(pamh, LOG_ERR, "%s: fork: %m; no token for this login", label);
        return 0;
    }
    if (pid == 0) {
        /* The effective ids, as pam_exec's seteuid: root also under su and sudo. */
        if (setregid(getegid(), getegid()) < 0 || setreuid(geteuid(), geteuid()) < 0)
            _exit(127);
        int null = open("/dev/null", O_RDWR);
        if (null < 0)
            _exit(127);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2); /* its one-line messages go to syslog as well */
        close_from(3);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        execve(opt->fallback, argv, envp);
        _exit(127);
    }
    long long deadline = now_ms() + opt->fallback_timeout_ms;
    int status = 0;
    for (int pause_ms = 1;; pause_ms = pause_ms < 50 ? pause_ms * 2 : 50) {
        pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid)
            break;
        if (done < 0 && errno != EINTR) {
            return 0; /* reaped by the application's own SIGCHLD handling */
        }
        if (now_ms() >= deadline) {
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            pam_syslog(pamh, LOG_ERR, "%s: %s took longer than %d s: killed", label, opt->fallback,
                       opt->fallback_timeout_ms / 1000);
            return 0;
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = pause_ms * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (WIFEXITED(status)) {
        if (WEXITSTATUS(status) == 127)
            pam_syslog(pamh, LOG_ERR, "%s: cannot run %s", label, opt->fallback);
        return WEXITSTATUS(status) == 1;
    }
    pam_syslog(pamh, LOG_ERR, "%s: %s died of signal %d", label, opt->fallback, WTERMSIG(status));
    return 0;
}

PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)flags;
    struct options opt;
    if (parse_options(pamh, argc, argv, &opt) < 0)
        return PAM_SUCCESS; /* a bad PAM line must not lock everyone out */
    const void *item = NULL;
    if (pam_get_item(pamh, PAM_USER, &item) != PAM_SUCCESS || item == NULL) {
        pam_syslog(pamh, LOG_WARNING, "no PAM_USER: no token");
        return PAM_SUCCESS;
    }
    const char *user = item;
    /* What the logs call the user: a hostile name is not repeated. */
    const char *label = good_name(user) ? user : "(bad user name)";
    if (good_name(user)) {
        char message[MAX_REPLY + 1];
        int required = 0;
        switch (ask_service(pamh, &opt, user, message, sizeof(message), &required)) {
        case ANSWER_OK:
            return PAM_SUCCESS;
        case ANSWER_REFUSED:
            pam_syslog(pamh, LOG_WARNING, "%s: %s", user, message);
            return required ? PAM_SESSION_ERR : PAM_SUCCESS;
        case ANSWER_NONE:
            break;
        }
    }
    /* No service, or a name it would refuse: the full path decides. */
    if (opt.fallback == NULL) {
        pam_syslog(pamh, LOG_WARNING, "%s: no answer from the mint service and no fallback: no token",
                   label);
        return PAM_SUCCESS;
    }
    return run_fallback(pamh, &opt, user, label) ? PAM_SESSION_ERR : PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh;
    (void)flags;
    (void)argc;
    (void)argv;
    return PAM_SUCCESS;
}
