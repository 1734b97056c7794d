/*
 * seccomp_floor: what a switched connect() costs at the least, with no interpreter.
 *
 * Why it exists: issue 18 asks socket switching (nsbridge run --bypass) for connect
 * latency within 50 us of direct and new connections at 0.8x direct.  Whatever
 * nsbridge does, a switched connect pays the trap, two wake-ups and the supervisor's
 * system calls; this program measures exactly that floor on the machine at hand, so
 * the gap between nsbridge and it is ours and the gap between it and direct is the
 * kernel's.  It is a benchmark reference only (docs/performance.md, "Socket switching").
 *
 * One process, three parts: a loopback server thread that accepts and closes; a client
 * that times N blocking connect() calls (p50, p90, and connects/s of the whole loop);
 * and, for the trapped rows, a supervisor process serving the client's seccomp listener
 * (SECCOMP_FILTER_FLAG_NEW_LISTENER, handed over with SCM_RIGHTS).  Rows:
 *
 *   direct           the client alone
 *   answer only      every connect() trapped and answered 0 at once (nothing connects):
 *                    the round trip through the supervisor
 *   full switch      what nsbridge's native thread does for a cached decision:
 *                    pidfd_open(PIDFD_THREAD), ID_VALID, pidfd_getfd, process_vm_readv of
 *                    the sockaddr, ID_VALID, SO_TYPE, a host socket, connect(), ADDFD with
 *                    SETFD, the answer (no policy, no option copy, no fdinfo read)
 *
 * each with ordinary wake-ups and with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (Linux 6.6;
 * the "+sync" rows; refused on older kernels, which the row then says).  The
 * supervisor waits in poll() like nsbridge's thread (the flag reaches a poll() waiter,
 * not an epoll one).
 *
 * usage: gcc -O2 -o seccomp_floor seccomp_floor.c -lpthread && ./seccomp_floor [N]
 * Traffic stays on 127.0.0.1 of the namespace it runs in.
 *
 * Wrapper modes, for a real client (bench/usernet_bench.py's seccomp-trap and
 * seccomp-floor rows, so that the nsbridge-bypass row is read against them in one run):
 *
 *   seccomp_floor trap CMD [ARG...]    every connect() of CMD trapped and continued
 *                                      unchanged: the price of the trap alone, the
 *                                      least anything deciding each connect can cost
 *   seccomp_floor switch CMD [ARG...]  every TCP connect() switched as in "full switch
 *                                      +sync" (the file flags kept, EINPROGRESS for a
 *                                      non-blocking socket); no policy, no option
 *                                      copy, no close-on-exec read
 *
 * Connects the switch cannot handle (not TCP, an unreadable sockaddr) are continued
 * unchecked, which is no way to decide anything and fine for a reference.  Both modes
 * print what they did to stderr at the end.  Synchronous wake-ups in both.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif

/* What the supervisor does with one notification; every handler answers it. */
typedef void (*handler)(int listener, struct seccomp_notif *req);

static struct sockaddr_in server_address;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *serve(void *arg)
{
    int listener = (int)(long)arg;
    for (;;) {
        int c = accept(listener, NULL, NULL);
        if (c >= 0)
            close(c);
    }
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void time_connects(const char *label, int n)
{
    double *took = malloc(n * sizeof *took), start = now();
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        double t = now();
        if (connect(s, (struct sockaddr *)&server_address, sizeof server_address) < 0) {
            perror("connect");
            exit(1);
        }
        took[i] = now() - t;
        close(s);
    }
    double whole = now() - start;
    qsort(took, n, sizeof *took, by_value);
    printf("%-22s p50 %6.1f us  p90 %6.1f us  %8.0f connects/s\n", label, took[n / 2] * 1e6,
           took[n * 9 / 10] * 1e6, n / whole);
    fflush(stdout);
    free(took);
}

static int trap_connect(void)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_connect, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {.len = sizeof code / sizeof code[0], .filter = code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                        SECCOMP_FILTER_FLAG_NEW_LISTENER, &program);
}

static void send_fd(int via, int fd)
{
    char space[CMSG_SPACE(sizeof fd)], byte = 0;
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = space,
                       .msg_controllen = sizeof space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fd);
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(via, &m, 0) < 0)
        perror("sendmsg");
}

static int receive_fd(int via)
{
    char space[CMSG_SPACE(sizeof(int))], byte;
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = space,
                       .msg_controllen = sizeof space};
    if (recvmsg(via, &m, 0) <= 0 || CMSG_FIRSTHDR(&m) == NULL)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
    return fd;
}

static void switch_one(int listener, struct seccomp_notif *req)
{
    int target = (int)req->data.args[0];
    socklen_t length = (socklen_t)req->data.args[2];
    char sockaddr[128];
    if (length > sizeof sockaddr)
        return;
    int pidfd = (int)syscall(SYS_pidfd_open, req->pid, PIDFD_THREAD);
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id);
    int theirs = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    struct iovec local = {sockaddr, length}, remote = {(void *)req->data.args[1], length};
    (void)process_vm_readv(req->pid, &local, 1, &remote, 1, 0);
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id);
    int type;
    socklen_t size = sizeof type;
    (void)getsockopt(theirs, SOL_SOCKET, SO_TYPE, &type, &size);
    int host = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(host, (struct sockaddr *)sockaddr, length) < 0)
        perror("supervisor connect");
    struct seccomp_notif_addfd add = {.id = req->id, .flags = SECCOMP_ADDFD_FLAG_SETFD,
                                      .srcfd = (__u32)host, .newfd = (__u32)target,
                                      .newfd_flags = O_CLOEXEC};
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0)
        perror("ADDFD");
    close(host);
    close(theirs);
    close(pidfd);
}

static void answer_only(int listener, struct seccomp_notif *req)
{
    struct seccomp_notif_resp answer = {.id = req->id};
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &answer);
}

static void full_switch(int listener, struct seccomp_notif *req)
{
    switch_one(listener, req);
    answer_only(listener, req);
}

/* Serve ``listener`` with ``serve_one`` until every process under the filter is gone. */
static void supervise(int listener, handler serve_one, int sync)
{
    if (sync && ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                      SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0) < 0)
        fprintf(stderr, "  (SYNC_WAKE_UP refused: %s; Linux 6.6 has it)\n", strerror(errno));
    for (;;) {
        struct pollfd p = {.fd = listener, .events = POLLIN};
        if (poll(&p, 1, -1) < 0)
            continue;
        if (p.revents & (POLLHUP | POLLERR))
            return;
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) {
            if (errno == EINTR || errno == ENOENT)
                continue;
            return;
        }
        serve_one(listener, &req);
    }
}

/* Fork a child that installs the trap and hands its listener over.  In the child this
 * returns 0 (the caller goes on under the trap); in the parent the child's pid, with
 * ``*listener`` set (-1 when none came). */
static pid_t fork_trapped(int *listener)
{
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
        perror("socketpair");
        exit(1);
    }
    pid_t child = fork();
    if (child == 0) {
        close(pair[0]);
        int mine = trap_connect();
        if (mine < 0) {
            perror("seccomp");
            _exit(126);
        }
        send_fd(pair[1], mine);
        close(mine);
        close(pair[1]);
        return 0;
    }
    close(pair[1]);
    *listener = receive_fd(pair[0]);
    close(pair[0]);
    return child;
}

static void trapped_row(const char *label, int n, handler serve_one, int sync)
{
    int listener;
    pid_t client = fork_trapped(&listener);
    if (client == 0) {
        time_connects(label, n);
        _exit(0);
    }
    pid_t supervisor = fork();
    if (supervisor == 0) {
        supervise(listener, serve_one, sync);
        _exit(0);
    }
    close(listener);
    int status;
    waitpid(client, &status, 0);
    kill(supervisor, SIGKILL);
    waitpid(supervisor, &status, 0);
}

static unsigned long switched_count, continued_count;

/* A pidfd of thread ``tid``: of the thread itself (Linux 6.9), else of its process,
 * which is the same for the single-threaded clients the benchmarks run. */
static int pidfd_of(pid_t tid)
{
    int fd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    return fd >= 0 || errno != EINVAL ? fd : (int)syscall(SYS_pidfd_open, tid, 0);
}

/* Trap mode's handling of one connect: continued unchanged. */
static void continue_connect(int listener, struct seccomp_notif *req)
{
    struct seccomp_notif_resp answer = {.id = req->id,
                                        .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &answer);
    continued_count++;
}

/* Switch mode's handling of one connect: answered here in every case. */
static void switch_program_connect(int listener, struct seccomp_notif *req)
{
    struct seccomp_notif_resp answer = {.id = req->id};
    int target = (int)req->data.args[0];
    socklen_t length = (socklen_t)req->data.args[2];
    struct sockaddr_storage sockaddr;
    int pidfd = -1, theirs = -1, host = -1, domain = 0, type = 0, flags = 0;
    socklen_t size = sizeof domain;
    if (length < sizeof(sa_family_t) || length > sizeof sockaddr)
        goto continue_unchecked;
    pidfd = pidfd_of((pid_t)req->pid);
    if (pidfd < 0 || ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) < 0)
        goto continue_unchecked;
    theirs = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    struct iovec local = {&sockaddr, length}, remote = {(void *)req->data.args[1], length};
    if (theirs < 0 || process_vm_readv(req->pid, &local, 1, &remote, 1, 0) != (ssize_t)length ||
        ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) < 0)
        goto continue_unchecked;
    if (getsockopt(theirs, SOL_SOCKET, SO_DOMAIN, &domain, &size) < 0 ||
        (domain != AF_INET && domain != AF_INET6) ||
        getsockopt(theirs, SOL_SOCKET, SO_TYPE, &type, &size) < 0 || type != SOCK_STREAM ||
        sockaddr.ss_family != domain || (flags = fcntl(theirs, F_GETFL)) < 0)
        goto continue_unchecked;
    host = socket(domain, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (host < 0)
        goto continue_unchecked;
    int result = connect(host, (struct sockaddr *)&sockaddr, length) == 0 ? 0 : errno;
    if (result == EINPROGRESS && !(flags & O_NONBLOCK)) {
        struct pollfd p = {.fd = host, .events = POLLOUT};
        (void)poll(&p, 1, -1); /* the floor's targets are local: no wait to speak of */
        size = sizeof result;
        (void)getsockopt(host, SOL_SOCKET, SO_ERROR, &result, &size);
    }
    if (result != 0 && result != EINPROGRESS) {
        answer.error = -result;
    } else {
        if (!(flags & O_NONBLOCK))
            (void)fcntl(host, F_SETFL, 0);
        struct seccomp_notif_addfd add = {.id = req->id, .flags = SECCOMP_ADDFD_FLAG_SETFD,
                                          .srcfd = (__u32)host, .newfd = (__u32)target};
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0)
            answer.error = -EIO;
        else
            answer.error = -result;
    }
    switched_count++;
    goto answer_and_close;
continue_unchecked:
    continued_count++;
    answer.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
answer_and_close:
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &answer); /* first: the program waits */
    if (host >= 0)
        close(host);
    if (theirs >= 0)
        close(theirs);
    if (pidfd >= 0)
        close(pidfd);
}

/* seccomp_floor trap|switch CMD...: CMD's exit status (128+signal when killed). */
static int wrapper_mode(int switching, char **command)
{
    int listener;
    pid_t child = fork_trapped(&listener);
    if (child == 0) {
        (void)prctl(PR_SET_PDEATHSIG, SIGKILL);
        execvp(command[0], command);
        perror(command[0]);
        _exit(127);
    }
    if (listener < 0) {
        fprintf(stderr, "seccomp_floor: no listener from the child\n");
        return 1;
    }
    supervise(listener, switching ? switch_program_connect : continue_connect, 1);
    close(listener); /* should serving have failed, the child's connects fail (ENOSYS) */
    fprintf(stderr, "seccomp_floor: %lu connects switched, %lu continued\n", switched_count,
            continued_count);
    int status;
    if (waitpid(child, &status, 0) < 0)
        return 1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv)
{
    if (argc > 2 && (strcmp(argv[1], "trap") == 0 || strcmp(argv[1], "switch") == 0))
        return wrapper_mode(strcmp(argv[1], "switch") == 0, argv + 2);
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    if (n < 10) {
        fprintf(stderr, "usage: %s [N >= 10 connects per row]\n"
                        "       %s trap|switch CMD [ARG...]\n", argv[0], argv[0]);
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    server_address.sin_family = AF_INET;
    server_address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof server_address;
    if (bind(listener, (struct sockaddr *)&server_address, sizeof server_address) < 0 ||
        listen(listener, 4096) < 0 ||
        getsockname(listener, (struct sockaddr *)&server_address, &size) < 0) {
        perror("listener");
        return 1;
    }
    pthread_t thread;
    pthread_create(&thread, NULL, serve, (void *)(long)listener);
    time_connects("direct", n);
    trapped_row("answer only", n, answer_only, 0);
    trapped_row("full switch", n, full_switch, 0);
    trapped_row("answer only +sync", n, answer_only, 1);
    trapped_row("full switch +sync", n, full_switch, 1);
    return 0;
}
