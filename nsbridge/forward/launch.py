"""Run a set of forwards the way ``nsbridge forward`` does: one-shot here, else a daemon.

A one-shot forward (-S pre-accepted client, -C pre-connected target, fd: targets)
carries exactly one connection: it runs in this process, without workers, and ends when
that connection does.  Everything else runs under the supervisor (daemon.py), after the
file-descriptor limit is raised for the many connections a daemon may hold.
"""

from __future__ import annotations

import logging
import signal

from nsbridge.forward.bridge import Bridge
from nsbridge.forward.daemon import DaemonOptions, run_daemon
from nsbridge.forward.forward import Forward
from nsbridge.forward.spec import ForwardSpec
from nsbridge.linux.limits import raise_nofile_limit
from nsbridge.linux.signals import StopSignals

log = logging.getLogger("nsbridge")


def run_forwards(specs: list[ForwardSpec], options: DaemonOptions, stops: StopSignals) -> int:
    """Run ``specs`` until they finish or a stop signal arrives; the exit status.

    ``specs`` come from :func:`nsbridge.forward.options.specs_from_args`, which already refused a
    one-shot forward mixed with others.
    """
    if len(specs) == 1 and specs[0].one_shot:
        return run_one_shot(specs[0], options, stops)
    return run_as_daemon(specs, options, stops)


def run_as_daemon(specs: list[ForwardSpec], options: DaemonOptions, stops: StopSignals) -> int:
    """The supervisor and its workers (``nsbridge serve`` always runs so), with the
    file-descriptor limit raised first for the connections a daemon may hold."""
    raise_nofile_limit()
    return run_daemon(specs, options, stops)


def run_one_shot(spec: ForwardSpec, options: DaemonOptions, stops: StopSignals) -> int:
    """-S/-C: one connection, in this process, no workers.  Exit status 1 when that
    connection never reached its target."""
    bridge = Bridge(mover=options.mover, relay=options.relay)  # type: ignore[arg-type]
    try:
        forward = bridge.add(spec)

        def on_stop(signum: int, count: int) -> None:
            if count == 1:
                log.info("%s: stopping", signal.Signals(signum).name)
            bridge.shutdown(options.drain if count == 1 else None)

        stops.attach(bridge.loop, on_stop)
        _log_forward(forward)
        bridge.run()
    finally:
        bridge.close()
    if forward.stats.connect_failed:
        return 1  # the one connection we were given never reached its target
    return 0


def _log_forward(forward: Forward) -> None:
    """The start-up line (-v); printed once signals are handled, so it means "ready"."""
    log.info("forwarding %s (netns %s) -> %s (netns %s)", forward.listen_address,
             forward.listen_factory.label, forward.target_description,
             forward.connect_factory.label)
