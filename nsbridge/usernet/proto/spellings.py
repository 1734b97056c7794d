"""IPv6 spellings of IPv4 addresses: what a translator or tunnel on the host's path dials.

An IPv6 destination can name an IPv4 one: IPv4-mapped and IPv4-compatible addresses,
SIIT (RFC 6145), NAT64 (RFC 6052, the well-known prefix and any the user names), 6to4
and Teredo.  The policy (:mod:`.policy`, step 3) decides a flow to such an address as
the IPv6 address *and* as every IPv4 address it embeds, so that a rule on an IPv4
network cannot be walked around by spelling its addresses in IPv6.  Sans-IO: addresses
in, addresses out; :func:`parse_nat64_prefix` reads the user's ``--nat64-prefix``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

from nsbridge.errors import UserError
from nsbridge.net.acl import parse_network

IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (RFC 6145)
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380
NAT64_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)  # RFC 6052 section 2.2
_LOW32 = 0xFFFFFFFF

Spelling = Literal["ipv4-mapped", "ipv4-compatible", "siit", "nat64", "6to4", "teredo"]


def nat64_embedded(address: ipaddress.IPv6Address, prefixlen: int) -> ipaddress.IPv4Address:
    """The IPv4 address in ``address`` under a NAT64 prefix of ``prefixlen`` (RFC 6052).

    The 32 IPv4 bits follow the prefix but skip bits 64-71 (the "u" octet, kept zero
    for the interface-identifier format): a /48 prefix has them at bits 48-63 and
    72-87, a /56 at 56-63 and 72-95, a /64 at 72-103, a /96 at 96-127.  Squeezing the
    u octet out leaves a 120-bit number with the IPv4 bits right after the prefix.
    """
    if prefixlen not in NAT64_PREFIX_LENGTHS:
        raise ValueError(f"not an RFC 6052 prefix length: /{prefixlen}")
    value = int(address)
    if prefixlen == 96:
        return ipaddress.IPv4Address(value & _LOW32)
    squeezed = ((value >> 64) << 56) | (value & ((1 << 56) - 1))
    return ipaddress.IPv4Address((squeezed >> (120 - prefixlen - 32)) & _LOW32)


def embedded_ipv4(
    address: ipaddress.IPv6Address,
    nat64_prefixes: Iterable[ipaddress.IPv6Network] = (),
) -> tuple[tuple[Spelling, ipaddress.IPv4Address], ...]:
    """Every IPv4 address ``address`` spells, with how: what a translator or tunnel on
    the host's path would turn it into.

    * IPv4-mapped ``::ffff:a.b.c.d`` and IPv4-compatible ``::a.b.c.d`` (not ``::`` or
      ``::1``): a dual-stack socket or an old tunnel dials the IPv4 address.
    * SIIT ``::ffff:0:a.b.c.d`` (IPv4-translated, RFC 6145): a stateless translator.
    * NAT64: the well-known prefix ``64:ff9b::/96`` and every prefix in
      ``nat64_prefixes`` (RFC 6052 layouts, :func:`nat64_embedded`).  The local-use
      range ``64:ff9b:1::/48`` is read only through a named prefix: its layout is the
      operator's (see :meth:`.policy.Policy.decide`, step 3).
    * 6to4 ``2002:AABB:CCDD::/48``: the IPv6 packet is tunnelled to the IPv4 address in
      bits 16-47.
    * Teredo ``2001:0:SSSS:SSSS:FLAG:PORT:CCCC:CCCC``: *both* IPv4 addresses.  The
      payload goes, in UDP, straight to the client's address (bits 96-127, stored
      inverted), and the host's Teredo client also sends bubbles through the server
      (bits 32-63) to open that path; either is an IPv4 destination the host talks to
      on the flow's behalf, so a rule denying either must hold.
    """
    value = int(address)
    found: list[tuple[Spelling, ipaddress.IPv4Address]] = []
    if address in IPV4_MAPPED:
        found.append(("ipv4-mapped", ipaddress.IPv4Address(value & _LOW32)))
    if address in IPV4_COMPATIBLE and value > 1:
        found.append(("ipv4-compatible", ipaddress.IPv4Address(value & _LOW32)))
    if address in _SIIT:
        found.append(("siit", ipaddress.IPv4Address(value & _LOW32)))
    for prefix in (NAT64_WELL_KNOWN, *nat64_prefixes):
        if address in prefix:
            found.append(("nat64", nat64_embedded(address, prefix.prefixlen)))
    if address in _SIX_TO_FOUR:
        found.append(("6to4", ipaddress.IPv4Address((value >> 80) & _LOW32)))
    if address in _TEREDO:
        found.append(("teredo", ipaddress.IPv4Address((value >> 64) & _LOW32)))
        found.append(("teredo", ipaddress.IPv4Address(~value & _LOW32)))
    return tuple(dict.fromkeys(found))


def parse_nat64_prefix(text: str, *, what: str = "--nat64-prefix") -> ipaddress.IPv6Network:
    """A NAT64 prefix the host's translator uses, from user text (RFC 6052 rules)."""
    shown = text if text and text.isprintable() and " " not in text else repr(text)
    example = "e.g. 64:ff9b:1::/96 or 2001:db8:64::/64"
    if "/" not in text:
        raise UserError(f"{what} {shown}: give the prefix with its length ({example})")
    network = parse_network(text, what=what)
    if not isinstance(network, ipaddress.IPv6Network):
        raise UserError(f"{what} {shown}: not an IPv6 prefix ({example})")
    if network.prefixlen not in NAT64_PREFIX_LENGTHS:
        raise UserError(f"{what} {shown}: a NAT64 prefix is /32, /40, /48, /56, /64 or /96 "
                        f"(RFC 6052), not /{network.prefixlen}")
    if network.prefixlen == 96 and network.network_address.packed[8]:
        raise UserError(f"{what} {shown}: bits 64-71 of a /96 NAT64 prefix must be zero "
                        "(RFC 6052)")
    return network
