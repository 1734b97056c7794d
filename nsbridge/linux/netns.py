"""Network namespace handles: open and validate a namespace named by path, PID, name or fd.

A :class:`Netns` owns an open file descriptor of an nsfs file.  Holding the fd keeps the
namespace alive and pins *which* namespace we mean even if a name is later reused, so
every check (exists, is a namespace, is a *network* namespace) happens once, up front,
and produces an error that names the input.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from nsbridge.errors import UserError, describe_oserror
from nsbridge.linux.libc import checked

CLONE_NEWNET = 0x40000000
# ioctl(NS_GET_NSTYPE) = _IO(0xb7, 0x3): asks nsfs which kind of namespace an fd is.
NS_GET_NSTYPE = 0xB703
NETNS_RUN_DIR = "/run/netns"

_NAMESPACE_KINDS = {
    0x00020000: "mount",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    CLONE_NEWNET: "network",
    0x00000080: "time",
}

def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling *thread* into the namespace behind ``fd`` (Python 3.11 lacks os.setns)."""
    checked("setns", fd, nstype)


def unshare(flags: int) -> None:
    """Give the calling thread new namespaces of the kinds in ``flags``."""
    checked("unshare", flags)


class Netns:
    """An open network namespace.  ``label`` is how the user named it, for messages.

    Compared by identity (one handle, one fd).  A plain class rather than a dataclass:
    worker processes import it, and ``dataclasses`` would cost each about 2 MiB."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: str) -> Netns:
        """Parse the friendly selector: ``pid:N``, ``fd:N``, a path (has a ``/``) or a name."""
        if not spec:
            raise UserError("empty network namespace selector: give a path, pid:N, fd:N or a name")
        if spec.startswith("pid:"):
            return cls.from_pid(spec[4:], label=spec)
        if spec.startswith("fd:"):
            return cls.from_fd(spec[3:], label=spec)
        if "/" in spec:
            return cls.from_path(spec)
        return cls.from_name(spec)

    @classmethod
    def from_name(cls, name: str) -> Netns:
        """A namespace made by ``ip netns add NAME`` (bind-mounted at /run/netns/NAME)."""
        path = os.path.join(NETNS_RUN_DIR, name)
        if not os.path.exists(path):
            raise UserError(
                f"network namespace {name!r} not found: no {path} "
                "(list them with `ip netns list`, or give a path or pid:N)"
            )
        return cls.from_path(path, label=f"{name!r}")

    @classmethod
    def from_pid(cls, pid_text: str, label: str | None = None) -> Netns:
        """The network namespace that process ``pid`` lives in."""
        label = label or f"pid:{pid_text}"
        try:
            pid = int(pid_text)
            if pid <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"{label}: not a process id (expected pid:1234)") from None
        if not os.path.exists(f"/proc/{pid}"):
            raise UserError(f"{label}: no such process {pid}")
        return cls.from_path(f"/proc/{pid}/ns/net", label=label)

    @classmethod
    def from_path(cls, path: str, label: str | None = None) -> Netns:
        """An nsfs file such as /proc/PID/ns/net or /run/netns/NAME."""
        label = label or path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError(f"network namespace file {path} does not exist") from None
        except PermissionError:
            raise UserError(
                f"permission denied opening network namespace {label} ({path}): "
                "run as root or as the namespace's owner"
            ) from None
        except OSError as exc:
            raise UserError(
                f"cannot open network namespace {label}: {describe_oserror(exc)}"
            ) from None
        try:
            _check_is_netns(fd, label)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, label)

    @classmethod
    def from_fd(cls, fd_text: str | int, label: str | None = None) -> Netns:
        """An inherited fd already open on a namespace file (netns_tcp_bridge's -F/-T).

        The fd is duplicated so that closing this handle never closes the caller's fd.
        """
        label = label or f"fd {fd_text}"
        try:
            fd = int(fd_text)
            if fd < 0:
                raise ValueError
        except ValueError:
            raise UserError(f"{label}: not a file descriptor number") from None
        try:
            os.fstat(fd)
        except OSError:
            raise UserError(f"{label}: file descriptor {fd} is not open") from None
        _check_is_netns(fd, label)
        return cls(os.dup(fd), label)

    @classmethod
    def current(cls) -> Netns:
        """The namespace the calling thread is in now."""
        return cls(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC), "current")

    # ---- use ------------------------------------------------------------------------

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the nsfs file: equal identities mean the same namespace."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    def is_current(self) -> bool:
        """True when the calling thread already lives in this namespace (no setns needed)."""
        st = os.stat("/proc/thread-self/ns/net")
        return (st.st_dev, st.st_ino) == self.identity()

    def enter(self) -> None:
        """setns() the calling thread into this namespace, with a message a user can act on."""
        try:
            setns(self.fd, CLONE_NEWNET)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                # "Run as root" alone misleads inside `unshare -U`, where we *are* uid 0
                # but hold no capability over the namespace's owning user namespace.
                raise UserError(
                    f"permission denied entering network namespace {self.label}: setns "
                    "needs CAP_SYS_ADMIN in the user namespace that owns it; run nsbridge as "
                    "real root (not inside an unprivileged user namespace such as "
                    "`unshare -U`) or as the owner of that namespace"
                ) from None
            raise UserError(
                f"cannot enter network namespace {self.label}: {describe_oserror(exc)}"
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Netns({self.label})"


def _check_is_netns(fd: int, label: str) -> None:
    """Refuse anything but an nsfs network-namespace file, naming what it is instead."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a namespace file"
        raise UserError(
            f"{label} is {kind}; expected a network namespace file such as /proc/PID/ns/net "
            "or /run/netns/NAME"
        )
    try:
        kind_flag = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise UserError(
            f"{label} is not a namespace file; expected a network namespace file such as "
            "/proc/PID/ns/net or /run/netns/NAME"
        ) from None
    if kind_flag != CLONE_NEWNET:
        kind = _NAMESPACE_KINDS.get(kind_flag, f"type {kind_flag:#x}")
        raise UserError(f"{label} is a {kind} namespace, not a network namespace")
