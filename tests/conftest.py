"""Fixtures every test folder uses: fresh namespaces, the user-mode networking "host"
namespace, and the servers and processes a test starts.

Each fixture ends what it made, even when the test fails: namespaces are deleted,
processes killed by PID and reaped, listeners closed.  The code behind them lives in
``helpers/`` (plain modules a test imports); a folder's own fixtures are in its own
conftest.py.

Every test outside ``tests/unit`` creates network namespaces and needs root; the unit
tests need neither, so a run of only those works as an ordinary user.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.netns import delete_netns, new_netns
from helpers.processes import Forwarder, start_forwarder
from helpers.servers import StreamServer, UdpServer, echo
from helpers.usernet_host import new_host_netns

UNIT_TESTS = Path(__file__).resolve().parent / "unit"


def pytest_configure(config: pytest.Config) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse, before anything runs, a run as an ordinary user that includes tests which
    need root (all but ``tests/unit``): they would fail one by one instead."""
    if os.geteuid() == 0:
        return
    needs_root = [item for item in items if not item.path.is_relative_to(UNIT_TESTS)]
    if needs_root:
        pytest.exit(f"{len(needs_root)} of the selected tests create network namespaces "
                    f"(first: {needs_root[0].nodeid}): run them as root; tests/unit needs "
                    "no root", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Factory fixture: each call creates a fresh named namespace with ``lo`` up."""
    created: list[str] = []

    def make() -> str:
        name = new_netns()
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in created:
            delete_netns(name)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    """One fresh namespace (its name; the file is /run/netns/NAME)."""
    return make_netns()


@pytest.fixture
def host() -> Iterator[str]:
    """The "host" namespace for user-mode networking tests (see helpers.usernet_host)."""
    name = new_host_netns()
    try:
        yield name
    finally:
        delete_netns(name)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Background processes a test started: killed by PID and reaped at the end, even if
    the test fails."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[Callable[..., Forwarder]]:
    """Start nsbridge in the background (``helpers.processes.start_forwarder``, logging to
    tmp_path); every one is killed at the end."""
    started: list[Forwarder] = []

    def start(*args: str, **options) -> Forwarder:
        fwd = start_forwarder(tmp_path / f"nsbridge-{len(started)}.log", *args, **options)
        started.append(fwd)
        return fwd

    try:
        yield start
    finally:
        for fwd in started:
            if fwd.proc.poll() is None:
                fwd.proc.kill()
            fwd.proc.wait(timeout=10)


@pytest.fixture
def stream_server() -> Iterator[Callable[..., StreamServer]]:
    """Factory fixture: ``stream_server(listener, handle=echo)`` serves in threads and
    records each accepted peer; every listener is closed at the end."""
    servers: list[StreamServer] = []

    def start(listener: socket.socket,
              handle: Callable[[socket.socket], None] = echo) -> StreamServer:
        server = StreamServer(listener)
        servers.append(server)
        server.start(handle)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def udp_server() -> Iterator[Callable[..., UdpServer]]:
    """Factory fixture: ``udp_server(netns, answer=..., host=..., port=...)`` (echo by
    default); all closed at the end."""
    servers: list[UdpServer] = []

    def start(netns: str, answer: Callable[[bytes], bytes | None] = bytes,
              host: str = "127.0.0.1", port: int = 0) -> UdpServer:
        server = UdpServer(netns, answer, host, port)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()
