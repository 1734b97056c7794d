"""``attach``'s target: which network namespace, which user namespace owns it, and a guard.

A target is a PID, an nsfs path or any :meth:`~nsbridge.linux.netns.Netns.from_spec`
selector.  The helper must enter the user namespace owning the target's network
namespace when that is not ours (a rootless container's), so it is looked up here with
``NS_GET_USERNS``; attaching to nsbridge's own namespace is refused, since a default
route through a tun device only we serve would cut this host's networking.
"""

from __future__ import annotations

import errno
import fcntl
import os

from nsbridge.errors import UserError, describe_oserror
from nsbridge.linux.netns import Netns
from nsbridge.usernet.inside.helper import SandboxError

# ioctl(NS_GET_USERNS) = _IO(0xb7, 0x1): an fd for the user namespace owning a namespace.
NS_GET_USERNS = 0xB701
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is
CLONE_NEWUSER = 0x10000000


def _open_target(target: str | int | Netns) -> Netns:
    """PID (int or digits), nsfs path, or any :meth:`Netns.from_spec` selector."""
    if isinstance(target, Netns):
        return Netns(os.dup(target.fd), target.label)
    if isinstance(target, int):
        return Netns.from_pid(str(target), label=f"pid {target}")
    text = target.strip()
    if text.isdigit():
        return Netns.from_pid(text, label=f"pid {text}")
    return Netns.from_spec(text)


def _refuse_own_namespace(netns: Netns) -> None:
    """Attaching to our own namespace would add a default route through a tun device that
    only we serve — cutting this host's networking.  Refuse it."""
    own = {_ns_identity("/proc/self/ns/net"), _ns_identity("/proc/thread-self/ns/net")}
    if netns.identity() in own:
        raise UserError(
            f"{netns.label} is nsbridge's own network namespace: attach gives a "
            "*separate* namespace its networking (give the PID of a process in "
            "the container or sandbox)"
        )


def _owning_userns(netns: Netns) -> int | None:
    """An fd on the user namespace owning ``netns``, or None if that is ours (no entry)."""
    try:
        fd = fcntl.ioctl(netns.fd, NS_GET_USERNS)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            # Owned by an ancestor of our user namespace: it cannot be entered; setns on
            # the netns itself will then say what is wrong.
            return None
        raise SandboxError(
            f"cannot find the user namespace owning {netns.label}: {describe_oserror(exc)}"
        ) from None
    os.set_inheritable(fd, False)
    if _same_ns(fd, "/proc/self/ns/user"):
        os.close(fd)
        return None
    return fd


def _open_userns(path: str) -> int | None:
    """An fd on the user namespace file ``path`` (slirp4netns's ``--userns-path``), or
    None if that is our own (nothing to enter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open user namespace {path}: {describe_oserror(exc)}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != CLONE_NEWUSER:
        os.close(fd)
        raise UserError(f"{path} is not a user namespace file (such as /proc/PID/ns/user)")
    if _same_ns(fd, "/proc/self/ns/user"):
        os.close(fd)
        return None
    return fd


def _ns_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _same_ns(fd: int, path: str) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == _ns_identity(path)
