"""A socket made in another process's network namespace, by an unprivileged caller.

Why a child process: a socket belongs for life to the namespace of the thread that made
it, and entering a network namespace (``setns``) needs CAP_SYS_ADMIN over it *and* in
one's own user namespace.  A rootless container's namespace is owned by a user
namespace its (unprivileged) user made, and that user holds every capability in it:
so a process of that user can enter the container's user namespace, then its network
namespace, and make the socket there.  Joining a user namespace is for a single-thread
process and cannot be undone, so a forked child does it, sends the socket back over a
socket pair (``SCM_RIGHTS``) and exits; the caller keeps its own namespaces and
threads.  A caller that can enter the network namespace directly (root) still goes
through the child: one path, tested once.

The child runs only system calls (no locks of the parent's threads are taken), and
exits with ``os._exit`` whatever happens.
"""

from __future__ import annotations

import array
import errno
import os
import socket

from nsbridge.linux.netns import CLONE_NEWNET, setns

CLONE_NEWUSER = 0x10000000


def socket_in_netns_of(pid: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket (``family``, ``kind``, ``proto``) in the network namespace of
    process ``pid``; OSError (with the step that failed) when it cannot be made."""
    user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(user_fd)
        raise
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        own_user = os.stat("/proc/self/ns/user")
        theirs = os.fstat(user_fd)
        join_user = (own_user.st_dev, own_user.st_ino) != (theirs.st_dev, theirs.st_ino)
        child_pid = os.fork()
        if child_pid == 0:  # pragma: no cover - the child's exit status is its report
            _child(child, user_fd if join_user else -1, net_fd, family, kind, proto)
        child.close()
        _, status = os.waitpid(child_pid, 0)
        fds = array.array("i")
        message, ancillary, _flags, _ = parent.recvmsg(64, socket.CMSG_SPACE(fds.itemsize))
        for level, ctype, data in ancillary:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            code = os.waitstatus_to_exitcode(status)
            raise OSError(code if code > 0 else errno.EIO,
                          f"cannot make a socket in process {pid}'s network namespace: "
                          f"{message.decode(errors='replace') or os.strerror(code)}")
        return socket.socket(fileno=fds[0])
    finally:
        parent.close()
        child.close()
        os.close(user_fd)
        os.close(net_fd)


def _child(channel: socket.socket, user_fd: int, net_fd: int, family: int, kind: int,
           proto: int) -> None:  # pragma: no cover - runs in the forked child
    step = "setns(user)"
    try:
        if user_fd >= 0:
            setns(user_fd, CLONE_NEWUSER)
        step = "setns(net)"
        setns(net_fd, CLONE_NEWNET)
        step = "socket"
        made = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        channel.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [made.fileno()]))])
        os._exit(0)
    except OSError as exc:
        try:
            channel.send(f"{step}: {exc.strerror}".encode())
        finally:
            os._exit(exc.errno or 1)
    finally:
        os._exit(1)
