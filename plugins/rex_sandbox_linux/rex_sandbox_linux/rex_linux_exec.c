/*
 * rex-linux-exec: the exec helper of rex's "linux" sandbox (rex_sandbox_linux/sandbox.py).
 *
 * The worker starts it with posix_spawn (no fork of the Python process). It does what
 * must happen before bubblewrap runs and what Python cannot do between fork and exec,
 * then execs bubblewrap in place, so an action costs one small extra exec:
 *
 *   rex-linux-exec -r<fd> [-g<cgroup.procs>]... [-n] [-e] [-S<fd>] [-h] [-m<dir>|-b<dir>]
 *                  [-l<resource>:<soft>:<hard>]... [-u<uid>:<gid>] [-k<fd>]... -- /usr/bin/bwrap args...
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
 *   -n  enter a mount namespace of its own (private propagation): a slot's spawner, once,
 *       for -b in the actions it forks
 *   -b  bind the directory holding the exec root (fd 4) onto this directory, unless that
 *       is bound there already: -m without a mount namespace per action. In a spawner's
 *       namespace (-n) the bind stays for the slot's next actions, whose exec roots
 *       share that directory (the worker's exec dir), so most actions mount nothing.
 *       Needs that directory to be searchable by the action's user (bubblewrap passes it)
 *   -k  keep this fd open across the exec; every other fd above 2 is closed on exec
 *   -e  enter a new network namespace with only the loopback interface, up: a slot's
 *       spawner, so that each action it forks is born in a fresh one that is ready
 *       already. After each fork the spawner, having replied, makes the next action's
 *       namespace while this one runs: creating a network namespace costs more than a
 *       millisecond, which bubblewrap's --unshare-net would add to every action. When
 *       that fails, the spawner refuses the next action (the reply is -errno) rather
 *       than let it share a namespace with the previous one
 *   -h  back into the host's network namespace (the one -e left): an action that may use
 *       the network, forked by such a spawner
 *
 *   -S  serve: from here on, this process is an action slot's spawner. It has joined the
 *       slot's cgroups (-g before -S), once; per action the worker sends one message on
 *       the socket at this fd, with six descriptors: a memfd holding the rest of the
 *       helper's argv (NUL-separated: -r3 [-m..] [-l..] [-u..] [-k4] -- bwrap ...), then
 *       stdin, stdout, stderr, the report pipe and the exec root. The spawner forks with
 *       CLONE_PARENT, so the action's process is the worker's own child (it waits for it)
 *       and is born inside the slot's cgroups: joining a cgroup (a write to cgroup.procs)
 *       waits for an RCU grace period, several milliseconds on a busy host, forking into
 *       one costs nothing. The reply is the child's pid (int32), or -errno. The first
 *       message the spawner sends is 0 once it is ready, or a "setup" report. End of file
 *       on the socket ends it; so does the worker's death (PR_SET_PDEATHSIG).
 *
 * Options take effect in the order given: -g, -m, -e and -h before -u (they need root).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static int report_fd = -1;
static int host_network = -1;  /* -e: the namespace left, for -h; far from fds 0-4 */

static void setup_failed(const char *what, int err) {
    if (report_fd >= 0)
        dprintf(report_fd, "setup %d %s\n", err, what);
    _exit(125);
}

static void bind_exec_dir(const char *target) {
    struct stat want, have;
    if (fstatat(4, "..", &want, 0) != 0)
        setup_failed("the exec root's directory", errno);
    if (stat(target, &have) == 0 && have.st_dev == want.st_dev && have.st_ino == want.st_ino)
        return;
    char source[4096];
    ssize_t length = readlink("/proc/self/fd/4", source, sizeof source - 1);
    if (length < 0)
        setup_failed("reading the exec root's path", errno);
    source[length] = 0;
    char *slash = strrchr(source, '/');
    if (slash == NULL || slash == source)
        setup_failed("the exec root's directory", EINVAL);
    *slash = 0;
    umount2(target, MNT_DETACH);  /* another directory's bind, if any */
    if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) != 0)
        setup_failed("binding the exec root's directory", errno);
}

/* Into a new network namespace whose loopback interface is up: 0, or an errno. */
static int fresh_network(void) {
    if (unshare(CLONE_NEWNET) != 0)
        return errno;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return errno;
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, "lo", IFNAMSIZ - 1);
    int err = 0;
    if (ioctl(sock, SIOCGIFFLAGS, &request) != 0)
        err = errno;
    request.ifr_flags |= IFF_UP;
    if (err == 0 && ioctl(sock, SIOCSIFFLAGS, &request) != 0)
        err = errno;
    close(sock);
    return err;
}

static void private_network(void) {
    int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        setup_failed("opening the host's network namespace", errno);
    host_network = fcntl(fd, F_DUPFD_CLOEXEC, 32);
    if (host_network < 0)
        setup_failed("moving the network namespace's fd", errno);
    close(fd);
    int err = fresh_network();
    if (err != 0)
        setup_failed("a network namespace with loopback up", err);
}

static void join_cgroup(const char *procs) {
    int fd = open(procs, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        setup_failed(procs, errno);
    if (write(fd, "0", 1) != 1)
        setup_failed(procs, errno);
    close(fd);
}

/* The argv of one action, NUL-separated in the memfd at fd; argv[0] is a placeholder. */
static char **read_arguments(int fd, int *argc) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        setup_failed("arguments memfd", errno);
    char *text = malloc((size_t)st.st_size + 1);
    if (text == NULL)
        setup_failed("arguments", ENOMEM);
    size_t done = 0;
    while (done < (size_t)st.st_size) {
        ssize_t n = pread(fd, text + done, (size_t)st.st_size - done, (off_t)done);
        if (n <= 0)
            setup_failed("reading the arguments", n < 0 ? errno : EIO);
        done += (size_t)n;
    }
    text[done] = 0;
    int count = 1;
    for (size_t k = 0; k < done; k++)
        count += text[k] == 0;
    char **argv = calloc((size_t)count + 1, sizeof *argv);
    if (argv == NULL)
        setup_failed("arguments", ENOMEM);
    argv[0] = "rex-linux-exec";
    int n = 1;
    for (size_t k = 0; k < done; k += strlen(text + k) + 1)
        argv[n++] = text + k;
    argv[n] = NULL;
    *argc = n;
    return argv;
}

enum { SLOT_FDS = 6 };  /* arguments, stdin, stdout, stderr, report, exec root */

/* The spawner's loop; returns only in a forked child, with that action's argv. */
static char **serve(int sock, int *argc) {
    int network_error = 0;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int32_t ready = 0;
    if (send(sock, &ready, sizeof ready, MSG_NOSIGNAL) != sizeof ready)
        _exit(1);
    for (;;) {
        char byte;
        union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int) * SLOT_FDS)]; } control;
        struct iovec iov = {&byte, 1};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(0);
        int fds[SLOT_FDS];
        int received = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int k = 0; k < count; k++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof fd);
                    if (received < SLOT_FDS)
                        fds[received++] = fd;
                    else
                        close(fd);
                }
            }
        int32_t reply = -EINVAL;
        if (network_error != 0) {
            reply = -network_error;
        } else if (received == SLOT_FDS && !(msg.msg_flags & MSG_CTRUNC)) {
            /* CLONE_VFORK: the child runs at once on this CPU (the spawner waits until it
             * has exec'd bubblewrap) rather than queueing behind a busy host's tasks. */
            long pid = syscall(SYS_clone, CLONE_PARENT | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0);
            if (pid == 0) {
                /* Moved high first, so that no dup2 below overwrites one still to move. */
                for (int k = 0; k < SLOT_FDS; k++)
                    if ((fds[k] = fcntl(fds[k], F_DUPFD_CLOEXEC, 64)) < 0)
                        _exit(125);
                report_fd = -1;
                if (dup2(fds[4], 3) != 3)
                    _exit(125);
                report_fd = 3;
                if (dup2(fds[1], 0) != 0 || dup2(fds[2], 1) != 1 || dup2(fds[3], 2) != 2
                        || dup2(fds[5], 4) != 4)
                    setup_failed("passing descriptors on", errno);
                if (setpgid(0, 0) != 0)
                    setup_failed("setpgid", errno);
                return read_arguments(fds[0], argc);
            }
            reply = pid > 0 ? (int32_t)pid : -errno;
        }
        for (int k = 0; k < received; k++)
            close(fds[k]);
        if (send(sock, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply)
            _exit(0);
        /* The next action's namespace, made while this one runs (-e). */
        if (reply > 0 && host_network >= 0)
            network_error = fresh_network();
    }
}

int main(int argc, char **argv) {
    int keep[8];
    int kept = 0;
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "-S", 2) == 0) {
            argv = serve(atoi(arg + 2), &argc);
            i = 0;  /* the loop's i++ makes it 1: the action's own options follow */
        } else if (strcmp(arg, "--") == 0) {
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
        } else if (strcmp(arg, "-n") == 0) {
            if (unshare(CLONE_NEWNS) != 0)
                setup_failed("unshare(CLONE_NEWNS)", errno);
            if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
                setup_failed("making mounts private", errno);
        } else if (strcmp(arg, "-e") == 0) {
            private_network();
        } else if (strcmp(arg, "-h") == 0) {
            if (host_network < 0)
                setup_failed("-h without a network namespace left by -e", EINVAL);
            if (setns(host_network, CLONE_NEWNET) != 0)
                setup_failed("setns to the host's network namespace", errno);
        } else if (strncmp(arg, "-b", 2) == 0) {
            bind_exec_dir(arg + 2);
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
