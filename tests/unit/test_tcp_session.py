"""nsbridge.relay.tcp's TcpSession and its movers, with real loopback sockets and a real
event loop (no namespaces, no root).

The connect paths: a local target is relayed without a connect timer, data and a FIN
queued before the session starts still arrive, and an ended session leaves nothing
registered in the loop.

The one-call path for request/response edges (``Mover.serve_edge``): a keep-alive
connection's commonest event is "a few hundred bytes arrived": one copied read and one
write.  The movers serve it in one call; these tests hold that path to the general pump's
guarantees: every byte, in order, when the destination is full; EOF still passed on; a
bulk read still switches the splice mover to splicing.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from helpers.relay_loop import loop_running, loopback_tcp_pair
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.tcp import CopyMover, Direction, SplicePipeMover, TcpSession

# ---- connect paths ------------------------------------------------------------------------


def _relay_once(close_leaves_epoll: bool, *, queue_before: bool) -> None:
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = loopback_tcp_pair()
    loop = EventLoop()
    done = threading.Event()
    ended: list[TcpSession] = []

    def on_done(session: TcpSession) -> None:
        ended.append(session)
        done.set()

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    session = TcpSession(loop, CopyMover(), inner, server, on_done,
                         close_leaves_epoll=close_leaves_epoll)
    if queue_before:  # request and FIN wait in the client socket before anything polls it
        outer.sendall(b"request")
        outer.shutdown(socket.SHUT_WR)
    session.connect(target.getsockname(), 30.0)
    fds = (session.client_fd, session.server_fd)
    try:
        with loop_running(loop):
            peer, _ = target.accept()
            peer.settimeout(10)
            if not queue_before:
                outer.sendall(b"request")
                outer.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := peer.recv(100):
                received += chunk
            assert received == b"request"  # the data, then the EOF
            peer.sendall(b"response")
            peer.shutdown(socket.SHUT_WR)
            outer.settimeout(10)
            answer = b""
            while chunk := outer.recv(100):
                answer += chunk
            assert answer == b"response"
            assert done.wait(10)
            assert ended[0].outcome == "closed"
            assert all(fd not in loop._handlers for fd in fds)
            peer.close()
    finally:
        outer.close()
        target.close()


def test_local_target_relays_both_ways_and_unregisters():
    _relay_once(close_leaves_epoll=False, queue_before=False)


def test_close_leaves_epoll_session_relays_both_ways_and_forgets_its_fds():
    _relay_once(close_leaves_epoll=True, queue_before=False)


def test_request_and_fin_queued_before_connect_are_carried():
    _relay_once(close_leaves_epoll=True, queue_before=True)


def test_fast_connect_leaves_no_pending_timer():
    """A loopback connect is complete when connect() returns (second connect() says 0),
    so no connect timer is left in the heap; a slow connect would still get one."""
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = loopback_tcp_pair()
    loop = EventLoop()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    session = TcpSession(loop, CopyMover(), inner, server, lambda _s: None,
                         close_leaves_epoll=True)
    try:
        session.connect(target.getsockname(), 30.0)
        if session._timer is None:  # the usual case on loopback
            assert loop._handlers[session.server_fd] == session._on_server
            assert loop._handlers[session.client_fd] == session._on_client
        else:  # the handshake was still running (very busy machine): the slow path
            assert loop._handlers[session.server_fd] == session._on_server_connecting
        session.abort()
        assert session.ended and not loop._handlers.get(session.client_fd)
    finally:
        loop.close()
        outer.close()
        target.close()


def test_forget_drops_the_handler_only():
    loop = EventLoop()
    a, b = socket.socketpair()
    try:
        loop.add(a.fileno(), 1, lambda _e: None)
        loop.forget(a.fileno())
        assert a.fileno() not in loop._handlers
        loop.forget(a.fileno())  # twice is harmless
    finally:
        a.close()
        b.close()
        loop.close()


# ---- the one-call path for request/response edges ------------------------------------------


def _fill(sock: socket.socket) -> int:
    """Write to ``sock`` until the kernel takes no more; return how much it took."""
    total = 0
    chunk = b"f" * 65536
    while True:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total


@dataclass
class Link:
    """A direction from ``src`` to ``dst`` (non-blocking socketpair ends); the test
    writes at ``src_peer`` and reads at ``dst_peer``."""

    src_peer: socket.socket
    src: socket.socket
    dst: socket.socket
    dst_peer: socket.socket

    def direction(self) -> Direction:
        return Direction(self.src.fileno(), self.dst.fileno())


@pytest.fixture
def make_link() -> Iterator[Callable[[], Link]]:
    """Links whose sockets are all closed after the test, also when it fails."""
    made: list[Link] = []

    def make() -> Link:
        src_peer, src = socket.socketpair()
        dst, dst_peer = socket.socketpair()
        src.setblocking(False)
        dst.setblocking(False)
        made.append(Link(src_peer, src, dst, dst_peer))
        return made[-1]

    yield make
    for link in made:
        for sock in (link.src_peer, link.src, link.dst, link.dst_peer):
            sock.close()


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_a_full_destination_keeps_the_unwritten_rest_in_order(mover_class, make_link):
    link, mover = make_link(), mover_class()
    stuffed = _fill(link.dst)  # the destination takes nothing more
    message = bytes(range(256)) * 16  # 4 KiB, a short read
    link.src_peer.sendall(message)
    d = link.direction()

    assert mover.serve_edge(d) is True  # served: the rest waits for the OUT edge
    assert d.pending == len(message)

    # The other direction of the connection reads through the same mover (its buffer
    # is shared by every connection) before the rest is written.
    other = make_link()
    other.src_peer.sendall(b"x" * 3000)
    assert mover.serve_edge(other.direction()) is True
    assert other.dst_peer.recv(4096) == b"x" * 3000
    assert bytes(d.data) == message

    # Free the destination, then let the pump's flush finish the job.
    received = bytearray()
    link.dst_peer.settimeout(5)
    while len(received) < stuffed:
        received += link.dst_peer.recv(stuffed - len(received))
    assert mover.flush(d) is True
    tail = bytearray()
    while len(tail) < len(message):
        tail += link.dst_peer.recv(len(message))
    assert bytes(tail) == message
    assert d.total == len(message)


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_eof_and_an_empty_source_leave_the_direction_as_fill_would(mover_class, make_link):
    link, mover = make_link(), mover_class()
    d = link.direction()
    assert mover.serve_edge(d) is True  # nothing there: served, nothing read
    assert d.pending == 0 and not d.eof
    link.src_peer.shutdown(socket.SHUT_WR)
    assert mover.serve_edge(d) is False  # EOF: the pump passes it on
    assert d.eof and d.pending == 0


def test_a_buffer_filling_read_hands_over_to_the_pump_and_switches_to_splice(make_link):
    link, mover = make_link(), SplicePipeMover(small_read=4096)
    link.src_peer.sendall(b"b" * 8192)
    d = link.direction()
    try:
        assert mover.serve_edge(d) is False  # the read filled the copy buffer
        assert d.pending == 4096 and d.bulk
        assert mover.serve_edge(d) is False  # a bulk direction is the pump's: no read
        assert d.pending == 4096
    finally:
        mover.drop(d)


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_request_response_rounds_and_a_slow_reader_lose_nothing(mover_class):
    """2,000 request/response rounds through a session, then 4 MiB of small writes to
    a server that stops reading for a while: each round's answer is exact, and the
    stream arrives whole and in order."""
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = loopback_tcp_pair()
    loop = EventLoop()
    done = threading.Event()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # fills quickly
    session = TcpSession(loop, mover_class(), inner, server, lambda _s: done.set())
    session.connect(target.getsockname(), 30.0)
    peer = None
    try:
        with loop_running(loop):
            peer, _ = target.accept()
            peer.settimeout(10)
            outer.settimeout(10)
            for i in range(2000):
                request = b"GET %d\n" % i
                outer.sendall(request)
                got = b""
                while len(got) < len(request):
                    got += peer.recv(100)
                assert got == request
                peer.sendall(b"OK %d\n" % i)
                answer = b""
                while not answer.endswith(b"\n"):
                    answer += outer.recv(100)
                assert answer == b"OK %d\n" % i

            pattern = os.urandom(1 << 22)
            sender = threading.Thread(
                target=lambda: [outer.sendall(pattern[i:i + 700])
                                for i in range(0, len(pattern), 700)],
                daemon=True)
            sender.start()
            threading.Event().wait(0.3)  # the server reads nothing meanwhile: buffers fill
            received = bytearray()
            while len(received) < len(pattern):
                received += peer.recv(1 << 16)
            sender.join(10)
            assert bytes(received) == pattern

            outer.shutdown(socket.SHUT_WR)
            assert peer.recv(1) == b""  # EOF passed on
            peer.close()
            assert done.wait(10)
            assert session.outcome == "closed"
    finally:
        outer.close()
        target.close()
        if peer is not None:
            peer.close()
