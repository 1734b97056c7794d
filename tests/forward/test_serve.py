"""``nsbridge serve --config FILE.toml``: forwards and daemon options from a file.

Why: a config file is edited by hand and read by a daemon that may start unattended, so
it must both work (every kind of forward, ``[defaults]``, ``control=``) and, when it is
wrong, say exactly where: one line naming the file, the line and the key, exit code 2,
before anything listens.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from helpers.control import ctl_json, wait_stats
from helpers.netns import in_netns, listen_in
from helpers.processes import host_port, run_nsbridge, wait_forwarding
from helpers.servers import tcp_roundtrip, udp_roundtrip
from helpers.waiting import wait_until
from nsbridge.cli.main import build_parser
from nsbridge.forward.config import load as load_config


def abstract_server(netns: str, stream_server) -> tuple[str, object]:
    """An echo server on an abstract name that exists only inside ``netns``."""
    name = f"nsbt-{uuid.uuid4().hex[:12]}"

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(b"\0" + name.encode())
        sock.listen(16)
        return sock

    return name, stream_server(in_netns(netns, make))


def test_serve_tcp_udp_unix_with_defaults_and_control(netns, forwarder, stream_server,
                                                      udp_server, tmp_path: Path):
    """Every kind of forward from one file; [defaults] reach each forward; the control
    socket named in the file answers `nsbridge ctl`."""
    tcp = stream_server(listen_in(netns))
    tcp6 = stream_server(listen_in(netns, "::1"))
    udp = udp_server(netns)
    name, admin = abstract_server(netns, stream_server)
    control = tmp_path / "serve.sock"
    unix_path = tmp_path / "admin.sock"
    config = tmp_path / "forwards.toml"
    config.write_text(f"""\
workers = 2
control = "{control}"
drain = 1

[defaults]
connect_timeout = 5
deny = ["::1"]            # every forward refuses the IPv6 loopback unless it says otherwise

[[forward]]
name = "web"
listen = "tcp:127.0.0.1:0"
connect = "tcp:127.0.0.1:{tcp.port},netns={netns}"

[[forward]]
name = "web6"
listen = "tcp:[::1]:0"
connect = "tcp:[::1]:{tcp6.port},netns={netns}"

[[forward]]
name = "web6-open"
listen = "tcp:[::1]:0"
connect = "tcp:[::1]:{tcp6.port},netns={netns}"
deny = []

[[forward]]
name = "dns"
listen = "udp:127.0.0.1:0"
connect = "udp:127.0.0.1:{udp.port},netns={netns}"
idle_timeout = 30

[[forward]]
name = "admin"
listen = "unix:{unix_path},mode=0660"
connect = "unix-abstract:{name},netns={netns}"
""")
    fwd = forwarder("serve", "--config", str(config), "-v", wait_ready=False)
    wait_forwarding(fwd, 5)
    wait_until(lambda: control.exists(), what="control socket from the file")
    listed = {f["name"]: f for f in ctl_json(control, "list")["forwards"]}
    assert list(listed) == ["web", "web6", "web6-open", "dns", "admin"]
    assert listed["web"]["deny"] == ["::1"] and listed["web6-open"]["deny"] == []
    assert listed["dns"]["protocol"] == "udp"

    assert tcp_roundtrip(host_port(listed["web"]["listening_on"]), b"web") == b"web"
    assert tcp_roundtrip(host_port(listed["web6-open"]["listening_on"]), b"six") == b"six"
    try:  # denied by [defaults]: a reset (maybe already at connect) or an EOF
        with socket.create_connection(host_port(listed["web6"]["listening_on"]),
                                      timeout=10) as sock:
            sock.sendall(b"let me in")
            assert sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert udp_roundtrip(host_port(listed["dns"]["listening_on"]), b"query") == b"query"
    assert tcp_roundtrip(str(unix_path), b"admin") == b"admin"
    assert oct(unix_path.stat().st_mode & 0o777) == oct(0o660)

    # a worker that accepts by itself (--accept auto) reports its counters every 0.5 s
    stats = wait_stats(control, lambda s: s["web6"]["denied"] == 1
                       and s["web6-open"]["accepted"] == 1, what="web6 counters")
    assert stats["web6"]["accepted"] == 0
    assert len(tcp.accepted) == 1 and len(tcp6.accepted) == 1 and len(admin.accepted) == 1
    fwd.stop()
    assert fwd.proc.returncode == 0
    assert not control.exists() and not unix_path.exists()


GOOD_FORWARD = """
[[forward]]
name = "ok"
listen = "tcp:127.0.0.1:0"
connect = "tcp:127.0.0.1:9"
"""

BAD_CONFIGS = {
    "syntax error": ('workers = 2\n[[forward]]\nname = "a"\nlisten = = "x"\n', 4,
                     ["not valid TOML"]),
    "unknown top-level key": ('workers = 2\ncolour = "red"\n' + GOOD_FORWARD, 2,
                              ["unknown key 'colour'"]),
    "unknown forward key": (GOOD_FORWARD + 'colour = "red"\n', 6,
                            ["[[forward]] ok", "unknown key 'colour'"]),
    "unknown defaults key": ('[defaults]\nlisten = "tcp:127.0.0.1:1"\n' + GOOD_FORWARD, 2,
                             ["[defaults]", "unknown key 'listen'"]),
    "duplicate names": (GOOD_FORWARD + GOOD_FORWARD, 8,
                        ["'name'", "duplicate forward name 'ok'"]),
    "missing listen": ('[[forward]]\nname = "a"\nconnect = "tcp:127.0.0.1:9"\n', 1,
                       ['"listen" is required']),
    "bad endpoint": ('[[forward]]\nname = "a"\nlisten = "tcp:127.0.0.1"\n'
                     'connect = "tcp:127.0.0.1:9"\n', 3, ['"listen"', "expected HOST:PORT"]),
    "unknown endpoint kind": ('[[forward]]\nname = "a"\nlisten = "tcp:127.0.0.1:0"\n'
                              'connect = "sctp:127.0.0.1:9"\n', 4,
                              ['"connect"', "unknown endpoint kind 'sctp'"]),
    "mixed udp and tcp": ('[[forward]]\nname = "a"\nlisten = "udp:127.0.0.1:0"\n'
                          'connect = "tcp:127.0.0.1:9"\n', 1, ["cannot mix udp"]),
    "workers not a number": ('workers = "two"\n' + GOOD_FORWARD, 1, ["workers", "'two'"]),
    "drain negative": ("drain = -1\n" + GOOD_FORWARD, 1, ["drain"]),
    "engine unknown": ('engine = "warp"\n' + GOOD_FORWARD, 1, ["engine", "'warp'"]),
    "mover unknown": ('mover = "warp"\n' + GOOD_FORWARD, 1, ["mover", "'warp'"]),
    "mover and its older name": ('mover = "copy"\nengine = "copy"\n' + GOOD_FORWARD, 2,
                                 ["engine", "older name of mover", "only one"]),
    "accept unknown": ('accept = "shared"\n' + GOOD_FORWARD, 1,
                       ["accept", "'shared'", '"auto", "handoff" or "reuseport"']),
    "timeout not a number": (GOOD_FORWARD + 'connect_timeout = "soon"\n', 6,
                             ['"connect_timeout"', "'soon'"]),
    "allow not a list": (GOOD_FORWARD + "allow = 10\n", 6, ['"allow"', "list of networks"]),
    "allow not a network": (GOOD_FORWARD + 'allow = ["10.0.0.1/8"]\n', 6,
                            ['"allow"', "did you mean 10.0.0.0/8"]),
    "inherited bad type": ('[defaults]\nmax_flows = "many"\n' + GOOD_FORWARD, 2,
                           ['"max_flows"']),
    "defaults not a table": ("defaults = 3\n" + GOOD_FORWARD, 1, ["'defaults'"]),
    "forward not a table": ("forward = [1]\n", 1, ["'forward'"]),
    "no forwards": ("workers = 1\n", None, ["no [[forward]]"]),
    # The line comes from the key the error carries and an index of the file's lines, so
    # TOML's other spellings point at the right line too.
    "quoted key": (GOOD_FORWARD + '"connect_timeout" = "soon"\n', 6, ['"connect_timeout"']),
    "spaced header": ('workers = 1\n[[ forward ]]\nname = "a"\nlisten = "tcp:127.0.0.1:0"\n'
                      'connect = "tcp:127.0.0.1:9"\nproxy = "v3"\n', 6,
                      ["[[forward]] a", '"proxy"', "'v3'"]),
    "after a multi-line array": (GOOD_FORWARD + 'allow = [\n  "127.0.0.0/8",\n]\n'
                                 'proxy = "v3"\n', 9, ['"proxy"']),
    "inherited bad proxy": ('[defaults]\nproxy = "v3"\n' + GOOD_FORWARD, 2, ['"proxy"']),
    "second forward": (GOOD_FORWARD + GOOD_FORWARD.replace('"ok"', '"two"')
                       + "max_flows = 0\n", 11, ["[[forward]] two", '"max_flows"']),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_file_line_and_key(case: str, tmp_path: Path):
    """Each mistake: exit 2, one line with FILE:LINE: and the key, nothing started."""
    text, line, needles = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_nsbridge("serve", "--config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"nsbridge: error: {path}:" + (f"{line}:" if line is not None else "")
    assert lines[0].startswith(prefix), (prefix, lines[0])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("key", ["mover", "engine"])
def test_mover_is_read_under_its_older_name_engine_too(key: str, tmp_path: Path):
    """``engine`` was the mover's name before ``--mover``: old files keep working."""
    path = tmp_path / "mover.toml"
    path.write_text(f'{key} = "copy"\n' + GOOD_FORWARD)
    assert load_config(str(path)).mover == "copy"


@pytest.mark.parametrize("command", [["forward", "-l", "127.0.0.1:1", "-c", "127.0.0.1:2"],
                                     ["serve", "--config", "f.toml"], ["demo"]])
@pytest.mark.parametrize("flag", ["--mover", "--engine"])
def test_mover_flag_keeps_engine_as_an_alias(command: list[str], flag: str):
    args = build_parser().parse_args([*command, flag, "copy"])
    assert args.mover == "copy"


def test_missing_config_file(tmp_path: Path):
    result = run_nsbridge("serve", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"nsbridge: error: --config {tmp_path / 'absent.toml'}: "
                                     "No such file or directory")
