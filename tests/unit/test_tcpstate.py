"""The tun path's TCP end (:mod:`nsbridge.usernet.proto.tcpstate`) with crafted segments.

Sans-IO: no device, no socket.  Each test plays the namespace's kernel by hand —
SYN, ACKs, data, FIN, RST, losses — and checks the frames :class:`TcpConn` answers
with (parsed back with :func:`parse_frame`, checksums verified) and the actions it
asks of the host socket.  The end-to-end behaviour with real kernels on both sides
is in tests/usernet/test_tcp.py.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbridge.usernet.proto import tcpstate
from nsbridge.usernet.proto.packetbuild import build_tcp_head
from nsbridge.usernet.proto.packets import (
    TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    Parsed,
    parse_frame,
)
from nsbridge.usernet.proto.tcpstate import (
    DUPACK_THRESHOLD,
    MAX_RETRIES,
    MAX_SEGMENT,
    OUR_WSCALE,
    RECV_BUFFER,
    SYN_RETRIES,
    Actions,
    Budget,
    State,
    TcpConn,
    clock_iss,
    syn_options,
)

NS = bytes([10, 0, 2, 100])
DST = bytes([192, 0, 2, 1])
NS6 = bytes.fromhex("fd000000000000000000000000000100")
DST6 = bytes.fromhex("20010db8000000000000000000000001")
MSS_WS = b"\x02\x04\xff\xd8" + b"\x01\x03\x03\x07"  # MSS 65496, NOP, window scale 7


def segment(flags: int, seq: int, ack: int = 0, payload: bytes = b"", window: int = 512,
            options: bytes = b"", src: bytes = NS, dst: bytes = DST) -> Parsed:
    """A namespace segment (full checksum, no vnet), parsed as the engine would."""
    head = build_tcp_head(src, dst, 40000, 80, seq, ack, flags, window, options=options,
                          payload=payload, vnet=False)
    parsed = parse_frame(head + payload, vnet=False)
    assert isinstance(parsed, Parsed), parsed
    return parsed


def tcp_of(frame: bytes) -> TCP:
    """Parse a frame the connection made (no vnet, so its checksum is verified)."""
    parsed = parse_frame(frame, vnet=False)
    assert isinstance(parsed, Parsed), parsed
    assert isinstance(parsed.l4, TCP)
    return parsed.l4


def established(iss: int = 1000, irs: int = 5000, window: int = 512,
                options: bytes = MSS_WS) -> TcpConn:
    """A connection through the three-way handshake (namespace window 512 << 7)."""
    conn = TcpConn(segment(TCP_SYN, irs, window=65535, options=options), iss, vnet=False)
    synack = tcp_of(conn.accepted())
    assert synack.flags == TCP_SYN | TCP_ACK and synack.seq == iss and synack.ack == irs + 1
    actions = conn.on_segment(segment(TCP_ACK, irs + 1, iss + 1, window=window).l4)
    assert actions.pull and conn.state is State.ESTABLISHED
    return conn


def test_syn_options_are_read_and_nonsense_is_bounded() -> None:
    assert syn_options(MSS_WS, 4) == (65496, 7)
    assert syn_options(b"", 4) == (536, None)
    assert syn_options(b"", 6) == (1220, None)
    assert syn_options(b"\x02\x04\x00\x01\x03\x03\x63\x00", 4) == (64, 14)
    assert syn_options(b"\x02\x09", 4) == (536, None)  # length runs past the end
    assert syn_options(b"\x02", 4) == (536, None)
    assert syn_options(b"\x08\x00\x02\x04\x05\xb4", 4) == (536, None)  # length 0: stop


@given(st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_syn_options_never_raise(options: bytes) -> None:
    mss, wscale = syn_options(options, 4)
    assert 64 <= mss <= 65535 and (wscale is None or 0 <= wscale <= 14)


def test_synack_offers_mss_and_window_scale_only_when_the_namespace_did() -> None:
    conn = TcpConn(segment(TCP_SYN, 1, options=MSS_WS), 77, vnet=False)
    options = tcp_of(conn.accepted()).options
    assert options[:2] == b"\x02\x04" and options[4:] == bytes([1, 3, 3, OUR_WSCALE])
    plain = TcpConn(segment(TCP_SYN, 1), 77, vnet=False)
    assert tcp_of(plain.accepted()).options[4:] == b"\x01\x01\x01\x01"
    assert plain.our_wscale == 0 and plain.peer_wscale == 0


def test_refused_connect_answers_the_syn_with_a_reset() -> None:
    conn = TcpConn(segment(TCP_SYN, 41), 1, vnet=False)
    reset = tcp_of(conn.refused())
    assert reset.flags == TCP_RST | TCP_ACK and reset.ack == 42
    assert conn.state is State.CLOSED


def test_data_in_order_is_delivered_and_acknowledged() -> None:
    conn = established()
    actions = conn.on_segment(segment(TCP_ACK | TCP_PSH, 5001, 1001, b"hello").l4)
    assert actions.deliver == b"hello"
    [ack] = map(tcp_of, actions.frames)
    assert ack.flags == TCP_ACK and ack.ack == 5006
    # The delivered bytes are the caller's backlog until it says the host took them.
    assert ack.window == (RECV_BUFFER - 5) >> OUR_WSCALE
    assert conn.host_drained(0) == []  # still above half: no window update needed


def test_gap_gets_a_duplicate_ack_and_overlap_is_trimmed() -> None:
    conn = established()
    gap = conn.on_segment(segment(TCP_ACK, 5011, 1001, b"later").l4)
    assert gap.deliver == b"" and tcp_of(gap.frames[0]).ack == 5001
    conn.on_segment(segment(TCP_ACK, 5001, 1001, b"abcde").l4)
    overlap = conn.on_segment(segment(TCP_ACK, 5003, 1001, b"cdefgh").l4)
    assert overlap.deliver == b"fgh" and conn.rcv_nxt == 5009
    old = conn.on_segment(segment(TCP_ACK, 5001, 1001, b"abc").l4)
    assert old.deliver == b"" and tcp_of(old.frames[0]).ack == 5009


def test_a_full_backlog_closes_the_window_and_draining_reopens_it() -> None:
    conn = established()
    big = b"x" * 60000
    seq = 5001
    while conn.backlog + len(big) <= RECV_BUFFER:
        actions = conn.on_segment(segment(TCP_ACK, seq, 1001, big).l4)
        assert actions.deliver == big
        seq += len(big)
    actions = conn.on_segment(segment(TCP_ACK, seq, 1001, big).l4)
    assert 0 < len(actions.deliver) < len(big) and conn.backlog == RECV_BUFFER  # what fit
    assert tcp_of(actions.frames[0]).window == 0  # nothing more fits
    [update] = conn.host_drained(0)
    assert tcp_of(update).window == RECV_BUFFER >> OUR_WSCALE


def test_host_data_respects_the_window_and_acks_discard_it() -> None:
    conn = established(window=2)  # 2 << 7 = 256 bytes
    assert conn.sendable() == 256
    head = conn.data_head(b"d" * 200)
    sent = parse_frame(head + b"d" * 200, vnet=False)
    assert isinstance(sent, Parsed) and sent.l4.seq == 1001 and sent.l4.payload == b"d" * 200
    assert conn.sendable() == 56 and conn.in_flight()
    actions = conn.on_segment(segment(TCP_ACK, 5001, 1101, window=2).l4)
    assert actions.discard == 100 and actions.pull and conn.sendable() == 156
    actions = conn.on_segment(segment(TCP_ACK, 5001, 1201, window=2).l4)
    assert actions.discard == 100 and not conn.in_flight()


def test_ack_for_unsent_data_is_ignored_with_an_ack() -> None:
    conn = established()
    actions = conn.on_segment(segment(TCP_ACK, 5001, 9999).l4)
    assert actions.discard == 0 and conn.snd_una == 1001
    assert tcp_of(actions.frames[0]).ack == 5001


def test_three_duplicate_acks_rewind_to_the_first_unacknowledged_byte() -> None:
    conn = established()
    for _ in range(3):
        conn.data_head(b"p" * 1000)
    conn.on_segment(segment(TCP_ACK, 5001, 2001).l4)
    rewinds = []
    for _ in range(DUPACK_THRESHOLD):
        rewinds.append(conn.on_segment(segment(TCP_ACK, 5001, 2001).l4).rewind)
    assert rewinds == [False] * (DUPACK_THRESHOLD - 1) + [True]
    assert conn.snd_nxt == 2001 and conn.snd_max == 4001
    # An ACK for data sent before the rewind still counts, and skips what arrived.
    actions = conn.on_segment(segment(TCP_ACK, 5001, 3501).l4)
    assert actions.discard == 1500 and conn.snd_nxt == 3501


def test_timeout_retransmits_then_gives_up_with_a_reset() -> None:
    conn = established()
    conn.data_head(b"q" * 100)
    for attempt in range(MAX_RETRIES):
        delay = conn.arm()
        assert delay > 0
        actions = conn.on_timeout()
        assert actions is not None and actions.rewind, attempt
        conn.data_head(b"q" * 100)  # the caller re-peeks and resends
    conn.arm()
    final = conn.on_timeout()
    assert final is not None and final.abort
    assert tcp_of(final.frames[0]).flags & TCP_RST


def test_timeout_after_progress_does_nothing() -> None:
    conn = established()
    conn.data_head(b"r" * 100)
    conn.arm()
    conn.data_head(b"r" * 100)
    conn.on_segment(segment(TCP_ACK, 5001, 1101).l4)
    assert conn.on_timeout() is None


def test_lost_synack_is_sent_again() -> None:
    conn = TcpConn(segment(TCP_SYN, 7, options=MSS_WS), 100, vnet=False)
    conn.accepted()
    conn.arm()
    actions = conn.on_timeout()
    assert actions is not None
    assert tcp_of(actions.frames[0]).flags == TCP_SYN | TCP_ACK
    again = conn.on_segment(segment(TCP_SYN, 7, options=MSS_WS).l4)  # its SYN, resent
    assert tcp_of(again.frames[0]).flags == TCP_SYN | TCP_ACK


def test_fins_both_ways_end_the_connection() -> None:
    conn = established()
    actions = conn.on_segment(segment(TCP_ACK | TCP_FIN, 5001, 1001, b"bye").l4)
    assert actions.deliver == b"bye" and actions.shutdown
    assert conn.state is State.CLOSE_WAIT
    assert tcp_of(actions.frames[0]).ack == 5005
    conn.data_head(b"tail")
    [fin] = conn.host_eof()
    assert tcp_of(fin).flags == TCP_FIN | TCP_ACK and tcp_of(fin).seq == 1005
    assert conn.state is State.LAST_ACK
    done = conn.on_segment(segment(TCP_ACK, 5005, 1006).l4)
    assert done.done and done.discard == 4 and conn.state is State.CLOSED


def test_our_fin_is_resent_after_a_rewind() -> None:
    conn = established()
    conn.data_head(b"abc")
    assert conn.host_eof()  # FIN at 1004
    conn.arm()
    actions = conn.on_timeout()
    assert actions is not None and actions.rewind
    assert conn.fin_due() == []  # the data comes first
    conn.data_head(b"abc")
    [fin] = conn.fin_due()
    assert tcp_of(fin).seq == 1004 and tcp_of(fin).flags & TCP_FIN


def test_host_eof_with_everything_acked_but_the_fin() -> None:
    conn = established()
    conn.host_eof()
    conn.arm()
    actions = conn.on_timeout()  # the FIN was lost
    assert actions is not None and actions.rewind
    [fin] = conn.fin_due()
    assert tcp_of(fin).flags & TCP_FIN


def test_only_an_in_window_reset_aborts() -> None:
    conn = established()
    blind = conn.on_segment(segment(TCP_RST, 5001 + (1 << 30)).l4)
    assert not blind.abort and conn.state is State.ESTABLISHED
    real = conn.on_segment(segment(TCP_RST, 5001).l4)
    assert real.abort and conn.state is State.CLOSED


def test_a_new_syn_on_an_open_connection_gets_a_challenge_ack() -> None:
    conn = established()
    actions = conn.on_segment(segment(TCP_SYN, 123456).l4)
    assert tcp_of(actions.frames[0]).flags == TCP_ACK and conn.state is State.ESTABLISHED


def test_zero_window_is_probed() -> None:
    conn = established(window=0)
    assert conn.sendable() == 0 and conn.wants_timer()
    conn.arm()
    actions = conn.on_timeout()
    assert actions is not None
    probe = tcp_of(actions.frames[0])
    assert probe.flags == TCP_ACK and probe.seq == 1000  # one below snd_nxt


def test_sequence_numbers_wrap() -> None:
    conn = established(iss=0xFFFFFFF0, irs=0xFFFFFFFA)
    actions = conn.on_segment(segment(TCP_ACK, 0xFFFFFFFB, 0xFFFFFFF1, b"0123456789").l4)
    assert actions.deliver == b"0123456789"
    assert tcp_of(actions.frames[0]).ack == (0xFFFFFFFB + 10) & 0xFFFFFFFF
    conn.data_head(b"w" * 40)
    acked = conn.on_segment(segment(TCP_ACK, 5, (0xFFFFFFF1 + 40) & 0xFFFFFFFF).l4)
    assert acked.discard == 40


def test_ipv6_frames_and_gso_offload_heads() -> None:
    syn = segment(TCP_SYN, 1, options=b"\x02\x04\x05\xb4", src=NS6, dst=DST6)
    conn = TcpConn(syn, 9, vnet=True, offload=True)
    head = conn.accepted()
    flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset = struct.unpack_from(
        "=BBHHHH", head)
    assert flags == 1 and gso_type == 0 and csum_start == 40 and csum_offset == 16
    conn.on_segment(segment(TCP_ACK, 2, 10, window=65535, src=NS6, dst=DST6).l4)
    payload = b"g" * 4000
    data = conn.data_head(payload)
    flags, gso_type, hdr_len, gso_size, _start, _offset = struct.unpack_from("=BBHHHH", data)
    assert gso_type == 4 and gso_size == 1460 and hdr_len == 60  # TCPV6, cut by the kernel
    parsed = parse_frame(data + payload, vnet=True)
    assert isinstance(parsed, Parsed) and parsed.l4.payload == payload


@given(st.lists(st.tuples(st.sampled_from([TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_FIN,
                                           TCP_RST, TCP_SYN, 0]),
                          st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
                          st.binary(max_size=64), st.integers(0, 0xFFFF)), max_size=30))
@settings(max_examples=300, deadline=None)
def test_hostile_segment_streams_never_raise(steps: list) -> None:
    conn = established()
    for flags, seq, ack, payload, window in steps:
        actions = conn.on_segment(segment(flags, seq, ack, payload, window).l4)
        assert actions.discard >= 0
        for frame in actions.frames:
            tcp_of(frame)
        assert conn.snd_una <= conn.snd_max and conn.snd_nxt <= conn.snd_max
        assert 0 <= conn.backlog <= RECV_BUFFER
        if conn.state is State.CLOSED:
            break


@pytest.mark.parametrize("flags", [TCP_ACK, TCP_FIN | TCP_ACK])
def test_segments_while_still_connecting_are_ignored(flags: int) -> None:
    conn = TcpConn(segment(TCP_SYN, 1), 5, vnet=False)
    actions = conn.on_segment(segment(flags, 2, 6, b"early").l4)
    assert actions.frames == [] and actions.deliver == b"" and conn.state is State.DIALING


def test_segments_after_a_gap_are_held_and_the_ack_jumps_when_it_fills() -> None:
    conn = established()
    first = conn.on_segment(segment(TCP_ACK, 5006, 1001, b"world").l4)
    second = conn.on_segment(segment(TCP_ACK | TCP_FIN, 5011, 1001, b"!").l4)
    assert first.deliver == second.deliver == b""
    assert tcp_of(second.frames[0]).ack == 5001  # duplicate ACKs while the gap is open
    filled = conn.on_segment(segment(TCP_ACK, 5001, 1001, b"hello").l4)
    assert filled.deliver == b"helloworld!" and filled.shutdown
    assert conn.state is State.CLOSE_WAIT
    assert tcp_of(filled.frames[-1]).ack == 5013  # past the data and the FIN
    assert conn.ooo == {} and conn.ooo_bytes == 0


def test_held_segments_stay_inside_the_window() -> None:
    conn = established()
    beyond = 5001 + RECV_BUFFER
    conn.on_segment(segment(TCP_ACK, beyond, 1001, b"x" * 100).l4)
    assert conn.ooo == {}  # past what we advertised: not kept


def test_acks_during_a_retransmission_carry_the_highest_sequence() -> None:
    conn = established()
    conn.data_head(b"a" * 3000)
    for _ in range(DUPACK_THRESHOLD):
        conn.on_segment(segment(TCP_ACK, 5001, 1001).l4)
    assert conn.snd_nxt == 1001  # rewound
    ack = conn.on_segment(segment(TCP_ACK | TCP_PSH, 5001, 1001, b"data").l4).frames[-1]
    assert tcp_of(ack).seq == 4001  # not 1001: the receiver would drop it as old


def test_connections_share_one_buffer_budget() -> None:
    """A namespace cannot make the host side buffer more than the shared budget, however
    many connections it opens to a server that never reads."""
    budget = Budget(100_000)
    first = TcpConn(segment(TCP_SYN, 5000, options=MSS_WS), 1000, vnet=False, budget=budget)
    second = TcpConn(segment(TCP_SYN, 5000, options=MSS_WS), 1000, vnet=False, budget=budget)
    for conn in (first, second):
        conn.accepted()
        conn.on_segment(segment(TCP_ACK, 5001, 1001).l4)
    assert first.on_segment(segment(TCP_ACK, 5001, 1001, b"a" * 60_000).l4).deliver
    taken = second.on_segment(segment(TCP_ACK, 5001, 1001, b"b" * 60_000).l4)
    assert len(taken.deliver) == 40_000 and budget.free == 0
    assert tcp_of(taken.frames[-1]).window == 0
    assert first.host_drained(0) == [] and budget.free == 60_000  # the host took it all
    more = second.on_segment(segment(TCP_ACK, 45001, 1001, b"c" * 20_000).l4)
    assert len(more.deliver) == 20_000
    second.release()
    assert budget.free == 100_000


# ---- the state/event tables of the module docstring, walked against the code ----------------

IRS, ISS = 5000, 1000
GUEST_ISS = 9000  # the namespace's sequence numbers when we open (not its SYN's IRS)


def active(mss_ws: bytes = MSS_WS) -> tuple[TcpConn, TCP]:
    """A connection we open towards the namespace (published port, device mode): the
    namespace is NS:40000 and we are DST:80, as in every segment() here; and our SYN."""
    conn, syn = TcpConn.active_open((DST, 80), (NS, 40000), ISS, vnet=False)
    assert conn.state is State.SYN_SENT
    return conn, tcp_of(syn)


def docstring_tables() -> list[tuple[list[str], dict[str, list[str]]]]:
    """The module docstring's tables: (event columns, cells by state row) for each.

    A table starts at a line whose first cell is ``state`` and ends at a blank line;
    cells are separated by two or more spaces (column names may hold one space)."""
    assert tcpstate.__doc__ is not None
    tables = []
    lines = iter(tcpstate.__doc__.splitlines())
    for line in lines:
        head = re.split(r"\s{2,}", line.strip())
        if head[0] != "state":
            continue
        rows: dict[str, list[str]] = {}
        for row in lines:
            if not row.strip():
                break
            cells = re.split(r"\s{2,}", row.strip())
            assert len(cells) == len(head), row
            rows[cells[0]] = cells[1:]
        tables.append((head[1:], rows))
    return tables


def in_state(state: State) -> TcpConn:
    """A connection driven to ``state`` by the shortest real path (nothing in flight but
    a FIN; the namespace's FIN, when sent, is at IRS + 1)."""
    if state is State.SYN_SENT:
        return active()[0]
    conn = TcpConn(segment(TCP_SYN, IRS, window=65535, options=MSS_WS), ISS, vnet=False)
    steps = {
        State.DIALING: [],
        State.SYN_RECEIVED: ["accepted"],
        State.ESTABLISHED: ["accepted", "ack"],
        State.FIN_WAIT_1: ["accepted", "ack", "eof"],
        State.FIN_WAIT_2: ["accepted", "ack", "eof", "ack fin"],
        State.CLOSE_WAIT: ["accepted", "ack", "fin"],
        State.CLOSING: ["accepted", "ack", "eof", "fin"],
        State.LAST_ACK: ["accepted", "ack", "fin", "eof"],
        State.CLOSED: ["accepted", "ack", "abandon"],
    }[state]
    for step in steps:
        if step == "accepted":
            conn.accepted()
        elif step == "ack":
            conn.on_segment(segment(TCP_ACK, IRS + 1, ISS + 1).l4)
        elif step == "eof":
            conn.host_eof()
        elif step == "ack fin":
            conn.on_segment(segment(TCP_ACK, IRS + 1, ISS + 2).l4)
        elif step == "fin":
            conn.on_segment(segment(TCP_ACK | TCP_FIN, IRS + 1, conn.snd_una).l4)
        else:
            conn.abandon()
    assert conn.state is state, (steps, conn.state)
    return conn


def give_up(conn: TcpConn) -> Actions:
    """Let the retransmit timer fire until the connection gives up; its last actions
    (after exactly MAX_RETRIES retransmissions, SYN_RETRIES for our SYN)."""
    if conn.snd_max == conn.snd_una:
        conn.data_head(b"x")  # ESTABLISHED, CLOSE-WAIT: put something in flight
    retries = SYN_RETRIES if conn.state is State.SYN_SENT else MAX_RETRIES
    for _ in range(retries):
        conn.arm()
        again = conn.on_timeout()
        assert again is not None and not again.abort
    conn.arm()
    final = conn.on_timeout()
    assert final is not None
    return final


def segment_event(event: str) -> Callable[[TcpConn], Actions]:
    """The namespace's segment for one column of the first two tables."""
    return {
        "SYN": lambda conn: conn.on_segment(segment(TCP_SYN, IRS, options=MSS_WS).l4),
        "ACK of SYN": lambda conn: conn.on_segment(segment(TCP_ACK, IRS + 1, ISS + 1).l4),
        "ACK of FIN": lambda conn: conn.on_segment(
            segment(TCP_ACK, conn.rcv_nxt, ISS + 2).l4),
        "FIN": lambda conn: conn.on_segment(
            segment(TCP_ACK | TCP_FIN, IRS + 1, conn.snd_una).l4),
        "SYN-ACK": lambda conn: conn.on_segment(
            segment(TCP_SYN | TCP_ACK, GUEST_ISS, ISS + 1, options=MSS_WS).l4),
        "RST": lambda conn: conn.on_segment(
            segment(TCP_RST | TCP_ACK, conn.rcv_nxt, conn.snd_max).l4),
        "accepted()": lambda conn: Actions(frames=[conn.accepted()]),
        "refused()": lambda conn: Actions(frames=[conn.refused()]),
        "host_eof()": lambda conn: Actions(frames=conn.host_eof()),
        "give up": give_up,
        "reset()": lambda conn: Actions(frames=[conn.reset()]),
    }[event]


def answer_of(actions: Actions) -> set[str]:
    """What the connection answered, in the tables' words."""
    words = set()
    for frame in actions.frames:
        flags = tcp_of(frame).flags
        if flags & TCP_RST:
            words.add("rst")
        elif flags & TCP_SYN:
            words.add("synack" if flags & TCP_ACK else "syn")
        elif flags & TCP_FIN:
            words.add("fin")
        else:
            words.add("ack")
    for flag, word in ((actions.shutdown, "shut"), (actions.done, "done"),
                       (actions.abort, "abort")):
        if flag:
            words.add(word)
    return words


TABLE_CELLS = [  # "-" (the event cannot happen in that state) has nothing to drive
    (row, event, cell)
    for events, rows in docstring_tables()
    for row, cells in rows.items()
    for event, cell in zip(events, cells, strict=True)
    if cell != "-"
]


def test_the_docstring_has_the_three_tables_with_a_row_per_state() -> None:
    tables = docstring_tables()
    assert len(tables) == 3
    for _events, rows in tables:
        assert list(rows) == [state.value for state in State]


@pytest.mark.parametrize(("row", "event", "cell"), TABLE_CELLS,
                         ids=[f"{row}-{event}" for row, event, _ in TABLE_CELLS])
def test_every_cell_of_the_state_table_is_what_the_code_does(row: str, event: str,
                                                             cell: str) -> None:
    state = State(row)
    conn = in_state(state)
    actions = segment_event(event)(conn)
    target, _, answer = cell.partition("/")
    assert conn.state is (state if target == "=" else State(target))
    assert answer_of(actions) == (set(answer.split("+")) if answer else set())


@pytest.mark.parametrize("state", list(State))
def test_abandon_closes_from_every_state_and_sends_nothing(state: State) -> None:
    budget = Budget(10_000)
    conn = in_state(state)
    conn.budget = budget
    conn.abandon()
    assert conn.state is State.CLOSED and budget.free == 10_000


@pytest.mark.parametrize("state", [s for s in State if s.synchronized])
def test_a_blind_reset_changes_no_state(state: State) -> None:
    conn = in_state(state)
    actions = conn.on_segment(segment(TCP_RST, conn.rcv_nxt + (1 << 30)).l4)
    assert conn.state is state and not actions.abort and not actions.frames


@pytest.mark.parametrize("ack", [ISS, ISS + 2])
def test_syn_received_drops_a_segment_that_does_not_ack_our_syn(ack: int) -> None:
    """Data (and a FIN) with an ACK that does not acknowledge our SYN-ACK never reaches
    the host: the handshake must complete first (RFC 9293 3.10.7.4)."""
    conn = in_state(State.SYN_RECEIVED)
    actions = conn.on_segment(segment(TCP_ACK | TCP_FIN, IRS + 1, ack, b"early").l4)
    assert actions.deliver == b"" and not actions.shutdown
    assert conn.state is State.SYN_RECEIVED and conn.rcv_nxt == IRS + 1
    assert [tcp_of(frame).flags for frame in actions.frames] == (
        [TCP_ACK] if ack > ISS + 1 else [])
    done = conn.on_segment(segment(TCP_ACK | TCP_PSH, IRS + 1, ISS + 1, b"now").l4)
    assert done.deliver == b"now" and conn.state is State.ESTABLISHED


def test_a_handshake_ack_carrying_a_fin_goes_to_close_wait() -> None:
    conn = in_state(State.SYN_RECEIVED)
    actions = conn.on_segment(segment(TCP_ACK | TCP_FIN, IRS + 1, ISS + 1, b"hi").l4)
    assert actions.deliver == b"hi" and actions.shutdown
    assert conn.state is State.CLOSE_WAIT


def test_fins_crossing_in_one_segment_close_at_once() -> None:
    """FIN-WAIT-1, and the namespace's FIN arrives on the ACK of ours: both transitions
    (FIN-WAIT-2, then CLOSED) happen on that one segment."""
    conn = in_state(State.FIN_WAIT_1)
    actions = conn.on_segment(segment(TCP_ACK | TCP_FIN, IRS + 1, ISS + 2).l4)
    assert actions.done and actions.shutdown and conn.state is State.CLOSED
    assert tcp_of(actions.frames[-1]).ack == IRS + 2


def test_the_last_ack_also_acknowledges_a_retransmitted_fin() -> None:
    conn = in_state(State.LAST_ACK)
    actions = conn.on_segment(segment(TCP_ACK | TCP_FIN, IRS + 1, ISS + 2).l4)
    assert actions.done and conn.state is State.CLOSED
    assert [tcp_of(frame).ack for frame in actions.frames] == [IRS + 2]


# ---- the active open (a published port that keeps its client's address) -------------------


def test_active_open_sends_a_syn_with_mss_and_window_scale() -> None:
    conn, syn = active()
    assert syn.flags == TCP_SYN and syn.seq == ISS and (syn.sport, syn.dport) == (80, 40000)
    assert syn_options(syn.options, 4) == (MAX_SEGMENT, OUR_WSCALE)
    assert conn.sendable() == 0 and conn.in_flight()


def test_synack_establishes_takes_its_mss_and_scale_and_is_acked() -> None:
    conn, _ = active()
    actions = conn.on_segment(segment(TCP_SYN | TCP_ACK, GUEST_ISS, ISS + 1, window=1000,
                                      options=b"\x02\x04\x05\xb4\x01\x03\x03\x05").l4)
    assert conn.state is State.ESTABLISHED and actions.pull
    (ack,) = [tcp_of(frame) for frame in actions.frames]
    assert ack.flags == TCP_ACK and ack.seq == ISS + 1 and ack.ack == GUEST_ISS + 1
    assert conn.mss == 1460 and conn.peer_wscale == 5 and conn.our_wscale == OUR_WSCALE
    assert conn.snd_wnd == 1000  # a SYN-ACK's window is not scaled
    assert conn.sendable() == 1000
    data = tcp_of(conn.data_head(b"hello") + b"hello")
    assert data.seq == ISS + 1 and data.payload == b"hello"
    back = conn.on_segment(segment(TCP_ACK | TCP_PSH, GUEST_ISS + 1, ISS + 6, b"hi").l4)
    assert back.discard == 5 and back.deliver == b"hi"


def test_synack_without_window_scale_turns_scaling_off_both_ways() -> None:
    conn, _ = active()
    conn.on_segment(segment(TCP_SYN | TCP_ACK, GUEST_ISS, ISS + 1,
                            options=b"\x02\x04\x05\xb4").l4)
    assert conn.state is State.ESTABLISHED
    assert conn.our_wscale == 0 and conn.peer_wscale == 0


@pytest.mark.parametrize("ack", [ISS, ISS + 2, ISS + (1 << 31)])
def test_synack_acking_something_else_gets_a_bare_reset_and_changes_nothing(ack: int) -> None:
    """RFC 9293 3.10.7.3: a reset whose sequence number is the ACK received; the SYN is
    still waiting for its real answer (a hostile or stale segment cannot end it)."""
    conn, _ = active()
    actions = conn.on_segment(segment(TCP_SYN | TCP_ACK, GUEST_ISS, ack).l4)
    (rst,) = [tcp_of(frame) for frame in actions.frames]
    assert rst.flags == TCP_RST and rst.seq == ack & 0xFFFFFFFF
    assert conn.state is State.SYN_SENT and not actions.abort and not actions.pull


def test_reset_acking_our_syn_is_a_closed_port_and_one_without_ack_is_ignored() -> None:
    conn, _ = active()
    ignored = conn.on_segment(segment(TCP_RST, 0).l4)
    assert conn.state is State.SYN_SENT and not ignored.abort and not ignored.frames
    wrong = conn.on_segment(segment(TCP_RST | TCP_ACK, 0, ISS + 5).l4)
    assert conn.state is State.SYN_SENT and not wrong.abort and not wrong.frames
    refused = conn.on_segment(segment(TCP_RST | TCP_ACK, 0, ISS + 1).l4)
    assert conn.state is State.CLOSED and refused.abort and not refused.frames


def test_the_syn_is_retransmitted_then_given_up_silently() -> None:
    conn, _ = active()
    for _ in range(SYN_RETRIES):
        conn.arm()
        actions = conn.on_timeout()
        assert actions is not None and not actions.abort
        (again,) = [tcp_of(frame) for frame in actions.frames]
        assert again.flags == TCP_SYN and again.seq == ISS
    conn.arm()
    final = conn.on_timeout()
    assert final is not None and final.abort and not final.frames
    assert conn.state is State.CLOSED


def test_a_retransmitted_synack_after_establishing_gets_a_challenge_ack() -> None:
    conn, _ = active()
    conn.on_segment(segment(TCP_SYN | TCP_ACK, GUEST_ISS, ISS + 1, options=MSS_WS).l4)
    actions = conn.on_segment(segment(TCP_SYN | TCP_ACK, GUEST_ISS, ISS + 1).l4)
    assert conn.state is State.ESTABLISHED
    assert [tcp_of(frame).flags for frame in actions.frames] == [TCP_ACK]


def test_reset_while_opening_has_no_ack_and_our_next_sequence() -> None:
    conn, _ = active()
    rst = tcp_of(conn.reset())
    assert rst.flags == TCP_RST and rst.seq == ISS + 1 and conn.state is State.CLOSED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([TCP_SYN, TCP_ACK, TCP_RST, TCP_FIN, TCP_PSH,
                                           TCP_SYN | TCP_ACK, TCP_RST | TCP_ACK]),
                          st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
                          st.binary(max_size=8)), max_size=12))
def test_hostile_segments_while_opening_never_raise(steps: list) -> None:
    conn, _ = active()
    for flags, seq, ack, payload in steps:
        conn.on_segment(segment(flags, seq, ack, payload).l4)
        conn.arm()
        conn.on_timeout()


def test_clock_iss_grows_with_time_per_four_tuple_and_differs_between_them() -> None:
    """RFC 6528: a reused four-tuple's numbers move forward (a guest's TIME-WAIT takes
    the new SYN), other four-tuples' are keyed apart."""
    a, b = (DST, 40000), (NS, 8000)
    first = clock_iss(a, b, 10**9, b"k" * 16)
    assert clock_iss(a, b, 10**9 + 50 * 10**6, b"k" * 16) == (first + 12500) & 0xFFFFFFFF
    assert clock_iss((DST, 40001), b, 10**9, b"k" * 16) != first
    assert clock_iss(a, b, 10**9, b"j" * 16) != first
