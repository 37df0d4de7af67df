/*
 * rex-spawn: the exec helper of rex's "process" sandbox (rexcore/sandbox/process.py).
 *
 * The worker starts it with vfork+exec (no fork of the whole Python process, no Python
 * code between fork and exec), so an action costs one small extra exec. It prepares
 * what Python would otherwise have to do in a forked child, then runs the command as
 * its child and waits for it:
 *
 *   rex-spawn -r<fd> [-c<dir>] [-s] [-l<resource>:<soft>:<hard>]... [-u<uid>:<gid>] -- argv...
 *
 *   -r  report fd: "setup <errno> <what>", "exec <errno>" and finally
 *       "done <wait status> <user us> <system us> <max rss> <left>" lines go there
 *       (left: 1 if live descendants remain); it is
 *       close-on-exec, so the command never sees it
 *   -c  change into this directory (before -u drops privileges, so the command starts
 *       there even where its user may not traverse the directories above it)
 *   -s  become a child subreaper: orphans of the command's tree re-parent here, not to
 *       init, so the worker can still find and kill them
 *   -l  setrlimit (only ever lowering)
 *   -u  drop to this user (setgroups, setgid, setuid), needs root
 *
 * The usage reported is RUSAGE_CHILDREN once the command is reaped: the command and the
 * descendants that were waited for, not the worker whose memory the helper was forked
 * from. SIGTERM is ignored here (the worker signals the whole tree; this process stays to
 * report how the command ended); SIGKILL is not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

static int report_fd = -1;

static void setup_failed(const char *what, int err) {
    if (report_fd >= 0)
        dprintf(report_fd, "setup %d %s\n", err, what);
    dprintf(2, "rex-spawn: %s: %s\n", what, strerror(err));
    _exit(125);
}

static long long micros(struct timeval t) {
    return (long long)t.tv_sec * 1000000LL + t.tv_usec;
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        } else if (strncmp(arg, "-r", 2) == 0) {
            report_fd = atoi(arg + 2);
            if (fcntl(report_fd, F_SETFD, FD_CLOEXEC) != 0)
                setup_failed("report fd", errno);
        } else if (strncmp(arg, "-c", 2) == 0) {
            if (chdir(arg + 2) != 0)
                setup_failed("chdir", errno);
        } else if (strcmp(arg, "-s") == 0) {
#ifdef PR_SET_CHILD_SUBREAPER
            if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0)
                setup_failed("prctl(PR_SET_CHILD_SUBREAPER)", errno);
#endif
        } else if (strncmp(arg, "-l", 2) == 0) {
            int which;
            unsigned long long soft, hard;
            if (sscanf(arg + 2, "%d:%llu:%llu", &which, &soft, &hard) != 3)
                setup_failed("malformed -l", EINVAL);
            struct rlimit limit = {(rlim_t)soft, (rlim_t)hard};
            if (setrlimit(which, &limit) != 0)
                setup_failed("setrlimit", errno);
        } else if (strncmp(arg, "-u", 2) == 0) {
            unsigned long uid, gid;
            if (sscanf(arg + 2, "%lu:%lu", &uid, &gid) != 2)
                setup_failed("malformed -u", EINVAL);
            if (setgroups(0, NULL) != 0)
                setup_failed("setgroups", errno);
            if (setgid((gid_t)gid) != 0)
                setup_failed("setgid", errno);
            if (setuid((uid_t)uid) != 0)
                setup_failed("setuid", errno);
        } else {
            setup_failed("unknown option", EINVAL);
        }
    }
    if (i >= argc)
        setup_failed("no command", EINVAL);

    pid_t child = fork();
    if (child < 0)
        setup_failed("fork", errno);
    if (child == 0) {
        execvp(argv[i], argv + i);
        int err = errno;
        if (report_fd >= 0)
            dprintf(report_fd, "exec %d\n", err);
        dprintf(2, "rex: cannot execute '%s': %s\n", argv[i], strerror(err));
        _exit(err == ENOENT ? 127 : 126);
    }
    signal(SIGTERM, SIG_IGN);

    int status = 0;
    for (;;) {  /* reap adopted orphans along the way; stop at the command */
        pid_t done = waitpid(-1, &status, 0);
        if (done == child)
            break;
        if (done < 0 && errno != EINTR) {
            status = 255 << 8;
            break;
        }
    }
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    /* Reap what already died; are live descendants left (they re-parent to the worker)? */
    int ignored;
    pid_t left;
    while ((left = waitpid(-1, &ignored, WNOHANG)) > 0) {
    }
    if (report_fd >= 0)
        dprintf(report_fd, "done %d %lld %lld %ld %d\n", status, micros(usage.ru_utime),
                micros(usage.ru_stime), (long)usage.ru_maxrss, left == 0);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
