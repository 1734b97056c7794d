"""Worker processes: flows are split evenly, a dead worker is replaced, stop is clean."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from helpers.netns import listen_in
from helpers.processes import process_tree
from helpers.servers import echo, recv_all, serve_in_thread
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")


def _growth_while_holding(fwd, count: int) -> dict[int, int]:
    """Hold ``count`` echoing flows open at once; how many sockets each worker gained."""
    idle = {pid: _sockets(pid) for pid in _workers(fwd.proc.pid)}
    flows = [socket.create_connection(("127.0.0.1", fwd.port), timeout=10)
             for _ in range(count)]
    try:
        for i, sock in enumerate(flows):
            sock.sendall(b"flow %d" % i)
            assert sock.recv(100) == b"flow %d" % i
        return {pid: _sockets(pid) - idle[pid] for pid in idle}
    finally:
        for sock in flows:
            sock.close()


def _workers(pid: int) -> list[int]:
    return [p for p in process_tree(pid) if p != pid]


def _sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_long_flows_are_split_evenly_across_workers(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    for i in range(2):  # one connection per worker fills its pool of target sockets
        assert _roundtrip(fwd.port, b"warm %d" % i) == b"warm %d" % i
    wait_until(lambda: fwd.log().count(", closed") == 2, what="warm-up connections closed")
    # each worker relays two of the four flows: two client sockets more (the target
    # sockets come from its pool, which was counted already)
    grown = _growth_while_holding(fwd, 4)
    listener.close()
    assert sorted(grown.values()) == [2, 2], grown


def test_killed_worker_is_replaced_and_service_continues(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    victim = _workers(fwd.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "ended unexpectedly (signal SIGKILL)" in fwd.log(), what="restart log")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2 and victim not in
               _workers(fwd.proc.pid), what="replacement worker")
    for i in range(6):  # round-robin reaches both workers, the new one included
        assert _roundtrip(fwd.port, b"after restart %d" % i) == b"after restart %d" % i
    assert fwd.stop() == 0
    listener.close()


def test_sigterm_ends_every_worker(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "3", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 3, what="three workers")
    workers = _workers(fwd.proc.pid)
    assert _roundtrip(fwd.port, b"ping") == b"ping"
    assert fwd.stop() == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie_or_gone(pid)
    listener.close()


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_single_worker_mode_has_one_worker(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "1", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    assert _roundtrip(fwd.port, b"one worker") == b"one worker"
    assert len(_workers(fwd.proc.pid)) == 1
    listener.close()


# ---- --accept reuseport: each worker accepts from its own SO_REUSEPORT listener ----------


def _reuseport_forwarder(netns, forwarder, *extra: str):  # type: ignore[no-untyped-def]
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "--accept", "reuseport", *extra,
                    "-l", "127.0.0.1:0", "--connect-netns", netns,
                    "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    return fwd, listener


def _listening_sockets(port: int) -> int:
    """Sockets listening on 127.0.0.1:``port`` in the test's namespace (one per worker)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[1] == wanted and line.split()[3] == "0A")


def test_reuseport_short_connections_reach_both_workers(netns, forwarder):
    fwd, listener = _reuseport_forwarder(netns, forwarder)
    assert _listening_sockets(fwd.port) == 2  # one SO_REUSEPORT listener per worker
    for i in range(200):
        assert _roundtrip(fwd.port, b"short %d" % i) == b"short %d" % i
    wait_until(lambda: fwd.log().count(", closed") == 200, what="200 connections closed")
    # The eBPF program deals new clients to the two listeners in turn (as root: CAP_BPF),
    # so 16 flows held at once are 8 on each worker: each worker's socket count grows by
    # the same amount (its 8 clients, plus the target sockets its pool had to add).
    grown = _growth_while_holding(fwd, 16)
    assert len(set(grown.values())) == 1 and all(n >= 8 for n in grown.values()), grown
    assert fwd.stop() == 0
    listener.close()


def test_reuseport_killed_worker_is_replaced_and_service_continues(netns, forwarder):
    fwd, listener = _reuseport_forwarder(netns, forwarder)
    victim = _workers(fwd.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "ended unexpectedly (signal SIGKILL)" in fwd.log(), what="restart log")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2 and victim not in
               _workers(fwd.proc.pid), what="replacement worker")
    assert _listening_sockets(fwd.port) == 2
    for i in range(40):  # the hash sends some to the replacement's listener too
        assert _roundtrip(fwd.port, b"after restart %d" % i) == b"after restart %d" % i
    workers = _workers(fwd.proc.pid)
    assert fwd.stop() == 0
    for pid in workers:
        assert _is_zombie_or_gone(pid)
    listener.close()


def test_reuseport_clients_queued_at_a_crashed_worker_are_not_lost(netns, forwarder):
    """The supervisor keeps each worker's listener, so the replacement takes over its
    accept queue instead of the kernel resetting the clients waiting there."""
    fwd, listener = _reuseport_forwarder(netns, forwarder)
    victim = _workers(fwd.proc.pid)[0]
    os.kill(victim, signal.SIGSTOP)  # its clients now wait in its accept queue
    flows = [socket.create_connection(("127.0.0.1", fwd.port), timeout=20) for _ in range(16)]
    for i, sock in enumerate(flows):
        sock.sendall(b"queued %d" % i)
    os.kill(victim, signal.SIGKILL)
    for i, sock in enumerate(flows):  # p(none hashed to the victim) = 1/65536
        assert sock.recv(100) == b"queued %d" % i
        sock.close()
    assert "ended unexpectedly (signal SIGKILL)" in fwd.log()
    assert fwd.stop() == 0
    listener.close()


def test_reuseport_with_inherited_listener_falls_back_to_handoff(netns, forwarder):
    target = listen_in(netns)
    serve_in_thread(target, echo)
    inherited = listen_in(None)
    fwd = forwarder("forward", "-v", "--workers", "2", "--accept", "reuseport",
                    "-L", str(inherited.fileno()), "--connect-netns", netns,
                    "-c", f"127.0.0.1:{target.getsockname()[1]}",
                    pass_fds=(inherited.fileno(),))
    port = inherited.getsockname()[1]
    assert "needs a TCP address to bind" in fwd.log()
    assert "uses the hand-off" in fwd.log()
    for i in range(4):
        assert _roundtrip(port, b"inherited %d" % i) == b"inherited %d" % i
    assert fwd.stop() == 0
    inherited.close()
    target.close()


# ---- --accept auto (the default) ------------------------------------------------------


def test_auto_accepts_in_the_workers_and_deals_flows_in_turn(netns, forwarder):
    """As root the default is one SO_REUSEPORT listener per worker with the eBPF dealer:
    no supervisor hop, and long flows split as evenly as with the hand-off."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-vv", "--workers", "2", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    assert _listening_sockets(fwd.port) == 2
    assert "new clients go to the workers in turn (eBPF)" in fwd.log()
    for i in range(2):  # one connection per worker fills its pool of target sockets
        assert _roundtrip(fwd.port, b"warm %d" % i) == b"warm %d" % i
    wait_until(lambda: fwd.log().count(", closed") == 2, what="warm-up connections closed")
    grown = _growth_while_holding(fwd, 4)
    assert sorted(grown.values()) == [2, 2], grown
    assert fwd.stop() == 0
    listener.close()


def test_auto_without_cap_bpf_uses_the_handoff(forwarder):
    """Without CAP_BPF (here: root of a user namespace of its own, `unshare -U -r`, which
    has no capability over the host's namespaces) the program cannot load, and ``auto``
    falls back to the hand-off rather than to the kernel's uneven hash."""
    target = listen_in(None)
    serve_in_thread(target, echo)
    fwd = forwarder("forward", "-vv", "--workers", "2", "-l", "127.0.0.1:0",
                    "-c", f"127.0.0.1:{target.getsockname()[1]}",
                    prefix=("unshare", "-U", "-r"))
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    assert "hand-off (dealing clients in turn from SO_REUSEPORT listeners needs an eBPF " \
           "program: Operation not permitted)" in fwd.log()
    assert _listening_sockets(fwd.port) == 1  # the supervisor's, no per-worker listeners
    for i in range(8):
        assert _roundtrip(fwd.port, b"handed %d" % i) == b"handed %d" % i
    assert fwd.stop() == 0
    target.close()


def test_auto_refuses_a_port_another_reuseport_group_holds(netns, forwarder):
    """SO_REUSEPORT would let nsbridge join another program's group on the same port and
    silently share its clients; the plain-bind check makes it an "in use" error."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        fwd = forwarder("forward", "--workers", "2", "-l", f"127.0.0.1:{port}",
                        "--connect-netns", netns, "-c", "127.0.0.1:9", wait_ready=False)
        assert fwd.proc.wait(timeout=30) != 0
        assert f"listen 127.0.0.1:{port}: cannot listen" in fwd.log()
        assert "another socket already listens there" in fwd.log()
        assert "Traceback" not in fwd.log()
    finally:
        squatter.close()


def test_drain_refuses_new_clients_at_once_even_with_a_worker_stuck(netns, forwarder):
    """On SIGTERM the supervisor shuts every worker's SO_REUSEPORT listener down itself:
    a worker that has not handled its own SIGTERM yet (here: stopped) must not keep
    taking clients while the open connection drains."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-v", "--workers", "2", "--drain", "10", "-l", "127.0.0.1:0",
                    "--connect-netns", netns, "-c", f"127.0.0.1:{listener.getsockname()[1]}")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    assert _listening_sockets(fwd.port) == 2
    held = socket.create_connection(("127.0.0.1", fwd.port), timeout=10)
    held.sendall(b"before")
    assert held.recv(100) == b"before"
    workers = _workers(fwd.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        fwd.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", fwd.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, timeout=5, what="new clients refused while workers are stopped")
        assert _listening_sockets(fwd.port) == 0
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    held.sendall(b"during drain")  # the open connection still works
    assert held.recv(100) == b"during drain"
    held.close()
    assert fwd.wait() == 0
    listener.close()


def test_handoff_chosen_in_a_serve_file_keeps_one_listener(netns, forwarder, tmp_path):
    """``accept = "handoff"`` in a serve file overrides the default: the supervisor
    accepts alone (one listening socket) and still deals the flows evenly."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    config = tmp_path / "handoff.toml"
    config.write_text(f'workers = 2\naccept = "handoff"\n[[forward]]\nname = "h"\n'
                      f'listen = "tcp:127.0.0.1:0"\n'
                      f'connect = "tcp:127.0.0.1:{listener.getsockname()[1]},netns={netns}"\n')
    fwd = forwarder("serve", "--config", str(config), "-v")
    wait_until(lambda: len(_workers(fwd.proc.pid)) == 2, what="two workers")
    assert _listening_sockets(fwd.port) == 1
    for i in range(2):  # one connection per worker fills its pool of target sockets
        assert _roundtrip(fwd.port, b"warm %d" % i) == b"warm %d" % i
    wait_until(lambda: fwd.log().count(", closed") == 2, what="warm-up connections closed")
    assert sorted(_growth_while_holding(fwd, 4).values()) == [2, 2]
    assert fwd.stop() == 0
    listener.close()
