"""Shared fixtures: real namespaces, sockets made inside them, and nsbridge processes.

Every namespace is created with a unique name and deleted in a finalizer, even when the
test fails.  Every process a test starts is ended by PID in a finalizer.  Traffic goes
only to loopback addresses inside namespaces created here or in the caller's namespace.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("nsbridge's tests create network namespaces: run them as root")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- namespaces ---------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Factory fixture: each call creates a fresh named namespace with ``lo`` up."""
    created: list[str] = []

    def make() -> str:
        name = f"nsbt-{uuid.uuid4().hex[:10]}"
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    """One fresh namespace (its name; the file is /run/netns/NAME)."""
    return make_netns()


def in_netns(name: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a short-lived thread that entered namespace ``name``.

    Deliberately independent of nsbridge's own code, so tests do not trust what they test.
    """
    box: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def listen_in(name: str | None, host: str = "127.0.0.1", port: int = 0,
              backlog: int = 1024) -> socket.socket:
    """A listening TCP socket inside namespace ``name`` (None: the test's own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return sock

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def connect_in(name: str | None, address: tuple) -> socket.socket:
    """A TCP connection made from inside namespace ``name``."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    def make() -> socket.socket:
        return socket.create_connection(address, timeout=10) if family == socket.AF_INET \
            else _connect6(address)

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def _connect6(address: tuple) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


# ---- servers ------------------------------------------------------------------------


def serve_in_thread(listener: socket.socket, handle: Callable[[socket.socket], None],
                    ) -> threading.Thread:
    """Accept forever on ``listener`` (until it is closed), one thread per connection."""

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_handle_and_close, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    return thread


def _handle_and_close(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        conn.settimeout(60)
        handle(conn)
    except OSError:
        pass
    finally:
        conn.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while total < limit and (data := sock.recv(1 << 16)):
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


# ---- nsbridge processes -------------------------------------------------------------


@dataclass
class Forwarder:
    """A running ``nsbridge forward`` (or ``netns-tcp-bridge``) process."""

    proc: subprocess.Popen
    log_path: Path
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def nsbridge_command(*args: str, compat: bool = False) -> list[str]:
    """Run the checkout's package (works without installing)."""
    module = "nsbridge.compat" if compat else "nsbridge"
    return [sys.executable, "-m", module, *args]


def run_nsbridge(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run nsbridge to completion (for commands expected to fail fast)."""
    return subprocess.run(nsbridge_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[Callable[..., Forwarder]]:
    """Start nsbridge in the background; returns once it listens (or has exited).

    With ``-l ...:0`` the chosen port is parsed from the -v log and set as ``.port``.
    """
    started: list[Forwarder] = []

    def start(*args: str, compat: bool = False, wait_ready: bool = True,
              pass_fds: tuple[int, ...] = (), prefix: tuple[str, ...] = ()) -> Forwarder:
        log_path = tmp_path / f"nsbridge-{len(started)}.log"
        argv = [*prefix, *nsbridge_command(*args, compat=compat)]
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=REPO, pass_fds=pass_fds)
        fwd = Forwarder(proc, log_path)
        started.append(fwd)
        if wait_ready:
            _wait_listening(fwd)
        return fwd

    try:
        yield start
    finally:
        for fwd in started:
            if fwd.proc.poll() is None:
                fwd.proc.kill()
            fwd.proc.wait(timeout=10)


_LISTEN_RE = re.compile(r"forwarding (\S+?):(\d+) ")


def _wait_listening(fwd: Forwarder, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fwd.log()
        match = _LISTEN_RE.search(text)
        if match:
            fwd.port = int(match.group(2))
            return
        if fwd.proc.poll() is not None:
            raise AssertionError(f"nsbridge exited with {fwd.proc.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"nsbridge did not start listening:\n{fwd.log()}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nsbridge's supervisor and its workers)."""
    pids = [pid]
    for current in pids:
        for task in os.listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    return pids


def open_fds(pid: int) -> int:
    """Open fds summed over the process tree of ``pid``."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
