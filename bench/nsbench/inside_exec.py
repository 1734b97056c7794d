"""Run commands *as descendants of* a given process, from outside it.

Most rows of ``usernet_bench`` run their clients in the namespace under test with
``nsenter``.  That cannot work for ``nsbridge run --bypass``: socket switching applies to
the command nsbridge started and its descendants (they inherit its seccomp filter), and a
process entered from outside has no filter, so it would measure the fast path instead.
So the row's command is this module's server, which listens on a Unix socket; the client
passes its own stdin/stdout/stderr and argv over it, the server starts the command with
those fds (its child: filtered) and sends back the exit status.  The measured program
then writes its output straight to the benchmark's pipes, exactly as under nsenter.

    python3 inside_exec.py serve SOCKET            # the row's command
    python3 inside_exec.py run SOCKET -- ARGV...   # from the benchmark: exits as ARGV did

If the client goes away (the benchmark's timeout killed it), the command is killed too.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import threading
import time

MAX_REQUEST = 1 << 16


def _recv_request(conn: socket.socket) -> tuple[list[str], list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    argv = json.loads(data)
    if len(fds) != 3 or not isinstance(argv, list) or not argv:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request is a non-empty JSON argv with 3 fds")
    return [str(a) for a in argv], list(fds)


def _serve_one(conn: socket.socket) -> None:
    with conn:
        try:
            argv, fds = _recv_request(conn)
        except (ValueError, OSError) as exc:
            conn.sendall(json.dumps({"error": str(exc)}).encode())
            return
        try:
            proc = subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2])
        except OSError as exc:
            conn.sendall(json.dumps({"error": f"{argv[0]}: {exc}"}).encode())
            return
        finally:
            for fd in fds:
                os.close(fd)
        watcher = threading.Thread(target=_kill_when_gone, args=(conn, proc), daemon=True)
        watcher.start()
        rc = proc.wait()
        try:
            conn.sendall(json.dumps({"rc": rc}).encode())
            # shutdown, not just close: the watcher's recv holds the socket open.
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _kill_when_gone(conn: socket.socket, proc: subprocess.Popen) -> None:
    """The client sends nothing after its request: EOF means it is gone."""
    try:
        conn.recv(1)
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()


def serve(path: str) -> int:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def run(path: str, argv: list[str], wait: float = 20.0) -> int:
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                print(f"inside_exec: no server at {path}", file=sys.stderr)
                return 125
            time.sleep(0.05)
    with conn:
        conn.sendmsg(
            [json.dumps(argv).encode()],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))],
        )
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    answer = json.loads(reply or b'{"error": "server closed without an answer"}')
    if "error" in answer:
        print(f"inside_exec: {answer['error']}", file=sys.stderr)
        return 126
    rc = int(answer["rc"])
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        return serve(argv[1])
    if len(argv) >= 4 and argv[0] == "run" and argv[2] == "--":
        return run(argv[1], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
