"""A Unix socket path resolved the way another process sees it, and no further.

Socket switching performs a sandboxed program's Unix ``bind``/``connect`` itself
(``usernet/host/switcher.py``): the program may have a root and mounts of its own, so
the path is looked up from ``/proc/PID/root``.  A plain path through that magic link is
not enough: an absolute symlink met on the way (``/tmp/x -> /home/you``), a ``..`` or
one of the program's ``/proc`` magic links would be followed *in nsbridge's* view,
letting the program create or reach sockets anywhere the user can on the host.

So the directory (``bind``) or the socket file (``connect``) is opened with
``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` under the program's root (absolute
symlinks and ``..`` stay inside it, magic links are refused), and the call is made
through ``/proc/self/fd/N``: the directory for a bind (the new name is created there,
never followed), the socket inode itself for a connect.  Linux 5.6 (``openat2``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from nsbridge.linux.libc import last_error, libc

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_OPEN_HOW = struct.Struct("=QQQ")  # flags, mode, resolve
MAX_SUN_PATH = 107  # sun_path is 108 bytes with its terminating zero


def open_in_root(root_fd: int, path: bytes, flags: int) -> int:
    """``path`` opened under ``root_fd`` as if that were ``/`` (``RESOLVE_IN_ROOT``),
    magic links refused; an fd (close-on-exec) or OSError."""
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags | os.O_CLOEXEC, 0,
                                                     RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS))
    result = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd),
                          ctypes.c_char_p(path), how, ctypes.c_size_t(_OPEN_HOW.size))
    if result < 0:
        raise last_error("openat2")
    return int(result)


def _view_of(pid: int, path: bytes) -> bytes:
    """``path`` as an absolute path in ``pid``'s root (a relative one joined to its
    working directory, as the program sees that)."""
    if path.startswith(b"/"):
        return path
    cwd = os.readlink(f"/proc/{pid}/cwd").encode()
    if not cwd.startswith(b"/"):  # "(unreachable)...": the cwd is outside its root
        raise OSError(errno.ENOENT, "the program's working directory is outside its root")
    return cwd.rstrip(b"/") + b"/" + path


def unix_sockaddr(raw: bytes, pid: int, *, create: bool) -> tuple[bytes, int]:
    """(a Unix sockaddr for nsbridge to use in place of ``raw``, an fd to close once the
    call is made, or -1).  ``create``: for ``bind`` (the last component is the new
    name, in a directory resolved in ``pid``'s root); else for ``connect`` (the socket
    file itself resolved there).  Abstract names (in the socket's network namespace)
    and empty paths are returned as they are."""
    path = raw[2:].split(b"\0", 1)[0]
    if not path or raw[2:3] == b"\0":
        return raw, -1
    full = _view_of(pid, path)
    if create:
        parent, _, name = full.rpartition(b"/")
        target = parent or b"/"
        flags = os.O_PATH | os.O_DIRECTORY
    else:
        target, name, flags = full, b"", os.O_PATH
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_in_root(root, target, flags)
    finally:
        os.close(root)
    resolved = f"/proc/self/fd/{fd}".encode() + (b"/" + name if create else b"")
    if len(resolved) > MAX_SUN_PATH:
        os.close(fd)
        raise OSError(errno.ENAMETOOLONG, "a Unix socket name too long to reach through "
                      "/proc for the program")
    return raw[:2] + resolved + b"\0", fd
