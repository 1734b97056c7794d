"""IPv6 neighbour discovery for a TAP guest, sans-IO: the router and its prefix.

A TAP guest finds its IPv6 router and address the way a real host does (RFC 4861,
RFC 4862), and slirp4netns answers it the same way, so this module does too:

* **Router solicitation** → a router advertisement from the router's link-local
  address ``fe80::2`` to all nodes: the namespace's prefix (``fd00::/64``) on-link and
  autonomous, so the guest's kernel makes its own address (SLAAC), a default route
  through ``fe80::2``, and RDNSS naming the DNS address (RFC 8106) for clients that read
  it.  :func:`router_advertisement` also builds the unsolicited ones the host side sends
  now and then, so a guest whose solicitation was lost still configures itself.
* **Neighbour solicitation** for ``fe80::2``, the gateway or the DNS address → a
  neighbour advertisement naming the host side's MAC.  Other targets (the guest's own
  addresses during duplicate-address detection, or nobody's) get no answer.

Every message is checked as RFC 4861 section 6.1/7.1 asks (hop limit 255, checksum,
code 0, lengths, no unspecified source on a solicitation carrying a link-layer option)
before it is answered; anything else is a counted :class:`Malformed` or
:class:`Unsupported`, never an exception.  The prefix is advertised autonomous only when
it is a /64: SLAAC needs 64-bit interface identifiers, and a guest given another length
must be configured by hand.
"""

from __future__ import annotations

import ipaddress
import struct

from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.checksum import l4_checksum
from nsbridge.usernet.proto.ethernet import (
    ALL_NODES_MAC,
    ETH_P_IPV6,
    header,
    multicast_mac6,
)
from nsbridge.usernet.proto.packets import PROTO_ICMPV6, Malformed, Unsupported

ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137
NDP_TYPES = frozenset(range(ROUTER_SOLICITATION, REDIRECT + 1))

ROUTER_LINK_LOCAL = ipaddress.IPv6Address("fe80::2")
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
UNSPECIFIED = bytes(16)

ROUTER_LIFETIME = 1800  # seconds the guest keeps us as its default router
VALID_LIFETIME = 86400  # the prefix's lifetimes, as libslirp advertises them
PREFERRED_LIFETIME = 14400
RDNSS_LIFETIME = 1800
MAX_HOP_LIMIT = 255

_OPT_SOURCE_LL = 1
_OPT_TARGET_LL = 2
_OPT_PREFIX = 3
_OPT_RDNSS = 25
_NA_ROUTER, _NA_SOLICITED, _NA_OVERRIDE = 0x80, 0x40, 0x20
_PREFIX_ON_LINK, _PREFIX_AUTONOMOUS = 0x80, 0x40

_IPV6 = struct.Struct("!IHBB16s16s")


def _ipv6(src: bytes, dst: bytes, icmp: bytes) -> bytes:
    """An IPv6 packet (hop limit 255) carrying ``icmp`` with its checksum filled in."""
    csum = l4_checksum(src, dst, PROTO_ICMPV6, icmp)
    icmp = icmp[:2] + csum.to_bytes(2, "big") + icmp[4:]
    return _IPV6.pack(0x60000000, len(icmp), PROTO_ICMPV6, MAX_HOP_LIMIT, src, dst) + icmp


def router_advertisement(addresses: UsernetAddresses, our_mac: bytes, *,
                         dst_mac: bytes = ALL_NODES_MAC, dst: bytes = ALL_NODES) -> bytes:
    """A router advertisement frame from ``fe80::2`` (to all nodes unless told)."""
    network = addresses.network6
    flags = _PREFIX_ON_LINK | (_PREFIX_AUTONOMOUS if network.prefixlen == 64 else 0)
    body = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 64, 0, ROUTER_LIFETIME, 0, 0)
    body += struct.pack("!BB6s", _OPT_SOURCE_LL, 1, our_mac)
    body += struct.pack("!BBBBIII16s", _OPT_PREFIX, 4, network.prefixlen, flags,
                        VALID_LIFETIME, PREFERRED_LIFETIME, 0, network.network_address.packed)
    body += struct.pack("!BBHI16s", _OPT_RDNSS, 3, 0, RDNSS_LIFETIME, addresses.dns6.packed)
    return header(dst_mac, our_mac, ETH_P_IPV6) + _ipv6(ROUTER_LINK_LOCAL.packed, dst, body)


def _neighbor_advertisement(target: bytes, our_mac: bytes, dst: bytes, dst_mac: bytes,
                            solicited: bool) -> bytes:
    flags = _NA_ROUTER | _NA_OVERRIDE | (_NA_SOLICITED if solicited else 0)
    body = struct.pack("!BBHB3x16s", NEIGHBOR_ADVERTISEMENT, 0, 0, flags, target)
    body += struct.pack("!BB6s", _OPT_TARGET_LL, 1, our_mac)
    return header(dst_mac, our_mac, ETH_P_IPV6) + _ipv6(target, dst, body)


def is_ndp(packet: bytes | bytearray | memoryview, length: int) -> bool:
    """Whether an IPv6 packet of ``length`` bytes is a neighbour-discovery message (ICMPv6
    right after the fixed header: RFC 4861 messages carry no extension headers)."""
    return length > 40 and packet[6] == PROTO_ICMPV6 and packet[40] in NDP_TYPES


def _options(data: bytes) -> dict[int, bytes] | Malformed:
    """NDP options by type (the first of each); every length checked (RFC 4861 4.6)."""
    found: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        if len(data) - at < 2:
            return Malformed("ndp: truncated option")
        kind, units = data[at], data[at + 1]
        if units == 0 or at + units * 8 > len(data):
            return Malformed("ndp: bad option length")
        found.setdefault(kind, data[at + 2 : at + units * 8])
        at += units * 8
    return found


def answer_ndp(eth_src: bytes, packet: bytes, addresses: UsernetAddresses,
               our_mac: bytes) -> bytes | Malformed | Unsupported:
    """The answer frame to a neighbour-discovery IPv6 ``packet`` from ``eth_src``, or why
    there is none."""
    if len(packet) < 48 or packet[0] >> 4 != 6:
        return Malformed("ndp: short")
    _vtf, plen, nxt, hop, src, dst = _IPV6.unpack_from(packet)
    if nxt != PROTO_ICMPV6:
        return Unsupported("ndp: not ICMPv6")
    if 40 + plen > len(packet) or plen < 8:
        return Malformed("ndp: bad length")
    icmp = packet[40 : 40 + plen]
    if hop != MAX_HOP_LIMIT:
        return Malformed("ndp: hop limit not 255")
    if l4_checksum(src, dst, PROTO_ICMPV6, icmp[:2] + b"\0\0" + icmp[4:]) \
            != int.from_bytes(icmp[2:4], "big"):
        return Malformed("ndp: bad checksum")
    kind, code = icmp[0], icmp[1]
    if code != 0:
        return Malformed("ndp: bad code")
    if kind == ROUTER_SOLICITATION:
        options = _options(icmp[8:])
        if isinstance(options, Malformed):
            return options
        if src == UNSPECIFIED and _OPT_SOURCE_LL in options:
            return Malformed("ndp: link-layer option from ::")
        return router_advertisement(addresses, our_mac)
    if kind == NEIGHBOR_SOLICITATION:
        if len(icmp) < 24:
            return Malformed("ndp: short")
        target = icmp[8:24]
        options = _options(icmp[24:])
        if isinstance(options, Malformed):
            return options
        if target[0] == 0xFF:
            return Malformed("ndp: multicast target")
        if src == UNSPECIFIED and _OPT_SOURCE_LL in options:
            return Malformed("ndp: link-layer option from ::")
        if target not in (ROUTER_LINK_LOCAL.packed, addresses.gateway6.packed,
                          addresses.dns6.packed):
            return Unsupported("ndp: not our address")
        if src == UNSPECIFIED:  # duplicate-address detection of one of ours: say it's taken
            return _neighbor_advertisement(target, our_mac, ALL_NODES, multicast_mac6(ALL_NODES),
                                           solicited=False)
        return _neighbor_advertisement(target, our_mac, src, eth_src, solicited=True)
    if kind == ROUTER_ADVERTISEMENT:
        return Unsupported("ndp: router advertisement from the guest")
    return Unsupported("ndp: advertisement or redirect")
