"""``nsbridge-slirp4netns`` (and ``nsbridge slirp4netns``): slirp4netns's command line.

Container runtimes start slirp4netns with a command line they build themselves and
judge the result by its exit code, so this parser reproduces slirp4netns 1.2/1.3 as
the callers see it, not argparse's idea of it:

* GNU ``getopt_long`` semantics: ``--x=v`` and ``--x v``, unique prefixes of long names,
  short clusters (``-c6r3``), options after the positionals, ``--`` ends the options.
* the same checks in the same order with the same texts: an option's value is checked
  when getopt reaches it (message on stderr, usage on stdout, exit 1, as slirp4netns
  does), then the positionals, then ``--cidr`` and ``--macaddress`` (message only).
* ``--help`` lists a flag only if it works here, because callers detect features by
  grepping it (podman and rootlesskit pass ``--enable-sandbox --enable-seccomp``
  whenever they are listed).  Flags slirp4netns has and nsbridge does not implement are
  still recognised, and refused with one line saying so.

Nothing here touches the system beyond ``access()`` on the paths slirp4netns checks at
parse time; the life cycle is :mod:`nsbridge.usernet.slirp4netns`, imported only once
the command line is good (a bad command line answers without paying for it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

DEFAULT_MTU = 1500  # slirp4netns's, not nsbridge run's: callers that pass none expect it
MAX_MTU = 65521
DEFAULT_CIDR = "10.0.2.0/24"
NETWORK_PREFIX_MIN, NETWORK_PREFIX_MAX = 1, 25  # the guest is network + 100
COMPATIBLE_VERSION = "1.2.0"
# libslirp's configuration version slirp4netns reports; 3 says --disable-dns exists.
SLIRP_CONFIG_VERSION_MAX = 3


@dataclass(frozen=True)
class Flag:
    """One option: its names, whether it takes a value, and its --help line (None: not
    listed, because nsbridge does not implement it)."""

    long: str
    short: str | None
    value: str | None  # metavar, or None for a switch
    help: str | None


FLAGS = (
    Flag("configure", "c", None, "bring up the interface"),
    Flag("exit-fd", "e", "FD", "specify the FD for terminating slirp4netns"),
    Flag("ready-fd", "r", "FD", "specify the FD to write to when the network is configured"),
    Flag("mtu", "m", "MTU", f"specify MTU (default={DEFAULT_MTU}, max={MAX_MTU})"),
    Flag("enable-ipv6", "6", None, "enable IPv6"),
    Flag("api-socket", "a", "PATH", "specify API socket path"),
    Flag("cidr", None, "CIDR", f"specify network address CIDR (default={DEFAULT_CIDR})"),
    Flag("disable-host-loopback", None, None,
         "prohibit connecting to 127.0.0.1:* on the host namespace"),
    Flag("no-host-loopback", None, None, None),  # deprecated alias
    Flag("netns-type", None, "TYPE",
         "specify network namespace type ([path|pid], default=pid)"),
    Flag("userns-path", None, "PATH", "specify user namespace path"),
    Flag("enable-sandbox", None, None,
         "create a new mount namespace (and drop all caps except CAP_NET_BIND_SERVICE)"),
    Flag("create-sandbox", None, None, None),  # deprecated alias of the above
    Flag("enable-seccomp", None, None, "enable seccomp to limit syscalls"),
    Flag("outbound-addr", None, "IPv4",
         "sets outbound ipv4 address to bound to (or an interface's)"),
    Flag("outbound-addr6", None, "IPv6",
         "sets outbound ipv6 address to bound to (or an interface's)"),
    Flag("disable-dns", None, None,
         "disables 10.0.2.3 (or configured internal ip) to host dns redirect"),
    Flag("macaddress", None, "MAC", "specify the MAC address of the TAP (only valid with -c)"),
    Flag("target-type", None, "TYPE", "specify the target type ([netns], default=netns)"),
    Flag("help", "h", None, "show this help and exit"),
    Flag("version", "v", None, "show version and exit"),
)
_BY_LONG = {flag.long: flag for flag in FLAGS}
_BY_SHORT = {flag.short: flag for flag in FLAGS if flag.short}
# Flags recognised and refused with one line, by name: none today (--netns-type=tapfd
# and --target-type=bess, values rather than flags, are refused where they are read).
NOT_IMPLEMENTED: dict[str, str] = {}


@dataclass
class Slirp4netnsArgs:
    """The command line, checked: what :mod:`nsbridge.usernet.slirp4netns` runs with."""

    target: str = ""  # a PID (netns-type pid) or an nsfs path
    tapname: str = "tap0"
    netns_type: str = "pid"  # pid | path
    configure: bool = False
    exit_fd: int | None = None
    ready_fd: int | None = None
    mtu: int = DEFAULT_MTU
    ipv6: bool = False
    api_socket: str | None = None
    cidr: str = DEFAULT_CIDR
    disable_host_loopback: bool = False
    userns_path: str | None = None
    disable_dns: bool = False
    macaddress: str | None = None  # normalised aa:bb:cc:dd:ee:ff
    enable_sandbox: bool = False
    enable_seccomp: bool = False
    # An address or interface name each, as given: resolved (and checked) at start, in
    # the namespace the host side dials from (usernet/host/outbound.py).
    outbound_addr: str | None = None
    outbound_addr6: str | None = None
    refused: list[str] = field(default_factory=list)  # flags given that are not built


class ParseExit(Exception):
    """The command line ends the program here: what to print where, and the exit code."""

    def __init__(self, code: int, stdout: str = "", stderr: str = "") -> None:
        super().__init__(code, stdout, stderr)
        self.code, self.stdout, self.stderr = code, stdout, stderr


def usage(prog: str) -> str:
    """slirp4netns's --help layout, with only the flags that work here."""
    lines = [f"Usage: {prog} [OPTION]... PID|PATH [TAPNAME]",
             "User-mode networking for unprivileged network namespaces.", ""]
    for flag in FLAGS:
        if flag.help is None or (flag.long == "enable-seccomp" and not seccomp_supported()):
            continue
        names = f"-{flag.short}, --{flag.long}" if flag.short else f"--{flag.long}"
        if flag.value:
            names += f"={flag.value}"
        lines.append(f"{names:<24} {flag.help}")
    return "\n".join(lines) + "\n"


def seccomp_supported() -> bool:
    """Whether nsbridge knows this machine's system call numbers (else --enable-seccomp
    is not listed, and refused with one line if given)."""
    from nsbridge.linux.seccomp import SeccompUnsupported, native_arch

    try:
        native_arch()
    except SeccompUnsupported:
        return False
    return True


def version_text() -> str:
    """A runc-style version block; callers and tests parse ``SLIRP_CONFIG_VERSION_MAX``."""
    from nsbridge import __version__

    return (f"slirp4netns version {COMPATIBLE_VERSION}+nsbridge.{__version__}\n"
            f"commit: none (nsbridge {__version__}, not libslirp)\n"
            f"libslirp: none (nsbridge's own engine)\n"
            f"SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n")


# ---- getopt_long ------------------------------------------------------------------------


def _walk(argv: Sequence[str], prog: str) -> Iterator[tuple[Flag, str | None] | str]:
    """Yield (flag, value) pairs and positional strings in getopt's order of discovery;
    raise :class:`ParseExit` (code 1, glibc's text) at the first bad option."""
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            yield from args[i:]
            return
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flag = _long(name, arg, prog)
            if flag.value is None:
                if eq:
                    raise _bad(prog, f"option '--{flag.long}' doesn't allow an argument")
                yield flag, None
                continue
            if not eq:
                if i >= len(args):
                    raise _bad(prog, f"option '--{flag.long}' requires an argument")
                value = args[i]
                i += 1
            yield flag, value
            continue
        if arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                char = arg[j]
                j += 1
                short = _BY_SHORT.get(char)
                if short is None:
                    raise _bad(prog, f"invalid option -- '{char}'")
                if short.value is None:
                    yield short, None
                    continue
                if j < len(arg):
                    yield short, arg[j:]
                elif i < len(args):
                    yield short, args[i]
                    i += 1
                else:
                    raise _bad(prog, f"option requires an argument -- '{char}'")
                break
            continue
        yield arg


def _long(name: str, arg: str, prog: str) -> Flag:
    """An exact long name, else a unique prefix (getopt_long accepts abbreviations)."""
    if name in _BY_LONG:
        return _BY_LONG[name]
    matches = [flag for flag in FLAGS if flag.long.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = " ".join(f"'--{flag.long}'" for flag in matches)
        # glibc quotes the whole argument here, "=value" included
        raise _bad(prog, f"option '{arg}' is ambiguous; possibilities: {names}")
    raise _bad(prog, f"unrecognized option '{arg}'")


def _bad(prog: str, message: str) -> ParseExit:
    return ParseExit(1, usage(prog), f"{prog}: {message}\n")


# ---- slirp4netns's checks -----------------------------------------------------------------


def strtol(text: str) -> int | None:
    """C's ``strtol(text, &end, 10)`` followed by slirp4netns's ``*end != '\\0'`` and
    ``errno`` checks: the value, or None where slirp4netns reports an error.  Like C, an
    empty string is 0, and leading white space and a sign are accepted."""
    match = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    if text == "":
        return 0
    if match is None:
        return None
    value = int(match.group(1))
    if not -(1 << 63) <= value < (1 << 63):  # ERANGE
        return None
    return value


def _int32(value: int) -> int:
    """The C cast of a long to int (slirp4netns stores fds and PIDs as int)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def parse(argv: Sequence[str], prog: str = "nsbridge-slirp4netns") -> Slirp4netnsArgs:
    """slirp4netns's ``parse_args`` and ``slirp4netns_config_from_options``, in its order.

    Returns the checked arguments, or raises :class:`ParseExit` for help, version and
    every error (exit 0 or 1, texts as slirp4netns prints them).  slirp4netns prints its
    warnings on stdout as it meets them; they lead whatever else goes there."""
    warnings: list[str] = []
    try:
        args = _parse(argv, prog, warnings)
    except ParseExit as exc:
        exc.stdout = "".join(warnings) + exc.stdout
        raise
    if warnings:
        sys.stdout.write("".join(warnings))
    return args


def _parse(argv: Sequence[str], prog: str, warnings: list[str]) -> Slirp4netnsArgs:
    out = Slirp4netnsArgs()

    def fail(message: str | None) -> ParseExit:
        """An error slirp4netns reports with its usage (parse_args's ``goto error``)."""
        return ParseExit(1, usage(prog), "" if message is None else message + "\n")

    given: dict[str, str] = {}
    positionals: list[str] = []
    for item in _walk(argv, prog):
        if isinstance(item, str):
            positionals.append(item)
            continue
        flag, value = item
        name = flag.long
        if name == "help":
            raise ParseExit(0, usage(prog))
        if name == "version":
            raise ParseExit(0, version_text())
        if name == "configure":
            out.configure = True
        elif name in ("exit-fd", "ready-fd"):
            number = strtol(value or "")
            if number is None or _int32(number) < 0:
                raise fail(f"{name} must be a non-negative integer")
            setattr(out, name.replace("-", "_"), _int32(number))
        elif name == "mtu":
            number = strtol(value or "")
            mtu = None if number is None else _int32(number) & 0xFFFFFFFF  # unsigned
            if mtu is None or mtu == 0 or mtu > MAX_MTU:
                raise fail(f"MTU must be a positive integer (< {MAX_MTU + 1})")
            out.mtu = mtu
        elif name in ("disable-host-loopback", "no-host-loopback"):
            if name == "no-host-loopback":
                warnings.append(_DEPRECATED.format(old=name, new="disable-host-loopback"))
            out.disable_host_loopback = True
        elif name in ("enable-sandbox", "create-sandbox"):
            if name == "create-sandbox":
                warnings.append(_DEPRECATED.format(old=name, new="enable-sandbox"))
            out.enable_sandbox = True
        elif name == "enable-seccomp":
            out.enable_seccomp = True
        elif name in NOT_IMPLEMENTED:
            out.refused.append(name)
        elif name == "userns-path":
            assert value is not None
            if not os.path.exists(value):
                raise fail(f"userns path doesn't exist: {value}")
            out.userns_path = value
        elif name == "enable-ipv6":
            out.ipv6 = True
        elif name == "disable-dns":
            out.disable_dns = True
        else:  # cidr, netns-type, api-socket, macaddress, target-type, outbound-addr(6)
            assert value is not None
            given[name] = value
    if "macaddress" in given and not out.configure:
        raise fail("--macaddr cannot be specified when --configure or -c is not specified")
    target_type = given.get("target-type")
    if target_type == "bess":
        raise ParseExit(1, stderr="BESS mode is not supported by nsbridge-slirp4netns "
                        "(--target-type=bess)\n")
    if target_type is not None and target_type != "netns":
        raise fail('--target-type must be either "netns" or "bess"')
    if not positionals:
        raise fail(None)
    netns_type = given.get("netns-type", "pid")
    if netns_type == "pid":
        pid = strtol(positionals[0])
        if pid is None or _int32(pid) <= 0:
            raise fail("PID must be a positive integer")
        out.target = str(_int32(pid))
    elif netns_type == "tapfd":
        raise ParseExit(1, stderr="--netns-type=tapfd is not supported by "
                        "nsbridge-slirp4netns; give the namespace (pid or path)\n")
    else:  # slirp4netns reads every other type as a path
        out.netns_type = "path"
        out.target = positionals[0]
        if not os.path.exists(positionals[0]):
            raise fail("existing path expected when --netns-type=path: "
                       "No such file or directory")
    if len(positionals) < 2:
        raise fail(None)
    if len(positionals) > 2:
        warnings.append("WARNING: too many arguments\n")  # slirp4netns: not an error
    out.tapname = positionals[1]
    out.api_socket = given.get("api-socket")
    out.outbound_addr = given.get("outbound-addr")
    out.outbound_addr6 = given.get("outbound-addr6")
    # slirp4netns_config_from_options: from here on the message alone, no usage.
    if "cidr" in given:
        out.cidr = check_cidr(given["cidr"])
    if "macaddress" in given:
        out.macaddress = check_mac(given["macaddress"])
    if out.refused:
        raise ParseExit(1, stderr=NOT_IMPLEMENTED[out.refused[0]] + "\n")
    return out


_DEPRECATED = ("WARNING: --{old} is deprecated and will be removed in future releases, "
               "please use --{new} instead.\n")


_CIDR = re.compile(r"(([0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2})")


def check_cidr(text: str) -> str:
    """slirp4netns's ``parse_cidr``: its regular expression, then its three checks, each
    with its own text."""
    def fail(message: str) -> ParseExit:
        return ParseExit(1, stderr=message + "\n")

    match = _CIDR.fullmatch(text)
    if match is None:
        raise fail(f"invalid CIDR: {text}")
    address, prefix = match.group(1), int(match.group(3))
    try:
        network = ipaddress.IPv4Address(address)
    except ValueError:
        raise fail(f"invalid network address: {address}") from None
    if not NETWORK_PREFIX_MIN <= prefix <= NETWORK_PREFIX_MAX:
        raise fail(f"prefix length needs to be {NETWORK_PREFIX_MIN}-{NETWORK_PREFIX_MAX}")
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    if int(network) & mask != int(network):
        raise fail("CIDR needs to be a network address like 10.0.2.0/24, "
                   "not like 10.0.2.100/24")
    return f"{network}/{prefix}"


_HEX = re.compile(r"[ \t\n\v\f\r]*(?:0[xX])?([0-9a-fA-F]+)")


def check_mac(text: str) -> str:
    """Six hex bytes separated by ':' (slirp4netns reads each with ``%x``, so ``0a``,
    ``a`` and ``0xa`` are all accepted); normalised to ``aa:bb:cc:dd:ee:ff``.  Stricter
    than slirp4netns on one point: fewer than six bytes is refused, where slirp4netns
    would zero-fill them."""
    parts = text.split(":")
    values = []
    for part in parts[:6]:
        match = _HEX.match(part)
        value = int(match.group(1), 16) if match else -1
        if not 0 <= value <= 255:
            break
        values.append(value)
    if len(values) == 6 and len(parts) > 6:
        raise ParseExit(1, stderr=f'"{text}" is an invalid MAC address.  Is it too long?\n'
                        + _MAC_HINT)
    if len(values) < 6:
        raise ParseExit(1, stderr=f'"{text}" is an invalid MAC address.\n' + _MAC_HINT)
    return ":".join(f"{value:02x}" for value in values)


_MAC_HINT = ("macaddress has to be a valid MAC address (hex string, 6 bytes, each byte "
             "separated by a ':').\n")


# ---- the program ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The console script: parse, check the caller's fds, then run until told to stop."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = sys.argv[0] if sys.argv and sys.argv[0] else "nsbridge-slirp4netns"
    try:
        args = parse(argv, prog)
    except ParseExit as exc:
        sys.stdout.write(exc.stdout)
        sys.stdout.flush()
        sys.stderr.write(exc.stderr)
        return exc.code
    # Before anything of ours is opened: an fd we open must never take the number of a
    # ready or exit fd the caller forgot to pass.
    from nsbridge.errors import UserError

    try:
        from nsbridge.usernet.slirp4netns import check_caller_fds

        check_caller_fds(args.ready_fd, args.exit_fd)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    from nsbridge.usernet.slirp4netns import serve

    return serve(args, prog)


def build_parser() -> argparse.ArgumentParser:
    """An argparse description of the same flags, for the man page only (argparse-manpage
    reads parsers); parsing itself is :func:`parse`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nsbridge-slirp4netns", add_help=False,
        usage="nsbridge-slirp4netns [OPTION]... PID|PATH [TAPNAME]",
        description="User-mode networking for a network namespace, started by container "
        "runtimes (rootlesskit, podman) in place of slirp4netns: its command line, "
        "nsbridge's engine and policy.  -h/--help lists exactly the flags that work here "
        "(callers detect features by reading it).  See docs/slirp4netns.md.")
    for flag in FLAGS:
        if flag.help is None:
            continue
        names = [f"-{flag.short}"] if flag.short else []
        names.append(f"--{flag.long}")
        if flag.value:
            parser.add_argument(*names, metavar=flag.value, help=flag.help)
        elif flag.long == "help":
            parser.add_argument(*names, action="help", help=flag.help)
        else:
            parser.add_argument(*names, action="store_true", help=flag.help)
    parser.add_argument("target", metavar="PID|PATH",
                        help="the namespace: a process in it (--netns-type=pid) or an nsfs "
                        "file (--netns-type=path)")
    parser.add_argument("tapname", metavar="TAPNAME", nargs="?", default="tap0",
                        help="the TAP device inside (created with -c)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
