"""The DNS checks, sans-IO: which messages reach the host's resolvers, and what the rest get.

The host's resolver sees every relayed message come from the host itself, so only
standard queries may pass (:func:`nsbridge.usernet.proto.dns.check_query`): crafted messages
of every opcode, section counts, OPT records well and badly formed, zone transfers and
meta types, flags, truncation, trailing bytes and compression pointers; messages built
by dnspython (what real stubs send) pass.  DNS over TCP (:class:`DnsStream`): messages
split anywhere, pipelined, a bad one stopping the stream, memory bounded.  And the
policy's side: deny rules see the resolver a query would be sent to.  And the helpers:
the resolvers read from resolv.conf.  (The tun engine answering what it refuses and asking
only the resolvers the rules leave needs a namespace: tests/usernet/test_engine.py.)
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsbridge.usernet.proto import dns as nsdns
from nsbridge.usernet.proto.dns import DnsQuery, DnsStream, Refused, check_query, refusal
from nsbridge.usernet.proto.packets import Malformed
from nsbridge.usernet.proto.policy import AllowResolver, Deny, Policy
from nsbridge.usernet.proto.rules import Rule

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAME = b"\x07example\x03com\x00"
A, IN = 1, 1


def question(name: bytes = NAME, qtype: int = A, qclass: int = IN) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


def opt(options: bytes = b"", *, name: bytes = b"\x00", rtype: int = 41,
        rdlength: int | None = None) -> bytes:
    """An EDNS OPT record: root name, type 41, UDP size 1232, TTL 0 (version 0)."""
    length = len(options) if rdlength is None else rdlength
    return name + struct.pack("!HHIH", rtype, 1232, 0, length) + options


def message(body: bytes | None = None, *, flags: int = 0x0100, opcode: int = 0, qd: int = 1,
            an: int = 0, ns: int = 0, ar: int = 0, ident: int = 0xBEEF) -> bytes:
    flags |= opcode << 11
    body = question() if body is None else body
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar) + body


def framed(*messages: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


def refused(reason: str, rcode: int, msg: bytes) -> Refused:
    verdict = check_query(msg)
    assert isinstance(verdict, Refused), verdict
    assert (verdict.reason, verdict.rcode) == (reason, rcode), verdict
    return verdict


# ---- check_query ---------------------------------------------------------------------------


def test_a_standard_query_passes_unchanged() -> None:
    verdict = check_query(message())
    assert verdict == DnsQuery(0xBEEF, 0x0100, question())


@pytest.mark.parametrize("opcode", range(1, 16))
def test_every_opcode_but_query_is_not_implemented(opcode: int) -> None:
    names = {1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE", 6: "DSO"}
    reason = f"opcode {names.get(opcode, opcode)}"
    verdict = refused(reason, nsdns.RCODE_NOTIMP, message(opcode=opcode))
    answer = refusal(verdict)
    # the answer carries the query's id, opcode, RD and question, so a stub takes it
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", answer)
    assert (ident, flags >> 15, (flags >> 11) & 0xF, flags & 0x0100, flags & 0xF) == (
        0xBEEF, 1, opcode, 0x0100, dns.rcode.NOTIMP)
    assert (qd, an, ns, ar) == (1, 0, 0, 0) and answer[12:] == question()


def test_section_counts() -> None:
    record = NAME + struct.pack("!HHIH", A, IN, 60, 4) + bytes(4)
    formerr = nsdns.RCODE_FORMERR
    refused("answer or authority records", formerr, message(question() + record, an=1))
    refused("answer or authority records", formerr, message(question() + record, ns=1))
    refused("additional records", formerr, message(question() + opt() + opt(), ar=2))
    refused("additional record is not a valid OPT", formerr,
            message(question() + record, ar=1))
    # no question, or two: no answer a stub could match; silence
    assert check_query(message(b"", qd=0)) == Malformed("dns: question count is not 1")
    assert check_query(message(question() * 2, qd=2)) == Malformed(
        "dns: question count is not 1")


def test_the_opt_record_is_parsed_not_guessed() -> None:
    cookie = struct.pack("!HH", 10, 8) + bytes(8)
    padding = struct.pack("!HH", 12, 0)
    for options in (b"", cookie, cookie + padding):
        assert isinstance(check_query(message(question() + opt(options), ar=1)), DnsQuery)
    not_opt = "additional record is not a valid OPT"
    for record in (
        opt(name=b"\x01a\x00"),  # not the root name
        opt(rtype=1),  # not type 41
        opt(cookie, rdlength=len(cookie) + 1),  # RDLENGTH past the end
        opt(cookie[:-1] + b"", rdlength=len(cookie) - 1),  # option longer than RDATA
        opt(struct.pack("!H", 10)),  # half an option header
        opt()[:-1],  # truncated fixed part
        b"",  # ARCOUNT says one, nothing there
    ):
        refused(not_opt, nsdns.RCODE_FORMERR, message(question() + record, ar=1))


@pytest.mark.parametrize(("qtype", "reason"), [
    (252, "zone transfer"),  # AXFR
    (251, "zone transfer"),  # IXFR
    (253, "meta query type"),  # MAILB
    (254, "meta query type"),  # MAILA
    (250, "meta query type"),  # TSIG
    (249, "meta query type"),  # TKEY
    (41, "meta query type"),  # OPT
    (128, "meta query type"),
    (0, "meta query type"),
])
def test_zone_transfers_and_meta_types_are_refused(qtype: int, reason: str) -> None:
    refused(reason, nsdns.RCODE_REFUSED, message(question(qtype=qtype)))


@pytest.mark.parametrize("qtype", [1, 28, 16, 15, 33, 65, 255, 256, 65535])
def test_data_types_and_any_pass(qtype: int) -> None:
    assert isinstance(check_query(message(question(qtype=qtype))), DnsQuery)


def test_flags() -> None:
    for flags in (0, 0x0100, 0x0120, 0x0110, 0x0500):  # none, RD, AD, CD, AA
        assert isinstance(check_query(message(flags=flags)), DnsQuery), hex(flags)
    for flags in (0x0200, 0x0040, 0x0001, 0x000F):  # TC, Z, an rcode
        refused("flags a query never has", nsdns.RCODE_FORMERR, message(flags=flags))
    assert check_query(message(flags=0x8100)) == Malformed("dns: not a query")


def test_truncated_and_trailing() -> None:
    full = message(question() + opt(), ar=1)
    assert check_query(full[:11]) == Malformed("dns: truncated header")
    assert check_query(message(NAME[:5])) == Malformed("dns: bad question")
    assert check_query(message(question()[:-1])) == Malformed("dns: bad question")
    refused("additional record is not a valid OPT", nsdns.RCODE_FORMERR, full[:-1])
    refused("trailing bytes", nsdns.RCODE_FORMERR, message() + b"\0")
    refused("trailing bytes", nsdns.RCODE_FORMERR, full + b"x")
    assert check_query(bytes(65536)) == Malformed("dns: too long")


def test_compression_pointers_in_the_question_are_malformed() -> None:
    assert check_query(message(b"\xc0\x0c" + struct.pack("!HH", A, IN))) == Malformed(
        "dns: bad question")
    assert check_query(message(b"\x03www\xc0\x0c" + struct.pack("!HH", A, IN))) == Malformed(
        "dns: bad question")
    assert check_query(message(b"\x40" + b"a" * 64 + b"\x00" + bytes(4))) == Malformed(
        "dns: bad question")  # the reserved 0x40 label type


def test_what_real_stubs_send_passes() -> None:
    plain = dns.message.make_query("example.com.", "AAAA")
    edns = dns.message.make_query("example.com.", "A", want_dnssec=True, options=[
        dns.edns.GenericOption(10, bytes(8)),
        dns.edns.ECSOption("192.0.2.0", 24),
    ])
    edns.flags |= dns.flags.AD | dns.flags.CD
    for query in (plain, edns, dns.message.make_query("example.com.", "ANY")):
        verdict = check_query(query.to_wire())
        assert isinstance(verdict, DnsQuery), (query, verdict)


def test_what_dnspython_builds_for_updates_notifies_and_transfers_is_refused() -> None:
    update = dns.update.UpdateMessage("example.com.")
    update.add("www", 60, "A", "192.0.2.1")
    refused("opcode UPDATE", nsdns.RCODE_NOTIMP, update.to_wire())
    notify = dns.message.make_query("example.com.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    refused("opcode NOTIFY", nsdns.RCODE_NOTIMP, notify.to_wire())
    axfr = dns.message.make_query("example.com.", "AXFR")
    verdict = refused("zone transfer", nsdns.RCODE_REFUSED, axfr.to_wire())
    answer = dns.message.from_wire(refusal(verdict))
    assert answer.id == axfr.id and answer.rcode() == dns.rcode.REFUSED
    assert answer.question == axfr.question and not answer.answer


@FAST
@given(st.binary(max_size=300))
def test_check_never_raises(data: bytes) -> None:
    verdict = check_query(data)
    assert isinstance(verdict, DnsQuery | Refused | Malformed)
    if isinstance(verdict, Refused):
        assert len(refusal(verdict)) >= 12 + 5


@FAST
@given(st.binary(min_size=12, max_size=120))
def test_check_never_raises_on_plausible_headers(tail: bytes) -> None:
    # QR clear and one question, so the checks past the header see the random bytes
    data = struct.pack("!HHH", 1, 0x0100, 1) + tail
    assert isinstance(check_query(data), DnsQuery | Refused | Malformed)


# ---- DnsStream (DNS over TCP) ---------------------------------------------------------------


GOOD = message()
GOOD_EDNS = message(question() + opt(), ar=1, ident=2)
UPDATE = message(opcode=5, ident=3)


def test_stream_forwards_whole_checked_messages() -> None:
    stream = DnsStream()
    assert stream.feed(framed(GOOD)) == framed(GOOD)
    assert stream.feed(framed(GOOD, GOOD_EDNS)) == framed(GOOD, GOOD_EDNS)  # pipelined
    assert stream.messages == 3 and stream.pending == 0 and stream.refused is None


@FAST
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=20))
def test_stream_split_anywhere(cuts: list[int]) -> None:
    data = framed(GOOD, GOOD_EDNS, GOOD)
    stream = DnsStream()
    out, position = b"", 0
    for size in cuts:
        out += stream.feed(data[position:position + size])
        position += size
    out += stream.feed(data[position:])
    assert out == data and stream.messages == 3 and stream.pending == 0


def test_stream_one_byte_at_a_time() -> None:
    data = framed(GOOD, GOOD_EDNS)
    stream = DnsStream()
    out = b"".join(stream.feed(data[i:i + 1]) for i in range(len(data)))
    assert out == data and stream.messages == 2


@FAST
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_stream_never_raises_and_forwards_only_checked_messages(chunks: list[bytes]) -> None:
    stream = DnsStream()
    forwarded = b"".join(stream.feed(chunk) for chunk in chunks)
    assert stream.pending <= 2 + 0xFFFF
    position = 0
    while position < len(forwarded):  # whatever came out is whole, checked messages
        length = struct.unpack_from("!H", forwarded, position)[0]
        assert isinstance(check_query(forwarded[position + 2:position + 2 + length]), DnsQuery)
        position += 2 + length
    assert position == len(forwarded)


def test_a_bad_message_stops_the_stream() -> None:
    stream = DnsStream()
    # good, bad, good in one read: only the first is forwarded
    assert stream.feed(framed(GOOD, UPDATE, GOOD)) == framed(GOOD)
    assert isinstance(stream.refused, Refused) and stream.reason == "opcode UPDATE"
    assert stream.feed(framed(GOOD)) == b"" and stream.messages == 1 and stream.pending == 0


@pytest.mark.parametrize(("data", "reason"), [
    (framed(message(question(qtype=252))), "zone transfer"),
    (framed(message(question(qtype=251))), "zone transfer"),
    (framed(message(flags=0x8100)), "not a query"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "question count is not 1"),
    (struct.pack("!H", 5) + b"hello", "truncated header"),
    (struct.pack("!H", 0), "truncated header"),
    (framed(message(b"\xc0\x0c\x00\x01\x00\x01")), "bad question"),
])
def test_garbage_and_transfers_over_tcp(data: bytes, reason: str) -> None:
    stream = DnsStream()
    forwarded = stream.feed(data)
    if stream.refused is None:  # a long "length" waits for more; give it that much
        length = struct.unpack_from("!H", data)[0]
        forwarded += stream.feed(bytes(length + 2 - len(data)))
    assert forwarded == b"" and stream.reason == reason, (stream.refused, reason)


def test_a_short_length_is_refused_before_its_bytes_arrive() -> None:
    stream = DnsStream()
    assert stream.feed(struct.pack("!H", 11)) == b""
    assert stream.reason == "truncated header"


def test_stream_memory_is_one_message() -> None:
    big = message(question() + opt(struct.pack("!HH", 12, 65400) + bytes(65400)), ar=1)
    assert len(big) <= 0xFFFF and isinstance(check_query(big), DnsQuery)
    stream = DnsStream()
    data = framed(big)
    assert stream.feed(data[:-1]) == b"" and stream.pending == len(data) - 1
    assert stream.feed(data[-1:]) == data and stream.pending == 0
    # 64 KiB of a message that will never be complete: held, but never more than that
    assert stream.feed(struct.pack("!H", 0xFFFF) + bytes(0xFFFF - 1)) == b""
    assert stream.pending == 0xFFFF + 1


# ---- deny rules see the resolver actually dialed (Policy, sans-IO) ---------------------------


def _policy(deny: list[str], resolvers: list[tuple[str, int]] | None) -> Policy:
    return Policy(rules=[Rule.parse("deny", text) for text in deny], resolvers=resolvers)


def test_a_deny_rule_covering_the_only_resolver_denies_dns() -> None:
    policy = _policy(["10.250.0.0/24"], [("10.250.0.2", 53)])
    for protocol in ("udp", "tcp"):
        assert policy.decide(protocol, "10.0.2.3", 53) == Deny("deny rule")
        assert policy.decide(protocol, "fd00::3", 53) == Deny("deny rule")
    assert policy.denied == {"deny rule": 4} and policy.allowed == 0
    assert policy.denied_resolvers() == [
        "DNS resolver 10.250.0.2:53 is covered by a deny rule: DNS over udp and tcp is not "
        "sent to it"]


def test_an_ipv6_resolver_spelling_a_denied_ipv4_address_is_covered() -> None:
    """A NAT64 resolver address reaches the IPv4 resolver it embeds: the rule holds."""
    policy = _policy(["10.250.0.0/24"], [("64:ff9b::afa:2", 53)])
    assert policy.decide("udp", "10.0.2.3", 53) == Deny("deny rule")
    assert len(policy.denied_resolvers()) == 1


def test_covered_resolvers_are_skipped_and_the_others_kept_in_order() -> None:
    resolvers = [("10.250.0.2", 53), ("192.0.2.53", 53), ("2001:db8::53", 5353)]
    policy = _policy(["10.250.0.0/24"], resolvers)
    assert policy.decide("udp", "10.0.2.3", 53) == AllowResolver(
        4, (("192.0.2.53", 53), ("2001:db8::53", 5353)))


def test_resolver_rules_see_the_protocol_and_the_resolvers_own_port() -> None:
    resolvers = [("127.0.0.1", 5353)]
    tcp_only = _policy(["tcp:127.0.0.0/8"], resolvers)
    assert tcp_only.decide("tcp", "10.0.2.3", 53) == Deny("deny rule")
    assert tcp_only.decide("udp", "10.0.2.3", 53) == AllowResolver(4, (("127.0.0.1", 5353),))
    assert tcp_only.denied_resolvers() == [
        "DNS resolver 127.0.0.1:5353 is covered by a deny rule: DNS over tcp is not sent to it"]
    by_port = _policy(["127.0.0.1:5353"], resolvers)
    assert by_port.decide("udp", "10.0.2.3", 53) == Deny("deny rule")
    other_port = _policy(["127.0.0.1:53"], resolvers)  # the resolver listens on 5353
    assert other_port.decide("udp", "10.0.2.3", 53) == AllowResolver(4, (("127.0.0.1", 5353),))
    assert other_port.denied_resolvers() == []


def test_no_resolvers_and_unknown_resolvers() -> None:
    # told there are none: allowed, and the caller answers SERVFAIL / "no host resolver"
    assert _policy(["10.250.0.0/24"], []).decide("udp", "10.0.2.3", 53) == AllowResolver(4, ())
    # not told (a caller with its own list): the decision names none
    assert _policy(["10.250.0.0/24"], None).decide("tcp", "fd00::3", 53) == AllowResolver(6)
    # a rule on the DNS address itself still denies, whatever the resolvers
    assert _policy(["udp:10.0.2.3:53"], [("192.0.2.53", 53)]).decide(
        "udp", "10.0.2.3", 53) == Deny("deny rule")


# ---- resolv.conf, and check_query on hand-built queries ------------------------------------


def dns_query(
    name: bytes = b"\x07example\x03com\x00", *, flags: int = 0x0100, qd: int = 1
) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, qd, 0, 0, 0) + name + b"\x00\x01\x00\x01"


def test_resolv_conf() -> None:
    text = """
    # a comment
    nameserver 127.0.0.53
    nameserver 2001:db8::53 # trailing words are ignored
    nameserver fe80::1%eth0
    nameserver not-an-address
    nameserver 127.0.0.53
    ; nameserver 192.0.2.1
    search example.com
    nameserver 192.0.2.9
    """
    text = "\n".join(line.strip() for line in text.splitlines())
    assert [str(a) for a in nsdns.parse_resolv_conf(text)] == [
        "127.0.0.53",
        "2001:db8::53",
        "fe80::1%eth0",
    ]
    assert len(nsdns.parse_resolv_conf(text, limit=10)) == 4
    assert nsdns.parse_resolv_conf("") == []


def test_dns_query_checks() -> None:
    query = nsdns.check_query(dns_query())
    assert isinstance(query, nsdns.DnsQuery)
    assert query.ident == 0xBEEF and query.question == b"\x07example\x03com\x00\x00\x01\x00\x01"
    answer = nsdns.servfail(query)
    ident, flags, qd = struct.unpack_from("!HHH", answer)
    assert (ident, flags & 0x8000, flags & 0x0100, flags & 0xF, qd) == (0xBEEF, 0x8000, 0x100, 2, 1)
    assert answer[12:] == query.question
    long_name = (b"\x3f" + b"a" * 63) * 4 + b"\x00"  # 256 bytes: over the 255 limit
    bad = {
        b"\0" * 11: "dns: truncated header",
        dns_query(flags=0x8100): "dns: not a query",
        dns_query(qd=2): "dns: question count is not 1",
        dns_query(b"\xc0\x0c"): "dns: bad question",
        dns_query(b"\x07exam"): "dns: bad question",
        dns_query(long_name): "dns: bad question",
    }
    for message, reason in bad.items():
        assert nsdns.check_query(message) == Malformed(reason), message


@FAST
@given(st.binary(max_size=300))
def test_dns_check_never_raises(data: bytes) -> None:
    assert isinstance(nsdns.check_query(data), nsdns.DnsQuery | nsdns.Refused | Malformed)
