"""Running forwards as a daemon: the supervisor, its control socket, and the ways a
service manager or a sandbox talks to it (sd_notify, --ready-fd, --exit-with).

The control requests are answered here, in terms of the supervisor's add/remove/list/
stats; the wire format lives in control.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from nsbridge.defaults import ACCEPT, CONNECT_TIMEOUT, DRAIN, MAX_UDP_FLOWS, MOVER, UDP_IDLE_TIMEOUT
from nsbridge.errors import FieldError, UserError
from nsbridge.forward.control import ControlServer
from nsbridge.forward.endpoints import Endpoint, build_spec, parse_endpoint
from nsbridge.forward.spec import ForwardSpec
from nsbridge.forward.supervisor import Supervisor
from nsbridge.linux.signals import StopSignals
from nsbridge.relay.loop import IN

log = logging.getLogger("nsbridge")

_ADD_KEYS = {"cmd", "name", "listen", "connect", "allow", "deny", "proxy", "connect_timeout",
             "idle_timeout", "max_flows"}


@dataclass
class DaemonOptions:
    workers: int
    mover: str = MOVER
    accept: str = ACCEPT  # or "handoff", "reuseport": see supervisor.py
    drain: float = DRAIN
    control: str | None = None
    ready_fd: str | None = None
    exit_with: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # for forwards added at run time
    relay: str | None = None  # "native" or "python"; None: $NSBRIDGE_RELAY or the fastest


def _choose_relay(asked: str | None) -> None:
    """Which relay the workers' TCP connections get, said once at -v (with why not the
    native one when it is not).  --relay travels to the workers as $NSBRIDGE_RELAY, which
    they inherit (and read, as any Bridge does)."""
    from nsbridge.relay.native import (
        RELAY_ENV,
        SOCKOPTS_ENV,
        chosen_relay,
        parse_sockopts,
        unavailable,
    )

    if asked:
        os.environ[RELAY_ENV] = asked
    relay = chosen_relay()  # a bad $NSBRIDGE_RELAY: a UserError before anything runs
    tuned = os.environ.get(SOCKOPTS_ENV, "")
    parse_sockopts(tuned)  # the same for a bad $NSBRIDGE_RELAY_SOCKOPTS
    if relay == "native":
        log.info("TCP relay: native%s", f" ({SOCKOPTS_ENV}={tuned})" if tuned.strip() else "")
    else:
        log.info("TCP relay: python (%s)", unavailable() or f"${RELAY_ENV}=python")


def run_daemon(specs: list[ForwardSpec], options: DaemonOptions, stops: StopSignals) -> int:
    """Open every forward (errors first), then run until a signal or --exit-with."""
    if options.ready_fd is not None:  # a bad fd is reported before anything listens
        from nsbridge.linux.lifetime import check_ready_fd

        check_ready_fd(options.ready_fd)
    _choose_relay(options.relay)
    supervisor = Supervisor(options.workers, options.mover, options.drain,  # type: ignore[arg-type]
                            accept=options.accept)
    control: ControlServer | None = None
    try:
        for spec in specs:
            supervisor.add(spec)
        if options.control:
            control = ControlServer(supervisor.loop, options.control,
                                    lambda request: handle_request(supervisor, request, options))
            log.info("control socket at %s", options.control)
        if options.exit_with:
            from nsbridge.linux.lifetime import open_exit_with

            pidfd = open_exit_with(options.exit_with)
            supervisor.loop.add(pidfd, IN, lambda _e: _watched_process_exited(supervisor))
        _announce_ready(options)
        return supervisor.run(stops)
    finally:
        if control is not None:
            control.close()
        _notify("STOPPING=1")
        supervisor.close()


def _watched_process_exited(supervisor: Supervisor) -> None:
    log.info("the process given to --exit-with has exited: stopping")
    supervisor.stop()


def _announce_ready(options: DaemonOptions) -> None:
    """Everything listens now: tell whoever waits (a parent via --ready-fd, systemd)."""
    if options.ready_fd is not None:
        from nsbridge.linux.lifetime import write_ready

        write_ready(options.ready_fd)
    _notify("READY=1")


def _notify(state: str) -> None:
    """Tell systemd (Type=notify); a broken NOTIFY_SOCKET is logged, never fatal."""
    if os.environ.get("NOTIFY_SOCKET"):
        from nsbridge.linux.systemd import notify

        try:
            notify(state)
        except UserError as exc:
            log.warning("%s", exc)


def handle_request(supervisor: Supervisor, request: dict[str, Any],
                   options: DaemonOptions) -> dict[str, Any]:
    """Answer one control request (raises UserError for a bad one)."""
    cmd = request.get("cmd")
    if cmd == "list":
        return {"ok": True, "forwards": supervisor.describe()}
    if cmd == "stats":
        return {"ok": True, "stats": supervisor.stats()}
    if cmd == "add":
        supervisor.add(spec_from_mapping(request, defaults=options.defaults, where="add",
                                         allowed=_ADD_KEYS, allow_fds=False))
        return {"ok": True}
    if cmd == "remove":
        name = request.get("name")
        if not isinstance(name, str) or not name:
            raise UserError("remove: give the forward's \"name\"")
        kill = request.get("kill", False)
        if not isinstance(kill, bool):
            raise UserError("remove: \"kill\" must be true or false")
        supervisor.remove(name, kill=kill)
        return {"ok": True}
    raise UserError(f"unknown command {cmd!r}; expected one of list, stats, add, remove")


def spec_from_mapping(entry: dict[str, Any], *, defaults: dict[str, Any], where: str,
                      allowed: set[str], allow_fds: bool) -> ForwardSpec:
    """A forward from a control request or a config-file table; ``where`` prefixes errors."""
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise FieldError(f"{where}: unknown key {unknown[0]!r}; expected "
                         f"{', '.join(sorted(allowed - {'cmd'}))}", unknown[0])
    for key in ("listen", "connect"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise FieldError(f"{where}: \"{key}\" is required: an endpoint such as "
                             "tcp:127.0.0.1:8080", key)
    listen = _endpoint(entry, "listen", where)
    connect = _endpoint(entry, "connect", where)
    if not allow_fds and (listen.kind in ("fd", "systemd") or connect.kind == "fd"):
        raise UserError(f"{where}: fd: and systemd: endpoints cannot be added at run time "
                        "(file descriptors cannot travel in a JSON line)")
    merged = {**defaults, **entry}
    name = merged.get("name", "")
    if not isinstance(name, str):
        raise FieldError(f"{where}: \"name\" must be a string", "name")
    try:
        return _build(listen, connect, name, merged, where)
    except FieldError:
        raise
    except UserError as exc:  # a namespace or fd that cannot be opened: say where
        message = str(exc)
        raise UserError(message if message.startswith(where) else f"{where}: {message}"
                        ) from None


def _endpoint(entry: dict[str, Any], key: str, where: str) -> Endpoint:
    """Parse ``entry[key]``; the error names where (file and line, or "add") and the key."""
    try:
        return parse_endpoint(entry[key], role=key)
    except UserError as exc:
        raise FieldError(f"{where}: \"{key}\": {exc}", key) from None


def _build(listen: Endpoint, connect: Endpoint, name: str, merged: dict[str, Any],
           where: str) -> ForwardSpec:
    return build_spec(
        listen, connect, name=name,
        connect_timeout=_number(merged, "connect_timeout", where, CONNECT_TIMEOUT) or None,
        allow=_strings(merged, "allow", where), deny=_strings(merged, "deny", where),
        proxy=_proxy(merged, where),
        idle_timeout=_number(merged, "idle_timeout", where, UDP_IDLE_TIMEOUT, minimum=0.001),
        max_flows=int(_number(merged, "max_flows", where, MAX_UDP_FLOWS, minimum=1)),
    )


def _number(entry: dict[str, Any], key: str, where: str, default: float,
            minimum: float = 0.0) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise FieldError(f"{where}: \"{key}\" must be a number >= {minimum:g}, not {value!r}",
                         key)
    return float(value)


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(f"{where}: \"{key}\" must be a list of networks like [\"10.0.0.0/8\"]",
                         key)
    from nsbridge.net.acl import parse_network

    for text in value:  # a bad network is reported here, naming where it was written
        try:
            parse_network(text, what=f"{where}: \"{key}\"")
        except UserError as exc:
            raise FieldError(str(exc), key) from None
    return list(value)


def _proxy(entry: dict[str, Any], where: str) -> str | None:
    value = entry.get("proxy")
    if value not in (None, "v1", "v2"):
        raise FieldError(f"{where}: \"proxy\" must be \"v1\" or \"v2\", not {value!r}", "proxy")
    return value
