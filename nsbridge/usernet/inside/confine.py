"""Confinement for nsbridge's own processes that enter a namespace it does not trust.

Every namespace operation of user-mode networking runs in a forked helper (see
:mod:`nsbridge.usernet.inside.sandbox`), and a helper that enters a *user* namespace takes that
namespace's credentials.  The namespace's root — the sandboxed command, a container — then
holds every capability over those credentials and passes the ptrace access check on the
helper, unless the helper is **non-dumpable**: the kernel then also demands
CAP_SYS_PTRACE in the user namespace of the helper's *memory* (``mm->user_ns``, the one
nsbridge was exec'd in, since fork keeps it), which the sandbox's root never has.  That
one check guards everything a helper could leak: ``ptrace(2)``, ``pidfd_getfd(2)``, and
``/proc/PID/root``, ``cwd``, ``environ``, ``mem``, ``fd``, ``maps``, ``ns/*``.

So :func:`harden` runs first in every forked helper, before its first ``setns``/
``unshare``, and does four things, each for its own reason:

* ``prctl(PR_SET_DUMPABLE, 0)``: the check above.  It survives ``setns`` and ``fork``;
  ``execve`` resets it, which is right for ``run``'s helper, whose exec *is* the command.
  ``setns`` into a user namespace may itself clear dumpability (``commit_creds`` applies
  ``fs.suid_dumpable`` when the new credentials are not a subset of the old), but not when
  the caller owns that namespace — the rootless case — so nothing here relies on it.
* every fd closed but those the helper needs, and stdin/stdout/stderr pointed at
  ``/dev/null``: a helper that ever became reachable must not hold the embedding
  program's sockets, log files or terminal.
* an empty environment (``os.environ`` and libc's ``environ``).  ``/proc/PID/environ``
  still shows the block the process was exec'd with — its memory, not the variables —
  and only non-dumpability keeps that unreadable.
* ``/`` as working directory, so no directory of the caller's is held.

A helper that outlives its set-up (the published ports' socket factory) also leaves the
host's file system with :func:`empty_root`: its root becomes an empty read-only tmpfs in
a mount namespace of its own, so even ``/proc/PID/root`` would show nothing.

``gc.freeze()`` comes first: the forked helper is a copy of a multithreaded program, and
the cyclic collector must not finalise one of the parent's objects (a socket) and close
an fd number that the helper has since reused.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Collection

from nsbridge.linux.libc import checked, libc, mount
from nsbridge.linux.netns import unshare
from nsbridge.usernet.inside.netconf import SetupError

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
CLONE_NEWNS = 0x00020000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]


def harden(keep: Collection[int], *, dumpable: bool = False) -> None:
    """First thing in a forked helper: non-dumpable (unless ``dumpable``), only the fds in
    ``keep`` open (0-2 become /dev/null unless kept), an empty environment, cwd ``/``.

    ``dumpable=True`` is for ``run``'s helper only, which must write its own uid/gid maps
    first (the kernel hands /proc/self of a non-dumpable process to root, and an
    unprivileged caller could no longer open its own ``uid_map``): it calls
    :func:`make_non_dumpable` right after, while its new namespace holds nobody else.
    Raises :class:`SetupError`.
    """
    gc.freeze()
    if not dumpable:
        make_non_dumpable()
    try:
        _stdio_to_null(keep)
        close_fds_except(set(keep) | {0, 1, 2})
        os.environ.clear()
        os.chdir("/")
    except OSError as exc:
        raise SetupError(f"cannot confine the namespace helper: {exc}") from None


def make_non_dumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``, checked: a helper that cannot be made non-dumpable
    must not go on into the namespace."""
    try:
        checked("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    except OSError as exc:
        raise SetupError(f"cannot make the namespace helper non-dumpable: {exc.strerror}") from None
    if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SetupError("the namespace helper is still dumpable after PR_SET_DUMPABLE")


def die_with_parent(parent: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``: a helper must not outlive the process that
    forked it, even one killed with SIGKILL (rootlesskit's way of ending slirp4netns).

    Call it after the last ``setns`` into a user namespace: the kernel clears the setting
    when credentials change.  ``parent`` is the pid that forked us, taken before the
    fork: if it already died, ``getppid()`` names another process and we exit here."""
    import signal

    checked("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def close_fds_except(keep: Collection[int]) -> None:
    """Close every fd not in ``keep``, with close_range(2) over the gaps (through
    :func:`os.closerange`) up to the highest fd open now."""
    try:
        highest = max((int(name) for name in os.listdir("/proc/self/fd")), default=-1)
    except OSError:  # no /proc: the soft limit bounds every fd number
        import resource

        highest = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    # Only non-empty ranges: os.closerange(n, n) becomes close_range(n, n - 1), and
    # close_range(0, -1) is close_range(0, UINT_MAX) — every fd.
    start = 0
    for fd in sorted(set(keep)):
        if fd > start:
            os.closerange(start, fd)
        start = max(start, fd + 1)
    if start <= highest:
        os.closerange(start, highest + 1)


def empty_root() -> None:
    """Leave the host's file system for good: a private mount namespace whose root is an
    empty, read-only tmpfs.

    For a helper that stays alive inside an untrusted namespace (after it entered the
    user namespace, which grants CAP_SYS_ADMIN over a new mount namespace).  The tmpfs is
    mounted over ``/`` in the new namespace and reached through ``/..`` (a path step
    that crosses mounts stacked on the root; ``/`` alone does not), then made the root.
    Everything the caller still needs must be imported before: nothing can be loaded
    afterwards.  Raises :class:`SetupError`.
    """
    try:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("nsbridge-empty", "/", "tmpfs",
               MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        os.chdir("/..")
        os.chroot(".")
        os.chdir("/")
        left = os.listdir("/")
    except OSError as exc:
        raise SetupError(
            f"cannot give the namespace helper an empty root: {exc.strerror or exc}") from None
    if left:
        raise SetupError(f"the namespace helper's empty root is not empty: {left[:5]}")


def _stdio_to_null(keep: Collection[int]) -> None:
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep and fd != null:
            os.dup2(null, fd, inheritable=False)
    if null > 2:
        os.close(null)


