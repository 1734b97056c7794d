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
#include <linux/seccomp.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
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
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
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

static PyObject *core_receive(PyObject *self, PyObject *args)
{
    int listener, connect_nr;
    if (!PyArg_ParseTuple(args, "ii:receive", &listener, &connect_nr))
        return NULL;
    struct seccomp_notif n;
    memset(&n, 0, sizeof n); /* the kernel wants it zeroed */
    int pidfd = 0, sockfd = 0, raw_error = 0, fetched = 0;
    unsigned long long netns = 0;
    unsigned char raw[MAX_SOCKADDR];
    size_t length = 0;
    int failed;

    Py_BEGIN_ALLOW_THREADS
    failed = ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0 ? errno : 0;
    if (!failed && n.data.nr == connect_nr) {
        fetched = 1;
        length = (size_t)(n.data.args[2] & 0xFFFFFFFFu);
        pidfd = pidfd_of_thread((int)n.pid);
        if (pidfd >= 0) {
            int valid = id_valid(listener, n.id); /* the pid still names the caller */
            if (valid < 0) {
                close(pidfd);
                pidfd = valid;
            }
        }
        if (pidfd >= 0) {
            long fd = syscall(SYS_pidfd_getfd, pidfd, (int)(n.data.args[0] & 0xFFFFFFFFu), 0);
            sockfd = fd >= 0 ? (int)fd : -errno;
        }
        if (pidfd >= 0 && sockfd >= 0 && length >= 2 && length <= MAX_SOCKADDR) {
            raw_error = read_memory((int)n.pid, n.data.args[1], raw, length);
            if (raw_error == 0)
                raw_error = id_valid(listener, n.id); /* the bytes were the caller's */
        }
        if (pidfd >= 0 && sockfd >= 0)
            netns = netns_of(sockfd);
    }
    Py_END_ALLOW_THREADS

    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *call_args = Py_BuildValue("(KKKKKK)", (unsigned long long)n.data.args[0],
                                        (unsigned long long)n.data.args[1],
                                        (unsigned long long)n.data.args[2],
                                        (unsigned long long)n.data.args[3],
                                        (unsigned long long)n.data.args[4],
                                        (unsigned long long)n.data.args[5]);
    if (call_args == NULL)
        goto fail;
    if (!fetched)
        return Py_BuildValue("(KIiINNNNN)", (unsigned long long)n.id, n.pid, n.data.nr,
                             n.data.arch, call_args, Py_NewRef(Py_None), Py_NewRef(Py_None),
                             Py_NewRef(Py_None), Py_NewRef(Py_None));
    PyObject *raw_value;
    if (pidfd < 0 || sockfd < 0 || length < 2 || length > MAX_SOCKADDR)
        raw_value = Py_NewRef(Py_None);
    else if (raw_error < 0)
        raw_value = PyLong_FromLong(raw_error);
    else
        raw_value = PyBytes_FromStringAndSize((const char *)raw, (Py_ssize_t)length);
    PyObject *netns_value = netns ? PyLong_FromUnsignedLongLong(netns) : Py_NewRef(Py_None);
    PyObject *result = Py_BuildValue("(KIiINiiNN)", (unsigned long long)n.id, n.pid,
                                     n.data.nr, n.data.arch, call_args, pidfd,
                                     pidfd < 0 ? 0 : sockfd, raw_value, netns_value);
    if (result != NULL)
        return result;
fail:
    /* The fds are ours: without a result nobody else will close them. */
    if (pidfd >= 0)
        close(pidfd);
    if (pidfd >= 0 && sockfd >= 0)
        close(sockfd);
    return NULL;
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

/* Whether fd ``fd`` of thread ``pid`` is close-on-exec (its fdinfo ``flags:`` line, in
 * octal); 0 when that cannot be read (seccomp_notify.fd_cloexec). */
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
 * success).  ``host`` is closed in every case.  Returns an outcome, or -errno for an
 * ADDFD or SEND failure other than the caller being gone. */
static int install(int listener, __u64 id, int pid, int fd, int host, int blocking,
                   int result)
{
    if (blocking) {
        /* the file's flag: the program's socket was blocking */
        int flags = fcntl(host, F_GETFL);
        if (flags >= 0)
            (void)fcntl(host, F_SETFL, flags & ~O_NONBLOCK);
    }
    struct seccomp_notif_addfd add = {
        .id = id,
        .flags = SECCOMP_ADDFD_FLAG_SETFD,
        .srcfd = (__u32)host,
        .newfd = (__u32)fd,
        .newfd_flags = fd_cloexec(pid, fd) ? O_CLOEXEC : 0,
    };
    int added = ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    int add_error = added < 0 ? errno : 0;
    close(host); /* the program holds its own reference now (or nobody does) */
    if (add_error)
        return add_error == ENOENT ? GONE : -add_error;
    struct seccomp_notif_resp response = {.id = id, .val = 0, .error = -result, .flags = 0};
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &response) < 0)
        return errno == ENOENT ? SWITCHED_GONE : -errno;
    return SWITCHED;
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

    int outcome = 0, value = 0, error = 0;
    Py_BEGIN_ALLOW_THREADS
    int host = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (host < 0) {
        error = errno;
        goto done;
    }
    copy_options(source, source_family, host, family);
    if (v6only_off) {
        int zero = 0;
        (void)setsockopt(host, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    }
    if (bound_length) {
        int one = 1;
        (void)setsockopt(host, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(host, (struct sockaddr *)&bound, bound_length) < 0) {
            error = errno;
            close(host);
            goto done;
        }
    }
    int result = connect(host, (struct sockaddr *)&target, target_length) == 0 ? 0 : errno;
    if (result == EINPROGRESS && blocking) {
        /* A target on this host has usually answered before connect() returned (the
         * handshake runs inside the call): no round through the caller's loop. */
        struct pollfd p = {.fd = host, .events = POLLOUT};
        if (poll(&p, 1, 0) == 1) {
            socklen_t len = sizeof result;
            if (getsockopt(host, SOL_SOCKET, SO_ERROR, &result, &len) < 0)
                result = errno;
        } else {
            outcome = PENDING;
            value = host;
            goto done;
        }
    }
    if (result != 0 && result != EINPROGRESS) {
        close(host);
        outcome = FAILED;
        value = result;
        goto done;
    }
    value = result;
    outcome = install(listener, (__u64)id, pid, fd, host, blocking, result);
    if (outcome < 0) {
        error = -outcome;
        outcome = 0;
    }
done:;
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
        PyModule_AddIntConstant(module, "PENDING", PENDING) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
