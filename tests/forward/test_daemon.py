"""The daemon's contract with whoever starts it: systemd socket activation and
notification, ``--exit-with PID``, ``--ready-fd N``, and workers that die.

Why: these are the promises a service manager, a sandbox or a test harness builds on --
"the socket I pass is the one you serve", "READY=1 means it forwards", "you go away
with the process you serve", "the newline means connect now" -- and a broken promise
shows up only as a hang or a race somewhere else.  So each is checked with real
processes: a posix_spawn wrapper standing in for systemd, a real notify socket, a real
``sleep`` to follow, a real pipe, a real SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import select
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.control import stats_by_name, wait_stats
from helpers.environment import REPO
from helpers.netns import free_port, listen_in
from helpers.processes import Forwarder, host_port, process_tree, wait_forwarding
from helpers.servers import tcp_roundtrip, udp_roundtrip
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

# ---- systemd socket activation ------------------------------------------------------------


@dataclass
class Spawned:
    """A process started with posix_spawn (no subprocess.Popen object to reap it)."""

    pid: int
    log_path: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 15) -> int:
        wait_until(lambda: self.poll() is not None, timeout=timeout,
                   what=f"pid {self.pid} to exit")
        assert self.returncode is not None
        return self.returncode

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    """Start nsbridge the way systemd does: the listening socket at fd 3, LISTEN_FDS=1,
    LISTEN_PID set to nsbridge's own PID (the shell exports $$ and then execs, keeping
    its PID), LISTEN_FDNAMES and NOTIFY_SOCKET in the environment.  systemd-socket-activate
    is not installed, so this is the wrapper: posix_spawn with dup2 file actions."""
    spawned: list[Spawned] = []

    def start(listener: socket.socket, nsbridge_args: str, names: str = "web",
              notify: Path | None = None) -> Spawned:
        log_path = tmp_path / f"activated-{len(spawned)}.log"
        # above 3, so dup2 onto 3 really duplicates and clears close-on-exec
        high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES=names, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify)
        script = (f"cd {shlex.quote(str(REPO))} && export LISTEN_PID=$$ && "
                  f"exec {shlex.quote(sys.executable)} -m nsbridge forward -v {nsbridge_args}")
        try:
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", script], env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, high, 3),
            ])
        finally:
            os.close(high)
            os.close(log_fd)
        process = Spawned(pid, log_path)
        spawned.append(process)
        return process

    try:
        yield start
    finally:
        for process in spawned:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    try:
        yield path, sock
    finally:
        sock.close()


def test_socket_activation_with_notify(netns, stream_server, activate, notify_socket):
    """The passed socket is served; READY=1 once forwarding, STOPPING=1 on SIGTERM."""
    server = stream_server(listen_in(netns))
    listener = socket.create_server(("127.0.0.1", 0))
    path, notifications = notify_socket
    with listener:
        process = activate(listener, f"systemd:web tcp:127.0.0.1:{server.port},netns={netns}",
                           notify=path)
        assert notifications.recv(4096) == b"READY=1", process.log()
        payload = os.urandom(100_000)
        assert tcp_roundtrip(listener.getsockname(), payload) == payload
        assert f"forwarding 127.0.0.1:{listener.getsockname()[1]} " in process.log()
        os.kill(process.pid, signal.SIGTERM)
        assert notifications.recv(4096) == b"STOPPING=1"
        assert process.wait() == 0, process.log()
    assert len(server.accepted) == 1


def test_socket_activation_missing_name(netns, activate):
    """systemd:web when systemd passed "other": exit 2, naming what was passed."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        process = activate(listener, f"systemd:web tcp:127.0.0.1:9,netns={netns}",
                           names="other")
        assert process.wait() == 2
    lines = process.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nsbridge: error:")
    assert "systemd:web" in lines[0] and "systemd passed sockets named other" in lines[0]


# ---- --exit-with ------------------------------------------------------------------------------


def test_exit_with_follows_a_process(netns, forwarder, stream_server):
    """nsbridge (supervisor and workers) exits 0 soon after the followed process dies."""
    server = stream_server(listen_in(netns))
    sleeper = os.posix_spawn("/bin/sleep", ["sleep", "30"], dict(os.environ))
    try:
        fwd = forwarder("forward", "-v", "--workers", "2", "--exit-with", str(sleeper),
                        "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{server.port},netns={netns}")
        assert tcp_roundtrip(("127.0.0.1", fwd.port), b"alive") == b"alive"
        wait_until(lambda: len(process_tree(fwd.proc.pid)) == 3, what="two workers")
        tree = process_tree(fwd.proc.pid)
    finally:
        os.kill(sleeper, signal.SIGKILL)
        os.waitpid(sleeper, 0)
    assert fwd.wait(timeout=10) == 0, fwd.log()
    assert "--exit-with has exited" in fwd.log()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in tree),
               what="the workers to be gone")


def test_exit_with_absent_pid(netns):
    """A PID that is not there: exit 2 at once."""
    from helpers.processes import run_nsbridge

    sleeper = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
    os.waitpid(sleeper, 0)  # exited and reaped: that PID is free now
    result = run_nsbridge("forward", "--exit-with", str(sleeper), "tcp:127.0.0.1:0",
                          f"tcp:127.0.0.1:9,netns={netns}")
    assert result.returncode == 2
    assert f"--exit-with {sleeper}: no process" in result.stderr


# ---- --ready-fd ---------------------------------------------------------------------------------


def test_ready_fd_newline_means_it_accepts(netns, forwarder, stream_server):
    """The newline arrives only once the listener accepts; then the pipe reaches EOF
    (no worker kept the write end)."""
    server = stream_server(listen_in(netns))
    read_end, write_end = os.pipe()
    try:
        fwd = forwarder("forward", "-v", "--ready-fd", str(write_end), "tcp:127.0.0.1:0",
                        f"tcp:127.0.0.1:{server.port},netns={netns}", wait_ready=False,
                        pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        readable, _, _ = select.select([read_end], [], [], 20)
        assert readable, fwd.log()
        assert os.read(read_end, 10) == b"\n"
        # no sleeping, no polling: connect right now
        address = host_port(wait_forwarding(fwd, timeout=0.5)[0])
        assert tcp_roundtrip(address, b"ready") == b"ready"
        assert os.read(read_end, 10) == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize("which, message", [
    ("unopened", "is not open"),
    ("read end", "read-only"),
    ("stdout", "stdin/stdout/stderr"),
])
def test_bad_ready_fd_refused_before_listening(netns, forwarder, which: str, message: str):
    """A bad --ready-fd is exit 2 before anything listens."""
    port = free_port()
    read_end, write_end = os.pipe()
    try:
        fd = {"unopened": 99, "read end": read_end, "stdout": 1}[which]
        fwd = forwarder("forward", "-v", "--ready-fd", str(fd), f"tcp:127.0.0.1:{port}",
                        f"tcp:127.0.0.1:9,netns={netns}", wait_ready=False,
                        pass_fds=(read_end,))
        assert fwd.wait() == 2
    finally:
        os.close(read_end)
        os.close(write_end)
    lines = fwd.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsbridge: error: --ready-fd"), lines
    assert message in lines[0]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


# ---- workers ----------------------------------------------------------------------------------


def workers_of(pid: int) -> list[int]:
    return [p for p in process_tree(pid) if p != pid]


MONOTONIC = ("accepted", "closed", "bytes_up", "bytes_down", "datagrams_up", "datagrams_down")


def test_udp_and_tcp_forwards_survive_killed_workers(netns, forwarder: Callable[..., Forwarder],
                                                     stream_server, udp_server, tmp_path):
    """SIGKILL each worker in turn (one of them relays the UDP forward): the supervisor
    replaces it, both forwards work again, and the counters never go backwards."""
    tcp = stream_server(listen_in(netns))
    udp = udp_server(netns)
    control = tmp_path / "ctl.sock"
    fwd = forwarder("forward", "-v", "--workers", "2", "--control", str(control),
                    "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{tcp.port},netns={netns}",
                    "udp:127.0.0.1:0", f"udp:127.0.0.1:{udp.port},netns={netns}",
                    wait_ready=False)
    tcp_address, udp_address = (host_port(a) for a in wait_forwarding(fwd, 2))
    wait_until(lambda: len(workers_of(fwd.proc.pid)) == 2, what="two workers")
    assert tcp_roundtrip(tcp_address, b"t" * 5000) == b"t" * 5000
    assert udp_roundtrip(udp_address, b"u" * 500) == b"u" * 500
    previous = wait_stats(control, lambda s: s["forward-1"]["bytes_down"] >= 5000
                          and s["forward-2"]["datagrams_down"] >= 1, "first traffic counted")

    for round_ in range(2):
        victim = sorted(workers_of(fwd.proc.pid))[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda v=victim: v not in workers_of(fwd.proc.pid)
                   and len(workers_of(fwd.proc.pid)) == 2, what="a replacement worker")
        payload = b"round %d " % round_ * 100
        assert udp_roundtrip(udp_address, payload) == payload
        assert tcp_roundtrip(tcp_address, payload) == payload
        seen = previous["forward-2"]["datagrams_down"]
        current = wait_stats(control, lambda s, seen=seen: s["forward-2"]["datagrams_down"]
                             > seen, "the new datagrams")
        for name in ("forward-1", "forward-2"):
            for key in MONOTONIC:
                assert current[name][key] >= previous[name][key], (round_, name, key,
                                                                     previous, current)
        previous = current
    assert fwd.log().count("ended unexpectedly (signal SIGKILL)") == 2
    assert fwd.proc.poll() is None
    time.sleep(0.6)  # one more report interval: still monotonic once everything settled
    final = stats_by_name(control)
    for name in ("forward-1", "forward-2"):
        for key in MONOTONIC:
            assert final[name][key] >= previous[name][key]
