"""Create (``run``) or enter (``attach``) a user-mode namespace and hand its fds to the host side.

The host side of user-mode networking lives in the caller's namespaces; the namespace it
serves needs a tun device, addresses, routes and a resolv.conf.  Those can only be made
*inside* the namespace, and getting inside a user namespace is refused to a multithreaded
process (``unshare``/``setns`` with ``CLONE_NEWUSER`` return EINVAL).  nsbridge's host side
is multithreaded (socket-factory threads, workers), so every namespace operation here runs
in a **forked, single-threaded helper** that sends the resulting file descriptors back over
a ``SOCK_SEQPACKET`` socketpair with ``SCM_RIGHTS`` (:func:`socket.send_fds`).

Every helper is confined first thing after the fork (:func:`_fork`, through
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

import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from nsbridge.dependencies import require_pyroute2
from nsbridge.errors import UserError, describe_oserror
from nsbridge.linux.netns import CLONE_NEWNET, Netns, setns, unshare
from nsbridge.usernet.inside import confine, netconf
from nsbridge.usernet.inside.netconf import NetConfig, SetupError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
# ioctl(NS_GET_USERNS) = _IO(0xb7, 0x1): an fd for the user namespace owning a namespace.
NS_GET_USERNS = 0xB701

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_TIMEOUT = 30.0
_REPLY_LIMIT = 1 << 16
_SCM_MAX_FD = 253  # the kernel's per-message limit
_FIXED_FDS = 3  # tun, netns, userns lead every reply; the extra fds follow

ExtraFds = Callable[[], Iterable["int | socket.socket"]]
"""Run inside the namespace after it is configured; returns fds/sockets to send back."""

from nsbridge.linux.libc import libc as _libc  # noqa: E402, I001 (the one handle)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
# Held from socketpair() until the parent closed the child's end: a helper forked by a
# concurrent create()/attach() in another thread must not inherit that end, or the parent
# would miss the EOF that tells it its own helper died.
_fork_lock = threading.Lock()


class SandboxError(UserError):
    """Creating, entering or configuring the namespace failed; the text says which step."""


# ---- the handle ---------------------------------------------------------------------


@dataclass(eq=False)
class SandboxHandle:
    """What the host side gets back: the tun fd, the namespace, and (for ``run``) CMD.

    The handle owns every fd in it; :meth:`close` releases them.  ``extra`` holds the fds
    the ``extra`` callback produced, also owned by the handle until :meth:`take_extra`.
    ``offloads`` names the TUNSETOFFLOAD bits the kernel accepted (``csum``, ``tso4``,
    ``tso6``, ``uso4``, ``uso6``); every tun frame starts with a ``vnet_hdr_size``-byte
    virtio-net header.
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

    def make_fds(self, fn: ExtraFds, timeout: float | None = None) -> list[int]:
        """Run ``fn`` in a helper inside this namespace; return the fds it made (caller owns).

        For a namespace owned by another user namespace (every ``run`` sandbox) a thread
        cannot simply ``setns`` there, so a forked helper enters the user namespace too.
        """
        userns = None if _same_ns(self.userns, "/proc/self/ns/user") else self.userns
        _, fds = _in_helper(
            self.netns,
            userns,
            lambda: _collect_only(fn),
            f"making sockets in {self.netns.label}",
            self._timeout if timeout is None else timeout,
            fixed=0,
        )
        return fds

    def close(self) -> None:
        """Release every fd.  A held CMD is abandoned (its helper exits and is reaped); a
        running CMD is left running and reaped by a later wait()/poll() if still wanted."""
        if self._control is not None:
            self._control.close()  # the held helper reads EOF and exits without exec
            self._control = None
            self._reap()
        for fd in (self.tun, self.userns, self._pidfd, *self.extra):
            if fd >= 0:
                os.close(fd)
        self.tun = self.userns = self._pidfd = -1
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
    ) -> SandboxHandle:
        """Start ``command`` in a new user+network+mount namespace with a configured tun.

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
                                         tuple(pass_fds), exec_env, cwd),
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
    def attach(
        target: str | int | Netns,
        config: NetConfig | None = None,
        *,
        extra: ExtraFds | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> SandboxHandle:
        """Give an existing namespace (a PID, an nsfs path, ``pid:N``, a name) a tun device.

        The helper enters the user namespace owning the target's network namespace when
        that is not ours (a rootless container's), then the network namespace itself; it
        leaves mounts alone (the container runtime owns them).  Raises :class:`UserError`.
        """
        config = config or NetConfig()
        config.validate()
        netns = _open_target(target)
        try:
            _refuse_own_namespace(netns)
            userns = _owning_userns(netns)
            try:
                reply, fds = _in_helper(
                    netns,
                    userns,
                    lambda: _configure_here(config, extra),
                    f"attaching to {netns.label}",
                    timeout,
                )
            finally:
                if userns is not None:
                    os.close(userns)
            os.close(fds[1])  # the helper's view of the netns; we keep the one we opened
            return _handle(reply, fds, netns, config, timeout)
        except BaseException:
            netns.close()
            raise


def create(
    command: Sequence[str] | None, config: NetConfig | None = None, **kwargs: object
) -> SandboxHandle:
    """Module-level shorthand for :meth:`Sandbox.create`."""
    return Sandbox.create(command, config, **kwargs)  # type: ignore[arg-type]


def attach(
    target: str | int | Netns, config: NetConfig | None = None, **kwargs: object
) -> SandboxHandle:
    """Module-level shorthand for :meth:`Sandbox.attach`."""
    return Sandbox.attach(target, config, **kwargs)  # type: ignore[arg-type]


# ---- parent side ------------------------------------------------------------------------


def _preload() -> None:
    """Import pyroute2 here, before fork: a child importing it could deadlock on an import
    lock held by another parent thread at fork time, and would pay the import each time."""
    require_pyroute2("user-mode networking (nsbridge run/attach)")
    import pyroute2.netlink.exceptions  # noqa: F401
    from pyroute2 import IPRoute  # noqa: F401


class _Helper:
    """A forked helper.  Remembers whether it was reaped, because signalling a pid after
    reaping it could hit an unrelated process that reused the number."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def reap(self) -> int:
        """Wait for a helper that is about to exit (SIGKILL if it lingers); its status."""
        if self.status is None:
            self.status = _reap(self.pid)
        return self.status

    def kill(self) -> int:
        if self.status is None:
            self.status = _kill_and_reap(self.pid)
        return self.status


def _fork(
    child_main: Callable[[socket.socket], None],
    keep: Iterable[int] = (),
    dumpable: bool = False,
) -> tuple[_Helper, socket.socket]:
    """Fork a helper running ``child_main(sock)``; it never returns into our stack.

    Every helper is forked here and confined here, before ``child_main`` runs: non-dumpable
    (unless ``dumpable``: ``run``'s helper, which turns it off itself once its id maps are
    written), holding only ``sock`` and the fds in ``keep``, with an empty environment and
    ``/`` as working directory (see :mod:`nsbridge.usernet.inside.confine`).
    """
    with _fork_lock:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            raise SandboxError(
                f"cannot start the namespace helper: {describe_oserror(exc)}"
            ) from None
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                try:
                    confine.harden({child_sock.fileno(), *keep}, dumpable=dumpable)
                except BaseException as exc:
                    _send_error(child_sock, str(exc) if isinstance(exc, SetupError) else
                                f"cannot confine the namespace helper: "
                                f"{type(exc).__name__}: {exc}")
                    os._exit(1)
                child_main(child_sock)
            finally:
                os._exit(1)
        child_sock.close()
    return _Helper(pid), parent_sock


def _receive(
    sock: socket.socket, helper: _Helper, timeout: float, doing: str, fixed: int = _FIXED_FDS
) -> tuple[dict, list[int]]:
    """The helper's one report: (header, fds), or a SandboxError with its message.

    ``fixed`` fds (tun, netns, userns) lead the message, then ``header["extra"]`` more.
    """
    sock.settimeout(timeout)
    try:
        data, fds, flags, _ = socket.recv_fds(
            sock, _REPLY_LIMIT, _SCM_MAX_FD, socket.MSG_CMSG_CLOEXEC
        )
    except TimeoutError:
        raise SandboxError(
            f"{doing}: the namespace helper (pid {helper.pid}) did not report within "
            f"{timeout:g} s; it was killed"
        ) from None
    except ConnectionResetError:
        data, fds, flags = b"", [], 0
    if not data or flags & socket.MSG_CTRUNC:
        _close_all(fds)
    if not data:
        status = helper.reap()
        raise SandboxError(
            f"{doing}: the namespace helper {_describe_status(status)} before reporting"
        )
    if flags & socket.MSG_CTRUNC:
        raise SandboxError(
            f"{doing}: too many file descriptors for one message "
            f"(at most {_SCM_MAX_FD - _FIXED_FDS} extra)"
        )
    reply = _decode(data)
    if "error" in reply:
        _close_all(fds)
        raise SandboxError(f"{doing}: {reply['error']}")
    expected = fixed + int(reply.get("extra", 0))
    if len(fds) != expected:
        _close_all(fds)
        raise SandboxError(
            f"{doing}: the namespace helper sent {len(fds)} fds, expected {expected}"
        )
    return reply, fds


def _in_helper(
    netns: Netns,
    userns: int | None,
    work: Callable[[], tuple[dict, list[int]]],
    doing: str,
    timeout: float,
    fixed: int = _FIXED_FDS,
) -> tuple[dict, list[int]]:
    """Fork a helper that enters ``userns`` (if given) and ``netns``, runs ``work`` there
    and sends back its fds; reap it.  Returns (header, fds)."""
    _preload()
    keep = [netns.fd] if userns is None else [netns.fd, userns]
    helper, sock = _fork(lambda s: _enter_child(s, netns.fd, userns, work), keep=keep)
    try:
        reply, fds = _receive(sock, helper, timeout, doing, fixed)
    except BaseException:
        helper.kill()
        raise
    finally:
        sock.close()
    helper.reap()
    return reply, fds


def _handle(
    reply: dict, fds: list[int], netns: Netns, config: NetConfig, timeout: float
) -> SandboxHandle:
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
    )


def _open_target(target: str | int | Netns) -> Netns:
    """PID (int or digits), nsfs path, or any :meth:`Netns.from_spec` selector."""
    if isinstance(target, Netns):
        return Netns(os.dup(target.fd), target.label)
    if isinstance(target, int):
        return Netns.from_pid(str(target), label=f"pid {target}")
    text = target.strip()
    if text.isdigit():
        return Netns.from_pid(text, label=f"pid {text}")
    return Netns.from_spec(text)


def _refuse_own_namespace(netns: Netns) -> None:
    """Attaching to our own namespace would add a default route through a tun device that
    only we serve — cutting this host's networking.  Refuse it."""
    own = {_ns_identity("/proc/self/ns/net"), _ns_identity("/proc/thread-self/ns/net")}
    if netns.identity() in own:
        raise UserError(
            f"{netns.label} is nsbridge's own network namespace: attach gives a "
            "*separate* namespace its networking (give the PID of a process in "
            "the container or sandbox)"
        )


def _owning_userns(netns: Netns) -> int | None:
    """An fd on the user namespace owning ``netns``, or None if that is ours (no entry)."""
    try:
        fd = fcntl.ioctl(netns.fd, NS_GET_USERNS)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            # Owned by an ancestor of our user namespace: it cannot be entered; setns on
            # the netns itself will then say what is wrong.
            return None
        raise SandboxError(
            f"cannot find the user namespace owning {netns.label}: {describe_oserror(exc)}"
        ) from None
    os.set_inheritable(fd, False)
    if _same_ns(fd, "/proc/self/ns/user"):
        os.close(fd)
        return None
    return fd


def _ns_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _same_ns(fd: int, path: str) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == _ns_identity(path)


def _reap(pid: int, grace: float = 5.0) -> int:
    """waitpid() a helper that is about to exit; SIGKILL it if it lingers.  Its status."""
    deadline = time.monotonic() + grace
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # someone else reaped it (a SIGCHLD handler); nothing to report
        if done:
            return status
        if time.monotonic() >= deadline:
            return _kill_and_reap(pid)
        time.sleep(0.005)


def _kill_and_reap(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _decode(data: bytes) -> dict:
    try:
        reply = json.loads(data)
    except ValueError:
        return {"error": f"garbled report from the namespace helper: {data[:200]!r}"}
    return reply if isinstance(reply, dict) else {"error": "garbled report"}


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- child side (runs only in forked helpers) -------------------------------------------


def _run_child(
    sock: socket.socket,
    argv: list[str] | None,
    config: NetConfig,
    resolv: str,
    extra: ExtraFds | None,
    stdio: tuple[int | None, ...],
    pass_fds: tuple[int, ...],
    env: dict[str, str],
    cwd: int,
) -> NoReturn:
    """The ``run`` helper: new namespaces, setup, report, then become CMD.

    Forked dumpable (see :func:`_fork`): it becomes non-dumpable as soon as its id maps
    are written, before anything else happens in the new namespaces, and stays so until
    the exec that makes it CMD.
    """
    try:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _unshare_all()
            _map_ids(uid, gid)
            confine.make_non_dumpable()
            warnings = _setup_mounts(resolv, config)
            header, fds = _configure_here(config, extra)
        except SetupError as exc:
            _send_error(sock, str(exc))
            os._exit(1)
        header["warnings"] = warnings + header.get("warnings", [])
        socket.send_fds(sock, [json.dumps(header).encode()], fds)
        _close_all(fds)  # the parent has its own copies; CMD must not hold the tun
        if argv is None or not sock.recv(16):
            os._exit(0)  # no command, or the parent gave up (closed the socket)
        os.fchdir(cwd)  # the caller's working directory, for CMD
        _exec(sock, argv, stdio, pass_fds, env)
    except BaseException as exc:
        _send_error(sock, f"unexpected error in the namespace helper: {type(exc).__name__}: {exc}")
    os._exit(1)


def _enter_child(
    sock: socket.socket,
    netns_fd: int,
    userns_fd: int | None,
    work: Callable[[], tuple[dict, list[int]]],
) -> NoReturn:
    """The ``attach``/``make_fds`` helper: enter the namespaces, do ``work``, report, exit."""
    try:
        try:
            if userns_fd is not None:
                _setns(userns_fd, CLONE_NEWUSER, "user")
            _setns(netns_fd, CLONE_NEWNET, "network")
            header, fds = work()
        except SetupError as exc:
            _send_error(sock, str(exc))
            os._exit(1)
        socket.send_fds(sock, [json.dumps(header).encode()], fds)
        os._exit(0)
    except BaseException as exc:
        _send_error(sock, f"unexpected error in the namespace helper: {type(exc).__name__}: {exc}")
    os._exit(1)


def _send_error(sock: socket.socket, text: str) -> None:
    try:
        sock.send(json.dumps({"error": text[:8000]}).encode())
    except OSError:
        pass  # the parent is gone: nobody to tell


def _unshare_all() -> None:
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            hint = (
                "unprivileged user namespaces are disabled here (sysctl "
                "kernel.unprivileged_userns_clone=0, an AppArmor/SELinux policy, a "
                "container's seccomp profile, or a chroot); enable them or run as root"
            )
        elif exc.errno in (errno.ENOSPC, errno.EUSERS):
            hint = (
                "the user namespace limit is reached (sysctl user.max_user_namespaces, "
                "or the nesting depth of 32)"
            )
        elif exc.errno == errno.EINVAL:
            hint = "this kernel lacks user/network/mount namespace support"
        else:
            hint = ""
        raise SetupError(
            f"cannot create a user namespace: {describe_oserror(exc)}"
            + (f": {hint}" if hint else "")
        ) from None


def _map_ids(uid: int, gid: int) -> None:
    """Map the caller to root inside: the one mapping a process may write for itself.

    The helper writes its own maps from *inside* the new user namespace, where it holds no
    capability over the parent namespace — true for root callers too — so the kernel
    demands ``setgroups`` = ``deny`` before gid_map, exactly as for ``unshare -r``.
    (Tools inside that call setgroups() then get EPERM; with one mapped id they could not
    switch users anyway.)
    """
    try:
        _write_proc("/proc/self/setgroups", "deny")
        _write_proc("/proc/self/uid_map", f"0 {uid} 1\n")
        _write_proc("/proc/self/gid_map", f"0 {gid} 1\n")
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = (
                " (a security policy denies capabilities in new user namespaces, e.g. "
                "AppArmor's kernel.apparmor_restrict_unprivileged_userns=1)"
            )
        raise SetupError(
            f"cannot map uid {uid}/gid {gid} into the new user namespace: "
            f"{describe_oserror(exc)}{hint}"
        ) from None


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())  # one write(2): these files reject partial writes
    finally:
        os.close(fd)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    data_buf = ctypes.c_char_p(enc(data)) if data is not None else None
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, data_buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _setup_mounts(resolv: str, config: NetConfig) -> list[str]:
    """Private mounts, then our resolv.conf in place of the host's.  Returns warnings.

    /etc/resolv.conf is often a symlink (systemd-resolved, NetworkManager).  mount(2)
    follows symlinks in its target, so binding over the *resolved* file is the same thing,
    spelled out: the symlink keeps pointing where it did and that file shows our content.
    If the symlink dangles (its target does not exist, e.g. resolved is not running) there
    is nothing to bind over and we must not create files outside: a tmpfs is mounted over
    the target's directory, in our private mount namespace only, and the file written
    there.  Anything stranger is left alone with a warning: DNS then uses the host's
    servers, which usually are not reachable from the namespace.
    """
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise SetupError(
            f"cannot make mounts private in the new mount namespace: {describe_oserror(exc)}"
        ) from None
    real = os.path.realpath(RESOLV_CONF)
    try:
        if os.path.isfile(real):
            _mount(resolv, real, None, MS_BIND)
            return []
        directory = os.path.dirname(real)
        if (
            os.path.islink(RESOLV_CONF)
            and not os.path.lexists(real)
            and os.path.isdir(directory)
            and directory != "/"
        ):
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            with open(real, "w") as f:
                f.write(config.resolv_conf())
            return [
                f"{RESOLV_CONF} points to the missing {real}: mounted an empty tmpfs on "
                f"{directory} inside the namespace to hold resolv.conf"
            ]
    except OSError as exc:
        raise SetupError(
            f"cannot put resolv.conf in place at {real}: {describe_oserror(exc)}"
        ) from None
    what = "missing" if not os.path.lexists(RESOLV_CONF) else "not a regular file"
    return [f"{RESOLV_CONF} is {what}: DNS inside the namespace is not set to {config.dns4}"]


def _configure_here(config: NetConfig, extra: ExtraFds | None) -> tuple[dict, list[int]]:
    """tun + netlink + extra, in the namespace we are in.  (header, [tun, netns, userns,
    *extra]) — the fds are ours to close after sending."""
    tun = netconf.open_tun(config)
    fds = [tun.fd]
    try:
        ipv6 = netconf.configure(config, tun.ifname)
        fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        extra_fds = _collect(extra) if extra is not None else []
    except BaseException:
        _close_all(fds)
        raise
    if len(extra_fds) > _SCM_MAX_FD - _FIXED_FDS:
        raise SetupError(
            f"the extra callback returned {len(extra_fds)} fds; at most "
            f"{_SCM_MAX_FD - _FIXED_FDS} fit in one message"
        )
    header = {
        "ifname": tun.ifname,
        "offloads": list(tun.offloads),
        "vnet_hdr_size": tun.vnet_hdr_size,
        "ipv6": ipv6,
        "extra": len(extra_fds),
    }
    return header, fds + extra_fds


def _collect_only(fn: ExtraFds) -> tuple[dict, list[int]]:
    """``make_fds``'s work: just the callback's fds, no fixed leading ones."""
    fds = _collect(fn)
    if len(fds) > _SCM_MAX_FD:
        raise SetupError(f"the callback returned {len(fds)} fds; at most {_SCM_MAX_FD} fit")
    return {"extra": len(fds)}, fds


def _collect(fn: ExtraFds) -> list[int]:
    """Call the caller's callback; accept fds or socket objects (kept open until sent)."""
    try:
        items = list(fn())
    except SetupError:
        raise
    except BaseException as exc:
        raise SetupError(
            f"the extra callback failed inside the namespace: {type(exc).__name__}: {exc}"
        ) from None
    fds: list[int] = []
    for item in items:
        # Dup so a socket object being garbage-collected cannot close the fd before
        # send_fds; the helper exits right after, closing everything.
        fds.append(os.dup(item if isinstance(item, int) else item.fileno()))
    return fds


def _setns(fd: int, nstype: int, kind: str) -> None:
    try:
        setns(fd, nstype)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = (
                f": entering a {kind} namespace needs CAP_SYS_ADMIN over it; run as "
                "root or as the user who created it"
            )
        elif exc.errno == errno.EINVAL and kind == "user":
            hint = ": it is not a descendant of ours (or this process is multithreaded)"
        raise SetupError(
            f"cannot enter the target's {kind} namespace: {describe_oserror(exc)}{hint}"
        ) from None


def _exec(
    sock: socket.socket,
    argv: list[str],
    stdio: tuple[int | None, ...],
    pass_fds: tuple[int, ...],
    env: dict[str, str],
) -> NoReturn:
    """Become CMD.  ``sock`` is close-on-exec: EOF tells the parent CMD started."""
    moved = [None if fd is None else os.dup(fd) for fd in stdio]  # dup first: no clobbering
    for target, fd in enumerate(moved):
        if fd is not None:
            os.dup2(fd, target)  # inheritable by default
            os.close(fd)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    confine.close_fds_except({0, 1, 2, sock.fileno(), *pass_fds})
    # Python ignores SIGPIPE and SIGXFSZ; a fresh program expects the defaults, and a
    # signal mask inherited from a namespace thread must not follow CMD either.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvpe(argv[0], argv, env)  # searches env's PATH, as execvp searched ours
    except OSError as exc:
        _send_error(sock, f"cannot run {argv[0]!r}: {describe_oserror(exc)}")
    os._exit(127)
