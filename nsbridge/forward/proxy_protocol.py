"""HAProxy PROXY protocol headers (v1 text, v2 binary): build them and parse them.

A forward hides the client: the target sees nsbridge's address.  Sending a PROXY header
first tells a target that understands it (nginx ``proxy_protocol``, HAProxy, Postfix,
…) who the real client was.  Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Sans-IO on purpose: encoders return bytes and :func:`parse` takes bytes, so the relay
decides when to write, a test server decides when to read, and neither is tied to a
socket API here.

Address rules the encoders apply (the same for v1 and v2):

* both ends IPv4 -> ``TCP4`` / ``0x11``;
* an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, what a dual-stack ``[::]`` listener
  reports for IPv4 clients) counts as IPv4, so such a client is reported as ``TCP4`` with
  its real IPv4 address — a target comparing against IPv4 allow lists then works;
* otherwise both ends IPv6 (an IPv4 end mapped to ``::ffff:…``) -> ``TCP6`` / ``0x21``;
* anything that is not an IP socket address (a Unix-socket client, an unnamed socket) ->
  ``PROXY UNKNOWN`` / v2 ``LOCAL`` with family ``UNSPEC``: the target then uses the real
  connection's addresses, which is all that can be said honestly.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[str, int] | bytes  # (host, port) for IP, a sun_path for Unix

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the spec's worst case, "PROXY UNKNOWN ffff:…" including CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16  # signature, ver/cmd, fam/transport, 2-byte length

V2_VERSION = 0x20
V2_CMD_LOCAL = 0x00
V2_CMD_PROXY = 0x01
V2_TCP4 = 0x11
V2_TCP6 = 0x21
V2_UNSPEC = 0x00

# Family/transport bytes the spec defines; every other value must be rejected.
_V2_FAMILIES: dict[int, tuple[int, int]] = {
    0x00: (socket.AF_UNSPEC, 0),
    0x11: (socket.AF_INET, socket.SOCK_STREAM),
    0x12: (socket.AF_INET, socket.SOCK_DGRAM),
    0x21: (socket.AF_INET6, socket.SOCK_STREAM),
    0x22: (socket.AF_INET6, socket.SOCK_DGRAM),
    0x31: (socket.AF_UNIX, socket.SOCK_STREAM),
    0x32: (socket.AF_UNIX, socket.SOCK_DGRAM),
}
# Bytes of address block each family needs (UNIX: two 108-byte sun_path fields).
_V2_ADDRESS_LENGTH: dict[int, int] = {
    socket.AF_UNSPEC: 0,
    socket.AF_INET: 12,
    socket.AF_INET6: 36,
    socket.AF_UNIX: 216,
}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header; the message says which part is wrong."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said.

    ``command`` is ``"PROXY"`` (addresses are the real client's) or ``"LOCAL"`` (v2 only:
    the proxy's own connection, e.g. a health check).  ``family`` is ``socket.AF_INET``,
    ``AF_INET6``, ``AF_UNIX`` or ``AF_UNSPEC``; ``transport`` is ``socket.SOCK_STREAM``,
    ``SOCK_DGRAM`` or 0 when unknown.  ``source``/``destination`` are ``(host, port)`` for
    IP, raw ``bytes`` paths for Unix, and ``None`` when the header carries no addresses
    (v1 ``UNKNOWN``, v2 ``LOCAL`` or ``UNSPEC``) — then use the connection's own addresses.
    ``tlvs`` are v2's ``(type, value)`` extensions, unvalidated, in order.
    """

    version: int
    command: str
    family: int
    transport: int
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# ---- encoding ------------------------------------------------------------------------


def _ip_endpoint(sockaddr: object) -> tuple[IPAddress, int] | None:
    """``(address, port)`` of an AF_INET/AF_INET6 sockaddr, or None for anything else.

    The IPv6 zone (``fe80::1%eth0``) is dropped: it means nothing on the target's host.
    """
    if not (isinstance(sockaddr, tuple) and len(sockaddr) >= 2):
        return None
    host, port = sockaddr[0], sockaddr[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, port


def ip_text(address: IPAddress) -> str:
    """Canonical text, ``::ffff:1.2.3.4`` for mapped addresses on every Python version.

    ``str()`` gives ``::ffff:102:304`` before Python 3.13 and the dotted form after; a
    header's bytes must not depend on the interpreter.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _as_v6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address


def _endpoints(
    src: object, dst: object, family: int
) -> tuple[int, tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    """Pick the header family for a connection: AF_INET, AF_INET6, or None (unknown)."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    source, destination = _ip_endpoint(src), _ip_endpoint(dst)
    if source is None or destination is None:
        return None
    if source[0].version == 4 and destination[0].version == 4:
        return socket.AF_INET, source, destination
    # Mixed ends (only possible with hand-made sockaddrs): say both in IPv6 terms.
    return (
        socket.AF_INET6,
        (_as_v6(source[0]), source[1]),
        (_as_v6(destination[0]), destination[1]),
    )


def encode_v1(src: object, dst: object, family: int) -> bytes:
    """The v1 text line for a connection from ``src`` (client) to ``dst`` (the listener).

    ``src``/``dst`` are sockaddrs as ``getpeername()``/``getsockname()`` return them and
    ``family`` the listening socket's family.  ``PROXY UNKNOWN\\r\\n`` when they are not IP.
    """
    picked = _endpoints(src, dst, family)
    if picked is None:
        return b"PROXY UNKNOWN\r\n"
    fam, (src_ip, src_port), (dst_ip, dst_port) = picked
    proto = "TCP4" if fam == socket.AF_INET else "TCP6"
    src_text, dst_text = ip_text(src_ip), ip_text(dst_ip)
    return f"PROXY {proto} {src_text} {dst_text} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(src: object, dst: object, family: int) -> bytes:
    """The v2 binary header: ``PROXY`` + TCP4/TCP6, or ``LOCAL`` + ``UNSPEC`` when not IP."""
    picked = _endpoints(src, dst, family)
    if picked is None:
        return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION | V2_CMD_LOCAL, V2_UNSPEC, 0)
    fam, (src_ip, src_port), (dst_ip, dst_port) = picked
    block = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port)
    fam_byte = V2_TCP4 if fam == socket.AF_INET else V2_TCP6
    fixed = struct.pack("!BBH", V2_VERSION | V2_CMD_PROXY, fam_byte, len(block))
    return V2_SIGNATURE + fixed + block


def encode(version: int, src: object, dst: object, family: int) -> bytes:
    """``encode_v1`` or ``encode_v2`` by number, for a ``--proxy-protocol 1|2`` option."""
    if version == 1:
        return encode_v1(src, dst, family)
    if version == 2:
        return encode_v2(src, dst, family)
    raise ValueError(f"PROXY protocol version {version!r}: expected 1 or 2")


# ---- parsing -------------------------------------------------------------------------


def parse(data: bytes) -> tuple[ProxyInfo | None, int]:
    """Parse a PROXY header (v1 or v2) at the start of ``data``.

    Returns ``(info, consumed)``: the bytes after ``consumed`` are the client's own data.
    Returns ``(None, 0)`` while ``data`` is still a valid but incomplete header — read
    more and call again with everything so far.  Raises :class:`ProxyProtocolError` as
    soon as the bytes cannot be a header; the spec says to drop such a connection rather
    than guess, because a header an attacker shaped would otherwise spoof addresses.
    """
    data = bytes(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if not data:
        return None, 0
    raise ProxyProtocolError(f"not a PROXY protocol header (starts with {data[:8]!r})")


def _check_signature(data: bytes, signature: bytes) -> None:
    """Refuse as soon as the bytes so far stop matching ``signature``."""
    n = min(len(data), len(signature))
    if data[:n] != signature[:n]:
        raise ProxyProtocolError(f"not a PROXY protocol header (starts with {data[:8]!r})")


def _parse_v1(data: bytes) -> tuple[ProxyInfo | None, int]:
    _check_signature(data, V1_PREFIX)
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        # A bare LF or a control byte in what has arrived is fatal now; no need to wait.
        partial = data[: V1_MAX_LENGTH - 1]
        _check_v1_bytes(partial[:-1] if partial.endswith(b"\r") else partial)
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header: no CRLF within {V1_MAX_LENGTH} bytes")
        return None, 0
    line = data[:end]
    _check_v1_bytes(line)
    return _parse_v1_line(line.decode("ascii")), end + 2


def _check_v1_bytes(line: bytes) -> None:
    for byte in line:
        if not 0x20 <= byte <= 0x7E:
            raise ProxyProtocolError(f"v1 header: unexpected byte 0x{byte:02x} before CRLF")


def _parse_v1_line(line: str) -> ProxyInfo:
    fields = line.split(" ")
    proto = fields[1] if len(fields) > 1 else ""
    if proto == "UNKNOWN":
        # The spec lets a sender put anything after UNKNOWN; receivers ignore it.
        return ProxyInfo(1, "PROXY", socket.AF_UNSPEC, 0, None, None)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header: protocol {proto!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"v1 header {line!r}: expected 'PROXY {proto} SRC DST SPORT DPORT'"
        )
    version = 4 if proto == "TCP4" else 6
    src = _v1_address(fields[2], version, "source")
    dst = _v1_address(fields[3], version, "destination")
    sport = _v1_port(fields[4], "source")
    dport = _v1_port(fields[5], "destination")
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return ProxyInfo(1, "PROXY", family, socket.SOCK_STREAM, (src, sport), (dst, dport))


def _v1_address(text: str, version: int, what: str) -> str:
    try:
        # "%zone" has no meaning across hosts and ip_address() would accept it.
        if "%" in text:
            raise ValueError
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header: {what} address {text!r} is not valid") from None
    if address.version != version:
        raise ProxyProtocolError(
            f"v1 header: {what} address {text!r} is not IPv{version} (TCP{version})"
        )
    return ip_text(address)


def _v1_port(text: str, what: str) -> int:
    canonical = text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))
    if not canonical or int(text) > 65535:
        raise ProxyProtocolError(f"v1 header: {what} port {text!r} is not a number 0-65535")
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyInfo | None, int]:
    _check_signature(data, V2_SIGNATURE)
    command, family, transport = _check_v2_fixed(data)
    if len(data) < V2_HEADER_LENGTH:
        return None, 0
    fam_byte, length = struct.unpack_from("!BH", data, 13)
    total = V2_HEADER_LENGTH + length
    if len(data) < total:
        return None, 0
    payload = data[V2_HEADER_LENGTH:total]
    need = _V2_ADDRESS_LENGTH[family]
    if length < need:
        raise ProxyProtocolError(
            f"v2 header: length {length} is too short for family 0x{fam_byte:02x} "
            f"(needs at least {need})"
        )
    tlvs = _parse_tlvs(payload[need:])
    if command == "LOCAL" or family == socket.AF_UNSPEC:
        # LOCAL: "the receiver must ignore the address information"; UNSPEC carries none.
        return ProxyInfo(2, command, family, transport, None, None, tlvs), total
    src, dst = _v2_addresses(family, payload[:need])
    return ProxyInfo(2, command, family, transport, src, dst, tlvs), total


def _check_v2_fixed(data: bytes) -> tuple[str, int, int]:
    """Validate the ver/cmd and family bytes as soon as they have arrived."""
    command, family, transport = "", int(socket.AF_UNSPEC), 0
    if len(data) > 12:
        ver_cmd = data[12]
        if ver_cmd & 0xF0 != V2_VERSION:
            raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4} is not 2")
        if ver_cmd & 0x0F not in (V2_CMD_LOCAL, V2_CMD_PROXY):
            raise ProxyProtocolError(
                f"v2 header: command 0x{ver_cmd & 0x0F:x} is not LOCAL (0) or PROXY (1)"
            )
        command = "LOCAL" if ver_cmd & 0x0F == V2_CMD_LOCAL else "PROXY"
    if len(data) > 13:
        fam_byte = data[13]
        if fam_byte not in _V2_FAMILIES:
            raise ProxyProtocolError(
                f"v2 header: family/transport byte 0x{fam_byte:02x} is not defined"
            )
        family, transport = _V2_FAMILIES[fam_byte]
    return command, family, transport


def _v2_addresses(family: int, block: bytes) -> tuple[Endpoint, Endpoint]:
    if family == socket.AF_INET:
        src, dst = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
        return (str(src), sport), (str(dst), dport)
    if family == socket.AF_INET6:
        src6, dst6 = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
        return (ip_text(src6), sport), (ip_text(dst6), dport)
    return _unix_path(block[:108]), _unix_path(block[108:216])


def _unix_path(field: bytes) -> bytes:
    """A sun_path field: up to the first NUL, or an abstract ``\\0name`` minus its padding."""
    if field[:1] == b"\0":
        name = field[1:].rstrip(b"\0")
        return b"\0" + name if name else b""
    return field.partition(b"\0")[0]


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError(f"v2 header: truncated TLV at offset {offset}")
        kind, size = struct.unpack_from("!BH", data, offset)
        value = data[offset + 3 : offset + 3 + size]
        if len(value) != size:
            raise ProxyProtocolError(
                f"v2 header: TLV 0x{kind:02x} claims {size} bytes, {len(value)} remain"
            )
        tlvs.append((kind, value))
        offset += 3 + size
    return tuple(tlvs)
