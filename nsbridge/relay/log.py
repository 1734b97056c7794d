"""The ``nsbridge`` logger, imported by the modules a worker process runs.

``from nsbridge.relay.log import log`` gives ``logging.getLogger("nsbridge")`` -- except in a worker
process (:mod:`nsbridge.forward.worker`), which calls :func:`use_stderr` before it imports
anything else and so gets a stand-in that writes "nsbridge: message" lines to stderr
at the level the supervisor passed.  The stand-in saves the ``logging`` import (with
``traceback``, ``re``, ``string`` and ``weakref``), resident memory in every worker
(docs/performance.md, Memory).  Only what the relay modules call is provided.
"""

from __future__ import annotations

import sys

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40


TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from typing import Protocol

    class Log(Protocol):
        """What the relay modules may call on ``log``: both :class:`logging.Logger` and the
        stand-in provide it, so the type checker rejects a call the stand-in could not serve."""

        def isEnabledFor(self, level: int) -> bool: ...
        def debug(self, msg: str, *args: object) -> None: ...
        def info(self, msg: str, *args: object) -> None: ...
        def warning(self, msg: str, *args: object) -> None: ...
        def error(self, msg: str, *args: object) -> None: ...
        def exception(self, msg: str, *args: object) -> None: ...


# Declared, not assigned: the first ``from nsbridge.relay.log import log`` goes through __getattr__.
log: Log


class StderrLog:
    """Just enough of :class:`logging.Logger` for the relay: level check and %-messages."""

    __slots__ = ("level",)

    def __init__(self, level: int) -> None:
        self.level = level

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name
        return level >= self.level

    def _emit(self, level: int, msg: str, args: tuple) -> None:
        if level >= self.level:
            text = msg % args if args else msg
            try:
                sys.stderr.write(f"nsbridge: {text}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def debug(self, msg: str, *args: object) -> None:
        self._emit(DEBUG, msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._emit(INFO, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._emit(WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(ERROR, msg, args)

    def exception(self, msg: str, *args: object) -> None:
        self._emit(ERROR, msg, args)
        if self.level <= ERROR:
            sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]


def use_stderr(level: int) -> None:
    """Make ``log`` a :class:`StderrLog` (worker processes, before importing the relay)."""
    global log
    log = StderrLog(level)  # a typed assignment, so mypy checks StderrLog against Log


def __getattr__(name: str) -> Log:
    """``log`` is looked up on first import: the real logger unless use_stderr() ran."""
    if name == "log":
        import logging

        value = logging.getLogger("nsbridge")
        globals()["log"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
