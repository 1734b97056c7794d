"""Which code serves a switched connect's system calls: the native core
(``_notifycore.c``) or the Python of :mod:`.seccomp_notify` and the switcher.

The core runs the mechanical sequences of the hot path (receive and fetch what the
decision needs; create, connect, install and answer) in one call each, so the switcher
keeps only the decision in Python.  It is optional: built where a C compiler and the
Python headers were present; ``NSBRIDGE_SWITCH=python`` picks the Python path anyway
(tests run both, and a user can rule the core out).  Both paths take the same steps in
the same order (see the C file's header).

With the core, the switcher serves its listener from the core's own thread (``Server``):
the only waiter the kernel's synchronous wake-ups (Linux 6.6) reach, so a connect whose
decision is cached is switched without a round through the event loop.
"""

from __future__ import annotations

import os
import platform
from types import ModuleType
from typing import TYPE_CHECKING

from nsbridge.errors import UserError

try:
    from nsbridge.linux import _notifycore
except ImportError:  # built without a C compiler: the Python path serves
    _notifycore = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from nsbridge.linux._notifycore import Server as Server

__all__ = ["PATHS", "SWITCH_ENV", "chosen", "no_sync_wake_up", "unavailable"]

SWITCH_ENV = "NSBRIDGE_SWITCH"
PATHS = ("native", "python")
SYNC_WAKE_UP_KERNEL = (6, 6)  # SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP


def unavailable() -> str | None:
    """Why the native core cannot serve here (None if it can): it was not built."""
    if _notifycore is None:
        return ("nsbridge was installed without its native switching core (reinstall with "
                "a C compiler and the Python headers present); the Python path serves, "
                "slower per connect")
    return None


def no_sync_wake_up(release: str | None = None) -> str | None:
    """Why the serving thread will not get synchronous wake-ups on this kernel (None if
    it should): they came with Linux 6.6.  For ``doctor``; the thread itself just tries
    (EINVAL before 6.6) and says at ``-v`` what it got."""
    release = release or platform.release()
    try:
        version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return None  # an odd release string: the thread will find out
    if version < SYNC_WAKE_UP_KERNEL:
        return (f"Linux {release} has no synchronous seccomp wake-ups (6.6): each switched "
                "connect waits for two ordinary wake-ups")
    return None


def chosen() -> ModuleType | None:
    """The native core if it serves ($NSBRIDGE_SWITCH, default "native" where built),
    else None (the Python path).  An unknown name is a UserError."""
    name = os.environ.get(SWITCH_ENV) or "native"
    if name not in PATHS:
        raise UserError(f"${SWITCH_ENV}: unknown path {name!r} (choose from "
                        f"{', '.join(PATHS)})")
    return _notifycore if name == "native" else None
