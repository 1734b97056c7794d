"""Lock a running process down: an empty root with a few directories bound read-only, and
every capability gone but the ones named.

For a process that has finished its set-up and from then on only moves packets and
bytes between file descriptors it already holds (``nsbridge-slirp4netns
--enable-sandbox``): if it is ever taken over, it should see as little of the host's
file system as it needs and hold no privilege it could turn against the host.

* :func:`join_user_namespace`: an unprivileged process may not make a mount namespace
  in its own user namespace, but holds every capability in a user namespace it owns; so
  it joins one (the kernel demands a single-threaded caller).
* :func:`pivot_to_empty_root`: a mount namespace of its own, a small tmpfs as the new
  root holding only bind mounts of the directories named (made read-only, nosuid, nodev,
  noexec, submounts included), ``pivot_root`` into it and the old root detached, then
  the tmpfs itself read-only.  ``pivot_root`` rather than ``chroot``: there is no old
  root left to climb back to, even for a process that kept CAP_SYS_CHROOT.
* :func:`keep_only_capabilities`: the ambient set cleared, every other capability
  dropped from the bounding set, then effective, permitted and inheritable set to the
  ones kept.

Everything the process still needs from the file system must be opened or imported
before the pivot: nothing else can be loaded afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Collection, Sequence

from nsbridge.linux.libc import checked, last_error, libc, mount
from nsbridge.linux.netns import setns, unshare

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CAP_SYS_ADMIN = 21
CAP_NET_BIND_SERVICE = 10

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
# mount_setattr(2) and pivot_root(2) have no libc wrapper in older glibc: numbers, by ABI.
_SYSCALLS = {"x86_64": {"mount_setattr": 442, "pivot_root": 155},
             "aarch64": {"mount_setattr": 442, "pivot_root": 41}}
_LOCKED = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_void_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class LockdownError(OSError):
    """A step failed; the message names it."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _fail(step: str, exc: OSError) -> LockdownError:
    return LockdownError(exc.errno or errno.EPERM, f"{step}: {exc.strerror or exc}")


def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise LockdownError(errno.ENOSYS, f"{name}: no system call number known for "
                            f"{machine}") from None


def has_capability(cap: int) -> bool:
    """Whether ``cap`` is in this process's effective set (from /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def same_user_namespace(fd: int) -> bool:
    """Whether the user namespace behind ``fd`` is the one this process is in."""
    mine, theirs = os.stat("/proc/self/ns/user"), os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def require_single_thread(what: str) -> None:
    """Raise :class:`LockdownError` naming ``what`` if this process runs a second thread
    (``unshare(CLONE_NEWNS)`` and ``setns(CLONE_NEWUSER)`` refuse one with a bare
    EINVAL: threads share the file system context)."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        raise LockdownError(errno.EINVAL, f"{what} needs a single thread, and {threads} "
                            "run (a thread was started too early)")


def join_user_namespace(fd: int) -> None:
    """``setns(fd, CLONE_NEWUSER)`` (a single thread only).  Raises :class:`LockdownError`.

    The kernel counts the new credentials as no more than the old ones when we own the
    namespace joined (or one of its ancestors), which is the only kind we may join: so
    it keeps the parent-death signal a caller gave us (rootlesskit's SIGKILL) and our
    dumpability as they were."""
    require_single_thread("joining a user namespace")
    try:
        setns(fd, CLONE_NEWUSER)
    except OSError as exc:
        raise _fail("cannot join the namespace's user namespace (setns)", exc) from None


def pivot_to_empty_root(keep: Sequence[str], scratch: str = "/tmp") -> None:
    """Make the root an empty tmpfs holding read-only bind mounts of ``keep`` (absolute
    paths, each at its own path; one that does not exist is skipped).  ``scratch`` is
    where the tmpfs is mounted before the pivot, in our own mount namespace only.  Needs
    CAP_SYS_ADMIN in this process's user namespace and a single thread.  Raises
    :class:`LockdownError`."""
    require_single_thread("a mount namespace of our own")
    step = "cannot make a mount namespace of our own (unshare)"
    sources: list[tuple[str, int]] = []
    try:
        unshare(CLONE_NEWNS)
        step = "cannot make the mounts private"
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # Held open before the tmpfs hides whatever lies under ``scratch``; bound below
        # through /proc/self/fd, which names the very file or directory opened here.
        for path in keep:
            step = f"cannot open {path}"
            try:
                sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            except FileNotFoundError:
                continue
        step = f"cannot mount a tmpfs on {scratch}"
        mount("nsbridge-sandbox", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=64k,mode=0755")
        for path, fd in sources:
            inside = os.path.join(scratch, os.path.normpath(path).lstrip("/"))
            step = f"cannot bind {path} into the new root"
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.makedirs(inside, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(inside), mode=0o755, exist_ok=True)
                os.close(os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            mount(f"/proc/self/fd/{fd}", inside, None, MS_BIND | MS_REC)
            step = f"cannot make {path} read-only"
            _mount_setattr(inside, _LOCKED, recursive=True)
        os.mkdir(os.path.join(scratch, "old"), 0o700)
        os.chdir(scratch)
        step = "pivot_root"
        _pivot_root(".", "old")
        os.chdir("/")
        step = "cannot detach the old root"
        if libc.umount2(b"/old", MNT_DETACH) != 0:
            raise last_error("umount2", "/old")
        os.rmdir("/old")
        step = "cannot make the new root read-only"
        _mount_setattr("/", _LOCKED, recursive=False)
    except OSError as exc:
        raise _fail(step, exc) from None
    finally:
        for _path, fd in sources:
            os.close(fd)


def keep_only_capabilities(keep: Collection[int]) -> None:
    """Drop every capability not in ``keep`` (numbers below 32) from every set, the
    bounding set included.  Raises :class:`LockdownError`."""
    if any(not 0 <= cap < 32 for cap in keep):
        raise ValueError("only capabilities 0-31 can be kept here")
    try:
        checked("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        cap = 0
        while True:
            if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() == errno.EINVAL:  # past the last capability
                    break
                raise last_error("prctl(PR_CAPBSET_DROP)")
            cap += 1
            if cap > 63:
                break
        mask = 0
        for cap in keep:
            mask |= 1 << cap
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)(_CapData(mask, mask, mask), _CapData(0, 0, 0))
        if libc.capset(ctypes.byref(header), data) != 0:
            raise last_error("capset")
    except OSError as exc:
        raise _fail("cannot drop capabilities", exc) from None


def make_non_dumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``: the processes that share our user id (the
    namespace's root among them) may no longer ptrace us or open our ``/proc/PID/mem``,
    ``fd/N`` and the like; the kernel then asks for CAP_SYS_PTRACE where we were
    started."""
    try:
        checked("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    except OSError as exc:
        raise _fail("cannot make the process non-dumpable", exc) from None


def _mount_setattr(path: str, attr_set: int, *, recursive: bool) -> None:
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    result = libc.syscall(ctypes.c_long(_syscall_number("mount_setattr")),
                          ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags),
                          ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if result != 0:
        raise last_error("mount_setattr", path)


def _pivot_root(new_root: str, put_old: str) -> None:
    result = libc.syscall(ctypes.c_long(_syscall_number("pivot_root")),
                          os.fsencode(new_root), os.fsencode(put_old))
    if result != 0:
        raise last_error("pivot_root")
