"""The tun TCP path's I/O (:mod:`nsbridge.usernet.tuntcp`) with the test as the namespace.

The engine's "tun" is one end of a datagram socketpair (``PairEngine`` from
test_usernet_engine.py) and :class:`TunTcp` is attached as its ``tcp_handler``; the
loop runs in a namespace the test made, so every host socket dials a real server in
it (the gateway 10.0.2.2 is that namespace's 127.0.0.1 with ``allow_host_loopback``).
The test writes the namespace's segments by hand — which is how it can be hostile in
ways a kernel never is — and reads what the host side answers.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import listen_in, wait_until
from test_usernet_engine import GW4, NS4, PairEngine

from nsbridge.usernet.packets import (
    TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    build_tcp_head,
)
from nsbridge.usernet.policy import Policy
from nsbridge.usernet.tuntcp import TunTcp

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

