"""Usernet soak: thousands of flows of every kind through one ``nsbridge run``, then proof
that nothing was corrupted or lost and that the nsbridge process is back to the open
fds it started with.

Why: the per-feature tests in tests/usernet/ make a handful of flows each.  Leaks
(an fd per redirected connection, per DNS query, per UDP flow), and races (a client
reset racing the dial, a half-close racing a flush, DNS answers crossing) only show
after thousands of mixed flows through the same engine.

Shape (inside a "host" namespace of the test's own, the ``host`` fixture): the TCP
scenario server of helpers/tcp_mix.py (sha256-checked echo, half-closes both ways, 4 MiB
downloads, slow readers, client and server aborts, idle connections) listens on
192.0.2.1, a UDP echo server there too, and a resolver on the host's 127.0.0.1 serves
``--dns``.  The clients run *inside* the sandbox (this file run as a script by
``nsbridge run``), in two rounds:

1. warm-up: a small TCP mix, every UDP flow, some DNS queries (pools, allocator arenas,
   and the UDP flows' host sockets, which live until 60 s idle, come into being);
2. the soak: the full TCP mix, the same UDP flows again with fresh payloads, and
   hundreds of DNS queries, all at once.

After each round the client stops and waits on stdin so the test can count
``/proc/PID/fd`` of the nsbridge process; after the soak that count must come back to
what it was after the warm-up: every redirected connection, DNS query socket and relay
pipe released, and the UDP flows reused rather than duplicated.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

if __name__ == "__main__":  # run as a program (by the test, inside the sandbox)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.usernet_host import USERNET_TCP_MODES
from helpers.waiting import wait_until

pytestmark = pytest.mark.stress

SERVER = "192.0.2.1"  # the host namespace's own address (the ``host`` fixture)
TCP_TOTAL = int(os.environ.get("NSBRIDGE_USERNET_SOAK", "5000"))
WARM_TCP = 300
UDP_FLOWS = 300  # distinct source ports, the same in both rounds
UDP_BASE_PORT = 31000
UDP_PER_FLOW = 4  # datagrams per flow and round
DNS_WARM, DNS_QUERIES = 50, 400
CONCURRENCY = 200


def dns_answer_for(name: str) -> str:
    """The address the soak resolver gives ``qN.soak.test.``: unique per N, so a
    crossed answer is noticed (198.18.0.0/15 is never dialed: it is only an answer)."""
    n = int(name.split(".")[0][1:])
    return f"198.18.{n // 256 % 256}.{n % 256}"


# ---- inside the sandbox -----------------------------------------------------------------


async def udp_round(server: tuple[str, int], seed: int, counts: Counter) -> None:
    """Every flow (fixed source port) sends UDP_PER_FLOW datagrams of 1 B-16 KiB and
    checks each echo; a datagram lost is sent again (UDP may drop), at most 5 times."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(50)

    async def flow(i: int) -> None:
        rng = random.Random(seed * 100000 + i)
        async with sem:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", UDP_BASE_PORT + i))
                sock.setblocking(False)
                sock.connect(server)
                for _ in range(UDP_PER_FLOW):
                    payload = rng.randbytes(rng.choice((1, 200, 1400, 9000, 16384)))
                    for _attempt in range(5):
                        await loop.sock_sendall(sock, payload)
                        try:
                            reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), 2)
                        except TimeoutError:
                            counts["udp_resent"] += 1
                            continue
                        counts["udp_ok" if reply == payload else "udp_corrupt"] += 1
                        break
                    else:
                        counts["udp_lost"] += 1

    await asyncio.gather(*(flow(i) for i in range(UDP_FLOWS)))


async def dns_round(first: int, total: int, counts: Counter) -> None:
    """``total`` queries to 10.0.2.3, each from its own socket, each answer checked."""
    import dns.message
    import dns.rdatatype

    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(50)

    async def query(n: int) -> None:
        name = f"q{n}.soak.test."
        message = dns.message.make_query(name, "A")
        async with sem:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(("10.0.2.3", 53))
                for _attempt in range(5):
                    await loop.sock_sendall(sock, message.to_wire())
                    try:
                        wire = await asyncio.wait_for(loop.sock_recv(sock, 65536), 2)
                    except TimeoutError:
                        counts["dns_resent"] += 1
                        continue
                    reply = dns.message.from_wire(wire)
                    got = [item.address for rrset in reply.answer for item in rrset
                           if rrset.rdtype == dns.rdatatype.A]
                    right = reply.id == message.id and got == [dns_answer_for(name)]
                    counts["dns_ok" if right else "dns_wrong"] += 1
                    return
                counts["dns_lost"] += 1

    await asyncio.gather(*(query(n) for n in range(first, first + total)))


async def soak_round(tcp_port: int, udp_port: int, tcp_total: int, dns_first: int,
                     dns_total: int, seed: int) -> dict[str, Any]:
    """One round: the TCP mix, the UDP flows and the DNS queries, concurrently."""
    from helpers import tcp_mix

    counts: Counter = Counter()
    started = time.monotonic()
    tally, _udp, _dns = await asyncio.gather(
        tcp_mix.run_mix(tcp_port, tcp_total, concurrency=CONCURRENCY),
        udp_round((SERVER, udp_port), seed, counts),
        dns_round(dns_first, dns_total, counts))
    return {"tcp": dict(tally.counts), "failures": tally.failures, "other": dict(counts),
            "seconds": round(time.monotonic() - started, 1)}


def clients_main(tcp_port: int, udp_port: int, tcp_total: int) -> None:
    """Two rounds, each reported as a JSON line; wait for a line on stdin after each so
    the test can count nsbridge's fds while nothing moves."""
    from helpers import tcp_mix

    tcp_mix.SERVER_HOST = SERVER
    for name, total, dns_first, dns_total, seed in (
            ("warm", WARM_TCP, 0, DNS_WARM, 1), ("soak", tcp_total, DNS_WARM, DNS_QUERIES, 2)):
        report = asyncio.run(soak_round(tcp_port, udp_port, total, dns_first, dns_total, seed))
        print(json.dumps({"round": name, **report}), flush=True)
        sys.stdin.readline()


def server_main() -> None:
    """The TCP scenario server of helpers/tcp_mix.py, on SERVER (in the host namespace)."""
    from helpers import tcp_mix

    async def main() -> None:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        counts: Counter = Counter()
        server = await asyncio.start_server(
            lambda r, w: tcp_mix._serve_one(r, w, counts), SERVER, 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


# ---- the test -------------------------------------------------------------------------------


def _dns_answer(query: bytes) -> bytes | None:
    import dns.message
    import dns.rrset

    try:
        message = dns.message.from_wire(query)
        name = message.question[0].name.to_text()
    except Exception:
        return None
    reply = dns.message.make_response(message)
    reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", dns_answer_for(name)))
    return reply.to_wire()  # type: ignore[no-any-return]


def _server_counts(host: str, port: int) -> Counter:
    """The scenario server's own counters (asked directly, in the host namespace)."""
    def ask() -> bytes:
        with socket.create_connection((SERVER, port), timeout=10) as sock:
            sock.sendall(b"stats 0 0\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
            return b"".join(chunks)

    return Counter(json.loads(in_netns(host, ask)))  # type: ignore[arg-type]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _read_report(proc: subprocess.Popen, log: str, timeout: float) -> dict[str, Any]:
    """The client's next JSON line (through nsbridge's stdout), or fail with the log."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    assert line, f"no report from the clients (nsbridge exit {proc.poll()}):\n{log}"
    return json.loads(line)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", USERNET_TCP_MODES)
def test_usernet_soak(host: str, udp_server, tmp_path, mode: str) -> None:
    """TCP_TOTAL (default 5,000) mixed TCP connections, 300 UDP flows x 4 echoed
    datagrams, 400 DNS queries through one ``nsbridge run --tcp=MODE``: no corrupt or
    lost byte, every reset seen as a reset, fds of nsbridge back to the warmed-up count."""
    pytest.importorskip("dns.message")
    from helpers import tcp_mix

    resolver = udp_server(host, _dns_answer)
    echo = udp_server(host, host=SERVER)
    server = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, __file__, "serve"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    log_path = tmp_path / "nsbridge.log"
    proc: subprocess.Popen | None = None
    try:
        assert server.stdout is not None
        tcp_port = int(server.stdout.readline())
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run",
                 f"--tcp={mode}", "--dns", f"127.0.0.1:{resolver.port}",
                 "--allow-host-access",  # the servers are on the host namespace's address
                 "--",
                 sys.executable, __file__, "clients", str(tcp_port), str(echo.port),
                 str(TCP_TOTAL)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                cwd=REPO)
        assert proc.stdin is not None
        warm = _read_report(proc, log_path.read_text(), 60)
        # `ip netns exec` execs (no fork), so the PID is nsbridge's own
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"nsbridge\0run" in f.read()
        assert warm["tcp"].get("failed", 0) == 0, warm
        assert warm["other"].get("udp_ok") == UDP_FLOWS * UDP_PER_FLOW, warm
        time.sleep(1.0)  # the last connections' closes reach nsbridge
        fds_before = _fds(proc.pid)
        seen_before = _server_counts(host, tcp_port)
        proc.stdin.write("go\n")
        proc.stdin.flush()

        report = _read_report(proc, log_path.read_text(), 120)
        try:  # every session closed and every query socket gone: back to the start
            wait_until(lambda: _fds(proc.pid) == fds_before, timeout=20, what="fds")
        except AssertionError:
            pass  # reported below with the numbers
        fds_after = _fds(proc.pid)
        seen = _server_counts(host, tcp_port) - seen_before
        proc.stdin.write("done\n")
        proc.stdin.flush()
        code = proc.wait(timeout=30)
        log = log_path.read_text()
        print(f"\nusernet soak ({mode}): {TCP_TOTAL} TCP, {UDP_FLOWS} UDP flows, "
              f"{DNS_QUERIES} DNS in {report['seconds']}s; fds {fds_before}->{fds_after}; "
              f"client {report['tcp']} {report['other']}; server {dict(seen)}")

        expected = Counter(kind for kind, _ in tcp_mix.plan(TCP_TOTAL))
        c, other = Counter(report["tcp"]), Counter(report["other"])
        assert c["failed"] == 0, report["failures"]
        assert c["corrupt"] == 0 and other["udp_corrupt"] == 0, report
        assert c["echo_ok"] == expected["echo"] and c["chalf_ok"] == expected["chalf"], c
        assert c["big_ok"] == expected["big"] and c["slow_ok"] == expected["slow"], c
        assert c["idle_ok"] == expected["idle"], c
        assert c["shalf_sent"] == seen["shalf_ok"] == expected["shalf"], (c, seen)
        assert seen["cabort_reset"] == expected["cabort"], seen  # client resets carried
        assert seen["sabort_sent"] == c["sabort_reset"] == expected["sabort"], (c, seen)
        assert not [k for k in seen if k.startswith("server_error")], seen
        assert other["udp_ok"] == UDP_FLOWS * UDP_PER_FLOW and other["udp_lost"] == 0, other
        assert other["dns_ok"] == DNS_QUERIES, other
        assert other["dns_wrong"] == 0 and other["dns_lost"] == 0, other
        assert fds_after == fds_before, f"nsbridge fds {fds_before} -> {fds_after}"
        assert code == 0, log
        assert "Traceback" not in log, log
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        server_main()
    elif sys.argv[1:2] == ["clients"]:
        clients_main(*(int(arg) for arg in sys.argv[2:5]))
