"""The third-party library nsbridge needs, checked once, with one line when it is wrong.

Forwarding needs only the standard library.  User-mode networking (``run``/``attach``, the
Python API) and the demo speak netlink through pyroute2, and ``run``'s TCP fast path uses
pyroute2's nftables messages, which only 0.9.2 and later have: on 0.7.x (Debian 12's
``python3-pyroute2``), 0.8.x and 0.9.1 importing them fails deep inside a call.  0.9.2
opens eight file descriptors at import (its event loop) and keeps them for the life of the
process, which an embedding program sees as a leak; 0.9.3 is the first without either.  Checking
the installed version up front turns that into a sentence that says what to install,
instead of an ``ImportError`` traceback from the middle of a set-up.
"""

from __future__ import annotations

import re

from nsbridge.errors import UserError

PYROUTE2_MINIMUM = (0, 9, 3)
_MINIMUM_TEXT = ".".join(map(str, PYROUTE2_MINIMUM))
_INSTALL_HINT = f"pip install 'pyroute2>={_MINIMUM_TEXT}' (into nsbridge's environment)"


def pyroute2_version() -> str | None:
    """The installed pyroute2's version string, or None when it is not installed."""
    # Imported here: importlib.metadata costs milliseconds (it loads the email package),
    # and nsbridge-slirp4netns's start, which never asks, is on every container start.
    from importlib import metadata

    try:
        return metadata.version("pyroute2")
    except metadata.PackageNotFoundError:
        return None


def version_tuple(text: str) -> tuple[int, ...]:
    """``"0.9.2"`` → ``(0, 9, 2)``; pre-release and local tails are ignored (``0.9.3rc1``)."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def pyroute2_problem() -> str | None:
    """Why pyroute2 cannot serve nsbridge (one sentence with the fix), or None if it can."""
    version = pyroute2_version()
    if version is None:
        return f"pyroute2 is not installed: {_INSTALL_HINT}"
    if version_tuple(version) < PYROUTE2_MINIMUM:
        return (f"pyroute2 {version} is too old (nsbridge needs {_MINIMUM_TEXT} or later): "
                f"{_INSTALL_HINT}")
    return None


def require_pyroute2(feature: str) -> None:
    """Raise :class:`UserError` naming ``feature`` when pyroute2 is missing or too old."""
    problem = pyroute2_problem()
    if problem is not None:
        raise UserError(f"{feature} needs pyroute2: {problem}")
