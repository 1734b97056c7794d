"""Addresses, sockets and where sockets are made.

* :mod:`.addresses` — ``HOST:PORT`` parsing and resolution inside a namespace.
* :mod:`.sockets` — inherited fds, listeners, Unix socket files.
* :mod:`.factory` — a socket factory per namespace: a thread parked in it that makes
  sockets there (a socket belongs forever to the namespace it was created in).
* :mod:`.acl` — client allow/deny networks.

Nothing here imports :mod:`nsbridge.relay`, :mod:`nsbridge.forward`,
:mod:`nsbridge.usernet` or :mod:`nsbridge.cli` (tests/test_layout.py checks).
"""
