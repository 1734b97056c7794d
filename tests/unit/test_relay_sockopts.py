"""$NSBRIDGE_RELAY_SOCKOPTS's parser (``relay/native.py``: parse_sockopts), sans-IO.

The variable hands the native core socket options to set on every relayed socket (the
tuning knobs of issue 19); a value it cannot read must be refused with the item named,
never applied in part.  That the core then sets them, on the sides asked, is checked on
real sockets in tests/forward/test_native_core.py.
"""

from __future__ import annotations

import socket

import pytest

from nsbridge.errors import UserError
from nsbridge.relay.native import parse_sockopts

SOL, TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP


def test_items_become_core_tuples() -> None:
    assert parse_sockopts("") == []
    assert parse_sockopts(" , ") == []
    assert parse_sockopts("server:sndbuf=16M, client:rcvbuf=512k,notsent_lowat=128K,"
                          "both:busy_poll=50") == [
        (2, SOL, 32, 16 << 20),
        (1, SOL, 33, 512 << 10),
        (3, TCP, 25, 128 << 10),
        (3, SOL, 46, 50),
    ]


@pytest.mark.parametrize("text", [
    "turbo=1",               # unknown option
    "sndbuf",                # no value
    "sndbuf=",               # empty value
    "sndbuf=-1",             # negative
    "sndbuf=1.5M",           # not an integer
    "sndbuf=2048M",          # 2 GiB: beyond an int
    "sndbuf=1G",             # unknown unit
    "left:sndbuf=1M",        # unknown side
    "server:client:sndbuf=1M",
    "sndbuf=1M;busy_poll=5",  # wrong separator
    ",".join(["busy_poll=1"] * 9),  # more than the core takes
])
def test_bad_values_are_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(UserError, match=r"\$NSBRIDGE_RELAY_SOCKOPTS"):
        parse_sockopts(text)
