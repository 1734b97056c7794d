"""Tiny DNS server and latency probe for bench/usernet_bench.py (needs dnspython).

    python3 dnsprobe.py serve ADDR PORT          answer every A query with 192.0.2.77
    python3 dnsprobe.py query SERVER PORT COUNT  print JSON {ok, failed, p50_us, p90_us, p99_us}

The server runs in the benchmark's "host" namespace on 127.0.0.1:53; the probe runs
inside the namespace under test against the tool's resolver address (10.0.2.3), and once
in the host namespace against 127.0.0.1:53 directly, so the difference is what the
user-mode networking tool adds.  dig prints whole milliseconds only, hence Python here.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

import dns.message
import dns.rrset

ANSWER = "192.0.2.77"


def serve(addr: str, port: int) -> None:
    """Answer forever, one datagram at a time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", ANSWER))
        sock.sendto(reply.to_wire(), peer)


def query(server: str, port: int, count: int) -> dict[str, float | int]:
    """`count` sequential queries (a fresh name each, no cache), latency per answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect((server, port))
    lat: list[float] = []
    failed = 0
    for i in range(count):
        wire = dns.message.make_query(f"q{i}.bench.test", "A").to_wire()
        t0 = time.perf_counter()
        try:
            sock.send(wire)
            reply = dns.message.from_wire(sock.recv(4096))
        except (OSError, dns.exception.DNSException):
            failed += 1
            continue
        if ANSWER in reply.to_text():
            lat.append((time.perf_counter() - t0) * 1e6)
        else:
            failed += 1
    out: dict[str, float | int] = {"ok": len(lat), "failed": failed}
    if lat:
        lat.sort()
        out["p50_us"] = statistics.median(lat)
        out["p90_us"] = lat[int(0.9 * (len(lat) - 1))]
        out["p99_us"] = lat[int(0.99 * (len(lat) - 1))]
    return out


def main() -> None:
    """Command line (see module docstring)."""
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(query(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))


if __name__ == "__main__":
    main()
