"""Published TCP ports that keep their client's address (device mode).

A published port made as an ordinary forward (splice mode) connects inside the namespace
from a socket of the namespace's own, so the server there sees 127.0.0.1.  Here the host
side owns the listening socket (made in this process's network namespace, the host's),
accepts each client and hands it to :meth:`TunTcp.open_inbound
<nsbridge.usernet.host.tuntcp.TunTcp.open_inbound>`, which dials the guest *through the
device* with the client's address as the source, as slirp4netns does: a client on the
host's loopback is the gateway (10.0.2.2 / ``fd00::2``), any other client itself
(:func:`~nsbridge.usernet.proto.inboundaddr.client_inside` says which).  The client's port
is kept too, unless a flow between the same ends exists already (two loopback clients
both shown as the gateway may collide); then a free one is picked.

The guest is dialed at its interface address (10.0.2.100 / ``fd00::100`` unless the
caller names another address of the namespace's network), not its loopback: a server
listening only on 127.0.0.1 inside is not reachable this way, as with docker and podman.

Policy: the flow exists only for the guest's packets of exactly that four-tuple, so a
guest answering cannot open anything else; once the flow has ended, its packets are
strays the engine resets.  A client the flow table cannot take (full, closing) is reset.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from functools import partial

from nsbridge.errors import UserError
from nsbridge.net.addresses import HostPort, format_sockaddr
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.tcp import reset_and_close
from nsbridge.usernet.host.tuntcp import TunTcp
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.inboundaddr import IPAddress, client_inside, guest_target_problem

log = logging.getLogger("nsbridge")

BACKLOG = 512
EPHEMERAL = (32768, 60999)  # where a colliding client's port is moved to (Linux's range)
_PORT_TRIES = 64


class InboundPort:
    """One published port: its listener and the guest address and port it dials."""

    __slots__ = ("acceptor", "guest", "guest_ip", "listen_address", "listener", "name")

    def __init__(self, name: str, listener: socket.socket, guest_ip: IPAddress,
                 guest_port: int) -> None:
        self.name = name
        self.listener = listener
        self.guest_ip = guest_ip
        self.guest = (guest_ip.packed, guest_port)
        host, port = listener.getsockname()[:2]
        self.listen_address = HostPort(host, port)
        self.acceptor: Acceptor | None = None


class InboundPorts:
    """The device-mode published ports of one namespace (on its loop's thread)."""

    def __init__(self, loop: EventLoop, tun_tcp: TunTcp, addresses: UsernetAddresses) -> None:
        self.loop = loop
        self.tun_tcp = tun_tcp
        self.addresses = addresses
        self.ports: list[InboundPort] = []
        self.moved_ports = 0  # clients whose port collided and was replaced
        self.refused = 0  # clients reset because no flow could be made

    def serves(self, guest_ip: str) -> bool:
        """Whether ``guest_ip`` is an address this path may dial (one of the namespace's
        network; see :func:`~nsbridge.usernet.proto.inboundaddr.guest_target_problem`)."""
        try:
            guest = ipaddress.ip_address(guest_ip)
        except ValueError:
            return False
        return guest_target_problem(guest, self.addresses) is None

    def add(self, host: HostPort, guest_ip: str, guest_port: int, *, name: str) -> InboundPort:
        """Listen on ``host`` and dial ``guest_ip:guest_port`` for each client.  Raises
        UserError with one line when the guest address is not the namespace's or the
        host address cannot be listened on (in use, not local)."""
        try:
            guest = ipaddress.ip_address(guest_ip)
        except ValueError:
            raise UserError(f"{name}: {guest_ip!r} is not an IP address") from None
        problem = guest_target_problem(guest, self.addresses)
        if problem is not None:
            raise UserError(f"{name}: {problem}")
        port = InboundPort(name, _listen(host, name), guest, guest_port)
        port.acceptor = Acceptor(self.loop, port.listener, partial(self._on_client, port),
                                 name=f"{name} on {port.listen_address}")
        port.acceptor.start()
        self.ports.append(port)
        return port

    def remove(self, port: InboundPort) -> None:
        """Stop listening; connections already made carry on (libslirp's behaviour)."""
        if port in self.ports:
            self.ports.remove(port)
        if port.acceptor is not None:
            port.acceptor.close()
            port.acceptor = None
        port.listener.close()

    def close(self) -> None:
        for port in list(self.ports):
            self.remove(port)

    def _on_client(self, port: InboundPort, client: socket.socket, peer: object) -> None:
        client.setblocking(False)
        assert isinstance(peer, tuple)
        seen = client_inside(peer[0], port.guest_ip, self.addresses)
        ends = (seen.packed, peer[1])
        if self.tun_tcp.in_use(port.guest, ends):
            moved = self._free_port(port, seen.packed)
            if moved is None:
                self.refused += 1
                reset_and_close(client)
                return
            self.moved_ports += 1
            ends = (seen.packed, moved)
        if not self.tun_tcp.open_inbound(client, ends, port.guest):
            self.refused += 1
            reset_and_close(client)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: client %s -> %s, shown as %s", port.name,
                      format_sockaddr(peer[:2]), format_sockaddr((str(port.guest_ip),
                                                                  port.guest[1])),
                      format_sockaddr((str(seen), ends[1])))

    def _free_port(self, port: InboundPort, packed: bytes) -> int | None:
        for _ in range(_PORT_TRIES):
            candidate = random.randint(*EPHEMERAL)
            if not self.tun_tcp.in_use(port.guest, (packed, candidate)):
                return candidate
        return None


def _listen(host: HostPort, name: str) -> socket.socket:
    """A non-blocking listener on ``host`` (an IP address; IPv6 only for an IPv6 one)."""
    try:
        ip = ipaddress.ip_address(host.host.partition("%")[0])
    except ValueError:
        raise UserError(f"{name}: listen address {host.host!r} is not an IP address") from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host.host, host.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UserError(f"{name}: cannot listen on {host}: {exc.strerror}") from None
    return sock
