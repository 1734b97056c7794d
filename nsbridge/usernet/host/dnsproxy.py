"""The DNS proxy: queries to the namespace's DNS address relayed to the host's resolvers.

Why and how:

* Each standard query (:func:`dns.check_query`) is sent from a fresh host socket (a
  kernel-chosen source port per query, so one namespace client cannot steer another's
  answers) to the first host resolver no deny rule covers (the policy names them); on a
  timeout or an error the next one is tried, and when none answers the namespace gets
  SERVFAIL rather than waiting out its own timeouts.
* Anything but a standard query (UPDATE, NOTIFY, zone transfers...) is answered here
  with NOTIMP, REFUSED or FORMERR, counted in ``dns_refused`` by reason and logged at
  ``-v``; garbage no stub could match an answer to is dropped and counted.
* Only a response carrying the query's id counts as the answer (the socket is
  connected, so nothing but the resolver can reach it); at most ``max_pending``
  queries are in flight, and one more is answered SERVFAIL at once.

Supported: DNS over UDP to the DNS address.  Not here: DNS over TCP (the redirect path's
:mod:`.dnstcp` and the tun path's :mod:`.tuntcp` relay it), caching, answers from a
hosts file.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from nsbridge.net.addresses import format_sockaddr
from nsbridge.relay.loop import IN, EventLoop, Timer
from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.replies import BATCH, OFFLOAD_MIN, RECV_SIZE, ip_text
from nsbridge.usernet.proto import dns
from nsbridge.usernet.proto.packetbuild import build_udp
from nsbridge.usernet.proto.packets import UDP, Malformed, Parsed

log = logging.getLogger("nsbridge")

Resolver = tuple[str, int]
ResolverAddress = tuple[int, tuple[Any, ...]]  # (family, sockaddr)


class _DnsQuery:
    """One query in flight to the host resolvers."""

    __slots__ = ("dns_ip", "message", "next_resolver", "ns_src", "query", "resolvers", "sock",
                 "sport", "timer")

    def __init__(
        self, ns_src: bytes, sport: int, dns_ip: bytes, message: bytes, query: dns.DnsQuery,
        resolvers: Sequence[ResolverAddress],
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


class DnsProxy:
    """Relays the namespace's DNS queries (module doc) on ``loop``, answering through
    ``write`` (frames with a virtio header when ``vnet``; large answers leave their UDP
    checksum to the kernel when ``offload``)."""

    def __init__(
        self,
        loop: EventLoop,
        resolvers: Iterable[Resolver],
        stats: EngineStats,
        write: Callable[[bytes], None],
        *,
        vnet: bool,
        offload: bool,
        timeout: float,
        max_pending: int,
        outbound: OutboundAddresses = NONE,
    ) -> None:
        self._loop = loop
        self.outbound = outbound  # the resolvers are dialed like any outbound flow
        self.resolvers = [resolver_sockaddr(host, port) for host, port in resolvers]
        # The sockaddrs of the resolvers a policy decision names, by their tuple of (ip, port).
        self._resolver_lists: dict[tuple[Resolver, ...], list[ResolverAddress]] = {}
        self.stats = stats
        self._write = write
        self._vnet = vnet
        self._offload = offload
        self.timeout = timeout
        self.max_pending = max_pending
        self._pending: dict[int, _DnsQuery] = {}

    def close(self) -> None:
        """Abandon every query in flight (closing its socket and timer)."""
        for query in list(self._pending.values()):
            self._finish(query)

    def query(self, parsed: Parsed, udp: UDP, targets: tuple[Resolver, ...] | None) -> None:
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
                         format_sockaddr((ip_text(parsed.ip.src), udp.sport)),
                         format_sockaddr((ip_text(parsed.ip.dst), udp.dport)), query.reason)
            pending = _DnsQuery(parsed.ip.src, udp.sport, parsed.ip.dst, b"", query.query, ())
            self._answer(pending, dns.refusal(query))
            return
        resolvers = self.resolvers if targets is None else self._resolver_list(targets)
        pending = _DnsQuery(parsed.ip.src, udp.sport, parsed.ip.dst, udp.payload, query,
                            resolvers)
        if len(self._pending) >= self.max_pending:
            stats.drops["dns too many pending"] += 1
            self._answer(pending, dns.servfail(query))
            stats.dns_failures += 1
            return
        self._ask_next(pending)

    def _resolver_list(self, targets: tuple[Resolver, ...]) -> list[ResolverAddress]:
        found = self._resolver_lists.get(targets)
        if found is None:
            found = [resolver_sockaddr(host, port) for host, port in targets]
            self._resolver_lists[targets] = found
        return found

    def _ask_next(self, query: _DnsQuery) -> None:
        """Send the query to the next resolver that takes it; SERVFAIL when none is left."""
        self._finish(query)
        while query.next_resolver < len(query.resolvers):
            family, sockaddr = query.resolvers[query.next_resolver]
            query.next_resolver += 1
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            except OSError:
                self.stats.dns_retries += 1
                continue
            try:
                self.outbound.bind(sock, sockaddr[0])
                sock.connect(sockaddr)
                sock.send(query.message)
            except OSError:
                sock.close()
                self.stats.dns_retries += 1
                continue
            query.sock = sock
            self._pending[sock.fileno()] = query
            self._loop.add(sock.fileno(), IN, partial(self._on_reply, query))
            query.timer = self._loop.call_later(self.timeout, partial(self._on_timeout, query))
            return
        self.stats.dns_failures += 1
        self._answer(query, dns.servfail(query.query))

    def _on_reply(self, query: _DnsQuery, _events: int) -> None:
        sock = query.sock
        assert sock is not None
        for _ in range(BATCH):
            try:
                reply = sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.stats.dns_retries += 1  # ECONNREFUSED: nobody listens there
                self._ask_next(query)
                return
            # Only a response to this query counts; anything else is ignored (the
            # socket is connected, so it can only come from the resolver itself).
            if (
                len(reply) >= dns.HEADER_LENGTH
                and reply[:2] == query.message[:2]
                and reply[2] & 0x80
            ):
                self._finish(query)
                self.stats.dns_answers += 1
                self._answer(query, reply)
                return

    def _on_timeout(self, query: _DnsQuery) -> None:
        query.timer = None
        self.stats.dns_retries += 1
        self._ask_next(query)

    def _finish(self, query: _DnsQuery) -> None:
        """Forget the query's current socket and timer (before a retry or at the end)."""
        if query.timer is not None:
            query.timer.cancel()
            query.timer = None
        if query.sock is not None:
            fd = query.sock.fileno()
            self._pending.pop(fd, None)
            self._loop.remove(fd)
            query.sock.close()
            query.sock = None

    def _answer(self, query: _DnsQuery, message: bytes) -> None:
        try:
            frame = build_udp(
                query.dns_ip,
                query.ns_src,
                dns.DNS_PORT,
                query.sport,
                message,
                offload=self._offload and len(message) > OFFLOAD_MIN,
                vnet=self._vnet,
            )
        except ValueError:  # a 64 KiB answer does not fit the IP packet
            self.stats.drops["dns answer too large"] += 1
            return
        self._write(frame)


def resolver_sockaddr(host: str, port: int) -> ResolverAddress:
    """(family, sockaddr) of a numeric resolver address; ``fe80::1%eth0`` scopes kept."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except (ValueError, OSError):
        raise ValueError(f"resolver {host!r} is not an IP address") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr
