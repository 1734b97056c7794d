"""Flow decisions: what happens to the first packet of a new UDP or echo flow.

Two paths carry the namespace's UDP and ping: the tun engine (:mod:`.udpflows`,
:mod:`.icmpecho`) and the native relay (:mod:`.flowrelay`, a C thread that asks the
loop thread about each new flow).  Both decide here, with the same code, so a flow is
treated alike whichever path it takes:

1. **Anti-spoofing**: the source must be the namespace's own address (counted as the
   drop "foreign source address" otherwise).  Checked once per new flow; a flow's later
   packets are matched by their addresses, so they carry the same source.
2. **The policy** (:meth:`Policy.decide`): a denial is answered with ICMP
   "administratively prohibited" (:class:`~.replies.Replies`); a UDP flow to the DNS
   address goes to the DNS proxy; echo to the gateway is answered here, the gateway
   being this process, whatever host access says (the policy allows ICMP to the
   gateway unless a deny rule covers it: ``ping 10.0.2.2`` is a user's first check, and
   nothing is dialed for it).
3. **The host socket**, for an allowed flow: a non-blocking UDP socket, or for echo a
   ping socket (``SOCK_DGRAM``/``IPPROTO_ICMP``, no privilege needed when
   ``net.ipv4.ping_group_range`` includes our gid), else (root) a raw socket, else none
   (the request answered "administratively prohibited", counted in
   ``icmp_unavailable``).  Which kind works is probed once per address family and
   remembered.  The socket is ``connect()``-ed to where the policy says to dial; a
   refused connect is told to the namespace as the ICMP unreachable it stands for.
   Before connecting it is bound to the outbound address of its family, if one was
   given (:mod:`.outbound`: the source only; the policy has already decided).

The ``out`` argument of each call says where its answers go (default: the engine's tun;
the native relay passes its own device), and ``open_*`` hand the native relay a bare fd
it then owns.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from nsbridge.errors import errno_name
from nsbridge.usernet.host.dnsproxy import Resolver
from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.replies import ERRNO_KINDS, QUOTE, Replies, TunOutput
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.packetbuild import build_icmp_echo_reply
from nsbridge.usernet.proto.packets import UDP, Parsed, may_send_icmp_error
from nsbridge.usernet.proto.policy import Allow, AllowResolver, Deny, Policy

log = logging.getLogger("nsbridge")

DnsQueryHandler = Callable[[Parsed, UDP, tuple[Resolver, ...] | None], None]


class FlowDecisions:
    """Admits new flows and opens their host sockets (module doc), counting into
    ``stats`` and answering through ``replies``; ``dns_query`` takes a UDP flow's first
    datagram when the policy sends it to the DNS proxy; ``outbound`` the source addresses
    host sockets are bound to."""

    def __init__(self, policy: Policy, addresses: UsernetAddresses, stats: EngineStats,
                 replies: Replies, dns_query: DnsQueryHandler,
                 outbound: OutboundAddresses = NONE) -> None:
        self.policy = policy
        self.outbound = outbound
        self.stats = stats
        self.replies = replies
        self._dns_query = dns_query
        self._gateways = {addresses.gateway.packed, addresses.gateway6.packed}
        # Per address family: None (not tried yet), "ping", "raw" or "none".
        self.icmp_mode: dict[int, str | None] = {4: None, 6: None}

    def source_ok(self, parsed: Parsed) -> bool:
        """Anti-spoofing, once per new flow: the source must be the namespace's."""
        if self.policy.accepts_source(parsed.ip.src):
            return True
        self.stats.drops["foreign source address"] += 1
        return False

    # ---- admission --------------------------------------------------------------------

    def admit_udp(self, parsed: Parsed, udp: UDP, out: TunOutput | None = None) -> Allow | None:
        """Decide the first datagram of a flow: the source check and the policy, a denial
        answered through ``out`` (default: this engine's device), a DNS query answered
        here.  The host address to send to, or None.  Shared with the native relay."""
        if not self.source_ok(parsed):
            return None
        decision = self.policy.decide("udp", parsed.ip.dst, udp.dport)
        if isinstance(decision, Deny):
            self.replies.deny(parsed, decision.reason, out)
            return None
        if isinstance(decision, AllowResolver):
            # the native relay's rules leave DNS to us anyway
            self._dns_query(parsed, udp, decision.targets)
            return None
        return decision

    def admit_echo(self, parsed: Parsed, out: TunOutput | None = None) -> Allow | None:
        """Decide the first echo request of a flow: the source check and the policy,
        answering a denial (ICMP admin-prohibited) and the gateway's own echo through
        ``out`` (default: this engine's device).  The host address to ping, or None when
        nothing more is to be done.  Shared with the native relay, so both paths
        decide alike."""
        write, vnet = out or self.replies.tun
        if not self.source_ok(parsed):
            return None
        decision = self.policy.decide("icmp", parsed.ip.dst, None)
        if isinstance(decision, (Deny, AllowResolver)):
            reason = decision.reason if isinstance(decision, Deny) else "dns"
            self.replies.deny(parsed, reason, out)
            return None
        if parsed.ip.dst in self._gateways:
            # The gateway is us: answer without touching the host's network.
            write(build_icmp_echo_reply(parsed, vnet=vnet))
            self.stats.icmp_echo_replies += 1
            self.stats.icmp_echo_local += 1
            return None
        return decision

    # ---- host sockets -----------------------------------------------------------------

    def udp_socket(self, parsed: Parsed, allow: Allow,
                   out: TunOutput | None = None) -> socket.socket | None:
        """A non-blocking UDP socket connected to an admitted flow's host address, or
        None (counted, and the namespace told through ``out``)."""
        family = socket.AF_INET if allow.host_ip.version == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self.stats.drops[f"udp socket {errno_name(exc.errno)}"] += 1
            return None
        if not self._connect(sock, (str(allow.host_ip), allow.host_port), parsed, "udp", out):
            return None
        self.stats.udp_flows_total += 1
        return sock

    def open_udp_socket(self, parsed: Parsed, allow: Allow, out: TunOutput) -> int:
        """:meth:`udp_socket` for the native relay: a bare fd it then owns, or -1."""
        sock = self.udp_socket(parsed, allow, out)
        return -1 if sock is None else sock.detach()

    def echo_socket(self, parsed: Parsed, allow: Allow, out: TunOutput | None = None,
                    ping_only: bool = False) -> tuple[socket.socket, str] | None:
        """A ping (or raw) socket connected to an admitted flow's host address, and its
        kind; None when none (counted, and the namespace told through ``out``)."""
        made = self._new_echo_socket(allow.host_ip.version)
        if made is None:
            self.stats.icmp_unavailable += 1
            self.replies.deny(parsed, out=out)
            return None
        sock, kind = made
        if ping_only and kind != "ping":
            sock.close()
            self.stats.drops["icmp native relay needs ping sockets"] += 1
            return None
        if not self._connect(sock, (str(allow.host_ip), 0), parsed, "icmp", out):
            return None
        self.stats.icmp_flows_total += 1
        self.stats.icmp_sockets[kind] += 1
        return sock, kind

    def open_ping_socket(self, parsed: Parsed, allow: Allow, out: TunOutput) -> int:
        """The native relay's echo socket: a connected ping socket (raw sockets see every
        ICMP message: those flows stay the engine's) as a bare fd it then owns, or -1."""
        made = self.echo_socket(parsed, allow, out, ping_only=True)
        return -1 if made is None else made[0].detach()

    def _new_echo_socket(self, version: int) -> tuple[socket.socket, str] | None:
        """A ping socket, else (root) a raw one, else None; remembers what works."""
        family, proto = (
            (socket.AF_INET, socket.IPPROTO_ICMP)
            if version == 4
            else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
        )
        mode = self.icmp_mode[version]
        if mode == "none":
            return None
        kinds = {"ping": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW}
        for kind, sock_type in kinds.items():
            if mode is not None and mode != kind:
                continue
            try:
                sock = socket.socket(family, sock_type | socket.SOCK_NONBLOCK, proto)
            except PermissionError:
                continue  # EACCES: gid not in ping_group_range; EPERM: no CAP_NET_RAW
            except OSError as exc:  # EMFILE, IPv6 switched off...: try again next flow
                self.stats.drops[f"icmp socket {errno_name(exc.errno)}"] += 1
                return None
            if mode is None:
                log.debug("icmp echo for IPv%d through %s sockets", version, kind)
            self.icmp_mode[version] = kind
            return sock, kind
        # Nothing permitted.  Remembered (probing costs two syscalls per request); a
        # changed sysctl takes effect for the next engine.
        self.icmp_mode[version] = "none" if mode is None else None
        return None

    def _connect(self, sock: socket.socket, address: tuple[str, int], parsed: Parsed,
                 what: str, out: TunOutput | None = None) -> bool:
        """Connect a new flow's host socket (UDP and ping sockets never block).  On
        failure the socket is closed, the drop counted, and the namespace told what the
        host was told (ICMP unreachable), so its program sees the same error."""
        try:
            self.outbound.bind(sock, address[0])
            sock.connect(address)
        except OSError as exc:
            sock.close()
            self.stats.drops[f"{what} connect {errno_name(exc.errno)}"] += 1
            kind = ERRNO_KINDS.get(exc.errno or 0)
            if kind is not None and may_send_icmp_error(parsed):
                self.replies.unreachable(parsed.packet[:QUOTE], kind, parsed.ip.dst, out)
            return False
        return True
