"""Faults around ``nsbridge run``: the tun device vanishing, the helper process being
killed or stopped, the command being killed - end to end, no mocks.

The sandboxed program is root in its own user namespace, so it can delete its tun
device, and it can signal nsbridge's socket-factory process (that process lives in the
sandbox's user namespace to create sockets there).  None of this may crash nsbridge,
hang its event loop, or leave anything behind; each fault must be named in one clear
log line, and whatever does not depend on the broken part must keep working.

As in test_run.py, each test has a "host" namespace of its own (the ``host``
fixture: 192.0.2.1 on a veth pair that stays inside it); servers and nsbridge run in
it.  The command inside is a small Python script driven line by line over
stdin/stdout, so the test can act (kill a helper, count CPU time) between its steps.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns, listen_in
from helpers.processes import processes_mentioning
from helpers.waiting import wait_until

SERVER = "192.0.2.1"

# Runs inside the sandbox: answers commands read from stdin with one JSON line each.
COMMAND = textwrap.dedent('''
    import json, os, socket, subprocess, sys, threading

    def tcp_echo(port):
        try:
            with socket.create_connection(("192.0.2.1", port), timeout=5) as sock:
                sock.sendall(b"ping through the fast path")
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            return "ok" if data == b"ping through the fast path" else f"wrong {data!r}"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    def udp_echo(port, timeout=2.0):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(("192.0.2.1", port))
                sock.send(b"ping over the tun")
                return "ok" if sock.recv(4096) == b"ping over the tun" else "wrong"
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"

    def serve_published():  # what -p publishes: greet and close
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 8000))
        srv.listen(64)
        while True:
            conn, _ = srv.accept()
            conn.sendall(b"hello from inside")
            conn.close()

    def ip(*args):
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        return done.returncode, done.stderr.strip()

    threading.Thread(target=serve_published, daemon=True).start()
    print(json.dumps({"pid": os.getpid(), "netns": os.readlink("/proc/self/ns/net")}),
          flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "exit":
            sys.exit(int(args[0]))
        elif cmd == "tcp":
            reply = tcp_echo(int(args[0]))
        elif cmd == "udp":
            reply = udp_echo(int(args[0]))
        elif cmd == "udp-send":  # a datagram whose answer comes later
            late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            late.connect(("192.0.2.1", int(args[0])))
            late.send(b"answer me late")
            reply = "sent"
        elif cmd == "del-tun":
            reply = ip("link", "del", "nsb0")
        elif cmd == "del-relay":
            reply = ip("link", "del", "nsb-relay")
        elif cmd == "route-via-veth":  # a route that does not use the tun device
            reply = [ip("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
                     ip("link", "set", "v1", "up"), ip("link", "set", "v0", "up"),
                     ip("addr", "add", "10.0.2.100/24", "dev", "v0"),
                     ip("route", "add", "default", "dev", "v0")]
        else:
            reply = f"unknown command {cmd}"
        print(json.dumps(reply), flush=True)
''')


@dataclass
class Run:
    """A running ``nsbridge run -v ... -- python3 COMMAND MARKER``, driven line by line."""

    proc: subprocess.Popen
    log_path: Path
    cmd_pid: int
    netns: str  # the sandbox's "net:[INODE]"
    marker: str  # a unique word on every command line of this run

    def ask(self, line: str, timeout: float = 20) -> object:
        """Send one command; its JSON answer (or fail with nsbridge's log)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return read_json(self.proc, self.log_path, timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def cpu_seconds(self) -> float:
        """nsbridge's user+system CPU time so far (to tell idle from spinning)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_json(proc: subprocess.Popen, log_path: Path, timeout: float) -> object:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    assert line, f"no answer from the command (nsbridge: {proc.poll()}):\n{log_path.read_text()}"
    return json.loads(line)


@pytest.fixture
def start_run(host: str, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start ``nsbridge run -v ARGS -- python3 COMMAND`` in the host namespace; killed (by
    PID) at the end if a test left it running."""
    runs: list[Run] = []

    def start(*args: str) -> Run:
        marker = f"nsbf-{uuid.uuid4().hex[:12]}"
        log_path = tmp_path / f"nsbridge-{len(runs)}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                # the servers are on the host namespace's own address: host access
                ["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run", "-v",
                 "--allow-host-access", *args, "--", sys.executable, "-c", COMMAND, marker],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                cwd=REPO)
        hello = read_json(proc, log_path, 30)
        assert isinstance(hello, dict)
        run = Run(proc, log_path, hello["pid"], hello["netns"], marker)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait(timeout=10)


@pytest.fixture
def echo_servers(host: str, stream_server, udp_server) -> tuple[int, int]:
    """(TCP port, UDP port) of echo servers on 192.0.2.1 in the host namespace."""
    tcp_server = stream_server(listen_in(host, SERVER))
    return tcp_server.port, udp_server(host, host=SERVER).port


def in_namespace(netns: str) -> list[int]:
    """PIDs of every process in the network namespace ``netns`` ("net:[INODE]")."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/ns/net") == netns:
                    found.append(int(pid))
            except OSError:
                pass
    return found


def holders(netns: str) -> list[str]:
    """Who keeps ``netns`` alive: a process in it, or an open fd to it anywhere (a bind
    mount of it would show in /proc/self/mountinfo, which nsbridge never makes)."""
    found = [f"process {pid}" for pid in in_namespace(netns)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == netns:
                    found.append(f"fd {fd} of process {pid}")
            except OSError:
                pass
    return found


def assert_nothing_left(run: Run) -> None:
    """Every process of the run ended and the sandbox's namespace is held by nobody."""
    wait_until(lambda: not processes_mentioning(run.marker) and not holders(run.netns), timeout=10,
               what=f"the run's processes {processes_mentioning(run.marker)} and the namespace "
                    f"holders {holders(run.netns)} to go")


# ---- the tun device goes away ---------------------------------------------------------------


def test_tun_deleted_while_the_command_runs(host, start_run, echo_servers, udp_server):
    """The command deletes nsb0: nsbridge says so once, does not spin or crash, still
    relays TCP over the fast path (once the command has a route again), drops the late
    UDP answer it can no longer deliver, and passes on the command's exit status.
    (UDP on the engine's device, --relay=engine; the native relay's device is next.)"""
    tcp_port, udp_port = echo_servers

    def answer_late(data: bytes) -> bytes:
        time.sleep(0.5)
        return data

    late = udp_server(host, answer=answer_late, host=SERVER)
    run = start_run("--tcp=redirect", "--relay=engine")
    assert run.ask(f"tcp {tcp_port}") == "ok"
    assert run.ask(f"udp {udp_port}") == "ok"
    assert run.ask(f"udp-send {late.port}") == "sent"  # its answer arrives after the tun is gone

    assert run.ask("del-tun") == [0, ""]
    wait_until(lambda: "tun read failed" in run.log(), timeout=5, what="the tun failure logged")
    cpu_before = run.cpu_seconds()
    time.sleep(1.5)  # the late answer comes back meanwhile
    spent = run.cpu_seconds() - cpu_before
    assert spent < 0.3, f"nsbridge used {spent:.2f} s of CPU in 1.5 s with its tun gone (spin)"
    assert late.received == 1

    # No tun, no route: UDP fails in the sandbox's own kernel.  TCP never needed the
    # tun: once the command has a route again, the fast path carries it.
    assert "unreachable" in str(run.ask(f"udp {udp_port}"))
    steps = run.ask("route-via-veth")
    assert isinstance(steps, list) and all(code == 0 for code, _err in steps), steps
    assert run.ask(f"tcp {tcp_port}") == "ok", run.log()
    assert "timed out" in str(run.ask(f"udp {udp_port}"))  # leaves by v0, nobody there

    assert run.proc.stdin is not None
    run.proc.stdin.write("exit 3\n")
    run.proc.stdin.flush()
    assert run.proc.wait(timeout=20) == 3
    log = run.log()
    assert log.count("tun read failed") == 1, log  # one clear line, not one per event
    assert "Traceback" not in log, log
    assert_nothing_left(run)


def test_relay_device_deleted_while_the_command_runs(host, start_run, echo_servers, udp_server):
    """The command deletes the native relay's device, nsb-relay: nsbridge says so once,
    does not spin, and UDP goes on through the main device and the engine (the routes
    to the deleted device went with it); the late answer to a datagram sent before is
    dropped; the exit status is passed on."""
    from nsbridge.usernet.host import flowrelay

    if flowrelay.unavailable() is not None:  # the module was not built
        pytest.skip(f"no native relay: {flowrelay.unavailable()}")
    tcp_port, udp_port = echo_servers

    def answer_late(data: bytes) -> bytes:
        time.sleep(0.5)
        return data

    late = udp_server(host, answer=answer_late, host=SERVER)
    run = start_run("--tcp=redirect")
    wait_until(lambda: "native relay (device" in run.log(), what="the native relay in use")
    assert run.ask(f"udp {udp_port}") == "ok"
    assert run.ask(f"udp-send {late.port}") == "sent"
    assert run.ask("del-relay") == [0, ""]
    wait_until(lambda: "native relay: its device failed" in run.log(), timeout=5,
               what="the device failure logged")
    cpu_before = run.cpu_seconds()
    time.sleep(1.5)  # the late answer comes back meanwhile
    assert run.cpu_seconds() - cpu_before < 0.3, "spin"
    assert late.received == 1
    assert run.ask(f"udp {udp_port}") == "ok"  # now through nsb0 and the engine
    assert run.ask(f"tcp {tcp_port}") == "ok"

    assert run.proc.stdin is not None
    run.proc.stdin.write("exit 3\n")
    run.proc.stdin.flush()
    assert run.proc.wait(timeout=20) == 3
    log = run.log()
    assert log.count("native relay: its device failed") == 1, log
    assert "Traceback" not in log, log
    assert_nothing_left(run)


# ---- the helper process dies or stops -------------------------------------------------------


def factory_pid(run: Run) -> int:
    """The published-port socket factory: the one process in the sandbox's network
    namespace that is not the command (a fork of nsbridge, so its command line is
    nsbridge's)."""
    others = [pid for pid in in_namespace(run.netns) if pid != run.cmd_pid]
    assert len(others) == 1, others
    with open(f"/proc/{others[0]}/cmdline", "rb") as f:
        assert b"nsbridge\0run" in f.read()
    return others[0]


def published(host: str, port: int) -> tuple[str, float]:
    """Connect to the published port from the host namespace: ("hello"/error, seconds)."""
    def attempt() -> tuple[str, float]:
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                data = sock.recv(100)
            outcome = "hello" if data == b"hello from inside" else f"got {data!r}"
        except OSError as exc:
            outcome = type(exc).__name__
        return outcome, time.monotonic() - started

    return in_netns(host, attempt)  # type: ignore[return-value]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_socket_factory_killed_or_stopped(host, start_run, echo_servers, sig):
    """The published-port helper is killed (or stopped, as the sandboxed program itself
    can do: it shares the helper's user namespace): published connections are reset -
    after at most one bounded wait for a stopped helper, never a hung event loop - with
    one clear log line; outbound TCP and UDP keep working; the exit status is passed
    on and nothing is left behind."""
    tcp_port, udp_port = echo_servers
    port = 20000 + uuid.uuid4().int % 20000
    run = start_run("--publish-mode=splice", "-p", f"127.0.0.1:{port}:8000")
    wait_until(lambda: published(host, port)[0] == "hello", timeout=10, what="published port")
    helper = factory_pid(run)

    os.kill(helper, sig)
    outcomes = [published(host, port) for _ in range(24)]
    # sockets the helper made before are used up first; then every connection is reset
    names = [outcome for outcome, _seconds in outcomes]
    assert "ConnectionResetError" in names, f"never reset (a hung event loop?): {outcomes}"
    served = names.index("ConnectionResetError")
    assert served <= 16 and all(o == "ConnectionResetError" for o, _s in outcomes[served:]), \
        outcomes
    slow = [seconds for _o, seconds in outcomes if seconds > 1.0]
    if sig == signal.SIGKILL:
        assert not slow, outcomes
    else:  # one wait for the stopped helper (the loop is blocked that long), then at once
        assert len(slow) == 1 and slow[0] < 5, outcomes
    assert run.ask(f"tcp {tcp_port}") == "ok"  # unrelated traffic: the fast path ...
    assert run.ask(f"udp {udp_port}") == "ok"  # ... and the tun engine
    log = run.log()
    assert log.count("published ports into this namespace refuse connections from now on") == 1, log
    assert "socket factory in sandbox" in log, log

    if sig == signal.SIGSTOP:  # given up and disconnected: it exits as soon as it runs
        os.kill(helper, signal.SIGCONT)
        wait_until(lambda: not os.path.exists(f"/proc/{helper}"), timeout=10,
                   what="the continued helper to exit")
    assert run.proc.stdin is not None
    run.proc.stdin.write("exit 5\n")
    run.proc.stdin.flush()
    assert run.proc.wait(timeout=20) == 5
    assert "Traceback" not in run.log(), run.log()
    assert_nothing_left(run)


# ---- the command dies --------------------------------------------------------------------


def test_command_killed(host, start_run):
    """SIGKILL of the command: nsbridge exits 128+9 at once, with nothing left behind
    (the published-port helper included)."""
    run = start_run("-p", f"127.0.0.1:{20000 + uuid.uuid4().int % 20000}:8000")
    factory_pid(run)
    os.kill(run.cmd_pid, signal.SIGKILL)
    assert run.proc.wait(timeout=20) == 128 + signal.SIGKILL
    assert "Traceback" not in run.log(), run.log()
    assert_nothing_left(run)
