"""Errors a user can act on.

Anything raised as :class:`UserError` is printed as one line naming the bad input and
what to do, and the program exits with code 2 — never a traceback.  Library callers
catch it like any other exception.

Which errors are the user's: bad input (an option, a config file's field, a control
request), and an environment the user can change (a namespace that does not exist or
cannot be entered, a port in use, user namespaces switched off, no nf_tables) — each
a :class:`UserError` whose message says what and, where it can, how to fix it.  The
hierarchy, so that a caller catching ``UserError`` catches every one of them:

* :class:`UserError` — bad input or environment (``nsbridge`` prints one line, exit 2)
  * :class:`FieldError` — a bad value in a table of settings, with the key's name
  * :class:`SetupError` — a step of a namespace's set-up failed (tun device, addresses,
    routes, the redirect's listeners and nftables rules, confining a helper)
    * ``usernet.inside.nft.NftError`` — nftables refused the redirect
      * ``NftUnavailable`` — nf_tables cannot be used here (the TCP fast path is off)
  * ``usernet.inside.sandbox.SandboxError`` — the parent's report of a namespace helper
    that failed (its text is the helper's :class:`SetupError`, or what killed it)

Not the user's: a failure nsbridge did not foresee stays its own exception (OSError,
ValueError, ...) and shows a traceback, because a one-line message would hide a bug.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Bad input or environment the user can fix; the message says what and how."""

    exit_code = 2


def describe_oserror(exc: OSError) -> str:
    """A short human text for an OSError ("Address already in use"), without the errno noise."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)


def errno_name(code: int | None) -> str:
    """ECONNREFUSED and friends, for log lines people grep for."""
    if code is None:
        return "?"
    return errno.errorcode.get(code, str(code))


class SetupError(UserError):
    """A step of setting up a namespace's networking failed; the message names the step
    and the kernel's reason, for the user (usernet/inside/ raises it, in the namespace's
    helper or in-process)."""


class FieldError(UserError):
    """A bad value in a table of settings (a config file's ``[[forward]]``, a control
    request): ``key`` names the field, so a caller that knows where the table was written
    (config.py: the file's lines) can point at that field's line without reading the
    message."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key
