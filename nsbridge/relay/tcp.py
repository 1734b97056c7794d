"""The TCP relay: one client socket, one target socket, bytes both ways until both end.

What it guarantees, and how:

* **Half-close**: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once every
  byte before it was delivered; the opposite direction keeps flowing.
* **Resets**: a read or write that fails with a connection error, or an ``EPOLLERR`` with
  a pending ``SO_ERROR``, aborts the pair: the surviving socket is closed with
  ``SO_LINGER {1, 0}`` so its peer sees a reset, not a clean FIN.
* **Backpressure**: a direction never reads more until what it read has been written,
  so memory per connection is bounded and a slow reader slows its own sender only.
* **No added latency**: ``TCP_NODELAY`` on both legs and nothing is held back.

Sockets are registered once, edge-triggered, for IN|OUT; there is no epoll_ctl per
chunk.  Edge-triggered means a direction must run until the source says EAGAIN (or
the destination is full) and must be resumed by hand when its destination drains.

Two data movers are provided: :class:`SplicePipeMover` (bulk goes socket -> pipe ->
socket and never enters Python; reads up to 64 KiB are copied, which is cheaper for
request/response traffic) and :class:`CopyMover` (``readv``/``write`` through one shared
buffer).  Either way a short copied read proves the socket had nothing more queued, so
an IN edge is served with two syscalls (read, write) instead of three, and in one Python
call (``serve_edge``) rather than the pump's five: on a keep-alive connection that is
most events.  The figures behind these choices are in docs/performance.md and
``bench/RESULTS.md``.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
import time
from collections.abc import Callable

from nsbridge.errors import errno_name
from nsbridge.net.addresses import format_sockaddr
from nsbridge.relay.log import INFO, log
from nsbridge.relay.loop import ERR, ET, HUP, IN, OUT, RDHUP, EventLoop, Timer
from nsbridge.relay.pipes import PipePool

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from typing import Any

_REGISTER_MASK = IN | OUT | RDHUP | ET
_LINGER_RESET = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_CHUNK = 1 << 20
# Reads up to this size are copied (readv/write) even by the splice mover: for a
# request or a response the pipe round trip costs more than copying a few KiB (measured:
# bench/RESULTS.md).  A read that fills it marks the direction as bulk, which then
# splices.  Tunable for experiments with NSBRIDGE_SMALL_READ (bytes; 0 = always splice).
SMALL_READ = int(os.environ.get("NSBRIDGE_SMALL_READ", 64 << 10))
_SMALL_READ = SMALL_READ


class Direction:
    """One way of a relay: bytes from ``src`` to ``dst``."""

    __slots__ = ("bulk", "data", "done", "drained", "dst", "eof", "pending", "pipe", "src",
                 "total")

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.pending = 0  # bytes read from src and not yet written to dst
        self.pipe: tuple[int, int] | None = None  # spliced: where pending bytes sit
        self.data: memoryview | None = None  # copied: where pending bytes sit
        self.eof = False  # src said EOF
        self.done = False  # EOF passed on to dst (shutdown SHUT_WR)
        self.bulk = False  # the last read filled the copy buffer: splice from now on
        self.drained = False  # the last read was short: src had nothing more queued
        self.total = 0


class SourceFailed(Exception):
    """Reading the source failed: that side reset or vanished."""


class CopyMover:
    """Moves bytes with readv()/write() through one buffer shared by all connections.

    A read shorter than the buffer took everything the socket had queued (TCP's
    recvmsg stops only when the queue is empty or the buffer full), so it sets
    ``Direction.drained`` and the relay can skip the read that would only say EAGAIN.
    """

    def __init__(self, size: int = _CHUNK) -> None:
        self._buf = bytearray(size)
        self._bufs = [self._buf]  # readv's argument, built once rather than per read
        self._view = memoryview(self._buf)
        self._size = size

    def fill(self, d: Direction) -> int:
        try:
            n = os.readv(d.src, self._bufs)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise SourceFailed(exc) from exc
        d.pending = n
        d.data = self._view[:n]
        d.drained = n < self._size
        return n

    def flush(self, d: Direction) -> bool:
        """Write pending bytes; True when all are written."""
        data = d.data
        assert data is not None
        while d.pending:
            try:
                n = os.write(d.dst, data)
            except BlockingIOError:
                if data.obj is self._buf:
                    # The shared buffer is reused by the next read: keep a private copy.
                    data = memoryview(bytes(data))
                d.data = data
                return False
            d.pending -= n
            d.total += n
            data = data[n:]
        d.data = None
        return True

    def drop(self, d: Direction) -> None:
        d.data = None
        d.pending = 0

    def serve_edge(self, d: Direction) -> bool:
        """Serve an IN edge of request/response traffic in one call: one copied read
        and, when it was short (the socket is drained), its write.

        This is fill() and flush() fused for the commonest event of a keep-alive
        connection, which otherwise costs five Python calls around its two syscalls.
        True: the edge is served (the rest, if the destination was full, waits in
        ``d`` for its OUT edge).  False: the read met EOF or filled the buffer, and
        ``d`` is left as fill() leaves it, for the caller to pump on.
        """
        try:
            n = os.readv(d.src, self._bufs)
        except BlockingIOError:
            return True
        except OSError as exc:
            raise SourceFailed(exc) from exc
        if n == 0:
            d.eof = True
            return False
        if n == self._size:
            d.pending = n
            d.data = self._view[:n]
            d.drained = False
            return False
        try:
            written = os.write(d.dst, self._view[:n])
        except BlockingIOError:
            written = 0
        d.total += written
        if written < n:
            d.pending = n - written
            d.data = memoryview(self._buf[written:n])  # a copy: the buffer is shared
        return True


class SplicePipeMover(CopyMover):
    """Moves bulk bytes with splice() through a pooled pipe; small reads are copied.

    Splicing costs three syscalls per chunk (in, out, and the read that says EAGAIN,
    which edge-triggering needs because a short splice does not prove the socket is
    empty: it also stops when the pipe runs out of slots) plus a pipe from the pool.
    For a 600-byte response that is more work than copying it, so each direction starts
    by copying up to ``small_read`` bytes; a read that fills the buffer switches the
    direction to splice (the bytes never enter Python), and a splice read that gets
    less than a quarter of ``small_read`` switches it back.
    """

    def __init__(self, pool: PipePool | None = None, small_read: int = _SMALL_READ) -> None:
        super().__init__(max(small_read, 1))
        self.pool = pool or PipePool()
        self._always_splice = small_read <= 0
        self._back_to_copy = small_read // 4

    def fill(self, d: Direction) -> int:
        if not d.bulk and not self._always_splice:
            n = CopyMover.fill(self, d)  # not super(): this runs for every small read
            d.bulk = not d.drained
            return n
        if d.pipe is None:
            d.pipe = self.pool.acquire()
        d.drained = False
        try:
            n = os.splice(d.src, d.pipe[1], self.pool.pipe_size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self.pool.release(d.pipe)  # idle connections hold no pipe
            d.pipe = None
            raise
        except OSError as exc:
            raise SourceFailed(exc) from exc
        d.pending = n
        if n < self._back_to_copy:
            d.bulk = False
        return n

    def serve_edge(self, d: Direction) -> bool:
        """CopyMover.serve_edge for a direction that copies; a bulk one (or an always-
        splicing mover) returns False at once, having read nothing."""
        if d.bulk or self._always_splice:
            return False
        if CopyMover.serve_edge(self, d):
            return True
        d.bulk = d.pending != 0  # filled the buffer: splice from now on (fill's rule)
        return False

    def flush(self, d: Direction) -> bool:
        """Write pending bytes; True when all are written (a pipe goes back to the pool)."""
        if d.pipe is None:
            return super().flush(d)
        while d.pending:
            try:
                n = os.splice(d.pipe[0], d.dst, d.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            d.pending -= n
            d.total += n
        self.pool.release(d.pipe)
        d.pipe = None
        return True

    def drop(self, d: Direction) -> None:
        if d.pipe is not None:
            if d.pending:
                self.pool.discard(d.pipe)
            else:
                self.pool.release(d.pipe)
            d.pipe = None
        super().drop(d)


Mover = SplicePipeMover | CopyMover


class TcpSession:
    """A client connection and its target connection, from connect to close.

    ``on_done(session)`` is called exactly once, after both sockets are closed.
    """

    __slots__ = (
        "_loop",
        "_mover",
        "_on_done",
        "_server_name",
        "_timer",
        "client",
        "client_fd",
        "client_name",
        "close_leaves_epoll",
        "down",
        "ended",
        "handover",
        "outcome",
        "preamble",
        "server",
        "server_fd",
        "started",
        "up",
    )

    def __init__(
        self,
        loop: EventLoop,
        mover: Mover,
        client: socket.socket,
        server: socket.socket,
        on_done: Callable[[TcpSession], None],
        client_name: str = "",
        server_name: str = "",
        close_leaves_epoll: bool = False,
    ) -> None:
        self._loop = loop
        self._mover = mover
        self._on_done = on_done
        self._timer: Timer | None = None
        self.client = client
        self.server = server
        self.client_fd = client.fileno()
        self.server_fd = server.fileno()
        # The name is only printed by -v; getpeername() is a syscall per connection.
        self.client_name = client_name or (
            peer_name(client) if log.isEnabledFor(INFO) else "?")
        # A name, or the target's sockaddr (shared with the forward) formatted on demand:
        # a string per idle connection is memory for a log line that may never be printed.
        self._server_name: str | tuple | bytes = server_name
        self.up = Direction(self.client_fd, self.server_fd)
        self.down = Direction(self.server_fd, self.client_fd)
        self.started = time.monotonic()
        self.ended = False
        self.outcome = ""
        self.preamble = b""  # sent to the server first (a PROXY protocol header)
        # True when nothing else holds either socket's file (accepted or handed over here,
        # the target made for this session): closing them is then enough to leave epoll.
        self.close_leaves_epoll = close_leaves_epoll
        # Set: once connected, both sockets go to it (the native relay) instead of being
        # relayed here; it sends the preamble too.
        self.handover: Callable[[TcpSession], None] | None = None
        for sock in (client, server):
            if sock.gettimeout() != 0.0:  # made with SOCK_NONBLOCK: skip the ioctl
                sock.setblocking(False)
            _set_nodelay(sock)

    @property
    def server_name(self) -> str:
        name = self._server_name
        return name if isinstance(name, str) else format_sockaddr(name)

    @server_name.setter
    def server_name(self, name: str) -> None:
        self._server_name = name

    # ---- phase 1: connecting -----------------------------------------------------

    def connect(self, sockaddr: tuple | str | bytes, timeout: float | None,
                code: int | None = None) -> None:
        """Start a non-blocking connect of the server socket, then relay.  ``code``: the
        caller already called connect() and got this (EINPROGRESS, or a failure)."""
        if not self._server_name:
            self._server_name = sockaddr if isinstance(sockaddr, tuple | bytes) else str(sockaddr)
        if code is None:
            code = self.server.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                # To a local target (loopback, a veth into another namespace) the
                # handshake is done by the time connect() returns: the SYN-ACK waited in
                # the socket's backlog, processed as connect() released the socket.  A
                # second connect() says so (0), which spares the timer, the OUT event and
                # the SO_ERROR check.
                code = self.server.connect_ex(sockaddr)
                if code == errno.EALREADY:
                    code = errno.EINPROGRESS
        if (code == 0 or code == errno.EISCONN) and self.handover is not None:
            self._connected()
            return
        if code == 0 or code == errno.EISCONN:
            if self.preamble and not self._send_preamble():
                return
            # Registered only now: adding an fd to epoll reports what is already pending
            # (a request, even a FIN), so nothing has to be pumped by hand.
            self._loop.add(self.client_fd, _REGISTER_MASK, self._on_client)
            self._loop.add(self.server_fd, _REGISTER_MASK, self._on_server)
            return
        self._loop.add(self.client_fd, _REGISTER_MASK, self._on_client_connecting)
        if code == errno.EINPROGRESS:
            self._loop.add(self.server_fd, _REGISTER_MASK, self._on_server_connecting)
            if timeout:
                self._timer = self._loop.call_later(timeout, self._connect_timed_out)
        else:
            self._abort(f"connect failed: {errno_name(code)}")

    def start_connected(self) -> None:
        """Both sockets are already connected (pre-connected target fd)."""
        self._loop.add(self.client_fd, _REGISTER_MASK, self._on_client)
        self._loop.add(self.server_fd, _REGISTER_MASK, self._on_server)
        self._connected()

    def _on_client_connecting(self, events: int) -> None:
        if events & ERR:
            self._abort("client reset before connect finished")

    def _on_server_connecting(self, events: int) -> None:
        code = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._abort(f"connect failed: {errno_name(code)}")
        elif events & (OUT | ERR | HUP):
            self._loop.set_handler(self.server_fd, self._on_server)
            self._connected()

    def _connect_timed_out(self) -> None:
        if not self.ended:
            self._abort("connect timed out")

    def _connected(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.handover is not None:
            self.ended = True  # relayed elsewhere from now on: on_done is not called
            self._loop.remove(self.client_fd)
            self._loop.remove(self.server_fd)
            self.handover(self)
            return
        # Swap in the relaying handler; edges that fired while connecting were not
        # acted on, so run both directions once by hand.
        self._loop.set_handler(self.client_fd, self._on_client)
        if self.preamble and not self._send_preamble():
            return
        self._pump(self.up)
        if not self.ended:
            self._pump(self.down)

    def _send_preamble(self) -> bool:
        """A fresh connection's send buffer always has room for a ~100-byte header."""
        try:
            sent = self.server.send(self.preamble)
        except OSError as exc:
            self._abort(f"server reset ({errno_name(exc.errno)})")
            return False
        if sent != len(self.preamble):
            self._abort("server did not take the PROXY header")
            return False
        return True

    # ---- phase 2: relaying --------------------------------------------------------

    def _on_client(self, events: int) -> None:
        if events & ERR and abort_if_error(self.client, "client", self._abort):
            return
        if events & (IN | RDHUP | HUP) and not self.up.pending:
            self._on_readable(self.up, events)
        if events & OUT and self.down.pending and not self.ended:
            self._pump(self.down)

    def _on_server(self, events: int) -> None:
        if events & ERR and abort_if_error(self.server, "server", self._abort):
            return
        if events & (IN | RDHUP | HUP) and not self.down.pending:
            self._on_readable(self.down, events)
        if events & OUT and self.up.pending and not self.ended:
            self._pump(self.up)

    def _on_readable(self, d: Direction, events: int) -> None:
        """``d``'s source is readable.  With RDHUP/HUP (an EOF may be queued) the pump
        reads to the end; a plain IN edge gets the mover's one-call read-and-write, and
        the pump only when that did not serve it (see _pump for why a drained read may
        end it)."""
        if events & (RDHUP | HUP):
            self._pump(d)
            return
        try:
            if self._mover.serve_edge(d):
                return
        except SourceFailed as exc:
            self._abort_from(d.src, exc.args[0])
            return
        except OSError as exc:
            self._abort_from(d.dst, exc)
            return
        self._pump(d, True)

    def _pump(self, d: Direction, edge: bool = False) -> None:
        """Move bytes src -> dst until src is empty, dst is full, or src ends.

        ``edge``: called for an IN edge that carried no RDHUP/HUP.  Then a read the
        mover marks ``drained`` ends the pump once written, without the read that would
        only say EAGAIN: bytes arriving after epoll_wait() reported the edge raise a new
        edge, and an EOF already queued would have come with RDHUP.  Pumps resumed by
        the destination's OUT edge, or by hand, still read until EAGAIN.
        """
        mover = self._mover
        try:
            while True:
                if d.pending and not mover.flush(d):
                    return  # dst full: its OUT edge resumes us
                if d.eof:
                    self._finish(d)
                    return
                if mover.fill(d) == 0:
                    d.eof = True
                elif edge and d.drained:
                    mover.flush(d)  # written or not, the next edge resumes us
                    return
        except BlockingIOError:
            return  # src empty: its IN edge resumes us
        except SourceFailed as exc:
            self._abort_from(d.src, exc.args[0])
        except OSError as exc:
            self._abort_from(d.dst, exc)

    def _abort_from(self, fd: int, exc: OSError) -> None:
        """Reset both sides because the socket ``fd`` failed with ``exc``."""
        who = "client" if fd == self.client_fd else "server"
        self._abort(f"{who} reset ({errno_name(exc.errno)})")

    def _finish(self, d: Direction) -> None:
        """Pass EOF on; when both ways are finished, close cleanly."""
        if d.done:
            return
        d.done = True
        self._mover.drop(d)
        other = self.down if d is self.up else self.up
        if other.done:
            # dst already sent its FIN and we read it: close() sends ours, as shutdown()
            # would, so save the syscall.
            self._close("closed")
            return
        try:
            (self.server if d.dst == self.server_fd else self.client).shutdown(socket.SHUT_WR)
        except OSError as exc:
            who = "client" if d.dst == self.client_fd else "server"
            self._abort(f"{who} reset ({errno_name(exc.errno)})")

    # ---- ending ---------------------------------------------------------------------

    def _abort(self, outcome: str) -> None:
        """End with a reset on every side still connected."""
        if self.ended:
            return
        for sock in (self.client, self.server):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self._close(outcome)

    def abort(self, outcome: str = "reset by nsbridge") -> None:
        """Reset both sides now (forward removed with --kill, or shutdown)."""
        self._abort(outcome)

    def _close(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.outcome = outcome
        if self._timer is not None:
            self._timer.cancel()
        self._mover.drop(self.up)
        self._mover.drop(self.down)
        if self.close_leaves_epoll:
            self._loop.forget(self.client_fd)
            self._loop.forget(self.server_fd)
        else:
            self._loop.remove(self.client_fd)
            self._loop.remove(self.server_fd)
        self.client.close()
        self.server.close()
        self._on_done(self)

    def describe(self) -> str:
        """One log line: who, where, bytes each way, duration, how it ended."""
        duration = time.monotonic() - self.started
        return (
            f"{self.client_name} -> {self.server_name}: {self.up.total} B up, "
            f"{self.down.total} B down, {duration:.3f}s, {self.outcome}"
        )


def tally(stats: Any, session: TcpSession) -> None:
    """Count an ended session into ``stats`` (anything with active, closed, reset,
    connect_failed, bytes_up, bytes_down): one definition of "how it ended" for every
    user of the relay (forwards, the usernet redirector, the native relay's records)."""
    tally_outcome(stats, session.up.total, session.down.total, session.outcome)


def tally_outcome(stats: Any, up: int, down: int, outcome: str) -> None:
    """tally() for a connection known by its byte counts and outcome (a native record)."""
    stats.active -= 1
    stats.bytes_up += up
    stats.bytes_down += down
    if outcome == "closed":
        stats.closed += 1
    elif outcome.startswith(("connect", "client reset before")):
        stats.connect_failed += 1
    else:
        stats.reset += 1


# The family as a plain int: socket.family converts it to an IntEnum member, twice per
# connection, for a comparison that needs no enum.
raw_family = _socket.socket.family.__get__
_raw_family = raw_family
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def abort_if_error(sock: socket.socket, who: str, abort: Callable[[str], None]) -> bool:
    """On EPOLLERR: if ``sock`` has a pending error (reading SO_ERROR clears it), call
    ``abort("WHO reset (ECODE)")`` and return True.  Shared by every relay of a socket
    pair (this session, the DNS-over-TCP relay), so a reset is reported alike."""
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        abort(f"{who} reset ({errno_name(code)})")
        return True
    return False


def reset_and_close(sock: socket.socket) -> None:
    """Close with ``SO_LINGER {1, 0}``: the peer gets a RST now, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _set_nodelay(sock: socket.socket) -> None:
    if _raw_family(sock) in _TCP_FAMILIES:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def peer_name(sock: socket.socket) -> str:
    """The peer as ``host:port`` for log lines; ``?`` once it is gone."""
    try:
        return format_sockaddr(sock.getpeername())
    except OSError:
        return "?"
