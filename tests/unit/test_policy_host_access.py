"""Host access in the policy, sans-IO: the host's own addresses (a frozenset standing in
for the live tracker) are closed unless host access is on or an allow rule names one
exactly; the gateway answers ping itself whatever host access says."""

from __future__ import annotations

import ipaddress

import pytest

from nsbridge.usernet.proto.policy import Allow, AllowResolver, Deny, Policy, Rule

HOST = frozenset(ipaddress.ip_address(a) for a in (
    "10.250.0.1", "10.250.0.255", "10.251.0.1", "2001:db8:250::1", "fe80::1"))
OUTSIDE_V4, OUTSIDE_V6 = "192.0.2.1", "2001:db8::1"
HOST_DENIED = Deny("host address")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def rules(*texts: str, action: str = "allow") -> list[Rule]:
    return [Rule.parse(action, text) for text in texts]


@pytest.mark.parametrize(("protocol", "dst", "port"), [
    ("tcp", "10.250.0.1", 5432), ("udp", "10.250.0.1", 53), ("icmp", "10.250.0.1", None),
    ("tcp", "10.251.0.1", 22),  # a second interface
    ("udp", "10.250.0.255", 137),  # an interface's broadcast address
    ("tcp", "2001:db8:250::1", 443), ("icmp", "2001:db8:250::1", None),
    # NAT64, 6to4 and SIIT spellings of a host address: decided as it too
    ("tcp", "64:ff9b::afa:1", 80), ("udp", "2002:afa:1::1", 53),
    ("tcp", "::ffff:0:afa:1", 80),
])
def test_host_addresses_denied_by_default(protocol: str, dst: str, port: int | None) -> None:
    policy = Policy(host_addresses=HOST)
    assert policy.decide(protocol, dst, port) == HOST_DENIED
    assert policy.denied == {"host address": 1}


def test_other_destinations_unchanged() -> None:
    policy = Policy(host_addresses=HOST)
    assert policy.decide("tcp", OUTSIDE_V4, 80) == Allow(ip(OUTSIDE_V4), 80)
    assert policy.decide("udp", OUTSIDE_V6, 53) == Allow(ip(OUTSIDE_V6), 53)
    assert policy.decide("tcp", "10.250.0.2", 80) == Allow(ip("10.250.0.2"), 80)
    # the never list and link-local keep their own reasons
    assert policy.decide("udp", "::ffff:10.250.0.1", 53) == Deny("ipv4-mapped address")
    assert policy.decide("tcp", "fe80::1", 80) == Deny("link-local")
    assert policy.decide("tcp", "10.0.2.2", 80) == Deny("host loopback disabled")
    # DNS is nsbridge's own service: a resolver on a host address is still used
    assert isinstance(policy.decide("udp", "10.0.2.3", 53), AllowResolver)


@pytest.mark.parametrize("switch", ["allow_host_access", "allow_host_loopback"])
def test_one_switch_opens_loopback_and_host_addresses(switch: str) -> None:
    policy = Policy(host_addresses=HOST, **{switch: True})
    assert policy.allow_host_access and policy.allow_host_loopback
    assert policy.decide("tcp", "10.250.0.1", 5432) == Allow(ip("10.250.0.1"), 5432)
    assert policy.decide("icmp", "2001:db8:250::1", None) == Allow(ip("2001:db8:250::1"), 0)
    assert policy.decide("tcp", "10.0.2.2", 22) == Allow(ip("127.0.0.1"), 22)
    assert policy.decide("tcp", "fe80::1", 80) == Deny("link-local")  # never dialable


def test_deny_rules_still_win() -> None:
    policy = Policy(allow_host_access=True, host_addresses=HOST,
                    rules=rules("tcp:10.250.0.1:22", action="deny"))
    assert policy.decide("tcp", "10.250.0.1", 22) == Deny("deny rule")
    assert policy.decide("tcp", "10.250.0.1", 80) == Allow(ip("10.250.0.1"), 80)
    # with host access off the rule's reason is counted (it comes first)
    off = Policy(host_addresses=HOST, rules=rules("10.250.0.0/24", action="deny"))
    assert off.decide("tcp", "10.250.0.1", 22) == Deny("deny rule")


def test_a_precise_allow_rule_opens_exactly_one_service() -> None:
    policy = Policy(host_addresses=HOST, rules=rules("*", "tcp:10.250.0.1:5432"))
    assert policy.decide("tcp", "10.250.0.1", 5432) == Allow(ip("10.250.0.1"), 5432)
    assert policy.decide("tcp", "10.250.0.1", 5433) == HOST_DENIED
    assert policy.decide("udp", "10.250.0.1", 5432) == HOST_DENIED
    assert policy.decide("icmp", "10.250.0.1", None) == HOST_DENIED
    assert policy.decide("tcp", "10.251.0.1", 5432) == HOST_DENIED
    assert policy.decide("tcp", OUTSIDE_V4, 443) == Allow(ip(OUTSIDE_V4), 443)
    assert policy.decide("tcp", "10.0.2.2", 5432) == Deny("host loopback disabled")
    v6 = Policy(host_addresses=HOST, rules=rules("udp:[2001:db8:250::1]:53"))
    assert v6.decide("udp", "2001:db8:250::1", 53) == Allow(ip("2001:db8:250::1"), 53)
    assert v6.decide("udp", "2001:db8:250::1", 54) == Deny("not in allow rules")
    whole = Policy(host_addresses=HOST, rules=rules("10.250.0.1"))  # every port of it
    assert whole.decide("udp", "10.250.0.1", 9) == Allow(ip("10.250.0.1"), 9)


@pytest.mark.parametrize("broad", ["0.0.0.0/0", "*", "10.250.0.0/24", "10.250.0.0/31",
                                   "tcp:*:5432", "[::]/0", "[2001:db8:250::]/64"])
def test_broad_allow_rules_do_not_open_the_host(broad: str) -> None:
    policy = Policy(host_addresses=HOST, rules=rules(broad))
    assert policy.decide("tcp", "10.250.0.1", 5432) in (HOST_DENIED, Deny("not in allow rules"))
    assert policy.decide("tcp", "2001:db8:250::1", 5432) in (
        HOST_DENIED, Deny("not in allow rules"))


def test_the_set_is_read_at_each_decision() -> None:
    """The policy holds the container, not a copy: an address added later is covered."""
    live: set[object] = set()
    policy = Policy(host_addresses=live)
    assert policy.decide("tcp", "10.250.0.9", 80) == Allow(ip("10.250.0.9"), 80)
    live.add(ip("10.250.0.9"))
    assert policy.decide("tcp", "10.250.0.9", 80) == HOST_DENIED
    live.clear()
    assert policy.decide("tcp", "10.250.0.9", 80) == Allow(ip("10.250.0.9"), 80)


def test_an_earlier_step_of_another_reading_wins() -> None:
    """Teredo names two IPv4 addresses: a host address (server) and a denied network
    (client); the deny rule is the reason, whichever comes first in the address."""
    policy = Policy(host_addresses=frozenset({ip("192.0.2.1")}),
                    rules=rules("198.51.100.0/24", action="deny"))
    assert policy.decide("tcp", "2001:0:c000:201::39cc:9bfe", 80) == Deny("deny rule")
    # and a host address spelled in IPv6 is denied as one when nothing else applies
    assert policy.decide("tcp", "2001:0:c000:201::34ff:8efa", 80) == HOST_DENIED


def test_only_allowed_outside_flows_are_looked_up() -> None:
    """The lookup (a syscall at run time) is skipped for flows decided without it."""
    asked: list[object] = []

    class Recording:
        def __contains__(self, address: object) -> bool:
            asked.append(address)
            return False

    policy = Policy(host_addresses=Recording(), rules=rules("198.51.100.0/24", action="deny"))
    for protocol, dst, port in (("tcp", "127.0.0.1", 80), ("tcp", "10.0.2.2", 80),
                                ("udp", "10.0.2.3", 53), ("tcp", "198.51.100.1", 80),
                                ("tcp", "169.254.169.254", 80), ("icmp", "10.0.2.2", None)):
        policy.decide(protocol, dst, port)
    assert asked == []
    on = Policy(allow_host_access=True, host_addresses=Recording())
    on.decide("tcp", OUTSIDE_V4, 80)
    assert asked == []


@pytest.mark.parametrize("access", [False, True])
@pytest.mark.parametrize("gateway", ["10.0.2.2", "fd00::2"])
def test_the_gateway_answers_ping_itself(access: bool, gateway: str) -> None:
    """Echo to the gateway is answered by the gateway (nothing is dialed: the decision
    names the gateway, not the host's loopback), with host access off or on."""
    policy = Policy(allow_host_access=access, host_addresses=HOST)
    assert policy.decide("icmp", gateway, None) == Allow(ip(gateway), 0)
    assert policy.denied == {}
    # a deny rule still holds for it, as for every other flow to the gateway
    denied = Policy(allow_host_access=access, rules=rules("icmp:10.0.2.2", action="deny"))
    assert denied.decide("icmp", gateway, None) == Deny("deny rule")


def test_a_spelling_of_the_gateway_is_not_the_gateway_for_ping() -> None:
    """NAT64 of 10.0.2.2 is dialed by the host's translator, never answered as the
    gateway: it stays denied."""
    for access in (False, True):
        policy = Policy(allow_host_access=access)
        assert policy.decide("icmp", "64:ff9b::a00:202", None) == Deny("namespace network")
