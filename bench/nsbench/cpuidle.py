"""Keeping the CPUs out of idle states for a benchmark run (usernet_bench --poll-idle).

Why: on a virtual machine whose idle vCPUs halt (KVM's haltpoll driver, Firecracker),
waking a task on an idle vCPU costs the waker several µs of exits, so a row that leaves
the server's CPU idle more often (a slower client) pays more per request than one that
keeps it busy. Holding the PM QoS request ``/dev/cpu_dma_latency`` at 0 makes every CPU
poll instead of halting while the file stays open, which takes that effect out of the
comparison. It costs idle CPU time (the CPUs spin), so it is an option, off by default.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from nsbench.procs import BenchError

PM_QOS_DEVICE = "/dev/cpu_dma_latency"


@contextmanager
def cpus_kept_awake(enabled: bool) -> Iterator[None]:
    """While inside, no CPU enters an idle state deeper than polling (when ``enabled``)."""
    if not enabled:
        yield
        return
    try:
        fd = os.open(PM_QOS_DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BenchError(f"--poll-idle: cannot open {PM_QOS_DEVICE}: {exc.strerror}") from exc
    try:
        os.write(fd, struct.pack("=i", 0))  # the request lasts while the fd is open
        yield
    finally:
        os.close(fd)
