"""Bridge.remove: a forward stopped at run time (what slirp4netns's remove_hostfwd does
through the API socket), between two namespaces of the test's own.  New clients are
refused at once, a connection made before carries on, and closing the bridge still
resets that connection although its forward is gone from ``forwards``."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from helpers.netns import connect_in, delete_netns, listen_in, new_netns
from nsbridge.forward import Bridge, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import HostPort

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    client_side, server_side = new_netns("nsbr"), new_netns("nsbr")
    try:
        yield client_side, server_side
    finally:
        delete_netns(client_side)
        delete_netns(server_side)


def _echo(server: socket.socket) -> None:
    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except ConnectionResetError:
                pass  # the bridge reset it: what the test wants

    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def test_removed_forward_refuses_new_clients_and_keeps_old_ones(two_netns):
    client_side, server_side = two_netns
    server = listen_in(server_side, port=7000)
    threading.Thread(target=_echo, args=(server,), daemon=True).start()
    bridge = Bridge()
    closed = False
    try:
        forward = bridge.add(ForwardSpec(
            ListenAddress(HostPort("127.0.0.1", 7001), Netns.from_spec(client_side)),
            ConnectAddress(HostPort("127.0.0.1", 7000), Netns.from_spec(server_side))))
        bridge.start_thread()
        early = connect_in(client_side, ("127.0.0.1", 7001))
        early.sendall(b"one")
        assert early.recv(16) == b"one"

        bridge.call(bridge.remove, forward)
        assert bridge.forwards == []
        with pytest.raises(ConnectionRefusedError):
            connect_in(client_side, ("127.0.0.1", 7001))
        early.sendall(b"two")
        assert early.recv(16) == b"two"

        bridge.close()
        closed = True
        try:
            assert early.recv(16) == b""  # reset or closed by close(), not left open
        except ConnectionResetError:
            pass
        early.close()
    finally:
        if not closed:
            bridge.close()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
