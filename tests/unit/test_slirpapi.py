"""slirp4netns's API protocol, sans-IO: every request kind, every error, parson's JSON
quirks (each expectation below was checked against the real slirp4netns 1.2.0, see
tests/usernet/test_slirp_api.py for the live comparison), and hostile input fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbridge.usernet.proto import slirpapi
from nsbridge.usernet.proto.slirpapi import (
    AddHostFwd,
    ApiError,
    BadJson,
    HostFwdTable,
    ListHostFwd,
    RemoveHostFwd,
    decode_request,
    parse_json,
)

GUEST = "10.0.2.100"


def add(**arguments: object) -> bytes:
    return json.dumps({"execute": "add_hostfwd", "arguments": arguments}).encode()


def decode(data: bytes) -> object:
    return decode_request(data, GUEST)


def test_add_hostfwd_with_defaults():
    assert decode(add(proto="tcp", host_port=8080, guest_port=80)) == AddHostFwd(
        "tcp", "0.0.0.0", 8080, GUEST, 80)


def test_add_hostfwd_with_every_field_and_ipv6():
    assert decode(add(proto="udp", host_addr="127.0.0.1", host_port=5353,
                      guest_addr="10.0.2.50", guest_port=53)) == AddHostFwd(
        "udp", "127.0.0.1", 5353, "10.0.2.50", 53)
    assert decode(add(proto="tcp", host_addr="::0001", host_port=1,
                      guest_addr="FD00::100", guest_port=65535)) == AddHostFwd(
        "tcp", "::1", 1, "fd00::100", 65535)


def test_empty_or_non_string_addresses_mean_the_defaults():
    expected = AddHostFwd("tcp", "0.0.0.0", 8080, GUEST, 80)
    assert decode(add(proto="tcp", host_addr="", host_port=8080, guest_addr="",
                      guest_port=80)) == expected
    assert decode(add(proto="tcp", host_addr=1, host_port=8080, guest_addr=None,
                      guest_port=80)) == expected


def test_numbers_are_truncated_like_a_c_cast():
    assert decode(add(proto="tcp", host_port=18081.7, guest_port=80.2)) == AddHostFwd(
        "tcp", "0.0.0.0", 18081, GUEST, 80)
    assert decode(b'{"execute":"remove_hostfwd","arguments":{"id":1.9}}') == RemoveHostFwd(1)


def test_strings_end_at_their_first_nul():
    request = b'{"execute":"add_hostfwd\\u0000x","arguments":{"proto":"tcp\\u0000x",' \
              b'"host_port":1,"guest_port":2}}'
    assert decode(request) == AddHostFwd("tcp", "0.0.0.0", 1, GUEST, 2)


@pytest.mark.parametrize("arguments, field", [
    ({}, "proto"),  # slirp4netns crashes here
    ({"proto": 6}, "proto"),
    ({"proto": "TCP"}, "proto"),
    ({"proto": "sctp"}, "proto"),
    ({"proto": "tcp", "host_addr": "1.2.3"}, "host_addr"),
    ({"proto": "tcp", "host_addr": "01.2.3.4"}, "host_addr"),
    ({"proto": "tcp", "host_addr": "fe80::1%lo"}, "host_addr"),
    ({"proto": "tcp", "host_addr": "localhost"}, "host_addr"),
    ({"proto": "tcp", "host_addr": "1.2.3.4\u00e9"}, "host_addr"),
    ({"proto": "tcp"}, "host_port"),
    ({"proto": "tcp", "host_port": "8080"}, "host_port"),
    ({"proto": "tcp", "host_port": True}, "host_port"),
    ({"proto": "tcp", "host_port": 0.5}, "host_port"),
    ({"proto": "tcp", "host_port": 65536}, "host_port"),  # slirp4netns wraps it
    ({"proto": "tcp", "host_port": -1}, "host_port"),
    ({"proto": "tcp", "host_port": 1e300}, "host_port"),
    ({"proto": "tcp", "host_port": 8080, "guest_addr": "x"}, "guest_addr"),
    ({"proto": "tcp", "host_port": 8080}, "guest_port"),
    ({"proto": "tcp", "host_port": 8080, "guest_port": 0}, "guest_port"),
])
def test_add_hostfwd_bad_arguments(arguments, field):
    assert decode(add(**arguments)) == ApiError(f"bad request: add_hostfwd: bad arguments.{field}")


def test_arguments_that_are_not_an_object_are_missing_ones():
    assert decode(b'{"execute":"add_hostfwd","arguments":[1]}') == ApiError(
        "bad request: add_hostfwd: bad arguments.proto")
    assert decode(b'{"execute":"remove_hostfwd","arguments":"x"}') == RemoveHostFwd(0)


def test_list_and_remove():
    assert decode(b'{"execute":"list_hostfwd"}') == ListHostFwd()
    assert decode(b'{"execute":"remove_hostfwd","arguments":{"id":3}}') == RemoveHostFwd(3)
    assert decode(b'{"execute":"remove_hostfwd"}') == RemoveHostFwd(0)


@pytest.mark.parametrize("data, desc", [
    (b"", "bad request: cannot parse JSON"),
    (b" " * 4095, "bad request: cannot parse JSON"),
    (b" " * 4096, "bad request: too large message"),
    (b"{", "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd",}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","execute":"x"}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":NaN}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":1e400}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":"\\ud800"}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":01}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":[1,]}', "bad request: cannot parse JSON"),
    (b'{"execute":"list_hostfwd","a":"\x01"}', "bad request: cannot parse JSON"),
    (b'{"execute\\u0000":"list_hostfwd"}', "bad request: cannot parse JSON"),
    (b"[]", "bad request: json_object() failed"),
    (b'"x"', "bad request: json_object() failed"),
    (b"{}", "bad request: no execute found"),
    (b'{"execute":1}', "bad request: no execute found"),
    (b'{"execute":"nope"}', "bad request: unknown execute"),
])
def test_request_errors(data, desc):
    assert decode(data) == ApiError(desc)


@pytest.mark.parametrize("data", [
    b'{"execute":"list_hostfwd"}garbage',  # what follows the first value is ignored
    b'{"execute":"list_hostfwd"}\x00{',  # a NUL ends the request
    b'\x0b{"execute":"list_hostfwd"}',  # C isspace
    b'\xef\xbb\xbf{"execute":"list_hostfwd"}',  # a UTF-8 byte-order mark
    b'{"execute":"list_hostfwd"}\n',
    b'{"execute":"list_hostfwd","a":"\xff"}',  # bytes are bytes
    b'{"execute":"list_hostfwd","a":1.}',
    b'{"execute":"list_hostfwd","a":-.5}',
    b'{"execute":"list_hostfwd","a":\x0b1}',
    b'{"execute":"list_hostfwd","a":"\\ud83d\\ude00\\/"}',
])
def test_what_parson_accepts(data):
    assert decode(data) == ListHostFwd()


def test_nesting_limit_is_parsons_and_costs_no_recursion():
    assert parse_json(b"[" * 2049 + b"]" * 2049) is not None
    with pytest.raises(BadJson):
        parse_json(b"[" * 2050 + b"]" * 2050)


def test_replies_are_slirp4netns_bytes():
    table = HostFwdTable()
    first = table.add(AddHostFwd("tcp", "0.0.0.0", 8080, GUEST, 80))
    second = table.add(AddHostFwd("udp", "::1", 5353, GUEST, 53))
    assert slirpapi.added_reply(second.id) == b'{"return":{"id":2}}'
    assert slirpapi.list_reply(table.entries()) == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,'
        b'"guest_addr":"10.0.2.100","guest_port":80},{"id":2,"proto":"udp","host_addr":'
        b'"::1","host_port":5353,"guest_addr":"10.0.2.100","guest_port":53}]}')
    assert slirpapi.list_reply([]) == b'{"entries":[]}'
    assert slirpapi.removed_reply() == b'{"return":{}}'
    assert slirpapi.error_reply(slirpapi.BAD_ID) == (
        b'{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}')
    assert table.remove(first.id) == first and table.remove(first.id) is None


def test_ids_only_grow():
    table = HostFwdTable()
    request = AddHostFwd("tcp", "0.0.0.0", 1, GUEST, 1)
    ids = []
    for _ in range(3):
        entry = table.add(request)
        ids.append(entry.id)
        table.remove(entry.id)
    assert ids == [1, 2, 3] and table.next_id == 4 and table.entries() == []


REQUESTY = st.sampled_from([
    b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_port":2}}',
    b'{"execute":"remove_hostfwd","arguments":{"id":1}}', b'{"execute":"list_hostfwd"}',
    b'{"a":[1,2.5e3,-0.1,true,false,null,"\\u00e9\\ud83d\\ude00"]}'])


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.binary(max_size=5000), REQUESTY,
                 st.tuples(REQUESTY, st.integers(0, 90), st.binary(max_size=8)).map(
                     lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])))
def test_hostile_bytes_never_raise(data):
    result = decode(data)
    assert isinstance(result, (AddHostFwd, ListHostFwd, RemoveHostFwd, ApiError))
    if isinstance(result, AddHostFwd):
        assert 0 < result.host_port < 65536 and 0 < result.guest_port < 65536


TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # parson refuses lone surrogates


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner) | st.dictionaries(TEXT.filter(lambda k: "\0" not in k),
                                                    inner), max_leaves=20))
def test_standard_json_reads_as_python_does(value):
    text = json.dumps(value).encode()
    assert parse_json(text) == _as_parson(value)


def _as_parson(value: object) -> object:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_as_parson(item) for item in value]
    assert isinstance(value, dict)
    return {key.encode(): _as_parson(item) for key, item in value.items()}
