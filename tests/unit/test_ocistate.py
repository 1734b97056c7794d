"""The seccomp agent's message (nsbridge.usernet.proto.ocistate): runc's and crun's
states parsed; everything else refused with a StateError, never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsbridge.usernet.proto.ocistate import MAX_STATE, SECCOMP_FD, StateError, parse_state

# What runc 1.1 sends (specs.ContainerProcessState, json.Marshal: no spaces).
RUNC = (b'{"ociVersion":"1.0.2-dev","fds":["seccompFd"],"pid":4242,"metadata":"web",'
        b'"state":{"ociVersion":"1.0.2-dev","id":"c1","status":"creating","pid":4242,'
        b'"bundle":"/home/u/bundle","annotations":{"a":"b"}}}')


def document(**changes: object) -> bytes:
    value = json.loads(RUNC)
    for key, new in changes.items():
        if new is None:
            value.pop(key)
        else:
            value[key] = new
    return json.dumps(value).encode()


def test_a_runtime_state_is_parsed() -> None:
    state = parse_state(RUNC, 1)
    assert (state.seccomp_index, state.pid, state.container_id, state.metadata) == \
        (0, 4242, "c1", "web")


def test_the_listener_is_found_among_several_fds_and_metadata_is_optional() -> None:
    state = parse_state(document(fds=["other", SECCOMP_FD], metadata=None), 2)
    assert state.seccomp_index == 1 and state.metadata == ""


@pytest.mark.parametrize(("data", "fds", "message"), [
    (b"", 1, "empty"),
    (b"\xff\xfe", 1, "not JSON"),
    (b"{", 1, "not JSON"),
    (b"[]", 1, "not a JSON object"),
    (document(fds=None), 1, "no 'fds'"),
    (document(pid=None), 1, "no 'pid'"),
    (document(state=None), 1, "no 'state'"),
    (document(ociVersion=None), 1, "no 'ociVersion'"),
    (document(pid="4242"), 1, "'pid' is not a int"),
    (document(pid=True), 1, "'pid' is not a int"),
    (document(pid=-1), 1, "not a process id"),
    (document(fds="seccompFd"), 1, "'fds' is not a list"),
    (document(fds=[1]), 1, "other than names"),
    (document(metadata=7), 1, "'metadata' is not a string"),
    (document(state={"id": 5}), 1, "'state.id' is not a string"),
    (RUNC, 0, "names 1 fds but 0 came"),
    (RUNC, 2, "names 1 fds but 2 came"),
    (document(fds=["other"]), 1, "exactly once"),
    (document(fds=[SECCOMP_FD, SECCOMP_FD]), 2, "exactly once"),
    (b" " * (MAX_STATE + 1), 1, "longer than"),
])
def test_bad_messages_are_refused_with_one_line(data: bytes, fds: int, message: str) -> None:
    with pytest.raises(StateError, match=message) as caught:
        parse_state(data, fds)
    assert "\n" not in str(caught.value)


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=8))
def test_any_bytes_parse_or_raise_state_error(data: bytes, fds: int) -> None:
    try:
        parse_state(data, fds)
    except StateError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["fds", "pid", "state", "ociVersion",
                                                       "metadata", "id"]), inner, max_size=5),
                    max_leaves=20))
def test_any_json_parses_or_raises_state_error(value: object) -> None:
    try:
        parse_state(json.dumps(value).encode(), 1)
    except StateError:
        pass
