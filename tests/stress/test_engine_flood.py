"""Two million adversarial frames through the tun engine (hostile input; stress).

tests/unit/test_packets.py and test_tcpstate.py fuzz the sans-IO parts with hypothesis; this
drives the whole engine — UDP flows, DNS, ICMP echo, and the tun TCP path
(:class:`~nsbridge.usernet.host.tuntcp.TunTcp`) — with 2,000,000 frames: valid templates
of every kind, then mutated (bytes flipped, truncated, lengths and offsets falsified,
virtio headers lying, fragments, IP options, TCP state violations, ICMP errors quoting
random packets).  Seeded, so a failure replays.

The engine runs in a namespace the test made that has only a loopback device and no
route: every flow the policy allows is dialed there and fails or lands on nothing, so no
packet can leave.  Its "tun" is a datagram socketpair whose far end nobody reads
(replies beyond its queue are dropped and counted: IP may drop).

Asserted: no exception escapes (``errors`` stays 0), every frame is accounted for by a
counter, the flow tables stay within their caps, and the engine's memory (tracemalloc,
this thread's allocations) is bounded after the flood.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tracemalloc
from collections.abc import Callable

import pytest

from helpers.netns import in_netns
from nsbridge.relay.loop import EventLoop
from nsbridge.usernet.host.engine import TunEngine
from nsbridge.usernet.host.tuntcp import TunTcp
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.packetbuild import (
    build_icmp_echo,
    build_icmp_unreachable,
    build_tcp_head,
    build_udp,
)
from nsbridge.usernet.proto.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from nsbridge.usernet.proto.policy import Policy

pytestmark = pytest.mark.stress

FRAMES = int(os.environ.get("NSB_FLOOD_FRAMES", 2_000_000))
A = UsernetAddresses()
NS4, GW4, DNS4 = A.namespace.packed, A.gateway.packed, A.dns.packed
NS6, GW6 = A.namespace6.packed, A.gateway6.packed
OUT4 = bytes([192, 0, 2, 77])  # TEST-NET: no route in the engine's namespace
OUT6 = bytes.fromhex("20010db8000000000000000000000077")


def templates(rng: random.Random) -> list[bytes]:
    """Valid frames of every kind the engine handles (virtio header included)."""
    tcp = []
    for flags in (TCP_SYN, TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK, TCP_RST,
                  TCP_SYN | TCP_FIN, 0):
        payload = rng.randbytes(rng.choice([0, 1, 100, 1400]))
        for src, dst in ((NS4, OUT4), (NS4, GW4), (NS6, OUT6), (NS6, GW6)):
            head = build_tcp_head(src, dst, rng.randrange(1024, 65536), 80,
                                  rng.getrandbits(32), rng.getrandbits(32), flags, 65535,
                                  options=b"\x02\x04\x05\xb4\x01\x03\x03\x07",
                                  payload=payload)
            tcp.append(head + payload)
    # Connections that really open (the gateway is the namespace's 127.0.0.1:80, which
    # listens): SYNs from 200 ports, then segments on them with made-up sequence and
    # acknowledgement numbers, FINs and resets: TCP state violations on live state.
    for sport in range(30000, 30200):
        for flags in (TCP_SYN, TCP_ACK | TCP_PSH, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST):
            payload = rng.randbytes(rng.choice([0, 10, 1000])) if flags & TCP_ACK else b""
            head = build_tcp_head(NS4, GW4, sport, 80, rng.getrandbits(32),
                                  rng.getrandbits(32), flags, rng.getrandbits(16),
                                  options=b"\x02\x04\x05\xb4\x01\x03\x03\x07"
                                  if flags == TCP_SYN else b"", payload=payload)
            tcp.append(head + payload)
    udp = [build_udp(NS4, dst, rng.randrange(1024, 65536), port, rng.randbytes(n))
           for dst, port in ((OUT4, 9), (GW4, 9), (DNS4, 53), (DNS4, 54))
           for n in (0, 12, 512)]
    udp += [build_udp(NS6, OUT6, 5000, 9, b"six")]
    echo = [build_icmp_echo(src, dst, 7, 1, b"ping", reply=False)
            for src, dst in ((NS4, OUT4), (NS4, GW4), (NS6, OUT6), (NS6, GW6))]
    quoted = [build_icmp_unreachable(frame[10:], "port", src=NS4) for frame in udp[:4]]
    return tcp + udp + echo + quoted


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One adversarial variant of ``frame``."""
    data = bytearray(frame)
    choice = rng.randrange(10)
    if choice == 0:
        return bytes(data[: rng.randrange(len(data) + 1)])  # truncated anywhere
    if choice == 1:  # random bytes flipped
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 2 and len(data) > 14:  # IPv4 total length / IPv6 payload length lies
        at = 12 if data[10] >> 4 == 4 else 14
        data[at : at + 2] = rng.getrandbits(16).to_bytes(2, "big")
    elif choice == 3:  # the virtio header lies (GSO types, checksum offsets)
        data[:10] = rng.randbytes(10)
    elif choice == 4 and len(data) > 30 and data[10] >> 4 == 4:  # fragment bits
        data[16] = rng.choice([0x20, 0x00, 0x3F])
        data[17] = rng.getrandbits(8)
    elif choice == 5:  # garbage appended (padding, or a second packet's start)
        data += rng.randbytes(rng.randrange(1, 64))
    elif choice == 6 and len(data) > 40 and data[10] >> 4 == 4:  # TCP/UDP header length
        ihl = (data[10] & 0x0F) * 4
        if len(data) > 10 + ihl + 13:
            data[10 + ihl + 12] = rng.getrandbits(8)
    elif choice == 7:  # a completely random frame
        return rng.randbytes(rng.randrange(0, 200))
    elif choice == 8 and len(data) > 20 and data[10] >> 4 == 4:  # IPv4 header length
        data[10] = 0x40 | rng.randrange(16)
    # choice 9 (and fall-throughs): the valid frame itself
    return bytes(data)


def test_millions_of_adversarial_frames(make_netns: Callable[[], str]) -> None:
    # Only a loopback device and no route: nothing dialed can go anywhere.  Its
    # 127.0.0.1:80 listens (never accepting), so TCP to the gateway (allowed, dialed as
    # 127.0.0.1) opens real connections that then take the hostile segments.
    netns = make_netns()
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    test_end, tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_end.setblocking(False)  # as the engine's start() would: a full "tun" drops
    try:
        report = in_netns(netns, lambda: flood(tun_end.fileno()))
    finally:
        test_end.close()
        tun_end.close()
    stats, tcp, peak, after, flows = report  # type: ignore[misc]
    assert stats["errors"] == 0, stats
    assert stats["frames_in"] == FRAMES
    assert sum(stats["malformed"].values()) > FRAMES // 10  # the mutations were seen
    assert flows["udp"] <= 4096 and flows["echo"] <= 4096 and flows["tcp"] <= 4096
    assert tcp["active"] == flows["tcp"]
    assert flows["tcp"] >= 100, tcp  # live connections took the hostile segments
    assert len(stats["malformed"]) + len(stats["unsupported"]) < 100  # bounded counters
    # Bounded memory: what the engine still holds after millions of frames (flow tables
    # at their caps, counters) is a few MiB, not a function of the frames sent.
    assert after < 64 << 20, f"{after >> 20} MiB still allocated"
    assert peak < 128 << 20, f"peak {peak >> 20} MiB"


def flood(tun_fd: int) -> tuple[dict, dict, int, int, dict]:
    rng = random.Random(20261122)
    loop = EventLoop()
    engine = TunEngine(loop, tun_fd, 10, Policy(allow_host_loopback=True), A,
                       [("127.0.0.1", 53)], offloads=("csum",), dns_timeout=0.2)
    tun_tcp = TunTcp(loop, engine.write, engine.write_parts, engine.policy,
                     source_ok=engine.new_flow_source_ok, resolvers=[("127.0.0.1", 53)],
                     connect_timeout=0.5)
    engine.tcp_handler = tun_tcp.handle
    bases = templates(rng)
    server = socket.create_server(("127.0.0.1", 80), backlog=4096)
    tracemalloc.start()
    try:
        for i in range(FRAMES):
            engine.handle_frame(mutate(rng.choice(bases), rng))
            if i % 5000 == 0:
                run_once(loop)  # connects fail, timers fire, answers are read
        run_once(loop)
        _, peak = tracemalloc.get_traced_memory()
        flows = {"udp": len(engine._udp), "echo": len(engine._echo),
                 "tcp": len(tun_tcp.flows)}
        stats = engine.stats.as_dict()
        tcp = tun_tcp.snapshot().as_dict()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.close()
        tun_tcp.close()
        engine.close()
        loop.close()
    return stats, tcp, peak, current, flows


def run_once(loop: EventLoop) -> None:
    """One pass of the loop: pending events and due timers, then back to flooding."""
    loop.call_later(0, loop.stop)
    loop.run()
