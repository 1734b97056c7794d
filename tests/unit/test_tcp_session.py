"""TcpSession's connect paths: a local target is relayed without a connect timer, data
and a FIN queued before the session starts still arrive, and an ended session leaves
nothing registered in the loop."""

from __future__ import annotations

import socket
import threading

from conftest import loop_running, loopback_tcp_pair

from nsbridge.relay.loop import EventLoop
from nsbridge.relay.tcp import CopyMover, TcpSession


def _relay_once(sole: bool, *, queue_before: bool) -> None:
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = loopback_tcp_pair()
    loop = EventLoop()
    done = threading.Event()
    ended: list[TcpSession] = []

    def on_done(session: TcpSession) -> None:
        ended.append(session)
        done.set()

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    session = TcpSession(loop, CopyMover(), inner, server, on_done, sole=sole)
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
    _relay_once(sole=False, queue_before=False)


def test_sole_session_relays_both_ways_and_forgets_its_fds():
    _relay_once(sole=True, queue_before=False)


def test_request_and_fin_queued_before_connect_are_carried():
    _relay_once(sole=True, queue_before=True)


def test_fast_connect_leaves_no_pending_timer():
    """A loopback connect is complete when connect() returns (second connect() says 0),
    so no connect timer is left in the heap; a slow connect would still get one."""
    target = socket.create_server(("127.0.0.1", 0))
    outer, inner = loopback_tcp_pair()
    loop = EventLoop()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    session = TcpSession(loop, CopyMover(), inner, server, lambda _s: None, sole=True)
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
