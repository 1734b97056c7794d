"""The socket switcher's native core (``_notifycore.c``) on its own, without a program
under a filter (that is tests/usernet/test_switching*.py, run over both paths): which
path serves, bad arguments refused with a clear error, and a failing step reported as
an OSError, never a crash and never an fd left behind."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest

from helpers.waiting import wait_until
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


def _sockaddr4(address: bytes, port: int) -> bytes:
    return socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + address + bytes(8)


@needs_core
def test_server_refuses_bad_arguments() -> None:
    assert core is not None
    with pytest.raises(ValueError, match="at most 8 watch fds"):
        core.Server(-1, 42, 1, list(range(9)))
    with pytest.raises(ValueError, match="not negative"):
        core.Server(-1, 42, 1, [-3])
    with pytest.raises(TypeError):
        core.Server(-1, 42, 1, 5)
    before = _open_fds()
    server = core.Server(-1, 42, 1, [])
    target = _sockaddr4(bytes([192, 0, 2, 1]), 80)
    for sock_family, raw in ((socket.AF_INET6, target), (socket.AF_INET, target[:15]),
                             (socket.AF_UNIX, target), (socket.AF_INET, b"\x02")):
        with pytest.raises(ValueError, match="no TCP destination"):
            server.cache_put(sock_family, raw, socket.AF_INET, target, False, None)
    with pytest.raises(ValueError, match="family is AF_INET or AF_INET6"):
        server.cache_put(socket.AF_INET, target, socket.AF_UNIX, target, False, None)
    with pytest.raises(ValueError, match="a sockaddr is 2 to 128 bytes"):
        server.cache_put(socket.AF_INET, target, socket.AF_INET, b"", False, None)
    assert server.cached() == 0
    server.close()
    with pytest.raises(ValueError, match="closed"):
        server.start()
    with pytest.raises(ValueError, match="closed"):
        server.cache_put(socket.AF_INET, target, socket.AF_INET, target, False, None)
    server.close()  # again: nothing
    assert _open_fds() == before


@needs_core
def test_server_cache_is_bounded_replaced_and_cleared() -> None:
    """Entries keyed by destination; a full table replaces on collision (never grows);
    cache_clear empties it."""
    assert core is not None
    server = core.Server(-1, 42, 1)
    target = _sockaddr4(bytes([192, 0, 2, 1]), 80)
    server.cache_put(socket.AF_INET, target, socket.AF_INET, target, False, None)
    server.cache_put(socket.AF_INET, target, socket.AF_INET, target, False, None)
    assert server.cached() == 1
    for port in range(1, 4 * core.CACHE_SLOTS):
        raw = _sockaddr4(bytes([198, 51, 100, 7]), port)
        server.cache_put(socket.AF_INET, raw, socket.AF_INET6, bytes(28), True, raw)
    assert 0 < server.cached() <= core.CACHE_SLOTS
    server.cache_clear()
    assert server.cached() == 0
    assert server.counts() == (0, 0, 0, 0)
    server.close()


@needs_core
def test_server_watch_adds_a_watch_and_empties_the_cache() -> None:
    """watch(fd) (an address set readable only later, a container's): the cache is
    emptied with it, so no decision predates the watch; the limit holds for watches
    added later too; bad fds and a closed Server are refused."""
    assert core is not None
    server = core.Server(-1, 42, 1, list(range(100, 107)))
    target = _sockaddr4(bytes([192, 0, 2, 1]), 80)
    server.cache_put(socket.AF_INET, target, socket.AF_INET, target, False, None)
    assert server.cached() == 1
    server.watch(107)
    assert server.cached() == 0
    with pytest.raises(ValueError, match="at most 8 watch fds"):
        server.watch(108)
    with pytest.raises(ValueError, match="not negative"):
        server.watch(-1)
    with pytest.raises(TypeError):
        server.watch("3")  # type: ignore[arg-type]
    server.close()
    with pytest.raises(ValueError, match="closed"):
        server.watch(3)


@needs_core
def test_server_thread_starts_and_stops_on_what_is_no_listener() -> None:
    """On an fd that is no seccomp listener the wake-up flag is refused (its errno
    returned), the thread waits all the same (an idle TCP listener: nothing to read),
    and close() stops and joins it at once, leaving no fd behind.  An fd that hangs up
    (an unconnected socket polls as POLLHUP) is reported as HUNG_UP, once."""
    assert core is not None
    before = _open_fds()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = core.Server(sock.fileno(), 42, 1, [sock.fileno()])
        assert server.start() in (errno.ENOTTY, errno.EINVAL)
        with pytest.raises(RuntimeError, match="runs already"):
            server.start()
        assert server.take() == []
        server.close()
    with socket.socket() as sock:
        server = core.Server(sock.fileno(), 42, 1)
        server.start()
        wait_until(lambda: select.select([server.fileno()], [], [], 0)[0], timeout=5)
        (item,) = server.take()
        assert item[0] == core.HUNG_UP
        server.close()
    assert _open_fds() == before


@pytest.mark.parametrize(("release", "missing"), [
    ("6.6.0", False), ("6.12.9-amd64", False), ("6.5.13", True), ("5.10.0-28-cloud", True),
    ("odd", False),
])
def test_sync_wake_up_kernel(release: str, missing: bool) -> None:
    said = notifycore.no_sync_wake_up(release)
    assert (said is not None) == missing
    if said:
        assert release in said and "6.6" in said


@needs_core
def test_server_tells_the_host_namespace_by_cookie_only_when_it_is_its_own() -> None:
    """SO_NETNS_COOKIE (Linux 5.14) replaces the per-connect namespace inode only when
    ``host_netns`` is the namespace the Server was made in (read from a socket made
    there); any other inode keeps the inode comparison."""
    assert core is not None
    own = os.stat("/proc/thread-self/ns/net").st_ino
    server = core.Server(-1, 42, own)
    other = core.Server(-1, 42, own + 1)
    try:
        release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
        assert server.compares_cookies() is (release >= (5, 14))
        assert other.compares_cookies() is False
    finally:
        server.close()
        other.close()
