"""DNS for a user-mode namespace, sans-IO: where to forward, and what may be forwarded.

The namespace's resolver is the DNS address (``10.0.2.3`` / ``fd00::3``); the host side
forwards each query to the host's own resolvers, querying them *from the host
namespace* — so a local stub such as ``127.0.0.53`` is fine and is kept.

That is also why only **standard queries** are relayed.  The host's resolver sees every
message come from the host itself (often ``127.0.0.1``), the address resolvers trust for
dynamic updates, zone transfers and notifications.  So :func:`check_query` lets through
exactly what a stub resolver sends: opcode QUERY, one question, no answer or authority
records, at most one additional record which must be the EDNS OPT record, a data type
(not a zone transfer), and nothing after the parsed records.  Everything else is
answered here (or, if no answer could be matched by a stub, dropped) and counted, never
relayed.  Over TCP the same check runs on every length-prefixed message
(:class:`DnsStream`); the first bad one ends what is forwarded on that connection.

What a refused query gets (UDP, and why):

* Not a query at all — shorter than a header, a *response* (QR=1: sending responses to a
  resolver is a reflection attempt), a question count other than one, or a question
  that is not plain labels — is :class:`~nsbridge.usernet.proto.packets.Malformed` and gets
  **silence**: a stub matches an answer by its question (glibc compares the question
  section), so there is nothing it could match, and answering responses invites loops.
* Everything else is :class:`Refused`, answered with the same id, the question echoed
  and an rcode a stub understands: **NOTIMP** for an opcode other than QUERY (what a
  server that does not do UPDATE or NOTIFY says), **REFUSED** for a zone transfer or a
  meta query type (policy, not a broken message), **FORMERR** for a malformed query
  (flags a query never has, answer/authority records, extra or non-OPT additional
  records, a broken OPT record, trailing bytes).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from nsbridge.usernet.proto.packets import Malformed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DNS_PORT = 53
HEADER_LENGTH = 12
MAX_NAMESERVERS = 3  # glibc's MAXNS: further nameserver lines are ignored
MAX_MESSAGE = 0xFFFF  # a TCP length prefix cannot say more; UDP carries less
_HEADER = struct.Struct("!HHHHHH")
_LENGTH = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH
_OPTION = struct.Struct("!HH")  # EDNS option code, length
_QR = 0x8000
_OPCODE_MASK = 0x7800
_OPCODE_SHIFT = 11
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_Z = 0x0040  # reserved: zero in every query (AD 0x0020 and CD 0x0010 are fine)
_RCODE_MASK = 0x000F
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
OPCODES = {1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE", 6: "DSO"}


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
    """A query that passed the checks; ``question`` is the raw question section."""

    ident: int
    flags: int
    question: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """A query answered here, never relayed: ``reason`` is short and stable (a counter
    key), ``rcode`` the answer's (see the module docstring for which and why)."""

    reason: str
    rcode: int
    query: DnsQuery


def check_query(message: bytes | memoryview) -> DnsQuery | Refused | Malformed:
    """Check one DNS query message (a UDP payload, or a TCP message without its length).

    A :class:`DnsQuery` may be relayed as it is; a :class:`Refused` one is answered with
    :func:`refusal`; a :class:`Malformed` one is dropped.  Never raises.

    Query types: AXFR and IXFR are zone transfers, refused.  The other meta and
    question-only types (OPT, TKEY, TSIG, MAILB, MAILA, the rest of 128-254, and the
    reserved 0) are refused too: stubs do not ask for them, TKEY/TSIG belong to
    transactions with a key, and MAILB/MAILA are obsolete.  ANY is allowed: it is a
    read-only question that tools still send, and resolvers answer it minimally
    (RFC 8482).  Classes are not checked: a QUERY of any class only reads.
    """
    length = len(message)
    if length < HEADER_LENGTH:
        return Malformed("dns: truncated header")
    if length > MAX_MESSAGE:
        return Malformed("dns: too long")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(message)
    if flags & _QR:
        return Malformed("dns: not a query")
    if qdcount != 1:
        return Malformed("dns: question count is not 1")
    end = _question_end(message, HEADER_LENGTH)
    if end is None:
        return Malformed("dns: bad question")
    query = DnsQuery(ident, flags, bytes(message[HEADER_LENGTH:end]))
    opcode = (flags & _OPCODE_MASK) >> _OPCODE_SHIFT
    if opcode:
        return Refused(f"opcode {OPCODES.get(opcode, opcode)}", RCODE_NOTIMP, query)
    if flags & (_TC | _Z | _RCODE_MASK):
        return Refused("flags a query never has", RCODE_FORMERR, query)
    if ancount or nscount:
        return Refused("answer or authority records", RCODE_FORMERR, query)
    qtype = int.from_bytes(message[end - 4 : end - 2], "big")
    if qtype in (TYPE_AXFR, TYPE_IXFR):
        return Refused("zone transfer", RCODE_REFUSED, query)
    if qtype in (0, TYPE_OPT) or 128 <= qtype < TYPE_ANY:
        return Refused("meta query type", RCODE_REFUSED, query)
    if arcount > 1:
        return Refused("additional records", RCODE_FORMERR, query)
    if arcount == 1:
        end = _opt_end(message, end)
        if end is None:
            return Refused("additional record is not a valid OPT", RCODE_FORMERR, query)
    if end != length:
        return Refused("trailing bytes", RCODE_FORMERR, query)
    return query


def _question_end(message: bytes | memoryview, position: int) -> int | None:
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


def _opt_end(message: bytes | memoryview, position: int) -> int | None:
    """Offset after the EDNS OPT record at ``position`` (RFC 6891: root name, type 41,
    RDATA a sequence of options that fills it exactly); None if it is not one."""
    fixed = position + 1
    if fixed + _RR_FIXED.size > len(message) or message[position] != 0:
        return None
    rtype, _udp_size, _ttl, rdlength = _RR_FIXED.unpack_from(message, fixed)
    if rtype != TYPE_OPT:
        return None
    option = fixed + _RR_FIXED.size
    end = option + rdlength
    if end > len(message):
        return None
    while option < end:
        if option + _OPTION.size > end:
            return None
        _code, size = _OPTION.unpack_from(message, option)
        option += _OPTION.size + size
    return end if option == end else None


def _answer(query: DnsQuery, rcode: int) -> bytes:
    """A header-and-question answer to ``query``: same id, opcode and RD, RA set."""
    flags = _QR | (query.flags & (_OPCODE_MASK | _RD)) | _RA | rcode
    return _HEADER.pack(query.ident, flags, 1, 0, 0, 0) + query.question


def servfail(query: DnsQuery) -> bytes:
    """A SERVFAIL response to ``query``: same id, RD copied, the question echoed.

    Sent when no host resolver answers, so the namespace's resolver fails fast instead
    of waiting for its own timeout.
    """
    return _answer(query, RCODE_SERVFAIL)


def refusal(refused: Refused) -> bytes:
    """The answer to a refused query (its rcode, the question echoed, nothing else)."""
    return _answer(refused.query, refused.rcode)


class DnsStream:
    """Checks one direction of DNS over TCP (RFC 1035 4.2.2, RFC 7766), sans-IO.

    The stream is a sequence of messages, each after a two-byte length, possibly several
    in one read (pipelined) and split anywhere across reads.  :meth:`feed` takes what was
    read and returns what may be forwarded: whole messages, each with its length, each
    passed by :func:`check_query`.  The first message that does not pass ends the
    stream: ``refused`` says why (a :class:`Refused` or :class:`Malformed`), nothing
    from it on is returned, and the caller ends the connection.  A length under a
    header's is refused at once, without waiting for its bytes.

    Memory is bounded: at most one incomplete message (a length prefix and up to 65535
    bytes) is held between calls.
    """

    __slots__ = ("_pending", "messages", "refused")

    def __init__(self) -> None:
        self._pending = bytearray()
        self.messages = 0  # messages passed so far
        self.refused: Refused | Malformed | None = None

    @property
    def reason(self) -> str | None:
        """Why the stream was refused, as a counter key (a :class:`Malformed`'s reason
        without its ``dns:`` prefix: the key already says DNS); None while it was not."""
        refused = self.refused
        return None if refused is None else refused.reason.removeprefix("dns: ")

    @property
    def pending(self) -> int:
        """Bytes held back: the start of a message not complete yet."""
        return len(self._pending)

    def feed(self, data: bytes | memoryview) -> bytes:
        """The bytes of ``data`` (after what came before) that may be forwarded now."""
        if self.refused is not None:
            return b""
        self._pending += data
        buffer = self._pending
        passed = 0
        with memoryview(buffer) as view:  # released before the buffer is resized
            while len(buffer) - passed >= _LENGTH.size:
                length = _LENGTH.unpack_from(buffer, passed)[0]
                if length < HEADER_LENGTH:
                    self.refused = Malformed("dns: truncated header")
                    break
                end = passed + _LENGTH.size + length
                if end > len(buffer):
                    break
                verdict = check_query(view[passed + _LENGTH.size : end])
                if not isinstance(verdict, DnsQuery):
                    self.refused = verdict
                    break
                self.messages += 1
                passed = end
        forward = bytes(buffer[:passed])
        if self.refused is not None:
            self._pending = bytearray()
        else:
            del buffer[:passed]
        return forward
