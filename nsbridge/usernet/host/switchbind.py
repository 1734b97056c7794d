"""Published ports under socket switching (``run --bypass -p``): the program's listener
*becomes* the host's listening socket of the publication, so clients reach it straight
through the host's kernel and ``accept()``/``getpeername()`` show their real address.

The design, and why:

* **Hand over at ``listen``, not at ``bind``.**  The program's ``bind`` (trapped) is
  performed on its own namespace socket with the bytes read, as every bind is; when it
  then calls ``listen`` on a TCP socket whose bound address (read from the socket
  object, ``getsockname``: no bytes of the program's are read again) is reached by
  exactly one device-mode TCP publication, nsbridge's own listener of that publication
  is installed over the program's fd (``ADDFD``) and the ``listen`` answered.  A socket
  that is bound and never listens (a client choosing its source port, a program
  reserving a port) thus never holds the host port with clients queued for nobody.
* **nsbridge's own listener, queue and all.**  The host port has been listened on since
  start; the same socket goes to the program with the connections already in its
  accept queue, so none is lost.  Between the program's ``bind`` and ``listen`` nsbridge
  stops accepting there (at most :data:`HOLD_AFTER_BIND` seconds), so clients that
  arrive meanwhile wait in that queue for the program too.  The options accepted
  sockets inherit (``_COPIED``: keepalive, ``TCP_NODELAY``, ``TCP_USER_TIMEOUT``,
  ``TCP_DEFER_ACCEPT``, ``SO_PRIORITY``, ``IP_TOS``/``IPV6_TCLASS``) are copied from the
  program's socket, its backlog applied with ``listen``, its blocking flag kept.  The
  address options (``SO_REUSEADDR``, ``IPV6_V6ONLY``) are the publication's, set when
  nsbridge bound it: the host address is the publication's, never the program's.
* **No reference kept.**  Keeping one would keep the port listening after the program
  closed its socket (clients queued forever).  So nsbridge watches the kernel's list of
  TCP listeners (``linux/sockdiag.py``, every :data:`CHECK_EVERY` seconds, and at each
  trapped ``bind``/``listen``): when the handed-over inode is gone (the program closed
  it or exited), nsbridge listens on the host port again and serves the publication
  through the device as before.  In between the port is closed: clients are refused
  (a reset), never left hanging.
* **One listener per publication.**  While it is handed over, another ``bind`` in the
  namespace whose address that publication reaches gets ``EADDRINUSE`` (as the kernel
  gives for a port someone listens on; with ``SO_REUSEPORT`` too: the publication has
  one socket to give), and so does a ``listen`` of a socket bound to it earlier.
  A bound address reached by two publications (``::`` dual-stack with an IPv4 and an
  IPv6 ``-p`` to the same port) is not switched: one fd cannot be two host sockets.

What is "reached" mirrors today's device path, which dials the guest's interface
address (:func:`reaches`): a socket bound to that address or to the wildcard of the
publication's family (an IPv6 ``::`` socket without ``IPV6_V6ONLY`` is reached by IPv4
publications too), on the published port, with no ``SO_BINDTODEVICE``.  The
namespace's loopback is not reached (as today).

What the program sees on a handed-over listener: ``getsockname()`` shows the host's
address and port (``0.0.0.0:8080``, not ``:80``), and its family is the publication's
(an IPv6 dual-stack listener reached through an IPv4 ``-p`` becomes an IPv4 socket:
``accept`` returns ``sockaddr_in``).  Clients inside the namespace no longer reach it
on the namespace's address (it listens on the host).  ``connect`` on it is refused
(``EOPNOTSUPP``), ``bind`` too (it is bound), ``listen`` again allowed (a new backlog).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nsbridge.errors import UserError
from nsbridge.linux.libc import last_error, libc
from nsbridge.linux.seccomp_notify import socket_netns
from nsbridge.linux.sockdiag import listening_inodes
from nsbridge.relay.loop import EventLoop, Timer
from nsbridge.usernet.proto.addresses import IPAddress

if TYPE_CHECKING:
    from nsbridge.usernet.host.inbound import InboundPort, InboundPorts

log = logging.getLogger("nsbridge")

HOLD_AFTER_BIND = 2.0  # seconds clients wait queued between a program's bind and listen
CHECK_EVERY = 0.5  # seconds between looks for handed-over listeners that are gone
CAP_NET_BIND_SERVICE = 10
PRIVILEGED_PORTS = 1024  # the namespace's net.ipv4.ip_unprivileged_port_start default

_COPIED = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.SOL_SOCKET, socket.SO_PRIORITY),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
)


@dataclass(frozen=True)
class Bound:
    """A TCP socket's local address as the reach rules need it."""

    family: int
    ip: IPAddress
    port: int
    v6only: bool = False


def _covers(bound: Bound) -> tuple[IPAddress | None, IPAddress | None, bool, bool]:
    """(the IPv4 address it takes, the IPv6 one, takes every IPv4, takes every IPv6);
    an address of None with its flag False: none of that family."""
    if bound.family == socket.AF_INET:
        return bound.ip, None, bound.ip.is_unspecified, False
    mapped = bound.ip.ipv4_mapped if isinstance(bound.ip, ipaddress.IPv6Address) else None
    if mapped is not None:
        return (None, None, False, False) if bound.v6only else \
            (mapped, None, mapped.is_unspecified, False)
    every = bound.ip.is_unspecified
    v4_too = every and not bound.v6only
    return None, bound.ip, v4_too, every


def reaches(guest: IPAddress, guest_port: int, bound: Bound) -> bool:
    """Whether today's device path (dialing ``guest:guest_port`` in the namespace)
    reaches a listener bound to ``bound``."""
    if bound.port != guest_port:
        return False
    v4, v6, all4, all6 = _covers(bound)
    if guest.version == 4:
        return all4 or v4 == guest
    return all6 or v6 == guest


def overlaps(a: Bound, b: Bound) -> bool:
    """Whether two TCP sockets bound so would take some of the same connections."""
    if a.port != b.port:
        return False
    a4, a6, a_all4, a_all6 = _covers(a)
    b4, b6, b_all4, b_all6 = _covers(b)
    takes4 = (a4 is not None or a_all4) and (b4 is not None or b_all4)
    takes6 = (a6 is not None or a_all6) and (b6 is not None or b_all6)
    return (takes4 and (a_all4 or b_all4 or a4 == b4)) or \
        (takes6 and (a_all6 or b_all6 or a6 == b6))


def bound_of_sockaddr(sock_family: int, raw: bytes, v6only: bool) -> Bound | None:
    """The address a ``bind`` with ``raw`` asks for on a socket of ``sock_family`` (None
    when it is no address the kernel would take there)."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == sock_family == socket.AF_INET and len(raw) >= 16:
        return Bound(family, ipaddress.IPv4Address(raw[4:8]),
                     struct.unpack_from("!H", raw, 2)[0])
    if family == sock_family == socket.AF_INET6 and len(raw) >= 24:
        return Bound(family, ipaddress.IPv6Address(raw[8:24]),
                     struct.unpack_from("!H", raw, 2)[0], v6only)
    return None


def is_tcp(sock: socket.socket) -> bool:
    return (sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM and sock.proto in (0, socket.IPPROTO_TCP))


def v6only_of(sock: socket.socket) -> bool:
    return sock.family == socket.AF_INET6 and bool(
        sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


def bound_of_socket(sock: socket.socket) -> Bound | None:
    """Where a TCP socket is bound (None: not bound, or bound to a device)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).strip(b"\0"):
            return None
        address = sock.getsockname()
    except OSError:
        return None
    ip, port = ipaddress.ip_address(address[0].partition("%")[0]), address[1]
    if port == 0:
        return None
    return Bound(sock.family, ip, port, v6only_of(sock))


def may_bind_privileged(pid: int) -> bool:
    """Whether thread ``pid`` holds CAP_NET_BIND_SERVICE (its effective set): a bind
    nsbridge performs is checked against nsbridge's own capabilities by the kernel,
    so a program that dropped its own must not get a low port through us."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError):
        pass
    return False


@dataclass
class _Handed:
    port: InboundPort
    family: int  # of the host listener, for the kernel's listener list
    inode: int
    bound: Bound  # where the program's namespace socket was bound


@dataclass
class PublishStats:
    handed_over: int = 0  # listeners given to a program
    taken_back: int = 0  # handed-over listeners gone, the port served as before again


class PublishedListeners:
    """The hand-over state of one namespace's published TCP ports (the loop's thread)."""

    def __init__(self, loop: EventLoop, inbound: InboundPorts | None,
                 namespace: int | None = None) -> None:
        self.loop = loop
        self.inbound = inbound
        # The inode of the namespace the publications dial into: a socket of another
        # (one the program made with unshare) is never reached by them.
        self.namespace = namespace
        self.stats = PublishStats()
        self._handed: dict[int, _Handed] = {}  # inode -> the publication it serves
        self._ours: set[int] = set()  # every inode ever handed over (connect refused)
        self._holds: dict[int, Timer] = {}  # id(port) -> the end of a bind's hold
        self._check: Timer | None = None

    def close(self) -> None:
        for timer in self._holds.values():
            timer.cancel()
        self._holds.clear()
        if self._check is not None:
            self._check.cancel()
            self._check = None

    def owns(self, sock: socket.socket) -> bool:
        """Whether ``sock`` is (or was) a publication's listener handed to the program."""
        return bool(self._ours) and os.fstat(sock.fileno()).st_ino in self._ours

    def _in_namespace(self, sock: socket.socket) -> bool:
        return self.namespace is None or socket_netns(sock.fileno()) == self.namespace

    def _reached_by(self, bound: Bound) -> list[InboundPort]:
        if self.inbound is None:
            return []
        return [port for port in self.inbound.ports
                if port.protocol == "tcp" and reaches(port.guest_ip, port.guest[1], bound)]

    def _in_use(self, bound: Bound) -> bool:
        """Whether ``bound`` overlaps where a program's handed-over listener was bound
        in the namespace (the kernel's EADDRINUSE, had it stayed there)."""
        self._refresh()
        return any(overlaps(bound, entry.bound) for entry in self._handed.values())

    # ---- the trapped calls ----------------------------------------------------------

    def bind(self, sock: socket.socket, raw: bytes) -> int:
        """A namespace socket's ``bind``, before it is performed: 0 to perform it, or
        the errno to answer (``EADDRINUSE``: the publication is the program's already).
        A bind a publication reaches holds that publication's clients for the listen."""
        if not is_tcp(sock) or not self._in_namespace(sock):
            return 0
        bound = bound_of_sockaddr(sock.family, raw, v6only_of(sock))
        if bound is None or bound.port == 0:
            return 0
        if self._in_use(bound):
            return errno.EADDRINUSE
        reached = self._reached_by(bound)
        if len(reached) == 1:
            self._hold(reached[0])
        return 0

    def listen_target(self, sock: socket.socket) -> InboundPort | int | None:
        """At a namespace socket's ``listen``: the publication to hand over, an errno
        (``EADDRINUSE``), or None (perform the listen on the program's socket)."""
        if self.inbound is None or not is_tcp(sock) or not self._in_namespace(sock):
            return None
        bound = bound_of_socket(sock)
        if bound is None:
            return None
        if self._in_use(bound):
            return errno.EADDRINUSE
        reached = self._reached_by(bound)
        return reached[0] if len(reached) == 1 else None

    def hand_over(self, port: InboundPort, sock: socket.socket, backlog: int,
                  install: Callable[[socket.socket], None]) -> None:
        """Give ``port``'s host listener to the program in place of ``sock`` (``install``
        puts it over the program's fd).  On failure nsbridge keeps serving the port."""
        assert self.inbound is not None
        self._unhold(port)
        bound = bound_of_socket(sock)
        assert bound is not None
        listener = self.inbound.hand_over(port)
        try:
            _copy_options(sock, listener)
            if libc.listen(listener.fileno(), backlog) != 0:  # its backlog, as the kernel reads it
                raise last_error("listen")
            # The file's flag, as the program set it (our socket object made from the
            # fd does not know it: getblocking() would say True).
            listener.setblocking(not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
            inode = os.fstat(listener.fileno()).st_ino
            install(listener)
        except BaseException:
            listener.setblocking(False)
            self.inbound.resume(port)
            raise
        self._handed[inode] = _Handed(port, listener.family, inode, bound)
        self._ours.add(inode)
        listener.close()  # the program's now: its close ends the listening
        self.stats.handed_over += 1
        log.info("%s: listener handed to the program (bound to %s); clients reach it "
                 "directly", port.name, bound.ip)
        if self._check is None:
            self._check = self.loop.call_later(CHECK_EVERY, self._tick)

    # ---- holding clients between bind and listen --------------------------------------

    def _hold(self, port: InboundPort) -> None:
        assert self.inbound is not None
        previous = self._holds.pop(id(port), None)
        if previous is not None:
            previous.cancel()
        self.inbound.hold(port, True)
        self._holds[id(port)] = self.loop.call_later(HOLD_AFTER_BIND,
                                                     lambda: self._unhold(port))

    def _unhold(self, port: InboundPort) -> None:
        timer = self._holds.pop(id(port), None)
        if timer is not None:
            timer.cancel()
            assert self.inbound is not None
            self.inbound.hold(port, False)

    # ---- noticing that a handed-over listener is gone ---------------------------------

    def _tick(self) -> None:
        self._check = None
        self._refresh()
        if self._handed:
            self._check = self.loop.call_later(CHECK_EVERY, self._tick)

    def _refresh(self) -> None:
        """Serve again, the old way, each publication whose listener the program closed."""
        if not self._handed:
            return
        alive: dict[int, set[int]] = {}
        for entry in list(self._handed.values()):
            if entry.family not in alive:
                try:
                    alive[entry.family] = listening_inodes(entry.family)
                except (OSError, ValueError) as exc:
                    log.warning("bypass: cannot list the host's TCP listeners: %s", exc)
                    return
            if entry.inode in alive[entry.family]:
                continue
            assert self.inbound is not None
            if entry.port not in self.inbound.ports:  # removed meanwhile
                del self._handed[entry.inode]
                continue
            try:
                self.inbound.listen_again(entry.port)
            except UserError as exc:
                log.warning("%s (tried again in %s s)", exc, CHECK_EVERY)
                continue
            del self._handed[entry.inode]
            self.stats.taken_back += 1
            log.info("%s: the program's listener is gone; served through the device again",
                     entry.port.name)


def _copy_options(source: socket.socket, target: socket.socket) -> None:
    """The options a listener passes on to the sockets it accepts."""
    for level, option in _COPIED:
        try:
            target.setsockopt(level, option, source.getsockopt(level, option))
        except OSError:
            pass
    if source.family == target.family:
        level, option = (socket.IPPROTO_IP, socket.IP_TOS) if source.family == \
            socket.AF_INET else (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
        try:
            target.setsockopt(level, option, source.getsockopt(level, option))
        except OSError:
            pass
