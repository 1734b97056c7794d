"""Policy-bypass attempts over UDP and ICMP echo from inside ``nsbridge run``: the same
destinations as the TCP cases, broadcasts, allow lists, and hand-made UDP/ICMP packets
with destinations or sources the sandbox's kernel would never use (harness:
``helpers.bypass``)."""

from __future__ import annotations

import pytest

from helpers.bypass import (
    ADMIN4,
    ADMIN6,
    BROADCAST,
    DENIED_PORT,
    DENIED_V4,
    DENIED_V6,
    DENY_RULE,
    DNS_ONLY_53,
    DNS_V4,
    DNS_V6,
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_ADDRESS,
    HOST_V4,
    HOST_V6,
    LO_DENIED_PORT,
    LO_PORT,
    LOOPBACK_OFF,
    MAPPED,
    NO_ANSWER,
    OK_PORT,
    SHORT,
    SVC_PORT,
    Case,
    Environment,
    crafted,
    params,
    ping,
    refused,
    run_case,
    udp,
)
from helpers.bypass_attempt import PROBE

CASES: list[Case] = [
    # -- UDP --
    Case("udp-gateway-v4", udp(GATEWAY_V4, LO_PORT), ADMIN4, LOOPBACK_OFF),
    Case("udp-gateway-v6", udp(GATEWAY_V6, LO_PORT), ADMIN6, LOOPBACK_OFF),
    Case("udp-mapped-gateway", udp(f"::ffff:{GATEWAY_V4}", LO_PORT),
         {**ADMIN4, "from": f"::ffff:{GATEWAY_V4}"}, LOOPBACK_OFF),
    Case("udp-loopback-v4", udp("127.0.0.1", LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": "127.0.0.1"}, local=True),
    Case("udp-loopback-v6", udp("::1", LO_PORT),
         {"result": "icmp", "icmp": [1, 4], "from": "::1"}, local=True),
    Case("udp-mapped-loopback", udp("::ffff:127.0.0.1", LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": "::ffff:127.0.0.1"}, local=True),
    Case("udp-host-address-v4", udp(HOST_V4, OK_PORT), ADMIN4, HOST_ADDRESS),
    Case("udp-host-address-v6", udp(HOST_V6, OK_PORT), ADMIN6, HOST_ADDRESS),
    Case("udp-host-access-address-v4", udp(HOST_V4, LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": HOST_V4}, dials=True,
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("udp-host-access-address-v6", udp(HOST_V6, LO_PORT),
         {"result": "icmp", "icmp": [1, 4], "from": HOST_V6}, dials=True,
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("udp-denied-net-v4", udp(DENIED_V4, SVC_PORT), ADMIN4, DENY_RULE),
    Case("udp-denied-net-v6", udp(DENIED_V6, SVC_PORT), ADMIN6, DENY_RULE),
    Case("udp-mapped-denied-net", udp(f"::ffff:{DENIED_V4}", SVC_PORT),
         {**ADMIN4, "from": f"::ffff:{GATEWAY_V4}"}, DENY_RULE),
    Case("udp-denied-port-v4", udp(HOST_V4, DENIED_PORT), ADMIN4, DENY_RULE),
    Case("udp-denied-port-v6", udp(HOST_V6, DENIED_PORT), ADMIN6, DENY_RULE),
    Case("udp-loopback-on-denied-port-v4", udp(GATEWAY_V4, LO_DENIED_PORT), ADMIN4, DENY_RULE,
         preset="loopback-on"),
    Case("udp-loopback-on-denied-port-v6", udp(GATEWAY_V6, LO_DENIED_PORT), ADMIN6, DENY_RULE,
         preset="loopback-on"),
    Case("udp-allow-list-other-port", udp(HOST_V4, DENIED_PORT), ADMIN4,
         refused("not in allow rules"), preset="allow-list"),
    Case("udp-dns-address-port-7001", udp(DNS_V4, LO_PORT), ADMIN4, DNS_ONLY_53),
    Case("udp-dns6-address-port-7001", udp(DNS_V6, LO_PORT), ADMIN6, DNS_ONLY_53),
    Case("udp-subnet-broadcast", udp("10.0.2.255", LO_PORT, broadcast=True), ADMIN4, BROADCAST),
    # no ICMP error about a broadcast (RFC 1122): silence, but counted
    Case("udp-limited-broadcast", udp("255.255.255.255", LO_PORT, broadcast=True,
                                      timeout=SHORT), NO_ANSWER, BROADCAST),
    Case("udp-namespace-network", udp("10.0.2.50", LO_PORT), ADMIN4,
         refused("namespace network")),
    Case("udp-name-to-denied-net", {"kind": "udp", "name": "denied.bypass.test",
                                    "port": SVC_PORT},
         {**ADMIN4, "resolved": DENIED_V4}, DENY_RULE, names=("denied.bypass.test. A",)),
    Case("control-udp-v4", udp(HOST_V4, OK_PORT), {"result": "reply", "data": PROBE.decode()},
         dials=True, hits=(f"udp {HOST_V4}:{OK_PORT}",),
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("control-udp-v6", udp(HOST_V6, OK_PORT), {"result": "reply", "data": PROBE.decode()},
         dials=True, hits=(f"udp [{HOST_V6}]:{OK_PORT}",),
         counters={"engine.udp_flows_total": 1}, preset="host-access"),

    # -- ICMP echo --
    # the gateway answers ping itself, host access off (nothing is dialed)
    Case("ping-gateway-v4", ping(GATEWAY_V4), {"result": "reply", "from": GATEWAY_V4},
         counters={"engine.icmp_echo_local": 1}),
    Case("ping-gateway-v6", ping(GATEWAY_V6), {"result": "reply", "from": GATEWAY_V6},
         counters={"engine.icmp_echo_local": 1}),
    Case("ping-host-address-v4", ping(HOST_V4), ADMIN4, HOST_ADDRESS),
    Case("ping-host-address-v6", ping(HOST_V6), ADMIN6, HOST_ADDRESS),
    Case("ping-dns-address-v4", ping(DNS_V4), ADMIN4, DNS_ONLY_53),
    Case("ping-dns-address-v6", ping(DNS_V6), ADMIN6, DNS_ONLY_53),
    Case("ping-denied-net-v4", ping(DENIED_V4), ADMIN4, DENY_RULE),
    Case("ping-denied-net-v6", ping(DENIED_V6), ADMIN6, DENY_RULE),
    Case("ping-subnet-broadcast", ping("10.0.2.255", broadcast=True), ADMIN4, BROADCAST),
    # a port-scoped allow list says nothing about ICMP: echo is not in it
    Case("ping-allow-list-v4", ping(HOST_V4), ADMIN4, refused("not in allow rules"),
         preset="allow-list"),
    Case("ping-allow-list-v6", ping(HOST_V6), ADMIN6, refused("not in allow rules"),
         preset="allow-list"),
    Case("control-ping-v4", ping(HOST_V4), {"result": "reply", "from": HOST_V4}, dials=True,
         hits=(f"icmp echo {HOST_V4}",), counters={"engine.icmp_flows_total": 1},
         preset="host-access"),
    Case("control-ping-v6", ping(HOST_V6), {"result": "reply", "from": HOST_V6}, dials=True,
         hits=(f"icmp echo {HOST_V6}",), counters={"engine.icmp_flows_total": 1},
         preset="host-access"),

    # -- hand-made UDP/ICMP packets: destinations the sandbox's kernel would never send --
    Case("crafted-udp-loopback-v4", crafted("udp", "127.0.0.1", LO_PORT), ADMIN4,
         refused("loopback")),
    Case("crafted-udp-loopback-v6", crafted("udp", "::1", LO_PORT), ADMIN6, refused("loopback")),
    Case("crafted-udp-mapped-loopback", crafted("udp", "::ffff:127.0.0.1", LO_PORT), ADMIN6,
         MAPPED),
    Case("crafted-udp-mapped-gateway", crafted("udp", f"::ffff:{GATEWAY_V4}", LO_PORT), ADMIN6,
         MAPPED),
    Case("crafted-udp-mapped-denied-net", crafted("udp", f"::ffff:{DENIED_V4}", SVC_PORT),
         ADMIN6, MAPPED),
    Case("crafted-udp-compatible-loopback", crafted("udp", "::127.0.0.1", LO_PORT), ADMIN6,
         refused("ipv4-compatible address")),
    Case("crafted-udp-nat64-loopback", crafted("udp", "64:ff9b::7f00:1", LO_PORT), ADMIN6,
         refused("nat64 of a special address")),
    Case("crafted-udp-unspecified", crafted("udp", "0.0.0.0", LO_PORT), ADMIN4,
         refused("unspecified address")),
    Case("crafted-udp-port-0", crafted("udp", HOST_V4, 0), ADMIN4, refused("port 0")),
    Case("crafted-udp-limited-broadcast", crafted("udp", "255.255.255.255", LO_PORT,
                                                  timeout=SHORT), NO_ANSWER, BROADCAST),
    Case("crafted-icmp-loopback-v4", crafted("icmp", "127.0.0.1"), ADMIN4, refused("loopback")),
    Case("crafted-icmp-mapped-loopback", crafted("icmp", "::ffff:127.0.0.1"), ADMIN6, MAPPED),
    # anti-spoofing: a new flow must come from the namespace's own address; dropped
    # silently (an error would go to the forged source)
    Case("crafted-udp-spoofed-gateway-source",
         crafted("udp", HOST_V4, OK_PORT, src=GATEWAY_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),
    Case("crafted-udp-spoofed-host-source",
         crafted("udp", HOST_V4, OK_PORT, src=HOST_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),
    Case("crafted-icmp-spoofed-dns-source",
         crafted("icmp", HOST_V4, src=DNS_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),

]


@pytest.mark.parametrize(("case", "mode", "runner"), params(CASES))
def test_bypass_attempt(bypass: Environment, case: Case, mode: str, runner: str) -> None:
    """The attempt fails as expected, no host server saw anything, and the denial is
    counted (API counters, or the CLI's -v log for TCP)."""
    run_case(bypass, case, mode, runner)
