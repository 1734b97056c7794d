"""The tun engine's UDP flows: one connected host socket per namespace flow.

Why and how:

* UDP to ``X:P``: one host UDP socket per flow (namespace source ip/port, destination
  ip/port), made only when the flow decisions (:mod:`.flowdecide`) allow and
  ``connect()``-ed to what the policy says to dial (``10.0.2.2:P`` becomes
  ``127.0.0.1:P``).  A reply is routed by *which socket it arrived on* and written back
  from ``X:P`` as the namespace addressed it.
* Flows end after ``idle_timeout`` seconds without traffic, and the least recently used
  one is evicted when ``max_flows`` exist: the :class:`~nsbridge.relay.udp.FlowTable` of
  the UDP relay, for the same reasons (UDP never says goodbye).
* ICMP errors the host socket reports (``ECONNREFUSED`` from a closed port, unreachable
  hosts) go back to the namespace as ICMP unreachable quoting the flow's latest
  datagram (:meth:`.replies.Replies.answer_host_error`), so its application sees the same error
  it would see on a real network.
* GSO (USO) frames from the namespace are split into their datagrams; a large reply
  leaves its UDP checksum to the kernel when the tun accepted the ``csum`` offload.

The native relay carries the same flows in C when it runs; this is the path without it
(and for the flows it leaves to the engine).

**Inbound flows** (a published UDP port that keeps its client's address,
:mod:`.inbound`) are the same flows started from the other end: the host socket is one
connected to the client and bound to the published port (:meth:`UdpFlows.adopt`), the
client's datagrams arrive on it as replies do, and the guest's answers, keyed as its
packets will be, leave on it.  So the guest answering opens nothing: its datagrams match
that one flow.  When the native relay serves UDP, the guest's first answer reaches it
instead, and it takes the flow's socket over (:meth:`UdpFlows.hand_over`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from functools import partial

from nsbridge.errors import errno_name
from nsbridge.relay.loop import IN, EventLoop
from nsbridge.relay.udp import FlowTable
from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.host.flowdecide import FlowDecisions
from nsbridge.usernet.host.replies import BATCH, ERRNO_KINDS, OFFLOAD_MIN, QUOTE, RECV_SIZE, Replies
from nsbridge.usernet.proto.packetbuild import build_udp
from nsbridge.usernet.proto.packets import UDP, Parsed, udp_datagrams
from nsbridge.usernet.proto.policy import Allow

FlowKey = tuple[bytes, int, bytes, int]  # namespace src ip, src port, dst ip, dst port


class _UdpFlow:
    """One namespace UDP flow and its connected host socket."""

    __slots__ = ("dport", "fd", "inbound", "ns_dst", "ns_src", "quote", "sock", "sport")

    def __init__(self, key: FlowKey, sock: socket.socket, inbound: bool = False) -> None:
        self.ns_src, self.sport, self.ns_dst, self.dport = key
        self.sock = sock
        self.fd = sock.fileno()
        self.quote = b""  # the start of the latest datagram, to quote in ICMP errors
        self.inbound = inbound  # a published port's client (module doc)


class UdpFlows:
    """The namespace's UDP flows (module doc) on ``loop``, in ``table``; replies go out
    through ``write`` (a virtio header when ``vnet``, kernel checksums when ``offload``).
    ``on_new_flow`` is called after each flow is added (the engine arms its idle sweep).
    """

    def __init__(
        self,
        loop: EventLoop,
        table: FlowTable[FlowKey, _UdpFlow],
        decide: FlowDecisions,
        replies: Replies,
        stats: EngineStats,
        write: Callable[[bytes], None],
        *,
        vnet: bool,
        offload: bool,
        on_new_flow: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.table = table
        self._decide = decide
        self._replies = replies
        self.stats = stats
        self._write = write
        self._vnet = vnet
        self._offload = offload
        self._on_new_flow = on_new_flow
        self._ubuf = bytearray(RECV_SIZE)
        self._uview = memoryview(self._ubuf)

    def __len__(self) -> int:
        return len(self.table)

    def handle(self, parsed: Parsed, udp: UDP) -> None:
        """A UDP frame from the namespace: its flow's socket sends it (a new flow is
        decided first)."""
        ip = parsed.ip
        key = (ip.src, udp.sport, ip.dst, udp.dport)
        now = time.monotonic()
        flow = self.table.get(key, now)
        if flow is None:
            decision = self._decide.admit_udp(parsed, udp)
            if decision is None:
                return
            flow = self._open(parsed, key, decision, now)
            if flow is None:
                return
        offset = parsed.ip_offset
        flow.quote = parsed.frame[offset : offset + min(ip.total_length, QUOTE)]
        for datagram in udp_datagrams(parsed):
            self._send(flow, datagram)

    def expire(self, now: float) -> None:
        """Close the flows idle since before ``now - idle_timeout``."""
        for _key, flow in self.table.expire(now):
            self.stats.udp_flows_expired += 1
            self._close(flow)

    def close(self) -> None:
        """Close every flow's socket."""
        for _key, flow in self.table.clear():
            self._close(flow)

    def _open(self, parsed: Parsed, key: FlowKey, allow: Allow, now: float) -> _UdpFlow | None:
        sock = self._decide.udp_socket(parsed, allow)
        if sock is None:
            return None
        flow = _UdpFlow(key, sock)
        for _old_key, old in self.table.add(key, flow, now):
            self.stats.udp_flows_evicted += 1
            self._close(old)
        self._loop.add(flow.fd, IN, partial(self._on_reply, flow))
        self.stats.udp_flows_active += 1
        self._on_new_flow()
        return flow

    # ---- inbound flows ----------------------------------------------------------------

    def adopt(self, key: FlowKey, sock: socket.socket) -> None:
        """Make ``sock`` (non-blocking, connected to a published port's client) the host
        socket of flow ``key`` (the guest's address and port, then the client's as the
        guest sees them), which must not exist yet."""
        flow = _UdpFlow(key, sock, inbound=True)
        for _old_key, old in self.table.add(key, flow, time.monotonic()):
            self.stats.udp_flows_evicted += 1
            self._close(old)
        self._loop.add(flow.fd, IN, partial(self._on_reply, flow))
        self.stats.udp_flows_active += 1
        self.stats.udp_flows_inbound += 1
        self._on_new_flow()

    def inject(self, key: FlowKey, payload: bytes) -> None:
        """One datagram of flow ``key`` from its host end to the guest (what the host
        socket of an inbound flow got before the flow had it)."""
        ns_src, sport, ns_dst, dport = key
        self._write(build_udp(ns_dst, ns_src, dport, sport, payload,
                              offload=self._offload and len(payload) > OFFLOAD_MIN,
                              vnet=self._vnet))
        self.stats.udp_datagrams_in += 1
        self.stats.udp_bytes_in += len(payload)

    def hand_over(self, key: FlowKey) -> int:
        """The native relay met the guest's answer on an inbound flow: the flow leaves
        this table and its socket's fd goes to the caller (-1: no such inbound flow)."""
        flow = self.table.get(key, time.monotonic())
        if flow is None or not flow.inbound:
            return -1
        self.table.remove(key)
        self._loop.remove(flow.fd)
        self.stats.udp_flows_active -= 1
        return flow.sock.detach()

    def drop_inbound(self, keys: list[FlowKey]) -> None:
        """End these inbound flows if this table still has them (their port was removed)."""
        for key in keys:
            flow = self.table.get(key, time.monotonic())
            if flow is not None and flow.inbound:
                self.table.remove(key)
                self._close(flow)

    def _send(self, flow: _UdpFlow, datagram: bytes) -> None:
        for attempt in range(2):
            try:
                flow.sock.send(datagram)
            except BlockingIOError:
                self.stats.drops["udp send buffer full"] += 1
                return
            except OSError as exc:
                if attempt == 0 and exc.errno in ERRNO_KINDS:
                    # An ICMP error about an earlier datagram: report it, and send this
                    # one again (it was not sent; the error was only collected).
                    self._socket_error(flow, exc)
                    continue
                self.stats.drops[f"udp send {errno_name(exc.errno)}"] += 1
                return
            self.stats.udp_datagrams_out += 1
            self.stats.udp_bytes_out += len(datagram)
            return

    def _on_reply(self, flow: _UdpFlow, _events: int) -> None:
        recv_into, buf, view, stats = flow.sock.recv_into, self._ubuf, self._uview, self.stats
        received = False
        for _ in range(BATCH):
            try:
                n = recv_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                self._socket_error(flow, exc)  # reading it cleared it
                continue
            if n > RECV_SIZE:
                stats.drops["udp reply too large"] += 1
                continue
            received = True
            payload = view[:n]
            self._write(
                build_udp(
                    flow.ns_dst,
                    flow.ns_src,
                    flow.dport,
                    flow.sport,
                    payload,  # type: ignore[arg-type]  # any bytes-like works
                    offload=self._offload and n > OFFLOAD_MIN,
                    vnet=self._vnet,
                )
            )
            stats.udp_datagrams_in += 1
            stats.udp_bytes_in += n
        if received:
            self.table.touch((flow.ns_src, flow.sport, flow.ns_dst, flow.dport), time.monotonic())

    def _socket_error(self, flow: _UdpFlow, exc: OSError) -> None:
        """An ICMP error the host got for this flow: pass it on as ICMP unreachable."""
        if not self._replies.answer_host_error(exc.errno or 0, flow.quote, flow.ns_dst):
            self.stats.drops[f"udp error {errno_name(exc.errno)}"] += 1

    def _close(self, flow: _UdpFlow) -> None:
        self._loop.remove(flow.fd)
        flow.sock.close()
        self.stats.udp_flows_active -= 1
