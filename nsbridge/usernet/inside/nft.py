"""Program the TCP fast path's nftables redirect, over netlink, inside a namespace.

The rule set is the netlink equivalent of::

    table inet nsbridge {
        chain output {
            type nat hook output priority -100; policy accept;
            oifname "lo" return
            meta l4proto tcp tcp flags & (fin|syn|rst|ack) == syn redirect to :PORT
        }
    }

Every TCP connection the namespace *originates* (hook ``output``) and that does not go
over ``lo`` is rewritten by the kernel to ``127.0.0.1:PORT`` / ``[::1]:PORT``, where the
host side's listener accepts it and learns the real destination from ``SO_ORIGINAL_DST``
(see :mod:`~nsbridge.usernet.host.redirect`).  Loopback is left alone so programs inside
can still talk to each other, and so the listener itself is never redirected into itself.

With ``device`` (a namespace nsbridge did not make: a TAP that rootlesskit or podman
owns), the first rule is ``oifname != DEVICE return`` instead: only connections that
leave by nsbridge's device are nsbridge's; traffic to the caller's own bridges, VPNs or
other devices stays theirs.

With ``forwarded`` (the name of nsbridge's device), a second chain takes the connections
the namespace *forwards* out of that device — containers on a bridge inside it, which
Docker, nerdctl and podman masquerade out of ``tap0``; the output hook never sees them::

        chain prerouting {
            type nat hook prerouting priority -100; policy accept;
            iifname "DEVICE" return
            iifname "lo" return
            fib daddr oifname "DEVICE" tcp flags & (fin|syn|rst|ack) == syn redirect to :PORT
        }

``fib daddr oifname`` is the device the route to the destination leaves by, so traffic
between the namespace's own bridges, or to its own addresses (a container reaching a
port the namespace publishes), keeps its path.  A redirect in prerouting rewrites the
destination to the address of the interface the SYN came in on, not to loopback: the
listeners must then listen on every address (see
:func:`~nsbridge.usernet.host.redirect.make_redirect_listeners`).

Only a SYN opens a redirected connection.  NAT rules are consulted for the first packet
conntrack sees of a connection, and when the table is added to a namespace that already
carries connections (the helper adds the fast path after telling its caller "ready",
while those connections go through the tun path), conntrack picks them up in mid-stream
from an ACK: redirecting that ACK would send it to a listener that never saw the
connection, which answers with a reset.  Unmatched, such a connection keeps its path.

Why netlink and not the ``nft`` binary: the host side must not depend on a tool that
may be missing (or a different version) on the machine, and this runs in the sandbox's
forked single-threaded helper, where spawning a process is one more thing to fail.  The
messages are built with pyroute2's nfnetlink message classes
(:mod:`pyroute2.netlink.nfnetlink.nftsocket`), which encode every attribute we need.
pyroute2's high-level :class:`pyroute2.nftables.main.NFTables` is *not* used: it sends
each object (table, chain, rule) as a separate transaction, so a failure half-way would
leave a table without its rule; it runs an asyncio loop per socket; and its errors do
not say which object failed.  Here all objects travel in **one** nfnetlink batch
(``NFNL_MSG_BATCH_BEGIN`` … ``NFNL_MSG_BATCH_END``), which the kernel applies
atomically, on a plain ``AF_NETLINK`` socket whose acks we read ourselves.

The batch first declares and deletes the ``nsbridge`` table, then recreates it: running
this twice (``attach`` to a namespace that already has it) replaces the old rules with
the new port instead of adding a second redirect.

Requirements and fallbacks: ``type nat`` chains in the ``inet`` family need Linux 5.2;
on older kernels the same chain is created in two tables, ``ip`` and ``ip6``.  When
nf_tables cannot be used at all — no CAP_NET_ADMIN over the namespace (``EPERM``),
nf_tables / NAT / redirect support missing from the kernel (``ENOENT``,
``EOPNOTSUPP``, ``EPROTONOSUPPORT``) — :class:`NftUnavailable` is raised so the caller
can fall back to the tun path; other failures raise :class:`NftError`.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nsbridge.dependencies import require_pyroute2

require_pyroute2("user-mode networking (nsbridge run/attach)")

from pyroute2.netlink import (  # noqa: E402
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg  # noqa: E402
from pyroute2.netlink.nfnetlink.nftsocket import (  # noqa: E402
    NFPROTO_INET,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    Cmp,
    Meta,
    Regs,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

from nsbridge.errors import SetupError, describe_oserror  # noqa: E402

TABLE = "nsbridge"
CHAIN = "output"

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks echo only the header of our message, not the whole rule
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NF_INET_LOCAL_OUT = 3
NF_ACCEPT = 1
NFT_RETURN = -5
NAT_PRIORITY_OUT = -100  # NF_IP_PRI_NAT_DST: where "priority -100" puts the chain
IFNAMSIZ = 16
PREROUTING = "prerouting"
NF_INET_PRE_ROUTING = 0
_FIB_RESULT_OIFNAME = 2  # enum nft_fib_result
_FIB_F_DADDR = 1 << 1  # enum nft_fib_flags
_TRANSPORT_HEADER = 2  # NFT_PAYLOAD_TRANSPORT_HEADER
_TCP_FLAGS_OFFSET = 13  # the flags byte of the TCP header
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_ACK_TIMEOUT = 10.0
_batches = itertools.count(1)
# Errors meaning "nf_tables cannot be used here": the caller falls back to the tun path.
_UNAVAILABLE = {
    errno.EPERM: "no CAP_NET_ADMIN over this network namespace",
    errno.EACCES: "no CAP_NET_ADMIN over this network namespace",
    errno.ENOENT: "the kernel lacks nf_tables NAT or redirect support",
    errno.EOPNOTSUPP: "the kernel lacks nf_tables support",
    errno.EPROTONOSUPPORT: "the kernel lacks nfnetlink support",
    errno.EAFNOSUPPORT: "the kernel lacks netlink support",
}


class NftError(SetupError):
    """Programming the redirect failed; the text names the step and the kernel's error.

    A :class:`~nsbridge.errors.SetupError` (so a :class:`~nsbridge.errors.UserError`):
    the sandbox helper reports it as text, a direct caller prints one line, not a trace.
    """

    def __init__(self, message: str, code: int | None = None, kind: int | None = None) -> None:
        super().__init__(message)
        self.errno = code
        self.kind = kind  # the NFT_MSG_* that failed, if the kernel refused an object


class NftUnavailable(NftError):
    """nf_tables cannot be used in this namespace (no privilege, or no kernel support).

    The TCP fast path is then impossible; user-mode networking still works through the
    tun device, only slower.  Every message starts with :data:`UNAVAILABLE_TEXT`, so a
    parent that only sees the text (the sandbox turns it into a ``SandboxError``) can
    still tell this case apart with :func:`is_unavailable`.
    """


UNAVAILABLE_TEXT = "nf_tables is unavailable in the namespace"


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or the text of a ``SandboxError`` carrying it) says nf_tables is
    unavailable, as opposed to a bug or a broken namespace."""
    return isinstance(exc, NftUnavailable) or UNAVAILABLE_TEXT in str(exc)


@dataclass(frozen=True)
class Programmed:
    """What :func:`program_redirect` installed: the port and the tables (``inet`` or
    ``ip`` + ``ip6``), for the start-up log."""

    port: int
    families: tuple[str, ...]


# ---- the public entry point ----------------------------------------------------------


def program_redirect(port: int, *, device: str | None = None, forwarded: str | None = None,
                     table: str = TABLE, per_family: bool = False) -> Programmed:
    """Install (or replace) the redirect of all non-loopback outbound TCP to ``port``
    (with ``device``: of the outbound TCP that leaves by that device; with ``forwarded``:
    also of the TCP forwarded out of that device).

    Must run in a thread that is inside the target network namespace and holds
    CAP_NET_ADMIN there (the sandbox's ``extra`` callback).  ``per_family`` forces the
    pre-5.2 layout (``ip`` + ``ip6`` tables) that is otherwise only the fallback, so it
    can be tested on new kernels.  Raises :class:`NftUnavailable` when nf_tables cannot
    be used, :class:`NftError` otherwise.
    """
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise NftError(f"redirect port {port!r} is not 1-65535")
    for name in (device, forwarded):
        if name is not None and not 0 < len(name.encode()) < IFNAMSIZ:
            raise NftError(f"device name {name!r} is not 1-{IFNAMSIZ - 1} bytes")
    with _open_socket() as sock:
        if not per_family:
            try:
                _transact(sock, _batch(port, table, (NFPROTO_INET,), device, forwarded))
                return Programmed(port, ("inet",))
            except NftError as exc:
                # Before Linux 5.2 the inet family has no nat chain type: the chain is
                # refused (ENOENT after the module autoload, or EOPNOTSUPP).
                if not (exc.kind == NFT_MSG_NEWCHAIN and exc.errno in _NO_INET_NAT):
                    raise
        _transact(sock, _batch(port, table, (NFPROTO_IPV4, NFPROTO_IPV6), device,
                               forwarded))
        return Programmed(port, ("ip", "ip6"))


# ---- building the batch ----------------------------------------------------------------

_NO_INET_NAT = (errno.ENOENT, errno.EOPNOTSUPP)
_FAMILY_NAMES = {NFPROTO_INET: "inet", NFPROTO_IPV4: "ip", NFPROTO_IPV6: "ip6"}


@dataclass
class _Message:
    """One message of the batch and what it does (for the error text)."""

    msg: Any
    kind: int
    flags: int
    family: int
    doing: str


def _batch(port: int, table: str, families: Sequence[int], device: str | None = None,
           forwarded: str | None = None) -> list[_Message]:
    create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    messages: list[_Message] = []
    for family in families:
        name = f"{_FAMILY_NAMES[family]} {table}"
        messages += [
            # Declare (no-op if present) then delete: the batch replaces an old table
            # instead of failing on it, and the delete never hits ENOENT.
            _Message(_table(table), NFT_MSG_NEWTABLE, create, family, f"creating table {name}"),
            _Message(_table(table), NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, family,
                     f"replacing the old table {name}"),
            _Message(_table(table), NFT_MSG_NEWTABLE, create, family, f"creating table {name}"),
            _Message(_chain(table), NFT_MSG_NEWCHAIN, create, family,
                     f"creating the nat chain {name} {CHAIN}"),
            _Message(_rule(table, _name_return(Meta.NFT_META_OIFNAME, device)),
                     NFT_MSG_NEWRULE, create | NLM_F_APPEND, family,
                     f"adding the rule 'oifname {_shown_match(device)} return' to {name}"),
            _Message(_rule(table, _redirect_tcp(port)), NFT_MSG_NEWRULE, create | NLM_F_APPEND,
                     family, f"adding the rule 'meta l4proto tcp tcp flags syn redirect to "
                             f":{port}' to {name}"),
        ]
        if forwarded is None:
            continue
        where = f"{name} {PREROUTING}"
        messages += [
            _Message(_chain(table, PREROUTING, NF_INET_PRE_ROUTING), NFT_MSG_NEWCHAIN, create,
                     family, f"creating the nat chain {where}"),
            _Message(_rule(table, _name_return(Meta.NFT_META_IIFNAME, forwarded, equal=True),
                           PREROUTING), NFT_MSG_NEWRULE, create | NLM_F_APPEND, family,
                     f"adding the rule 'iifname \"{forwarded}\" return' to {where}"),
            _Message(_rule(table, _name_return(Meta.NFT_META_IIFNAME, "lo", equal=True),
                           PREROUTING), NFT_MSG_NEWRULE, create | NLM_F_APPEND, family,
                     f"adding the rule 'iifname \"lo\" return' to {where}"),
            _Message(_rule(table, _route_leaves_by(forwarded) + _redirect_tcp(port),
                           PREROUTING), NFT_MSG_NEWRULE, create | NLM_F_APPEND, family,
                     f"adding the rule 'fib daddr oifname \"{forwarded}\" tcp flags syn "
                     f"redirect to :{port}' to {where}"),
        ]
    return messages


def _table(table: str) -> Any:
    msg = nft_table_msg()
    msg["attrs"] = [("NFTA_TABLE_NAME", table)]
    return msg


def _chain(table: str, chain: str = CHAIN, hook: int = NF_INET_LOCAL_OUT) -> Any:
    msg = nft_chain_msg()
    msg["attrs"] = [
        ("NFTA_CHAIN_TABLE", table),
        ("NFTA_CHAIN_NAME", chain),
        (
            "NFTA_CHAIN_HOOK",
            {
                "attrs": [
                    ("NFTA_HOOK_HOOKNUM", hook),
                    ("NFTA_HOOK_PRIORITY", NAT_PRIORITY_OUT),
                ]
            },
        ),
        ("NFTA_CHAIN_POLICY", NF_ACCEPT),
        ("NFTA_CHAIN_TYPE", "nat"),
    ]
    return msg


def _rule(table: str, expressions: list[dict], chain: str = CHAIN) -> Any:
    msg = nft_rule_msg()
    msg["attrs"] = [
        ("NFTA_RULE_TABLE", table),
        ("NFTA_RULE_CHAIN", chain),
        ("NFTA_RULE_EXPRESSIONS", expressions),
    ]
    return msg


def _expr(name: str, attrs: list[tuple[str, Any]]) -> dict:
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": attrs})]}


def _value(data: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", data)]}


def _meta_load(key: int) -> dict:
    return _expr("meta", [("NFTA_META_DREG", Regs.NFT_REG_1), ("NFTA_META_KEY", key)])


def _shown_match(device: str | None) -> str:
    return '"lo"' if device is None else f'!= "{device}"'


def _name_return(key: int, device: str | None, *, equal: bool = False) -> list[dict]:
    """``oifname "lo" return`` (``device`` None), ``oifname != "DEVICE" return``, or with
    ``equal`` ``iifname "DEVICE" return``: meta KEY -> reg1; cmp eq/neq the name
    (IFNAMSIZ bytes, NUL padded, as nft sends it); immediate verdict return."""
    verdict = {"attrs": [("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", NFT_RETURN)]})]}
    name = b"lo" if device is None else device.encode()
    same = device is None or equal
    return [
        _meta_load(key),
        _expr(
            "cmp",
            [
                ("NFTA_CMP_SREG", Regs.NFT_REG_1),
                ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ if same else Cmp.NFT_CMP_NEQ),
                ("NFTA_CMP_DATA", _value(name.ljust(IFNAMSIZ, b"\0"))),
            ],
        ),
        _expr(
            "immediate",
            [("NFTA_IMMEDIATE_DREG", Regs.NFT_REG_VERDICT), ("NFTA_IMMEDIATE_DATA", verdict)],
        ),
    ]


def _route_leaves_by(device: str) -> list[dict]:
    """``fib daddr oifname "DEVICE"``: fib (flags DADDR, result OIFNAME) -> reg1; cmp eq
    the name."""
    return [
        _expr(
            "fib",
            [
                ("NFTA_FIB_DREG", Regs.NFT_REG_1),
                ("NFTA_FIB_RESULT", _fib_result(_FIB_RESULT_OIFNAME)),
                ("NFTA_FIB_FLAGS", _FIB_F_DADDR),
            ],
        ),
        _expr(
            "cmp",
            [
                ("NFTA_CMP_SREG", Regs.NFT_REG_1),
                ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
                ("NFTA_CMP_DATA", _value(device.encode().ljust(IFNAMSIZ, b"\0"))),
            ],
        ),
    ]


def _fib_result(value: int) -> Any:
    """The NFTA_FIB_RESULT attribute's value as pyroute2 must be given it to put ``value``
    on the wire.  The kernel's attribute is an enum (NFT_FIB_RESULT_OIFNAME = 2), but
    pyroute2 (0.9.x) declares it a set of flags — name number *i* encodes as bit *i* —
    so the enum's value is reached through the name whose bit it is.  Should a later
    pyroute2 declare it a plain number, the number is passed as it is."""
    from pyroute2.netlink.nfnetlink.nftsocket import nft_contains_expr, nft_flags_be32

    attribute = nft_contains_expr.nft_expr.nft_fib.fib_result
    if not issubclass(attribute, nft_flags_be32):
        return value
    names = attribute.ops
    bit = value.bit_length() - 1
    if value != 1 << bit or not 0 <= bit < len(names):
        raise NftError(f"pyroute2 cannot encode NFTA_FIB_RESULT {value}")
    return frozenset({names[bit]})


def _redirect_tcp(port: int) -> list[dict]:
    """``meta l4proto tcp tcp flags & (fin|syn|rst|ack) == syn redirect to :PORT``: meta
    l4proto -> reg1; cmp eq 6; payload (transport header, byte 13: the flags) -> reg1;
    bitwise reg1 & 0x17; cmp eq 0x02; immediate reg1 = port (big-endian 16 bit); redir
    proto_min/max reg1, flags PROTO_SPECIFIED — byte for byte what ``nft`` 1.0 sends."""
    return [
        _meta_load(Meta.NFT_META_L4PROTO),
        _expr(
            "cmp",
            [
                ("NFTA_CMP_SREG", Regs.NFT_REG_1),
                ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
                ("NFTA_CMP_DATA", _value(bytes([socket.IPPROTO_TCP]))),
            ],
        ),
        _expr(
            "payload",
            [
                ("NFTA_PAYLOAD_DREG", Regs.NFT_REG_1),
                ("NFTA_PAYLOAD_BASE", _TRANSPORT_HEADER),
                ("NFTA_PAYLOAD_OFFSET", _TCP_FLAGS_OFFSET),
                ("NFTA_PAYLOAD_LEN", 1),
            ],
        ),
        _expr(
            "bitwise",
            [
                ("NFTA_BITWISE_SREG", Regs.NFT_REG_1),
                ("NFTA_BITWISE_DREG", Regs.NFT_REG_1),
                ("NFTA_BITWISE_LEN", 1),
                ("NFTA_BITWISE_MASK", _value(bytes([_FIN | _SYN | _RST | _ACK]))),
                ("NFTA_BITWISE_XOR", _value(b"\0")),
            ],
        ),
        _expr(
            "cmp",
            [
                ("NFTA_CMP_SREG", Regs.NFT_REG_1),
                ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
                ("NFTA_CMP_DATA", _value(bytes([_SYN]))),
            ],
        ),
        _expr(
            "immediate",
            [
                ("NFTA_IMMEDIATE_DREG", Regs.NFT_REG_1),
                ("NFTA_IMMEDIATE_DATA", _value(struct.pack(">H", port))),
            ],
        ),
        # Counted (only first packets reach a nat chain, so this costs nothing per byte):
        # ``nft list table inet nsbridge`` then shows whether the fast path is used.
        _expr("counter", [("NFTA_COUNTER_BYTES", 0), ("NFTA_COUNTER_PACKETS", 0)]),
        _expr(
            "redir",
            [
                ("NFTA_REDIR_REG_PROTO_MIN", Regs.NFT_REG_1),
                ("NFTA_REDIR_REG_PROTO_MAX", Regs.NFT_REG_1),
                ("NFTA_REDIR_FLAGS", {"NF_NAT_RANGE_PROTO_SPECIFIED"}),
            ],
        ),
    ]


# ---- talking to the kernel ---------------------------------------------------------------


def _open_socket() -> socket.socket:
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
    except OSError as exc:
        raise _error("opening a netfilter netlink socket", exc.errno) from None
    try:
        sock.bind((0, 0))
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass  # old kernel: acks are merely longer
        sock.settimeout(_ACK_TIMEOUT)
    except OSError as exc:
        sock.close()
        raise _error("binding a netfilter netlink socket", exc.errno) from None
    return sock


def _encode(msg: Any, kind: int, flags: int, seq: int, family: int, res_id: int = 0) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = family
    msg["res_id"] = res_id
    msg.encode()
    return bytes(msg.data)


def _transact(sock: socket.socket, messages: list[_Message]) -> None:
    """Send one batch; wait for every ack; raise for the first error the kernel reports.

    Each message asks for an ack, so success is "every sequence number acked with 0".
    An error on the batch-begin message (EPERM without CAP_NET_ADMIN, EOPNOTSUPP
    without nf_tables) is the only reply the kernel sends then.  A failing object makes
    the kernel abort the whole batch, so nothing is half-installed.
    """
    base = (next(_batches) & 0xFFFFFF) << 8  # room for 255 messages per batch
    begin_seq = base
    data = bytearray(
        _encode(nfgen_msg(), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0,
                NFNL_SUBSYS_NFTABLES)
    )
    waiting: dict[int, _Message] = {}
    for i, m in enumerate(messages, start=1):
        seq = base + i
        waiting[seq] = m
        data += _encode(m.msg, NFNL_SUBSYS_NFTABLES << 8 | m.kind, m.flags, seq, m.family)
    data += _encode(nfgen_msg(), NFNL_MSG_BATCH_END, NLM_F_REQUEST, base + len(messages) + 1,
                    0, NFNL_SUBSYS_NFTABLES)
    try:
        sock.send(bytes(data))
    except OSError as exc:
        raise _error("sending the nftables batch", exc.errno) from None
    first_error: tuple[int, _Message] | None = None
    while waiting:
        try:
            reply = sock.recv(1 << 16)
        except TimeoutError:
            raise NftError(
                f"the kernel did not answer the nftables batch within {_ACK_TIMEOUT:g} s"
            ) from None
        except OSError as exc:
            raise _error("reading the kernel's answer to the nftables batch", exc.errno) from None
        for seq, code in _errors(reply):
            if seq == begin_seq:
                raise _error("starting an nftables transaction", code)
            message = waiting.pop(seq, None)
            if message is not None and code and first_error is None:
                first_error = (code, message)
    if first_error is not None:
        code, message = first_error
        raise _error(message.doing, code, message.kind)


def _errors(reply: bytes) -> list[tuple[int, int]]:
    """(sequence number, positive errno or 0) of every NLMSG_ERROR in a datagram."""
    found = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(reply):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
            (code,) = struct.unpack_from("=i", reply, offset + _NLMSGHDR.size)
            found.append((seq, -code))
        offset += (length + 3) & ~3
    return found


def _error(doing: str, code: int | None, kind: int | None = None) -> NftError:
    text = describe_oserror(OSError(code, os.strerror(code))) if code else "unknown error"
    why = _UNAVAILABLE.get(code or 0)
    if why is not None:
        return NftUnavailable(f"{UNAVAILABLE_TEXT} ({why}): {doing}: {text}", code, kind)
    return NftError(f"nftables: {doing}: {text}", code, kind)
