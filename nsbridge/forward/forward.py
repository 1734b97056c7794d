"""A running forward: owns the listener, admits clients, starts a relay per client and
keeps statistics.  What a forward *is* (its description) lives in spec.py.

Stream forwards (TCP and Unix, in any mix) start a :class:`~nsbridge.relay.tcp.TcpSession`
per client; UDP forwards run one :class:`~nsbridge.relay.udp.UdpRelay` with a flow per
client address.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from nsbridge.errors import errno_name
from nsbridge.forward.spec import (
    UDP,
    ConnectAddress,
    ConnectSide,
    ForwardSpec,
    ListenAddress,
    ListenSide,
    ListenSocket,
    Preaccepted,
    Preconnected,
)
from nsbridge.net.addresses import ResolvedAddress, UnixAddress, format_sockaddr, resolve
from nsbridge.net.factory import SocketFactory
from nsbridge.net.sockets import (
    open_listener,
    open_udp_socket,
    open_unix_listener,
    remove_unix_socket,
)
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.log import INFO, log
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.native import CORE_ACCEPTED, ListenerOwner, native_accept_enabled
from nsbridge.relay.tcp import (
    Mover,
    TcpSession,
    peer_name,
    raw_family,
    reset_and_close,
    tally,
    tally_outcome,
)

__all__ = [
    "ConnectAddress", "ConnectSide", "Forward", "ForwardSpec", "ForwardStats", "ListenAddress",
    "ListenSide", "ListenSocket", "Preaccepted", "Preconnected",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from typing import Any

    from nsbridge.net.acl import ClientAcl
    from nsbridge.relay.native import NativeRelay
    from nsbridge.relay.udp import UdpRelay

# Plain classes, not dataclasses: worker processes import this module, and
# ``dataclasses`` (with inspect, ast, dis...) would cost each of them memory.


class ForwardStats:
    """Counters of one forward.  For UDP, "connections" are flows."""

    FIELDS = ("accepted", "active", "closed", "reset", "connect_failed", "denied", "bytes_up",
              "bytes_down", "datagrams_up", "datagrams_down", "dropped")

    def __init__(self, accepted: int = 0, active: int = 0, closed: int = 0, reset: int = 0,
                 connect_failed: int = 0, denied: int = 0, bytes_up: int = 0,
                 bytes_down: int = 0, datagrams_up: int = 0, datagrams_down: int = 0,
                 dropped: int = 0) -> None:
        self.accepted = accepted
        self.active = active
        self.closed = closed
        self.reset = reset
        self.connect_failed = connect_failed
        self.denied = denied
        self.bytes_up = bytes_up
        self.bytes_down = bytes_down
        self.datagrams_up = datagrams_up  # UDP only
        self.datagrams_down = datagrams_down
        self.dropped = dropped  # UDP datagrams not delivered (too large, send error, no flow)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"ForwardStats({inner})"


class Forward:
    """A running forward inside a :class:`~nsbridge.forward.bridge.Bridge` event loop."""

    def __init__(
        self,
        spec: ForwardSpec,
        loop: EventLoop,
        mover: Mover,
        listen_factory: SocketFactory,
        connect_factory: SocketFactory,
        on_finished: Callable[[Forward], None],
        target: ResolvedAddress | None = None,
        reuseport: bool = False,
        native: NativeRelay | None = None,
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.mover = mover
        self.listen_factory = listen_factory
        self.connect_factory = connect_factory
        self.on_finished = on_finished
        self.stats = ForwardStats()
        self.listener: socket.socket | None = None
        self.target = target  # None until open() resolves it (given: a worker's copy)
        self.sessions: set[TcpSession] = set()
        self.finished = False
        self.acl: ClientAcl | None = None  # when the forward has allow/deny rules
        self.udp: UdpRelay | None = None  # the UdpRelay of a UDP forward
        self._unix_path: str | None = None  # socket file we created, removed when we stop
        self._acceptor: Acceptor | None = None  # while this loop accepts from the listener
        # Bind the TCP listener with SO_REUSEPORT (--accept reuseport), so that more
        # listeners can join it: see reuseport_sibling().
        self.reuseport = reuseport
        # The native relay (relay/native.py), when it serves: established pairs go to it,
        # and only its records come back (``native_open`` counts the pairs it holds).
        self.native = native
        self.native_slot = native.new_slot(self._native_done) if native is not None else -1
        self.native_open = 0
        self._native_names: dict[int, str] = {}  # token -> client name, only at -v
        self._next_token = 0
        # While the core accepts from our listener (accepts_natively): its listener id.
        self.native_listener: int | None = None
        # The core accepted for us at some point: its slot may hold pairs Python has not
        # counted yet (their records count them).  And their clients' family.
        self._core_listened = False
        self.native_accept_failures = 0  # times the core gave the listener back (accept failed)
        self._core_client_family = socket.AF_INET

    def __repr__(self) -> str:
        return f"<Forward {self.spec.name or '?'} {self.target_description}>"

    # ---- setup ------------------------------------------------------------------------

    def open(self) -> None:
        """Resolve, bind and validate everything; raises UserError before anything runs."""
        spec = self.spec
        self.build_acl()
        socktype = socket.SOCK_DGRAM if spec.protocol == UDP else socket.SOCK_STREAM
        if isinstance(spec.connect, ConnectAddress):
            self.target = self.connect_factory.call(
                resolve, spec.connect.address, what="connect", passive=False, socktype=socktype
            )
        listen = spec.listen
        if isinstance(listen, ListenAddress):
            where = self.listen_factory.call(
                resolve, listen.address, what="listen", passive=True, socktype=socktype
            )
            if listen.protocol == UDP:
                self.listener = open_udp_socket(self.listen_factory, where, what="listen")
            elif isinstance(listen.address, UnixAddress):  # resolved to AF_UNIX
                self.listener = open_unix_listener(self.listen_factory, listen.address,
                                                   mode=listen.mode, owner=listen.owner)
                if isinstance(where.sockaddr, str):
                    self._unix_path = where.sockaddr
            else:
                self.listener = open_listener(self.listen_factory, where, what="listen",
                                              reuseport=self.reuseport)
        elif isinstance(listen, ListenSocket):
            self.listener = listen.sock

    def build_acl(self) -> None:
        """The client ACL from allow/deny rules (raises UserError for a bad rule)."""
        if self.spec.allow or self.spec.deny:
            from nsbridge.net.acl import ClientAcl  # only forwards with rules pay for the import

            self.acl = ClientAcl.parse(self.spec.allow, self.spec.deny)

    @property
    def listen_address(self) -> str:
        if self.listener is not None:
            return format_sockaddr(self.listener.getsockname())
        return "preaccepted socket"

    @property
    def target_description(self) -> str:
        if self.target is not None:
            return str(self.target)
        return "preconnected socket"

    def start(self) -> None:
        spec = self.spec
        if isinstance(spec.listen, Preaccepted):
            self.start_session(spec.listen.sock)
        elif spec.protocol == UDP:
            self.start_udp(self.listener)
        else:
            assert self.listener is not None
            self._accept_from(self.listener)

    def reuseport_sibling(self) -> socket.socket:
        """One more listener in this forward's SO_REUSEPORT group, for one worker.

        Bound to the address the first listener actually got (port 0 was resolved then),
        made by the listen side's factory because a socket belongs to the namespace it
        was created in.  The kernel then spreads new clients over the group by 4-tuple
        hash, and each worker accepts from its own queue: no hand-off through a supervisor.
        """
        assert self.reuseport and self.listener is not None
        address = ResolvedAddress(self.listener.family, self.listener.getsockname())
        return open_listener(self.listen_factory, address, what="listen", reuseport=True,
                             sibling=True)

    def listen_on(self, sock: socket.socket) -> None:
        """Accept clients from ``sock`` here (a worker's own SO_REUSEPORT listener)."""
        self.listener = sock
        self._accept_from(sock)

    def start_udp(self, sock: socket.socket | None) -> None:
        """Relay datagrams arriving on ``sock`` (bound here, or handed to a worker)."""
        from nsbridge.relay.udp import UdpRelay

        assert sock is not None and self.target is not None

        def flow_closed(flow: Any) -> None:
            if log.isEnabledFor(INFO):
                log.info("%s", flow.describe())

        self.udp = UdpRelay(self.loop, sock, self.target, self.connect_factory,
                            idle_timeout=self.spec.idle_timeout, max_flows=self.spec.max_flows,
                            on_flow_closed=flow_closed,
                            admit=self.admits if self.acl is not None else None)
        self.listener = sock
        self.udp.start()

    def admits(self, peer: object) -> bool:
        """The forward's client ACL (allow/deny); counts refusals."""
        if self.acl is None or self.acl.permits(peer):
            return True
        self.stats.denied += 1
        if log.isEnabledFor(INFO):
            log.info("%s: client %s denied by policy", self.name, format_sockaddr(peer))
        return False

    @property
    def name(self) -> str:
        return self.spec.name or self.listen_address

    # ---- accepting ----------------------------------------------------------------------

    def _accept_from(self, listener: socket.socket) -> None:
        """Accept clients from ``listener``: in the native core when no client needs
        Python (accepts_natively), else on this forward's loop (relay/accept.py's
        policy: batches, and a pause rather than a spin when fds run out).  A listener
        that stops listening is a worker's SO_REUSEPORT listener the supervisor shut
        down (stop, drain, removal): this forward then stops listening too."""
        if self.accepts_natively(listener):
            assert self.native is not None and self.target is not None
            assert isinstance(self.target.sockaddr, tuple)
            self._core_listened = True
            self._core_client_family = raw_family(listener)
            self.native_listener = self.native.listen(
                listener.fileno(), self.native_slot, self.target.family,
                self.target.sockaddr, _CoreListener(self), peer=log.isEnabledFor(INFO))
            return
        self._accept_in_python(listener)

    def accepts_natively(self, listener: socket.socket) -> bool:
        """Whether the core may accept this forward's clients: nothing per client needs
        Python.  Not with allow/deny rules (the ACL), a PROXY header, a one-shot forward,
        a Unix socket on either side or a pre-connected target; nor with
        $NSBRIDGE_NATIVE_ACCEPT=0.  At ``-v`` the core keeps each client's address for
        its line."""
        target = self.target
        return (self.native is not None and self.acl is None and not self.spec.proxy
                and not self.spec.one_shot and isinstance(self.spec.connect, ConnectAddress)
                and target is not None and target.family in _TCP_FAMILIES
                and isinstance(target.sockaddr, tuple)
                and raw_family(listener) in _TCP_FAMILIES and native_accept_enabled())

    def _accept_in_python(self, listener: socket.socket) -> None:
        self._acceptor = Acceptor(self.loop, listener, self._on_client,
                                  name=self.listen_address,
                                  on_not_listening=self.stop_listening)
        self._acceptor.start()

    def _on_client(self, client: socket.socket, peer: object) -> None:
        if not self.admits(peer):
            reset_and_close(client)
            return
        self.stats.accepted += 1
        if self.spec.one_shot:
            self.stop_listening()
        self.start_session(client, accepted=True)

    def start_session(self, client: socket.socket, accepted: bool = False) -> None:
        """Relay ``client`` (accepted here or handed over by the supervisor) to the target.

        ``accepted``: no other reference to the client's file exists (accepted here, or
        received over SCM_RIGHTS from a sender that closed its copy), unlike a
        pre-accepted socket the caller gave us."""
        connect = self.spec.connect
        if isinstance(connect, Preconnected):
            session = TcpSession(self.loop, self.mover, client, connect.sock, self._session_done,
                                 server_name=peer_name(connect.sock))
            self._track(session)
            session.start_connected()
            return
        assert self.target is not None
        try:
            server = self.connect_factory.socket(self.target.family, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot create socket for %s: %s; resetting client",
                        self.target, exc.strerror)
            reset_and_close(client)
            self.stats.connect_failed += 1
            self._maybe_finish()
            return
        if self.native is not None:
            self._start_native(client, server, accepted)
            return
        session = TcpSession(self.loop, self.mover, client, server, self._session_done,
                             close_leaves_epoll=accepted)
        if self.spec.proxy:
            session.preamble = proxy_header(self.spec.proxy, client)
        self._track(session)
        session.connect(self.target.sockaddr, self.spec.connect_timeout)

    # ---- the native relay -------------------------------------------------------------

    def _start_native(self, client: socket.socket, server: socket.socket,
                      accepted: bool) -> None:
        """Connect here; relay in the native core.  A target that answers at once (the
        usual case: loopback, a veth into a namespace) goes straight to the core; a slow
        or failed connect is the Python session's (its timeout, its outcome words), which
        hands the pair over once connected."""
        assert self.target is not None
        sockaddr = self.target.sockaddr
        code = server.connect_ex(sockaddr)
        if code == errno.EINPROGRESS:
            # As TcpSession.connect: a local handshake is done by now, a second call says so.
            code = server.connect_ex(sockaddr)
            if code == errno.EALREADY:
                code = errno.EINPROGRESS
        if code == 0 or code == errno.EISCONN:
            preamble = proxy_header(self.spec.proxy, client) if self.spec.proxy else b""
            self._hand_to_native(client, server, preamble, accepted)
            return
        self._connect_in_python(client, server, accepted, code)

    def _connect_in_python(self, client: socket.socket, server: socket.socket,
                           accepted: bool, code: int) -> None:
        """A connect that did not complete at once (``code``: its errno) is the Python
        session's; once connected, it hands the pair to the core."""
        assert self.target is not None
        sockaddr = self.target.sockaddr
        preamble = proxy_header(self.spec.proxy, client) if self.spec.proxy else b""
        session = TcpSession(self.loop, self.mover, client, server, self._session_done,
                             close_leaves_epoll=accepted)
        session.preamble = preamble
        session.handover = self._session_connected
        self._track(session)
        session.connect(sockaddr, self.spec.connect_timeout, code)

    def _pool_sockets(self, count: int) -> list[int]:
        """Target sockets for the core's pool, made by the connect side's factory (so in
        the target's namespace).  Fewer when the factory fails: the core hands clients
        back while its pool is empty, and Python's path reports the failure per client."""
        assert self.target is not None
        fds = []
        try:
            for _ in range(count):
                fds.append(self.connect_factory.socket(self.target.family,
                                                       socket.SOCK_STREAM).detach())
        except OSError as exc:
            log.debug("%s: cannot fill the native accept pool: %s", self.name, exc)
        return fds

    def _handed_back(self, client_fd: int, server_fd: int, code: int) -> None:
        """What the core's listener could not finish: Python's path serves it."""
        if client_fd < 0:
            self._native_accept_failed(code)
            return
        client = socket.socket(self._core_client_family, socket.SOCK_STREAM, 0,
                               fileno=client_fd)
        self.stats.accepted += 1
        if server_fd < 0:  # the pool was empty
            self.start_session(client, accepted=True)
            return
        assert self.target is not None
        server = socket.socket(self.target.family, socket.SOCK_STREAM, 0, fileno=server_fd)
        self._connect_in_python(client, server, True, code)

    def _native_accept_failed(self, code: int) -> None:
        """accept() failed in the core, which stopped watching the listener: Python's
        Acceptor takes it over and meets the error itself (its back-off and warning for
        EMFILE and friends, stop listening for EINVAL).  Once it is no longer backing
        off, the core gets the listener back (checked every RETRY_BACK)."""
        lid, listener = self.native_listener, self.listener
        if lid is None or listener is None or self.native is None:
            return  # stopping: the listener is going away anyway
        log.debug("%s: accept failed in the native core (%s); Python's acceptor takes over",
                  self.name, errno_name(code))
        self.native_listener = None
        self.native_accept_failures += 1
        self.native.unlisten(lid)  # closes its pooled sockets: fds for Python's accept
        self._accept_in_python(listener)
        self.loop.call_later(RETRY_BACK, self._back_to_native)

    def _back_to_native(self) -> None:
        acceptor, listener = self._acceptor, self.listener
        if acceptor is None or listener is None or acceptor.closed:
            return  # stopped listening meanwhile
        if acceptor.backing_off:
            self.loop.call_later(RETRY_BACK, self._back_to_native)
            return
        acceptor.close()
        self._acceptor = None
        self._accept_from(listener)

    def _session_connected(self, session: TcpSession) -> None:
        """A Python session's slow connect succeeded: the core relays it from here."""
        self.sessions.discard(session)
        self.stats.active -= 1  # counted again as a native pair
        log.debug("%s -> %s: connected after a wait, handed to the native relay",
                  session.client_name, session.server_name)
        self._hand_to_native(session.client, session.server, session.preamble,
                             session.close_leaves_epoll, session.client_name)

    def _hand_to_native(self, client: socket.socket, server: socket.socket, preamble: bytes,
                        exclusive: bool, client_name: str = "") -> None:
        assert self.native is not None
        if client.gettimeout() != 0.0:  # as TcpSession: the core needs non-blocking fds
            client.setblocking(False)
        nodelay = (raw_family(client) in _TCP_FAMILIES) | (
            (raw_family(server) in _TCP_FAMILIES) << 1)
        token = self._next_token
        self._next_token = token + 1
        if log.isEnabledFor(INFO):
            self._native_names[token] = (client_name if client_name not in ("", "?")
                                         else peer_name(client))
        self.stats.active += 1
        self.native_open += 1
        self.native.add(client.detach(), server.detach(), self.native_slot, token, preamble,
                        exclusive, nodelay)

    def _native_done(self, token: int, up: int, down: int, duration: float,
                     outcome: str, peer: tuple | None) -> None:
        """A record from the core: count it as tally() counts a session, log it at -v."""
        if token == CORE_ACCEPTED:  # Python sees this pair for the first time
            self.stats.accepted += 1
            self.stats.active += 1
        else:
            self.native_open -= 1
        tally_outcome(self.stats, up, down, outcome)
        if log.isEnabledFor(INFO):
            client_name = (format_sockaddr(peer) if peer is not None
                           else self._native_names.pop(token, "?"))
            assert self.target is not None
            log.info("%s -> %s: %d B up, %d B down, %.3fs, %s", client_name,
                     format_sockaddr(self.target.sockaddr), up, down, duration, outcome)
        else:
            self._native_names.pop(token, None)
        self._maybe_finish()

    def _track(self, session: TcpSession) -> None:
        self.sessions.add(session)
        self.stats.active += 1

    def _session_done(self, session: TcpSession) -> None:
        self.sessions.discard(session)
        tally(self.stats, session)
        if log.isEnabledFor(INFO):
            log.info("%s", session.describe())
        self._maybe_finish()

    @property
    def open_connections(self) -> int:
        """Connections still open: Python sessions and pairs in the native core."""
        opened = len(self.sessions) + self.native_open
        if self._core_listened and self.native is not None:
            opened += self.native.live(self.native_slot)[3]
        return opened

    def _maybe_finish(self) -> None:
        if self.spec.one_shot and not self.open_connections and not self.finished:
            self.finished = True
            self.on_finished(self)

    # ---- stopping ---------------------------------------------------------------------

    def stop_listening(self) -> None:
        """Close the listener (a UDP forward ends its flows); open connections carry on."""
        if self.udp is not None:
            self.udp.close()
            self.udp = None
            self.listener = None  # the relay owned and closed it
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        if self.native_listener is not None:
            assert self.native is not None
            lid, self.native_listener = self.native_listener, None
            self.native.unlisten(lid)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._unix_path is not None:
            remove_unix_socket(self._unix_path)
            self._unix_path = None

    def abort_all(self, outcome: str) -> None:
        for session in list(self.sessions):
            session.abort(outcome)
        if self.native is not None and (self.native_open or self._core_listened):
            self.native.abort(self.native_slot, outcome)

    def snapshot(self) -> ForwardStats:
        """Counters including the bytes that still-open connections moved so far."""
        stats = ForwardStats(**self.stats.as_dict())
        if self.udp is not None:  # flows count as connections
            u = self.udp.stats
            stats.accepted, stats.active = u.total_flows, u.active_flows
            stats.closed = u.expired_flows + u.evicted_flows
            stats.bytes_up, stats.bytes_down = u.bytes_up, u.bytes_down
            stats.datagrams_up, stats.datagrams_down = u.datagrams_up, u.datagrams_down
            stats.dropped, stats.connect_failed = u.dropped, u.dropped_no_flow
            return stats
        for session in self.sessions:
            stats.bytes_up += session.up.total
            stats.bytes_down += session.down.total
        if self.native is not None and (self.native_open or self._core_listened):
            _active, up, down, core_accepted = self.native.live(self.native_slot)
            stats.bytes_up += up
            stats.bytes_down += down
            # Pairs the core accepted count from their records on; until then, here.
            stats.accepted += core_accepted
            stats.active += core_accepted
        return stats


_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


# How often a listener whose accept failed in the core is offered back to it, once
# Python's Acceptor no longer backs off (relay/accept.py RETRY_DELAY is the retry pace).
RETRY_BACK = 1.0


class _CoreListener(ListenerOwner):
    """The forward as the core's listener owner (relay/native.py ListenerOwner)."""

    __slots__ = ("forward",)

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    def pool_sockets(self, count: int) -> list[int]:
        return self.forward._pool_sockets(count)

    def handed_back(self, client_fd: int, server_fd: int, code: int) -> None:
        self.forward._handed_back(client_fd, server_fd, code)


def proxy_header(version: str, client: socket.socket) -> bytes:
    """The PROXY protocol header telling the target who the client really is."""
    try:
        src, dst = client.getpeername(), client.getsockname()
    except OSError:
        src = dst = None
    from nsbridge.forward.proxy_protocol import encode_v1, encode_v2

    encode = encode_v2 if version == "v2" else encode_v1
    return encode(src, dst, client.family)



