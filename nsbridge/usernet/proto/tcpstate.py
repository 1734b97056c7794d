"""TCP termination for the tun path, sans-IO: one namespace connection, segments in,
frames and host-socket actions out.

When the redirect fast path is not available (a kernel without nf_tables, or
``--tcp=tun``), the namespace's TCP segments reach the tun device and the host side must
*be* the other end of each connection: answer the SYN, acknowledge data, send the host
server's bytes back as segments, carry FINs and resets.  :class:`TcpConn` is that
other end for one connection.  It does no I/O: the caller
(:mod:`nsbridge.usernet.host.tuntcp`) feeds it parsed segments and host-socket events
and performs what it returns — frames to write to the tun, bytes to send to the host
socket, how many host bytes were acknowledged.

Design, and why:

* **Unacknowledged data stays in the host socket.**  Bytes from the host server are
  *peeked* (``MSG_PEEK`` with ``SO_PEEK_OFF``, so each peek continues where the last
  one ended), sent to the namespace, and only consumed from the host socket
  (``MSG_TRUNC``: discarded without a copy) when the namespace acknowledges them.  A
  retransmission rewinds the peek offset and peeks again.  No user-space retransmit
  queue exists, and back-pressure is the kernel's: a namespace that reads slowly leaves
  data in the host socket's receive buffer, which closes the host server's window.
  This is the design passt uses; :meth:`TcpConn.sendable` says how much to peek.
* **The namespace is a kernel one tun write away.**  Segments arrive in order and are
  rarely lost (only when the tun's ring or the namespace's backlog is full).  When
  they are, a segment beyond ``rcv_nxt`` is answered with a duplicate ACK *and held*
  (within the advertised window): once the gap is filled the cumulative ACK jumps past
  everything held, so the namespace's sender, which gets no SACK from us, leaves
  recovery in one round trip instead of one segment per round trip (docs/performance.md
  has the measurement).
  No SACK, no timestamps (we do not offer them in the SYN-ACK, so the namespace never
  uses them).  Window scaling is used whenever the namespace offers it, because a
  64 KiB window would cap throughput.
* **Retransmission** (ours) is a timer started when something is in flight: when it
  fires without progress since it was armed, the peek offset rewinds to the first
  unacknowledged byte (go-back-N: on a lossless link loss is a burst, not a hole).
  Three duplicate ACKs do the same at once.  The timeout doubles up to
  :data:`MAX_RETRIES` tries, then the connection is reset both ways.
* **Our receive window** is what we can still buffer towards the host: the host socket
  takes what it can and the rest waits in the caller's backlog (at most
  :data:`RECV_BUFFER` bytes, and all connections together at most a shared
  :class:`Budget`).  The advertised window shrinks as the backlog grows, and a window
  update is sent when it drains, so a slow host server slows the namespace's sender
  instead of growing memory.  Pure ACKs carry ``snd_max``, never a rewound sequence
  number, which the namespace would drop as old.
* **Sequence numbers** are kept unwrapped (Python ints that only grow); the wire
  value is ``x & 0xFFFFFFFF``.  Incoming numbers are unwrapped relative to what we
  expect, which turns every RFC 9293 modular comparison into a plain one.

Connection life, in RFC 9293's state names (:class:`State`): the namespace's ``SYN``
is held in DIALING while the caller dials the host (its SYN retries are harmless) →
:meth:`~TcpConn.accepted` gives the SYN-ACK (SYN-RECEIVED), or :meth:`~TcpConn.refused`
the reset → the namespace's ACK (ESTABLISHED) → data both ways → FINs both ways, each
direction ending on its own (half-close is carried: FIN-WAIT-1/2 when the host finished
first, CLOSE-WAIT then LAST-ACK when the namespace did, CLOSING when both crossed) →
  CLOSED when both FINs are acknowledged, or at once on a reset.

The **active open** (:meth:`TcpConn.active_open`) is the same connection started from the
other end, for a published port that keeps its client's address: the host side accepted a
client and now dials the namespace *through the device*, as that client.  It sends our
SYN (SYN-SENT); the namespace's SYN-ACK that acknowledges it gets our ACK and the
connection is ESTABLISHED, after which nothing differs (the client socket is the host
socket, peeked and consumed as above).  A reset that acknowledges our SYN is the guest's
port being closed (CLOSED, ``abort``: the caller resets the client).  The SYN is sent again
on the retransmit timer, at most :data:`SYN_RETRIES` times; then the connection gives up
without a frame (the namespace never answered, so there is nothing to reset).  Anything
else in SYN-SENT is dropped; a segment acknowledging something other than our SYN gets a
reset with that number as its sequence (RFC 9293 3.10.7.3), which also clears a stale
connection the namespace may still hold for the same four-tuple.

Every transition happens inside :class:`TcpConn`.  The tables below are the whole state
machine; ``tests/test_tcpstate.py`` parses them and drives every cell, so they cannot
drift from the code.  A cell is the next state (``=``: unchanged) and after a ``/`` what
the connection answers: the frames it returns (``synack``, ``ack``, ``fin``, ``rst``) and
the :class:`Actions` it asks for (``shut``: shutdown towards the host, ``done``, ``abort``);
``-``: the event cannot happen in that state.  Data, windows and retransmission change no
  state and are left out.

Segments from the namespace (``SYN``: its SYN again, same initial sequence number;
``FIN``: its FIN in order, acknowledging nothing new; ``RST``: a reset inside our window,
acknowledging what we sent (one outside it changes nothing, RFC 5961 3.2)):

  state         SYN       ACK of SYN   ACK of FIN   FIN                   RST
  DIALING       =         -            -            =                     CLOSED/abort
  SYN-SENT      =         =            -            =/rst                 CLOSED/abort
  SYN-RECEIVED  =/synack  ESTABLISHED  -            =                     CLOSED/abort
  ESTABLISHED   =/ack     -            -            CLOSE-WAIT/ack+shut   CLOSED/abort
  FIN-WAIT-1    =/ack     -            FIN-WAIT-2   CLOSING/ack+shut      CLOSED/abort
  FIN-WAIT-2    =/ack     -            -            CLOSED/ack+shut+done  CLOSED/abort
  CLOSE-WAIT    =/ack     -            -            =/ack                 CLOSED/abort
  CLOSING       =/ack     -            CLOSED/done  =/ack                 CLOSED/abort
  LAST-ACK      =/ack     -            CLOSED/done  =/ack                 CLOSED/abort
  CLOSED        =         -            -            =                     =

The namespace's ``SYN-ACK``, the answer to our SYN that acknowledges it (anything other
than SYN-SENT takes it for a SYN again, with another initial sequence number):

  state         SYN-ACK
  DIALING       =
  SYN-SENT      ESTABLISHED/ack
  SYN-RECEIVED  =/ack
  ESTABLISHED   =/ack
  FIN-WAIT-1    =/ack
  FIN-WAIT-2    =/ack
  CLOSE-WAIT    =/ack
  CLOSING       =/ack
  LAST-ACK      =/ack
  CLOSED        =

The caller's events (``give up``: the retransmit timer fired :data:`MAX_RETRIES` + 1 times,
:data:`SYN_RETRIES` + 1 in SYN-SENT, with something in flight and no progress;
:meth:`~TcpConn.abandon`, not shown, takes every state to CLOSED and sends nothing):

  state         accepted()           refused()   host_eof()      give up           reset()
  DIALING       SYN-RECEIVED/synack  CLOSED/rst  -               -                 CLOSED/rst
  SYN-SENT      -                    -           =               CLOSED/abort      CLOSED/rst
  SYN-RECEIVED  -                    -           -               CLOSED/rst+abort  CLOSED/rst
  ESTABLISHED   -                    -           FIN-WAIT-1/fin  CLOSED/rst+abort  CLOSED/rst
  FIN-WAIT-1    -                    -           =               CLOSED/rst+abort  CLOSED/rst
  FIN-WAIT-2    -                    -           =               -                 CLOSED/rst
  CLOSE-WAIT    -                    -           LAST-ACK/fin    CLOSED/rst+abort  CLOSED/rst
  CLOSING       -                    -           =               CLOSED/rst+abort  CLOSED/rst
  LAST-ACK      -                    -           =               CLOSED/rst+abort  CLOSED/rst
  CLOSED        -                    -           -               -                 -

Three rules keep the table small.  In SYN-RECEIVED, a segment whose ACK does not
acknowledge our SYN is dropped (RFC 9293 3.10.7.4; an ACK back if it acknowledges the
future), so nothing reaches the host before the handshake.  A new SYN on a synchronized
connection gets a challenge ACK (RFC 5961 4), never a reset.  A CLOSED connection ignores
everything: the caller has forgotten it, and the engine resets strays.

Why this module is above the ~600-line bound: its first hundred lines are this essay and
the state/event tables above, which the TCP state tests parse and drive cell by
cell, so they must sit next to the code they describe; the code itself is below the bound
and is one class, the per-segment hot path, which indirection into more modules would slow.

Supported: window scaling, MSS, go-back-N retransmission, duplicate-ACK recovery,
zero-window probes, out-of-order hold, half-close both ways, RFC 5961 reset and SYN
checks, an active open.  Not supported: SACK, timestamps, urgent data, simultaneous open
(a bare SYN in SYN-SENT is dropped), TIME-WAIT (see :class:`State`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum

from nsbridge.usernet.proto.packetbuild import build_tcp_head
from nsbridge.usernet.proto.packets import TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Parsed

MASK = 0xFFFFFFFF
OUR_WSCALE = 7  # windows up to 8 MiB; the namespace's own scale is whatever it offers
RECV_BUFFER = 1 << 21  # bytes we accept but the host socket has not taken yet (max)
SHARED_BUFFER = 1 << 28  # all connections together (backlogs and held segments)
MAX_SEGMENT = 65535 - 40 - 20  # largest payload one IPv6 or IPv4 frame can carry here
INITIAL_RTO = 0.2
MAX_RTO = 10.0
MAX_RETRIES = 8
SYN_RETRIES = 5  # an active open gives up after about 12 s of silence (0.2 s doubling)
DUPACK_THRESHOLD = 3
_DEFAULT_MSS = {4: 536, 6: 1220}  # RFC 9293 3.7.1 / RFC 8200: when the SYN has none


def clock_iss(ours: tuple[bytes, int], theirs: tuple[bytes, int], now_ns: int,
              secret: bytes) -> int:
    """An initial sequence number for an active open (RFC 6528): a 4-microsecond clock
    plus a keyed hash of the four-tuple.

    Random numbers would do for a connection's own safety, but the namespace may still
    hold the last connection of the same four-tuple in TIME-WAIT (its server closed
    first, and a client port comes again): a kernel takes a SYN there only when its
    sequence number lies beyond the old connection's, otherwise it answers with an ACK
    of the old one, and the reset and retransmission that clear it cost the client the
    retransmit timeout.  A clock that only grows keeps a reused four-tuple's numbers
    moving forward; the hash keeps other four-tuples' unguessable."""
    key = ours[0] + ours[1].to_bytes(2, "big") + theirs[0] + theirs[1].to_bytes(2, "big")
    offset = int.from_bytes(hashlib.blake2s(key, key=secret, digest_size=4).digest(), "big")
    return (now_ns // 4000 + offset) & MASK


def syn_options(options: bytes, version: int) -> tuple[int, int | None]:
    """(MSS, window scale or None) from a SYN's options; malformed options end parsing.

    The namespace's kernel made the SYN, but its program may have crafted it (raw
    sockets), so every length is checked and nonsense is ignored rather than trusted:
    an MSS below 64 becomes 64, a scale above 14 becomes 14 (RFC 7323 2.3).
    """
    mss, wscale = _DEFAULT_MSS[version], None
    i, end = 0, len(options)
    while i < end:
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= end:
            break
        length = options[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == 2 and length == 4:
            mss = max(64, int.from_bytes(options[i + 2 : i + 4], "big"))
        elif kind == 3 and length == 3:
            wscale = min(options[i + 2], 14)
        i += length
    return mss, wscale


class State(Enum):
    """Where one connection is, in RFC 9293's names (section 3.3.2), seen from the host side.

    It is never in LISTEN (the engine's dispatch of a SYN with no connection plays that
    part); SYN-SENT is the active open of a published port (:meth:`TcpConn.active_open`).  It has no
    TIME-WAIT either: that state keeps a closed connection's four-tuple so a lost last
    ACK can be resent and old segments cannot enter a new incarnation.  Here the
    namespace is one tun write away (no old segments wander in a network), and when our
    last ACK is lost the namespace's retransmitted FIN finds no connection and the engine
    resets it, which ends the namespace's LAST-ACK as well: both directions were complete.

    DIALING has no RFC counterpart: the namespace's SYN is held unanswered while the
    caller dials the host, so that a refused host gives a reset instead of a SYN-ACK.

    ``synchronized`` (RFC 9293's term: the handshake is done and the connection is not
    CLOSED) and ``fin_received`` (the namespace's FIN is in; nothing more comes from it)
    are plain attributes of each member: the per-segment code reads them instead of
    comparing with several members, because a member lookup such as ``State.CLOSED``
    goes through ``EnumType.__getattr__`` on Python 3.11.
    """

    DIALING = "DIALING"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"

    synchronized: bool
    fin_received: bool


for _state in State:
    _state.synchronized = _state not in (State.DIALING, State.SYN_SENT, State.SYN_RECEIVED,
                                         State.CLOSED)
    _state.fin_received = _state in (State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK)
del _state


class Budget:
    """Buffer space shared by every connection of one namespace (bytes ``free``).

    Each connection may buffer up to :data:`RECV_BUFFER` towards a slow host server and
    as much again in held out-of-order segments; without a shared cap, a hostile
    namespace opening thousands of connections to a server that never reads could make
    the host side buffer gigabytes.  When the budget is spent, connections accept
    nothing more (the window they advertise closes) until backlogs drain.
    """

    __slots__ = ("free",)

    def __init__(self, size: int = SHARED_BUFFER) -> None:
        self.free = size


@dataclass(slots=True)
class Actions:
    """What the caller must do after a segment or an event, in this order.

    ``frames``: write to the tun.  ``deliver``: send these bytes to the host socket
    (after any backlog).  ``discard``: consume this many acknowledged bytes from the
    host socket.  ``rewind``: reset the peek offset to the first unacknowledged byte.
    ``pull``: the namespace can take more; peek and send.  ``shutdown``: the namespace
    half-closed; ``shutdown(SHUT_WR)`` the host socket once the backlog is written.
    ``abort``: reset the host socket and forget the connection.  ``done``: the
    connection ended cleanly; close the host socket and forget it.
    """

    frames: list[bytes] = field(default_factory=list)
    deliver: bytes = b""
    discard: int = 0
    rewind: bool = False
    pull: bool = False
    shutdown: bool = False
    abort: bool = False
    done: bool = False


class TcpConn:
    """The host side's end of one TCP connection from the namespace.

    ``syn`` is the namespace's SYN; we answer as its destination address and port.
    ``iss`` is our initial sequence number (random, from the caller).  ``offload``
    (the tun has a virtio header and checksum offload) makes the kernel compute every
    checksum and cut large writes into ``mss``-sized segments.  ``state`` is a
    :class:`State`, changed only by this class's methods (the module docstring's tables).
    """

    __slots__ = (
        "advertised",
        "backlog",
        "budget",
        "dupacks",
        "fin_seq",
        "irs",
        "iss",
        "mss",
        "ns_ip",
        "ns_port",
        "offload",
        "ooo",
        "ooo_bytes",
        "our_ip",
        "our_port",
        "our_wscale",
        "peer_wscale",
        "rcv_nxt",
        "retries",
        "rto",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
        "state",
        "timer_mark",
        "version",
        "vnet",
    )

    def __init__(self, syn: Parsed, iss: int, *, vnet: bool = True, offload: bool = False,
                 budget: Budget | None = None) -> None:
        tcp = syn.l4
        assert isinstance(tcp, TCP)
        self._setup(syn.ip.src, tcp.sport, syn.ip.dst, tcp.dport, iss, vnet, offload, budget)
        mss, wscale = syn_options(tcp.options, self.version)
        self.mss = min(mss, MAX_SEGMENT)
        self.peer_wscale = wscale or 0
        self.our_wscale = OUR_WSCALE if wscale is not None else 0
        self.irs = tcp.seq
        self.rcv_nxt = tcp.seq + 1  # unwrapped: starts at the wire value
        self.snd_wnd = tcp.window  # a SYN's window is never scaled

    @classmethod
    def active_open(cls, ours: tuple[bytes, int], theirs: tuple[bytes, int], iss: int, *,
                    vnet: bool = True, offload: bool = False,
                    budget: Budget | None = None) -> tuple[TcpConn, bytes]:
        """A connection we open towards the namespace, as ``ours`` (the address and port
        the namespace will see) to ``theirs`` (its address and port), in SYN-SENT, and
        our SYN to write.

        The SYN offers the largest MSS a frame here can carry and our window scale: the
        namespace's kernel answers with the MSS its own MTU allows, which is what we send
        with from then on."""
        conn = cls.__new__(cls)
        conn._setup(theirs[0], theirs[1], ours[0], ours[1], iss, vnet, offload, budget)
        conn.mss = MAX_SEGMENT
        conn.peer_wscale = 0
        conn.our_wscale = OUR_WSCALE  # kept only if the SYN-ACK offers a scale too
        conn.irs = 0
        conn.rcv_nxt = 0  # unknown until the SYN-ACK
        conn.snd_wnd = 0
        conn.state = State.SYN_SENT
        return conn, conn._syn()

    def _setup(self, ns_ip: bytes, ns_port: int, our_ip: bytes, our_port: int, iss: int,
               vnet: bool, offload: bool, budget: Budget | None) -> None:
        """What both ways of opening share (the SYN's own fields are the caller's)."""
        self.ns_ip, self.our_ip = ns_ip, our_ip
        self.ns_port, self.our_port = ns_port, our_port
        self.version = 4 if len(ns_ip) == 4 else 6
        self.vnet, self.offload = vnet, offload
        self.iss = iss & MASK
        self.snd_una = self.snd_nxt = self.snd_max = self.iss  # SYN not sent yet
        self.backlog = 0  # bytes accepted from the namespace, not yet in the host socket
        self.budget = budget if budget is not None else Budget()
        self.ooo: dict[int, tuple[bytes, bool]] = {}  # segments after a gap, by sequence
        self.ooo_bytes = 0
        self.advertised = 0
        self.state = State.DIALING
        # Where our FIN sits: None until the host's EOF (FIN-WAIT-1 or LAST-ACK from then
        # on); the state says whether it was acknowledged.
        self.fin_seq: int | None = None
        self.dupacks = 0
        self.retries = 0
        self.rto = INITIAL_RTO
        self.timer_mark = -1  # snd_una when the retransmit timer was armed

    # ---- segments to the namespace ---------------------------------------------------

    def _window_field(self) -> int:
        room = max(0, min(RECV_BUFFER - self.backlog, self.budget.free))
        self.advertised = room
        return min(room >> self.our_wscale, 0xFFFF)

    def _head(self, flags: int, seq: int, *, options: bytes = b"",
              payload: bytes | bytearray | memoryview = b"") -> bytes:
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, seq, self.rcv_nxt,
            flags, self._window_field(), options=options, payload=payload, mss=self.mss,
            offload=self.offload, vnet=self.vnet,
        )

    def ack_frame(self) -> bytes:
        """A pure ACK carrying our current window (also the window-update frame).

        Its sequence number is ``snd_max``, not the rewound ``snd_nxt``: a receiver drops
        a segment whose sequence lies before its window, ACK field and all, so an ACK
        sent during a retransmission must not go back in time."""
        return self._head(TCP_ACK, self.snd_max)

    def accepted(self) -> bytes:
        """The host server answered: DIALING → SYN-RECEIVED, and our SYN-ACK."""
        self.state = State.SYN_RECEIVED
        return self._synack()

    def _synack(self) -> bytes:
        """Our SYN-ACK (MSS, and window scale if offered), first or again."""
        self.snd_nxt = self.snd_max = self.iss + 1
        options = (2).to_bytes(1, "big") + b"\x04" + self.mss.to_bytes(2, "big")
        if self.our_wscale:
            options += b"\x01\x03\x03" + bytes([self.our_wscale])
        else:
            options += b"\x01\x01\x01\x01"
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, self.iss, self.rcv_nxt,
            TCP_SYN | TCP_ACK, min(RECV_BUFFER, 0xFFFF), options=options,
            offload=self.offload, vnet=self.vnet,
        )

    def _syn(self) -> bytes:
        """Our SYN (active open), first or again: MSS and the window scale we offer."""
        self.snd_nxt = self.snd_max = self.iss + 1
        options = b"\x02\x04" + self.mss.to_bytes(2, "big") + b"\x01\x03\x03" + bytes(
            [OUR_WSCALE])
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, self.iss, 0, TCP_SYN,
            min(RECV_BUFFER, 0xFFFF), options=options, offload=self.offload, vnet=self.vnet,
        )

    def _bare_reset(self, seq: int) -> bytes:
        """A reset with sequence number ``seq`` (the wire value the namespace acknowledged)
        and no ACK: RFC 9293's answer to a segment acknowledging what we never sent."""
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, seq, 0, TCP_RST, 0,
            offload=self.offload, vnet=self.vnet,
        )

    def refused(self) -> bytes:
        """The host server refused or is unreachable: CLOSED, and a reset for its SYN."""
        self.state = State.CLOSED
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, 0, self.rcv_nxt,
            TCP_RST | TCP_ACK, 0, offload=self.offload, vnet=self.vnet,
        )

    def reset(self) -> bytes:
        """Abort towards the namespace (host reset, give-up, shutdown): CLOSED, one RST."""
        if self.state is State.SYN_SENT:  # nothing of theirs to acknowledge yet
            self.state = State.CLOSED
            return self._bare_reset(self.snd_nxt & MASK)
        self.state = State.CLOSED
        return build_tcp_head(
            self.our_ip, self.ns_ip, self.our_port, self.ns_port, self.snd_nxt, self.rcv_nxt,
            TCP_RST | TCP_ACK, 0, offload=self.offload, vnet=self.vnet,
        )

    # ---- data from the host -------------------------------------------------------------

    def sendable(self) -> int:
        """How many host bytes the namespace's window lets us send now (0 unless synchronized).

        Bounded by the window and, once the host's EOF position is known, by it."""
        if not self.state.synchronized:
            return 0
        room = self.snd_una + self.snd_wnd - self.snd_nxt
        if self.fin_seq is not None:
            room = min(room, self.fin_seq - self.snd_nxt)
        return max(0, room)

    def data_head(self, payload: bytes | bytearray | memoryview) -> bytes:
        """The head of a frame carrying ``payload`` (just peeked) at ``snd_nxt``."""
        head = self._head(TCP_ACK | TCP_PSH, self.snd_nxt, payload=payload)
        self.snd_nxt += len(payload)
        if self.snd_nxt > self.snd_max:
            self.snd_max = self.snd_nxt
        return head

    def host_eof(self) -> list[bytes]:
        """The host server finished sending and every byte up to ``snd_nxt`` was peeked:
        our FIN goes there (ESTABLISHED → FIN-WAIT-1, CLOSE-WAIT → LAST-ACK).  Again
        later, it changes nothing."""
        state = self.state
        if state is State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif state is State.CLOSE_WAIT:
            self.state = State.LAST_ACK
        else:
            return self.fin_due()
        self.fin_seq = self.snd_nxt
        return self.fin_due()

    def fin_due(self) -> list[bytes]:
        """Our FIN, when every data byte before it has been sent (again, after a rewind)."""
        if self.fin_seq is None or self.snd_nxt != self.fin_seq or not self.state.synchronized:
            return []
        frame = self._head(TCP_FIN | TCP_ACK, self.snd_nxt)
        self.snd_nxt += 1
        if self.snd_nxt > self.snd_max:
            self.snd_max = self.snd_nxt
        return [frame]

    def in_flight(self) -> bool:
        """Something we sent is not acknowledged yet (the retransmit timer must run)."""
        return self.snd_max > self.snd_una and self.state is not State.CLOSED

    def wants_timer(self) -> bool:
        """The retransmit timer must keep running: data in flight, or a zero window to probe."""
        return self.in_flight() or (self.state.synchronized and self.snd_wnd == 0)

    # ---- the caller's backlog towards the host ----------------------------------------------

    def host_drained(self, backlog: int) -> list[bytes]:
        """The host socket took bytes; ``backlog`` remain.  A window update if it matters."""
        before = self.advertised
        self.budget.free += self.backlog - backlog
        self.backlog = backlog
        if not self.state.synchronized or self.state.fin_received:
            return []  # no window to announce: not (or no longer) receiving
        room = min(RECV_BUFFER - backlog, self.budget.free)
        # Tell the namespace when the window reopens substantially (RFC 9293 3.8.6.2.2's
        # receiver-side silly-window avoidance): from below half to at least half.
        if before < RECV_BUFFER // 2 <= room:
            return [self.ack_frame()]
        return []

    # ---- timers ----------------------------------------------------------------------------

    def arm(self) -> float:
        """Note where the retransmit timer starts; returns its delay."""
        self.timer_mark = self.snd_una
        return self.rto

    def on_timeout(self) -> Actions | None:
        """The retransmit timer fired.  None: nothing to do (progress was made, or nothing
        is in flight); otherwise what to retransmit, or the abort after MAX_RETRIES."""
        actions = Actions()
        if self.state.synchronized and self.snd_wnd == 0 and not self.in_flight():
            # Zero-window probe: an old-sequence ACK makes the namespace re-state its
            # window, so a lost window update cannot stall us forever.
            actions.frames.append(self._head(TCP_ACK, self.snd_max - 1))
            return actions
        if not self.in_flight():
            self.retries = 0
            return None
        if self.snd_una != self.timer_mark:
            self.retries = 0
            self.rto = INITIAL_RTO
            return None
        self.retries += 1
        if self.state is State.SYN_SENT:
            if self.retries > SYN_RETRIES:  # never answered: nothing to reset there
                self.state = State.CLOSED
                actions.abort = True
                return actions
        elif self.retries > MAX_RETRIES:
            actions.frames.append(self.reset())
            actions.abort = True
            return actions
        self.rto = min(self.rto * 2, MAX_RTO)
        self._go_back(actions)
        return actions

    def _go_back(self, actions: Actions) -> None:
        """Retransmit everything from snd_una (SYN-ACK, data, FIN) as if never sent."""
        if self.state is State.SYN_RECEIVED:
            actions.frames.append(self._synack())
            return
        if self.state is State.SYN_SENT:
            actions.frames.append(self._syn())
            return
        self.snd_nxt = self.snd_una  # the FIN, if sent, follows the data again (fin_due)
        actions.rewind = True
        actions.pull = True

    # ---- segments from the namespace ------------------------------------------------------

    def _unwrap(self, wire: int, near: int) -> int:
        """The unwrapped sequence number closest to ``near`` whose low 32 bits are ``wire``."""
        delta = (wire - near) & MASK
        return near + delta - (1 << 32) if delta & 0x80000000 else near + delta

    def on_segment(self, tcp: TCP) -> Actions:
        """Handle one segment of this connection from the namespace (the first table)."""
        state = self.state
        if state is State.SYN_SENT:
            return self._on_syn_sent(tcp)
        actions = Actions()
        flags = tcp.flags
        if flags & TCP_RST:
            # RFC 5961 3.2: only an in-window reset counts, so a blind one cannot kill us.
            seq = self._unwrap(tcp.seq, self.rcv_nxt)
            if (self.rcv_nxt <= seq <= self.rcv_nxt + max(self.advertised, 1)
                    and state is not State.CLOSED):
                self.state = State.CLOSED
                actions.abort = True
            return actions
        if not state.synchronized:
            # DIALING: a retransmitted SYN (or early junk) while we dial the host.
            # CLOSED: the caller has forgotten us.
            if state is not State.SYN_RECEIVED or not self._on_handshake(tcp, actions):
                return actions
        elif flags & TCP_SYN:
            actions.frames.append(self.ack_frame())  # RFC 5961 4: challenge ACK
            return actions
        elif not flags & TCP_ACK:
            return actions  # every segment after the SYN carries ACK (RFC 9293 3.10.7.4)
        else:
            self._on_ack(tcp, actions)
        self._on_payload(tcp, actions)
        if (self.fin_seq is not None and self.snd_una > self.fin_seq
                and self.state.fin_received):
            # CLOSING or LAST-ACK, our FIN acknowledged: both directions are done.  Only
            # now, after the payload, so a retransmitted FIN on this segment is acked.
            self.state = State.CLOSED
            actions.done = True
        return actions

    def _on_syn_sent(self, tcp: TCP) -> Actions:
        """A segment while our SYN waits for its answer (RFC 9293 3.10.7.3)."""
        actions = Actions()
        flags = tcp.flags
        if flags & TCP_ACK and self._unwrap(tcp.ack, self.snd_una) != self.iss + 1:
            if not flags & TCP_RST:  # acknowledges what we never sent
                actions.frames.append(self._bare_reset(tcp.ack))
            return actions
        if flags & TCP_RST:
            if flags & TCP_ACK:  # the namespace's port is closed
                self.state = State.CLOSED
                actions.abort = True
            return actions  # a reset without ACK cannot be tied to our SYN
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK:
            return actions  # a bare SYN (simultaneous open, unsupported) or a bare ACK
        mss, wscale = syn_options(tcp.options, self.version)
        self.mss = min(mss, MAX_SEGMENT)
        if wscale is None:  # RFC 7323 2.2: scaling only when both ends offered it
            self.our_wscale = self.peer_wscale = 0
        else:
            self.peer_wscale = wscale
        self.irs = tcp.seq
        self.rcv_nxt = tcp.seq + 1
        self.snd_una = self.iss + 1
        self.snd_wnd = tcp.window  # a SYN-ACK's window is never scaled
        self.retries = 0
        self.rto = INITIAL_RTO
        self.state = State.ESTABLISHED
        actions.frames.append(self.ack_frame())
        actions.pull = True
        return actions

    def _on_handshake(self, tcp: TCP, actions: Actions) -> bool:
        """A segment in SYN-RECEIVED; True if it acknowledged our SYN (now ESTABLISHED)
        and its payload is to be taken.  Any other segment is dropped (RFC 9293
        3.10.7.4), so nothing reaches the host before the handshake is complete."""
        if tcp.flags & TCP_SYN:
            if tcp.seq == self.irs:
                actions.frames.append(self._synack())  # our SYN-ACK was lost
            else:
                actions.frames.append(self.ack_frame())  # RFC 5961 4: challenge ACK
            return False
        if not tcp.flags & TCP_ACK:
            return False
        ack = self._unwrap(tcp.ack, self.snd_una)
        if ack != self.iss + 1:
            if ack > self.snd_max:
                actions.frames.append(self.ack_frame())  # acks what we never sent
            return False
        self.state = State.ESTABLISHED
        self.snd_una = ack
        self.snd_wnd = tcp.window << self.peer_wscale
        actions.pull = True
        return True

    def _on_ack(self, tcp: TCP, actions: Actions) -> None:
        """The ACK field of a segment on a synchronized connection."""
        ack = self._unwrap(tcp.ack, self.snd_una)
        if ack > self.snd_max or ack < self.snd_una:
            if ack > self.snd_max:
                actions.frames.append(self.ack_frame())  # acks what we never sent
            return
        window = tcp.window << self.peer_wscale
        if ack > self.snd_una:
            fin_seq = self.fin_seq
            if fin_seq is None:
                actions.discard = ack - self.snd_una
            else:
                actions.discard = min(ack, fin_seq) - self.snd_una
                if ack > fin_seq and self.state is State.FIN_WAIT_1:
                    self.state = State.FIN_WAIT_2  # our FIN is acknowledged
            self.snd_una = ack
            if self.snd_nxt < ack:
                self.snd_nxt = ack  # acknowledged past a rewind: skip what arrived
            self.dupacks = 0
            self.retries = 0
            self.rto = INITIAL_RTO
            self.snd_wnd = window
            actions.pull = True
            return
        # ack == snd_una
        if window != self.snd_wnd:
            opened = window > self.snd_wnd
            self.snd_wnd = window
            self.dupacks = 0
            actions.pull = opened
            return
        if self.snd_max > self.snd_una and not tcp.payload and not tcp.flags & TCP_FIN:
            self.dupacks += 1
            if self.dupacks == DUPACK_THRESHOLD:
                self._go_back(actions)

    def _on_payload(self, tcp: TCP, actions: Actions) -> None:
        payload = tcp.payload
        fin = bool(tcp.flags & TCP_FIN)
        if not payload and not fin:
            return
        if self.state.fin_received:
            actions.frames.append(self.ack_frame())  # a retransmitted FIN: ack it again
            return
        seq = self._unwrap(tcp.seq, self.rcv_nxt)
        if seq > self.rcv_nxt:
            self._hold(seq, payload, fin)
            actions.frames.append(self.ack_frame())  # a gap: dup ACK, the sender resends
            return
        parts: list[bytes] = []
        fin_taken = self._accept(seq, payload, fin, parts)
        while self.ooo and not fin_taken:
            first = min(self.ooo)
            if first > self.rcv_nxt:
                break
            held, held_fin = self.ooo.pop(first)
            self.ooo_bytes -= len(held)
            self.budget.free += len(held)
            fin_taken = self._accept(first, held, held_fin, parts)
        if parts:
            actions.deliver = parts[0] if len(parts) == 1 else b"".join(parts)
        if fin_taken:
            self.budget.free += self.ooo_bytes
            self.ooo.clear()
            self.ooo_bytes = 0
            self._on_peer_fin(actions)
        actions.frames.append(self.ack_frame())

    def _on_peer_fin(self, actions: Actions) -> None:
        """The namespace's FIN is in: its direction has ended (the host gets a shutdown)."""
        actions.shutdown = True
        state = self.state
        if state is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif state is State.FIN_WAIT_1:
            self.state = State.CLOSING
        else:  # FIN-WAIT-2: ours was acknowledged already, so both directions are done
            self.state = State.CLOSED
            actions.done = True

    def _accept(self, seq: int, payload: bytes, fin: bool, parts: list[bytes]) -> bool:
        """Take the new part of an in-order segment (seq <= rcv_nxt), as the room allows;
        True if that includes its FIN."""
        skip = self.rcv_nxt - seq  # bytes we already have (a retransmission overlapping)
        if skip > len(payload) or (skip == len(payload) and not fin):
            return False
        room = max(0, min(RECV_BUFFER - self.backlog, self.budget.free))
        take = payload[skip : skip + room]
        if take:
            parts.append(take)
            self.backlog += len(take)
            self.budget.free -= len(take)
            self.rcv_nxt += len(take)
        if fin and skip + len(take) == len(payload):
            self.rcv_nxt += 1
            return True
        return False

    def _hold(self, seq: int, payload: bytes, fin: bool) -> None:
        """Keep a segment that arrived after a gap, if it lies inside our window.

        When the gap is filled the cumulative ACK jumps past everything held, so a sender
        without SACK leaves recovery after one round instead of one segment per round.
        Bounded by the window we advertised: the sender may not exceed it anyway.
        """
        room = RECV_BUFFER - self.backlog
        if (not payload or seq in self.ooo or seq + len(payload) > self.rcv_nxt + room
                or self.ooo_bytes + len(payload) > room or len(payload) > self.budget.free):
            return
        self.ooo[seq] = (payload, fin)
        self.ooo_bytes += len(payload)
        self.budget.free -= len(payload)

    def abandon(self) -> None:
        """The caller forgets this connection (it ended, or the caller is closing):
        CLOSED from any state, nothing sent, its buffer space back to the budget."""
        self.state = State.CLOSED
        self.release()

    def release(self) -> None:
        """Give this connection's buffer space back to the budget (it has ended; the
        caller drops its backlog).  Idempotent."""
        self.budget.free += self.backlog + self.ooo_bytes
        self.backlog = self.ooo_bytes = 0
        self.ooo.clear()
