"""The host side's data paths: what reads the namespace's traffic and dials for it.

* :mod:`.engine` — the tun engine: reads and writes the tun device, dispatches frames,
  resets stray TCP, sweeps idle flows.
* :mod:`.udpflows` — UDP flows and their host sockets.
* :mod:`.dnsproxy` — DNS queries to the host's resolvers: retries, refusals, SERVFAIL.
* :mod:`.icmpecho` — ICMP echo through ping (or raw) sockets, and the IPv4 fast path.
* :mod:`.flowdecide` — a new flow's decision (source check, policy, the gateway's echo)
  and its host socket; shared by the engine and the native relay.
* :mod:`.replies` — answers to the namespace (ICMP unreachable, prohibited) and where
  they are written.
* :mod:`.enginestats` — the counters every part of the engine counts into.
* :mod:`.redirect` — the TCP fast path: connections redirected by nftables, relayed.
* :mod:`.dnstcp` — DNS over TCP on the fast path, every message checked.
* :mod:`.tuntcp` — the TCP tun path: the host side is the other end of each connection.
* :mod:`.inbound` — published TCP ports that keep the client's address: listeners whose
  clients are dialed into the namespace through the device.
* :mod:`.flowrelay` — the native UDP and ping relay's Python side (``_flowrelay.c``).
* :mod:`.apisocket` — slirp4netns's API socket: ports published and removed at run time.
* :mod:`.outbound` — the source address outbound sockets are bound to
  (``--outbound-addr(6)``): resolved once, asked by every path that dials.
* :mod:`.hostaddrs` — the host's own addresses, kept current from netlink events (what
  host access closes).
* :mod:`.tap` — the engine on a TAP device: Ethernet in and out, ARP, neighbour
  discovery and DHCP answered, IP packets to the engine.
* :mod:`.switcher` — socket switching (``run --bypass``): the program's trapped
  ``connect``/``listen`` answered, allowed TCP moved onto host sockets.
* :mod:`.seccompagent` — ``nsbridge seccomp-agent``: runc's and crun's hand-ins taken,
  checked, and each container's listener served by its own switcher.
"""
