"""PROXY protocol headers: byte-exact encoding, round trips through the parser, strict
rejection of malformed headers, and the addresses real sockets report (dual-stack
IPv4-mapped clients, IPv6, Unix) turned into the right header.
"""

from __future__ import annotations

import re
import socket
import threading

import pytest

from nsbridge.forward import proxy_protocol as pp
from nsbridge.forward.proxy_protocol import ProxyInfo, ProxyProtocolError

V4_SRC, V4_DST = ("192.0.2.1", 51000), ("198.51.100.2", 443)
V6_SRC, V6_DST = ("2001:db8::1", 1234, 0, 0), ("2001:db8::2", 80, 0, 0)
SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


# ---- encoding, byte-exact ---------------------------------------------------------------


def test_v1_tcp4() -> None:
    assert pp.encode_v1(V4_SRC, V4_DST, socket.AF_INET) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n"
    )


def test_v1_tcp6() -> None:
    assert pp.encode_v1(V6_SRC, V6_DST, socket.AF_INET6) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n"
    )


def test_v2_tcp4_byte_exact() -> None:
    expected = (
        SIG
        + bytes([0x21, 0x11, 0x00, 0x0C])  # v2 PROXY, TCP over IPv4, 12 address bytes
        + bytes([192, 0, 2, 1])
        + bytes([198, 51, 100, 2])
        + bytes([0xC7, 0x38])  # 51000
        + bytes([0x01, 0xBB])  # 443
    )
    assert pp.encode_v2(V4_SRC, V4_DST, socket.AF_INET) == expected


def test_v2_tcp6_byte_exact() -> None:
    expected = SIG + bytes.fromhex(
        "21"
        "21"
        "0024"
        "20010db8000000000000000000000001"
        "20010db8000000000000000000000002"
        "04d2"
        "0050"
    )
    assert pp.encode_v2(V6_SRC, V6_DST, socket.AF_INET6) == expected


@pytest.mark.parametrize(
    ("src", "dst", "family"),
    [
        ("/run/app.sock", "/run/nsbridge.sock", socket.AF_UNIX),
        (b"\0abstract", b"", socket.AF_UNIX),
        ("", "", socket.AF_UNIX),
        (V4_SRC, V4_DST, socket.AF_UNIX),  # the family decides, not the shape
        (("not-an-ip", 1), V4_DST, socket.AF_INET),
    ],
)
def test_non_ip_is_unknown_and_local(src: object, dst: object, family: int) -> None:
    assert pp.encode_v1(src, dst, family) == b"PROXY UNKNOWN\r\n"
    assert pp.encode_v2(src, dst, family) == SIG + bytes([0x20, 0x00, 0x00, 0x00])


def test_ipv4_mapped_becomes_tcp4() -> None:
    src = ("::ffff:1.2.3.4", 111, 0, 0)
    dst = ("::ffff:5.6.7.8", 222, 0, 0)
    assert pp.encode_v1(src, dst, socket.AF_INET6) == b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n"
    assert pp.encode_v2(src, dst, socket.AF_INET6) == pp.encode_v2(
        ("1.2.3.4", 111), ("5.6.7.8", 222), socket.AF_INET
    )


def test_mixed_ends_are_said_in_ipv6() -> None:
    header = pp.encode_v1(("::ffff:1.2.3.4", 1, 0, 0), ("2001:db8::9", 2, 0, 0), socket.AF_INET6)
    assert header == b"PROXY TCP6 ::ffff:1.2.3.4 2001:db8::9 1 2\r\n"
    info, _ = pp.parse(header)
    assert info is not None and info.source == ("::ffff:1.2.3.4", 1)
    info, _ = pp.parse(pp.encode_v2(("1.2.3.4", 1), ("2001:db8::9", 2, 0, 0), socket.AF_INET6))
    assert info is not None and info.source == ("::ffff:1.2.3.4", 1)


def test_ipv6_zone_is_dropped() -> None:
    header = pp.encode_v1(("fe80::1%lo", 5, 0, 1), ("fe80::2%lo", 6, 0, 1), socket.AF_INET6)
    assert header == b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n"


def test_encode_by_version() -> None:
    assert pp.encode(1, V4_SRC, V4_DST, socket.AF_INET) == pp.encode_v1(
        V4_SRC, V4_DST, socket.AF_INET
    )
    assert pp.encode(2, V4_SRC, V4_DST, socket.AF_INET) == pp.encode_v2(
        V4_SRC, V4_DST, socket.AF_INET
    )
    with pytest.raises(ValueError, match="expected 1 or 2"):
        pp.encode(3, V4_SRC, V4_DST, socket.AF_INET)


# ---- round trips --------------------------------------------------------------------


ROUND_TRIPS = [
    (V4_SRC, V4_DST, socket.AF_INET, socket.AF_INET, ("192.0.2.1", 51000), ("198.51.100.2", 443)),
    (V6_SRC, V6_DST, socket.AF_INET6, socket.AF_INET6, ("2001:db8::1", 1234), ("2001:db8::2", 80)),
    (
        ("::ffff:10.1.2.3", 40000, 0, 0),
        ("::ffff:127.0.0.1", 8080, 0, 0),
        socket.AF_INET6,
        socket.AF_INET,
        ("10.1.2.3", 40000),
        ("127.0.0.1", 8080),
    ),
]


@pytest.mark.parametrize("encoder", [pp.encode_v1, pp.encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    ("src", "dst", "family", "want_family", "want_src", "want_dst"),
    ROUND_TRIPS,
    ids=["ipv4", "ipv6", "mapped"],
)
def test_round_trip(encoder, src, dst, family, want_family, want_src, want_dst) -> None:
    payload = b"GET / HTTP/1.0\r\n\r\n"
    header = encoder(src, dst, family)
    info, consumed = pp.parse(header + payload)
    assert info is not None
    assert consumed == len(header)
    assert (header + payload)[consumed:] == payload
    assert info.version == (1 if encoder is pp.encode_v1 else 2)
    assert info.command == "PROXY"
    assert info.family == want_family
    assert info.transport == socket.SOCK_STREAM
    assert info.source == want_src
    assert info.destination == want_dst


@pytest.mark.parametrize("encoder", [pp.encode_v1, pp.encode_v2], ids=["v1", "v2"])
def test_round_trip_unknown(encoder) -> None:
    header = encoder("/run/client.sock", "/run/server.sock", socket.AF_UNIX)
    info, consumed = pp.parse(header + b"rest")
    assert consumed == len(header)
    assert info is not None
    assert info.family == socket.AF_UNSPEC
    assert info.source is None and info.destination is None
    assert info.command == ("PROXY" if encoder is pp.encode_v1 else "LOCAL")


@pytest.mark.parametrize(
    "header",
    [
        pp.encode_v1(V4_SRC, V4_DST, socket.AF_INET),
        pp.encode_v1(V6_SRC, V6_DST, socket.AF_INET6),
        pp.encode_v2(V4_SRC, V4_DST, socket.AF_INET),
        pp.encode_v2(V6_SRC, V6_DST, socket.AF_INET6),
        pp.encode_v2("", "", socket.AF_UNIX),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v2-local"],
)
def test_every_prefix_asks_for_more(header: bytes) -> None:
    """A server reading a few bytes at a time is told "more" until the header is whole."""
    for cut in range(len(header)):
        assert pp.parse(header[:cut]) == (None, 0), cut
    info, consumed = pp.parse(header)
    assert info is not None and consumed == len(header)


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    info, consumed = pp.parse(b"PROXY UNKNOWN ffff:f...f:ffff 1 2 3\r\nhello")
    assert info == ProxyInfo(1, "PROXY", socket.AF_UNSPEC, 0, None, None)
    assert consumed == len(b"PROXY UNKNOWN ffff:f...f:ffff 1 2 3\r\n")


def test_v1_longest_valid_line() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == pp.V1_MAX_LENGTH - 3  # the spec's 107 allows for "UNKNOWN"
    info, consumed = pp.parse(line)
    assert info is not None and info.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    assert consumed == len(line)


def test_v2_tlvs_and_local_addresses_ignored() -> None:
    tlvs = bytes([0x04, 0x00, 0x02]) + b"ab" + bytes([0x01, 0x00, 0x02]) + b"h2"
    block = bytes(12) + tlvs
    header = SIG + bytes([0x20, 0x11]) + len(block).to_bytes(2, "big") + block
    info, consumed = pp.parse(header + b"data")
    assert consumed == len(header)
    assert info == ProxyInfo(
        2, "LOCAL", socket.AF_INET, socket.SOCK_STREAM, None, None, ((4, b"ab"), (1, b"h2"))
    )


def test_v2_unix_and_udp() -> None:
    block = b"/run/a.sock".ljust(108, b"\0") + b"\0abstract".ljust(108, b"\0")
    header = SIG + bytes([0x21, 0x31]) + len(block).to_bytes(2, "big") + block
    info, _ = pp.parse(header)
    assert info is not None
    assert (info.family, info.transport) == (socket.AF_UNIX, socket.SOCK_STREAM)
    assert (info.source, info.destination) == (b"/run/a.sock", b"\0abstract")
    udp = SIG + bytes([0x21, 0x12, 0, 12]) + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 53, 0, 54])
    info, _ = pp.parse(udp)
    assert info is not None and info.transport == socket.SOCK_DGRAM
    assert (info.source, info.destination) == (("10.0.0.1", 53), ("10.0.0.2", 54))


# ---- rejection ----------------------------------------------------------------------


V1_BAD = {
    "http": (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    "lowercase": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    "no-space": (b"PROXY\r\n", "not a PROXY protocol header"),
    "bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\n", "unexpected byte 0x0a"),
    "cr-alone": (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "unexpected byte 0x0d"),
    "non-ascii": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "unexpected byte 0xff"),
    "proto": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol 'TCP5'"),
    "udp": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol 'UDP4'"),
    "few-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 111\r\n", "expected 'PROXY TCP4 SRC"),
    "many-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "expected 'PROXY TCP4 SRC"),
    "double-space": (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4 SRC"),
    "bad-v4": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address '1.2.3.256'"),
    "v6-in-tcp4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address '::1' is not IPv4"),
    "v4-in-tcp6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "destination address '5.6.7.8' is not IPv6"),
    "zone": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address 'fe80::1%eth0'"),
    "port-big": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port '65536'"),
    "port-zero-pad": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "destination port '080'"),
    "port-sign": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port '+1'"),
    "port-empty": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "destination port ''"),
    "too-long": (b"PROXY UNKNOWN " + b"x" * 100, "no CRLF within 107 bytes"),
}


@pytest.mark.parametrize(("data", "message"), V1_BAD.values(), ids=V1_BAD.keys())
def test_v1_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=re.escape(message)):
        pp.parse(data)


def _v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


V2_BAD = {
    "signature": (SIG[:11] + b"X" + bytes(4), "not a PROXY protocol header"),
    "version-1": (_v2(0x11, 0x11, bytes(12)), "version 1 is not 2"),
    "command-2": (_v2(0x22, 0x11, bytes(12)), "command 0x2 is not LOCAL (0) or PROXY (1)"),
    "family-0x13": (_v2(0x21, 0x13, bytes(12)), "family/transport byte 0x13"),
    "family-0x41": (_v2(0x21, 0x41, bytes(12)), "family/transport byte 0x41"),
    "transport-only": (_v2(0x21, 0x01, b""), "family/transport byte 0x01"),
    "short-v4": (_v2(0x21, 0x11, bytes(8)), "length 8 is too short for family 0x11"),
    "short-v6": (_v2(0x21, 0x21, bytes(12)), "length 12 is too short for family 0x21"),
    "short-unix": (_v2(0x21, 0x31, bytes(200)), "length 200 is too short for family 0x31"),
    "tlv-truncated": (_v2(0x21, 0x11, bytes(12) + b"\x04\x00"), "truncated TLV"),
    "tlv-overrun": (_v2(0x21, 0x11, bytes(12) + b"\x04\x00\x05ab"), "claims 5 bytes, 2 remain"),
}


@pytest.mark.parametrize(("data", "message"), V2_BAD.values(), ids=V2_BAD.keys())
def test_v2_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=re.escape(message)):
        pp.parse(data)


def test_bad_bytes_rejected_before_the_header_is_complete() -> None:
    """A server must not wait for 107 bytes (or a v2 length) that will never be valid."""
    with pytest.raises(ProxyProtocolError):
        pp.parse(b"PROXY TCP4 1.2\n")
    with pytest.raises(ProxyProtocolError, match="version 3"):
        pp.parse(SIG + b"\x31")
    with pytest.raises(ProxyProtocolError, match="0x99"):
        pp.parse(SIG + b"\x21\x99")
    with pytest.raises(ProxyProtocolError):
        pp.parse(b"\r\n\r\nX")
    with pytest.raises(ProxyProtocolError):
        pp.parse(b"PRX")
    assert pp.parse(b"") == (None, 0)


# ---- real sockets -------------------------------------------------------------------


def _accept_pair(family: int, host: str, client_host: str) -> tuple[socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection((client_host, port), timeout=10)
        server, _ = listener.accept()
    return client, server


def test_dual_stack_listener_reports_ipv4_client_as_tcp4() -> None:
    client, server = _accept_pair(socket.AF_INET6, "::", "127.0.0.1")
    with client, server:
        peer, local = server.getpeername(), server.getsockname()
        assert peer[0] == "::ffff:127.0.0.1"  # what the listener really reports
        want = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client.getsockname()[1]} {local[1]}\r\n"
        assert pp.encode_v1(peer, local, server.family) == want.encode()
        info, _ = pp.parse(pp.encode_v2(peer, local, server.family))
        assert info is not None and info.family == socket.AF_INET
        assert info.source == ("127.0.0.1", client.getsockname()[1])


def test_ipv6_loopback_client() -> None:
    client, server = _accept_pair(socket.AF_INET6, "::1", "::1")
    with client, server:
        header = pp.encode_v1(server.getpeername(), server.getsockname(), server.family)
        assert header.startswith(b"PROXY TCP6 ::1 ::1 ")


def test_unix_socket_client_is_unknown() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert pp.encode_v1(right.getpeername(), right.getsockname(), right.family) == (
            b"PROXY UNKNOWN\r\n"
        )


def test_target_server_parses_header_sent_in_pieces() -> None:
    """A real server reading 3 bytes at a time gets the header and the client's data."""
    listener = socket.create_server(("127.0.0.1", 0))
    result: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buffered = b""
            while True:
                buffered += conn.recv(3)
                info, consumed = pp.parse(buffered)
                if info is not None:
                    break
            rest = buffered[consumed:]
            while len(rest) < 5:
                rest += conn.recv(5)
            result["info"], result["rest"] = info, rest
            conn.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener, socket.create_connection(listener.getsockname(), timeout=10) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = pp.encode_v2(V6_SRC, V6_DST, socket.AF_INET6) + b"hello"
        for i in range(0, len(message), 2):
            client.sendall(message[i : i + 2])
        assert client.recv(2) == b"ok"
    thread.join(10)
    info = result["info"]
    assert isinstance(info, ProxyInfo)
    assert info.source == ("2001:db8::1", 1234)
    assert result["rest"] == b"hello"
