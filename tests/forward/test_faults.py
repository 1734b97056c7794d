"""Faults around a running forward: the target dies and returns, the connecting
namespace is deleted, a worker is SIGKILLed, the fd limit is hit (by a worker that
accepts, and by the supervisor that hands clients off), SIGTERM under load.

Why: a forwarder is infrastructure; each of these happens in production, and the
contract is the same every time — a clear log line, no crash, unrelated forwards keep
working, service resumes once the cause is gone, finished transfers complete.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from helpers.control import wait_stats
from helpers.netns import listen_in
from helpers.processes import Forwarder, host_port, process_tree, wait_forwarding
from helpers.servers import echo, recv_all, serve_in_thread
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

LINGER_RESET = struct.pack("ii", 1, 0)


def roundtrip(address: tuple, payload: bytes = b"ping", timeout: float = 10) -> bytes:
    """Send, half-close, read everything back (raises on reset)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def two_forwards(forwarder: Callable[..., Forwarder], target_a: str, target_b: str,
                 *extra: str) -> tuple[Forwarder, tuple, tuple]:
    """One nsbridge process with two TCP forwards; returns it and both listen addresses."""
    fwd = forwarder("forward", "-v", *extra, "tcp:127.0.0.1:0", target_a,
                    "tcp:127.0.0.1:0", target_b, wait_ready=False)
    a, b = wait_forwarding(fwd, count=2)
    return fwd, host_port(a), host_port(b)


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User+system CPU time of the process tree of ``pid`` (or of ``pid`` alone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def test_target_down_and_back(make_netns, forwarder):
    """Target down: an open transfer still completes, new clients are reset at once
    (``connect failed: ECONNREFUSED``), the other forward is untouched; target back on the
    same port: service resumes."""
    ns = make_netns()
    listener = listen_in(ns)
    port = listener.getsockname()[1]
    serve_in_thread(listener, echo)
    other = listen_in(ns)
    serve_in_thread(other, echo)
    fwd, a, b = two_forwards(forwarder, f"tcp:127.0.0.1:{port},netns={ns}",
                             f"tcp:127.0.0.1:{other.getsockname()[1]},netns={ns}")
    assert roundtrip(a) == b"ping"
    inflight = socket.create_connection(a, timeout=10)
    inflight.sendall(b"started")
    assert inflight.recv(100) == b"started"

    # the target goes down (accepted connections live on); shutdown() wakes the thread
    # blocked in accept(), which would otherwise keep the listening socket alive
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        roundtrip(a)
    assert time.monotonic() - started < 2
    wait_until(lambda: "connect failed: ECONNREFUSED" in fwd.log(), what="refused log line")
    assert roundtrip(b, b"other") == b"other"
    payload = os.urandom(1 << 20)  # the transfer begun before the outage completes
    inflight.sendall(payload)
    inflight.shutdown(socket.SHUT_WR)
    assert recv_all(inflight) == payload
    inflight.close()

    again = listen_in(ns, port=port)  # back on the same port
    serve_in_thread(again, echo)
    assert roundtrip(a, b"back") == b"back"
    again.close()
    other.close()
    assert fwd.proc.poll() is None
    assert fwd.stop() == 0


def test_connect_namespace_deleted(make_netns, forwarder):
    """``ip netns del`` of the connect side with connections open.  The kernel keeps a
    namespace alive while sockets (and nsbridge's factory thread) use it, so existing
    connections may go on; what must hold: the forwarder survives, the forward into another
    namespace keeps working, and new clients of the deleted one either work or end
    promptly (no hang, no crash)."""
    doomed, kept = make_netns(), make_netns()
    listener = listen_in(doomed)
    serve_in_thread(listener, echo)
    other = listen_in(kept)
    serve_in_thread(other, echo)
    fwd, a, b = two_forwards(forwarder, f"tcp:127.0.0.1:{listener.getsockname()[1]},"
                             f"netns={doomed}",
                             f"tcp:127.0.0.1:{other.getsockname()[1]},netns={kept}")
    open_conns = [socket.create_connection(a, timeout=10) for _ in range(10)]
    for sock in open_conns:
        sock.sendall(b"hi")
        assert sock.recv(10) == b"hi"

    subprocess.run(["ip", "netns", "del", doomed], check=True)
    assert not os.path.exists(f"/run/netns/{doomed}")

    for sock in open_conns:  # whatever the kernel does: an answer, EOF or a reset
        try:
            sock.sendall(b"after")
            sock.settimeout(5)
            sock.recv(10)
        except OSError:
            pass
        sock.close()
    started = time.monotonic()
    try:
        roundtrip(a, timeout=5)
    except OSError:
        pass  # failing cleanly is fine
    assert time.monotonic() - started < 5
    assert roundtrip(b, b"kept") == b"kept"
    assert fwd.proc.poll() is None
    listener.close()
    other.close()
    assert fwd.stop() == 0
    assert "Traceback" not in fwd.log()


def test_worker_sigkilled_under_load(netns, forwarder):
    """SIGKILL one of two workers while 20 connections transfer: exactly the other
    worker's 10 (round-robin) finish their sha256-checked transfer, the supervisor logs
    the death and restarts the worker, and new connections work."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(process_tree(fwd.proc.pid)) == 3, what="two workers")
    conns = [socket.create_connection(("127.0.0.1", fwd.port), timeout=10) for _ in range(20)]
    for sock in conns:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    victim = process_tree(fwd.proc.pid)[1]
    results: list[str] = []

    def transfer(sock: socket.socket) -> None:
        payload = os.urandom(4 << 20)

        def send() -> None:  # paced (~0.6 s in all) so the kill lands mid-transfer
            try:
                for i in range(0, len(payload), 64 << 10):
                    sock.sendall(payload[i:i + (64 << 10)])
                    time.sleep(0.01)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        try:
            sender = threading.Thread(target=send)
            sender.start()
            got = recv_all(sock)
            sender.join()
            results.append("ok" if got == payload else "cut")
        except OSError:
            results.append("reset")

    threads = [threading.Thread(target=transfer, args=(s,)) for s in conns]
    for t in threads:
        t.start()
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert results.count("ok") == 10, results
    wait_until(lambda: "ended unexpectedly" in fwd.log(), what="worker death log line")
    wait_until(lambda: len(process_tree(fwd.proc.pid)) == 3, what="worker restarted")
    for i in range(4):
        assert roundtrip(("127.0.0.1", fwd.port), b"%d" % i) == b"%d" % i
    for sock in conns:
        sock.close()
    listener.close()
    assert fwd.stop() == 0


def test_fd_limit_hit_then_recovers(netns, forwarder):
    """Hard fd limit 200 (nsbridge can only raise its soft limit to it), 300 clients: the
    failure is logged, nsbridge does not spin, and once the clients go it serves again."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "1", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}",
                    prefix=("prlimit", "--nofile=200:200"))
    assert "open-file limit is 200" in fwd.log()
    assert roundtrip(("127.0.0.1", fwd.port)) == b"ping"
    clients = []
    for _ in range(300):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", fwd.port))
        clients.append(sock)
    time.sleep(1.5)
    log = fwd.log()
    assert "Too many open files" in log, log[-3000:]
    cpu = cpu_seconds(fwd.proc.pid)
    time.sleep(1.0)
    burned = cpu_seconds(fwd.proc.pid) - cpu
    assert burned < 0.3, f"nsbridge burned {burned:.2f}s CPU in 1s at the fd limit"
    for sock in clients:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()

    def serves() -> bool:
        try:
            return roundtrip(("127.0.0.1", fwd.port), b"again", timeout=3) == b"again"
        except OSError:
            return False

    wait_until(serves, timeout=20, what="service after the fds are free")
    assert fwd.proc.poll() is None
    listener.close()
    assert fwd.stop() == 0


def _lowest_free_fd(pid: int) -> int:
    """The fd number process ``pid`` would get next: with its soft RLIMIT_NOFILE set to
    this, every new fd it asks for fails with EMFILE, and the ones it holds keep working."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in itertools.count() if fd not in used)


def test_handoff_supervisor_out_of_fds_neither_spins_nor_floods_and_recovers(
        netns, forwarder, tmp_path):
    """With ``--workers 2 --accept handoff`` the supervisor accepts every client (and the
    control socket's) and hands it to a worker.  Its soft fd limit is lowered at run time
    to what it holds, so every accept fails with EMFILE while clients and a control
    request queue.  Over 2 s it must not spin (CPU well under a spinning loop's 2 s: a
    spin detector, not a performance figure), nor flood the log (one warning per
    listener), nor relay anything; with the limit restored every queued client is relayed
    by the workers, the control request is answered, and new clients are served.

    The limit is lowered with prlimit once the daemon runs, not at start: the workers
    inherit the supervisor's limit at start, and only the supervisor must run short."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    control = tmp_path / "ctl.sock"
    fwd = forwarder("forward", "-v", "--workers", "2", "--accept", "handoff",
                    "-l", "127.0.0.1:0", "--connect-netns", netns,
                    "-c", f"127.0.0.1:{listener.getsockname()[1]}", "--control", str(control))
    wait_until(lambda: len(process_tree(fwd.proc.pid)) == 3, what="two workers")
    address = ("127.0.0.1", fwd.port)
    for i in range(4):  # handed to both workers in turn
        assert roundtrip(address, b"%d" % i) == b"%d" % i
    supervisor = fwd.proc.pid
    limits = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
    queued: list[socket.socket] = []
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE,
                         (_lowest_free_fd(supervisor), limits[1]))
        for _ in range(10):
            sock = socket.create_connection(address, timeout=10)  # completes in the backlog
            sock.sendall(b"queued")
            queued.append(sock)
        ctl.settimeout(10)
        ctl.connect(str(control))
        ctl.sendall(b'{"cmd": "stats"}\n')
        wait_until(lambda: fwd.log().count("Too many open files") >= 2, timeout=10,
                   what="EMFILE logged for the listener and the control socket")
        cpu = cpu_seconds(supervisor, tree=False)
        time.sleep(2.0)
        burned = cpu_seconds(supervisor, tree=False) - cpu
        assert burned < 0.5, f"the supervisor burned {burned:.2f}s CPU in 2s at the fd limit"
        failures = [line for line in fwd.log().splitlines() if "Too many open files" in line]
        assert len(failures) == 2, failures
        assert any("control socket" in line for line in failures), failures
        queued[0].settimeout(0.2)
        with pytest.raises(TimeoutError):  # not accepted, so not relayed
            queued[0].recv(16)
    finally:
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, limits)
    for sock in queued:
        sock.settimeout(10)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"queued"
        sock.close()
    with ctl:
        reply = json.loads(ctl.makefile("rb").readline())
    assert reply["ok"] is True
    assert sum(row["accepted"] for row in reply["stats"]) >= 4
    assert roundtrip(address, b"new") == b"new"
    wait_until(lambda: fwd.log().count("works again") == 2, what="recovery logged per listener")
    assert fwd.proc.poll() is None
    listener.close()
    assert fwd.stop() == 0


def _bulk_clients(port: int, count: int, size: int) -> tuple[list[threading.Thread],
                                                               list[str]]:
    """``count`` clients each pushing ``size`` bytes slowly-ish and checking the echo."""
    results: list[str] = []

    def one() -> None:
        payload = os.urandom(size)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                def send() -> None:
                    try:
                        for i in range(0, size, 64 << 10):
                            sock.sendall(payload[i:i + (64 << 10)])
                            time.sleep(0.01)
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                sender = threading.Thread(target=send)
                sender.start()
                got = recv_all(sock)
                sender.join()
                results.append("ok" if got == payload else "cut")
        except OSError:
            results.append("reset")

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, results


@pytest.mark.parametrize("drain", [None, "20"])
def test_sigterm_under_load(netns, forwarder, drain, tmp_path):
    """SIGTERM with 20 transfers of 8 MiB running (each paced over ~1.3 s): without --drain exit 0
    within a couple of seconds; with --drain every in-flight transfer completes intact."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    extra = ("--drain", drain) if drain else ()
    control = tmp_path / "ctl.sock"
    fwd = forwarder("forward", "-v", *extra, "-l", "127.0.0.1:0", "--connect-netns", netns,
                    "-c", f"127.0.0.1:{listener.getsockname()[1]}", "--control", str(control))
    threads, results = _bulk_clients(fwd.port, 20, 8 << 20)
    # all 20 accepted and relaying (a client still in the listen backlog would be reset)
    wait_stats(control, lambda s: all(r["accepted"] == 20 and r["closed"] == 0 for r in s.values()),
               "20 accepted, none finished")
    fwd.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert fwd.wait(timeout=30) == 0
    took = time.monotonic() - started
    for t in threads:
        t.join(timeout=60)
    listener.close()
    if drain:
        assert results == ["ok"] * 20, results
        assert "draining" in fwd.log()
    else:
        assert took < 3, took
        assert len(results) == 20
    assert "Traceback" not in fwd.log()
