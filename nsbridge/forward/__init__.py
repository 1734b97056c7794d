"""Forwarding between namespaces: ``nsbridge forward``/``serve``/``ctl`` and the library.

Modules (the supervisor/worker split is described in docs/architecture.md):

* :mod:`.spec` — what a forward is: listen and connect sides, options (plain classes).
* :mod:`.endpoints` — the endpoint grammar ``KIND:ADDRESS[,OPTION=VALUE]...``.
* :mod:`.options` — what the forward flags mean: specs, worker count, daemon options.
* :mod:`.config` — ``serve``'s TOML file, with file:line errors.
* :mod:`.proxy_protocol` — PROXY protocol v1/v2 headers (sans-IO).
* :mod:`.forward` — one running forward: its listener, accept loop and sessions.
* :mod:`.bridge` — :class:`Bridge`, the library entry point: forwards on one event loop.
* :mod:`.supervisor` — the process you start: listeners, ACL, hand-off to workers, control.
* :mod:`.worker` — the lean worker process (imports only the relay).
* :mod:`.control` — the control socket (JSON lines), server and client.
* :mod:`.daemon` — the control requests applied to a running supervisor.
* :mod:`.control_client` — ``nsbridge ctl``: a request, its reply checked, a table.
* :mod:`.launch` — run forwards: one-shot (``-S``/``-C``) or as a supervised daemon.

The public names below are loaded on first use (PEP 562), so a worker process that
imports :mod:`.worker` does not pay for the rest of the package.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from nsbridge.forward.bridge import Bridge
    from nsbridge.forward.spec import (
        STREAM,
        UDP,
        ConnectAddress,
        ForwardSpec,
        ListenAddress,
        ListenSocket,
        Preaccepted,
        Preconnected,
    )

_EXPORTS = {
    "Bridge": "bridge",
    "ForwardSpec": "spec",
    "ConnectAddress": "spec",
    "ListenAddress": "spec",
    "ListenSocket": "spec",
    "Preaccepted": "spec",
    "Preconnected": "spec",
    "UDP": "spec",
    "STREAM": "spec",
}

__all__ = ["STREAM", "UDP", "Bridge", "ConnectAddress", "ForwardSpec", "ListenAddress",
           "ListenSocket", "Preaccepted", "Preconnected"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nsbridge.forward' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
