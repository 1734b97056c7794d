"""Socket addresses as users write them: ``127.0.0.1:80``, ``[::1]:80``, ``localhost:8080``.

Parsing is separate from resolving: the text is checked at once (so a typo is reported
before anything starts), and names are resolved later *inside the namespace that will
use them* via the socket factory, because resolution depends on that namespace.
"""

from __future__ import annotations

import socket

from nsbridge.errors import UserError


class _Frozen:
    """A small immutable record: equality, hash and repr from ``_fields``.

    Hand-written instead of ``@dataclass(frozen=True)``: these classes are imported by
    worker processes, and ``dataclasses`` (with ``inspect``, ``ast``, ``dis``...) costs
    every worker resident memory (docs/performance.md, Memory).
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({inner})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")


class HostPort(_Frozen):
    """A parsed but unresolved ``HOST:PORT``."""

    __slots__ = _fields = __match_args__ = ("host", "port")
    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)

    def __reduce__(self) -> tuple:
        return (HostPort, (self.host, self.port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class UnixAddress(_Frozen):
    """A Unix socket: a filesystem path, or an abstract name (which belongs to a network
    namespace, so exposing one in another namespace is a real use)."""

    __slots__ = ("abstract", "path")
    _fields = __match_args__ = ("path", "abstract")
    path: str
    abstract: bool

    def __init__(self, path: str, abstract: bool = False) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "abstract", abstract)

    def __reduce__(self) -> tuple:
        return (UnixAddress, (self.path, self.abstract))

    @property
    def sockaddr(self) -> str | bytes:
        return b"\0" + self.path.encode() if self.abstract else self.path

    def __str__(self) -> str:
        return f"unix-abstract:{self.path}" if self.abstract else f"unix:{self.path}"


class ResolvedAddress(_Frozen):
    """A concrete socket address: what socket(), bind() and connect() take."""

    __slots__ = _fields = __match_args__ = ("family", "sockaddr")
    family: int
    sockaddr: tuple | str | bytes

    def __init__(self, family: int, sockaddr: tuple | str | bytes) -> None:
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "sockaddr", sockaddr)

    def __reduce__(self) -> tuple:
        return (ResolvedAddress, (self.family, self.sockaddr))

    def __str__(self) -> str:
        return format_sockaddr(self.sockaddr)


def parse_host_port(text: str, *, what: str, allow_port_zero: bool) -> HostPort:
    """Split ``HOST:PORT`` / ``[V6]:PORT``; ``what`` names the option in error messages."""
    example = "e.g. 127.0.0.1:8080 or [::1]:8080"
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise UserError(f"{what} {text!r}: malformed address ({example})")
        host, port_text = text[1:close], text[close + 2 :]
        if not host:
            raise UserError(f"{what} {text!r}: empty IPv6 address ({example})")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UserError(f"{what} {text!r}: expected HOST:PORT ({example})")
        if ":" in host:
            raise UserError(
                f"{what} {text!r}: IPv6 addresses need brackets, e.g. [{host}]:{port_text}"
            )
    # isdigit() alone accepts "²" and other Unicode digits that int() then rejects.
    if not (port_text.isascii() and port_text.isdigit()):
        raise UserError(f"{what} {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise UserError(f"{what} {text!r}: port {port} out of range ({low}-65535)")
    return HostPort(host, port)


def resolve(addr: HostPort | UnixAddress, *, what: str, passive: bool,
            socktype: int = socket.SOCK_STREAM) -> ResolvedAddress:
    """Resolve in the *calling thread's* namespace; run it through the socket factory."""
    if isinstance(addr, UnixAddress):
        return ResolvedAddress(socket.AF_UNIX, addr.sockaddr)
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socktype, flags=flags | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise UserError(
            f"{what} {addr}: cannot resolve host {addr.host!r} ({exc.strerror})"
        ) from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return ResolvedAddress(family, sockaddr)


def format_sockaddr(sockaddr: object) -> str:
    """``1.2.3.4:5`` / ``[::1]:5`` / a Unix path, for log lines."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(sockaddr, bytes):
        if sockaddr[:1] == b"\0":
            return "@" + sockaddr[1:].decode(errors="replace")
        return repr(sockaddr)
    return str(sockaddr) or "unnamed"
