/*
 * nsbridge.linux._notifycore: the mechanical system-call sequences of a switched connect
 * (``nsbridge run --bypass``), one Python call each.
 *
 * Why native code: the socket switcher answers every trapped connect of the program on
 * its event loop, and most of the time a connect costs there was interpreter glue around
 * a dozen short system calls (ctypes calls, struct packing, socket objects, an fdinfo
 * read), not the system calls themselves (docs/performance.md, "Socket switching").
 * Here they run back to back with the GIL released, and Python keeps only what decides:
 * the policy, the exclude rules, the published ports, the counters and the log.
 *
 * Two calls, each the same steps seccomp_notify.py and switcher.py take in Python, in
 * the same order, so the security argument is theirs (see switcher.py's docstring):
 *
 *   receive(listener, connect_nr)
 *       RECV; for a connect: a pidfd of the calling thread, ID_VALID (the pid still
 *       names the caller), pidfd_getfd of its fd (our reference: the object we act on),
 *       the sockaddr read from its memory (length-checked), ID_VALID again (the bytes
 *       were the caller's), and the socket's network namespace.  Errors of the steps
 *       after RECV come back as negative errnos in their slot, so the caller answers
 *       the notification it holds exactly as the Python path does.
 *   switch_connect(listener, id, pid, fd, source, family, target, ...)
 *       a host socket (the program's options copied where they differ from a fresh
 *       socket's), bound to the outbound address, connected non-blocking to the bytes
 *       the caller built from what the policy decided; then either installed over the
 *       program's fd (ADDFD with SETFD, its close-on-exec flag kept) and answered, or
 *       handed back still connecting (a blocking program's connect that has no outcome
 *       yet), or its error handed back unanswered (the caller counts and answers it).
 *
 * Never SECCOMP_USER_NOTIF_FLAG_CONTINUE: every answer is an errno or 0 for a call this
 * side performed.  Nothing here decides anything.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/seccomp.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* Linux 6.9 */
#endif
#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71 /* Linux 5.14 */
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64) /* Linux 6.6 */
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

#define MAX_SOCKADDR 128 /* sizeof(struct sockaddr_storage): the kernel refuses longer */

/* switch_connect's outcomes (notifycore.py names them). */
enum outcome {
    SWITCHED,      /* installed and answered with the value */
    SWITCHED_GONE, /* installed, but the caller no longer waited for the answer */
    GONE,          /* the caller no longer waited: nothing installed */
    FAILED,        /* the host connect failed with the value (errno); not answered */
    PENDING,       /* still connecting: the value is the host socket, the caller's now */
};

/* ---- receive ------------------------------------------------------------------- */

static int id_valid(int listener, __u64 id)
{
    return ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 ? 0 : -errno;
}

/* The thread group of thread ``tid`` (kernels before PIDFD_THREAD). */
static int tgid_of(int tid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -errno;
    int tgid = -ESRCH;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "Tgid:", 5) == 0) {
            tgid = atoi(line + 5);
            break;
        }
    }
    fclose(f);
    return tgid;
}

/* A pidfd of thread ``tid`` itself where the kernel can, else of its thread group
 * (seccomp_notify.pidfd_of_thread); -errno on failure. */
static int pidfd_of_thread(int tid)
{
    long fd = syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd >= 0)
        return (int)fd;
    if (errno != EINVAL)
        return -errno;
    int tgid = tgid_of(tid);
    if (tgid < 0)
        return tgid;
    fd = syscall(SYS_pidfd_open, tgid, 0);
    return fd >= 0 ? (int)fd : -errno;
}

/* ``size`` bytes of ``pid``'s memory at ``address`` into ``out``: 0 or -errno
 * (seccomp_notify.read_memory: /proc/PID/mem where process_vm_readv is refused). */
static int read_memory(int pid, __u64 address, void *out, size_t size)
{
    struct iovec mine = {out, size};
    struct iovec theirs = {(void *)(uintptr_t)address, size};
    ssize_t got = process_vm_readv(pid, &mine, 1, &theirs, 1, 0);
    if (got == (ssize_t)size)
        return 0;
    if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/mem", pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            got = pread(fd, out, size, (off_t)address);
            close(fd);
            if (got == (ssize_t)size)
                return 0;
        }
    }
    return -EFAULT;
}

/* The inode of socket ``fd``'s network namespace, or 0 when the kernel will not say. */
static unsigned long long netns_of(int fd)
{
    int ns = ioctl(fd, SIOCGSKNS);
    if (ns < 0)
        return 0;
    struct stat st;
    unsigned long long inode = fstat(ns, &st) == 0 ? (unsigned long long)st.st_ino : 0;
    close(ns);
    return inode;
}

/* What one RECV brought, and for a connect what was fetched for it (see receive()). */
struct fetch {
    struct seccomp_notif n;
    int fetched;   /* a connect: the fields below are set */
    int pidfd;     /* ours, or -errno */
    int sockfd;    /* ours, or -errno from pidfd_getfd; 0 when pidfd < 0 */
    int raw_error; /* 0, or -errno reading the sockaddr / from ID_VALID */
    size_t length; /* the caller's sockaddr length */
    unsigned long long netns; /* the socket's namespace inode, 0 when unknown */
    int netns_read; /* netns is set (the serving thread reads it only for Python) */
    unsigned char raw[MAX_SOCKADDR];
};

/* The socket's namespace inode into ``f`` (once): what Python compares. */
static void fetch_netns(struct fetch *f)
{
    if (f->fetched && !f->netns_read && f->pidfd >= 0 && f->sockfd >= 0)
        f->netns = netns_of(f->sockfd);
    f->netns_read = 1;
}

/* RECV, and for a connect the fetching steps (the GIL must not be held): 0, or the
 * errno of RECV (nothing fetched then).  ``read_netns``: the namespace inode too
 * (the serving thread that compares cookies reads it only for what it queues). */
static int fetch(int listener, int connect_nr, struct fetch *f, int read_netns)
{
    memset(f, 0, sizeof *f); /* the kernel wants the notification zeroed */
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &f->n) < 0)
        return errno;
    struct seccomp_notif *n = &f->n;
    if (n->data.nr != connect_nr)
        return 0;
    f->fetched = 1;
    f->length = (size_t)(n->data.args[2] & 0xFFFFFFFFu);
    f->pidfd = pidfd_of_thread((int)n->pid);
    if (f->pidfd >= 0) {
        int valid = id_valid(listener, n->id); /* the pid still names the caller */
        if (valid < 0) {
            close(f->pidfd);
            f->pidfd = valid;
        }
    }
    if (f->pidfd >= 0) {
        long fd = syscall(SYS_pidfd_getfd, f->pidfd, (int)(n->data.args[0] & 0xFFFFFFFFu), 0);
        f->sockfd = fd >= 0 ? (int)fd : -errno;
    }
    if (f->pidfd >= 0 && f->sockfd >= 0 && f->length >= 2 && f->length <= MAX_SOCKADDR) {
        f->raw_error = read_memory((int)n->pid, n->data.args[1], f->raw, f->length);
        if (f->raw_error == 0)
            f->raw_error = id_valid(listener, n->id); /* the bytes were the caller's */
    }
    if (read_netns)
        fetch_netns(f);
    return 0;
}

/* Close the fds a fetch holds (nobody else will). */
static void fetch_release(struct fetch *f)
{
    if (f->fetched && f->pidfd >= 0) {
        close(f->pidfd);
        if (f->sockfd >= 0)
            close(f->sockfd);
    }
    f->fetched = 0;
}

/* receive()'s tuple for a fetch; on failure (NULL) the fds are closed. */
static PyObject *fetch_tuple(struct fetch *f)
{
    struct seccomp_notif *n = &f->n;
    PyObject *call_args = Py_BuildValue("(KKKKKK)", (unsigned long long)n->data.args[0],
                                        (unsigned long long)n->data.args[1],
                                        (unsigned long long)n->data.args[2],
                                        (unsigned long long)n->data.args[3],
                                        (unsigned long long)n->data.args[4],
                                        (unsigned long long)n->data.args[5]);
    if (call_args == NULL)
        goto fail;
    if (!f->fetched)
        return Py_BuildValue("(KIiINNNNN)", (unsigned long long)n->id, n->pid, n->data.nr,
                             n->data.arch, call_args, Py_NewRef(Py_None), Py_NewRef(Py_None),
                             Py_NewRef(Py_None), Py_NewRef(Py_None));
    PyObject *raw_value;
    if (f->pidfd < 0 || f->sockfd < 0 || f->length < 2 || f->length > MAX_SOCKADDR)
        raw_value = Py_NewRef(Py_None);
    else if (f->raw_error < 0)
        raw_value = PyLong_FromLong(f->raw_error);
    else
        raw_value = PyBytes_FromStringAndSize((const char *)f->raw, (Py_ssize_t)f->length);
    PyObject *netns_value = f->netns ? PyLong_FromUnsignedLongLong(f->netns)
                                     : Py_NewRef(Py_None);
    PyObject *result = Py_BuildValue("(KIiINiiNN)", (unsigned long long)n->id, n->pid,
                                     n->data.nr, n->data.arch, call_args, f->pidfd,
                                     f->pidfd < 0 ? 0 : f->sockfd, raw_value, netns_value);
    if (result != NULL)
        return result;
fail:
    fetch_release(f);
    return NULL;
}

static PyObject *core_receive(PyObject *self, PyObject *args)
{
    int listener, connect_nr;
    if (!PyArg_ParseTuple(args, "ii:receive", &listener, &connect_nr))
        return NULL;
    struct fetch f;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fetch(listener, connect_nr, &f, 1);
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return fetch_tuple(&f);
}

/* ---- switch_connect -------------------------------------------------------------- */

/* Options copied from the program's socket (switcher.py's _COPIED, same reasons). */
static const struct {
    int level, name;
} copied[] = {
    {SOL_SOCKET, SO_KEEPALIVE},    {SOL_SOCKET, SO_REUSEADDR},
    {SOL_SOCKET, SO_PRIORITY},     {IPPROTO_TCP, TCP_NODELAY},
    {IPPROTO_TCP, TCP_KEEPIDLE},   {IPPROTO_TCP, TCP_KEEPINTVL},
    {IPPROTO_TCP, TCP_KEEPCNT},    {IPPROTO_TCP, TCP_USER_TIMEOUT},
};
#define NCOPIED (sizeof copied / sizeof copied[0])

/* A fresh TCP socket's values of ``copied`` per family (the host namespace's sysctl
 * defaults), read once: only values that differ cost a setsockopt per connect.
 * Filled under the GIL's protection of the first call, read-only after. */
static struct {
    int ready;
    int ok[NCOPIED];
    int value[NCOPIED];
} fresh[2];

static void read_fresh(int slot, int family)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return; /* left unready: every option is copied as if it differed */
    for (size_t i = 0; i < NCOPIED; i++) {
        socklen_t len = sizeof(int);
        fresh[slot].ok[i] = getsockopt(fd, copied[i].level, copied[i].name,
                                       &fresh[slot].value[i], &len) == 0;
    }
    close(fd);
    fresh[slot].ready = 1;
}

static void copy_int(int source, int target, int level, int name)
{
    int value;
    socklen_t len = sizeof value;
    if (getsockopt(source, level, name, &value, &len) == 0)
        (void)setsockopt(target, level, name, &value, sizeof value);
}

/* The program's option values onto ``host`` where they differ from a fresh socket's
 * (errors ignored, as the Python path does: an option the host refuses is not one the
 * connect depends on). */
static void copy_options(int source, int source_family, int host, int family)
{
    int slot = family == AF_INET6;
    for (size_t i = 0; i < NCOPIED; i++) {
        int value;
        socklen_t len = sizeof value;
        if (getsockopt(source, copied[i].level, copied[i].name, &value, &len) != 0)
            continue;
        if (fresh[slot].ready && fresh[slot].ok[i] && fresh[slot].value[i] == value)
            continue;
        (void)setsockopt(host, copied[i].level, copied[i].name, &value, sizeof value);
    }
    struct linger linger;
    socklen_t len = sizeof linger;
    if (getsockopt(source, SOL_SOCKET, SO_LINGER, &linger, &len) == 0 && linger.l_onoff)
        (void)setsockopt(host, SOL_SOCKET, SO_LINGER, &linger, sizeof linger);
    if (source_family == AF_INET && family == AF_INET)
        copy_int(source, host, IPPROTO_IP, IP_TOS);
    else if (source_family == AF_INET6 && family == AF_INET6)
        copy_int(source, host, IPPROTO_IPV6, IPV6_TCLASS);
}

/* Whether fd ``fd`` of thread ``pid`` is close-on-exec (its ``/proc/PID/fdinfo/FD``
 * ``flags:`` line, in octal); 0 when that cannot be read (seccomp_notify.fd_cloexec).
 * Read by path each time, no directory kept open: a cache of them saved too little to
 * be worth the pid-reuse argument it needed.  Should the caller exit meanwhile and its
 * number go to another process, the flag read is a stranger's, but it only chooses
 * ADDFD's O_CLOEXEC, and that ADDFD fails (ENOENT): the notification died with its
 * caller. */
static int fd_cloexec(int pid, int fd)
{
    char path[64], text[4096];
    snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", pid, fd);
    int info = open(path, O_RDONLY | O_CLOEXEC);
    if (info < 0)
        return 0;
    ssize_t got = read(info, text, sizeof text - 1);
    close(info);
    if (got <= 0)
        return 0;
    text[got] = '\0';
    for (char *line = text; line != NULL && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        if (strncmp(line, "flags:", 6) == 0) {
            char *end;
            unsigned long flags = strtoul(line + 6, &end, 8);
            return end != line + 6 && (flags & O_CLOEXEC) != 0;
        }
    }
    return 0;
}

/* ``host`` over the program's fd number, then the answer ``result`` (an errno, 0 for
 * success).  ``host`` is closed in every case, after the answer: with synchronous
 * wake-ups the answer hands this CPU to the program, so what can wait does.  Returns
 * an outcome, or -errno for an ADDFD or SEND failure other than the caller being
 * gone. */
static int install(int listener, __u64 id, int pid, int fd, int host, int blocking,
                   int result)
{
    /* The file's flag: the program's socket was blocking.  The host socket is ours
     * and was made with only O_NONBLOCK among the flags F_SETFL sets. */
    if (blocking)
        (void)fcntl(host, F_SETFL, 0);
    struct seccomp_notif_addfd add = {
        .id = id,
        .flags = SECCOMP_ADDFD_FLAG_SETFD,
        .srcfd = (__u32)host,
        .newfd = (__u32)fd,
        .newfd_flags = fd_cloexec(pid, fd) ? O_CLOEXEC : 0,
    };
    int outcome = SWITCHED;
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {
        outcome = errno == ENOENT ? GONE : -errno;
    } else {
        struct seccomp_notif_resp response = {.id = id, .val = 0, .error = -result};
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &response) < 0)
            outcome = errno == ENOENT ? SWITCHED_GONE : -errno;
    }
    close(host); /* the program holds its own reference now (or nobody does) */
    return outcome;
}

static int parse_sockaddr(PyObject *object, struct sockaddr_storage *out, socklen_t *length)
{
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len < 2 || view.len > (Py_ssize_t)sizeof *out) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "a sockaddr is 2 to 128 bytes");
        return -1;
    }
    memcpy(out, view.buf, (size_t)view.len);
    *length = (socklen_t)view.len;
    PyBuffer_Release(&view);
    return 0;
}

/* switch_connect's steps (the GIL must not be held; fresh[] read before): 0 with
 * ``*outcome`` and ``*value`` set, or the errno of a host socket, bind, ADDFD or SEND
 * failure. */
static int do_switch(int listener, __u64 id, int pid, int fd, int source, int source_family,
                     int family, const struct sockaddr_storage *target,
                     socklen_t target_length, int v6only_off,
                     const struct sockaddr_storage *bound, socklen_t bound_length,
                     int blocking, int *outcome, int *value)
{
    int error = 0;
    *outcome = 0;
    *value = 0;
    int host = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (host < 0)
        return errno;
    copy_options(source, source_family, host, family);
    if (v6only_off) {
        int zero = 0;
        (void)setsockopt(host, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    }
    if (bound_length) {
        int one = 1;
        (void)setsockopt(host, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(host, (const struct sockaddr *)bound, bound_length) < 0) {
            error = errno;
            close(host);
            return error;
        }
    }
    int result = connect(host, (const struct sockaddr *)target, target_length) == 0 ? 0 : errno;
    if (result == EINPROGRESS && blocking) {
        /* A target on this host has usually answered before connect() returned (the
         * handshake runs inside the call): no round through the caller's loop. */
        struct pollfd p = {.fd = host, .events = POLLOUT};
        if (poll(&p, 1, 0) == 1) {
            socklen_t len = sizeof result;
            if (getsockopt(host, SOL_SOCKET, SO_ERROR, &result, &len) < 0)
                result = errno;
        } else {
            *outcome = PENDING;
            *value = host;
            return 0;
        }
    }
    if (result != 0 && result != EINPROGRESS) {
        close(host);
        *outcome = FAILED;
        *value = result;
        return 0;
    }
    *value = result;
    int installed = install(listener, id, pid, fd, host, blocking, result);
    if (installed < 0)
        return -installed;
    *outcome = installed;
    return 0;
}

static PyObject *core_switch_connect(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"listener", "id", "pid", "fd", "source", "source_family",
                               "family", "target", "v6only_off", "bind", "blocking", NULL};
    int listener, pid, fd, source, source_family, family, v6only_off, blocking;
    unsigned long long id;
    PyObject *target_object, *bind_object;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iKiiiiiOpOp:switch_connect", keywords,
                                     &listener, &id, &pid, &fd, &source, &source_family,
                                     &family, &target_object, &v6only_off, &bind_object,
                                     &blocking))
        return NULL;
    if (family != AF_INET && family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "family is AF_INET or AF_INET6");
        return NULL;
    }
    struct sockaddr_storage target, bound;
    socklen_t target_length, bound_length = 0;
    if (parse_sockaddr(target_object, &target, &target_length) < 0)
        return NULL;
    if (bind_object != Py_None && parse_sockaddr(bind_object, &bound, &bound_length) < 0)
        return NULL;
    int slot = family == AF_INET6;
    if (!fresh[slot].ready)
        read_fresh(slot, family);

    int outcome = 0, value = 0, error;
    Py_BEGIN_ALLOW_THREADS
    error = do_switch(listener, (__u64)id, pid, fd, source, source_family, family, &target,
                      target_length, v6only_off, bound_length ? &bound : NULL, bound_length,
                      blocking, &outcome, &value);
    Py_END_ALLOW_THREADS
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(ii)", outcome, value);
}

/* install(listener, id, pid, fd, host, blocking, result): a host socket that finished
 * connecting later (switch_connect's PENDING) over the program's fd, and the answer.
 * ``host`` is closed in every case (the caller's object must let go of it first). */
static PyObject *core_install(PyObject *self, PyObject *args)
{
    int listener, pid, fd, host, blocking, result;
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "iKiiipi:install", &listener, &id, &pid, &fd, &host,
                          &blocking, &result))
        return NULL;
    int outcome;
    Py_BEGIN_ALLOW_THREADS
    outcome = install(listener, (__u64)id, pid, fd, host, blocking, result);
    Py_END_ALLOW_THREADS
    if (outcome < 0) {
        errno = -outcome;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(outcome);
}

/* ---- the serving thread ----------------------------------------------------------
 *
 * Server(listener, connect_nr, host_netns, watch): one pthread per listener that waits
 * in poll() on it (and a stop eventfd), RECVs and fetches as receive() does, and serves
 * a connect here, without the interpreter, when a decision Python made earlier for the
 * same destination is in the cache and still valid; everything else is queued, with
 * what was fetched, for Python (take(), woken by the queue eventfd, fileno()).
 *
 * Why a thread: with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (Linux 6.6) the kernel hands
 * the CPU straight from the trapped thread to a supervisor waiting in poll() or RECV on
 * the listener and back, which is most of what a switched connect costs; a waiter in
 * epoll (the event loop's) does not get that (docs/performance.md, "Socket switching").
 *
 * When the cache may answer (all of it, else the connect goes to Python):
 *   - the fetch succeeded (pidfd, our socket reference, the sockaddr read and confirmed
 *     with ID_VALID) and the socket lives in a namespace other than ours (a socket of
 *     the program's, not one we switched or one handed in);
 *   - it is a TCP socket (SO_DOMAIN AF_INET/AF_INET6, SO_TYPE SOCK_STREAM, SO_PROTOCOL
 *     TCP) and the sockaddr is of its family and long enough, as the Python path reads it;
 *   - none of the watch fds is readable (under the cache's lock): they are the netlink
 *     sockets whose events change what the policy reads (the host's addresses).  Python
 *     clears the cache under the same lock before it reads any of their events, so an
 *     entry found here was decided with every event so far applied;
 *   - the key (the socket's family, the sockaddr's family, address and port) is cached.
 * Only Python fills the cache, and only with plain switches it allowed (see switcher.py).
 */
#define CACHE_SLOTS 512 /* a power of two; a colliding insert replaces */
#define MAX_WATCH 8

/* What a queued item is (notifycore.py names them). */
enum kind {
    NOTIFY,         /* a notification for Python, with what was fetched */
    SWITCH_FAILED,  /* a cached switch whose host connect failed (value: errno) */
    SWITCH_PENDING, /* a cached switch still connecting (value: the host socket) */
    SWITCH_ERROR,   /* a cached switch whose socket, bind, ADDFD or SEND failed (errno) */
    HUNG_UP,        /* every process under the filter has exited */
    RECV_FAILED,    /* poll or RECV failed (value: errno) */
};

struct key {
    int sock_family, family;
    unsigned short port; /* network order, as in the sockaddr */
    unsigned char address[16];
};

struct entry {
    int used, family, v6only_off;
    struct key key;
    socklen_t target_length, bound_length;
    struct sockaddr_storage target, bound;
};

struct item {
    struct item *next;
    int kind, value;
    struct fetch f;
};

typedef struct {
    PyObject_HEAD
    int listener, connect_nr;
    unsigned long long host_netns;
    unsigned long long host_cookie; /* SO_NETNS_COOKIE of host_netns; 0: compare inodes */
    int queue_fd, stop_fd;
    int watch[MAX_WATCH], nwatch;
    pthread_mutex_t lock; /* the cache, the queue, the counts */
    struct entry *cache;
    struct item *head, *tail;
    unsigned long long notifications, hits, switched, gone;
    int running, closed;
    pthread_t thread;
} Server;

/* The cache key of a sockaddr, as switcher._inet_destination reads it: -1 when it is
 * not a TCP destination of the socket's family. */
static int key_of(int sock_family, const unsigned char *raw, size_t length, struct key *k)
{
    sa_family_t family;
    if (length < sizeof family)
        return -1;
    memcpy(&family, raw, sizeof family);
    memset(k, 0, sizeof *k); /* padding included: keys are compared as bytes */
    k->sock_family = sock_family;
    k->family = family;
    if (family == AF_INET && sock_family == AF_INET && length >= 16) {
        memcpy(&k->port, raw + 2, 2);
        memcpy(k->address, raw + 4, 4);
        return 0;
    }
    if (family == AF_INET6 && sock_family == AF_INET6 && length >= 24) {
        memcpy(&k->port, raw + 2, 2);
        memcpy(k->address, raw + 8, 16);
        return 0;
    }
    return -1;
}

static size_t slot_of(const struct key *k)
{
    const unsigned char *bytes = (const unsigned char *)k;
    unsigned long long hash = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < sizeof *k; i++)
        hash = (hash ^ bytes[i]) * 1099511628211ull;
    return (size_t)(hash & (CACHE_SLOTS - 1));
}

/* Whether a watch fd has something queued (or cannot be asked: then treat it as
 * stale too).  Called with the lock held. */
static int watched_ready(Server *s)
{
    if (s->nwatch == 0)
        return 0;
    struct pollfd p[MAX_WATCH];
    for (int i = 0; i < s->nwatch; i++)
        p[i] = (struct pollfd){.fd = s->watch[i], .events = POLLIN};
    return poll(p, (nfds_t)s->nwatch, 0) != 0;
}

static void wake_python(Server *s)
{
    unsigned long long one = 1;
    (void)!write(s->queue_fd, &one, sizeof one);
}

/* Queue ``f`` (its fds move to the item) for Python.  Without memory the notification
 * is answered ENOMEM here and its fds closed: nothing may wait for an item never queued. */
static void push(Server *s, int kind, int value, struct fetch *f)
{
    struct item *it = calloc(1, sizeof *it);
    if (it == NULL) {
        if (f != NULL) {
            struct seccomp_notif_resp r = {.id = f->n.id, .error = -ENOMEM};
            (void)ioctl(s->listener, SECCOMP_IOCTL_NOTIF_SEND, &r);
        }
        if (f != NULL)
            fetch_release(f);
        if (kind == SWITCH_PENDING)
            close(value);
        return;
    }
    it->kind = kind;
    it->value = value;
    if (f != NULL)
        it->f = *f;
    pthread_mutex_lock(&s->lock);
    if (s->tail)
        s->tail->next = it;
    else
        s->head = it;
    s->tail = it;
    pthread_mutex_unlock(&s->lock);
    wake_python(s);
}

/* Serve a fetched connect from the cache (module comment above): 1 when done here
 * (answered, or queued with its outcome), 0 when Python must decide. */
static int serve_cached(Server *s, struct fetch *f)
{
    if (!f->fetched || f->pidfd < 0 || f->sockfd < 0 || f->raw_error != 0 ||
        f->length < 2 || f->length > MAX_SOCKADDR)
        return 0;
    if (s->host_cookie) {
        /* Cookies are never reused: equal ones are the same namespace. */
        unsigned long long cookie;
        socklen_t cookie_length = sizeof cookie;
        if (getsockopt(f->sockfd, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cookie_length) < 0 ||
            cookie_length != sizeof cookie || cookie == s->host_cookie)
            return 0;
    } else {
        fetch_netns(f);
        if (f->netns == 0 || f->netns == s->host_netns)
            return 0;
    }
    int domain, type, protocol;
    socklen_t len = sizeof(int);
    if (getsockopt(f->sockfd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0)
        return 0;
    len = sizeof(int);
    if (getsockopt(f->sockfd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return 0;
    len = sizeof(int);
    if (getsockopt(f->sockfd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) < 0)
        return 0;
    if ((domain != AF_INET && domain != AF_INET6) || type != SOCK_STREAM ||
        (protocol != 0 && protocol != IPPROTO_TCP))
        return 0;
    struct key k;
    if (key_of(domain, f->raw, f->length, &k) < 0)
        return 0;
    struct entry e;
    int hit = 0;
    pthread_mutex_lock(&s->lock);
    if (!watched_ready(s)) {
        struct entry *slot = &s->cache[slot_of(&k)];
        if (slot->used && memcmp(&slot->key, &k, sizeof k) == 0) {
            e = *slot;
            hit = 1;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (!hit)
        return 0;
    int flags = fcntl(f->sockfd, F_GETFL);
    if (flags < 0)
        return 0;
    int outcome, value;
    int error = do_switch(s->listener, f->n.id, (int)f->n.pid,
                          (int)(f->n.data.args[0] & 0xFFFFFFFFu), f->sockfd, domain, e.family,
                          &e.target, e.target_length, e.v6only_off,
                          e.bound_length ? &e.bound : NULL, e.bound_length,
                          !(flags & O_NONBLOCK), &outcome, &value);
    pthread_mutex_lock(&s->lock);
    s->hits++;
    if (!error && (outcome == SWITCHED || outcome == SWITCHED_GONE))
        s->switched++;
    if (!error && (outcome == GONE || outcome == SWITCHED_GONE))
        s->gone++;
    pthread_mutex_unlock(&s->lock);
    if (error || outcome == FAILED || outcome == PENDING)
        fetch_netns(f); /* queued: the item carries what Python reads */
    if (error)
        push(s, SWITCH_ERROR, error, f);
    else if (outcome == FAILED)
        push(s, SWITCH_FAILED, value, f);
    else if (outcome == PENDING)
        push(s, SWITCH_PENDING, value, f);
    else
        fetch_release(f);
    return 1;
}

static void *serve(void *arg)
{
    Server *s = arg;
    struct pollfd p[2] = {{.fd = s->listener, .events = POLLIN},
                          {.fd = s->stop_fd, .events = POLLIN}};
    struct fetch f;
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            push(s, RECV_FAILED, errno, NULL);
            usleep(10000); /* a failure that repeats must not spin a CPU */
            continue;
        }
        if (p[1].revents)
            break;
        if (p[0].revents & POLLIN) {
            int failed = fetch(s->listener, s->connect_nr, &f, s->host_cookie == 0);
            if (failed) {
                if (failed != ENOENT && failed != EINTR) {
                    push(s, RECV_FAILED, failed, NULL);
                    usleep(10000);
                }
                continue;
            }
            pthread_mutex_lock(&s->lock);
            s->notifications++;
            pthread_mutex_unlock(&s->lock);
            if (!serve_cached(s, &f)) {
                fetch_netns(&f); /* Python compares inodes */
                push(s, NOTIFY, 0, &f);
            }
        } else if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            push(s, HUNG_UP, 0, NULL);
            break; /* nothing more will come */
        }
    }
    return NULL;
}

static void free_items(struct item *it)
{
    while (it != NULL) {
        struct item *next = it->next;
        fetch_release(&it->f);
        if (it->kind == SWITCH_PENDING)
            close(it->value);
        free(it);
        it = next;
    }
}

/* Stop and join the thread (the GIL released), free the queue (closing the fds its
 * items hold; their notifications are answered by the kernel when the caller closes
 * the listener) and the rest.  Idempotent. */
static void server_stop(Server *s)
{
    if (s->closed)
        return;
    s->closed = 1;
    if (s->running) {
        unsigned long long one = 1;
        (void)!write(s->stop_fd, &one, sizeof one);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->thread, NULL);
        Py_END_ALLOW_THREADS
        s->running = 0;
    }
    free_items(s->head);
    s->head = s->tail = NULL;
    if (s->queue_fd >= 0)
        close(s->queue_fd);
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    s->queue_fd = s->stop_fd = -1;
    free(s->cache);
    s->cache = NULL;
}

static void server_dealloc(Server *s)
{
    server_stop(s);
    pthread_mutex_destroy(&s->lock);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* The SO_NETNS_COOKIE of namespace ``inode`` when it is this thread's (the caller made
 * the Server there, as the serving thread will run there), read from a socket made
 * here: 0 when it is not or the kernel has no cookies (before 5.14), and the thread
 * then compares inodes (SIOCGSKNS, an fd opened and closed per connect).  A cookie is
 * one getsockopt() and means the same: the socket lives in the host side's namespace. */
static unsigned long long cookie_of(unsigned long long inode)
{
    /* This thread's namespace by its nsfs inode, not SIOCGSKNS on the socket: that
     * needs CAP_NET_ADMIN over the namespace, which an ordinary user lacks in the
     * initial one (a socket made here lives in this thread's namespace either way). */
    struct stat own;
    if (stat("/proc/thread-self/ns/net", &own) < 0 || (unsigned long long)own.st_ino != inode)
        return 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    unsigned long long cookie = 0;
    socklen_t length = sizeof cookie;
    if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &length) < 0 ||
        length != sizeof cookie)
        cookie = 0;
    close(fd);
    return cookie;
}

static int server_init(Server *s, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"listener", "connect_nr", "host_netns", "watch", NULL};
    PyObject *watch = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiK|O:Server", keywords, &s->listener,
                                     &s->connect_nr, &s->host_netns, &watch))
        return -1;
    if (s->cache != NULL || s->closed) {
        PyErr_SetString(PyExc_RuntimeError, "a Server is initialised once");
        return -1;
    }
    if (watch != NULL) {
        PyObject *fds = PySequence_Fast(watch, "watch is a sequence of fds");
        if (fds == NULL)
            return -1;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(fds);
        if (count > MAX_WATCH) {
            Py_DECREF(fds);
            PyErr_Format(PyExc_ValueError, "at most %d watch fds", MAX_WATCH);
            return -1;
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
            if (fd == -1 && PyErr_Occurred()) {
                Py_DECREF(fds);
                return -1;
            }
            if (fd < 0 || fd > 0x7FFFFFFF) {
                Py_DECREF(fds);
                PyErr_SetString(PyExc_ValueError, "a watch fd is not negative");
                return -1;
            }
            s->watch[i] = (int)fd;
        }
        s->nwatch = (int)count;
        Py_DECREF(fds);
    }
    s->cache = calloc(CACHE_SLOTS, sizeof *s->cache);
    if (s->cache == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    s->queue_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->queue_fd < 0 || s->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        server_stop(s);
        return -1;
    }
    for (int slot = 0; slot < 2; slot++)
        if (!fresh[slot].ready)
            read_fresh(slot, slot ? AF_INET6 : AF_INET);
    s->host_cookie = cookie_of(s->host_netns);
    return 0;
}

static PyObject *server_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Server *s = (Server *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->queue_fd = s->stop_fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    return (PyObject *)s;
}

static int server_usable(Server *s)
{
    if (s->closed || s->cache == NULL) {
        PyErr_SetString(PyExc_ValueError, "the Server is closed");
        return 0;
    }
    return 1;
}

static PyObject *server_start(Server *s, PyObject *unused)
{
    if (!server_usable(s))
        return NULL;
    if (s->running) {
        PyErr_SetString(PyExc_RuntimeError, "the Server runs already");
        return NULL;
    }
    int sync_error = ioctl(s->listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                           (unsigned long)SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) < 0 ? errno : 0;
    /* Signals stay with Python's threads: the new one starts with all blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int error = pthread_create(&s->thread, NULL, serve, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->running = 1;
    return PyLong_FromLong(sync_error);
}

static PyObject *server_fileno(Server *s, PyObject *unused)
{
    if (!server_usable(s))
        return NULL;
    return PyLong_FromLong(s->queue_fd);
}

/* Every queued item, oldest first: (kind, value, *receive()'s tuple). */
static PyObject *server_take(Server *s, PyObject *unused)
{
    if (!server_usable(s))
        return NULL;
    unsigned long long count;
    (void)!read(s->queue_fd, &count, sizeof count); /* before taking: no wake-up lost */
    pthread_mutex_lock(&s->lock);
    struct item *it = s->head;
    s->head = s->tail = NULL;
    pthread_mutex_unlock(&s->lock);
    PyObject *items = PyList_New(0);
    while (it != NULL) {
        struct item *next = it->next;
        it->next = NULL;
        PyObject *fetched = items == NULL ? NULL : fetch_tuple(&it->f); /* fds move */
        PyObject *item = fetched == NULL ? NULL : Py_BuildValue("(ii)", it->kind, it->value);
        PyObject *whole = item == NULL ? NULL : PySequence_Concat(item, fetched);
        Py_XDECREF(item);
        Py_XDECREF(fetched);
        if (whole == NULL || PyList_Append(items, whole) < 0) {
            /* the fds are still ours (a failed fetch_tuple closed them already) */
            fetch_release(&it->f);
            if (it->kind == SWITCH_PENDING)
                close(it->value);
            Py_XDECREF(whole);
            Py_CLEAR(items);
            free(it);
            it = next;
            continue;
        }
        Py_DECREF(whole);
        free(it);
        it = next;
    }
    return items;
}

static PyObject *server_cache_put(Server *s, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"sock_family", "raw", "family", "target", "v6only_off",
                               "bind", NULL};
    int sock_family, family, v6only_off;
    Py_buffer raw;
    PyObject *target_object, *bind_object;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iy*iOpO:cache_put", keywords,
                                     &sock_family, &raw, &family, &target_object,
                                     &v6only_off, &bind_object))
        return NULL;
    struct entry e;
    memset(&e, 0, sizeof e);
    int bad = key_of(sock_family, raw.buf, (size_t)raw.len, &e.key);
    PyBuffer_Release(&raw);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "raw is no TCP destination of sock_family");
        return NULL;
    }
    if (family != AF_INET && family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "family is AF_INET or AF_INET6");
        return NULL;
    }
    if (parse_sockaddr(target_object, &e.target, &e.target_length) < 0)
        return NULL;
    if (bind_object != Py_None && parse_sockaddr(bind_object, &e.bound, &e.bound_length) < 0)
        return NULL;
    if (!server_usable(s))
        return NULL;
    e.used = 1;
    e.family = family;
    e.v6only_off = v6only_off;
    pthread_mutex_lock(&s->lock);
    s->cache[slot_of(&e.key)] = e;
    pthread_mutex_unlock(&s->lock);
    Py_RETURN_NONE;
}

static PyObject *server_cache_clear(Server *s, PyObject *unused)
{
    if (s->cache != NULL) {
        pthread_mutex_lock(&s->lock);
        memset(s->cache, 0, CACHE_SLOTS * sizeof *s->cache);
        pthread_mutex_unlock(&s->lock);
    }
    Py_RETURN_NONE;
}

/* One more fd to watch (an address set that became readable later, such as a
 * container's own addresses once its namespace could be entered): from now on a
 * queued event on it sends connects to Python.  The cache is emptied with it, so no
 * entry predates the watch. */
static PyObject *server_watch(Server *s, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a watch fd is not negative");
        return NULL;
    }
    if (!server_usable(s))
        return NULL;
    pthread_mutex_lock(&s->lock);
    if (s->nwatch >= MAX_WATCH) {
        pthread_mutex_unlock(&s->lock);
        PyErr_Format(PyExc_ValueError, "at most %d watch fds", MAX_WATCH);
        return NULL;
    }
    s->watch[s->nwatch++] = (int)fd;
    memset(s->cache, 0, CACHE_SLOTS * sizeof *s->cache);
    pthread_mutex_unlock(&s->lock);
    Py_RETURN_NONE;
}

static PyObject *server_cached(Server *s, PyObject *unused)
{
    long used = 0;
    if (s->cache != NULL) {
        pthread_mutex_lock(&s->lock);
        for (size_t i = 0; i < CACHE_SLOTS; i++)
            used += s->cache[i].used;
        pthread_mutex_unlock(&s->lock);
    }
    return PyLong_FromLong(used);
}

/* (notifications, hits, switched, gone) since the last call. */
static PyObject *server_counts(Server *s, PyObject *unused)
{
    pthread_mutex_lock(&s->lock);
    unsigned long long n = s->notifications, h = s->hits, w = s->switched, g = s->gone;
    s->notifications = s->hits = s->switched = s->gone = 0;
    pthread_mutex_unlock(&s->lock);
    return Py_BuildValue("(KKKK)", n, h, w, g);
}

/* Whether the thread tells the host side's sockets by namespace cookie (else inode). */
static PyObject *server_compares_cookies(Server *s, PyObject *unused)
{
    return PyBool_FromLong(s->host_cookie != 0);
}

static PyObject *server_close(Server *s, PyObject *unused)
{
    server_stop(s);
    Py_RETURN_NONE;
}

static PyMethodDef server_methods[] = {
    {"start", (PyCFunction)server_start, METH_NOARGS,
     "start() -> errno of setting SYNC_WAKE_UP (0: set); OSError if no thread"},
    {"fileno", (PyCFunction)server_fileno, METH_NOARGS, "the queue's eventfd"},
    {"take", (PyCFunction)server_take, METH_NOARGS, "take() -> [queued items]"},
    {"cache_put", (PyCFunction)(void (*)(void))server_cache_put,
     METH_VARARGS | METH_KEYWORDS, "cache a decided switch"},
    {"cache_clear", (PyCFunction)server_cache_clear, METH_NOARGS, "forget every decision"},
    {"watch", (PyCFunction)server_watch, METH_O,
     "watch(fd): a queued event on fd sends connects to Python; empties the cache"},
    {"cached", (PyCFunction)server_cached, METH_NOARGS, "entries in the cache"},
    {"counts", (PyCFunction)server_counts, METH_NOARGS,
     "counts() -> (notifications, hits, switched, gone) since the last call"},
    {"compares_cookies", (PyCFunction)server_compares_cookies, METH_NOARGS,
     "whether the host side's namespace is told by SO_NETNS_COOKIE (else by inode)"},
    {"close", (PyCFunction)server_close, METH_NOARGS, "stop, join, free"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nsbridge.linux._notifycore.Server",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread serving a seccomp listener (see the C source).",
    .tp_new = server_new,
    .tp_init = (initproc)server_init,
    .tp_dealloc = (destructor)server_dealloc,
    .tp_methods = server_methods,
};

static PyMethodDef core_methods[] = {
    {"receive", core_receive, METH_VARARGS,
     "receive(listener, connect_nr) -> (id, pid, nr, arch, args, pidfd, sockfd, raw, netns)"},
    {"switch_connect", (PyCFunction)(void (*)(void))core_switch_connect,
     METH_VARARGS | METH_KEYWORDS,
     "switch_connect(...) -> (outcome, value); see notifycore.py"},
    {"install", core_install, METH_VARARGS,
     "install(listener, id, pid, fd, host, blocking, result) -> outcome"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "_notifycore",
    "The system-call sequences of a switched connect, one call each (see the C source).",
    -1, core_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__notifycore(void)
{
    PyObject *module = PyModule_Create(&core_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "SWITCHED", SWITCHED) < 0 ||
        PyModule_AddIntConstant(module, "SWITCHED_GONE", SWITCHED_GONE) < 0 ||
        PyModule_AddIntConstant(module, "GONE", GONE) < 0 ||
        PyModule_AddIntConstant(module, "FAILED", FAILED) < 0 ||
        PyModule_AddIntConstant(module, "PENDING", PENDING) < 0 ||
        PyModule_AddIntConstant(module, "NOTIFY", NOTIFY) < 0 ||
        PyModule_AddIntConstant(module, "SWITCH_FAILED", SWITCH_FAILED) < 0 ||
        PyModule_AddIntConstant(module, "SWITCH_PENDING", SWITCH_PENDING) < 0 ||
        PyModule_AddIntConstant(module, "SWITCH_ERROR", SWITCH_ERROR) < 0 ||
        PyModule_AddIntConstant(module, "HUNG_UP", HUNG_UP) < 0 ||
        PyModule_AddIntConstant(module, "RECV_FAILED", RECV_FAILED) < 0 ||
        PyModule_AddIntConstant(module, "CACHE_SLOTS", CACHE_SLOTS) < 0 ||
        PyType_Ready(&ServerType) < 0 ||
        PyModule_AddObjectRef(module, "Server", (PyObject *)&ServerType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
