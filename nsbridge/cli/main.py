"""Command line: argument parsing only; everything else is a library call.

``nsbridge forward`` takes netns_tcp_bridge's flags (-l -L -S -c -C -f -F -t -T) plus
friendlier ones; ``netns-tcp-bridge`` (see compat.py) takes exactly the original's.
What the flags mean lives in the library: options.py (forward and serve), launch.py
(one-shot or daemon), control_client.py (ctl), usernet/options.py (run and attach);
every default in defaults.py.  The man pages are generated from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from nsbridge import __version__
from nsbridge.defaults import (
    ACCEPT,
    CONNECT_TIMEOUT,
    DRAIN,
    MAX_DEFAULT_WORKERS,
    MAX_UDP_FLOWS,
    MOVER,
    MTU,
    UDP_IDLE_TIMEOUT,
    USERNET_CIDR,
    USERNET_CIDR6,
)
from nsbridge.errors import UserError
from nsbridge.forward.launch import run_as_daemon, run_forwards
from nsbridge.forward.options import forward_options, serve_options, specs_from_args
from nsbridge.forward.supervisor import ACCEPT_MODES
from nsbridge.linux.signals import StopSignals
from nsbridge.relay.native import RELAYS

log = logging.getLogger("nsbridge")

FORWARD_EPILOG = """\
modes (one listen side, one connect side; every combination works):
  -l ADDR  -c ADDR   listen, dial the target for every client            (the usual)
  -L FD    -c ADDR   inherited listening socket, dial for every client
  -S FD    -c ADDR   one pre-accepted client, dial once, exit when done
  -l/-L    -C FD     accept one client, relay it to a pre-connected target, exit
  -S FD    -C FD     relay two connected sockets to each other, exit when done

namespaces (for -l and -c; default: the namespace nsbridge runs in):
  --listen-netns/--connect-netns SPEC   SPEC is a path (/proc/123/ns/net), pid:123,
                                        fd:N, or a name from `ip netns` (/run/netns/NAME)
  -f/-t PATH, -F/-T FD                  netns_tcp_bridge's spellings of the same

examples:
  # expose port 80 of namespace "web" on 127.0.0.1:8080 here
  nsbridge forward -l 127.0.0.1:8080 --connect-netns web -c 127.0.0.1:80
  # let a process in namespace of PID 6448 reach a host service at its 127.0.0.1:80
  nsbridge forward -f /proc/6448/ns/net -l 127.0.0.1:80 -c 192.0.2.10:80

endpoints (several forwards in one process: give LISTEN CONNECT pairs):
  tcp:HOST:PORT  udp:HOST:PORT  unix:/PATH  unix-abstract:NAME  fd:N  systemd:NAME
  each optionally followed by ,netns=SPEC  (listeners also ,allow=CIDR ,deny=CIDR
  ,mode=0660 ,owner=USER[:GROUP]; stream targets also ,proxy=v1|v2)
  nsbridge forward tcp:127.0.0.1:8080 tcp:127.0.0.1:80,netns=web \\
                   udp:127.0.0.1:5353 udp:127.0.0.1:53,netns=web

Resets are carried as resets, half-close as half-close; a refused or unreachable target
resets the client at once.  SIGINT/SIGTERM stop listening and exit 0 (after --drain).
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``nsbridge: error:`` line like every other error.

    argparse's default prints the whole usage block and its own prefix; scripts and people
    grepping logs then see two formats.  The line points at ``--help`` instead.
    """

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[0]  # "nsbridge" for "nsbridge forward"
        self.exit(2, f"{command}: error: {message} (see `{self.prog} --help`)\n")


def add_forward_flags(parser: argparse.ArgumentParser, *, compat: bool) -> None:
    """The netns_tcp_bridge flags, with its long names; extras unless ``compat``."""
    parser.add_argument("-l", "--listen", metavar="ADDR",
                        help="address to listen on, e.g. 127.0.0.1:1234 or [::1]:1234")
    parser.add_argument("-L", "--listen-fd", metavar="FD",
                        help="inherited file descriptor of a listening socket")
    parser.add_argument("-S", "--preaccepted-fd", metavar="FD",
                        help="inherited connected client socket: forward just it, then exit")
    parser.add_argument("-c", "--connect", metavar="ADDR",
                        help="address to forward incoming connections to")
    parser.add_argument("-C", "--connect-fd", metavar="FD",
                        help="pre-connected target socket: forward one connection to it, then exit")
    parser.add_argument("-f", "--listen-netns-file", metavar="PATH",
                        help="network namespace file to listen in, e.g. /proc/1234/ns/net")
    parser.add_argument("-F", "--listen-netns-fd", metavar="FD",
                        help="open fd of the network namespace to listen in")
    parser.add_argument("-t", "--connect-netns-file", metavar="PATH",
                        help="network namespace file to connect from")
    parser.add_argument("-T", "--connect-netns-fd", metavar="FD",
                        help="open fd of the network namespace to connect from")
    if compat:
        parser.set_defaults(listen_netns=None, connect_netns=None,
                            connect_timeout=CONNECT_TIMEOUT, drain=DRAIN, verbose=0,
                            mover=MOVER, workers=None, endpoints=[], accept=ACCEPT,
                            control=None, allow=[], deny=[], proxy_protocol=None,
                            idle_timeout=UDP_IDLE_TIMEOUT, max_flows=MAX_UDP_FLOWS,
                            exit_with=None, ready_fd=None, relay=None)
        return
    parser.add_argument("--listen-netns", metavar="SPEC",
                        help="namespace to listen in: path, pid:N, fd:N or an `ip netns` name")
    parser.add_argument("--connect-netns", metavar="SPEC",
                        help="namespace to connect from: path, pid:N, fd:N or an `ip netns` name")
    parser.add_argument("--connect-timeout", metavar="SECONDS", type=float,
                        default=CONNECT_TIMEOUT,
                        help="reset the client if the target has not answered by then "
                        f"(default {CONNECT_TIMEOUT:g}; 0 = the kernel's own timeout)")
    parser.add_argument("--drain", metavar="SECONDS", type=float, default=DRAIN,
                        help="on SIGINT/SIGTERM let open connections finish for up to this "
                        f"long before resetting them (default {DRAIN:g})")
    parser.add_argument("--mover", "--engine", dest="mover", choices=("splice", "copy"),
                        default=MOVER, help="data mover: splice (zero-copy through pipes, "
                        "default) or copy; --engine is its older name")
    parser.add_argument("--relay", choices=RELAYS, default=None,
                        help="TCP relay: native (C, the default when built) or python "
                        "(for debugging); also $NSBRIDGE_RELAY")
    parser.add_argument("--workers", metavar="N", type=int, default=None,
                        help="relay in N worker processes (default: one per CPU, at most "
                        f"{MAX_DEFAULT_WORKERS}; 1 = a single process); -S/-C always use one")
    parser.add_argument("--accept", choices=ACCEPT_MODES, default=ACCEPT,
                        help=ACCEPT_HELP)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: one line per connection; -vv: debug")
    add_daemon_flags(parser)
    parser.add_argument("--allow", metavar="CIDR", action="append", default=[],
                        help="only clients from this network may connect (repeatable)")
    parser.add_argument("--deny", metavar="CIDR", action="append", default=[],
                        help="refuse clients from this network (repeatable; wins over --allow)")
    parser.add_argument("--proxy-protocol", choices=("v1", "v2"),
                        help="send a PROXY protocol header with the client's address to "
                        "stream targets")
    parser.add_argument("--idle-timeout", metavar="SECONDS", type=float,
                        default=UDP_IDLE_TIMEOUT,
                        help="UDP: forget a flow after this long without datagrams "
                        f"(default {UDP_IDLE_TIMEOUT:g})")
    parser.add_argument("--max-flows", metavar="N", type=int, default=MAX_UDP_FLOWS,
                        help=f"UDP: at most this many flows per forward (default {MAX_UDP_FLOWS})")
    parser.add_argument("endpoints", nargs="*", metavar="LISTEN CONNECT",
                        help="forwards as endpoint pairs, e.g. tcp:127.0.0.1:8080 "
                        "tcp:127.0.0.1:80,netns=web (see ENDPOINTS below)")


def add_daemon_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of a long-running daemon (forward and serve)."""
    parser.add_argument("--control", metavar="PATH",
                        help="serve a control socket at PATH (mode 0600) for `nsbridge ctl`")
    parser.add_argument("--exit-with", metavar="PID",
                        help="stop when process PID exits (e.g. the container it serves)")
    parser.add_argument("--ready-fd", metavar="FD",
                        help="write a newline to FD and close it once everything listens")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nsbridge: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def run_forward(args: argparse.Namespace) -> int:
    """Run forwards until they finish or a signal arrives."""
    setup_logging(args.verbose)
    stops = StopSignals()  # from here on SIGINT/SIGTERM wait in a signalfd: none is lost
    try:
        return run_forwards(specs_from_args(args), forward_options(args), stops)
    finally:
        stops.close()


ACCEPT_HELP = ("who accepts TCP clients: auto (default: reuseport when the kernel can deal "
               "clients to the workers in turn, which needs CAP_BPF; handoff otherwise), "
               "handoff (the supervisor accepts and deals them round-robin to workers) or "
               "reuseport (each worker accepts from its own SO_REUSEPORT listener: cheaper "
               "per connection; without CAP_BPF the kernel's hash places long flows); "
               "inherited, Unix and UDP listeners always use handoff")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="nsbridge",
        description="Connect Linux network namespaces: forward TCP between them.",
        epilog="Run `nsbridge demo` to see a forward work end to end; "
        "`nsbridge COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"nsbridge {__version__}")
    # Subparsers are built with the parent's class, so they also report in one line.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fwd = sub.add_parser(
        "forward",
        help="listen in one namespace, connect in another (netns_tcp_bridge compatible)",
        description="Listen in one network namespace and forward every connection to a "
        "target reached from another namespace.",
        epilog=FORWARD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_forward_flags(fwd, compat=False)
    fwd.set_defaults(handler=run_forward)

    serve = sub.add_parser(
        "serve",
        help="run the forwards described in a TOML file (see docs/forward.md: Config file)",
        description="Run a set of forwards from a TOML file, as a daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CONFIG_EPILOG,
    )
    serve.add_argument("--config", metavar="FILE", required=True, help="the TOML file")
    serve.add_argument("--workers", metavar="N", type=int, default=None,
                       help="worker processes (overrides the file; default one per CPU)")
    serve.add_argument("--drain", metavar="SECONDS", type=float, default=None,
                       help="on SIGTERM let connections finish this long (overrides the file)")
    serve.add_argument("--mover", "--engine", dest="mover", choices=("splice", "copy"),
                       default=None, help="data mover (overrides the file; --engine is its "
                       "older name)")
    serve.add_argument("--relay", choices=RELAYS, default=None,
                       help="TCP relay: native (default when built) or python")
    serve.add_argument("--accept", choices=ACCEPT_MODES, default=None,
                       help=ACCEPT_HELP + " (overrides the file)")
    serve.add_argument("-v", "--verbose", action="count", default=0)
    add_daemon_flags(serve)
    serve.set_defaults(handler=run_serve)

    ctl = sub.add_parser(
        "ctl",
        help="talk to a running daemon's control socket: list, stats, add, remove",
        description="Change and inspect a running `nsbridge forward/serve --control PATH`.",
    )
    ctl.add_argument("--control", metavar="PATH", required=True, help="the control socket")
    ctl_sub = ctl.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)
    ctl_sub.add_parser("list", help="the forwards and where they listen").add_argument(
        "--json", action="store_true", help="print the raw JSON reply")
    ctl_sub.add_parser("stats", help="counters per forward").add_argument(
        "--json", action="store_true", help="print the raw JSON reply")
    add = ctl_sub.add_parser("add", help="add a forward: NAME LISTEN CONNECT")
    add.add_argument("name")
    add.add_argument("listen", metavar="LISTEN", help="e.g. tcp:127.0.0.1:8080")
    add.add_argument("connect", metavar="CONNECT", help="e.g. tcp:127.0.0.1:80,netns=web")
    add.add_argument("--allow", metavar="CIDR", action="append", default=[])
    add.add_argument("--deny", metavar="CIDR", action="append", default=[])
    add.add_argument("--proxy-protocol", choices=("v1", "v2"))
    remove = ctl_sub.add_parser("remove", help="remove a forward by name")
    remove.add_argument("name")
    remove.add_argument("--kill", action="store_true",
                        help="reset its open connections too (default: let them finish)")
    ctl.set_defaults(handler=run_ctl)

    run = sub.add_parser(
        "run",
        usage="nsbridge run [OPTIONS] -- CMD [ARGS...]",
        help="run a command with networking in a new user+network namespace (no root)",
        description="Run CMD in a new user+network(+mount) namespace with user-mode "
        "networking: outbound TCP/UDP, DNS at 10.0.2.3, ping, IPv6, published ports.  "
        "Every new flow is decided by the host-side policy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=USERNET_EPILOG,
    )
    add_usernet_flags(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(handler=run_usernet, usage=run.format_usage())

    att = sub.add_parser(
        "attach",
        usage="nsbridge attach [OPTIONS] PID|PATH",
        help="give an existing network namespace user-mode networking",
        description="Provide user-mode networking to an existing namespace (as "
        "slirp4netns does for container runtimes) until its process exits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=USERNET_EPILOG,
    )
    add_usernet_flags(att)
    att.add_argument("target", metavar="PID|PATH",
                     help="a process whose namespace to serve, or an nsfs path")
    att.set_defaults(handler=attach_usernet)

    agent = sub.add_parser(
        "seccomp-agent",
        usage="nsbridge seccomp-agent --socket PATH [OPTIONS]",
        help="socket switching for runc/crun containers: serve the seccomp listenerPath "
        "their profile names",
        description="Serve the OCI runtime spec's seccomp agent socket: runc or crun hand "
        "in each container whose seccomp profile names PATH as listenerPath, and its "
        "outbound TCP connections the policy allows become sockets of this namespace, at "
        "the kernel's own speed (as run --bypass).  Denied ones fail with ECONNREFUSED; "
        "the container's loopback, its own addresses, DNS, UDP and ping keep the "
        "container's own networking.  Runs until SIGINT/SIGTERM; many containers at once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AGENT_EPILOG,
    )
    agent.add_argument("--socket", metavar="PATH", required=True,
                       help="the Unix socket to serve (the profile's listenerPath; mode "
                       "0600 unless --allow-user)")
    agent.add_argument("--allow-user", metavar="USER", action="append", default=[],
                       help="also accept containers handed in by this user (name or uid; "
                       "repeatable): the socket becomes mode 0666 and the peer's uid "
                       "decides (default: only the agent's own user)")
    agent.add_argument("--print-profile", action="store_true",
                       help="print the linux.seccomp section for config.json (JSON) and exit")
    agent.add_argument("--metadata", metavar="TEXT", default="",
                       help="with --print-profile: the listenerMetadata to put in it (shown "
                       "in the agent's log)")
    add_policy_flags(agent)
    agent.add_argument("--bypass-exclude", metavar="RULE", action="append", default=[],
                       help="allowed connects to RULE's destinations are not switched but "
                       "made on the container's own socket, so they take the container's "
                       "own networking (nsbridge-slirp4netns or another; with none they "
                       "fail with ENETUNREACH): for FTP active mode, SIP; RULE is NETWORK, "
                       "HOST:PORT, [IPv6]:PORT, *:PORT or PORT[-PORT]; repeatable")
    agent.add_argument("-v", "--verbose", action="count", default=0,
                       help="-v: one line per container and per denied connect; -vv: debug")
    agent.set_defaults(handler=run_seccomp_agent)

    # Listed for --help and the man page; main() hands its arguments to
    # cli/slirp4netns.py before argparse sees them (slirp4netns parses with getopt).
    sub.add_parser(
        "slirp4netns", add_help=False,
        help="serve a namespace for rootlesskit or podman, with slirp4netns's command line "
        "(`nsbridge slirp4netns --help`; also installed as nsbridge-slirp4netns)",
    )

    demo = sub.add_parser(
        "demo",
        help="show a real forward into a throwaway namespace, step by step",
        description="Create a throwaway network namespace with a small HTTP server on its "
        "own loopback, forward a port of this namespace into it, fetch a page through the "
        "forward, and remove everything.  Needs root (or run it as `unshare -Ur nsbridge demo`).",
    )
    demo.add_argument("--mover", "--engine", dest="mover", choices=("splice", "copy"),
                      default=MOVER, help="data mover (--engine is its older name)")
    demo.set_defaults(handler=_run_demo)

    doctor = sub.add_parser(
        "doctor",
        help="check what this machine lets nsbridge do, and say what to change",
        description="Try each thing nsbridge needs — a sandbox namespace with a tun device "
        "and the nftables redirect (as `run` makes it), unprivileged user namespaces, "
        "/dev/net/tun's mode, ping sockets, SO_PEEK_OFF for --tcp=tun, the native relay, "
        "pyroute2's version — and print one line each: ok, limited (a fallback serves) or "
        "missing, with what to do.  Exits 1 when something is missing.",
    )
    doctor.set_defaults(handler=_run_doctor)
    return parser


CONFIG_EPILOG = """\
example FILE.toml:
  workers = 2
  control = "/run/nsbridge.sock"

  [[forward]]
  name = "web"
  listen = "tcp:127.0.0.1:8080"
  connect = "tcp:127.0.0.1:80,netns=web"
  allow = ["127.0.0.0/8"]

  [[forward]]
  name = "dns"
  listen = "udp:127.0.0.1:5353"
  connect = "udp:127.0.0.1:53,netns=web"
"""


def run_serve(args: argparse.Namespace) -> int:
    from nsbridge.forward.config import load

    setup_logging(args.verbose)
    stops = StopSignals()
    try:
        config = load(args.config)
        return run_as_daemon(config.forwards, serve_options(args, config), stops)
    finally:
        stops.close()


def run_ctl(args: argparse.Namespace) -> int:
    from nsbridge.forward.control_client import call, control_message, render

    message = control_message(
        args.ctl_command, name=getattr(args, "name", None), listen=getattr(args, "listen", None),
        connect=getattr(args, "connect", None), allow=getattr(args, "allow", None),
        deny=getattr(args, "deny", None), proxy=getattr(args, "proxy_protocol", None),
        kill=getattr(args, "kill", False))
    shown = render(args.ctl_command, call(args.control, args.ctl_command, message),
                   as_json=getattr(args, "json", False))
    if shown is not None:
        print(shown)
    return 0


USERNET_EPILOG = """\
addresses inside (change with --cidr/--cidr6): 10.0.2.100/24 and fd00::100/64; gateway
(the host) 10.0.2.2 / fd00::2; DNS 10.0.2.3 / fd00::3.  The gateway answers ping itself.
Host access is off by default: the host's loopback (through the gateway address) and
every address of the host's own (every interface, broadcast addresses too, also ones
added later) are refused unless --allow-host-access; an allow rule naming exactly one
host address opens just that (--allow '*' --allow tcp:192.168.1.5:5432).  A rule on
either family's gateway or loopback address (--deny tcp:127.0.0.1:22) holds for both.

policy rules (--allow/--deny, repeatable; deny wins): [tcp|udp|icmp:]NETWORK[:PORT[-PORT]]
  NETWORK is one family's (192.0.2.0/24, [2001:db8::]/32) or * for both families
  e.g. --deny 192.0.2.0/24  --deny tcp:*:25  --allow udp:[2001:db8::]/32:53
IPv6 spellings of IPv4 addresses (NAT64, SIIT, 6to4, Teredo) are decided as both; name
the host's NAT64 prefix with --nat64-prefix (64:ff9b::/96 is always known).

examples:
  nsbridge run -- curl https://example.org/
  nsbridge run -p 8080:80 -- python3 -m http.server 80
"""


AGENT_EPILOG = """\
what a container needs (config.json; `--print-profile` prints this section):
  "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
     "architectures": ["SCMP_ARCH_X86_64"], "listenerPath": "/run/user/1000/nsb.sock",
     "syscalls": [{"names": ["connect", "listen", "bind"], "action": "SCMP_ACT_NOTIFY"},
                  ...]}}
  plus io_uring refused and sends with MSG_FASTOPEN refused (printed in full by
  --print-profile): without them a container could connect around the agent.

the policy is run's: the gateway address (10.0.2.2 of --cidr) is the host's loopback
when --allow-host-access; the DNS address (.3) and the container's own addresses stay
in the container; the rest of --cidr and special addresses are refused.

examples:
  nsbridge seccomp-agent --socket $XDG_RUNTIME_DIR/nsb.sock --deny 192.0.2.0/24 -v
  nsbridge seccomp-agent --socket /tmp/nsb.sock --print-profile > seccomp.json
"""


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The policy's flags, shared by run/attach and seccomp-agent."""
    parser.add_argument("--allow-host-access", "--allow-host-loopback", action="store_true",
                        help="let the namespace reach the host itself: its 127.0.0.1/::1 "
                        "through the gateway address, and its own addresses (off by "
                        "default; --allow-host-loopback is the older name)")
    parser.add_argument("--allow", metavar="RULE", action="append", default=[],
                        help="allow destinations matching RULE (see below)")
    parser.add_argument("--deny", metavar="RULE", action="append", default=[],
                        help="deny destinations matching RULE; a denied TCP flow is reset, a "
                        "denied UDP/ICMP flow answered with ICMP unreachable")
    parser.add_argument("--nat64-prefix", metavar="PREFIX", action="append", default=[],
                        help="a NAT64 prefix the host's translator uses (RFC 6052: /32, /40, "
                        "/48, /56, /64 or /96; repeatable): its addresses are decided as the "
                        "IPv4 addresses they embed too")
    parser.add_argument("--cidr", metavar="NETWORK", default=USERNET_CIDR,
                        help=f"the namespace's IPv4 network (default {USERNET_CIDR}): it gets "
                        "host .100, the gateway .2, DNS .3 (as slirp4netns --cidr)")
    parser.add_argument("--cidr6", metavar="NETWORK", default=USERNET_CIDR6,
                        help=f"the namespace's IPv6 network (default {USERNET_CIDR6}): ::100, "
                        "gateway ::2, DNS ::3")
    parser.add_argument("--outbound-addr", metavar="IPv4|INTERFACE",
                        help="bind outbound IPv4 sockets to this address of the host, or to "
                        "the interface's first IPv4 address (as slirp4netns); the source "
                        "only, the policy still decides (default: the kernel's choice)")
    parser.add_argument("--outbound-addr6", metavar="IPv6|INTERFACE",
                        help="the same for IPv6 (an interface's first global address)")


def run_seccomp_agent(args: argparse.Namespace) -> int:
    from nsbridge.usernet.agent import print_profile, run_agent
    from nsbridge.usernet.options import UsernetOptions, check_options

    if args.print_profile:
        return print_profile(args.socket, args.metadata)
    setup_logging(args.verbose)
    options = UsernetOptions(allow_host_access=args.allow_host_access, allow=args.allow,
                             deny=args.deny, cidr=args.cidr, cidr6=args.cidr6,
                             nat64_prefix=args.nat64_prefix,
                             outbound_addr=args.outbound_addr,
                             outbound_addr6=args.outbound_addr6, dns=[], bypass=True,
                             bypass_exclude=args.bypass_exclude)
    check_options(options)
    uids = [_uid_of(name) for name in args.allow_user]
    stops = StopSignals()
    try:
        return run_agent(args.socket, options, stops, allowed_uids=uids)
    finally:
        stops.close()


def _uid_of(user: str) -> int:
    import pwd

    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UserError(f"--allow-user {user}: no such user") from None


def add_usernet_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--publish", metavar="[HOSTIP:]HOSTPORT:NSPORT[/tcp|/udp]",
                        action="append", default=[],
                        help="publish a namespace port on the host (docker syntax)")
    parser.add_argument("--publish-mode", choices=("device", "splice"), default="device",
                        help="how published TCP ports reach the namespace: device (default) "
                        "= through the device to its interface address, so the server sees "
                        "the client's address (the gateway for the host's loopback); splice "
                        "= a forward to its 127.0.0.1 (faster; every client is 127.0.0.1)")
    add_policy_flags(parser)
    parser.add_argument("--tcp", choices=("auto", "redirect", "tun"), default="auto",
                        help="TCP path: redirect = kernel fast path via nftables; tun = "
                        "terminated on the host side from the tun device (Linux 6.9+); "
                        "auto (default) = redirect, or tun when nf_tables is missing")
    parser.add_argument("--relay", choices=("auto", "native", "engine"), default="auto",
                        help="UDP and ping path: native = a C thread on a device of its "
                        "own (run only; needs the built module; ping only with ping sockets); "
                        "engine = the Python engine; auto (default) = native when it can, "
                        "else engine")
    parser.add_argument("--dns", metavar="IP[:PORT]", action="append",
                        help="host resolver to forward DNS to (default: /etc/resolv.conf)")
    parser.add_argument("--bypass", action="store_true",
                        help="socket switching (run only; Linux 5.9+): outbound TCP "
                        "connections the policy allows become sockets of the host's "
                        "namespace, at the kernel's own speed; denied ones fail with "
                        "ECONNREFUSED; DNS, UDP, ping and the namespace's loopback keep "
                        "their paths")
    parser.add_argument("--bypass-exclude", metavar="RULE", action="append", default=[],
                        help="with --bypass: allowed connects to RULE's destinations are not "
                        "switched but take the namespace's own path (for FTP active mode, "
                        "SIP: protocols that send their own address); RULE is NETWORK, "
                        "HOST:PORT, [IPv6]:PORT, *:PORT or PORT[-PORT]; repeatable")
    parser.add_argument("--mtu", type=int, default=MTU, help=f"MTU (default {MTU})")
    parser.add_argument("--disable-ipv6", action="store_true", help="IPv4 only")
    parser.add_argument("-v", "--verbose", action="count", default=0)


def run_usernet(args: argparse.Namespace) -> int:
    from nsbridge.usernet.options import options_from_args
    from nsbridge.usernet.runner import run_command

    setup_logging(args.verbose)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.stderr.write(args.usage)
        raise UserError("run: no command given: put it after --, e.g. nsbridge run -- curl URL "
                        "(see `nsbridge run --help`)")
    options = options_from_args(args)
    stops = StopSignals()
    try:
        return run_command(command, options, stops)
    finally:
        stops.close()


def attach_usernet(args: argparse.Namespace) -> int:
    from nsbridge.usernet.options import options_from_args
    from nsbridge.usernet.runner import network_existing_namespace

    setup_logging(args.verbose)
    options = options_from_args(args)
    stops = StopSignals()
    try:
        return network_existing_namespace(args.target, options, stops)
    finally:
        stops.close()


def _run_doctor(args: argparse.Namespace) -> int:
    from nsbridge.cli.doctor import run_doctor

    return run_doctor()


def _run_demo(args: argparse.Namespace) -> int:
    from nsbridge.cli.demo import run_demo

    return run_demo(mover=args.mover)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["slirp4netns"]:
        # slirp4netns's own command line (getopt, not argparse): see cli/slirp4netns.py.
        from nsbridge.cli.slirp4netns import main as slirp4netns_main

        return slirp4netns_main(arguments[1:], prog="nsbridge slirp4netns")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        # Bare `nsbridge` is a usage error: one line (like every other), not a help dump.
        parser.error("missing command: give one of forward, serve, ctl, run, attach, "
                     "demo, doctor, seccomp-agent")
    return run_guarded(args.handler, args)


def run_guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                command: str = "nsbridge") -> int:
    """Turn UserError into one line on stderr (``COMMAND: error: ...``) and exit code 2;
    Ctrl-C before the loop runs into exit 130 without a traceback."""
    try:
        return handler(args)
    except UserError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
