"""The sandboxed side of the policy-bypass tests: one attempt, one JSON line.

Run inside ``nsbridge run`` as ``python3 bypass_attempt.py JSON`` (the attempt's kind and
target, built by ``helpers.bypass``), it tries what a sandboxed program could do to reach
what the policy forbids (TCP, UDP, ping, DNS messages over UDP and TCP, hand-made packets
written straight onto the tun device through an AF_PACKET socket: the program is root in
its own user namespace) and prints ``NSB-ATTEMPT {result}``.

Standard library only, independent of nsbridge's code, and cheap to start: every case
starts it once.
"""

from __future__ import annotations

import errno
import json
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


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def attempt_tcp(ip: str, port: int, timeout: float) -> dict[str, Any]:
    """Connect, send, half-close, read: ``data`` only if a server really answered.

    On the redirect path ``connect()`` succeeds against the local listener and the
    denial arrives as a reset, so the exchange is part of the attempt.
    """
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
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
    family = family_of(ip)
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
    sock = socket.socket(family_of(ip), socket.SOCK_RAW,
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
    """The redirect listener's port: the only TCP listener on 0.0.0.0 (or 127.0.0.1) in
    the sandbox (its fd belongs to nsbridge, but the socket lives here and /proc shows
    it)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].startswith(("00000000:", "0100007F:")):
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
    family = family_of(ip)
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
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
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
        ip, spec = spec.get("ip", "127.0.0.1"), {**spec, "port": port}
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


if __name__ == "__main__":
    print("NSB-ATTEMPT " + json.dumps(attempt(json.loads(sys.argv[1]))), flush=True)
