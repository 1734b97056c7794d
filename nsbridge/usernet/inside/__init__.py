"""What is made or runs inside the namespace: set-up helpers and their confinement.

* :mod:`.sandbox` — create (``run``) or enter (``attach``) the namespaces and hand the
  fds back: the public entry points and the handle that owns the result.
* :mod:`.helper` — the forked single-threaded helper every namespace operation runs in,
  and its one report back (JSON + ``SCM_RIGHTS``).
* :mod:`.userns` — ``run``'s new user+network+mount namespaces and the uid/gid maps.
* :mod:`.childsetup` — what ``run``'s helper does inside before it execs the command:
  mounts and resolv.conf, the tun device and netlink, the ``extra`` callback, the exec.
* :mod:`.nstarget` — ``attach``'s target, the user namespace owning it, and the refusal
  to attach to nsbridge's own namespace.
* :mod:`.confine` — every such helper: non-dumpable, only the fds it needs, empty
  environment; the long-lived one on an empty root.
* :mod:`.netconf` — the tun device, addresses and routes, over netlink.
* :mod:`.tapdevice` — the TAP device slirp4netns's callers expect: opened, or created
  and configured (``-c``).
* :mod:`.nft` — the nftables redirect of the TCP fast path, over netlink.
* :mod:`.nsfactory` — a socket-factory process living inside the sandbox (published
  ports' connect side).
"""
