"""Serving a seccomp user-notification listener: the ioctls, their structs, and reaching
into the process that waits.

A filter that returns ``SECCOMP_RET_USER_NOTIF`` stops the calling thread and queues a
``struct seccomp_notif`` (which call, which thread, its six arguments) on the listener
fd that ``seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)`` returned.  Whoever holds that fd
reads it (``RECV``), looks at the caller (its memory, its fds), and answers once
(``SEND``: a return value or an errno), optionally after installing a file of its own
into the caller's fd table (``ADDFD``, Linux 5.9; with ``SETFD`` over a chosen number,
as ``dup2`` would).

Why the care around reading: the caller's memory belongs to the caller, and another of
its threads can change a ``sockaddr`` while we read it.  So the rule is: read once,
check ``ID_VALID`` after every read (the thread still waits for *this* notification,
so the pid still names it and the memory read was its), decide on the bytes read, and
act on those bytes ourselves; never answer ``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` for a
decision, because the kernel would then read the memory (and look up the fd) again.

:func:`parse_notification` is sans-IO (bytes in, value out) and tested without a
kernel; the rest are thin wrappers over the system calls.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

from nsbridge.linux.libc import last_error, libc

# <linux/seccomp.h>: SECCOMP_IOWR(0, struct seccomp_notif), SECCOMP_IOWR(1, struct
# seccomp_notif_resp), SECCOMP_IOW(2, __u64), SECCOMP_IOW(3, struct seccomp_notif_addfd).
IOCTL_NOTIF_RECV = 0xC0502100
IOCTL_NOTIF_SEND = 0xC0182101
IOCTL_NOTIF_ID_VALID = 0x40082102
IOCTL_NOTIF_ADDFD = 0x40182103
ADDFD_FLAG_SETFD = 1

NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, instruction pointer, args
RESPONSE = struct.Struct("=QqiI")  # id, val, error (negative errno), flags
ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags
assert NOTIF.size == 80 and RESPONSE.size == 24 and ADDFD.size == 24

SIOCGSKNS = 0x894C  # <linux/sockios.h>: a socket's network namespace, as an nsfs fd
PIDFD_THREAD = os.O_EXCL  # Linux 6.9: a pidfd for one thread, not its thread group
MINIMUM_KERNEL = (5, 9)  # SECCOMP_IOCTL_NOTIF_ADDFD
ACTIONS_AVAIL = "/proc/sys/kernel/seccomp/actions_avail"

_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
libc.syscall.restype = ctypes.c_long


class NotificationGone(OSError):
    """The thread no longer waits for this notification (it was killed, or a signal
    interrupted the call, which the kernel will restart as a new notification)."""


@dataclass(frozen=True)
class Notification:
    """One trapped call: ``pid`` is the calling thread's id (in our pid namespace)."""

    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def parse_notification(data: bytes) -> Notification:
    """A ``struct seccomp_notif`` as a value; ValueError if it is not one."""
    if len(data) < NOTIF.size:
        raise ValueError(f"a seccomp notification is {NOTIF.size} bytes, not {len(data)}")
    nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack_from(data)
    return Notification(nid, pid, nr, arch, tuple(args))


def unsupported() -> str | None:
    """Why user notification with ADDFD cannot be used on this kernel (one line), or
    None.  Linux 5.9 for ADDFD; ``user_notif`` must be among the available actions."""
    release = platform.release()
    try:
        version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = MINIMUM_KERNEL  # an odd release string: let the actions file decide
    if version < MINIMUM_KERNEL:
        return (f"Linux {release} is older than 5.9, which socket switching needs "
                "(seccomp's ADDFD)")
    try:
        with open(ACTIONS_AVAIL) as f:
            actions = f.read().split()
    except OSError as exc:
        return f"cannot read {ACTIONS_AVAIL}: {exc.strerror}"
    if "user_notif" not in actions:
        return "this kernel offers no seccomp user notification (user_notif)"
    return None


def receive(listener: int) -> Notification:
    """The next notification (``ENOENT``: it vanished before we took it)."""
    buffer = bytearray(NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buffer)
    return parse_notification(bytes(buffer))


def is_valid(listener: int, notification_id: int) -> bool:
    """Whether the thread still waits for this notification."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notification_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def check_valid(listener: int, notification_id: int) -> None:
    """:func:`is_valid`, raising :class:`NotificationGone` when it is not."""
    if not is_valid(listener, notification_id):
        raise NotificationGone(errno.ENOENT, "the trapped call is gone")


def respond(listener: int, notification_id: int, value: int = 0, error: int = 0) -> bool:
    """Answer: the call returns ``value``, or fails with errno ``error``.  False when
    the thread no longer waits (nothing to answer)."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SEND,
                    RESPONSE.pack(notification_id, value, -error if error else 0, 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def install_fd(listener: int, notification_id: int, fd: int, target: int,
               cloexec: bool) -> None:
    """Put (a reference to) our ``fd`` at number ``target`` in the caller's table,
    replacing what was there (``ADDFD`` with ``SETFD``).  NotificationGone if the
    thread no longer waits."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ADDFD,
                    ADDFD.pack(notification_id, ADDFD_FLAG_SETFD, fd, target,
                               os.O_CLOEXEC if cloexec else 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotificationGone(errno.ENOENT, "the trapped call is gone") from None
        raise


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                  ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` in ``pid``'s memory (process_vm_readv; where that
    is refused, ``/proc/PID/mem``).  Short reads raise EFAULT.  The caller checks
    ``ID_VALID`` afterwards: only then is it sure the pid was still the caller's."""
    if size == 0:
        return b""
    local = ctypes.create_string_buffer(size)
    mine = _Iovec(ctypes.addressof(local), size)
    theirs = _Iovec(address, size)
    got = libc.process_vm_readv(pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
    if got == size:
        return local.raw
    if got < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size, address)
        finally:
            os.close(fd)
        if len(data) == size:
            return data
    raise OSError(errno.EFAULT, "cannot read the caller's memory")


def pidfd_of_thread(tid: int) -> int:
    """A pidfd for thread ``tid``: one of the thread itself where the kernel can (6.9,
    ``PIDFD_THREAD``: its own fd table even if it has one of its own), else its
    thread group's (a thread's table is its group's unless made with clone without
    CLONE_FILES, which the older kernels leave us no way to reach)."""
    result = libc.syscall(ctypes.c_long(_SYS_PIDFD_OPEN), ctypes.c_int(tid),
                          ctypes.c_uint(PIDFD_THREAD))
    if result >= 0:
        return int(result)
    if ctypes.get_errno() != errno.EINVAL:
        raise last_error("pidfd_open")
    result = libc.syscall(ctypes.c_long(_SYS_PIDFD_OPEN), ctypes.c_int(_tgid(tid)),
                          ctypes.c_uint(0))
    if result < 0:
        raise last_error("pidfd_open")
    return int(result)


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise OSError(errno.ESRCH, f"no thread group for {tid}")


def take_fd(pidfd: int, fd: int) -> int:
    """Our own reference to the file behind ``fd`` in the process of ``pidfd``
    (``pidfd_getfd``, Linux 5.6; needs ptrace access to it), close-on-exec."""
    result = libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                          ctypes.c_int(fd), ctypes.c_uint(0))
    if result < 0:
        raise last_error("pidfd_getfd")
    return int(result)


def fd_cloexec(pid: int, fd: int) -> bool:
    """Whether ``fd`` of thread ``pid`` is close-on-exec (from ``/proc/PID/fdinfo``;
    False when that cannot be read)."""
    try:
        info = os.open(f"/proc/{pid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:  # raw reads, not open(): this is on every switched connect's path
        text = os.read(info, 4096)
    except OSError:
        return False
    finally:
        os.close(info)
    for line in text.split(b"\n"):
        if line.startswith(b"flags:"):
            try:
                return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
            except (IndexError, ValueError):
                return False
    return False


def socket_netns(fd: int) -> int | None:
    """The inode of the network namespace socket ``fd`` belongs to, or None when the
    kernel will not say (``SIOCGSKNS`` needs CAP_NET_ADMIN over that namespace: an
    unprivileged caller is refused it for the host's own)."""
    try:
        ns = fcntl.ioctl(fd, SIOCGSKNS)
    except OSError:
        return None
    try:
        return os.fstat(ns).st_ino
    finally:
        os.close(ns)
