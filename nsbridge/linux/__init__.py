"""Thin wrappers over the kernel, with nothing of nsbridge's jobs in them.

* :mod:`.libc` — the one ctypes handle on the C library, and a checked call whose
  OSError names the system call that failed.
* :mod:`.netns` — network namespace handles (``Netns``), ``setns``/``unshare`` through libc.
* :mod:`.signals` — SIGINT/SIGTERM read from a signalfd, so no stop signal is ever lost,
  and blocked in every other thread.
* :mod:`.lifetime` — ``--exit-with PID`` (pidfds) and ``--ready-fd``.
* :mod:`.limits` — the open-file limit raised to what the kernel allows.
* :mod:`.systemd` — socket activation (``LISTEN_FDS``) and ``sd_notify``.
* :mod:`.reuseport_bpf` — the hand-assembled eBPF program that deals SO_REUSEPORT
  connections to workers in turn, loaded with ``bpf(2)``.
* :mod:`.seccomp` — a deny-list seccomp filter assembled as classic BPF (pure) and
  installed with ``seccomp(2)``, for x86_64 and aarch64.
* :mod:`.seccomp_notify` — serving a seccomp user-notification listener: RECV, SEND,
  ID_VALID, ADDFD, the caller's memory and fds (``run --bypass``).
* :mod:`.notifycore` — whether the native switching core (``_notifycore.c``: a switched
  connect's system calls, one call per step) or the Python path serves.
* :mod:`.sockdiag` — the TCP listeners of this network namespace by inode
  (``NETLINK_SOCK_DIAG``): whether a listener handed to a program still exists.
* :mod:`.inroot` — a Unix socket path resolved inside another process's root
  (``openat2(RESOLVE_IN_ROOT)``), for the binds and connects ``run --bypass`` performs.
* :mod:`.nssocket` — a socket made in another process's network namespace by a forked
  child that joins its user namespace first (what an unprivileged caller can do).
* :mod:`.rtaddr` — rtnetlink address messages (the ``RTM_GETADDR`` dump, address
  events), sans-IO, for readers that must not wait for pyroute2's import.
* :mod:`.lockdown` — a process locks itself down: a user namespace joined, an empty root
  with a few directories bound read-only (``pivot_root``), capabilities dropped.

Nothing here imports :mod:`nsbridge.relay`, :mod:`nsbridge.forward`,
:mod:`nsbridge.usernet` or :mod:`nsbridge.cli` (tests/test_layout.py checks).
"""
