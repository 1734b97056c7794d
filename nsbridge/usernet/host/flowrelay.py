"""The native UDP and ping path: a second tun device served by a C thread
(``_flowrelay``).

Why: these were the user-mode networking figures where the Python engine lost to
slirp4netns (the numbers are in docs/history.md).  Ping: each echo wakes the process
from idle with cold caches, and the interpreter's share of that wake-up is the
difference.  UDP: the engine's per-packet Python is the limit, below slirp4netns's
loss-free rate.  A thread in C that never takes the GIL for a known flow removes both.

Shape:

* **Inside the namespace** (:func:`setup_inside`, run through
  ``SandboxHandle.make_fds``): a second tun device, ``nsb-relay``, and policy-routing
  rules (``ipproto icmp`` and ``ipproto udp`` to a table that routes everything to it;
  ``ipproto udp dport 53`` to ``main`` first).  ICMP and UDP of both IP versions go there;
  DNS and TCP stay on the main device.
* **On the host side** (:class:`NativeRelay`): the C thread reads that device.  A
  packet of a known flow is sent on the flow's host socket (a ping socket, or a
  connected UDP socket) and replies are written back without Python.  The first packet
  of a flow is decided on the engine's loop thread (so the policy, the source check,
  the gateway's answer and the socket are exactly the engine's, and a policy object is
  only ever called from one thread) while the relay thread waits for the answer.  An
  error the host reports for a flow goes the same way, to be answered with the ICMP
  unreachable the engine would send.

``nsbridge run --relay=engine`` keeps everything in the engine; ``auto`` (the default)
uses this path when the module was built and the host permits ping sockets.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import threading
import weakref
from typing import Any

from nsbridge.errors import errno_name
from nsbridge.relay.loop import EventLoop
from nsbridge.usernet.host.engine import TunEngine, TunOutput
from nsbridge.usernet.inside import netconf
from nsbridge.usernet.proto.packets import PROTO_UDP, UDP, ICMPEcho, Parsed, parse_frame

log = logging.getLogger("nsbridge")

try:
    from nsbridge.usernet.host import _flowrelay
except ImportError:  # built without a C compiler: the engine serves UDP and ping
    _flowrelay = None  # type: ignore[assignment]

# How long the relay thread waits for the loop thread to decide a new flow.  The loop
# answers in microseconds unless it is stopping, which also wakes the wait.
_DECIDE_TIMEOUT = 5.0

_live: weakref.WeakSet[NativeRelay] = weakref.WeakSet()

# Where a quoted request's destination address and protocol are (RFC 791, RFC 8200): the
# quote may be cut short of its own length, so it is read in place, not parsed.
_IPV4_DST, _IPV4_PROTOCOL = slice(16, 20), 9
_IPV6_DST, _IPV6_NEXT_HEADER = slice(24, 40), 6


def unavailable() -> str | None:
    """Why the native path cannot run here (None if it can): it was not built."""
    if _flowrelay is None:
        return ("nsbridge was installed without its native module "
                "(reinstall with a C compiler and the Python headers present)")
    return None


def ping_sockets_refused() -> str | None:
    """Why this user may not open ping sockets here (None if it may).  Without them the
    relay leaves ping to the engine, which falls back to raw sockets (root) or refuses."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    except OSError as exc:
        return (f"ping sockets are not permitted here ({errno_name(exc.errno)}; see "
                "sysctl net.ipv4.ping_group_range)")
    return None


def setup_inside(config: netconf.NetConfig, icmp: bool = True, ipv6: bool = True) -> list[int]:
    """Inside the namespace: create the relay's device and route UDP (but DNS) and, with
    ``icmp``, ICMP echo to it, over IPv6 too with ``ipv6``.  Returns [its fd] (for
    ``make_fds``)."""
    tun = netconf.open_tun(config, ifname=netconf.RELAY_IFNAME, vnet=False)
    try:
        netconf.configure_relay_device(config, tun.ifname, icmp, ipv6)
    except BaseException:
        os.close(tun.fd)
        raise
    return [tun.fd]


class _Pending:
    """One new-flow question from the relay thread to the loop thread."""

    __slots__ = ("abandoned", "done", "fd")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.fd = -1
        self.abandoned = False


class NativeRelay:
    """The host side of the native UDP and ping path for one namespace (module doc).

    Owns ``tun_fd`` from construction on.  Life cycle: construct, :meth:`start`,
    :meth:`close` (from the loop thread or after the loop ended; idempotent).
    """

    def __init__(self, loop: EventLoop, engine: TunEngine, tun_fd: int) -> None:
        if _flowrelay is None:
            os.close(tun_fd)
            raise RuntimeError(unavailable())
        self._loop = loop
        self._engine = engine
        self._fd = tun_fd
        self._lock = threading.Lock()
        self._pending: set[_Pending] = set()
        self._closed = False
        self._out = TunOutput(self._write, False)
        try:
            os.set_blocking(tun_fd, False)
            # One table for both protocols, as large as the engine's two together.
            self._relay = _flowrelay.Relay(tun_fd, self._new_flow, self._on_error,
                                           engine.idle_timeout, 2 * engine.max_flows)
        except BaseException:
            os.close(tun_fd)
            raise

    def start(self) -> None:
        self._relay.start()
        _live.add(self)

    def close(self) -> None:
        """Stop the thread (a question it waits on is answered "no"), close every flow's
        socket and the device."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for pending in self._pending:
                pending.done.set()
        self._relay.stop()
        os.close(self._fd)
        _live.discard(self)

    def stats(self) -> dict[str, Any]:
        """The relay's counters (see _flowrelay.c), plain data."""
        return self._relay.stats()

    # ---- called on the relay thread (with the GIL) ------------------------------------

    def _new_flow(self, packet: bytes) -> int:
        """Ask the loop thread to decide this first packet of a flow; the host socket's
        fd (the relay then owns it) or -1."""
        pending = _Pending()
        with self._lock:
            if self._closed:
                return -1
            self._pending.add(pending)
        self._loop.call_soon_threadsafe(lambda: self._decide(packet, pending))
        pending.done.wait(_DECIDE_TIMEOUT)
        with self._lock:
            self._pending.discard(pending)
            pending.abandoned = True  # a late answer closes its own socket
            fd, pending.fd = pending.fd, -1
        if self._closed and fd >= 0:
            os.close(fd)
            return -1
        return fd

    def _on_error(self, quote: bytes, err: int) -> None:
        """A host error about a flow (its latest packet quoted): tell the namespace.  An
        empty quote: the relay's device is gone and its thread has ended."""
        if not quote:
            log.warning("native relay: its device failed (%s); the thread ended, UDP "
                        "and ping fall back to the engine's device", errno_name(err))
            return
        self._loop.call_soon_threadsafe(lambda: self._report(quote, err))

    # ---- on the loop thread ------------------------------------------------------------

    def _decide(self, packet: bytes, pending: _Pending) -> None:
        fd = -1
        try:
            parsed = parse_frame(packet, vnet=False)
            engine, out = self._engine, self._out
            # The relay checked the packet: parsing cannot fail, and it is UDP or echo.
            if type(parsed) is Parsed and type(parsed.l4) is UDP:
                # The guest answering a published port's client: that flow's socket, no
                # new flow (udpflows.py, inbound flows).
                udp = parsed.l4
                fd = engine.udp_flows.hand_over((parsed.ip.src, udp.sport, parsed.ip.dst,
                                                 udp.dport))
                if fd < 0:
                    allow = engine.admit_udp(parsed, udp, out)
                    if allow is not None:
                        fd = engine.open_udp_socket(parsed, allow, out)
            elif type(parsed) is Parsed and type(parsed.l4) is ICMPEcho:
                allow = engine.admit_echo(parsed, out)
                if allow is not None:
                    fd = engine.open_ping_socket(parsed, allow, out)
        except Exception:
            self._engine.stats.errors += 1
            log.exception("native relay: deciding a new flow failed")
        with self._lock:
            if pending.abandoned or self._closed:
                if fd >= 0:
                    os.close(fd)
                return
            pending.fd = fd
            pending.done.set()

    def _report(self, quote: bytes, err: int) -> None:
        """Answer as the flow's destination (the quoted packet's), IPv4 or IPv6."""
        if self._closed:
            return
        if quote[0] >> 4 == 6:
            dst, proto = quote[_IPV6_DST], quote[_IPV6_NEXT_HEADER]
        else:
            dst, proto = quote[_IPV4_DST], quote[_IPV4_PROTOCOL]
        if not self._engine.answer_host_error(err, quote, dst, self._out):
            kind = "udp" if proto == PROTO_UDP else "icmp"
            self._engine.stats.drops[f"{kind} send {errno_name(err)}"] += 1

    def _write(self, frame: bytes) -> None:
        """Write one frame to the relay's device, as the engine's write does to its own."""
        stats = self._engine.stats
        try:
            written = os.write(self._fd, frame)
        except OSError as exc:
            full = exc.errno == errno.EAGAIN
            stats.drops["tun full" if full else f"tun write {errno_name(exc.errno)}"] += 1
        else:
            stats.frames_out += 1
            stats.bytes_out += written


@atexit.register
def _stop_all() -> None:
    """A relay thread must not call into an interpreter that is shutting down."""
    for relay in list(_live):
        relay.close()
