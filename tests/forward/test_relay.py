"""What the relay guarantees, checked through a real forward between real namespaces:
data integrity, half-close both ways, resets both ways, refused and silent targets,
concurrency, signals and logging."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from helpers.netns import connect_in, listen_in
from helpers.processes import open_fds
from helpers.servers import echo, recv_all, serve_in_thread
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

LINGER_RESET = struct.pack("ii", 1, 0)


def start_forward(forwarder, netns: str, target_port: int, *extra: str, host="127.0.0.1"):
    listen = "[::1]:0" if ":" in host else "127.0.0.1:0"
    target = f"[{host}]:{target_port}" if ":" in host else f"{host}:{target_port}"
    return forwarder("forward", "-v", "-l", listen, "--connect-netns", netns, "-c", target,
                     *extra)


def client(fwd, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, fwd.port), timeout=20)
    return sock


# ---- integrity ------------------------------------------------------------------------


def test_http_through_forward_with_curl(netns, forwarder, tmp_path):
    """A real HTTP server inside the namespace, curl outside, the page arrives intact."""
    page = tmp_path / "index.html"
    page.write_bytes(b"hello from the namespace\n" * 100)
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, "python3", "-m", "http.server", "8080", "--bind",
         "127.0.0.1", "-d", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _can_connect(netns, 8080), what="http server in namespace")
        fwd = start_forward(forwarder, netns, 8080)
        out = subprocess.run(["curl", "-sS", "--max-time", "10",
                              f"http://127.0.0.1:{fwd.port}/index.html"],
                             capture_output=True, check=True)
        assert out.stdout == page.read_bytes()
        wait_until(lambda: ", closed" in fwd.log(), what="the connection's log line")
        assert fwd.stop() == 0
        assert f"B up, {len(page.read_bytes())}" not in fwd.log()  # headers count too
        assert "B down" in fwd.log()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _can_connect(netns: str, port: int) -> bool:
    try:
        connect_in(netns, ("127.0.0.1", port)).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("engine", ["splice", "copy"])
def test_one_gib_bulk_transfer_sha256(netns, forwarder, engine):
    """1 GiB client->server and the server's digest back: not one byte lost or altered."""
    size = 1 << 30
    listener = listen_in(netns)

    def digest_server(conn: socket.socket) -> None:
        h = hashlib.sha256()
        n = 0
        while data := conn.recv(1 << 20):
            h.update(data)
            n += len(data)
        conn.sendall(f"{n} {h.hexdigest()}".encode())

    serve_in_thread(listener, digest_server)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1], "--engine", engine)
    block = os.urandom(1 << 20)
    expected = hashlib.sha256()
    with client(fwd) as sock:
        sent = 0
        while sent < size:
            # vary the content so reordering or duplication could not go unnoticed
            chunk = struct.pack("!Q", sent) + block[8:]
            sock.sendall(chunk)
            expected.update(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock).decode()
    listener.close()
    assert reply == f"{size} {expected.hexdigest()}"


def test_download_direction_integrity(netns, forwarder):
    """Server->client bulk (256 MiB) with a digest, the other direction of the same check."""
    size = 256 << 20
    payload = os.urandom(1 << 20)
    listener = listen_in(netns)

    def source(conn: socket.socket) -> None:
        for _ in range(size >> 20):
            conn.sendall(payload)

    serve_in_thread(listener, source)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:
        h = hashlib.sha256()
        n = 0
        while data := sock.recv(1 << 20):
            h.update(data)
            n += len(data)
    listener.close()
    assert n == size
    assert h.hexdigest() == hashlib.sha256(payload * (size >> 20)).hexdigest()


# ---- half-close -----------------------------------------------------------------------


def test_client_half_close_server_still_answers(netns, forwarder):
    """Client sends and shuts its write side; the server sees EOF and still replies."""
    listener = listen_in(netns)

    def answer_after_eof(conn: socket.socket) -> None:
        data = recv_all(conn)
        conn.sendall(b"got " + str(len(data)).encode())

    serve_in_thread(listener, answer_after_eof)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got 100000"
    listener.close()


def test_server_half_close_client_still_sends(netns, forwarder):
    """Server sends and shuts its write side; the client sees EOF and can still send."""
    listener = listen_in(netns)
    received: list[bytes] = []
    done = threading.Event()

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))
        done.set()

    serve_in_thread(listener, greet_then_listen)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:
        assert recv_all(sock) == b"hello"  # EOF arrived
        sock.sendall(b"still talking after your FIN")
        sock.shutdown(socket.SHUT_WR)
        assert done.wait(10)
    listener.close()
    assert received == [b"still talking after your FIN"]


# ---- resets ---------------------------------------------------------------------------


def test_client_abort_is_a_reset_at_the_server(netns, forwarder):
    listener = listen_in(netns)
    outcome: list[str] = []
    done = threading.Event()

    def watch(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")
        done.set()

    serve_in_thread(listener, watch)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    sock = client(fwd)
    sock.sendall(b"some data")
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()
    assert done.wait(10)
    listener.close()
    assert outcome == ["reset"]
    fwd.stop()
    assert "client reset" in fwd.log()


def test_server_abort_is_a_reset_at_the_client(netns, forwarder):
    listener = listen_in(netns)

    def abort(conn: socket.socket) -> None:
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    serve_in_thread(listener, abort)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:
        sock.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    listener.close()
    fwd.stop()
    assert "server reset" in fwd.log()


def test_refused_target_resets_client_at_once(netns, forwarder):
    free = listen_in(netns)
    port = free.getsockname()[1]
    free.close()  # nothing listens on that port in the namespace now
    fwd = start_forward(forwarder, netns, port)
    started = time.monotonic()
    with client(fwd) as sock, pytest.raises(ConnectionResetError):
        sock.recv(100)
    assert time.monotonic() - started < 2
    fwd.stop()
    assert "ECONNREFUSED" in fwd.log()


def test_silent_target_bounded_by_connect_timeout(netns, forwarder):
    """A target whose accept queue is full drops SYNs silently; --connect-timeout ends it."""
    listener = listen_in(netns, backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue (never accepted)
        try:
            fillers.append(connect_in(netns, ("127.0.0.1", port)))
        except OSError:
            break
    fwd = start_forward(forwarder, netns, port, "--connect-timeout", "1")
    started = time.monotonic()
    with client(fwd) as sock, pytest.raises(ConnectionResetError):
        sock.recv(100)
    elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 5
    for filler in fillers:
        filler.close()
    listener.close()
    fwd.stop()
    assert "connect timed out" in fwd.log()


def test_slow_connect_is_relayed_once_the_target_answers(netns, forwarder, relay):
    """A target that answers only a retransmitted SYN (its accept queue was full at
    first): the client waits, then is relayed like any other.  With the native relay this
    is the pair a Python session connects and then hands over to the core."""
    listener = listen_in(netns, backlog=0)
    port = listener.getsockname()[1]
    # A backlog of 0 queues one connection: with it queued the forward's SYN is dropped.
    filler = connect_in(netns, ("127.0.0.1", port))
    fwd = start_forward(forwarder, netns, port, "-v")  # -vv: the hand-over is logged
    started = time.monotonic()
    with client(fwd) as sock:
        sock.sendall(b"hello")
        time.sleep(0.3)
        filler.close()
        serve_in_thread(listener, echo)  # takes the filler, then the retransmitted SYN
        echoed = b""
        while len(echoed) < 5:
            echoed += sock.recv(5)
        assert echoed == b"hello"
        assert time.monotonic() - started > 0.8  # the connect really waited
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    wait_until(lambda: "5 B up, 5 B down" in fwd.log(), what="the connection's log line")
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which then ends
    listener.close()
    assert fwd.stop() == 0
    assert "5 B up, 5 B down" in fwd.log() and ", closed" in fwd.log()
    assert ("handed to the native relay" in fwd.log()) == (relay == "native")


# ---- concurrency ----------------------------------------------------------------------


async def _echo_clients(port: int, count: int, rounds: int) -> int:
    """``count`` simultaneous connections, each echoing its own data ``rounds`` times."""
    async def one(i: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ok = 0
        for r in range(rounds):
            message = f"conn {i} round {r} ".encode() * 20
            writer.write(message)
            await writer.drain()
            if await reader.readexactly(len(message)) == message:
                ok += 1
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        return ok

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(results)


def _start_async_echo_server(netns: str, count: int) -> tuple[int, subprocess.Popen]:
    """An asyncio echo server in the namespace as its own process (so it has its own GIL)."""
    code = (
        "import asyncio, resource, sys\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
        "async def handle(r, w):\n"
        "    while data := await r.read(65536):\n"
        "        w.write(data); await w.drain()\n"
        "    w.write_eof(); await w.drain(); w.close()\n"
        "async def main():\n"
        "    srv = await asyncio.start_server(handle, '127.0.0.1', 0, backlog=4096)\n"
        "    print(srv.sockets[0].getsockname()[1], flush=True)\n"
        "    await srv.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", code],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return port, proc


@pytest.mark.parametrize("count", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_concurrent_connections_each_echo_their_own_data(netns, forwarder, count):
    port, server = _start_async_echo_server(netns, count)
    try:
        fwd = start_forward(forwarder, netns, port)
        rounds = 3
        assert asyncio.run(_echo_clients(fwd.port, count, rounds)) == count * rounds
        fwd.stop()
        assert fwd.log().count(", closed") == count
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_no_fd_leak_after_many_connections(netns, forwarder):
    """fd count of the forwarder's process tree after 2,000 connections equals the count
    before."""
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:  # warm up lazily created resources (socket pool, pipes)
        sock.sendall(b"warm")
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)
    time.sleep(0.2)
    for _ in range(8):  # every worker gets one (round-robin) so each has warmed up
        with client(fwd) as sock:
            sock.sendall(b"warm")
            sock.shutdown(socket.SHUT_WR)
            recv_all(sock)
    wait_until(lambda: fwd.log().count(", closed") >= 9, what="warm-up sessions logged")
    before = open_fds(fwd.proc.pid)
    for i in range(2000):
        with client(fwd) as sock:
            sock.sendall(b"%d" % i)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"%d" % i
    wait_until(lambda: fwd.log().count(", closed") >= 2009, what="all sessions logged")
    after = open_fds(fwd.proc.pid)
    listener.close()
    assert after <= before


# ---- IPv6 -----------------------------------------------------------------------------


def test_ipv6_listen_and_connect(netns, forwarder):
    listener = listen_in(netns, host="::1")
    serve_in_thread(listener, echo)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1], host="::1")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(("::1", fwd.port))
    sock.sendall(b"over v6")
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == b"over v6"
    sock.close()
    listener.close()


# ---- signals --------------------------------------------------------------------------


def test_sigterm_stops_listening_and_exits_zero(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    fwd.proc.send_signal(signal.SIGINT)
    assert fwd.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
    listener.close()


def test_drain_lets_open_connections_finish(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1], "--drain", "10")
    sock = client(fwd)
    sock.sendall(b"before")
    assert sock.recv(100) == b"before"
    fwd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in fwd.log(), what="drain start")
    # the listener is closed ...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
    # ... but the open connection still works until it ends by itself
    sock.sendall(b"during drain")
    assert sock.recv(100) == b"during drain"
    assert fwd.proc.poll() is None
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == b""
    sock.close()
    assert fwd.wait() == 0
    listener.close()


def test_verbose_log_line_per_connection(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = start_forward(forwarder, netns, listener.getsockname()[1])
    with client(fwd) as sock:
        sock.sendall(b"12345")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"12345"
    wait_until(lambda: ", closed" in fwd.log(), what="connection log line")
    line = next(x for x in fwd.log().splitlines() if ", closed" in x)
    # client, target, bytes each way, duration, how it ended
    assert f"127.0.0.1:{listener.getsockname()[1]}" in line
    assert "5 B up, 5 B down" in line
    assert line.rstrip().endswith("s, closed")
    listener.close()


def test_quiet_by_default(netns, forwarder):
    listener = listen_in(netns)
    serve_in_thread(listener, echo)
    fwd = forwarder("forward", "-l", "127.0.0.1:0", "--connect-netns", netns, "-c",
                    f"127.0.0.1:{listener.getsockname()[1]}", wait_ready=False)
    time.sleep(0.5)
    assert fwd.proc.poll() is None
    assert fwd.stop() == 0
    assert fwd.log() == ""
    listener.close()
