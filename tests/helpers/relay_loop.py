"""Driving nsbridge's relay by hand: a loopback TCP pair to hand a session, and the event
loop run in a thread for a with-block."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from nsbridge.relay.loop import EventLoop


def loopback_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the connecting end, the accepted end) of a loopback TCP connection, for tests
    that drive a relay session by hand."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


@contextlib.contextmanager
def loop_running(loop: EventLoop) -> Iterator[None]:
    """Run ``loop`` in a thread for the with-block, then stop, join and close it, also
    when the test fails.  Register sessions before entering: the loop's handler table
    is not shared between threads."""
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.stop()
        thread.join(10)
        loop.close()

