"""The user-mode firewall: every way to reach the host's loopback or other places a
namespace must not reach is tried, rule parsing is checked with its messages, and the
virtual network's addresses are parsed from user text.  Sans-IO: no sockets needed.
"""

from __future__ import annotations

import ipaddress

import pytest

from nsbridge.errors import UserError
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.policy import Allow, AllowResolver, Deny, Policy
from nsbridge.usernet.proto.rules import Rule
from nsbridge.usernet.proto.spellings import embedded_ipv4, nat64_embedded, parse_nat64_prefix

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
    ("tcp", "fd00::2", 443, "host loopback disabled"),
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
    # IPv6 spellings of special IPv4 addresses (a translator on the host's path)
    ("tcp", "::ffff:0:7f00:1", 80, "siit of a special address"),
    ("tcp", "2002:7f00:1::1", 80, "6to4 of a special address"),
    ("udp", "2002:e000:fb::1", 5353, "6to4 of a special address"),  # 224.0.0.251
    ("tcp", "2001:0:c000:201:0:0:80ff:fffe", 80, "teredo of a special address"),  # client
    ("tcp", "2001:0:7f00:1:0:0:3fff:fefe", 80, "teredo of a special address"),  # server
    ("icmp", "64:ff9b::ffff:ffff", None, "nat64 of a special address"),
    # the local-use NAT64 range has no fixed layout: only a named prefix opens it
    ("tcp", "64:ff9b:1::7f00:1", 80, "nat64 prefix not named"),
    ("tcp", "64:ff9b:1::c000:201", 80, "nat64 prefix not named"),
    ("tcp", "64:ff9b:1:c000:2:100::", 80, "nat64 prefix not named"),
    # ... and of metadata, the DNS address and the namespace network
    ("tcp", "64:ff9b::a9fe:a9fe", 80, "link-local"),
    ("tcp", "2002:a9fe:a9fe::1", 80, "link-local"),
    ("udp", "::ffff:0:a9fe:a9fe", 53, "link-local"),
    ("tcp", "64:ff9b::a00:203", 53, "namespace network"),
    ("tcp", "64:ff9b::a00:232", 80, "namespace network"),
    ("tcp", "2002:a00:264::1", 80, "namespace network"),
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
    assert policy.describe() == "host access denied"
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


@pytest.mark.parametrize("rule", ["udp:10.0.2.3:53", "udp:[fd00::3]:53", "udp:10.0.2.0/24"])
def test_a_rule_on_the_dns_address_covers_both_families(rule: str) -> None:
    """The DNS service is one service, like the gateway: a rule naming it in one family
    holds for the other family's DNS address too."""
    policy = Policy(rules=[Rule.parse("deny", rule)])
    assert policy.decide("udp", "10.0.2.3", 53) == Deny("deny rule")
    assert policy.decide("udp", "fd00::3", 53) == Deny("deny rule")
    assert policy.decide("tcp", "fd00::3", 53) == AllowResolver(6)


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
        ({"mtu": "abc"}, "--mtu 'abc': not a number from 1280 to 65520"),
        ({"mtu": 576}, "--mtu '576': not a number from 1280 to 65520"),
        ({"mtu": "70000"}, "--mtu '70000'"),
    ],
)
def test_addresses_parse_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as caught:
        UsernetAddresses.parse(**kwargs)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


# ---- item: IPv6 spellings of IPv4 addresses -----------------------------------------

V4 = ipaddress.IPv4Address


@pytest.mark.parametrize(
    ("prefixlen", "spelled"),
    [  # RFC 6052 section 2.4's own examples of 192.0.2.33
        (32, "2001:db8:c000:221::"),
        (40, "2001:db8:1c0:2:21::"),
        (48, "2001:db8:122:c000:2:2100::"),
        (56, "2001:db8:122:3c0:0:221::"),
        (64, "2001:db8:122:344:c0:2:2100:0"),
        (96, "2001:db8:122:344::192.0.2.33"),
    ],
)
def test_nat64_embedded_follows_rfc6052(prefixlen: int, spelled: str) -> None:
    assert nat64_embedded(ipaddress.IPv6Address(spelled), prefixlen) == V4("192.0.2.33")


def test_nat64_embedded_refuses_other_lengths() -> None:
    with pytest.raises(ValueError, match="/80"):
        nat64_embedded(ipaddress.IPv6Address("2001:db8::"), 80)


@pytest.mark.parametrize(
    ("address", "readings"),
    [
        ("::ffff:10.250.0.2", [("ipv4-mapped", "10.250.0.2")]),
        ("::10.250.0.2", [("ipv4-compatible", "10.250.0.2")]),
        ("::ffff:0:afa:2", [("siit", "10.250.0.2")]),
        ("64:ff9b::afa:2", [("nat64", "10.250.0.2")]),
        ("2002:afa:2::1", [("6to4", "10.250.0.2")]),
        ("2002:afa:2:ffff:ffff:ffff:ffff:ffff", [("6to4", "10.250.0.2")]),
        # Teredo: server 192.0.2.1, client 10.250.0.2 (stored inverted)
        ("2001:0:c000:201:8000:f227:f505:fffd", [("teredo", "192.0.2.1"),
                                                 ("teredo", "10.250.0.2")]),
        # none: ordinary addresses, ::/::1, and local-use NAT64 without a named prefix
        ("2001:db8::1", []),
        ("::", []),
        ("::1", []),
        ("64:ff9b:1::afa:2", []),
        ("64:ff9b:0:0:1::afa:2", []),  # outside 64:ff9b::/96
        ("2003::1", []),
        ("2001:1::1", []),  # not Teredo (2001:0::/32)
    ],
)
def test_embedded_ipv4_every_spelling(address: str, readings: list[tuple[str, str]]) -> None:
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert [(spelling, str(ip)) for spelling, ip in found] == readings


def test_embedded_ipv4_named_prefixes() -> None:
    prefixes = [ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("2001:db8:64::/96")]
    got = embedded_ipv4(ipaddress.IPv6Address("64:ff9b:1:afa:0:200::"), prefixes)
    assert got == (("nat64", V4("10.250.0.2")),)  # /48: bits 48-63 and 72-87
    got = embedded_ipv4(ipaddress.IPv6Address("2001:db8:64::7f00:1"), prefixes)
    assert got == (("nat64", V4("127.0.0.1")),)
    # the well-known prefix is always read, named again or not (no duplicates)
    got = embedded_ipv4(ipaddress.IPv6Address("64:ff9b::7f00:1"), [ipaddress.IPv6Network(
        "64:ff9b::/96")])
    assert got == (("nat64", V4("127.0.0.1")),)


DENIED_NET = "10.250.0.0/24"
# every IPv6 spelling of 10.250.0.2 (in DENIED_NET), with NAT64 prefix 2001:db8:64::/64
SPELLINGS_OF_DENIED = [
    "64:ff9b::afa:2",  # NAT64 well-known prefix
    "::ffff:0:afa:2",  # SIIT
    "2002:afa:2::1",  # 6to4
    "2001:0:c000:201:0:0:f505:fffd",  # Teredo client
    "2001:0:afa:2:0:0:3fff:fefe",  # Teredo server
    "2001:db8:64:0:a:fa00:200:0",  # the named /64 prefix
]


@pytest.mark.parametrize("dst", SPELLINGS_OF_DENIED)
@pytest.mark.parametrize("protocol", ["tcp", "udp", "icmp"])
def test_spellings_of_a_denied_network_are_denied(protocol: str, dst: str) -> None:
    policy = Policy(rules=[Rule.parse("deny", DENIED_NET)],
                    nat64_prefixes=[parse_nat64_prefix("2001:db8:64::/64")])
    assert policy.decide(protocol, dst, 80) == Deny("deny rule")


def test_port_rules_hold_for_the_embedded_address() -> None:
    policy = Policy(rules=[Rule.parse("deny", "tcp:10.250.0.2:25")])
    assert policy.decide("tcp", "64:ff9b::afa:2", 25) == Deny("deny rule")
    assert policy.decide("tcp", "2002:afa:2::1", 26) == Allow(
        ipaddress.ip_address("2002:afa:2::1"), 26)
    assert policy.decide("udp", "::ffff:0:afa:2", 25) == Allow(
        ipaddress.ip_address("::ffff:0:afa:2"), 25)


def test_allowed_spellings_dial_the_ipv6_address() -> None:
    """The translator is on the host's path: dial what was asked, not the IPv4 address."""
    policy = Policy(rules=[Rule.parse("deny", DENIED_NET)])
    for dst in ("64:ff9b::c000:201", "2002:c000:201::1", "::ffff:0:c000:201"):
        assert policy.decide("tcp", dst, 443) == Allow(ipaddress.ip_address(dst), 443)


def test_deny_rules_on_the_ipv6_spelling_still_hold() -> None:
    policy = Policy(rules=[Rule.parse("deny", "2002::/16")])
    assert policy.decide("tcp", "2002:c000:201::1", 443) == Deny("deny rule")


def test_nat64_of_the_gateway_is_never_the_host_loopback() -> None:
    """The host's translator would take 64:ff9b::10.0.2.2 to whatever the host's network
    has at 10.0.2.2, not to the gateway: denied either way."""
    assert Policy().decide("tcp", "64:ff9b::a00:202", 80) == Deny("host loopback disabled")
    on = Policy(allow_host_loopback=True)
    assert on.decide("tcp", "64:ff9b::a00:202", 80) == Deny("namespace network")
    assert on.decide("udp", "2002:a00:203::1", 53) == Deny("namespace network")
    assert on.decide("tcp", "fd00::2", 80) == Allow(LOOP6, 80)


def test_allow_lists_need_both_readings() -> None:
    """At least as strict as both readings: an allow list must allow the IPv6 address
    and the IPv4 address it embeds."""
    v4_only = Policy(rules=[Rule.parse("allow", "192.0.2.0/24")])
    assert v4_only.decide("tcp", "64:ff9b::c000:201", 80) == Deny("not in allow rules")
    v6_only = Policy(rules=[Rule.parse("allow", "64:ff9b::/96")])
    assert v6_only.decide("tcp", "64:ff9b::c000:201", 80) == Deny("not in allow rules")
    both = Policy(rules=[Rule.parse("allow", "192.0.2.0/24"), Rule.parse("allow", "64:ff9b::/96")])
    assert both.decide("tcp", "64:ff9b::c000:201", 80) == Allow(
        ipaddress.ip_address("64:ff9b::c000:201"), 80)
    assert both.decide("tcp", "64:ff9b::c633:6401", 80) == Deny("not in allow rules")


def test_metadata_spelling_needs_its_explicit_rule() -> None:
    broad = Policy(rules=[Rule.parse("allow", "*")])
    assert broad.decide("tcp", "64:ff9b::a9fe:a9fe", 80) == Deny("link-local")
    explicit = Policy(rules=[Rule.parse("allow", "tcp:169.254.169.254:80"),
                             Rule.parse("allow", "64:ff9b::/96")])
    assert explicit.decide("tcp", "64:ff9b::a9fe:a9fe", 80) == Allow(
        ipaddress.ip_address("64:ff9b::a9fe:a9fe"), 80)
    assert explicit.decide("tcp", "64:ff9b::a9fe:a9fe", 81) == Deny("link-local")


def test_named_local_use_prefix_opens_it_in_its_own_layout() -> None:
    policy = Policy(rules=[Rule.parse("deny", DENIED_NET)],
                    nat64_prefixes=[parse_nat64_prefix("64:ff9b:1::/96")])
    assert policy.decide("tcp", "64:ff9b:1::afa:2", 80) == Deny("deny rule")
    assert policy.decide("tcp", "64:ff9b:1::7f00:1", 80) == Deny("nat64 of a special address")
    assert policy.decide("tcp", "64:ff9b:1::a9fe:a9fe", 80) == Deny("link-local")
    assert policy.decide("tcp", "64:ff9b:1::c000:201", 80) == Allow(
        ipaddress.ip_address("64:ff9b:1::c000:201"), 80)
    # the rest of the local-use range is still unknown
    assert policy.decide("tcp", "64:ff9b:1:1::c000:201", 80) == Deny("nat64 prefix not named")
    slash48 = Policy(rules=[Rule.parse("deny", DENIED_NET)],
                     nat64_prefixes=[parse_nat64_prefix("64:ff9b:1::/48")])
    assert slash48.decide("tcp", "64:ff9b:1:afa:0:200::", 80) == Deny("deny rule")
    assert slash48.decide("tcp", "64:ff9b:1:c000:2:100::", 80) == Allow(
        ipaddress.ip_address("64:ff9b:1:c000:2:100::"), 80)
    assert slash48.describe() == "host access denied; deny 10.250.0.0/24; nat64 prefix " \
        "64:ff9b:1::/48"


@pytest.mark.parametrize("text", ["64:ff9b:1::/96", "2001:db8::/32", "2001:db8:100::/40",
                                  "64:ff9b:1::/48", "2001:db8:0:100::/56", "2001:db8::/64"])
def test_parse_nat64_prefix(text: str) -> None:
    assert str(parse_nat64_prefix(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("64:ff9b:1::", "--nat64-prefix 64:ff9b:1::: give the prefix with its length"),
        ("64:ff9b:1::/80", "--nat64-prefix 64:ff9b:1::/80: a NAT64 prefix is /32, /40, /48, "
                           "/56, /64 or /96 (RFC 6052), not /80"),
        ("64:ff9b::/16", "not a network (host bits set"),
        ("64:ff9b:1::/129", "prefix length /129 is not 0-128"),
        ("10.0.0.0/8", "--nat64-prefix 10.0.0.0/8: not an IPv6 prefix"),
        ("::ffff:0:0/96", "not an IPv6 prefix"),  # IPv4-mapped is read as IPv4
        ("64:ff9b:1:0:100::/96", "bits 64-71 of a /96 NAT64 prefix must be zero"),
        ("nat64/96", "--nat64-prefix nat64/96: not a network"),
        ("", "--nat64-prefix '': give the prefix with its length"),
    ],
)
def test_parse_nat64_prefix_errors(text: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_nat64_prefix(text)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


# ---- item: a rule on the gateway or host loopback covers both families ---------------


@pytest.mark.parametrize("text", ["tcp:127.0.0.1:22", "[::1]:22", "10.0.2.2", "fd00::2",
                                  "127.0.0.0/8", "tcp:10.0.0.0/8:22", "tcp:*:22",
                                  "[fd00::]/64:22", "::1"])
@pytest.mark.parametrize("gateway", ["10.0.2.2", "fd00::2"])
def test_gateway_rules_cover_both_families(text: str, gateway: str) -> None:
    policy = Policy(allow_host_loopback=True, rules=[Rule.parse("deny", text)])
    assert policy.decide("tcp", gateway, 22) == Deny("deny rule")


def test_gateway_rules_keep_their_ports_and_names() -> None:
    policy = Policy(allow_host_loopback=True, rules=[Rule.parse("deny", "tcp:127.0.0.1:22"),
                                                      Rule.parse("deny", "127.0.0.2")])
    assert policy.decide("tcp", "fd00::2", 80) == Allow(LOOP6, 80)
    assert policy.decide("udp", "fd00::2", 22) == Allow(LOOP6, 22)
    assert policy.decide("tcp", "10.0.2.2", 80) == Allow(LOOP4, 80)
    icmp = Policy(allow_host_loopback=True, rules=[Rule.parse("deny", "icmp:10.0.2.2")])
    assert icmp.decide("icmp", "fd00::2", None) == Deny("deny rule")
    assert icmp.decide("tcp", "fd00::2", 22) == Allow(LOOP6, 22)


def test_gateway_rules_follow_cidr() -> None:
    addresses = UsernetAddresses.parse(network="10.0.3.0/24", network6="fd01::/64")
    moved = Policy(allow_host_loopback=True, addresses=addresses,
                   rules=[Rule.parse("deny", "10.0.3.2")])
    assert moved.decide("tcp", "fd01::2", 80) == Deny("deny rule")
    old = Policy(allow_host_loopback=True, addresses=addresses,
                 rules=[Rule.parse("deny", "10.0.2.2")])
    assert old.decide("tcp", "fd01::2", 80) == Allow(LOOP6, 80)


# ---- item: rules for both families ---------------------------------------------------


@pytest.mark.parametrize(
    ("action", "text", "shown"),
    [
        ("deny", "tcp:*:25", "deny tcp:*:25"),
        ("deny", "*:25", "deny *:25"),
        ("allow", "udp:*", "allow udp:*"),
        ("deny", "*", "deny *"),
        ("deny", "UDP:*:1000-2000", "deny udp:*:1000-2000"),
    ],
)
def test_every_address_rule_parse(action: str, text: str, shown: str) -> None:
    rule = Rule.parse(action, text)
    assert str(rule) == shown and rule.network is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*/8", "deny */8: '*' stands alone for every address of both families"),
        ("tcp:*/0:25", "'*' stands alone"),
        ("[*]:25", "deny [*]:25: '*' stands alone"),
        ("**", "'*' stands alone"),
        ("10.*", "'*' stands alone"),
        ("*:0", "port '0' is not 1-65535"),
        ("icmp:*:7", "deny icmp:*:7: icmp has no ports"),
        ("tcp:*:", "port '' is not 1-65535"),
    ],
)
def test_every_address_rule_misuse(text: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        Rule.parse("deny", text)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_address_rule_matches_both_families() -> None:
    policy = Policy(rules=[Rule.parse("deny", "tcp:*:25")])
    for dst in ("192.0.2.1", "2001:db8::1", "64:ff9b::c000:201"):
        assert policy.decide("tcp", dst, 25) == Deny("deny rule"), dst
        assert policy.decide("udp", dst, 25) == Allow(ipaddress.ip_address(dst), 25), dst
    assert policy.decide("icmp", "2001:db8::1", None) == Allow(
        ipaddress.ip_address("2001:db8::1"), 0)


def test_single_family_port_rules_warn() -> None:
    def warnings(*texts: str) -> list[str]:
        rules = [Rule.parse(text.split(" ")[0], text.split(" ")[1]) for text in texts]
        return Policy(rules=rules).single_family_port_rules()

    assert warnings("deny tcp:0.0.0.0/0:25") == [
        "deny tcp:0.0.0.0/0:25 covers IPv4 only: IPv6 flows to those ports are not denied "
        "by it; write tcp:*:25 for both families"]
    assert warnings("allow [::]/0:443") == [
        "allow [::]/0:443 covers IPv6 only: IPv4 flows to those ports are not allowed by "
        "it; write *:443 for both families"]
    # the other family covered by a twin, by *, by a wider rule: no warning
    assert warnings("deny tcp:0.0.0.0/0:25", "deny tcp:[::]/0:25") == []
    assert warnings("deny tcp:0.0.0.0/0:25", "deny *:20-30") == []
    assert warnings("deny tcp:0.0.0.0/0:25", "deny ::/0") == []
    assert warnings("deny tcp:*:25", "deny udp:*") == []
    # not covered: another protocol, narrower ports, the other action
    assert len(warnings("deny tcp:0.0.0.0/0:25", "deny udp:[::]/0:25")) == 2
    assert len(warnings("deny tcp:0.0.0.0/0:20-30", "deny tcp:[::]/0:25")) == 1
    assert len(warnings("deny tcp:0.0.0.0/0:25", "allow tcp:[::]/0:25")) == 2
    # rules without ports, and narrower networks, have no twin to look for
    assert warnings("deny 0.0.0.0/0", "deny tcp:192.0.2.0/24:25") == []
