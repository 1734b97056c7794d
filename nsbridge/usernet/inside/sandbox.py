"""Create (``run``) or enter (``attach``) a user-mode namespace and hand its fds to the host side.

The host side of user-mode networking lives in the caller's namespaces; the namespace it
serves needs a tun device, addresses, routes and a resolv.conf.  Those can only be made
*inside* the namespace, and getting inside a user namespace is refused to a multithreaded
process (``unshare``/``setns`` with ``CLONE_NEWUSER`` return EINVAL).  nsbridge's host side
is multithreaded (socket-factory threads, workers), so every namespace operation here runs
in a **forked, single-threaded helper** that sends the resulting file descriptors back over
a ``SOCK_SEQPACKET`` socketpair with ``SCM_RIGHTS`` (:func:`socket.send_fds`).

Every helper is confined first thing after the fork (:func:`.helper._fork`, through
:mod:`nsbridge.usernet.inside.confine`): non-dumpable before it enters any namespace, only the
fds it needs, an empty environment, ``/`` as cwd — because inside, it shares a user
namespace with the program it serves, whose root would otherwise reach its memory, fds
and the host's file system through ptrace, ``pidfd_getfd`` and ``/proc/PID/*``.  The
callbacks run in a helper (``extra``, :meth:`SandboxHandle.make_fds`) therefore see none
of the caller's fds and an empty ``os.environ``: they create what they return.

``run`` (:meth:`Sandbox.create`), in the helper, in this order and why:

1. ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)`` in one call: the new user
   namespace owns the new network and mount namespaces, which is what gives the helper
   CAP_NET_ADMIN/CAP_SYS_ADMIN over them without any privilege outside.
2. uid/gid maps (``setgroups`` = ``deny`` first, as the kernel requires of a process
   writing its own maps), so the caller is root inside and files it creates belong to it
   outside.  Then non-dumpable (not before: /proc/self of a non-dumpable process belongs
   to root, and an unprivileged caller could not open its own maps).
3. mounts: ``/`` made recursively private (nothing we mount can propagate back out), then
   our resolv.conf bind-mounted over ``/etc/resolv.conf``.
4. ``/dev/net/tun`` opened *after* entering the network namespace (the kernel places the
   device in the namespace current at ``open()``), TUNSETIFF, vnet header, offloads.
5. netlink (pyroute2): ``lo`` up, MTU, addresses (IPv6 ``nodad``), link up, default routes.
6. the caller's ``extra`` callback (e.g. sockets that must be created in the namespace).
7. one message: a JSON header + the fds; then it waits for "go" and execs CMD (in the
   caller's working directory, with the caller's environment or ``env``, both taken
   before the fork), so CMD's pid is the helper's pid and its exit status is the
   helper's.  The exec makes it dumpable again: it is CMD now.

Errors travel back as a JSON ``{"error": ...}`` message on the same socket and become a
:class:`SandboxError` (a :class:`~nsbridge.errors.UserError`) in the parent.  A helper
that dies without a word closes its end of the socketpair, so the parent sees EOF instead
of hanging; a timeout backs that up.  A failed ``exec`` is reported the same way: the
socket is close-on-exec, so EOF after "go" means CMD is running and a message means it
never started (the trick :mod:`subprocess` uses).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from nsbridge.errors import UserError
from nsbridge.linux.netns import Netns
from nsbridge.usernet.inside.childsetup import (
    ExtraFds,
    _collect_only,
    _configure_here,
    _install_switch_filter,
    _run_child,
)
from nsbridge.usernet.inside.helper import (
    _FIXED_FDS,
    _REPLY_LIMIT,
    SandboxError,
    _close_all,
    _decode,
    _finish_in_helper,
    _fork,
    _Helper,
    _in_helper,
    _kill_and_reap,
    _preload,
    _reap,
    _receive,
    _send_error,
    _start_in_helper,
)
from nsbridge.usernet.inside.netconf import NetConfig, SetupError
from nsbridge.usernet.inside.nstarget import (
    _open_target,
    _open_userns,
    _owning_userns,
    _refuse_own_namespace,
    _same_ns,
)
from nsbridge.usernet.inside.tapdevice import TapRequest, tap_here

__all__ = [  # the public names, and the internals the API's split form uses from here
    "DEFAULT_TIMEOUT",
    "ExtraFds",
    "Sandbox",
    "SandboxError",
    "SandboxHandle",
    "SetupError",
    "_close_all",
    "_configure_here",
    "_decode",
    "_handle",
    "_install_switch_filter",
    "_send_error",
]

DEFAULT_TIMEOUT = 30.0


# ---- the handle ---------------------------------------------------------------------


@dataclass(eq=False)
class SandboxHandle:
    """What the host side gets back: the tun fd, the namespace, and (for ``run``) CMD.

    The handle owns every fd in it; :meth:`close` releases them.  ``extra`` holds the fds
    the ``extra`` callback produced, also owned by the handle until :meth:`take_extra`.
    ``offloads`` names the TUNSETOFFLOAD bits the kernel accepted (``csum``, ``tso4``,
    ``tso6``, ``uso4``, ``uso6``); every tun frame starts with a ``vnet_hdr_size``-byte
    virtio-net header.  ``link`` is ``"tap"`` when ``tun`` is a TAP device (Ethernet
    frames, no virtio header: ``vnet_hdr_size`` 0, no offloads), as slirp4netns's callers
    give one; ``guest_mac`` is then the guest's MAC if the caller fixed it
    (``--macaddress``), else the host side learns it from the guest's frames.
    """

    tun: int
    netns: Netns
    userns: int
    ifname: str
    offloads: tuple[str, ...]
    vnet_hdr_size: int
    ipv6: bool
    config: NetConfig
    pid: int | None = None
    command: list[str] | None = None
    extra: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    returncode: int | None = None
    link: str = "tun"  # "tun" (IP frames after a virtio header) or "tap" (Ethernet frames)
    guest_mac: bytes | None = None  # a TAP guest's MAC, if known in advance
    # ``run --bypass``: the seccomp listener of CMD's filter (host/switcher.py serves it)
    seccomp_listener: int = -1
    _control: socket.socket | None = field(default=None, repr=False)
    _pidfd: int = field(default=-1, repr=False)
    _timeout: float = field(default=DEFAULT_TIMEOUT, repr=False)

    # ---- the command --------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once CMD was exec'd (always true for ``attach`` and command-less sandboxes)."""
        return self._control is None

    def start(self) -> None:
        """Let a ``hold=True`` sandbox exec CMD; raise :class:`SandboxError` if exec fails.

        Holding lets the engine register the tun fd with its event loop before CMD sends
        its first packet.  Returns once CMD runs (EOF on the close-on-exec control socket).
        """
        sock = self._control
        if sock is None:
            raise RuntimeError("the sandbox command was already started")
        self._control = None
        try:
            sock.settimeout(self._timeout)
            try:
                sock.send(b"g")
                data = sock.recv(_REPLY_LIMIT)
            except TimeoutError:
                self._kill_and_reap()
                raise SandboxError(
                    f"the command {self._cmd_name()} did not start within "
                    f"{self._timeout:g} s; it was killed"
                ) from None
            except (BrokenPipeError, ConnectionResetError):
                data = b""  # the helper is gone; wait() reports how it ended
        finally:
            sock.close()
        if data:
            self._reap()
            raise SandboxError(_decode(data).get("error", "the command failed to start"))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for CMD; its exit code, or ``-N`` if signal N killed it (like subprocess).

        Raises :class:`TimeoutError` if ``timeout`` seconds pass first.
        """
        if self.pid is None:
            raise RuntimeError("no command runs in this namespace")
        if self.returncode is not None:
            return self.returncode
        if not self.started:
            raise RuntimeError("the sandbox command is held: call start() before wait()")
        if timeout is not None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"{self._cmd_name()} still runs after {timeout:g} s")
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        """CMD's exit code if it has ended (reaping it), else None."""
        if self.pid is None or self.returncode is not None:
            return self.returncode
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal CMD (safe against pid reuse: it stays our unreaped child until wait())."""
        if self.pid is not None and self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    @property
    def pidfd(self) -> int:
        """A pidfd for CMD, readable when it exits: lets an event loop watch it."""
        if self.pid is None:
            raise RuntimeError("no command runs in this namespace")
        if self._pidfd < 0:
            self._pidfd = os.pidfd_open(self.pid)
            os.set_inheritable(self._pidfd, False)
        return self._pidfd

    # ---- fds ----------------------------------------------------------------------

    def take_extra(self) -> list[int]:
        """Hand the ``extra`` fds to the caller, who then closes them (the handle won't)."""
        fds, self.extra = self.extra, []
        return fds

    def take_seccomp_listener(self) -> int:
        """Hand the seccomp listener (``bypass=True``) to the caller, who then closes it;
        -1 when there is none."""
        fd, self.seccomp_listener = self.seccomp_listener, -1
        return fd

    def make_fds(self, fn: ExtraFds, timeout: float | None = None) -> list[int]:
        """Run ``fn`` in a helper inside this namespace; return the fds it made (caller owns).

        For a namespace owned by another user namespace (every ``run`` sandbox) a thread
        cannot simply ``setns`` there, so a forked helper enters the user namespace too.
        """
        return self.start_fds(fn, timeout).collect()

    def start_fds(self, fn: ExtraFds, timeout: float | None = None, *,
                  preload: bool = True) -> PendingFds:
        """:meth:`make_fds` in two halves: the helper is forked now and works meanwhile;
        :meth:`PendingFds.collect` waits for its fds.  ``preload=False`` leaves
        pyroute2's import to the helper (for a single-threaded caller that must not pay
        it now)."""
        userns = None if _same_ns(self.userns, "/proc/self/ns/user") else self.userns
        helper, sock = _start_in_helper(self.netns, userns, lambda: _collect_only(fn),
                                        preload=preload)
        return PendingFds(helper, sock, f"making sockets in {self.netns.label}",
                          self._timeout if timeout is None else timeout)

    def close(self) -> None:
        """Release every fd.  A held CMD is abandoned (its helper exits and is reaped); a
        running CMD is left running and reaped by a later wait()/poll() if still wanted."""
        if self._control is not None:
            self._control.close()  # the held helper reads EOF and exits without exec
            self._control = None
            self._reap()
        for fd in (self.tun, self.userns, self._pidfd, self.seccomp_listener, *self.extra):
            if fd >= 0:
                os.close(fd)
        self.tun = self.userns = self._pidfd = self.seccomp_listener = -1
        self.extra = []
        self.netns.close()
        if self.pid is not None and self.returncode is None:
            self.poll()

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------

    def _cmd_name(self) -> str:
        return repr(self.command[0]) if self.command else "(none)"

    def _reap(self) -> None:
        if self.pid is not None and self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(_reap(self.pid))

    def _kill_and_reap(self) -> None:
        if self.pid is not None and self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(_kill_and_reap(self.pid))


# ---- the public entry points ------------------------------------------------------------


class Sandbox:
    """Namespace setup for user-mode networking: :meth:`create` (``run``), :meth:`attach`."""

    @staticmethod
    def create(
        command: Sequence[str] | None,
        config: NetConfig | None = None,
        *,
        extra: ExtraFds | None = None,
        hold: bool = False,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        bypass: bool = False,
    ) -> SandboxHandle:
        """Start ``command`` in a new user+network+mount namespace with a configured tun.

        ``bypass=True`` installs the socket-switching filter on CMD just before exec; its
        listener is ``handle.seccomp_listener`` (see ``usernet/host/switcher.py``).

        ``command=None`` only builds the namespace (kept alive by ``handle.netns``).  CMD
        inherits our stdin/stdout/stderr unless ``stdin``/``stdout``/``stderr`` name other
        fds; ``pass_fds`` stay open in it, every other fd is closed.  With ``hold=True``
        CMD waits for :meth:`SandboxHandle.start`.  Raises :class:`SandboxError`.
        """
        config = config or NetConfig()
        config.validate()
        argv = None if command is None else [os.fspath(arg) for arg in command]
        if argv is not None and not argv:
            raise UserError("no command given to run in the namespace")
        stdio = (stdin, stdout, stderr)
        _preload()
        tmpdir = tempfile.mkdtemp(prefix="nsbridge-")
        try:
            resolv = os.path.join(tmpdir, "resolv.conf")
            with open(os.open(resolv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
                f.write(config.resolv_conf())
            # CMD's environment and working directory are taken now: the helper sheds
            # both before it does anything else (see confine.harden).
            exec_env = dict(os.environ) if env is None else dict(env)
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                keep = {0, 1, 2, cwd, *(fd for fd in stdio if fd is not None), *pass_fds}
                helper, sock = _fork(
                    lambda s: _run_child(s, argv, config, resolv, extra, stdio,
                                         tuple(pass_fds), exec_env, cwd, bypass),
                    keep=keep, dumpable=True,
                )
            finally:
                os.close(cwd)
            try:
                reply, fds = _receive(sock, helper, timeout, "creating the namespace")
            except BaseException:
                sock.close()
                helper.kill()
                raise
        finally:
            # The bind mount holds its own reference to the file: the name can go now.
            shutil.rmtree(tmpdir, ignore_errors=True)
        handle = _handle(reply, fds, Netns(fds[1], f"sandbox {helper.pid}"), config, timeout)
        if argv is None:
            sock.close()
            helper.reap()  # it exits once its fds are sent
            return handle
        handle.pid, handle.command = helper.pid, argv  # from here the handle reaps it
        handle._control = sock
        if not hold:
            try:
                handle.start()
            except BaseException:
                handle.close()
                raise
        return handle

    @staticmethod
    def for_namespace(
        target: str | int | Netns,
        config: NetConfig | None = None,
        *,
        extra: ExtraFds | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tap: TapRequest | None = None,
        userns_path: str | None = None,
    ) -> SandboxHandle:
        """Give an existing namespace (a PID, an nsfs path, ``pid:N``, a name) a tun device.

        The helper enters the user namespace owning the target's network namespace when
        that is not ours (a rootless container's), then the network namespace itself; it
        leaves mounts alone (the container runtime owns them).  ``userns_path`` names the
        user namespace to enter instead (slirp4netns's ``--userns-path``).  With ``tap``
        the device is that TAP device instead of a new tun (:mod:`.tapdevice`; ``extra``
        is not supported then).  Raises :class:`UserError`.
        """
        config = config or NetConfig()
        config.validate()
        if tap is not None and extra is not None:
            raise ValueError("a TAP device takes no extra callback")
        netns = _open_target(target)
        try:
            _refuse_own_namespace(netns)
            userns = _owning_userns(netns) if userns_path is None else \
                _open_userns(userns_path)
            work = (lambda: _configure_here(config, extra)) if tap is None else \
                (lambda: tap_here(config, tap))
            try:
                reply, fds = _in_helper(
                    netns,
                    userns,
                    work,
                    f"attaching to {netns.label}",
                    timeout,
                    preload=tap is None,  # a TAP is set up without pyroute2
                )
            finally:
                if userns is not None:
                    os.close(userns)
            os.close(fds[1])  # the helper's view of the netns; we keep the one we opened
            return _handle(reply, fds, netns, config, timeout)
        except BaseException:
            netns.close()
            raise


class PendingFds:
    """A helper :meth:`SandboxHandle.start_fds` forked, still at work.  :meth:`collect`
    waits for its fds (SandboxError if it fails); :meth:`cancel` kills and reaps it.
    Exactly one of them is called."""

    def __init__(self, helper: _Helper, sock: socket.socket, doing: str,
                 timeout: float) -> None:
        self._helper, self._doing, self._timeout = helper, doing, timeout
        self._sock: socket.socket | None = sock

    def collect(self) -> list[int]:
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError("these fds were already collected or cancelled")
        _, fds = _finish_in_helper(self._helper, sock, self._timeout, self._doing, fixed=0)
        return fds

    def cancel(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._helper.kill()


def _handle(
    reply: dict, fds: list[int], netns: Netns, config: NetConfig, timeout: float
) -> SandboxHandle:
    mac = reply.get("guest_mac")
    listener = fds.pop() if reply.get("seccomp_listener") else -1
    return SandboxHandle(
        tun=fds[0],
        netns=netns,
        userns=fds[2],
        ifname=reply["ifname"],
        offloads=tuple(reply["offloads"]),
        vnet_hdr_size=reply["vnet_hdr_size"],
        ipv6=reply["ipv6"],
        config=config,
        extra=fds[_FIXED_FDS:],
        warnings=list(reply.get("warnings", [])),
        _timeout=timeout,
        link=reply.get("link", "tun"),
        guest_mac=None if mac is None else bytes.fromhex(mac.replace(":", "")),
        seccomp_listener=listener,
    )
