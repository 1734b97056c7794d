"""``nsbridge ctl``: the control socket's client side, as library calls.

control.py serves the protocol and sends one request (:func:`nsbridge.forward.control.request`);
this module knows what ``ctl``'s actions mean in that protocol: which request an action
sends, when a reply is a failure (and how to say so once), and how a reply is shown.
"""

from __future__ import annotations

import json
from typing import Any

from nsbridge.errors import UserError
from nsbridge.forward.control import request

#: The columns ``ctl list`` and ``ctl stats`` show, in order (the JSON has them all).
LIST_COLUMNS = ["name", "protocol", "listening_on", "connect"]
STATS_COLUMNS = ["name", "protocol", "active", "accepted", "closed", "reset",
                 "connect_failed", "denied", "bytes_up", "bytes_down"]


def control_message(action: str, *, name: str | None = None, listen: str | None = None,
                    connect: str | None = None, allow: list[str] | None = None,
                    deny: list[str] | None = None, proxy: str | None = None,
                    kill: bool = False) -> dict[str, Any]:
    """The request ``ctl ACTION`` sends (see control.py for the protocol)."""
    message: dict[str, Any]
    if action == "add":
        message = {"cmd": "add", "name": name, "listen": listen, "connect": connect,
                   "allow": list(allow or []), "deny": list(deny or [])}
        if proxy:
            message["proxy"] = proxy
    elif action == "remove":
        message = {"cmd": "remove", "name": name, "kill": kill}
    else:
        message = {"cmd": action}
    return message


def call(path: str, action: str, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message`` to the daemon at ``path``; its reply, or UserError when it failed."""
    reply = request(path, message)
    if not reply.get("ok"):
        error = str(reply.get("error", "failed"))
        prefix = f"{action}: "
        # The daemon already names the request in some errors ("add: ..."); say it once.
        raise UserError(error if error.startswith(prefix) else prefix + error)
    return reply


def render(action: str, reply: dict[str, Any], *, as_json: bool) -> str | None:
    """What ``ctl ACTION`` prints for a successful ``reply`` (None: nothing)."""
    if as_json:
        return json.dumps(reply, indent=2)
    if action == "list":
        return format_table(_rows(reply, "forwards"), LIST_COLUMNS)
    if action == "stats":
        return format_table(_rows(reply, "stats"), STATS_COLUMNS)
    return None


def _rows(reply: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``reply[key]`` as table rows; a reply without them is a UserError, not a traceback."""
    rows = reply.get(key)
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"the daemon's reply has no {key!r} list of objects; is this an "
                        "nsbridge control socket?")
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned columns under upper-case headers, no trailing spaces."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip()
              for row in rows]
    return "\n".join(lines)
