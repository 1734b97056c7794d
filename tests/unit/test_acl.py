"""Client access control: allow, deny, both; IPv4, IPv6 and IPv4-mapped clients; Unix
clients; and every kind of bad entry refused with a message naming it.  The last tests
use the sockaddrs real sockets report.
"""

from __future__ import annotations

import socket

import pytest

from nsbridge.errors import UserError
from nsbridge.net.acl import ClientAcl


def v4(host: str) -> tuple[str, int]:
    return (host, 40000)


def v6(host: str) -> tuple[str, int, int, int]:
    return (host, 40000, 0, 0)


def test_no_rules_permits_everyone() -> None:
    acl = ClientAcl.parse([], [])
    assert not acl
    for sockaddr in (v4("203.0.113.9"), v6("2001:db8::1"), "/run/x.sock", b"\0abs", ""):
        assert acl.permits(sockaddr)


def test_allow_only() -> None:
    acl = ClientAcl.parse(["10.0.0.0/8", "192.0.2.7", "fd00::/8"], [])
    assert acl
    assert acl.permits(v4("10.1.2.3"))
    assert acl.permits(v4("192.0.2.7"))
    assert not acl.permits(v4("192.0.2.8"))
    assert acl.permits(v6("fd12::1"))
    assert not acl.permits(v6("2001:db8::1"))
    assert not acl.permits(v4("11.0.0.1"))


def test_deny_only() -> None:
    acl = ClientAcl.parse([], ["203.0.113.0/24", "2001:db8::/32"])
    assert not acl.permits(v4("203.0.113.200"))
    assert acl.permits(v4("203.0.114.1"))
    assert not acl.permits(v6("2001:db8:1::5"))
    assert acl.permits(v6("2001:db9::5"))


def test_deny_wins_over_allow() -> None:
    acl = ClientAcl.parse(["10.0.0.0/8", "::1"], ["10.0.0.5", "10.9.0.0/16"])
    assert acl.permits(v4("10.0.0.4"))
    assert not acl.permits(v4("10.0.0.5"))
    assert not acl.permits(v4("10.9.1.1"))
    assert acl.permits(v6("::1"))
    assert not acl.permits(v4("127.0.0.1"))


def test_ipv4_mapped_client_matches_ipv4_rules() -> None:
    deny = ClientAcl.parse([], ["127.0.0.0/8"])
    assert not deny.permits(v6("::ffff:127.0.0.1"))
    assert not deny.permits(v4("127.0.0.1"))
    assert deny.permits(v6("::1"))
    allow = ClientAcl.parse(["192.0.2.0/24"], [])
    assert allow.permits(v6("::ffff:192.0.2.44"))
    assert not allow.permits(v6("::ffff:198.51.100.1"))


def test_mapped_rule_matches_ipv4_client() -> None:
    acl = ClientAcl.parse([], ["::ffff:10.0.0.0/104", "::ffff:192.0.2.1"])
    assert acl.deny == ClientAcl.parse([], ["10.0.0.0/8", "192.0.2.1/32"]).deny
    assert not acl.permits(v4("10.3.3.3"))
    assert not acl.permits(v6("::ffff:192.0.2.1"))
    assert acl.permits(v4("192.0.2.2"))


def test_ipv6_all_is_ipv6_only() -> None:
    acl = ClientAcl.parse(["::/0"], [])
    assert acl.permits(v6("2001:db8::1"))
    assert not acl.permits(v4("127.0.0.1"))
    assert not acl.permits(v6("::ffff:127.0.0.1"))


def test_zone_is_ignored_for_matching() -> None:
    acl = ClientAcl.parse(["fe80::/10"], [])
    assert acl.permits(("fe80::1%eth0", 1, 0, 2))


def test_unix_clients_only_without_allow_rules() -> None:
    for sockaddr in ("/run/client.sock", b"\0abstract", ""):
        assert ClientAcl.parse([], ["0.0.0.0/0", "::/0"]).permits(sockaddr)
        assert not ClientAcl.parse(["0.0.0.0/0"], []).permits(sockaddr)


BAD = {
    "octet": ("10.0.0.300/8", "--allow 10.0.0.300/8: not a network (10.0.0.300 is not an IPv4"),
    "name": ("localhost", "--allow localhost: not a network (localhost is not an IPv4 or IPv6"),
    "empty": ("", "--allow '': not a network (''"),
    "spaces": (" 10.0.0.0/8", "--allow ' 10.0.0.0/8': not a network"),
    "empty-address": ("/8", "--allow /8: not a network ('' is not"),
    "prefix-v4": ("10.0.0.0/33", "--allow 10.0.0.0/33: not a network (prefix length /33 is not "
                  "0-32 for IPv4)"),
    "prefix-v6": ("fd00::/129", "--allow fd00::/129: not a network (prefix length /129 is not "
                  "0-128 for IPv6)"),
    "prefix-empty": ("10.0.0.0/", "--allow 10.0.0.0/: not a network (prefix length / is not"),
    "netmask": ("10.0.0.0/255.0.0.0", "--allow 10.0.0.0/255.0.0.0: not a network (prefix "
                "length /255.0.0.0"),
    "prefix-sign": ("10.0.0.0/+8", "prefix length /+8"),
    "two-slashes": ("10.0.0.0/8/8", "prefix length /8/8"),
    "host-bits": ("10.0.0.1/8", "--allow 10.0.0.1/8: not a network (host bits set; did you mean "
                  "10.0.0.0/8?)"),
    "host-bits-v6": ("fd00::1/8", "did you mean fd00::/8?"),
    "zone": ("fe80::1%eth0", "--allow fe80::1%eth0: not a network (fe80::1%eth0 is not"),
    "leading-zero": ("010.0.0.0/8", "010.0.0.0 is not an IPv4 or IPv6 address"),
}


@pytest.mark.parametrize(("entry", "message"), BAD.values(), ids=BAD.keys())
def test_bad_entries(entry: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        ClientAcl.parse([entry], [])
    text = str(info.value)
    assert text.startswith("--allow "), text
    assert message in text, text
    assert "\n" not in text


def test_bad_deny_entry_names_deny() -> None:
    with pytest.raises(UserError, match=r"^--deny 192\.0\.2\.0/33: not a network"):
        ClientAcl.parse(["10.0.0.0/8"], ["192.0.2.0/33"])


def test_first_bad_entry_is_named() -> None:
    with pytest.raises(UserError, match=r"^--allow nope:"):
        ClientAcl.parse(["10.0.0.0/8", "nope", "also-bad"], [])


def test_custom_option_names() -> None:
    with pytest.raises(UserError, match=r"^allow\[1\] x: not a network"):
        ClientAcl.parse(["x"], [], allow_name="allow[1]")


# ---- sockaddrs from real sockets ----------------------------------------------------


def _accepted_peer(listen_host: str, connect_host: str) -> object:
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((listen_host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((connect_host, port), timeout=10):
            server, peer = listener.accept()
            server.close()
            return peer


def test_real_dual_stack_ipv4_client_is_denied_by_ipv4_rule() -> None:
    peer = _accepted_peer("::", "127.0.0.1")
    assert isinstance(peer, tuple) and peer[0] == "::ffff:127.0.0.1"
    assert not ClientAcl.parse([], ["127.0.0.0/8"]).permits(peer)
    assert ClientAcl.parse(["127.0.0.1"], []).permits(peer)


def test_real_ipv6_and_unix_clients() -> None:
    peer = _accepted_peer("::1", "::1")
    assert ClientAcl.parse(["::1"], []).permits(peer)
    assert not ClientAcl.parse([], ["::1/128"]).permits(peer)
    left, right = socket.socketpair()
    with left, right:
        assert ClientAcl.parse([], ["127.0.0.0/8"]).permits(right.getpeername())
        assert not ClientAcl.parse(["127.0.0.0/8"], []).permits(right.getpeername())
