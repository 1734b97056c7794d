"""A socket factory that lives *inside* a sandbox's namespaces, as its own process.

The thread factory (nsbridge.net.factory.ThreadFactory) enters a namespace with setns(), which
an unprivileged host process cannot do for a namespace owned by a child user namespace
(setns also wants CAP_SYS_ADMIN in the caller's own user namespace), and a multithreaded
process may not enter a user namespace at all.  So for a sandbox the factory is a small
single-threaded process started inside it (through SandboxHandle.make_fds, once) that
answers "N sockets of family F, type T" over a SOCK_SEQPACKET socketpair with SCM_RIGHTS.
It exits when the host side closes its end, so nothing outlives the sandbox.

It lives among the sandbox's processes, so it is confined (:mod:`nsbridge.usernet.inside.confine`):
non-dumpable, so the sandbox's root can neither ptrace it nor open its ``/proc/PID/root``,
``environ``, ``mem`` or fds, nor copy an fd with ``pidfd_getfd``; it holds only its
channel; its environment is empty and its root is an empty read-only tmpfs.

The factory lives in the sandbox's user namespace, so the sandboxed program may kill or
stop it.  Its answers come back on the event loop thread, so every request has a
deadline: a factory that is gone or does not answer within ``_REPLY_TIMEOUT`` is given up
once, with one warning, and later requests fail at once.  Published ports into that
namespace then refuse connections; all other traffic carries on.

Published ports use it as the connect side of an ordinary forward: the relay engine is
the same one ``nsbridge forward`` uses.

Failures are ``OSError``s like the thread factory's, so a forward resets the client as
for any socket it cannot make: the factory's own ``socket()`` failure comes back with
its errno (EMFILE, EAFNOSUPPORT, ...), and a factory that is gone or stuck raises
:class:`FactoryUnavailable` (errno EIO).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from nsbridge.usernet.inside import confine

T = TypeVar("T")
Socket = socket.socket  # the class below has a method named socket

log = logging.getLogger("nsbridge")

_REQUEST = struct.Struct("iii")  # family, type, count
_REFUSAL = struct.Struct("i")  # an answer without fds: the errno, then the reason in text
_REPLY_TIMEOUT = 2.0  # a live factory answers in microseconds; this only bounds a stall
_BATCH = 16
_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


class FactoryUnavailable(OSError):
    """The factory process is gone or did not answer in time: no socket can be made in
    its namespace any more (errno EIO, the message says which)."""

    def __init__(self, label: str, why: str) -> None:
        super().__init__(errno.EIO, f"socket factory in {label}: {why}")


class ProcessFactory:
    """SocketFactory whose sockets are created by a process inside the namespace."""

    def __init__(self, channel: socket.socket, label: str) -> None:
        self.label = label
        self._channel = channel
        self._channel.settimeout(_REPLY_TIMEOUT)
        self._pools: dict[tuple[int, int], deque[socket.socket]] = {}
        self._broken: str | None = None  # why the factory was given up

    @classmethod
    def inside(cls, handle: Any) -> ProcessFactory:
        """Start the factory process inside ``handle``'s namespaces (a SandboxHandle)."""
        (fd,) = handle.make_fds(_start_server)
        return cls(socket.socket(fileno=fd), handle.netns.label)

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> Socket:
        pool = self._pools.setdefault((family, type), deque())
        if not pool:
            pool.extend(self._request(family, type, _BATCH))
        return pool.popleft()

    def _request(self, family: int, type: int, count: int) -> list[Socket]:
        if self._broken is not None:
            raise FactoryUnavailable(self.label, self._broken)
        try:
            self._channel.send(_REQUEST.pack(family, type, count))
            data, fds, _flags, _addr = socket.recv_fds(self._channel, 256, count)
        except TimeoutError:
            self._give_up(f"the factory process did not answer within {_REPLY_TIMEOUT:g} s")
        except OSError as exc:
            self._give_up(f"the factory process is gone ({exc.strerror})")
        if not fds:
            if not data:
                self._give_up("the factory process is gone")
            code, why = _refusal(data)
            raise OSError(code, f"socket factory in {self.label}: {why}")
        return [socket.socket(fileno=fd) for fd in fds]

    def _give_up(self, why: str) -> NoReturn:
        """Stop asking a dead or stuck factory (a late answer would desynchronise the
        channel); closing our end makes a stopped one exit once it runs again."""
        self._broken = why
        self._channel.close()
        log.warning("socket factory in %s: %s; published ports into this namespace refuse "
                    "connections from now on", self.label, why)
        raise FactoryUnavailable(self.label, why)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` here: only namespace-independent work (numeric address parsing) is
        asked of this factory; anything else would need the namespace's resolver."""
        return fn(*args, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.popleft().close()
        self._channel.close()


def _refusal(data: bytes) -> tuple[int, str]:
    """The errno and reason of a factory's answer without fds (EIO when the answer is
    too short to carry an errno)."""
    if len(data) < _REFUSAL.size:
        return errno.EIO, data.decode(errors="replace") or "no reason given"
    (code,) = _REFUSAL.unpack_from(data)
    return code or errno.EIO, data[_REFUSAL.size:].decode(errors="replace")


def _start_server() -> list[int]:
    """Runs inside the namespace (in a make_fds helper): fork the long-lived server.

    The helper is already confined (non-dumpable, only its own fds, an empty environment;
    see :mod:`nsbridge.usernet.inside.confine`); non-dumpability is asserted again here because
    the server lives on among the namespace's processes.  It also leaves the host's file
    system (an empty read-only root in a mount namespace of its own) and keeps only its
    channel and /dev/null on 0-2.
    """
    confine.make_non_dumpable()
    confine.empty_root()
    host_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()  # not in the caller's process group: Ctrl-C is the host's business
            os.dup2(server_end.fileno(), 3)
            confine.close_fds_except({0, 1, 2, 3})
            _serve(socket.socket(fileno=3))
        finally:
            os._exit(0)
    server_end.close()
    return [host_end.detach()]


def _serve(channel: socket.socket) -> None:
    while True:
        try:
            data = channel.recv(_REQUEST.size)
        except OSError:
            return
        if len(data) != _REQUEST.size:
            return  # EOF: the host side is gone
        family, type_, count = _REQUEST.unpack(data)
        count = max(1, min(count, 64))
        try:
            made = [socket.socket(family, type_ | _FLAGS) for _ in range(count)]
        except OSError as exc:
            refusal = f"cannot create socket: {exc.strerror}".encode()
            channel.send(_REFUSAL.pack(exc.errno or errno.EIO) + refusal)
            continue
        socket.send_fds(channel, [b"ok"], [s.fileno() for s in made])
        for sock in made:
            sock.close()
