"""DNS over TCP on the fast path: a relay that checks every message before the resolver.

A TCP connection from the namespace to its DNS address (``10.0.2.3:53`` /
``[fd00::3]:53``) is dialed to a host resolver *from the host*, which a resolver trusts
far more than the sandbox (often it is ``127.0.0.1``).  The TCP session of
:mod:`nsbridge.relay.tcp` would carry any bytes; this one parses the namespace's side as
DNS's length-prefixed stream (:class:`~nsbridge.usernet.proto.dns.DnsStream`) and
forwards only whole messages that :func:`~nsbridge.usernet.proto.dns.check_query` passes.
The tun path does the same check in :mod:`.tuntcp`, with its own I/O.

The first message that does not pass ends what is forwarded: the resolver gets a FIN
after the messages before it (never a byte of the bad one), answers to those come back
as they are, and the namespace's connection is closed once the resolver closed.  So a
pipelined client gets the answers it was owed and then an end of stream instead of an
answer to the bad message, as from a server that closes on a malformed request; the
refusal is counted (``on_refused``) and logged.  The resolver's replies are not
checked (it is the host's own resolver), only bounded: one read at a time, read again
only when it was written.

The relay is level-triggered (DNS over TCP is rare, so clarity wins over the syscalls
the forwarding relay saves) and registers for a direction only while it can move it.
Its ``up``/``down``/``outcome``/``abort``/``describe`` match
:class:`~nsbridge.relay.tcp.TcpSession`'s, so the redirector counts it the same way.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable

from nsbridge.errors import errno_name
from nsbridge.relay.loop import ERR, HUP, IN, OUT, EventLoop, Timer
from nsbridge.relay.tcp import abort_if_error, reset_and_close
from nsbridge.usernet.proto.dns import DnsStream

_READ_SIZE = 1 << 16


class _Way:
    """Bytes moved in one direction (the name and field TcpSession's tally reads)."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0


class DnsTcpRelay:
    """One namespace connection to the DNS address and its connection to a resolver.

    ``on_done(relay)`` is called once, after both sockets are closed; ``on_refused(
    reason)`` when a message from the namespace is refused (the connection then ends as
    the module docstring says).
    """

    def __init__(
        self,
        loop: EventLoop,
        client: socket.socket,
        server: socket.socket,
        on_done: Callable[[DnsTcpRelay], None],
        on_refused: Callable[[str], None],
        *,
        client_name: str = "?",
        server_name: str = "?",
    ) -> None:
        self._loop = loop
        self._on_done = on_done
        self._on_refused = on_refused
        self.client = client
        self.server = server
        self.client_name = client_name
        self.server_name = server_name
        self.stream = DnsStream()
        self.up = _Way()  # namespace -> resolver, checked messages only
        self.down = _Way()  # resolver -> namespace
        self.outcome = ""
        self.ended = False
        self.started = time.monotonic()
        self._timer: Timer | None = None
        self._connected = False
        self._to_server = b""  # checked, not yet taken by the server socket
        self._to_client = b""  # from the resolver, not yet taken by the client socket
        self._client_eof = False
        self._server_eof = False
        self._server_shut = False  # FIN sent to the resolver
        self._client_shut = False  # FIN sent to the namespace
        self._watched: dict[int, int] = {}  # fd -> epoll mask, while registered
        for sock in (client, server):
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    # ---- connecting -----------------------------------------------------------------

    def connect(self, target: tuple[str, int], timeout: float) -> None:
        """Dial the resolver; the namespace's bytes are read only once it accepted."""
        code = self.server.connect_ex(target)
        if code not in (0, errno.EINPROGRESS):
            self._abort(f"connect failed: {errno_name(code)}")
            return
        self._watch(self.server, OUT, self._on_server_connecting)
        self._timer = self._loop.call_later(timeout, self._connect_timed_out)

    def _on_server_connecting(self, events: int) -> None:
        code = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._abort(f"connect failed: {errno_name(code)}")
            return
        if not events & (OUT | ERR | HUP):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._connected = True
        self._loop.set_handler(self.server.fileno(), self._on_server)
        self._watch(self.client, 0, self._on_client)
        self._update()

    def _connect_timed_out(self) -> None:
        self._timer = None
        if not self.ended and not self._connected:
            self._abort("connect timed out")

    # ---- relaying -------------------------------------------------------------------

    def _on_client(self, events: int) -> None:
        if events & ERR and abort_if_error(self.client, "client", self._abort):
            return
        if events & OUT and self._to_client:
            self._flush_down()
        if not self.ended and events & (IN | HUP) and not self._client_eof and not self._to_server:
            self._read_client()
        self._update()

    def _on_server(self, events: int) -> None:
        if events & ERR and abort_if_error(self.server, "server", self._abort):
            return
        if events & OUT and self._to_server:
            self._flush_up()
        if not self.ended and events & (IN | HUP) and not self._server_eof and not self._to_client:
            self._read_server()
        self._update()

    def _read_client(self) -> None:
        try:
            data = self.client.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(f"client reset ({errno_name(exc.errno)})")
            return
        if not data:
            self._client_eof = True
        elif self.stream.refused is None:
            self._to_server = self.stream.feed(data)
            if self.stream.reason is not None:
                self._on_refused(self.stream.reason)
        # after a refusal the namespace's bytes are read (to see its end) and dropped
        self._flush_up()

    def _flush_up(self) -> None:
        if self._to_server:
            try:
                sent = self.server.send(self._to_server)
            except BlockingIOError:
                return
            except OSError as exc:
                self._abort(f"server reset ({errno_name(exc.errno)})")
                return
            self.up.total += sent
            self._to_server = self._to_server[sent:]
            if self._to_server:
                return
        if (self._client_eof or self.stream.refused is not None) and not self._server_shut:
            self._server_shut = True
            try:
                self.server.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the resolver is gone; its error arrives on the next read

    def _read_server(self) -> None:
        try:
            data = self.server.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(f"server reset ({errno_name(exc.errno)})")
            return
        if not data:
            self._server_eof = True
        self._to_client = data
        self._flush_down()

    def _flush_down(self) -> None:
        if self._to_client:
            try:
                sent = self.client.send(self._to_client)
            except BlockingIOError:
                return
            except OSError as exc:
                self._abort(f"client reset ({errno_name(exc.errno)})")
                return
            self.down.total += sent
            self._to_client = self._to_client[sent:]
            if self._to_client:
                return
        if self._server_eof and not self._client_shut:
            self._client_shut = True
            try:
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _update(self) -> None:
        """Close when both ways are finished; else watch what can move now.  A socket
        with nothing left to read or write is unwatched: level-triggered, its hang-up
        would otherwise fire for as long as the other side takes."""
        if self.ended:
            return
        if self._server_shut and self._client_shut:
            self._close("closed")
            return
        client = (OUT if self._to_client else 0) | (
            IN if not self._client_eof and not self._to_server else 0)
        server = (OUT if self._to_server else 0) | (
            IN if not self._server_eof and not self._to_client else 0)
        for sock, mask, eof, handler in (
            (self.client, client, self._client_eof, self._on_client),
            (self.server, server, self._server_eof, self._on_server),
        ):
            if mask == 0 and eof:
                self._unwatch(sock)
            else:
                self._watch(sock, mask, handler)

    # ---- registration and the end -------------------------------------------------------

    def _watch(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        fd = sock.fileno()
        current = self._watched.get(fd)
        if current is None:
            self._loop.add(fd, mask, handler)
        elif current != mask:
            self._loop.modify(fd, mask)
        self._watched[fd] = mask

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._watched.pop(fd, None) is not None:
            self._loop.remove(fd)

    def abort(self, outcome: str = "reset by nsbridge") -> None:
        """Reset both sides now (nsbridge is stopping)."""
        self._abort(outcome)

    def _abort(self, outcome: str) -> None:
        if self.ended:
            return
        self._close(outcome, reset=True)

    def _close(self, outcome: str, *, reset: bool = False) -> None:
        self.ended = True
        self.outcome = outcome
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in (self.client, self.server):
            self._unwatch(sock)
            if reset:
                reset_and_close(sock)
            else:
                sock.close()
        self._to_server = self._to_client = b""
        self._on_done(self)

    def describe(self) -> str:
        """One log line, as TcpSession's."""
        duration = time.monotonic() - self.started
        reason = self.stream.reason
        why = "" if reason is None else f", refused: {reason}"
        return (f"{self.client_name} -> {self.server_name}: {self.up.total} B up, "
                f"{self.down.total} B down, {duration:.3f}s, {self.outcome}{why}")

