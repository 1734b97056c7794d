"""Which code serves a switched connect's system calls: the native core
(``_notifycore.c``) or the Python of :mod:`.seccomp_notify` and the switcher.

The core runs the mechanical sequences of the hot path (receive and fetch what the
decision needs; create, connect, install and answer) in one call each, so the switcher
keeps only the decision in Python.  It is optional: built where a C compiler and the
Python headers were present; ``NSBRIDGE_SWITCH=python`` picks the Python path anyway
(tests run both, and a user can rule the core out).  Both paths take the same steps in
the same order (see the C file's header).
"""

from __future__ import annotations

import os
from types import ModuleType

from nsbridge.errors import UserError

try:
    from nsbridge.linux import _notifycore
except ImportError:  # built without a C compiler: the Python path serves
    _notifycore = None  # type: ignore[assignment]

__all__ = ["PATHS", "SWITCH_ENV", "chosen", "unavailable"]

SWITCH_ENV = "NSBRIDGE_SWITCH"
PATHS = ("native", "python")


def unavailable() -> str | None:
    """Why the native core cannot serve here (None if it can): it was not built."""
    if _notifycore is None:
        return ("nsbridge was installed without its native switching core (reinstall with "
                "a C compiler and the Python headers present); the Python path serves, "
                "slower per connect")
    return None


def chosen() -> ModuleType | None:
    """The native core if it serves ($NSBRIDGE_SWITCH, default "native" where built),
    else None (the Python path).  An unknown name is a UserError."""
    name = os.environ.get(SWITCH_ENV) or "native"
    if name not in PATHS:
        raise UserError(f"${SWITCH_ENV}: unknown path {name!r} (choose from "
                        f"{', '.join(PATHS)})")
    return _notifycore if name == "native" else None
