"""Ways around socket switching's decisions (``nsbridge run --bypass``), each tried end
to end from inside the sandbox and shown shut (world: helpers.switching).

* ``connect(AF_UNSPEC)`` on a switched socket, then a new connect: decided again (a
  denied address refused, the allowed one switched afresh); a namespace address on the
  host socket refused (ENETUNREACH); ``listen`` on it refused (EOPNOTSUPP: it would
  listen on the host).
* ``sendto``/``sendmsg`` with ``MSG_FASTOPEN`` (a connect without connect): EOPNOTSUPP;
  ``TCP_FASTOPEN_CONNECT`` then connect: still decided (refused).
* io_uring, whose operations seccomp never sees: ``io_uring_setup`` fails (ENOSYS).
* The x32 ABI and the 32-bit ABI (``int 0x80``, where ``socketcall`` lives): the process
  is killed (SIGSYS); without the filter the same code runs (the control).
* A thread rewriting the sockaddr between an allowed address and the host's loopback
  while connect reads it: every connection that succeeds is to the allowed server, and
  nothing reaches the host's loopback.
* Child processes (subprocess, vfork): the filter is inherited; a denied connect from
  a child is refused, an allowed one switched.
* Bad arguments (a bad pointer, lengths out of range, no such fd, not a socket): the
  kernel's own errors, as without the filter.
"""

from __future__ import annotations

import errno
import platform
import signal
from collections.abc import Iterator

import pytest

from helpers.switching import (
    DENIED_PORT,
    ECHO_PORT,
    HOST_LOOPBACK_PORT,
    OUT4,
    UP4,
    World,
    switching_world,
)

pytestmark = pytest.mark.timeout(300)
DENY = ("--bypass", "--deny", f"tcp:*:{DENIED_PORT}")
NOT_SUPPORTED = errno.errorcode[errno.EOPNOTSUPP]  # Linux spells it ENOTSUP, same number


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


def test_unspec_then_connect_is_decided_again(world: World) -> None:
    result, log = world.probe("unspec", OUT4, str(ECHO_PORT), OUT4, str(DENIED_PORT),
                              options=DENY)
    assert result == {"first_sockname": UP4, "unspec": "0", "denied": "ECONNREFUSED",
                      "again": "0", "server_saw": UP4, "echo": "ping", "sockname": UP4,
                      "loopback_on_switched": "ENETUNREACH", "listen": NOT_SUPPORTED}
    assert "deny rule x1" in log
    assert not world.seen.get(DENIED_PORT)


def test_fastopen_cannot_connect(world: World) -> None:
    result, _ = world.probe("fastopen", OUT4, str(DENIED_PORT), options=DENY)
    assert result == {"sendto": NOT_SUPPORTED, "sendmsg": NOT_SUPPORTED,
                      "fastopen_connect": "ECONNREFUSED"}
    assert not world.seen.get(DENIED_PORT)


def test_io_uring_refused(world: World) -> None:
    result, _ = world.probe("io_uring")
    assert result == {"io_uring_setup": "ENOSYS"}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 and int 0x80 are x86's")
@pytest.mark.parametrize("case", ["x32", "int80"])
def test_other_abis_killed(world: World, case: str) -> None:
    result, _ = world.probe(case)
    assert result == {"signal": signal.SIGSYS, "exit": None}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="int 0x80 is x86's")
def test_int80_control_without_the_filter(world: World) -> None:
    """The control: the same machine code runs fine without --bypass (the kill above is
    the filter's, not a crash of the test's code)."""
    result, _ = world.probe("int80", options=())
    assert result == {"signal": None, "exit": 0}


def test_sockaddr_rewritten_while_read(world: World) -> None:
    before = len(world.seen.get(HOST_LOOPBACK_PORT, []))
    result, _ = world.probe("race", OUT4, str(ECHO_PORT), "10.0.2.2",
                            str(HOST_LOOPBACK_PORT), "400", timeout=240)
    peers = result["peers"]
    assert set(peers) <= {f"{OUT4}:{ECHO_PORT}", "ECONNREFUSED"}, peers
    assert sum(peers.values()) == 400
    assert len(world.seen.get(HOST_LOOPBACK_PORT, [])) == before


def test_children_inherit_the_filter(world: World) -> None:
    result, _ = world.probe("child", OUT4, str(ECHO_PORT), OUT4, str(DENIED_PORT),
                            options=DENY)
    assert result["allowed"]["result"] == "ok" and result["allowed"]["sockname"] == UP4
    assert result["denied"] == {"result": "ECONNREFUSED"}


def test_bad_arguments_get_the_kernels_errors(world: World) -> None:
    """A bad pointer, lengths out of range, no such fd, not a socket: the host side gives
    each trapped call the error the kernel gives without the filter (the control), and
    serves the next one."""
    switched, log = world.probe("bad_calls")
    plain, _ = world.probe("bad_calls", options=())
    assert switched == plain == {"bad_pointer": "EFAULT", "too_long": "EINVAL",
                                 "too_short": "EINVAL", "no_such_fd": "EBADF",
                                 "not_a_socket": "ENOTSOCK", "listen_not_a_socket": "ENOTSOCK"}
    assert "Traceback" not in log
