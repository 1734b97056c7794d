"""Every default nsbridge applies, written once.

The command line, the config file, the control socket and the library API all fall back
to these values; help texts quote them.  Defined here once so that a default cannot
drift between the flag that documents it and the function that applies it.

Plain constants only: worker processes import this module (through relay/udp.py and
spec.py), and each module a worker imports costs it memory.
"""

# ---- forwarding -------------------------------------------------------------------------

#: Seconds a target may take to answer a connect before the client is reset (0 or None:
#: the kernel's own timeout).  Also the usernet TCP paths' dial timeout.
CONNECT_TIMEOUT = 30.0

#: Seconds a UDP flow lives without a datagram before it is forgotten.
UDP_IDLE_TIMEOUT = 60.0

#: UDP flows one forward (or the usernet engine) keeps at most.
MAX_UDP_FLOWS = 4096

#: Worker processes when none are asked for: one per CPU, at most this many.  More
#: rarely pays, since a worker moves data with splice and is seldom the bottleneck.
MAX_DEFAULT_WORKERS = 4

#: Seconds open connections may finish after SIGINT/SIGTERM (0: reset them at once).
DRAIN = 0.0

#: The data mover ("splice" or "copy") and who accepts clients ("auto", "handoff",
#: "reuseport").
MOVER = "splice"
ACCEPT = "auto"

# ---- user-mode networking (slirp4netns's address plan) --------------------------------

#: The tun device ``nsbridge run``/``attach`` create in the namespace.
TUN_IFNAME = "nsb0"

#: The namespace's IPv4 and IPv6 networks (``--cidr`` / ``--cidr6``).
USERNET_CIDR = "10.0.2.0/24"
USERNET_CIDR6 = "fd00::/64"

#: Host numbers inside those networks: the namespace's own address, the gateway (the
#: host) and the DNS forwarder, as slirp4netns derives them from ``--cidr``.
NAMESPACE_HOST = 100
NAMESPACE_HOST6 = 0x100  # ::100, which reads as the IPv4 one
GATEWAY_HOST = 2
DNS_HOST = 3

#: The same addresses for the default networks, spelled out for dataclass defaults and
#: documentation (a test checks they are the hosts above of the networks above).
USERNET_NAMESPACE = "10.0.2.100"
USERNET_GATEWAY = "10.0.2.2"
USERNET_DNS = "10.0.2.3"
USERNET_NAMESPACE6 = "fd00::100"
USERNET_GATEWAY6 = "fd00::2"
USERNET_DNS6 = "fd00::3"

#: The namespace's MTU, and the range accepted for it: IPv6's minimum link MTU (the
#: namespace has IPv6 unless disabled) up to slirp4netns's maximum, which leaves room for
#: headers under the 64 KiB packet limit.
MTU = 65520
MIN_MTU = 1280
MAX_MTU = 65520
