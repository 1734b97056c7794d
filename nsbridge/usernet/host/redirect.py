"""The TCP fast path of user-mode networking: redirected connections, relayed by the kernel.

Inside the namespace an nftables rule (:mod:`~nsbridge.usernet.inside.nft`) rewrites every
outbound TCP connection to a local listener.  That listener was created *inside* the namespace (so
the namespace's connections can reach it) but its fd belongs to the host side, which
accepts here, in its own namespace.  For each connection:

1. ``SO_ORIGINAL_DST`` (``IP6T_SO_ORIGINAL_DST`` for IPv6) on the accepted socket gives
   the destination the program inside asked for — conntrack remembers it from before
   the redirect.
2. :meth:`Policy.decide <nsbridge.usernet.proto.policy.Policy.decide>` says whether and where
   to dial.  A refusal resets the client at once (``SO_LINGER`` 0): the program sees
   "connection reset" immediately instead of waiting for a timeout.
3. Allowed: a socket made in the host's namespace dials the target, and a
   :class:`~nsbridge.relay.tcp.TcpSession` relays kernel socket to kernel socket
   (``splice``), carrying half-closes and resets.  A refused or unreachable target
   resets the client, as for any nsbridge forward.  A connection to the namespace's
   DNS address goes to a host resolver through :class:`~nsbridge.usernet.host.dnstcp.
   DnsTcpRelay` instead, which forwards only standard queries.

There is no user-space TCP stack on this path: the namespace's kernel speaks TCP to the
program, the host's kernel speaks TCP to the server, and the bytes move between the two
sockets.  What the program cannot see is its true peer address (``getpeername`` says the
real destination only because of conntrack; the server sees the host's address).

Setup, from the caller's point of view (``/dev/net/tun`` is often mode 0600, so the
sandbox creator may need to be root; inside the new user namespace it is root anyway)::

    handle = Sandbox.create(cmd, config, extra=setup_inside, hold=True)
    redirector = TcpRedirector.from_fds(loop, handle.take_extra(), policy, resolvers=...)
    redirector.start()
    handle.start()

:func:`setup_inside` runs in the sandbox's helper, inside the namespace: it binds the
listeners and programs the redirect to their port.  With ``optional=True`` (see
:func:`setup_inside_optional`) a namespace without nf_tables yields no fds, and the
caller serves TCP through the tun device instead.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nsbridge.defaults import CONNECT_TIMEOUT
from nsbridge.errors import errno_name
from nsbridge.net.addresses import format_sockaddr
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.movers import MoverName, make_mover
from nsbridge.relay.tcp import Mover, TcpSession, peer_name, reset_and_close, tally
from nsbridge.usernet.host.dnstcp import DnsTcpRelay
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.inside.netconf import SetupError
from nsbridge.usernet.proto.policy import Allow, AllowResolver, Deny, Policy

log = logging.getLogger("nsbridge")

# <linux/netfilter_ipv4.h> SO_ORIGINAL_DST and <linux/netfilter_ipv6/ip6_tables.h>
# IP6T_SO_ORIGINAL_DST: both 80, at SOL_IP / SOL_IPV6.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IPV6_FREEBIND = 78  # <linux/in6.h>; not in Python's socket module
_BIND_ATTEMPTS = 20
DEFAULT_CONNECT_TIMEOUT = CONNECT_TIMEOUT
NO_ORIGINAL_DST = "not redirected"  # the denial reason for a direct connection


# ---- inside the namespace --------------------------------------------------------------


def make_redirect_listeners(
    port: int = 0, *, backlog: int = 4096, wildcard: bool = False
) -> list[socket.socket]:
    """Bind the redirect listeners: ``127.0.0.1:PORT`` and ``[::1]:PORT`` (IPV6_V6ONLY).

    Call it INSIDE the namespace.  Both use the same port because one nftables rule
    redirects both families to one port; with ``port=0`` the kernel picks the IPv4 port
    and the IPv6 socket takes the same one (retried if it is taken).  Without IPv6 in
    the namespace only the IPv4 listener is returned.

    Loopback, not the wildcard address: ``redirect`` in the output hook rewrites the
    destination to ``127.0.0.1`` / ``::1``, so that is all that must listen; a wildcard
    bind would also accept connections arriving from the tun device (from outside)
    and take PORT away on every address of the namespace.  ``wildcard=True`` binds
    ``0.0.0.0`` / ``::`` instead, for a caller that redirects in another hook.
    """
    if not 0 <= port <= 65535:
        raise SetupError(f"redirect port {port} is not 0-65535")
    for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
        v4 = _listener(socket.AF_INET, "0.0.0.0" if wildcard else "127.0.0.1", port, backlog)
        chosen = v4.getsockname()[1]
        try:
            v6 = _listener(socket.AF_INET6, "::" if wildcard else "::1", chosen, backlog)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                # ::1 appears only once lo is up.  In a namespace its owner is still
                # setting up (rootlesskit brings lo up after its helper said "ready")
                # the listener binds it in advance, and receives once lo is up.
                try:
                    v6 = _listener(socket.AF_INET6, "::1", chosen, backlog, freebind=True)
                except OSError:
                    return [v4]  # no IPv6 here (disabled)
                return [v4, v6]
            if exc.errno == errno.EAFNOSUPPORT:
                return [v4]  # no IPv6 in this kernel
            v4.close()
            if exc.errno == errno.EADDRINUSE and port == 0:
                continue
            raise SetupError(
                f"cannot listen on IPv6 port {chosen} in the namespace: {exc.strerror}"
            ) from None
        return [v4, v6]
    raise SetupError(
        f"no port free for both IPv4 and IPv6 after {_BIND_ATTEMPTS} attempts"
    )


def _listener(family: int, host: str, port: int, backlog: int, *,
              freebind: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if family == socket.AF_INET:
            raise SetupError(
                f"cannot listen on {host}:{port} in the namespace: {exc.strerror}"
            ) from None
        raise
    return sock


def setup_inside(port: int = 0, *, optional: bool = False, device: str | None = None,
                 forwarded: str | None = None) -> list[socket.socket]:
    """The sandbox ``extra`` callback: listeners, then the nftables redirect to their port
    (of the TCP leaving by ``device`` only, when given: a namespace nsbridge did not make;
    with ``forwarded``, also of the TCP the namespace forwards out of that device, for
    which the listeners listen on every address: see :mod:`~nsbridge.usernet.inside.nft`).

    Listeners come first so the rule never points at a port nobody holds.  Raises
    :class:`~nsbridge.usernet.inside.nft.NftUnavailable` (the sandbox reports its text; see
    :func:`~nsbridge.usernet.inside.nft.is_unavailable`) when nf_tables cannot be used — or,
    with ``optional=True``, returns ``[]`` instead so the caller falls back to the tun
    path without creating the namespace again.
    """
    # Imported here, not at the top: it loads pyroute2 (tens of ms), which the tun path
    # (tuntcp.py imports this module) never needs.  Callers that run this step import
    # it before forking the helper it runs in (runner._redirect_setup).
    from nsbridge.usernet.inside import nft

    listeners = make_redirect_listeners(port, wildcard=forwarded is not None)
    try:
        nft.program_redirect(listeners[0].getsockname()[1], device=device, forwarded=forwarded)
    except nft.NftUnavailable:
        for sock in listeners:
            sock.close()
        if optional:
            return []
        raise
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def setup_inside_optional() -> list[socket.socket]:
    """:func:`setup_inside` with ``optional=True``: an ``extra`` callback that yields no
    fds (rather than failing the sandbox) when nf_tables is unavailable."""
    return setup_inside(optional=True)


# ---- on the host side ------------------------------------------------------------------


@dataclass
class RedirectStats:
    """Counters of the fast path; ``denied`` is keyed by the policy's reason."""

    accepted: int = 0  # connections accepted from the namespace
    active: int = 0  # being relayed (or dialed) now
    closed: int = 0  # ended with FIN both ways
    reset: int = 0  # ended by a reset from either side
    connect_failed: int = 0  # the target refused, was unreachable, or timed out
    denied: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0  # namespace -> target
    bytes_down: int = 0  # target -> namespace
    dns_queries: int = 0  # DNS-over-TCP messages checked and relayed to a resolver
    dns_refused: Counter[str] = field(default_factory=Counter)  # connections ended, by reason

    def as_dict(self) -> dict:
        return {name: dict(value) if isinstance(value, Counter) else value
                for name, value in self.__dict__.items()}


class TcpRedirector:
    """Accepts redirected connections on the namespace's listeners; relays the allowed.

    Runs on an :class:`~nsbridge.relay.loop.EventLoop`; every method except
    :meth:`from_fds` and the constructor must be called on the loop's thread (or before
    the loop runs).  Target sockets are created in the namespace of the loop's thread —
    the host's.  ``resolvers`` are the host's DNS servers (``(ip, port)``); a TCP
    connection to the namespace's DNS address is relayed to the first one that no deny
    rule covers, by a :class:`~nsbridge.usernet.host.dnstcp.DnsTcpRelay`.  Target sockets
    are bound to ``outbound``'s address of their family, if any (:mod:`.outbound`).
    """

    def __init__(
        self,
        loop: EventLoop,
        listeners: Iterable[socket.socket],
        policy: Policy,
        *,
        resolvers: Sequence[tuple[str, int]] = (),
        mover: Mover | MoverName = "splice",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        outbound: OutboundAddresses = NONE,
    ) -> None:
        self.loop = loop
        self.outbound = outbound
        self.listeners = list(listeners)
        self.policy = policy
        self.resolvers = list(resolvers)
        self.mover: Mover = make_mover(mover) if isinstance(mover, str) else mover
        self.connect_timeout = connect_timeout
        self.stats = RedirectStats()
        self.sessions: set[TcpSession | DnsTcpRelay] = set()
        self._acceptors: list[Acceptor] = []
        self._started = False
        # The listeners' port: a connection whose original destination is this port on
        # the address it arrived at was made straight to a listener, not redirected.
        self._port = self.listeners[0].getsockname()[1] if self.listeners else None

    @classmethod
    def from_fds(
        cls, loop: EventLoop, fds: Iterable[int], policy: Policy, **kwargs: object
    ) -> TcpRedirector:
        """Wrap listening fds handed back by the sandbox (``handle.take_extra()``); the
        redirector owns them from now on."""
        listeners = [socket.socket(fileno=fd) for fd in fds]
        return cls(loop, listeners, policy, **kwargs)  # type: ignore[arg-type]

    # ---- running ------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting (relay/accept.py's policy: a burst of clients is drained in
        batches, and running out of fds pauses accepting instead of spinning)."""
        if self._started:
            return
        self._started = True
        for listener in self.listeners:
            acceptor = Acceptor(self.loop, listener, self._on_client,
                                name=f"usernet tcp {format_sockaddr(listener.getsockname())}")
            self._acceptors.append(acceptor)
            acceptor.start()

    def stop_listening(self) -> None:
        """Close the listeners; relayed connections carry on.  New connections from the
        namespace are then refused by its kernel (nothing listens on the port)."""
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def abort_all(self, outcome: str = "reset by nsbridge") -> None:
        """Reset every relayed connection (shutdown without drain)."""
        for session in list(self.sessions):
            session.abort(outcome)

    def close(self) -> None:
        """Stop listening and reset what is still relayed."""
        self.stop_listening()
        self.abort_all()

    def snapshot(self) -> RedirectStats:
        """The counters, with the bytes that open connections moved so far."""
        stats = RedirectStats(**{**self.stats.__dict__, "denied": Counter(self.stats.denied),
                                 "dns_refused": Counter(self.stats.dns_refused)})
        for session in self.sessions:
            stats.bytes_up += session.up.total
            stats.bytes_down += session.down.total
            if isinstance(session, DnsTcpRelay):
                stats.dns_queries += session.stream.messages
        return stats

    # ---- accepting ----------------------------------------------------------------

    def _on_client(self, client: socket.socket, _peer: object) -> None:
        self.stats.accepted += 1
        self._handle(client)

    def _handle(self, client: socket.socket) -> None:
        destination = original_destination(client)
        if destination is None or (destination[1] == self._port
                                   and _is_local_end(client, destination[0])):
            self._deny(client, NO_ORIGINAL_DST, "?")
            return
        ip, port = destination
        decision = self.policy.decide("tcp", ip, port)
        shown = format_sockaddr((str(ip), port))
        if isinstance(decision, Deny):
            self._deny(client, decision.reason, shown)
            return
        if isinstance(decision, AllowResolver):
            resolvers = self.resolvers if decision.targets is None else decision.targets
            if not resolvers:
                self._deny(client, "no host resolver", shown)
                return
            self._relay_dns(client, shown, resolvers[0])
            return
        assert isinstance(decision, Allow)
        self._relay(client, shown, (str(decision.host_ip), decision.host_port))

    def _deny(self, client: socket.socket, reason: str, shown: str) -> None:
        self.stats.denied[reason] += 1
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: %s -> %s denied: %s", peer_name(client), shown, reason)
        reset_and_close(client)

    def _server_socket(self, client: socket.socket, shown: str,
                       target: tuple[str, int]) -> socket.socket | None:
        """The host-side socket that will dial ``target``; on failure (EMFILE...) the
        client is reset, the failure counted and logged, and None returned."""
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.outbound.bind(sock, target[0])
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            log.warning("usernet tcp: cannot create a socket for %s: %s", shown, exc.strerror)
            self.stats.connect_failed += 1
            reset_and_close(client)
            return None

    def _relay(self, client: socket.socket, shown: str, target: tuple[str, int]) -> None:
        server = self._server_socket(client, shown, target)
        if server is None:
            return
        dialed = format_sockaddr(target)
        server_name = shown if dialed == shown else f"{shown} (dialed {dialed})"
        session = TcpSession(self.loop, self.mover, client, server, self._session_done,
                             server_name=server_name)
        self.sessions.add(session)
        self.stats.active += 1
        session.connect(target, self.connect_timeout)

    def _relay_dns(self, client: socket.socket, shown: str, target: tuple[str, int]) -> None:
        server = self._server_socket(client, shown, target)
        if server is None:
            return
        client_name = peer_name(client)
        relay = DnsTcpRelay(self.loop, client, server, self._session_done,
                            lambda reason: self._dns_refused(client_name, shown, reason),
                            client_name=client_name,
                            server_name=f"{shown} (dialed {format_sockaddr(target)})")
        self.sessions.add(relay)
        self.stats.active += 1
        relay.connect(target, self.connect_timeout)

    def _dns_refused(self, client_name: str, shown: str, reason: str) -> None:
        self.stats.dns_refused[reason] += 1
        log.info("usernet dns: %s -> %s refused: %s", client_name, shown, reason)

    def _session_done(self, session: TcpSession | DnsTcpRelay) -> None:
        self.sessions.discard(session)
        if isinstance(session, DnsTcpRelay):
            self.stats.dns_queries += session.stream.messages
        tally(self.stats, session)  # type: ignore[arg-type]  # the same fields
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: %s", session.describe())


def _is_local_end(client: socket.socket,
                  ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is the address ``client`` was accepted on (no NAT happened)."""
    try:
        return ipaddress.ip_address(client.getsockname()[0]) == ip
    except OSError:
        return True  # the client is already gone: nothing to relay


def original_destination(
    client: socket.socket,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The destination the namespace's program dialed, before the redirect; None when
    conntrack has no record (a connection made straight to the listener)."""
    try:
        if client.family == socket.AF_INET6:
            raw = client.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return ipaddress.IPv6Address(raw[8:24]), port
        raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return ipaddress.IPv4Address(raw[4:8]), port
    except OSError as exc:
        log.debug("usernet tcp: no original destination: %s", errno_name(exc.errno))
        return None
