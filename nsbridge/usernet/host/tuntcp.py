"""The tun TCP path: namespace TCP connections terminated on the host side, from the tun.

Used when the redirect fast path is not there (``--tcp=tun``, or a namespace whose
kernel has no nf_tables): every TCP segment the namespace sends reaches the tun device
and :class:`TunTcp` (the :class:`~nsbridge.usernet.host.engine.TunEngine`'s ``tcp_handler``)
plays the other end.  The protocol is :class:`~nsbridge.usernet.proto.tcpstate.TcpConn`
(sans-IO); this module only does its I/O:

* A **SYN** for a new connection is checked like every new flow (source address, then
  :meth:`Policy.decide <nsbridge.usernet.proto.policy.Policy.decide>`).  Denied: a reset at
  once.  Allowed: a non-blocking host socket dials the target, and the SYN-ACK goes out
  only when the target accepted — so a refused or unreachable target gives the
  namespace's program the same ``ECONNREFUSED`` it would get on a real network, and an
  allowed connection behaves exactly as the fast path's.
* **Namespace → host**: in-order payload goes straight to the host socket
  (``send``); what it cannot take now waits in a per-connection backlog, and the window
  we advertise shrinks by that much (back-pressure instead of memory).
* **Host → namespace**: the host socket is edge-triggered; its bytes are *peeked*
  (``SO_PEEK_OFF`` keeps the offset) into one shared buffer, written to the tun with
  ``writev([head, payload])`` (no joined frame; the kernel computes checksums and cuts
  GSO frames), and consumed from the socket only when acknowledged.  Retransmission
  rewinds the peek offset.  TCP ``SO_PEEK_OFF`` needs Linux 6.9: :func:`unavailable`
  tells the caller whether this path can run.
* FINs and resets are carried both ways; a host socket error resets the namespace's
  connection and a namespace reset aborts the host socket (``SO_LINGER`` 0).
* **Inbound** (a published port that keeps its client's address, :mod:`.inbound`):
  :meth:`TunTcp.open_inbound` takes a client the host side accepted and dials the
  namespace through the device *as that client* (:meth:`TcpConn.active_open
  <nsbridge.usernet.proto.tcpstate.TcpConn.active_open>`): the flow is keyed as the
  guest's packets will be, and from the SYN-ACK on it is an ordinary flow whose host
  socket is the client's.  The guest's port closed resets the client at once; a guest
  that never answers gives up after the SYN's retries.  Under the redirect fast path
  this class serves only these flows (``serve_outbound=False``): a SYN from the namespace
  never reaches the tun there, and one that does anyway is reset as before.
* A connection to the namespace's **DNS address** goes to a host resolver, and what the
  namespace sends on it passes a :class:`~nsbridge.usernet.proto.dns.DnsStream` first: only
  whole standard queries reach the resolver.  The first message refused ends the
  forwarding as on the fast path (:mod:`.dnstcp`): the resolver gets a FIN after the
  messages before it, its answers still come back, then the connection closes; later
  bytes from the namespace are acknowledged and dropped.

Everything runs on the engine's loop thread.  The host sockets are made in this
process's network namespace — the host's — like every engine socket.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from nsbridge.errors import errno_name
from nsbridge.net.addresses import format_sockaddr
from nsbridge.relay.loop import ET, IN, OUT, RDHUP, EventLoop, Timer
from nsbridge.relay.tcp import reset_and_close
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.redirect import DEFAULT_CONNECT_TIMEOUT, RedirectStats
from nsbridge.usernet.proto.dns import DnsStream
from nsbridge.usernet.proto.packetbuild import build_tcp_rst
from nsbridge.usernet.proto.packets import TCP, TCP_ACK, TCP_RST, TCP_SYN, Parsed
from nsbridge.usernet.proto.policy import Allow, AllowResolver, Deny, Policy
from nsbridge.usernet.proto.tcpstate import (
    MAX_SEGMENT,
    Actions,
    Budget,
    State,
    TcpConn,
    clock_iss,
)

log = logging.getLogger("nsbridge")

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
DEFAULT_MAX_CONNECTIONS = 4096
_DISCARD_CHUNK = 1 << 20

FlowKey = tuple[bytes, int, bytes, int]  # namespace ip, port, destination ip, port


def unavailable() -> str | None:
    """Why this kernel cannot run the tun TCP path (one line), or None if it can.

    The path keeps unacknowledged bytes in the host socket and needs ``SO_PEEK_OFF`` on
    TCP sockets, which Linux has since 6.9."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError as exc:
        return f"the tun TCP path needs SO_PEEK_OFF on TCP sockets (Linux 6.9+): {exc.strerror}"
    finally:
        sock.close()
    return None


@dataclass
class TunTcpStats(RedirectStats):
    """The fast path's counters, plus what only a user-space TCP end has."""

    retransmits: int = 0  # go-back-N rewinds (timeouts and triple duplicate ACKs)
    refused_full: int = 0  # SYNs reset because max_connections were open
    inbound: int = 0  # published-port clients dialed through the device
    inbound_refused: int = 0  # ... whose guest port reset our SYN
    inbound_timeout: int = 0  # ... whose SYN the guest never answered
    inbound_bad_ack: int = 0  # segments acknowledging what our SYN was not (reset)


class _Flow:
    """One terminated connection: its protocol state, host socket and backlog."""

    __slots__ = (
        "closing",
        "conn",
        "connected",
        "dns",
        "down",
        "fd",
        "key",
        "pending",
        "shut",
        "sock",
        "timer",
        "up",
    )

    def __init__(self, key: FlowKey, conn: TcpConn, sock: socket.socket) -> None:
        self.key = key
        self.conn = conn
        self.sock = sock
        self.fd = sock.fileno()
        self.pending = bytearray()  # namespace bytes the host socket has not taken yet
        self.shut = False  # the namespace's FIN must become shutdown(SHUT_WR)
        self.closing = False  # both directions done: close once the backlog is written
        self.connected = False
        self.dns: DnsStream | None = None  # set for a connection to the DNS address
        self.timer: Timer | None = None
        self.up = 0  # bytes namespace -> host, written to the host socket
        self.down = 0  # bytes host -> namespace, acknowledged by the namespace


class TunTcp:
    """Terminates the namespace's TCP connections that reach the tun (see module doc).

    ``write`` writes one frame to the tun and ``writev`` a frame given in parts (the
    engine's, so its frame counters stay whole); ``source_ok`` is the engine's
    anti-spoofing check for a new flow.  ``offload``: the tun has a virtio header with
    checksum offload, so the kernel computes checksums and splits GSO frames.
    ``outbound``: the source addresses host sockets are bound to (:mod:`.outbound`).
    """

    def __init__(
        self,
        loop: EventLoop,
        write: Callable[[bytes], None],
        writev: Callable[[Sequence[bytes | memoryview]], None],
        policy: Policy,
        *,
        source_ok: Callable[[Parsed], bool],
        resolvers: Sequence[tuple[str, int]] = (),
        vnet: bool = True,
        offload: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        outbound: OutboundAddresses = NONE,
        serve_outbound: bool = True,
    ) -> None:
        self.loop = loop
        self.outbound = outbound
        # False: inbound flows only (the fast path carries the outbound ones)
        self.serve_outbound = serve_outbound
        self._write = write
        self._writev = writev
        self.policy = policy
        self._source_ok = source_ok
        self.resolvers = list(resolvers)
        self.vnet = vnet
        self.offload = offload and vnet
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.stats = TunTcpStats()
        self.budget = Budget()  # buffer space shared by every connection
        self.flows: dict[FlowKey, _Flow] = {}
        self._buf = bytearray(MAX_SEGMENT)
        self._view = memoryview(self._buf)
        self._scratch = bytearray(_DISCARD_CHUNK)  # MSG_TRUNC target: never written
        self._closed = False
        self._iss_secret = os.urandom(16)  # keys the active open's sequence numbers

    # ---- the engine's tcp_handler ----------------------------------------------------------

    def handle(self, parsed: Parsed) -> bool:
        """Take one TCP segment from the namespace; False lets the engine reset it (a
        segment of no connection we know, other than a SYN)."""
        tcp = parsed.l4
        assert isinstance(tcp, TCP)
        ip = parsed.ip
        key = (ip.src, tcp.sport, ip.dst, tcp.dport)
        flow = self.flows.get(key)
        if flow is None:
            if (tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN or self._closed
                    or not self.serve_outbound):
                return False
            self._open(parsed, tcp, key)
            return True
        conn = flow.conn
        if conn.state is State.SYN_SENT:
            self._on_answer(flow, conn.on_segment(tcp))
            return True
        self._apply(flow, conn.on_segment(tcp))
        return True

    def in_use(self, guest: tuple[bytes, int], client: tuple[bytes, int]) -> bool:
        """A flow between these ends exists (an inbound one must pick another port)."""
        return (guest[0], guest[1], client[0], client[1]) in self.flows

    def open_inbound(self, sock: socket.socket, client: tuple[bytes, int],
                     guest: tuple[bytes, int]) -> bool:
        """Dial ``guest`` (address, port) through the device as ``client`` (the address
        and port the guest will see), with ``sock`` (an accepted, non-blocking client) as
        the host socket.  False, and ``sock`` untouched, when the flow cannot be made
        (closing, :attr:`max_connections` open, or the ends are :meth:`in_use`)."""
        key = (guest[0], guest[1], client[0], client[1])
        if self._closed or key in self.flows:
            return False
        if len(self.flows) >= self.max_connections:
            self.stats.refused_full += 1
            log.warning("usernet tcp: %d connections open, refusing a client of %s",
                        len(self.flows), _shown(*guest))
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.warning("usernet tcp: cannot set up a published port's client: %s",
                        exc.strerror)
            return False
        iss = clock_iss(client, guest, time.monotonic_ns(), self._iss_secret)
        conn, syn = TcpConn.active_open(client, guest, iss, vnet=self.vnet,
                                        offload=self.offload, budget=self.budget)
        flow = _Flow(key, conn, sock)
        flow.connected = True
        self.flows[key] = flow
        self.stats.inbound += 1
        self.stats.active += 1
        self.loop.add(flow.fd, IN | OUT | RDHUP | ET, partial(self._on_host, flow))
        self._write(syn)
        self._arm(flow)
        return True

    def _on_answer(self, flow: _Flow, actions: Actions) -> None:
        """The guest's segment for our SYN: counted by what it was, then done."""
        if actions.abort:
            self.stats.inbound_refused += 1
            log.info("usernet tcp: %s -> %s refused by the namespace",
                     _shown(flow.key[2], flow.key[3]), _shown(flow.key[0], flow.key[1]))
        elif actions.frames and flow.conn.state is State.SYN_SENT:
            self.stats.inbound_bad_ack += 1
        self._apply(flow, actions)

    def snapshot(self) -> TunTcpStats:
        """The counters, with the bytes of open connections so far."""
        stats = TunTcpStats(**{**self.stats.__dict__, "denied": self.stats.denied.copy(),
                               "dns_refused": self.stats.dns_refused.copy()})
        for flow in self.flows.values():
            stats.bytes_up += flow.up
            stats.bytes_down += flow.down
        return stats

    def close(self) -> None:
        """Reset every connection both ways (idempotent)."""
        self._closed = True
        for flow in list(self.flows.values()):
            if flow.conn.state is not State.CLOSED:
                self._write(flow.conn.reset())
            self._finish(flow, reset=True)

    # ---- opening ------------------------------------------------------------------------

    def _open(self, parsed: Parsed, tcp: TCP, key: FlowKey) -> None:
        if not self._source_ok(parsed):
            return
        shown = _shown(parsed.ip.dst, tcp.dport)
        if len(self.flows) >= self.max_connections:
            self.stats.refused_full += 1
            log.warning("usernet tcp: %d connections open, resetting a new one to %s",
                        len(self.flows), shown)
            self._reset_syn(parsed)
            return
        decision = self.policy.decide("tcp", parsed.ip.dst, tcp.dport)
        if isinstance(decision, Deny):
            self.stats.denied[decision.reason] += 1
            if log.isEnabledFor(logging.INFO):
                log.info("usernet tcp: %s -> %s denied: %s",
                         _shown(parsed.ip.src, tcp.sport), shown, decision.reason)
            self._reset_syn(parsed)
            return
        if isinstance(decision, AllowResolver):
            resolvers = self.resolvers if decision.targets is None else decision.targets
            if not resolvers:
                self.stats.denied["no host resolver"] += 1
                self._reset_syn(parsed)
                return
            target: tuple[str, int] = resolvers[0]
        else:
            assert isinstance(decision, Allow)
            target = (str(decision.host_ip), decision.host_port)
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.warning("usernet tcp: cannot create a socket for %s: %s", shown, exc.strerror)
            self.stats.connect_failed += 1
            self._reset_syn(parsed)
            return
        conn = TcpConn(parsed, random.getrandbits(32), vnet=self.vnet, offload=self.offload,
                       budget=self.budget)
        flow = _Flow(key, conn, sock)
        if isinstance(decision, AllowResolver):
            flow.dns = DnsStream()
        self.flows[key] = flow
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            self.outbound.bind(sock, target[0])
        except OSError as exc:  # the outbound address left the host
            code = exc.errno or errno.EADDRNOTAVAIL
        else:
            code = sock.connect_ex(target)
        if code not in (0, errno.EINPROGRESS):
            self._connect_failed(flow, code)
            return
        self.loop.add(flow.fd, OUT, partial(self._on_connect, flow))
        flow.timer = self.loop.call_later(self.connect_timeout,
                                          partial(self._connect_failed, flow, errno.ETIMEDOUT))

    def _reset_syn(self, parsed: Parsed) -> None:
        reset = build_tcp_rst(parsed, vnet=self.vnet)
        if reset is not None:
            self._write(reset)

    def _on_connect(self, flow: _Flow, _events: int) -> None:
        code = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.loop.remove(flow.fd)
            self._connect_failed(flow, code, registered=False)
            return
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        sock = flow.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.warning("usernet tcp: cannot set up the host socket: %s", exc.strerror)
            self._write(flow.conn.reset())
            self._finish(flow, reset=True)
            return
        flow.connected = True
        self.loop.modify(flow.fd, IN | OUT | RDHUP | ET)
        self.loop.set_handler(flow.fd, partial(self._on_host, flow))
        self._write(flow.conn.accepted())
        self._arm(flow)

    def _connect_failed(self, flow: _Flow, code: int, *, registered: bool = True) -> None:
        if flow.conn.state is State.CLOSED:
            return
        if registered and flow.timer is not None and code != errno.ETIMEDOUT:
            flow.timer.cancel()
        flow.timer = None
        if registered and code == errno.ETIMEDOUT:
            self.loop.remove(flow.fd)
        self.stats.connect_failed += 1
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: %s -> %s failed: %s", _shown(flow.key[0], flow.key[1]),
                     _shown(flow.key[2], flow.key[3]), errno_name(code))
        self._write(flow.conn.refused())
        self._finish(flow, reset=True, registered=False, counted=False)

    # ---- doing what the protocol says ---------------------------------------------------

    def _apply(self, flow: _Flow, actions: Actions) -> None:
        for frame in actions.frames:
            self._write(frame)
        if actions.abort:
            self._finish(flow, reset=True)
            return
        if not flow.connected:
            return
        if actions.discard:
            self._discard(flow, actions.discard)
        if actions.rewind:
            self.stats.retransmits += 1
            try:
                flow.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            except OSError:
                pass
        if actions.deliver:
            self._deliver(flow, actions.deliver)
        if actions.shutdown:
            flow.shut = True
            if not flow.pending:
                self._shutdown_host(flow)
        if actions.done:
            flow.closing = True
            if not flow.pending:
                self._finish(flow)
                return
        if actions.pull:
            self._pull(flow)
        self._arm(flow)

    def _deliver(self, flow: _Flow, data: bytes) -> None:
        if flow.dns is not None:
            data = self._check_dns(flow, flow.dns, data)
        if not data:
            pass
        elif not flow.pending:
            try:
                sent = flow.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._host_failed(flow, exc)
                return
            flow.up += sent
            if sent < len(data):
                flow.pending += data[sent:]
        else:
            flow.pending += data
        if flow.dns is not None and flow.shut and not flow.pending:
            self._shutdown_host(flow)  # a refused DNS message: what passed is written
        for frame in flow.conn.host_drained(len(flow.pending)):
            self._write(frame)

    def _check_dns(self, flow: _Flow, stream: DnsStream, data: bytes) -> bytes:
        """What of ``data`` may go to the resolver (see the module docstring)."""
        if stream.refused is not None:
            return b""
        before = stream.messages
        data = stream.feed(data)
        self.stats.dns_queries += stream.messages - before
        reason = stream.reason
        if reason is not None:
            self.stats.dns_refused[reason] += 1
            log.info("usernet dns: %s -> %s refused: %s", _shown(flow.key[0], flow.key[1]),
                     _shown(flow.key[2], flow.key[3]), reason)
            flow.shut = True  # the resolver gets a FIN once what passed is written
        return data

    def _flush(self, flow: _Flow) -> None:
        """The host socket has room: write the backlog, then any pending half-close."""
        if flow.pending:
            try:
                sent = flow.sock.send(flow.pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self._host_failed(flow, exc)
                return
            flow.up += sent
            del flow.pending[:sent]
            for frame in flow.conn.host_drained(len(flow.pending)):
                self._write(frame)
            if flow.pending:
                return
        if flow.closing:
            self._finish(flow)
        elif flow.shut:
            self._shutdown_host(flow)

    def _shutdown_host(self, flow: _Flow) -> None:
        flow.shut = False
        try:
            flow.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the host side is already gone; its error arrives on the next read

    def _discard(self, flow: _Flow, count: int) -> None:
        """Consume ``count`` acknowledged bytes from the host socket (no copy)."""
        flow.down += count
        sock, scratch = flow.sock, self._scratch
        while count > 0:
            try:
                got = sock.recv_into(scratch, min(count, _DISCARD_CHUNK), socket.MSG_TRUNC)
            except OSError:
                return
            if got <= 0:
                return
            count -= got

    def _on_host(self, flow: _Flow, events: int) -> None:
        """The host socket is ready.  A ``closing`` flow's connection is CLOSED (both FINs
        are acknowledged) but its backlog still goes to the host: only writes matter."""
        if self.flows.get(flow.key) is not flow:
            return  # forgotten; a new connection may have the same four-tuple
        if events & OUT and (flow.pending or flow.shut or flow.closing):
            self._flush(flow)
            if self.flows.get(flow.key) is not flow:
                return
        if events & ~OUT and not flow.closing:
            self._pull(flow)
            if flow.key in self.flows:
                self._arm(flow)

    def _pull(self, flow: _Flow) -> None:
        """Send the namespace what its window allows, peeking from the host socket."""
        conn, sock, buf, view = flow.conn, flow.sock, self._buf, self._view
        # A TAP (no virtio header) gets MSS-sized segments: nothing there cuts a large
        # frame, and a guest forwarding it (containers behind a bridge) would drop it.
        largest = MAX_SEGMENT if self.vnet else conn.mss
        while True:
            room = conn.sendable()
            if room <= 0:
                break
            try:
                got = sock.recv_into(buf, min(room, largest), socket.MSG_PEEK)
            except BlockingIOError:
                break
            except OSError as exc:
                self._host_failed(flow, exc)
                return
            if got == 0:
                for frame in conn.host_eof():
                    self._write(frame)
                break
            payload = view[:got]
            self._writev((conn.data_head(payload), payload))
        for frame in conn.fin_due():
            self._write(frame)

    def _host_failed(self, flow: _Flow, exc: OSError) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: %s -> %s reset by the host side: %s",
                     _shown(flow.key[0], flow.key[1]), _shown(flow.key[2], flow.key[3]),
                     errno_name(exc.errno))
        if flow.conn.state is not State.CLOSED:  # a closing flow's namespace end is done
            self._write(flow.conn.reset())
        self._finish(flow, reset=True)

    # ---- timers and the end -------------------------------------------------------------

    def _arm(self, flow: _Flow) -> None:
        if flow.timer is None and flow.conn.wants_timer():
            flow.timer = self.loop.call_later(flow.conn.arm(), partial(self._on_timer, flow))

    def _on_timer(self, flow: _Flow) -> None:
        flow.timer = None
        if flow.key not in self.flows or flow.conn.state is State.CLOSED:
            return
        opening = flow.conn.state is State.SYN_SENT
        actions = flow.conn.on_timeout()
        if actions is not None:
            if actions.abort and opening:
                self.stats.inbound_timeout += 1
                log.info("usernet tcp: %s -> %s: the namespace never answered; client reset",
                         _shown(flow.key[2], flow.key[3]), _shown(flow.key[0], flow.key[1]))
            elif actions.abort:
                log.info("usernet tcp: %s -> %s: no acknowledgement after retries; reset",
                         _shown(flow.key[0], flow.key[1]), _shown(flow.key[2], flow.key[3]))
            self._apply(flow, actions)
        if flow.key in self.flows:
            self._arm(flow)

    def _finish(self, flow: _Flow, *, reset: bool = False, registered: bool = True,
                counted: bool = True) -> None:
        """Forget a connection and close its host socket (with a reset if ``reset``);
        ``counted=False`` when the caller counted it already (a failed connect)."""
        if self.flows.pop(flow.key, None) is None:
            return
        flow.conn.abandon()
        flow.pending = bytearray()
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if registered:
            self.loop.remove(flow.fd)
        if reset:
            reset_and_close(flow.sock)
        else:
            flow.sock.close()
        self.stats.active -= 1
        if counted:
            if reset:
                self.stats.reset += 1
            else:
                self.stats.closed += 1
        self.stats.bytes_up += flow.up
        self.stats.bytes_down += flow.down


def _shown(ip: bytes, port: int) -> str:
    family = socket.AF_INET if len(ip) == 4 else socket.AF_INET6
    return format_sockaddr((socket.inet_ntop(family, ip), port))

