"""``nsbridge seccomp-agent``: socket switching for containers started by runc or crun.

The OCI runtime spec lets a container's seccomp profile name a Unix socket
(``linux.seccomp.listenerPath``) and give calls the action ``SCMP_ACT_NOTIFY``.  The
runtime then connects to that socket, sends the container's process state as JSON
with the seccomp listener fd attached (``SCM_RIGHTS``) and closes.  This module listens
there and serves each container's listener with its own
:class:`~nsbridge.usernet.host.switcher.SocketSwitcher` on one event loop, with the
agent's policy deciding every switched connect, exactly as ``run --bypass`` does.

Per connection, in order, each failure a logged line and a count, never a crash:

1. The peer's credentials (``SO_PEERCRED``): only the agent's own user (and users named
   with ``--allow-user``) may hand containers in.  Whoever hands one in gets host
   sockets made by the agent, with the agent's view of the network.
2. The message read until EOF or until it is one whole JSON document, at most
   :data:`~nsbridge.usernet.proto.ocistate.MAX_STATE` bytes and
   :data:`~nsbridge.usernet.proto.ocistate.MAX_FDS` fds, within :data:`RECEIVE_TIMEOUT`
   seconds of its first byte (a peer that starts and never finishes is dropped; one
   that has sent nothing yet is waited for: crun connects at ``create`` and sends at
   ``start``), then parsed (:mod:`nsbridge.usernet.proto.ocistate`).  At most
   :data:`MAX_PENDING` are read at once; the rest wait in the listen backlog.
3. The fd named ``seccompFd`` must really be a seccomp listener (the kernel's name for
   the file, ``anon_inode:seccomp notify``): anything else is closed, with every other
   fd received.
4. The container's own addresses, kept live from netlink in its network namespace
   from its first trapped call on (:class:`ContainerAddresses`): connects to them stay
   in the container.  While that namespace cannot be reached (not yet exec'd, the pid
   gone or not the user's), loopback and the ``--cidr`` layout's address stay.

A container ends when its listener hangs up (every process under its filter exited):
its switcher, namespace watch and fds are freed, the agent keeps running.  At most
:data:`MAX_CONTAINERS` are served at once (more are refused and counted).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from nsbridge.linux import nssocket
from nsbridge.relay.loop import IN, EventLoop, Timer
from nsbridge.usernet.host.hostaddrs import HostAddresses
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.switcher import SocketSwitcher
from nsbridge.usernet.proto.exclude import NO_EXCLUDE, ExcludeRules
from nsbridge.usernet.proto.ocistate import (
    MAX_FDS,
    MAX_STATE,
    ContainerState,
    StateError,
    parse_state,
)
from nsbridge.usernet.proto.policy import Policy

log = logging.getLogger("nsbridge")

RECEIVE_TIMEOUT = 5.0  # seconds from a message's first byte to its end
MAX_PENDING = 64  # connections being read at once; more wait in the listen backlog
MAX_CONTAINERS = 1024
SECCOMP_FILE = "anon_inode:seccomp notify"  # readlink of a listener fd
_UCRED = struct.Struct("=iII")  # pid, uid, gid


@dataclass
class AgentStats:
    """What the agent did; ``refused`` by reason (a runtime's message not served)."""

    connections: int = 0
    containers: int = 0  # served since start
    active: int = 0  # served now
    ended: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class _Incoming:
    """A runtime's connection being read: its bytes and the fds that came with them;
    ``timer`` runs from the first byte on."""

    __slots__ = ("conn", "data", "fds", "peer", "timer")

    def __init__(self, conn: socket.socket, peer: tuple[int, int, int]) -> None:
        self.conn = conn
        self.peer = peer
        self.timer: Timer | None = None
        self.data = bytearray()
        self.fds: list[int] = []

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class _Served:
    """One container being served: its switcher and its namespace's address watch."""

    def __init__(self, state: ContainerState, switcher: SocketSwitcher,
                 addresses: ContainerAddresses) -> None:
        self.state = state
        self.switcher = switcher
        self.addresses = addresses

    def close(self) -> None:
        self.switcher.close()
        self.addresses.close()


class ContainerAddresses:
    """A container's own addresses for its switcher (``address in it``): read live from
    its network namespace (a netlink socket made there, :mod:`nsbridge.linux.nssocket`,
    kept current by :class:`~.hostaddrs.HostAddresses`).

    Why not at hand-in: a runtime may hand the listener in before the container's
    process has exec'd, while it is still undumpable (crun keeps it so), and then its
    namespaces cannot be opened.  So the watch is set up on the first question, which
    comes from a trapped call of the running program; if that fails it is tried again
    at most once per :data:`RETRY` seconds, and meanwhile ``fallback`` answers (loopback
    is decided before this is asked).  ``reach`` makes the netlink socket (tests give a
    failing one)."""

    RETRY = 1.0

    def __init__(self, pid: int, label: str, fallback: Container[object],
                 reach: Callable[[int], socket.socket] | None = None) -> None:
        self.pid = pid
        self.label = label
        self.fallback = fallback
        self._reach = reach or _netlink_socket_of
        self._live: HostAddresses | None = None
        self._next_try = 0.0
        self._warned = False

    def __contains__(self, address: object) -> bool:
        if self._live is None and time.monotonic() >= self._next_try:
            self._watch()
        if self._live is not None:
            return address in self._live
        return address in self.fallback

    def live(self) -> HostAddresses | None:
        """The set kept current from the container's namespace, None until it could be
        read (the switcher's decision cache watches it from then on)."""
        return self._live

    def _watch(self) -> None:
        try:
            sock = self._reach(self.pid)
        except OSError as exc:
            self._next_try = time.monotonic() + self.RETRY
            if not self._warned:
                self._warned = True
                log.warning("seccomp-agent: container %r: its namespace's addresses are not "
                            "readable yet (%s); until they are, only loopback and the "
                            "--cidr layout's address stay in it", self.label,
                            exc.strerror or exc)
            return
        try:
            self._live = HostAddresses(sock=sock)
        except OSError as exc:
            sock.close()
            self._next_try = time.monotonic() + self.RETRY
            log.warning("seccomp-agent: container %r: reading its addresses failed: %s",
                        self.label, exc.strerror or exc)

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None


def _netlink_socket_of(pid: int) -> socket.socket:
    return nssocket.socket_in_netns_of(pid, socket.AF_NETLINK, socket.SOCK_RAW,
                                       socket.NETLINK_ROUTE)


class SeccompAgent:
    """Serves runtimes on ``listener`` (a listening Unix stream socket, owned from here
    on) on ``loop``; see the module docstring.  Host sockets are made in the namespace
    of the loop's thread."""

    def __init__(self, loop: EventLoop, listener: socket.socket, policy: Policy, *,
                 outbound: OutboundAddresses = NONE,
                 exclude: ExcludeRules = NO_EXCLUDE,
                 allowed_uids: Container[int] = (),
                 max_containers: int = MAX_CONTAINERS,
                 receive_timeout: float = RECEIVE_TIMEOUT) -> None:
        self.loop = loop
        self.listener = listener
        self.policy = policy
        self.outbound = outbound
        self.exclude = exclude
        self.allowed_uids = allowed_uids
        self.max_containers = max_containers
        self.receive_timeout = receive_timeout
        self.stats = AgentStats()
        self.ended_switching: Counter[str] = Counter()  # switch counters of ended ones
        self._incoming: dict[int, _Incoming] = {}
        self._served: dict[int, _Served] = {}  # by listener fd
        self._uid = os.geteuid()
        self._accepting = True
        listener.setblocking(False)

    def start(self) -> None:
        self.loop.add(self.listener.fileno(), IN, self._on_accept)

    def close(self) -> None:
        """Stop serving: every container's trapped calls then fail with ENOSYS (the
        kernel's answer once no listener is left)."""
        self.loop.remove(self.listener.fileno())
        self.listener.close()
        for incoming in list(self._incoming.values()):
            self.loop.remove(incoming.conn.fileno())
            incoming.close()
        self._incoming.clear()
        for fd in list(self._served):
            self._end(fd, closing=True)

    def snapshot(self) -> dict:
        """Counters: the agent's, and switching summed over every container served."""
        switching: Counter[str] = Counter(self.ended_switching)
        for served in self._served.values():
            switching.update(_flat(served.switcher.snapshot()))
        result = {name: dict(value) if isinstance(value, Counter) else value
                  for name, value in self.stats.__dict__.items()}
        result["switching"] = dict(switching)
        return result

    # ---- accepting and reading -------------------------------------------------------

    def _on_accept(self, _events: int) -> None:
        while True:
            if len(self._incoming) >= MAX_PENDING:
                # Full: stop watching the listener (it would stay readable and spin the
                # loop) until a connection being read is done (_forget).
                self.loop.modify(self.listener.fileno(), 0)
                self._accepting = False
                return
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and the like: the connection waits in the backlog; others
                # (ECONNABORTED) concern that one connection only.
                self._refused("accept failed", f"accept: {exc.strerror}")
                return
            self.stats.connections += 1
            conn.setblocking(False)
            pid, uid, gid = _UCRED.unpack(conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid != self._uid and uid not in self.allowed_uids:
                conn.close()
                self._refused("peer user not allowed", f"a connection from uid {uid} (pid "
                              f"{pid}) refused: only uid {self._uid} and --allow-user may "
                              "hand containers in")
                continue
            self._read(conn, (pid, uid, gid))

    def _read(self, conn: socket.socket, peer: tuple[int, int, int]) -> None:
        """Read ``conn``'s message on the loop: with no deadline until its first byte
        (crun connects at ``create`` and sends at ``start``, which a user may run much
        later), then for at most the receive timeout."""
        fd = conn.fileno()
        self._incoming[fd] = _Incoming(conn, peer)
        self.loop.add(fd, IN, lambda _events: self._on_readable(fd))

    def _forget(self, fd: int) -> _Incoming:
        """Stop reading ``fd`` (the caller closes it); accept again if that was full."""
        incoming = self._incoming.pop(fd)
        self.loop.remove(fd)
        if not self._accepting:
            self._accepting = True
            self.loop.modify(self.listener.fileno(), IN)
        return incoming

    def _timed_out(self, fd: int) -> None:
        if fd not in self._incoming:
            return
        incoming = self._forget(fd)
        pid = incoming.peer[0]
        incoming.close()
        self._refused("timed out", f"pid {pid} sent no complete state within "
                      f"{self.receive_timeout:g} s of its first byte")

    def _on_readable(self, fd: int) -> None:
        incoming = self._incoming[fd]
        space = socket.CMSG_SPACE(MAX_FDS * 4)
        try:
            data, ancillary, flags, _ = incoming.conn.recvmsg(MAX_STATE + 1, space,
                                                             socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(fd, "receive failed", f"receive: {exc.strerror}")
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                incoming.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._drop(fd, "too many fds", f"more than {MAX_FDS} fds sent")
            return
        if len(incoming.fds) > MAX_FDS:
            self._drop(fd, "too many fds", f"more than {MAX_FDS} fds sent")
            return
        incoming.data += data
        if incoming.timer is None and (data or incoming.fds):
            incoming.timer = self.loop.call_later(self.receive_timeout,
                                                  lambda: self._timed_out(fd))
        if len(incoming.data) > MAX_STATE:
            self._drop(fd, "message too long", f"a state longer than {MAX_STATE} bytes")
            return
        if data and not _complete(incoming.data):
            return
        # EOF, or a whole JSON document: runc closes after its one message; crun (1.8)
        # connects early, sends later from the container's process and may never close.
        self._forget(fd)
        if incoming.timer is not None:
            incoming.timer.cancel()
        incoming.conn.close()
        try:
            self._take(incoming)
        except Exception:  # a bug must not end the agent and every container with it
            self.stats.refused["error"] += 1
            log.exception("seccomp-agent: serving pid %d's hand-in failed", incoming.peer[0])
        finally:
            for leftover in incoming.fds:
                os.close(leftover)
            incoming.fds.clear()

    def _drop(self, fd: int, reason: str, message: str) -> None:
        incoming = self._forget(fd)
        incoming.close()
        self._refused(reason, f"pid {incoming.peer[0]}: {message}")

    def _refused(self, reason: str, message: str) -> None:
        self.stats.refused[reason] += 1
        log.warning("seccomp-agent: %s", message)

    # ---- serving a container -----------------------------------------------------------

    def _take(self, incoming: _Incoming) -> None:
        """Parse and check a complete message; serve its listener (taken out of
        ``incoming.fds``, whose rest the caller closes)."""
        sender = incoming.peer[0]
        try:
            state = parse_state(bytes(incoming.data), len(incoming.fds))
        except StateError as exc:
            self._refused("malformed state", f"pid {sender}: {exc}")
            return
        listener = incoming.fds[state.seccomp_index]
        kind = _file_kind(listener)
        if kind != SECCOMP_FILE:
            self._refused("not a seccomp listener", f"pid {sender}: the fd named seccompFd "
                          f"is {kind or 'unknown'}, not a seccomp listener")
            return
        if len(self._served) >= self.max_containers:
            self._refused("too many containers", f"container {state.container_id!r}: "
                          f"{self.max_containers} are served already")
            return
        incoming.fds.remove(listener)
        addresses = ContainerAddresses(state.pid, state.container_id,
                                       _fallback_own(self.policy))
        switcher = SocketSwitcher(self.loop, listener, self.policy, outbound=self.outbound,
                                  exclude=self.exclude, own_addresses=addresses,
                                  on_end=lambda: self._end(listener))
        self._served[listener] = _Served(state, switcher, addresses)
        self.stats.containers += 1
        self.stats.active += 1
        switcher.start()
        log.info("seccomp-agent: serving container %r (pid %d%s)", state.container_id,
                 state.pid, f", metadata {state.metadata!r}" if state.metadata else "")

    def _end(self, listener: int, closing: bool = False) -> None:
        served = self._served.pop(listener, None)
        if served is None:
            return
        counters = _flat(served.switcher.snapshot())
        self.ended_switching.update(counters)
        served.close()
        self.stats.active -= 1
        if not closing:
            self.stats.ended += 1
        if log.isEnabledFor(logging.INFO):
            log.info("seccomp-agent: container %r ended: %s", served.state.container_id,
                     describe(counters))


def _flat(snapshot: dict) -> Counter[str]:
    """A switcher's counters as one flat Counter (``denied:REASON``, ``refused:REASON``)."""
    flat: Counter[str] = Counter()
    for name, value in snapshot.items():
        if isinstance(value, dict):
            for reason, count in value.items():
                flat[f"{name}:{reason}"] += count
        else:
            flat[name] += value
    return flat


def describe(counters: Counter[str] | dict) -> str:
    """One line of switching counters for a log."""
    shown = [f"{name} {count}" for name, count in sorted(counters.items()) if count]
    return ", ".join(shown) or "no trapped calls"


def _complete(data: bytearray) -> bool:
    """Whether ``data`` already holds one whole JSON document (the message is sent in
    one piece; a stream may still deliver it in several reads)."""
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _file_kind(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _fallback_own(policy: Policy) -> set[object]:
    a = policy.addresses
    return {a.namespace, a.namespace6}
