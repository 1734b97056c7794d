"""More cases for the program inside ``nsbridge run --bypass`` (stdlib only): resets,
silent and down targets, blocking connects from many threads, a blocking connect
interrupted by a signal.  Same contract as :mod:`switch_probe` (whose helpers it uses):
``python3 switch_probe_tcp.py CASE ARGS...`` prints one JSON object.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

from switch_probe import error_name, family_of, raw_connect


def reset_by_server(ip: str, port: str) -> dict:
    """The server resets the connection (SO_LINGER 0 close): our read sees ECONNRESET."""
    sock = socket.create_connection((ip, int(port)), timeout=10)
    sockname = sock.getsockname()[0]
    try:
        sock.sendall(b"reset me\n")
        data = sock.recv(100)
        result = f"data {data!r}"
    except OSError as exc:
        result = error_name(exc)
    sock.close()
    return {"sockname": sockname, "recv": result}


def reset_by_program(ip: str, port: str) -> dict:
    """We reset (SO_LINGER on, 0 s, then close): the server's read sees ECONNRESET."""
    sock = socket.create_connection((ip, int(port)), timeout=10)
    sockname = sock.getsockname()[0]
    sock.sendall(b"about to reset\n")
    time.sleep(0.3)  # the line is read first, then the reset comes
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return {"sockname": sockname}


def silent_nonblocking(ip: str, port: str, seconds: str) -> dict:
    """A non-blocking connect to a target that never answers, given up by poll after
    ``seconds`` (the program's own timeout)."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    sock.setblocking(False)
    started = time.monotonic()
    code = sock.connect_ex((ip, int(port)))
    ready = select.poll()
    ready.register(sock, select.POLLOUT)
    events = ready.poll(float(seconds) * 1000) if code == errno.EINPROGRESS else []
    elapsed = time.monotonic() - started
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    sockname = sock.getsockname()[0]
    sock.close()
    return {"connect": errno.errorcode.get(code, "0"), "poll": "ready" if events else "timeout",
            "so_error": errno.errorcode.get(error, "0"), "elapsed": round(elapsed, 2),
            "sockname": sockname}


def blocking_sndtimeo(ip: str, port: str, seconds: str) -> dict:
    """A blocking connect (libc's, no Python retry logic) bounded by ``SO_SNDTIMEO``:
    the kernel's answer when it runs out is EINPROGRESS (the attempt goes on)."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    whole = float(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("=qq", int(whole), int((whole % 1) * 1e6)))
    started = time.monotonic()
    code = raw_connect(sock.fileno(), family_of(ip), ip, int(port))
    elapsed = time.monotonic() - started
    sockname = sock.getsockname()[0]
    sock.close()
    return {"connect": errno.errorcode.get(code, "0"), "elapsed": round(elapsed, 2),
            "sockname": sockname}


def down(ip: str, port: str) -> dict:
    """A target that is down (no host answers for the address): the blocking and the
    non-blocking connect each get the kernel's error."""
    out = {}
    blocking = socket.socket(family_of(ip), socket.SOCK_STREAM)
    blocking.settimeout(None)
    try:
        blocking.connect((ip, int(port)))
        out["blocking"] = "0"
    except OSError as exc:
        out["blocking"] = error_name(exc)
    blocking.close()
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex((ip, int(port)))
    ready = select.poll()
    ready.register(sock, select.POLLOUT)
    ready.poll(30000)
    out["nonblocking"] = errno.errorcode.get(code, "0")
    out["so_error"] = errno.errorcode.get(sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_ERROR), "0")
    sock.close()
    return out


def threads(ip: str, port: str, count: str) -> dict:
    """``count`` threads, each a blocking connect at the same moment and one exchanged
    line; the fd count before and after."""
    before = len(os.listdir("/proc/self/fd"))
    start = threading.Barrier(int(count))
    results: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        start.wait()
        try:
            with socket.create_connection((ip, int(port)), timeout=60) as sock:
                reader = sock.makefile("rb")
                reader.readline()  # the server's first line: the peer it saw
                sock.sendall(f"thread {index}\n".encode())
                echoed = reader.readline().decode().strip()
                reader.close()
                outcome = sock.getsockname()[0] if echoed == f"thread {index}" else "mismatch"
        except OSError as exc:
            outcome = error_name(exc)
        with lock:
            results.append(outcome)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(int(count))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"count": len(results), "outcomes": sorted(set(results)),
            "fds_before": before, "fds_after": len(os.listdir("/proc/self/fd"))}


def interrupted(ip: str, port: str, restart: str, after: str) -> dict:
    """A blocking libc connect to a target slow to accept, hit by SIGALRM ``after``
    seconds in, whose handler has SA_RESTART (``restart`` "1": the kernel restarts the
    call) or not ("0": EINTR, and the program connects again, as C programs do)."""
    handled = []
    signal.signal(signal.SIGALRM, lambda *_: handled.append(time.monotonic()))
    signal.siginterrupt(signal.SIGALRM, restart != "1")
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    signal.setitimer(signal.ITIMER_REAL, float(after))
    answers = []
    while True:
        code = raw_connect(sock.fileno(), family_of(ip), ip, int(port))
        answers.append(errno.errorcode.get(code, "0"))
        if code != errno.EINTR or len(answers) > 5:
            break
    # The handler runs at the next bytecode boundary.  Then stay a while: a first dial
    # the host side made for an interrupted call may still be retrying its SYN, and
    # its end (connected, then found gone) is what the test counts.
    time.sleep(5)
    sockname = sock.getsockname()[0]
    sock.close()
    return {"answers": answers, "handler_ran": bool(handled), "sockname": sockname}


def blocked(ip: str, port: str) -> dict:
    """Says ``blocking PID`` on stdout, then blocks in a connect (the test kills us)."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    print(f"blocking {os.getpid()}", flush=True)
    code = raw_connect(sock.fileno(), family_of(ip), ip, int(port))
    return {"connect": errno.errorcode.get(code, "0")}


def reparented(ip: str, port: str) -> dict:
    """A daemon that left the tree: we fork, the child forks the daemon and exits, so
    the daemon is re-parented away from us (and from nsbridge).  The daemon makes
    itself non-dumpable (which takes away the plain same-user ptrace access), waits
    until it has a new parent, connects and reports through a pipe; we print it."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        middle_pid = os.getpid()
        if os.fork() == 0:
            os.close(read_end)
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
            while os.getppid() == middle_pid:  # re-parented as soon as it exits
                time.sleep(0.01)
            report: dict = {"ancestors": _ancestors(), "dumpable": _dumpable()}
            report.update(connect_once(ip, port))
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
        os._exit(0)
    os.close(write_end)
    os.waitpid(middle, 0)
    with os.fdopen(read_end) as pipe:
        return json.loads(pipe.read())


def connect_once(ip: str, port: str) -> dict:
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.connect((ip, int(port)))
        return {"result": "ok", "sockname": sock.getsockname()[0]}
    except OSError as exc:
        return {"result": error_name(exc)}
    finally:
        sock.close()


def _ancestors() -> list[int]:
    """Our parent, its parent, ... up to pid 1 (as this pid namespace shows them)."""
    chain, pid = [], os.getppid()
    while pid > 1:
        chain.append(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(") ", 1)[1].split()[1])
    return chain


def _dumpable() -> int:
    return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE


CASES = {name: function for name, function in globals().items()
         if callable(function) and not name.startswith("_")
         and getattr(function, "__module__", None) == __name__}


if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]](*sys.argv[2:])), flush=True)
