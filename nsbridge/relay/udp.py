"""The UDP relay: datagrams from many clients on one listening socket, each client relayed
through its own connected socket made in the target's namespace.

How it works, and why:

* **One socket per client (a flow).**  Each distinct client address gets a UDP socket
  from the connect-side :class:`~nsbridge.net.factory.SocketFactory` (so it lives in the
  target's namespace), ``connect()``-ed to the target.  The target therefore sees one
  source port per client, and a reply is routed back simply by *which socket it arrived
  on* -- no address rewriting, and the connected socket ignores datagrams from anyone
  but the target.  Replies go back with ``sendto(client)`` on the listening socket, so
  the client sees them come from the address it sent to.
* **Flows end by going quiet.**  UDP has no close: a flow with no datagram either way
  for ``idle_timeout`` seconds is closed by a periodic sweep (every
  ``min(1 s, idle_timeout / 4)``, only while flows exist).  The :class:`FlowTable` keeps
  flows in order of last activity, so a sweep looks only at the flows that expire: no
  timer per datagram and no scan of the whole table.
* **A full table evicts the least recently used flow.**  A UDP client never says
  goodbye, so a full table is mostly clients that already left; refusing newcomers
  instead would lock every new client out until the idle timeout, and a burst of
  (possibly spoofed) source addresses would be enough to do that.  Active flows are
  touched on every datagram and stay at the recent end, so eviction hits quiet ones.
  Evictions are counted in :attr:`UdpStats.evicted_flows`.
* **Never block, never queue.**  Sockets are registered level-triggered for ``IN``;
  each readiness event reads into one preallocated 64 KiB buffer until ``EAGAIN``, or
  until a budget of ``_BATCH`` datagrams -- stopping early is safe because the fd fires
  again, and the budget keeps one flooded socket from starving the others.  UDP may
  drop, so a datagram that cannot be sent now (full send buffer, too large) is dropped
  and counted rather than buffered.
* **ICMP errors are reported, not fatal.**  A connected UDP socket receives the ICMP
  errors its datagrams caused (``ECONNREFUSED`` when the target port is closed) as a
  pending socket error, returned by the next ``recv`` or ``send``.  They are counted in
  :attr:`UdpStats.icmp_errors` and the flow stays: the target may come back.  When
  ``send`` returns such an error the datagram was not sent -- the error was about an
  earlier one -- so it is sent once more.

Threading: like the rest of the relay, everything here runs on the event loop's thread;
:meth:`UdpRelay.close` must be called from it or after the loop stopped.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from nsbridge.defaults import MAX_UDP_FLOWS, UDP_IDLE_TIMEOUT
from nsbridge.errors import errno_name
from nsbridge.net.addresses import format_sockaddr
from nsbridge.net.factory import SocketFactory
from nsbridge.relay.log import log
from nsbridge.relay.loop import IN, EventLoop, Timer

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Address = tuple[Any, ...]

_BUFFER_SIZE = 1 << 16  # above the largest UDP payload (65507 IPv4, 65527 IPv6)
_BATCH = 256  # datagrams per readiness event, for fairness between sockets
_MAX_SWEEP_INTERVAL = 1.0

# Errors a connected UDP socket reports because of an ICMP message about an earlier
# datagram (see ip_icmp_error / icmp_err_convert in the kernel).
_ICMP_ERRNOS = frozenset({
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.ENOPROTOOPT,
    errno.EPROTO,
    errno.EACCES,
})

CLOSED_IDLE = "idle"
CLOSED_EVICTED = "evicted"
CLOSED_RELAY = "relay closed"


class Target(Protocol):
    """Where flows connect: :class:`~nsbridge.net.addresses.ResolvedAddress` fits."""

    @property
    def family(self) -> int: ...

    @property
    def sockaddr(self) -> tuple | str | bytes: ...


# ---- statistics -------------------------------------------------------------------------


@dataclass
class UdpStats:
    """Counters of one UDP forward.  The relay only adds to them, so several relays (one
    per worker) may share one object.  "up" is client -> target, "down" the replies."""

    active_flows: int = 0
    total_flows: int = 0
    expired_flows: int = 0  # closed after idle_timeout without a datagram
    evicted_flows: int = 0  # closed to make room: the cost of the max_flows cap
    datagrams_up: int = 0
    bytes_up: int = 0
    datagrams_down: int = 0
    bytes_down: int = 0
    dropped_too_large: int = 0  # EMSGSIZE on send (e.g. 65527 B from IPv6 to IPv4)
    dropped_send_error: int = 0  # send buffer full (EAGAIN) or another send failure
    dropped_no_flow: int = 0  # no socket could be made or connected for a new client
    icmp_errors: int = 0  # ICMP errors reported on flow sockets (target port closed, ...)
    errors: int = 0  # unexpected errors receiving on the listening socket

    @property
    def dropped(self) -> int:
        """Datagrams received and not delivered, all reasons together."""
        return self.dropped_too_large + self.dropped_send_error + self.dropped_no_flow


# ---- the flow table (no I/O) ------------------------------------------------------------


class _Entry(Generic[V]):
    __slots__ = ("last_active", "value")

    def __init__(self, value: V, now: float) -> None:
        self.value = value
        self.last_active = now


class FlowTable(Generic[K, V]):
    """Client address -> flow, in order of last activity, with a capacity and idle expiry.

    Plain data with the time passed in, so the policy is tested without sockets or
    clocks.  An ``OrderedDict`` makes a touch O(1) (``move_to_end``) and keeps the least
    recently active flow first, so eviction and expiry only ever look at the front.
    That order is also expiry order as long as ``now`` never decreases (a monotonic
    clock).
    """

    __slots__ = ("_entries", "capacity", "idle_timeout")

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently active first."""
        return iter(self._entries)

    def values(self) -> list[V]:
        """Flows, least recently active first."""
        return [entry.value for entry in self._entries.values()]

    def last_active(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.last_active

    def get(self, key: K, now: float) -> V | None:
        """The flow of ``key``, marked active at ``now``; None if there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_active = now
        self._entries.move_to_end(key)
        return entry.value

    def touch(self, key: K, now: float) -> None:
        """Mark ``key`` active at ``now`` (a reply counts as activity too)."""
        self.get(key, now)

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Insert a new flow; return the flows evicted to make room, oldest first."""
        if key in self._entries:
            raise KeyError(f"flow {key!r} exists already")
        evicted = []
        while len(self._entries) >= self.capacity:
            old_key, old = self._entries.popitem(last=False)
            evicted.append((old_key, old.value))
        self._entries[key] = _Entry(value, now)
        return evicted

    def remove(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry.value

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return the flows idle for ``idle_timeout`` or longer at ``now``."""
        deadline = now - self.idle_timeout
        entries = self._entries
        expired = []
        while entries:
            key = next(iter(entries))
            entry = entries[key]
            if entry.last_active > deadline:
                break
            del entries[key]
            expired.append((key, entry.value))
        return expired

    def clear(self) -> list[tuple[K, V]]:
        """Remove and return every flow."""
        items = [(key, entry.value) for key, entry in self._entries.items()]
        self._entries.clear()
        return items


class IdleSweep:
    """The timer that expires idle flows, running only while there are flows.

    A new flow arms it (:meth:`arm`); every ``interval`` — a quarter of the idle timeout, at
    most a second, so a flow outlives its timeout by at most that much — it calls
    ``sweep()``, and arms itself again while ``sweep`` says flows remain.  An idle relay
    then has no timer at all.  Shared by the UDP relay and the tun engine's flows.
    """

    __slots__ = ("_loop", "_stopped", "_sweep", "_timer", "interval")

    def __init__(self, loop: EventLoop, idle_timeout: float, sweep: Callable[[], bool]) -> None:
        self._loop = loop
        self._sweep = sweep
        self.interval = min(_MAX_SWEEP_INTERVAL, idle_timeout / 4)
        self._timer: Timer | None = None
        self._stopped = False

    def arm(self) -> None:
        """Start sweeping if not already (call when a flow is added)."""
        if self._timer is None and not self._stopped:
            self._timer = self._loop.call_later(self.interval, self._fire)

    def stop(self) -> None:
        """No sweep any more (idempotent)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._sweep():
            self.arm()


# ---- flows ----------------------------------------------------------------------------


class UdpFlow:
    """One client's flow: its address and its connected socket in the target's namespace."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "datagrams_down",
        "datagrams_up",
        "fd",
        "outcome",
        "sock",
        "started",
        "target_name",
    )

    def __init__(self, client: Address, sock: socket.socket, target_name: str) -> None:
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.target_name = target_name
        self.started = time.monotonic()
        self.datagrams_up = 0
        self.bytes_up = 0
        self.datagrams_down = 0
        self.bytes_down = 0
        self.outcome = ""

    def describe(self) -> str:
        """One log line, in the TCP relay's format: who, where, traffic, duration, ending."""
        duration = time.monotonic() - self.started
        return (
            f"udp {format_sockaddr(self.client)} -> {self.target_name}: "
            f"{self.datagrams_up} datagrams {self.bytes_up} B up, "
            f"{self.datagrams_down} datagrams {self.bytes_down} B down, "
            f"{duration:.3f}s, {self.outcome}"
        )


# ---- the relay --------------------------------------------------------------------------


class UdpRelay:
    """Relays datagrams between clients of ``listener`` and ``target``, one flow per client.

    ``listener`` is a bound UDP socket (any namespace, IPv4 or IPv6); the relay owns it
    from now on and :meth:`close` closes it.  Flow sockets are made by ``factory`` with
    the target's family, so an IPv6 listener can serve an IPv4 target.  ``stats`` may be
    shared (it is only added to); ``on_flow_closed(flow)`` is called after a flow's
    socket is closed, with ``flow.outcome`` set -- e.g. to log ``flow.describe()``.
    ``admit(client)`` (optional) decides whether a new client may open a flow.
    """

    def __init__(
        self,
        loop: EventLoop,
        listener: socket.socket,
        target: Target,
        factory: SocketFactory,
        *,
        idle_timeout: float = UDP_IDLE_TIMEOUT,
        max_flows: int = MAX_UDP_FLOWS,
        stats: UdpStats | None = None,
        on_flow_closed: Callable[[UdpFlow], None] | None = None,
        admit: Callable[[Address], bool] | None = None,
    ) -> None:
        self._loop = loop
        self.listener = listener
        self.target = target
        self._factory = factory
        self._table: FlowTable[Address, UdpFlow] = FlowTable(max_flows, idle_timeout)
        self.stats = stats if stats is not None else UdpStats()
        self._on_flow_closed = on_flow_closed
        self._admit = admit  # the forward's client ACL, asked once per new client
        self._idle_sweep = IdleSweep(loop, idle_timeout, self._sweep)
        self.sweep_interval = self._idle_sweep.interval
        self._target_name = format_sockaddr(target.sockaddr)
        self._listen_fd = listener.fileno()
        self._buf = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._started = False
        self._closed = False

    @property
    def flows(self) -> list[UdpFlow]:
        """The active flows, least recently active first."""
        return self._table.values()

    @property
    def idle_timeout(self) -> float:
        return self._table.idle_timeout

    @property
    def max_flows(self) -> int:
        return self._table.capacity

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start receiving on the listener (call once, from the loop's thread or before run)."""
        if self._started or self._closed:
            raise RuntimeError("UdpRelay.start() called twice or after close()")
        self._started = True
        self.listener.setblocking(False)
        self._loop.add(self._listen_fd, IN, self._on_listener)

    def close(self) -> None:
        """Close every flow socket and the listener and unregister them all (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._idle_sweep.stop()
        for _client, flow in self._table.clear():
            self._close_flow(flow, CLOSED_RELAY)
        if self.listener.fileno() >= 0:  # else someone closed it; its fd may be reused
            self._loop.remove(self._listen_fd)
            self.listener.close()

    # ---- client -> target ---------------------------------------------------------------

    def _on_listener(self, _events: int) -> None:
        recvfrom_into = self.listener.recvfrom_into
        buf, view, stats = self._buf, self._view, self.stats
        now = time.monotonic()
        for _ in range(_BATCH):
            try:
                # MSG_TRUNC: the real length, so an oversized datagram is seen, not cut.
                n, client = recvfrom_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                stats.errors += 1
                log.debug("udp recv on %s failed: %s", self._listen_fd, errno_name(exc.errno))
                continue
            if n > _BUFFER_SIZE:
                stats.dropped_too_large += 1
                continue
            flow = self._table.get(client, now)
            if flow is None:
                if self._admit is not None and not self._admit(client):
                    continue  # denied by policy (counted by the caller's admit)
                flow = self._open_flow(client, now)
                if flow is None:
                    continue
            self._send_up(flow, view[:n])

    def _open_flow(self, client: Address, now: float) -> UdpFlow | None:
        """A new flow for ``client``, evicting the least recently used one if full."""
        sock = self._connected_socket()
        if sock is None:
            self.stats.dropped_no_flow += 1
            return None
        flow = UdpFlow(client, sock, self._target_name)
        for _old_client, old in self._table.add(client, flow, now):
            self.stats.evicted_flows += 1
            self._close_flow(old, CLOSED_EVICTED)
        self._loop.add(flow.fd, IN, partial(self._on_flow, flow))
        self.stats.active_flows += 1
        self.stats.total_flows += 1
        self._idle_sweep.arm()
        return flow

    def _connected_socket(self) -> socket.socket | None:
        """A UDP socket in the target's namespace, connected to the target; None on error."""
        try:
            sock = self._factory.socket(self.target.family, socket.SOCK_DGRAM)
        except OSError as exc:
            log.debug("udp: cannot create a socket for %s: %s", self._target_name,
                      errno_name(exc.errno))
            return None
        try:
            sock.setblocking(False)
            sock.connect(self.target.sockaddr)  # UDP: no handshake, never blocks
        except OSError as exc:
            log.debug("udp: cannot connect to %s: %s", self._target_name, errno_name(exc.errno))
            sock.close()
            return None
        return sock

    def _send_up(self, flow: UdpFlow, data: memoryview) -> None:
        for attempt in range(2):
            try:
                flow.sock.send(data)
            except OSError as exc:
                if attempt == 0 and exc.errno in _ICMP_ERRNOS:
                    # A pending ICMP error about an earlier datagram; this one was not
                    # sent, so try once more now that the error is consumed.
                    self.stats.icmp_errors += 1
                    continue
                self._count_drop(exc)
                return
            n = len(data)
            flow.datagrams_up += 1
            flow.bytes_up += n
            self.stats.datagrams_up += 1
            self.stats.bytes_up += n
            return

    # ---- target -> client ---------------------------------------------------------------

    def _on_flow(self, flow: UdpFlow, _events: int) -> None:
        recv_into = flow.sock.recv_into
        buf, view, stats = self._buf, self._view, self.stats
        received = False
        for _ in range(_BATCH):
            try:
                n = recv_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                # EPOLLERR with a pending ICMP error; reading it cleared it.
                stats.icmp_errors += 1
                log.debug("udp %s: %s", self._target_name, errno_name(exc.errno))
                continue
            if n > _BUFFER_SIZE:
                stats.dropped_too_large += 1
                continue
            received = True
            self._send_down(flow, view[:n])
        if received:
            self._table.touch(flow.client, time.monotonic())

    def _send_down(self, flow: UdpFlow, data: memoryview) -> None:
        try:
            self.listener.sendto(data, flow.client)
        except OSError as exc:
            self._count_drop(exc)
            return
        n = len(data)
        flow.datagrams_down += 1
        flow.bytes_down += n
        self.stats.datagrams_down += 1
        self.stats.bytes_down += n

    def _count_drop(self, exc: OSError) -> None:
        if exc.errno == errno.EMSGSIZE:
            self.stats.dropped_too_large += 1
        else:
            self.stats.dropped_send_error += 1

    # ---- ending flows ---------------------------------------------------------------

    def _sweep(self) -> bool:
        """Close the flows idle for too long; whether any remain (the sweep goes on)."""
        for _client, flow in self._table.expire(time.monotonic()):
            self.stats.expired_flows += 1
            self._close_flow(flow, CLOSED_IDLE)
        return bool(len(self._table))

    def _close_flow(self, flow: UdpFlow, outcome: str) -> None:
        """Unregister and close a flow already removed from the table."""
        self._loop.remove(flow.fd)
        flow.sock.close()
        flow.outcome = outcome
        self.stats.active_flows -= 1
        if self._on_flow_closed is not None:
            self._on_flow_closed(flow)
