/* The reaper of a Run-Flare program run, compiled (runner.py's REAPER in C: the same protocol, without a
 * Perl interpreter to start for every run). It runs inside the sandbox as the run's unprivileged uid.
 *
 *   reaper STATUS_FD CONTROL_FD SELF_FD [JOIN_FD...]
 *
 * SELF_FD (the fd this binary was executed from, or -1) is closed first. Each JOIN_FD is a cgroup's join file
 * (v1 `tasks`, v2 `cgroup.procs`) that the launcher opened for writing: the reaper writes 0 to each (itself
 * joins the run's group, so the program it forks is in it from its first instruction) and closes it, before
 * anything else; a failed join writes "launch cannot join cgroup ..." and exits. The reaper waits for its message on
 * CONTROL_FD, NUL-separated: the rlimit count n, n (resource, soft, hard) triples, the stdin ("" = /dev/null,
 * "-" = inherited, else a file in the work dir, opened then unlinked), "1" to send stderr to stdout, then
 * the program's argv. End of file without a message: the sandbox was discarded, nothing runs. Failures
 * before the program runs write "launch ..." to STATUS_FD; then "exec ERRNO TEXT" if the program cannot be
 * executed, and last "exit N CPU RSS" or "signal N CPU RSS" (the program's own rusage). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static int status_fd = -1;

static void launch(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    dprintf(status_fd, "launch %s\n", line);
    _exit(125);
}

static char *read_all(int fd, size_t *len) {
    size_t cap = 4096;
    char *buf = malloc(cap + 1);
    *len = 0;
    for (;;) {
        if (buf == NULL) _exit(120);
        if (*len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            continue;
        }
        ssize_t n = read(fd, buf + *len, cap - *len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) _exit(120);
        if (n == 0) break;
        *len += (size_t)n;
    }
    buf[*len] = '\0';
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 4) return 120;
    status_fd = atoi(argv[1]);
    int control_fd = atoi(argv[2]), self_fd = atoi(argv[3]);
    if (self_fd >= 0) close(self_fd);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); /* the program cannot open /proc/<reaper>/fd */
    prctl(PR_SET_NAME, "runflare-reaper", 0, 0, 0); /* not the fd number it was executed from */
    if (fcntl(status_fd, F_SETFD, FD_CLOEXEC) != 0) return 120; /* nor inherit the status pipe */
    for (int i = 4; i < argc; i++) { /* "0": the writing thread, this single-threaded reaper */
        int join_fd = atoi(argv[i]);
        if (write(join_fd, "0", 1) != 1) launch("cannot join cgroup (fd %d): %s", join_fd, strerror(errno));
        close(join_fd);
    }

    size_t len;
    char *msg = read_all(control_fd, &len);
    close(control_fd);
    if (len == 0) return 0;
    size_t count = 1;
    for (size_t i = 0; i < len; i++) count += msg[i] == '\0';
    char **field = calloc(count + 1, sizeof *field);
    if (field == NULL) return 120;
    field[0] = msg;
    for (size_t i = 0, k = 1; i < len; i++)
        if (msg[i] == '\0') field[k++] = msg + i + 1;
    long n = strtol(field[0], NULL, 10);
    if (n < 0 || (size_t)(3 * n + 4) > count) launch("malformed message");
    char **lim = field + 1, *in = field[3 * n + 1], *merge = field[3 * n + 2], **args = field + 3 * n + 3;

    if (strcmp(in, "-") != 0) {
        const char *path = *in ? in : "/dev/null";
        int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || dup2(fd, 0) < 0) launch("cannot open the program's stdin: %s", strerror(errno));
        close(fd);
        if (*in) unlink(path);
    }
    if (*merge && dup2(1, 2) < 0) launch("cannot merge stderr: %s", strerror(errno));

    pid_t pid = fork();
    if (pid < 0) return 121;
    if (pid == 0) {
        for (long i = 0; i < n; i++) { /* never above what was asked, nor above the current hard limit */
            int resource = (int)strtol(lim[3 * i], NULL, 10);
            struct rlimit want = {strtoull(lim[3 * i + 1], NULL, 10), strtoull(lim[3 * i + 2], NULL, 10)}, now;
            if (prlimit(0, resource, &want, NULL) == 0) continue;
            if (prlimit(0, resource, NULL, &now) != 0) launch("cannot read rlimit %d: %s", resource, strerror(errno));
            if (want.rlim_cur > now.rlim_max) want.rlim_cur = now.rlim_max;
            if (want.rlim_max > now.rlim_max) want.rlim_max = now.rlim_max;
            if (prlimit(0, resource, &want, NULL) != 0)
                launch("cannot set rlimit %d: %s", resource, strerror(errno));
        }
        execvp(args[0], args);
        dprintf(status_fd, "exec %d %s\n", errno, strerror(errno));
        _exit(127);
    }
    const int ignored[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE, SIGUSR1, SIGUSR2, SIGALRM};
    for (size_t i = 0; i < sizeof ignored / sizeof *ignored; i++) signal(ignored[i], SIG_IGN);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return 122;
    struct rusage ru;
    char usage[64] = " - -";
    if (getrusage(RUSAGE_CHILDREN, &ru) == 0) /* the program's own CPU time and peak RSS */
        snprintf(usage, sizeof usage, " %.6f %ld",
                 (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                     (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6,
                 ru.ru_maxrss);
    if (WIFSIGNALED(status)) {
        dprintf(status_fd, "signal %d%s\n", WTERMSIG(status), usage);
        return 128 + WTERMSIG(status);
    }
    dprintf(status_fd, "exit %d%s\n", WEXITSTATUS(status), usage);
    return WEXITSTATUS(status);
}
