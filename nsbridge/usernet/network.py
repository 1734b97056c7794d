"""The host side of one user-mode namespace, wired: :class:`Network`.

A Bridge event loop carrying the tun engine (UDP, DNS, ICMP), the TCP redirector (the
fast path) or the tun TCP path, the native UDP/ping relay, the host-address tracker and
the published ports.  ``nsbridge run``/``attach`` (:mod:`.runner`) drive it in the main
thread with signals; :mod:`.api` drives it in a background thread of an embedding
program; both get exactly this wiring.  :func:`redirect_setup` is the inside-the-namespace
step of the TCP fast path that a sandbox runs for it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from nsbridge.errors import UserError
from nsbridge.forward import UDP, Bridge, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.net.addresses import HostPort
from nsbridge.relay.loop import IN
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.options import (
    UsernetOptions,
    outbound_of,
    policy_of,
    policy_warnings,
    resolvers_of,
)
from nsbridge.usernet.proto.publish import Publish

if TYPE_CHECKING:
    from nsbridge.usernet.host.apisocket import ApiSocketServer
    from nsbridge.usernet.host.engine import TunEngine
    from nsbridge.usernet.host.flowrelay import NativeRelay
    from nsbridge.usernet.host.hostaddrs import HostAddresses
    from nsbridge.usernet.host.inbound import InboundPorts
    from nsbridge.usernet.host.redirect import TcpRedirector
    from nsbridge.usernet.host.switcher import SocketSwitcher
    from nsbridge.usernet.host.tap import TapEngine
    from nsbridge.usernet.host.tuntcp import TunTcp
    from nsbridge.usernet.inside.sandbox import ExtraFds, PendingFds, SandboxHandle
    from nsbridge.usernet.proto.policy import Policy

log = logging.getLogger("nsbridge")


def redirect_setup(options: UsernetOptions) -> ExtraFds | None:
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
    from nsbridge.defaults import TUN_IFNAME
    from nsbridge.usernet.host.redirect import setup_inside
    from nsbridge.usernet.inside.nft import NftUnavailable

    if options.tcp == "redirect":
        return lambda: list(setup_inside(0, forwarded=TUN_IFNAME))

    def inside() -> list[int | socket.socket]:
        try:
            return list(setup_inside(0, forwarded=TUN_IFNAME))
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


def redirect_listeners(fds: list[int]) -> tuple[list[socket.socket], str | None]:
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

    def __init__(self, handle: SandboxHandle, options: UsernetOptions,
                 policy: Policy | None = None) -> None:
        self.handle = handle
        self.options = options
        self.policy = policy if policy is not None else policy_of(options)
        # The Python relay: this loop also carries the tun engine and its fds, which the
        # native TCP relay's waiting would put behind a second epoll_wait each.
        self.bridge = Bridge(relay="python")
        self.engine: TunEngine | None = None
        self.redirector: TcpRedirector | None = None
        self.tun_tcp: TunTcp | None = None
        self.native_relay: NativeRelay | None = None
        self.host_addresses: HostAddresses | None = None
        self.api_socket: ApiSocketServer | None = None
        self.inbound: InboundPorts | None = None  # device-mode published ports
        self.switcher: SocketSwitcher | None = None  # run --bypass
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _closed against cross-thread stats()/stop()
        self._closed = False
        self._final: dict[str, Any] | None = None
        self._on_end: list[Callable[[], None]] = []
        self._fast_path_pending: PendingFds | None = None  # see prepare_tcp_fast_path
        self.warnings: list[str] = policy_warnings(options, self.policy)
        # Resolved in start(), in the namespace the host side dials from.
        self.outbound: OutboundAddresses = NONE

    # ---- building -------------------------------------------------------------------

    def start(self) -> None:
        """Open the engine, the redirector and the published ports (raises UserError).

        On failure everything opened so far is released (close() is still safe)."""
        from nsbridge.usernet.host.engine import TunEngine, ping_unavailable

        handle, bridge = self.handle, self.bridge
        for warning in self.warnings:
            log.warning("%s", warning)
        log.info("policy: %s", self.policy.describe())
        try:
            self.outbound = outbound = outbound_of(self.options)
            if outbound:
                log.info("outbound sockets bound to: %s", outbound.describe())
            self._track_host_addresses()
            resolvers = self.policy.resolvers
            if resolvers is None:
                resolvers = resolvers_of(self.options)
            for line in self.policy.denied_resolvers():
                log.warning("%s", line)
            if handle.link == "tap":
                self.engine = self._tap_engine(resolvers)
            else:
                self.engine = TunEngine(bridge.loop, handle.tun, handle.vnet_hdr_size,
                                        self.policy, self.policy.addresses, resolvers,
                                        offloads=handle.offloads, outbound=outbound)
            self.engine.start()
            no_ping = ping_unavailable()
            if no_ping is not None:
                log.info("%s", no_ping)
            listeners, no_fast_path = redirect_listeners(handle.take_extra())
            if no_fast_path is not None:
                log.info("TCP fast path: %s", no_fast_path)
            if listeners:
                from nsbridge.usernet.host.redirect import TcpRedirector

                self.redirector = TcpRedirector(bridge.loop, listeners, self.policy,
                                                resolvers=resolvers, mover=bridge.mover,
                                                outbound=outbound)
                self.redirector.start()
                log.info("TCP: kernel fast path (nftables redirect)")
            else:
                self._start_tun_tcp(resolvers)
            self._start_inbound(resolvers)
            if self.options.publish or self.options.api_socket:
                from nsbridge.usernet.inside.nsfactory import ProcessFactory

                factory = ProcessFactory.inside(handle)
                bridge.register_factory(handle.netns, factory)
                for publish in self.options.publish:
                    self._publish(publish)
            if self.options.api_socket:
                from nsbridge.usernet.host.apisocket import ApiSocketServer

                self.api_socket = ApiSocketServer(bridge.loop, self.options.api_socket, self)
            # Last: the published ports' helper is forked above, and a fork is best made
            # before a thread that C code owns is running.
            self._start_native_relay()
            self._start_switcher()
        except BaseException:
            self.close()
            raise

    def add_tcp_fast_path(self) -> bool:
        """On a TAP, once the caller has been told "ready": the kernel fast path for the
        TCP the namespace itself starts and sends out of our device (an nftables redirect
        to listeners made inside, as ``nsbridge run`` has from the start), beside the tun
        path, which keeps the connections already open and carries the traffic forwarded
        from containers behind a bridge (the output hook never sees that).

        Done after ready because it costs a helper and pyroute2's import, which would
        otherwise be in every container start's wait; new connections move to it as soon
        as the rule exists (only a SYN is redirected, so a connection already on the tun
        path stays there).  False (and the tun path alone, logged) when nf_tables cannot
        be used in the namespace.
        """
        from nsbridge.usernet.host.redirect import TcpRedirector

        pending, self._fast_path_pending = self._fast_path_pending, None
        if self.redirector is not None or self.engine is None:
            if pending is not None:
                pending.cancel()
            return self.redirector is not None
        try:
            if pending is None:
                from nsbridge.usernet.inside import nft  # noqa: F401  # before the fork

                pending = self._start_fast_path_helper(preload=True)
            fds = pending.collect()
        except UserError as exc:
            log.info("TCP fast path: not set up (%s); TCP stays on the tun path", exc)
            return False
        if not fds:
            log.info("TCP fast path: nf_tables cannot be used in the namespace; TCP stays "
                     "on the tun path")
            return False
        resolvers = self.policy.resolvers
        if resolvers is None:
            resolvers = resolvers_of(self.options)
        self.redirector = TcpRedirector(self.bridge.loop, [_socket(fd) for fd in fds],
                                        self.policy, resolvers=resolvers,
                                        mover=self.bridge.mover, outbound=self.outbound)
        self.redirector.start()
        log.info("TCP: kernel fast path (nftables redirect) for the namespace's own "
                 "connections; the tun path for forwarded ones")
        return True

    def prepare_tcp_fast_path(self) -> None:
        """Fork :meth:`add_tcp_fast_path`'s helper now; that method then only collects its
        listeners.  For a process about to lock itself down before it is ready
        (``nsbridge-slirp4netns --enable-sandbox``/``--enable-seccomp``): a helper forked
        afterwards could neither enter the namespace nor load its modules, while one
        forked now does its work (pyroute2's import included, left to it) beside the
        lock-down and the ready byte, so the caller's wait stays as short."""
        if self.redirector is None and self.engine is not None and \
                self._fast_path_pending is None:
            self._fast_path_pending = self._start_fast_path_helper(preload=False)

    def _start_fast_path_helper(self, *, preload: bool) -> PendingFds:
        from nsbridge.usernet.host.redirect import setup_inside

        device = self.handle.config.ifname
        return self.handle.start_fds(
            lambda: setup_inside(optional=True, device=device, forwarded=device),
            preload=preload)

    def _tap_engine(self, resolvers: list[tuple[str, int]]) -> TapEngine:
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
        log.info("link: TAP (Ethernet; ARP, neighbour discovery and DHCP answered here)")
        return TapEngine(self.bridge.loop, handle.tun, self.policy, self.policy.addresses,
                         resolvers, guest_mac=handle.guest_mac, ipv6=bool(handle.ipv6),
                         outbound=self.outbound)

    def _track_host_addresses(self) -> None:
        """With host access off, give the policy the host's addresses, live (opened here:
        in the namespace this process dials from)."""
        from nsbridge.usernet.host.hostaddrs import HostAddresses
        from nsbridge.usernet.proto.hostaccess import NO_HOST_ADDRESSES

        if self.policy.allow_host_access:
            log.info("host access: allowed (the host's loopback through the gateway, and "
                     "its own addresses)")
            return
        if self.policy.host_addresses is not NO_HOST_ADDRESSES:
            # The caller chose the set (nsbridge-slirp4netns: an empty one, as slirp4netns
            # closes the loopback only).
            log.info("host access: the host's loopback denied; of its own addresses, only "
                     "those in the set given are")
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
        assert engine is not None  # start() makes the engine first
        self.tun_tcp = TunTcp(self.bridge.loop, engine.write, engine.write_parts, self.policy,
                              source_ok=engine.new_flow_source_ok, resolvers=resolvers,
                              vnet=bool(self.handle.vnet_hdr_size),
                              offload="csum" in self.handle.offloads, outbound=self.outbound)
        engine.tcp_handler = self.tun_tcp.handle
        if self.options.tcp == "tun":
            log.info("TCP: tun path (terminated on the host side)")
        else:
            log.warning("TCP fast path unavailable (nf_tables cannot be used in the namespace; "
                        "-v says why); TCP goes through the tun path (slower)")

    def _start_inbound(self, resolvers: list[tuple[str, int]]) -> None:
        """Published ports that keep the client's address (``--publish-mode=device``,
        the default).  TCP needs the tun TCP path's active open, so under the fast path
        a TunTcp serving only inbound flows is made too; without it (a kernel before
        6.9) published TCP ports fall back to splice, and say so.  UDP goes through the
        engine's UDP flows."""
        options, engine = self.options, self.engine
        if options.publish_mode != "device" or engine is None or not (
                options.api_socket or options.publish):
            return
        from nsbridge.usernet.host.inbound import InboundPorts
        from nsbridge.usernet.host.tuntcp import TunTcp, unavailable

        wants_tcp = options.api_socket or any(p.protocol == "tcp" for p in options.publish)
        if self.tun_tcp is None and wants_tcp:
            why_not = unavailable()
            if why_not is not None:
                log.warning("published TCP ports show every client as the namespace's own "
                            "loopback (splice mode): %s", why_not)
            else:
                self.tun_tcp = TunTcp(self.bridge.loop, engine.write, engine.write_parts,
                                      self.policy, source_ok=engine.new_flow_source_ok,
                                      resolvers=resolvers,
                                      vnet=bool(self.handle.vnet_hdr_size),
                                      offload="csum" in self.handle.offloads, serve_outbound=False)
                engine.tcp_handler = self.tun_tcp.handle
        self.inbound = InboundPorts(self.bridge.loop, self.tun_tcp, engine.udp_flows,
                                    self.policy.addresses)

    def _publish(self, publish: Publish) -> None:
        """One ``-p``: through the device keeping the client's address (device mode),
        else an ordinary forward dialing the namespace's loopback (splice)."""
        if self.inbound is not None and self.inbound.serves_protocol(publish.protocol):
            addresses = self.policy.addresses
            v6 = ":" in publish.host.host and self.options.ipv6
            guest = addresses.namespace6 if v6 else addresses.namespace
            port = self.inbound.add(publish.host, str(guest), publish.ns_port,
                                    name=f"-p {publish.host}:{publish.ns_port}",
                                    protocol=publish.protocol)
            log.info("published %s (listening on %s; dialed at %s through the device, "
                     "keeping the client's address)", publish, port.listen_address, guest)
            return
        _publish(self.bridge, self.handle, publish)

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
        assert self.engine is not None  # start() makes the engine first
        self.native_relay = NativeRelay(self.bridge.loop, self.engine, fd)
        self.native_relay.start()
        if no_ping is None:
            log.info("UDP and ping: native relay (device nsb-relay)")
        else:
            log.info("UDP: native relay (device nsb-relay); ping through the engine: %s",
                     no_ping)

    def _start_switcher(self) -> None:
        """``--bypass``: serve the program's seccomp listener (host/switcher.py)."""
        listener = self.handle.take_seccomp_listener() if \
            hasattr(self.handle, "take_seccomp_listener") else -1
        if listener < 0:
            return
        from nsbridge.usernet.host.switcher import SocketSwitcher
        from nsbridge.usernet.options import exclude_of

        netns = getattr(self.handle, "netns", None)  # published ports dial into it
        self.switcher = SocketSwitcher(self.bridge.loop, listener, self.policy,
                                       outbound=self.outbound,
                                       exclude=exclude_of(self.options), inbound=self.inbound,
                                       namespace=None if netns is None else
                                       os.fstat(netns.fd).st_ino)
        self.switcher.start()
        log.info("TCP: socket switching (--bypass): allowed outbound connections are "
                 "sockets of the host's namespace")

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
        if self.inbound is not None:
            forwards += [{"name": p.name, "listen": str(p.listen_address),
                          "protocol": p.protocol, "mode": "device"}
                         for p in self.inbound.ports]
        result = {"engine": engine, "tcp": tcp, "published": forwards}
        if self.switcher is not None:
            result["bypass"] = self.switcher.snapshot()
        if self.redirector is not None and self.tun_tcp is not None:
            # beside the fast path: the tun path's (published ports' inbound flows; on
            # a TAP also the connections forwarded from containers behind a bridge)
            result["tun_tcp"] = self.tun_tcp.snapshot().as_dict()
        return result

    def _teardown(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._final = self._snapshot()
            except Exception:
                log.exception("reading the final counters failed")
            self._closed = True
        if self._fast_path_pending is not None:
            self._fast_path_pending.cancel()
            self._fast_path_pending = None
        if self.switcher is not None:
            self.switcher.close()
        if self.inbound is not None:
            self.inbound.close()
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
        if self.api_socket is not None:
            self.api_socket.close()
        self.bridge.close()


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


def _publish(bridge: Bridge, handle: SandboxHandle, publish: Publish) -> None:
    """A published port in splice mode: an ordinary forward to the namespace's loopback."""
    protocol = UDP if publish.protocol == "udp" else "stream"
    target = HostPort("127.0.0.1", publish.ns_port)
    forward = bridge.add(ForwardSpec(
        ListenAddress(publish.host, protocol=protocol),
        ConnectAddress(target, handle.netns, protocol=protocol),
        name=f"publish {publish}",
    ))
    log.info("published %s (listening on %s)", publish, forward.listen_address)


def _socket(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)
