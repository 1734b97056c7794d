"""The new user namespace of ``run``: created together with its network and mount
namespaces, and the caller mapped to root inside.

One ``unshare`` makes all three, so the new user namespace owns the other two: that is
what gives the helper CAP_NET_ADMIN and CAP_SYS_ADMIN over them without any privilege
outside.  Each failure is explained with the usual cause (a sysctl, a security module,
a limit), since "Operation not permitted" alone tells a user nothing.
"""

from __future__ import annotations

import errno
import os

from nsbridge.errors import describe_oserror
from nsbridge.linux.netns import CLONE_NEWNET, unshare
from nsbridge.usernet.inside.netconf import SetupError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def _unshare_all() -> None:
    """New user, network and mount namespaces for this process, in one call."""
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            hint = (
                "unprivileged user namespaces are disabled here (sysctl "
                "kernel.unprivileged_userns_clone=0, an AppArmor/SELinux policy, a "
                "container's seccomp profile, or a chroot); enable them or run as root"
            )
        elif exc.errno in (errno.ENOSPC, errno.EUSERS):
            hint = (
                "the user namespace limit is reached (sysctl user.max_user_namespaces, "
                "or the nesting depth of 32)"
            )
        elif exc.errno == errno.EINVAL:
            hint = "this kernel lacks user/network/mount namespace support"
        else:
            hint = ""
        raise SetupError(
            f"cannot create a user namespace: {describe_oserror(exc)}"
            + (f": {hint}" if hint else "")
        ) from None


def _map_ids(uid: int, gid: int) -> None:
    """Map the caller to root inside: the one mapping a process may write for itself.

    The helper writes its own maps from *inside* the new user namespace, where it holds no
    capability over the parent namespace — true for root callers too — so the kernel
    demands ``setgroups`` = ``deny`` before gid_map, exactly as for ``unshare -r``.
    (Tools inside that call setgroups() then get EPERM; with one mapped id they could not
    switch users anyway.)
    """
    try:
        _write_proc("/proc/self/setgroups", "deny")
        _write_proc("/proc/self/uid_map", f"0 {uid} 1\n")
        _write_proc("/proc/self/gid_map", f"0 {gid} 1\n")
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = (
                " (a security policy denies capabilities in new user namespaces, e.g. "
                "AppArmor's kernel.apparmor_restrict_unprivileged_userns=1)"
            )
        raise SetupError(
            f"cannot map uid {uid}/gid {gid} into the new user namespace: "
            f"{describe_oserror(exc)}{hint}"
        ) from None


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())  # one write(2): these files reject partial writes
    finally:
        os.close(fd)
