"""``nsbridge-slirp4netns --enable-sandbox`` and ``--enable-seccomp``: the serving process
locks itself down after set-up, before the ready byte.

By then everything the process will ever open is open: the TAP device, the host side's
sockets, the API socket, the published ports' socket factory (a helper forked inside
the namespace) and, in PID mode, the target's pidfd.  What remains is moving packets
and bytes, making sockets on the host side, and answering the API socket.  So, in this
order (each step needs the one before):

1. :func:`preload`: import every module a serving path would import lazily, since after
   the pivot there is no Python library to import from.
2. ``--enable-sandbox`` (:mod:`nsbridge.linux.lockdown`), slirp4netns's sandbox:

   * a process without CAP_SYS_ADMIN (rootlesskit's, started by an unprivileged user)
     first joins the user namespace the set-up helper entered (the owner of the
     namespace, or ``--userns-path``'s), where it holds every capability, as slirp4netns
     joins its target's; podman calls us from inside that namespace already, and root
     needs none.  Sockets made later still belong to the host's network namespace: the
     traffic is unchanged.
   * a mount namespace of its own, whose root is an empty tmpfs with ``/etc`` and
     ``/run`` bound read-only (and ``/etc/resolv.conf``'s target, when it points
     elsewhere), the old root detached;
   * every capability dropped but CAP_NET_BIND_SERVICE (which lets root publish ports
     below 1024).  Before all of these the process is made non-dumpable: once it has
     joined, the namespace's root holds capabilities over its credentials.

3. ``--enable-seccomp`` (:mod:`nsbridge.linux.seccomp`): the deny-list filter, after the
   sandbox because the sandbox itself needs ``mount``, ``pivot_root``, ``setns`` and
   ``prctl``, which the filter denies.

A failure of any step is a :class:`~nsbridge.errors.UserError`: the caller gets no
ready byte and we exit 1 with its one line.
"""

from __future__ import annotations

import logging
import os
import sys

from nsbridge.errors import UserError

log = logging.getLogger("nsbridge")

SANDBOX_DIRECTORIES = ("/etc", "/run")


def preload() -> None:
    """Import what the steps and the serving paths would import lazily.

    Found by running every path of the life cycle under ``--enable-sandbox``
    (tests/usernet/test_slirp4netns_sandbox.py and the rootlesskit cases) with
    :class:`ImportWatch` in place: today the serving modules have loaded everything by
    then, and what is named here is what a path imports inside a function: the
    lock-down's own steps, and the UDP relay an ``add_hostfwd`` for UDP starts (loaded
    today through the engine, named so a refactor cannot lose it)."""
    from nsbridge.linux import lockdown, seccomp  # noqa: F401
    from nsbridge.relay import udp  # noqa: F401  forward.Forward.start_udp


class ImportWatch:
    """A ``sys.meta_path`` finder that logs every import reaching the finders after the
    pivot (a module not loaded by then cannot be found any more), once per name, and
    lets the import fail as it would have: the one place a missed preload shows, since
    code that treats a module as optional may swallow the ImportError."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name not in self.seen:
            self.seen.add(name)
            log.warning("module %s imported after the sandbox was entered (it cannot be "
                        "loaded there)", name)

    def install(self) -> None:
        sys.meta_path.insert(0, self)  # type: ignore[arg-type]


def sandbox_paths(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """What the new root holds: /etc and /run, and the file ``resolv_conf`` points to
    when that is elsewhere (a resolver daemon's file), as slirp4netns binds it."""
    paths = list(SANDBOX_DIRECTORIES)
    real = os.path.realpath(resolv_conf)
    if os.path.exists(real) and not any(
            real == top or real.startswith(top + "/") for top in SANDBOX_DIRECTORIES):
        paths.append(real)
    return paths


def enter_sandbox(userns: int) -> None:
    """Step 2 of the module's text; ``userns`` is the set-up helper's user namespace."""
    from nsbridge.linux import lockdown

    try:
        # First: from the join on, the namespace's root holds capabilities over our
        # credentials, and only non-dumpability keeps it out of our memory and fds.
        lockdown.make_non_dumpable()
        joined = not lockdown.has_capability(lockdown.CAP_SYS_ADMIN) and \
            not lockdown.same_user_namespace(userns)
        if joined:
            lockdown.join_user_namespace(userns)
        paths = sandbox_paths()
        lockdown.pivot_to_empty_root(paths)
        ImportWatch().install()
        lockdown.keep_only_capabilities({lockdown.CAP_NET_BIND_SERVICE})
    except OSError as exc:
        raise UserError(f"--enable-sandbox: {exc.strerror or exc}") from None
    log.info("sandbox: root holds %s read-only; capabilities: CAP_NET_BIND_SERVICE "
             "only%s", ", ".join(paths),
             " (in the namespace's user namespace)" if joined else "")


def enable_seccomp() -> str:
    """Step 3: install the deny list; the ABI it was built for."""
    from nsbridge.linux import seccomp

    try:
        arch = seccomp.install_deny_list()
    except OSError as exc:
        raise UserError(f"--enable-seccomp: {exc.strerror or exc}") from None
    denied = [name for name in seccomp.DENIED if name in arch.numbers]
    log.info("seccomp: %d system calls denied (%s), clone for new namespaces, other "
             "ABIs", len(denied), arch.name)
    return arch.name


def lock_down(userns: int, *, sandbox: bool, seccomp: bool) -> None:
    """Steps 1-3 as asked for (nothing when neither is)."""
    if not (sandbox or seccomp):
        return
    preload()
    if sandbox:
        enter_sandbox(userns)
    if seccomp:
        enable_seccomp()
