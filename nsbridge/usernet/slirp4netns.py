"""``nsbridge-slirp4netns``'s life cycle: what rootlesskit and podman rely on, in order.

1. The caller's ``--ready-fd`` and ``--exit-fd`` are checked with ``fstat`` before
   anything of ours is opened (:func:`check_caller_fds`): a number the caller forgot to
   pass would otherwise be taken by one of our own fds, and we would write "1" into our
   own socket or wait for our own pipe.
2. The namespace is entered by the same forked helper ``nsbridge attach`` uses
   (:meth:`~nsbridge.usernet.inside.sandbox.Sandbox.for_namespace`): ``--netns-type=pid``
   is the PID's network namespace, ``path`` an nsfs file (nobody needs to live in it);
   the helper enters the user namespace that owns it unless that is ours (podman calls
   us from inside it), or ``--userns-path``'s.  There it opens the TAP device, and with
   ``-c`` creates and configures it (:mod:`.inside.tapdevice`).  The helper dies with us.
3. The host side is :class:`~nsbridge.usernet.network.Network` on the TAP link, with TCP
   on the tun path and UDP/ping in the engine (the native relay needs set-up a TAP's
   namespace does not get), and the API socket if asked for.  With
   ``--enable-sandbox``/``--enable-seccomp`` the process then locks itself down
   (:mod:`.slirpsandbox`).  Only then ``--ready-fd`` gets its "1" and is closed; a
   failure before that exits 1 with the reason on stderr, and the caller reads EOF.
   Right after, the TCP fast path is added (an nftables redirect of the SYNs leaving
   by the TAP, when the namespace allows nf_tables): the connections the namespace
   starts then move at the kernel's speed, while the tun path keeps those already open
   and the ones forwarded from containers on a bridge.
4. The loop runs until ``--exit-fd`` reports any event (its writer closed: exit 0),
   SIGTERM/SIGINT (exit 0), or, in PID mode, the target process exits.

The policy is slirp4netns's, not ``nsbridge run``'s (docs/slirp4netns.md): the host's
loopback is reachable through the gateway unless ``--disable-host-loopback``, and the
host's other addresses are ordinary destinations either way, as slirp4netns has them.
``--disable-dns`` refuses the DNS address (a deny rule on it) rather than dialing it as
an outside address: that address is inside the namespace's own network, where nothing
real lives behind nsbridge.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from nsbridge.errors import UserError

log = logging.getLogger("nsbridge")

# The range nsbridge's engine serves; slirp4netns's parser allows 1-65521, and callers
# pass 1500 (the default) or 65520.
MIN_MTU, MAX_MTU = 1280, 65520


def check_caller_fds(*fds: int | None) -> None:
    """Each given fd must be open now, before we open anything (else one of ours could
    take its number).  Raises UserError naming the first that is not."""
    for fd in fds:
        if fd is None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            raise UserError(f"file descriptor {fd} (--ready-fd/--exit-fd) is not open: "
                            "the caller must pass it") from None


def serve(args: Any, prog: str) -> int:
    """Run for a parsed :class:`nsbridge.cli.slirp4netns.Slirp4netnsArgs`; the exit code."""
    _setup_logging(prog)
    from nsbridge.linux.signals import StopSignals

    stops = StopSignals()  # from here SIGTERM/SIGINT wait in a signalfd: none is lost
    try:
        return _serve(args, stops)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stops.close()


def _setup_logging(prog: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{os.path.basename(prog)}: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)  # a line per step, as slirp4netns logs to stderr
    log.propagate = False


def usernet_options(args: Any) -> Any:
    """slirp4netns's semantics as ``nsbridge run``'s options (see the module's text)."""
    from nsbridge.defaults import USERNET_CIDR6
    from nsbridge.usernet.options import UsernetOptions

    deny = []
    if args.disable_dns:
        import ipaddress

        dns4 = ipaddress.IPv4Network(args.cidr)[3]  # slirp4netns's DNS: network + 3
        deny = [f"{dns4}/32"]  # covers the IPv6 DNS address too (one service)
    return UsernetOptions(allow_host_access=not args.disable_host_loopback, deny=deny,
                          tcp="tun", relay="engine", mtu=args.mtu, ipv6=args.ipv6,
                          cidr=args.cidr, cidr6=USERNET_CIDR6, api_socket=args.api_socket,
                          outbound_addr=args.outbound_addr, outbound_addr6=args.outbound_addr6)


def slirp4netns_policy(args: Any, options: Any) -> Any:
    """The policy for ``options`` (from :func:`usernet_options`), with slirp4netns's view
    of the host: ``--disable-host-loopback`` closes the host's loopback (the gateway) and
    nothing else, so the host's own addresses are not tracked — an empty set, where
    ``nsbridge run`` fills it from netlink."""
    from nsbridge.usernet.options import policy_of

    policy = policy_of(options)
    if args.disable_host_loopback:
        policy.host_addresses = set()
    return policy


def _serve(args: Any, stops: Any) -> int:
    started = time.monotonic()
    if not MIN_MTU <= args.mtu <= MAX_MTU:
        raise UserError(f"MTU {args.mtu} is not supported by nsbridge-slirp4netns (it "
                        f"serves {MIN_MTU}-{MAX_MTU})")
    from nsbridge.linux.netns import Netns
    from nsbridge.usernet.inside.netconf import NetConfig
    from nsbridge.usernet.inside.sandbox import Sandbox
    from nsbridge.usernet.inside.tapdevice import TapRequest
    from nsbridge.usernet.network import Network
    from nsbridge.usernet.options import check_options
    from nsbridge.usernet.proto.addresses import UsernetAddresses

    options = usernet_options(args)
    check_options(options)
    addresses = UsernetAddresses.parse(network=options.cidr, network6=options.cidr6,
                                       mtu=options.mtu, labels=("--cidr", "--cidr6"))
    config = NetConfig(addresses, ifname=args.tapname, ipv6=options.ipv6)
    if args.netns_type == "pid":
        from nsbridge.linux.lifetime import open_exit_with

        target: Any = args.target
        pidfd = open_exit_with(args.target, what="PID")
    else:
        target = Netns.from_path(args.target)
        pidfd = None
    try:
        handle = Sandbox.for_namespace(
            target, config, userns_path=args.userns_path,
            tap=TapRequest(args.tapname, create=args.configure, mac=args.macaddress))
    finally:
        if isinstance(target, Netns):
            target.close()
    network = Network(handle, options, slirp4netns_policy(args, options))
    try:
        network.start()  # with the API socket, when asked for
        loop = network.bridge.loop
        if pidfd is not None:
            network.stop_when_readable(pidfd)
        if args.exit_fd is not None:
            _watch_exit_fd(loop, args.exit_fd)
        stops.attach(loop, lambda _signum, _count: loop.stop())
        if args.enable_sandbox or args.enable_seccomp:
            from nsbridge.usernet.slirpsandbox import lock_down

            network.prepare_tcp_fast_path()  # its helper must be forked before we lock down
            lock_down(handle.userns, sandbox=args.enable_sandbox, seccomp=args.enable_seccomp)
        _print_banner(args, addresses, network.outbound)
        if args.ready_fd is not None:
            _signal_ready(args.ready_fd)
        log.info("ready after %.0f ms", (time.monotonic() - started) * 1000)
        network.add_tcp_fast_path()  # after ready: not part of the caller's wait
        network.run()
        return 0
    finally:
        network.close()
        handle.close()
        if pidfd is not None:
            os.close(pidfd)


def _watch_exit_fd(loop: Any, fd: int) -> None:
    """End on any event of the caller's exit fd (its other end closed: HUP; an error:
    ERR), as slirp4netns does; data written to it is not an event (slirp4netns polls for
    HUP alone)."""
    from nsbridge.relay.loop import ERR, HUP

    try:
        loop.add(fd, HUP | ERR, lambda _events: loop.stop())
    except PermissionError:  # a regular file: nothing to wait for, as with poll()
        log.warning("--exit-fd %d cannot be watched (a regular file?); ignoring it", fd)


def _signal_ready(fd: int) -> None:
    """Write "1" and close: the caller reads one byte, then EOF."""
    try:
        os.write(fd, b"1")
    except OSError as exc:
        log.warning("--ready-fd %d: cannot write: %s", fd, os.strerror(exc.errno or 0))
    finally:
        os.close(fd)


def _print_banner(args: Any, addresses: Any, outbound: Any) -> None:
    """slirp4netns's start-up summary on stdout (callers log it; nobody parses it)."""
    network = addresses.network
    lines = [
        "Starting slirp (nsbridge)",
        f"* MTU:             {args.mtu}",
        f"* Network:         {network.network_address}",
        f"* Netmask:         {network.netmask}",
        f"* Gateway:         {addresses.gateway}",
        f"* DNS:             {addresses.dns}",
        f"* Recommended IP:  {addresses.interface.ip}",
    ]
    if args.api_socket is not None:
        lines.append(f"* API Socket:      {args.api_socket}")
    if outbound.ipv4 is not None:
        lines.append(f"* Outbound IPv4:    {outbound.ipv4}")
    if outbound.ipv6 is not None:
        lines.append(f"* Outbound IPv6:    {outbound.ipv6}")
    if args.macaddress is not None:
        lines.append(f"* MAC address:     {args.macaddress}")
    if not args.disable_host_loopback:
        lines.append(f"WARNING: 127.0.0.1:* on the host is accessible as {addresses.gateway} "
                     "(set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
