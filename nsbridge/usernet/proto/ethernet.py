"""Ethernet II frames as a TAP device carries them, sans-IO.

A TAP device (``IFF_TAP | IFF_NO_PI``, no virtio header) hands us whole Ethernet frames:
destination MAC, source MAC, EtherType, payload.  This module names those pieces and the
host side's own MAC, and nothing else; ARP, neighbour discovery and DHCP, the three
things a link needs before IP works, are :mod:`.arp`, :mod:`.ndp` and :mod:`.dhcp`.

The host side answers for every address it serves (gateway, DNS, the IPv6 router) with
**one** MAC, ``52:55:`` followed by the gateway's IPv4 address (``52:55:0a:00:02:02`` by
default): the locally administered unicast scheme libslirp uses for its gateway, so a
namespace moved from slirp4netns sees the same neighbour entry.  One MAC keeps every
frame we write the same header, prebuilt once.
"""

from __future__ import annotations

import struct

from nsbridge.usernet.proto.addresses import UsernetAddresses

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD

BROADCAST = b"\xff" * 6
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"  # ff02::1 (RFC 2464 section 7)

_HEADER = struct.Struct("!6s6sH")


def host_mac(addresses: UsernetAddresses) -> bytes:
    """The MAC the host side answers with: ``52:55`` + the gateway's IPv4 address."""
    return b"\x52\x55" + addresses.gateway.packed


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    """A 14-byte Ethernet II header."""
    return _HEADER.pack(dst, src, ethertype)


def is_unicast(mac: bytes) -> bool:
    """True for a unicast MAC (group bit clear) that is not all zeros: the only kind a
    guest may have, so the only kind worth learning."""
    return len(mac) == 6 and not mac[0] & 1 and mac != b"\0" * 6


def multicast_mac6(address: bytes) -> bytes:
    """The Ethernet address of an IPv6 multicast group (``33:33`` + its last 32 bits)."""
    return b"\x33\x33" + address[12:16]


def format_mac(mac: bytes) -> str:
    """``52:55:0a:00:02:02`` from six bytes."""
    return ":".join(f"{byte:02x}" for byte in mac)


def parse_mac(text: str) -> bytes:
    """Six bytes from ``aa:bb:cc:dd:ee:ff`` (or ``-``-separated); ValueError naming the
    text when it is not a unicast MAC (a guest cannot have a group address)."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(
            len(part) in (1, 2) and all(c in "0123456789abcdefABCDEF" for c in part)
            for part in parts):
        raise ValueError(f"{text!r}: not a MAC address (give aa:bb:cc:dd:ee:ff)")
    mac = bytes(int(part, 16) for part in parts)
    if not is_unicast(mac):
        raise ValueError(f"{text!r}: not a unicast MAC address")
    return mac
