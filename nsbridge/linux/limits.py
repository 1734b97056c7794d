"""Raise the open-file limit so that thousands of relayed connections fit.

Each relayed connection holds two sockets (plus a pipe pair while it is backed up), so
the usual soft limit of 1024 caps a forwarder at ~500 connections.  We raise the soft
limit to the hard limit, and the hard limit too where we are allowed (root).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("nsbridge")

WANTED = 1 << 20
FDS_PER_CONNECTION = 2
RECOMMENDED_CONNECTIONS = 10_000


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return WANTED


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE as far as permitted; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(WANTED, _nr_open())
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            pass  # not privileged: settle for the hard limit
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    capacity = soft // FDS_PER_CONNECTION
    if capacity < RECOMMENDED_CONNECTIONS:
        log.warning(
            "open-file limit is %d: room for about %d concurrent connections; "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=) for more", soft, capacity - 32,
        )
    return soft
