"""A forward: where connections come from (listen side) and where they go (connect side).

The spec classes are plain data: what the user asked for, already validated.  A
:class:`Forward` is the running thing: it owns the listener, starts a
:class:`~nsbridge.relay.tcp.TcpSession` per client and keeps statistics.

Listen side, one of:  ``ListenAddress`` (-l, bind in a namespace), ``ListenSocket``
(-L, an inherited listening socket), ``Preaccepted`` (-S, one connected client).
Connect side, one of: ``ConnectAddress`` (-c, dial in a namespace), ``Preconnected``
(-C, one connected target).  With -S or -C the forward carries exactly one connection.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from .addresses import HostPort, ResolvedAddress, format_sockaddr, resolve
from .errors import UserError
from .factory import SocketFactory
from .netns import Netns
from .relay.loop import IN, EventLoop
from .relay.tcp import Mover, TcpSession
from .sockets import open_listener

log = logging.getLogger("nsbridge")

_ACCEPT_BATCH = 64
_EMFILE_PAUSE = 0.1


@dataclass
class ListenAddress:
    address: HostPort
    netns: Netns | None = None


@dataclass
class ListenSocket:
    sock: socket.socket


@dataclass
class Preaccepted:
    sock: socket.socket


@dataclass
class ConnectAddress:
    address: HostPort
    netns: Netns | None = None


@dataclass
class Preconnected:
    sock: socket.socket


ListenSide = ListenAddress | ListenSocket | Preaccepted
ConnectSide = ConnectAddress | Preconnected


@dataclass
class ForwardSpec:
    listen: ListenSide
    connect: ConnectSide
    connect_timeout: float | None = 30.0
    name: str = ""

    @property
    def one_shot(self) -> bool:
        """-S or -C: exactly one connection is carried, then the forward is finished."""
        return isinstance(self.listen, Preaccepted) or isinstance(self.connect, Preconnected)


@dataclass
class ForwardStats:
    accepted: int = 0
    active: int = 0
    closed: int = 0
    reset: int = 0
    connect_failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class Forward:
    """A running forward inside a :class:`~nsbridge.bridge.Bridge` event loop."""

    spec: ForwardSpec
    loop: EventLoop
    mover: Mover
    listen_factory: SocketFactory
    connect_factory: SocketFactory
    on_finished: Callable[[Forward], None]
    stats: ForwardStats = field(default_factory=ForwardStats)
    listener: socket.socket | None = None
    target: ResolvedAddress | None = None
    sessions: set[TcpSession] = field(default_factory=set)
    finished: bool = False

    # ---- setup ------------------------------------------------------------------------

    def open(self) -> None:
        """Resolve, bind and validate everything; raises UserError before anything runs."""
        spec = self.spec
        if isinstance(spec.connect, ConnectAddress):
            self.target = self.connect_factory.call(
                resolve, spec.connect.address, what="--connect", passive=False
            )
        if isinstance(spec.listen, ListenAddress):
            where = self.listen_factory.call(
                resolve, spec.listen.address, what="--listen", passive=True
            )
            self.listener = open_listener(self.listen_factory, where, what="--listen")
        elif isinstance(spec.listen, ListenSocket):
            self.listener = spec.listen.sock

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
        else:
            assert self.listener is not None
            self.loop.add(self.listener.fileno(), IN, self._on_listener)

    # ---- accepting ----------------------------------------------------------------------

    def _on_listener(self, _events: int) -> None:
        listener = self.listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, _peer = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                continue  # ECONNABORTED and friends: that client is gone, take the next
            client = socket.socket(listener.family, listener.type, fileno=fd)
            self.stats.accepted += 1
            if self.spec.one_shot:
                self.stop_listening()
                self.start_session(client)
                return
            self.start_session(client)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds: stop polling the listener for a moment instead of spinning on it."""
        log.warning("accept on %s failed: %s; pausing %.1fs", self.listen_address, exc.strerror,
                    _EMFILE_PAUSE)
        assert self.listener is not None
        fd = self.listener.fileno()
        self.loop.modify(fd, 0)

        def resume() -> None:
            if self.listener is not None and self.listener.fileno() == fd:
                self.loop.modify(fd, IN)

        self.loop.call_later(_EMFILE_PAUSE, resume)

    def start_session(self, client: socket.socket) -> None:
        """Relay ``client`` (accepted here or handed over by the supervisor) to the target."""
        connect = self.spec.connect
        if isinstance(connect, Preconnected):
            session = TcpSession(self.loop, self.mover, client, connect.sock, self._session_done,
                                 server_name=_peer(connect.sock))
            self._track(session)
            session.start_connected()
            return
        assert self.target is not None
        try:
            server = self.connect_factory.socket(self.target.family, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot create socket for %s: %s; resetting client",
                        self.target, exc.strerror)
            _reset_and_close(client)
            self.stats.connect_failed += 1
            self._maybe_finish()
            return
        session = TcpSession(self.loop, self.mover, client, server, self._session_done)
        self._track(session)
        session.connect(self.target.sockaddr, self.spec.connect_timeout)

    def _track(self, session: TcpSession) -> None:
        self.sessions.add(session)
        self.stats.active += 1

    def _session_done(self, session: TcpSession) -> None:
        self.sessions.discard(session)
        stats = self.stats
        stats.active -= 1
        stats.bytes_up += session.up.total
        stats.bytes_down += session.down.total
        if session.outcome == "closed":
            stats.closed += 1
        elif session.outcome.startswith(("connect", "client reset before")):
            stats.connect_failed += 1
        else:
            stats.reset += 1
        if log.isEnabledFor(logging.INFO):
            log.info("%s", session.describe())
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.spec.one_shot and not self.sessions and not self.finished:
            self.finished = True
            self.on_finished(self)

    # ---- stopping ---------------------------------------------------------------------

    def stop_listening(self) -> None:
        """Close the listener; open connections carry on."""
        if self.listener is not None:
            self.loop.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None

    def abort_all(self, outcome: str) -> None:
        for session in list(self.sessions):
            session.abort(outcome)


def _peer(sock: socket.socket) -> str:
    try:
        return format_sockaddr(sock.getpeername())
    except OSError:
        return "?"


def _reset_and_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    except OSError:
        pass
    sock.close()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
