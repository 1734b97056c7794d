"""A forwarding worker's resident memory stays within its budget.

With many idle connections most of a daemon's memory is the per-worker baseline, so each
worker is kept lean (tests/unit/test_layout.py checks it imports no dataclasses, typing or
logging).  This test holds the result, not the means: real workers, booted by a real
supervisor, after relaying real connections, measured from /proc/PID/status.
"""

from __future__ import annotations

import socket

import pytest

from helpers.netns import listen_in
from helpers.processes import process_tree
from helpers.servers import echo, recv_all, serve_in_thread
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

WORKER_RSS_BUDGET_KIB = 24 * 1024  # twice what was measured; see the test's docstring


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_a_worker_stays_under_its_rss_budget(netns, forwarder):
    """Why this budget: when the test was written, each worker of ``forward --workers 2``
    held 12.2-12.4 MiB (VmRSS, Python 3.11, after two relayed connections each).  Twice
    that leaves room for other interpreters, allocators and a cold bytecode cache, and
    still catches a worker that starts loading the supervisor's or the command line's
    world.  A memory assertion, not a timing one: the machine's load does not move it."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")

    def workers() -> list[int]:
        return [pid for pid in process_tree(fwd.proc.pid) if pid != fwd.proc.pid]

    wait_until(lambda: len(workers()) == 2, what="two workers")
    for i in range(4):  # the hand-off deals in turn: two connections each
        assert _roundtrip(fwd.port, b"warm %d" % i) == b"warm %d" % i
    rss = {pid: _rss_kib(pid) for pid in workers()}
    listener.close()
    assert len(rss) == 2
    over = {pid: kib for pid, kib in rss.items() if kib > WORKER_RSS_BUDGET_KIB}
    assert not over, f"workers over {WORKER_RSS_BUDGET_KIB} KiB: {over} (all: {rss})"
