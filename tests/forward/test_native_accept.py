"""Accepting and connecting in the native core (``Core.listen``, issue 19 step 2), no mocks.

Real loopback TCP (no traffic leaves the machine): a listener standing for the forward,
one standing for the target, real clients, and the core accepting, connecting with
pooled sockets and relaying.  The tests drive the core's wait() by hand (or run a real
in-process Bridge) and look at what the peers saw, the hand-backs, the records, the
counters and the process's fds and heap.  Nothing here needs /dev/net/tun.

* a client is accepted, connected and relayed with no Python per connection: its record
  carries the core's token and the slot counts it as accepted by the core;
* the pool runs dry under a burst: every client beyond it is handed back (with no target
  socket, for Python to connect) -- none is dropped or left waiting;
* a target that refuses is handed back with connect's errno (Python's session words it
  "connect failed: ..."); a target that stays silent with EINPROGRESS;
* accept() failing (the listener shut down: EINVAL) stops the core watching it and hands
  the errno back, for Python's Acceptor and its rules;
* many accept+connect life cycles leave the fds and the C heap as they were;
* a Bridge forward accepting in the core keeps the same counters as one accepting in
  Python for the same traffic, a refused and a silent target included, and drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers.waiting import wait_until
from nsbridge.forward import Bridge, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.net.addresses import HostPort
from nsbridge.relay import native

pytestmark = pytest.mark.skipif(native._tcprelay is None, reason=str(native.unavailable()))

LINGER_RESET = struct.pack("ii", 1, 0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _unused_port() -> int:
    """A loopback port nobody listens on (bound, then released: refused from then on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class AcceptHarness:
    """A core whose listener is a loopback 'forward' relaying to a loopback 'target'."""

    def __init__(self, target_port: int | None = None, low: int = 0, cap: int = 4) -> None:
        self.outer = select.epoll()
        self.core = native._tcprelay.Core(self.outer.fileno())
        self.slot = self.core.new_slot()
        self.front = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.front.setblocking(False)
        self.target = socket.create_server(("127.0.0.1", 0), backlog=512)
        port = target_port if target_port is not None else self.target.getsockname()[1]
        self.lid = self.core.listen(self.front.fileno(), self.slot, socket.AF_INET,
                                    "127.0.0.1", port, low=low, cap=cap)
        self.records: list[tuple[Any, ...]] = []
        self.handbacks: list[tuple[int, int, int, int]] = []

    def fill(self, count: int) -> None:
        for _ in range(count):
            assert self.core.pool_put(self.lid, socket.socket().detach())

    def pump(self, rounds: int = 3, timeout_ms: int = 50) -> None:
        for _ in range(rounds):
            flags = self.core.wait(timeout_ms)
            if flags & 2:
                self.records.extend(self.core.take_records())
            if flags & 4:
                self.handbacks.extend(self.core.take_handbacks())
                self.core.pool_wants()

    def close(self) -> None:
        for _lid, client, server, _code in self.handbacks:
            for fd in (client, server):
                if fd >= 0:
                    os.close(fd)
        self.handbacks.clear()
        self.core.close()
        self.records.extend(self.core.take_records())
        self.front.close()
        self.target.close()
        self.outer.close()


@pytest.fixture
def harness() -> Iterator[Callable[..., AcceptHarness]]:
    made: list[AcceptHarness] = []

    def make(**options: Any) -> AcceptHarness:
        h = AcceptHarness(**options)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def _echo_once(target: socket.socket) -> socket.socket:
    target.settimeout(5)
    conn, _ = target.accept()
    conn.settimeout(5)
    return conn


def test_a_client_is_accepted_connected_and_relayed_in_the_core(harness):
    h = harness()
    h.fill(2)
    client = socket.create_connection(h.front.getsockname(), timeout=5)
    h.pump(2)
    assert h.handbacks == []
    server_end = _echo_once(h.target)
    client.sendall(b"hello")
    h.pump(2)
    assert server_end.recv(16) == b"hello"
    server_end.sendall(b"world!")
    h.pump(2)
    assert client.recv(16) == b"world!"
    assert h.core.slot(h.slot) == (1, 5, 6, 1)  # open, accepted by the core
    assert h.core.listener_info(h.lid)["pooled"] == 1
    client.close()
    server_end.close()
    for _ in range(20):
        h.pump(1)
        if h.records:
            break
    [(slot, token, up, down, _duration, code, _err, peer)] = h.records
    assert peer is None  # asked for at -v only
    assert (slot, token, up, down, code) == (h.slot, native.CORE_ACCEPTED, 5, 6, 0)
    assert h.core.slot(h.slot) == (0, 0, 0, 0)


def test_an_empty_pool_hands_every_client_back_never_drops_one(harness):
    """A burst of 20 clients against a pool of 3 with no refill: 3 relayed by the core,
    17 handed back with their client socket alive and no target socket."""
    h = harness(low=0, cap=3)
    h.fill(3)
    clients = [socket.create_connection(h.front.getsockname(), timeout=5) for _ in range(20)]
    for _ in range(20):
        h.pump(1)
        if len(h.handbacks) >= 17:
            break
    assert len(h.handbacks) == 17
    assert all(server == -1 and code == 0 for _lid, _c, server, code in h.handbacks)
    assert h.core.slot(h.slot)[3] == 3
    assert h.core.listener_info(h.lid)["empty"] == 17
    # Each handed-back client is a live, connected socket: Python can serve it.
    peers = set()
    for _lid, client_fd, _server, _code in h.handbacks:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=os.dup(client_fd))
        peers.add(sock.getpeername())
        sock.close()
    assert peers <= {c.getsockname() for c in clients} and len(peers) == 17
    for c in clients:
        c.close()


def test_pool_wants_a_refill_under_its_low_water_mark(harness):
    h = harness(low=2, cap=4)
    assert h.core.wait(0) & 4  # a fresh listener wants its pool filled
    assert h.core.pool_wants() == [(h.lid, 4)]
    h.fill(4)
    assert not h.core.pool_put(h.lid, socket.socket().detach())  # full: closed, refused
    assert h.core.pool_wants() == []
    clients = [socket.create_connection(h.front.getsockname(), timeout=5) for _ in range(3)]
    h.pump(2)
    assert h.core.pool_wants() == [(h.lid, 3)]  # 1 left, under 2
    for c in clients:
        c.close()


def test_a_refusing_target_is_handed_back_with_connects_errno(harness):
    h = harness(target_port=_unused_port())
    h.fill(1)
    client = socket.create_connection(h.front.getsockname(), timeout=5)
    for _ in range(10):
        h.pump(1)
        if h.handbacks:
            break
    [(lid, client_fd, server_fd, code)] = h.handbacks
    assert lid == h.lid and client_fd >= 0 and server_fd >= 0
    # Loopback refuses during the second connect(); a slower kernel path says it later.
    assert code in (errno.ECONNREFUSED, errno.EINPROGRESS)
    assert h.core.listener_info(h.lid)["slow"] == 1
    assert h.core.slot(h.slot) == (0, 0, 0, 0)  # nothing relayed, nothing counted
    client.close()


def test_a_silent_target_is_handed_back_still_connecting(harness):
    """A target whose accept queue is full drops the SYN: connect() stays in progress,
    and the client goes back to Python with EINPROGRESS (its session times out)."""
    h = harness()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler = []
    try:
        # Fill the backlog (0 means one waiting connection on Linux, plus one in flight).
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
            filler.append(f)
        time.sleep(0.1)
        h.core.unlisten(h.lid)
        h.lid = h.core.listen(h.front.fileno(), h.slot, socket.AF_INET, "127.0.0.1",
                              silent.getsockname()[1], low=0, cap=2)
        h.fill(1)
        client = socket.create_connection(h.front.getsockname(), timeout=5)
        for _ in range(10):
            h.pump(1)
            if h.handbacks:
                break
        [(_lid, client_fd, server_fd, code)] = h.handbacks
        assert client_fd >= 0 and server_fd >= 0 and code == errno.EINPROGRESS
        client.close()
    finally:
        for f in filler:
            f.close()
        silent.close()


def test_an_accept_error_disarms_the_listener_and_is_handed_back(harness):
    """shutdown() of a listener makes accept() fail with EINVAL (the supervisor stopping a
    worker's SO_REUSEPORT listener): reported once, then the core stops watching it."""
    h = harness()
    h.front.shutdown(socket.SHUT_RDWR)
    for _ in range(5):
        h.pump(1)
        if h.handbacks:
            break
    assert h.handbacks == [(h.lid, -1, -1, errno.EINVAL)]
    assert h.core.listener_info(h.lid)["armed"] == 0
    h.pump(2)
    assert len(h.handbacks) == 1  # not reported again: no spin


def test_bad_listen_arguments_are_refused(harness):
    h = harness()
    with pytest.raises(ValueError):
        h.core.listen(h.front.fileno(), 99, socket.AF_INET, "127.0.0.1", 1)
    with pytest.raises(ValueError, match="numeric"):
        h.core.listen(h.front.fileno(), h.slot, socket.AF_INET, "localhost", 1)
    with pytest.raises(ValueError):
        h.core.listen(h.front.fileno(), h.slot, socket.AF_UNIX, "/x", 1)
    with pytest.raises(ValueError):
        h.core.listen(h.front.fileno(), h.slot, socket.AF_INET, "127.0.0.1", 70000)
    with pytest.raises(ValueError, match="unknown listener"):
        h.core.unlisten(55)
    fd = socket.socket().detach()
    with pytest.raises(ValueError, match="unknown listener"):
        h.core.pool_put(55, fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the core owns what it is given


def _cycles(h: AcceptHarness, count: int) -> None:
    """``count`` clients, each accepted and connected by the core, a round trip, then
    closed from a side that alternates (client FIN, server FIN, client reset)."""
    for i in range(count):
        if h.core.listener_info(h.lid)["pooled"] == 0:
            h.fill(4)
        client = socket.create_connection(h.front.getsockname(), timeout=5)
        h.pump(1, 0)
        server_end = _echo_once(h.target)
        client.sendall(b"x" * 100)
        h.pump(1, 0)
        assert server_end.recv(200) == b"x" * 100
        if i % 3 == 2:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        (client if i % 3 != 1 else server_end).close()
        h.pump(2, 0)
        (server_end if i % 3 != 1 else client).close()
        for _ in range(50):
            h.pump(1, 10)
            if h.core.info()["connections"] == 0:
                break
    assert h.core.info()["connections"] == 0
    assert h.handbacks == []


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use() -> int:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info: _MallInfo2 = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+")
def test_accept_connect_life_cycles_leave_no_fd_and_no_memory():
    """Harnesses come and go (listen, pool, unlisten, close); inside each, life cycles of
    core-accepted pairs.  After a first warm-up round, fds and the C heap stay put."""

    def one_round() -> None:
        h = AcceptHarness(low=0, cap=8)
        try:
            _cycles(h, 30)
            assert len(h.records) == 30
            assert all(r[1] == native.CORE_ACCEPTED for r in h.records)
        finally:
            h.close()

    one_round()
    gc.collect()
    fds, heap = _open_fds(), _heap_in_use()
    for _ in range(4):
        one_round()
    gc.collect()
    assert _open_fds() == fds
    grown = _heap_in_use() - heap
    assert grown < 8 << 10, f"the heap grew by {grown} bytes over 120 life cycles"


# ---- a Bridge forward accepting in the core ----------------------------------------------


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    return server, thread


def _roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def _traffic_and_stats(native_accept: str, monkeypatch: pytest.MonkeyPatch,
                       echo_port: int) -> tuple[dict[str, int], dict[str, int]]:
    """One forward, the same traffic: round trips, a client reset, a refused target
    (a second forward) -- and the counters of both forwards once all ended."""
    monkeypatch.setenv(native.NATIVE_ACCEPT_ENV, native_accept)
    bridge = Bridge(relay="native")
    try:
        good = bridge.add(ForwardSpec(ListenAddress(HostPort("127.0.0.1", 0)),
                                      ConnectAddress(HostPort("127.0.0.1", echo_port))))
        refused = bridge.add(ForwardSpec(ListenAddress(HostPort("127.0.0.1", 0)),
                                         ConnectAddress(HostPort("127.0.0.1", _unused_port()))))
        in_core = native_accept == "1"
        assert (good.native_listener is not None) == in_core
        assert (refused.native_listener is not None) == in_core
        bridge.start_thread()
        address = good.listener.getsockname()  # type: ignore[union-attr]
        for size in (1000, 300_000, 10):
            payload = os.urandom(size)
            assert _roundtrip(address, payload) == payload
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(b"r" * 500)
        echoed = b""
        while len(echoed) < 500:
            echoed += sock.recv(500)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()
        try:  # a reset (during connect or after), never a hang
            with socket.create_connection(refused.listener.getsockname(), timeout=10) as r:
                assert r.recv(10) == b""
        except ConnectionResetError:
            pass

        def ended() -> bool:
            return (bridge.call(lambda: good.snapshot().active) == 0
                    and bridge.call(lambda: good.snapshot().accepted) == 4
                    and bridge.call(lambda: refused.snapshot().connect_failed) == 1)

        wait_until(ended, what="the traffic counted")
        return (bridge.call(lambda: good.snapshot().as_dict()),
                bridge.call(lambda: refused.snapshot().as_dict()))
    finally:
        bridge.close()


def test_counters_equal_whether_the_core_or_python_accepts(monkeypatch):
    server, _thread = _echo_server()
    try:
        port = server.getsockname()[1]
        in_core = _traffic_and_stats("1", monkeypatch, port)
        in_python = _traffic_and_stats("0", monkeypatch, port)
    finally:
        server.close()
    assert in_core == in_python
    good, refused = in_core
    assert (good["accepted"], good["closed"], good["reset"]) == (4, 3, 1), good
    assert good["bytes_up"] == good["bytes_down"] == 301_510, good
    assert (refused["accepted"], refused["connect_failed"], refused["active"]) == (1, 1, 0)


def test_a_burst_beyond_the_pool_is_served_whole(monkeypatch):
    """200 clients at once against a forward whose core pool holds POOL_CAP sockets:
    every one is relayed (the overflow by Python's path), and the counters agree."""
    monkeypatch.setenv(native.NATIVE_ACCEPT_ENV, "1")
    server, _thread = _echo_server()
    bridge = Bridge(relay="native")
    clients: list[socket.socket] = []
    try:
        forward = bridge.add(ForwardSpec(
            ListenAddress(HostPort("127.0.0.1", 0)),
            ConnectAddress(HostPort("127.0.0.1", server.getsockname()[1]))))
        forward.listener.listen(512)  # type: ignore[union-attr]
        address = forward.listener.getsockname()  # type: ignore[union-attr]
        # All 200 wait in the backlog before the loop runs: a burst the pool cannot
        # cover whatever the scheduling (connected one by one to a running loop, the
        # refill can keep up and the pool never runs dry).
        for _ in range(200):
            c = socket.socket()
            c.settimeout(10)
            c.connect(address)
            clients.append(c)
        bridge.start_thread()
        for i, c in enumerate(clients):
            c.sendall(b"%d" % i)
        for i, c in enumerate(clients):
            assert c.recv(16) == b"%d" % i
        stats = bridge.call(forward.snapshot)
        assert (stats.accepted, stats.active) == (200, 200)
        lid = forward.native_listener
        assert lid is not None
        info = bridge.call(lambda: bridge.native.listener_info(lid))  # type: ignore[union-attr]
        assert info["empty"] > 0  # the burst did outrun the pool
        for c in clients:
            c.close()
        clients.clear()
        wait_until(lambda: bridge.call(lambda: forward.snapshot().active) == 0,
                   what="all closed")
        stats = bridge.call(forward.snapshot)
        assert (stats.accepted, stats.closed, stats.reset) == (200, 200, 0), stats
    finally:
        for c in clients:
            c.close()
        bridge.close()
        server.close()


def _lowest_free_fd() -> int:
    """The fd the next open would get (a soft limit of this makes every new fd fail)."""
    fd = os.dup(0)
    os.close(fd)
    return fd


def test_out_of_fds_goes_to_pythons_acceptor_and_back_to_the_core(monkeypatch):
    """EMFILE in the core's accept4: the core gives the listener to Python's Acceptor
    (closing its pool, which frees fds for it; were there none, the Acceptor's back-off
    and warning apply, as test_faults.py's fd-limit tests check end to end), the queued
    client is served, and after RETRY_BACK the core accepts again.  The fd limit is this
    test process's own soft limit, lowered for a moment and restored in any case."""
    import resource

    from nsbridge.forward import forward as forward_module

    monkeypatch.setenv(native.NATIVE_ACCEPT_ENV, "1")
    monkeypatch.setattr(forward_module, "RETRY_BACK", 0.3)
    server, _thread = _echo_server()
    bridge = Bridge(relay="native")
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        forward = bridge.add(ForwardSpec(
            ListenAddress(HostPort("127.0.0.1", 0)),
            ConnectAddress(HostPort("127.0.0.1", server.getsockname()[1]))))
        bridge.start_thread()
        address = forward.listener.getsockname()  # type: ignore[union-attr]
        assert _roundtrip(address, b"before") == b"before"
        lid = forward.native_listener
        assert lid is not None
        assert bridge.native is not None
        relay = bridge.native

        def idle() -> bool:  # no fd about to be closed or made: the limit is exact
            return bool(bridge.call(lambda: forward.snapshot().active) == 0
                        and bridge.call(lambda: relay.listener_info(lid)["pooled"])
                        == native.POOL_CAP)

        wait_until(idle, what="the first connection closed and the pool full")
        client = socket.socket()
        client.settimeout(10)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), limits[1]))
        try:
            # Fds other threads freed below the limit (earlier tests' servers): taken.
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.dup(0))
            client.connect(address)  # queued in the kernel: accept4 fails with EMFILE
            wait_until(lambda: forward.native_accept_failures == 1,
                       what="the core giving the listener back")
            client.sendall(b"queued")
            assert client.recv(16) == b"queued"  # served by Python's path
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            for fd in fillers:
                os.close(fd)
        client.close()
        wait_until(lambda: forward.native_listener is not None, what="the core accepting again")
        assert forward._acceptor is None  # Python's Acceptor left
        assert _roundtrip(address, b"after") == b"after"
        wait_until(lambda: bridge.call(lambda: forward.snapshot().active) == 0, what="closed")
        stats = bridge.call(forward.snapshot)
        assert (stats.accepted, stats.closed, stats.reset) == (3, 3, 0), stats
        assert forward.native_accept_failures == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        bridge.close()
        server.close()
