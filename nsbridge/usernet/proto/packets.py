"""Tun frames as values: parse IPv4/IPv6 packets read from the tun device, sans-IO.

The namespace's tun device is opened with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR``, so
every frame read from it or written to it is a 10-byte ``virtio_net_hdr`` followed by an
IP packet.  :func:`parse_frame` turns such a frame into a :class:`Parsed` value (or a
:class:`Malformed` / :class:`Unsupported` one saying why it is dropped); the ``build_*``
functions of :mod:`.packetbuild` make reply frames from the same values and constants.
Nothing here does I/O.

Design choices, and why:

* **Addresses are packed bytes** (4 bytes for IPv4, 16 for IPv6), never ``ipaddress``
  objects, on the per-packet path: slicing is free, they hash fast as flow-table keys and
  feed the checksum directly.  ``ipaddress.ip_address(packed)`` converts once per new
  flow (for the policy).  Builders also accept ``ipaddress`` objects for convenience.
* **Hostile input never raises.**  The namespace runs arbitrary code; every length is
  bounds-checked and a bad frame becomes ``Malformed(reason)`` with a short stable
  reason that the engine counts.  A last-resort ``except`` turns a parser bug into
  ``Malformed("parser error: …")`` rather than killing the engine; the tests assert it
  never happens.
* **No reassembly.**  Fragments (IPv4 MF or offset != 0, the IPv6 fragment header) are
  ``Malformed("fragment")``: the namespace's MTU is 65520, so its own stack never needs
  to fragment what it sends, and reassembly buffers are a memory-exhaustion target.
* **Checksums** are :mod:`.checksum`'s; big payloads are never summed in Python
  (the builders of :mod:`.packetbuild` can leave them to the kernel).
* **Partial checksums from the kernel are not validated.**  With ``TUNSETOFFLOAD``
  (``TUN_F_CSUM``) the kernel hands us TCP/UDP packets with ``NEEDS_CSUM`` set: the L4
  checksum field then holds only the pseudo-header sum, and validating it would reject
  every good packet.  Likewise ``DATA_VALID`` means the kernel has verified it already.
  Only frames with neither flag have their L4 checksum checked.  (Frames read from tun
  were made by the namespace's kernel, which the namespace cannot make lie about the
  header; the IPv4 header checksum is never offloaded and always checked.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal, final

from nsbridge.usernet.proto.checksum import fold, ones_sum, pseudo_header_sum

# ---- constants ----------------------------------------------------------------------

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3  # legacy UFO: IP fragmentation offload, not supported
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

MIN_MTU_V4 = 576  # RFC 1122: an ICMPv4 error never exceeds this
MIN_MTU_V6 = 1280  # RFC 8200 / RFC 4443: an ICMPv6 error never exceeds this

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_ECHO = 128
ICMPV6_ECHO_REPLY = 129

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

UnreachableKind = Literal["port", "host", "net", "admin"]
ICMPErrorKind = Literal["unreachable", "time-exceeded", "too-big"]

_IPV6_EXT_SKIPPABLE = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_MAX_EXT_HEADERS = 8
_CSUM_OFFSETS = {PROTO_UDP: 6, PROTO_TCP: 16, PROTO_ICMP: 2, PROTO_ICMPV6: 2}

_VNET = struct.Struct("=BBHHHH")  # legacy virtio_net_hdr: guest-native byte order
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")  # type, code, checksum, id/unused, seq/mtu
_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")

# ---- checksums ----------------------------------------------------------------------

# ---- virtio_net_hdr -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    """The 10-byte legacy ``struct virtio_net_hdr`` before every tun frame.

    Fields are in the host's byte order (legacy virtio is guest-native; tun on a
    little-endian host is little-endian unless ``TUNSETVNETBE`` is used).
    ``csum_start`` counts from the start of the IP packet, not the virtio header.
    """

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        """The L4 checksum is partial: the field holds the pseudo-header sum only."""
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        """The kernel has already verified the checksum."""
        return bool(self.flags & VIRTIO_NET_HDR_F_DATA_VALID)

    def pack(self) -> bytes:
        """The 10 bytes to write before an IP packet."""
        if self is NO_VNET:
            return _NO_VNET_BYTES
        return _VNET.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @classmethod
    def unpack(cls, frame: bytes) -> VirtioNetHdr | None:
        """The header at the start of ``frame``; None when the frame is shorter."""
        if len(frame) < VNET_HDR_LEN:
            return None
        fields = _VNET.unpack_from(frame)
        if fields == (0, 0, 0, 0, 0, 0):
            return NO_VNET
        return cls(*fields)


NO_VNET = VirtioNetHdr()
_NO_VNET_BYTES = bytes(VNET_HDR_LEN)


def partial_csum_vnet(ip_header_length: int, protocol: int) -> VirtioNetHdr:
    """A header asking the kernel to finish the L4 checksum (``NEEDS_CSUM``).

    The checksum field must then hold the folded pseudo-header sum (0 for ICMPv4, which
    has no pseudo-header).  The kernel sums from ``csum_start`` to the end of the packet
    and stores the complement at ``csum_start + csum_offset`` — or, for packets
    delivered locally, simply trusts the packet (``CHECKSUM_PARTIAL`` counts as checked).
    """
    return VirtioNetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start=ip_header_length,
        csum_offset=_CSUM_OFFSETS[protocol],
    )


# ---- parse results ------------------------------------------------------------------


@dataclass(slots=True)
class IPHeader:
    """The parts of an IPv4 or IPv6 header the engine uses.

    ``header_length`` includes IPv4 options and skipped IPv6 extension headers: it is
    where the L4 header starts.  ``ttl`` is the IPv6 hop limit for IPv6.
    """

    version: int
    src: bytes
    dst: bytes
    protocol: int
    ttl: int
    header_length: int
    total_length: int
    tos: int = 0


@dataclass(slots=True)
class UDP:
    """A UDP datagram.  With ``gso_type`` UDP_L4 the payload holds several datagrams."""

    sport: int
    dport: int
    payload: bytes


@dataclass(slots=True)
class ICMPEcho:
    """An ICMP or ICMPv6 echo request (``reply`` False) or echo reply."""

    reply: bool
    ident: int
    seq: int
    payload: bytes


@dataclass(slots=True)
class ICMPError:
    """Destination unreachable, time exceeded or packet too big (v4: frag needed).

    ``quoted`` is the start of the offending packet; ``mtu`` is set for "too big"
    (ICMPv6 type 2, ICMPv4 type 3 code 4) and 0 otherwise.
    """

    kind: ICMPErrorKind
    type: int
    code: int
    mtu: int
    quoted: bytes


@dataclass(slots=True)
class TCP:
    """A TCP header (parse only; termination lives elsewhere).  ``flags`` has NS as 0x100."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int
    header_length: int
    options: bytes
    payload: bytes


L4 = UDP | ICMPEcho | ICMPError | TCP


@final  # the engine tells results apart by exact type (type(r) is Parsed), for speed
@dataclass(slots=True)
class Parsed:
    """A frame that passed every check.  ``frame``/``ip_offset`` locate the IP packet."""

    vnet: VirtioNetHdr
    ip: IPHeader
    l4: L4
    frame: bytes = field(repr=False)
    ip_offset: int

    @property
    def packet(self) -> bytes:
        """The IP packet (header and payload, trailing padding removed), e.g. to quote."""
        return self.frame[self.ip_offset : self.ip_offset + self.ip.total_length]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that is broken or hostile; ``reason`` is short and stable, for counters."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A well-formed packet we do not handle (other protocols, neighbour discovery…)."""

    reason: str
    ip: IPHeader | None = None


ParseResult = Parsed | Malformed | Unsupported


class _Drop(Exception):
    """Internal: unwinds the parser with a Malformed or Unsupported result."""

    def __init__(self, result: Malformed | Unsupported) -> None:
        super().__init__(result.reason)
        self.result = result


def _malformed(reason: str) -> _Drop:
    return _Drop(Malformed(reason))


# ---- parsing ------------------------------------------------------------------------


def parse_frame(
    frame: bytes | bytearray | memoryview, *, vnet: bool = True, verify: bool = True
) -> ParseResult:
    """Parse one tun frame; never raises.

    ``vnet`` says the frame starts with a virtio_net_hdr (the tun was opened with
    ``IFF_VNET_HDR``).  ``verify`` checks checksums (the IPv4 header's always, L4 ones
    unless the header says ``NEEDS_CSUM`` or ``DATA_VALID``).  Bytes after the IP
    packet's own length are ignored.
    """
    data = frame if type(frame) is bytes else bytes(frame)
    try:
        return _parse(data, vnet, verify)
    except _Drop as drop:
        return drop.result
    except Exception as exc:  # a parser bug must not take the engine down
        return Malformed(f"parser error: {type(exc).__name__}")


def _parse(frame: bytes, vnet: bool, verify: bool) -> Parsed:
    offset = 0
    header = NO_VNET
    if vnet:
        unpacked = VirtioNetHdr.unpack(frame)
        if unpacked is None:
            raise _malformed("truncated virtio_net_hdr")
        header, offset = unpacked, VNET_HDR_LEN
    if len(frame) <= offset:
        raise _malformed("empty packet")
    version = frame[offset] >> 4
    if version == 4:
        ip = _parse_ipv4(frame, offset, verify)
    elif version == 6:
        ip = _parse_ipv6(frame, offset)
    else:
        raise _malformed("bad ip version")
    _check_vnet(header, ip)
    l4 = _parse_l4(frame, offset, ip, verify and not (header.flags & _TRUSTED))
    return Parsed(header, ip, l4, frame, offset)


_TRUSTED = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID


def _parse_ipv4(frame: bytes, offset: int, verify: bool) -> IPHeader:
    available = len(frame) - offset
    if available < 20:
        raise _malformed("truncated ipv4 header")
    ver_ihl, tos, total, _ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(
        frame, offset
    )
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20:
        raise _malformed("bad ipv4 header length")
    if ihl > available:
        raise _malformed("truncated ipv4 header")
    if total < ihl or total > available:
        raise _malformed("bad ipv4 total length")
    if frag & 0x3FFF:  # MF flag or a fragment offset
        raise _malformed("fragment")
    if verify and ones_sum(frame[offset : offset + ihl]) != 0xFFFF:
        raise _malformed("bad ipv4 header checksum")
    return IPHeader(4, src, dst, proto, ttl, ihl, total, tos)


def _parse_ipv6(frame: bytes, offset: int) -> IPHeader:
    available = len(frame) - offset
    if available < 40:
        raise _malformed("truncated ipv6 header")
    vtcfl, payload_length, next_header, hop_limit, src, dst = _IPV6.unpack_from(frame, offset)
    total = 40 + payload_length
    if total > available:
        raise _malformed("bad ipv6 payload length")
    header_length, protocol = _skip_ipv6_extensions(frame, offset, total, next_header)
    return IPHeader(6, src, dst, protocol, hop_limit, header_length, total, (vtcfl >> 20) & 0xFF)


def _skip_ipv6_extensions(
    frame: bytes, offset: int, total: int, next_header: int
) -> tuple[int, int]:
    """Walk hop-by-hop, routing and destination-options headers.

    Returns the L4 header's offset in the packet and its protocol number.  Each header
    is at least 8 bytes and bounds-checked against the payload length, and there are at
    most eight.  A routing header that still has segments left would send the packet
    elsewhere than its destination address says: we do not route, so that is
    Unsupported.  IPv6 jumbograms (payload length 0 + hop-by-hop option, "BIG TCP")
    fail the length checks: the engine must not raise the tun's GSO limit above 64 KiB.
    """
    position = 40
    count = 0
    while next_header in _IPV6_EXT_SKIPPABLE:
        if next_header == 0 and count:
            raise _malformed("misplaced hop-by-hop header")
        count += 1
        if count > _MAX_EXT_HEADERS:
            raise _malformed("too many ipv6 extension headers")
        if position + 8 > total:
            raise _malformed("truncated ipv6 extension header")
        start = offset + position
        length = (frame[start + 1] + 1) * 8
        if position + length > total:
            raise _malformed("truncated ipv6 extension header")
        if next_header == 43 and frame[start + 3]:
            raise _Drop(Unsupported("ipv6 routing header with segments left"))
        next_header = frame[start]
        position += length
    if next_header == _IPV6_FRAGMENT:
        raise _malformed("fragment")
    return position, next_header


def _check_vnet(header: VirtioNetHdr, ip: IPHeader) -> None:
    """Offsets in the virtio header must lie inside the packet; GSO must match it."""
    if header is NO_VNET:
        return
    if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and (
        header.csum_start < ip.header_length
        or header.csum_start + header.csum_offset + 2 > ip.total_length
    ):
        raise _malformed("bad virtio_net_hdr checksum offsets")
    gso = header.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        return
    expected = {
        VIRTIO_NET_HDR_GSO_TCPV4: (4, PROTO_TCP),
        VIRTIO_NET_HDR_GSO_TCPV6: (6, PROTO_TCP),
        VIRTIO_NET_HDR_GSO_UDP_L4: (ip.version, PROTO_UDP),
    }.get(gso)
    if expected is None:
        if gso == VIRTIO_NET_HDR_GSO_UDP:  # legacy UFO: real, but never negotiated here
            raise _Drop(Unsupported(f"virtio gso type {header.gso_type}", ip))
        # Anything else is not a virtio type at all.  One counter for all of them: a
        # hostile namespace must not grow the counter table with 250 made-up types.
        raise _malformed("bad virtio_net_hdr gso type")
    if expected != (ip.version, ip.protocol) or header.gso_size == 0:
        raise _malformed("bad virtio_net_hdr gso")


def _parse_l4(frame: bytes, offset: int, ip: IPHeader, verify: bool) -> L4:
    start = offset + ip.header_length
    segment = frame[start : offset + ip.total_length]
    protocol = ip.protocol
    if protocol == PROTO_UDP:
        return _parse_udp(segment, ip, verify)
    if protocol == PROTO_TCP:
        return _parse_tcp(segment, ip, verify)
    if protocol == PROTO_ICMP and ip.version == 4:
        return _parse_icmpv4(segment, ip, verify)
    if protocol == PROTO_ICMPV6 and ip.version == 6:
        return _parse_icmpv6(segment, ip, verify)
    raise _Drop(Unsupported(f"ip protocol {protocol}", ip))


def _pseudo_ok(segment: bytes, ip: IPHeader, protocol: int) -> bool:
    partial = pseudo_header_sum(ip.src, ip.dst, protocol, len(segment))
    return fold(partial + ones_sum(segment)) == 0xFFFF


def _parse_udp(segment: bytes, ip: IPHeader, verify: bool) -> UDP:
    if len(segment) < 8:
        raise _malformed("truncated udp header")
    sport, dport, length, csum = _UDP.unpack_from(segment)
    if length < 8 or length > len(segment):
        raise _malformed("bad udp length")
    datagram = segment[:length] if length < len(segment) else segment
    if verify and (csum or ip.version == 6) and not _pseudo_ok(datagram, ip, PROTO_UDP):
        # IPv4 may omit the checksum (0); IPv6 may not (RFC 8200 section 8.1).
        raise _malformed("bad udp checksum")
    return UDP(sport, dport, datagram[8:])


def _parse_tcp(segment: bytes, ip: IPHeader, verify: bool) -> TCP:
    if len(segment) < 20:
        raise _malformed("truncated tcp header")
    sport, dport, seq, ack, offset_ns, flags, window, _csum, urgent = _TCP.unpack_from(segment)
    header_length = (offset_ns >> 4) * 4
    if header_length < 20 or header_length > len(segment):
        raise _malformed("bad tcp header length")
    if verify and not _pseudo_ok(segment, ip, PROTO_TCP):
        raise _malformed("bad tcp checksum")
    return TCP(
        sport,
        dport,
        seq,
        ack,
        flags | (offset_ns & 1) << 8,
        window,
        urgent,
        header_length,
        segment[20:header_length],
        segment[header_length:],
    )


def _parse_icmpv4(segment: bytes, ip: IPHeader, verify: bool) -> L4:
    if len(segment) < 8:
        raise _malformed("truncated icmp header")
    if verify and ones_sum(segment) != 0xFFFF:
        raise _malformed("bad icmp checksum")
    icmp_type, code, _csum, word1, word2 = _ICMP.unpack_from(segment)
    if icmp_type in (ICMP_ECHO, ICMP_ECHO_REPLY):
        return ICMPEcho(icmp_type == ICMP_ECHO_REPLY, word1, word2, segment[8:])
    if icmp_type == ICMP_DEST_UNREACH:
        too_big = code == 4
        kind: ICMPErrorKind = "too-big" if too_big else "unreachable"
        return ICMPError(kind, icmp_type, code, word2 if too_big else 0, segment[8:])
    if icmp_type == ICMP_TIME_EXCEEDED:
        return ICMPError("time-exceeded", icmp_type, code, 0, segment[8:])
    raise _Drop(Unsupported(f"icmp type {icmp_type}", ip))


def _parse_icmpv6(segment: bytes, ip: IPHeader, verify: bool) -> L4:
    if len(segment) < 8:
        raise _malformed("truncated icmpv6 header")
    if verify and not _pseudo_ok(segment, ip, PROTO_ICMPV6):
        raise _malformed("bad icmpv6 checksum")
    icmp_type, code, _csum, word1, word2 = _ICMP.unpack_from(segment)
    if icmp_type in (ICMPV6_ECHO, ICMPV6_ECHO_REPLY):
        return ICMPEcho(icmp_type == ICMPV6_ECHO_REPLY, word1, word2, segment[8:])
    if icmp_type == ICMPV6_DEST_UNREACH:
        return ICMPError("unreachable", icmp_type, code, 0, segment[8:])
    if icmp_type == ICMPV6_PACKET_TOO_BIG:
        return ICMPError("too-big", icmp_type, code, word1 << 16 | word2, segment[8:])
    if icmp_type == ICMPV6_TIME_EXCEEDED:
        return ICMPError("time-exceeded", icmp_type, code, 0, segment[8:])
    # 133-137 (neighbour discovery) and 143 (MLDv2) are normal on tun; nothing to do.
    raise _Drop(Unsupported(f"icmpv6 type {icmp_type}", ip))


def udp_datagrams(parsed: Parsed) -> list[bytes]:
    """The datagrams of a UDP frame: one, or several for a UDP_L4 GSO super-packet.

    With ``TUN_F_USO4/6`` offload the kernel may hand over one frame whose payload is
    many datagrams of ``gso_size`` bytes each (the last may be shorter).
    """
    assert isinstance(parsed.l4, UDP)
    payload = parsed.l4.payload
    vnet = parsed.vnet
    if vnet.gso_type & ~VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_UDP_L4:
        return [payload]
    size = vnet.gso_size
    return [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]


def may_send_icmp_error(parsed: Parsed) -> bool:
    """Whether an ICMP error about this packet is allowed (RFC 1122 3.2.2, RFC 4443 2.4).

    Never about an ICMP error, nor to or from multicast/broadcast/unspecified
    addresses: that is how error storms and amplification start.
    """
    if isinstance(parsed.l4, ICMPError):
        return False
    src, dst = parsed.ip.src, parsed.ip.dst
    if parsed.ip.version == 4:
        return not (dst[0] >= 224 or src[0] >= 224 or src == b"\0\0\0\0")
    return not (dst[0] == 0xFF or src[0] == 0xFF or src == bytes(16))
