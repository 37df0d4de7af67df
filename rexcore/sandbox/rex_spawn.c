/*
 * rex-spawn: the exec helper of rex's "process" sandbox (rexcore/sandbox/process.py).
 *
 * The worker starts it with vfork+exec (no fork of the whole Python process, no Python
 * code between fork and exec), so an action costs one small extra exec; or, on Linux,
 * a resident copy (-S) forks it for each action, which costs less still. It prepares
 * what Python would otherwise have to do in a forked child, then runs the command as
 * its child and waits for it:
 *
 *   rex-spawn -r<fd> [-c<dir>] [-s] [-l<resource>:<soft>:<hard>]... [-u<uid>:<gid>] -- argv...
 *   rex-spawn -S<fd>
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
 *   -S  (Linux) serve: stay resident and start each action by forking, which costs far
 *       less than an exec of this helper. Per action the worker sends one message on the
 *       SOCK_SEQPACKET socket at this fd. Its request is the action's environment
 *       ("NAME=value" strings, each NUL-terminated), an empty string, then the options
 *       and argv above (-r3 ... -- argv...), either in the message itself, after the
 *       byte 'b', with three descriptors: stdout, stderr and the report pipe (stdin is
 *       this process's own, /dev/null); or, after the byte 'a', in a memfd sent first of
 *       five descriptors: the memfd, stdin, stdout, stderr and the report pipe. The fork
 *       is made with CLONE_PARENT, so the action's process is the worker's own child (the
 *       worker waits for it and owns its pid until it reaps it); it starts a session of
 *       its own, moves the descriptors to 0-3 and goes on as if started with those
 *       options. The reply is the child's pid (int32), or -errno; the first message sent
 *       is 1 once ready (a helper that takes only 'a' messages sent 0). End of file on
 *       the socket ends the spawner; so does the worker's death (PR_SET_PDEATHSIG).
 *
 * The usage reported is RUSAGE_CHILDREN once the command is reaped: the command and the
 * descendants that were waited for, not the worker whose memory the helper was forked
 * from. SIGTERM is ignored here (the worker signals the whole tree; this process stays to
 * report how the command ended); SIGKILL is not. The command starts with the default
 * disposition of SIGPIPE and SIGXFSZ (which Python ignores, and ignoring survives exec)
 * and no signal blocked.
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
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#endif

extern char **environ;

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

#ifdef __linux__
enum { SERVE_FDS = 5 };  /* 'a': arguments, stdin, stdout, stderr, report */
enum { INLINE_FDS = 3 };  /* 'b': stdout, stderr, report */
/* The largest request sent in the message itself (the worker sends bigger ones in a memfd). */
enum { INLINE_MAX = 65536 };
static char inline_request[1 + INLINE_MAX];

/* The environment and argv of one action from the request text (see -S; NUL-terminated
 * strings, text[size - 1] is a NUL); argv[0] is this program's name, so option parsing
 * goes on as for a command line. */
static char **parse_request(char *text, size_t size, int *argc) {
    if (size == 0 || text[size - 1] != '\0')
        setup_failed("malformed request", EINVAL);
    size_t strings = 0;
    for (size_t k = 0; k < size; k++)
        strings += text[k] == '\0';
    char **vector = calloc(strings + 3, sizeof(char *));
    if (vector == NULL)
        setup_failed("reading the request", ENOMEM);
    size_t k = 0, n = 0;
    for (; k < size && text[k] != '\0'; k += strlen(text + k) + 1)
        vector[n++] = text + k;  /* the environment, up to the empty string */
    if (k >= size)
        setup_failed("malformed request", EINVAL);
    vector[n++] = NULL;
    environ = vector;
    char **args = vector + n;
    args[0] = "rex-spawn";
    int count = 1;
    for (k++; k < size; k += strlen(text + k) + 1)
        args[count++] = text + k;
    args[count] = NULL;
    *argc = count;
    return args;
}

/* The request from its memfd ('a'). */
static char **read_request(int fd, int *argc) {
    struct stat info;
    if (fstat(fd, &info) != 0 || info.st_size <= 0)
        setup_failed("reading the request", errno ? errno : EINVAL);
    size_t size = (size_t)info.st_size;
    char *text = malloc(size + 1);
    if (text == NULL)
        setup_failed("reading the request", ENOMEM);
    size_t done = 0;
    while (done < size) {
        ssize_t n = pread(fd, text + done, size - done, (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            setup_failed("reading the request", n < 0 ? errno : EIO);
        done += (size_t)n;
    }
    close(fd);
    text[size] = '\0';
    return parse_request(text, size, argc);
}

/* The spawner's loop; returns only in a forked child, with that action's argv. */
static char **serve(int sock, int *argc) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int32_t ready = 1;
    if (send(sock, &ready, sizeof ready, MSG_NOSIGNAL) != sizeof ready)
        _exit(1);
    for (;;) {
        union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int) * SERVE_FDS)]; } control;
        struct iovec iov = {inline_request, sizeof inline_request};
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
        int fds[SERVE_FDS];
        int received = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int k = 0; k < count; k++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof fd);
                    if (received < SERVE_FDS)
                        fds[received++] = fd;
                    else
                        close(fd);
                }
            }
        int inline_kind = inline_request[0] == 'b';
        int wanted = inline_kind ? INLINE_FDS : SERVE_FDS;
        int32_t reply = -EINVAL;
        if (received == wanted && !(msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
                && (inline_kind || (n == 1 && inline_request[0] == 'a'))) {
            long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
            if (pid == 0) {
                close(sock);
                /* stdin (for 'b' fd 0 as it is: /dev/null), stdout, stderr, report. */
                int io[4] = {-1, -1, -1, -1};
                for (int k = 0; k < wanted - (inline_kind ? 0 : 1); k++)
                    io[k + (inline_kind ? 1 : 0)] = fds[k + (inline_kind ? 0 : 1)];
                /* Moved high first if need be, so that no dup2 below overwrites one still
                 * to move (received descriptors normally lie above 0-3, taken here). */
                int low = 0;
                for (int k = 0; k < 4; k++)
                    low |= io[k] >= 0 && io[k] <= 3;
                for (int k = 0; low && k < 4; k++)
                    if (io[k] >= 0 && (io[k] = fcntl(io[k], F_DUPFD_CLOEXEC, 64)) < 0)
                        _exit(125);
                if (dup2(io[3], 3) != 3)
                    _exit(125);
                report_fd = 3;
                if ((io[0] >= 0 && dup2(io[0], 0) != 0) || dup2(io[1], 1) != 1
                        || dup2(io[2], 2) != 2)
                    setup_failed("passing descriptors on", errno);
                /* The received descriptors are close-on-exec: the command never has them. */
                if (setsid() < 0)
                    setup_failed("setsid", errno);
                if (inline_kind)
                    return parse_request(inline_request + 1, (size_t)n - 1, argc);
                return read_request(fds[0], argc);
            }
            reply = pid > 0 ? (int32_t)pid : -errno;
        }
        for (int k = 0; k < received; k++)
            close(fds[k]);
        if (send(sock, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply)
            _exit(0);
    }
}
#endif

/* Start the command as a child; its pid, or -1 with errno. */
static pid_t start_command(char *const *command) {
#ifdef __linux__
    /* vfork: no copy of this process's page tables, torn down again at once by the exec
     * (about a tenth of an action's process CPU). Sharing this memory until it execs, the
     * child allocates nothing and never returns from here: execvp searches PATH on the
     * stack (glibc 2.24 and later, musl), the failure is told with write, not stdio; the
     * signal mask and dispositions it changes are its own. */
    pid_t child = vfork();
#else
    pid_t child = fork();
#endif
    if (child == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGXFSZ, SIG_DFL);
        execvp(command[0], command);
        int err = errno;
        char line[32];
        int length = snprintf(line, sizeof line, "exec %d\n", err);
        if (report_fd >= 0 && length > 0)
            (void)!write(report_fd, line, (size_t)length);
        const char *reason = strerror(err);
        struct iovec message[] = {
            {"rex: cannot execute '", 21}, {command[0], strlen(command[0])}, {"': ", 3},
            {(void *)reason, strlen(reason)}, {"\n", 1}};
        (void)!writev(2, message, 5);
        _exit(err == ENOENT ? 127 : 126);
    }
    return child;
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
#ifdef __linux__
        } else if (strncmp(arg, "-S", 2) == 0) {
            argv = serve(atoi(arg + 2), &argc);
            i = 0;  /* the loop's i++ makes it 1: the action's own options follow */
#endif
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

    pid_t child = start_command(argv + i);
    if (child < 0)
        setup_failed("fork", errno);
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
