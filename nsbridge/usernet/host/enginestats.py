"""The tun engine's counters: one object every path of the engine counts into.

The UDP flows, the DNS proxy, the ICMP echo flows, the flow decisions shared with the
native relay and the tun reader each count here, so ``stats()`` (and the summary a user
reads when something does not connect) has one flat set of keys whatever module did
the work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class EngineStats:
    """Counters of one engine.  "out" is namespace -> host, "in" the answers.

    ``denied`` is the policy's own counter (the same object as ``policy.denied``), so a
    user reading why something does not connect finds every denial in one place.
    """

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by parse_frame's reason
    unsupported: Counter[str] = field(default_factory=Counter)  # well-formed, not handled
    denied: Counter[str] = field(default_factory=Counter)  # by the policy's reason
    drops: Counter[str] = field(default_factory=Counter)  # accepted, then not delivered
    unreachable_sent: Counter[str] = field(default_factory=Counter)  # ICMP errors, by kind
    udp_flows_active: int = 0
    udp_flows_total: int = 0
    udp_flows_expired: int = 0
    udp_flows_evicted: int = 0
    udp_flows_inbound: int = 0  # published UDP ports' clients (host/inbound.py)
    udp_datagrams_out: int = 0
    udp_datagrams_in: int = 0
    udp_bytes_out: int = 0
    udp_bytes_in: int = 0
    dns_queries: int = 0  # queries to the DNS address, valid or not
    dns_answers: int = 0  # answers relayed from a host resolver
    dns_failures: int = 0  # SERVFAIL sent because no resolver answered
    dns_malformed: int = 0  # dropped by dns.check_query
    dns_refused: Counter[str] = field(default_factory=Counter)  # answered here, by reason
    dns_retries: int = 0  # a resolver failed or timed out and the next one was asked
    icmp_echo_requests: int = 0
    icmp_echo_replies: int = 0  # relayed from the host, or answered for the gateway
    icmp_echo_local: int = 0  # of those, answered by the engine (the gateway)
    icmp_flows_active: int = 0
    icmp_flows_total: int = 0
    icmp_flows_expired: int = 0
    icmp_sockets: Counter[str] = field(default_factory=Counter)  # "ping" / "raw" flows
    icmp_unavailable: int = 0  # neither ping nor raw sockets are permitted
    icmp_errors_in: int = 0  # ICMP errors the namespace sent (ignored)
    tcp_resets: int = 0
    link: Counter[str] = field(default_factory=Counter)  # a TAP's ARP/NDP/DHCP answers (tap.py)
    errors: int = 0  # unexpected exceptions while handling a frame (a bug; logged)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (Counters become dicts)."""
        return {
            f.name: dict(value) if isinstance(value := getattr(self, f.name), Counter) else value
            for f in fields(self)
        }
