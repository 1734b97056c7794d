"""``nsbridge seccomp-agent`` for the CLI: the socket, the policy, the loop, the summary.

The agent (:mod:`.host.seccompagent`) is one process with one event loop, like ``run``:
every container's trapped calls are answered there, and blocking connects a container
makes to its own namespace run in the switcher's few threads.  It runs until
SIGINT/SIGTERM, serving containers as runtimes hand them in; each ends on its own.
Stopping the agent makes the trapped calls of containers still running fail with
ENOSYS (the kernel's answer once no listener is left): their other traffic goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Collection

from nsbridge.errors import UserError
from nsbridge.linux.signals import StopSignals
from nsbridge.usernet.options import (
    UsernetOptions,
    check_bypass,
    exclude_of,
    outbound_of,
    policy_of,
)

log = logging.getLogger("nsbridge")

BACKLOG = 128


def print_profile(socket_path: str, metadata: str = "") -> int:
    """Print the ``linux.seccomp`` section a container's config.json needs (JSON)."""
    from nsbridge.usernet.proto.ociprofile import ProfileError, seccomp_section

    try:
        section = seccomp_section(os.path.abspath(socket_path), metadata)
    except ProfileError as exc:
        raise UserError(f"seccomp-agent: {exc}") from None
    print(json.dumps(section, indent=2))
    return 0


def run_agent(socket_path: str, options: UsernetOptions, stops: StopSignals, *,
              allowed_uids: Collection[int] = ()) -> int:
    """Serve runtimes on ``socket_path`` until a stop signal; 0."""
    from nsbridge.relay.loop import EventLoop
    from nsbridge.usernet.host.seccompagent import SeccompAgent, describe
    from nsbridge.usernet.proto.hostaccess import NO_HOST_ADDRESSES

    check_bypass()
    policy = policy_of(options)
    outbound = outbound_of(options)
    host_addresses = None
    if not policy.allow_host_access and policy.host_addresses is NO_HOST_ADDRESSES:
        from nsbridge.usernet.host.hostaddrs import HostAddresses

        host_addresses = HostAddresses()
        policy.host_addresses = host_addresses
    listener = listen(socket_path, shared=bool(allowed_uids))
    loop = EventLoop()
    exclude = exclude_of(options)
    agent = SeccompAgent(loop, listener, policy, outbound=outbound, exclude=exclude,
                         allowed_uids=frozenset(allowed_uids))
    try:
        agent.start()
        stops.attach(loop, lambda _signum, _count: loop.stop())
        log.info("seccomp-agent: listening on %s; policy: %s%s", socket_path,
                 policy.describe(),
                 f"; not switched: {', '.join(map(exclude.describe, exclude.rules))}"
                 if exclude else "")
        loop.run()
    finally:
        stats = agent.snapshot()
        agent.close()
        stops.close()
        loop.close()
        if host_addresses is not None:
            host_addresses.close()
        _unlink(socket_path)
        refused = ", ".join(f"{reason} x{n}" for reason, n in stats["refused"].items())
        log.info("seccomp-agent: containers served: %d; switching: %s; refused "
                 "hand-ins: %s", stats["containers"], describe(stats["switching"]),
                 refused or "none")
    return 0


def listen(path: str, *, shared: bool) -> socket.socket:
    """The agent's socket at ``path``: mode 0600 (0666 with ``--allow-user``: the peer's
    credentials decide, :mod:`.host.seccompagent`); a stale socket file is replaced."""
    from nsbridge.net.sockets import listen_private_unix

    return listen_private_unix(path, f"--socket {path}", BACKLOG, shared=shared)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
