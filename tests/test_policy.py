"""The user-mode firewall: every way to reach the host's loopback or other places a
namespace must not reach is tried, rule parsing is checked with its messages, and the
virtual network's addresses are parsed from user text.  Sans-IO: no sockets needed.
"""

from __future__ import annotations

import ipaddress

import pytest

from nsbridge.errors import UserError
from nsbridge.usernet.policy import (
    Allow,
    AllowResolver,
    Deny,
    Policy,
    Rule,
    UsernetAddresses,
)

LOOP4 = ipaddress.ip_address("127.0.0.1")
LOOP6 = ipaddress.ip_address("::1")

# (protocol, destination, port, reason with host loopback off)
BYPASSES = [
    ("tcp", "127.0.0.1", 80, "loopback"),
    ("tcp", "127.1.2.3", 80, "loopback"),
    ("udp", "127.0.0.53", 53, "loopback"),
    ("icmp", "127.0.0.1", None, "loopback"),
    ("tcp", "::1", 80, "loopback"),
    ("tcp", "::ffff:127.0.0.1", 80, "ipv4-mapped address"),
    ("udp", "::ffff:10.0.2.2", 53, "ipv4-mapped address"),
    ("tcp", "::ffff:192.0.2.1", 80, "ipv4-mapped address"),
    ("tcp", "::127.0.0.1", 80, "ipv4-compatible address"),
    ("tcp", "::10.0.2.2", 80, "ipv4-compatible address"),
    ("tcp", "64:ff9b::127.0.0.1", 80, "nat64 of a special address"),
    ("tcp", "0.0.0.0", 80, "unspecified address"),
    ("udp", "0.1.2.3", 80, "unspecified address"),
    ("tcp", "::", 80, "unspecified address"),
    ("icmp", "::", None, "unspecified address"),
    ("tcp", "10.0.2.2", 22, "host loopback disabled"),
    ("tcp", "10.0.2.2", 80, "host loopback disabled"),
    ("udp", "10.0.2.2", 53, "host loopback disabled"),
    ("udp", "10.0.2.2", 65535, "host loopback disabled"),
    ("icmp", "10.0.2.2", None, "host loopback disabled"),
    ("tcp", "fd00::2", 443, "host loopback disabled"),
    ("icmp", "fd00::2", None, "host loopback disabled"),
    ("udp", "255.255.255.255", 67, "broadcast or reserved"),
    ("udp", "10.0.2.255", 137, "broadcast or reserved"),
    ("udp", "240.0.0.1", 9, "broadcast or reserved"),
    ("udp", "224.0.0.251", 5353, "multicast"),
    ("udp", "239.255.255.250", 1900, "multicast"),
    ("icmp", "224.0.0.1", None, "multicast"),
    ("udp", "ff02::1", 547, "multicast"),
    ("udp", "ff05::1:3", 547, "multicast"),
    ("tcp", "192.0.2.1", 0, "port 0"),
    ("udp", "2001:db8::1", 0, "port 0"),
    ("tcp", "10.0.2.2", 0, "port 0"),
    ("tcp", "169.254.169.254", 80, "link-local"),
    ("icmp", "169.254.1.1", None, "link-local"),
    ("tcp", "fe80::1", 80, "link-local"),
    ("tcp", "10.0.2.50", 80, "namespace network"),
    ("tcp", "10.0.2.100", 80, "namespace network"),
    ("tcp", "10.0.2.0", 80, "namespace network"),
    ("tcp", "fd00::1234", 80, "namespace network"),
    ("tcp", "10.0.2.3", 80, "dns address: port 53 only"),
    ("udp", "10.0.2.3", 5353, "dns address: port 53 only"),
    ("tcp", "fd00::3", 853, "dns address: port 53 only"),
    ("icmp", "10.0.2.3", None, "dns address: port 53 only"),
]
GATEWAY = {"10.0.2.2": LOOP4, "fd00::2": LOOP6}


def _id(case: tuple) -> str:
    return f"{case[0]}-{case[1]}-{case[2]}"


@pytest.mark.parametrize(("protocol", "dst", "port", "reason"), BYPASSES, ids=map(_id, BYPASSES))
def test_bypass_denied_with_loopback_off(protocol: str, dst: str, port: int, reason: str) -> None:
    policy = Policy()
    assert policy.decide(protocol, dst, port) == Deny(reason)
    assert policy.denied == {reason: 1}
    # the same, handed over as packed bytes straight from the packet parser
    assert policy.decide(protocol, ipaddress.ip_address(dst).packed, port) == Deny(reason)


@pytest.mark.parametrize(("protocol", "dst", "port", "reason"), BYPASSES, ids=map(_id, BYPASSES))
def test_bypass_with_loopback_on(protocol: str, dst: str, port: int, reason: str) -> None:
    """Only the gateway opens up (mapped to loopback, same port); nothing else does."""
    decision = Policy(allow_host_loopback=True).decide(protocol, dst, port)
    if dst in GATEWAY and reason == "host loopback disabled":
        assert decision == Allow(GATEWAY[dst], port or 0)
    else:
        assert decision == Deny(reason)


def test_allow_rules_cannot_open_the_never_list() -> None:
    """Even allow-everything rules (and rules naming loopback) change no denial above."""
    rules = [Rule.parse("allow", text) for text in ("0.0.0.0/0", "::/0", "127.0.0.0/8", "::1")]
    policy = Policy(rules=rules)
    for protocol, dst, port, reason in BYPASSES:
        assert policy.decide(protocol, dst, port) == Deny(reason), (protocol, dst, port)


def test_defaults() -> None:
    policy = Policy()
    assert policy.decide("tcp", "192.0.2.1", 443) == Allow(ipaddress.ip_address("192.0.2.1"), 443)
    assert policy.decide("udp", "2001:db8::1", 123) == Allow(
        ipaddress.ip_address("2001:db8::1"), 123
    )
    assert policy.decide("icmp", "198.51.100.1", None) == Allow(
        ipaddress.ip_address("198.51.100.1"), 0
    )
    assert policy.decide("udp", "10.0.2.3", 53) == AllowResolver(4)
    assert policy.decide("tcp", "fd00::3", 53) == AllowResolver(6)
    assert policy.allowed == 5 and not policy.denied
    assert policy.describe() == "host loopback denied"
    with pytest.raises(ValueError, match="unknown protocol"):
        policy.decide("sctp", "192.0.2.1", 80)


def test_default_addresses_are_slirp4netns_ones() -> None:
    a = UsernetAddresses()
    assert (str(a.network), str(a.namespace), str(a.gateway), str(a.dns)) == (
        "10.0.2.0/24",
        "10.0.2.100",
        "10.0.2.2",
        "10.0.2.3",
    )
    assert (str(a.network6), str(a.namespace6), str(a.gateway6), str(a.dns6)) == (
        "fd00::/64",
        "fd00::100",
        "fd00::2",
        "fd00::3",
    )
    assert a.mtu == 65520
    assert UsernetAddresses.parse() == a


# ---- rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "text", "shown"),
    [
        ("allow", "10.0.0.0/8", "allow 10.0.0.0/8"),
        ("deny", "192.0.2.1:443", "deny 192.0.2.1/32:443"),
        ("allow", "tcp:0.0.0.0/0:22", "allow tcp:0.0.0.0/0:22"),
        ("deny", "udp:[2001:db8::]/32:53", "deny udp:[2001:db8::]/32:53"),
        ("deny", "udp:[2001:db8::/32]:53", "deny udp:[2001:db8::]/32:53"),
        ("deny", "2001:db8::/32", "deny 2001:db8::/32"),
        ("deny", "[::1]", "deny ::1/128"),
        ("allow", "icmp:198.51.100.0/24", "allow icmp:198.51.100.0/24"),
        ("allow", "TCP:192.0.2.0/24:8000-8080", "allow tcp:192.0.2.0/24:8000-8080"),
        ("deny", "::ffff:10.0.0.0/104", "deny 10.0.0.0/8"),
    ],
)
def test_rule_parse(action: str, text: str, shown: str) -> None:
    assert str(Rule.parse(action, text)) == shown


@pytest.mark.parametrize(
    ("action", "text", "message"),
    [
        ("permit", "10.0.0.0/8", "permit 10.0.0.0/8: action must be allow or deny, not 'permit'"),
        ("deny", "10.0.0.1/8", "deny 10.0.0.1/8: 10.0.0.1/8: not a network (host bits set; did"),
        ("deny", "10.0.0.0/33", "prefix length /33 is not 0-32 for IPv4"),
        ("deny", "example.com", "deny example.com: example.com: not a network"),
        ("deny", "", "deny '': '': not a network"),
        ("deny", "tcp:", "deny tcp:: '': not a network"),
        ("deny", "sctp:10.0.0.0/8", "deny sctp:10.0.0.0/8: unknown protocol 'sctp'"),
        ("allow", "192.0.2.1:0", "allow 192.0.2.1:0: port '0' is not 1-65535"),
        ("allow", "192.0.2.1:70000", "port '70000' is not 1-65535"),
        ("allow", "192.0.2.1:", "port '' is not 1-65535"),
        ("allow", "192.0.2.1:http", "port 'http' is not 1-65535"),
        ("allow", "tcp:192.0.2.1:90-80", "port range 90-80 is backwards"),
        ("allow", "icmp:192.0.2.1:7", "allow icmp:192.0.2.1:7: icmp has no ports"),
        ("deny", "[2001:db8::/32:53", "missing ']'"),
        ("deny", "[2001:db8::]x:53", "unexpected 'x:53' after ']'"),
        ("deny", "[2001:db8::]53", "unexpected '53' after ']'"),
        ("deny", "dead:beef::/32:53", "dead:beef::/32:53: not a network"),
    ],
)
def test_rule_parse_errors(action: str, text: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        Rule.parse(action, text)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_rule_parse_names_the_option() -> None:
    with pytest.raises(UserError, match=r"^--usernet-deny 10\.0\.0\.0/99: "):
        Rule.parse("deny", "10.0.0.0/99", what="--usernet-deny")


def test_rule_matching() -> None:
    rule = Rule.parse("deny", "tcp:192.0.2.0/24:8000-8080")
    assert rule.matches("tcp", ipaddress.ip_address("192.0.2.9"), 8000)
    assert rule.matches("tcp", ipaddress.ip_address("192.0.2.9"), 8080)
    assert not rule.matches("tcp", ipaddress.ip_address("192.0.2.9"), 8081)
    assert not rule.matches("udp", ipaddress.ip_address("192.0.2.9"), 8000)
    assert not rule.matches("tcp", ipaddress.ip_address("192.0.3.9"), 8000)
    assert not rule.matches("tcp", ipaddress.ip_address("2001:db8::1"), 8000)
    any_port = Rule.parse("deny", "192.0.2.0/24")
    assert any_port.matches("icmp", ipaddress.ip_address("192.0.2.1"), None)


# ---- deny wins, allow lists, rules on every name ------------------------------------


@pytest.mark.parametrize("order", ["allow-first", "deny-first"])
def test_deny_wins(order: str) -> None:
    rules = [Rule.parse("allow", "10.0.0.0/8"), Rule.parse("deny", "10.1.0.0/16")]
    if order == "deny-first":
        rules.reverse()
    policy = Policy(rules=rules)
    assert policy.decide("tcp", "10.1.2.3", 80) == Deny("deny rule")
    assert policy.decide("tcp", "10.2.2.3", 80) == Allow(ipaddress.ip_address("10.2.2.3"), 80)
    assert policy.decide("tcp", "192.0.2.1", 80) == Deny("not in allow rules")
    assert policy.denied == {"deny rule": 1, "not in allow rules": 1}


def test_allow_list_does_not_cover_dns_and_gateway() -> None:
    """Allow rules pick outside destinations; the built-in services keep their switches."""
    policy = Policy(allow_host_loopback=True, rules=[Rule.parse("allow", "tcp:192.0.2.0/24:443")])
    assert policy.decide("udp", "10.0.2.3", 53) == AllowResolver(4)
    assert policy.decide("tcp", "10.0.2.2", 8080) == Allow(LOOP4, 8080)
    assert policy.decide("udp", "192.0.2.1", 443) == Deny("not in allow rules")
    assert policy.decide("tcp", "192.0.2.1", 443) == Allow(ipaddress.ip_address("192.0.2.1"), 443)


def test_deny_rules_see_the_dialed_address() -> None:
    """With loopback on, ``deny 127.0.0.1:22`` and ``deny 10.0.2.2:22`` both hold."""
    for text in ("tcp:127.0.0.1:22", "tcp:10.0.2.2:22", "127.0.0.0/8", "[::1]:22"):
        policy = Policy(allow_host_loopback=True, rules=[Rule.parse("deny", text)])
        v4 = "10.0.2.2" if "::1" not in text else "fd00::2"
        assert policy.decide("tcp", v4, 22) == Deny("deny rule"), text
    policy = Policy(allow_host_loopback=True, rules=[Rule.parse("deny", "tcp:127.0.0.1:22")])
    assert policy.decide("tcp", "10.0.2.2", 80) == Allow(LOOP4, 80)


def test_deny_rules_see_nat64_embedded_ipv4() -> None:
    policy = Policy(rules=[Rule.parse("deny", "198.51.100.0/24")])
    assert policy.decide("tcp", "64:ff9b::198.51.100.7", 80) == Deny("deny rule")
    assert policy.decide("tcp", "64:ff9b::192.0.2.7", 80) == Allow(
        ipaddress.ip_address("64:ff9b::c000:207"), 80
    )


def test_dns_can_be_denied() -> None:
    policy = Policy(rules=[Rule.parse("deny", "udp:10.0.2.3:53")])
    assert policy.decide("udp", "10.0.2.3", 53) == Deny("deny rule")
    assert policy.decide("tcp", "10.0.2.3", 53) == AllowResolver(4)


def test_link_local_needs_an_explicit_rule() -> None:
    broad = Policy(rules=[Rule.parse("allow", "0.0.0.0/0")])
    assert broad.decide("tcp", "169.254.169.254", 80) == Deny("link-local")
    explicit = Policy(rules=[Rule.parse("allow", "tcp:169.254.169.254:80")])
    assert explicit.decide("tcp", "169.254.169.254", 80) == Allow(
        ipaddress.ip_address("169.254.169.254"), 80
    )
    assert explicit.decide("tcp", "169.254.169.254", 81) == Deny("link-local")
    v6 = Policy(rules=[Rule.parse("allow", "fe80::/10")])
    assert v6.decide("tcp", "fe80::1", 80) == Deny("link-local")


def test_counters() -> None:
    policy = Policy()
    for _ in range(3):
        policy.decide("tcp", "127.0.0.1", 80)
    policy.decide("udp", "224.0.0.251", 5353)
    policy.decide("tcp", "192.0.2.1", 80)
    assert policy.denied == {"loopback": 3, "multicast": 1}
    assert policy.allowed == 1


def test_custom_addresses() -> None:
    addresses = UsernetAddresses.parse(network="10.0.3.0/24", network6="fd01::/64")
    policy = Policy(allow_host_loopback=True, addresses=addresses)
    assert policy.decide("tcp", "10.0.3.2", 80) == Allow(LOOP4, 80)
    assert policy.decide("udp", "10.0.3.3", 53) == AllowResolver(4)
    assert policy.decide("tcp", "fd01::2", 80) == Allow(LOOP6, 80)
    assert policy.decide("tcp", "10.0.3.9", 80) == Deny("namespace network")
    assert policy.decide("udp", "10.0.3.255", 9) == Deny("broadcast or reserved")
    # the default network is ordinary outside space now
    assert policy.decide("tcp", "10.0.2.2", 80) == Allow(ipaddress.ip_address("10.0.2.2"), 80)


def test_accepts_source() -> None:
    policy = Policy()
    for good in ("10.0.2.100", "10.0.2.15", "fd00::100", "fd00::abcd"):
        assert policy.accepts_source(ipaddress.ip_address(good).packed), good
    for bad in ("10.0.2.2", "10.0.2.3", "10.0.2.255", "10.0.2.0", "fd00::2", "192.0.2.1", "::1"):
        assert not policy.accepts_source(ipaddress.ip_address(bad)), bad


# ---- addresses from user text -------------------------------------------------------


def test_addresses_parse() -> None:
    a = UsernetAddresses.parse(
        network="192.168.77.0/24",
        namespace="192.168.77.10",
        gateway="192.168.77.1",
        dns6="fd00::53",
        mtu="1500",
    )
    assert str(a.namespace) == "192.168.77.10" and str(a.gateway) == "192.168.77.1"
    assert str(a.dns) == "192.168.77.3" and str(a.dns6) == "fd00::53" and a.mtu == 1500
    small = UsernetAddresses.parse(network="10.9.0.0/25")
    assert str(small.namespace) == "10.9.0.100"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"network": "10.0.2.0/33"}, "usernet network 10.0.2.0/33: not a network"),
        ({"network": "10.0.2.1/24"}, "host bits set; did you mean 10.0.2.0/24?"),
        ({"network": "fd00::/64"}, "usernet network fd00::/64: not an IPv4 network"),
        ({"network6": "10.0.0.0/8"}, "usernet network6 10.0.0.0/8: not an IPv6 network"),
        ({"network": "10.0.2.0/26"}, "usernet network 10.0.2.0/26: too small for the default"),
        ({"network6": "fd00::/120"}, "usernet network6 fd00::/120: too small for the default"),
        ({"namespace": "10.0.3.100"}, "usernet namespace 10.0.3.100: not a host address in"),
        ({"namespace": "10.0.2.255"}, "usernet namespace 10.0.2.255: not a host address in"),
        ({"gateway": "10.0.2.0"}, "usernet gateway 10.0.2.0: not a host address in"),
        ({"dns": "ten"}, "usernet dns 'ten': not an IP address"),
        ({"dns": "10.0.2.2"}, "usernet dns 10.0.2.2: same address as gateway"),
        ({"gateway6": "fd00::100"}, "usernet gateway6 fd00::100: same address as namespace6"),
        ({"mtu": "abc"}, "usernet mtu 'abc': not a number from 1280 to 65520"),
        ({"mtu": 576}, "usernet mtu '576': not a number from 1280 to 65520"),
        ({"mtu": "70000"}, "usernet mtu '70000'"),
    ],
)
def test_addresses_parse_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as caught:
        UsernetAddresses.parse(**kwargs)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)
