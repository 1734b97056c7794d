"""Usernet options: what ``nsbridge run`` / ``attach`` flags mean, as library calls.

The parser (``cli/main.py``) only reads flags; the rules about their values live here
(``--dns`` spellings, ``-p`` through :func:`.proto.publish.parse_publish`), and the result
is the :class:`.runner.UsernetOptions` the runner checks as a whole before anything is
created.
"""

from __future__ import annotations

from argparse import Namespace

from nsbridge.net.addresses import parse_host_port
from nsbridge.usernet.proto.publish import parse_publish
from nsbridge.usernet.runner import UsernetOptions

DNS_PORT = 53


def parse_dns(texts: list[str] | None) -> list[tuple[str, int]] | None:
    """``--dns`` values as (host, port); None when none was given (use resolv.conf).

    ``IP``, ``IP:PORT`` and ``[IPv6]:PORT`` are accepted; a bare IPv6 address has more
    than one colon and is taken whole.  Whether the host is an IP address is checked
    with the other options (:func:`.runner.check_options`).
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
                          cidr=args.cidr, cidr6=args.cidr6, nat64_prefix=args.nat64_prefix)
