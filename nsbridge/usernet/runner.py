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

Steps 2-3 are :class:`Network`, which :mod:`nsbridge.usernet.api` reuses to run the same
host side in a background thread of a program that embeds nsbridge.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any

from nsbridge.defaults import MTU, USERNET_CIDR, USERNET_CIDR6
from nsbridge.errors import UserError
from nsbridge.forward import UDP, Bridge, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.linux.signals import StopSignals
from nsbridge.net.addresses import HostPort
from nsbridge.relay.loop import IN
from nsbridge.usernet.proto.publish import Publish

log = logging.getLogger("nsbridge")


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


def _addresses(options: UsernetOptions) -> Any:
    """The namespace's addresses: host .100, gateway .2, DNS .3 of each network."""
    from nsbridge.usernet.proto.addresses import UsernetAddresses

    return UsernetAddresses.parse(network=options.cidr, network6=options.cidr6,
                                  mtu=options.mtu, labels=("--cidr", "--cidr6"))


def _policy(options: UsernetOptions) -> Any:
    from nsbridge.usernet.proto.policy import Policy
    from nsbridge.usernet.proto.rules import Rule
    from nsbridge.usernet.proto.spellings import parse_nat64_prefix

    rules = [Rule.parse("allow", text, what="--allow") for text in options.allow]
    rules += [Rule.parse("deny", text, what="--deny") for text in options.deny]
    prefixes = [parse_nat64_prefix(text) for text in options.nat64_prefix]
    # The resolvers too: deny rules apply to the resolver a DNS query is sent to.
    return Policy(allow_host_access=options.allow_host_access or options.allow_host_loopback,
                  rules=rules, addresses=_addresses(options), nat64_prefixes=prefixes,
                  resolvers=_resolvers(options))


def policy_warnings(options: UsernetOptions, policy: Any) -> list[str]:
    """Start-up warnings about the rules: a port rule that names one family while IPv6
    is on (with ``--disable-ipv6`` no IPv6 flow exists for it to miss)."""
    return list(policy.single_family_port_rules()) if options.ipv6 else []


def option_warnings(options: UsernetOptions) -> list[str]:
    """:func:`policy_warnings` straight from the options (already checked)."""
    return policy_warnings(options, _policy(options))


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
    _policy(options)
    _config(options)


def _resolvers(options: UsernetOptions) -> list[tuple[str, int]]:
    if options.dns is not None:
        return options.dns
    from nsbridge.usernet.proto.dns import parse_resolv_conf

    try:
        with open("/etc/resolv.conf") as f:
            servers = parse_resolv_conf(f.read())
    except OSError:
        servers = []
    return [(str(server), 53) for server in servers]


def _config(options: UsernetOptions) -> Any:
    from nsbridge.usernet.inside.netconf import NetConfig

    config = NetConfig(_addresses(options), ipv6=options.ipv6)
    config.validate()
    return config


def run_command(command: list[str], options: UsernetOptions, stops: StopSignals) -> int:
    """Run ``command`` with user-mode networking; return its exit status (128+N if killed)."""
    from nsbridge.usernet.inside.sandbox import Sandbox

    if not command:
        raise UserError("run: give the command to run after --, e.g. nsbridge run -- curl URL")
    check_options(options)
    policy = _policy(options)
    config = _config(options)
    extra = _redirect_setup(options)
    handle = Sandbox.create(command, config, extra=extra, hold=True)
    try:
        return _drive(handle, options, policy, stops, attached=False)
    finally:
        handle.close()


def network_existing_namespace(target: str, options: UsernetOptions,
                               stops: StopSignals) -> int:
    """Give an existing namespace networking until its process exits (PID) or a signal."""
    from nsbridge.usernet.inside.sandbox import Sandbox

    check_options(options)
    policy = _policy(options)
    config = _config(options)
    handle = Sandbox.for_namespace(target, config, extra=_redirect_setup(options))
    try:
        return _drive(handle, options, policy, stops, attached=True, target=target)
    finally:
        handle.close()


def _redirect_setup(options: UsernetOptions) -> Any:
    """The sandbox's inside-the-namespace step for the TCP fast path (None for --tcp=tun).

    With ``--tcp=auto`` one failure, and only one, means "no fast path here":
    :class:`~nsbridge.usernet.inside.nft.NftUnavailable` — no CAP_NET_ADMIN over the
    namespace, or a kernel without nf_tables, its NAT/redirect or nfnetlink.  The step
    then hands back, instead of the listeners, a pipe that carries the kernel's reason
    (the sandbox sends the host side only fds), which :class:`Network` logs at -v before
    it serves TCP from the tun device.  Anything else — the listeners cannot bind, the
    kernel refuses the rules for another reason, a bug — fails the set-up as it does with
    ``--tcp=redirect``: falling back would hide it behind a wrong reason.
    """
    if options.tcp == "tun":
        return None
    from nsbridge.usernet.host.redirect import setup_inside
    from nsbridge.usernet.inside.nft import NftUnavailable

    if options.tcp == "redirect":
        return lambda: list(setup_inside(0))

    def inside() -> list[Any]:
        try:
            return list(setup_inside(0))
        except NftUnavailable as exc:
            return [_text_pipe(str(exc))]

    return inside


def _text_pipe(text: str) -> int:
    """The read end of a pipe that holds ``text`` and then EOF (short texts only: the
    write must fit the pipe's buffer)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, text.encode())
    finally:
        os.close(write_end)
    return read_end


def _redirect_listeners(fds: list[int]) -> tuple[list[Any], str | None]:
    """The redirect step's fds, as (listening sockets, None), or ([], the reason the
    fast path is unavailable) when the step sent a :func:`_text_pipe` instead."""
    if len(fds) == 1 and stat.S_ISFIFO(os.fstat(fds[0]).st_mode):
        try:
            reason = b"".join(iter(lambda: os.read(fds[0], 4096), b"")).decode(errors="replace")
        finally:
            os.close(fds[0])
        return [], reason
    return [_socket(fd) for fd in fds], None


class Network:
    """The host side of one namespace's networking: a Bridge loop carrying the tun engine
    (UDP, DNS, ICMP), the TCP redirector (fast path) and published ports.

    Shared by ``nsbridge run``/``attach`` (which drive the loop in the main thread, with
    signals) and :mod:`nsbridge.usernet.api` (which drives it in a background thread of an
    embedding program), so both get exactly the same wiring.  Life cycle: construct,
    :meth:`start` (opens everything; the loop does not run yet, so the caller can still
    add watches), then :meth:`run` or :meth:`start_thread`, then :meth:`close`.

    The caller keeps owning ``handle`` (it may still have to reap a command); this object
    only takes its ``extra`` fds (the redirect listeners).
    """

    def __init__(self, handle: Any, options: UsernetOptions, policy: Any | None = None) -> None:
        self.handle = handle
        self.options = options
        self.policy = policy if policy is not None else _policy(options)
        self.bridge = Bridge()
        self.engine: Any = None
        self.redirector: Any = None
        self.tun_tcp: Any = None
        self.native_relay: Any = None
        self.host_addresses: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _closed against cross-thread stats()/stop()
        self._closed = False
        self._final: dict[str, Any] | None = None
        self._on_end: list[Callable[[], None]] = []
        self.warnings: list[str] = policy_warnings(options, self.policy)

    # ---- building -------------------------------------------------------------------

    def start(self) -> None:
        """Open the engine, the redirector and the published ports (raises UserError).

        On failure everything opened so far is released (close() is still safe)."""
        from nsbridge.usernet.host.engine import TunEngine, ping_unavailable

        handle, bridge = self.handle, self.bridge
        for warning in self.warnings:
            log.warning("%s", warning)
        try:
            self._track_host_addresses()
            resolvers = self.policy.resolvers
            if resolvers is None:
                resolvers = _resolvers(self.options)
            for line in self.policy.denied_resolvers():
                log.warning("%s", line)
            if getattr(handle, "link", "tun") == "tap":
                self._tap_engine(resolvers)
            else:
                self.engine = TunEngine(bridge.loop, handle.tun, handle.vnet_hdr_size,
                                        self.policy, self.policy.addresses, resolvers,
                                        offloads=handle.offloads)
            self.engine.start()
            no_ping = ping_unavailable()
            if no_ping is not None:
                log.info("%s", no_ping)
            listeners, no_fast_path = _redirect_listeners(handle.take_extra())
            if no_fast_path is not None:
                log.info("TCP fast path: %s", no_fast_path)
            if listeners:
                from nsbridge.usernet.host.redirect import TcpRedirector

                self.redirector = TcpRedirector(bridge.loop, listeners, self.policy,
                                                resolvers=resolvers, mover=bridge.mover)
                self.redirector.start()
                log.info("TCP: kernel fast path (nftables redirect)")
            else:
                self._start_tun_tcp(resolvers)
            if self.options.publish:
                from nsbridge.usernet.inside.nsfactory import ProcessFactory

                factory = ProcessFactory.inside(handle)
                bridge.register_factory(handle.netns, factory)
                for publish in self.options.publish:
                    _publish(bridge, handle, publish)
            # Last: the published ports' helper is forked above, and a fork is best made
            # before a thread that C code owns is running.
            self._start_native_relay()
        except BaseException:
            self.close()
            raise

    def _tap_engine(self, resolvers: list[tuple[str, int]]) -> None:
        """The engine for a TAP device (slirp4netns's callers): Ethernet handled by
        ``host/tap.py``, TCP through the tun path, UDP and ping through the engine; the
        fast path and the native relay need set-up inside the namespace that a TAP's
        owner does not give us."""
        from nsbridge.usernet.host.tap import TapEngine

        options, handle = self.options, self.handle
        if options.tcp not in ("auto", "tun"):
            raise UserError(f"--tcp={options.tcp}: not on a TAP device; use --tcp=tun")
        if options.relay not in ("auto", "engine"):
            raise UserError(f"--relay={options.relay}: not on a TAP device; use --relay=engine")
        self.options = replace(options, tcp="tun", relay="engine")
        self.engine = TapEngine(self.bridge.loop, handle.tun, self.policy, self.policy.addresses,
                                resolvers, guest_mac=handle.guest_mac, ipv6=bool(handle.ipv6))
        log.info("link: TAP (Ethernet; ARP, neighbour discovery and DHCP answered here)")

    def _track_host_addresses(self) -> None:
        """With host access off, give the policy the host's addresses, live (opened here:
        in the namespace this process dials from)."""
        from nsbridge.usernet.host.hostaddrs import HostAddresses
        from nsbridge.usernet.proto.hostaccess import NO_HOST_ADDRESSES

        if self.policy.allow_host_access or self.policy.host_addresses is not NO_HOST_ADDRESSES:
            log.info("host access: allowed (the host's loopback through the gateway, and "
                     "its own addresses)")
            return
        self.host_addresses = HostAddresses()
        self.policy.host_addresses = self.host_addresses
        log.info("host access: denied (the host's loopback and its %d own addresses, kept "
                 "current; --allow-host-access opens them)",
                 len(self.host_addresses.snapshot()))

    def _start_tun_tcp(self, resolvers: list[tuple[str, int]]) -> None:
        """Serve TCP from the tun device (``--tcp=tun``, or no nf_tables for the fast path)."""
        from nsbridge.usernet.host.tuntcp import TunTcp, unavailable

        why_not = unavailable()
        if why_not is not None:
            if self.options.tcp == "tun":
                raise UserError(f"--tcp=tun: {why_not}")
            log.warning("TCP from the namespace is refused: no nf_tables for the fast path "
                        "and %s", why_not)
            return
        engine = self.engine
        self.tun_tcp = TunTcp(self.bridge.loop, engine.write, engine.write_parts, self.policy,
                              source_ok=engine.new_flow_source_ok, resolvers=resolvers,
                              vnet=bool(self.handle.vnet_hdr_size),
                              offload="csum" in self.handle.offloads)
        engine.tcp_handler = self.tun_tcp.handle
        if self.options.tcp == "tun":
            log.info("TCP: tun path (terminated on the host side)")
        else:
            log.warning("TCP fast path unavailable (nf_tables cannot be used in the namespace; "
                        "-v says why); TCP goes through the tun path (slower)")

    def _start_native_relay(self) -> None:
        """UDP and ping through the native relay (``--relay``): ``auto`` uses it in a
        ``run`` sandbox when it can and says why not at -v; ``native`` insists."""
        mode, handle = self.options.relay, self.handle
        if mode == "engine":
            return
        from nsbridge.usernet.host.flowrelay import (
            NativeRelay,
            ping_sockets_refused,
            setup_inside,
            unavailable,
        )

        why_not = unavailable()
        if why_not is None and getattr(handle, "pid", None) is None:
            why_not = ("it needs a namespace nsbridge created (nsbridge run): it adds a "
                       "device and routing rules that must end with the namespace")
        no_ping = ping_sockets_refused()
        if why_not is None:
            try:
                (fd,) = handle.make_fds(
                    lambda: setup_inside(handle.config, no_ping is None, bool(handle.ipv6)))
            except UserError as exc:
                why_not = f"setting up its device failed: {exc}"
        if why_not is not None:
            if mode == "native":
                raise UserError(f"--relay=native: {why_not}; use --relay=engine")
            log.info("UDP and ping: through the engine (the native relay is not used: %s)",
                     why_not)
            return
        self.native_relay = NativeRelay(self.bridge.loop, self.engine, fd)
        self.native_relay.start()
        if no_ping is None:
            log.info("UDP and ping: native relay (device nsb-relay)")
        else:
            log.info("UDP: native relay (device nsb-relay); ping through the engine: %s",
                     no_ping)

    def stop_when_readable(self, fd: int) -> None:
        """Stop the loop once ``fd`` (a pidfd) is readable — a process exited.  Call
        before the loop runs; ``fd`` stays the caller's (closed after close())."""
        self.bridge.loop.add(fd, IN, lambda _e: self.bridge.loop.stop())

    def on_end(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after the loop thread has torn everything down (start_thread only):
        lets an attachment release its namespace fds as soon as its target exits."""
        self._on_end.append(fn)

    # ---- running --------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop in this thread until stop() (or a watched fd) ends it."""
        self.bridge.run()

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread that tears everything down when the loop ends,
        so a namespace whose process exited leaves nothing open even if nobody calls
        close()."""
        def main() -> None:
            try:
                self.bridge.run()
            except BaseException:
                log.exception("user-mode networking loop failed")
            finally:
                self._teardown()
                for fn in self._on_end:
                    try:
                        fn()
                    except Exception:
                        log.exception("user-mode networking cleanup failed")

        self._thread = threading.Thread(target=main, name="nsbridge-usernet", daemon=True)
        self._thread.start()
        return self._thread

    @property
    def running(self) -> bool:
        """True while the loop thread (start_thread) carries traffic."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Make the loop return (any thread; a no-op once closed)."""
        with self._lock:
            if not self._closed:
                self.bridge.loop.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread to finish its teardown; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop and release everything (idempotent).  With a loop thread, stops it and
        waits for its teardown; otherwise (run() in the caller's thread, or never run)
        tears down here."""
        if self._thread is not None:
            self.stop()
            self._thread.join()
            return
        self._teardown()

    # ---- counters -------------------------------------------------------------------

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Engine and redirector counters as plain data (JSON-serialisable).

        The counters belong to the loop thread; while it runs they are copied there (a
        Counter being updated cannot be iterated safely from another thread).  After the
        end, the values at teardown are returned."""
        if self._thread is None or threading.current_thread() is self._thread:
            return self._final if self._final is not None else self._snapshot()
        result: Future[dict[str, Any]] = Future()

        def take() -> None:
            try:
                result.set_result(self._snapshot())
            except BaseException as exc:
                result.set_exception(exc)

        with self._lock:
            if self._closed:
                return self._final or {}
            self.bridge.loop.call_soon_threadsafe(take)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return result.result(timeout=0.05)
            except FutureTimeout:
                if not self.running:  # ended before running our call: final values
                    self._thread.join()
                    return self._final or {}
                if time.monotonic() >= deadline:
                    raise TimeoutError("the networking loop did not answer") from None

    def _snapshot(self) -> dict[str, Any]:
        engine: dict[str, Any] = {}
        if self.engine is not None:
            for name, value in vars(self.engine.stats).items():
                engine[name] = dict(value) if isinstance(value, Counter) else value
        if self.native_relay is not None:
            _merge_native_relay(engine, self.native_relay.stats())
        tcp = None
        if self.redirector is not None:
            tcp = self.redirector.snapshot().as_dict()
        elif self.tun_tcp is not None:
            tcp = self.tun_tcp.snapshot().as_dict()
        forwards = [{"name": f.spec.name, "listen": str(f.listen_address)}
                    for f in self.bridge.forwards]
        return {"engine": engine, "tcp": tcp, "published": forwards}

    def _teardown(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._final = self._snapshot()
            except Exception:
                log.exception("reading the final counters failed")
            self._closed = True
        if self.tun_tcp is not None:
            self.tun_tcp.close()
        if self.native_relay is not None:
            self.native_relay.close()
        if self.engine is not None:
            self.engine.close()
        if self.redirector is not None:
            self.redirector.close()
        if self.host_addresses is not None:
            self.host_addresses.close()
        self.bridge.close()


def _drive(handle: Any, options: UsernetOptions, policy: Any, stops: StopSignals, *,
           attached: bool, target: str = "") -> int:
    network = Network(handle, options, policy)
    network.start()
    try:
        watched = _watch_exit(network, handle, attached, target)
        status: dict[str, int] = {}

        def on_signal(signum: int, count: int) -> None:
            if attached or handle.pid is None:
                network.bridge.loop.stop()
            elif count >= 3:
                handle.kill(signal.SIGKILL)
            else:
                handle.kill(signum)  # CMD decides; its exit ends us

        stops.attach(network.bridge.loop, on_signal)
        if not attached:
            handle.start()
        network.run()
        if not attached:
            code = handle.wait()
            status["code"] = 128 - code if code < 0 else code
        if watched is not None:
            os.close(watched)
        return status.get("code", 0)
    finally:
        network.close()
        if log.isEnabledFor(logging.INFO):
            log.info("usernet: %s", summary(network.stats()))


def _merge_native_relay(engine: dict[str, Any], relay: dict[str, Any]) -> None:
    """Fold the native relay's counters into the engine's (the figures a user reads are
    the same whichever path served UDP and ping), keeping its own under ``native``.

    The relay names every counter it shares with the engine as the engine does, so a
    counter of the same name is added and there is nothing to translate; the others
    (its rejections, its own view of the flows the engine already counted when it
    decided them) are the relay's alone (``_flowrelay.c``: ``kind_names``)."""
    for name, value in relay.items():
        if type(value) is int and type(engine.get(name)) is int:
            engine[name] += value
    engine["native"] = relay


def summary(stats: dict[str, Any]) -> str:
    """One line of what a run carried and refused (``-v`` prints it at the end)."""
    engine, tcp = stats.get("engine") or {}, stats.get("tcp") or {}
    # The engine's counter is the policy's own, so it has every policy denial (TCP too);
    # the TCP paths add reasons of their own ("not redirected", "no host resolver").
    denied: Counter[str] = Counter(engine.get("denied") or {})
    for reason, count in (tcp.get("denied") or {}).items():
        if reason not in denied:
            denied[reason] = count
    parts = [
        f"TCP connections: {tcp.get('accepted', 0)} ({tcp.get('connect_failed', 0)} "
        f"failed to connect)",
        f"UDP flows: {engine.get('udp_flows_total', 0)}",
        f"DNS queries: {engine.get('dns_queries', 0)}",
        f"echo requests: {engine.get('icmp_echo_requests', 0)}",
    ]
    if denied:
        parts.append("denials: " + ", ".join(f"{reason} x{n}"
                                           for reason, n in denied.most_common()))
    else:
        parts.append("nothing denied")
    if engine.get("icmp_unavailable"):
        parts.append(f"echo requests refused x{engine['icmp_unavailable']}: ping sockets are "
                     "not permitted (sysctl net.ipv4.ping_group_range)")
    refused = Counter(engine.get("dns_refused") or {}) + Counter(tcp.get("dns_refused") or {})
    if refused:
        parts.append("DNS refused: " + ", ".join(f"{reason} x{n}"
                                                for reason, n in refused.most_common()))
    return "; ".join(parts)


def _publish(bridge: Bridge, handle: Any, publish: Publish) -> None:
    protocol = UDP if publish.protocol == "udp" else "stream"
    target = HostPort("127.0.0.1", publish.ns_port)
    forward = bridge.add(ForwardSpec(
        ListenAddress(publish.host, protocol=protocol),
        ConnectAddress(target, handle.netns, protocol=protocol),
        name=f"publish {publish}",
    ))
    log.info("published %s (listening on %s)", publish, forward.listen_address)


def _watch_exit(network: Network, handle: Any, attached: bool, target: str) -> int | None:
    """Stop the loop when CMD exits (run) or the target process exits (attach PID).

    Returns a pidfd the caller must close (attach), or None (run: the handle owns it)."""
    if not attached:
        network.stop_when_readable(handle.pidfd)
        return None
    pidfd = target_pidfd(target)
    if pidfd is not None:
        network.stop_when_readable(pidfd)
    return pidfd


def target_pidfd(target: str | int) -> int | None:
    """A pidfd for an attach target given as a PID (``N`` or ``pid:N``); None for a path
    or name (those run until stopped).  Raises UserError if the process is gone."""
    text = str(target)
    pid_text = text[4:] if text.startswith("pid:") else text
    if not pid_text.isdigit():
        return None
    from nsbridge.linux.lifetime import open_exit_with

    return open_exit_with(pid_text, what="attach")


def _socket(fd: int) -> Any:
    import socket

    return socket.socket(fileno=fd)
