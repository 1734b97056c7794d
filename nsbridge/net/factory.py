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

import socket
import threading
from _queue import SimpleQueue
from collections import deque
from collections.abc import Callable

from nsbridge.linux.netns import Netns
from nsbridge.linux.signals import block_stop_signals

# typing.TYPE_CHECKING without importing typing: worker processes import this module, and
# typing (with re) costs each of them memory (docs/performance.md, Memory).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol, TypeVar

    T = TypeVar("T")

    class SocketFactory(Protocol):
        """Makes sockets in one namespace and runs namespace-sensitive calls there."""

        label: str

        def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket: ...

        def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

        def close(self) -> None: ...
else:
    class SocketFactory:
        """Makes sockets in one namespace and runs namespace-sensitive calls there
        (a protocol: ``label``, ``socket(family, type)``, ``call(fn, *args)``, ``close()``)."""

POOL_BATCH = 32
_SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


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
    The thread serves a queue of calls itself rather than through a ThreadPoolExecutor:
    worker processes use this class, and ``concurrent.futures`` (which imports
    ``logging``) would cost each of them memory (docs/performance.md, Memory).
    """

    def __init__(self, netns: Netns) -> None:
        self.label = netns.label
        self._requests: SimpleQueue = SimpleQueue()
        self._pools: dict[tuple[int, int], deque[socket.socket]] = {}
        self._thread: threading.Thread | None = threading.Thread(
            target=self._serve, name="netns", daemon=True)
        self._thread.start()
        try:
            self.call(netns.enter)
        except BaseException:
            self._stop(wait=False)
            raise

    def _serve(self) -> None:
        block_stop_signals()  # the main thread's loop handles SIGINT/SIGTERM
        while True:
            request = self._requests.get()
            if request is None:
                return
            fn, args, kwargs, reply = request
            try:
                result = (True, fn(*args, **kwargs))
            except BaseException as exc:
                result = (False, exc)
            reply.put(result)
            del request, fn, args, kwargs, reply, result

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the namespace thread; return its result or raise."""
        if self._thread is None:
            raise RuntimeError("socket factory closed")
        reply: SimpleQueue = SimpleQueue()
        self._requests.put((fn, args, kwargs, reply))
        ok, value = reply.get()
        if ok:
            return value
        try:
            raise value
        finally:
            del value

    def _stop(self, wait: bool) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._requests.put(None)
            if wait:
                thread.join()

    def socket(self, family: int, type: int = socket.SOCK_STREAM) -> socket.socket:
        pool = self._pools.get((family, type))
        if pool is None:
            pool = self._pools[(family, type)] = deque()
        if not pool:
            pool.extend(self.call(_make_sockets, family, type, POOL_BATCH))
        return pool.popleft()

    def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.popleft().close()
        self._stop(wait=True)


def _make_sockets(family: int, type: int, count: int) -> list[socket.socket]:
    return [socket.socket(family, type | _SOCK_FLAGS) for _ in range(count)]


def factory_for(netns: Netns | None) -> SocketFactory:
    """The cheapest factory that makes sockets in ``netns`` (None: the caller's namespace)."""
    if netns is None or netns.is_current():
        return LocalFactory()
    return ThreadFactory(netns)
