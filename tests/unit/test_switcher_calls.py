"""The switcher's pool for calls that may block (nsbridge.usernet.host.switcher): however
many a program starts at once, at most ``MAX_THREADS`` threads run them, and every one
is run in the end."""

from __future__ import annotations

import threading

from helpers.waiting import wait_until
from nsbridge.usernet.host.switcher import _BlockingCalls


def test_blocking_calls_are_bounded_and_all_run() -> None:
    pool = _BlockingCalls()
    release = threading.Event()
    lock = threading.Lock()
    running = {"now": 0, "most": 0, "done": 0}

    def job() -> None:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        release.wait(10)
        with lock:
            running["now"] -= 1
            running["done"] += 1

    for _ in range(200):
        pool.submit(job)
    wait_until(lambda: running["now"] == pool.MAX_THREADS, timeout=10)
    assert running["most"] == pool.MAX_THREADS
    release.set()
    wait_until(lambda: running["done"] == 200, timeout=10)
    wait_until(lambda: pool._threads == 0, timeout=10)
