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
* :mod:`.options` — the one options model of ``run``/``attach`` (CLI and API), checked
  as a whole, and the addresses, policy and set-up built from it.
* :mod:`.network` — :class:`~.network.Network`, the host side of one namespace wired on
  one event loop; the CLI and the API share it.
* :mod:`.runner` — ``run``/``attach`` for the CLI: drive a ``Network`` with signals,
  pass the command's exit status on, print the summary.
* :mod:`.slirp4netns` — ``nsbridge-slirp4netns``'s life cycle: a TAP device in an
  existing namespace, ready and exit fds, slirp4netns's policy.
* :mod:`.slirpsandbox` — its ``--enable-sandbox`` and ``--enable-seccomp``: the serving
  process locks itself down after set-up, before the ready byte.
* :mod:`.api` — the Python API: ``run``, ``attach``, the split form.
* :mod:`.agent` — ``nsbridge seccomp-agent`` for the CLI: socket switching for containers
  that runc or crun hand in (:mod:`.host.seccompagent`).

docs/architecture.md walks through the data paths.
"""
