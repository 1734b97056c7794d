"""Time TCP connects from where it runs: ``connectprobe.py HOST PORT COUNT`` prints JSON
with the p50/p90 of how long a blocking ``connect()`` took, in microseconds.

What a program waits for before its first byte: for a relay, until the relay answered
the SYN (or, for socket switching, until the host side connected and installed the
socket).  Each socket is closed at once; the server (nginx in usernet_bench) accepts and
closes.  Connects are spaced by 2 ms so the server's accept queue stays empty and a
slow close path cannot pile up into the next measurement.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time


def main(host: str, port: int, count: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    times: list[float] = []
    failed = 0
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            start = time.perf_counter_ns()
            sock.connect((host, port))
            times.append((time.perf_counter_ns() - start) / 1000)
        except OSError:
            failed += 1
        finally:
            sock.close()
        time.sleep(0.002)
    out: dict[str, float | int] = {"n": len(times), "failed": failed}
    if times:
        times.sort()
        out["p50_us"] = statistics.median(times)
        out["p90_us"] = times[int(len(times) * 0.9) - 1 if len(times) >= 10 else -1]
    print(json.dumps(out))
    return 0 if times else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
