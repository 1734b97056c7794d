"""DNS for a user-mode namespace, sans-IO: where to forward, and what to drop.

The namespace's resolver is the DNS address (``10.0.2.3`` / ``fd00::3``); the host side
forwards each query to the host's own resolvers, querying them *from the host
namespace* — so a local stub such as ``127.0.0.53`` is fine and is kept.  Queries are
checked just enough (a full header, QR=0, one well-formed question) that garbage is
dropped and counted instead of being relayed, and so a SERVFAIL can echo the question
back when no resolver answers (stub resolvers discard answers whose question differs).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .packets import Malformed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DNS_PORT = 53
HEADER_LENGTH = 12
MAX_NAMESERVERS = 3  # glibc's MAXNS: further nameserver lines are ignored
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_RA = 0x0080
RCODE_SERVFAIL = 2


def parse_resolv_conf(text: str, *, limit: int = MAX_NAMESERVERS) -> list[IPAddress]:
    """The ``nameserver`` addresses of a resolv.conf text, in order, without repeats.

    Like glibc: comments start with ``#`` or ``;``, unparsable lines are skipped, and
    only the first ``limit`` servers count.  IPv6 scope ids (``fe80::1%eth0``) are kept.
    An empty result means the caller should fall back (glibc uses the local host).
    """
    servers: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if address not in servers:
            servers.append(address)
    return servers[:limit]


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A query that passed the minimal checks; ``question`` is the raw question section."""

    ident: int
    flags: int
    question: bytes


def check_query(message: bytes) -> DnsQuery | Malformed:
    """Minimal validation of one DNS query message (UDP payload, or TCP without length).

    Requires a full header, QR=0 (a query, not a response: responses sent *to* a
    resolver are reflection attempts), exactly one question whose name is plain labels
    (queries never need compression), and at most 65535 bytes.  Never raises.
    """
    if len(message) < HEADER_LENGTH:
        return Malformed("dns: truncated header")
    if len(message) > 0xFFFF:
        return Malformed("dns: too long")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(message)
    if flags & _QR:
        return Malformed("dns: not a query")
    if qdcount != 1:
        return Malformed("dns: question count is not 1")
    end = _question_end(message, HEADER_LENGTH)
    if end is None:
        return Malformed("dns: bad question")
    return DnsQuery(ident, flags, message[HEADER_LENGTH:end])


def _question_end(message: bytes, position: int) -> int | None:
    """Offset after QNAME, QTYPE and QCLASS; None if the name is not plain labels."""
    name_length = 0
    while position < len(message):
        length = message[position]
        if length == 0:
            end = position + 1 + 4
            return end if end <= len(message) else None
        if length > 63:  # compression pointer or reserved label type
            return None
        name_length += length + 1
        if name_length > 255:
            return None
        position += length + 1
    return None


def servfail(query: DnsQuery) -> bytes:
    """A SERVFAIL response to ``query``: same id, RD copied, the question echoed.

    Sent when no host resolver answers, so the namespace's resolver fails fast instead
    of waiting for its own timeout.
    """
    flags = _QR | (query.flags & (_OPCODE_MASK | _RD)) | _RA | RCODE_SERVFAIL
    return _HEADER.pack(query.ident, flags, 1, 0, 0, 0) + query.question
