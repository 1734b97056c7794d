"""The rootlesskit tests' program inside rootlesskit's namespace (stdlib only: it runs as
the namespace's root under the distribution's Python, which has none of the tests'
packages).

* ``tcp ADDR PORT``: connect, send a line, half-close, print the server's reply
  (the servers outside answer with the client address they saw).
* ``udp ADDR PORT``: one datagram, resent until its reply comes, print the reply.
* ``serve PORT``: listen on every IPv4 address, print ``READY``, then answer each client
  with the address it came from and print ``peer ADDR``, until stdin closes.
* ``reach``: as an attacker who is root inside would, find the slirp4netns helper (it
  shares our user id outside) and try to read its root, environment, fds and memory
  through /proc; print one line ``helper PID WHAT:open|denied...``, then wait until
  stdin closes.

A failure prints ``failed: REASON`` on stdout and exits 1, so the test can tell "refused"
from "timed out" from a broken probe.
"""

from __future__ import annotations

import socket
import sys
import threading


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def tcp(address: str, port: int) -> str:
    with socket.socket(_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((address, port))
        sock.sendall(b"hello\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(4096):
            chunks.append(data)
        return b"".join(chunks).decode().strip()


def udp(address: str, port: int) -> str:
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        for _ in range(5):
            sock.sendto(b"hello", (address, port))
            try:
                return sock.recv(65536).decode().strip()
            except TimeoutError:
                continue
        raise TimeoutError("no UDP reply after 5 tries")


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)

    def accept_loop() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            with conn:
                print(f"peer {peer[0]}", flush=True)
                conn.sendall(f"{peer[0]}\n".encode())

    threading.Thread(target=accept_loop, daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read()
    listener.close()


def reach() -> None:
    import os

    def real_uid(pid: int) -> int:
        """As this namespace sees it (a non-dumpable process's /proc files belong to
        root whatever its user, so not their owner)."""
        with open(f"/proc/{pid}/status") as f:
            return next(int(row.split()[1]) for row in f if row.startswith("Uid:"))

    helpers = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            uid = real_uid(int(entry))
        except (OSError, ValueError, StopIteration):
            continue  # gone meanwhile, or not a process
        if argv and argv[-1] == b"tap0" and b"-r" in argv and \
                not any(arg.startswith(b"--slirp4netns-binary") for arg in argv) and \
                uid == os.getuid():
            helpers.append(int(entry))  # ours: other users' helpers may run meanwhile

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    # A helper's own forked children (its set-up helper, caught before it is reaped)
    # carry its command line too: the one whose parent is not among them serves.
    serving = [pid for pid in helpers if parent(pid) not in helpers]
    if len(serving) != 1:
        print(f"failed: helpers {helpers}", flush=True)
        return
    pid = serving[0]

    def listdir(path: str) -> None:
        os.listdir(path)

    def read(path: str) -> None:
        with open(path, "rb") as f:
            f.read(1)

    tries = {"root": (listdir, "root"), "environ": (read, "environ"),
             "fd": (listdir, "fd"), "mem": (read, "mem")}
    verdicts = []
    for what, (attempt, name) in tries.items():
        try:
            attempt(f"/proc/{pid}/{name}")
            verdicts.append(f"{what}:open")
        except OSError:
            verdicts.append(f"{what}:denied")
    print(f"helper {pid} {' '.join(verdicts)}", flush=True)
    sys.stdin.read()


def main(argv: list[str]) -> int:
    verb, *args = argv
    try:
        if verb == "serve":
            serve(int(args[0]))
        elif verb == "reach":
            reach()
        elif verb == "tcp":
            print(tcp(args[0], int(args[1])))
        elif verb == "udp":
            print(udp(args[0], int(args[1])))
        else:
            print(f"failed: unknown verb {verb}")
            return 2
    except OSError as exc:
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
