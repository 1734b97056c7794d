"""Real servers a test runs in its own threads (echo, half-close, one-record DNS, UDP) and
the client round trips that talk to them through a forward."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helpers.netns import in_netns, listen_in


def serve_in_thread(listener: socket.socket, handle: Callable[[socket.socket], None],
                    ) -> threading.Thread:
    """Accept forever on ``listener`` (until it is closed), one thread per connection."""

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_handle_and_close, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    return thread


def _handle_and_close(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        conn.settimeout(60)
        handle(conn)
    except OSError:
        pass
    finally:
        conn.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)



def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while total < limit and (data := sock.recv(1 << 16)):
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)



@dataclass
class StreamServer:
    """A stream server (TCP or Unix) that records every connection it accepted."""

    listener: socket.socket
    accepted: list[object] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]


    def start(self, handle: Callable[[socket.socket], None]) -> None:
        """Serve ``listener`` with ``handle`` in threads, recording each accepted peer
        (so a test can prove a refused client never got through)."""

        def recording(conn: socket.socket) -> None:
            try:
                self.accepted.append(conn.getpeername())
            except OSError:
                self.accepted.append(None)
            handle(conn)

        serve_in_thread(self.listener, recording)

    def close(self) -> None:
        """Stop accepting: shut the listener down (waking the accept thread) and close it."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


DNS_NAME = "www.nsbridge.test."
DNS_ADDRESS = "192.0.2.53"


def dns_answer(wire: bytes) -> bytes:
    """A one-record authoritative server: A for DNS_NAME, NXDOMAIN for the rest (for
    ``udp_server(..., answer=dns_answer)``; needs dnspython, imported here only)."""
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    if question.name == dns.name.from_text(DNS_NAME) and question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", DNS_ADDRESS))
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


def reply_after_fin(conn: socket.socket) -> None:
    """A server for half-close tests: read until the client's FIN, then answer on the
    direction that is still open with how many bytes came."""
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    time.sleep(0.2)
    conn.sendall(f"after-fin:{total}".encode())


def echo_listener(netns: str | None, host: str = "127.0.0.1") -> socket.socket:
    """A TCP listener for an echo server in ``netns`` (see ``stream_server``)."""
    return listen_in(netns, host)


class UdpServer:
    """A UDP server bound inside a namespace, answering from its own thread.

    ``answer(data)`` returns the reply (None: no reply); every peer is recorded and
    datagrams are counted in ``received``.
    """

    def __init__(self, netns: str, answer: Callable[[bytes], bytes | None],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def bind() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            # 8 MiB (SO_RCVBUFFORCE, root may exceed rmem_max): tests send bursts that the
            # kernel's 208 KiB default would drop before this thread reads them.
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
            sock.bind((host, port))
            return sock

        self.sock: socket.socket = in_netns(netns, bind)  # type: ignore[assignment]
        self.sock.settimeout(0.1)  # lets the thread notice close() without a wake-up trick
        self.port: int = self.sock.getsockname()[1]
        self.answer = answer
        self.peers: set[tuple] = set()
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = bytearray(1 << 16)
        while not self._stop.is_set():
            try:
                n, peer = self.sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.peers.add(peer)
            reply = self.answer(bytes(buf[:n]))
            if reply is not None:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()



def tcp_roundtrip(address: tuple | str | bytes, payload: bytes) -> bytes:
    """Send ``payload`` through a forward (TCP or Unix listener), half-close, read all."""
    family = (socket.AF_UNIX if isinstance(address, (str, bytes))
              else socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def udp_roundtrip(address: tuple, payload: bytes, sock: socket.socket | None = None,
                  attempts: int = 5) -> bytes:
    """One datagram and its reply; UDP may drop, so a lost one is sent again."""
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
                             socket.SOCK_DGRAM)
    try:
        sock.settimeout(2)
        for _ in range(attempts):
            sock.sendto(payload, address)
            try:
                data, _peer = sock.recvfrom(1 << 16)
                return data
            except TimeoutError:
                continue
        raise AssertionError(f"no UDP reply from {address} after {attempts} tries")
    finally:
        if own:
            sock.close()


def dual_stack_socket(kind: int, port: int) -> socket.socket:
    """A socket of ``kind`` bound to ``[::]:port`` for both families (V6ONLY off), listening
    if it is a stream socket: one server for IPv4 and IPv6 clients."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    return sock
