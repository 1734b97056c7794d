"""Sans-IO: bytes and values in, decisions and bytes out; no sockets, no devices.

* :mod:`.checksum` — the Internet checksum and the pseudo-header sum (RFC 1071).
* :mod:`.packets` — tun frames (virtio-net header, IPv4/IPv6, UDP/TCP/ICMP) parsed into
  values; never raises on what the namespace sends.
* :mod:`.packetbuild` — reply frames built from those values: UDP, TCP heads and resets,
  ICMP echo and errors, checksums filled in or left to the kernel.
* :mod:`.tcpstate` — the tun path's TCP end (one connection's state machine).
* :mod:`.dns` — resolv.conf, which DNS messages may reach the host's resolvers, and the
  length-prefixed DNS-over-TCP stream checker.
* :mod:`.addresses` — the virtual network's addresses (gateway, DNS, namespace, networks,
  MTU): the one model the policy, the engine and the namespace set-up share.
* :mod:`.spellings` — IPv6 spellings of IPv4 addresses (mapped, SIIT, NAT64, 6to4, Teredo).
* :mod:`.rules` — the allow/deny rules, parsed and matched.
* :mod:`.policy` — the firewall deciding every flow.
* :mod:`.exclude` — ``--bypass-exclude`` rules: the allowed connects socket switching
  leaves on the namespace's path.
* :mod:`.hostaccess` — the host's own addresses closed unless allowed (the policy's
  last step).
* :mod:`.publish` — ``-p [HOSTIP:]HOSTPORT:NSPORT[/tcp|/udp]``.
* :mod:`.inboundaddr` — a published port's client as the namespace sees it (loopback as
  the gateway, others as themselves) and the guest addresses a port may dial.
* :mod:`.slirpapi` — slirp4netns's API socket protocol (``add_hostfwd``, ``list_hostfwd``,
  ``remove_hostfwd``) and the parson-compatible JSON reader it needs.
* :mod:`.ethernet` — Ethernet II headers and the host side's MAC (a TAP's frames).
* :mod:`.arp` — ARP answers for the gateway and DNS addresses on a TAP.
* :mod:`.ndp` — IPv6 neighbour discovery on a TAP: router advertisements (SLAAC) and
  neighbour advertisements for the router, gateway and DNS addresses.
* :mod:`.dhcp` — the DHCPv4 server a TAP guest may ask (slirp4netns's address plan).
* :mod:`.ocistate` — the OCI seccomp agent's message (a runtime's container process
  state), parsed and checked as the untrusted input it is.
* :mod:`.ociprofile` — the ``linux.seccomp`` section of a container handed to the agent.
"""
