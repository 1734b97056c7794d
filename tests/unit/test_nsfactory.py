"""The published ports' socket factory's failures, as the forward sees them.

Why: a forward resets the client when its connect side cannot make a socket, and reads
the reason from the OSError.  The in-namespace factory once raised ``OSError(0, ...)``,
an errno that names nothing; these tests run the real factory server loop (in a thread,
on a real SEQPACKET socketpair: it needs no namespace) and check that a refusal carries
the factory's errno and that a factory that is gone raises FactoryUnavailable (EIO), at
once on every later request.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator

import pytest

from nsbridge.usernet.inside import nsfactory
from nsbridge.usernet.inside.nsfactory import FactoryUnavailable, ProcessFactory

NO_SUCH_FAMILY = 4000  # not an address family: the factory's socket() refuses it


@pytest.fixture
def factory() -> Iterator[tuple[ProcessFactory, socket.socket]]:
    """A ProcessFactory talking to the real server loop; yields it and the server's end."""
    host_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=nsfactory._serve, args=(server_end,), daemon=True)
    server.start()
    made = ProcessFactory(host_end, "test-namespace")
    try:
        yield made, server_end
    finally:
        made.close()
        server.join(timeout=10)
        server_end.close()
    assert not server.is_alive()


def test_sockets_come_from_the_factory(factory):
    made, _server_end = factory
    sock = made.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] != 0


def test_a_refusal_carries_the_factorys_errno(factory):
    made, _server_end = factory
    with pytest.raises(OSError) as raised:
        made.socket(NO_SUCH_FAMILY, socket.SOCK_STREAM)
    assert raised.value.errno == errno.EAFNOSUPPORT
    assert not isinstance(raised.value, FactoryUnavailable)
    assert raised.value.strerror.startswith("socket factory in test-namespace: cannot create")
    # a refusal is not a broken factory: the next request is served
    made.socket(socket.AF_INET, socket.SOCK_STREAM).close()


def test_a_factory_that_is_gone_is_unavailable_at_once_afterwards(factory):
    made, server_end = factory
    server_end.shutdown(socket.SHUT_RDWR)  # the process died: its end reads and answers EOF
    with pytest.raises(FactoryUnavailable) as first:
        made.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert first.value.errno == errno.EIO
    assert "socket factory in test-namespace: the factory process is gone" in str(first.value)
    with pytest.raises(FactoryUnavailable) as later:
        made.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    assert later.value.errno == errno.EIO and later.value.strerror == first.value.strerror


def test_a_refusal_too_short_for_an_errno_is_eio():
    assert nsfactory._refusal(b"") == (errno.EIO, "no reason given")
    assert nsfactory._refusal(b"ab") == (errno.EIO, "ab")
    assert nsfactory._refusal(nsfactory._REFUSAL.pack(errno.EMFILE) + b"full") == (
        errno.EMFILE, "full")
