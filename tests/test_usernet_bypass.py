"""Policy-bypass attempts from inside ``nsbridge run``, end to end, one test case each.

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
  counters; it drives the very same Sandbox + runner.Network as the CLI), and for TCP
  additionally the ``-v`` log line ``... denied: REASON`` of the ``nsbridge run`` CLI;
* nothing was dialed for a denied flow (no host UDP/ICMP socket, no TCP session), no
  hand-made packet was rejected as malformed (that would test the parser, not the
  policy), and the engine counted no internal error.

Layout: one "host" namespace per module (servers bound on loopback and on TEST-NET
addresses that exist only there); each case starts its own sandbox inside it.  The
in-sandbox side is this file run as a script (``python3 THIS_FILE attempt JSON``, stdlib
only, independent of nsbridge's code); the API side is this file run as a long-lived
driver in the host namespace (``python3 THIS_FILE driver``), one sandbox per request, so
a case costs a sandbox, not a Python start-up with imports.

TCP cases run for every mode in ``TCP_MODES``: the nftables fast path and the tun path
(``Case.tun_denied`` holds what a hand-made SYN is denied as on the tun path).
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any

PROBE = b"nsbridge-bypass-probe\n"
TUN = "nsb0"
NAMESPACE_V4, NAMESPACE_V6 = "10.0.2.100", "fd00::100"

IP_RECVERR = 11  # <linux/in.h>
IPV6_RECVERR = 25  # <linux/in6.h>
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
PACKET_OUTGOING = 4


# ---- the sandbox side: one attempt, one JSON line (stdlib only) -----------------------


def _err(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def attempt_tcp(ip: str, port: int, timeout: float) -> dict[str, Any]:
    """Connect, send, half-close, read: ``data`` only if a server really answered.

    On the redirect path ``connect()`` succeeds against the local listener and the
    denial arrives as a reset, so the exchange is part of the attempt.
    """
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect((ip, port))
        except OSError as exc:
            return {"result": _err(exc), "stage": "connect"}
        local_port = sock.getsockname()[1]
        try:
            sock.sendall(PROBE)
            sock.shutdown(socket.SHUT_WR)
            data = sock.recv(1024)
        except OSError as exc:
            # A reset that lands between send and shutdown makes shutdown() fail with
            # ENOTCONN; the reset itself is still pending in SO_ERROR.
            pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            result = errno.errorcode.get(pending, str(pending)) if pending else _err(exc)
            return {"result": result, "stage": "exchange", "port": local_port}
        return {"result": "data" if data else "eof", "data": data.decode(errors="replace"),
                "port": local_port}
    finally:
        sock.close()


def _extended_error(ancillary: list[tuple[int, int, bytes]]) -> dict[str, Any]:
    """The ICMP error the kernel queued (IP_RECVERR): errno, type/code, who sent it."""
    for level, kind, data in ancillary:
        if (level, kind) not in ((socket.SOL_IP, IP_RECVERR),
                                 (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            continue
        ee_errno, origin, icmp_type, code = struct.unpack_from("=IBBB", data)
        offender = data[16:]
        family = struct.unpack_from("=H", offender)[0] if len(offender) >= 2 else 0
        who = (socket.inet_ntop(socket.AF_INET, offender[4:8]) if family == socket.AF_INET
               else socket.inet_ntop(socket.AF_INET6, offender[8:24])
               if family == socket.AF_INET6 else None)
        return {"errno": errno.errorcode.get(ee_errno, str(ee_errno)), "origin": origin,
                "icmp": [icmp_type, code], "from": who}
    return {}


def attempt_udp(ip: str, port: int, timeout: float, broadcast: bool = False) -> dict[str, Any]:
    """One datagram; a reply, or the ICMP error the kernel reports for it, or timeout."""
    family = _family(ip)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)  # also IPv4-mapped on an IPv6 socket
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    try:
        try:
            sock.connect((ip, port))
            sock.send(PROBE)
        except OSError as exc:
            return {"result": _err(exc), "stage": "send"}
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                continue
            try:
                _data, ancillary, _flags, _addr = sock.recvmsg(
                    512, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            else:
                return {"result": "icmp", **_extended_error(ancillary)}
            try:
                data = sock.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                return {"result": _err(exc), "stage": "recv"}
            return {"result": "reply", "data": data.decode(errors="replace")}
        return {"result": "timeout"}
    finally:
        sock.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def attempt_ping(ip: str, timeout: float, broadcast: bool = False) -> dict[str, Any]:
    """An echo request from a raw socket (root in the sandbox's own user namespace):
    the reply, or the ICMP error that quotes our echo id."""
    six = ":" in ip
    sock = socket.socket(_family(ip), socket.SOCK_RAW,
                         socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    ident = random.getrandbits(16)
    header = struct.pack("!BBHHH", 128 if six else 8, 0, 0, ident, 1)
    if not six:  # the kernel fills in ICMPv6 checksums of raw sockets, not ICMPv4 ones
        header = header[:2] + struct.pack("!H", _checksum(header + PROBE)) + header[4:]
    try:
        try:
            sock.sendto(header + PROBE, (ip, 0))
        except OSError as exc:
            return {"result": _err(exc), "stage": "send"}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                break
            if not six:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8:
                continue
            kind, code = data[0], data[1]
            if kind == (129 if six else 0) and struct.unpack_from("!H", data, 4)[0] == ident:
                return {"result": "reply", "from": peer[0]}
            if kind == (1 if six else 3) and len(data) > 8:
                inner = data[8:]
                inner = inner[40:] if six else inner[(inner[0] & 0x0F) * 4:]
                if len(inner) >= 6 and struct.unpack_from("!H", inner, 4)[0] == ident:
                    return {"result": "icmp", "icmp": [kind, code], "from": peer[0]}
        return {"result": "timeout"}
    finally:
        sock.close()


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    if ":" in dst:
        return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!IxxxB", length, proto))
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", proto, length)


def _l4_checksummed(src: str, dst: str, proto: int, segment: bytes, offset: int) -> bytes:
    value = _checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == 17 and value == 0:
        value = 0xFFFF  # 0 means "no checksum" in UDP
    return segment[:offset] + struct.pack("!H", value) + segment[offset + 2:]


def craft(proto: str, src: str, dst: str, sport: int, dport: int,
          payload: bytes = PROBE) -> tuple[bytes, int]:
    """A complete, well-formed IP packet (UDP with PROBE, a TCP SYN, or an echo request;
    for ICMP ``sport`` is the echo id) and its IP protocol number."""
    six = ":" in dst
    if proto == "udp":
        number = 17
        segment = _l4_checksummed(src, dst, number, struct.pack(
            "!HHHH", sport, dport, 8 + len(payload), 0) + payload, 6)
    elif proto == "tcp":
        number = 6
        segment = _l4_checksummed(src, dst, number, struct.pack(
            "!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0,
            0), 16)
    elif six:
        number = 58
        segment = _l4_checksummed(src, dst, number, struct.pack(
            "!BBHHH", 128, 0, 0, sport, 1) + PROBE, 2)
    else:
        number = 1
        segment = struct.pack("!BBHHH", 8, 0, 0, sport, 1) + PROBE
        segment = segment[:2] + struct.pack("!H", _checksum(segment)) + segment[4:]
    if six:
        return (struct.pack("!IHBB", 0x60000000, len(segment), number, 64)
                + socket.inet_pton(socket.AF_INET6, src)
                + socket.inet_pton(socket.AF_INET6, dst) + segment), number
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), random.getrandbits(16),
                         0x4000, 64, number, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + segment, number


def _answer(packet: bytes, number: int, sport: int, dport: int) -> dict[str, Any] | None:
    """What an incoming packet says about our hand-made one (None: unrelated)."""
    if len(packet) < 28:
        return None
    six = packet[0] >> 4 == 6
    if six:
        if len(packet) < 48:
            return None
        proto, l4 = packet[6], packet[40:]
        src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
    else:
        proto, l4 = packet[9], packet[(packet[0] & 0x0F) * 4:]
        src = socket.inet_ntop(socket.AF_INET, packet[12:16])
    is_echo = number in (1, 58)
    if proto in (1, 58) and len(l4) >= 8:
        kind, code = l4[0], l4[1]
        if kind == (1 if six else 3) and len(l4) > 8:
            inner = l4[8:]
            inner_l4 = inner[40:] if six else inner[(inner[0] & 0x0F) * 4:]
            ours = (len(inner_l4) >= 6 and struct.unpack_from("!H", inner_l4, 4)[0] == sport
                    if is_echo else
                    len(inner_l4) >= 4 and struct.unpack_from("!HH", inner_l4) == (sport, dport))
            if ours:
                return {"result": "icmp", "icmp": [kind, code], "from": src}
        if kind == (129 if six else 0) and is_echo and struct.unpack_from("!H", l4, 4)[0] == sport:
            return {"result": "reply", "from": src}
        return None
    if proto != number or len(l4) < 14 or struct.unpack_from("!HH", l4) != (dport, sport):
        return None
    if proto == 6:
        return {"result": "rst" if l4[13] & 0x04 else f"tcp flags {l4[13]:#x}", "from": src}
    if dport == 53 and len(l4) >= 20:  # a DNS answer: its header too
        return {"result": "reply", "from": src, "dns": _dns_header(l4[8:])}
    return {"result": "reply", "from": src}


def attempt_crafted(proto: str, dst: str, dport: int, timeout: float,
                    src: str | None = None, payload: bytes = PROBE,
                    via: str = TUN) -> dict[str, Any]:
    """Write a hand-made packet onto the tun device (AF_PACKET), as a hostile program
    can, and watch the device for the answer.  ``via``: write it onto that device
    instead (the native relay's ``nsb-relay``, where it exists; answers still come on
    the tun device)."""
    src = src or (NAMESPACE_V6 if ":" in dst else NAMESPACE_V4)
    sport = random.randint(20000, 60000)
    packet, number = craft(proto, src, dst, sport, dport, payload)
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
    try:
        rx.bind((TUN, ETH_P_ALL))
        kind = ETH_P_IPV6 if ":" in dst else ETH_P_IP
        try:
            tx.sendto(packet, (via, kind))
        except OSError:  # no such device (the native relay is not built): the tun device
            tx.sendto(packet, (TUN, kind))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            rx.settimeout(left)
            try:
                data, address = rx.recvfrom(1 << 16)
            except TimeoutError:
                break
            if address[2] != PACKET_OUTGOING:
                found = _answer(data, number, sport, dport)
                if found is not None:
                    return found
        return {"result": "timeout"}
    finally:
        rx.close()
        tx.close()


def redirect_listener_port() -> int | None:
    """The redirect listener's port: the only TCP listener on 127.0.0.1 in the sandbox
    (its fd belongs to nsbridge, but the socket lives here and /proc shows it)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].startswith("0100007F:"):
                return int(fields[1].split(":")[1], 16)
    return None


def dns_message(name: str = "dns.bypass.test.", qtype: int = 1, *, opcode: int = 0,
                flags: int = 0x0100, ident: int = 0x4242, an: int = 0, ar: int = 0,
                extra: bytes = b"") -> bytes:
    """A DNS message built by hand (the sandbox side has no dnspython): one question,
    the counts given, ``extra`` (records, or trailing bytes) after it."""
    labels = b"".join(bytes([len(part)]) + part.encode()
                      for part in name.rstrip(".").split(".")) + b"\0"
    return (struct.pack("!HHHHHH", ident, flags | opcode << 11, 1, an, 0, ar) + labels
            + struct.pack("!HH", qtype, 1) + extra)


def dns_framed(*messages: bytes) -> bytes:
    """DNS over TCP: each message after its two-byte length."""
    return b"".join(struct.pack("!H", len(message)) + message for message in messages)


def _dns_header(data: bytes) -> dict[str, Any]:
    ident, flags = struct.unpack_from("!HH", data)
    return {"id": ident, "qr": flags >> 15, "opcode": (flags >> 11) & 0xF, "rcode": flags & 0xF}


def attempt_dns_udp(ip: str, message: bytes, timeout: float) -> dict[str, Any]:
    """One DNS message to the DNS address over UDP: the answer's header, or the ICMP
    error the kernel reports, or timeout."""
    family = _family(ip)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, 53))
        sock.send(message)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return {"result": "timeout"}
        except OSError:
            _data, ancillary, _flags, _addr = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            return {"result": "icmp", **_extended_error(ancillary)}
        if len(data) < 12:
            return {"result": "short reply"}
        return {"result": "reply", **_dns_header(data),
                "question echoed": data[12:] == message[12:12 + len(data) - 12]}
    finally:
        sock.close()


def attempt_dns_tcp(ip: str, data: bytes, wanted: int, timeout: float,
                    split: int = 0) -> dict[str, Any]:
    """DNS over TCP to the DNS address: send ``data`` (framed messages, or garbage) at
    once, or ``split`` bytes at a time (separate segments: TCP_NODELAY and a pause), then
    read answers until ``wanted`` came ("answered"), or the connection ends ("eof", a
    reset), or time runs out; the answers as [id, rcode]."""
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    answers: list[list[int]] = []
    try:
        try:
            sock.connect((ip, 53))
        except OSError as exc:
            return {"result": _err(exc), "stage": "connect"}
        result: dict[str, Any] = {"port": sock.getsockname()[1], "answers": answers}
        received = b""
        try:
            for start in range(0, len(data), split or len(data)):
                sock.sendall(data[start:start + (split or len(data))])
                if split:
                    time.sleep(0.02)
            while len(answers) < wanted:
                while len(received) >= 2 and len(received) >= 2 + struct.unpack_from(
                        "!H", received)[0]:
                    end = 2 + struct.unpack_from("!H", received)[0]
                    header = _dns_header(received[2:end])
                    answers.append([header["id"], header["rcode"]])
                    received = received[end:]
                if len(answers) >= wanted:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    return {**result, "result": "eof"}
                received += chunk
        except OSError as exc:
            return {**result, "result": _err(exc), "stage": "exchange"}
        return {**result, "result": "answered"}
    finally:
        sock.close()


def attempt(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the attempt ``spec`` describes (see ``Case.attempt``)."""
    kind, timeout = spec["kind"], spec.get("timeout", 3.0)
    result: dict[str, Any] = {}
    ip = spec.get("ip", "")
    if "name" in spec:  # resolved through /etc/resolv.conf: 10.0.2.3, the host resolver
        family = socket.AF_INET6 if spec.get("v6") else socket.AF_INET
        try:
            ip = socket.getaddrinfo(spec["name"], None, family, socket.SOCK_STREAM)[0][4][0]
        except socket.gaierror as exc:
            return {"result": f"gaierror {exc.errno}"}
        result["resolved"] = ip
    if kind == "nft-flush":  # remove the fast path's redirect, then dial
        done = subprocess.run(["nft", "delete", "table", "inet", "nsbridge"],
                              capture_output=True, text=True)
        result["nft"] = done.returncode
        kind = "tcp"
    if kind == "redirect-listener":
        port = redirect_listener_port()
        if port is None:
            return {"result": "no redirect listener"}
        ip, spec = "127.0.0.1", {**spec, "port": port}
        kind = "tcp"
    if kind == "tcp":
        result.update(attempt_tcp(ip, spec["port"], timeout))
    elif kind == "udp":
        result.update(attempt_udp(ip, spec["port"], timeout, spec.get("broadcast", False)))
    elif kind == "ping":
        result.update(attempt_ping(ip, timeout, spec.get("broadcast", False)))
    elif kind == "crafted":
        result.update(attempt_crafted(spec["proto"], ip, spec.get("port", 0), timeout,
                                      spec.get("src"), bytes.fromhex(spec.get("hex", "")) or PROBE,
                                      spec.get("via", TUN)))
    elif kind == "dns-udp":
        result.update(attempt_dns_udp(ip, bytes.fromhex(spec["hex"]), timeout))
    elif kind == "dns-tcp":
        result.update(attempt_dns_tcp(ip, bytes.fromhex(spec["hex"]), spec.get("answers", 1),
                                      timeout, spec.get("split", 0)))
    else:
        result["result"] = f"unknown attempt kind {kind!r}"
    return result


# ---- the API driver: runs in the host namespace, one sandbox per request line -----------


def driver_main() -> None:
    """Read ``{"command", "options"}`` lines; answer each with the command's output, exit
    code and the run's counters (``Process.stats()``, read after the command ended)."""
    from nsbridge.usernet import api

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        try:
            proc = api.run(request["command"], stdout=write_end, **request["options"])
        except Exception as exc:
            os.close(read_end)
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        finally:
            os.close(write_end)
        with os.fdopen(read_end) as output:
            text = output.read()
        try:
            code = proc.wait(timeout=60)
            stats = proc.stats()
        finally:
            proc.close()
        print(json.dumps({"code": code, "output": text, "stats": stats,
                          "warnings": proc.warnings}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["attempt"]:
        print("NSB-ATTEMPT " + json.dumps(attempt(json.loads(sys.argv[2]))), flush=True)
    elif sys.argv[1:2] == ["driver"]:
        driver_main()
    raise SystemExit(0)


# ---- the test side ------------------------------------------------------------------------
# (imported only under pytest: the sandbox side above needs nothing but the stdlib, and
# every case starts it, so it must not pay for pytest's import.)

import selectors  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import REPO, USERNET_TCP_MODES, have, in_netns  # noqa: E402

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
    # -- a rule on one family's gateway or loopback holds for both (issue 20, item 2) --
    "loopback-on-v4-rule": Preset(deny=(f"127.0.0.1:{LO_DENIED_PORT}",),
                                  allow_host_loopback=True),
    "loopback-on-v6-rule": Preset(deny=(f"[::1]:{LO_DENIED_PORT}",), allow_host_loopback=True),
    "loopback-on-gateway4-denied": Preset(deny=(GATEWAY_V4,), allow_host_loopback=True),
    # -- IPv6 spellings of IPv4 (item 4): the host's NAT64 prefixes named --
    "nat64-named": Preset(deny=DENIED_NETS, nat64_prefix=(NAT64_LOCAL_PREFIX, NAT64_PREFIX)),
    # -- a port rule for both families (item 5) --
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

CASES: list[Case] = [
    # -- TCP through the gateway, loopback and their spellings --
    Case("tcp-gateway-v4", tcp(GATEWAY_V4, LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-gateway-v6", tcp(GATEWAY_V6, LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-mapped-gateway", tcp(f"::ffff:{GATEWAY_V4}", LO_PORT), TCP_DENIED, LOOPBACK_OFF),
    Case("tcp-loopback-v4", tcp("127.0.0.1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-loopback-127.7.7.7", tcp("127.7.7.7", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-loopback-v6", tcp("::1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-mapped-loopback", tcp("::ffff:127.0.0.1", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-unspecified", tcp("0.0.0.0", LO_PORT), LOCAL_REFUSED, local=True),
    Case("tcp-subnet-broadcast", tcp("10.0.2.255", LO_PORT),
         {"result": "ENETUNREACH", "stage": "connect"}, local=True),
    # the host namespace's own addresses are closed without host access; with it they
    # reach what listens on them, never its loopback
    Case("tcp-host-address-v4", tcp(HOST_V4, OK_PORT), TCP_DENIED, HOST_ADDRESS),
    Case("tcp-host-address-v6", tcp(HOST_V6, OK_PORT), TCP_DENIED, HOST_ADDRESS),
    Case("tcp-host-access-address-v4", tcp(HOST_V4, LO_PORT), TCP_DENIED, dials=True,
         counters={"tcp.connect_failed": 1}, preset="host-access"),
    Case("tcp-host-access-address-v6", tcp(HOST_V6, LO_PORT), TCP_DENIED, dials=True,
         counters={"tcp.connect_failed": 1}, preset="host-access"),
    # -- rules --
    Case("tcp-denied-net-v4", tcp(DENIED_V4, SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-net-v6", tcp(DENIED_V6, SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-mapped-denied-net", tcp(f"::ffff:{DENIED_V4}", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-port-v4", tcp(HOST_V4, DENIED_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-denied-port-v6", tcp(HOST_V6, DENIED_PORT), TCP_DENIED, DENY_RULE),
    Case("tcp-loopback-on-denied-port-v4", tcp(GATEWAY_V4, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on"),
    Case("tcp-loopback-on-denied-port-v6", tcp(GATEWAY_V6, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on"),
    Case("tcp-allow-list-other-port", tcp(HOST_V4, DENIED_PORT), TCP_DENIED,
         refused("not in allow rules"), preset="allow-list"),
    # -- the service addresses and special destinations --
    Case("tcp-dns-address-port-7001", tcp(DNS_V4, LO_PORT), TCP_DENIED, DNS_ONLY_53),
    Case("tcp-dns6-address-port-7001", tcp(DNS_V6, LO_PORT), TCP_DENIED, DNS_ONLY_53),
    Case("tcp-port-0", tcp(HOST_V4, 0), TCP_DENIED, refused("port 0")),
    Case("tcp-namespace-network", tcp("10.0.2.50", LO_PORT), TCP_DENIED,
         refused("namespace network")),
    # -- names resolving to what is denied --
    Case("tcp-name-to-denied-net-v4", {"kind": "tcp", "name": "denied.bypass.test",
                                       "port": SVC_PORT},
         {**TCP_DENIED, "resolved": DENIED_V4}, DENY_RULE, names=("denied.bypass.test. A",)),
    Case("tcp-name-to-denied-net-v6", {"kind": "tcp", "name": "denied.bypass.test",
                                       "port": SVC_PORT, "v6": True},
         {**TCP_DENIED, "resolved": DENIED_V6}, DENY_RULE,
         names=("denied.bypass.test. AAAA",)),
    Case("tcp-name-to-gateway", {"kind": "tcp", "name": "gateway.bypass.test",
                                 "port": LO_PORT},
         {**TCP_DENIED, "resolved": GATEWAY_V4}, LOOPBACK_OFF,
         names=("gateway.bypass.test. A",)),
    Case("tcp-name-to-loopback", {"kind": "tcp", "name": "loopback.bypass.test",
                                  "port": LO_PORT},
         {**LOCAL_REFUSED, "resolved": "127.0.0.1"}, local=True,
         names=("loopback.bypass.test. A",)),
    Case("tcp-name-to-mapped-loopback", {"kind": "tcp", "name": "mapped.bypass.test",
                                         "port": LO_PORT, "v6": True},
         {**LOCAL_REFUSED, "resolved": "::ffff:127.0.0.1"}, local=True,
         names=("mapped.bypass.test. AAAA",)),
    # -- the fast path's own machinery --
    Case("tcp-straight-to-redirect-listener", {"kind": "redirect-listener"}, TCP_DENIED,
         refused("loopback"), modes=("redirect",)),
    Case("tcp-after-deleting-redirect-rules", {"kind": "nft-flush", "ip": GATEWAY_V4,
                                               "port": LO_PORT},
         {"result": "ECONNREFUSED", "nft": 0}, counters={"engine.tcp_resets": 1},
         modes=("redirect",)),
    # -- hand-made TCP packets on the tun device --
    Case("crafted-tcp-syn-loopback", crafted("tcp", "127.0.0.1", LO_PORT), {"result": "rst"},
         tun_denied="loopback"),
    Case("crafted-tcp-syn-mapped-loopback", crafted("tcp", "::ffff:127.0.0.1", LO_PORT),
         {"result": "rst"}, tun_denied="ipv4-mapped address"),
    Case("crafted-tcp-syn-gateway", crafted("tcp", GATEWAY_V4, LO_PORT), {"result": "rst"},
         tun_denied="host loopback disabled"),
    # -- control: an allowed flow works, so the failures above are the policy's --
    Case("control-tcp-v4", tcp(HOST_V4, OK_PORT), {"result": "data", "data": PROBE.decode()},
         dials=True, hits=(f"tcp {HOST_V4}:{OK_PORT}",), preset="host-access"),
    Case("control-tcp-v6", tcp(HOST_V6, OK_PORT), {"result": "data", "data": PROBE.decode()},
         dials=True, hits=(f"tcp [{HOST_V6}]:{OK_PORT}",), preset="host-access"),

    # -- UDP --
    Case("udp-gateway-v4", udp(GATEWAY_V4, LO_PORT), ADMIN4, LOOPBACK_OFF),
    Case("udp-gateway-v6", udp(GATEWAY_V6, LO_PORT), ADMIN6, LOOPBACK_OFF),
    Case("udp-mapped-gateway", udp(f"::ffff:{GATEWAY_V4}", LO_PORT),
         {**ADMIN4, "from": f"::ffff:{GATEWAY_V4}"}, LOOPBACK_OFF),
    Case("udp-loopback-v4", udp("127.0.0.1", LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": "127.0.0.1"}, local=True),
    Case("udp-loopback-v6", udp("::1", LO_PORT),
         {"result": "icmp", "icmp": [1, 4], "from": "::1"}, local=True),
    Case("udp-mapped-loopback", udp("::ffff:127.0.0.1", LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": "::ffff:127.0.0.1"}, local=True),
    Case("udp-host-address-v4", udp(HOST_V4, OK_PORT), ADMIN4, HOST_ADDRESS),
    Case("udp-host-address-v6", udp(HOST_V6, OK_PORT), ADMIN6, HOST_ADDRESS),
    Case("udp-host-access-address-v4", udp(HOST_V4, LO_PORT),
         {"result": "icmp", "icmp": [3, 3], "from": HOST_V4}, dials=True,
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("udp-host-access-address-v6", udp(HOST_V6, LO_PORT),
         {"result": "icmp", "icmp": [1, 4], "from": HOST_V6}, dials=True,
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("udp-denied-net-v4", udp(DENIED_V4, SVC_PORT), ADMIN4, DENY_RULE),
    Case("udp-denied-net-v6", udp(DENIED_V6, SVC_PORT), ADMIN6, DENY_RULE),
    Case("udp-mapped-denied-net", udp(f"::ffff:{DENIED_V4}", SVC_PORT),
         {**ADMIN4, "from": f"::ffff:{GATEWAY_V4}"}, DENY_RULE),
    Case("udp-denied-port-v4", udp(HOST_V4, DENIED_PORT), ADMIN4, DENY_RULE),
    Case("udp-denied-port-v6", udp(HOST_V6, DENIED_PORT), ADMIN6, DENY_RULE),
    Case("udp-loopback-on-denied-port-v4", udp(GATEWAY_V4, LO_DENIED_PORT), ADMIN4, DENY_RULE,
         preset="loopback-on"),
    Case("udp-loopback-on-denied-port-v6", udp(GATEWAY_V6, LO_DENIED_PORT), ADMIN6, DENY_RULE,
         preset="loopback-on"),
    Case("udp-allow-list-other-port", udp(HOST_V4, DENIED_PORT), ADMIN4,
         refused("not in allow rules"), preset="allow-list"),
    Case("udp-dns-address-port-7001", udp(DNS_V4, LO_PORT), ADMIN4, DNS_ONLY_53),
    Case("udp-dns6-address-port-7001", udp(DNS_V6, LO_PORT), ADMIN6, DNS_ONLY_53),
    Case("udp-subnet-broadcast", udp("10.0.2.255", LO_PORT, broadcast=True), ADMIN4, BROADCAST),
    # no ICMP error about a broadcast (RFC 1122): silence, but counted
    Case("udp-limited-broadcast", udp("255.255.255.255", LO_PORT, broadcast=True,
                                      timeout=SHORT), NO_ANSWER, BROADCAST),
    Case("udp-namespace-network", udp("10.0.2.50", LO_PORT), ADMIN4,
         refused("namespace network")),
    Case("udp-name-to-denied-net", {"kind": "udp", "name": "denied.bypass.test",
                                    "port": SVC_PORT},
         {**ADMIN4, "resolved": DENIED_V4}, DENY_RULE, names=("denied.bypass.test. A",)),
    Case("control-udp-v4", udp(HOST_V4, OK_PORT), {"result": "reply", "data": PROBE.decode()},
         dials=True, hits=(f"udp {HOST_V4}:{OK_PORT}",),
         counters={"engine.udp_flows_total": 1}, preset="host-access"),
    Case("control-udp-v6", udp(HOST_V6, OK_PORT), {"result": "reply", "data": PROBE.decode()},
         dials=True, hits=(f"udp [{HOST_V6}]:{OK_PORT}",),
         counters={"engine.udp_flows_total": 1}, preset="host-access"),

    # -- ICMP echo --
    # the gateway answers ping itself, host access off (nothing is dialed)
    Case("ping-gateway-v4", ping(GATEWAY_V4), {"result": "reply", "from": GATEWAY_V4},
         counters={"engine.icmp_echo_local": 1}),
    Case("ping-gateway-v6", ping(GATEWAY_V6), {"result": "reply", "from": GATEWAY_V6},
         counters={"engine.icmp_echo_local": 1}),
    Case("ping-host-address-v4", ping(HOST_V4), ADMIN4, HOST_ADDRESS),
    Case("ping-host-address-v6", ping(HOST_V6), ADMIN6, HOST_ADDRESS),
    Case("ping-dns-address-v4", ping(DNS_V4), ADMIN4, DNS_ONLY_53),
    Case("ping-dns-address-v6", ping(DNS_V6), ADMIN6, DNS_ONLY_53),
    Case("ping-denied-net-v4", ping(DENIED_V4), ADMIN4, DENY_RULE),
    Case("ping-denied-net-v6", ping(DENIED_V6), ADMIN6, DENY_RULE),
    Case("ping-subnet-broadcast", ping("10.0.2.255", broadcast=True), ADMIN4, BROADCAST),
    # a port-scoped allow list says nothing about ICMP: echo is not in it
    Case("ping-allow-list-v4", ping(HOST_V4), ADMIN4, refused("not in allow rules"),
         preset="allow-list"),
    Case("ping-allow-list-v6", ping(HOST_V6), ADMIN6, refused("not in allow rules"),
         preset="allow-list"),
    Case("control-ping-v4", ping(HOST_V4), {"result": "reply", "from": HOST_V4}, dials=True,
         hits=(f"icmp echo {HOST_V4}",), counters={"engine.icmp_flows_total": 1},
         preset="host-access"),
    Case("control-ping-v6", ping(HOST_V6), {"result": "reply", "from": HOST_V6}, dials=True,
         hits=(f"icmp echo {HOST_V6}",), counters={"engine.icmp_flows_total": 1},
         preset="host-access"),

    # -- hand-made UDP/ICMP packets: destinations the sandbox's kernel would never send --
    Case("crafted-udp-loopback-v4", crafted("udp", "127.0.0.1", LO_PORT), ADMIN4,
         refused("loopback")),
    Case("crafted-udp-loopback-v6", crafted("udp", "::1", LO_PORT), ADMIN6, refused("loopback")),
    Case("crafted-udp-mapped-loopback", crafted("udp", "::ffff:127.0.0.1", LO_PORT), ADMIN6,
         MAPPED),
    Case("crafted-udp-mapped-gateway", crafted("udp", f"::ffff:{GATEWAY_V4}", LO_PORT), ADMIN6,
         MAPPED),
    Case("crafted-udp-mapped-denied-net", crafted("udp", f"::ffff:{DENIED_V4}", SVC_PORT),
         ADMIN6, MAPPED),
    Case("crafted-udp-compatible-loopback", crafted("udp", "::127.0.0.1", LO_PORT), ADMIN6,
         refused("ipv4-compatible address")),
    Case("crafted-udp-nat64-loopback", crafted("udp", "64:ff9b::7f00:1", LO_PORT), ADMIN6,
         refused("nat64 of a special address")),
    Case("crafted-udp-unspecified", crafted("udp", "0.0.0.0", LO_PORT), ADMIN4,
         refused("unspecified address")),
    Case("crafted-udp-port-0", crafted("udp", HOST_V4, 0), ADMIN4, refused("port 0")),
    Case("crafted-udp-limited-broadcast", crafted("udp", "255.255.255.255", LO_PORT,
                                                  timeout=SHORT), NO_ANSWER, BROADCAST),
    Case("crafted-icmp-loopback-v4", crafted("icmp", "127.0.0.1"), ADMIN4, refused("loopback")),
    Case("crafted-icmp-mapped-loopback", crafted("icmp", "::ffff:127.0.0.1"), ADMIN6, MAPPED),
    # anti-spoofing: a new flow must come from the namespace's own address; dropped
    # silently (an error would go to the forged source)
    Case("crafted-udp-spoofed-gateway-source",
         crafted("udp", HOST_V4, OK_PORT, src=GATEWAY_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),
    Case("crafted-udp-spoofed-host-source",
         crafted("udp", HOST_V4, OK_PORT, src=HOST_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),
    Case("crafted-icmp-spoofed-dns-source",
         crafted("icmp", HOST_V4, src=DNS_V4, timeout=SHORT), NO_ANSWER,
         counters={"engine.drops.foreign source address": 1}),

    # -- address and port holes (issue 20, items 2, 4, 5) --
    # A rule on one family's loopback or gateway holds for the other family's gateway:
    # the [::1] servers would see an IPv6 gateway flow that slipped past an IPv4 rule.
    Case("tcp-gateway-v6-under-v4-loopback-rule", tcp(GATEWAY_V6, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-v4-rule"),
    Case("udp-gateway-v6-under-v4-loopback-rule", udp(GATEWAY_V6, LO_DENIED_PORT), ADMIN6,
         DENY_RULE, preset="loopback-on-v4-rule"),
    Case("control-tcp-gateway-v6-other-port", tcp(GATEWAY_V6, LO_PORT),
         {"result": "data", "data": PROBE.decode()}, dials=True, hits=(f"tcp [::1]:{LO_PORT}",),
         preset="loopback-on-v4-rule"),
    Case("tcp-gateway-v4-under-v6-loopback-rule", tcp(GATEWAY_V4, LO_DENIED_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-v6-rule"),
    Case("udp-gateway-v4-under-v6-loopback-rule", udp(GATEWAY_V4, LO_DENIED_PORT), ADMIN4,
         DENY_RULE, preset="loopback-on-v6-rule"),
    Case("tcp-gateway-v6-under-gateway-v4-rule", tcp(GATEWAY_V6, LO_PORT), TCP_DENIED,
         DENY_RULE, preset="loopback-on-gateway4-denied"),
    Case("udp-gateway-v6-under-gateway-v4-rule", udp(GATEWAY_V6, LO_PORT), ADMIN6, DENY_RULE,
         preset="loopback-on-gateway4-denied"),
    Case("ping-gateway-v6-under-gateway-v4-rule", ping(GATEWAY_V6), ADMIN6, DENY_RULE,
         preset="loopback-on-gateway4-denied"),
    # IPv6 spellings of a denied IPv4 network (198.51.100.1): decided as that address
    Case("tcp-local-use-nat64-unnamed", tcp("64:ff9b:1::c633:6401", SVC_PORT), TCP_DENIED,
         refused("nat64 prefix not named")),
    Case("tcp-local-use-nat64-denied-net", tcp("64:ff9b:1::c633:6401", SVC_PORT), TCP_DENIED,
         DENY_RULE, preset="nat64-named"),
    Case("udp-local-use-nat64-denied-net", udp("64:ff9b:1::c633:6401", SVC_PORT), ADMIN6,
         DENY_RULE, preset="nat64-named"),
    Case("tcp-named-nat64-denied-net", tcp("2001:db8:64::c633:6401", SVC_PORT), TCP_DENIED,
         DENY_RULE, preset="nat64-named"),
    Case("tcp-6to4-denied-net", tcp("2002:c633:6401::1", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("udp-6to4-denied-net", udp("2002:c633:6401::1", SVC_PORT), ADMIN6, DENY_RULE),
    Case("tcp-siit-denied-net", tcp("::ffff:0:c633:6401", SVC_PORT), TCP_DENIED, DENY_RULE),
    Case("ping-siit-denied-net", ping("::ffff:0:c633:6401"), ADMIN6, DENY_RULE),
    Case("tcp-teredo-client-denied-net", tcp("2001:0:c000:201::39cc:9bfe", SVC_PORT),
         TCP_DENIED, DENY_RULE),
    Case("tcp-nat64-denied-net", tcp("64:ff9b::c633:6401", SVC_PORT), TCP_DENIED, DENY_RULE),
    # ... of 127.0.0.1
    Case("tcp-local-use-nat64-loopback", tcp("64:ff9b:1::7f00:1", LO_PORT), TCP_DENIED,
         refused("nat64 of a special address"), preset="nat64-named"),
    Case("tcp-named-nat64-loopback", tcp("2001:db8:64::7f00:1", LO_PORT), TCP_DENIED,
         refused("nat64 of a special address"), preset="nat64-named"),
    Case("tcp-6to4-loopback", tcp("2002:7f00:1::1", LO_PORT), TCP_DENIED,
         refused("6to4 of a special address")),
    Case("udp-siit-loopback", udp("::ffff:0:7f00:1", LO_PORT), ADMIN6,
         refused("siit of a special address")),
    Case("udp-teredo-client-loopback", udp("2001:0:c000:201::80ff:fffe", LO_PORT), ADMIN6,
         refused("teredo of a special address")),
    Case("crafted-tcp-syn-6to4-loopback", crafted("tcp", "2002:7f00:1::1", LO_PORT),
         {"result": "rst"}, tun_denied="6to4 of a special address"),
    # ... of 169.254.169.254 (cloud metadata) and of the gateway
    Case("tcp-nat64-metadata", tcp("64:ff9b::a9fe:a9fe", 80), TCP_DENIED, refused("link-local")),
    Case("tcp-local-use-nat64-metadata", tcp("64:ff9b:1::a9fe:a9fe", 80), TCP_DENIED,
         refused("link-local"), preset="nat64-named"),
    Case("ping-6to4-metadata", ping("2002:a9fe:a9fe::1"), ADMIN6, refused("link-local")),
    Case("udp-nat64-gateway", udp("64:ff9b::a00:202", LO_PORT), ADMIN6, LOOPBACK_OFF),
    Case("tcp-nat64-dns-address", tcp("64:ff9b::a00:203", 53), TCP_DENIED,
         refused("namespace network")),
    # an allowed spelling is dialed as asked (no translator here: the connect fails)
    Case("tcp-nat64-allowed-spelling-dials", tcp("64:ff9b::c000:201", OK_PORT), TCP_DENIED,
         dials=True, counters={"tcp.connect_failed": 1}, preset="host-access"),
    # ... and a spelling of a host address is that host address
    Case("tcp-nat64-host-address", tcp("64:ff9b::c000:201", OK_PORT), TCP_DENIED,
         HOST_ADDRESS),
    # tcp:*:PORT covers both families; UDP to that port still passes (control)
    Case("tcp-every-family-port-v6", tcp(HOST_V6, DENIED_PORT), TCP_DENIED, DENY_RULE,
         preset="every-family-port"),
    Case("tcp-every-family-port-v4", tcp(HOST_V4, DENIED_PORT), TCP_DENIED, DENY_RULE,
         preset="every-family-port"),
    Case("control-udp-every-family-port-v6", udp(HOST_V6, DENIED_PORT),
         {"result": "reply", "data": PROBE.decode()}, dials=True,
         hits=(f"udp [{HOST_V6}]:{DENIED_PORT}",), counters={"engine.udp_flows_total": 1},
         preset="every-family-port"),
    # the same decisions when the engine, not the native relay, serves UDP and ping
    Case("udp-gateway-v6-under-v4-loopback-rule-engine", udp(GATEWAY_V6, LO_DENIED_PORT),
         ADMIN6, DENY_RULE, preset="loopback-on-v4-rule-engine"),
    Case("udp-local-use-nat64-denied-net-engine", udp("64:ff9b:1::c633:6401", SVC_PORT),
         ADMIN6, DENY_RULE, preset="nat64-named-engine"),
    Case("ping-teredo-server-loopback-engine", ping("2001:0:7f00:1::3fff:fefe"), ADMIN6,
         refused("teredo of a special address"), preset="nat64-named-engine"),
    Case("udp-siit-metadata-engine", udp("::ffff:0:a9fe:a9fe", 53), ADMIN6,
         refused("link-local"), preset="nat64-named-engine"),
    # -- the DNS service relays only standard queries (UDP: answered by nsbridge, never
    #    relayed; TCP: the first bad message ends what is forwarded; the deny rules hold
    #    for the resolver actually dialed) --
    *[Case(f"dns-udp-{name.lower()}", dns_udp(DNS_V4, dns_message(opcode=opcode)),
           dns_refused(opcode, 4), counters=udp_dns_refused(f"opcode {name}"))
      for opcode, name in ((5, "UPDATE"), (4, "NOTIFY"), (1, "IQUERY"), (2, "STATUS"))],
    Case("dns6-udp-update", dns_udp(DNS_V6, dns_message(opcode=5)), dns_refused(5, 4),
         counters=udp_dns_refused("opcode UPDATE")),
    Case("dns-udp-axfr", dns_udp(DNS_V4, dns_message(qtype=252)), dns_refused(0, 5),
         counters=udp_dns_refused("zone transfer")),
    Case("dns-udp-ixfr", dns_udp(DNS_V4, dns_message(qtype=251)), dns_refused(0, 5),
         counters=udp_dns_refused("zone transfer")),
    Case("dns-udp-answer-record", dns_udp(DNS_V4, dns_message(an=1, extra=DNS_RECORD)),
         dns_refused(0, 1), counters=udp_dns_refused("answer or authority records")),
    Case("dns-udp-additional-not-opt", dns_udp(DNS_V4, dns_message(ar=1, extra=DNS_RECORD)),
         dns_refused(0, 1), counters=udp_dns_refused("additional record is not a valid OPT")),
    Case("dns-udp-trailing-bytes", dns_udp(DNS_V4, dns_message(extra=PROBE)),
         dns_refused(0, 1), counters=udp_dns_refused("trailing bytes")),
    Case("dns-udp-resolver-in-denied-net-v4", dns_udp(DNS_V4, dns_message()), ADMIN4,
         DENY_RULE, preset="dns-resolver-denied"),
    Case("dns-udp-resolver-in-denied-net-v6", dns_udp(DNS_V6, dns_message()), ADMIN6,
         DENY_RULE, preset="dns-resolver-denied"),
    Case("control-dns-udp-edns", dns_udp(DNS_V4, dns_message(ar=1, extra=DNS_OPT)),
         {"result": "reply", "id": DNS_ID, "rcode": 0}, names=("dns.bypass.test. A",),
         counters={"engine.dns_queries": 1}),
    Case("dns-tcp-axfr", dns_tcp(dns_message(qtype=252)), TCP_DNS_ENDED,
         **tcp_dns_refused("zone transfer")),
    Case("dns-tcp-update", dns_tcp(dns_message(opcode=5)), TCP_DNS_ENDED,
         **tcp_dns_refused("opcode UPDATE")),
    Case("dns6-tcp-notify", dns_tcp(dns_message(opcode=4), ip=DNS_V6), TCP_DNS_ENDED,
         **tcp_dns_refused("opcode NOTIFY")),
    Case("dns-tcp-garbage-short-length", dns_tcp(raw=b"\x00\x05hello"), TCP_DNS_ENDED,
         **tcp_dns_refused("truncated header")),
    Case("dns-tcp-garbage-response", dns_tcp(b"\xff" * 16), TCP_DNS_ENDED,
         **tcp_dns_refused("not a query")),
    Case("dns-tcp-garbage-allow-list", dns_tcp(PROBE), TCP_DNS_ENDED,
         **tcp_dns_refused("question count is not 1"), preset="allow-list"),
    Case("dns-tcp-pipelined-good-axfr-good",
         dns_tcp(dns_message(ident=1), dns_message(ident=2, qtype=252), dns_message(ident=3),
                 answers=3),
         {"result": "eof", "answers": [[1, 0]]}, dials=True, hits=(DNS_TCP_HIT,),
         names=("dns.bypass.test. A",),
         counters={"tcp.dns_queries": 1, "tcp.dns_refused.zone transfer": 1}),
    Case("dns-tcp-resolver-in-denied-net", dns_tcp(dns_message()), TCP_DENIED, DENY_RULE,
         preset="dns-resolver-denied"),
    Case("dns6-udp-ipv4-dns-address-denied", dns_udp(DNS_V6, dns_message()), ADMIN6,
         DENY_RULE, preset="dns4-address-denied"),
    Case("dns6-tcp-ipv4-dns-address-denied", dns_tcp(dns_message(), ip=DNS_V6), TCP_DENIED,
         DENY_RULE, preset="dns4-address-denied"),
    Case("control-dns-tcp", dns_tcp(dns_message(), dns_message(ident=7, ar=1, extra=DNS_OPT),
                                    answers=2),
         {"result": "answered", "answers": [[DNS_ID, 0], [7, 0]]}, dials=True,
         hits=(DNS_TCP_HIT,), names=("dns.bypass.test. A",), counters={"tcp.dns_queries": 2}),
    # a hand-made UPDATE written onto the native relay's device: the relay leaves DNS to
    # the engine, which answers it there too (and on the tun device itself)
    *[Case(f"crafted-dns-update-{where}", crafted("udp", DNS_V4, 53, hex=dns_message(
              opcode=5).hex(), via=device), {"result": "reply", "from": DNS_V4, "dns": {
              "id": DNS_ID, "qr": 1, "opcode": 5, "rcode": 4}},
           counters=udp_dns_refused("opcode UPDATE"))
      for where, device in (("via-native-relay", "nsb-relay"), ("on-tun", TUN))],
    # messages split across segments (a length prefix cut in two included)
    Case("control-dns6-tcp-split", dns_tcp(dns_message(), dns_message(ident=8), ip=DNS_V6,
                                           answers=2, split=5),
         {"result": "answered", "answers": [[DNS_ID, 0], [8, 0]]}, dials=True,
         hits=(DNS_TCP_HIT,), names=("dns.bypass.test. A",), counters={"tcp.dns_queries": 2}),
    Case("dns-tcp-split-good-then-update",
         dns_tcp(dns_message(), dns_message(ident=9, opcode=5), answers=2, split=7),
         {"result": "eof", "answers": [[DNS_ID, 0]]}, dials=True, hits=(DNS_TCP_HIT,),
         names=("dns.bypass.test. A",),
         counters={"tcp.dns_queries": 1, "tcp.dns_refused.opcode UPDATE": 1}),
]


def _params() -> list[Any]:
    """TCP cases once per mode and runner (the API for counters, the CLI for its log);
    the others once, through the API (the CLI exposes no UDP/ICMP counters)."""
    params = []
    for case in CASES:
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
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            self._add(sock, self._on_accept, f"tcp {_shown((host, port))}")
        for host, port in UDP_SERVERS:
            sock = socket.socket(_family(host), socket.SOCK_DGRAM)
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
        request = {"command": [sys.executable, __file__, "attempt", json.dumps(case.attempt)],
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
             *PRESETS[case.preset].cli_args(mode), "--", sys.executable, __file__, "attempt",
             json.dumps(case.attempt)],
            capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        return _attempt_result(done.stdout), None, done.stderr


def _attempt_result(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("NSB-ATTEMPT "):
            return json.loads(line[len("NSB-ATTEMPT "):])  # type: ignore[no-any-return]
    raise AssertionError(f"the attempt printed no result: {output!r}")


@pytest.fixture(scope="module")
def bypass(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """A host namespace with lo and d0 (192.0.2.1/24, 198.51.100.1/24, 2001:db8::1/64,
    2001:db8:1::1/64 on a veth pair that stays inside it), every server, and the API
    driver; all removed at the end of the module even when a test fails."""
    pytest.importorskip("dns.message")
    name = f"nsbb-{uuid.uuid4().hex[:10]}"
    log = tmp_path_factory.mktemp("bypass") / "driver.log"
    sentinels: Sentinels | None = None
    driver: subprocess.Popen | None = None
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (["link", "set", "lo", "up"],
                     ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                     ["link", "set", "d1", "up"],
                     ["addr", "add", f"{HOST_V4}/24", "dev", "d0"],
                     ["addr", "add", f"{DENIED_V4}/24", "dev", "d0"],
                     ["addr", "add", f"{HOST_V6}/64", "dev", "d0", "nodad"],
                     ["addr", "add", f"{DENIED_V6}/64", "dev", "d0", "nodad"],
                     ["link", "set", "d0", "up"]):
            subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        sentinels = Sentinels(name)
        with open(log, "w") as log_file:
            driver = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, __file__, "driver"],
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
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


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
        assert tcp_stats["denied"] == case.expected_denied(mode), what
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
        else case.expected_denied(mode)
    assert Counter(line.rsplit(" denied: ", 1)[1] for line in denials) == Counter(wanted), log
    if denials and result.get("port"):
        assert all(f":{result['port']} -> " in line for line in denials), log
    assert "Traceback" not in log, log


@pytest.mark.parametrize(("case", "mode", "runner"), _params())
def test_bypass_attempt(bypass: Environment, case: Case, mode: str, runner: str) -> None:
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


# ---- start-up warnings (issue 20, item 5) -------------------------------------------------

SINGLE_FAMILY_WARNING = (f"deny tcp:0.0.0.0/0:{DENIED_PORT} covers IPv4 only: IPv6 flows to "
                         f"those ports are not denied by it; write tcp:*:{DENIED_PORT} for both "
                         "families")


@pytest.mark.parametrize(("deny", "extra", "warned"), [
    (f"tcp:0.0.0.0/0:{DENIED_PORT}", [], True),
    (f"tcp:0.0.0.0/0:{DENIED_PORT}", ["--disable-ipv6"], False),  # no IPv6 flow to miss
    (f"tcp:*:{DENIED_PORT}", [], False),
])
def test_single_family_port_rule_warns_at_start(bypass: Environment, deny: str,
                                                extra: list[str], warned: bool) -> None:
    """A port rule for one family, with IPv6 on: one warning line pointing at ``*``,
    on stderr (CLI, without -v) and in ``Process.warnings`` (API)."""
    done = subprocess.run(
        ["ip", "netns", "exec", bypass.host, sys.executable, "-m", "nsbridge", "run",
         f"--deny={deny}", "--dns", f"127.0.0.1:{DNS_PORT}", *extra, "--", "true"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "covers IPv" in line]
    assert lines == ([f"nsbridge: {SINGLE_FAMILY_WARNING}"] if warned else []), done.stderr
    request = {"command": ["true"], "options": {"deny": [deny], "ipv6": not extra,
                                                "dns": [["127.0.0.1", DNS_PORT]]}}
    assert bypass.driver.stdin is not None and bypass.driver.stdout is not None
    bypass.driver.stdin.write(json.dumps(request) + "\n")
    bypass.driver.stdin.flush()
    ready, _, _ = select.select([bypass.driver.stdout], [], [], 60)
    reply = json.loads(bypass.driver.stdout.readline() if ready else "{}")
    assert reply.get("code") == 0, (reply, bypass.driver_log.read_text()[-3000:])
    found = [line for line in reply["warnings"] if "covers IPv" in line]
    assert found == ([SINGLE_FAMILY_WARNING] if warned else []), reply["warnings"]
def test_dns_refusals_and_denied_resolver_on_the_cli(bypass: Environment) -> None:
    """``nsbridge run -v`` (the table runs UDP cases through the API only): a refused
    query gets one log line and a place in the summary; a deny rule covering the
    resolver is warned about at start and the query is denied like any flow."""
    bypass.sentinels.reset()
    update = Case("cli-dns-udp-update", dns_udp(DNS_V4, dns_message(opcode=5)), dns_refused(5, 4))
    result, _, log = bypass.run_cli(update, "auto")
    assert _matches(result, update.expect), result
    assert "-> 10.0.2.3:53 refused: opcode UPDATE" in log, log
    assert "DNS refused: opcode UPDATE x1" in log and "Traceback" not in log, log
    denied = Case("cli-dns-resolver-denied", dns_udp(DNS_V4, dns_message()), ADMIN4,
                  preset="dns-resolver-denied")
    result, _, log = bypass.run_cli(denied, "auto")
    assert _matches(result, denied.expect), result
    assert (f"DNS resolver {_shown(DENIED_RESOLVER)} is covered by a deny rule: DNS over udp "
            "and tcp is not sent to it") in log, log
    assert "-> 10.0.2.3:53 denied: deny rule" in log and "denials: deny rule x1" in log, log
    bypass.sentinels.settle()
    assert bypass.sentinels.queries == [] and bypass.sentinels.hits == []


@pytest.mark.parametrize("mode", TCP_MODES)
def test_dns_real_clients_pass_the_checks(bypass: Environment, mode: str) -> None:
    """What a real stub sends passes (dig over UDP and over TCP on this TCP path: EDNS
    with a cookie, +dnssec, +nsid, without EDNS, ANY, IPv6), and dig's AXFR does not
    reach the resolver."""
    if not have("dig"):
        pytest.skip("needs dig")
    bypass.sentinels.reset()
    dig = "dig +time=3 +tries=1"
    lines = [f"{dig} +short {options} dns.bypass.test A"
             for options in (f"@{DNS_V4}", f"+tcp @{DNS_V4}", f"+tcp @{DNS_V6}",
                             f"+dnssec +nsid @{DNS_V4}", f"+tcp +dnssec +nsid @{DNS_V4}",
                             f"+noedns @{DNS_V4}")]
    lines += [f"{dig} +tcp @{DNS_V4} dns.bypass.test ANY | grep -o 'status: [A-Z]*'",
              f"{dig} @{DNS_V4} bypass.test AXFR | grep -v '^;' | grep -c . || true"]
    done = subprocess.run(
        ["ip", "netns", "exec", bypass.host, sys.executable, "-m", "nsbridge", "run", "-v",
         *PRESETS["default"].cli_args(mode), "--", "sh", "-c", "; ".join(lines)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    # AXFR: no record printed (dig reports the closed connection in a comment)
    assert done.stdout.split() == [HOST_V4] * 6 + ["status:", "NOERROR", "0"], (
        done.stdout + done.stderr)
    assert "refused: zone transfer" in done.stderr and "Traceback" not in done.stderr
    bypass.sentinels.settle()
    assert set(bypass.sentinels.queries) == {"dns.bypass.test. A", "dns.bypass.test. ANY"}
