"""``--bypass-exclude`` rules (usernet/proto/exclude.py), sans-IO: the policy's rule
grammar for TCP plus a bare port or range; bad rules refused with one line that names
the rule and the accepted forms; matching by address as asked, its IPv4 reading, port."""

from __future__ import annotations

import ipaddress

import pytest

from nsbridge.errors import UserError
from nsbridge.usernet.options import UsernetOptions, check_options
from nsbridge.usernet.proto.exclude import FORMS, ExcludeRules, parse_exclude


@pytest.mark.parametrize(("text", "shown"), [
    ("21", "*:21"),
    ("5060-5061", "*:5060-5061"),
    ("*:21", "*:21"),
    ("tcp:*:21", "tcp:*:21"),
    ("TCP:192.0.2.1:21", "tcp:192.0.2.1/32:21"),
    ("192.0.2.0/24", "192.0.2.0/24"),
    ("192.0.2.1:21", "192.0.2.1/32:21"),
    ("[2001:db8::1]:5060", "[2001:db8::1]/128:5060"),
    ("2001:db8::/32", "2001:db8::/32"),
])
def test_accepted_forms(text: str, shown: str) -> None:
    assert ExcludeRules.describe(parse_exclude(text)) == shown


@pytest.mark.parametrize(("text", "says"), [
    ("foo", "not a network"),
    ("0", "port '0'"),
    ("70000", "port '70000'"),
    ("21-", "not a network"),
    ("21-20", "backwards"),
    ("192.0.2.1:0", "port '0'"),
    ("192.0.2.1:21-20", "backwards"),
    ("udp:192.0.2.1", "only TCP"),
    ("icmp:192.0.2.1", "only TCP"),
    ("ftp:192.0.2.1", "unknown protocol"),
    ("*", "every connect"),
    ("tcp:*", "every connect"),
    ("", "not a network"),
    ("10.0.0.0/33", "prefix length"),
    ("[2001:db8::1:21", "missing ']'"),
    ("1.2.3.4 :21", "not a network"),
])
def test_bad_rules_get_one_line_with_the_forms(text: str, says: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_exclude(text)
    message = str(caught.value)
    assert "\n" not in message
    shown = text if text and " " not in text else repr(text)
    assert message.startswith(f"--bypass-exclude {shown}:")
    assert says in message and FORMS in message
    assert "udp:[" not in message  # the policy's own examples are not ours


def test_matching() -> None:
    rules = ExcludeRules.parse(["21", "198.51.100.0/24:5060-5061", "[2001:db8::7]:80"])
    v4 = ipaddress.ip_address
    assert ExcludeRules.describe(rules.match(21, v4("203.0.113.9"))) == "*:21"  # type: ignore[arg-type]
    assert rules.match(21, v4("2001:db8::9")) is not None  # * is both families
    assert rules.match(5061, v4("198.51.100.7")) is not None
    assert rules.match(5062, v4("198.51.100.7")) is None
    assert rules.match(5060, v4("198.51.101.7")) is None
    assert rules.match(80, v4("2001:db8::7")) is not None
    assert rules.match(80, v4("2001:db8::8")) is None
    # ::ffff:198.51.100.7 on an IPv6 socket: matched as asked or as its IPv4 reading
    mapped = v4("::ffff:198.51.100.7")
    assert rules.match(5060, mapped, v4("198.51.100.7")) is not None
    assert not ExcludeRules() and rules


def test_rules_need_bypass_and_are_checked_with_the_options() -> None:
    with pytest.raises(UserError, match="give --bypass too"):
        check_options(UsernetOptions(bypass_exclude=["21"]))
    with pytest.raises(UserError, match=r"--bypass-exclude udp:1\.2\.3\.4: only TCP"):
        check_options(UsernetOptions(bypass_exclude=["udp:1.2.3.4"]))
