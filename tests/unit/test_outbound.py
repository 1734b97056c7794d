"""The outbound address's sans-IO parts and its bind (no root, no namespace): which texts
are addresses, interface names or refused, which of an interface's addresses is taken,
which destinations are bound, and what a bound socket looks like.  End to end (every
path, both families, the helper): tests/usernet/test_outbound_addr.py."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from nsbridge.usernet.host.outbound import (
    IP_BIND_ADDRESS_NO_PORT,
    NONE,
    InterfaceAddress,
    OutboundAddresses,
    OutboundError,
    classify,
    interface_addresses,
    pick_interface_address,
    resolve,
)

A = ipaddress.ip_address


@pytest.mark.parametrize(("text", "version", "expected"), [
    ("192.0.2.7", 4, A("192.0.2.7")),
    ("2001:db8::7", 6, A("2001:db8::7")),
    ("eth0", 4, "eth0"),
    ("enp0s31f6", 6, "enp0s31f6"),
    ("wg-vpn.1", 4, "wg-vpn.1"),
    ("a" * 15, 4, "a" * 15),
    ("10.0.0.300", 4, "10.0.0.300"),  # not an address: may be an interface's name
])
def test_classify_accepts(text: str, version: int, expected: object) -> None:
    assert classify(text, version, "--outbound-addr") == expected


@pytest.mark.parametrize(("text", "version", "message"), [
    ("2001:db8::7", 4, "an IPv6 address; give an IPv4 address of this host or an interface "
                       "name (IPv6 goes to --outbound-addr6)"),
    ("192.0.2.7", 6, "an IPv4 address; give an IPv6 address"),
    ("::ffff:192.0.2.7", 4, "an IPv6 address"),
    ("0.0.0.0", 4, "an unspecified address cannot be the source"),
    ("::", 6, "an unspecified address"),
    ("127.0.0.2", 4, "a loopback address"),
    ("::1", 6, "a loopback address"),
    ("224.0.0.1", 4, "a multicast address"),
    ("ff02::1", 6, "a multicast address"),
    ("fe80::1", 6, "a link-local address reaches only its link"),
    ("", 4, "'': not an IPv4 address or an interface name"),
    ("a" * 16, 4, "not an IPv4 address or an interface name"),
    ("eth/0", 4, "not an IPv4 address"),
    ("eth 0", 4, "not an IPv4 address"),
    ("eth\n0", 4, "not an IPv4 address"),
    ("..", 4, "not an IPv4 address"),
    ("fe80::1%eth0", 6, "not an IPv6 address or an interface name"),
    ("é" * 8, 4, "not an IPv4 address"),  # 16 bytes in UTF-8
])
def test_classify_refuses_with_a_message_naming_the_input(text: str, version: int,
                                                          message: str) -> None:
    what = "--outbound-addr6" if version == 6 else "--outbound-addr"
    with pytest.raises(OutboundError) as info:
        classify(text, version, what)
    assert str(info.value).startswith(f"{what} {text!r}: ")
    assert message in str(info.value)


def test_an_interface_gives_its_first_usable_address_in_the_kernels_order() -> None:
    listed = [
        InterfaceAddress(1, A("127.0.0.1")),
        InterfaceAddress(2, A("192.0.2.9")),
        InterfaceAddress(2, A("192.0.2.10")),
        InterfaceAddress(2, A("2001:db8::9"), flags=0x40),  # tentative: not yet usable
        InterfaceAddress(2, A("2001:db8::8"), flags=0x08),  # duplicate address detected
        InterfaceAddress(2, A("fe80::9")),
        InterfaceAddress(2, A("2001:db8::10")),
        InterfaceAddress(3, A("2001:db8::11")),
    ]
    assert pick_interface_address(listed, 2, 4) == A("192.0.2.9")
    assert pick_interface_address(listed, 2, 6) == A("2001:db8::10")
    assert pick_interface_address(listed, 3, 4) is None
    only_link_local = [InterfaceAddress(4, A("fe80::1"))]
    assert pick_interface_address(only_link_local, 4, 6) is None
    assert pick_interface_address(listed, 1, 4) is None  # lo: loopback only


def test_which_destinations_are_bound() -> None:
    out = OutboundAddresses(ipv4=A("192.0.2.7"), ipv6=A("2001:db8::7"))  # type: ignore[arg-type]
    assert out.source_for("198.51.100.1") == A("192.0.2.7")
    assert out.source_for(A("2001:db8:1::1")) == A("2001:db8::7")
    assert out.source_for(bytes([198, 51, 100, 1])) == A("192.0.2.7")
    assert out.source_for("fe80::1%eth0") == A("2001:db8::7")
    # The host's loopback never leaves the host: the kernel's choice stays.
    for loopback in ("127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"):
        assert out.source_for(loopback) is None, loopback
    only4 = OutboundAddresses(ipv4=A("192.0.2.7"))  # type: ignore[arg-type]
    assert only4.source_for("2001:db8::1") is None
    assert not NONE and only4
    assert only4.describe() == "IPv4 192.0.2.7, IPv6 the kernel's choice"


def test_bind_sets_the_source_and_leaves_the_port_to_connect() -> None:
    """Loopback stands in for a host address (no root): the destination is not loopback,
    so the socket is bound; TCP with IP_BIND_ADDRESS_NO_PORT (no port taken yet)."""
    out = OutboundAddresses(ipv4=A("127.0.0.1"))  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        out.bind(tcp, "192.0.2.1")
        assert tcp.getsockname() == ("127.0.0.1", 0)
        assert tcp.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        out.bind(udp, "192.0.2.1")
        assert udp.getsockname()[0] == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as loopback:
        out.bind(loopback, "127.0.0.1")
        assert loopback.getsockname() == ("0.0.0.0", 0)  # not bound
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as other_family:
        out.bind(other_family, "2001:db8::1")
        assert other_family.getsockname()[:2] == ("::", 0)


def test_resolve_in_this_namespace() -> None:
    """``lo`` is the one interface every namespace has: its addresses are loopback, so it
    gives no usable address; an address nobody has is refused by the test bind."""
    assert resolve(None, None) == NONE
    assert any(entry.address == A("127.0.0.1") for entry in interface_addresses(4))
    with pytest.raises(OutboundError, match="'lo': the interface has no usable IPv4"):
        resolve("lo", None)
    with pytest.raises(OutboundError, match="no such interface"):
        resolve("nsb-no-such0", None)
    with pytest.raises(OutboundError, match=r"cannot be bound .*not an address of this host"):
        resolve("192.0.2.254", None)
