"""Python API for embedding nsbridge's user-mode networking (container runtimes, tools).

Three forms, all built on the same pieces as ``nsbridge run``/``attach``
(:class:`nsbridge.usernet.network.Network`: one event loop carrying the tun engine for
UDP/DNS/ICMP, the TCP redirector and published ports), run in a **background thread of
the caller's process** instead of a separate nsbridge process:

``run(cmd, ...) -> Process``
    Like :class:`subprocess.Popen`: starts ``cmd`` in a new user+network+mount namespace
    with networking, returns at once.  Networking stops by itself when the command exits
    (the loop watches a pidfd); :meth:`Process.wait`/:meth:`Process.poll` then release
    the rest (reaping the command, the namespace fds), as ``Popen`` needs a wait to reap.

``attach(pid_or_path, ...) -> Attachment``
    Networking for an existing namespace (slirp4netns's job); ends by itself when the
    target process exits (PID targets), or on :meth:`Attachment.close`.

``HostSide(...)`` + ``child_setup(fd)`` (the "split form")
    For a runtime that starts its child itself: the host side hands one fd to the child;
    the child, after ``unshare(CLONE_NEWUSER|CLONE_NEWNET)`` and its uid/gid maps, calls
    :func:`child_setup` which makes the tun device and the TCP fast path *inside* and
    sends their fds back; the host side then serves them.  No fork by nsbridge, no
    ``setns`` from the host side, so it works whatever the runtime does with the child
    (pivot_root, seccomp, ...) as long as ``child_setup`` runs first.

Why a thread and not a process: the embedding program keeps one process to manage, sees
the counters (:meth:`stats`) directly, and nothing survives it (every thread is a
daemon; every helper nsbridge forks exits with its parent's socket).  Namespace entry is
still done by short-lived single-threaded helpers (see :mod:`nsbridge.usernet.inside.sandbox`),
because ``setns``/``unshare`` of a user namespace is refused to a multithreaded process.

Caveats the caller must know:

* Sockets to the outside are opened in the network namespace of the *calling* process
  (the loop thread's): that is "the host" for the sandbox.
* No signal handlers are installed (the embedding program owns its signals); a Ctrl-C
  reaches the command only if it shares the terminal's process group, as with Popen.
* ``/dev/net/tun`` must be openable by the caller (it is 0600 on some systems: then run
  as root); unprivileged user namespaces must be allowed.
* Errors in setup raise :class:`nsbridge.errors.UserError` (``SandboxError`` for the
  namespace steps) with a one-line explanation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from nsbridge.defaults import MTU, USERNET_CIDR, USERNET_CIDR6
from nsbridge.errors import UserError
from nsbridge.linux.netns import Netns
from nsbridge.usernet.inside import sandbox as _sandbox
from nsbridge.usernet.network import Network, redirect_setup
from nsbridge.usernet.options import (
    UsernetOptions,
    check_bypass,
    check_options,
    exclude_of,
    netconfig_of,
    option_warnings,
)
from nsbridge.usernet.proto.publish import Publish, parse_publish
from nsbridge.usernet.runner import target_pidfd

__all__ = ["Attachment", "HostSide", "Process", "UserError", "attach", "child_setup", "options",
           "run"]

DEFAULT_TIMEOUT = _sandbox.DEFAULT_TIMEOUT
_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when close() ends a running command
_REPLY_LIMIT = 1 << 16
_SCM_MAX_FD = 253


def options(
    *,
    publish: Iterable[str | Publish] = (),
    allow_host_access: bool = False,
    allow_host_loopback: bool = False,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    dns: Sequence[tuple[str, int]] | None = None,
    tcp: str = "auto",
    relay: str = "auto",
    mtu: int = MTU,
    ipv6: bool = True,
    cidr: str = USERNET_CIDR,
    cidr6: str = USERNET_CIDR6,
    nat64_prefix: str | Iterable[str] = (),
    api_socket: str | None = None,
    outbound_addr: str | None = None,
    outbound_addr6: str | None = None,
    publish_mode: str = "device",
) -> UsernetOptions:
    """Build the options ``run``/``attach``/``HostSide`` share (the CLI's flags).

    ``allow_host_access`` opens the host itself to the namespace: its loopback through
    the gateway address and its own addresses (off by default; ``allow_host_loopback``
    is the older name and does the same).  ``publish`` takes docker syntax
    (``"8080:80"``, ``"127.0.0.1:5353:53/udp"``) or
    :class:`Publish` objects; ``allow``/``deny`` the CLI's rule syntax (``"tcp:*:25"``);
    ``dns`` host resolvers as ``(ip, port)`` (None: the host's /etc/resolv.conf);
    ``nat64_prefix`` the host's NAT64 prefix(es), ``--nat64-prefix``; ``api_socket`` a
    path where slirp4netns's API socket is served (ports published at run time, see
    docs/slirp4netns.md); ``outbound_addr``/``outbound_addr6`` an address of the host or
    an interface name each, the source of outbound IPv4/IPv6 sockets (``--outbound-addr``,
    ``--outbound-addr6``; None: the kernel's choice);
    ``publish_mode`` how published TCP ports reach the namespace:
    ``"device"`` (default) dials its interface address through the device, so the server
    sees the client's address (the gateway for a client on the host's loopback),
    ``"splice"`` is an ordinary forward to its loopback (faster; every client shows as
    127.0.0.1).  Raises UserError
    on bad input, before anything is created.  Rule warnings (a port rule naming one
    family) are logged at start and listed in ``warnings`` of what is returned.
    """
    if tcp not in ("auto", "redirect", "tun"):
        raise UserError(f"tcp={tcp!r}: use 'auto', 'redirect' or 'tun'")
    if relay not in ("auto", "native", "engine"):
        raise UserError(f"relay={relay!r}: use 'auto', 'native' or 'engine'")
    opts = UsernetOptions(
        publish=[p if isinstance(p, Publish) else parse_publish(p) for p in publish],
        allow_host_access=allow_host_access or allow_host_loopback, allow=list(allow),
        deny=list(deny),
        tcp=tcp, relay=relay, dns=None if dns is None else [(str(h), int(p)) for h, p in dns],
        mtu=mtu, ipv6=ipv6, cidr=cidr, cidr6=cidr6,
        nat64_prefix=[nat64_prefix] if isinstance(nat64_prefix, str) else list(nat64_prefix),
        api_socket=api_socket, outbound_addr=outbound_addr, outbound_addr6=outbound_addr6,
        publish_mode=publish_mode)
    check_options(opts)  # a typo must not surface after the fork
    return opts


# ---- run ------------------------------------------------------------------------------


class Process:
    """A command running with user-mode networking (returned by :func:`run`).

    Mirrors the parts of :class:`subprocess.Popen` a runtime needs.  ``wait``/``poll``
    return the exit code, or ``-N`` if signal N killed it (Popen's convention; the CLI
    turns that into 128+N).  The command is our child until reaped, so signalling it by
    PID cannot hit a recycled PID.
    """

    def __init__(self, handle: Any, network: Network) -> None:
        self._handle = handle
        self._network = network
        self._finished = False

    @property
    def pid(self) -> int:
        """The command's PID (in the caller's PID namespace)."""
        return int(self._handle.pid)

    @property
    def returncode(self) -> int | None:
        """The exit code once reaped by wait()/poll(), else None."""
        return self._handle.returncode  # type: ignore[no-any-return]

    @property
    def warnings(self) -> list[str]:
        """Non-fatal set-up notes (e.g. resolv.conf could not be put in place, a port
        rule that names one address family only)."""
        return list(self._handle.warnings) + self._network.warnings

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command; its exit code.  Raises TimeoutError after ``timeout``."""
        code = self._handle.wait(timeout)
        self._finish()
        return int(code)

    def poll(self) -> int | None:
        """The exit code if the command has ended (releasing everything), else None."""
        code = self._handle.poll()
        if code is not None:
            self._finish()
        return code  # type: ignore[no-any-return]

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command (nothing once it was reaped)."""
        self._handle.kill(sig)

    def terminate(self) -> None:
        """SIGTERM the command."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the command."""
        self.send_signal(signal.SIGKILL)

    def stats(self) -> dict[str, Any]:
        """Counters: ``engine`` (tun: UDP/DNS/ICMP, denials), ``tcp`` (fast path:
        accepted/closed/reset/denied/bytes, None without nf_tables) and ``published``.
        After the end, the values at teardown."""
        return self._network.stats()

    def close(self) -> None:
        """End everything: a still-running command gets SIGTERM, then SIGKILL after 5 s
        (an offline command is of no use, and nothing may be left behind), and is reaped."""
        if self._finished:
            return
        if self._handle.poll() is None:
            self.terminate()
            try:
                self._handle.wait(_GRACE)
            except TimeoutError:
                self.kill()
                self._handle.wait()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._network.close()  # joins the loop thread (already ending: pidfd fired)
        self._handle.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<nsbridge Process pid={self._handle.pid} returncode={self.returncode}>"


def _with_bypass(opts: UsernetOptions, bypass: bool,
                 exclude: Iterable[str]) -> UsernetOptions:
    """``opts`` with socket switching asked for (checked: the kernel can, the
    ``bypass_exclude`` rules parse and come with ``bypass``); UserError otherwise."""
    from dataclasses import replace

    if isinstance(exclude, str):
        exclude = [exclude]
    opts = replace(opts, bypass=bypass, bypass_exclude=list(exclude))
    exclude_of(opts)
    if bypass:
        check_bypass()
    return opts


def run(
    command: Sequence[str],
    *,
    publish: Iterable[str | Publish] = (),
    allow_host_access: bool = False,
    allow_host_loopback: bool = False,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    dns: Sequence[tuple[str, int]] | None = None,
    tcp: str = "auto",
    relay: str = "auto",
    mtu: int = MTU,
    ipv6: bool = True,
    cidr: str = USERNET_CIDR,
    cidr6: str = USERNET_CIDR6,
    nat64_prefix: str | Iterable[str] = (),
    api_socket: str | None = None,
    outbound_addr: str | None = None,
    outbound_addr6: str | None = None,
    publish_mode: str = "device",
    bypass: bool = False,
    bypass_exclude: Iterable[str] = (),
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Process:
    """Start ``command`` in a new namespace with networking; return a :class:`Process`.

    The command is held until the host side is serving (its first packet is not lost),
    then started.  ``stdin``/``stdout``/``stderr`` are fds (default: ours); only
    ``pass_fds`` and those stay open in it.  ``bypass=True`` switches the command's
    allowed outbound TCP connections to sockets of the host's namespace (``nsbridge run
    --bypass``; docs/usernet.md); ``bypass_exclude`` takes ``--bypass-exclude`` rules
    (``["*:21", "192.0.2.1:5060"]``): allowed connects they cover keep the namespace's
    path.  Raises UserError/SandboxError.
    """
    if not command:
        raise UserError("run: give the command to run, e.g. run(['curl', URL])")
    opts = options(publish=publish, allow_host_access=allow_host_access,
                   allow_host_loopback=allow_host_loopback, allow=allow,
                   deny=deny, dns=dns, tcp=tcp, relay=relay, mtu=mtu, ipv6=ipv6, cidr=cidr,
                   cidr6=cidr6, nat64_prefix=nat64_prefix, api_socket=api_socket,
                   outbound_addr=outbound_addr, outbound_addr6=outbound_addr6,
                   publish_mode=publish_mode)
    opts = _with_bypass(opts, bypass, bypass_exclude)
    handle = _sandbox.Sandbox.create(
        list(command), netconfig_of(opts), extra=redirect_setup(opts), hold=True, stdin=stdin,
        stdout=stdout, stderr=stderr, pass_fds=pass_fds, env=env, timeout=timeout,
        bypass=bypass)
    try:
        network = Network(handle, opts)
        network.start()
        try:
            network.stop_when_readable(handle.pidfd)
            network.start_thread()
            handle.start()
        except BaseException:
            network.close()
            raise
    except BaseException:
        handle.close()  # a held command is abandoned: its helper exits without exec
        raise
    return Process(handle, network)


# ---- attach ---------------------------------------------------------------------------


class Attachment:
    """Networking given to an existing namespace (returned by :func:`attach`)."""

    def __init__(self, network: Network) -> None:
        self._network = network

    @property
    def running(self) -> bool:
        """True until the target exited or close() was called."""
        return self._network.running

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the networking ended (the target exited); True if it did."""
        return self._network.join(timeout)

    @property
    def warnings(self) -> list[str]:
        """Non-fatal notes (a port rule that names one address family only)."""
        return list(self._network.warnings)

    def stats(self) -> dict[str, Any]:
        """Same counters as :meth:`Process.stats`."""
        return self._network.stats()

    def close(self) -> None:
        """Stop serving and release everything (the target process is left alone)."""
        self._network.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    target: int | str | Netns,
    *,
    publish: Iterable[str | Publish] = (),
    allow_host_access: bool = False,
    allow_host_loopback: bool = False,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    dns: Sequence[tuple[str, int]] | None = None,
    tcp: str = "auto",
    mtu: int = MTU,
    ipv6: bool = True,
    cidr: str = USERNET_CIDR,
    cidr6: str = USERNET_CIDR6,
    nat64_prefix: str | Iterable[str] = (),
    api_socket: str | None = None,
    outbound_addr: str | None = None,
    outbound_addr6: str | None = None,
    publish_mode: str = "device",
    timeout: float = DEFAULT_TIMEOUT,
) -> Attachment:
    """Give the namespace of ``target`` (a PID, ``pid:N``, an nsfs path, an ``ip netns``
    name) a tun device and networking, served from a background thread.

    A PID target is watched: its exit ends the networking and releases every fd without
    any call from the caller.  Other targets run until :meth:`Attachment.close`.
    """
    opts = options(publish=publish, allow_host_access=allow_host_access,
                   allow_host_loopback=allow_host_loopback, allow=allow,
                   deny=deny, dns=dns, tcp=tcp, mtu=mtu, ipv6=ipv6, cidr=cidr,
                   cidr6=cidr6, nat64_prefix=nat64_prefix, api_socket=api_socket,
                   outbound_addr=outbound_addr, outbound_addr6=outbound_addr6,
                   publish_mode=publish_mode)
    pidfd = None if isinstance(target, Netns) else target_pidfd(target)
    try:
        handle = _sandbox.Sandbox.for_namespace(target, netconfig_of(opts),
                                                extra=redirect_setup(opts), timeout=timeout)
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    return Attachment(_serve(handle, opts, pidfd))


def _serve(handle: Any, opts: UsernetOptions, pidfd: int | None) -> Network:
    """Start a Network thread that owns ``handle`` and ``pidfd`` and closes them at its end."""
    def release() -> None:
        if pidfd is not None:
            os.close(pidfd)
        handle.close()

    try:
        network = Network(handle, opts)
        network.start()
    except BaseException:
        release()
        raise
    if pidfd is not None:
        network.stop_when_readable(pidfd)
    network.on_end(release)
    network.start_thread()
    return network


# ---- the split form ---------------------------------------------------------------------


class HostSide:
    """The host half of the split form: prepares networking for a child the runtime
    starts itself.

    ::

        host = api.HostSide(publish=["8080:80"])
        fd = host.child_fd()
        child = subprocess.Popen(["unshare", "-Urn", "python3", "-c",
                                  f"from nsbridge.usernet import api; api.child_setup({fd}); ..."],
                                 pass_fds=(fd,))
        host.start(pid=child.pid)   # serve until the child exits, or host.close()

    The fd is one end of an AF_UNIX SOCK_SEQPACKET socketpair.  On it the host side
    first sends the settings the child needs (MTU, IPv6, TCP mode); the child answers with
    the tun, netns and userns fds and the fast-path listeners (SCM_RIGHTS), or an error
    text; the host starts serving and then acknowledges, so :func:`child_setup` returns
    only once traffic flows.
    """

    def __init__(self, *, publish: Iterable[str | Publish] = (),
                 allow_host_access: bool = False, allow_host_loopback: bool = False,
                 allow: Iterable[str] = (),
                 deny: Iterable[str] = (), dns: Sequence[tuple[str, int]] | None = None,
                 tcp: str = "auto", mtu: int = MTU, ipv6: bool = True,
                 cidr: str = USERNET_CIDR, cidr6: str = USERNET_CIDR6,
                 nat64_prefix: str | Iterable[str] = (),
                 outbound_addr: str | None = None, outbound_addr6: str | None = None,
                 publish_mode: str = "device", bypass: bool = False,
                 bypass_exclude: Iterable[str] = (),
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._options = options(publish=publish, allow_host_access=allow_host_access,
                                allow_host_loopback=allow_host_loopback,
                                allow=allow, deny=deny, dns=dns, tcp=tcp, mtu=mtu, ipv6=ipv6,
                                cidr=cidr, cidr6=cidr6, nat64_prefix=nat64_prefix,
                                outbound_addr=outbound_addr, outbound_addr6=outbound_addr6,
                                publish_mode=publish_mode)
        self._options = _with_bypass(self._options, bypass, bypass_exclude)
        self._config = netconfig_of(self._options)
        self._timeout = timeout
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._child: socket.socket | None = child
        child.set_inheritable(True)  # for fork+exec without pass_fds, too
        self._sock.send(json.dumps({"mtu": self._options.mtu, "ipv6": self._options.ipv6,
                                    "tcp": self._options.tcp, "cidr": self._options.cidr,
                                    "cidr6": self._options.cidr6,
                                    "bypass": bypass}).encode())
        self._network: Network | None = None

    def child_fd(self) -> int:
        """The fd to pass to the child (``pass_fds=(fd,)``); valid until start()/close()."""
        if self._child is None:
            raise RuntimeError("the child's fd was already handed over (start() was called)")
        return self._child.fileno()

    def start(self, pid: int | None = None, timeout: float | None = None) -> None:
        """Receive the child's fds and start serving them in a background thread.

        Call after the child was started.  Our copy of the child's fd is closed first, so
        a child that dies before :func:`child_setup` is seen at once (EOF), not after the
        timeout.  ``pid`` (the child's) is watched: its exit ends the networking.
        """
        if self._child is not None:
            self._child.close()
            self._child = None
        if self._network is not None:
            raise RuntimeError("HostSide.start() called twice")
        pidfd = None if pid is None else target_pidfd(pid)
        try:
            self._sock.settimeout(self._timeout if timeout is None else timeout)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _REPLY_LIMIT,
                                                           _SCM_MAX_FD)
            except TimeoutError:
                raise _sandbox.SandboxError(
                    "the child did not call child_setup() in time") from None
            except ConnectionResetError:
                # The child exited with our settings message unread: same as EOF.
                data, fds = b"", []
            reply = _sandbox._decode(data) if data else {
                "error": "the child exited (or closed its fd) before child_setup() finished"}
            if "error" in reply or len(fds) < 3 + bool(reply.get("seccomp_listener")):
                _sandbox._close_all(fds)
                raise _sandbox.SandboxError(str(reply.get("error", "garbled child reply")))
            handle = _sandbox._handle(reply, fds, Netns(fds[1], f"child {pid or '?'}"),
                                      self._config, self._timeout)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise
        self._network = _serve(handle, self._options, pidfd)
        try:
            self._sock.send(b"ok")
        except OSError:
            pass  # the child is gone already; its pidfd ends the networking

    @property
    def warnings(self) -> list[str]:
        """Non-fatal notes (a port rule that names one address family only)."""
        return option_warnings(self._options)

    @property
    def running(self) -> bool:
        """True while serving."""
        return self._network is not None and self._network.running

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the networking ended (the watched child exited); True if it did."""
        return self._network.join(timeout) if self._network is not None else True

    def stats(self) -> dict[str, Any]:
        """Same counters as :meth:`Process.stats` (empty before start())."""
        return self._network.stats() if self._network is not None else {}

    def close(self) -> None:
        """Stop serving, release everything (the child is the runtime's to end)."""
        if self._child is not None:
            self._child.close()
            self._child = None
        if self._network is not None:
            self._network.close()
        self._sock.close()

    def __enter__(self) -> HostSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def child_setup(fd: int, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The child half of the split form: configure networking in *this* namespace.

    Call in the child after it entered its own network namespace with CAP_NET_ADMIN over
    it (``unshare(CLONE_NEWUSER|CLONE_NEWNET)`` plus uid/gid maps, or ``unshare -Urn``),
    and before pivot_root/chroot or dropping capabilities (it opens /dev/net/tun and
    programs nftables).  It makes the tun device, addresses and routes (10.0.2.100/24,
    fd00::100/64, gateway 10.0.2.2), the TCP fast path, sends the fds to the host side
    and returns once the host serves them.  ``fd`` is closed.  /etc/resolv.conf is left
    to the runtime: point it at 10.0.2.3.  Returns the interface details.  Raises
    SandboxError (the host side's start() raises too, with the same text).

    With ``HostSide(bypass=True)`` it also installs socket switching's seccomp filter
    on the calling thread (``no_new_privs`` set): the thread that will exec the
    container's process must call it, and what that thread and its children do from
    then on (the runtime's own remaining steps included) has its ``connect``/``listen``
    answered by the host side.
    """
    sock = socket.socket(fileno=fd)
    try:
        sock.settimeout(timeout)
        settings = _sandbox._decode(sock.recv(_REPLY_LIMIT))
        if "error" in settings:
            raise _sandbox.SandboxError(settings["error"])
        opts = UsernetOptions(mtu=int(settings["mtu"]), ipv6=bool(settings["ipv6"]),
                              tcp=str(settings["tcp"]),
                              cidr=str(settings.get("cidr", USERNET_CIDR)),
                              cidr6=str(settings.get("cidr6", USERNET_CIDR6)))
        try:
            header, fds = _sandbox._configure_here(netconfig_of(opts), redirect_setup(opts))
            if settings.get("bypass"):
                fds.append(_sandbox._install_switch_filter(fds))
                header["seccomp_listener"] = True
        except _sandbox.SetupError as exc:
            _sandbox._send_error(sock, str(exc))
            raise _sandbox.SandboxError(str(exc)) from None
        try:
            socket.send_fds(sock, [json.dumps(header).encode()], fds)
        finally:
            _sandbox._close_all(fds)  # the host side has its own copies now
        if sock.recv(16) != b"ok":
            raise _sandbox.SandboxError("the host side did not start serving")
        return header
    finally:
        sock.close()
