"""The socket switcher's native core (``_notifycore.c``) on its own, without a program
under a filter (that is tests/usernet/test_switching*.py, run over both paths): which
path serves, bad arguments refused with a clear error, and a failing step reported as
an OSError, never a crash and never an fd left behind."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from nsbridge.errors import UserError
from nsbridge.linux import notifycore

core = notifycore._notifycore
needs_core = pytest.mark.skipif(core is None, reason=str(notifycore.unavailable()))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_chosen_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(notifycore.SWITCH_ENV, "python")
    assert notifycore.chosen() is None
    monkeypatch.setenv(notifycore.SWITCH_ENV, "native")
    assert notifycore.chosen() is core
    monkeypatch.delenv(notifycore.SWITCH_ENV)
    assert notifycore.chosen() is core  # the default where built
    monkeypatch.setenv(notifycore.SWITCH_ENV, "fast")
    with pytest.raises(UserError, match="unknown path 'fast'"):
        notifycore.chosen()


@needs_core
def test_receive_on_what_is_no_listener_is_an_oserror() -> None:
    assert core is not None
    with socket.socket() as sock, pytest.raises(OSError) as caught:
        core.receive(sock.fileno(), 42)
    assert caught.value.errno in (errno.ENOTTY, errno.EINVAL)
    with pytest.raises(OSError) as caught:
        core.receive(-1, 42)
    assert caught.value.errno == errno.EBADF


@needs_core
@pytest.mark.parametrize(("family", "target", "message"), [
    (socket.AF_UNIX, bytes(16), "family is AF_INET or AF_INET6"),
    (socket.AF_INET, b"\x02", "a sockaddr is 2 to 128 bytes"),
    (socket.AF_INET, bytes(129), "a sockaddr is 2 to 128 bytes"),
])
def test_switch_connect_refuses_bad_arguments(family: int, target: bytes,
                                              message: str) -> None:
    assert core is not None
    before = _open_fds()
    with socket.socket() as source, pytest.raises(ValueError, match=message):
        core.switch_connect(-1, 1, os.getpid(), 3, source.fileno(), socket.AF_INET, family,
                            target, False, None, True)
    assert _open_fds() == before


@needs_core
def test_switch_connect_failures_close_the_host_socket() -> None:
    """A connect refused at once comes back FAILED with its errno (nothing answered, so
    no listener is needed); a bind that cannot be made is an OSError.  Neither leaves
    the host socket open."""
    assert core is not None
    with socket.socket() as closed:  # a free port on loopback, then nobody listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    target = socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + \
        bytes([127, 0, 0, 1]) + bytes(8)
    before = _open_fds()
    with socket.socket() as source:
        assert core.switch_connect(-1, 1, os.getpid(), 3, source.fileno(), socket.AF_INET,
                                   socket.AF_INET, target, False, None, True) == \
            (core.FAILED, errno.ECONNREFUSED)
        foreign = socket.AF_INET.to_bytes(2, "little") + bytes(2) + bytes([192, 0, 2, 77]) \
            + bytes(8)  # not an address of this namespace
        with pytest.raises(OSError) as caught:
            core.switch_connect(-1, 1, os.getpid(), 3, source.fileno(), socket.AF_INET,
                                socket.AF_INET, target, False, foreign, True)
        assert caught.value.errno == errno.EADDRNOTAVAIL
    assert _open_fds() == before


@needs_core
def test_install_without_a_listener_closes_the_socket() -> None:
    assert core is not None
    before = _open_fds()
    host = socket.socket()
    with pytest.raises(OSError) as caught:
        core.install(-1, 1, os.getpid(), 3, host.detach(), True, 0)
    assert caught.value.errno == errno.EBADF
    assert _open_fds() == before
