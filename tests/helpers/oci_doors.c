/* The doors around socket switching, tried from inside a container whose filter the
 * runtime built from the agent's profile (tests/usernet/test_seccomp_agent.py).
 *
 * Built static by the test (gcc -static): the container's root holds busybox and this,
 * nothing else.  Usage: oci_doors IPv4 ALLOWED_PORT DENIED_PORT.  One line per attempt,
 * "NAME: ok" or "NAME: ERRNO_NAME" (int80: how the child ended).
 *
 * Each door starts from a *switched* socket (connected by the agent to the allowed
 * port, so a socket of the host's namespace) disconnected with connect(AF_UNSPEC): a
 * host socket that could talk to an undecided peer if anything but a trapped connect
 * could connect it.  Tried: sendto/sendmsg/sendmmsg with MSG_FASTOPEN (a send that
 * connects first) and connect through the 32-bit ABI (int 0x80, where the filter's
 * table does not reach).  Also io_uring_setup (io_uring's connect never meets seccomp)
 * and, as the expected path, a plain connect to the denied port (decided: refused).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static struct sockaddr_in allowed, denied; /* static: below 4 GiB, for int 0x80 */

static void report(const char *what, long result)
{
    if (result < 0)
        printf("%s: %s\n", what, strerrorname_np(errno));
    else
        printf("%s: ok\n", what);
}

/* A switched socket, disconnected: the agent connected it to the allowed port. */
static int switched_then_disconnected(void)
{
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&allowed, sizeof allowed) < 0) {
        printf("setup: connect allowed: %s\n", strerrorname_np(errno));
        exit(1);
    }
    if (connect(s, &unspec, sizeof unspec) < 0) {
        printf("setup: AF_UNSPEC: %s\n", strerrorname_np(errno));
        exit(1);
    }
    return s;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < 2; i++) {
        struct sockaddr_in *a = i ? &denied : &allowed;
        a->sin_family = AF_INET;
        a->sin_port = htons(atoi(argv[i ? 3 : 2]));
        inet_pton(AF_INET, argv[1], &a->sin_addr);
    }

    char params[120] = {0};
    report("io_uring_setup", syscall(SYS_io_uring_setup, 4, params));

    int s = switched_then_disconnected();
    report("sendto_fastopen", sendto(s, "x", 1, MSG_FASTOPEN, (struct sockaddr *)&denied,
                                     sizeof denied));
    close(s);

    struct iovec iov = {.iov_base = "x", .iov_len = 1};
    struct msghdr message = {.msg_name = &denied, .msg_namelen = sizeof denied,
                             .msg_iov = &iov, .msg_iovlen = 1};
    s = switched_then_disconnected();
    report("sendmsg_fastopen", sendmsg(s, &message, MSG_FASTOPEN));
    close(s);

    struct mmsghdr many = {.msg_hdr = message};
    s = switched_then_disconnected();
    report("sendmmsg_fastopen", sendmmsg(s, &many, 1, MSG_FASTOPEN));
    close(s);

#if defined(__x86_64__)
    s = switched_then_disconnected();
    pid_t child = fork();
    if (child == 0) {
        long result; /* i386 connect is 362 */
        __asm__ volatile("int $0x80"
                         : "=a"(result)
                         : "a"(362L), "b"((long)s), "c"((long)&denied), "d"(16L)
                         : "memory");
        _exit(result == 0 ? 0 : (int)(-result) & 0xff);
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (WIFSIGNALED(status))
        printf("int80: signal %d\n", WTERMSIG(status));
    else if (WEXITSTATUS(status) == 0)
        printf("int80: ok\n");
    else
        printf("int80: %s\n", strerrorname_np(WEXITSTATUS(status)));
    close(s);
#else
    printf("int80: not x86\n");
#endif

    s = switched_then_disconnected();
    report("connect_denied", connect(s, (struct sockaddr *)&denied, sizeof denied));
    close(s);
    return 0;
}
