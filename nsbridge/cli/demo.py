"""``nsbridge demo``: a real forward into a throwaway namespace, explained step by step.

Nothing outside this process is touched: the namespace is anonymous (it lives as long as
we hold its fd, so it disappears even if the demo is killed), the HTTP server runs on a
socket created inside it, and all traffic stays on loopback.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import socket
import threading
import time
import urllib.request

from nsbridge.dependencies import require_pyroute2
from nsbridge.errors import UserError
from nsbridge.forward.bridge import Bridge
from nsbridge.forward.forward import ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.linux.netns import CLONE_NEWNET, Netns, unshare
from nsbridge.net.addresses import parse_host_port
from nsbridge.relay.movers import MoverName

SERVER_PORT = 8000
BLOB_SIZE = 64 << 20


def create_anonymous_netns() -> Netns:
    """A fresh network namespace held only by an fd: no name, nothing to clean up on disk."""
    result: dict[str, object] = {}

    def make() -> None:
        try:
            unshare(CLONE_NEWNET)
            result["netns"] = Netns(
                os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC), "demo"
            )
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=make, name="netns-create")
    thread.start()
    thread.join()
    error = result.get("error")
    if isinstance(error, OSError):
        if error.errno == errno.EPERM:
            raise UserError(
                "the demo creates a network namespace, which needs root: run it as root, "
                "or unprivileged as `unshare -Ur nsbridge demo`"
            )
        raise UserError(f"cannot create a network namespace: {error.strerror}")
    netns = result["netns"]
    assert isinstance(netns, Netns)
    return netns


def bring_loopback_up() -> None:
    """Run inside the namespace: a new namespace's ``lo`` starts down."""
    require_pyroute2("the demo")
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")


def _make_handler(greeting: bytes, blob: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = blob if self.path == "/blob" else greeting
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream" if body is blob
                             else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def run_demo(mover: MoverName = "splice") -> int:
    step = _Steps(6)
    netns = create_anonymous_netns()
    inode = os.fstat(netns.fd).st_ino
    step(f"created a throwaway network namespace (net:[{inode}]); "
         "it has only a loopback interface, which is down")
    bridge = Bridge(mover=mover)
    server: http.server.ThreadingHTTPServer | None = None
    try:
        factory = bridge.factory(netns)
        factory.call(bring_loopback_up)
        step("brought its loopback up (netlink, from a thread that entered the namespace)")

        greeting = f"Hello from inside network namespace net:[{inode}]\n".encode()
        blob = os.urandom(1 << 20) * (BLOB_SIZE >> 20)
        listener = factory.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setblocking(True)
        listener.bind(("127.0.0.1", SERVER_PORT))
        listener.listen(64)
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", SERVER_PORT), _make_handler(greeting, blob), bind_and_activate=False
        )
        server.socket = listener
        threading.Thread(target=server.serve_forever, daemon=True).start()
        step(f"started an HTTP server inside it on 127.0.0.1:{SERVER_PORT}; "
             "that is the namespace's own loopback, unreachable from here")

        forward = bridge.add(ForwardSpec(
            ListenAddress(parse_host_port("127.0.0.1:0", what="listen", allow_port_zero=True)),
            ConnectAddress(parse_host_port(f"127.0.0.1:{SERVER_PORT}", what="connect",
                                           allow_port_zero=False), netns),
        ))
        bridge.start_thread()
        here = forward.listen_address
        step(f"forwarding {here} (this namespace) -> 127.0.0.1:{SERVER_PORT} (demo namespace)\n"
             f"      same as: nsbridge forward -l {here} --connect-netns PATH "
             f"-c 127.0.0.1:{SERVER_PORT}")

        with urllib.request.urlopen(f"http://{here}/", timeout=10) as response:
            text = response.read().decode().strip()
            step(f"GET http://{here}/ -> {response.status} {response.reason}: {text!r}")
        started = time.monotonic()
        with urllib.request.urlopen(f"http://{here}/blob", timeout=30) as response:
            digest = hashlib.sha256(response.read()).hexdigest()
        seconds = time.monotonic() - started
        verdict = "matches" if digest == hashlib.sha256(blob).hexdigest() else "DOES NOT MATCH"
        print(f"      GET /blob: {BLOB_SIZE >> 20} MiB in {seconds:.2f}s, sha256 {verdict} "
              "the server's")
        if verdict != "matches":
            return 1
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        bridge.close()
        netns.close()
    step("stopped the forward and closed the namespace; nothing is left behind")
    print("demo passed: the forward carried a page and 64 MiB intact into another namespace "
          "and back")
    return 0


class _Steps:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def __call__(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}", flush=True)
