"""Policy-bypass attempts over TCP from inside ``nsbridge run``: the gateway, loopback in
every spelling, the host's own addresses, rules, the service addresses, names resolving
to denied addresses, the fast path's own machinery and hand-made TCP packets on the tun
device; each runs on every TCP path, through the API and the CLI (harness:
``helpers.bypass``)."""

from __future__ import annotations

import pytest

from helpers.bypass import (
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
    LOCAL_REFUSED,
    LOOPBACK_OFF,
    OK_PORT,
    SVC_PORT,
    TCP_DENIED,
    Case,
    Environment,
    crafted,
    params,
    refused,
    run_case,
    tcp,
)
from helpers.bypass_attempt import PROBE

CASES: list[Case] = [
    # -- TCP through the gateway, loopback and their spellings --
    Case("tcp-gateway-v4", tcp(GATEWAY_V4, LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-gateway-v6", tcp(GATEWAY_V6, LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-mapped-gateway", tcp(f"::ffff:{GATEWAY_V4}", LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-loopback-v4", tcp("127.0.0.1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-loopback-127.7.7.7", tcp("127.7.7.7", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-loopback-v6", tcp("::1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-mapped-loopback", tcp("::ffff:127.0.0.1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-unspecified", tcp("0.0.0.0", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-subnet-broadcast", tcp("10.0.2.255", LO_PORT),
         {"result": "ENETUNREACH", "stage": "connect"}, local=True),
    # the host namespace's own addresses are closed without host access; with it they
    # reach what listens on them, never its loopback
    Case("tcp-host-address-v4", tcp(HOST_V4, OK_PORT), TCP_DENIED, HOST_ADDRESS),
    Case("tcp-host-address-v6", tcp(HOST_V6, OK_PORT), TCP_DENIED, HOST_ADDRESS),
    Case("tcp-host-access-address-v4", tcp(HOST_V4, LO_PORT), TCP_DENIED, dials=True,
         counters={"tcp.connect_failed": 1}, preset="host-access"),
    Case("tcp-host-access-address-v6", tcp(HOST_V6, LO_PORT), TCP_DENIED, dials=True,
         counters={"tcp.connect_failed": 1}, preset="host-access"),
    # -- rules --
    Case("tcp-denied-net-v4", tcp(DENIED_V4, SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-net-v6", tcp(DENIED_V6, SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-mapped-denied-net", tcp(f"::ffff:{DENIED_V4}", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-port-v4", tcp(HOST_V4, DENIED_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-port-v6", tcp(HOST_V6, DENIED_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-loopback-on-denied-port-v4", tcp(GATEWAY_V4, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on"),
    Case("tcp-loopback-on-denied-port-v6", tcp(GATEWAY_V6, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on"),
    Case("tcp-allow-list-other-port", tcp(HOST_V4, DENIED_PORT), TCP_DENIED,
         refused("not in allow rules"), preset="allow-list"),
    # -- the service addresses and special destinations --
    Case("tcp-dns-address-port-7001", tcp(DNS_V4, LO_PORT), TCP_DENIED, DNS_ONLY_53),
    Case("tcp-dns6-address-port-7001", tcp(DNS_V6, LO_PORT), TCP_DENIED, DNS_ONLY_53),
    Case("tcp-port-0", tcp(HOST_V4, 0), TCP_DENIED, refused("port 0")),
    Case("tcp-namespace-network", tcp("10.0.2.50", LO_PORT), TCP_DENIED,
         refused("namespace network")),
    # -- names resolving to what is denied --
    Case("tcp-name-to-denied-net-v4", {"kind": "tcp", "name": "denied.bypass.test",
                                       "port": SVC_PORT},
         {**TCP_DENIED, "resolved": DENIED_V4}, DENY_RULE, names=("denied.bypass.test. A",)),
    Case("tcp-name-to-denied-net-v6", {"kind": "tcp", "name": "denied.bypass.test",
                                       "port": SVC_PORT, "v6": True},
         {**TCP_DENIED, "resolved": DENIED_V6}, DENY_RULE,
         names=("denied.bypass.test. AAAA",)),
    Case("tcp-name-to-gateway", {"kind": "tcp", "name": "gateway.bypass.test",
                                 "port": LO_PORT},
         {**TCP_DENIED, "resolved": GATEWAY_V4}, LOOPBACK_OFF,
         names=("gateway.bypass.test. A",)),
    Case("tcp-name-to-loopback", {"kind": "tcp", "name": "loopback.bypass.test",
                                  "port": LO_PORT},
         {**LOCAL_REFUSED, "resolved": "127.0.0.1"}, local=True,
         names=("loopback.bypass.test. A",)),
    Case("tcp-name-to-mapped-loopback", {"kind": "tcp", "name": "mapped.bypass.test",
                                         "port": LO_PORT, "v6": True},
         {**LOCAL_REFUSED, "resolved": "::ffff:127.0.0.1"}, local=True,
         names=("mapped.bypass.test. AAAA",)),
    # -- the fast path's own machinery --
    Case("tcp-straight-to-redirect-listener", {"kind": "redirect-listener"}, TCP_DENIED,
         fast_path_denied=refused("not redirected"), modes=("redirect",)),
    # The listeners listen on every address (the prerouting redirect for forwarded
    # traffic lands on the address of the interface it came in on).
    Case("tcp-straight-to-redirect-listener-on-own-address",
         {"kind": "redirect-listener", "ip": "10.0.2.100"}, TCP_DENIED,
         fast_path_denied=refused("not redirected"), modes=("redirect",)),
    Case("tcp-straight-to-redirect-listener-on-own-ipv6-address",
         {"kind": "redirect-listener", "ip": "fd00::100"}, TCP_DENIED,
         fast_path_denied=refused("not redirected"), modes=("redirect",)),
    Case("tcp-after-deleting-redirect-rules", {"kind": "nft-flush", "ip": GATEWAY_V4,
                                               "port": LO_PORT},
         {"result": "ECONNREFUSED", "nft": 0}, counters={"engine.tcp_resets": 1},
         modes=("redirect",)),
    # -- hand-made TCP packets on the tun device --
    Case("crafted-tcp-syn-loopback", crafted("tcp", "127.0.0.1", LO_PORT), {"result": "rst"},
         tun_denied="loopback"),
    Case("crafted-tcp-syn-mapped-loopback", crafted("tcp", "::ffff:127.0.0.1", LO_PORT),
         {"result": "rst"}, tun_denied="ipv4-mapped address"),
    Case("crafted-tcp-syn-gateway", crafted("tcp", GATEWAY_V4, LO_PORT), {"result": "rst"},
         tun_denied="host loopback disabled"),
    # -- control: an allowed flow works, so the failures above are the policy's --
    Case("control-tcp-v4", tcp(HOST_V4, OK_PORT), {"result": "data", "data": PROBE.decode()},
         dials=True, hits=(f"tcp {HOST_V4}:{OK_PORT}",), preset="host-access"),
    Case("control-tcp-v6", tcp(HOST_V6, OK_PORT), {"result": "data", "data": PROBE.decode()},
         dials=True, hits=(f"tcp [{HOST_V6}]:{OK_PORT}",), preset="host-access"),

]


@pytest.mark.parametrize(("case", "mode", "runner"), params(CASES))
def test_bypass_attempt(bypass: Environment, case: Case, mode: str, runner: str) -> None:
    """The attempt fails as expected, no host server saw anything, and the denial is
    counted (API counters, or the CLI's -v log for TCP)."""
    run_case(bypass, case, mode, runner)
