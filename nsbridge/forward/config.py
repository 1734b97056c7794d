"""``nsbridge serve --config FILE.toml``: a set of forwards and daemon options in a file.

    workers = 2                      # optional, like --workers
    control = "/run/nsbridge.sock"   # optional, like --control
    drain = 5                        # optional, like --drain
    accept = "handoff"               # optional, like --accept (default "auto")

    [defaults]                       # optional: applied to every forward below
    connect_timeout = 10

    [[forward]]
    name = "web"                     # unique; used by `nsbridge ctl remove`
    listen = "tcp:127.0.0.1:8080"
    connect = "tcp:127.0.0.1:80,netns=web"
    allow = ["127.0.0.0/8"]          # optional; also deny, proxy, idle_timeout, max_flows

Errors name the file, the line and the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

from nsbridge.errors import FieldError, UserError
from nsbridge.forward.spec import ForwardSpec

# "engine" is the older name of "mover" (the --engine flag is now --mover): both are read.
TOP_KEYS = {"workers", "control", "drain", "mover", "engine", "accept", "defaults", "forward"}
FORWARD_KEYS = {"name", "listen", "connect", "allow", "deny", "proxy", "connect_timeout",
                "idle_timeout", "max_flows"}
DEFAULT_KEYS = FORWARD_KEYS - {"name", "listen", "connect"}


@dataclass
class Config:
    forwards: list[ForwardSpec]
    defaults: dict[str, Any]
    workers: int | None = None
    control: str | None = None
    drain: float | None = None
    mover: str | None = None
    accept: str | None = None


def load(path: str) -> Config:
    from nsbridge.forward.daemon import spec_from_mapping

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"--config {path}: {exc.strerror}") from None
    text = raw.decode(errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}:{_decode_error_line(exc)}: not valid TOML: {exc}") from None
    lines = KeyLines(text)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UserError(f"{path}:{lines.key((), unknown[0])}: unknown key {unknown[0]!r}; "
                        f"expected {', '.join(sorted(TOP_KEYS))}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{path}:{lines.key((), 'defaults')}: 'defaults' must be a table "
                        "([defaults])")
    bad = sorted(set(defaults) - DEFAULT_KEYS)
    if bad:
        raise UserError(f"{path}:{lines.key(('defaults',), bad[0])}: [defaults]: unknown key "
                        f"{bad[0]!r}")
    entries = data.get("forward", [])
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: no [[forward]] tables: add at least one forward")
    specs: list[ForwardSpec] = []
    names: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        table = ("forward", number)
        line = lines.table(table, fallback=lines.key((), "forward"))
        if not isinstance(entry, dict):
            raise UserError(f"{path}:{line}: 'forward' must be tables written [[forward]], "
                            f"not {entry!r}")
        label = entry.get("name", f"#{number}")
        where = f"{path}:{line}: [[forward]] {label}"
        try:
            spec = spec_from_mapping(entry, defaults=defaults, where=where,
                                     allowed=FORWARD_KEYS, allow_fds=True)
        except FieldError as exc:
            # Point at the line that wrote the bad field: the forward's own, else the
            # [defaults] one it inherited, else (a missing field) the table's header.
            at = (lines.key(table, exc.key) if exc.key in entry
                  else lines.key(("defaults",), exc.key, fallback=line) if exc.key in defaults
                  else line)
            message = str(exc)
            if at != line and message.startswith(where):
                message = f"{path}:{at}: [[forward]] {label}{message[len(where):]}"
            raise UserError(message) from None
        spec.name = spec.name or f"forward-{number}"
        if spec.name in names:
            raise UserError(f"{path}:{lines.key(table, 'name')}: [[forward]] "
                            f"{label}: 'name': duplicate forward name {spec.name!r}")
        names.add(spec.name)
        specs.append(spec)
    return Config(specs, defaults,
                  workers=_opt(data, "workers", int, path, lines, "a number of workers >= 1",
                               lambda v: v >= 1),
                  control=_opt(data, "control", str, path, lines, "a path"),
                  drain=_opt(data, "drain", (int, float), path, lines, "seconds >= 0",
                             lambda v: v >= 0),
                  mover=_opt(data, _mover_key(data, path, lines), str, path, lines,
                             '"splice" or "copy"', lambda v: v in ("splice", "copy")),
                  accept=_opt(data, "accept", str, path, lines,
                              '"auto", "handoff" or "reuseport"',
                              lambda v: v in ("auto", "handoff", "reuseport")))


def _mover_key(data: dict[str, Any], path: str, lines: KeyLines) -> str:
    """The key that names the mover: ``mover``, or its older name ``engine``."""
    if "mover" in data and "engine" in data:
        raise UserError(f"{path}:{lines.key((), 'engine')}: engine: the older name of "
                        "mover; give only one of them")
    return "engine" if "engine" in data else "mover"


def _opt(data: dict[str, Any], key: str, kind: Any, path: str, lines: KeyLines,
         expected: str, valid: Any = None) -> Any:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                              or (valid is not None and not valid(value))):
        raise UserError(f"{path}:{lines.key((), key)}: {key} = {value!r}: expected {expected}")
    return value


def _decode_error_line(exc: tomllib.TOMLDecodeError) -> int:
    """The line tomllib stopped at.  Python 3.14 gives it as ``lineno``; before, only
    the decoder's own message carries it, as "(at line N, column M)"."""
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    at = re.search(r"\(at line (\d+)", str(exc))
    return int(at.group(1)) if at else 1


# A table header ([name] or [[name]]) and a key line (key = ..., the key bare or quoted).
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")


class KeyLines:
    """Where each table and key of a config file was written: a light index of its lines.

    tomllib returns values without positions, so errors found after parsing (an unknown
    key, a bad value) look their line up here by key path: ``()`` is the top level,
    ``("defaults",)`` the [defaults] table, ``("forward", 2)`` the second [[forward]].
    Only the shapes this file uses are indexed (headers, ``key = value`` lines); a key
    it cannot place falls back to a line given by the caller, so the error still appears.
    """

    def __init__(self, text: str) -> None:
        self._tables: dict[tuple[str | int, ...], int] = {}
        self._keys: dict[tuple[tuple[str | int, ...], str], int] = {}
        arrays: dict[str, int] = {}
        table: tuple[str | int, ...] = ()
        depth = 0  # open brackets of a multi-line array value: its lines are not keys
        for number, line in enumerate(text.splitlines(), start=1):
            if depth == 0:
                header = _HEADER.match(line)
                if header:
                    name = header.group(2).strip('"')
                    if header.group(1) == "[[":
                        arrays[name] = arrays.get(name, 0) + 1
                        table = (name, arrays[name])
                    else:
                        table = (name,)
                    self._tables.setdefault(table, number)
                    continue
                key = _KEY.match(line)
                if key:
                    self._keys.setdefault((table, key.group(1).strip("\"'")), number)
            depth = max(0, depth + _bracket_balance(line))

    def table(self, table: tuple[str | int, ...], fallback: int = 1) -> int:
        """The line of ``table``'s header."""
        return self._tables.get(table, fallback)

    def key(self, table: tuple[str | int, ...], key: str, fallback: int | None = None) -> int:
        """The line of ``key = `` in ``table`` (else ``fallback``, else the table's header)."""
        found = self._keys.get((table, key))
        if found is not None:
            return found
        return fallback if fallback is not None else self.table(table)


def _bracket_balance(line: str) -> int:
    """Opened minus closed brackets on a line, outside strings and comments (enough to
    tell when a multi-line array ends)."""
    balance = 0
    quote = ""
    for char in line:
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char == "[":
            balance += 1
        elif char == "]":
            balance -= 1
    return balance
