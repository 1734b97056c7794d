"""Usernet options: the one model of what ``run``/``attach`` (CLI and API) were asked for,
and the values built from it.

:class:`UsernetOptions` is what the command line (``cli/main.py`` reads the flags,
:func:`options_from_args` gives their meaning: ``--dns`` spellings, ``-p`` through
:func:`.proto.publish.parse_publish`) and the Python API (:mod:`.api`) both produce.
:func:`check_options` refuses bad input as a whole before anything is created; the
builders (:func:`addresses_of`, :func:`policy_of`, :func:`netconfig_of`,
:func:`resolvers_of`) turn the options into the sans-IO values the rest takes.  The
imports they need are made inside them: ``nsbridge run --help`` need not pay for them.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nsbridge.defaults import MTU, USERNET_CIDR, USERNET_CIDR6
from nsbridge.errors import UserError
from nsbridge.net.addresses import parse_host_port
from nsbridge.usernet.proto.publish import Publish, parse_publish

if TYPE_CHECKING:
    from nsbridge.usernet.host.outbound import OutboundAddresses
    from nsbridge.usernet.inside.netconf import NetConfig
    from nsbridge.usernet.proto.addresses import UsernetAddresses
    from nsbridge.usernet.proto.exclude import ExcludeRules
    from nsbridge.usernet.proto.policy import Policy

PUBLISH_MODES = ("device", "splice")


@dataclass
class UsernetOptions:
    publish: list[Publish] = field(default_factory=list)
    allow_host_access: bool = False  # the host's loopback (gateway) and own addresses
    allow_host_loopback: bool = False  # the older name of allow_host_access: either opens
    allow: list[str] = field(default_factory=list)  # destination rules
    deny: list[str] = field(default_factory=list)
    tcp: str = "auto"  # auto | redirect | tun
    relay: str = "auto"  # auto | native | engine: who serves UDP and ping (flowrelay.py)
    dns: list[tuple[str, int]] | None = None  # host resolvers; None: /etc/resolv.conf
    mtu: int = MTU
    ipv6: bool = True
    cidr: str = USERNET_CIDR  # the namespace's IPv4 network (slirp4netns's --cidr)
    cidr6: str = USERNET_CIDR6  # and its IPv6 network
    nat64_prefix: list[str] = field(default_factory=list)  # the host's NAT64 prefixes
    api_socket: str | None = None  # serve slirp4netns's API socket here (host/apisocket.py)
    # The source of outbound sockets per family: an address or an interface name
    # (slirp4netns's --outbound-addr/--outbound-addr6; None: the kernel's choice).
    outbound_addr: str | None = None
    outbound_addr6: str | None = None
    # device: published TCP ports dial through the device, keeping the client's address
    # (host/inbound.py); splice: an ordinary forward to the namespace's loopback
    publish_mode: str = "device"
    # socket switching (host/switcher.py): outbound TCP on host sockets, run only
    bypass: bool = False
    # --bypass-exclude: allowed connects that keep the namespace's path (proto/exclude.py)
    bypass_exclude: list[str] = field(default_factory=list)


def addresses_of(options: UsernetOptions) -> UsernetAddresses:
    """The namespace's addresses: host .100, gateway .2, DNS .3 of each network."""
    from nsbridge.usernet.proto.addresses import UsernetAddresses

    return UsernetAddresses.parse(network=options.cidr, network6=options.cidr6,
                                  mtu=options.mtu, labels=("--cidr", "--cidr6"))


def policy_of(options: UsernetOptions) -> Policy:
    from nsbridge.usernet.proto.policy import Policy
    from nsbridge.usernet.proto.rules import Rule
    from nsbridge.usernet.proto.spellings import parse_nat64_prefix

    rules = [Rule.parse("allow", text, what="--allow") for text in options.allow]
    rules += [Rule.parse("deny", text, what="--deny") for text in options.deny]
    prefixes = [parse_nat64_prefix(text) for text in options.nat64_prefix]
    # The resolvers too: deny rules apply to the resolver a DNS query is sent to.
    return Policy(allow_host_access=options.allow_host_access or options.allow_host_loopback,
                  rules=rules, addresses=addresses_of(options), nat64_prefixes=prefixes,
                  resolvers=resolvers_of(options))


def policy_warnings(options: UsernetOptions, policy: Policy) -> list[str]:
    """Start-up warnings about the rules: a port rule that names one family while IPv6
    is on (with ``--disable-ipv6`` no IPv6 flow exists for it to miss)."""
    return list(policy.single_family_port_rules()) if options.ipv6 else []


def option_warnings(options: UsernetOptions) -> list[str]:
    """:func:`policy_warnings` straight from the options (already checked)."""
    return policy_warnings(options, policy_of(options))


def check_options(options: UsernetOptions) -> None:
    """Refuse bad input before anything is created (a typo must not surface after the
    sandbox exists): the rules, the addresses and MTU, and the --dns resolvers."""
    import ipaddress

    for host, _port in options.dns or ():  # first: the policy is told the resolvers
        try:
            ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            raise UserError(f"--dns {host!r}: not an IP address; give IP or IP:PORT, e.g. "
                            "192.0.2.53 or [2001:db8::53]:53") from None
    if options.publish_mode not in PUBLISH_MODES:
        raise UserError(f"--publish-mode {options.publish_mode!r}: use 'device' or 'splice'")
    policy_of(options)
    netconfig_of(options)
    outbound_of(options)
    if options.api_socket is not None:
        from nsbridge.usernet.host.apisocket import check_path

        check_path(options.api_socket)
    exclude_of(options)
    if options.bypass:
        check_bypass()


def exclude_of(options: UsernetOptions) -> ExcludeRules:
    """The ``--bypass-exclude`` rules; UserError (one line) for a bad one, or for rules
    without ``--bypass`` (nothing would be switched, so they would mean nothing)."""
    from nsbridge.usernet.proto.exclude import ExcludeRules

    rules = ExcludeRules.parse(options.bypass_exclude)
    if rules and not options.bypass:
        raise UserError("--bypass-exclude picks connects that --bypass does not switch; "
                        "give --bypass too")
    return rules


def check_bypass() -> None:
    """``--bypass`` on this machine, or a UserError with the one-line reason: a kernel
    with seccomp user notification and ADDFD (5.9), an ABI whose numbers we know."""
    from nsbridge.linux.seccomp import SeccompUnsupported, native_arch
    from nsbridge.linux.seccomp_notify import unsupported

    try:
        native_arch()
    except SeccompUnsupported as exc:
        raise UserError(f"--bypass: {exc.strerror}") from None
    reason = unsupported()
    if reason is not None:
        raise UserError(f"--bypass: {reason}")


def outbound_of(options: UsernetOptions) -> OutboundAddresses:
    """The source addresses of outbound sockets, resolved in this process's network
    namespace (where the host side dials from); UserError naming a bad value."""
    from nsbridge.usernet.host import outbound

    try:
        return outbound.resolve(options.outbound_addr, options.outbound_addr6)
    except outbound.OutboundError as exc:
        raise UserError(str(exc)) from None


def resolvers_of(options: UsernetOptions) -> list[tuple[str, int]]:
    if options.dns is not None:
        return options.dns
    from nsbridge.usernet.proto.dns import parse_resolv_conf

    try:
        with open("/etc/resolv.conf") as f:
            servers = parse_resolv_conf(f.read())
    except OSError:
        servers = []
    return [(str(server), 53) for server in servers]


def netconfig_of(options: UsernetOptions) -> NetConfig:
    from nsbridge.usernet.inside.netconf import NetConfig

    config = NetConfig(addresses_of(options), ipv6=options.ipv6)
    config.validate()
    return config


DNS_PORT = 53


def parse_dns(texts: list[str] | None) -> list[tuple[str, int]] | None:
    """``--dns`` values as (host, port); None when none was given (use resolv.conf).

    ``IP``, ``IP:PORT`` and ``[IPv6]:PORT`` are accepted; a bare IPv6 address has more
    than one colon and is taken whole.  Whether the host is an IP address is checked
    with the other options (:func:`check_options`).
    """
    if not texts:
        return None
    resolvers = []
    for text in texts:
        if text.startswith("[") or text.count(":") == 1:
            hp = parse_host_port(text, what="--dns", allow_port_zero=False)
            resolvers.append((hp.host, hp.port))
        else:
            resolvers.append((text, DNS_PORT))
    return resolvers


def options_from_args(args: Namespace) -> UsernetOptions:
    """``run``/``attach``'s flags as :class:`UsernetOptions` (``-p`` and ``--dns`` parsed)."""
    return UsernetOptions(publish=[parse_publish(t) for t in args.publish],
                          allow_host_access=args.allow_host_access, allow=args.allow,
                          deny=args.deny, tcp=args.tcp, relay=args.relay,
                          dns=parse_dns(args.dns), mtu=args.mtu, ipv6=not args.disable_ipv6,
                          cidr=args.cidr, cidr6=args.cidr6, nat64_prefix=args.nat64_prefix,
                          outbound_addr=args.outbound_addr, outbound_addr6=args.outbound_addr6,
                          publish_mode=args.publish_mode,
                          bypass=getattr(args, "bypass", False),
                          bypass_exclude=getattr(args, "bypass_exclude", None) or [])
