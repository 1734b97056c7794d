"""Who a published port's client is inside the namespace, and which guest addresses a
device-mode port may dial (:mod:`nsbridge.usernet.proto.inboundaddr`), sans-IO."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.inboundaddr import client_inside, guest_target_problem

ADDRESSES = UsernetAddresses()
GUEST4 = ipaddress.ip_address("10.0.2.100")
GUEST6 = ipaddress.ip_address("fd00::100")


@pytest.mark.parametrize(("client", "guest", "seen"), [
    ("127.0.0.1", GUEST4, "10.0.2.2"),  # the host's loopback is the gateway
    ("127.5.6.7", GUEST4, "10.0.2.2"),
    ("0.0.0.0", GUEST4, "10.0.2.2"),
    ("::1", GUEST6, "fd00::2"),
    ("::1", GUEST4, "10.0.2.2"),  # another family: the guest family's gateway
    ("198.51.100.2", GUEST6, "fd00::2"),
    ("::ffff:127.0.0.1", GUEST4, "10.0.2.2"),  # a dual-stack listener's IPv4 client
    ("::ffff:198.51.100.2", GUEST4, "198.51.100.2"),
    ("10.0.2.100", GUEST4, "10.0.2.2"),  # the guest's own address, its network
    ("10.0.2.77", GUEST4, "10.0.2.2"),
    ("fd00::100", GUEST6, "fd00::2"),
    ("198.51.100.2", GUEST4, "198.51.100.2"),  # anyone else: itself
    ("2001:db8:5::2", GUEST6, "2001:db8:5::2"),
    ("fe80::1%o0", GUEST6, "fe80::1"),
])
def test_client_inside(client, guest, seen) -> None:
    assert client_inside(client, guest, ADDRESSES) == ipaddress.ip_address(seen)


def test_client_inside_follows_cidr() -> None:
    addresses = UsernetAddresses.parse(network="10.9.0.0/16", network6="fd01::/64")
    assert str(client_inside("127.0.0.1", ipaddress.ip_address("10.9.0.100"),
                             addresses)) == "10.9.0.2"
    assert str(client_inside("10.0.2.2", ipaddress.ip_address("10.9.0.100"),
                             addresses)) == "10.0.2.2"  # no longer the guest's network


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
       st.sampled_from([GUEST4, GUEST6]))
def test_what_the_guest_sees_is_never_loopback_or_its_own_network(client, guest) -> None:
    seen = client_inside(str(client), guest, ADDRESSES)
    assert seen.version == guest.version and not seen.is_loopback
    network = ADDRESSES.network if guest.version == 4 else ADDRESSES.network6
    assert seen not in network or seen in (ADDRESSES.gateway, ADDRESSES.gateway6)


@pytest.mark.parametrize(("guest", "ok"), [
    ("10.0.2.100", True), ("10.0.2.15", True), ("fd00::100", True), ("fd00::5054:ff", True),
    ("10.0.2.2", False), ("10.0.2.3", False), ("10.0.2.0", False), ("10.0.2.255", False),
    ("fd00::2", False), ("fd00::3", False), ("fd00::", False),
    ("127.0.0.1", False), ("192.0.2.1", False), ("::1", False), ("2001:db8::1", False),
])
def test_guest_targets_are_the_namespace_network_only(guest, ok) -> None:
    problem = guest_target_problem(ipaddress.ip_address(guest), ADDRESSES)
    assert (problem is None) is ok, problem
