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

Steps 2-3 are :class:`~nsbridge.usernet.network.Network`, which :mod:`nsbridge.usernet.api`
reuses to run the same host side in a background thread of a program that embeds
nsbridge.  The options and what is built from them are :mod:`.options`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any

from nsbridge.errors import UserError
from nsbridge.linux.signals import StopSignals
from nsbridge.usernet.network import Network, redirect_setup
from nsbridge.usernet.options import UsernetOptions, check_options, netconfig_of, policy_of

if TYPE_CHECKING:
    from nsbridge.usernet.inside.sandbox import SandboxHandle
    from nsbridge.usernet.proto.policy import Policy

log = logging.getLogger("nsbridge")


def run_command(command: list[str], options: UsernetOptions, stops: StopSignals) -> int:
    """Run ``command`` with user-mode networking; return its exit status (128+N if killed)."""
    from nsbridge.usernet.inside.sandbox import Sandbox

    if not command:
        raise UserError("run: give the command to run after --, e.g. nsbridge run -- curl URL")
    check_options(options)
    policy = policy_of(options)
    config = netconfig_of(options)
    extra = redirect_setup(options)
    handle = Sandbox.create(command, config, extra=extra, hold=True, bypass=options.bypass)
    try:
        return _drive(handle, options, policy, stops, attached=False)
    finally:
        handle.close()


def network_existing_namespace(target: str, options: UsernetOptions,
                               stops: StopSignals) -> int:
    """Give an existing namespace networking until its process exits (PID) or a signal."""
    from nsbridge.usernet.inside.sandbox import Sandbox

    refuse_bypass_for_attach(options)
    check_options(options)
    policy = policy_of(options)
    config = netconfig_of(options)
    handle = Sandbox.for_namespace(target, config, extra=redirect_setup(options))
    try:
        return _drive(handle, options, policy, stops, attached=True, target=target)
    finally:
        handle.close()


def refuse_bypass_for_attach(options: UsernetOptions) -> None:
    """``attach --bypass``: one line saying why not (a filter is installed by a process
    on itself, before exec; nothing can put one on a process already running)."""
    if options.bypass:
        raise UserError("attach: --bypass needs a seccomp filter in the program, which "
                        "only a process starting it can install; use nsbridge run --bypass")


def _drive(handle: SandboxHandle, options: UsernetOptions, policy: Policy, stops: StopSignals, *,
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
    bypass = stats.get("bypass")
    if bypass is not None:
        parts.insert(1, f"switched TCP connections: {bypass.get('switched', 0)} "
                     f"({bypass.get('connect_failed', 0)} failed to connect)"
                     + (f", {bypass['excluded']} excluded (the namespace's path)"
                        if bypass.get("excluded") else ""))
        for reason, count in (bypass.get("refused") or {}).items():
            denied[reason] += count
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


def _watch_exit(network: Network, handle: SandboxHandle, attached: bool,
                target: str) -> int | None:
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
