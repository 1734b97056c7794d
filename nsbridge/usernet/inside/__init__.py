"""What is made or runs inside the namespace: set-up helpers and their confinement.

* :mod:`.sandbox` — create (``run``) or enter (``attach``) the namespaces in a forked
  single-threaded helper and hand the fds back.
* :mod:`.confine` — every such helper: non-dumpable, only the fds it needs, empty
  environment; the long-lived one on an empty root.
* :mod:`.netconf` — the tun device, addresses and routes, over netlink.
* :mod:`.nft` — the nftables redirect of the TCP fast path, over netlink.
* :mod:`.nsfactory` — a socket-factory process living inside the sandbox (published
  ports' connect side).
"""
