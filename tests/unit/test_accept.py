"""The accept helper (nsbridge/relay/accept.py) with real sockets and a real EventLoop.

Why: every listener nsbridge polls accepts through this one helper, and its overload
policy is what keeps a daemon that ran out of file descriptors from spinning at 100% CPU
and filling its log.  The fd limit is lowered in a subprocess of its own (a limit is
per process, and pytest must keep working), which then reports what it saw as JSON.
Everything runs on loopback; the CPU bounds are spin detectors (a spinning loop burns
the whole interval), not performance assertions.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from nsbridge.errors import errno_name
from nsbridge.relay.accept import ACCEPT_BATCH, RETRY_DELAY, Acceptor
from nsbridge.relay.loop import EventLoop


def run_loop_until(loop: EventLoop, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run ``loop`` until ``done()`` holds (checked every few ms) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout

    def check() -> None:
        if done() or time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.005, check)

    loop.call_later(0, check)
    loop.run()


def run_loop_for(loop: EventLoop, seconds: float) -> None:
    loop.call_later(seconds, loop.stop)
    loop.run()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    yield loop
    loop.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    yield sock
    sock.close()


def connect_clients(listener: socket.socket, count: int) -> list[socket.socket]:
    """``count`` connected clients waiting in ``listener``'s accept queue."""
    return [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(count)]


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_a_burst_is_taken_in_batches_nonblocking_and_close_on_exec(loop, listener):
    """150 queued clients: every one is accepted, no wake-up takes more than a batch,
    each client arrives as a socket of the listener's kind with close-on-exec set, its
    peer is the client's address, and the listener was made non-blocking."""
    listener.setblocking(True)
    clients = connect_clients(listener, 150)
    accepted: list[tuple[socket.socket, object]] = []
    batches: list[int] = []

    def after_batch() -> None:
        batches.append(len(accepted) - sum(batches))

    acceptor = Acceptor(loop, listener, lambda c, p: accepted.append((c, p)), name="test",
                        after_batch=after_batch)
    acceptor.start()
    try:
        run_loop_until(loop, lambda: len(accepted) == 150)
        assert len(accepted) == 150
        assert not listener.getblocking()
        assert max(batches) == ACCEPT_BATCH and len(batches) >= 3, batches
        assert sum(batches) == 150
        assert {peer for _, peer in accepted} == {c.getsockname() for c in clients}
        for sock, _peer in accepted:
            assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert (acceptor.episodes, acceptor.exhausted, acceptor.failed) == (0, 0, 0)
    finally:
        acceptor.close()
        close_all([sock for sock, _ in accepted])
        close_all(clients)


def test_hold_keeps_clients_queued_until_release(loop, listener):
    """The owner's pause (the supervisor's backpressure): nothing is accepted while
    held, even when held before start; release takes the queued clients."""
    clients = connect_clients(listener, 5)
    accepted: list[socket.socket] = []
    acceptor = Acceptor(loop, listener, lambda c, _p: accepted.append(c), name="test")
    acceptor.hold()
    acceptor.start()
    try:
        run_loop_for(loop, 0.3)
        assert accepted == []
        acceptor.release()
        run_loop_until(loop, lambda: len(accepted) == 5)
        assert len(accepted) == 5
        acceptor.hold()
        more = connect_clients(listener, 2)
        run_loop_for(loop, 0.2)
        assert len(accepted) == 5
        acceptor.release()
        run_loop_until(loop, lambda: len(accepted) == 7)
        assert len(accepted) == 7
    finally:
        acceptor.close()
        close_all(accepted)
        close_all(clients + more)


def test_closing_from_the_callback_stops_mid_batch(loop, listener):
    """A one-shot owner closes the acceptor on its first client: the other queued
    clients stay in the kernel's queue, not accepted and dropped."""
    clients = connect_clients(listener, 5)
    accepted: list[socket.socket] = []

    def first_only(client: socket.socket, _peer: object) -> None:
        accepted.append(client)
        acceptor.close()

    acceptor = Acceptor(loop, listener, first_only, name="test")
    acceptor.start()
    try:
        run_loop_for(loop, 0.3)
        assert len(accepted) == 1 and acceptor.closed
        listener.setblocking(False)
        still_queued = listener.accept()[0]  # the rest is still there for someone else
        still_queued.close()
    finally:
        close_all(accepted)
        close_all(clients)


def test_a_listener_shut_down_is_reported_once_and_not_polled(loop, listener):
    """shutdown() of a listening socket (how the supervisor stops a worker's SO_REUSEPORT
    listener) makes accept fail with EINVAL: the owner hears of it once, the acceptor
    closes, and the loop does not spin on the dead listener."""
    told: list[bool] = []
    acceptor = Acceptor(loop, listener, lambda c, _p: c.close(), name="test",
                        on_not_listening=lambda: told.append(True))
    acceptor.start()
    listener.shutdown(socket.SHUT_RDWR)
    cpu = time.process_time()
    run_loop_for(loop, 0.5)
    burned = time.process_time() - cpu
    assert told == [True]
    assert acceptor.closed
    assert burned < 0.25, f"{burned:.2f}s CPU in 0.5s after the listener was shut down"


def test_a_persistent_unexpected_error_backs_off_logged_once(loop, caplog):
    """An error that is neither exhaustion nor a vanished client, and that does not go
    away (accept on a readable datagram socket: EOPNOTSUPP every time), is counted,
    logged once, and retried every RETRY_DELAY instead of spinning; close() ends the
    retries."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"x", sock.getsockname())  # stays unread: always readable
    acceptor = Acceptor(loop, sock, lambda c, _p: c.close(), name="odd socket")
    acceptor.start()
    try:
        with caplog.at_level(logging.INFO, logger="nsbridge"):
            cpu = time.process_time()
            run_loop_for(loop, 1.0)
            burned = time.process_time() - cpu
        assert burned < 0.3, f"{burned:.2f}s CPU in 1s on a persistent accept error"
        tries = 1.0 / RETRY_DELAY
        assert 2 <= acceptor.failed <= tries * 1.5 + 2, acceptor.failed
        assert (acceptor.episodes, acceptor.exhausted) == (1, 0)
        lines = [r.getMessage() for r in caplog.records if "accept on odd socket" in
                 r.getMessage()]
        assert len(lines) == 1 and errno_name(errno.EOPNOTSUPP) in lines[0], lines
        acceptor.close()
        failed = acceptor.failed
        run_loop_for(loop, 3 * RETRY_DELAY)
        assert acceptor.failed == failed  # no retry after close()
    finally:
        acceptor.close()
        sock.close()
        sender.close()


# Runs in a subprocess: queue clients, lower RLIMIT_NOFILE so only a few fit, and watch
# the acceptor through an episode of EMFILE (including a hold in the middle) and its end.
EMFILE_SCRIPT = r"""
import json, logging, os, resource, socket, sys, time
from nsbridge.errors import errno_name
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import EventLoop

CLIENTS, ROOM = 20, 4
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])

logger = logging.getLogger("nsbridge")
logger.addHandler(Keep())
logger.setLevel(logging.INFO)
logger.propagate = False

loop = EventLoop()
listener = socket.create_server(("127.0.0.1", 0), backlog=64)
clients = []
for _ in range(CLIENTS):
    client = socket.socket()
    client.connect(listener.getsockname())
    clients.append(client)
held = []
acceptor = Acceptor(loop, listener, lambda c, p: held.append(c), name="test listener")
acceptor.start()

def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False

lowest_free = next(fd for fd in range(1 << 16) if not is_open(fd))
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + ROOM, hard))
report = {"room": ROOM, "clients": CLIENTS, "module": sys.modules[Acceptor.__module__].__file__}

def at(seconds, what):
    loop.call_later(seconds, what)

def episode_start():
    report["accepted_at_limit"] = len(held)
    report["cpu0"], report["tries0"] = time.process_time(), acceptor.exhausted

def episode_measured():
    report["cpu1"], report["tries1"] = time.process_time(), acceptor.exhausted
    acceptor.hold()

def held_over():
    report["tries_held"] = acceptor.exhausted
    acceptor.release()

def released():
    report["tries_released"] = acceptor.exhausted
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def finish():
    report["accepted"] = len(held)
    report["episodes"], report["failed"] = acceptor.episodes, acceptor.failed
    report["backing_off"] = acceptor.backing_off
    report["records"] = records
    loop.stop()

at(0.5, episode_start)
at(1.5, episode_measured)
at(2.0, held_over)
at(2.4, released)
at(3.0, finish)
loop.run()
print(json.dumps(report))
"""


def test_emfile_backs_off_logs_once_and_recovers():
    """Out of fds with clients queued: a few are accepted, then accepting pauses and is
    retried every RETRY_DELAY (no spin: little CPU over a second), one warning names the
    error; a hold in the middle stops the retries until released; once the limit is
    raised every queued client is accepted and one info line says accepting works again."""
    result = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["module"]).parent == REPO / "nsbridge" / "relay"  # this checkout's
    assert 1 <= report["accepted_at_limit"] <= report["room"], report
    burned = report["cpu1"] - report["cpu0"]
    assert burned < 0.2, f"{burned:.2f}s CPU in 1s at the fd limit"
    tries = report["tries1"] - report["tries0"]
    expected = 1.0 / RETRY_DELAY
    assert expected / 3 <= tries <= expected * 1.5 + 2, tries
    assert report["tries_held"] == report["tries1"], report  # held: no retries
    assert report["tries_released"] > report["tries_held"]  # released: retrying again
    assert report["accepted"] == report["clients"], report
    assert report["episodes"] == 1 and report["failed"] == 0
    assert not report["backing_off"]
    lines = [(level, text) for level, text in report["records"] if "test listener" in text]
    warnings = [text for level, text in lines if level == "WARNING"]
    infos = [text for level, text in lines if level == "INFO"]
    assert len(warnings) == 1 and "Too many open files (EMFILE)" in warnings[0], lines
    assert len(infos) == 1 and "works again" in infos[0], lines
    assert len(lines) == 2

