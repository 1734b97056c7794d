"""The socket factory: make sockets that belong to a given network namespace.

A socket belongs forever to the namespace it was created in, and setns() moves only the
calling thread.  So a factory for namespace X is a thread that entered X once and makes
sockets on request; the event loop then uses those sockets from any thread.  Everything
namespace-specific in nsbridge goes through :class:`SocketFactory`, so the rest of the
code never cares where a socket lives.

Creating sockets one round trip at a time would cost a thread hand-off per accepted
connection, so :meth:`ThreadFactory.socket` hands out sockets from a small pool that the
namespace thread refills in batches.
"""

from __future__ import annotations

import signal
import socket
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from .netns import Netns

T = TypeVar("T")

_POOL_BATCH = 32
_SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


class SocketFactory(Protocol):
    """Makes sockets in one namespace and runs namespace-sensitive calls there."""

    label: str

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket: ...

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def close(self) -> None: ...


class LocalFactory:
    """The caller's own namespace: no thread, no hand-off."""

    label = "current"

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket.socket(family, type | _SOCK_FLAGS)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def close(self) -> None:
        pass


class ThreadFactory:
    """A thread parked inside ``netns`` that creates sockets and runs calls there.

    Construction enters the namespace and raises :class:`~nsbridge.errors.UserError` at
    once if that is not permitted, so a bad namespace is reported before anything listens.
    """

    def __init__(self, netns: Netns) -> None:
        self.label = netns.label
        self._netns = netns
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns",
                                            initializer=_block_stop_signals)
        self._pools: dict[tuple[int, int], deque[socket.socket]] = {}
        try:
            self._executor.submit(netns.enter).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the namespace thread; return its result or raise."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket:
        pool = self._pools.get((family, type))
        if pool is None:
            pool = self._pools[(family, type)] = deque()
        if not pool:
            pool.extend(self.call(_make_sockets, family, type, _POOL_BATCH))
        return pool.popleft()

    def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.popleft().close()
        self._executor.shutdown(wait=True)


def _block_stop_signals() -> None:
    """Namespace threads never take SIGINT/SIGTERM: the main thread's loop handles them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _make_sockets(family: int, type: int, count: int) -> list[socket.socket]:
    return [socket.socket(family, type | _SOCK_FLAGS) for _ in range(count)]


def factory_for(netns: Netns | None) -> SocketFactory:
    """The cheapest factory that makes sockets in ``netns`` (None: the caller's namespace)."""
    if netns is None or netns.is_current():
        return LocalFactory()
    return ThreadFactory(netns)
