"""Driver for tests/usernet/test_redirect.py and test_tcp.py: both ends of the TCP fast
path, for real.

``host CONFIG_JSON`` is run with ``ip netns exec HOST`` so that "the host" is a throwaway
namespace the test created (nothing dialed here can leave the machine).  It creates a
sandbox with :func:`setup_inside` as the ``extra`` callback, relays with a
:class:`TcpRedirector` on an event loop thread, runs CMD inside, and prints one JSON
line: CMD's exit code, the redirector's counters, the listening port.

``client MODE ...`` runs INSIDE the sandbox (as CMD, or from a shell CMD) and prints one
JSON line about what the program saw:

* ``bulk HOST PORT SIZE`` — send SIZE random bytes to an echo server while reading the
  echo; sha256 of both.
* ``halfclose HOST PORT`` — send, shut down writing, then read what comes back after.
* ``expect-reset HOST PORT`` — connect and read; report reset / eof / data and the time.
* ``dns HOST PORT`` — one standard DNS query over TCP (length-prefixed); the answer's id
  and rcode, or how the connection ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

# ---- inside the sandbox -------------------------------------------------------------


def _connect(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect((host, port))
    return sock


def client_bulk(host: str, port: int, size: int) -> dict:
    sock = _connect(host, port)
    sent = hashlib.sha256()

    def send() -> None:
        # Pseudo-random throughout (fast, unlike os.urandom at this size): a relay that
        # dropped, repeated or reordered any chunk changes the hash.
        rng = random.Random(os.urandom(16))
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            sock.sendall(chunk)
            sent.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    started = time.monotonic()
    sender.start()
    received = hashlib.sha256()
    total = 0
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        received.update(memoryview(buf)[:n])
        total += n
    sender.join()
    sock.close()
    return {"sent": sent.hexdigest(), "received": received.hexdigest(), "bytes": total,
            "seconds": round(time.monotonic() - started, 3)}


def client_halfclose(host: str, port: int) -> dict:
    sock = _connect(host, port)
    sock.sendall(b"x" * 100_000)
    sock.shutdown(socket.SHUT_WR)
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    sock.close()
    return {"reply": b"".join(chunks).decode()}


def client_expect_reset(host: str, port: int) -> dict:
    started = time.monotonic()
    try:
        sock = _connect(host, port)
    except ConnectionRefusedError:
        return {"result": "refused", "seconds": round(time.monotonic() - started, 3)}
    except ConnectionResetError:  # the reset can beat connect() back to user space
        return {"result": "reset", "seconds": round(time.monotonic() - started, 3)}
    try:
        data = sock.recv(100)
        result = "data" if data else "eof"
    except ConnectionResetError:
        result = "reset"
    except TimeoutError:
        result = "timeout"
    finally:
        sock.close()
    return {"result": result, "seconds": round(time.monotonic() - started, 3)}


def client_dns(host: str, port: int) -> dict:
    query = (struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
             + b"\x07example\x03com\x00" + struct.pack("!HH", 1, 1))
    sock = _connect(host, port)
    try:
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return {"result": "eof"}
            data += chunk
    except ConnectionResetError:
        return {"result": "reset"}
    finally:
        sock.close()
    ident, flags = struct.unpack_from("!HH", data, 2)
    return {"result": "answer", "id": ident, "rcode": flags & 0xF}


def client_main(argv: list[str]) -> int:
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "bulk":
        result = client_bulk(host, port, int(argv[3]))
    elif mode == "halfclose":
        result = client_halfclose(host, port)
    elif mode == "expect-reset":
        result = client_expect_reset(host, port)
    elif mode == "dns":
        result = client_dns(host, port)
    else:
        raise SystemExit(f"unknown client mode {mode!r}")
    print(json.dumps({"mode": mode, "target": f"{host}:{port}", **result}), flush=True)
    return 0


# ---- the host side -------------------------------------------------------------------


def host_main(config: dict) -> int:
    from nsbridge.relay.loop import EventLoop
    from nsbridge.usernet.host.redirect import TcpRedirector, setup_inside
    from nsbridge.usernet.inside.sandbox import Sandbox
    from nsbridge.usernet.proto.policy import Policy
    from nsbridge.usernet.proto.rules import Rule

    policy = Policy(
        allow_host_loopback=config.get("allow_host_loopback", False),
        rules=[Rule.parse("deny", text) for text in config.get("deny", [])],
    )
    with open(config["stdout"], "w") as out, open(config["stderr"], "w") as err:
        handle = Sandbox.create(config["command"], extra=setup_inside, hold=True,
                                stdout=out.fileno(), stderr=err.fileno())
    loop = EventLoop()
    try:
        fds = handle.take_extra()
        redirector = TcpRedirector.from_fds(
            loop, fds, policy, resolvers=[tuple(r) for r in config.get("resolvers", [])],
            connect_timeout=config.get("connect_timeout", 20.0))
        ports = sorted({s.getsockname()[1] for s in redirector.listeners})
        families = sorted(s.family.name for s in redirector.listeners)
        redirector.start()
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        handle.start()
        try:
            code = handle.wait(timeout=config.get("timeout", 120))
        except TimeoutError:
            handle.kill(signal.SIGKILL)
            code = handle.wait()
        stats = _settled_stats(loop, redirector)
        loop.stop()
        thread.join(10)
    finally:
        handle.close()
    print(json.dumps({"code": code, "stats": stats, "ports": ports, "families": families}),
          flush=True)
    return 0


def _settled_stats(loop, redirector, timeout: float = 10.0) -> dict:
    """The counters once no connection is active (read on the loop's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        box: dict = {}
        done = threading.Event()

        def read(box: dict = box, done: threading.Event = done) -> None:
            box.update(redirector.snapshot().as_dict())
            done.set()

        loop.call_soon_threadsafe(read)
        done.wait(10)
        if box.get("active") == 0 or time.monotonic() > deadline:
            return box
        time.sleep(0.05)


def main() -> int:
    if sys.argv[1] == "client":
        return client_main(sys.argv[2:])
    if sys.argv[1] == "host":
        return host_main(json.loads(sys.argv[2]))
    raise SystemExit(f"usage: {sys.argv[0]} host CONFIG_JSON | client MODE HOST PORT ...")


if __name__ == "__main__":
    sys.exit(main())
