"""The one handle on the C library, and a checked call for the system calls Python lacks.

Python 3.11 has no ``setns``, ``unshare``, ``mount``, ``prctl``, ``signalfd`` or ``bpf``,
so nsbridge calls them through ctypes.  One handle, opened here with ``use_errno`` so
that ``ctypes.get_errno()`` is the errno of *our* last call, and one way to turn a
failure into an exception: an :class:`OSError` with the kernel's errno and a message
that names the call ("setns: Operation not permitted"), so a log line says which of
several calls failed.

Function prototypes (``argtypes``) are set by the module that uses the function, next
to the call; two modules that declare the same function must declare it alike.

Forwarding workers import this module, so it imports only :mod:`ctypes` and :mod:`os`:
every module a worker loads costs resident memory in each worker.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def last_error(call: str, filename: str | None = None) -> OSError:
    """The OSError for the libc call that just failed: its errno, a message naming it."""
    code = ctypes.get_errno()
    message = f"{call}: {os.strerror(code)}"
    return OSError(code, message) if filename is None else OSError(code, message, filename)


def checked(call: str, *args: object) -> int:
    """``libc.<call>(*args)``, raising :func:`last_error` when it returns -1 (the C
    library's failure value for every system call wrapper nsbridge uses)."""
    result = int(getattr(libc, call)(*args))
    if result == -1:
        raise last_error(call)
    return result


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    """``mount(2)``; an OSError naming the call and ``target`` when it fails."""
    def encoded(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if libc.mount(encoded(source), encoded(target), encoded(fstype), flags, encoded(data)) != 0:
        raise last_error("mount", target)
