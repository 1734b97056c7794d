"""Policy-bypass attempts through address and port holes: a rule on one family's gateway
or loopback against the other family's gateway; NAT64 (well-known, local-use, named
prefix), SIIT, 6to4 and Teredo spellings of a denied network, of 127.0.0.1, of the
metadata address and of the gateway; ``tcp:*:PORT`` over both families; and the start-up
warning for a one-family port rule (harness: ``helpers.bypass``)."""

from __future__ import annotations

import json
import select
import subprocess
import sys

import pytest

from helpers.bypass import (
    ADMIN4,
    ADMIN6,
    DENIED_PORT,
    DENY_RULE,
    DNS_PORT,
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_ADDRESS,
    HOST_V4,
    HOST_V6,
    LO_DENIED_PORT,
    LO_PORT,
    LOOPBACK_OFF,
    OK_PORT,
    REPO,
    SINGLE_FAMILY_WARNING,
    SVC_PORT,
    TCP_DENIED,
    Case,
    Environment,
    crafted,
    params,
    ping,
    refused,
    run_case,
    tcp,
    udp,
)
from helpers.bypass_attempt import PROBE

CASES: list[Case] = [
    # -- address and port holes --
    # A rule on one family's loopback or gateway holds for the other family's gateway:
    # the [::1] servers would see an IPv6 gateway flow that slipped past an IPv4 rule.
    Case("tcp-gateway-v6-under-v4-loopback-rule", tcp(GATEWAY_V6, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-v4-rule"),
    Case("udp-gateway-v6-under-v4-loopback-rule", udp(GATEWAY_V6, LO_DENIED_PORT), ADMIN6,
         DENY_RULE, preset="loopback-on-v4-rule"),
    Case("control-tcp-gateway-v6-other-port", tcp(GATEWAY_V6, LO_PORT),
         {"result": "data", "data": PROBE.decode()}, dials=True, hits=(f"tcp [::1]:{LO_PORT}",),
         preset="loopback-on-v4-rule"),
    Case("tcp-gateway-v4-under-v6-loopback-rule", tcp(GATEWAY_V4, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-v6-rule"),
    Case("udp-gateway-v4-under-v6-loopback-rule", udp(GATEWAY_V4, LO_DENIED_PORT), ADMIN4,
         DENY_RULE, preset="loopback-on-v6-rule"),
    Case("tcp-gateway-v6-under-gateway-v4-rule", tcp(GATEWAY_V6, LO_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-gateway4-denied"),
    Case("udp-gateway-v6-under-gateway-v4-rule", udp(GATEWAY_V6, LO_PORT), ADMIN6, DENY_RULE,
         preset="loopback-on-gateway4-denied"),
    Case("ping-gateway-v6-under-gateway-v4-rule", ping(GATEWAY_V6), ADMIN6, DENY_RULE,
         preset="loopback-on-gateway4-denied"),
    # IPv6 spellings of a denied IPv4 network (198.51.100.1): decided as that address
    Case("tcp-local-use-nat64-unnamed", tcp("64:ff9b:1::c633:6401", SVC_PORT), TCP_DENIED,
         refused("nat64 prefix not named")),
    Case("tcp-local-use-nat64-denied-net", tcp("64:ff9b:1::c633:6401", SVC_PORT), TCP_DENIED,
         DENY_RULE, preset="nat64-named"),
    Case("udp-local-use-nat64-denied-net", udp("64:ff9b:1::c633:6401", SVC_PORT), ADMIN6,
         DENY_RULE, preset="nat64-named"),
    Case("tcp-named-nat64-denied-net", tcp("2001:db8:64::c633:6401", SVC_PORT), TCP_DENIED,
         DENY_RULE, preset="nat64-named"),
    Case("tcp-6to4-denied-net", tcp("2002:c633:6401::1", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("udp-6to4-denied-net", udp("2002:c633:6401::1", SVC_PORT), ADMIN6, DENY_RULE),
    Case("tcp-siit-denied-net", tcp("::ffff:0:c633:6401", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("ping-siit-denied-net", ping("::ffff:0:c633:6401"), ADMIN6, DENY_RULE),
    Case("tcp-teredo-client-denied-net", tcp("2001:0:c000:201::39cc:9bfe", SVC_PORT),
         TCP_DENIED, DENY_RULE),
    Case("tcp-nat64-denied-net", tcp("64:ff9b::c633:6401", SVC_PORT), TCP_DENIED, DENY_RULE),
    # ... of 127.0.0.1
    Case("tcp-local-use-nat64-loopback", tcp("64:ff9b:1::7f00:1", LO_PORT), TCP_DENIED,
         refused("nat64 of a special address"), preset="nat64-named"),
    Case("tcp-named-nat64-loopback", tcp("2001:db8:64::7f00:1", LO_PORT), TCP_DENIED,
         refused("nat64 of a special address"), preset="nat64-named"),
    Case("tcp-6to4-loopback", tcp("2002:7f00:1::1", LO_PORT), TCP_DENIED,
         refused("6to4 of a special address")),
    Case("udp-siit-loopback", udp("::ffff:0:7f00:1", LO_PORT), ADMIN6,
         refused("siit of a special address")),
    Case("udp-teredo-client-loopback", udp("2001:0:c000:201::80ff:fffe", LO_PORT), ADMIN6,
         refused("teredo of a special address")),
    Case("crafted-tcp-syn-6to4-loopback", crafted("tcp", "2002:7f00:1::1", LO_PORT),
         {"result": "rst"}, tun_denied="6to4 of a special address"),
    # ... of 169.254.169.254 (cloud metadata) and of the gateway
    Case("tcp-nat64-metadata", tcp("64:ff9b::a9fe:a9fe", 80), TCP_DENIED, refused("link-local")),
    Case("tcp-local-use-nat64-metadata", tcp("64:ff9b:1::a9fe:a9fe", 80), TCP_DENIED,
         refused("link-local"), preset="nat64-named"),
    Case("ping-6to4-metadata", ping("2002:a9fe:a9fe::1"), ADMIN6, refused("link-local")),
    Case("udp-nat64-gateway", udp("64:ff9b::a00:202", LO_PORT), ADMIN6, LOOPBACK_OFF),
    Case("tcp-nat64-dns-address", tcp("64:ff9b::a00:203", 53), TCP_DENIED,
         refused("namespace network")),
    # an allowed spelling is dialed as asked (no translator here: the connect fails)
    Case("tcp-nat64-allowed-spelling-dials", tcp("64:ff9b::c000:201", OK_PORT), TCP_DENIED,
         dials=True, counters={"tcp.connect_failed": 1}, preset="host-access"),
    # ... and a spelling of a host address is that host address
    Case("tcp-nat64-host-address", tcp("64:ff9b::c000:201", OK_PORT), TCP_DENIED,
         HOST_ADDRESS),
    # tcp:*:PORT covers both families; UDP to that port still passes (control)
    Case("tcp-every-family-port-v6", tcp(HOST_V6, DENIED_PORT), TCP_DENIED, DENY_RULE,
         preset="every-family-port"),
    Case("tcp-every-family-port-v4", tcp(HOST_V4, DENIED_PORT), TCP_DENIED, DENY_RULE,
         preset="every-family-port"),
    Case("control-udp-every-family-port-v6", udp(HOST_V6, DENIED_PORT),
         {"result": "reply", "data": PROBE.decode()}, dials=True,
         hits=(f"udp [{HOST_V6}]:{DENIED_PORT}",), counters={"engine.udp_flows_total": 1},
         preset="every-family-port"),
    # the same decisions when the engine, not the native relay, serves UDP and ping
    Case("udp-gateway-v6-under-v4-loopback-rule-engine", udp(GATEWAY_V6, LO_DENIED_PORT),
         ADMIN6, DENY_RULE, preset="loopback-on-v4-rule-engine"),
    Case("udp-local-use-nat64-denied-net-engine", udp("64:ff9b:1::c633:6401", SVC_PORT),
         ADMIN6, DENY_RULE, preset="nat64-named-engine"),
    Case("ping-teredo-server-loopback-engine", ping("2001:0:7f00:1::3fff:fefe"), ADMIN6,
         refused("teredo of a special address"), preset="nat64-named-engine"),
    Case("udp-siit-metadata-engine", udp("::ffff:0:a9fe:a9fe", 53), ADMIN6,
         refused("link-local"), preset="nat64-named-engine"),
]


@pytest.mark.parametrize(("case", "mode", "runner"), params(CASES))
def test_bypass_attempt(bypass: Environment, case: Case, mode: str, runner: str) -> None:
    """The attempt fails as expected, no host server saw anything, and the denial is
    counted (API counters, or the CLI's -v log for TCP)."""
    run_case(bypass, case, mode, runner)


@pytest.mark.parametrize(("deny", "extra", "warned"), [
    (f"tcp:0.0.0.0/0:{DENIED_PORT}", [], True),
    (f"tcp:0.0.0.0/0:{DENIED_PORT}", ["--disable-ipv6"], False),  # no IPv6 flow to miss
    (f"tcp:*:{DENIED_PORT}", [], False),
])
def test_single_family_port_rule_warns_at_start(bypass: Environment, deny: str,
                                                extra: list[str], warned: bool) -> None:
    """A port rule for one family, with IPv6 on: one warning line pointing at ``*``,
    on stderr (CLI, without -v) and in ``Process.warnings`` (API)."""
    done = subprocess.run(
        ["ip", "netns", "exec", bypass.host, sys.executable, "-m", "nsbridge", "run",
         f"--deny={deny}", "--dns", f"127.0.0.1:{DNS_PORT}", *extra, "--", "true"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "covers IPv" in line]
    assert lines == ([f"nsbridge: {SINGLE_FAMILY_WARNING}"] if warned else []), done.stderr
    request = {"command": ["true"], "options": {"deny": [deny], "ipv6": not extra,
                                                "dns": [["127.0.0.1", DNS_PORT]]}}
    assert bypass.driver.stdin is not None and bypass.driver.stdout is not None
    bypass.driver.stdin.write(json.dumps(request) + "\n")
    bypass.driver.stdin.flush()
    ready, _, _ = select.select([bypass.driver.stdout], [], [], 60)
    reply = json.loads(bypass.driver.stdout.readline() if ready else "{}")
    assert reply.get("code") == 0, (reply, bypass.driver_log.read_text()[-3000:])
    found = [line for line in reply["warnings"] if "covers IPv" in line]
    assert found == ([SINGLE_FAMILY_WARNING] if warned else []), reply["warnings"]
