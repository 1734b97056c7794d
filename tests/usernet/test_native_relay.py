"""The native UDP and ping relay (nsbridge/usernet/host/_flowrelay.c, flowrelay.py), no mocks.

Three layers:

* ``classify``: the relay's packet checks, sans-IO, on crafted bytes;
* the C ``Relay`` itself: a SOCK_DGRAM socketpair stands in for the tun device (one
  datagram per packet, as a tun gives), and the host side is real: ping sockets opened
  in a "host" namespace of the test's own, answered by its kernel;
* ``nsbridge run`` end to end inside that host namespace: real ping, through the
  device and routing rule the sandbox gets.

Packets are built and checked here by hand (struct + a checksum), not with nsbridge's
own packet code, so the tests do not trust what they test.

Runs as root (namespaces); the sandboxes map the caller to root inside.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.waiting import wait_until
from nsbridge.usernet.host import flowrelay

pytestmark = pytest.mark.skipif(flowrelay._flowrelay is None,
                                reason="the native module was not built (no C compiler)")

NS_IP = bytes([10, 0, 2, 100])
HOST_IP = bytes([192, 0, 2, 1])


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _csum(data: bytes) -> int:
    return ~_sum(data) & 0xFFFF


def echo_packet(ident: int = 0x1234, seq: int = 1, payload: bytes = b"nsbridge-ping",
                *, src: bytes = NS_IP, dst: bytes = HOST_IP, icmp_type: int = 8,
                options: bytes = b"", frag: int = 0x4000, proto: int = 1, code: int = 0) -> bytes:
    """An IPv4 packet carrying an ICMP echo request, checksums right."""
    icmp = struct.pack("!BBHHH", icmp_type, code, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(icmp), 7, frag, 64,
                         proto, 0, src, dst) + options
    header = header[:10] + struct.pack("!H", _csum(header)) + header[12:]
    return header + icmp


def udp_packet(sport: int = 40000, dport: int = 7777, payload: bytes = b"nsbridge-udp", *,
               src: bytes = NS_IP, dst: bytes = HOST_IP, checksum: bool = True,
               length_delta: int = 0) -> bytes:
    """An IPv4 packet carrying a UDP datagram, checksums right (or none)."""
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length + length_delta, 0) + payload
    if checksum:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
        udp = udp[:6] + struct.pack("!H", _csum(pseudo + udp) or 0xFFFF) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 7, 0x4000, 64, 17, 0, src,
                         dst)
    header = header[:10] + struct.pack("!H", _csum(header)) + header[12:]
    return header + udp


NS_IP6 = bytes.fromhex("fd000000000000000000000000000100")
HOST_IP6 = bytes.fromhex("20010db8000000000000000000000001")


def _ip6(next_header: int, payload: bytes, src: bytes = NS_IP6, dst: bytes = HOST_IP6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


def _pseudo6(src: bytes, dst: bytes, next_header: int, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, next_header)


def echo6_packet(ident: int = 0x1234, seq: int = 1, payload: bytes = b"nsbridge-ping6", *,
                 icmp_type: int = 128, next_header: int = 58, src: bytes = NS_IP6,
                 dst: bytes = HOST_IP6) -> bytes:
    """An IPv6 packet carrying an ICMPv6 echo request, checksum right."""
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    csum = _csum(_pseudo6(src, dst, 58, len(icmp)) + icmp)
    return _ip6(next_header, icmp[:2] + struct.pack("!H", csum) + icmp[4:], src, dst)


def udp6_packet(sport: int = 40000, dport: int = 7777, payload: bytes = b"nsbridge-udp6", *,
                zero_checksum: bool = False, src: bytes = NS_IP6, dst: bytes = HOST_IP6) -> bytes:
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if not zero_checksum:
        csum = _csum(_pseudo6(src, dst, 17, length) + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return _ip6(17, udp, src, dst)


def check_reply6(reply: bytes, request: bytes) -> None:
    """``reply`` answers the IPv6 ``request`` (echo or UDP) as a host would have."""
    assert len(reply) == len(request), (len(reply), len(request))
    version, length, next_header, hops = struct.unpack("!IHBB", reply[:8])
    assert version >> 28 == 6 and length == len(reply) - 40 and hops == 64
    assert next_header == request[6]
    assert reply[8:24] == request[24:40] and reply[24:40] == request[8:24]
    pseudo = _pseudo6(reply[8:24], reply[24:40], next_header, length)
    assert _sum(pseudo + reply[40:]) == 0xFFFF, "checksum"
    if next_header == 58:
        assert reply[40] == 129 and reply[41] == 0 and reply[44:] == request[44:]
    else:
        assert reply[40:42] == request[42:44] and reply[42:44] == request[40:42]
        assert reply[48:] == request[48:]


# ---- classify: the checks, sans-IO -------------------------------------------------------


def _flip(packet: bytes, index: int) -> bytes:
    return packet[:index] + bytes([packet[index] ^ 0x01]) + packet[index + 1 :]


CLASSIFY_CASES = [
    (echo_packet(), "echo"),
    (echo_packet(options=b"\x01\x01\x01\x00"), "echo"),  # NOPs + end of options
    (echo_packet(payload=b""), "echo"),
    (b"", "not ip"),
    (b"\x50" + bytes(47), "not ip"),  # version 5
    (echo6_packet(), "echo"),
    (udp6_packet(), "udp"),
    (udp6_packet(zero_checksum=True), "bad checksum"),  # mandatory over IPv6
    (_flip(echo6_packet(), 50), "bad checksum"),
    (_flip(udp6_packet(), 50), "bad checksum"),
    (echo6_packet(icmp_type=129), "other icmp"),  # an echo reply
    (echo6_packet(next_header=44), "fragment"),
    (echo6_packet(next_header=0), "other protocol"),  # a hop-by-hop header first
    (echo6_packet() + b"x", "malformed"),  # the payload length disagrees
    (echo6_packet()[:47], "malformed"),
    (echo_packet()[:27], "malformed"),  # shorter than header + ICMP header
    (b"\x44" + echo_packet()[1:], "malformed"),  # IHL 4
    (echo_packet() + b"x", "malformed"),  # the total length disagrees with the read
    (echo_packet(frag=0x2000), "fragment"),  # more fragments
    (echo_packet(frag=0x0001), "fragment"),  # an offset
    (echo_packet(proto=6), "other protocol"),
    (udp_packet(), "udp"),
    (udp_packet(checksum=False), "udp"),  # a zero checksum is "none" (RFC 768)
    (_flip(udp_packet(), 30), "bad checksum"),  # payload changed, its sum not
    (udp_packet(length_delta=1), "malformed"),  # the UDP length disagrees with the IP
    (udp_packet(payload=b"")[:27], "malformed"),
    (_flip(echo_packet(), 8), "bad checksum"),  # TTL changed, header sum not
    (_flip(echo_packet(), 30), "bad checksum"),  # ICMP payload changed, its sum not
    (echo_packet(icmp_type=0), "other icmp"),  # an echo reply
    (echo_packet(icmp_type=3), "other icmp"),  # an error the namespace sends
]


@pytest.mark.parametrize(("packet", "verdict"), CLASSIFY_CASES)
def test_classify(packet, verdict):
    assert flowrelay._flowrelay.classify(packet) == verdict


def test_classify_takes_only_bytes_like():
    with pytest.raises(TypeError):
        flowrelay._flowrelay.classify("not bytes")


def test_relay_refuses_bad_arguments():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        with pytest.raises(TypeError, match="callable"):
            flowrelay._flowrelay.Relay(b.fileno(), None, print)
        with pytest.raises(ValueError, match="max_flows"):
            flowrelay._flowrelay.Relay(b.fileno(), print, print, 60.0, 0)
        with pytest.raises(ValueError, match="idle_timeout"):
            flowrelay._flowrelay.Relay(b.fileno(), print, print, -1.0)


# ---- classify against the engine's parser, on hostile packets ----------------------------


def hostile_packets(count: int = 40_000, seed: int = 6, ipv6: bool = False) -> Iterator[bytes]:
    """Mutations of valid echo requests and UDP datagrams, as a hostile namespace sends
    them: random bytes, cut short, bytes overwritten, the header length, the IP and UDP
    lengths and the protocol rewritten.  Seeded, so a failure replays.  ``ipv6`` mutates
    IPv6 templates, with the lengths and next header at IPv6's offsets (the version
    nibble takes any value there, as IPv4's header length does)."""
    import random

    rng = random.Random(seed)
    if ipv6:
        templates = [echo6_packet(), udp6_packet(), udp6_packet(payload=b""),
                     echo6_packet(payload=b"")]
        first, lengths, protocol = 0x0F, (4, 44), 6
    else:
        templates = [echo_packet(), udp_packet(), echo_packet(options=b"\x01" * 8),
                     udp_packet(payload=b"")]
        first, lengths, protocol = 0x40, (2, 24), 9
    for i in range(count):
        packet = bytearray(rng.choice(templates))
        kind = i % 6
        if kind == 0:
            packet = bytearray(rng.randbytes(rng.randrange(1, 80)))  # a tun never reads 0
        elif kind == 1:
            del packet[rng.randrange(1, len(packet)):]
        elif kind == 2:
            for _ in range(rng.randrange(1, 4)):
                packet[rng.randrange(len(packet))] = rng.randrange(256)
        elif kind == 3:
            nibble = rng.randrange(16)  # IPv4: any header length; IPv6: any version
            packet[0] = first | nibble if not ipv6 else nibble << 4 | packet[0] & first
        elif kind == 4:
            at = rng.choice(lengths)  # the IP or the UDP length
            packet[at:at + 2] = rng.randrange(65536).to_bytes(2, "big")
        else:
            packet[protocol] = rng.randrange(256)
        yield bytes(packet)


def _hop_by_hop_udp6() -> bytes:
    """A valid UDP datagram behind an (empty, padded) IPv6 hop-by-hop header."""
    udp = udp6_packet()[40:]
    return _ip6(0, bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp)


# Packets the engine's parser accepts and the relay refuses, one per reason below.
STRICTER_CASES = [
    echo_packet() + b"x",
    echo6_packet() + bytes(3),
    udp_packet(length_delta=-1, checksum=False),
    _hop_by_hop_udp6(),
    echo_packet(code=1),
]


def valid_requests(count: int = 4_000, seed: int = 8) -> Iterator[bytes]:
    """Well-formed echo requests and UDP datagrams of both families with random
    addresses, ports, ids, IPv4 options and payloads: what both must accept alike."""
    import random

    rng = random.Random(seed)
    for i in range(count):
        payload = rng.randbytes(rng.choice((0, 1, 7, 100, 1400)))
        port, other = rng.randrange(65536), rng.randrange(65536)
        src, dst = rng.randbytes(4), rng.randbytes(4)
        kind = i % 4
        if kind == 0:
            options = b"\x01" * 4 * rng.randrange(11)
            yield echo_packet(port, other, payload, src=src, dst=dst, options=options)
        elif kind == 1:
            yield udp_packet(port, other, payload, src=src, dst=dst,
                             checksum=rng.random() < 0.8)
        elif kind == 2:
            yield echo6_packet(port, other, payload, src=rng.randbytes(16), dst=rng.randbytes(16))
        else:
            yield udp6_packet(port, other, payload, src=rng.randbytes(16), dst=rng.randbytes(16))


def engine_reading(packet: bytes) -> tuple[int, bytes, bytes, int, int, int] | None:
    """What the engine's parser makes of ``packet``, in the relay's terms: (protocol,
    source, destination, source port or echo id, destination port or 0, where the
    payload the host socket sends starts) for a UDP datagram or an echo request (the
    two things the relay handles), None for anything else."""
    from nsbridge.usernet.proto.packets import UDP, ICMPEcho, Parsed, parse_frame

    parsed = parse_frame(packet, vnet=False)
    if type(parsed) is not Parsed:
        return None
    ip, l4 = parsed.ip, parsed.l4
    if type(l4) is UDP:
        return (17, ip.src, ip.dst, l4.sport, l4.dport, ip.header_length + 8)
    if type(l4) is ICMPEcho and not l4.reply:
        return (ip.protocol, ip.src, ip.dst, l4.ident, 0, ip.header_length)
    return None


def why_the_relay_is_stricter(packet: bytes) -> str | None:
    """Where the relay refuses on purpose what the engine's parser accepts, and why:
    its device hands over exactly one IP packet per read, built by the namespace's own
    kernel, which never pads it, never sends a UDP datagram shorter than its IP payload,
    adds no IPv6 extension header to an echo or a datagram (the routing rules match
    the upper protocol), and sends echo requests with code 0 (RFC 792, RFC 4443)."""
    from nsbridge.usernet.proto.packets import ICMPEcho, Parsed, parse_frame

    parsed = parse_frame(packet, vnet=False)
    assert type(parsed) is Parsed
    ip, l4 = parsed.ip, parsed.l4
    if ip.total_length != len(packet):
        return "bytes after the IP packet"
    if ip.version == 6 and ip.header_length != 40:
        return "IPv6 extension headers"
    if type(l4) is ICMPEcho:
        return "echo code not 0" if packet[ip.header_length + 1] else None
    if 8 + len(l4.payload) != ip.total_length - ip.header_length:  # UDP
        return "bytes after the UDP datagram"
    return None


def test_classify_agrees_with_the_engine_parser():
    """A differential test of the relay's packet checks (C) against the engine's parser
    (packets.parse_frame, Python), on every packet the hostile-packet test sends, the
    same mutations of IPv6 packets, the classify cases above, well-formed packets of
    random flows and packets made to differ.

    The relay accepts a packet only if the parser reads it as a UDP datagram or an echo
    request of the very same flow (addresses, ports or id, and where the payload
    starts); and it accepts every such packet but for the reasons it is stricter on
    purpose (why_the_relay_is_stricter), each of which is seen here at least once.
    ``flow_key`` (test-only) is the C function the relay files a packet with."""
    flow_key, classify = flowrelay._flowrelay.flow_key, flowrelay._flowrelay.classify
    packets = [*hostile_packets(), *hostile_packets(20_000, seed=7, ipv6=True),
               *(packet for packet, _verdict in CLASSIFY_CASES), *valid_requests(),
               *STRICTER_CASES]
    agreed = {"accepted": 0, "refused": 0}
    stricter: dict[str, int] = {}
    for packet in packets:
        relay, engine = flow_key(packet), engine_reading(packet)
        assert (relay is not None) == (classify(packet) in ("echo", "udp")), packet.hex()
        if relay is not None:
            assert relay == engine, packet.hex()
            agreed["accepted"] += 1
        elif engine is None:
            agreed["refused"] += 1
        else:
            reason = why_the_relay_is_stricter(packet)
            assert reason is not None, f"the relay refuses what the engine takes: {packet.hex()}"
            stricter[reason] = stricter.get(reason, 0) + 1
    # The random valid packets all, and some hundreds of mutations (a rewritten byte
    # the checksums do not cover, an IPv4 header length that was already right).
    assert agreed["accepted"] > 4_500 and agreed["refused"] > 50_000, agreed
    assert set(stricter) == {"bytes after the IP packet", "bytes after the UDP datagram",
                             "IPv6 extension headers", "echo code not 0"}, stricter


def test_flow_key_reads_the_flow_as_the_relay_files_it():
    """The test-only view is the relay's flow key: protocol, the namespace's address and
    the destination, ports (echo: id and 0) and where the payload starts; None for a
    dropped packet."""
    flow_key = flowrelay._flowrelay.flow_key
    assert flow_key(udp_packet(sport=1000, dport=53)) == (17, NS_IP, HOST_IP, 1000, 53, 28)
    assert flow_key(echo_packet(ident=77, options=b"\x01" * 4)) == (1, NS_IP, HOST_IP, 77, 0,
                                                                    24)
    assert flow_key(echo6_packet(ident=5)) == (58, NS_IP6, HOST_IP6, 5, 0, 40)
    assert flow_key(udp6_packet(sport=9, dport=10)) == (17, NS_IP6, HOST_IP6, 9, 10, 48)
    assert flow_key(_flip(echo_packet(), 30)) is None
    with pytest.raises(TypeError):
        flow_key("not bytes")


# ---- the C relay, with a socketpair for the device and real ping sockets ------------------


class Harness:
    """A Relay reading ``device``; ``ns`` is the namespace's end of the socketpair.

    ``sockets`` supplies what ``new_flow`` returns, one per call (a socket is detached:
    the relay owns it), or -1 when empty; every call's packet is kept in ``asked``."""

    def __init__(self, host: str, idle_timeout: float = 60.0, max_flows: int = 64) -> None:
        self.host = host
        self.ns, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ns.settimeout(5)
        self.device.setblocking(False)
        self.sockets: list[Callable[[], int]] = []
        self.asked: list[bytes] = []
        self.errors: list[tuple[bytes, int]] = []
        self.servers: list[socket.socket] = []
        self.relay = flowrelay._flowrelay.Relay(self.device.fileno(), self._new_flow,
                                                self._on_error, idle_timeout, max_flows)

    def _new_flow(self, packet: bytes) -> int:
        self.asked.append(packet)
        return self.sockets.pop(0)() if self.sockets else -1

    def _on_error(self, quote: bytes, err: int) -> None:
        self.errors.append((quote, err))

    def ping_socket(self, dst: str = "192.0.2.1") -> Callable[[], int]:
        """A ping socket (IPv4 or IPv6, by ``dst``) connected to ``dst`` in the host."""
        def make() -> int:
            def inside() -> int:
                family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if ":" in dst
                                 else (socket.AF_INET, socket.IPPROTO_ICMP))
                sock = socket.socket(family, socket.SOCK_DGRAM, proto)
                sock.connect((dst, 0))
                return sock.detach()
            return int(in_netns(self.host, inside))  # type: ignore[arg-type]
        return make

    def udp_socket_to_closed_port(self) -> Callable[[], int]:
        def make() -> int:
            def inside() -> int:
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
                probe.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect(("127.0.0.1", port))
                return sock.detach()
            return int(in_netns(self.host, inside))  # type: ignore[arg-type]
        return make

    def udp_echo_socket(self, address: str = "192.0.2.1") -> Callable[[], int]:
        """A UDP socket connected to an echo server on ``address`` (IPv4 or IPv6) in
        the host namespace."""
        def make() -> int:
            def inside() -> tuple[socket.socket, int]:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                server = socket.socket(family, socket.SOCK_DGRAM)
                server.bind((address, 0))
                client = socket.socket(family, socket.SOCK_DGRAM)
                client.connect(server.getsockname()[:2])
                return server, client.detach()
            server, fd = in_netns(self.host, inside)  # type: ignore[misc]
            self.servers.append(server)
            threading.Thread(target=_echo_datagrams, args=(server,), daemon=True).start()
            return fd
        return make

    def close(self) -> None:
        self.relay.stop()
        self.ns.close()
        self.device.close()
        for server in self.servers:
            server.close()


@pytest.fixture
def harness(host: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: float) -> Harness:
        h = Harness(host, **kwargs)  # type: ignore[arg-type]
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def check_reply(reply: bytes, request: bytes) -> None:
    """``reply`` is the echo reply to ``request``, as a host would have sent it."""
    assert len(reply) == len(request), (reply, request)
    assert reply[0] == 0x45 and reply[9] == 1 and reply[8] == 64
    assert struct.unpack("!H", reply[2:4])[0] == len(reply)
    assert _sum(reply[:20]) == 0xFFFF, "IPv4 header checksum"
    assert reply[12:16] == request[16:20] and reply[16:20] == request[12:16]
    assert reply[20] == 0 and reply[21] == 0, "ICMP echo reply"
    assert _sum(reply[20:]) == 0xFFFF, "ICMP checksum"
    assert reply[24:] == request[24:], "id, sequence number and data kept"


def _echo_datagrams(server: socket.socket) -> None:
    """Send every datagram back to its sender until the socket is closed."""
    while True:
        try:
            data, peer = server.recvfrom(65536)
            server.sendto(data, peer)
        except OSError:
            return


def check_udp_reply(reply: bytes, request: bytes) -> None:
    """``reply`` is ``request``'s datagram echoed by the host: addresses and ports
    swapped, both checksums right, the payload unchanged."""
    assert len(reply) == len(request), (len(reply), len(request))
    assert reply[0] == 0x45 and reply[9] == 17 and reply[8] == 64
    assert _sum(reply[:20]) == 0xFFFF, "IPv4 header checksum"
    assert reply[12:16] == request[16:20] and reply[16:20] == request[12:16]
    assert reply[20:22] == request[22:24] and reply[22:24] == request[20:22], "ports"
    assert struct.unpack("!H", reply[24:26])[0] == len(reply) - 20
    pseudo = reply[12:20] + struct.pack("!BBH", 0, 17, len(reply) - 20)
    assert reply[26:28] != b"\0\0" and _sum(pseudo + reply[20:]) == 0xFFFF, "UDP checksum"
    assert reply[28:] == request[28:]


def fds_of_this_process() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_relay_answers_a_flow_and_asks_python_only_once(harness):
    h = harness()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    for seq in range(1, 4):
        request = echo_packet(seq=seq, payload=bytes(range(seq * 20)))
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 1 and h.asked[0] == echo_packet(seq=1, payload=bytes(range(20)))
    stats = h.relay.stats()
    assert stats["icmp_echo_requests"] == 3 and stats["icmp_echo_replies"] == 3
    assert stats["icmp_flows_opened"] == 1 and stats["icmp_flows_active"] == 1
    assert stats["rejected"] == {} and stats["callback_errors"] == 0


def test_relay_large_echo(harness):
    h = harness()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    request = echo_packet(payload=os.urandom(60000))
    h.ns.send(request)
    check_reply(h.ns.recv(65536), request)


def test_relay_udp_round_trips(harness):
    """Datagrams of one flow, small to the largest an IPv4 reply holds, sent by the host
    socket and echoed back; Python was asked once."""
    h = harness()
    h.sockets.append(h.udp_echo_socket())
    h.relay.start()
    for size in (0, 1, 1400, 9000, 65507):
        request = udp_packet(payload=os.urandom(size))
        h.ns.send(request)
        check_udp_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 1
    stats = h.relay.stats()
    assert stats["udp_datagrams_out"] == 5 and stats["udp_datagrams_in"] == 5
    assert stats["udp_bytes_out"] == stats["udp_bytes_in"] == 1 + 1400 + 9000 + 65507
    assert stats["udp_flows_opened"] == 1 and stats["icmp_flows_opened"] == 0


def test_relay_udp_flows_are_by_ports(harness):
    h = harness()
    h.sockets += [h.udp_echo_socket(), h.udp_echo_socket()]
    h.relay.start()
    first, second = udp_packet(sport=1000), udp_packet(sport=1001)
    for request in (first, second, first, second, udp_packet(sport=1000, checksum=False)):
        h.ns.send(request)
        check_udp_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 2 and h.relay.stats()["udp_flows_active"] == 2


def test_relay_udp_host_error_is_reported(harness):
    h = harness()
    h.sockets.append(h.udp_socket_to_closed_port())
    h.relay.start()
    request = udp_packet()
    h.ns.send(request)
    wait_until(lambda: h.errors, what="the error reported")
    assert h.errors[0] == (request, errno.ECONNREFUSED)


def test_relay_ipv6_echo_and_udp(harness):
    """IPv6: an echo flow through a ping socket and a UDP flow, each answered with an
    IPv6 header, the id or ports restored and the pseudo-header checksum right."""
    h = harness()
    h.sockets += [h.ping_socket("2001:db8::1"), h.udp_echo_socket("2001:db8::1")]
    h.relay.start()
    for request in (echo6_packet(seq=1), udp6_packet(payload=os.urandom(3000)),
                    echo6_packet(seq=2, payload=bytes(1000)), udp6_packet()):
        h.ns.send(request)
        check_reply6(h.ns.recv(65536), request)
    assert len(h.asked) == 2
    stats = h.relay.stats()
    assert stats["icmp_echo_replies"] == 2 and stats["udp_datagrams_in"] == 2


def test_relay_keeps_flows_apart(harness):
    """Two ids are two flows with two host sockets; each reply carries its own id."""
    h = harness()
    h.sockets += [h.ping_socket(), h.ping_socket("127.0.0.1")]
    h.relay.start()
    first, second = echo_packet(ident=1), echo_packet(ident=2, dst=bytes([127, 0, 0, 1]))
    for request in (first, second, first, second):
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 2 and h.relay.stats()["icmp_flows_active"] == 2


def test_relay_drops_what_python_refuses_and_bad_packets(harness):
    h = harness()
    h.relay.start()  # no sockets: new_flow answers -1 (a denial, written by Python)
    h.ns.send(echo_packet())
    h.ns.send(_flip(echo_packet(), 30))
    h.ns.send(echo_packet(proto=6))
    h.ns.send(b"\x70" + bytes(60))
    h.ns.send(b"\x45")
    wait_until(lambda: h.relay.stats()["frames_in"] == 5, what="the relay read all five")
    stats = h.relay.stats()
    assert len(h.asked) == 1  # only the well-formed request reached Python
    assert stats["icmp_flows_opened"] == 0 and stats["icmp_echo_replies"] == 0
    assert stats["rejected"] == {"bad checksum": 1, "other protocol": 1, "not ip": 1,
                                 "malformed": 1}
    h.ns.settimeout(0.3)
    with pytest.raises(TimeoutError):
        h.ns.recv(65536)


def test_relay_survives_hostile_packets(harness):
    """Forty thousand packets from a hostile namespace: mutations of valid echo requests
    and UDP datagrams (bytes flipped, cut short, lengths and header lengths rewritten,
    options, every protocol number) and random bytes.  The relay reads every one, never
    crashes, asks Python only about well-formed ones, and still answers a real ping."""
    h = harness()
    h.relay.start()  # new_flow answers -1 (refused): every accepted packet asks again
    sent = 0
    for packet in hostile_packets():
        h.ns.send(packet)
        sent += 1
    wait_until(lambda: h.relay.stats()["frames_in"] == sent, timeout=30,
               what="the relay read every packet")
    stats = h.relay.stats()
    classify = flowrelay._flowrelay.classify
    assert all(classify(p) in ("echo", "udp") for p in h.asked)  # only well-formed ones
    assert len([p for p in h.asked if p[9] == 1]) == stats["icmp_echo_requests"]
    assert sum(stats["rejected"].values()) + len(h.asked) == sent
    assert stats["callback_errors"] == 0
    h.sockets.append(h.ping_socket())
    request = echo_packet(ident=999)
    h.ns.send(request)
    check_reply(h.ns.recv(65536), request)


def test_relay_survives_a_failing_callback(harness, monkeypatch):
    """A callback that raises is reported (sys.unraisablehook, as Python reports errors
    it cannot raise), counted, and the packet dropped; the relay goes on."""
    reported: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_value))
    h = harness()

    def broken() -> int:
        raise RuntimeError("callback bug")

    h.sockets += [broken, h.ping_socket()]
    h.relay.start()
    h.ns.send(echo_packet(seq=1))
    wait_until(lambda: h.relay.stats()["callback_errors"] == 1, what="the error counted")
    assert len(reported) == 1 and str(reported[0]) == "callback bug"
    request = echo_packet(seq=2)
    h.ns.send(request)  # the flow is asked about again, and works
    check_reply(h.ns.recv(65536), request)


def test_relay_evicts_the_least_recently_used_flow(harness):
    h = harness(max_flows=2)
    h.sockets += [h.ping_socket() for _ in range(4)]
    h.relay.start()
    for ident in (1, 2, 1, 3):  # 2 is the least recently used when 3 arrives
        request = echo_packet(ident=ident)
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    stats = h.relay.stats()
    assert stats["icmp_flows_evicted"] == 1 and stats["icmp_flows_active"] == 2
    h.ns.send(echo_packet(ident=1))  # still a flow: no new question
    h.ns.recv(65536)
    assert len(h.asked) == 3
    h.ns.send(echo_packet(ident=2))  # evicted: asked again
    h.ns.recv(65536)
    assert len(h.asked) == 4


def test_relay_expires_idle_flows_and_closes_their_sockets(harness):
    before = fds_of_this_process()
    h = harness(idle_timeout=0.3)
    with_harness = fds_of_this_process()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    h.ns.send(echo_packet())
    h.ns.recv(65536)
    assert len(fds_of_this_process()) == len(with_harness) + 1  # the flow's ping socket
    wait_until(lambda: h.relay.stats()["icmp_flows_expired"] == 1, timeout=5, what="expiry")
    assert h.relay.stats()["icmp_flows_active"] == 0
    assert fds_of_this_process() == with_harness
    h.close()
    assert fds_of_this_process() == before


def test_relay_stop_closes_flow_sockets_and_is_idempotent(harness):
    h = harness()
    h.sockets += [h.ping_socket(), h.ping_socket()]
    with_harness = fds_of_this_process()
    h.relay.start()
    for ident in (1, 2):
        h.ns.send(echo_packet(ident=ident))
        h.ns.recv(65536)
    assert len(fds_of_this_process()) == len(with_harness) + 2
    h.relay.stop()
    h.relay.stop()
    assert len(fds_of_this_process()) == len(with_harness) - 2  # its epoll and eventfd too
    with pytest.raises(RuntimeError):
        h.relay.start()


def test_relay_reports_host_errors_with_the_request_quoted(harness):
    """An error queued on a flow's socket reaches on_error with the latest request (the
    namespace is then told by Python).  A UDP socket to a closed port makes a real one:
    the host's port unreachable comes back as ECONNREFUSED."""
    h = harness()
    h.sockets.append(h.udp_socket_to_closed_port())
    h.relay.start()
    request = echo_packet(seq=9)
    h.ns.send(request)
    wait_until(lambda: h.errors, what="the error reported")
    quote, err = h.errors[0]
    assert err == errno.ECONNREFUSED
    assert quote == request


# ---- the device and the routing rule ---------------------------------------------------


def test_setup_inside_routes_icmp_to_its_device_and_cleans_rp_filter(make_netns):
    """In a namespace whose rp_filter is strict (as a host may hand down), the setup
    switches it off for the relay's address-less device, adds the rule and the table;
    closing the device removes its routes."""
    from nsbridge.usernet.inside.netconf import RELAY_TABLE, NetConfig

    name = make_netns()
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                    "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1"],
                   check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    # At this step the sandbox's main device, nsb0, exists and holds the namespace's
    # address (a veth pair stands in for the tun: this kernel has no dummy links).
    subprocess.run(["ip", "-n", name, "link", "add", "nsb0", "type", "veth", "peer", "name",
                    "nsb0p"], check=True)
    subprocess.run(["ip", "-n", name, "addr", "add", "10.0.2.100/24", "dev", "nsb0"],
                   check=True)
    subprocess.run(["ip", "-n", name, "addr", "add", "fd00::100/64", "dev", "nsb0", "nodad"],
                   check=True)
    (fd,) = in_netns(name, lambda: flowrelay.setup_inside(NetConfig()))  # type: ignore[misc]
    try:
        def sysctl(key: str) -> str:
            return subprocess.run(["ip", "netns", "exec", name, "sysctl", "-n", key],
                                  capture_output=True, text=True, check=True).stdout.strip()

        for device in ("all", "nsb-relay", "nsb0"):
            assert sysctl(f"net.ipv4.conf.{device}.rp_filter") == "0", device
        rules = subprocess.run(["ip", "-n", name, "rule"], capture_output=True, text=True,
                               check=True).stdout
        assert f"100:\tfrom all ipproto icmp lookup {RELAY_TABLE}" in rules
        assert "101:\tfrom all ipproto udp dport 53 lookup main" in rules  # DNS: the engine
        assert f"102:\tfrom all ipproto udp lookup {RELAY_TABLE}" in rules
        rules6 = subprocess.run(["ip", "-n", name, "-6", "rule"], capture_output=True,
                                text=True, check=True).stdout
        assert f"100:\tfrom all ipproto ipv6-icmp lookup {RELAY_TABLE}" in rules6
        assert "101:\tfrom all ipproto udp dport 53 lookup main" in rules6
        assert f"102:\tfrom all ipproto udp lookup {RELAY_TABLE}" in rules6
        routes = subprocess.run(["ip", "-n", name, "route", "show", "table", str(RELAY_TABLE)],
                                capture_output=True, text=True, check=True).stdout
        assert "default dev nsb-relay" in routes
        addresses = subprocess.run(["ip", "-n", name, "-4", "addr", "show", "nsb-relay"],
                                   capture_output=True, text=True, check=True).stdout
        assert "inet " not in addresses  # no second copy of the namespace's address
    finally:
        os.close(fd)
    wait_until(lambda: "nsb-relay" not in subprocess.run(
        ["ip", "-n", name, "link"], capture_output=True, text=True).stdout, what="device gone")


# ---- nsbridge run, end to end ----------------------------------------------------------


def nsbridge_run(host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``nsbridge run ARGS`` in ``host``, whose own addresses (192.0.2.1, 2001:db8::1) stand
    for the outside here: host access opens them (closing them is usernet/test_host_access.py)."""
    return subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run",
                           "--allow-host-access", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_run_pings_through_the_native_relay(host):
    result = nsbridge_run(host, "-v", "--relay=native", "--", "ping", "-c", "3", "-i", "0.2",
                          "-W", "5", "192.0.2.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 received" in result.stdout
    assert "UDP and ping: native relay" in result.stderr
    assert "echo requests: 3" in result.stderr


def test_run_without_ping_sockets_leaves_ping_to_the_engine(host):
    """Where this user may not open ping sockets, the relay takes UDP only, and ping is
    the engine's (here through raw sockets: the test runs as root)."""
    subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=1 0"], check=True)
    result = nsbridge_run(host, "-vv", "--", "sh", "-c", "ping -c 2 -W 5 192.0.2.1 && ip rule")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout
    assert "ipproto icmp" not in result.stdout and "ipproto udp lookup" in result.stdout
    assert "UDP: native relay" in result.stderr and "ping_group_range" in result.stderr
    assert "through raw sockets" in result.stderr


def test_run_with_relay_engine_leaves_udp_and_ping_to_the_engine(host):
    result = nsbridge_run(host, "-v", "--relay=engine", "--", "sh", "-c",
                          "ping -c 2 -W 5 192.0.2.1 && ip rule")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout
    assert "ipproto" not in result.stdout and "native relay" not in result.stderr


def test_run_ipv6_through_the_native_relay(host):
    """Ping over IPv6 takes the relay too (its rules exist for both families), and
    --disable-ipv6 leaves the relay IPv4-only."""
    result = nsbridge_run(host, "-vv", "--relay=native", "--", "sh", "-c",
                          "ping -6 -c 2 -W 5 2001:db8::1 && ip -6 rule")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout and "ipproto ipv6-icmp lookup" in result.stdout
    assert "echo requests: 2" in result.stderr
    result = nsbridge_run(host, "--relay=native", "--disable-ipv6", "--", "sh", "-c",
                          "ip -6 rule 2>&1; ip rule")
    assert "ipproto ipv6-icmp" not in result.stdout and "ipproto icmp lookup" in result.stdout


def test_run_native_denial_unreachable_and_gateway(host):
    """What the engine answers, the native path answers alike: a policy denial
    (filtered), a network the host cannot reach (net unreachable, from connect), and
    the gateway, which is the host's loopback when allowed.  (Errors reported later on
    a flow's socket are tested on the relay above.)"""
    script = ("ping -c 1 -W 3 192.0.2.1; ping -c 1 -W 3 198.51.100.1; "
              "ping -c 2 -W 3 10.0.2.2")
    result = nsbridge_run(host, "--relay=native", "--deny", "icmp:192.0.2.1/32",
                          "--allow-host-loopback", "--", "sh", "-c", script)
    out = result.stdout
    blocks = out.split("--- ")
    assert "Packet filtered" in blocks[0] or "Communication prohibited" in blocks[0], out
    assert "Net Unreachable" in out.split("PING 198.51.100.1")[1].split("---")[0], out
    assert "2 received" in out.split("PING 10.0.2.2")[1], out


def test_native_is_refused_for_attach_with_a_reason(host):
    target = subprocess.Popen(["ip", "netns", "exec", host, "unshare", "-Urn", "sleep", "30"])
    try:
        ours = os.readlink("/proc/self/ns/user")

        def in_its_own_namespaces() -> bool:
            try:
                return os.readlink(f"/proc/{target.pid}/ns/user") != ours
            except OSError:
                return False

        wait_until(in_its_own_namespaces, what="the target's namespaces")
        result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge",
                                 "attach", "--relay=native", str(target.pid)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode != 0
        assert "--relay=native" in result.stderr and "nsbridge run" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        target.kill()
        target.wait()


def test_unknown_relay_mode_is_a_one_line_error(host):
    result = nsbridge_run(host, "--relay=fast", "--", "true")
    assert result.returncode == 2
    assert "--relay" in result.stderr and "native" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_refuses_an_unknown_relay_mode_before_anything_is_made():
    from nsbridge.usernet import api

    with pytest.raises(api.UserError, match=r"relay='fast'.*'native'"):
        api.options(relay="fast")


def test_run_udp_through_the_native_relay(host, tmp_path):
    """A UDP client inside, an echo server in the host namespace: every datagram back,
    intact; a closed port refused (ICMP port unreachable relayed); counted as UDP."""
    server = in_netns(host, lambda: _bound_udp("192.0.2.1"))
    threading.Thread(target=_echo_datagrams, args=(server,), daemon=True).start()
    port = server.getsockname()[1]  # type: ignore[union-attr]
    client = tmp_path / "client.py"
    client.write_text(
        "import os, socket, sys\n"
        f"port = {port}\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(5)\n"
        "s.connect(('192.0.2.1', port))\n"
        "for size in (1, 1400, 30000, 65000):\n"
        "    data = os.urandom(size)\n"
        "    s.send(data)\n"
        "    assert s.recv(65536) == data, size\n"
        "closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "closed.settimeout(5)\n"
        "closed.connect(('192.0.2.1', 9))\n"
        "closed.send(b'x')\n"
        "try:\n"
        "    closed.recv(10)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n")
    try:
        result = nsbridge_run(host, "-v", "--relay=native", "--", sys.executable, str(client))
    finally:
        server.close()  # type: ignore[union-attr]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused" in result.stdout
    assert "UDP flows: 2" in result.stderr


def test_run_rules_deleted_inside_fall_back_to_the_engine(host, tmp_path):
    """The command removes the relay's routing rules: its UDP and ping go out through
    nsb0 and the engine instead, still decided by the policy (a denied port stays
    denied)."""
    server = in_netns(host, lambda: _bound_udp("192.0.2.1"))
    threading.Thread(target=_echo_datagrams, args=(server,), daemon=True).start()
    port = server.getsockname()[1]  # type: ignore[union-attr]
    client = (f"import socket; s = socket.socket(2, 2); s.settimeout(5); "
              f"s.sendto(b'via the engine', ('192.0.2.1', {port})); print(s.recv(100))")
    script = ("ip rule del pref 100 && ip rule del pref 102 && "
              f"{sys.executable} -c \"{client}\" && ping -c 1 -W 5 192.0.2.1 >/dev/null && "
              "echo ping-ok; dig +short +time=2 +tries=1 @192.0.2.1 -p 9 example.org; true")
    try:
        result = nsbridge_run(host, "--relay=native", "--deny", "udp:192.0.2.1/32:9",
                              "-v", "--", "sh", "-c", script)
    finally:
        server.close()  # type: ignore[union-attr]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "b'via the engine'" in result.stdout and "ping-ok" in result.stdout
    assert "192.0.2.1:9 denied" in result.stderr  # the engine's policy, same answer
    assert "UDP flows: 1" in result.stderr


def _bound_udp(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


def test_api_stats_show_the_native_relay(host, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os\n"
        "from nsbridge.usernet import api\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "with api.run(['ping', '-c', '4', '-i', '0.2', '-W', '5', '192.0.2.1'],\n"
        "             stdout=os.open(os.devnull, os.O_WRONLY), allow_host_access=True) as p:\n"
        "    code = p.wait(timeout=30)\n"
        "    stats = p.stats()\n"
        "print(json.dumps({'code': code, 'engine': stats['engine']}))\n")
    result = subprocess.run(["ip", "netns", "exec", host, sys.executable, str(driver)],
                            capture_output=True, text=True, timeout=90, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    engine = out["engine"]
    assert out["code"] == 0
    assert engine["native"]["icmp_echo_requests"] == 4
    assert engine["native"]["icmp_echo_replies"] == 4
    assert engine["icmp_echo_requests"] == 4 and engine["icmp_echo_replies"] == 4
    assert engine["icmp_flows_total"] == 1

