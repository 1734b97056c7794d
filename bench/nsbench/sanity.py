"""Correctness checks run through each forwarder before it is timed.

Why: iperf3 and wrk do not look at the bytes they move, so a forwarder
that corrupts, truncates or never closes would still post a number.
Two cheap checks catch that: an HTTP GET whose body must equal the page,
and an echo of random bytes followed by a half-close, whose reply must
match exactly and end with EOF.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any

from .servers import page_body

STALL = "duplex: stalled"


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    """Read until EOF or the deadline."""
    chunks = []
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def http_check(port: int, timeout: float = 10.0) -> str | None:
    """GET / with Connection: close; None if the body is exactly the page."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            raw = _read_all(s, deadline)
    except OSError as exc:
        return f"http: {type(exc).__name__}: {exc}"
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return f"http: unexpected status line {head[:40]!r}"
    if body != page_body():
        return f"http: body of {len(body)} bytes differs from the {len(page_body())}-byte page"
    return None


def echo_check(
    port: int, chunk: int = 64 << 10, chunks: int = 32, timeout: float = 20.0
) -> str | None:
    """Echo random bytes in lock-step, half-close, expect identical bytes and EOF.

    Lock-step (one 64 KiB chunk in flight) keeps this a pure integrity
    check; full-duplex behaviour is probed separately by duplex_check.
    """
    deadline = time.monotonic() + timeout
    sent = bytearray()
    got = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            for _ in range(chunks):
                block = os.urandom(chunk)
                sent += block
                sock.sendall(block)
                while len(got) < len(sent):
                    sock.settimeout(max(deadline - time.monotonic(), 0.01))
                    data = sock.recv(1 << 20)
                    if not data:
                        return f"echo: early EOF after {len(got)} of {len(sent)} bytes"
                    got += data
            sock.shutdown(socket.SHUT_WR)
            got += _read_all(sock, deadline)
    except OSError as exc:
        return f"echo: {type(exc).__name__}: {exc} after {len(got)} of {len(sent)} bytes"
    return _compare(bytes(sent), bytes(got), "echo")


def duplex_check(port: int, size: int = 4 << 20, timeout: float = 8.0) -> str | None:
    """Stream 4 MiB to the echo server while reading concurrently, then half-close.

    A relay that blocks on write in one direction while the other
    direction fills up deadlocks here; that is reported as a note, not a
    data error, because request/response traffic never triggers it.
    """
    payload = os.urandom(size)
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return f"duplex: connect: {exc}"

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"duplex: send: {exc}")

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = bytearray()
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = sock.recv(1 << 20)
            if not data:
                break
            got += data
    except OSError as exc:
        return (
            f"{STALL} after echoing {len(got)} of {size} bytes within "
            f"{timeout:.0f}s ({type(exc).__name__})"
        )
    finally:
        sock.close()
        sender.join(timeout)
    return errors[0] if errors else _compare(payload, bytes(got), "duplex")


def _compare(sent: bytes, got: bytes, what: str) -> str | None:
    """None if equal, else where and how the echoed bytes differ."""
    if got == sent:
        return None
    same = next(
        (i for i, (a, b) in enumerate(zip(got, sent, strict=False)) if a != b),
        min(len(got), len(sent)),
    )
    return (
        f"{what}: got {len(got)} bytes (sha256 {hashlib.sha256(got).hexdigest()[:12]}) for "
        f"{len(sent)} sent; first difference at offset {same}"
    )


def check(http_port: int, echo_port: int) -> dict[str, Any]:
    """Data checks; problems fail the row, notes are printed but do not.

    A full-duplex stall is a note; bytes that arrive changed are a problem
    in any check.
    """
    problems = [p for p in (http_check(http_port), echo_check(echo_port)) if p]
    notes = []
    duplex = duplex_check(echo_port)
    if duplex and duplex.startswith(STALL):
        notes.append(duplex)
    elif duplex:
        problems.append(duplex)
    return {"ok": not problems, "problems": problems, "notes": notes}
