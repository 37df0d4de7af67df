/*
 * rex-linux-exec: the exec helper of rex's "linux" sandbox (rex_sandbox_linux/sandbox.py).
 *
 * The worker starts it with posix_spawn (no fork of the Python process). It does what
 * must happen before bubblewrap runs and what Python cannot do between fork and exec,
 * then execs bubblewrap in place, so an action costs one small extra exec:
 *
 *   rex-linux-exec -r<fd> [-g<cgroup.procs>]... [-m<dir>] [-l<resource>:<soft>:<hard>]...
 *                  [-u<uid>:<gid>] [-k<fd>]... -- /usr/bin/bwrap args...
 *
 *   -r  report fd (close-on-exec): "setup <errno> <what>" when a step fails, else
 *       nothing: end of file then means bubblewrap was exec'd
 *   -g  join this cgroup (write "0" to its cgroup.procs) before anything is forked, so
 *       every process of the action is born inside it and none can escape the limits
 *   -l  setrlimit (only ever lowering)
 *   -u  drop to this user (setgroups, setgid, setuid), needs root: bubblewrap then runs
 *       unprivileged, and the action's uid on the host owns none of the staged inputs
 *   -m  in a mount namespace of its own (private propagation), bind the directory open
 *       at fd 4 onto this directory: bubblewrap, once unprivileged, resolves its mount
 *       sources by path, and the action's user may not traverse the directories above
 *       the exec root (the worker's data dir); the bind makes it reachable at a path it
 *       may traverse, for this action only, without touching the host's mounts
 *   -k  keep this fd open across the exec; every other fd above 2 is closed on exec
 *
 * Options take effect in the order given: -g and -m before -u (they need root).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static int report_fd = -1;

static void setup_failed(const char *what, int err) {
    if (report_fd >= 0)
        dprintf(report_fd, "setup %d %s\n", err, what);
    _exit(125);
}

static void join_cgroup(const char *procs) {
    int fd = open(procs, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        setup_failed(procs, errno);
    if (write(fd, "0", 1) != 1)
        setup_failed(procs, errno);
    close(fd);
}

int main(int argc, char **argv) {
    int keep[8];
    int kept = 0;
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
        } else if (strncmp(arg, "-g", 2) == 0) {
            join_cgroup(arg + 2);
        } else if (strncmp(arg, "-m", 2) == 0) {
            /* By path: a descriptor refers to a mount of the namespace being left. */
            char source[4096];
            ssize_t length = readlink("/proc/self/fd/4", source, sizeof source - 1);
            if (length < 0)
                setup_failed("reading the exec root's path", errno);
            source[length] = 0;
            if (unshare(CLONE_NEWNS) != 0)
                setup_failed("unshare(CLONE_NEWNS)", errno);
            if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
                setup_failed("making mounts private", errno);
            if (mount(source, arg + 2, NULL, MS_BIND | MS_REC, NULL) != 0)
                setup_failed("binding the exec root", errno);
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
        } else if (strncmp(arg, "-k", 2) == 0) {
            if (kept == (int)(sizeof keep / sizeof keep[0]))
                setup_failed("too many -k", EINVAL);
            keep[kept++] = atoi(arg + 2);
        } else {
            setup_failed("unknown option", EINVAL);
        }
    }
    if (i >= argc)
        setup_failed("no command", EINVAL);
    /* Whatever the worker leaked (a descriptor without O_CLOEXEC) must not reach the
     * action: bubblewrap passes on every descriptor it inherits. */
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC 4
#endif
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0)
        for (int fd = 3; fd < 4096; fd++)  /* before Linux 5.11 */
            fcntl(fd, F_SETFD, FD_CLOEXEC);
    for (int k = 0; k < kept; k++)
        if (fcntl(keep[k], F_SETFD, 0) != 0)
            setup_failed("kept fd", errno);
    execv(argv[i], argv + i);
    setup_failed(argv[i], errno);
    return 125;
}
