"""The Bridge: one event loop carrying any number of forwards — the library's entry point.

    from nsbridge import Bridge, ForwardSpec, ListenAddress, ConnectAddress, Netns
    from nsbridge.net.addresses import parse_host_port

    with Bridge() as bridge:
        fwd = bridge.add(ForwardSpec(
            ListenAddress(parse_host_port("127.0.0.1:8080", what="listen", allow_port_zero=True)),
            ConnectAddress(parse_host_port("127.0.0.1:80", what="connect", allow_port_zero=False),
                           Netns.from_spec("myns")),
        ))
        bridge.run()          # or bridge.start_thread() and carry on

Socket factories are shared per namespace, so many forwards into one namespace cost one
thread.  ``run()`` returns when stop()/shutdown() is called, or when every forward was a
one-shot (-S/-C) forward that has finished.
"""

from __future__ import annotations

import threading

from nsbridge.forward.forward import ConnectAddress, Forward, ForwardSpec, ListenAddress
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import ResolvedAddress
from nsbridge.net.factory import SocketFactory, factory_for
from nsbridge.relay.log import log
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.movers import MoverName, make_mover
from nsbridge.relay.native import NativeRelay, chosen_relay
from nsbridge.relay.tcp import SplicePipeMover

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")


class Bridge:
    def __init__(self, mover: MoverName = "splice", pipe_size: int | None = None,
                 relay: str | None = None) -> None:
        """``relay``: "native" (the C core relays TCP connections; the default when it
        was built) or "python" (relay/tcp.py); None reads $NSBRIDGE_RELAY."""
        self.loop = EventLoop()
        self.mover = make_mover(mover, pipe_size)
        self.relay = chosen_relay(relay)
        self.native = (NativeRelay(self.loop, mover, pipe_size) if self.relay == "native"
                       else None)
        self.forwards: list[Forward] = []
        # Removed forwards whose connections still run: close() must still reset them.
        self._removed: list[Forward] = []
        self._factories: dict[tuple[int, int] | None, SocketFactory] = {}
        self._thread: threading.Thread | None = None
        self._draining = False

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- building -------------------------------------------------------------------

    def factory(self, netns: Netns | None) -> SocketFactory:
        """The shared socket factory for ``netns`` (None: this thread's namespace)."""
        key = None if netns is None else netns.identity()
        factory = self._factories.get(key)
        if factory is None and key is not None and netns is not None and netns.is_current():
            key = None
            factory = self._factories.get(key)
        if factory is None:
            factory = self._factories[key] = factory_for(None if key is None else netns)
        return factory

    def register_factory(self, netns: Netns, factory: SocketFactory) -> None:
        """Use ``factory`` for sockets in ``netns`` (e.g. a process living inside a
        sandbox, where a thread cannot setns)."""
        self._factories[netns.identity()] = factory

    def add(self, spec: ForwardSpec, *, start: bool = True) -> Forward:
        """Validate and open ``spec`` (raises UserError), then start carrying connections.

        Safe before run() or from the loop thread; from other threads use call().
        ``start=False`` only opens it (listener bound, target resolved): the supervisor
        does that once, then hands the opened forward to its workers with adopt().
        """
        listen_ns = spec.listen.netns if isinstance(spec.listen, ListenAddress) else None
        connect_ns = spec.connect.netns if isinstance(spec.connect, ConnectAddress) else None
        forward = Forward(
            spec=spec,
            loop=self.loop,
            mover=self.mover,
            listen_factory=self.factory(listen_ns),
            connect_factory=self.factory(connect_ns),
            on_finished=self._forward_finished,
            native=self.native,
        )
        forward.open()
        self.forwards.append(forward)
        if start:
            forward.start()
        return forward

    def remove(self, forward: Forward) -> None:
        """Stop ``forward`` at run time: its listener closes at once (new clients are
        refused; a UDP forward's flows end with it), while its TCP connections carry on
        until they end, as a removed slirp4netns hostfwd's do.  Loop thread only."""
        forward.stop_listening()
        self.forwards.remove(forward)
        self._removed = [f for f in self._removed if f.open_connections]
        if forward.open_connections:
            self._removed.append(forward)

    def adopt(self, spec: ForwardSpec, target: ResolvedAddress, netns: Netns | None) -> Forward:
        """A worker's copy of a forward the supervisor opened: same target, no listener
        (clients arrive through start_session), and this process's own socket factory."""
        forward = Forward(
            spec=spec,
            loop=self.loop,
            mover=self.mover,
            listen_factory=self.factory(None),
            connect_factory=self.factory(netns),
            on_finished=self._forward_finished,
            target=target,
            native=self.native,
        )
        forward.build_acl()
        self.forwards.append(forward)
        return forward

    def close_factories(self) -> None:
        """End the namespace threads (before fork(): a child must not inherit threads)."""
        for factory in self._factories.values():
            factory.close()
        self._factories.clear()

    def _forward_finished(self, _forward: Forward) -> None:
        if all(f.finished for f in self.forwards):
            self.loop.stop()

    # ---- running --------------------------------------------------------------------

    def run(self) -> None:
        self.loop.run()

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (for embedding and the demo)."""
        self._thread = threading.Thread(target=self.run, name="nsbridge-loop", daemon=True)
        self._thread.start()
        return self._thread

    def call(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)`` on the loop thread and wait for its result."""
        from concurrent.futures import Future

        result: Future[_T] = Future()

        def run() -> None:
            try:
                result.set_result(fn(*args))
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return result.result()

    @property
    def active_connections(self) -> int:
        return sum(f.open_connections for f in self.forwards)

    def shutdown(self, drain: float | None = None) -> None:
        """Stop accepting; reset what is still open (after up to ``drain`` seconds); stop.

        Loop-thread only (signal handlers reach it through call_soon_threadsafe).
        """
        for forward in self.forwards:
            forward.stop_listening()
        if drain and self.active_connections:
            if self._draining:
                return
            self._draining = True
            log.info("draining %d connection(s) for up to %.1fs", self.active_connections, drain)
            self.loop.call_later(drain, self._end_drain)
            self._poll_drained()
            return
        self._end_drain()

    def _poll_drained(self) -> None:
        if self.active_connections == 0:
            self.loop.stop()
        else:
            self.loop.call_later(0.05, self._poll_drained)

    def _end_drain(self) -> None:
        for forward in self.forwards:
            forward.abort_all("reset: nsbridge stopping")
        self.loop.stop()

    def stop(self) -> None:
        """Stop the loop from any thread (connections are left as they are until close())."""
        self.loop.stop()

    def close(self) -> None:
        """Release everything: listeners, connections (reset), namespace threads."""
        if self._thread is not None and self._thread.is_alive():
            self.loop.stop()
            self._thread.join(timeout=5)
        for forward in self.forwards + self._removed:
            forward.stop_listening()
            forward.abort_all("reset: nsbridge closing")
        self.close_factories()
        if self.native is not None:
            self.native.close()
        if isinstance(self.mover, SplicePipeMover):
            self.mover.pool.close()
        self.loop.close()
