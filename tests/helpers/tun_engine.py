"""nsbridge's tun engine driven by a test: its "tun" one end of a datagram socketpair
(the same message-per-frame semantics, and the test reads exactly what the engine wrote),
its event loop in a thread that entered a namespace of the test's own when given, so every
host socket the engine makes lives there."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from helpers.netns import CLONE_NEWNET
from nsbridge.relay.loop import EventLoop
from nsbridge.usernet.host.engine import TunEngine
from nsbridge.usernet.proto.packets import Parsed, parse_frame
from nsbridge.usernet.proto.policy import Policy, UsernetAddresses

_libc = ctypes.CDLL(None, use_errno=True)
ADDRS = UsernetAddresses()
NS4, GW4, DNS4 = ADDRS.namespace.packed, ADDRS.gateway.packed, ADDRS.dns.packed
NS6, GW6 = ADDRS.namespace6.packed, ADDRS.gateway6.packed


class PairEngine:
    """An engine whose "tun" is one end of a datagram socketpair; the test holds the other.

    Its loop runs in a thread (in ``netns`` when given, so host sockets are made there).
    """

    def __init__(self, policy: Policy, resolvers: list[tuple[str, int]],
                 netns: str | None = None, **kwargs: Any) -> None:
        self.test_end, self.tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.test_end.settimeout(5)
        self.runner = EngineRunner(self.tun_end.fileno(), 10, (), policy, resolvers, netns,
                                   **kwargs)

    def send(self, frame: bytes) -> None:
        self.test_end.send(frame)

    def receive(self) -> Parsed:
        parsed = parse_frame(self.test_end.recv(1 << 17))
        assert isinstance(parsed, Parsed), parsed
        return parsed

    def nothing_pending(self, wait: float = 0.3) -> bool:
        self.test_end.settimeout(wait)
        try:
            self.test_end.recv(1 << 17)
        except TimeoutError:
            return True
        finally:
            self.test_end.settimeout(5)
        return False

    def close(self) -> None:
        self.runner.stop()
        self.test_end.close()
        self.tun_end.close()


class EngineRunner:
    """A TunEngine on its own EventLoop in a thread that entered ``netns`` (if given)."""

    def __init__(self, tun: int, vnet_hdr_size: int, offloads: tuple[str, ...],
                 policy: Policy, resolvers: list[tuple[str, int]], netns: str | None,
                 **kwargs: Any) -> None:
        self.loop: EventLoop | None = None
        self.engine: TunEngine | None = None
        self.error: BaseException | None = None
        ready = threading.Event()

        def run() -> None:
            try:
                if netns is not None:
                    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                    try:
                        if _libc.setns(fd, CLONE_NEWNET) != 0:
                            raise OSError(ctypes.get_errno(), "setns")
                    finally:
                        os.close(fd)
                self.loop = EventLoop()
                self.engine = TunEngine(self.loop, tun, vnet_hdr_size, policy, ADDRS,
                                        resolvers, offloads=offloads, **kwargs)
                self.engine.start()
            except BaseException as exc:
                self.error = exc
                ready.set()
                return
            ready.set()
            try:
                self.loop.run()
            finally:
                self.engine.close()
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        if self.error is not None:
            raise self.error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop's thread (the engine is single-threaded) and return it."""
        assert self.loop is not None
        box: dict[str, Any] = {}
        done = threading.Event()

        def wrapped() -> None:
            try:
                box["value"] = fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(wrapped)
        assert done.wait(10), "the engine's loop does not respond"
        return box["value"]

    def stats(self) -> dict[str, Any]:
        assert self.engine is not None
        engine = self.engine
        return self.call(lambda: engine.stats.as_dict())

    def stop(self) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
