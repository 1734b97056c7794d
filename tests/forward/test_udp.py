"""The UDP relay, driven through the library between real namespaces: echo from many
clients, IPv6 and mixed families, real DNS (dnspython and dig), idle expiry, the flow cap,
a closed target port, maximum-size datagrams, load, fd hygiene -- and the flow table's
policy on its own with a fake clock."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from helpers.environment import have
from helpers.netns import in_netns
from helpers.servers import DNS_ADDRESS, DNS_NAME, dns_answer
from helpers.waiting import wait_until
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import ResolvedAddress
from nsbridge.net.factory import SocketFactory, factory_for
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.udp import FlowTable, UdpFlow, UdpRelay, UdpStats

try:
    import dns.message
    import dns.name
    import dns.query
    import dns.rcode
    import dns.rdatatype
    import dns.rrset
except ImportError:  # the `test` extra installs dnspython
    dns = None  # type: ignore[assignment]

needs_dnspython = pytest.mark.skipif(dns is None, reason="dnspython is not installed")
T = TypeVar("T")

_BIG_BUFFER = 8 << 20  # the tests send bursts; the kernel's 208 KiB default would drop
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Python 3.11 lacks the constant


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str, port: int = 0) -> socket.socket:
    """A bound UDP socket with a large receive buffer (root may exceed rmem_max)."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _BIG_BUFFER)
    sock.bind((host, port))
    return sock


def free_udp_port(netns: str, host: str = "127.0.0.1") -> int:
    """A UDP port nobody listens on inside ``netns`` (bound, noted, closed)."""

    def pick() -> int:
        with udp_socket(host) as sock:
            return sock.getsockname()[1]

    return in_netns(netns, pick)  # type: ignore[return-value]


# ---- servers inside the namespace -----------------------------------------------------


# ---- the relay under test ---------------------------------------------------------------


class FreshSocketFactory:
    """The namespace's factory without its pool: each socket is made on demand in the
    namespace thread.  A pool keeps spare sockets open, which would blur exact fd counts."""

    def __init__(self, inner: SocketFactory) -> None:
        self.inner = inner
        self.label = inner.label

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket:
        flags = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        return self.inner.call(socket.socket, family, type | flags)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.inner.call(fn, *args, **kwargs)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Harness:
    """A UdpRelay on its own EventLoop thread, listening in the test's namespace."""

    relay: UdpRelay
    loop: EventLoop
    factory: SocketFactory
    netns: Netns
    listen_host: str
    thread: threading.Thread | None = None
    crash: list[BaseException] = field(default_factory=list)
    stopped: bool = False

    @property
    def address(self) -> tuple:
        return self.relay.listener.getsockname()[:2]

    @property
    def stats(self) -> UdpStats:
        return self.relay.stats

    def flows(self) -> list[UdpFlow]:
        """The relay's flows, read on the loop thread (the table is not thread-safe)."""
        if self.thread is None or not self.thread.is_alive():
            return self.relay.flows
        done = threading.Event()
        box: list[list[UdpFlow]] = []

        def read() -> None:
            box.append(self.relay.flows)
            done.set()

        self.loop.call_soon_threadsafe(read)
        assert done.wait(10), "event loop not responding"
        return box[0]

    def clients_of_flows(self) -> list[tuple]:
        return [flow.client for flow in self.flows()]

    def wait_replies(self, count: int) -> None:
        """Counters are updated just after the sendto a client may already have read."""
        wait_until(lambda: self.relay.stats.datagrams_down >= count, timeout=5,
                   what=f"{count} replies counted")

    def run(self) -> None:
        def run_loop() -> None:
            try:
                self.loop.run()
            except BaseException as exc:
                self.crash.append(exc)
                raise

        self.thread = threading.Thread(target=run_loop, name="udp-relay-loop")
        self.thread.start()

    def assert_alive(self) -> None:
        assert not self.crash, f"event loop crashed: {self.crash!r}"
        assert self.thread is not None and self.thread.is_alive()

    def stop_loop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.loop.stop()
            self.thread.join(timeout=10)
        assert not self.crash, f"event loop crashed: {self.crash!r}"

    def stop(self) -> None:
        """Stop the loop, then close relay, factory, loop and namespace handle."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.stop_loop()
        finally:
            self.relay.close()
            self.factory.close()
            self.loop.close()
            self.netns.close()

    def client(self) -> socket.socket:
        sock = udp_socket(self.listen_host)
        sock.settimeout(10)
        sock.connect(self.address)
        return sock


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Harness]]:
    """Factory fixture: a running relay from the test's namespace into ``netns``."""
    started: list[Harness] = []

    def start(netns: str, target_port: int, *, listen_host: str = "127.0.0.1",
              target_host: str = "127.0.0.1", fresh: bool = False, **options) -> Harness:
        handle = Netns.from_spec(netns)
        factory: SocketFactory = factory_for(handle)
        if fresh:
            factory = FreshSocketFactory(factory)
        loop = EventLoop()
        listener = udp_socket(listen_host)
        target = ResolvedAddress(family_of(target_host), (target_host, target_port))
        relay = UdpRelay(loop, listener, target, factory, **options)
        harness = Harness(relay, loop, factory, handle, listen_host)
        started.append(harness)
        relay.start()
        harness.run()
        return harness

    try:
        yield start
    finally:
        for harness in started:
            harness.stop()


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.send(data)
    return sock.recv(1 << 16)


# ---- echo, families -------------------------------------------------------------------


def test_several_clients_each_get_their_own_replies(netns, udp_server, start_relay):
    server = udp_server(netns)
    h = start_relay(netns, server.port)
    clients = [h.client() for _ in range(10)]
    try:
        for round_ in range(5):
            for i, sock in enumerate(clients):  # all send before any reads: interleaved
                sock.send(f"client {i} round {round_}".encode())
            for i, sock in enumerate(clients):
                assert sock.recv(100) == f"client {i} round {round_}".encode()
        assert len(h.flows()) == 10
        assert len(server.peers) == 10  # one source port per client at the target
        assert {f.client for f in h.flows()} == {s.getsockname() for s in clients}
        h.wait_replies(50)
        stats = h.stats
        assert (stats.datagrams_up, stats.datagrams_down) == (50, 50)
        assert stats.total_flows == stats.active_flows == 10
        assert stats.dropped == stats.errors == stats.icmp_errors == 0
        h.assert_alive()
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.parametrize(("listen_host", "target_host"),
                         [("::1", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "::1")],
                         ids=["v6-to-v6", "v6-to-v4", "v4-to-v6"])
def test_ipv6_and_mixed_families(netns, udp_server, start_relay, listen_host, target_host):
    server = udp_server(netns, host=target_host)
    h = start_relay(netns, server.port, listen_host=listen_host, target_host=target_host)
    with h.client() as a, h.client() as b:
        assert roundtrip(a, b"first") == b"first"
        assert roundtrip(b, b"second") == b"second"
        assert roundtrip(a, b"third") == b"third"
    assert [f.sock.family for f in h.flows()] == [family_of(target_host)] * 2
    assert all(peer[0] == target_host for peer in server.peers)
    h.wait_replies(3)
    assert h.stats.datagrams_down == 3


# ---- DNS ----------------------------------------------------------------------------


@needs_dnspython
def test_dns_query_through_the_forward(netns, udp_server, start_relay):
    server = udp_server(netns, answer=dns_answer)
    h = start_relay(netns, server.port)
    host, port = h.address
    response = dns.query.udp(dns.message.make_query(DNS_NAME, "A"), host, port=port, timeout=5)
    assert [rr.address for rr in response.answer[0]] == [DNS_ADDRESS]
    missing = dns.query.udp(dns.message.make_query("nope.nsbridge.test.", "A"), host,
                            port=port, timeout=5)
    assert missing.rcode() == dns.rcode.NXDOMAIN
    h.wait_replies(2)
    assert h.stats.datagrams_down == 2


@needs_dnspython
@pytest.mark.skipif(not have("dig"), reason="dig is not installed")
def test_dig_through_the_forward(netns, udp_server, start_relay):
    server = udp_server(netns, answer=dns_answer)
    h = start_relay(netns, server.port)
    host, port = h.address
    result = subprocess.run(
        ["dig", f"@{host}", "-p", str(port), DNS_NAME, "A", "+short", "+time=3", "+tries=1"],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [DNS_ADDRESS]


# ---- flow lifetime ----------------------------------------------------------------------


def test_idle_flows_expire_and_their_fds_are_closed(netns, udp_server, start_relay):
    server = udp_server(netns)
    h = start_relay(netns, server.port, idle_timeout=0.3, fresh=True)
    assert h.relay.sweep_interval == pytest.approx(0.075)
    clients = [h.client() for _ in range(5)]
    start = fd_count()
    try:
        for i, sock in enumerate(clients):
            assert roundtrip(sock, b"%d" % i) == b"%d" % i
        assert len(h.flows()) == 5
        assert fd_count() == start + 5  # one socket per flow
        # A flow kept busy outlives the timeout; the quiet ones expire.
        for _ in range(8):
            assert roundtrip(clients[0], b"busy") == b"busy"
            time.sleep(0.1)
        assert h.clients_of_flows() == [clients[0].getsockname()]
        wait_until(lambda: not h.flows(), timeout=5, what="the busy flow to expire")
        assert fd_count() == start
        assert h.stats.expired_flows == 5 and h.stats.active_flows == 0
        assert roundtrip(clients[1], b"again") == b"again"  # a new flow for an old client
        assert h.stats.total_flows == 6
        h.assert_alive()
    finally:
        for sock in clients:
            sock.close()


def test_flow_cap_evicts_the_least_recently_used(netns, udp_server, start_relay):
    server = udp_server(netns)
    closed: list[UdpFlow] = []
    h = start_relay(netns, server.port, max_flows=4, fresh=True, on_flow_closed=closed.append)
    clients = [h.client() for _ in range(7)]
    start = fd_count()
    names = [sock.getsockname() for sock in clients]
    try:
        for i in range(6):
            assert roundtrip(clients[i], b"%d" % i) == b"%d" % i
        assert h.clients_of_flows() == names[2:6]
        assert [(f.client, f.outcome) for f in closed] == [(names[0], "evicted"),
                                                           (names[1], "evicted")]
        assert fd_count() == start + 4  # never more sockets than the cap
        # Client 2 is the oldest flow; a datagram makes it recent, so 3 goes instead.
        assert roundtrip(clients[2], b"still here") == b"still here"
        assert roundtrip(clients[6], b"new") == b"new"
        assert h.clients_of_flows() == [names[4], names[5], names[2], names[6]]
        # An evicted client is not locked out: it simply gets a new flow.
        assert roundtrip(clients[0], b"back") == b"back"
        stats = h.stats
        assert (stats.evicted_flows, stats.total_flows, stats.active_flows) == (4, 8, 4)
        assert stats.dropped == 0
        assert "evicted" in closed[0].describe() and "1 datagrams" in closed[0].describe()
    finally:
        for sock in clients:
            sock.close()


# ---- errors and limits ------------------------------------------------------------------


def test_closed_target_port_is_counted_and_the_flow_survives(netns, udp_server, start_relay):
    port = free_udp_port(netns)
    h = start_relay(netns, port)
    with h.client() as sock:
        for i in range(3):
            sock.send(b"anyone? %d" % i)
            time.sleep(0.05)
        wait_until(lambda: h.stats.icmp_errors >= 2, timeout=5, what="ICMP errors counted")
        h.assert_alive()
        assert len(h.flows()) == 1
        # The target comes up on that port: the same flow now carries replies.
        udp_server(netns, port=port)
        assert roundtrip(sock, b"now?") == b"now?"
    h.wait_replies(1)
    stats = h.stats
    assert stats.total_flows == 1 and stats.datagrams_down == 1
    assert stats.errors == 0 and stats.dropped == 0


def test_largest_ipv4_datagram_passes_intact(netns, udp_server, start_relay):
    server = udp_server(netns)
    h = start_relay(netns, server.port)
    payload = os.urandom(65507)
    with h.client() as sock:
        assert roundtrip(sock, payload) == payload
    h.wait_replies(1)
    assert h.stats.bytes_up == h.stats.bytes_down == 65507


def test_too_large_for_the_target_family_is_dropped_and_counted(netns, udp_server,
                                                                 start_relay):
    server = udp_server(netns)
    h = start_relay(netns, server.port, listen_host="::1", target_host="127.0.0.1")
    with h.client() as sock:
        sock.send(os.urandom(65527))  # fits IPv6, 20 bytes too many for IPv4
        wait_until(lambda: h.stats.dropped_too_large == 1, timeout=5, what="the drop")
        assert roundtrip(sock, b"small") == b"small"
    assert server.received == 1
    h.assert_alive()


def test_200_clients_20_datagrams_each(netns, udp_server, start_relay):
    server = udp_server(netns)
    h = start_relay(netns, server.port)
    clients = [h.client() for _ in range(200)]
    for sock in clients:
        sock.setblocking(False)
    expected: dict[socket.socket, bytes] = {}
    done: dict[socket.socket, int] = {sock: 0 for sock in clients}
    selector = selectors.DefaultSelector()

    def send_next(index: int, sock: socket.socket) -> None:
        expected[sock] = b"%d:%d:" % (index, done[sock]) + os.urandom(64)
        sock.send(expected[sock])

    try:
        for index, sock in enumerate(clients):
            selector.register(sock, selectors.EVENT_READ, index)
            send_next(index, sock)
        deadline = time.monotonic() + 60
        while any(count < 20 for count in done.values()):
            assert time.monotonic() < deadline, f"stuck: {sum(done.values())} of 4000 answered"
            for key, _ in selector.select(timeout=1):
                sock = key.fileobj
                assert sock.recv(1 << 16) == expected[sock]  # type: ignore[union-attr]
                done[sock] += 1  # type: ignore[index]
                if done[sock] < 20:  # type: ignore[index]
                    send_next(key.data, sock)  # type: ignore[arg-type]
    finally:
        selector.close()
        for sock in clients:
            sock.close()
    h.wait_replies(4000)
    stats = h.stats
    assert (stats.datagrams_up, stats.datagrams_down) == (4000, 4000)
    assert stats.total_flows == stats.active_flows == 200
    assert stats.dropped == stats.errors == 0
    h.assert_alive()


@pytest.mark.parametrize("fresh", [True, False], ids=["unpooled-factory", "pooled-factory"])
def test_close_leaves_no_fds(netns, udp_server, fresh):
    server = udp_server(netns)
    before = fd_count()
    handle = Netns.from_spec(netns)
    factory: SocketFactory = factory_for(handle)
    if fresh:
        factory = FreshSocketFactory(factory)
    loop = EventLoop()
    relay = UdpRelay(loop, udp_socket("127.0.0.1"), ResolvedAddress(
        socket.AF_INET, ("127.0.0.1", server.port)), factory)
    harness = Harness(relay, loop, factory, handle, "127.0.0.1")
    relay.start()
    harness.run()
    try:
        clients = [harness.client() for _ in range(50)]
        for i, sock in enumerate(clients):
            assert roundtrip(sock, b"%d" % i) == b"%d" % i
            sock.close()
        assert len(harness.flows()) == 50
        harness.stop_loop()
        relay.close()
        assert relay.flows == [] and relay.stats.active_flows == 0
        assert relay.listener.fileno() == -1
        relay.close()  # idempotent
    finally:
        harness.stop()
    assert fd_count() == before


# ---- the flow table, with a fake clock ----------------------------------------------


def test_table_lookup_touches_and_unknown_is_none():
    table: FlowTable[str, int] = FlowTable(capacity=10, idle_timeout=5)
    assert table.get("a", now=0) is None
    assert table.add("a", 1, now=0) == []
    assert table.get("a", now=3) == 1
    assert table.last_active("a") == 3
    assert "a" in table and len(table) == 1


def test_table_expires_after_idle_timeout_counting_both_directions():
    table: FlowTable[str, int] = FlowTable(capacity=10, idle_timeout=5)
    table.add("a", 1, now=0)
    table.add("b", 2, now=1)
    table.add("c", 3, now=2)
    table.touch("a", now=4)  # a reply: activity too
    assert table.expire(now=5.9) == []
    assert table.expire(now=6) == [("b", 2)]  # exactly idle_timeout idle
    assert table.expire(now=8.5) == [("c", 3)]
    assert list(table) == ["a"]
    assert table.expire(now=9) == [("a", 1)]
    assert len(table) == 0


def test_table_evicts_least_recently_used_when_full():
    table: FlowTable[str, int] = FlowTable(capacity=3, idle_timeout=60)
    for now, key in enumerate("abc"):
        table.add(key, now, now=now)
    table.get("a", now=10)  # a is now the most recent: b is the victim
    assert table.add("d", 3, now=11) == [("b", 1)]
    assert list(table) == ["c", "a", "d"]
    table.touch("c", now=12)
    assert table.add("e", 4, now=13) == [("a", 0)]
    assert table.values() == [3, 2, 4]  # d, c, e


def test_table_capacity_one_and_duplicates():
    table: FlowTable[str, int] = FlowTable(capacity=1, idle_timeout=1)
    table.add("a", 1, now=0)
    with pytest.raises(KeyError):
        table.add("a", 2, now=0)
    assert table.add("b", 2, now=0) == [("a", 1)]
    assert table.remove("b") == 2 and table.remove("b") is None


def test_table_clear_returns_everything_in_order():
    table: FlowTable[tuple, str] = FlowTable(capacity=5, idle_timeout=1)
    table.add(("127.0.0.1", 1), "x", now=0)
    table.add(("::1", 2, 0, 0), "y", now=0)
    assert table.clear() == [(("127.0.0.1", 1), "x"), (("::1", 2, 0, 0), "y")]
    assert len(table) == 0 and table.expire(now=100) == []


def test_table_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        FlowTable(capacity=0, idle_timeout=1)
    with pytest.raises(ValueError):
        FlowTable(capacity=1, idle_timeout=0)


def test_table_sweep_cost_is_the_expired_flows_only():
    """Expiry stops at the first live flow: a sweep over 100k flows with none due is cheap."""
    table: FlowTable[int, int] = FlowTable(capacity=200_000, idle_timeout=10)
    for i in range(100_000):
        table.add(i, i, now=i / 1000)  # times 0 .. 99.999
    started = time.perf_counter()
    for _ in range(1000):
        assert table.expire(now=5) == []  # oldest is at 0; 0 + 10 > 5
    assert time.perf_counter() - started < 0.5
    assert len(table.expire(now=10.0005)) == 1
