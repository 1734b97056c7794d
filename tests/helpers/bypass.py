"""The policy-bypass harness: attempts from inside ``nsbridge run``, end to end, one case each.

Every case is one attempt a sandboxed program could make to reach what the policy
forbids: the host's loopback through the gateway (10.0.2.2, fd00::2), 127.0.0.0/8 and
::1 and their IPv4-mapped/compatible/NAT64 spellings, the host namespace's own addresses,
the DNS address on other ports, DNS messages that are not standard queries (UPDATE,
NOTIFY, IQUERY, STATUS, zone transfers, extra records, garbage; over UDP and over TCP,
pipelined and split), a host resolver inside a denied network, denied networks and
ports, port 0, broadcasts, names
that resolve to denied addresses, spoofed sources, and hand-made packets written straight
onto the tun device (an AF_PACKET socket: the sandboxed program is root in its own user
namespace, so it can send packets its kernel would never build).  For each one:

* the attempt fails the way the case says (reset, ICMP "administratively prohibited"
  from the gateway, or the sandbox's own kernel refusing it);
* the host side proves it saw nothing: TCP/UDP servers on every address and port an
  attempt aims at (or could be turned into: 127.0.0.1/::1 behind the gateway, the
  resolver's address), raw ICMP sockets recording every echo request, and the DNS
  server recording every query (over UDP, and over TCP at 127.0.0.1:5353) — none may
  see anything but the expected control traffic;
* the denial is counted: the exact ``denied`` counters (by reason) of the run, read
  through ``nsbridge.usernet.api`` (the only interface that exposes the tun engine's
  counters; it drives the very same Sandbox + network.Network as the CLI), and for TCP
  additionally the ``-v`` log line ``... denied: REASON`` of the ``nsbridge run`` CLI;
* nothing was dialed for a denied flow (no host UDP/ICMP socket, no TCP session), no
  hand-made packet was rejected as malformed (that would test the parser, not the
  policy), and the engine counted no internal error.

Layout: one "host" namespace per test module (servers bound on loopback and on TEST-NET
addresses that exist only there); each case starts its own sandbox inside it.  The
in-sandbox side is ``bypass_attempt.py`` run as a program (stdlib only, independent of
nsbridge's code); the API side is ``bypass_driver.py``, a long-lived program in the host
namespace starting one sandbox per request, so a case costs a sandbox, not a Python
start-up with imports.  This module is the harness: the addresses, policies (presets),
the ``Case`` record and its builders, the host-side sentinels, and the checks; the case
tables live in ``tests/usernet/test_bypass_*.py``, one module per family of cases.

TCP cases run for every mode in ``TCP_MODES``: the nftables fast path and the tun path
(``Case.tun_denied`` holds what a hand-made SYN is denied as on the tun path).
"""

from __future__ import annotations

import json
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers.bypass_attempt import dns_framed, family_of
from helpers.environment import REPO
from helpers.netns import delete_netns, in_netns
from helpers.usernet_host import USERNET_TCP_MODES, new_host_netns

ATTEMPT = str(Path(__file__).with_name("bypass_attempt.py"))
DRIVER = str(Path(__file__).with_name("bypass_driver.py"))

TCP_MODES: list[str] = list(USERNET_TCP_MODES)  # every TCP case runs in each of these

# The host namespace: TEST-NET addresses that exist only there.
HOST_V4, HOST_V6 = "192.0.2.1", "2001:db8::1"  # the host's own: open with host access
DENIED_V4, DENIED_V6 = "198.51.100.1", "2001:db8:1::1"  # in the denied networks
DENIED_NETS = ("198.51.100.0/24", "[2001:db8:1::]/64")
LO_PORT = 7001  # a service only on the host's loopback (127.0.0.1 and ::1)
SVC_PORT = 7002  # the service in the denied networks
OK_PORT = 7003  # the allowed control service on the host's own addresses
LO_DENIED_PORT = 7004  # loopback service denied by rule even with --allow-host-loopback
DENIED_PORT = 2525  # denied on every address by a port rule
DNS_PORT = 5353  # the host resolver, 127.0.0.1
GATEWAY_V4, GATEWAY_V6, DNS_V4, DNS_V6 = "10.0.2.2", "fd00::2", "10.0.2.3", "fd00::3"
# NAT64 prefixes a host's translator might use (nothing translates here: the host
# namespace has no route for them, so an allowed spelling fails at connect)
NAT64_LOCAL_PREFIX, NAT64_PREFIX = "64:ff9b:1::/96", "2001:db8:64::/96"

TCP_SERVERS = [("127.0.0.1", LO_PORT), ("::1", LO_PORT), (DENIED_V4, SVC_PORT),
               (DENIED_V6, SVC_PORT), (HOST_V4, DENIED_PORT), (HOST_V6, DENIED_PORT),
               ("127.0.0.1", LO_DENIED_PORT), ("::1", LO_DENIED_PORT), (HOST_V4, OK_PORT),
               (HOST_V6, OK_PORT), ("127.0.0.1", DNS_PORT)]
UDP_SERVERS = [address for address in TCP_SERVERS if address[1] != DNS_PORT]

# What the host resolver answers (a name may resolve to a denied address: DNS answers
# are not filtered; the connection is what the policy decides).
NAMES = {
    "denied.bypass.test.": {"A": DENIED_V4, "AAAA": DENIED_V6},
    "gateway.bypass.test.": {"A": GATEWAY_V4, "AAAA": GATEWAY_V6},
    "loopback.bypass.test.": {"A": "127.0.0.1", "AAAA": "::1"},
    "mapped.bypass.test.": {"AAAA": "::ffff:127.0.0.1"},
    "dns.bypass.test.": {"A": HOST_V4},
}
# A second host resolver, inside a denied network (the "dns-resolver-denied" preset).
DENIED_RESOLVER = (DENIED_V4, DNS_PORT)


@dataclass(frozen=True)
class Preset:
    """A policy, given the same way to the CLI (flags) and to the API (keywords)."""

    deny: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    allow_host_loopback: bool = False
    allow_host_access: bool = False  # the same switch by its new name
    nat64_prefix: tuple[str, ...] = ()
    relay: str | None = None  # None: the default (auto: the native relay in run)
    dns: tuple[str, int] = ("127.0.0.1", DNS_PORT)  # the host resolver

    def api_options(self, mode: str) -> dict[str, Any]:
        options = {"deny": list(self.deny), "allow": list(self.allow),
                   "allow_host_loopback": self.allow_host_loopback,
                   "allow_host_access": self.allow_host_access,
                   "dns": [list(self.dns)], "tcp": mode}
        if self.nat64_prefix:
            options["nat64_prefix"] = list(self.nat64_prefix)
        if self.relay is not None:
            options["relay"] = self.relay
        return options

    def cli_args(self, mode: str) -> list[str]:
        args = ["--tcp", mode, "--dns", _shown(self.dns)]
        args += [f"--deny={rule}" for rule in self.deny]
        args += [f"--allow={rule}" for rule in self.allow]
        args += [f"--nat64-prefix={prefix}" for prefix in self.nat64_prefix]
        args += [] if self.relay is None else [f"--relay={self.relay}"]
        args += ["--allow-host-access"] if self.allow_host_access else []
        return args + (["--allow-host-loopback"] if self.allow_host_loopback else [])


PRESETS = {
    # host loopback off (the default); a denied network per family; a port denied on
    # every address (no protocol given: TCP and UDP, and - since a port rule cannot
    # match ICMP - ping to those addresses still works, which the control case checks).
    "default": Preset(deny=(*DENIED_NETS, f"0.0.0.0/0:{DENIED_PORT}", f"[::]/0:{DENIED_PORT}")),
    # the same rules with host access on: the host's own addresses (HOST_V4, HOST_V6)
    # are the allowed destinations of the control cases
    "host-access": Preset(deny=(*DENIED_NETS, f"0.0.0.0/0:{DENIED_PORT}",
                                f"[::]/0:{DENIED_PORT}"), allow_host_access=True),
    # host loopback on, one loopback port denied by rule: the rule must hold for the
    # address actually dialed (127.0.0.1 / ::1), not only for the gateway address.
    "loopback-on": Preset(deny=(f"127.0.0.1:{LO_DENIED_PORT}", f"[::1]:{LO_DENIED_PORT}"),
                          allow_host_loopback=True),
    # an allow list of one port per family: other ports, and ICMP, are not in it.
    "allow-list": Preset(allow=(f"{HOST_V4}:{OK_PORT}", f"[{HOST_V6}]:{OK_PORT}")),
    # -- a rule on one family's gateway or loopback holds for both --
    "loopback-on-v4-rule": Preset(deny=(f"127.0.0.1:{LO_DENIED_PORT}",),
                                  allow_host_loopback=True),
    "loopback-on-v6-rule": Preset(deny=(f"[::1]:{LO_DENIED_PORT}",), allow_host_loopback=True),
    "loopback-on-gateway4-denied": Preset(deny=(GATEWAY_V4,), allow_host_loopback=True),
    # -- IPv6 spellings of IPv4: the host's NAT64 prefixes named --
    "nat64-named": Preset(deny=DENIED_NETS, nat64_prefix=(NAT64_LOCAL_PREFIX, NAT64_PREFIX)),
    # -- a port rule for both families --
    "every-family-port": Preset(deny=(f"tcp:*:{DENIED_PORT}",), allow_host_access=True),
    # -- UDP and ping through the Python engine instead of the native relay --
    "loopback-on-v4-rule-engine": Preset(deny=(f"127.0.0.1:{LO_DENIED_PORT}",),
                                         allow_host_loopback=True, relay="engine"),
    "nat64-named-engine": Preset(deny=DENIED_NETS, nat64_prefix=(NAT64_LOCAL_PREFIX,),
                                 relay="engine"),
    # the only host resolver is in a denied network: the rule holds for DNS too
    "dns-resolver-denied": Preset(deny=DENIED_NETS, dns=DENIED_RESOLVER),
    # a rule on one family's DNS address: the DNS service is one service in both families
    "dns4-address-denied": Preset(deny=("udp:10.0.2.3:53", "tcp:10.0.2.3:53")),
}

TCP_REFUSED = ("ECONNRESET", "ECONNREFUSED", "EPIPE")  # redirect: reset; tun: refused
LOCAL_REFUSED = {"result": "ECONNREFUSED", "stage": "connect"}
ADMIN4 = {"result": "icmp", "icmp": [3, 13], "from": GATEWAY_V4}
ADMIN6 = {"result": "icmp", "icmp": [1, 1], "from": GATEWAY_V6}
NO_ANSWER = {"result": "timeout"}
SHORT = 0.5  # seconds to wait where the right outcome is silence (answers take µs)


@dataclass(frozen=True)
class Case:
    """One attempt and everything that must hold after it.

    ``expect``: fields the in-sandbox result must have (a tuple value: any of those).
    ``denied``: the run's policy denials by reason, exactly (``engine.denied`` is the
    policy's own counter, so it covers TCP, UDP and ICMP).  ``counters``: other exact
    counters (``engine.tcp_resets``, ``engine.drops.<reason>``, ``tcp.connect_failed``;
    ``tcp.*`` only where the fast path exists).  ``dials``: the policy allows it and the
    host side dials (the attempt fails at the target) - otherwise no host socket may be
    made.  ``local``: the sandbox's own kernel keeps it (its own loopback): nsbridge must
    not see it at all.  ``hits``: host-side server records expected (control cases).
    ``names``: queries the host resolver must have answered (DNS is not filtered).
    ``modes``: the TCP modes a trick applies to.  ``tun_denied``: a hand-made TCP packet
    reaches the tun device; the redirect fast path has no TCP handler there and resets it
    (``engine.tcp_resets``), other modes must deny it with this reason.
    ``fast_path_denied``: refusals the fast path makes before the policy is asked (a
    connection made straight to its listener), counted in ``tcp.denied`` only.
    """

    id: str
    attempt: dict[str, Any]
    expect: dict[str, Any]
    denied: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    preset: str = "default"
    dials: bool = False
    local: bool = False
    hits: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    modes: tuple[str, ...] | None = None
    tun_denied: str | None = None
    fast_path_denied: dict[str, int] = field(default_factory=dict)

    @property
    def tcp(self) -> bool:
        kind = self.attempt["kind"]
        return kind in ("tcp", "nft-flush", "redirect-listener", "dns-tcp") or (
            kind == "crafted" and self.attempt["proto"] == "tcp")

    def expected_denied(self, mode: str) -> dict[str, int]:
        if self.tun_denied is not None and mode != "redirect":
            return {self.tun_denied: 1}
        return self.denied

    def expected_counters(self, mode: str) -> dict[str, int]:
        if self.tun_denied is not None:
            return {"engine.tcp_resets": 1} if mode == "redirect" else {}
        return self.counters


def tcp(ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "tcp", "ip": ip, "port": port, **extra}


def udp(ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "udp", "ip": ip, "port": port, **extra}


def ping(ip: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "ping", "ip": ip, **extra}


def crafted(proto: str, ip: str, port: int = 0, **extra: Any) -> dict[str, Any]:
    return {"kind": "crafted", "proto": proto, "ip": ip, "port": port, **extra}


def refused(reason: str) -> dict[str, int]:
    return {reason: 1}


LOOPBACK_OFF = refused("host loopback disabled")
HOST_ADDRESS = refused("host address")
DENY_RULE = refused("deny rule")
DNS_ONLY_53 = refused("dns address: port 53 only")
BROADCAST = refused("broadcast or reserved")
MAPPED = refused("ipv4-mapped address")
TCP_DENIED = {"result": TCP_REFUSED}

# DNS: hand-made messages to the DNS address (see dns_message), and what must follow.
DNS_ID = 0x4242  # dns_message's default id
DNS_RECORD = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)  # A, the question's name
DNS_OPT = b"\x00" + struct.pack("!HHIHHH", 41, 1232, 0, 12, 10, 8) + bytes(8)  # EDNS, a cookie
DNS_TCP_HIT = f"tcp 127.0.0.1:{DNS_PORT}"  # the resolver accepted the relayed connection
TCP_DNS_ENDED = {"result": "eof", "answers": []}  # nothing answered; the connection closed


def dns_udp(ip: str, message: bytes) -> dict[str, Any]:
    return {"kind": "dns-udp", "ip": ip, "hex": message.hex()}


def dns_tcp(*messages: bytes, ip: str = DNS_V4, answers: int = 1, raw: bytes | None = None,
            split: int = 0) -> dict[str, Any]:
    """DNS over TCP: ``messages`` framed and sent at once (pipelined), or ``raw`` bytes;
    ``split``: in pieces of that many bytes instead."""
    data = dns_framed(*messages) if raw is None else raw
    return {"kind": "dns-tcp", "ip": ip, "hex": data.hex(), "answers": answers, "split": split}


def dns_refused(opcode: int, rcode: int) -> dict[str, Any]:
    """nsbridge's own answer: the query's id, opcode and question, the rcode."""
    return {"result": "reply", "id": DNS_ID, "qr": 1, "opcode": opcode, "rcode": rcode,
            "question echoed": True}


def udp_dns_refused(reason: str) -> dict[str, int]:
    return {f"engine.dns_refused.{reason}": 1, "engine.dns_queries": 1}


def tcp_dns_refused(reason: str) -> dict[str, Any]:
    """The connection is allowed (the resolver accepts it) but nothing is relayed."""
    return {"dials": True, "hits": (DNS_TCP_HIT,),
            "counters": {f"tcp.dns_refused.{reason}": 1, "tcp.dns_queries": 0}}

def params(cases: list[Case]) -> list[Any]:
    """The parameters of a case table: TCP cases once per mode and runner (the API for
    counters, the CLI for its log); the others once, through the API (the CLI exposes
    no UDP/ICMP counters)."""
    params = []
    for case in cases:
        if not case.tcp:
            params.append(pytest.param(case, "auto", "api", id=case.id))
            continue
        for mode in TCP_MODES:
            if case.modes is not None and mode not in case.modes:
                continue
            for runner in ("api", "cli"):
                params.append(pytest.param(case, mode, runner, id=f"{case.id}-{mode}-{runner}"))
    return params


# ---- the host side: servers that record whatever reaches them ---------------------------


def _shown(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Sentinels:
    """Every host-side server, on one selector thread: TCP and UDP echo servers on each
    address/port an attempt aims at, raw ICMP sockets that record every echo request
    arriving anywhere in the host namespace, and the DNS server.

    ``hits`` holds what reached a server ("tcp 127.0.0.1:7001", "icmp echo 192.0.2.1");
    ``queries`` what the resolver was asked ("denied.bypass.test. A")."""

    def __init__(self, netns: str) -> None:
        import dns.message
        import dns.rrset

        self._dns_message, self._dns_rrset = dns.message, dns.rrset
        self.hits: list[str] = []
        self.queries: list[str] = []
        self.peers: list[str] = []
        self._streams: dict[socket.socket, bytes] = {}  # DNS over TCP: unparsed bytes
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._settled = threading.Event()
        self._sockets: list[socket.socket] = []
        self._marker, marker = socket.socketpair()
        self._add(marker, self._on_marker, "marker")
        made = in_netns(netns, self._open)
        assert made == len(self._sockets)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _open(self) -> int:
        for host, port in TCP_SERVERS:
            sock = socket.socket(family_of(host), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            self._add(sock, self._on_accept, f"tcp {_shown((host, port))}")
        for host, port in UDP_SERVERS:
            sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
            sock.bind((host, port))
            self._add(sock, self._on_datagram, f"udp {_shown((host, port))}")
        raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._add(raw4, self._on_icmp4, "icmp")
        raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        raw6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self._add(raw6, self._on_icmp6, "icmp6")
        resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        resolver.bind(("127.0.0.1", DNS_PORT))
        self._add(resolver, self._on_dns, "dns")
        denied_resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        denied_resolver.bind(DENIED_RESOLVER)
        self._add(denied_resolver, self._on_dns, "dns")
        denied_stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        denied_stream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        denied_stream.bind(DENIED_RESOLVER)
        denied_stream.listen(64)
        self._add(denied_stream, self._on_accept, f"tcp {_shown(DENIED_RESOLVER)}")
        return len(self._sockets)

    def _add(self, sock: socket.socket, handler: Any, label: str) -> None:
        sock.setblocking(False)
        self._sockets.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, (handler, label))

    def _serve(self) -> None:
        while not self._stop.is_set():
            marked = False
            for key, _events in self._selector.select(timeout=0.1):
                handler, label = key.data
                marked = marked or label == "marker"
                try:
                    handler(key.fileobj, label)
                except OSError:
                    pass
            if marked:  # the whole batch that held the marker is handled
                self._settled.set()

    def _on_marker(self, sock: socket.socket, _label: str) -> None:
        sock.recv(64)

    def _on_accept(self, listener: socket.socket, label: str) -> None:
        conn, peer = listener.accept()
        self.hits.append(label)
        self.peers.append(f"{label} from {_shown(peer)}")
        conn.setblocking(False)
        # the resolver's port speaks DNS over TCP; every other server echoes
        handler = self._on_dns_stream if label.endswith(f":{DNS_PORT}") else self._on_echo
        self._selector.register(conn, selectors.EVENT_READ, (handler, label))

    def _on_echo(self, conn: socket.socket, _label: str) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.send(data)  # a few bytes: always fits the send buffer
            return
        self._selector.unregister(conn)
        conn.close()

    def _on_datagram(self, sock: socket.socket, label: str) -> None:
        data, peer = sock.recvfrom(65536)
        self.hits.append(label)
        self.peers.append(f"{label} from {_shown(peer)}")
        sock.sendto(data, peer)

    def _on_icmp4(self, sock: socket.socket, _label: str) -> None:
        data = sock.recv(65536)
        header = (data[0] & 0x0F) * 4
        if len(data) > header and data[header] == 8:  # echo request
            self.hits.append(f"icmp echo {socket.inet_ntoa(data[16:20])}")

    def _on_icmp6(self, sock: socket.socket, _label: str) -> None:
        data, ancillary, _flags, _peer = sock.recvmsg(65536, 256)
        if data and data[0] == 128:  # echo request
            dst = next((socket.inet_ntop(socket.AF_INET6, value[:16])
                        for level, kind, value in ancillary
                        if (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)), "?")
            self.hits.append(f"icmp echo {dst}")

    def _on_dns(self, sock: socket.socket, _label: str) -> None:
        data, peer = sock.recvfrom(65536)
        reply = self._dns_reply(data)
        if reply is not None:
            sock.sendto(reply, peer)

    def _dns_reply(self, data: bytes) -> bytes | None:
        """Record what the resolver was asked; the answer (None for garbage)."""
        try:
            query = self._dns_message.from_wire(data)
            question = query.question[0]
        except Exception:
            self.queries.append(f"garbage {data[:40]!r}")
            return None
        name, rdtype = question.name.to_text(), question.rdtype.name
        opcode = query.opcode()
        self.queries.append(f"{name} {rdtype}" if opcode == 0 else f"opcode {opcode} {name}")
        reply = self._dns_message.make_response(query)
        address = NAMES.get(name, {}).get(rdtype)
        if address is not None:
            reply.answer.append(self._dns_rrset.from_text(name, 60, "IN", rdtype, address))
        elif name not in NAMES:
            reply.set_rcode(3)  # NXDOMAIN
        return reply.to_wire()  # type: ignore[no-any-return]

    def _on_dns_stream(self, conn: socket.socket, _label: str) -> None:
        """DNS over TCP: record and answer each length-prefixed message; whatever else
        arrives (an incomplete message at the end) is recorded as garbage."""
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer = self._streams.get(conn, b"") + data
        while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
            end = 2 + struct.unpack_from("!H", buffer)[0]
            reply = self._dns_reply(buffer[2:end])
            buffer = buffer[end:]
            if reply is not None:
                conn.send(struct.pack("!H", len(reply)) + reply)  # small: always fits
        self._streams[conn] = buffer
        if data:
            return
        if self._streams.pop(conn):
            self.queries.append(f"garbage {buffer[:40]!r}")
        self._selector.unregister(conn)
        conn.close()

    def reset(self) -> None:
        self.hits.clear()
        self.queries.clear()
        self.peers.clear()

    def settle(self) -> None:
        """Wait until everything already queued on the servers' sockets is recorded.

        Called once the run is over: whatever nsbridge sent to a host server is in that
        server's socket by then (loopback delivery and the TCP handshake complete in
        the sender's system call), so it is ready in the same selector batch as a marker
        sent now, or an earlier one."""
        self._settled.clear()
        self._marker.send(b".")
        assert self._settled.wait(10), "the server thread is stuck"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._marker.close()


@dataclass
class Environment:
    """The module's host namespace, its servers and the API driver running in it."""

    host: str
    sentinels: Sentinels
    driver: subprocess.Popen
    driver_log: Path

    def run_api(self, case: Case, mode: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """(attempt result, counters, log) of the case run through ``api.run``."""
        request = {"command": [sys.executable, ATTEMPT, json.dumps(case.attempt)],
                   "options": PRESETS[case.preset].api_options(mode)}
        assert self.driver.stdin is not None and self.driver.stdout is not None
        self.driver.stdin.write(json.dumps(request) + "\n")
        self.driver.stdin.flush()
        ready, _, _ = select.select([self.driver.stdout], [], [], 60)
        line = self.driver.stdout.readline() if ready else ""
        assert line, f"the API driver did not answer:\n{self.driver_log.read_text()[-3000:]}"
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        assert reply["code"] == 0, (reply, self.driver_log.read_text()[-3000:])
        return _attempt_result(reply["output"]), reply["stats"], ""

    def run_cli(self, case: Case, mode: str) -> tuple[dict[str, Any], None, str]:
        """(attempt result, None, stderr) of the case run through ``nsbridge run -v``."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.host, sys.executable, "-m", "nsbridge", "run", "-v",
             *PRESETS[case.preset].cli_args(mode), "--", sys.executable, ATTEMPT,
             json.dumps(case.attempt)],
            capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        return _attempt_result(done.stdout), None, done.stderr


def _attempt_result(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("NSB-ATTEMPT "):
            return json.loads(line[len("NSB-ATTEMPT "):])  # type: ignore[no-any-return]
    raise AssertionError(f"the attempt printed no result: {output!r}")


@contextmanager
def bypass_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """A host namespace with lo and d0 (192.0.2.1/24, 198.51.100.1/24, 2001:db8::1/64,
    2001:db8:1::1/64 on a veth pair that stays inside it), every server, and the API
    driver; all removed at the end even when a test fails."""
    pytest.importorskip("dns.message")
    log = tmp_path_factory.mktemp("bypass") / "driver.log"
    sentinels: Sentinels | None = None
    driver: subprocess.Popen | None = None
    name = new_host_netns((f"{DENIED_V4}/24", f"{DENIED_V6}/64"), prefix="nsbb")
    try:
        sentinels = Sentinels(name)
        with open(log, "w") as log_file:
            driver = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, DRIVER],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        yield Environment(name, sentinels, driver, log)
    finally:
        if driver is not None:
            assert driver.stdin is not None
            driver.stdin.close()
            try:
                driver.wait(timeout=20)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        if sentinels is not None:
            sentinels.close()
        delete_netns(name)


# ---- checks -----------------------------------------------------------------------------


def _matches(result: dict[str, Any], expect: dict[str, Any]) -> bool:
    for key, wanted in expect.items():
        got = result.get(key)
        if isinstance(wanted, tuple) and got not in wanted:
            return False
        if not isinstance(wanted, tuple) and got != wanted:
            return False
    return True


def _counter(stats: dict[str, Any], path: str) -> int | None:
    """``engine.tcp_resets`` / ``engine.drops.REASON`` / ``tcp.connect_failed``; None
    when the section does not exist (``tcp`` without the fast path)."""
    section, _, rest = path.partition(".")
    value: Any = stats.get(section)
    if value is None:
        return None
    name, _, key = rest.partition(".")
    value = value[name]
    return int(value.get(key, 0)) if key else int(value)


def check_counters(case: Case, mode: str, stats: dict[str, Any]) -> None:
    engine, tcp_stats = stats["engine"], stats["tcp"]
    what = f"counters: engine {engine}, tcp {tcp_stats}"
    assert engine["denied"] == case.expected_denied(mode), what
    assert engine["errors"] == 0, what
    assert engine["malformed"] == {}, what  # a hand-made packet must reach the policy
    for path, wanted in case.expected_counters(mode).items():
        got = _counter(stats, path)
        assert got is None or got == wanted, f"{path} = {got}, not {wanted}; {what}"
    if tcp_stats is not None and case.tcp and case.tun_denied is None:
        # the fast path counts its own denials too (the same reasons)
        assert tcp_stats["denied"] == {**case.expected_denied(mode),
                                       **case.fast_path_denied}, what
    if case.local:
        assert engine["tcp_resets"] == 0 and engine["icmp_echo_requests"] == 0, what
        assert tcp_stats is None or tcp_stats["accepted"] == 0, what
    if not case.dials:  # a denied flow: no host socket of any kind was made for it
        assert engine["udp_flows_total"] == 0 and engine["icmp_flows_total"] == 0, what
        if tcp_stats is not None:
            dialed = (tcp_stats["active"] + tcp_stats["closed"] + tcp_stats["reset"]
                      + tcp_stats["connect_failed"])
            assert dialed == 0, what
    if case.names:  # answered over UDP by the engine, or relayed over TCP
        answered = engine["dns_answers"] + (tcp_stats or {}).get("dns_queries", 0)
        assert answered >= len(case.names), what
    elif "engine.dns_queries" not in case.counters:
        assert engine["dns_queries"] == 0, what


def check_log(case: Case, mode: str, result: dict[str, Any], log: str) -> None:
    """``nsbridge run -v``: one "denied: REASON" line per TCP denial, naming the
    sandbox's source port; none for what was not denied."""
    denials = [line for line in log.splitlines() if " denied: " in line]
    wanted = {} if case.tun_denied is not None and mode == "redirect" \
        else {**case.expected_denied(mode), **case.fast_path_denied}
    assert Counter(line.rsplit(" denied: ", 1)[1] for line in denials) == Counter(wanted), log
    if denials and result.get("port"):
        assert all(f":{result['port']} -> " in line for line in denials), log
    assert "Traceback" not in log, log


def run_case(bypass: Environment, case: Case, mode: str, runner: str) -> None:
    """The attempt fails as expected, no host server saw anything, and the denial is
    counted (API counters, or the CLI's -v log for TCP)."""
    bypass.sentinels.reset()
    if runner == "api":
        result, stats, log = bypass.run_api(case, mode)
    else:
        result, stats, log = bypass.run_cli(case, mode)
    bypass.sentinels.settle()
    assert _matches(result, case.expect), f"attempt result {result}, expected {case.expect}"
    assert sorted(bypass.sentinels.hits) == sorted(case.hits), (
        f"host servers saw {bypass.sentinels.peers or bypass.sentinels.hits}")
    assert set(bypass.sentinels.queries) == set(case.names), (  # a resolver may retry
        f"host resolver was asked {bypass.sentinels.queries}")
    if stats is not None:
        check_counters(case, mode, stats)
    else:
        check_log(case, mode, result, log)


# A port rule for one family, with IPv6 on: the warning printed at start.
SINGLE_FAMILY_WARNING = (f"deny tcp:0.0.0.0/0:{DENIED_PORT} covers IPv4 only: IPv6 flows to "
                         f"those ports are not denied by it; write tcp:*:{DENIED_PORT} for both "
                         "families")
