"""Errors a user can act on.

Anything raised as :class:`UserError` is printed as one line naming the bad input and
what to do, and the program exits with code 2 — never a traceback.  Library callers
catch it like any other exception.
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


class FieldError(UserError):
    """A bad value in a table of settings (a config file's ``[[forward]]``, a control
    request): ``key`` names the field, so a caller that knows where the table was written
    (config.py: the file's lines) can point at that field's line without reading the
    message."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key
