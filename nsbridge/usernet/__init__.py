"""User-mode networking: ``nsbridge run`` / ``nsbridge attach`` and the Python API.

A namespace created without root gets a tun device as its default route; TCP takes the
nftables fast path (or the tun path), UDP and ping the tun engine or the native relay,
and a host-side policy decides every new flow.  The package is split by what a module
*is*, so a change has one obvious home:

* :mod:`.proto` — sans-IO: packets, the tun path's TCP state machine, DNS checks, the
  policy, ``-p`` parsing.  Bytes and values in, decisions and bytes out.
* :mod:`.inside` — what is made or runs inside the namespace: the set-up helpers and
  their confinement, the tun device and nftables rules over netlink, the socket factory.
* :mod:`.host` — the host side's data paths: the tun engine, the TCP fast path and tun
  path, DNS over TCP, the native relay.
* :mod:`.options` — ``run``/``attach`` options from the command line (``--dns`` parsing).
* :mod:`.runner` — the wiring shared by the CLI and the API (one ``Network`` per
  namespace), and ``run``/``attach`` for the CLI.
* :mod:`.slirp4netns` — ``nsbridge-slirp4netns``'s life cycle: a TAP device in an
  existing namespace, ready and exit fds, slirp4netns's policy.
* :mod:`.api` — the Python API: ``run``, ``attach``, the split form.

docs/architecture.md walks through the data paths.
"""
