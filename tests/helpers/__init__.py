"""What the tests share: plain modules, no tests, one concern each.

* :mod:`.environment` — the checkout's root, and whether a tool is installed.
* :mod:`.waiting` — polling for a condition with a deadline.
* :mod:`.netns` — named namespaces, and sockets made inside them by a thread of the test's own.
* :mod:`.usernet_host` — the "host" namespace user-mode networking tests run nsbridge in.
* :mod:`.servers` — echo, half-close, one-record DNS and UDP servers; client round trips.
* :mod:`.processes` — nsbridge as a process (command line, a running forwarder), /proc.
* :mod:`.control` — ``nsbridge ctl`` and the daemon's counters read through it.
* :mod:`.relay_loop` — a loopback TCP pair and the event loop run in a thread.
* :mod:`.bpf_filter` — a classic-BPF interpreter: a seccomp filter's verdict on one call.
* :mod:`.switching` — the socket-switching tests' world: host and outside namespaces,
  servers that answer with the client address they saw.
* :mod:`.switch_probe` — the socket-switching tests' program inside ``run --bypass``
  (stdlib only).
* :mod:`.switch_probe_tcp` — more cases for that program: resets, silent and down
  targets, threads, signals, a re-parented daemon.
* :mod:`.signal_driver` — the signal tests' API driver in the host namespace.
* :mod:`.tun_engine` — the tun engine on a socketpair, its loop in a namespace.
* :mod:`.tcp_mix` — the soak tests' TCP scenario (server program and clients).
* :mod:`.bypass` — the policy-bypass harness: presets, the ``Case`` record, sentinels, checks.
* :mod:`.bypass_attempt` — the bypass tests' program inside the sandbox (stdlib only).
* :mod:`.bypass_driver` — the bypass tests' API driver in the host namespace.
* :mod:`.isolation_scanner` — the program inside the sandbox that tries to reach nsbridge's
  helpers (``/proc``, ptrace, pidfd_getfd).
* :mod:`.redirect_driver` — both ends of the TCP fast path, driven for real.
* :mod:`.unprivileged` — running Python as uid 65534 with the tests' dependencies.
* :mod:`.rootlesskit` — rootlesskit as the real client of a slirp4netns-compatible helper:
  an unprivileged user with subordinate ids, host and outside namespaces, the helper.
* :mod:`.nested` — a container behind a bridge inside a namespace, masqueraded out of
  one device (a shell script), and the prerouting redirect's counter.
* :mod:`.rootlesskit_probe` — the rootlesskit tests' program inside its namespace
  (stdlib only).

Test modules import these (``from helpers.netns import in_netns``: pyproject puts
``tests/`` on the path); no test module imports another, and nothing imports conftest.
"""
