"""Forward options: what ``nsbridge forward`` / ``serve`` flags mean, as library calls.

The parser (``cli/main.py``) only reads flags; this module holds the rules about them:
which flags conflict, which namespace a -f/-F/-t/-T/--*-netns flag opens, which endpoint
pairs make which forwards, how many workers run, and how ``serve``'s flags override its
config file.  ``netns-tcp-bridge`` (``cli/compat.py``) goes through the same functions,
so both commands report a bad input in the same words.

Every function takes the parsed ``argparse.Namespace`` (or the values in it) and returns
library objects (:class:`ForwardSpec`, :class:`DaemonOptions`); a bad input raises
:class:`UserError` naming the flag.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from collections.abc import Sequence

from nsbridge.defaults import ACCEPT, DRAIN, MAX_DEFAULT_WORKERS, MOVER
from nsbridge.errors import UserError
from nsbridge.forward.config import Config
from nsbridge.forward.daemon import DaemonOptions
from nsbridge.forward.endpoints import build_spec, parse_endpoint
from nsbridge.forward.spec import (
    ConnectAddress,
    ConnectSide,
    ForwardSpec,
    ListenAddress,
    ListenSide,
    ListenSocket,
    Preaccepted,
    Preconnected,
)
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import parse_host_port
from nsbridge.net.sockets import adopt_connected_fd, adopt_listening_fd

log = logging.getLogger("nsbridge")

# The netns_tcp_bridge-style flags (one forward), by argparse destination.
_LEGACY_FLAGS = ("listen", "listen_fd", "preaccepted_fd", "connect", "connect_fd",
                 "listen_netns_file", "listen_netns_fd", "connect_netns_file",
                 "connect_netns_fd", "listen_netns", "connect_netns")


def worker_count(requested: int | None) -> int:
    """One worker per CPU (at most MAX_DEFAULT_WORKERS) unless told."""
    if requested is not None and requested < 1:
        raise UserError(f"--workers {requested}: must be 1 or more")
    if requested is None:
        return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))
    return requested


def specs_from_args(args: Namespace) -> list[ForwardSpec]:
    """The netns_tcp_bridge-style flags (one forward) plus any endpoint pairs.

    A one-shot forward (-S/-C, fd: targets) carries exactly one connection in this
    process, so it cannot share the process with other forwards; that is refused here,
    before anything else is checked about how the forwards run.
    """
    specs: list[ForwardSpec] = []
    if any(getattr(args, name) is not None for name in _LEGACY_FLAGS) or not args.endpoints:
        spec = spec_from_args(args)
        spec.allow, spec.deny, spec.proxy = list(args.allow), list(args.deny), args.proxy_protocol
        specs.append(spec)
    if len(args.endpoints) % 2:
        raise UserError(f"endpoint {args.endpoints[-1]!r} has no partner: give endpoints in "
                        "pairs, LISTEN CONNECT (e.g. tcp:127.0.0.1:8080 tcp:127.0.0.1:80)")
    if args.idle_timeout <= 0:
        raise UserError(f"--idle-timeout {args.idle_timeout:g}: must be more than 0 seconds")
    if args.max_flows < 1:
        raise UserError(f"--max-flows {args.max_flows}: must be 1 or more")
    for listen_text, connect_text in zip(args.endpoints[::2], args.endpoints[1::2],
                                         strict=True):
        specs.append(build_spec(
            parse_endpoint(listen_text, role="listen"),
            parse_endpoint(connect_text, role="connect"),
            connect_timeout=args.connect_timeout or None, allow=args.allow, deny=args.deny,
            proxy=args.proxy_protocol, idle_timeout=args.idle_timeout,
            max_flows=args.max_flows))
    if len(specs) > 1 and any(spec.one_shot for spec in specs):
        raise UserError("-S/-C (and fd: targets) carry exactly one connection and cannot be "
                        "combined with other forwards; run them on their own")
    return specs


def spec_from_args(args: Namespace) -> ForwardSpec:
    """Turn parsed flags into a validated ForwardSpec (raises UserError naming the input)."""
    listen_flag = _one_of(args, [("-l", "listen"), ("-L", "listen_fd"),
                                 ("-S", "preaccepted_fd")], "listen side", required=True)
    connect_flag = _one_of(args, [("-c", "connect"), ("-C", "connect_fd")], "connect side",
                           required=True)
    listen_ns_flag = _one_of(args, [("-f", "listen_netns_file"), ("-F", "listen_netns_fd"),
                                    ("--listen-netns", "listen_netns")], "listen namespace",
                             required=False)
    connect_ns_flag = _one_of(args, [("-t", "connect_netns_file"), ("-T", "connect_netns_fd"),
                                     ("--connect-netns", "connect_netns")], "connect namespace",
                              required=False)
    # :g prints the number as typed (-1, not -1.0), so the message quotes the input.
    if args.connect_timeout is not None and args.connect_timeout < 0:
        raise UserError(f"--connect-timeout {args.connect_timeout:g}: must be 0 or more seconds")
    if args.drain is not None and args.drain < 0:
        raise UserError(f"--drain {args.drain:g}: must be 0 or more seconds")
    assert listen_flag is not None and connect_flag is not None

    # Parse addresses before opening anything, so a typo is the first thing reported.
    lflag, lvalue = listen_flag
    cflag, cvalue = connect_flag
    listen_addr = (parse_host_port(lvalue, what=lflag, allow_port_zero=True)
                   if lflag == "-l" else None)
    connect_addr = (parse_host_port(cvalue, what=cflag, allow_port_zero=False)
                    if cflag == "-c" else None)

    # One socket as both client and target would be registered twice with epoll and
    # closed twice; refuse it up front instead of crashing mid-relay.
    if lflag == "-S" and cflag == "-C" and _same_number(lvalue, cvalue):
        raise UserError(
            f"-S {lvalue} and -C {cvalue} are the same file descriptor: -S is the client's "
            "socket and -C the target's; pass two different sockets"
        )

    listen: ListenSide
    if listen_addr is not None:
        listen = ListenAddress(listen_addr, _netns_from(listen_ns_flag))
    else:
        if listen_ns_flag is not None:
            log.warning("%s has no effect with %s: that socket already exists",
                        listen_ns_flag[0], lflag)
        if lflag == "-L":
            listen = ListenSocket(adopt_listening_fd(lvalue, "-L/--listen-fd"))
        else:
            listen = Preaccepted(adopt_connected_fd(lvalue, "-S/--preaccepted-fd"))

    connect: ConnectSide
    if connect_addr is not None:
        connect = ConnectAddress(connect_addr, _netns_from(connect_ns_flag))
    else:
        if connect_ns_flag is not None:
            log.warning("%s has no effect with -C: that socket already exists",
                        connect_ns_flag[0])
        connect = Preconnected(adopt_connected_fd(cvalue, "-C/--connect-fd"))
    return ForwardSpec(listen, connect, connect_timeout=args.connect_timeout or None)


def forward_options(args: Namespace) -> DaemonOptions:
    """How ``nsbridge forward``'s forwards run (workers, mover, drain, control, ...)."""
    return DaemonOptions(workers=worker_count(args.workers), mover=args.mover,
                         drain=args.drain, accept=args.accept, control=args.control,
                         ready_fd=args.ready_fd, exit_with=args.exit_with, relay=args.relay)


def serve_options(args: Namespace, config: Config) -> DaemonOptions:
    """``nsbridge serve``'s options: a flag wins over the file, the file over the default."""
    return DaemonOptions(
        workers=worker_count(args.workers if args.workers is not None else config.workers),
        mover=args.mover or config.mover or MOVER,
        accept=args.accept or config.accept or ACCEPT,
        drain=args.drain if args.drain is not None else (config.drain or DRAIN),
        control=args.control or config.control, ready_fd=args.ready_fd,
        exit_with=args.exit_with, defaults=config.defaults, relay=args.relay)


def _one_of(args: Namespace, names: Sequence[tuple[str, str]], role: str,
            required: bool) -> tuple[str, str] | None:
    given = [(flag, getattr(args, attr)) for flag, attr in names if getattr(args, attr) is not None]
    if len(given) > 1:
        flags = " and ".join(flag for flag, _ in given)
        raise UserError(f"conflicting options: {flags} both given; choose one {role}")
    if not given:
        if required:
            choices = ", ".join(flag for flag, _ in names)
            raise UserError(f"missing {role}: give one of {choices}")
        return None
    return given[0]


def _netns_from(chosen: tuple[str, str] | None) -> Netns | None:
    """Open the namespace a -f/-F/-t/-T/--*-netns flag names (None: stay where we are)."""
    if chosen is None:
        return None
    flag, value = chosen
    if not value:
        # Caught here because only here is the flag known; os.open("") would otherwise
        # report a file named "" that "does not exist".
        expected = {"-F": "an open file descriptor number", "-T": "an open file descriptor number",
                    "-f": "a path such as /proc/1234/ns/net",
                    "-t": "a path such as /proc/1234/ns/net"}.get(
                        flag, "a path, pid:N, fd:N or an `ip netns` name")
        raise UserError(f"{flag} '': empty network namespace; expected {expected}")
    if flag in ("-F", "-T"):
        return Netns.from_fd(value, label=f"{flag} {value}")
    if flag in ("-f", "-t"):
        return Netns.from_path(value)
    return Netns.from_spec(value)


def _same_number(a: str, b: str) -> bool:
    """True when two fd arguments name the same fd ("5" and "05" do); junk compares False
    and is reported later by the fd's own check."""
    try:
        return int(a) == int(b)
    except ValueError:
        return False
