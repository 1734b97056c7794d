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

from .errors import UserError
from .spec import ForwardSpec

TOP_KEYS = {"workers", "control", "drain", "engine", "accept", "defaults", "forward"}
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
    engine: str | None = None
    accept: str | None = None


def load(path: str) -> Config:
    from .daemon import spec_from_mapping

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"--config {path}: {exc.strerror}") from None
    text = raw.decode(errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+)", str(exc))
        raise UserError(f"{path}:{at.group(1) if at else 1}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UserError(f"{path}:{_line_of(text, unknown[0])}: unknown key {unknown[0]!r}; "
                        f"expected {', '.join(sorted(TOP_KEYS))}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{path}:{_line_of(text, 'defaults')}: 'defaults' must be a table "
                        "([defaults])")
    bad = sorted(set(defaults) - DEFAULT_KEYS)
    if bad:
        raise UserError(f"{path}:{_line_of(text, bad[0])}: [defaults]: unknown key {bad[0]!r}")
    entries = data.get("forward", [])
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: no [[forward]] tables: add at least one forward")
    specs: list[ForwardSpec] = []
    names: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        line = _forward_line(text, number)
        if not isinstance(entry, dict):
            raise UserError(f"{path}:{line}: 'forward' must be tables written [[forward]], "
                            f"not {entry!r}")
        label = entry.get("name", f"#{number}")
        where = f"{path}:{line}: [[forward]] {label}"
        try:
            spec = spec_from_mapping(entry, defaults=defaults, where=where,
                                     allowed=FORWARD_KEYS, allow_fds=True)
        except UserError as exc:
            message = str(exc)
            key = re.search(r"unknown key '([^']+)'", message) or re.search(
                r'"(\w+)"', message[len(where):])
            if key:  # point at the offending line rather than the table's
                message = message.replace(
                    f"{path}:{line}:",
                    f"{path}:{_key_line(text, key.group(1), line, key.group(1) in entry)}:", 1)
            raise UserError(message) from None
        spec.name = spec.name or f"forward-{number}"
        if spec.name in names:
            raise UserError(f"{path}:{_line_in_table(text, 'name', line)}: [[forward]] "
                            f"{label}: 'name': duplicate forward name {spec.name!r}")
        names.add(spec.name)
        specs.append(spec)
    return Config(specs, defaults,
                  workers=_opt(data, "workers", int, path, text, "a number of workers >= 1",
                               lambda v: v >= 1),
                  control=_opt(data, "control", str, path, text, "a path"),
                  drain=_opt(data, "drain", (int, float), path, text, "seconds >= 0",
                             lambda v: v >= 0),
                  engine=_opt(data, "engine", str, path, text, '"splice" or "copy"',
                              lambda v: v in ("splice", "copy")),
                  accept=_opt(data, "accept", str, path, text,
                              '"auto", "handoff" or "reuseport"',
                              lambda v: v in ("auto", "handoff", "reuseport")))


def _opt(data: dict[str, Any], key: str, kind: Any, path: str, text: str, expected: str,
         valid: Any = None) -> Any:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                              or (valid is not None and not valid(value))):
        raise UserError(f"{path}:{_line_of(text, key)}: {key} = {value!r}: expected {expected}")
    return value


def _line_in_table(text: str, key: str, header: int) -> int:
    """Line of ``key = `` inside the table whose header is on line ``header`` (or the
    header's line when the table does not set it)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for index, line in enumerate(text.splitlines(), start=1):
        if index <= header:
            continue
        if line.strip().startswith("["):
            break
        if pattern.match(line):
            return index
    return header


def _key_line(text: str, key: str, header: int, in_table: bool) -> int:
    """Where a forward's ``key`` was written: its table, else [defaults] (inherited)."""
    if in_table:
        return _line_in_table(text, key, header)
    for index, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("[defaults]"):
            found = _line_in_table(text, key, index)
            return found if found != index else header
    return header


def _forward_line(text: str, number: int) -> int:
    """Line of the ``number``-th ``[[forward]]`` header (1-based)."""
    seen = 0
    for index, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("[[forward]]"):
            seen += 1
            if seen == number:
                return index
    return 1


def _line_of(text: str, key: str, start: int = 1) -> int:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for index, line in enumerate(text.splitlines(), start=1):
        if index >= start and pattern.match(line):
            return index
    return start
