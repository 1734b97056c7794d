"""nsbridge: connect Linux network namespaces.

The library has the same powers as the command line; start with :class:`Bridge`
(forwarding) or :mod:`nsbridge.usernet.api` (user-mode networking).  The packages, lowest
layer first (each package's ``__init__`` is its own map):

* :mod:`.linux` — thin kernel wrappers: namespaces, signals, pidfds, systemd, BPF.
* :mod:`.net` — addresses, sockets, socket factories per namespace, ACLs.
* :mod:`.relay` — the data plane: event loop, TCP sessions and movers, UDP flows.
* :mod:`.forward` — ``forward``/``serve``/``ctl``: specs, endpoints, the supervisor and
  its workers, the control socket.
* :mod:`.usernet` — ``run``/``attach`` and the API: sans-IO protocols, namespace set-up,
  the host side's data paths.
* :mod:`.cli` — the command line (the library never imports it).
* :mod:`.errors` — :class:`UserError` and friends; :mod:`.defaults` — every default once;
  :mod:`.dependencies` — pyroute2's floor.

Names are imported on first use (PEP 562), so a worker process that needs only the
relay does not pay, in resident memory, for everything the package offers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bridge": "forward.bridge",
    "UserError": "errors",
    "ConnectAddress": "forward.spec",
    "ForwardSpec": "forward.spec",
    "ListenAddress": "forward.spec",
    "ListenSocket": "forward.spec",
    "Preaccepted": "forward.spec",
    "Preconnected": "forward.spec",
    "Netns": "linux.netns",
    "parse_host_port": "net.addresses",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nsbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
