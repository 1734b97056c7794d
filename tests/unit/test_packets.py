"""The sans-IO packet code: crafted frames in, values out — no devices, no sockets.

Checksums are checked against a deliberately naive RFC 1071 implementation written
here (word by word, end-around carry) and against published vectors; parsing is
checked for every malformation it must catch, and hypothesis throws random and
mutated frames at it to prove that hostile input never raises.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsbridge.usernet.proto.checksum import checksum, l4_checksum, ones_sum, pseudo_header_sum
from nsbridge.usernet.proto.packetbuild import (
    build_icmp_echo,
    build_icmp_echo_reply,
    build_icmp_error,
    build_icmp_time_exceeded,
    build_icmp_too_big,
    build_icmp_unreachable,
    build_udp,
    packed,
)
from nsbridge.usernet.proto.packets import (
    ICMP_DEST_UNREACH,
    MIN_MTU_V4,
    MIN_MTU_V6,
    NO_VNET,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    ICMPEcho,
    ICMPError,
    Malformed,
    Parsed,
    Unsupported,
    VirtioNetHdr,
    may_send_icmp_error,
    parse_frame,
    udp_datagrams,
)

NS4, GW4, DNS4 = (ipaddress.IPv4Address(a).packed for a in ("10.0.2.100", "10.0.2.2", "10.0.2.3"))
NS6, GW6 = (ipaddress.IPv6Address(a).packed for a in ("fd00::100", "fd00::2"))
REMOTE4 = ipaddress.IPv4Address("192.0.2.7").packed
REMOTE6 = ipaddress.IPv6Address("2001:db8::7").packed
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- an independent, straightforward reference ---------------------------------------


def ref_sum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: 16-bit words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def ref_pseudo(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    """The pseudo-header spelled out as bytes (RFC 768 / RFC 8200 8.1)."""
    if len(src) == 4:
        return src + dst + bytes([0, protocol]) + struct.pack("!H", length)
    return src + dst + struct.pack("!I", length) + bytes([0, 0, 0, protocol])


def ref_l4_valid(packet: bytes) -> bool:
    """Whether the L4 checksum of an IP packet (no virtio header) verifies."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        src, dst, protocol, segment = packet[12:16], packet[16:20], packet[9], packet[ihl:]
        if protocol == PROTO_ICMP:
            return ref_sum(segment) == 0xFFFF
    else:
        src, dst, protocol, segment = packet[8:24], packet[24:40], packet[6], packet[40:]
    return ref_sum(ref_pseudo(src, dst, protocol, len(segment)) + segment) == 0xFFFF


def kernel_finish(frame: bytes) -> bytes:
    """Do what the kernel does for NEEDS_CSUM: sum from csum_start, store complement."""
    vnet = VirtioNetHdr.unpack(frame)
    assert vnet is not None and vnet.needs_csum
    packet = bytearray(frame[VNET_HDR_LEN:])
    at = vnet.csum_start + vnet.csum_offset
    value = ref_checksum(bytes(packet[vnet.csum_start :]))
    packet[at : at + 2] = struct.pack("!H", value)
    return bytes(packet)


# ---- raw packet crafting (independent of the builders) --------------------------------


def ipv4(
    protocol: int,
    l4: bytes,
    *,
    src: bytes = NS4,
    dst: bytes = REMOTE4,
    frag: int = 0x4000,
    ihl: int = 5,
    total: int | None = None,
    options: bytes = b"",
) -> bytes:
    length = 20 + len(options) + len(l4) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, frag, 64, protocol, 0, src, dst)
    header += options
    header = header[:10] + struct.pack("!H", ref_checksum(header)) + header[12:]
    return header + l4


def ipv6(
    next_header: int,
    payload: bytes,
    *,
    src: bytes = NS6,
    dst: bytes = REMOTE6,
    plen: int | None = None,
) -> bytes:
    length = len(payload) if plen is None else plen
    return struct.pack("!IHBB16s16s", 0x60000000, length, next_header, 64, src, dst) + payload


def udp(src: bytes, dst: bytes, sport: int, dport: int, data: bytes, *, good: bool = True) -> bytes:
    header = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    value = ref_checksum(ref_pseudo(src, dst, PROTO_UDP, 8 + len(data)) + header + data) or 0xFFFF
    if not good:
        value ^= 0x5555
    return header[:6] + struct.pack("!H", value) + data


def tcp(
    src: bytes,
    dst: bytes,
    *,
    flags: int = TCP_SYN,
    options: bytes = b"",
    data: bytes = b"",
    offset: int | None = None,
    good: bool = True,
) -> bytes:
    words = (20 + len(options)) // 4 if offset is None else offset
    header = struct.pack("!HHIIBBHHH", 40000, 443, 1000, 2000, words << 4, flags, 65535, 0, 0)
    segment = header + options + data
    value = ref_checksum(ref_pseudo(src, dst, PROTO_TCP, len(segment)) + segment)
    if not good:
        value ^= 1
    return segment[:16] + struct.pack("!H", value) + segment[18:]


def icmp4(icmp_type: int, data: bytes, *, code: int = 0, word1: int = 7, word2: int = 1) -> bytes:
    header = struct.pack("!BBHHH", icmp_type, code, 0, word1, word2)
    value = ref_checksum(header + data)
    return header[:2] + struct.pack("!H", value) + header[4:] + data


def icmp6(icmp_type: int, data: bytes, *, src: bytes = NS6, dst: bytes = REMOTE6) -> bytes:
    header = struct.pack("!BBHHH", icmp_type, 0, 0, 7, 1)
    body = header + data
    value = ref_checksum(ref_pseudo(src, dst, PROTO_ICMPV6, len(body)) + body)
    return body[:2] + struct.pack("!H", value) + body[4:]


def frame(packet: bytes, vnet: VirtioNetHdr = NO_VNET) -> bytes:
    return vnet.pack() + packet


def udp4_packet(data: bytes = b"hello") -> bytes:
    return ipv4(PROTO_UDP, udp(NS4, REMOTE4, 40000, 53, data))


def udp6_packet(data: bytes = b"hello", *, ext: bytes = b"", first: int = PROTO_UDP) -> bytes:
    return ipv6(first, ext + udp(NS6, REMOTE6, 40000, 53, data))


def ext_header(next_header: int, *, length_units: int = 0, byte3: int = 0) -> bytes:
    """An IPv6 extension header of (length_units + 1) * 8 bytes."""
    size = (length_units + 1) * 8
    return bytes([next_header, length_units, 0, byte3]) + bytes(size - 4)


# ---- checksums ----------------------------------------------------------------------


def test_rfc1071_example() -> None:
    """RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2."""
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D


def test_known_ipv4_header_checksum() -> None:
    """The classic worked example (checksum b861)."""
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861
    with_checksum = header[:10] + b"\xb8\x61" + header[12:]
    assert ones_sum(with_checksum) == 0xFFFF


@pytest.mark.parametrize(
    "data",
    [b"", b"\0", b"\xff", b"\xff\xff", b"\0\0\0\0", b"\xff" * 4097, b"\xff\xfe\x00\x01", b"ab"],
    ids=["empty", "zero", "odd-ff", "ffff", "zeros", "big-odd", "sum-to-ffff", "ab"],
)
def test_checksum_edge_cases(data: bytes) -> None:
    assert ones_sum(data) == ref_sum(data)
    assert checksum(data) == ref_checksum(data)


@FAST
@given(st.binary(max_size=10000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert ones_sum(data) == ref_sum(data)
    assert ones_sum(bytearray(data)) == ones_sum(memoryview(data)) == ref_sum(data)


@FAST
@given(st.binary(min_size=1, max_size=3000), st.sampled_from([4, 16]))
def test_l4_checksum_matches_reference(segment: bytes, size: int) -> None:
    src, dst = bytes(range(size)), bytes(range(100, 100 + size))
    pseudo = ref_pseudo(src, dst, PROTO_UDP, len(segment))
    assert pseudo_header_sum(src, dst, PROTO_UDP, len(segment)) == ref_sum(pseudo)
    assert l4_checksum(src, dst, PROTO_UDP, segment) == ref_checksum(pseudo + segment)


def test_checksum_of_large_buffers() -> None:
    """The chunked path (over 4 KiB) agrees with the reference, odd lengths included."""
    data = bytes(range(256)) * 257
    for size in (4096, 4097, 8191, 65535, len(data)):
        assert ones_sum(data[:size]) == ref_sum(data[:size])


# ---- virtio_net_hdr -----------------------------------------------------------------


@FAST
@given(st.tuples(*[st.integers(0, 255)] * 2, *[st.integers(0, 0xFFFF)] * 4))
def test_vnet_round_trip(fields: tuple[int, ...]) -> None:
    header = VirtioNetHdr(*fields)
    data = header.pack()
    assert len(data) == VNET_HDR_LEN
    assert VirtioNetHdr.unpack(data) == header


def test_vnet_flags_and_truncation() -> None:
    assert VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM).needs_csum
    assert VirtioNetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID).data_valid
    assert VirtioNetHdr.unpack(b"\0" * 9) is None
    assert VirtioNetHdr.unpack(bytes(10)) is NO_VNET


# ---- round trips --------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [(GW4, NS4), (GW6, NS6)], ids=["v4", "v6"])
def test_udp_round_trip(src: bytes, dst: bytes) -> None:
    built = build_udp(src, dst, 53, 40000, b"answer")
    parsed = parse_frame(built)
    assert isinstance(parsed, Parsed)
    assert parsed.vnet is NO_VNET
    assert (parsed.ip.src, parsed.ip.dst, parsed.ip.protocol) == (src, dst, PROTO_UDP)
    assert (parsed.l4.sport, parsed.l4.dport, parsed.l4.payload) == (53, 40000, b"answer")
    assert ref_l4_valid(parsed.packet)
    assert parsed.packet == built[VNET_HDR_LEN:]


def test_builders_take_ipaddress_objects_and_text() -> None:
    a = build_udp(ipaddress.ip_address("10.0.2.2"), "10.0.2.100", 1, 2, b"x")
    b = build_udp(GW4, NS4, 1, 2, b"x")
    assert a == b
    with pytest.raises(ValueError, match="different IP versions"):
        build_udp(GW4, NS6, 1, 2, b"")
    with pytest.raises(ValueError, match="4 or 16 bytes"):
        packed(b"abc")


@pytest.mark.parametrize(("src", "dst"), [(GW4, NS4), (GW6, NS6)], ids=["v4", "v6"])
def test_udp_offload_leaves_pseudo_sum_for_kernel(src: bytes, dst: bytes) -> None:
    payload = bytes(range(256)) * 40
    built = build_udp(src, dst, 53, 40000, payload, offload=True)
    parsed = parse_frame(built)
    assert isinstance(parsed, Parsed)
    assert parsed.vnet.needs_csum
    assert parsed.vnet.csum_start == parsed.ip.header_length
    assert parsed.vnet.csum_offset == 6
    field = built[VNET_HDR_LEN + parsed.ip.header_length + 6 :][:2]
    assert int.from_bytes(field, "big") == pseudo_header_sum(src, dst, PROTO_UDP, 8 + len(payload))
    finished = kernel_finish(built)
    assert ref_l4_valid(finished)
    assert finished == build_udp(src, dst, 53, 40000, payload)[VNET_HDR_LEN:]


def test_udp_zero_checksum_is_sent_as_ffff() -> None:
    """A computed 0 must go out as 0xFFFF: 0 means "no checksum" (RFC 768)."""
    header = struct.pack("!HHHH", 1000, 9, 10, 0)
    partial = ref_sum(ref_pseudo(NS4, REMOTE4, PROTO_UDP, 10) + header)
    word = struct.pack("!H", 0xFFFF - partial)  # makes the sum 0xFFFF: checksum 0
    built = build_udp(NS4, REMOTE4, 1000, 9, word, vnet=False)
    assert built[26:28] == b"\xff\xff"
    assert ref_l4_valid(built)
    assert isinstance(parse_frame(built, vnet=False), Parsed)


def test_build_without_vnet_and_offload_needs_it() -> None:
    built = build_udp(GW4, NS4, 1, 2, b"x", vnet=False)
    assert built[0] >> 4 == 4
    assert isinstance(parse_frame(built, vnet=False), Parsed)
    with pytest.raises(ValueError, match="offload"):
        build_udp(GW4, NS4, 1, 2, b"x", vnet=False, offload=True)


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds 65535"):
        build_udp(GW4, NS4, 1, 2, bytes(65535 - 28 + 1))
    assert len(build_udp(GW4, NS4, 1, 2, bytes(65535 - 28), offload=True)) == 10 + 65535
    assert len(build_udp(GW6, NS6, 1, 2, bytes(65535 - 8), offload=True)) == 10 + 40 + 65535


@pytest.mark.parametrize(
    ("src", "dst", "protocol"),
    [(NS4, REMOTE4, PROTO_ICMP), (NS6, REMOTE6, PROTO_ICMPV6)],
    ids=["v4", "v6"],
)
def test_icmp_echo_round_trip(src: bytes, dst: bytes, protocol: int) -> None:
    request = parse_frame(build_icmp_echo(src, dst, 0x1234, 9, b"ping!", reply=False))
    assert isinstance(request, Parsed)
    assert request.ip.protocol == protocol
    assert request.l4 == ICMPEcho(False, 0x1234, 9, b"ping!")
    reply = parse_frame(build_icmp_echo_reply(request))
    assert isinstance(reply, Parsed)
    assert (reply.ip.src, reply.ip.dst) == (dst, src)
    assert reply.l4 == ICMPEcho(True, 0x1234, 9, b"ping!")
    assert ref_l4_valid(reply.packet)
    other = parse_frame(build_icmp_echo_reply(request, payload=b"from host"))
    assert isinstance(other, Parsed) and other.l4.payload == b"from host"
    with pytest.raises(ValueError, match="echo request"):
        build_icmp_echo_reply(reply)


@pytest.mark.parametrize(("src", "dst"), [(NS4, REMOTE4), (NS6, REMOTE6)], ids=["v4", "v6"])
def test_icmp_echo_offload(src: bytes, dst: bytes) -> None:
    built = build_icmp_echo(src, dst, 1, 2, bytes(60000), offload=True)
    assert ref_l4_valid(kernel_finish(built))


def test_parses_kernel_style_ipv4_options_and_padding() -> None:
    """IHL > 5 (options) is skipped; bytes after the total length are ignored."""
    packet = ipv4(PROTO_UDP, udp(NS4, REMOTE4, 1, 2, b"data"), ihl=6, options=b"\x01\x01\x01\x00")
    parsed = parse_frame(frame(packet) + b"\0" * 7)
    assert isinstance(parsed, Parsed)
    assert parsed.ip.header_length == 24 and parsed.l4.payload == b"data"
    assert parsed.packet == packet


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type) -> None:
    parsed = parse_frame(kind(frame(udp4_packet())))
    assert isinstance(parsed, Parsed)
    assert type(parsed.l4.payload) is bytes


# ---- TCP (parse only) ---------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [(NS4, REMOTE4), (NS6, REMOTE6)], ids=["v4", "v6"])
def test_tcp_header_fields(src: bytes, dst: bytes) -> None:
    options = b"\x02\x04\xff\xd7\x01\x03\x03\x07"  # MSS 65495, NOP, window scale 7
    segment = tcp(src, dst, flags=TCP_SYN | TCP_ACK, options=options, data=b"hi")
    packet = (
        ipv4(PROTO_TCP, segment, src=src, dst=dst)
        if len(src) == 4
        else ipv6(PROTO_TCP, segment, src=src, dst=dst)
    )
    parsed = parse_frame(frame(packet))
    assert isinstance(parsed, Parsed)
    header = parsed.l4
    assert (header.sport, header.dport, header.seq, header.ack) == (40000, 443, 1000, 2000)
    assert header.flags == TCP_SYN | TCP_ACK
    assert (header.header_length, header.options, header.payload) == (28, options, b"hi")
    assert header.window == 65535


def test_tcp_ns_flag() -> None:
    segment = bytearray(tcp(NS4, REMOTE4))
    segment[12] |= 1
    segment[16:18] = b"\0\0"
    segment[16:18] = struct.pack(
        "!H", ref_checksum(ref_pseudo(NS4, REMOTE4, PROTO_TCP, 20) + bytes(segment))
    )
    parsed = parse_frame(frame(ipv4(PROTO_TCP, bytes(segment))))
    assert isinstance(parsed, Parsed) and parsed.l4.flags == 0x100 | TCP_SYN


# ---- malformations ------------------------------------------------------------------


def _set(packet: bytes, at: int, value: bytes) -> bytes:
    return packet[:at] + value + packet[at + len(value) :]


def _ipv4_fixed(packet: bytes) -> bytes:
    """Recompute the IPv4 header checksum after editing a field."""
    ihl = (packet[0] & 15) * 4
    header = _set(packet[:ihl], 10, b"\0\0")
    return _set(header, 10, struct.pack("!H", ref_checksum(header))) + packet[ihl:]


GOOD4 = udp4_packet()
GOOD6 = udp6_packet()

MALFORMED = {
    "short vnet": (b"\0" * 5, "truncated virtio_net_hdr"),
    "vnet only": (bytes(10), "empty packet"),
    "version 5": (frame(b"\x50" + GOOD4[1:]), "bad ip version"),
    "version 0": (frame(bytes(40)), "bad ip version"),
    "short ipv4": (frame(GOOD4[:19]), "truncated ipv4 header"),
    "ihl 4": (frame(_ipv4_fixed(_set(GOOD4, 0, b"\x44"))), "bad ipv4 header length"),
    "ihl 0": (frame(_set(GOOD4, 0, b"\x40")), "bad ipv4 header length"),
    "ihl beyond frame": (frame(_set(GOOD4, 0, b"\x4f")[:40]), "truncated ipv4 header"),
    "total > frame": (frame(_ipv4_fixed(_set(GOOD4, 2, b"\x01\x00"))), "bad ipv4 total length"),
    "total < ihl": (frame(_ipv4_fixed(_set(GOOD4, 2, b"\x00\x10"))), "bad ipv4 total length"),
    "more fragments": (frame(ipv4(PROTO_UDP, b"x" * 16, frag=0x2000)), "fragment"),
    "fragment offset": (frame(ipv4(PROTO_UDP, b"x" * 16, frag=0x0001)), "fragment"),
    "df+offset": (frame(ipv4(PROTO_UDP, b"x" * 16, frag=0x4010)), "fragment"),
    "ipv4 checksum": (frame(_set(GOOD4, 8, b"\x3f")), "bad ipv4 header checksum"),
    "short udp": (frame(ipv4(PROTO_UDP, b"\0" * 7)), "truncated udp header"),
    "udp length < 8": (
        frame(ipv4(PROTO_UDP, struct.pack("!HHHH", 1, 2, 7, 0) + b"x")),
        "bad udp length",
    ),
    "udp length > ip": (
        frame(ipv4(PROTO_UDP, struct.pack("!HHHH", 1, 2, 30, 0) + b"x")),
        "bad udp length",
    ),
    "udp checksum v4": (
        frame(ipv4(PROTO_UDP, udp(NS4, REMOTE4, 1, 2, b"abc", good=False))),
        "bad udp checksum",
    ),
    "udp checksum v6": (
        frame(ipv6(PROTO_UDP, udp(NS6, REMOTE6, 1, 2, b"abc", good=False))),
        "bad udp checksum",
    ),
    "udp zero checksum v6": (
        frame(ipv6(PROTO_UDP, struct.pack("!HHHH", 1, 2, 11, 0) + b"abc")),
        "bad udp checksum",
    ),
    "short tcp": (frame(ipv4(PROTO_TCP, b"\0" * 19)), "truncated tcp header"),
    "tcp offset 4": (frame(ipv4(PROTO_TCP, tcp(NS4, REMOTE4, offset=4))), "bad tcp header length"),
    "tcp offset > segment": (
        frame(ipv4(PROTO_TCP, tcp(NS4, REMOTE4, offset=15))),
        "bad tcp header length",
    ),
    "tcp checksum": (frame(ipv4(PROTO_TCP, tcp(NS4, REMOTE4, good=False))), "bad tcp checksum"),
    "short icmp": (frame(ipv4(PROTO_ICMP, b"\x08\0\0\0")), "truncated icmp header"),
    "icmp checksum": (frame(ipv4(PROTO_ICMP, _set(icmp4(8, b"x"), 8, b"y"))), "bad icmp checksum"),
    "short icmpv6": (frame(ipv6(PROTO_ICMPV6, b"\x80\0\0\0")), "truncated icmpv6 header"),
    "icmpv6 checksum": (
        frame(ipv6(PROTO_ICMPV6, _set(icmp6(128, b"x"), 8, b"y"))),
        "bad icmpv6 checksum",
    ),
    "short ipv6": (frame(GOOD6[:39]), "truncated ipv6 header"),
    "ipv6 payload > frame": (frame(_set(GOOD6, 4, b"\x01\x00")), "bad ipv6 payload length"),
    "ipv6 fragment header": (frame(udp6_packet(ext=ext_header(PROTO_UDP), first=44)), "fragment"),
    "fragment after hop-by-hop": (
        frame(udp6_packet(ext=ext_header(44) + ext_header(PROTO_UDP), first=0)),
        "fragment",
    ),
    "hop-by-hop not first": (
        frame(udp6_packet(ext=ext_header(0) + ext_header(PROTO_UDP), first=60)),
        "misplaced hop-by-hop header",
    ),
    "ext header past payload": (
        frame(udp6_packet(ext=ext_header(PROTO_UDP, length_units=200)[:16], first=60)),
        "truncated ipv6 extension header",
    ),
    "ext header cut short": (frame(ipv6(60, b"\x11\x00\x00")), "truncated ipv6 extension header"),
    "too many ext headers": (
        frame(
            udp6_packet(ext=b"".join(ext_header(60) for _ in range(8)) + ext_header(17), first=60)
        ),
        "too many ipv6 extension headers",
    ),
    "vnet csum offsets outside": (
        frame(
            GOOD4, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=20, csum_offset=40)
        ),
        "bad virtio_net_hdr checksum offsets",
    ),
    "vnet csum start in ip header": (
        frame(GOOD4, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=4, csum_offset=6)),
        "bad virtio_net_hdr checksum offsets",
    ),
    "gso tcpv4 on udp": (
        frame(GOOD4, VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1000)),
        "bad virtio_net_hdr gso",
    ),
    "gso size 0": (
        frame(GOOD4, VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4)),
        "bad virtio_net_hdr gso",
    ),
}


@pytest.mark.parametrize(("data", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes, reason: str) -> None:
    assert parse_frame(data) == Malformed(reason)


UNSUPPORTED = {
    "gre": (frame(ipv4(47, b"\0" * 8)), "ip protocol 47"),
    "icmp over ipv6": (frame(ipv6(PROTO_ICMP, icmp4(8, b""))), "ip protocol 1"),
    "icmpv6 over ipv4": (frame(ipv4(PROTO_ICMPV6, icmp4(8, b""))), "ip protocol 58"),
    "no next header": (frame(ipv6(59, b"")), "ip protocol 59"),
    "icmp timestamp": (frame(ipv4(PROTO_ICMP, icmp4(13, bytes(12)))), "icmp type 13"),
    "neighbour solicitation": (frame(ipv6(PROTO_ICMPV6, icmp6(135, bytes(16)))), "icmpv6 type 135"),
    "routing header with segments left": (
        frame(udp6_packet(ext=ext_header(PROTO_UDP, length_units=2, byte3=1), first=43)),
        "ipv6 routing header with segments left",
    ),
    "legacy ufo": (
        frame(GOOD4, VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP, gso_size=1000)),
        "virtio gso type 3",
    ),
}


@pytest.mark.parametrize(("data", "reason"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported(data: bytes, reason: str) -> None:
    result = parse_frame(data)
    assert isinstance(result, Unsupported)
    assert result.reason == reason


def test_ipv6_extension_headers_are_skipped() -> None:
    ext = ext_header(43, length_units=1) + ext_header(60, length_units=2) + ext_header(PROTO_UDP)
    packet = udp6_packet(b"through", ext=ext, first=0)  # hop-by-hop, routing (0 left), dest
    parsed = parse_frame(frame(packet))
    assert isinstance(parsed, Parsed)
    assert parsed.ip.protocol == PROTO_UDP
    assert parsed.ip.header_length == 40 + 16 + 24 + 8
    assert parsed.l4.payload == b"through"


def test_ipv4_udp_without_checksum_is_accepted() -> None:
    segment = struct.pack("!HHHH", 1, 2, 11, 0) + b"abc"
    assert isinstance(parse_frame(frame(ipv4(PROTO_UDP, segment))), Parsed)


@pytest.mark.parametrize("flag", [VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID])
def test_partial_or_valid_checksums_are_not_checked(flag: int) -> None:
    """NEEDS_CSUM: the field holds only the pseudo-header sum; DATA_VALID: already checked."""
    bad = ipv4(PROTO_UDP, udp(NS4, REMOTE4, 1, 2, b"abc", good=False))
    vnet = VirtioNetHdr(flags=flag, csum_start=20, csum_offset=6)
    assert isinstance(parse_frame(frame(bad, vnet)), Parsed)
    assert parse_frame(frame(bad)) == Malformed("bad udp checksum")
    assert isinstance(parse_frame(frame(bad), verify=False), Parsed)


def test_udp_gso_super_packet_splits() -> None:
    payload = b"a" * 1000 + b"b" * 1000 + b"c" * 10
    packet = ipv4(PROTO_UDP, udp(NS4, REMOTE4, 1, 2, payload))
    vnet = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=1000)
    parsed = parse_frame(frame(packet, vnet))
    assert isinstance(parsed, Parsed)
    assert udp_datagrams(parsed) == [b"a" * 1000, b"b" * 1000, b"c" * 10]
    plain = parse_frame(frame(packet))
    assert isinstance(plain, Parsed) and udp_datagrams(plain) == [payload]


# ---- ICMP errors --------------------------------------------------------------------

UNREACH_CODES = {
    ("port", 4): 3,
    ("host", 4): 1,
    ("net", 4): 0,
    ("admin", 4): 13,
    ("port", 6): 4,
    ("host", 6): 3,
    ("net", 6): 0,
    ("admin", 6): 1,
}


@pytest.mark.parametrize(("kind", "version"), UNREACH_CODES.keys())
def test_unreachable_codes(kind: str, version: int) -> None:
    original = udp4_packet() if version == 4 else udp6_packet()
    result = parse_frame(build_icmp_unreachable(original, kind))  # type: ignore[arg-type]
    assert isinstance(result, Parsed)
    error = result.l4
    assert isinstance(error, ICMPError) and error.kind == "unreachable"
    assert error.type == (ICMP_DEST_UNREACH if version == 4 else 1)
    assert error.code == UNREACH_CODES[kind, version]
    assert error.quoted == original
    # from the original destination, to the original source
    assert (result.ip.src, result.ip.dst) == ((REMOTE4, NS4) if version == 4 else (REMOTE6, NS6))
    assert ref_l4_valid(result.packet)


def test_unreachable_from_given_source_and_bad_kind() -> None:
    result = parse_frame(build_icmp_unreachable(udp4_packet(), "admin", src=GW4))
    assert isinstance(result, Parsed) and result.ip.src == GW4
    with pytest.raises(ValueError, match="unknown unreachable kind"):
        build_icmp_unreachable(udp4_packet(), "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 packet"):
        build_icmp_error(b"\x45\0", 3, 3)


@pytest.mark.parametrize(
    ("original", "limit"),
    [(udp4_packet(bytes(5000)), MIN_MTU_V4), (udp6_packet(bytes(5000)), MIN_MTU_V6)],
    ids=["v4", "v6"],
)
def test_unreachable_quotes_up_to_minimum_mtu(original: bytes, limit: int) -> None:
    built = build_icmp_unreachable(original, "port")
    assert len(built) - VNET_HDR_LEN == limit
    result = parse_frame(built)
    assert isinstance(result, Parsed)
    header = 28 if limit == MIN_MTU_V4 else 48
    assert result.l4.quoted == original[: limit - header]


@pytest.mark.parametrize(("original", "v6"), [(udp4_packet(), False), (udp6_packet(), True)])
def test_too_big_and_time_exceeded(original: bytes, v6: bool) -> None:
    result = parse_frame(build_icmp_too_big(original, 1400))
    assert isinstance(result, Parsed)
    assert result.l4.kind == "too-big" and result.l4.mtu == 1400
    assert (result.l4.type, result.l4.code) == ((2, 0) if v6 else (3, 4))
    result = parse_frame(build_icmp_time_exceeded(original))
    assert isinstance(result, Parsed)
    assert result.l4.kind == "time-exceeded"
    assert result.l4.type == (3 if v6 else 11)


def test_may_send_icmp_error() -> None:
    def parsed(data: bytes) -> Parsed:
        result = parse_frame(frame(data))
        assert isinstance(result, Parsed)
        return result

    assert may_send_icmp_error(parsed(udp4_packet()))
    assert may_send_icmp_error(parsed(udp6_packet()))
    error = parse_frame(build_icmp_unreachable(udp4_packet(), "port"))
    assert isinstance(error, Parsed) and not may_send_icmp_error(error)
    multicast = b"\xe0\0\0\xfb"
    to_multicast = ipv4(PROTO_UDP, udp(NS4, multicast, 5353, 5353, b"q"), dst=multicast)
    assert not may_send_icmp_error(parsed(to_multicast))
    all_nodes = ipaddress.IPv6Address("ff02::1").packed
    to_all = ipv6(PROTO_UDP, udp(NS6, all_nodes, 1, 2, b"q", good=True), dst=all_nodes)
    assert not may_send_icmp_error(parsed(to_all))


# ---- property tests -----------------------------------------------------------------

addresses = st.sampled_from([(NS4, REMOTE4), (NS6, REMOTE6), (GW4, NS4), (GW6, NS6)])


@st.composite
def built_frames(draw: st.DrawFn) -> bytes:
    """Any frame the builders make, from random but valid arguments."""
    src, dst = draw(addresses)
    payload = draw(st.binary(max_size=2000))
    kind = draw(st.sampled_from(["udp", "echo", "unreachable", "too-big"]))
    if kind == "udp":
        ports = draw(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)))
        return build_udp(src, dst, *ports, payload, offload=draw(st.booleans()))
    if kind == "echo":
        ident, seq = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
        return build_icmp_echo(src, dst, ident, seq, payload, reply=draw(st.booleans()))
    original = build_udp(src, dst, 1, 2, payload)[VNET_HDR_LEN:]
    if kind == "unreachable":
        return build_icmp_unreachable(original, draw(st.sampled_from(["port", "host", "admin"])))
    return build_icmp_too_big(original, draw(st.integers(1280, 65535)))


def assert_clean(result: object) -> None:
    assert isinstance(result, Parsed | Malformed | Unsupported)
    if isinstance(result, Malformed):
        assert not result.reason.startswith("parser error"), result.reason


@FAST
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_never_raise(data: bytes, vnet: bool) -> None:
    assert_clean(parse_frame(data, vnet=vnet))


@FAST
@given(st.sampled_from([4, 6]), st.binary(max_size=120))
def test_random_bytes_behind_a_plausible_version(version: int, data: bytes) -> None:
    """Random bytes are mostly rejected at byte 0; this forces them into the IP parsers."""
    assert_clean(parse_frame(bytes([version << 4 | 5]) + data, vnet=False))
    assert_clean(parse_frame(bytes(VNET_HDR_LEN) + bytes([version << 4 | 5]) + data))


@FAST
@given(built_frames())
def test_built_frames_parse_with_valid_checksums(built: bytes) -> None:
    result = parse_frame(built)
    assert isinstance(result, Parsed), result
    packet = kernel_finish(built) if result.vnet.needs_csum else result.packet
    assert ref_sum(packet[: result.ip.header_length]) == 0xFFFF or result.ip.version == 6
    assert ref_l4_valid(packet)
    assert isinstance(parse_frame(packet, vnet=False), Parsed)


@FAST
@given(built_frames(), st.data())
def test_mutated_frames_never_raise(built: bytes, data: st.DataObject) -> None:
    mutated = bytearray(built)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "truncate", "extend", "byte"]))
        if how == "truncate":
            del mutated[data.draw(st.integers(0, len(mutated))) :]
        elif how == "extend":
            mutated += data.draw(st.binary(min_size=1, max_size=64))
        elif mutated:
            at = data.draw(st.integers(0, len(mutated) - 1))
            mutated[at] = mutated[at] ^ 0xFF if how == "flip" else data.draw(st.integers(0, 255))
    assert_clean(parse_frame(bytes(mutated)))
    assert_clean(parse_frame(bytes(mutated), verify=False))


@FAST
@given(st.sampled_from([(NS4, REMOTE4), (NS6, REMOTE6)]), st.binary(max_size=3000))
def test_unreachable_quotes_within_minimum_mtu(pair: tuple[bytes, bytes], payload: bytes) -> None:
    original = build_udp(*pair, 1000, 53, payload, vnet=False)
    limit = MIN_MTU_V4 if len(pair[0]) == 4 else MIN_MTU_V6
    built = build_icmp_unreachable(original, "port")
    assert len(built) - VNET_HDR_LEN <= limit
    result = parse_frame(built)
    assert isinstance(result, Parsed)
    quoted = result.l4.quoted
    assert original.startswith(quoted)
    assert len(quoted) == min(len(original), limit - result.ip.header_length - 8)
