"""The event loop's timers: cancelled ones never run and do not pile up in memory."""

from __future__ import annotations

import gc
import weakref

from nsbridge.relay.loop import EventLoop


class _Session:
    """Stands for a relayed connection that a connect timer refers to."""


def test_cancelled_timers_release_what_they_refer_to_and_are_compacted():
    loop = EventLoop()
    try:
        sessions = [_Session() for _ in range(2000)]
        refs = [weakref.ref(s) for s in sessions]
        timers = [loop.call_later(30, s.__init__) for s in sessions]
        for timer in timers:
            timer.cancel()
            timer.cancel()  # twice is harmless
        del sessions, timers
        gc.collect()
        assert all(ref() is None for ref in refs)  # no cancelled timer keeps a session alive
        assert len(loop._timers) < 500  # the heap was compacted long before its deadlines
    finally:
        loop.close()


def test_live_timers_still_fire_in_order_after_compaction():
    loop = EventLoop()
    fired: list[int] = []
    try:
        doomed = [loop.call_later(0.05, lambda: fired.append(-1)) for _ in range(1000)]
        for i in range(3):
            loop.call_later(0.01 * (i + 1), lambda i=i: fired.append(i))
        for timer in doomed:
            timer.cancel()
        loop.call_later(0.1, loop.stop)
        loop.run()
        assert fired == [0, 1, 2]
    finally:
        loop.close()
