"""nsbridge-slirp4netns's parser alone (no root, nothing started): getopt_long's rules,
slirp4netns's checks and texts, and what --help lists.  The same command lines against
the real slirp4netns binary are in tests/usernet/test_slirp4netns_cli.py."""

from __future__ import annotations

import pytest

from nsbridge.cli.slirp4netns import (
    FLAGS,
    ParseExit,
    check_cidr,
    check_mac,
    parse,
    strtol,
    usage,
    version_text,
)

PROG = "slirp4netns"


def fails(*argv: str) -> ParseExit:
    with pytest.raises(ParseExit) as info:
        parse(list(argv), PROG)
    return info.value


def test_defaults_are_slirp4netns_s() -> None:
    args = parse(["1234", "tap0"], PROG)
    assert (args.target, args.tapname, args.netns_type) == ("1234", "tap0", "pid")
    assert args.mtu == 1500 and args.cidr == "10.0.2.0/24"
    assert not args.configure and not args.ipv6 and not args.disable_host_loopback
    assert args.ready_fd is None and args.exit_fd is None and args.api_socket is None


def test_podman_call_parses() -> None:
    args = parse(["--disable-host-loopback", "--mtu=65520", "--enable-ipv6", "-c", "-r", "3",
                  "-e", "4", "--netns-type=path", "/", "tap0"], PROG)
    assert (args.disable_host_loopback, args.mtu, args.ipv6, args.configure) == \
        (True, 65520, True, True)
    assert (args.ready_fd, args.exit_fd, args.netns_type, args.target) == (3, 4, "path", "/")


def test_getopt_forms() -> None:
    """Clusters with an attached value, --x v, prefixes, options after positionals, --."""
    args = parse(["-c6r3", "--mt", "9000", "1", "tap1", "--exit-fd=5", "--api", "/tmp/a"],
                 PROG)
    assert (args.configure, args.ipv6, args.ready_fd, args.mtu) == (True, True, 3, 9000)
    assert (args.exit_fd, args.api_socket, args.tapname) == (5, "/tmp/a", "tap1")
    args = parse(["-m1400", "--", "7", "-c"], PROG)
    assert (args.mtu, args.target, args.tapname, args.configure) == (1400, "7", "-c", False)


@pytest.mark.parametrize(("argv", "stderr"), [
    (["--foo"], "slirp4netns: unrecognized option '--foo'\n"),
    (["--foo=1"], "slirp4netns: unrecognized option '--foo=1'\n"),
    (["-x"], "slirp4netns: invalid option -- 'x'\n"),
    (["--mtu"], "slirp4netns: option '--mtu' requires an argument\n"),
    (["-r"], "slirp4netns: option requires an argument -- 'r'\n"),
    (["--configure=1"], "slirp4netns: option '--configure' doesn't allow an argument\n"),
    (["--dis", "1", "t"], "slirp4netns: option '--dis' is ambiguous; possibilities: "
     "'--disable-host-loopback' '--disable-dns'\n"),
    (["-m", "0", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
    (["-m", "65522", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
    (["-m", "-1", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
    (["--mtu=abc", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
    (["-e", "-1", "1", "t"], "exit-fd must be a non-negative integer\n"),
    (["-r", "x", "1", "t"], "ready-fd must be a non-negative integer\n"),
    (["abc", "t"], "PID must be a positive integer\n"),
    (["0", "t"], "PID must be a positive integer\n"),
    (["1"], ""),
    ([], ""),
    (["--macaddress=02:00:00:00:00:01", "1", "t"],
     "--macaddr cannot be specified when --configure or -c is not specified\n"),
    (["--target-type=foo", "1", "t"], '--target-type must be either "netns" or "bess"\n'),
    (["--userns-path=/nonexistent-s3", "1", "t"], "userns path doesn't exist: "
     "/nonexistent-s3\n"),
    (["--netns-type=path", "/nonexistent-s3", "t"],
     "existing path expected when --netns-type=path: No such file or directory\n"),
])
def test_errors_with_usage(argv: list[str], stderr: str) -> None:
    """slirp4netns's parse_args errors: the message on stderr, usage on stdout, exit 1."""
    exc = fails(*argv)
    assert (exc.code, exc.stderr) == (1, stderr)
    assert exc.stdout.endswith(usage(PROG))


@pytest.mark.parametrize(("cidr", "message"), [
    ("foo", "invalid CIDR: foo"),
    ("10.0.2.0", "invalid CIDR: 10.0.2.0"),
    ("10.0.2.0/123", "invalid CIDR: 10.0.2.0/123"),
    ("300.0.2.0/24", "invalid network address: 300.0.2.0"),
    ("10.0.2.0/26", "prefix length needs to be 1-25"),
    ("10.0.2.0/0", "prefix length needs to be 1-25"),
    ("10.0.2.1/24", "CIDR needs to be a network address like 10.0.2.0/24, "
     "not like 10.0.2.100/24"),
])
def test_cidr_texts(cidr: str, message: str) -> None:
    """After parse_args: the message alone, no usage."""
    exc = fails(f"--cidr={cidr}", "1", "t")
    assert (exc.code, exc.stdout, exc.stderr) == (1, "", message + "\n")


def test_cidr_accepted() -> None:
    assert check_cidr("10.42.0.0/16") == "10.42.0.0/16"
    assert parse(["--cidr", "192.168.0.0/25", "1", "t"], PROG).cidr == "192.168.0.0/25"


@pytest.mark.parametrize("text", ["zz:00:00:00:00:01", "02:00:00:00:00", "0x100:0:0:0:0:1",
                                  "", "02:00:00:00:00:01:02"])
def test_bad_mac(text: str) -> None:
    exc = fails("-c", f"--macaddress={text}", "1", "t")
    assert exc.code == 1
    assert exc.stderr.startswith(f'"{text}" is an invalid MAC address.')
    assert "macaddress has to be a valid MAC address" in exc.stderr


def test_mac_spellings() -> None:
    """%x reads each byte: one digit and a 0x prefix are fine; the result is normalised."""
    assert check_mac("2:0:0xA:00:ff:1") == "02:00:0a:00:ff:01"


def test_strtol_is_cs() -> None:
    assert (strtol(""), strtol(" 5"), strtol("+7"), strtol("-3")) == (0, 5, 7, -3)
    assert strtol("5 ") is None and strtol("0x5") is None and strtol(" ") is None
    assert strtol("9" * 30) is None


def test_help_and_version() -> None:
    exc = fails("--mtu=1400", "-h", "--bogus")
    assert (exc.code, exc.stderr) == (0, "")
    assert exc.stdout == usage(PROG)
    exc = fails("-v")
    assert exc.code == 0 and "SLIRP_CONFIG_VERSION_MAX: 3\n" in exc.stdout
    assert version_text().startswith("slirp4netns version ")


def test_help_lists_only_what_works() -> None:
    """Callers pass a flag when --help lists it: the unimplemented ones are not listed."""
    text = usage(PROG)
    for flag in ("--create-sandbox", "--no-host-loopback"):
        assert flag not in text
    for flag in ("--configure", "--exit-fd", "--ready-fd", "--mtu", "--enable-ipv6",
                 "--api-socket", "--cidr", "--disable-host-loopback", "--netns-type",
                 "--userns-path", "--outbound-addr=IPv4", "--outbound-addr6=IPv6",
                 "--disable-dns", "--macaddress", "--help", "--version",
                 "--enable-sandbox", "--enable-seccomp"):
        assert flag in text
    assert {flag.long for flag in FLAGS} >= {"enable-sandbox"}


def test_outbound_addresses_are_kept_as_given() -> None:
    """Checked and resolved at start, in the namespace the host side dials from (the
    end-to-end tests send every bad value): the parser only keeps the text."""
    args = parse(["--outbound-addr=eth0", "--outbound-addr6", "2001:db8::1", "1", "t"], PROG)
    assert (args.outbound_addr, args.outbound_addr6) == ("eth0", "2001:db8::1")
    args = parse(["--outbound-addr=192.0.2.1", "1", "t"], PROG)  # exact, though a prefix
    assert (args.outbound_addr, args.outbound_addr6) == ("192.0.2.1", None)
    assert parse(["1", "t"], PROG).outbound_addr is None
    exc = fails("--outbound-addr", "1")
    assert exc.code == 1 and exc.stdout.startswith("Usage:")  # the value took "1"
    exc = fails("--outbound-a=eth0", "1", "t")
    assert "option '--outbound-a=eth0' is ambiguous" in exc.stderr  # glibc's quoting


def test_deprecated_aliases() -> None:
    with pytest.raises(ParseExit) as info:
        parse(["--no-host-loopback", "1"], PROG)
    assert info.value.stdout.startswith("WARNING: --no-host-loopback is deprecated")
    assert parse(["--create-sandbox", "1", "t"], PROG).enable_sandbox


def test_sandbox_and_seccomp_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--enable-sandbox", "--enable-seccomp", "1", "t"], PROG)
    assert (args.enable_sandbox, args.enable_seccomp) == (True, True)
    assert capsys.readouterr().out == ""  # no "experimental" warning
    args = parse(["--create-sandbox", "1", "t"], PROG)
    assert (args.enable_sandbox, args.enable_seccomp) == (True, False)
    assert "please use --enable-sandbox" in capsys.readouterr().out
    args = parse(["1", "t"], PROG)
    assert (args.enable_sandbox, args.enable_seccomp) == (False, False)


def test_seccomp_not_listed_where_its_numbers_are_unknown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller would pass --enable-seccomp and fail: on a machine without a system
    call table here, --help leaves it out (and --enable-sandbox in)."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    text = usage(PROG)
    assert "--enable-seccomp" not in text and "--enable-sandbox" in text


def test_tapfd_and_bess_refused() -> None:
    assert "tapfd is not supported" in fails("--netns-type=tapfd", "5").stderr
    assert "BESS mode is not supported" in fails("--target-type=bess", "/tmp/x").stderr


# ---- slirp4netns's policy, as nsbridge-slirp4netns builds it --------------------------


def slirp_policy(*argv: str):  # type: ignore[no-untyped-def]
    from nsbridge.usernet.slirp4netns import slirp4netns_policy, usernet_options

    args = parse([*argv, "1", "tap0"], PROG)
    return slirp4netns_policy(args, usernet_options(args))


def test_host_loopback_reachable_by_default() -> None:
    """slirp4netns's default: the host's 127.0.0.1 is 10.0.2.2, and the host's own
    addresses are ordinary destinations (not tracked)."""
    from nsbridge.usernet.proto.policy import Allow

    policy = slirp_policy()
    assert isinstance(policy.decide("tcp", "10.0.2.2", 8080), Allow)
    assert policy.allow_host_access


def test_disable_host_loopback_closes_the_gateway_only() -> None:
    from nsbridge.usernet.proto.policy import Allow, Deny

    policy = slirp_policy("--disable-host-loopback")
    assert policy.decide("tcp", "10.0.2.2", 8080) == Deny("host loopback disabled")
    assert isinstance(policy.decide("tcp", "fd00::2", 8080), Deny)
    # The host's own addresses are not looked up: slirp4netns leaves them reachable.
    assert policy.host_addresses == set()
    assert isinstance(policy.decide("tcp", "192.0.2.1", 80), Allow)


def test_disable_dns_refuses_the_dns_address() -> None:
    """--disable-dns: 10.0.2.3 (and fd00::3) are refused, not forwarded to the host's
    resolvers, and not dialed either (that address is inside the namespace's network)."""
    from nsbridge.usernet.proto.policy import AllowResolver, Deny

    assert isinstance(slirp_policy().decide("udp", "10.0.2.3", 53), AllowResolver)
    policy = slirp_policy("--disable-dns", "--cidr=10.7.0.0/24")
    for address in ("10.7.0.3", "fd00::3"):
        for protocol in ("udp", "tcp"):
            assert isinstance(policy.decide(protocol, address, 53), Deny), (protocol, address)
