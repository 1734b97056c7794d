"""defaults.py: every default written once, and the places that apply them agree.

Why: the same numbers and addresses used to be literals in several modules (the parser,
the spec, the config file, the UDP relay; the usernet options, policy, netconf and API),
free to drift apart, and the MTU was checked with different bounds in two places.  No
root needed: these build the objects and read the parser.
"""

from __future__ import annotations

import ipaddress

import pytest

from nsbridge import defaults
from nsbridge.cli.main import build_parser
from nsbridge.errors import UserError
from nsbridge.usernet.inside.netconf import NetConfig
from nsbridge.usernet.proto.addresses import UsernetAddresses


def test_spelled_out_addresses_are_the_default_hosts_of_the_default_networks():
    net4 = ipaddress.IPv4Network(defaults.USERNET_CIDR)
    net6 = ipaddress.IPv6Network(defaults.USERNET_CIDR6)
    for network, host, (namespace, gateway, dns) in (
        (net4, defaults.NAMESPACE_HOST,
         (defaults.USERNET_NAMESPACE, defaults.USERNET_GATEWAY, defaults.USERNET_DNS)),
        (net6, defaults.NAMESPACE_HOST6,
         (defaults.USERNET_NAMESPACE6, defaults.USERNET_GATEWAY6, defaults.USERNET_DNS6)),
    ):
        assert network[host] == ipaddress.ip_address(namespace)
        assert network[defaults.GATEWAY_HOST] == ipaddress.ip_address(gateway)
        assert network[defaults.DNS_HOST] == ipaddress.ip_address(dns)


def test_policy_and_netconf_describe_the_same_default_network():
    parsed = UsernetAddresses.parse()
    assert parsed == UsernetAddresses()  # derived from the networks == the spelled-out ones
    config = NetConfig()
    assert config.mtu == parsed.mtu == defaults.MTU
    assert config.ipv4.ip == parsed.namespace and config.ipv4.network == parsed.network
    assert config.gateway4 == parsed.gateway and config.dns4 == parsed.dns
    assert config.ipv6 is not None
    assert config.ipv6.ip == parsed.namespace6 and config.ipv6.network == parsed.network6
    assert config.gateway6 == parsed.gateway6 and config.dns6 == parsed.dns6


@pytest.mark.parametrize("mtu", [defaults.MIN_MTU - 1, defaults.MAX_MTU + 1])
@pytest.mark.parametrize("ipv6", [True, False], ids=["dual-stack", "ipv4-only"])
def test_mtu_bounds_are_the_same_for_the_flag_and_the_library(mtu: int, ipv6: bool):
    """--mtu (policy) and NetConfig (the library's Sandbox) refuse the same values."""
    with pytest.raises(UserError, match=f"--mtu '{mtu}'"):
        UsernetAddresses.parse(mtu=mtu)
    config = NetConfig(mtu=mtu) if ipv6 else NetConfig(mtu=mtu, ipv6=None)
    with pytest.raises(UserError, match=f"bad MTU {mtu}: must be between "
                       f"{defaults.MIN_MTU} and {defaults.MAX_MTU}"):
        config.validate()
    for edge in (defaults.MIN_MTU, defaults.MAX_MTU):
        assert UsernetAddresses.parse(mtu=edge).mtu == edge
        NetConfig(mtu=edge).validate()


def test_the_command_line_applies_the_defaults():
    parser = build_parser()
    forward = parser.parse_args(["forward", "-l", "127.0.0.1:1", "-c", "127.0.0.1:2"])
    assert (forward.connect_timeout, forward.idle_timeout, forward.max_flows) == (
        defaults.CONNECT_TIMEOUT, defaults.UDP_IDLE_TIMEOUT, defaults.MAX_UDP_FLOWS)
    assert (forward.drain, forward.mover, forward.accept) == (
        defaults.DRAIN, defaults.MOVER, defaults.ACCEPT)
    run = parser.parse_args(["run", "--", "true"])
    assert (run.cidr, run.cidr6, run.mtu) == (
        defaults.USERNET_CIDR, defaults.USERNET_CIDR6, defaults.MTU)
