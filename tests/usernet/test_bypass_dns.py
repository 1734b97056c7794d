"""Policy-bypass attempts through the DNS service: messages other than standard queries
over UDP, over TCP (pipelined and split) and onto the native relay's device, a resolver
inside a denied network; and real ``dig`` queries still answered (harness:
``helpers.bypass``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.bypass import (
    ADMIN4,
    ADMIN6,
    DENIED_RESOLVER,
    DENY_RULE,
    DNS_ID,
    DNS_OPT,
    DNS_RECORD,
    DNS_TCP_HIT,
    DNS_V4,
    DNS_V6,
    HOST_V4,
    PRESETS,
    REPO,
    TCP_DENIED,
    TCP_DNS_ENDED,
    TCP_MODES,
    Case,
    Environment,
    _matches,
    _shown,
    crafted,
    dns_refused,
    dns_tcp,
    dns_udp,
    params,
    run_case,
    tcp_dns_refused,
    udp_dns_refused,
)
from helpers.bypass_attempt import PROBE, TUN, dns_message
from helpers.environment import have

CASES: list[Case] = [
    # -- the DNS service relays only standard queries (UDP: answered by nsbridge, never
    #    relayed; TCP: the first bad message ends what is forwarded; the deny rules hold
    #    for the resolver actually dialed) --
    *[Case(f"dns-udp-{name.lower()}", dns_udp(DNS_V4, dns_message(opcode=opcode)),
           dns_refused(opcode, 4), counters=udp_dns_refused(f"opcode {name}"))
      for opcode, name in ((5, "UPDATE"), (4, "NOTIFY"), (1, "IQUERY"), (2, "STATUS"))],
    Case("dns6-udp-update", dns_udp(DNS_V6, dns_message(opcode=5)), dns_refused(5, 4),
         counters=udp_dns_refused("opcode UPDATE")),
    Case("dns-udp-axfr", dns_udp(DNS_V4, dns_message(qtype=252)), dns_refused(0, 5),
         counters=udp_dns_refused("zone transfer")),
    Case("dns-udp-ixfr", dns_udp(DNS_V4, dns_message(qtype=251)), dns_refused(0, 5),
         counters=udp_dns_refused("zone transfer")),
    Case("dns-udp-answer-record", dns_udp(DNS_V4, dns_message(an=1, extra=DNS_RECORD)),
         dns_refused(0, 1), counters=udp_dns_refused("answer or authority records")),
    Case("dns-udp-additional-not-opt", dns_udp(DNS_V4, dns_message(ar=1, extra=DNS_RECORD)),
         dns_refused(0, 1), counters=udp_dns_refused("additional record is not a valid OPT")),
    Case("dns-udp-trailing-bytes", dns_udp(DNS_V4, dns_message(extra=PROBE)),
         dns_refused(0, 1), counters=udp_dns_refused("trailing bytes")),
    Case("dns-udp-resolver-in-denied-net-v4", dns_udp(DNS_V4, dns_message()), ADMIN4,
         DENY_RULE, preset="dns-resolver-denied"),
    Case("dns-udp-resolver-in-denied-net-v6", dns_udp(DNS_V6, dns_message()), ADMIN6,
         DENY_RULE, preset="dns-resolver-denied"),
    Case("control-dns-udp-edns", dns_udp(DNS_V4, dns_message(ar=1, extra=DNS_OPT)),
         {"result": "reply", "id": DNS_ID, "rcode": 0}, names=("dns.bypass.test. A",),
         counters={"engine.dns_queries": 1}),
    Case("dns-tcp-axfr", dns_tcp(dns_message(qtype=252)), TCP_DNS_ENDED,
         **tcp_dns_refused("zone transfer")),
    Case("dns-tcp-update", dns_tcp(dns_message(opcode=5)), TCP_DNS_ENDED,
         **tcp_dns_refused("opcode UPDATE")),
    Case("dns6-tcp-notify", dns_tcp(dns_message(opcode=4), ip=DNS_V6), TCP_DNS_ENDED,
         **tcp_dns_refused("opcode NOTIFY")),
    Case("dns-tcp-garbage-short-length", dns_tcp(raw=b"\x00\x05hello"), TCP_DNS_ENDED,
         **tcp_dns_refused("truncated header")),
    Case("dns-tcp-garbage-response", dns_tcp(b"\xff" * 16), TCP_DNS_ENDED,
         **tcp_dns_refused("not a query")),
    Case("dns-tcp-garbage-allow-list", dns_tcp(PROBE), TCP_DNS_ENDED,
         **tcp_dns_refused("question count is not 1"), preset="allow-list"),
    Case("dns-tcp-pipelined-good-axfr-good",
         dns_tcp(dns_message(ident=1), dns_message(ident=2, qtype=252), dns_message(ident=3),
                 answers=3),
         {"result": "eof", "answers": [[1, 0]]}, dials=True, hits=(DNS_TCP_HIT,),
         names=("dns.bypass.test. A",),
         counters={"tcp.dns_queries": 1, "tcp.dns_refused.zone transfer": 1}),
    Case("dns-tcp-resolver-in-denied-net", dns_tcp(dns_message()), TCP_DENIED, DENY_RULE,
         preset="dns-resolver-denied"),
    Case("dns6-udp-ipv4-dns-address-denied", dns_udp(DNS_V6, dns_message()), ADMIN6,
         DENY_RULE, preset="dns4-address-denied"),
    Case("dns6-tcp-ipv4-dns-address-denied", dns_tcp(dns_message(), ip=DNS_V6), TCP_DENIED,
         DENY_RULE, preset="dns4-address-denied"),
    Case("control-dns-tcp", dns_tcp(dns_message(), dns_message(ident=7, ar=1, extra=DNS_OPT),
                                    answers=2),
         {"result": "answered", "answers": [[DNS_ID, 0], [7, 0]]}, dials=True,
         hits=(DNS_TCP_HIT,), names=("dns.bypass.test. A",), counters={"tcp.dns_queries": 2}),
    # a hand-made UPDATE written onto the native relay's device: the relay leaves DNS to
    # the engine, which answers it there too (and on the tun device itself)
    *[Case(f"crafted-dns-update-{where}", crafted("udp", DNS_V4, 53, hex=dns_message(
              opcode=5).hex(), via=device), {"result": "reply", "from": DNS_V4, "dns": {
              "id": DNS_ID, "qr": 1, "opcode": 5, "rcode": 4}},
           counters=udp_dns_refused("opcode UPDATE"))
      for where, device in (("via-native-relay", "nsb-relay"), ("on-tun", TUN))],
    # messages split across segments (a length prefix cut in two included)
    Case("control-dns6-tcp-split", dns_tcp(dns_message(), dns_message(ident=8), ip=DNS_V6,
                                           answers=2, split=5),
         {"result": "answered", "answers": [[DNS_ID, 0], [8, 0]]}, dials=True,
         hits=(DNS_TCP_HIT,), names=("dns.bypass.test. A",), counters={"tcp.dns_queries": 2}),
    Case("dns-tcp-split-good-then-update",
         dns_tcp(dns_message(), dns_message(ident=9, opcode=5), answers=2, split=7),
         {"result": "eof", "answers": [[DNS_ID, 0]]}, dials=True, hits=(DNS_TCP_HIT,),
         names=("dns.bypass.test. A",),
         counters={"tcp.dns_queries": 1, "tcp.dns_refused.opcode UPDATE": 1}),
]


@pytest.mark.parametrize(("case", "mode", "runner"), params(CASES))
def test_bypass_attempt(bypass: Environment, case: Case, mode: str, runner: str) -> None:
    """The attempt fails as expected, no host server saw anything, and the denial is
    counted (API counters, or the CLI's -v log for TCP)."""
    run_case(bypass, case, mode, runner)


def test_dns_refusals_and_denied_resolver_on_the_cli(bypass: Environment) -> None:
    """``nsbridge run -v`` (the table runs UDP cases through the API only): a refused
    query gets one log line and a place in the summary; a deny rule covering the
    resolver is warned about at start and the query is denied like any flow."""
    bypass.sentinels.reset()
    update = Case("cli-dns-udp-update", dns_udp(DNS_V4, dns_message(opcode=5)), dns_refused(5, 4))
    result, _, log = bypass.run_cli(update, "auto")
    assert _matches(result, update.expect), result
    assert "-> 10.0.2.3:53 refused: opcode UPDATE" in log, log
    assert "DNS refused: opcode UPDATE x1" in log and "Traceback" not in log, log
    denied = Case("cli-dns-resolver-denied", dns_udp(DNS_V4, dns_message()), ADMIN4,
                  preset="dns-resolver-denied")
    result, _, log = bypass.run_cli(denied, "auto")
    assert _matches(result, denied.expect), result
    assert (f"DNS resolver {_shown(DENIED_RESOLVER)} is covered by a deny rule: DNS over udp "
            "and tcp is not sent to it") in log, log
    assert "-> 10.0.2.3:53 denied: deny rule" in log and "denials: deny rule x1" in log, log
    bypass.sentinels.settle()
    assert bypass.sentinels.queries == [] and bypass.sentinels.hits == []


@pytest.mark.parametrize("mode", TCP_MODES)
def test_dns_real_clients_pass_the_checks(bypass: Environment, mode: str) -> None:
    """What a real stub sends passes (dig over UDP and over TCP on this TCP path: EDNS
    with a cookie, +dnssec, +nsid, without EDNS, ANY, IPv6), and dig's AXFR does not
    reach the resolver."""
    if not have("dig"):
        pytest.skip("needs dig")
    bypass.sentinels.reset()
    dig = "dig +time=3 +tries=1"
    lines = [f"{dig} +short {options} dns.bypass.test A"
             for options in (f"@{DNS_V4}", f"+tcp @{DNS_V4}", f"+tcp @{DNS_V6}",
                             f"+dnssec +nsid @{DNS_V4}", f"+tcp +dnssec +nsid @{DNS_V4}",
                             f"+noedns @{DNS_V4}")]
    lines += [f"{dig} +tcp @{DNS_V4} dns.bypass.test ANY | grep -o 'status: [A-Z]*'",
              f"{dig} @{DNS_V4} bypass.test AXFR | grep -v '^;' | grep -c . || true"]
    done = subprocess.run(
        ["ip", "netns", "exec", bypass.host, sys.executable, "-m", "nsbridge", "run", "-v",
         *PRESETS["default"].cli_args(mode), "--", "sh", "-c", "; ".join(lines)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    # AXFR: no record printed (dig reports the closed connection in a comment)
    assert done.stdout.split() == [HOST_V4] * 6 + ["status:", "NOERROR", "0"], (
        done.stdout + done.stderr)
    assert "refused: zone transfer" in done.stderr and "Traceback" not in done.stderr
    bypass.sentinels.settle()
    assert set(bypass.sentinels.queries) == {"dns.bypass.test. A", "dns.bypass.test. ANY"}
