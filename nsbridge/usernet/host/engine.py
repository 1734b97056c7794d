"""The tun engine: the host side of a user-mode namespace's catch-all default route.

The namespace's default route is a tun device (see
:mod:`~nsbridge.usernet.inside.sandbox`); :class:`TunEngine` owns its fd on an
:class:`~nsbridge.relay.loop.EventLoop`, reads every IP packet the namespace sends, and
hands each to the module for its kind; they answer with sockets made in *this* process's
network namespace (plain ``socket.socket``: the engine runs on the host side, so every
socket it makes is a host socket).  The protocol work is done by the sans-IO modules of
:mod:`nsbridge.usernet.proto` — :mod:`~nsbridge.usernet.proto.packets` parses and builds
frames, :mod:`~nsbridge.usernet.proto.policy` decides each new flow,
:mod:`~nsbridge.usernet.proto.dns` checks queries — and the engine's modules only do the
I/O between them.

Run it as root, or as a user who may open ``/dev/net/tun`` (mode 0600 on some machines,
0666 on most): the sandbox that creates the tun device maps the caller to root inside
its user namespace, and the engine only reads and writes the fd it is given.

Where each packet goes, and why:

* **UDP** — :mod:`.udpflows`: one connected host socket per flow, idle expiry and LRU
  eviction, host ICMP errors passed back as ICMP unreachable.
* **DNS** (UDP to ``10.0.2.3``/``fd00::3`` port 53) — :mod:`.dnsproxy`: standard
  queries relayed to the host's resolvers with retries, the rest refused here.
* **ICMP echo** — :mod:`.icmpecho`: ping (or raw) sockets, and an IPv4 fast path that
  starts right here in the tun reader, before any parsing.
* A new flow's first packet (UDP or echo) is decided by :mod:`.flowdecide`: the
  anti-spoofing check, the policy, echo to the gateway answered by the engine itself,
  the host socket.  The native relay (:mod:`.flowrelay`) decides through the same code,
  reaching it through this engine (``admit_udp`` and its siblings).
* Denied flows and host errors are answered as ICMP by :mod:`.replies`.
* **TCP** reaches the tun only without the redirect fast path; then ``tcp_handler``
  (:class:`~nsbridge.usernet.host.tuntcp.TunTcp`) terminates it.  A segment nobody takes is
  answered here with a reset (:func:`~nsbridge.usernet.proto.packetbuild.build_tcp_rst`): the
  namespace's ``connect()`` fails at once instead of retrying SYNs for minutes.
* Everything else (neighbour discovery, MLD, other protocols, broken frames) is
  dropped and counted by reason; hostile input never raises (:func:`parse_frame`), and
  an unexpected exception while handling one frame is counted in ``stats.errors`` and
  logged instead of stopping the engine.

Every module counts into the engine's one :class:`~.enginestats.EngineStats`.

I/O shape: everything is level-triggered and never blocks.  Each tun event reads up to
``BATCH`` frames (until ``EAGAIN``) into one preallocated buffer; each flow socket event
reads up to ``BATCH`` datagrams.  Stopping early is safe (the fd fires again) and keeps
one busy source from starving the rest.  Frames the tun will not take right now are
dropped and counted: IP may drop, and queueing would only add latency and memory.  The
per-frame handlers of the flow modules are bound once, at construction, so dispatching
a frame costs one call, as it did when they were the engine's own methods.

Threading: every method runs on the loop's thread (or before ``loop.run()``); the engine
never closes the tun fd, which belongs to whoever opened it (the
:class:`~nsbridge.usernet.inside.sandbox.SandboxHandle`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence

from nsbridge import defaults
from nsbridge.errors import errno_name
from nsbridge.relay.loop import IN, EventLoop
from nsbridge.relay.udp import FlowTable, IdleSweep
from nsbridge.usernet.host.dnsproxy import DnsProxy, Resolver
from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.host.flowdecide import FlowDecisions
from nsbridge.usernet.host.icmpecho import (
    PING_SYSCTL,
    EchoFlows,
    ping_group_range,
    ping_unavailable,
)
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.replies import BATCH, Replies, TunOutput
from nsbridge.usernet.host.udpflows import UdpFlows
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.packetbuild import build_tcp_rst
from nsbridge.usernet.proto.packets import (
    TCP,
    UDP,
    VNET_HDR_LEN,
    ICMPEcho,
    ICMPError,
    Malformed,
    Parsed,
    parse_frame,
)
from nsbridge.usernet.proto.policy import Policy

# Importable from here as they always were (the runner, doctor and native relay do).
__all__ = ["PING_SYSCTL", "EngineStats", "Resolver", "TunEngine", "TunOutput",
           "ping_group_range", "ping_unavailable"]

log = logging.getLogger("nsbridge")

_READ_SIZE = 1 << 17  # a TSO/USO frame is at most 64 KiB of IP plus the virtio header


class TunEngine:
    """Serves a namespace's tun device from this process's network namespace.

    ``tun_fd`` is the tun device (its frames start with a ``vnet_hdr_size``-byte virtio
    header: 10, or 0 for a tun without ``IFF_VNET_HDR``); it is made non-blocking and is
    never closed here.  ``resolvers`` are the host's DNS servers as ``(ip, port)``, tried
    in order.  ``offloads`` are the tun's accepted offloads (``handle.offloads``): with
    ``csum`` large UDP replies leave their checksum to the kernel.  ``tcp_handler``, when
    given, sees every parsed TCP frame first and returns True if it took it.
    ``outbound``: the source addresses the DNS, UDP and echo sockets are bound to.

    The parts, each one concern: ``replies`` (ICMP answers), ``dns`` (the DNS proxy),
    ``decide`` (flow decisions, shared with the native relay), and the UDP and echo
    flows.
    """

    def __init__(
        self,
        loop: EventLoop,
        tun_fd: int,
        vnet_hdr_size: int,
        policy: Policy,
        addresses: UsernetAddresses,
        resolvers: Iterable[Resolver],
        idle_timeout: float = defaults.UDP_IDLE_TIMEOUT,
        max_flows: int = defaults.MAX_UDP_FLOWS,
        *,
        offloads: Iterable[str] = (),
        dns_timeout: float = 2.0,
        max_dns_pending: int = 256,
        tcp_handler: Callable[[Parsed], bool] | None = None,
        outbound: OutboundAddresses = NONE,
    ) -> None:
        if vnet_hdr_size not in (0, VNET_HDR_LEN):
            raise ValueError(f"vnet_hdr_size must be 0 or {VNET_HDR_LEN}, not {vnet_hdr_size}")
        self._loop = loop
        self._tun = tun_fd
        self._vnet = vnet = vnet_hdr_size == VNET_HDR_LEN
        offload = vnet and "csum" in tuple(offloads)
        self.policy = policy
        self.addresses = addresses
        self.tcp_handler = tcp_handler
        self.stats = stats = EngineStats(denied=policy.denied)
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self.replies = Replies(TunOutput(self.write, vnet), stats, addresses)
        self.dns = DnsProxy(loop, resolvers, stats, self.write, vnet=vnet, offload=offload,
                            timeout=dns_timeout, max_pending=max_dns_pending,
                            outbound=outbound)
        self.decide = FlowDecisions(policy, addresses, stats, self.replies, self.dns.query,
                                    outbound)
        self._idle_sweep = IdleSweep(loop, idle_timeout, self._sweep)
        self.sweep_interval = self._idle_sweep.interval
        self._udp = UdpFlows(loop, FlowTable(max_flows, idle_timeout), self.decide,
                             self.replies, stats, self.write, vnet=vnet, offload=offload,
                             on_new_flow=self._idle_sweep.arm)
        self._echo = EchoFlows(loop, FlowTable(max_flows, idle_timeout), self.decide,
                               self.replies, stats, self.write, self.write_parts, vnet=vnet,
                               read_buffer=self._rbuf, on_new_flow=self._idle_sweep.arm)
        # Per-frame handlers, bound once: dispatch stays one call per frame.
        self._on_udp = self._udp.handle
        self._on_echo = self._echo.handle
        # The native relay's entry points, and TunTcp's source check: the flow decisions
        # and replies under the names they have always had, so both paths decide alike.
        self.new_flow_source_ok = self.decide.source_ok
        self.admit_udp = self.decide.admit_udp
        self.admit_echo = self.decide.admit_echo
        self.open_udp_socket = self.decide.open_udp_socket
        self.open_ping_socket = self.decide.open_ping_socket
        self.answer_host_error = self.replies.answer_host_error
        self.udp_flows = self._udp  # published UDP ports' inbound flows (host/inbound.py)
        self._started = False
        self._closed = False

    @property
    def idle_timeout(self) -> float:
        return self._udp.table.idle_timeout

    @property
    def max_flows(self) -> int:
        return self._udp.table.capacity

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the tun (once; from the loop's thread or before it runs)."""
        if self._started or self._closed:
            raise RuntimeError("TunEngine.start() called twice or after close()")
        self._started = True
        os.set_blocking(self._tun, False)
        self._loop.add(self._tun, IN, self._on_tun)

    def close(self) -> None:
        """Stop reading the tun and close every host socket (idempotent; tun stays open)."""
        if self._closed:
            return
        self._closed = True
        self._idle_sweep.stop()
        if self._started:
            self._loop.remove(self._tun)
        self._udp.close()
        self._echo.close()
        self.dns.close()

    # ---- reading the tun ----------------------------------------------------------------

    def _on_tun(self, _events: int) -> None:
        fd, buf, view = self._tun, [self._rbuf], self._rview
        echo4, fast_echo4 = self._echo.fast4, self._echo.fast_request4
        for _ in range(BATCH):
            try:
                n = os.readv(fd, buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EBADFD/EIO: the device is gone (namespace ended).  Level-triggered, so
                # staying registered would spin; the owner notices CMD's exit.
                log.warning("tun read failed: %s; no longer reading it (the tun device is "
                            "gone: UDP, DNS, ICMP and tun-path TCP stop; the redirect fast "
                            "path is unaffected)", errno_name(exc.errno))
                self.stats.errors += 1
                self._loop.remove(fd)
                return
            if n == 0:
                return
            if echo4 and fast_echo4(n):
                continue
            self.handle_frame(bytes(view[:n]))

    def handle_frame(self, frame: bytes) -> None:
        """Handle one frame as read from the tun (public so tests can feed crafted ones)."""
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(frame)
        parsed = parse_frame(frame, vnet=self._vnet)
        if type(parsed) is not Parsed:
            if isinstance(parsed, Malformed):
                stats.malformed[parsed.reason] += 1
            else:
                stats.unsupported[parsed.reason] += 1
            return
        try:
            l4 = parsed.l4
            if type(l4) is UDP:
                self._on_udp(parsed, l4)
            elif type(l4) is ICMPEcho:
                self._on_echo(parsed, l4)
            elif type(l4) is TCP:
                self._on_tcp(parsed)
            elif type(l4) is ICMPError:
                stats.icmp_errors_in += 1
        except Exception:
            stats.errors += 1
            log.exception("tun engine: unexpected error handling a frame")

    def _on_tcp(self, parsed: Parsed) -> None:
        if self.tcp_handler is not None and self.tcp_handler(parsed):
            return
        reset = build_tcp_rst(parsed, vnet=self._vnet)
        if reset is None:
            return  # never answer a reset
        self.write(reset)
        self.stats.tcp_resets += 1

    # ---- writing the tun ----------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        """Write one frame to the tun (dropped and counted if it will not take it now)."""
        self.write_parts((frame,))

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one frame given in parts (a header and a payload view), without joining."""
        try:
            written = os.writev(self._tun, parts)
        except BlockingIOError:
            self.stats.drops["tun full"] += 1
        except OSError as exc:
            self.stats.drops[f"tun write {errno_name(exc.errno)}"] += 1
        else:
            self.stats.frames_out += 1
            self.stats.bytes_out += written

    # ---- expiry ---------------------------------------------------------------------------

    def _sweep(self) -> bool:
        """Expire idle UDP and echo flows; whether any remain (the sweep goes on)."""
        now = time.monotonic()
        self._udp.expire(now)
        self._echo.expire(now)
        return bool(len(self._udp) or len(self._echo))
