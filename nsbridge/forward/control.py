"""The control socket: change and inspect a running daemon, one JSON object per line.

Protocol (documented in docs/control.md for other programs): a client connects to the Unix
socket, writes one JSON object per line, and reads one JSON object per line back, in
order.  Every reply has ``"ok"``; a failed request has ``"error"`` with a sentence.

    {"cmd": "list"}                      -> {"ok": true, "forwards": [...]}
    {"cmd": "stats"}                     -> {"ok": true, "stats": [...]}
    {"cmd": "add", "name": "web", "listen": "tcp:127.0.0.1:8080",
     "connect": "tcp:127.0.0.1:80,netns=web", ...}  -> {"ok": true}
    {"cmd": "remove", "name": "web", "kill": false} -> {"ok": true}

Who may talk: the socket file is created mode 0600, and each client's credentials
(SO_PEERCRED) are checked: only root and the daemon's own user are served.  A hostile or
broken client cannot hurt the daemon: lines are capped at ``MAX_LINE`` bytes (a longer one
ends that client), garbage gets an error reply, a client that does not read its replies
is dropped once ``MAX_PENDING`` bytes are waiting, and at most ``MAX_CLIENTS`` are served.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from nsbridge.errors import UserError
from nsbridge.net.sockets import remove_unix_socket
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import IN, OUT, EventLoop

log = logging.getLogger("nsbridge")

MAX_LINE = 64 * 1024
MAX_PENDING = 1 << 20
MAX_CLIENTS = 32

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    def __init__(self, loop: EventLoop, path: str, handle: Handler) -> None:
        self.loop = loop
        self.path = path
        self.handle = handle
        self.sock = _listen(path)
        self.clients: dict[int, _Client] = {}
        # relay/accept.py's policy: out of fds, the daemon pauses accepting control
        # clients instead of spinning on the socket, and serves them once it can.
        self._acceptor = Acceptor(loop, self.sock, self._on_client,
                                  name=f"control socket {path}")
        self._acceptor.start()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _on_client(self, conn: socket.socket, _peer: object) -> None:
        conn.setblocking(False)
        uid = _peer_uid(conn)
        if uid not in (0, os.geteuid()):
            log.warning("control: refused a client with uid %s", uid)
            _send_now(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                             "use this control socket (only root and the daemon's user)"})
            conn.close()
            return
        if len(self.clients) >= MAX_CLIENTS:
            _send_now(conn, {"ok": False, "error": "too many control clients"})
            conn.close()
            return
        client = _Client(self, conn)
        self.clients[conn.fileno()] = client
        self.loop.add(conn.fileno(), IN, client.on_event)

    def answer(self, line: bytes) -> dict[str, Any]:
        """One request line to one reply; never raises."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a JSON object, e.g. {\"cmd\": \"list\"}"}
        try:
            return self.handle(request)
        except UserError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("control: request %r failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {exc}"}

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        self._acceptor.close()
        self.sock.close()
        remove_unix_socket(self.path)


class _Client:
    def __init__(self, server: ControlServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.fd = conn.fileno()
        self.inbox = bytearray()
        self.outbox = bytearray()

    def on_event(self, events: int) -> None:
        if events & OUT and not self._flush():
            return
        if events & IN:
            self._read()

    def _read(self) -> None:
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbox += data
        # Look for the newline only within MAX_LINE bytes: a longer line must be refused
        # even when its newline arrived in the same read.
        while (end := self.inbox.find(b"\n", 0, MAX_LINE + 1)) >= 0:
            line = bytes(self.inbox[:end])
            del self.inbox[: end + 1]
            if line.strip():
                self._reply(self.server.answer(line))
            if self.fd < 0:
                return
        if len(self.inbox) > MAX_LINE:
            self._reply({"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
            self.close()

    def _reply(self, reply: dict[str, Any]) -> None:
        self.outbox += json.dumps(reply).encode() + b"\n"
        if len(self.outbox) > MAX_PENDING:
            log.warning("control: dropping a client that does not read its replies")
            self.close()
            return
        self._flush()

    def _flush(self) -> bool:
        try:
            while self.outbox:
                sent = self.conn.send(self.outbox)
                del self.outbox[:sent]
        except BlockingIOError:
            self.server.loop.modify(self.fd, IN | OUT)
            return True
        except OSError:
            self.close()
            return False
        self.server.loop.modify(self.fd, IN)
        return True

    def close(self) -> None:
        if self.fd < 0:
            return
        self.server.loop.remove(self.fd)
        self.server.clients.pop(self.fd, None)
        self.conn.close()
        self.fd = -1


def _listen(path: str) -> socket.socket:
    """Create the socket file 0600 from the start (umask), replacing a stale one."""
    from nsbridge.net.sockets import listen_private_unix

    if not path:
        raise UserError("--control: empty path")
    sock = listen_private_unix(path, f"--control {path}", 16)
    sock.setblocking(False)
    return sock


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _send_now(conn: socket.socket, reply: dict[str, Any]) -> None:
    try:
        conn.send(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


# ---- client side (nsbridge ctl, and other Python programs) ----------------------------


def request(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its reply (a JSON object).

    Whatever comes back is checked before it is returned: a reply cut short, one that
    is not JSON, or JSON that is not an object is a :class:`UserError` line (the socket
    may belong to another program, or the daemon died mid-reply), never a traceback.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise UserError(f"--control {path}: no such socket (is the daemon running with "
                        f"--control {path}?)") from None
    except PermissionError:
        raise UserError(f"--control {path}: permission denied (the socket is only for root "
                        "and the daemon's user)") from None
    except OSError as exc:
        raise UserError(f"--control {path}: cannot connect: {exc.strerror}") from None
    with sock:
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # refused (too many clients, wrong user): its reply is waiting to be read
        buffer = b""
        try:
            while b"\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise UserError(f"--control {path}: the daemon closed the connection"
                                    + (" in the middle of its reply" if buffer else ""))
                buffer += chunk
        except TimeoutError:
            raise UserError(f"--control {path}: no reply within {timeout:g}s") from None
        except OSError as exc:
            raise UserError(f"--control {path}: cannot read the reply: {exc.strerror}"
                            ) from None
    return _parse_reply(path, buffer.split(b"\n", 1)[0])


def _parse_reply(path: str, line: bytes) -> dict[str, Any]:
    """One reply line as a JSON object; anything else is a UserError naming the socket."""
    try:
        reply = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"--control {path}: the reply is not JSON ({_excerpt(line)}); is "
                        "this an nsbridge control socket?") from None
    if not isinstance(reply, dict):
        raise UserError(f"--control {path}: the reply is not a JSON object ({_excerpt(line)}); "
                        "is this an nsbridge control socket?")
    return reply


def _excerpt(line: bytes, limit: int = 40) -> str:
    """The start of a reply, printable, for an error message."""
    text = line[:limit].decode(errors="replace")
    return repr(text + ("..." if len(line) > limit else ""))
