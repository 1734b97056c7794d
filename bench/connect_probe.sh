#!/bin/bash
# connect_probe.sh: how long a blocking connect() takes from a program under
# `nsbridge run --bypass`, against the same program run directly (docs/performance.md,
# "Socket switching").  Quicker than usernet_bench.py for trying a change to the switcher.
#
# A namespace of its own (a veth pair, 10.98.0.1 on one end) holds a Python server that
# accepts and closes; nsbench/connectprobe.py makes 2,000 blocking connects spaced 2 ms
# (p50/p90 µs), then a serial loop times 5,000 connect+close (connects/s).  Extra
# arguments go to `nsbridge run` (e.g. -v); NSBRIDGE_SWITCH=python picks the Python path.
# The same two then run under reference/seccomp_floor.c's bare switch (`floor:`), built
# with gcc into a temporary directory: the least any socket switcher costs here.
#
# usage: sudo bash bench/connect_probe.sh [RUN OPTIONS]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
NS=nsb-probe-$$
SERVER=
BUILD=$(mktemp -d)
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$BUILD"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add p0 type veth peer name p1
ip -n "$NS" addr add 10.98.0.1/24 dev p0
ip -n "$NS" link set p0 up
ip -n "$NS" link set p1 up
# Each row leaves thousands of TIME_WAIT sockets to the one server address; without
# reuse a later row's connects spend longer finding a free port.
ip netns exec "$NS" sysctl -qw net.ipv4.tcp_tw_reuse=1
ip netns exec "$NS" python3 -c '
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("10.98.0.1", 8080))
server.listen(4096)
while True:
    server.accept()[0].close()' &
SERVER=$!
sleep 0.5
SERIAL='
import socket, sys, time
count = 5000
start = time.perf_counter()
for _ in range(count):
    with socket.socket() as sock:
        sock.connect(("10.98.0.1", 8080))
print(f"serial connects/s: {count / (time.perf_counter() - start):.0f}")'
cd "$REPO"
echo "direct: $(ip netns exec "$NS" python3 bench/nsbench/connectprobe.py 10.98.0.1 8080 2000)"
ip netns exec "$NS" python3 -c "$SERIAL"
echo "bypass: $(ip netns exec "$NS" python3 -m nsbridge run --bypass --allow=10.98.0.1 "$@" -- \
    python3 bench/nsbench/connectprobe.py 10.98.0.1 8080 2000)"
ip netns exec "$NS" python3 -m nsbridge run --bypass --allow=10.98.0.1 "$@" -- python3 -c "$SERIAL"
gcc -O2 -o "$BUILD/seccomp_floor" bench/reference/seccomp_floor.c -lpthread
echo "floor:  $(ip netns exec "$NS" "$BUILD/seccomp_floor" switch \
    python3 bench/nsbench/connectprobe.py 10.98.0.1 8080 2000 2>/dev/null)"
ip netns exec "$NS" "$BUILD/seccomp_floor" switch python3 -c "$SERIAL" 2>/dev/null
