"""The tun TCP path's I/O (:mod:`nsbridge.usernet.host.tuntcp`) with the test as the namespace.

The engine's "tun" is one end of a datagram socketpair (``PairEngine`` from
helpers/tun_engine.py) and :class:`TunTcp` is attached as its ``tcp_handler``; the
loop runs in a namespace the test made, so every host socket dials a real server in
it (the gateway 10.0.2.2 is that namespace's 127.0.0.1 with ``allow_host_loopback``).
The test writes the namespace's segments by hand — which is how it can be hostile in
ways a kernel never is — and reads what the host side answers.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from helpers.netns import listen_in
from helpers.tun_engine import GW4, NS4, PairEngine
from helpers.waiting import wait_until
from nsbridge.usernet.host.tuntcp import TunTcp
from nsbridge.usernet.proto.packetbuild import build_tcp_head
from nsbridge.usernet.proto.packets import TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from nsbridge.usernet.proto.policy import Policy
from nsbridge.usernet.proto.tcpstate import RECV_BUFFER

WS7 = b"\x02\x04\x05\xb4\x01\x03\x03\x07"  # MSS 1460, window scale 7


class Namespace:
    """The test's side of the pair: builds the namespace's segments, reads the answers."""

    def __init__(self, pair: PairEngine, tun_tcp: TunTcp) -> None:
        self.pair = pair
        self.tun_tcp = tun_tcp

    def send(self, sport: int, dport: int, seq: int, ack: int, flags: int,
             payload: bytes = b"", window: int = 0xFFFF, options: bytes = b"") -> None:
        head = build_tcp_head(NS4, GW4, sport, dport, seq, ack, flags, window,
                              options=options, payload=payload, vnet=False)
        self.pair.send(bytes(10) + head + payload)

    def receive(self) -> TCP:
        parsed = self.pair.receive()
        assert isinstance(parsed.l4, TCP), parsed
        return parsed.l4

    def flows(self) -> int:
        return self.pair.runner.call(lambda: len(self.tun_tcp.flows))

    def stats(self) -> dict:
        return self.pair.runner.call(lambda: self.tun_tcp.snapshot().as_dict())


@pytest.fixture
def pairs() -> Iterator[Callable[..., PairEngine]]:
    """Make engines on socketpairs (``PairEngine(policy, resolvers, netns=...)``);
    each is stopped and closed at the end, even when the test fails."""
    made: list[PairEngine] = []

    def make(policy: Policy, netns: str) -> PairEngine:
        pair = PairEngine(policy, [], netns=netns)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


@pytest.fixture
def namespace(pairs: Callable[..., PairEngine],
              make_netns: Callable[[], str]) -> Iterator[tuple[Namespace, str]]:
    """(the test's namespace end, the name of the netns the host side dials into)."""
    netns = make_netns()
    pair = pairs(Policy(allow_host_loopback=True), netns)
    tun_tcp = attach_tun_tcp(pair, max_connections=64, connect_timeout=5)
    try:
        yield Namespace(pair, tun_tcp), netns
    finally:
        pair.runner.call(tun_tcp.close)


def attach_tun_tcp(pair: PairEngine, **options: object) -> TunTcp:
    """A TunTcp as the pair engine's tcp_handler, made on the engine's loop thread."""
    runner = pair.runner

    def attach() -> TunTcp:
        engine = runner.engine
        assert engine is not None
        tun_tcp = TunTcp(runner.loop, engine.write, engine.write_parts, engine.policy,
                         source_ok=engine.new_flow_source_ok, vnet=True, offload=False,
                         **options)  # type: ignore[arg-type]
        engine.tcp_handler = tun_tcp.handle
        return tun_tcp

    return runner.call(attach)


def handshake(ns: Namespace, port: int, sport: int = 40000, isn: int = 1000) -> TCP:
    ns.send(sport, port, isn, 0, TCP_SYN, options=WS7)
    synack = ns.receive()
    assert synack.flags == TCP_SYN | TCP_ACK and synack.ack == isn + 1
    ns.send(sport, port, isn + 1, synack.seq + 1, TCP_ACK, window=1024)
    return synack


def accepted_by_hand(ns: Namespace, netns: str) -> tuple[socket.socket, socket.socket, int, TCP]:
    """A server in ``netns``, a connection to it opened from the namespace end by hand,
    accepted: (listener, server side with a 5 s timeout, port, the SYN-ACK)."""
    listener = listen_in(netns, "127.0.0.1")
    port = listener.getsockname()[1]
    synack = handshake(ns, port)
    server, _ = listener.accept()
    server.settimeout(5)
    return listener, server, port, synack


def test_a_whole_connection_by_hand(namespace: tuple[Namespace, str]) -> None:
    ns, netns = namespace
    listener, server, port, synack = accepted_by_hand(ns, netns)
    ours = synack.seq + 1
    ns.send(40000, port, 1001, ours, TCP_ACK | TCP_PSH, b"hello host")
    assert ns.receive().ack == 1011
    assert server.recv(100) == b"hello host"
    server.sendall(b"hello namespace")
    data = ns.receive()
    assert data.payload == b"hello namespace" and data.seq == ours
    ns.send(40000, port, 1011, ours + 15, TCP_ACK | TCP_FIN)  # ack it, and half-close
    assert ns.receive().ack == 1012
    assert server.recv(100) == b""  # the FIN became shutdown(SHUT_WR)
    server.close()
    fin = ns.receive()
    assert fin.flags & TCP_FIN and fin.seq == ours + 15
    ns.send(40000, port, 1012, ours + 16, TCP_ACK)
    wait_until(lambda: ns.flows() == 0, what="the connection to end")
    stats = ns.stats()
    assert stats["closed"] == 1 and stats["bytes_up"] == 10 and stats["bytes_down"] == 15
    listener.close()


def test_unacknowledged_bytes_are_sent_again(namespace: tuple[Namespace, str]) -> None:
    ns, netns = namespace
    listener, server, port, synack = accepted_by_hand(ns, netns)
    server.sendall(b"A" * 3000)
    first = ns.receive()
    assert first.payload == b"A" * 3000
    # Never acknowledged: the retransmit timer rewinds the peek and sends them again.
    again = ns.receive()
    assert again.seq == first.seq and again.payload == first.payload
    ns.send(40000, port, 1001, synack.seq + 1 + 3000, TCP_ACK)
    wait_until(lambda: ns.stats()["retransmits"] >= 1, what="a retransmission counted")
    server.close()
    listener.close()


def test_a_backlog_is_written_after_both_fins(namespace: tuple[Namespace, str]) -> None:
    """Both FINs exchanged (the connection is CLOSED) while the host server has not yet
    taken every byte: the rest is still written, then the host socket is closed."""
    ns, netns = namespace
    listener = listen_in(netns, "127.0.0.1")
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader
    port = listener.getsockname()[1]
    synack = handshake(ns, port)
    server, _ = listener.accept()
    server.settimeout(5)
    ours, seq, chunk = synack.seq + 1, 1001, b"u" * 60000
    for _ in range(500):  # until the host socket is full and a backlog waits
        ns.send(40000, port, seq, ours, TCP_ACK | TCP_PSH, chunk)
        ack = ns.receive()
        seq = ack.ack
        if ack.window << 7 < RECV_BUFFER // 2:
            break
    else:
        raise AssertionError("the host socket never filled")
    server.shutdown(socket.SHUT_WR)
    fin = ns.receive()
    while not fin.flags & TCP_FIN:  # a window update may come first
        fin = ns.receive()
    assert fin.seq == ours
    ns.send(40000, port, seq, ours + 1, TCP_ACK | TCP_FIN)  # ack its FIN, send ours
    last = ns.receive()
    while last.ack != seq + 1:
        last = ns.receive()
    received = 0
    while data := server.recv(1 << 16):
        received += len(data)
    assert received == seq - 1001
    wait_until(lambda: ns.flows() == 0, what="the connection to end")
    assert ns.stats()["closed"] == 1
    server.close()
    listener.close()


def test_nothing_reaches_the_host_before_the_handshake_completes(
        namespace: tuple[Namespace, str]) -> None:
    """A hostile namespace sends data and a FIN after our SYN-ACK with an ACK that does
    not acknowledge it: the host server gets none of it, and no half-close."""
    ns, netns = namespace
    listener = listen_in(netns, "127.0.0.1")
    port = listener.getsockname()[1]
    ns.send(40000, port, 1000, 0, TCP_SYN, options=WS7)
    synack = ns.receive()
    assert synack.flags == TCP_SYN | TCP_ACK
    server, _ = listener.accept()
    server.settimeout(0.5)
    ns.send(40000, port, 1001, synack.seq, TCP_ACK | TCP_PSH | TCP_FIN, b"early")
    ns.send(40000, port, 1001, synack.seq + 99, TCP_ACK | TCP_PSH, b"ahead")

    def next_ack() -> TCP:  # SYN-ACKs resent by the retransmit timer are skipped
        answer = ns.receive()
        while answer.flags & TCP_SYN:
            answer = ns.receive()
        return answer

    assert next_ack().ack == 1001  # the future ACK is answered, nothing is taken
    with pytest.raises(TimeoutError):
        server.recv(100)
    ns.send(40000, port, 1001, synack.seq + 1, TCP_ACK | TCP_PSH, b"now")
    assert next_ack().ack == 1004
    assert server.recv(100) == b"now"
    server.close()
    listener.close()


def test_namespace_reset_aborts_the_host_connection(namespace: tuple[Namespace, str]) -> None:
    ns, netns = namespace
    listener, server, port, _synack = accepted_by_hand(ns, netns)
    ns.send(40000, port, 1001, 0, TCP_RST)
    with pytest.raises(ConnectionResetError):
        server.recv(100)
    assert ns.flows() == 0 and ns.stats()["reset"] == 1
    server.close()
    listener.close()


def test_refused_target_resets_the_syn_and_keeps_nothing(
        namespace: tuple[Namespace, str]) -> None:
    ns, netns = namespace
    closed = listen_in(netns, "127.0.0.1")
    port = closed.getsockname()[1]
    closed.close()
    ns.send(40001, port, 5000, 0, TCP_SYN)
    reset = ns.receive()
    assert reset.flags & TCP_RST and reset.ack == 5001
    assert ns.flows() == 0 and ns.stats()["connect_failed"] == 1


def test_segments_of_unknown_connections_are_reset(namespace: tuple[Namespace, str]) -> None:
    ns, _netns = namespace
    ns.send(40002, 9, 77, 1234, TCP_ACK, b"stray")
    reset = ns.receive()
    assert reset.flags == TCP_RST and reset.seq == 1234


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_syn_flood_is_capped_and_hostile_segments_change_nothing(
        namespace: tuple[Namespace, str]) -> None:
    ns, netns = namespace
    listener = listen_in(netns, "127.0.0.1", backlog=4096)
    port = listener.getsockname()[1]
    before = _fds()
    rng = random.Random(7)
    for sport in range(20000, 20300):  # 300 SYNs, never completed; 64 may be open
        ns.send(sport, port, rng.getrandbits(32), 0, TCP_SYN, options=WS7)
    # Counted from the state, not from answer frames: a datagram socketpair holds only
    # net.unix.max_dgram_qlen frames, so some SYN-ACKs and resets are dropped as "tun full".
    wait_until(lambda: ns.stats()["refused_full"] == 236, what="236 SYNs refused")
    assert ns.flows() == 64
    # Garbage on the open ones: random flags, numbers and payloads.  Nothing may raise.
    for _ in range(2000):
        ns.send(rng.randrange(20000, 20064), port, rng.getrandbits(32), rng.getrandbits(32),
                rng.choice([TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK, TCP_SYN, 0,
                            TCP_SYN | TCP_FIN, TCP_ACK | TCP_RST]),
                rng.randbytes(rng.randrange(0, 200)), window=rng.getrandbits(16))
    time.sleep(0.5)
    assert ns.pair.runner.stats()["errors"] == 0
    ns.pair.runner.call(ns.tun_tcp.close)
    assert ns.flows() == 0
    wait_until(lambda: _fds() <= before, what="every host socket closed")
    listener.close()


def test_denied_syn_is_reset_without_dialing(pairs: Callable[..., PairEngine],
                                             make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    listener = listen_in(netns, "127.0.0.1")
    port = listener.getsockname()[1]
    pair = pairs(Policy(), netns)  # host loopback off: 10.0.2.2 is denied
    tun_tcp = attach_tun_tcp(pair)
    ns = Namespace(pair, tun_tcp)
    ns.send(40003, port, 9, 0, TCP_SYN)
    assert ns.receive().flags & TCP_RST
    assert ns.stats()["denied"] == {"host loopback disabled": 1}
    listener.settimeout(0.3)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    pair.runner.call(tun_tcp.close)
