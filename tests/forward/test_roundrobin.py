"""The eBPF dealer of an SO_REUSEPORT group (nsbridge/linux/reuseport_bpf.py), on real listeners.

Runs as root (CAP_BPF) for the attach cases; the refusal case runs the same code as root
of a user namespace of its own (`unshare -U -r`), which has no CAP_BPF.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from helpers.environment import REPO
from nsbridge.linux.reuseport_bpf import attach_round_robin, round_robin_unavailable


def _group(count: int) -> list[socket.socket]:
    """``count`` listeners of one SO_REUSEPORT group on a free loopback port."""
    listeners: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(64)
        sock.setblocking(False)
        listeners.append(sock)
    return listeners


def _accepted(sock: socket.socket) -> int:
    """Accept everything queued on ``sock``; how many."""
    count = 0
    while True:
        try:
            client, _ = sock.accept()
        except BlockingIOError:
            return count
        client.close()
        count += 1


@pytest.fixture
def group():  # type: ignore[no-untyped-def]
    made: list[socket.socket] = []

    def make(count: int) -> list[socket.socket]:
        made.extend(_group(count))
        return made[-count:]

    yield make
    for sock in made:
        sock.close()


def test_clients_are_dealt_to_the_listeners_in_turn(group):
    listeners = group(3)
    assert round_robin_unavailable() is None
    assert attach_round_robin(listeners) is None
    port = listeners[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    try:
        assert [_accepted(sock) for sock in listeners] == [4, 4, 4]
    finally:
        for client in clients:
            client.close()


def test_a_closed_listener_loses_no_client(group):
    """Its slot empties; the program then selects nothing and the kernel's hash places
    the client on a listener that still exists."""
    listeners = group(2)
    assert attach_round_robin(listeners) is None
    port = listeners[0].getsockname()[1]
    listeners[1].close()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    try:
        assert _accepted(listeners[0]) == 6
    finally:
        for client in clients:
            client.close()


def test_without_cap_bpf_it_says_why_and_changes_nothing():
    code = (
        "import socket, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nsbridge.linux.reuseport_bpf import attach_round_robin, round_robin_unavailable\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(round_robin_unavailable()); print(attach_round_robin([s]))\n"
    )
    result = subprocess.run(["unshare", "-U", "-r", "-n", sys.executable, "-c", code,
                             str(REPO)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Operation not permitted"] * 2
