"""The tun engine: the host side of a user-mode namespace's catch-all default route.

The namespace's default route is a tun device (see :mod:`.sandbox`); :class:`TunEngine`
owns its fd on an :class:`~nsbridge.relay.loop.EventLoop`, reads every IP packet the
namespace sends, and answers with sockets made in *this* process's network namespace
(plain ``socket.socket``: the engine runs on the host side, so every socket it makes is
a host socket).  The protocol work is done by the sans-IO modules — :mod:`.packets`
parses and builds frames, :mod:`.policy` decides each new flow, :mod:`.dns` checks
queries — and this module only does the I/O between them.

Run it as root, or as a user who may open ``/dev/net/tun`` (mode 0600 on some machines,
0666 on most): the sandbox that creates the tun device maps the caller to root inside
its user namespace, and the engine only reads and writes the fd it is given.

What it does with each packet, and why:

* **UDP** to ``X:P``: one host UDP socket per flow (namespace source ip/port,
  destination ip/port), made only when :meth:`Policy.decide` allows and ``connect()``-ed
  to what the policy says to dial (``10.0.2.2:P`` becomes ``127.0.0.1:P``).  A reply is
  routed by *which socket it arrived on* and written back from ``X:P`` as the namespace
  addressed it.  Flows end after ``idle_timeout`` seconds without traffic, and the
  least recently used one is evicted when ``max_flows`` exist — the
  :class:`~nsbridge.relay.udp.FlowTable` of the UDP relay, for the same reasons (UDP
  never says goodbye).  ICMP errors the host socket reports (``ECONNREFUSED`` from a
  closed port, unreachable hosts) go back to the namespace as ICMP unreachable, so its
  application sees the same error it would see on a real network.
* **Denied flows** get ICMP "administratively prohibited" from the gateway at once:
  the namespace's socket fails fast with ``EHOSTUNREACH`` (v4) / ``EACCES`` (v6) instead
  of waiting for a timeout, and the reason is counted in ``stats.denied``.
* **DNS** to ``10.0.2.3``/``fd00::3`` port 53: each standard query
  (:func:`dns.check_query`) is sent from a fresh host socket (a kernel-chosen source
  port per query, so one namespace client cannot steer another's answers) to the first
  host resolver no deny rule covers; on a timeout or an error the next one is tried, and
  when none answers the namespace gets SERVFAIL rather than waiting out its own
  timeouts.  Anything but a standard query (UPDATE, NOTIFY, zone transfers...) is
  answered here with NOTIMP, REFUSED or FORMERR and counted in ``dns_refused`` by
  reason; garbage no stub could match an answer to is dropped and counted.
* **ICMP echo**: one host ping socket (``SOCK_DGRAM``/``IPPROTO_ICMP``, no privilege
  needed when ``net.ipv4.ping_group_range`` includes our gid) per (namespace source,
  echo id, destination).  The kernel rewrites the echo id of a ping socket, so replies
  are mapped back to the namespace's own id (the sequence number passes through).
  When ping sockets are not permitted and we may open raw sockets (root), a connected
  raw socket with a random id of our own is used instead; otherwise the request is
  answered with ICMP "administratively prohibited" and counted (``icmp_unavailable``).
* **Echo to the gateway** is answered by the engine itself — the gateway *is* us —
  without any host socket, but only when the policy allows ICMP to the gateway (which
  it does exactly when host loopback is allowed and no deny rule matches).  Otherwise
  it is treated like every other denied flow: ICMP "administratively prohibited", so
  ``ping 10.0.2.2`` says "Packet filtered" at once (iputils' words for it).  Answering it anyway
  would have been harmless, but one rule ("the gateway is the host; the loopback switch
  and the deny rules decide") is easier to reason about than an exception to it.
* **TCP** reaches the tun only without the redirect fast path; then ``tcp_handler``
  (:class:`~nsbridge.usernet.tuntcp.TunTcp`) terminates it.  A segment nobody takes is
  answered with a reset (:func:`packets.build_tcp_rst`): the namespace's ``connect()``
  fails at once instead of retrying SYNs for minutes.
* Everything else (neighbour discovery, MLD, other protocols, broken frames) is
  dropped and counted by reason; hostile input never raises (:func:`parse_frame`), and
  an unexpected exception while handling one frame is counted in ``stats.errors`` and
  logged instead of stopping the engine.

I/O shape: everything is level-triggered and never blocks.  Each tun event reads up to
``_BATCH`` frames (until ``EAGAIN``) into one preallocated buffer; each flow socket event
reads up to ``_BATCH`` datagrams.  Stopping early is safe (the fd fires again) and keeps
one busy source from starving the rest.  Frames the tun will not take right now are
dropped and counted: IP may drop, and queueing would only add latency and memory.

Threading: every method runs on the loop's thread (or before ``loop.run()``); the engine
never closes the tun fd, which belongs to whoever opened it (the
:class:`~nsbridge.usernet.sandbox.SandboxHandle`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, NamedTuple

from ..addresses import format_sockaddr
from ..errors import errno_name
from ..relay.loop import IN, EventLoop, Timer
from ..relay.udp import FlowTable
from . import dns
from .packets import (
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMPV6_ECHO,
    ICMPV6_ECHO_REPLY,
    MIN_MTU_V6,
    TCP,
    UDP,
    VNET_HDR_LEN,
    ICMPEcho,
    ICMPError,
    Malformed,
    Parsed,
    UnreachableKind,
    build_icmp_echo,
    build_icmp_echo_reply,
    build_icmp_unreachable,
    build_tcp_rst,
    build_udp,
    checksum,
    fold,
    may_send_icmp_error,
    ones_sum,
    parse_frame,
    udp_datagrams,
)
from .policy import Allow, AllowResolver, Deny, Policy, UsernetAddresses

log = logging.getLogger("nsbridge")

_BATCH = 256  # frames (or datagrams) per readiness event, for fairness
_READ_SIZE = 1 << 17  # a TSO/USO frame is at most 64 KiB of IP plus the virtio header
_RECV_SIZE = 1 << 16  # above the largest UDP payload
_OFFLOAD_MIN = 512  # payloads above this get their UDP checksum from the kernel
_QUOTE = MIN_MTU_V6  # an ICMP error never quotes more than this; keep no more per flow
_MAX_SWEEP_INTERVAL = 1.0
_ICMP_HEADER = struct.Struct("!BBHHH")
# The fields of an IPv4 echo request that the fast path checks, from the IP header on:
# version/IHL, total length, flags/fragment offset, protocol, source+destination,
# ICMP type, code and id.
_ECHO4_REQUEST = struct.Struct("!BxH2xHxB2x8sBB2xH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_ECHO_REPLY_HEAD = struct.Struct("!BBHH")  # ICMP type, code, checksum, id
_U16 = struct.Struct("!H")

# Socket errors that report an ICMP error about an earlier datagram, and the unreachable
# kind that tells the namespace the same thing.
_ERRNO_KINDS: dict[int, UnreachableKind] = {
    errno.ECONNREFUSED: "port",
    errno.EHOSTUNREACH: "host",
    errno.EHOSTDOWN: "host",
    errno.ENONET: "host",
    errno.ENETUNREACH: "net",
    errno.EACCES: "admin",
    errno.EPERM: "admin",
}

Resolver = tuple[str, int]
FlowKey = tuple[bytes, int, bytes, int]  # namespace src ip, src port, dst ip, dst port
EchoKey = tuple[bytes, int, bytes]  # namespace src ip, echo id, dst ip


# ---- statistics -----------------------------------------------------------------------


@dataclass
class EngineStats:
    """Counters of one engine.  "out" is namespace -> host, "in" the answers.

    ``denied`` is the policy's own counter (the same object as ``policy.denied``), so a
    user reading why something does not connect finds every denial in one place.
    """

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by parse_frame's reason
    unsupported: Counter[str] = field(default_factory=Counter)  # well-formed, not handled
    denied: Counter[str] = field(default_factory=Counter)  # by the policy's reason
    drops: Counter[str] = field(default_factory=Counter)  # accepted, then not delivered
    unreachable_sent: Counter[str] = field(default_factory=Counter)  # ICMP errors, by kind
    udp_flows_active: int = 0
    udp_flows_total: int = 0
    udp_flows_expired: int = 0
    udp_flows_evicted: int = 0
    udp_datagrams_out: int = 0
    udp_datagrams_in: int = 0
    udp_bytes_out: int = 0
    udp_bytes_in: int = 0
    dns_queries: int = 0  # queries to the DNS address, valid or not
    dns_answers: int = 0  # answers relayed from a host resolver
    dns_failures: int = 0  # SERVFAIL sent because no resolver answered
    dns_malformed: int = 0  # dropped by dns.check_query
    dns_refused: Counter[str] = field(default_factory=Counter)  # answered here, by reason
    dns_retries: int = 0  # a resolver failed or timed out and the next one was asked
    icmp_echo_requests: int = 0
    icmp_echo_replies: int = 0  # relayed from the host, or answered for the gateway
    icmp_echo_local: int = 0  # of those, answered by the engine (the gateway)
    icmp_flows_active: int = 0
    icmp_flows_total: int = 0
    icmp_flows_expired: int = 0
    icmp_sockets: Counter[str] = field(default_factory=Counter)  # "ping" / "raw" flows
    icmp_unavailable: int = 0  # neither ping nor raw sockets are permitted
    icmp_errors_in: int = 0  # ICMP errors the namespace sent (ignored)
    tcp_resets: int = 0
    errors: int = 0  # unexpected exceptions while handling a frame (a bug; logged)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (Counters become dicts)."""
        return {
            f.name: dict(value) if isinstance(value := getattr(self, f.name), Counter) else value
            for f in fields(self)
        }


# ---- flows ------------------------------------------------------------------------------


class _UdpFlow:
    """One namespace UDP flow and its connected host socket."""

    __slots__ = ("dport", "fd", "ns_dst", "ns_src", "quote", "sock", "sport")

    def __init__(self, key: FlowKey, sock: socket.socket) -> None:
        self.ns_src, self.sport, self.ns_dst, self.dport = key
        self.sock = sock
        self.fd = sock.fileno()
        self.quote = b""  # the start of the latest datagram, to quote in ICMP errors


class TunOutput(NamedTuple):
    """Where an answer the engine builds goes: a frame writer and whether that device's
    frames start with a virtio-net header (the main tun's do; the native relay's not)."""

    write: Callable[[bytes], None]
    vnet: bool


class _EchoFlow:
    """One namespace echo "session" and its host ping (or raw) socket."""

    __slots__ = ("fd", "host_ident", "ident", "ip_sum", "kind", "ns_dst", "ns_src", "on_reply",
                 "quote", "sock")

    def __init__(self, key: EchoKey, sock: socket.socket, kind: str, host_ident: int) -> None:
        self.ns_src, self.ident, self.ns_dst = key
        self.sock = sock
        self.fd = sock.fileno()
        self.kind = kind  # "ping" (the kernel owns the id) or "raw" (host_ident is ours)
        self.host_ident = host_ident
        self.quote = b""
        # Ones' complement sum of the reply's IPv4 header without its total length and
        # checksum (fixed per flow), so a reply's header checksum is one addition.
        self.ip_sum = 0
        self.on_reply: Callable[[int], None] = _ignore_events


class _DnsQuery:
    """One query in flight to the host resolvers."""

    __slots__ = ("dns_ip", "message", "next_resolver", "ns_src", "query", "resolvers", "sock",
                 "sport", "timer")

    def __init__(
        self, ns_src: bytes, sport: int, dns_ip: bytes, message: bytes, query: dns.DnsQuery,
        resolvers: Sequence[tuple[int, tuple[Any, ...]]],
    ) -> None:
        self.ns_src = ns_src
        self.sport = sport
        self.dns_ip = dns_ip
        self.message = message
        self.query = query
        self.resolvers = resolvers  # (family, sockaddr), tried in order
        self.next_resolver = 0
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None


def _ignore_events(_events: int) -> None:
    """The reply handler of an echo flow before the engine sets the real one."""


# ---- the engine -------------------------------------------------------------------------


class TunEngine:
    """Serves a namespace's tun device from this process's network namespace.

    ``tun_fd`` is the tun device (its frames start with a ``vnet_hdr_size``-byte virtio
    header: 10, or 0 for a tun without ``IFF_VNET_HDR``); it is made non-blocking and is
    never closed here.  ``resolvers`` are the host's DNS servers as ``(ip, port)``, tried
    in order.  ``offloads`` are the tun's accepted offloads (``handle.offloads``): with
    ``csum`` large UDP replies leave their checksum to the kernel.  ``tcp_handler``, when
    given, sees every parsed TCP frame first and returns True if it took it.
    """

    def __init__(
        self,
        loop: EventLoop,
        tun_fd: int,
        vnet_hdr_size: int,
        policy: Policy,
        addresses: UsernetAddresses,
        resolvers: Iterable[Resolver],
        idle_timeout: float = 60.0,
        max_flows: int = 4096,
        *,
        offloads: Iterable[str] = (),
        dns_timeout: float = 2.0,
        max_dns_pending: int = 256,
        tcp_handler: Callable[[Parsed], bool] | None = None,
    ) -> None:
        if vnet_hdr_size not in (0, VNET_HDR_LEN):
            raise ValueError(f"vnet_hdr_size must be 0 or {VNET_HDR_LEN}, not {vnet_hdr_size}")
        self._loop = loop
        self._tun = tun_fd
        self._vnet = vnet_hdr_size == VNET_HDR_LEN
        self._offload = self._vnet and "csum" in tuple(offloads)
        self.policy = policy
        self.addresses = addresses
        self.resolvers = [_resolver_sockaddr(host, port) for host, port in resolvers]
        # The sockaddrs of the resolvers a policy decision names, by their tuple of (ip, port).
        self._resolver_lists: dict[tuple[Resolver, ...], list[tuple[int, tuple[Any, ...]]]] = {}
        self.dns_timeout = dns_timeout
        self.max_dns_pending = max_dns_pending
        self.tcp_handler = tcp_handler
        self.stats = EngineStats(denied=policy.denied)
        self._udp: FlowTable[FlowKey, _UdpFlow] = FlowTable(max_flows, idle_timeout)
        self._echo: FlowTable[EchoKey, _EchoFlow] = FlowTable(max_flows, idle_timeout)
        self._dns_pending: dict[int, _DnsQuery] = {}
        self._gateways = {addresses.gateway.packed, addresses.gateway6.packed}
        self._gateway_of = {4: addresses.gateway.packed, 6: addresses.gateway6.packed}
        # Per address family: None (not tried yet), "ping", "raw" or "none".
        self.icmp_mode: dict[int, str | None] = {4: None, 6: None}
        self.sweep_interval = min(_MAX_SWEEP_INTERVAL, idle_timeout / 4)
        self._sweep_timer: Timer | None = None
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._ubuf = bytearray(_RECV_SIZE)
        self._uview = memoryview(self._ubuf)
        # The IPv4 ping-socket echo fast path (see _fast_echo4): flows by the request's
        # (source+destination address bytes, echo id), and a buffer in which a reply is
        # received right behind room for its virtio and IP headers.
        self._ip_start = VNET_HDR_LEN if self._vnet else 0
        self._echo4: dict[tuple[bytes, int], _EchoFlow] = {}
        self._ebuf = bytearray(self._ip_start + 20 + _RECV_SIZE)
        self._eview = memoryview(self._ebuf)
        self._started = False
        self._closed = False

    @property
    def idle_timeout(self) -> float:
        return self._udp.idle_timeout

    @property
    def max_flows(self) -> int:
        return self._udp.capacity

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
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._started:
            self._loop.remove(self._tun)
        for _udp_key, flow in self._udp.clear():
            self._close_udp(flow)
        for _echo_key, echo in self._echo.clear():
            self._close_echo(echo)
        for query in list(self._dns_pending.values()):
            self._dns_finish(query)

    # ---- reading the tun ----------------------------------------------------------------

    def _on_tun(self, _events: int) -> None:
        fd, buf, view, echo4 = self._tun, [self._rbuf], self._rview, self._echo4
        for _ in range(_BATCH):
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
            if echo4 and self._fast_echo4(n):
                continue
            self.handle_frame(bytes(view[:n]))

    def _fast_echo4(self, n: int) -> bool:
        """Relay the IPv4 echo request of ``n`` bytes in the read buffer if it belongs to
        an existing ping-socket flow and needs nothing else; False leaves it to
        :meth:`handle_frame` (which does the same, and everything else, more slowly).

        Why a second path: at a few echoes a second this process is woken from idle for
        each one with every cache cold, and then each Python operation between the tun
        read and the reply's tun write costs microseconds, not nanoseconds.  The generic
        path (copy, full parse into objects, flow-table bookkeeping, header building)
        made the echo RTT twice slirp4netns's.  This one checks the same things
        parse_frame does (no virtio flags or GSO, IPv4 without options, not a fragment,
        exactly one packet, both checksums), hands the ICMP message to the ping socket
        as it is (the kernel sets the id and the checksum), and leaves statistics and
        the idle timer until after the reply is written.
        """
        rbuf, view, start = self._rbuf, self._rview, self._ip_start
        if n < start + 28 or (start and (rbuf[0] or rbuf[1])):  # virtio flags, gso_type
            return False
        ver_ihl, total, frag, proto, addresses, icmp_type, code, ident = (
            _ECHO4_REQUEST.unpack_from(rbuf, start)
        )
        if (ver_ihl != 0x45 or proto != 1 or icmp_type != ICMP_ECHO or code
                or total != n - start or frag & 0x3FFF):
            return False
        flow = self._echo4.get((addresses, ident))
        if flow is None:
            return False
        message = view[start + 20 : n]
        if ones_sum(view[start : start + 20]) != 0xFFFF or ones_sum(message) != 0xFFFF:
            return False  # the generic path drops and counts it
        flow.quote = bytes(view[start : start + min(total, _QUOTE)])
        try:
            flow.sock.send(message)
        except OSError as exc:
            self._echo_send_failed(flow, exc)
        else:
            flow.on_reply(IN)  # the reply to a local address is already queued
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += n
        stats.icmp_echo_requests += 1
        self._echo.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())
        return True

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

    def _unreachable(self, quote: bytes, kind: UnreachableKind, src: bytes | None,
                     out: TunOutput | None = None) -> None:
        """Tell the namespace ``kind`` unreachable about the packet starting with ``quote``
        (through ``out``: the native relay's device has no virtio header)."""
        write, vnet = out or (self.write, self._vnet)
        write(build_icmp_unreachable(quote, kind, src=src, vnet=vnet))
        self.stats.unreachable_sent[kind] += 1

    def _deny(self, parsed: Parsed, reason: str = "", out: TunOutput | None = None) -> None:
        """Answer a denied flow with "administratively prohibited" from the gateway (and
        say so at -v, as the TCP paths do, so a user sees why a flow goes nowhere)."""
        if reason and log.isEnabledFor(logging.INFO):
            l4 = parsed.l4
            port = f":{l4.dport}" if isinstance(l4, UDP) else ""
            what = "udp" if isinstance(l4, UDP) else "icmp"
            log.info("usernet %s: %s -> %s%s denied: %s", what, _ip_text(parsed.ip.src),
                     _ip_text(parsed.ip.dst), port, reason)
        if may_send_icmp_error(parsed):
            self._unreachable(parsed.packet[:_QUOTE], "admin", self._gateway_of[parsed.ip.version],
                              out)

    def _connect(self, sock: socket.socket, address: tuple[str, int], parsed: Parsed,
                 what: str, out: TunOutput | None = None) -> bool:
        """Connect a new flow's host socket (UDP and ping sockets never block).  On
        failure the socket is closed, the drop counted, and the namespace told what the
        host was told (ICMP unreachable), so its program sees the same error."""
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            self.stats.drops[f"{what} connect {errno_name(exc.errno)}"] += 1
            kind = _ERRNO_KINDS.get(exc.errno or 0)
            if kind is not None and may_send_icmp_error(parsed):
                self._unreachable(parsed.packet[:_QUOTE], kind, parsed.ip.dst, out)
            return False
        return True

    def new_flow_source_ok(self, parsed: Parsed) -> bool:
        """Anti-spoofing, once per new flow: the source must be the namespace's."""
        if self.policy.accepts_source(parsed.ip.src):
            return True
        self.stats.drops["foreign source address"] += 1
        return False

    # ---- UDP ------------------------------------------------------------------------------

    def _on_udp(self, parsed: Parsed, udp: UDP) -> None:
        ip = parsed.ip
        key = (ip.src, udp.sport, ip.dst, udp.dport)
        now = time.monotonic()
        flow = self._udp.get(key, now)
        if flow is None:
            decision = self.admit_udp(parsed, udp)
            if decision is None:
                return
            flow = self._open_udp(parsed, key, decision, now)
            if flow is None:
                return
        offset = parsed.ip_offset
        flow.quote = parsed.frame[offset : offset + min(ip.total_length, _QUOTE)]
        for datagram in udp_datagrams(parsed):
            self._send_udp(flow, datagram)

    def admit_udp(self, parsed: Parsed, udp: UDP, out: TunOutput | None = None) -> Allow | None:
        """Decide the first datagram of a flow: the source check and the policy, a denial
        answered through ``out`` (default: this engine's device), a DNS query answered
        here.  The host address to send to, or None.  Shared with the native relay."""
        if not self.new_flow_source_ok(parsed):
            return None
        decision = self.policy.decide("udp", parsed.ip.dst, udp.dport)
        if isinstance(decision, Deny):
            self._deny(parsed, decision.reason, out)
            return None
        if isinstance(decision, AllowResolver):
            # the native relay's rules leave DNS to us anyway
            self._dns_query(parsed, udp, decision.targets)
            return None
        return decision

    def _udp_socket(self, parsed: Parsed, allow: Allow,
                    out: TunOutput | None = None) -> socket.socket | None:
        """A non-blocking UDP socket connected to an admitted flow's host address, or
        None (counted, and the namespace told through ``out``)."""
        family = socket.AF_INET if allow.host_ip.version == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self.stats.drops[f"udp socket {errno_name(exc.errno)}"] += 1
            return None
        if not self._connect(sock, (str(allow.host_ip), allow.host_port), parsed, "udp", out):
            return None
        self.stats.udp_flows_total += 1
        return sock

    def open_udp_socket(self, parsed: Parsed, allow: Allow, out: TunOutput) -> int:
        """:meth:`_udp_socket` for the native relay: a bare fd it then owns, or -1."""
        sock = self._udp_socket(parsed, allow, out)
        return -1 if sock is None else sock.detach()

    def _open_udp(self, parsed: Parsed, key: FlowKey, allow: Allow, now: float) -> _UdpFlow | None:
        sock = self._udp_socket(parsed, allow)
        if sock is None:
            return None
        flow = _UdpFlow(key, sock)
        for _old_key, old in self._udp.add(key, flow, now):
            self.stats.udp_flows_evicted += 1
            self._close_udp(old)
        self._loop.add(flow.fd, IN, partial(self._on_udp_reply, flow))
        self.stats.udp_flows_active += 1
        self._schedule_sweep()
        return flow

    def _send_udp(self, flow: _UdpFlow, datagram: bytes) -> None:
        for attempt in range(2):
            try:
                flow.sock.send(datagram)
            except BlockingIOError:
                self.stats.drops["udp send buffer full"] += 1
                return
            except OSError as exc:
                if attempt == 0 and exc.errno in _ERRNO_KINDS:
                    # An ICMP error about an earlier datagram: report it, and send this
                    # one again (it was not sent; the error was only collected).
                    self._udp_socket_error(flow, exc)
                    continue
                self.stats.drops[f"udp send {errno_name(exc.errno)}"] += 1
                return
            self.stats.udp_datagrams_out += 1
            self.stats.udp_bytes_out += len(datagram)
            return

    def _on_udp_reply(self, flow: _UdpFlow, _events: int) -> None:
        recv_into, buf, view, stats = flow.sock.recv_into, self._ubuf, self._uview, self.stats
        received = False
        for _ in range(_BATCH):
            try:
                n = recv_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                self._udp_socket_error(flow, exc)  # reading it cleared it
                continue
            if n > _RECV_SIZE:
                stats.drops["udp reply too large"] += 1
                continue
            received = True
            payload = view[:n]
            self.write(
                build_udp(
                    flow.ns_dst,
                    flow.ns_src,
                    flow.dport,
                    flow.sport,
                    payload,  # type: ignore[arg-type]  # any bytes-like works
                    offload=self._offload and n > _OFFLOAD_MIN,
                    vnet=self._vnet,
                )
            )
            stats.udp_datagrams_in += 1
            stats.udp_bytes_in += n
        if received:
            self._udp.touch((flow.ns_src, flow.sport, flow.ns_dst, flow.dport), time.monotonic())

    def _udp_socket_error(self, flow: _UdpFlow, exc: OSError) -> None:
        """An ICMP error the host got for this flow: pass it on as ICMP unreachable."""
        if not self.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst):
            self.stats.drops[f"udp error {errno_name(exc.errno)}"] += 1

    def _close_udp(self, flow: _UdpFlow) -> None:
        self._loop.remove(flow.fd)
        flow.sock.close()
        self.stats.udp_flows_active -= 1

    # ---- DNS ------------------------------------------------------------------------------

    def _dns_query(self, parsed: Parsed, udp: UDP, targets: tuple[Resolver, ...] | None) -> None:
        """A query to the DNS address: relayed if it is a standard one, else answered or
        dropped here; ``targets`` the resolvers the policy allows (None: all of ours)."""
        stats = self.stats
        stats.dns_queries += 1
        query = dns.check_query(udp.payload)
        if isinstance(query, Malformed):
            stats.dns_malformed += 1
            stats.malformed[query.reason] += 1
            return
        if isinstance(query, dns.Refused):
            stats.dns_refused[query.reason] += 1
            if log.isEnabledFor(logging.INFO):
                log.info("usernet dns: %s -> %s refused: %s",
                         format_sockaddr((_ip_text(parsed.ip.src), udp.sport)),
                         format_sockaddr((_ip_text(parsed.ip.dst), udp.dport)), query.reason)
            pending = _DnsQuery(parsed.ip.src, udp.sport, parsed.ip.dst, b"", query.query, ())
            self._dns_answer(pending, dns.refusal(query))
            return
        resolvers = self.resolvers if targets is None else self._resolver_list(targets)
        pending = _DnsQuery(parsed.ip.src, udp.sport, parsed.ip.dst, udp.payload, query,
                            resolvers)
        if len(self._dns_pending) >= self.max_dns_pending:
            stats.drops["dns too many pending"] += 1
            self._dns_answer(pending, dns.servfail(query))
            stats.dns_failures += 1
            return
        self._dns_ask_next(pending)

    def _resolver_list(self, targets: tuple[Resolver, ...]) -> list[tuple[int, tuple[Any, ...]]]:
        found = self._resolver_lists.get(targets)
        if found is None:
            found = [_resolver_sockaddr(host, port) for host, port in targets]
            self._resolver_lists[targets] = found
        return found

    def _dns_ask_next(self, query: _DnsQuery) -> None:
        """Send the query to the next resolver that takes it; SERVFAIL when none is left."""
        self._dns_finish(query)
        while query.next_resolver < len(query.resolvers):
            family, sockaddr = query.resolvers[query.next_resolver]
            query.next_resolver += 1
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            except OSError:
                self.stats.dns_retries += 1
                continue
            try:
                sock.connect(sockaddr)
                sock.send(query.message)
            except OSError:
                sock.close()
                self.stats.dns_retries += 1
                continue
            query.sock = sock
            self._dns_pending[sock.fileno()] = query
            self._loop.add(sock.fileno(), IN, partial(self._on_dns_reply, query))
            query.timer = self._loop.call_later(self.dns_timeout, partial(self._dns_timeout, query))
            return
        self.stats.dns_failures += 1
        self._dns_answer(query, dns.servfail(query.query))

    def _on_dns_reply(self, query: _DnsQuery, _events: int) -> None:
        sock = query.sock
        assert sock is not None
        for _ in range(_BATCH):
            try:
                reply = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.stats.dns_retries += 1  # ECONNREFUSED: nobody listens there
                self._dns_ask_next(query)
                return
            # Only a response to this query counts; anything else is ignored (the
            # socket is connected, so it can only come from the resolver itself).
            if (
                len(reply) >= dns.HEADER_LENGTH
                and reply[:2] == query.message[:2]
                and reply[2] & 0x80
            ):
                self._dns_finish(query)
                self.stats.dns_answers += 1
                self._dns_answer(query, reply)
                return

    def _dns_timeout(self, query: _DnsQuery) -> None:
        query.timer = None
        self.stats.dns_retries += 1
        self._dns_ask_next(query)

    def _dns_finish(self, query: _DnsQuery) -> None:
        """Forget the query's current socket and timer (before a retry or at the end)."""
        if query.timer is not None:
            query.timer.cancel()
            query.timer = None
        if query.sock is not None:
            fd = query.sock.fileno()
            self._dns_pending.pop(fd, None)
            self._loop.remove(fd)
            query.sock.close()
            query.sock = None

    def _dns_answer(self, query: _DnsQuery, message: bytes) -> None:
        try:
            frame = build_udp(
                query.dns_ip,
                query.ns_src,
                dns.DNS_PORT,
                query.sport,
                message,
                offload=self._offload and len(message) > _OFFLOAD_MIN,
                vnet=self._vnet,
            )
        except ValueError:  # a 64 KiB answer does not fit the IP packet
            self.stats.drops["dns answer too large"] += 1
            return
        self.write(frame)

    # ---- ICMP echo -------------------------------------------------------------------------

    def _on_echo(self, parsed: Parsed, echo: ICMPEcho) -> None:
        if echo.reply:
            self.stats.unsupported["icmp echo reply"] += 1  # nobody pings the namespace
            return
        ip = parsed.ip
        self.stats.icmp_echo_requests += 1
        key = (ip.src, echo.ident, ip.dst)
        flow = self._echo.get(key, time.monotonic())
        if flow is None:
            decision = self.admit_echo(parsed)
            if decision is None:
                return
            flow = self._open_echo(parsed, key, decision)
            if flow is None:
                return
        offset = parsed.ip_offset
        flow.quote = parsed.frame[offset : offset + min(ip.total_length, _QUOTE)]
        self._send_echo(flow, echo)

    def admit_echo(self, parsed: Parsed, out: TunOutput | None = None) -> Allow | None:
        """Decide the first echo request of a flow: the source check and the policy,
        answering a denial (ICMP admin-prohibited) and the gateway's own echo through
        ``out`` (default: this engine's device).  The host address to ping, or None when
        nothing more is to be done.  Shared with the native relay, so both paths
        decide alike."""
        write, vnet = out or (self.write, self._vnet)
        if not self.new_flow_source_ok(parsed):
            return None
        decision = self.policy.decide("icmp", parsed.ip.dst, None)
        if isinstance(decision, (Deny, AllowResolver)):
            self._deny(parsed, decision.reason if isinstance(decision, Deny) else "dns", out)
            return None
        if parsed.ip.dst in self._gateways:
            # The gateway is us: answer without touching the host's network.
            write(build_icmp_echo_reply(parsed, vnet=vnet))
            self.stats.icmp_echo_replies += 1
            self.stats.icmp_echo_local += 1
            return None
        return decision

    def _connected_echo_socket(self, parsed: Parsed, allow: Allow, out: TunOutput | None = None,
                               ping_only: bool = False) -> tuple[socket.socket, str] | None:
        """A ping (or raw) socket connected to an admitted flow's host address, and its
        kind; None when none (counted, and the namespace told through ``out``)."""
        made = self._echo_socket(allow.host_ip.version)
        if made is None:
            self.stats.icmp_unavailable += 1
            self._deny(parsed, out=out)
            return None
        sock, kind = made
        if ping_only and kind != "ping":
            sock.close()
            self.stats.drops["icmp native relay needs ping sockets"] += 1
            return None
        if not self._connect(sock, (str(allow.host_ip), 0), parsed, "icmp", out):
            return None
        self.stats.icmp_flows_total += 1
        self.stats.icmp_sockets[kind] += 1
        return sock, kind

    def open_ping_socket(self, parsed: Parsed, allow: Allow, out: TunOutput) -> int:
        """The native relay's echo socket: a connected ping socket (raw sockets see every
        ICMP message: those flows stay the engine's) as a bare fd it then owns, or -1."""
        made = self._connected_echo_socket(parsed, allow, out, ping_only=True)
        return -1 if made is None else made[0].detach()

    def _open_echo(self, parsed: Parsed, key: EchoKey, allow: Allow) -> _EchoFlow | None:
        version = allow.host_ip.version
        made = self._connected_echo_socket(parsed, allow)
        if made is None:
            return None
        sock, kind = made
        host_ident = random.getrandbits(16) if kind == "raw" else 0
        flow = _EchoFlow(key, sock, kind, host_ident)
        for _old_key, old in self._echo.add(key, flow, time.monotonic()):
            self._close_echo(old)
        if kind == "ping" and version == 4:
            src, dst = flow.ns_dst, flow.ns_src  # the reply's addresses
            # Version/IHL + DF + TTL/protocol (64, ICMP) + the addresses; what
            # build_icmp_echo writes, so both paths produce the same bytes.
            flow.ip_sum = 0x4500 + 0x4000 + 0x4001 + int.from_bytes(src + dst, "big")
            flow.on_reply = partial(self._on_ping_reply4, flow)
            self._echo4[(flow.ns_src + flow.ns_dst, flow.ident)] = flow
        else:
            flow.on_reply = partial(self._on_echo_reply, flow)
        self._loop.add(flow.fd, IN, flow.on_reply)
        self.stats.icmp_flows_active += 1
        self._schedule_sweep()
        return flow

    def _echo_socket(self, version: int) -> tuple[socket.socket, str] | None:
        """A ping socket, else (root) a raw one, else None; remembers what works."""
        family, proto = (
            (socket.AF_INET, socket.IPPROTO_ICMP)
            if version == 4
            else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
        )
        mode = self.icmp_mode[version]
        if mode == "none":
            return None
        kinds = {"ping": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW}
        for kind, sock_type in kinds.items():
            if mode is not None and mode != kind:
                continue
            try:
                sock = socket.socket(family, sock_type | socket.SOCK_NONBLOCK, proto)
            except PermissionError:
                continue  # EACCES: gid not in ping_group_range; EPERM: no CAP_NET_RAW
            except OSError as exc:  # EMFILE, IPv6 switched off...: try again next flow
                self.stats.drops[f"icmp socket {errno_name(exc.errno)}"] += 1
                return None
            if mode is None:
                log.debug("icmp echo for IPv%d through %s sockets", version, kind)
            self.icmp_mode[version] = kind
            return sock, kind
        # Nothing permitted.  Remembered (probing costs two syscalls per request); a
        # changed sysctl takes effect for the next engine.
        self.icmp_mode[version] = "none" if mode is None else None
        return None

    def _send_echo(self, flow: _EchoFlow, echo: ICMPEcho) -> None:
        v4 = len(flow.ns_dst) == 4
        icmp_type = ICMP_ECHO if v4 else ICMPV6_ECHO
        if flow.kind == "ping":
            # The kernel fills in the id (the socket's "port") and the checksum.
            message = _ICMP_HEADER.pack(icmp_type, 0, 0, 0, echo.seq) + echo.payload
        else:
            header = _ICMP_HEADER.pack(icmp_type, 0, 0, flow.host_ident, echo.seq)
            if v4:  # raw ICMPv6 sockets get their checksum from the kernel; IPv4 do not
                csum = checksum(header + echo.payload)
                header = header[:2] + csum.to_bytes(2, "big") + header[4:]
            message = header + echo.payload
        try:
            flow.sock.send(message)
        except OSError as exc:
            self._echo_send_failed(flow, exc)
        else:
            # A destination on this host answers inside send() (the loopback delivery
            # runs before the syscall returns), so the reply is usually queued already:
            # taking it now saves the process a second wake-up, which from idle costs
            # more than the rest of the echo.  A far destination costs one EAGAIN here.
            flow.on_reply(IN)

    def _echo_send_failed(self, flow: _EchoFlow, exc: OSError) -> None:
        """Count a request the host socket refused, or report the ICMP error it had."""
        if isinstance(exc, BlockingIOError):
            self.stats.drops["icmp send buffer full"] += 1
            return
        if not self.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst):
            self.stats.drops[f"icmp send {errno_name(exc.errno)}"] += 1

    def answer_host_error(self, err: int, quote: bytes, src: bytes,
                          out: TunOutput | None = None) -> bool:
        """Tell the namespace about host error ``err`` for the packet starting with
        ``quote``, as the ICMP unreachable (from ``src``) it stands for; False if it
        stands for none (the engine's flows and the native relay's come through here)."""
        kind = _ERRNO_KINDS.get(err)
        if kind is None or not quote:
            return False
        self._unreachable(quote, kind, src, out)
        return True

    def _echo_error(self, flow: _EchoFlow, exc: OSError) -> None:
        """An error a receive reported (an ICMP error about an earlier request): pass it
        on to the namespace as ICMP unreachable, quoting the flow's latest request."""
        self.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst)

    def _on_ping_reply4(self, flow: _EchoFlow, _events: int) -> None:
        """:meth:`_on_echo_reply` for an IPv4 ping socket, lean for the same reason as
        :meth:`_fast_echo4`: a reply is received straight behind room for its virtio and
        IP headers, gets its id back and its checksums by arithmetic, and goes to the
        tun in one write; the bookkeeping waits until the batch is written."""
        recv_into, buf, view, stats = flow.sock.recv_into, self._ebuf, self._eview, self.stats
        start = self._ip_start
        icmp = start + 20
        into = view[icmp:]
        received = 0
        for _ in range(_BATCH):
            try:
                m = recv_into(into)
            except BlockingIOError:
                break
            except OSError as exc:
                self._echo_error(flow, exc)
                continue
            total = 20 + m
            if m < 8 or buf[icmp] != ICMP_ECHO_REPLY or total > 0xFFFF:
                continue
            # Type and code 0 and the namespace's id instead of the kernel's (the
            # sequence number and data stay), then the checksum over the message.
            _ECHO_REPLY_HEAD.pack_into(buf, icmp, ICMP_ECHO_REPLY, 0, 0, flow.ident)
            _U16.pack_into(buf, icmp + 2, ~ones_sum(view[icmp : icmp + m]) & 0xFFFF)
            _IPV4_HEADER.pack_into(buf, start, 0x45, 0, total, 0, 0x4000, 64, 1,
                                   ~fold(flow.ip_sum + total) & 0xFFFF, flow.ns_dst, flow.ns_src)
            self.write_parts((view[: icmp + m],))
            received += 1
        if received:
            stats.icmp_echo_replies += received
            self._echo.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())

    def _on_echo_reply(self, flow: _EchoFlow, _events: int) -> None:
        v4 = len(flow.ns_dst) == 4
        reply_type = ICMP_ECHO_REPLY if v4 else ICMPV6_ECHO_REPLY
        received = False
        for _ in range(_BATCH):
            try:
                data = flow.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._echo_error(flow, exc)
                continue
            if flow.kind == "raw" and v4 and data:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets see the IP header
            if len(data) < 8:
                continue
            icmp_type, _code, _csum, ident, seq = _ICMP_HEADER.unpack_from(data)
            if icmp_type != reply_type or (flow.kind == "raw" and ident != flow.host_ident):
                continue  # a raw socket sees every ICMP message from that host
            received = True
            self.write(
                build_icmp_echo(
                    flow.ns_dst, flow.ns_src, flow.ident, seq, data[8:], vnet=self._vnet
                )
            )
            self.stats.icmp_echo_replies += 1
        if received:
            self._echo.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())

    def _close_echo(self, flow: _EchoFlow) -> None:
        key4 = (flow.ns_src + flow.ns_dst, flow.ident)
        if self._echo4.get(key4) is flow:
            del self._echo4[key4]
        self._loop.remove(flow.fd)
        flow.sock.close()
        self.stats.icmp_flows_active -= 1

    # ---- TCP ------------------------------------------------------------------------------

    def _on_tcp(self, parsed: Parsed) -> None:
        if self.tcp_handler is not None and self.tcp_handler(parsed):
            return
        reset = build_tcp_rst(parsed, vnet=self._vnet)
        if reset is None:
            return  # never answer a reset
        self.write(reset)
        self.stats.tcp_resets += 1

    # ---- expiry ---------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        """Arm the idle sweep if it is not armed: it runs only while flows exist."""
        if self._sweep_timer is None and not self._closed:
            self._sweep_timer = self._loop.call_later(self.sweep_interval, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        now = time.monotonic()
        for _udp_key, flow in self._udp.expire(now):
            self.stats.udp_flows_expired += 1
            self._close_udp(flow)
        for _echo_key, echo in self._echo.expire(now):
            self.stats.icmp_flows_expired += 1
            self._close_echo(echo)
        if len(self._udp) or len(self._echo):
            self._schedule_sweep()


def _ip_text(packed_ip: bytes) -> str:
    return str(ipaddress.ip_address(packed_ip))


def _resolver_sockaddr(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) of a numeric resolver address; ``fe80::1%eth0`` scopes kept."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except (ValueError, OSError):
        raise ValueError(f"resolver {host!r} is not an IP address") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr


PING_SYSCTL = "net.ipv4.ping_group_range"


def ping_group_range() -> str:
    """The groups that may open ping sockets in this network namespace ("1 0": none)."""
    try:
        with open(f"/proc/sys/{PING_SYSCTL.replace('.', '/')}") as f:
            return " ".join(f.read().split())
    except OSError:
        return "?"


def ping_unavailable() -> str | None:
    """Why ping from the namespace cannot work at all here (None if it can).

    The engine dials echo requests through ping sockets, or raw sockets where it may
    (CAP_NET_RAW); with neither every request is answered "administratively prohibited",
    which ``ping`` shows as "Packet filtered" although no rule denied anything.  This says
    so, with the sysctl that lets ping sockets through, for the start-up log and the
    summary."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
        except OSError:
            continue
        return None
    return (f"ping from the namespace cannot work: gid {os.getegid()} may not open ping "
            f"sockets ({PING_SYSCTL} is {ping_group_range()!r}) nor raw ones; "
            f"sysctl -w {PING_SYSCTL}=\"0 2147483647\" permits ping sockets")
