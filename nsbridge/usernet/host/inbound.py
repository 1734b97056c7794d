"""Published ports that keep their client's address (device mode).

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

UDP works the same way through the engine's UDP flows (:mod:`.udpflows`, inbound
flows): a datagram on the listening socket from a client without a flow makes one, whose
host socket is bound to the published port (``SO_REUSEPORT``, so only this user's
sockets can join it) and connected to the client, so the kernel gives it that client's
later datagrams and the guest's answers leave on it from the published port.  The first
datagram is written to the guest directly.  Flows end after the engine's idle timeout;
removing the port ends those the engine holds (the native relay's end idle).  Unlike
TCP, a UDP client's port is not moved on a collision: the datagram goes to the flow that
has those ends.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
from functools import partial

from nsbridge.errors import UserError
from nsbridge.net.addresses import HostPort, format_sockaddr
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import IN, EventLoop
from nsbridge.relay.tcp import reset_and_close
from nsbridge.usernet.host.tuntcp import TunTcp
from nsbridge.usernet.host.udpflows import UdpFlows
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.inboundaddr import IPAddress, client_inside, guest_target_problem

log = logging.getLogger("nsbridge")

BACKLOG = 512
DATAGRAM_BATCH = 64  # datagrams read per wake-up of a UDP listener
MAX_DATAGRAM = 65535
EPHEMERAL = (32768, 60999)  # where a colliding client's port is moved to (Linux's range)
_PORT_TRIES = 64


class InboundPort:
    """One published port: its listener and the guest address and port it dials."""

    __slots__ = ("acceptor", "flows", "guest", "guest_ip", "listen_address", "listener", "name",
                 "protocol")

    def __init__(self, name: str, listener: socket.socket, guest_ip: IPAddress,
                 guest_port: int, protocol: str = "tcp") -> None:
        self.name = name
        self.protocol = protocol
        self.flows: set[tuple[bytes, int, bytes, int]] = set()  # UDP: the flows it made
        self.listener = listener
        self.guest_ip = guest_ip
        self.guest = (guest_ip.packed, guest_port)
        host, port = listener.getsockname()[:2]
        self.listen_address = HostPort(host, port)
        self.acceptor: Acceptor | None = None


class InboundPorts:
    """The device-mode published ports of one namespace (on its loop's thread)."""

    def __init__(self, loop: EventLoop, tun_tcp: TunTcp | None, udp_flows: UdpFlows | None,
                 addresses: UsernetAddresses) -> None:
        self.loop = loop
        self.tun_tcp = tun_tcp  # None: TCP ports cannot be served here (no SO_PEEK_OFF)
        self.udp_flows = udp_flows  # None: UDP ports cannot be served here
        self.addresses = addresses
        self.ports: list[InboundPort] = []
        # Where removed UDP ports listened: the native relay may still hold flow sockets
        # bound there (SO_REUSEPORT, until idle), which must not make the port "in use".
        self._released_udp: set[tuple[str, int]] = set()
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

    def serves_protocol(self, protocol: str) -> bool:
        """Whether ports of ``protocol`` ("tcp", "udp") can be published here."""
        return (self.tun_tcp if protocol == "tcp" else self.udp_flows) is not None

    def add(self, host: HostPort, guest_ip: str, guest_port: int, *, name: str,
            protocol: str = "tcp") -> InboundPort:
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
        if not self.serves_protocol(protocol):
            raise UserError(f"{name}: {protocol} ports cannot be served through the device")
        if protocol == "udp":
            released = (host.host, host.port) in self._released_udp
            port = InboundPort(name, _listen_udp(host, name, shared_ok=released), guest,
                               guest_port, "udp")
            self.loop.add(port.listener.fileno(), IN, partial(self._on_datagrams, port))
        else:
            port = InboundPort(name, _listen(host, name), guest, guest_port)
            self.resume(port)
        self.ports.append(port)
        return port

    # ---- socket switching (host/switchbind.py) ---------------------------------------

    def resume(self, port: InboundPort) -> None:
        """Accept on ``port``'s listener (again): its clients are dialed through the
        device."""
        if port.acceptor is not None:
            port.acceptor.close()
        port.acceptor = Acceptor(self.loop, port.listener, partial(self._on_client, port),
                                 name=f"{port.name} on {port.listen_address}")
        port.acceptor.start()

    def hand_over(self, port: InboundPort) -> socket.socket:
        """Stop accepting on ``port``'s TCP listener and return it: socket switching
        gives it to the program, whose ``accept`` then takes the clients (those already
        queued included).  :meth:`resume` undoes it while the listener is still ours."""
        if port.acceptor is not None:
            port.acceptor.close()
            port.acceptor = None
        return port.listener

    def listen_again(self, port: InboundPort) -> None:
        """A new listener where ``port`` listened (the program's, handed over, is gone),
        accepted on as before.  UserError when the address cannot be listened on now."""
        port.listener.close()
        port.listener = _listen(port.listen_address, port.name)
        self.resume(port)

    def hold(self, port: InboundPort, held: bool) -> None:
        """Leave new clients of ``port`` queued in the kernel (``held``) or accept them
        again: between a program's ``bind`` and its ``listen`` they are kept for it."""
        if port.acceptor is not None:
            if held:
                port.acceptor.hold()
            else:
                port.acceptor.release()

    def remove(self, port: InboundPort) -> None:
        """Stop listening.  TCP connections already made carry on (libslirp's
        behaviour); UDP flows end, as libslirp's one socket per UDP forward does."""
        if port in self.ports:
            self.ports.remove(port)
        if port.acceptor is not None:
            port.acceptor.close()
            port.acceptor = None
        if port.protocol == "udp":
            self.loop.remove(port.listener.fileno())
            if self.udp_flows is not None:
                self.udp_flows.drop_inbound(list(port.flows))
            port.flows.clear()
            self._released_udp.add((port.listen_address.host, port.listen_address.port))
        port.listener.close()

    def close(self) -> None:
        for port in list(self.ports):
            self.remove(port)

    def _on_datagrams(self, port: InboundPort, _events: int) -> None:
        """Datagrams from clients without a flow yet (a flow's socket takes the rest)."""
        flows = self.udp_flows
        assert flows is not None
        for _ in range(DATAGRAM_BATCH):
            try:
                data, peer = port.listener.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue  # an error queued on the socket; reading it cleared it
            seen = client_inside(peer[0], port.guest_ip, self.addresses)
            key = (port.guest[0], port.guest[1], seen.packed, peer[1])
            if key not in flows.table:
                sock = _connected_udp(port.listener, peer)
                if sock is None:
                    self.refused += 1
                    continue
                flows.adopt(key, sock)
                port.flows = {k for k in port.flows if k in flows.table}
                port.flows.add(key)
            flows.inject(key, data)

    def _on_client(self, port: InboundPort, client: socket.socket, peer: object) -> None:
        client.setblocking(False)
        assert isinstance(peer, tuple) and self.tun_tcp is not None
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
        assert self.tun_tcp is not None
        for _ in range(_PORT_TRIES):
            candidate = random.randint(*EPHEMERAL)
            if not self.tun_tcp.in_use(port.guest, (packed, candidate)):
                return candidate
        return None


def _family(host: HostPort, name: str) -> int:
    """The address family of ``host``'s address; UserError if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(host.host.partition("%")[0])
    except ValueError:
        raise UserError(f"{name}: listen address {host.host!r} is not an IP address") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _listen(host: HostPort, name: str) -> socket.socket:
    """A non-blocking listener on ``host`` (an IP address; IPv6 only for an IPv6 one)."""
    family = _family(host, name)
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


def _listen_udp(host: HostPort, name: str, *, shared_ok: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``host`` with ``SO_REUSEPORT``: each client's
    flow socket joins it (the kernel allows that to this user's sockets only).
    ``shared_ok``: a port of ours was removed there, so flow sockets of ours may still be
    bound to it; they are no reason to refuse."""
    family = _family(host, name)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # The port must be free: test with a plain bind first, so a port another
        # SO_REUSEPORT socket of ours holds is "in use" rather than silently shared.
        bound = (host.host, host.port)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(bound)
                bound = probe.getsockname()[:2]
            except OSError as exc:
                if not (shared_ok and exc.errno == errno.EADDRINUSE):
                    raise
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(bound)
    except OSError as exc:
        sock.close()
        raise UserError(f"{name}: cannot listen on {host}: {exc.strerror}") from None
    return sock


def _connected_udp(listener: socket.socket, peer: tuple) -> socket.socket | None:
    """A socket bound where ``listener`` is and connected to ``peer``: the kernel gives
    it that client's datagrams (a connected socket is the better match) and its own
    leave from the published port."""
    sock = socket.socket(listener.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)
    try:
        if listener.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(listener.getsockname())
        sock.connect(peer)
    except OSError as exc:
        log.info("published UDP port: no socket for client %s: %s",
                 format_sockaddr(peer[:2]), exc.strerror)
        sock.close()
        return None
    return sock
