"""The forked, single-threaded helper every namespace operation runs in, and its one report.

A multithreaded process may not enter a user namespace, so each operation on a
sandbox's namespaces runs in a child forked here (:func:`_fork`), confined at once
(:mod:`.confine`), which answers with exactly one ``SOCK_SEQPACKET`` message: a JSON
header and the fds it made (``SCM_RIGHTS``), or ``{"error": ...}``.  The parent reads
it with :func:`_receive`, which turns every way a helper can fail (silence, death, a
garbled or oversized reply) into one :class:`SandboxError` line.  :func:`_in_helper`
is the whole round trip for a helper that enters existing namespaces (``attach``,
``make_fds``); ``run``'s helper, which creates them, is :mod:`.childsetup`'s.

The names keep their leading underscore: they are this package's internals, shared by
:mod:`.sandbox`, :mod:`.childsetup` and the API's split form, not a public surface.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

from nsbridge.dependencies import require_pyroute2
from nsbridge.errors import UserError, describe_oserror
from nsbridge.linux.netns import CLONE_NEWNET, Netns, setns
from nsbridge.usernet.inside import confine
from nsbridge.usernet.inside.netconf import SetupError
from nsbridge.usernet.inside.userns import CLONE_NEWUSER

_REPLY_LIMIT = 1 << 16
_SCM_MAX_FD = 253  # the kernel's per-message limit
_FIXED_FDS = 3  # tun, netns, userns lead every reply; the extra fds follow

# Held from socketpair() until the parent closed the child's end: a helper forked by a
# concurrent create()/attach() in another thread must not inherit that end, or the parent
# would miss the EOF that tells it its own helper died.
_fork_lock = threading.Lock()


class SandboxError(UserError):
    """Creating, entering or configuring the namespace failed; the text says which step."""


def _preload() -> None:
    """Import pyroute2 here, before fork: a child importing it could deadlock on an import
    lock held by another parent thread at fork time, and would pay the import each time."""
    require_pyroute2("user-mode networking (nsbridge run/attach)")
    import pyroute2.netlink.exceptions  # noqa: F401
    from pyroute2 import IPRoute  # noqa: F401


class _Helper:
    """A forked helper.  Remembers whether it was reaped, because signalling a pid after
    reaping it could hit an unrelated process that reused the number."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def reap(self) -> int:
        """Wait for a helper that is about to exit (SIGKILL if it lingers); its status."""
        if self.status is None:
            self.status = _reap(self.pid)
        return self.status

    def kill(self) -> int:
        if self.status is None:
            self.status = _kill_and_reap(self.pid)
        return self.status


def _fork(
    child_main: Callable[[socket.socket], None],
    keep: Iterable[int] = (),
    dumpable: bool = False,
) -> tuple[_Helper, socket.socket]:
    """Fork a helper running ``child_main(sock)``; it never returns into our stack.

    Every helper is forked here and confined here, before ``child_main`` runs: non-dumpable
    (unless ``dumpable``: ``run``'s helper, which turns it off itself once its id maps are
    written), holding only ``sock`` and the fds in ``keep``, with an empty environment and
    ``/`` as working directory (see :mod:`nsbridge.usernet.inside.confine`).
    """
    with _fork_lock:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            raise SandboxError(
                f"cannot start the namespace helper: {describe_oserror(exc)}"
            ) from None
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                try:
                    confine.harden({child_sock.fileno(), *keep}, dumpable=dumpable)
                except BaseException as exc:
                    _send_error(child_sock, str(exc) if isinstance(exc, SetupError) else
                                f"cannot confine the namespace helper: "
                                f"{type(exc).__name__}: {exc}")
                    os._exit(1)
                child_main(child_sock)
            finally:
                os._exit(1)
        child_sock.close()
    return _Helper(pid), parent_sock


def _receive(
    sock: socket.socket, helper: _Helper, timeout: float, doing: str, fixed: int = _FIXED_FDS
) -> tuple[dict, list[int]]:
    """The helper's one report: (header, fds), or a SandboxError with its message.

    ``fixed`` fds (tun, netns, userns) lead the message, then ``header["extra"]`` more.
    """
    sock.settimeout(timeout)
    try:
        data, fds, flags, _ = socket.recv_fds(
            sock, _REPLY_LIMIT, _SCM_MAX_FD, socket.MSG_CMSG_CLOEXEC
        )
    except TimeoutError:
        raise SandboxError(
            f"{doing}: the namespace helper (pid {helper.pid}) did not report within "
            f"{timeout:g} s; it was killed"
        ) from None
    except ConnectionResetError:
        data, fds, flags = b"", [], 0
    if not data or flags & socket.MSG_CTRUNC:
        _close_all(fds)
    if not data:
        status = helper.reap()
        raise SandboxError(
            f"{doing}: the namespace helper {_describe_status(status)} before reporting"
        )
    if flags & socket.MSG_CTRUNC:
        raise SandboxError(
            f"{doing}: too many file descriptors for one message "
            f"(at most {_SCM_MAX_FD - _FIXED_FDS} extra)"
        )
    reply = _decode(data)
    if "error" in reply:
        _close_all(fds)
        raise SandboxError(f"{doing}: {reply['error']}")
    expected = fixed + int(reply.get("extra", 0)) + bool(reply.get("seccomp_listener"))
    if len(fds) != expected:
        _close_all(fds)
        raise SandboxError(
            f"{doing}: the namespace helper sent {len(fds)} fds, expected {expected}"
        )
    return reply, fds


def _in_helper(
    netns: Netns,
    userns: int | None,
    work: Callable[[], tuple[dict, list[int]]],
    doing: str,
    timeout: float,
    fixed: int = _FIXED_FDS,
    preload: bool = True,
) -> tuple[dict, list[int]]:
    """Fork a helper that enters ``userns`` (if given) and ``netns``, runs ``work`` there
    and sends back its fds; reap it.  Returns (header, fds).  ``preload=False`` skips
    importing pyroute2 first, for work that never uses it."""
    helper, sock = _start_in_helper(netns, userns, work, preload=preload)
    return _finish_in_helper(helper, sock, timeout, doing, fixed)


def _start_in_helper(
    netns: Netns,
    userns: int | None,
    work: Callable[[], tuple[dict, list[int]]],
    preload: bool = True,
) -> tuple[_Helper, socket.socket]:
    """The first half of :func:`_in_helper`: fork the helper, which goes to work at
    once; :func:`_finish_in_helper` collects its report.  Split for a process that must
    fork before it locks itself down and collect afterwards (nsbridge-slirp4netns
    --enable-sandbox); with ``preload=False`` a single-threaded caller leaves
    pyroute2's import to the helper."""
    if preload:
        _preload()
    keep = [netns.fd] if userns is None else [netns.fd, userns]
    parent = os.getpid()
    return _fork(lambda s: _enter_child(s, netns.fd, userns, work, parent), keep=keep)


def _finish_in_helper(
    helper: _Helper, sock: socket.socket, timeout: float, doing: str,
    fixed: int = _FIXED_FDS,
) -> tuple[dict, list[int]]:
    """The second half of :func:`_in_helper`: the report, and the helper reaped."""
    try:
        reply, fds = _receive(sock, helper, timeout, doing, fixed)
    except BaseException:
        helper.kill()
        raise
    finally:
        sock.close()
    helper.reap()
    return reply, fds


def _reap(pid: int, grace: float = 5.0) -> int:
    """waitpid() a helper that is about to exit; SIGKILL it if it lingers.  Its status."""
    deadline = time.monotonic() + grace
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # someone else reaped it (a SIGCHLD handler); nothing to report
        if done:
            return status
        if time.monotonic() >= deadline:
            return _kill_and_reap(pid)
        time.sleep(0.005)


def _kill_and_reap(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _decode(data: bytes) -> dict:
    try:
        reply = json.loads(data)
    except ValueError:
        return {"error": f"garbled report from the namespace helper: {data[:200]!r}"}
    return reply if isinstance(reply, dict) else {"error": "garbled report"}


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _enter_child(
    sock: socket.socket,
    netns_fd: int,
    userns_fd: int | None,
    work: Callable[[], tuple[dict, list[int]]],
    parent: int,
) -> NoReturn:
    """The ``attach``/``make_fds`` helper: enter the namespaces, do ``work``, report, exit.
    It dies with its parent (SIGKILL included), set once the namespaces are entered."""
    try:
        try:
            if userns_fd is not None:
                _setns(userns_fd, CLONE_NEWUSER, "user")
            _setns(netns_fd, CLONE_NEWNET, "network")
            confine.die_with_parent(parent)
            header, fds = work()
        except SetupError as exc:
            _send_error(sock, str(exc))
            os._exit(1)
        socket.send_fds(sock, [json.dumps(header).encode()], fds)
        os._exit(0)
    except BaseException as exc:
        _send_error(sock, f"unexpected error in the namespace helper: {type(exc).__name__}: {exc}")
    os._exit(1)


def _setns(fd: int, nstype: int, kind: str) -> None:
    try:
        setns(fd, nstype)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = (
                f": entering a {kind} namespace needs CAP_SYS_ADMIN over it; run as "
                "root or as the user who created it"
            )
        elif exc.errno == errno.EINVAL and kind == "user":
            hint = ": it is not a descendant of ours (or this process is multithreaded)"
        raise SetupError(
            f"cannot enter the target's {kind} namespace: {describe_oserror(exc)}{hint}"
        ) from None


def _send_error(sock: socket.socket, text: str) -> None:
    try:
        sock.send(json.dumps({"error": text[:8000]}).encode())
    except OSError:
        pass  # the parent is gone: nobody to tell
