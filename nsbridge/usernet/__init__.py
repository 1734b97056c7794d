"""User-mode networking: the host side of ``nsbridge run`` / ``nsbridge attach``.

A namespace created without root gets a tun device as its default route.  The host
side reads IP packets from it and answers them with host sockets: UDP flows, DNS at
the resolver address, ICMP echo through ping sockets and (later) TCP.  This package
is split so that everything that *decides* is separate from everything that *does*:

* :mod:`.packets` — sans-IO: parse a tun frame (virtio_net_hdr + IPv4/IPv6 + UDP,
  TCP, ICMP) into values, build reply frames, Internet checksums.  Bytes in, values
  out; never raises on what the namespace sends.
* :mod:`.policy` — sans-IO: the addresses of the virtual network and the firewall
  that decides every new flow (allow and where to dial, or deny and why).
* :mod:`.dns` — sans-IO: the host's resolvers from ``resolv.conf`` text, which DNS
  messages may reach them (standard queries only, over UDP and TCP's framing), the
  answers nsbridge gives itself (SERVFAIL, NOTIMP, REFUSED, FORMERR).
* :mod:`.netconf` — the virtual network's configuration (interface name, MTU,
  addresses), validated before anything is created.
* :mod:`.engine` — the tun engine: UDP flows, DNS, ICMP echo, resets for stray TCP.
* :mod:`.nft`, :mod:`.redirect` — the TCP fast path: nftables REDIRECT (programmed over
  netlink) to listeners inside the namespace, original destination from SO_ORIGINAL_DST,
  relayed by the forwarding engine; :mod:`.dnstcp` relays its connections to the DNS
  address instead, checking each message.
* :mod:`.nsfactory` — a socket-factory process living inside the sandbox (published
  ports' connect side).
* :mod:`.publish`, :mod:`.runner` — ``-p`` parsing; ``nsbridge run``/``attach``.
* :mod:`.sandbox` — the part that *does* set-up: a single-threaded child creates (or
  enters) the user+network(+mount) namespaces, opens the tun device there, configures
  it over netlink and hands the fds back.

The event loop that owns the tun fd and the host sockets is a thin driver over these
modules, so the protocol logic is testable with crafted packets and no devices.
"""
