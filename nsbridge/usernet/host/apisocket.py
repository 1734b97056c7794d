"""slirp4netns's API socket, served on a user-mode network's event loop.

Container runtimes publish ports at run time by talking to ``slirp4netns --api-socket
PATH`` (rootlesskit's ``--port-driver=slirp4netns``, podman); this serves the same
protocol (:mod:`nsbridge.usernet.proto.slirpapi`) for a :class:`~nsbridge.usernet.runner.
Network`.  An ``add_hostfwd`` becomes a device-mode published port (:mod:`.inbound`)
when the guest address is one of the namespace's network: the guest is reached through
the device with the client's address as the source (10.0.2.2 for a client on the host's
loopback), as slirp4netns does.  One to any other address (the namespace's loopback, a
host the namespace reaches through the policy), or when the network has no inbound path
for its protocol, is an ordinary forward on the network's
:class:`~nsbridge.forward.Bridge`, as ``nsbridge run -p`` makes in splice mode: it listens
on the host and connects inside the namespace, through the namespace's socket factory, to
``guest_addr:guest_port`` (its server sees the namespace's own address).
``remove_hostfwd`` closes its listener; TCP
connections already made carry on and a UDP forward's flows end, which is what libslirp
does (its accepted connections are sockets of their own, its UDP forward is one socket).

Unlike slirp4netns, whose single-threaded loop blocks in ``read()`` until a client
writes (a client that connects and says nothing freezes all of its networking), each
client here is one more fd on the loop: it has :data:`CLIENT_TIMEOUT` seconds to send its
request and take its reply, and at most :data:`MAX_CLIENTS` are served at once (the
others wait in the kernel's accept queue).  The socket file is created mode 0600: only
its owner (and root) may publish ports through it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from nsbridge.errors import UserError
from nsbridge.forward import UDP, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.net.addresses import HostPort
from nsbridge.net.sockets import listen_private_unix, remove_unix_socket
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import IN, OUT, EventLoop, Timer
from nsbridge.usernet.host.inbound import InboundPort
from nsbridge.usernet.proto import slirpapi
from nsbridge.usernet.proto.slirpapi import (
    AddHostFwd,
    ApiError,
    HostFwdTable,
    ListHostFwd,
    RemoveHostFwd,
)

log = logging.getLogger("nsbridge")

MAX_CLIENTS = 16
CLIENT_TIMEOUT = 10.0
SUN_PATH_SIZE = 108  # sizeof(struct sockaddr_un.sun_path); slirp4netns needs room for NUL


class ApiSocketServer:
    """The API socket at ``path`` for ``network`` (a started or starting Network whose
    bridge has the namespace's socket factory registered).  Raises UserError with one
    line when the socket cannot be made; :meth:`close` removes the socket file."""

    def __init__(self, loop: EventLoop, path: str, network: Any) -> None:
        self.loop = loop
        self.path = path
        self.bridge = network.bridge
        self.inbound = network.inbound  # device-mode TCP ports (None: all are forwards)
        self.netns = network.handle.netns
        self.default_guest = str(network.policy.addresses.namespace)
        self.table = HostFwdTable()
        self.forwards: dict[int, Any] = {}  # hostfwd id -> its Forward
        self.clients: dict[int, _Client] = {}
        self.sock = _listen(path)
        self._acceptor = Acceptor(loop, self.sock, self._on_client,
                                  name=f"API socket {path}")
        self._acceptor.start()

    # ---- clients ----------------------------------------------------------------------

    def _on_client(self, conn: socket.socket, _peer: object) -> None:
        conn.setblocking(False)
        client = _Client(self, conn)
        self.clients[client.fd] = client
        self.loop.add(client.fd, IN, client.on_event)
        if len(self.clients) >= MAX_CLIENTS:
            self._acceptor.hold()

    def _client_gone(self, client: _Client) -> None:
        self.clients.pop(client.fd, None)
        if len(self.clients) < MAX_CLIENTS:
            self._acceptor.release()

    # ---- requests ---------------------------------------------------------------------

    def answer(self, data: bytes) -> bytes:
        """One request's bytes to the reply's bytes; never raises."""
        try:
            request = slirpapi.decode_request(data, self.default_guest)
            if isinstance(request, ApiError):
                log.info("API socket: %s", request.desc)
                return slirpapi.error_reply(request.desc)
            if isinstance(request, AddHostFwd):
                return self._add(request)
            if isinstance(request, ListHostFwd):
                return slirpapi.list_reply(self.table.entries())
            return self._remove(request)
        except Exception:  # a bug must not take the network down
            log.exception("API socket: a request failed")
            return slirpapi.error_reply("bad request: internal error")

    def _add(self, request: AddHostFwd) -> bytes:
        if (self.inbound is not None and self.inbound.serves_protocol(request.proto)
                and self.inbound.serves(request.guest_addr)):
            return self._add_inbound(request)
        protocol = UDP if request.proto == "udp" else "stream"
        spec = ForwardSpec(
            ListenAddress(HostPort(request.host_addr, request.host_port), protocol=protocol),
            ConnectAddress(HostPort(request.guest_addr, request.guest_port), self.netns,
                           protocol=protocol),
            name=f"hostfwd {self.table.next_id}",
        )
        try:
            forward = self.bridge.add(spec)
        except UserError as exc:
            log.warning("API socket: add_hostfwd %s %s:%d failed: %s", request.proto,
                        request.host_addr, request.host_port, exc)
            return slirpapi.error_reply(slirpapi.ADD_FAILED)
        entry = self.table.add(request)
        self.forwards[entry.id] = forward
        log.info("API socket: hostfwd %d: %s %s -> %s:%d", entry.id, request.proto,
                 forward.listen_address, request.guest_addr, request.guest_port)
        return slirpapi.added_reply(entry.id)

    def _add_inbound(self, request: AddHostFwd) -> bytes:
        assert self.inbound is not None
        name = f"hostfwd {self.table.next_id}"
        try:
            port = self.inbound.add(HostPort(request.host_addr, request.host_port),
                                    request.guest_addr, request.guest_port, name=name,
                                    protocol=request.proto)
        except UserError as exc:
            log.warning("API socket: add_hostfwd %s %s:%d failed: %s", request.proto,
                        request.host_addr, request.host_port, exc)
            return slirpapi.error_reply(slirpapi.ADD_FAILED)
        entry = self.table.add(request)
        self.forwards[entry.id] = port
        log.info("API socket: hostfwd %d: %s %s -> %s:%d through the device", entry.id,
                 request.proto, port.listen_address, request.guest_addr, request.guest_port)
        return slirpapi.added_reply(entry.id)

    def _remove(self, request: RemoveHostFwd) -> bytes:
        entry = self.table.remove(request.id)
        if entry is None:
            return slirpapi.error_reply(slirpapi.BAD_ID)
        made = self.forwards.pop(entry.id)
        if isinstance(made, InboundPort):
            assert self.inbound is not None
            self.inbound.remove(made)
        else:
            self.bridge.remove(made)
        log.info("API socket: hostfwd %d removed", entry.id)
        return slirpapi.removed_reply()

    # ---- the end ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and remove the socket file (the forwards are the bridge's)."""
        for client in list(self.clients.values()):
            client.close()
        self._acceptor.close()
        self.sock.close()
        remove_unix_socket(self.path)


class _Client:
    """One connection: one read, one reply, then shutdown and close."""

    def __init__(self, server: ApiSocketServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.fd = conn.fileno()
        self.outbox = b""
        self.answered = False
        self.timer: Timer | None = server.loop.call_later(CLIENT_TIMEOUT, self._timed_out)

    def on_event(self, events: int) -> None:
        if not self.answered:
            self._read()
        else:  # writable, or the client hung up: either way finish the reply
            self._flush()

    def _read(self) -> None:
        try:
            data = self.conn.recv(slirpapi.MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        # An empty read (the client shut its side down) is a request too: slirp4netns
        # answers it "cannot parse JSON".
        self.answered = True
        self.outbox = self.server.answer(data)
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outbox:
                sent = self.conn.send(self.outbox)
                self.outbox = self.outbox[sent:]
        except BlockingIOError:
            self.server.loop.modify(self.fd, OUT)
            return
        except OSError:
            pass  # the client left before its reply: nothing more to do for it
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close()

    def _timed_out(self) -> None:
        self.timer = None
        log.info("API socket: a client took over %gs; closed", CLIENT_TIMEOUT)
        self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.loop.remove(self.fd)
        self.conn.close()
        self.server._client_gone(self)
        self.fd = -1


def check_path(path: str) -> None:
    """Refuse, with one line, a path no Unix socket can have (checked before a namespace
    is made, and again at start)."""
    what = f"--api-socket {path}"
    if not path:
        raise UserError("--api-socket: empty path")
    size = len(os.fsencode(path))
    if size >= SUN_PATH_SIZE:
        raise UserError(f"{what}: the path is too long for a Unix socket ({size} bytes; at "
                        f"most {SUN_PATH_SIZE - 1})")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{what}: directory {directory} does not exist")


def _listen(path: str) -> socket.socket:
    """The listening socket, mode 0600 from the start; a stale socket file is replaced
    (slirp4netns unlinks whatever is there, even a regular file: we do not)."""
    check_path(path)
    return listen_private_unix(path, f"--api-socket {path}", MAX_CLIENTS)
