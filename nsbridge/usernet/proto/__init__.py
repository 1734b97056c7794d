"""Sans-IO: bytes and values in, decisions and bytes out; no sockets, no devices.

* :mod:`.packets` — tun frames (virtio-net header, IPv4/IPv6, UDP/TCP/ICMP) parsed into
  values and built back, Internet checksums; never raises on what the namespace sends.
* :mod:`.tcpstate` — the tun path's TCP end (one connection's state machine).
* :mod:`.dns` — resolv.conf, which DNS messages may reach the host's resolvers, and the
  length-prefixed DNS-over-TCP stream checker.
* :mod:`.policy` — the virtual network's addresses and the firewall deciding every flow.
* :mod:`.hostaccess` — the host's own addresses closed unless allowed (the policy's
  last step).
* :mod:`.publish` — ``-p [HOSTIP:]HOSTPORT:NSPORT[/tcp|/udp]``.
"""
