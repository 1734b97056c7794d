"""The relay's one-call path for request/response edges (``Mover.serve_edge``).

A keep-alive connection's commonest event is "a few hundred bytes arrived": one copied
read and one write.  The movers serve it in one call; these tests hold that path to
the general pump's guarantees: every byte, in order, when the destination is full; EOF
still passed on; a bulk read still switches the splice mover to splicing.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from nsbridge.relay.loop import EventLoop
from nsbridge.relay.tcp import CopyMover, Direction, SplicePipeMover, TcpSession


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the connecting end, the accepted end) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


def _fill(sock: socket.socket) -> int:
    """Write to ``sock`` until the kernel takes no more; return how much it took."""
    sock.setblocking(False)
    total = 0
    chunk = b"f" * 65536
    while True:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_a_full_destination_keeps_the_unwritten_rest_in_order(mover_class):
    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    mover = mover_class()
    try:
        for sock in (src, dst):
            sock.setblocking(False)
        stuffed = _fill(dst)  # the destination takes nothing more
        message = bytes(range(256)) * 16  # 4 KiB, a short read
        src_peer.sendall(message)
        d = Direction(src.fileno(), dst.fileno())

        assert mover.serve_edge(d) is True  # served: the rest waits for the OUT edge
        assert d.pending == len(message)

        # The other direction of the connection reads through the same mover (its
        # buffer is shared by every connection) before the rest is written.
        other_peer, other = socket.socketpair()
        sink, sink_peer = socket.socketpair()
        try:
            other.setblocking(False)
            other_peer.sendall(b"x" * 3000)
            assert mover.serve_edge(Direction(other.fileno(), sink.fileno())) is True
            assert sink_peer.recv(4096) == b"x" * 3000
        finally:
            for sock in (other_peer, other, sink, sink_peer):
                sock.close()
        assert bytes(d.data) == message

        # Free the destination, then let the pump's flush finish the job.
        received = bytearray()
        dst_peer.settimeout(5)
        while len(received) < stuffed:
            received += dst_peer.recv(stuffed - len(received))
        assert mover.flush(d) is True
        tail = bytearray()
        while len(tail) < len(message):
            tail += dst_peer.recv(len(message))
        assert bytes(tail) == message
        assert d.total == len(message)
    finally:
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_eof_and_an_empty_source_leave_the_direction_as_fill_would(mover_class):
    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    mover = mover_class()
    try:
        src.setblocking(False)
        d = Direction(src.fileno(), dst.fileno())
        assert mover.serve_edge(d) is True  # nothing there: served, nothing read
        assert d.pending == 0 and not d.eof
        src_peer.shutdown(socket.SHUT_WR)
        assert mover.serve_edge(d) is False  # EOF: the pump passes it on
        assert d.eof and d.pending == 0
    finally:
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()


def test_a_buffer_filling_read_hands_over_to_the_pump_and_switches_to_splice():
    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    mover = SplicePipeMover(small_read=4096)
    try:
        src.setblocking(False)
        src_peer.sendall(b"b" * 8192)
        d = Direction(src.fileno(), dst.fileno())
        assert mover.serve_edge(d) is False  # the read filled the copy buffer
        assert d.pending == 4096 and d.bulk
        assert mover.serve_edge(d) is False  # a bulk direction is the pump's: no read
        assert d.pending == 4096
    finally:
        mover.drop(d)
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()


@pytest.mark.parametrize("mover_class", [CopyMover, SplicePipeMover])
def test_request_response_rounds_and_a_slow_reader_lose_nothing(mover_class):
    """2,000 request/response rounds through a session, then 4 MiB of small writes to
    a server that stops reading for a while: each round's answer is exact, and the
    stream arrives whole and in order."""
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = _tcp_pair()
    loop = EventLoop()
    done = threading.Event()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # fills quickly
    session = TcpSession(loop, mover_class(), inner, server, lambda _s: done.set())
    session.connect(target.getsockname(), 30.0)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    peer = None
    try:
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
        loop.stop()
        thread.join(10)
        loop.close()
        outer.close()
        target.close()
        if peer is not None:
            peer.close()
