"""The TCP suite on the switched path (``nsbridge run --bypass``; world: helpers.switching,
probe: helpers/switch_probe_tcp.py), the cases test_switching.py does not have.

* Resets both ways: the server resets (SO_LINGER 0) → the program's read sees
  ECONNRESET; the program resets → the server's read sees ECONNRESET.
* A silent target (the outside namespace drops its SYNs): the program's own timeout
  holds, non-blocking with poll, and blocking with ``SO_SNDTIMEO`` (whose kernel answer,
  EINPROGRESS once it runs out, is shown by the same program run without nsbridge).
* A target that is down (no host at the address): the kernel's error (the same program
  run without nsbridge is the control), blocking and non-blocking.
* 200 blocking connects at once from 200 threads, each one line echoed; the program's
  fd count unchanged.
(The fd count after 10,000 switched connections, the non-blocking 200 at once,
refused targets, the half-close and sha256 transfers are in test_switching.py.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.switching import OUT4, OUT6, UP4, UP6, World, switching_world

# Each test twice: the switcher's native core and its Python path (conftest.py).
BOTH_SWITCH_PATHS = True
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("switch_path")]
PROBE = str(REPO / "tests" / "helpers" / "switch_probe_tcp.py")
RESET_PORT, OBSERVE_PORT, SILENT_PORT, THREADS_PORT = 7341, 7342, 7343, 7344
DOWN4 = "198.51.100.77"  # on the outside link, owned by nobody: ARP goes unanswered


class Servers:
    """Outside servers of this file: one that resets every connection after a line, one
    that records what its read of each connection ended with, one that echoes lines."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.observed: list[str] = []
        self.sockets: list[socket.socket] = []
        self.done = threading.Event()

    def start(self) -> None:
        def listeners() -> list[socket.socket]:
            made = []
            for port in (RESET_PORT, OBSERVE_PORT, THREADS_PORT):
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::", port))
                sock.listen(512)
                made.append(sock)
            return made

        self.sockets = in_netns(self.world.outside, listeners)  # type: ignore[assignment]
        for sock, serve in zip(self.sockets, (self._reset, self._observe, self._echo),
                               strict=True):
            threading.Thread(target=self._accept, args=(sock, serve), daemon=True).start()

    def _accept(self, sock: socket.socket, serve) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            conn.recv(100)
        except OSError:
            pass
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()

    def _observe(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        outcome = "nothing"
        try:
            while conn.recv(100):
                outcome = "data"
            outcome = "eof"
        except ConnectionResetError:
            outcome = "ECONNRESET"
        except OSError as exc:
            outcome = type(exc).__name__
        conn.close()
        self.observed.append(outcome)
        self.done.set()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                conn.sendall(b"hello\n")
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        # The silent target: the outside namespace drops SYNs to SILENT_PORT.
        subprocess.run(["ip", "netns", "exec", made.outside, "nft", "-f", "-"], check=True,
                       text=True, input=f"""
table inet silent {{
    chain input {{
        type filter hook input priority 0;
        tcp dport {SILENT_PORT} drop
    }}
}}
""")
        yield made


@pytest.fixture(scope="module")
def servers(world: World) -> Iterator[Servers]:
    made = Servers(world)
    made.start()
    yield made
    made.close()


def probe(world: World, case: str, *args: str, timeout: float = 120) -> tuple[dict, str]:
    """The probe's ``case`` under ``nsbridge run -v --bypass`` in the host namespace."""
    done = world.run("--bypass", command=[sys.executable, PROBE, case, *args],
                     timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def without_nsbridge(world: World, case: str, *args: str) -> dict:
    """The control: the same program in the host namespace, the kernel's own answers."""
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, PROBE, case,
                           *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("target", "host"), [(OUT4, UP4), (OUT6, UP6)], ids=["ipv4", "ipv6"])
def test_server_resets(world: World, servers: Servers, target: str, host: str) -> None:
    result, log = probe(world, "reset_by_server", target, str(RESET_PORT))
    assert result == {"sockname": host, "recv": "ECONNRESET"}
    assert "switched TCP connections: 1 (0 failed to connect)" in log


@pytest.mark.parametrize(("target", "host"), [(OUT4, UP4), (OUT6, UP6)], ids=["ipv4", "ipv6"])
def test_program_resets(world: World, servers: Servers, target: str, host: str) -> None:
    """The program sets SO_LINGER 0 after the switch, on what is now the host's socket,
    so its close sends the reset from the host's kernel."""
    servers.done.clear()
    before = len(servers.observed)
    result, _ = probe(world, "reset_by_program", target, str(OBSERVE_PORT))
    assert result == {"sockname": host}
    assert servers.done.wait(10)
    assert servers.observed[before:] == ["ECONNRESET"]


def test_silent_target_nonblocking_poll_timeout(world: World) -> None:
    result, log = probe(world, "silent_nonblocking", OUT4, str(SILENT_PORT), "1")
    assert result["connect"] == "EINPROGRESS" and result["poll"] == "timeout"
    assert result["so_error"] == "0" and result["sockname"] == UP4
    assert 0.9 <= result["elapsed"] < 5
    assert "switched TCP connections: 1" in log


def test_silent_target_blocking_with_sndtimeo(world: World) -> None:
    """A blocking connect bounded by SO_SNDTIMEO: the kernel gives EINPROGRESS when it runs
    out; the switched connect gives the same at the same time (the host socket goes on
    connecting, as the kernel's would), not our own connect timeout."""
    control = without_nsbridge(world, "blocking_sndtimeo", OUT4, str(SILENT_PORT), "1")
    result, _ = probe(world, "blocking_sndtimeo", OUT4, str(SILENT_PORT), "1")
    assert control["connect"] == result["connect"] == "EINPROGRESS"
    assert 0.9 <= control["elapsed"] < 3 and 0.9 <= result["elapsed"] < 3
    assert result["sockname"] == UP4


def test_target_down(world: World) -> None:
    control = without_nsbridge(world, "down", DOWN4, "7345")
    result, log = probe(world, "down", DOWN4, "7345")
    assert control == {"blocking": "EHOSTUNREACH", "nonblocking": "EINPROGRESS",
                       "so_error": "EHOSTUNREACH"}
    assert result == control
    assert "failed to connect" in log and "No route to host" in log


def test_two_hundred_threads_connect_at_once(world: World, servers: Servers) -> None:
    result, log = probe(world, "threads", OUT4, str(THREADS_PORT), "200", timeout=240)
    assert result["count"] == 200 and result["outcomes"] == [UP4]
    assert result["fds_after"] == result["fds_before"]
    assert "switched TCP connections: 200 (0 failed to connect)" in log
