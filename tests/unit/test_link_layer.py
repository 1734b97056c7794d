"""A TAP's link layer, sans-IO: Ethernet, ARP, neighbour discovery and DHCP.

Frames are built here by hand (struct, field by field) and the answers read back the
same way, so the modules are held to the wire format, not to themselves; hypothesis
throws random and mutated messages at every entry point to prove hostile input never
raises.  The real kernel and udhcpc are the clients in ``tests/usernet/test_tap.py``.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.arp import answer_arp
from nsbridge.usernet.proto.checksum import checksum, l4_checksum
from nsbridge.usernet.proto.dhcp import DhcpServer, is_dhcp_request
from nsbridge.usernet.proto.ethernet import (
    ALL_NODES_MAC,
    format_mac,
    host_mac,
    is_unicast,
    parse_mac,
)
from nsbridge.usernet.proto.ndp import answer_ndp, is_ndp, router_advertisement
from nsbridge.usernet.proto.packets import Malformed, Unsupported

ADDRS = UsernetAddresses()
OURS = host_mac(ADDRS)
GUEST = bytes.fromhex("0242ac110002")
GUEST_IP = ipaddress.IPv4Address("10.0.2.100").packed
LL_GUEST = ipaddress.IPv6Address("fe80::42:acff:fe11:2").packed


def test_host_mac_is_slirps_gateway_mac() -> None:
    assert format_mac(OURS) == "52:55:0a:00:02:02"
    assert is_unicast(OURS)


def test_parse_mac() -> None:
    assert parse_mac("02:42:AC:11:0:2") == GUEST
    for bad in ("", "02:42:ac:11:00", "01:00:5e:00:00:01", "00:00:00:00:00:00",
                "zz:42:ac:11:00:02", "0242:ac:11:00:02:03"):
        with pytest.raises(ValueError):
            parse_mac(bad)


# ---- ARP ----------------------------------------------------------------------------

def arp(op: int, sha: bytes, spa: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, spa, bytes(6), tpa)


@pytest.mark.parametrize("target", ["10.0.2.2", "10.0.2.3"])
def test_arp_answers_gateway_and_dns_with_our_mac(target: str) -> None:
    tpa = ipaddress.IPv4Address(target).packed
    reply = answer_arp(arp(1, GUEST, GUEST_IP, tpa), ADDRS, OURS)
    assert isinstance(reply, bytes) and len(reply) == 60
    dst, src, ethertype = struct.unpack_from("!6s6sH", reply)
    assert (dst, src, ethertype) == (GUEST, OURS, 0x0806)
    fields = struct.unpack_from("!HHBBH6s4s6s4s", reply, 14)
    assert fields == (1, 0x0800, 6, 4, 2, OURS, tpa, GUEST, GUEST_IP)


def test_arp_for_other_addresses_is_not_answered() -> None:
    # The guest's own address (a DHCP client's probe) and nobody's: as libslirp, silence.
    for target in ("10.0.2.100", "10.0.2.15", "10.0.2.50", "192.0.2.1"):
        tpa = ipaddress.IPv4Address(target).packed
        result = answer_arp(arp(1, GUEST, bytes(4), tpa), ADDRS, OURS)
        assert result == Unsupported("arp: not our address")
    assert answer_arp(arp(1, GUEST, GUEST_IP, GUEST_IP), ADDRS, OURS) == \
        Unsupported("arp: gratuitous")
    assert answer_arp(arp(2, GUEST, GUEST_IP, ADDRS.gateway.packed), ADDRS, OURS) == \
        Unsupported("arp: reply")


def test_arp_garbage() -> None:
    gw = ADDRS.gateway.packed
    assert answer_arp(b"\0\1", ADDRS, OURS) == Malformed("arp: short")
    assert answer_arp(arp(9, GUEST, GUEST_IP, gw), ADDRS, OURS) == \
        Malformed("arp: bad operation")
    assert answer_arp(arp(1, b"\x01" + GUEST[1:], GUEST_IP, gw), ADDRS, OURS) == \
        Malformed("arp: group sender address")
    bad = bytearray(arp(1, GUEST, GUEST_IP, gw))
    bad[4] = 16
    assert answer_arp(bytes(bad), ADDRS, OURS) == Malformed("arp: not Ethernet/IPv4")


# ---- neighbour discovery ------------------------------------------------------------

def icmp6(src: bytes, dst: bytes, body: bytes, hop: int = 255) -> bytes:
    csum = l4_checksum(src, dst, 58, body)
    body = body[:2] + csum.to_bytes(2, "big") + body[4:]
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, hop, src, dst) + body


def options(data: bytes) -> dict[int, bytes]:
    found, at = {}, 0
    while at < len(data):
        found[data[at]] = data[at + 2 : at + data[at + 1] * 8]
        at += data[at + 1] * 8
    return found


def test_router_solicitation_gets_an_advertisement_for_slaac() -> None:
    rs = icmp6(LL_GUEST, ipaddress.IPv6Address("ff02::2").packed,
               b"\x85\0\0\0\0\0\0\0" + b"\x01\x01" + GUEST)
    assert is_ndp(rs, len(rs))
    frame = answer_ndp(GUEST, rs, ADDRS, OURS)
    assert isinstance(frame, bytes) and frame == router_advertisement(ADDRS, OURS)
    assert frame[:12] == ALL_NODES_MAC + OURS
    packet = frame[14:]
    assert packet[7] == 255 and packet[8:24] == ipaddress.IPv6Address("fe80::2").packed
    assert packet[24:40] == ipaddress.IPv6Address("ff02::1").packed
    icmp = packet[40:]
    assert l4_checksum(packet[8:24], packet[24:40], 58, icmp[:2] + b"\0\0" + icmp[4:]) == \
        int.from_bytes(icmp[2:4], "big")
    assert icmp[0] == 134 and struct.unpack_from("!H", icmp, 6)[0] > 0  # a default router
    opts = options(icmp[16:])
    assert opts[1] == OURS
    prefix_len, flags, valid, preferred, _, prefix = struct.unpack("!BBIII16s", opts[3])
    assert (prefix_len, flags) == (64, 0xC0) and valid >= preferred > 0
    assert prefix == ipaddress.IPv6Address("fd00::").packed
    assert opts[25][6:22] == ADDRS.dns6.packed  # RDNSS


def test_prefix_not_64_is_on_link_only() -> None:
    addrs = UsernetAddresses.parse(network6="fd00:1::/56")
    icmp = router_advertisement(addrs, OURS)[14 + 40 :]
    assert options(icmp[16:])[3][1] == 0x80


@pytest.mark.parametrize("target", ["fe80::2", "fd00::2", "fd00::3"])
def test_neighbour_solicitation_for_ours_is_answered(target: str) -> None:
    tgt = ipaddress.IPv6Address(target).packed
    ns = icmp6(LL_GUEST, b"\xff\x02" + bytes(9) + b"\x01\xff" + tgt[13:],
               b"\x87\0\0\0\0\0\0\0" + tgt + b"\x01\x01" + GUEST)
    frame = answer_ndp(GUEST, ns, ADDRS, OURS)
    assert isinstance(frame, bytes)
    assert frame[:12] == GUEST + OURS
    packet = frame[14:]
    assert packet[8:24] == tgt and packet[24:40] == LL_GUEST
    icmp = packet[40:]
    assert icmp[0] == 136 and icmp[4] & 0x40  # solicited
    assert icmp[8:24] == tgt and options(icmp[24:])[2] == OURS


def test_neighbour_solicitation_for_others_and_dad_of_the_guest_is_silent() -> None:
    own = ipaddress.IPv6Address("fd00::42:acff:fe11:2").packed
    dad = icmp6(bytes(16), b"\xff\x02" + bytes(9) + b"\x01\xff" + own[13:],
                b"\x87\0\0\0\0\0\0\0" + own)
    assert answer_ndp(GUEST, dad, ADDRS, OURS) == Unsupported("ndp: not our address")


def test_ndp_garbage() -> None:
    rs_body = b"\x85\0\0\0\0\0\0\0"
    all_routers = ipaddress.IPv6Address("ff02::2").packed
    good = icmp6(LL_GUEST, all_routers, rs_body)
    assert answer_ndp(GUEST, icmp6(LL_GUEST, all_routers, rs_body, hop=64), ADDRS, OURS) == \
        Malformed("ndp: hop limit not 255")
    broken = bytearray(good)
    broken[42] ^= 1
    assert answer_ndp(GUEST, bytes(broken), ADDRS, OURS) == Malformed("ndp: bad checksum")
    assert answer_ndp(GUEST, good[:44], ADDRS, OURS) == Malformed("ndp: short")
    assert answer_ndp(GUEST, icmp6(LL_GUEST, all_routers, rs_body + b"\x01\x00" + bytes(6)),
                      ADDRS, OURS) == Malformed("ndp: bad option length")
    assert answer_ndp(GUEST, icmp6(bytes(16), all_routers, rs_body + b"\x01\x01" + GUEST),
                      ADDRS, OURS) == Malformed("ndp: link-layer option from ::")


# ---- DHCP ---------------------------------------------------------------------------

def dhcp(kind: int, *, mac: bytes = GUEST, xid: int = 0x1234, ciaddr: bytes = bytes(4),
         extra: bytes = b"", dst: bytes = b"\xff" * 4, src: bytes = bytes(4)) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, ciaddr,
                        bytes(4), bytes(4), bytes(4), mac + bytes(10), b"", b"")
    bootp += b"\x63\x82\x53\x63" + bytes((53, 1, kind)) + extra + b"\xff"
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + udp


def reply_fields(frame: bytes) -> tuple[int, bytes, dict[int, bytes]]:
    """(message type, yiaddr, options) of a server reply frame."""
    assert frame[:12] == GUEST + OURS and frame[12:14] == b"\x08\x00"
    packet = frame[14:]
    assert checksum(packet[:20]) == 0
    assert packet[12:16] == ADDRS.gateway.packed and packet[16:20] == b"\xff" * 4
    assert struct.unpack_from("!HH", packet, 20) == (67, 68)
    udp = packet[20:]
    assert l4_checksum(packet[12:16], packet[16:20], 17, udp[:6] + b"\0\0" + udp[8:]) == \
        int.from_bytes(udp[6:8], "big")
    bootp = udp[8:]
    assert bootp[0] == 2 and bootp[28:34] == GUEST and bootp[236:240] == b"\x63\x82\x53\x63"
    found, at, opts = {}, 240, bootp
    while opts[at] != 255:
        found[opts[at]] = opts[at + 2 : at + 2 + opts[at + 1]]
        at += 2 + opts[at + 1]
    return found[53][0], bootp[16:20], found


def test_dhcp_discover_request_release() -> None:
    server = DhcpServer(ADDRS, OURS)
    discover = dhcp(1)
    assert is_dhcp_request(discover, len(discover), ADDRS.gateway.packed)
    kind, yiaddr, opts = reply_fields(server.handle(GUEST, discover, 0.0))  # type: ignore[arg-type]
    assert kind == 2 and yiaddr == ipaddress.IPv4Address("10.0.2.15").packed
    assert opts[1] == b"\xff\xff\xff\x00" and opts[3] == opts[54] == ADDRS.gateway.packed
    assert opts[6] == ADDRS.dns.packed and int.from_bytes(opts[51], "big") == 86400
    assert int.from_bytes(opts[26], "big") == ADDRS.mtu
    request = dhcp(3, extra=bytes((50, 4)) + yiaddr + bytes((54, 4)) + ADDRS.gateway.packed)
    kind, acked, _ = reply_fields(server.handle(GUEST, request, 1.0))  # type: ignore[arg-type]
    assert (kind, acked) == (5, yiaddr)
    # Another client gets the next address; the first keeps its own.
    other = bytes.fromhex("0242ac110003")
    second = server.handle(other, dhcp(1, mac=other), 2.0)
    assert isinstance(second, bytes) and second[14 + 28 + 16 : 14 + 28 + 20] == \
        ipaddress.IPv4Address("10.0.2.16").packed
    # A request for someone else's address is refused.
    steal = dhcp(3, mac=other, extra=bytes((50, 4)) + yiaddr)
    nak = server.handle(other, steal, 3.0)
    assert isinstance(nak, bytes) and nak[14 + 28 + 240 + 2] == 6
    release = dhcp(7, ciaddr=yiaddr, src=yiaddr, dst=ADDRS.gateway.packed)
    assert is_dhcp_request(release, len(release), ADDRS.gateway.packed)
    assert server.handle(GUEST, release, 4.0) == Unsupported("dhcp: released")
    assert GUEST not in server.leases


def test_dhcp_pool_reuses_offered_or_expired_leases() -> None:
    server = DhcpServer(ADDRS, OURS, pool_size=2)
    macs = [bytes.fromhex(f"0242ac1100{i:02x}") for i in range(3)]
    for mac in macs[:2]:
        assert isinstance(server.handle(mac, dhcp(1, mac=mac), 0.0), bytes)
    # Both only offered: the third client takes the longest-offered one.
    assert isinstance(server.handle(macs[2], dhcp(1, mac=macs[2]), 1.0), bytes)
    assert len(server.leases) == 2


def test_dhcp_garbage() -> None:
    server = DhcpServer(ADDRS, OURS)
    good = dhcp(1)
    assert server.handle(GUEST, good[:20], 0) == Malformed("dhcp: bad IPv4 header")
    assert server.handle(bytes.fromhex("0242ac110009"), good, 0) == \
        Malformed("dhcp: client address is not the frame's sender")
    no_end = good[:-1]
    no_end = no_end[:2] + len(no_end).to_bytes(2, "big") + no_end[4:]
    assert isinstance(server.handle(GUEST, no_end, 0), Malformed)
    assert server.handle(GUEST, dhcp(8), 0) == Unsupported("dhcp: message type 8 not served")
    elsewhere = dhcp(3, extra=bytes((54, 4)) + b"\x0a\x00\x02\x09")
    assert server.handle(GUEST, elsewhere, 0) == Unsupported("dhcp: request for another server")
    to_elsewhere = dhcp(1, dst=b"\xc0\x00\x02\x01")
    assert not is_dhcp_request(to_elsewhere, len(to_elsewhere), ADDRS.gateway.packed)


# ---- hostile input never raises -----------------------------------------------------

def _mutations(template: bytes) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda data, flips, cut: bytes(
            (b ^ flips.get(i, 0)) for i, b in enumerate(data))[:cut],
        st.just(template),
        st.dictionaries(st.integers(0, len(template) - 1), st.integers(1, 255), max_size=6),
        st.integers(0, len(template)),
    )


TEMPLATES = [
    arp(1, GUEST, GUEST_IP, ADDRS.gateway.packed),
    icmp6(LL_GUEST, ipaddress.IPv6Address("ff02::2").packed,
          b"\x85\0\0\0\0\0\0\0\x01\x01" + GUEST),
    icmp6(LL_GUEST, ipaddress.IPv6Address("ff02::1:ff00:2").packed,
          b"\x87\0\0\0\0\0\0\0" + ipaddress.IPv6Address("fe80::2").packed),
    dhcp(1), dhcp(3, extra=bytes((50, 4)) + b"\x0a\x00\x02\x0f"), dhcp(7),
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=400), *[_mutations(t) for t in TEMPLATES]))
def test_hostile_link_messages_never_raise(data: bytes) -> None:
    server = DhcpServer(ADDRS, OURS)
    for result in (answer_arp(data, ADDRS, OURS), answer_ndp(GUEST, data, ADDRS, OURS)):
        assert isinstance(result, bytes | Malformed | Unsupported)
    is_ndp(data, len(data))
    is_dhcp_request(data, len(data), ADDRS.gateway.packed)
    assert isinstance(server.handle(GUEST, data, 0.0), bytes | Malformed | Unsupported)
