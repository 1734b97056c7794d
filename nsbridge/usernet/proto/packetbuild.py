"""Tun frames built from values: UDP, TCP heads and resets, ICMP echo and errors, sans-IO.

The counterpart of :mod:`.packets` (which parses): every reply the host side writes to
the namespace's tun device is made here.  Each builder returns the whole frame (the
virtio-net header unless ``vnet=False``, then the IP header, the L4 header and the
payload), except :func:`build_tcp_head`, which stops before the payload so the tun TCP
path can ``writev`` a payload peeked from a host socket without joining it into a new
frame.

* **Checksums**: with ``offload=True`` the L4 checksum field holds the pseudo-header
  sum and the virtio header asks the kernel to finish it (``NEEDS_CSUM``), so Python
  never sums a large payload; without it the sum is computed here.  ICMP errors and
  resets are always summed here: they are small.
* **IPv4 headers** carry DF and ident 0 (an RFC 6864 atomic datagram); the header
  checksum is always computed (the kernel never offloads it).
* Addresses are packed bytes, ``ipaddress`` objects or text (:func:`packed`).
"""

from __future__ import annotations

import ipaddress

from nsbridge.usernet.proto.checksum import checksum, fold, ones_sum, pseudo_header_sum
from nsbridge.usernet.proto.packets import (
    _CSUM_OFFSETS,
    _ICMP,
    _IPV4,
    _IPV6,
    _TCP,
    _U16,
    _UDP,
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO,
    ICMPV6_ECHO_REPLY,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
    MIN_MTU_V4,
    MIN_MTU_V6,
    NO_VNET,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    ICMPEcho,
    Parsed,
    UnreachableKind,
    VirtioNetHdr,
    partial_csum_vnet,
)

# ICMP codes per kind: (IPv4 type-3 code, ICMPv6 type-1 code).
_UNREACH_CODES: dict[str, tuple[int, int]] = {
    "net": (0, 0),  # v6: no route to destination
    "host": (1, 3),  # v6: address unreachable
    "port": (3, 4),
    "admin": (13, 1),  # v4: communication administratively prohibited
}

Address = bytes | ipaddress.IPv4Address | ipaddress.IPv6Address


def packed(address: Address | str) -> bytes:
    """Packed bytes for an address given as bytes, an ``ipaddress`` object or text."""
    if type(address) is bytes:
        if len(address) not in (4, 16):
            raise ValueError(f"packed address must be 4 or 16 bytes, not {len(address)}")
        return address
    if isinstance(address, str):
        return ipaddress.ip_address(address).packed
    return address.packed  # type: ignore[union-attr]


def _ip_header(src: bytes, dst: bytes, protocol: int, l4_length: int, ttl: int) -> bytes:
    """An IPv4 (DF set, ident 0: RFC 6864 atomic datagram) or IPv6 header."""
    if len(src) != len(dst):
        raise ValueError("source and destination are different IP versions")
    if len(src) == 4:
        total = 20 + l4_length
        if total > 0xFFFF:
            raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
        header = _IPV4.pack(0x45, 0, total, 0, 0x4000, ttl, protocol, 0, src, dst)
        return header[:10] + _U16.pack(checksum(header)) + header[12:]
    if l4_length > 0xFFFF:
        raise ValueError(f"IPv6 payload of {l4_length} bytes exceeds 65535")
    return _IPV6.pack(0x60000000, l4_length, protocol, ttl, src, dst)


def _assemble(
    src: bytes,
    dst: bytes,
    protocol: int,
    l4_header: bytes,
    payload: bytes,
    *,
    ttl: int,
    offload: bool,
    vnet: bool,
) -> bytes:
    """Frame = virtio header + IP header + L4 header (checksum filled in) + payload.

    ``l4_header`` has an even length and a zero checksum field at the protocol's usual
    offset.  With ``offload`` the field gets the pseudo-header sum and the virtio header
    asks the kernel to finish; otherwise Python computes the full checksum.
    """
    ip = _ip_header(src, dst, protocol, len(l4_header) + len(payload), ttl)
    length = len(l4_header) + len(payload)
    has_pseudo = protocol != PROTO_ICMP
    partial = pseudo_header_sum(src, dst, protocol, length) if has_pseudo else 0
    if offload:
        field = partial
        header = partial_csum_vnet(len(ip), protocol)
    else:
        field = ~fold(partial + ones_sum(l4_header) + ones_sum(payload)) & 0xFFFF
        if field == 0 and protocol == PROTO_UDP:
            field = 0xFFFF  # 0 would mean "no checksum" (RFC 768)
        header = NO_VNET
    at = _CSUM_OFFSETS[protocol]
    l4_header = l4_header[:at] + _U16.pack(field) + l4_header[at + 2 :]
    parts = [ip, l4_header, payload]
    if vnet:
        parts.insert(0, header.pack())
    elif offload:
        raise ValueError("offload needs the virtio_net_hdr (vnet=True)")
    return b"".join(parts)


def build_udp(
    src_ip: Address,
    dst_ip: Address,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    ttl: int = 64,
    offload: bool = False,
    vnet: bool = True,
) -> bytes:
    """A UDP datagram as a tun frame (virtio header unless ``vnet=False``).

    ``offload=True`` leaves the checksum to the kernel (``NEEDS_CSUM``): use it for
    anything larger than a few hundred bytes.  Raises ValueError when the datagram
    does not fit the IP length field.
    """
    src, dst = packed(src_ip), packed(dst_ip)
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes exceeds 65535")
    header = _UDP.pack(sport, dport, length, 0)
    return _assemble(src, dst, PROTO_UDP, header, payload, ttl=ttl, offload=offload, vnet=vnet)


def build_tcp_head(
    src_ip: Address,
    dst_ip: Address,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    *,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    mss: int = 0,
    ttl: int = 64,
    offload: bool = False,
    vnet: bool = True,
) -> bytes:
    """Everything of a TCP frame that comes before its payload (virtio, IP, TCP headers).

    The tun TCP path writes ``os.writev(tun, [head, payload])``: a 64 KiB payload peeked
    from a host socket goes to the tun without being joined into a new frame.  With
    ``offload`` the checksum field holds the pseudo-header sum and the kernel finishes
    it (Python never sums a payload); without it Python computes the full checksum over
    ``payload``, which must then be passed.  A payload longer than ``mss`` (when
    ``mss`` is set and ``offload`` is on) is sent as one GSO frame the kernel cuts into
    ``mss``-sized segments, so a small-MTU namespace still gets 64 KiB writes.
    ``options`` must be padded to a multiple of 4 bytes.
    """
    src, dst = packed(src_ip), packed(dst_ip)
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"TCP options must be padded to 4 bytes, at most 40: {len(options)}")
    header_length = 20 + len(options)
    length = header_length + len(payload)
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, header_length << 2,
                    flags & 0xFF, window, 0, 0) + options
    ip = _ip_header(src, dst, PROTO_TCP, length, ttl)
    partial = pseudo_header_sum(src, dst, PROTO_TCP, length)
    if offload:
        if not vnet:
            raise ValueError("offload needs the virtio_net_hdr (vnet=True)")
        field = partial
        gso = mss and len(payload) > mss
        header = VirtioNetHdr(
            flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type=(VIRTIO_NET_HDR_GSO_TCPV4 if len(src) == 4 else VIRTIO_NET_HDR_GSO_TCPV6)
            if gso else VIRTIO_NET_HDR_GSO_NONE,
            hdr_len=len(ip) + header_length if gso else 0,
            gso_size=mss if gso else 0,
            csum_start=len(ip),
            csum_offset=_CSUM_OFFSETS[PROTO_TCP],
        )
    else:
        field = ~fold(partial + ones_sum(tcp) + ones_sum(payload)) & 0xFFFF
        header = NO_VNET
    tcp = tcp[:16] + _U16.pack(field) + tcp[18:]
    if vnet:
        return header.pack() + ip + tcp
    return ip + tcp


def build_icmp_echo(
    src_ip: Address,
    dst_ip: Address,
    ident: int,
    seq: int,
    payload: bytes,
    *,
    reply: bool = True,
    ttl: int = 64,
    offload: bool = False,
    vnet: bool = True,
) -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) echo reply, or request with ``reply=False``."""
    src, dst = packed(src_ip), packed(dst_ip)
    if len(src) == 4:
        protocol, icmp_type = PROTO_ICMP, ICMP_ECHO_REPLY if reply else ICMP_ECHO
    else:
        protocol, icmp_type = PROTO_ICMPV6, ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO
    header = _ICMP.pack(icmp_type, 0, 0, ident, seq)
    return _assemble(src, dst, protocol, header, payload, ttl=ttl, offload=offload, vnet=vnet)


def build_icmp_echo_reply(
    request: Parsed,
    *,
    payload: bytes | None = None,
    ttl: int = 64,
    offload: bool = False,
    vnet: bool = True,
) -> bytes:
    """The reply to a parsed echo request: addresses swapped, same ident, seq, payload.

    ``payload`` overrides the echoed data (e.g. what the host's ping socket returned).
    """
    echo = request.l4
    if not isinstance(echo, ICMPEcho) or echo.reply:
        raise ValueError("build_icmp_echo_reply needs a parsed echo request")
    data = echo.payload if payload is None else payload
    return build_icmp_echo(
        request.ip.dst,
        request.ip.src,
        echo.ident,
        echo.seq,
        data,
        reply=True,
        ttl=ttl,
        offload=offload,
        vnet=vnet,
    )


def build_icmp_error(
    original: bytes,
    icmp_type: int,
    code: int,
    rest: int = 0,
    *,
    src: Address | None = None,
    ttl: int = 64,
    vnet: bool = True,
) -> bytes:
    """An ICMP(v6) error about ``original`` (an IP packet, no virtio header).

    The error goes to the original source, from ``src`` (default: the original
    destination, so ``ping`` and traceroute show the host that was addressed).  It
    quotes as much of the original as fits in the minimum MTU: 576 bytes for IPv4,
    1280 for IPv6.  ``rest`` is the 32-bit word after the checksum (the MTU for "too
    big").  Callers check :func:`.packets.may_send_icmp_error` first.  The checksum is always
    computed here: the quote is small.
    """
    version = original[0] >> 4 if original else 0
    if version == 4 and len(original) >= 20:
        orig_src, orig_dst = original[12:16], original[16:20]
        protocol, limit = PROTO_ICMP, MIN_MTU_V4 - 20 - 8
    elif version == 6 and len(original) >= 40:
        orig_src, orig_dst = original[8:24], original[24:40]
        protocol, limit = PROTO_ICMPV6, MIN_MTU_V6 - 40 - 8
    else:
        raise ValueError("original is not an IPv4 or IPv6 packet")
    source = orig_dst if src is None else packed(src)
    header = _ICMP.pack(icmp_type, code, 0, rest >> 16, rest & 0xFFFF)
    quote = original[:limit]
    return _assemble(source, orig_src, protocol, header, quote, ttl=ttl, offload=False, vnet=vnet)


def build_icmp_unreachable(
    original: bytes,
    kind: UnreachableKind,
    *,
    src: Address | None = None,
    ttl: int = 64,
    vnet: bool = True,
) -> bytes:
    """Destination unreachable about ``original``: ``kind`` is port, host, net or admin.

    IPv4: type 3, code 3 (port), 1 (host), 0 (net), 13 (administratively prohibited).
    IPv6: type 1, code 4 (port), 3 (address), 0 (no route), 1 (administratively
    prohibited).  A policy denial is "admin"; a refused UDP port is "port".
    """
    codes = _UNREACH_CODES.get(kind)
    if codes is None:
        raise ValueError(f"unknown unreachable kind {kind!r}")
    v6 = bool(original) and original[0] >> 4 == 6
    icmp_type = ICMPV6_DEST_UNREACH if v6 else ICMP_DEST_UNREACH
    return build_icmp_error(original, icmp_type, codes[v6], src=src, ttl=ttl, vnet=vnet)


def build_icmp_too_big(
    original: bytes,
    mtu: int,
    *,
    src: Address | None = None,
    ttl: int = 64,
    vnet: bool = True,
) -> bytes:
    """Packet too big (ICMPv6 type 2) or fragmentation needed (ICMPv4 type 3 code 4)."""
    if bool(original) and original[0] >> 4 == 6:
        icmp_type, code, rest = ICMPV6_PACKET_TOO_BIG, 0, mtu
    else:
        icmp_type, code, rest = ICMP_DEST_UNREACH, 4, mtu & 0xFFFF
    return build_icmp_error(original, icmp_type, code, rest, src=src, ttl=ttl, vnet=vnet)


def build_icmp_time_exceeded(
    original: bytes, *, src: Address | None = None, ttl: int = 64, vnet: bool = True
) -> bytes:
    """Time exceeded in transit (code 0), e.g. for a hop limit that ran out."""
    v6 = bool(original) and original[0] >> 4 == 6
    icmp_type = ICMPV6_TIME_EXCEEDED if v6 else ICMP_TIME_EXCEEDED
    return build_icmp_error(original, icmp_type, 0, src=src, ttl=ttl, vnet=vnet)


def build_tcp_rst(original: Parsed, *, ttl: int = 64, vnet: bool = True) -> bytes | None:
    """The reset answering a TCP segment for which no connection exists (RFC 9293 3.10.7.1).

    The host side answers TCP that reaches the tun (the redirect fast path normally
    keeps it away) with a reset, so the namespace's connect() fails at once with
    ECONNREFUSED instead of retrying SYNs for minutes.  As the RFC says: a segment
    with ACK gets ``RST`` with ``seq = SEG.ACK``; one without gets ``RST|ACK`` with
    ``seq = 0, ack = SEG.SEQ + SEG.LEN`` (SYN and FIN count one each).  A reset is
    never answered: None.  The header is 20 bytes, window 0, checksum computed here
    (a reset is tiny).
    """
    tcp = original.l4
    if not isinstance(tcp, TCP):
        raise ValueError("build_tcp_rst needs a parsed TCP segment")
    if tcp.flags & TCP_RST:
        return None
    if tcp.flags & TCP_ACK:
        seq, ack, flags = tcp.ack, 0, TCP_RST
    else:
        length = len(tcp.payload) + bool(tcp.flags & TCP_SYN) + bool(tcp.flags & TCP_FIN)
        seq, ack, flags = 0, (tcp.seq + length) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    header = _TCP.pack(tcp.dport, tcp.sport, seq, ack, 5 << 4, flags, 0, 0, 0)
    ip = original.ip
    return _assemble(ip.dst, ip.src, PROTO_TCP, header, b"", ttl=ttl, offload=False, vnet=vnet)
