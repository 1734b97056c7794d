"""The tun engine's ICMP echo: the namespace's pings through host ping (or raw) sockets.

Why and how:

* One host ping socket (``SOCK_DGRAM``/``IPPROTO_ICMP``) per (namespace source, echo id,
  destination), opened by the flow decisions (:mod:`.flowdecide`, which also answer
  echo to the gateway themselves).  The kernel rewrites the echo id of a ping socket,
  so replies are mapped back to the namespace's own id (the sequence number passes
  through).  Where ping sockets are not permitted and we may open raw sockets (root),
  a connected raw socket with a random id of our own is used instead; it sees every
  ICMP message from that host, so replies are matched by that id.
* Flows expire after the engine's idle timeout, like UDP flows.  An ICMP error a host
  socket reports goes back to the namespace as ICMP unreachable quoting the flow's
  latest request.
* Three paths carry a request and its reply, for speed where it counts:

  - the **generic** path (:meth:`EchoFlows.handle`, :meth:`EchoFlows._on_reply`):
    every echo, IPv4 and IPv6, ping and raw sockets, from a parsed frame;
  - the **IPv4 ping-socket fast path** (:meth:`EchoFlows.fast_request4`,
    :meth:`EchoFlows._on_ping_reply4`): a later request of an existing IPv4
    ping-socket flow is checked and sent straight from the tun's read buffer, and its
    reply built in place with arithmetic checksums.  At a few echoes a second the
    process is woken from idle for each one with every cache cold, where each Python
    operation between the tun read and the reply's tun write costs microseconds; the
    generic path made the echo round trip twice slirp4netns's.  Both paths write
    byte-identical replies (tests/test_usernet_engine.py checks it);
  - the **native relay** (:mod:`.flowrelay`) carries ping-socket flows in C when it
    runs, with sockets from :meth:`.flowdecide.FlowDecisions.open_ping_socket`.

Supported: echo request/reply, IPv4 and IPv6.  Not supported: echo *to* the namespace
(nobody pings it; a reply it sends is counted as unsupported), other ICMP queries; ICMP
errors the namespace sends are counted and ignored.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from functools import partial

from nsbridge.errors import errno_name
from nsbridge.relay.loop import IN, EventLoop
from nsbridge.relay.udp import FlowTable
from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.host.flowdecide import FlowDecisions
from nsbridge.usernet.host.replies import BATCH, QUOTE, RECV_SIZE, Replies
from nsbridge.usernet.proto.checksum import checksum, fold, ones_sum
from nsbridge.usernet.proto.packetbuild import build_icmp_echo
from nsbridge.usernet.proto.packets import (
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMPV6_ECHO,
    ICMPV6_ECHO_REPLY,
    VNET_HDR_LEN,
    ICMPEcho,
    Parsed,
)
from nsbridge.usernet.proto.policy import Allow

EchoKey = tuple[bytes, int, bytes]  # namespace src ip, echo id, dst ip

_ICMP_HEADER = struct.Struct("!BBHHH")
# The fields of an IPv4 echo request that the fast path checks, from the IP header on:
# version/IHL, total length, flags/fragment offset, protocol, source+destination,
# ICMP type, code and id.
_ECHO4_REQUEST = struct.Struct("!BxH2xHxB2x8sBB2xH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_ECHO_REPLY_HEAD = struct.Struct("!BBHH")  # ICMP type, code, checksum, id
_U16 = struct.Struct("!H")

PING_SYSCTL = "net.ipv4.ping_group_range"


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


def _ignore_events(_events: int) -> None:
    """The reply handler of an echo flow before the engine sets the real one."""


class EchoFlows:
    """The namespace's echo flows (module doc) on ``loop``, in ``table``; replies go out
    through ``write``/``write_parts`` (a virtio header when ``vnet``).

    ``read_buffer`` is the buffer the engine reads tun frames into: the fast path reads
    a request there.  ``on_new_flow`` is called after each flow is added (the engine
    arms its idle sweep).
    """

    def __init__(
        self,
        loop: EventLoop,
        table: FlowTable[EchoKey, _EchoFlow],
        decide: FlowDecisions,
        replies: Replies,
        stats: EngineStats,
        write: Callable[[bytes], None],
        write_parts: Callable[[Sequence[bytes | memoryview]], None],
        *,
        vnet: bool,
        read_buffer: bytearray,
        on_new_flow: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.table = table
        self._decide = decide
        self._replies = replies
        self.stats = stats
        self._write = write
        self._write_parts = write_parts
        self._vnet = vnet
        self._on_new_flow = on_new_flow
        self._rbuf = read_buffer
        self._rview = memoryview(read_buffer)
        # The IPv4 ping-socket fast path: flows by the request's (source+destination
        # address bytes, echo id), and a buffer in which a reply is received right
        # behind room for its virtio and IP headers.
        self._ip_start = VNET_HDR_LEN if vnet else 0
        self.fast4: dict[tuple[bytes, int], _EchoFlow] = {}
        self._ebuf = bytearray(self._ip_start + 20 + RECV_SIZE)
        self._eview = memoryview(self._ebuf)

    def __len__(self) -> int:
        return len(self.table)

    def expire(self, now: float) -> None:
        """Close the flows idle since before ``now - idle_timeout``."""
        for _key, flow in self.table.expire(now):
            self.stats.icmp_flows_expired += 1
            self._close(flow)

    def close(self) -> None:
        """Close every flow's socket."""
        for _key, flow in self.table.clear():
            self._close(flow)

    # ---- requests ---------------------------------------------------------------------

    def fast_request4(self, n: int) -> bool:
        """Relay the IPv4 echo request of ``n`` bytes in the read buffer if it belongs to
        an existing ping-socket flow and needs nothing else; False leaves it to the
        engine's generic path (:meth:`handle`, which does the same, and everything
        else, more slowly).

        It checks the same things parse_frame does (no virtio flags or GSO, IPv4
        without options, not a fragment, exactly one packet, both checksums), hands the
        ICMP message to the ping socket as it is (the kernel sets the id and the
        checksum), and leaves statistics and the idle timer until after the reply is
        written.
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
        flow = self.fast4.get((addresses, ident))
        if flow is None:
            return False
        message = view[start + 20 : n]
        if ones_sum(view[start : start + 20]) != 0xFFFF or ones_sum(message) != 0xFFFF:
            return False  # the generic path drops and counts it
        flow.quote = bytes(view[start : start + min(total, QUOTE)])
        try:
            flow.sock.send(message)
        except OSError as exc:
            self._send_failed(flow, exc)
        else:
            flow.on_reply(IN)  # the reply to a local address is already queued
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += n
        stats.icmp_echo_requests += 1
        self.table.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())
        return True

    def handle(self, parsed: Parsed, echo: ICMPEcho) -> None:
        """An echo message from the namespace: a request goes out through its flow's
        socket (a new flow is decided first)."""
        if echo.reply:
            self.stats.unsupported["icmp echo reply"] += 1  # nobody pings the namespace
            return
        ip = parsed.ip
        self.stats.icmp_echo_requests += 1
        key = (ip.src, echo.ident, ip.dst)
        flow = self.table.get(key, time.monotonic())
        if flow is None:
            decision = self._decide.admit_echo(parsed)
            if decision is None:
                return
            flow = self._open(parsed, key, decision)
            if flow is None:
                return
        offset = parsed.ip_offset
        flow.quote = parsed.frame[offset : offset + min(ip.total_length, QUOTE)]
        self._send(flow, echo)

    def _open(self, parsed: Parsed, key: EchoKey, allow: Allow) -> _EchoFlow | None:
        version = allow.host_ip.version
        made = self._decide.echo_socket(parsed, allow)
        if made is None:
            return None
        sock, kind = made
        host_ident = random.getrandbits(16) if kind == "raw" else 0
        flow = _EchoFlow(key, sock, kind, host_ident)
        for _old_key, old in self.table.add(key, flow, time.monotonic()):
            self._close(old)
        if kind == "ping" and version == 4:
            src, dst = flow.ns_dst, flow.ns_src  # the reply's addresses
            # Version/IHL + DF + TTL/protocol (64, ICMP) + the addresses; what
            # build_icmp_echo writes, so both paths produce the same bytes.
            flow.ip_sum = 0x4500 + 0x4000 + 0x4001 + int.from_bytes(src + dst, "big")
            flow.on_reply = partial(self._on_ping_reply4, flow)
            self.fast4[(flow.ns_src + flow.ns_dst, flow.ident)] = flow
        else:
            flow.on_reply = partial(self._on_reply, flow)
        self._loop.add(flow.fd, IN, flow.on_reply)
        self.stats.icmp_flows_active += 1
        self._on_new_flow()
        return flow

    def _send(self, flow: _EchoFlow, echo: ICMPEcho) -> None:
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
            self._send_failed(flow, exc)
        else:
            # A destination on this host answers inside send() (the loopback delivery
            # runs before the syscall returns), so the reply is usually queued already:
            # taking it now saves the process a second wake-up, which from idle costs
            # more than the rest of the echo.  A far destination costs one EAGAIN here.
            flow.on_reply(IN)

    def _send_failed(self, flow: _EchoFlow, exc: OSError) -> None:
        """Count a request the host socket refused, or report the ICMP error it had."""
        if isinstance(exc, BlockingIOError):
            self.stats.drops["icmp send buffer full"] += 1
            return
        if not self._replies.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst):
            self.stats.drops[f"icmp send {errno_name(exc.errno)}"] += 1

    # ---- replies ----------------------------------------------------------------------

    def _error(self, flow: _EchoFlow, exc: OSError) -> None:
        """An error a receive reported (an ICMP error about an earlier request): pass it
        on to the namespace as ICMP unreachable, quoting the flow's latest request."""
        self._replies.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst)

    def _on_ping_reply4(self, flow: _EchoFlow, _events: int) -> None:
        """:meth:`_on_reply` for an IPv4 ping socket, lean for the same reason as
        :meth:`fast_request4`: a reply is received straight behind room for its virtio
        and IP headers, gets its id back and its checksums by arithmetic, and goes to
        the tun in one write; the bookkeeping waits until the batch is written."""
        recv_into, buf, view, stats = flow.sock.recv_into, self._ebuf, self._eview, self.stats
        start = self._ip_start
        icmp = start + 20
        into = view[icmp:]
        received = 0
        for _ in range(BATCH):
            try:
                m = recv_into(into)
            except BlockingIOError:
                break
            except OSError as exc:
                self._error(flow, exc)
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
            self._write_parts((view[: icmp + m],))
            received += 1
        if received:
            stats.icmp_echo_replies += received
            self.table.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())

    def _on_reply(self, flow: _EchoFlow, _events: int) -> None:
        v4 = len(flow.ns_dst) == 4
        reply_type = ICMP_ECHO_REPLY if v4 else ICMPV6_ECHO_REPLY
        received = False
        for _ in range(BATCH):
            try:
                data = flow.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._error(flow, exc)
                continue
            if flow.kind == "raw" and v4 and data:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets see the IP header
            if len(data) < 8:
                continue
            icmp_type, _code, _csum, ident, seq = _ICMP_HEADER.unpack_from(data)
            if icmp_type != reply_type or (flow.kind == "raw" and ident != flow.host_ident):
                continue  # a raw socket sees every ICMP message from that host
            received = True
            self._write(
                build_icmp_echo(
                    flow.ns_dst, flow.ns_src, flow.ident, seq, data[8:], vnet=self._vnet
                )
            )
            self.stats.icmp_echo_replies += 1
        if received:
            self.table.touch((flow.ns_src, flow.ident, flow.ns_dst), time.monotonic())

    def _close(self, flow: _EchoFlow) -> None:
        key4 = (flow.ns_src + flow.ns_dst, flow.ident)
        if self.fast4.get(key4) is flow:
            del self.fast4[key4]
        self._loop.remove(flow.fd)
        flow.sock.close()
        self.stats.icmp_flows_active -= 1


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
