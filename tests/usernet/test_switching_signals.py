"""A signal during a switched blocking connect (``nsbridge run --bypass``; world:
helpers.switching, driver: helpers/signal_driver.py through the Python API).

The target is slow to accept: its accept queue is full (``listen(0)`` and one
connection nobody accepts), so SYNs are dropped until the test starts accepting a few
seconds later and the clients' retransmissions get in.  The program's connect is
interrupted by SIGALRM 0.3 s in, with a handler with and without SA_RESTART.

* With ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`` (Linux 5.19, used by default): the
  call the switcher has received is not interrupted; it returns 0 once connected, the
  handler runs after it, the server sees **one** connection, nothing is ``gone``.
* Without it (``NSBRIDGE_BYPASS_WAIT_KILLABLE=0``, as on older kernels): the signal
  takes the caller away from the answer being prepared; SA_RESTART restarts the call as
  a new notification (the program sees 0), no SA_RESTART gives EINTR and the program
  connects again — either way the host side dials **twice**, the server sees two
  connections and the first switched socket is ``gone`` (closed, never installed).
* SIGKILL still ends the wait at once with the flag; the answer prepared for the dead
  caller counts as ``gone``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.switching import OUT4, UP4, World, switching_world

# Each test twice: the switcher's native core and its Python path (conftest.py).
BOTH_SWITCH_PATHS = True
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("switch_path")]
DRIVER = str(REPO / "tests" / "helpers" / "signal_driver.py")
GATE = 4.0  # seconds from the program's start until the target accepts
FIRST_PORT = 7350


def _kernel_has_wait_killable() -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return tuple(int(part) for part in release[:2]) >= (5, 19)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


class SlowTarget:
    """A listener in the outside namespace whose accept queue is full until ``open()``;
    then it accepts everything, counting the clients by address."""

    def __init__(self, world: World, port: int) -> None:
        def make() -> tuple[socket.socket, socket.socket]:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((OUT4, port))
            listener.listen(0)
            filler = socket.create_connection((OUT4, port), timeout=5)
            return listener, filler

        self.listener, self.filler = in_netns(world.outside, make)  # type: ignore[misc]
        self.peers: list[str] = []

    def open_after(self, seconds: float) -> None:
        def serve() -> None:
            time.sleep(seconds)
            while True:
                try:
                    conn, peer = self.listener.accept()
                except OSError:
                    return
                self.peers.append(peer[0])
                conn.close()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.filler.close()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


def drive(world: World, *args: str, killable: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not killable:
        env["NSBRIDGE_BYPASS_WAIT_KILLABLE"] = "0"
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, DRIVER, *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [
    # killable, SA_RESTART, the program's answers, connections the server saw, gone
    (True, True, ["0"], 1, 0),
    (True, False, ["0"], 1, 0),
    (False, True, ["0"], 2, 1),
    (False, False, ["EINTR", "0"], 2, 1),
]


@pytest.mark.parametrize(("killable", "restart", "answers", "connections", "gone"), CASES,
                         ids=["killable-restart", "killable-eintr-handler",
                              "interruptible-restart", "interruptible-eintr"])
def test_interrupted_blocking_connect(world: World, killable: bool, restart: bool,
                                      answers: list[str], connections: int,
                                      gone: int) -> None:
    if killable and not _kernel_has_wait_killable():
        pytest.skip("WAIT_KILLABLE_RECV needs Linux 5.19")
    port = FIRST_PORT + CASES.index((killable, restart, answers, connections, gone))
    target = SlowTarget(world, port)
    try:
        target.open_after(GATE)
        result = drive(world, "interrupt", OUT4, str(port), "1" if restart else "0", "0.3",
                       killable=killable)
        time.sleep(1)  # a last dial's connection reaches accept
        probe, bypass = result["probe"], result["bypass"]
        assert probe["answers"] == answers and probe["handler_ran"], result
        assert probe["sockname"] == UP4
        assert target.peers.count(UP4) == connections, (target.peers, result)
        assert bypass["switched"] == 1 and bypass["gone"] == gone, bypass
    finally:
        target.close()


@pytest.mark.skipif(not _kernel_has_wait_killable(), reason="WAIT_KILLABLE_RECV: Linux 5.19")
def test_sigkill_ends_a_killable_wait_at_once(world: World) -> None:
    port = FIRST_PORT + len(CASES)
    target = SlowTarget(world, port)
    try:
        target.open_after(GATE)
        result = drive(world, "kill", OUT4, str(port), str(GATE + 6), killable=True)
        assert result["died_after"] < 1.0, result
        bypass = result["bypass"]
        # The host side's dial went on; its answer found nobody: gone, never installed.
        assert bypass["gone"] == 1 and bypass["switched"] == 0, bypass
        assert bypass["errors"] == 0
    finally:
        target.close()
