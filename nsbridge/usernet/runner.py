"""``nsbridge run`` and ``nsbridge attach``: put the pieces together and drive them.

One process, one event loop (the host side never needs more: the heavy lifting is in
the kernel for TCP), in this order:

1. The sandbox is created (or entered, for attach) by a single-threaded helper; inside,
   the TCP fast path is set up (nftables REDIRECT to listeners made there) unless
   ``--tcp=tun``.  CMD is held until the host side is ready.
2. The tun engine (UDP, DNS, ICMP) and the TCP redirector start on the loop.
3. Published ports become ordinary forwards whose connect side is created inside the
   namespace by a socket-factory process living there.
4. CMD starts; its exit ends the loop; its exit status is ours.  SIGINT/SIGTERM are
   passed on to CMD (it decides), so a Ctrl-C behaves as if nsbridge were not there.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from ..addresses import HostPort
from ..bridge import Bridge
from ..errors import UserError
from ..forward import ForwardSpec
from ..relay.loop import IN
from ..signals import StopSignals
from ..spec import UDP, ConnectAddress, ListenAddress
from .publish import Publish

log = logging.getLogger("nsbridge")


@dataclass
class UsernetOptions:
    publish: list[Publish] = field(default_factory=list)
    allow_host_loopback: bool = False
    allow: list[str] = field(default_factory=list)  # destination rules
    deny: list[str] = field(default_factory=list)
    tcp: str = "auto"  # auto | redirect | tun
    dns: list[tuple[str, int]] | None = None  # host resolvers; None: /etc/resolv.conf
    mtu: int = 65520
    ipv6: bool = True


def _policy(options: UsernetOptions) -> Any:
    from .policy import Policy, Rule

    rules = [Rule.parse("allow", text, what="--allow") for text in options.allow]
    rules += [Rule.parse("deny", text, what="--deny") for text in options.deny]
    return Policy(allow_host_loopback=options.allow_host_loopback, rules=rules)


def _resolvers(options: UsernetOptions) -> list[tuple[str, int]]:
    if options.dns is not None:
        return options.dns
    from .dns import parse_resolv_conf

    try:
        with open("/etc/resolv.conf") as f:
            servers = parse_resolv_conf(f.read())
    except OSError:
        servers = []
    return [(str(server), 53) for server in servers]


def _config(options: UsernetOptions) -> Any:
    from .netconf import NetConfig

    config = NetConfig(mtu=options.mtu) if options.ipv6 else NetConfig(mtu=options.mtu,
                                                                       ipv6=None)
    config.validate()
    return config


def run_command(command: list[str], options: UsernetOptions, stops: StopSignals) -> int:
    """Run ``command`` with user-mode networking; return its exit status (128+N if killed)."""
    from .sandbox import Sandbox

    if not command:
        raise UserError("run: give the command to run after --, e.g. nsbridge run -- curl URL")
    policy = _policy(options)
    config = _config(options)
    extra = _redirect_setup(options)
    handle = Sandbox.create(command, config, extra=extra, hold=True)
    try:
        return _drive(handle, options, policy, stops, attached=False)
    finally:
        handle.close()


def attach(target: str, options: UsernetOptions, stops: StopSignals) -> int:
    """Give an existing namespace networking until its process exits (PID) or a signal."""
    from .sandbox import Sandbox

    policy = _policy(options)
    config = _config(options)
    handle = Sandbox.attach(target, config, extra=_redirect_setup(options))
    try:
        return _drive(handle, options, policy, stops, attached=True, target=target)
    finally:
        handle.close()


def _redirect_setup(options: UsernetOptions) -> Any:
    """The sandbox's inside-the-namespace step for the TCP fast path (None for --tcp=tun)."""
    if options.tcp == "tun":
        return None
    from .redirect import setup_inside

    strict = options.tcp == "redirect"

    def inside() -> list[Any]:
        try:
            return list(setup_inside(0))
        except Exception:
            if strict:
                raise
            return []  # no nf_tables here: TCP goes through the tun path

    return inside


def _drive(handle: Any, options: UsernetOptions, policy: Any, stops: StopSignals, *,
           attached: bool, target: str = "") -> int:
    from .engine import TunEngine
    from .policy import UsernetAddresses

    bridge = Bridge()
    resolvers = _resolvers(options)
    engine = TunEngine(bridge.loop, handle.tun, handle.vnet_hdr_size, policy,
                       UsernetAddresses(), resolvers, offloads=handle.offloads)
    engine.start()
    listeners = [_socket(fd) for fd in handle.take_extra()]
    redirector = None
    if listeners:
        from .redirect import TcpRedirector

        redirector = TcpRedirector(bridge.loop, listeners, policy, resolvers=resolvers,
                                   mover=bridge.mover)
        redirector.start()
        log.info("TCP: kernel fast path (nftables redirect)")
    elif options.tcp != "tun":
        log.warning("TCP fast path unavailable (no nf_tables in the namespace); TCP "
                    "connections from the namespace are refused until the tun TCP path "
                    "exists")
    factory = None
    try:
        if options.publish:
            from .nsfactory import ProcessFactory

            factory = ProcessFactory.inside(handle)
            bridge.register_factory(handle.netns, factory)
            for publish in options.publish:
                _publish(bridge, handle, publish)
        watched = _watch_exit(bridge, handle, attached, target)
        status: dict[str, int] = {}

        def on_signal(signum: int, count: int) -> None:
            if attached or handle.pid is None:
                bridge.loop.stop()
            elif count >= 3:
                handle.kill(signal.SIGKILL)
            else:
                handle.kill(signum)  # CMD decides; its exit ends us

        stops.attach(bridge.loop, on_signal)
        if not attached:
            handle.start()
        bridge.run()
        if not attached:
            code = handle.wait()
            status["code"] = 128 - code if code < 0 else code
        if watched is not None:
            os.close(watched)
        return status.get("code", 0)
    finally:
        engine.close()
        if redirector is not None:
            redirector.close()
        bridge.close()


def _publish(bridge: Bridge, handle: Any, publish: Publish) -> None:
    protocol = UDP if publish.protocol == "udp" else "stream"
    target = HostPort("127.0.0.1", publish.ns_port)
    forward = bridge.add(ForwardSpec(
        ListenAddress(publish.host, protocol=protocol),
        ConnectAddress(target, handle.netns, protocol=protocol),
        name=f"publish {publish}",
    ))
    log.info("published %s (listening on %s)", publish, forward.listen_address)


def _watch_exit(bridge: Bridge, handle: Any, attached: bool, target: str) -> int | None:
    """Stop the loop when CMD exits (run) or the target process exits (attach PID)."""
    if not attached:
        bridge.loop.add(handle.pidfd, IN, lambda _e: bridge.loop.stop())
        return None
    pid_text = target[4:] if target.startswith("pid:") else target
    if not pid_text.isdigit():
        return None  # a path: run until a signal
    from ..lifetime import open_exit_with

    pidfd = open_exit_with(pid_text, what="attach")
    bridge.loop.add(pidfd, IN, lambda _e: bridge.loop.stop())
    return pidfd


def _socket(fd: int) -> Any:
    import socket

    return socket.socket(fileno=fd)
