"""The data plane, shared by forwarding and user-mode networking.

* :mod:`.loop` — the epoll event loop with timers.
* :mod:`.accept` — accepting in batches, with one overload policy (EMFILE: pause, retry).
* :mod:`.pipes` — the pool of pipes ``splice`` moves bytes through.
* :mod:`.tcp` — a TCP session: two sockets, half-close and resets carried, the movers.
* :mod:`.movers` — the movers by name (``splice``/``copy``).
* :mod:`.native` — the native TCP relay's Python side (``_tcprelay.c``): which relay
  serves, and the C core doing a loop's waiting and its connections' events.
* :mod:`.udp` — the UDP flow relay (one connected socket per client flow), its flow
  table and idle sweep (the tun engine uses both).
* :mod:`.log` — the logger the data plane writes to (a small stand-in in workers).

Nothing here imports :mod:`nsbridge.forward`, :mod:`nsbridge.usernet` or
:mod:`nsbridge.cli` (tests/test_layout.py checks).
"""
