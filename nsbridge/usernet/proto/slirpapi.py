"""slirp4netns's API socket protocol, sans-IO: request bytes in, values out, reply bytes out.

Callers (rootlesskit's ``--port-driver=slirp4netns``, podman, scripts) speak it to
``slirp4netns --api-socket PATH``; nsbridge answers it byte for byte so that it can stand
in for slirp4netns.  One request per connection: the server reads once, at most
:data:`MAX_REQUEST` bytes (a read that fills the whole buffer is refused as too large),
answers with one JSON object and no newline, and closes.

    {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "0.0.0.0",
     "host_port": 8080, "guest_addr": "10.0.2.100", "guest_port": 80}}
                                        -> {"return":{"id":1}}
    {"execute": "list_hostfwd"}          -> {"entries":[{"id":1,"proto":"tcp",...}]}
    {"execute": "remove_hostfwd", "arguments": {"id": 1}}  -> {"return":{}}
    anything wrong                       -> {"error":{"desc":"bad request: ..."}}

Why a parser of our own instead of :mod:`json`: slirp4netns reads requests with parson,
which differs from Python's parser on what callers may really send, and the reply to a
request must not depend on whose helper runs.  Parson (as built into slirp4netns 1.2)
reads the request as a C string (a NUL byte ends it), skips a UTF-8 byte-order mark and
C ``isspace`` white space (vertical tab and form feed too), ignores whatever follows the
first value, accepts numbers such as ``1.`` and ``-.5`` but no leading zeros, refuses
NaN, infinities, lone surrogates, duplicate keys, keys holding NUL and trailing commas,
nests at most :data:`MAX_NESTING` levels, and hands out strings truncated at their first
NUL and numbers truncated to int.  :func:`parse_json` does exactly that, without
recursion, so hostile input costs a bounded loop and never an exception other than
:class:`BadJson`.

Where nsbridge answers differently on purpose (docs/slirp4netns.md, "API socket"): a
missing or non-string ``proto`` is an error reply (slirp4netns dereferences NULL and
dies); ``host_addr`` and ``guest_addr`` may be IPv6; a port outside 1-65535 is refused
(slirp4netns silently wraps it modulo 65536, and -1 becomes 65535).
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_NESTING", "MAX_REQUEST", "AddHostFwd", "ApiError", "BadJson", "HostFwd",
    "HostFwdTable", "ListHostFwd", "RemoveHostFwd", "added_reply", "decode_request",
    "error_reply", "list_reply", "parse_json", "removed_reply",
]

MAX_REQUEST = 4096  # slirp4netns's buffer: a read that fills it is "too large"
MAX_NESTING = 2048  # parson's limit on nested objects and arrays

# The verbatim descriptions slirp4netns sends.
TOO_LARGE = "bad request: too large message"
CANNOT_PARSE = "bad request: cannot parse JSON"
NOT_AN_OBJECT = "bad request: json_object() failed"
NO_EXECUTE = "bad request: no execute found"
UNKNOWN_EXECUTE = "bad request: unknown execute"
ADD_FAILED = "bad request: add_hostfwd: slirp_add_hostfwd failed"
BAD_ID = "bad request: remove_hostfwd: bad arguments.id"


def bad_argument(name: str) -> str:
    return f"bad request: add_hostfwd: bad arguments.{name}"


# ---- the values -------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiError:
    """A request answered with ``{"error":{"desc":...}}``."""

    desc: str


@dataclass(frozen=True)
class AddHostFwd:
    """A checked ``add_hostfwd``: addresses in canonical text, ports 1-65535."""

    proto: str  # "tcp" or "udp"
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int


@dataclass(frozen=True)
class ListHostFwd:
    pass


@dataclass(frozen=True)
class RemoveHostFwd:
    id: int  # what slirp4netns compares: the number truncated to int (0 if absent)


Request = AddHostFwd | ListHostFwd | RemoveHostFwd


@dataclass(frozen=True)
class HostFwd:
    """One forward the API added, as ``list_hostfwd`` shows it."""

    id: int
    proto: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int


class HostFwdTable:
    """The forwards added through the API, with ids that only grow (from 1, never
    reused after a removal, as slirp4netns's counter)."""

    def __init__(self) -> None:
        self._entries: dict[int, HostFwd] = {}
        self._next_id = 1

    def add(self, request: AddHostFwd) -> HostFwd:
        entry = HostFwd(self._next_id, request.proto, request.host_addr, request.host_port,
                        request.guest_addr, request.guest_port)
        self._next_id += 1
        self._entries[entry.id] = entry
        return entry

    @property
    def next_id(self) -> int:
        """The id the next successful add will get."""
        return self._next_id

    def get(self, fwd_id: int) -> HostFwd | None:
        return self._entries.get(fwd_id)

    def remove(self, fwd_id: int) -> HostFwd | None:
        return self._entries.pop(fwd_id, None)

    def entries(self) -> list[HostFwd]:
        return list(self._entries.values())  # in the order they were added


# ---- replies ------------------------------------------------------------------------------


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_reply(desc: str) -> bytes:
    return _compact({"error": {"desc": desc}})


def added_reply(fwd_id: int) -> bytes:
    return _compact({"return": {"id": fwd_id}})


def removed_reply() -> bytes:
    return b'{"return":{}}'


def list_reply(entries: list[HostFwd]) -> bytes:
    """parson's serialisation: keys in slirp4netns's order, no spaces."""
    return _compact({"entries": [
        {"id": e.id, "proto": e.proto, "host_addr": e.host_addr, "host_port": e.host_port,
         "guest_addr": e.guest_addr, "guest_port": e.guest_port} for e in entries]})


# ---- requests -----------------------------------------------------------------------------


def decode_request(data: bytes, default_guest: str) -> Request | ApiError:
    """One read's bytes to a request or the error slirp4netns would answer; never raises.

    ``default_guest`` is the address a missing ``guest_addr`` means (network+100)."""
    if len(data) >= MAX_REQUEST:
        return ApiError(TOO_LARGE)
    try:
        document = parse_json(data.split(b"\0", 1)[0])
    except BadJson:
        return ApiError(CANNOT_PARSE)
    if not isinstance(document, dict):
        return ApiError(NOT_AN_OBJECT)
    execute = _string(document.get(b"execute"))
    if execute is None:
        return ApiError(NO_EXECUTE)
    arguments = document.get(b"arguments")
    if not isinstance(arguments, dict):
        arguments = {}
    if execute == b"add_hostfwd":
        return _add_hostfwd(arguments, default_guest)
    if execute == b"list_hostfwd":
        return ListHostFwd()
    if execute == b"remove_hostfwd":
        return RemoveHostFwd(_truncated(arguments.get(b"id")))
    return ApiError(UNKNOWN_EXECUTE)


def _add_hostfwd(arguments: dict[bytes, Any], default_guest: str) -> AddHostFwd | ApiError:
    proto = _string(arguments.get(b"proto"))
    if proto not in (b"tcp", b"udp"):
        return ApiError(bad_argument("proto"))
    host_addr = _address(_string(arguments.get(b"host_addr")) or b"0.0.0.0")
    if host_addr is None:
        return ApiError(bad_argument("host_addr"))
    host_port = _truncated(arguments.get(b"host_port"))
    if not 0 < host_port < 65536:
        return ApiError(bad_argument("host_port"))
    guest_text = _string(arguments.get(b"guest_addr"))
    guest_addr = _address(guest_text) if guest_text else default_guest
    if guest_addr is None:
        return ApiError(bad_argument("guest_addr"))
    guest_port = _truncated(arguments.get(b"guest_port"))
    if not 0 < guest_port < 65536:
        return ApiError(bad_argument("guest_port"))
    return AddHostFwd(proto.decode(), host_addr, host_port, guest_addr, guest_port)


def _string(value: Any) -> bytes | None:
    """parson's json_object_get_string: a string value as its C string, else None."""
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0]
    return None


def _truncated(value: Any) -> int:
    """json_object_get_number then a C cast to int: 0 for what is not a number."""
    if isinstance(value, float):
        return int(value)
    return 0


def _address(text: bytes) -> str | None:
    """An IPv4 address as inet_pton reads it (IPv6 too: nsbridge's addition), in
    inet_ntop's canonical spelling; None if it is neither."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, decoded))
        except (OSError, ValueError):
            continue
    return None


# ---- parson's JSON ------------------------------------------------------------------------


class BadJson(ValueError):
    """What parson refuses to parse."""


_SPACE = b" \t\n\v\f\r"
# What strtod consumes after a '-' or a digit (its inf/nan spellings are refused below).
_NUMBER = re.compile(rb"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_INFINITE = re.compile(rb"-(?:inf|nan)", re.IGNORECASE)
_HEXADECIMAL = re.compile(rb"-?0[xX]\.?[0-9a-fA-F]")  # strtod reads it, parson then refuses
_ESCAPES = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
            ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def parse_json(text: bytes) -> Any:
    """The first JSON value of ``text`` as parson reads it: objects as dicts with bytes
    keys, strings as bytes, numbers as float, true/false/null as True/False/None.
    Raises :class:`BadJson` (only) for what parson refuses."""
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    parser = _Parser(text)
    return parser.document()


class _Parser:
    """An explicit stack instead of recursion: the nesting limit is parson's, and
    Python's own recursion limit never comes into play."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0

    def document(self) -> Any:
        # stack entries: [container, key awaiting its value (objects only)]
        stack: list[list[Any]] = []
        while True:
            if len(stack) > MAX_NESTING:
                raise BadJson("nested too deeply")
            self._skip_space()
            char = self._peek()
            value: Any
            if char == b"{":
                self.pos += 1
                self._skip_space()
                if self._peek() == b"}":
                    self.pos += 1
                    value = {}
                else:
                    stack.append([{}, self._key()])
                    continue
            elif char == b"[":
                self.pos += 1
                self._skip_space()
                if self._peek() == b"]":
                    self.pos += 1
                    value = []
                else:
                    stack.append([[], None])
                    continue
            else:
                value = self._scalar(char)
            # A value is complete: put it in its container, closing containers as needed.
            while True:
                if not stack:
                    return value
                container, key = stack[-1]
                if isinstance(container, dict):
                    if key in container:
                        raise BadJson("duplicate key")
                    container[key] = value
                else:
                    container.append(value)
                self._skip_space()
                if self._peek() == b",":
                    self.pos += 1
                    self._skip_space()
                    if isinstance(container, dict):
                        stack[-1][1] = self._key()
                    break  # parse the next value
                closing = b"}" if isinstance(container, dict) else b"]"
                if self._peek() != closing:
                    raise BadJson("unterminated object or array")
                self.pos += 1
                stack.pop()
                value = container

    def _key(self) -> bytes:
        key = self._string()
        if b"\0" in key:
            raise BadJson("a key holds NUL")
        self._skip_space()
        if self._peek() != b":":
            raise BadJson("expected ':'")
        self.pos += 1
        return key

    def _scalar(self, char: bytes) -> Any:
        if char == b'"':
            return self._string()
        for word, value in ((b"true", True), (b"false", False), (b"null", None)):
            if char == word[:1]:
                if not self.text.startswith(word, self.pos):
                    raise BadJson("bad literal")
                self.pos += len(word)
                return value
        if char == b"-" or char.isdigit():
            return self._number()
        raise BadJson("not a value")

    def _number(self) -> float:
        if _INFINITE.match(self.text, self.pos):
            raise BadJson("not a finite number")
        if _HEXADECIMAL.match(self.text, self.pos):
            raise BadJson("hexadecimal number")
        match = _NUMBER.match(self.text, self.pos)
        if match is None:  # strtod converted nothing: 0, and nothing consumed
            return 0.0
        digits = match.group()
        if len(digits) > 1 and digits[:1] == b"0" and digits[1:2] != b".":
            raise BadJson("leading zero")
        if len(digits) > 2 and digits[:2] == b"-0" and digits[2:3] != b".":
            raise BadJson("leading zero")
        number = float(digits)
        if number in (float("inf"), float("-inf")):
            raise BadJson("number out of range")
        self.pos = match.end()
        return number

    def _string(self) -> bytes:
        text = self.text
        if text[self.pos:self.pos + 1] != b'"':
            raise BadJson("expected a string")
        out = bytearray()
        pos = self.pos + 1
        end = len(text)
        while True:
            if pos >= end:
                raise BadJson("unterminated string")
            byte = text[pos]
            if byte == 0x22:  # "
                break
            if byte < 0x20:
                raise BadJson("control character in a string")
            if byte != 0x5C:  # not a backslash
                out.append(byte)
                pos += 1
                continue
            escape = text[pos + 1] if pos + 1 < end else -1
            if escape == ord("u"):
                code, pos = self._utf16(pos)
                out += chr(code).encode("utf-8")
                continue
            replacement = _ESCAPES.get(escape)
            if replacement is None:
                raise BadJson("bad escape")
            out += replacement
            pos += 2
        self.pos = pos + 1
        return bytes(out)

    def _utf16(self, pos: int) -> tuple[int, int]:
        """A \\uXXXX escape at ``pos`` (a surrogate pair: both) -> (code point, next pos)."""
        code = self._hex4(pos + 2)
        pos += 6
        if 0xDC00 <= code <= 0xDFFF:
            raise BadJson("lone trail surrogate")
        if 0xD800 <= code <= 0xDBFF:
            if self.text[pos:pos + 2] != b"\\u":
                raise BadJson("lone lead surrogate")
            trail = self._hex4(pos + 2)
            if not 0xDC00 <= trail <= 0xDFFF:
                raise BadJson("bad trail surrogate")
            code = 0x10000 + ((code - 0xD800) << 10) + (trail - 0xDC00)
            pos += 6
        return code, pos

    def _hex4(self, pos: int) -> int:
        digits = self.text[pos:pos + 4]
        if len(digits) != 4 or not all(d in _HEX for d in digits):
            raise BadJson("bad \\u escape")
        return int(digits, 16)

    def _peek(self) -> bytes:
        return self.text[self.pos:self.pos + 1]

    def _skip_space(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
        self.pos = pos
