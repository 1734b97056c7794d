"""The endpoint grammar, used the same way on the command line, in config files and on the
control socket:

    KIND:ADDRESS[,OPTION=VALUE]...

    tcp:127.0.0.1:80   tcp:[::1]:80   tcp:localhost:8080
    udp:127.0.0.1:53
    unix:/run/app.sock            unix-abstract:name
    fd:3                          (an inherited socket: listening, bound UDP, or connected)
    systemd:NAME                  (a socket passed by systemd socket activation, by name)

Options:
    netns=SPEC        the namespace this side lives in: a path, pid:N, fd:N or an
                      `ip netns` name (default: where nsbridge runs)
    mode=0660         (unix listener) permissions of the socket file
    owner=USER[:GROUP](unix listener) owner of the socket file
    allow=CIDR, deny=CIDR   (listener; repeatable) which clients may connect
    proxy=v1|v2       (TCP/Unix target) send a PROXY protocol header with the client's
                      real address first

Parsing checks the text only; namespaces and fds are opened by :func:`build_spec`, so
one bad endpoint is reported before anything starts.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass, field

from nsbridge.defaults import CONNECT_TIMEOUT, MAX_UDP_FLOWS, UDP_IDLE_TIMEOUT
from nsbridge.errors import UserError
from nsbridge.forward.spec import (
    ConnectAddress,
    ConnectSide,
    ForwardSpec,
    ListenAddress,
    ListenSide,
    ListenSocket,
    Preconnected,
)
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import HostPort, UnixAddress, parse_host_port
from nsbridge.net.sockets import adopt_connected_fd, adopt_listening_fd

KINDS = ("tcp", "udp", "unix", "unix-abstract", "fd", "systemd")
LISTEN_OPTIONS = {"netns", "mode", "owner", "allow", "deny"}
CONNECT_OPTIONS = {"netns", "proxy"}
_REPEATABLE = {"allow", "deny"}


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint; ``text`` is what the user wrote, for messages."""

    kind: str
    address: HostPort | UnixAddress | int | str
    text: str
    netns: str | None = None
    options: dict[str, list[str]] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        """"udp" for datagram endpoints, "stream" for everything else."""
        return "udp" if self.kind == "udp" else "stream"

    def option(self, key: str) -> str | None:
        values = self.options.get(key)
        return values[-1] if values else None


def parse_endpoint(text: str, *, role: str) -> Endpoint:
    """Parse ``text`` as a listen (``role="listen"``) or connect endpoint."""
    what = f"{role} endpoint {text!r}"
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise UserError(
            f"{what}: unknown endpoint kind {kind!r}; expected one of "
            f"{', '.join(k + ':' for k in KINDS)} (e.g. tcp:127.0.0.1:80)"
        )
    head, *option_texts = _split_options(rest)
    options = _parse_options(option_texts, role=role, what=what)
    netns = options.pop("netns", [None])[-1]
    address = _parse_address(kind, head, role=role, what=what)
    if kind in ("fd", "systemd") and netns is not None:
        raise UserError(f"{what}: netns= does not apply to an inherited socket "
                        "(it already lives in its namespace)")
    if kind == "udp" and "proxy" in options:
        raise UserError(f"{what}: proxy= applies to stream targets, not udp")
    if kind not in ("unix", "unix-abstract") and ("mode" in options or "owner" in options):
        raise UserError(f"{what}: mode= and owner= apply to unix: listeners only")
    if "proxy" in options and options["proxy"][-1] not in ("v1", "v2"):
        raise UserError(f"{what}: proxy={options['proxy'][-1]}: expected v1 or v2")
    if "mode" in options:
        parse_mode(options["mode"][-1], what)
    if "owner" in options:
        parse_owner(options["owner"][-1], what)
    return Endpoint(kind, address, text, netns, options)


def _split_options(rest: str) -> list[str]:
    """Split at commas that are not inside [...] (IPv6 literals never contain commas,
    but keep the rule simple and explicit)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in rest:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_options(texts: list[str], *, role: str, what: str) -> dict[str, list[str]]:
    allowed = LISTEN_OPTIONS if role == "listen" else CONNECT_OPTIONS
    options: dict[str, list[str]] = {}
    for item in texts:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{what}: option {item!r} is not KEY=VALUE")
        if key not in allowed:
            raise UserError(
                f"{what}: unknown option {key!r} for a {role} endpoint; "
                f"expected one of {', '.join(sorted(allowed))}"
            )
        if key in options and key not in _REPEATABLE:
            raise UserError(f"{what}: option {key!r} given twice")
        options.setdefault(key, []).append(value)
    return options


def _parse_address(kind: str, head: str, *, role: str, what: str,
                   ) -> HostPort | UnixAddress | int | str:
    if kind in ("tcp", "udp"):
        return parse_host_port(head, what=what + ":", allow_port_zero=role == "listen")
    if kind in ("unix", "unix-abstract"):
        if not head:
            raise UserError(f"{what}: empty socket {'name' if kind == 'unix-abstract' else 'path'}")
        if "\0" in head:
            raise UserError(f"{what}: NUL byte in socket address")
        limit = 107
        if len(head.encode()) > limit:
            raise UserError(f"{what}: socket address longer than {limit} bytes")
        return UnixAddress(head, abstract=kind == "unix-abstract")
    if kind == "fd":
        if not (head.isascii() and head.isdigit()):
            raise UserError(f"{what}: fd:{head} is not a file descriptor number")
        return int(head)
    if role != "listen":
        raise UserError(f"{what}: systemd: sockets can only be listeners")
    if not head:
        raise UserError(f"{what}: systemd: needs the socket's FileDescriptorName")
    return head


def parse_mode(text: str, what: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UserError(f"{what}: mode={text}: not an octal mode like 0660") from None
    if not 0 <= mode <= 0o7777:
        raise UserError(f"{what}: mode={text}: out of range")
    return mode


def parse_owner(text: str, what: str) -> tuple[int, int]:
    """``USER[:GROUP]`` (names or numbers) to (uid, gid); -1 leaves one unchanged."""
    user, _, group = text.partition(":")
    try:
        uid = int(user) if user.isdigit() else (pwd.getpwnam(user).pw_uid if user else -1)
    except KeyError:
        raise UserError(f"{what}: owner={text}: no such user {user!r}") from None
    try:
        gid = int(group) if group.isdigit() else (grp.getgrnam(group).gr_gid if group else -1)
    except KeyError:
        raise UserError(f"{what}: owner={text}: no such group {group!r}") from None
    return uid, gid


# ---- from endpoints to forward specs --------------------------------------------------


def build_spec(listen: Endpoint, connect: Endpoint, *, name: str = "",
               connect_timeout: float | None = CONNECT_TIMEOUT, allow: list[str] | None = None,
               deny: list[str] | None = None, proxy: str | None = None,
               idle_timeout: float = UDP_IDLE_TIMEOUT,
               max_flows: int = MAX_UDP_FLOWS) -> ForwardSpec:
    """Open what the two endpoints name (namespaces, inherited fds) into a ForwardSpec.

    Endpoint options (allow=, deny=, proxy=) add to the forward-wide ones given here.
    """
    if listen.protocol != connect.protocol and connect.kind != "fd":
        raise UserError(
            f"forward {listen.text} -> {connect.text}: cannot mix udp with stream endpoints "
            "(udp forwards datagrams to udp, tcp/unix streams to tcp/unix)"
        )
    listen_side = _listen_side(listen)
    if listen_side.protocol != connect.protocol:
        raise UserError(f"forward {listen.text} -> {connect.text}: the inherited socket is "
                        f"{listen_side.protocol}, the target is {connect.protocol}")
    connect_side = _connect_side(connect)
    return ForwardSpec(
        listen_side, connect_side, connect_timeout=connect_timeout, name=name,
        allow=[*(allow or []), *listen.options.get("allow", [])],
        deny=[*(deny or []), *listen.options.get("deny", [])],
        proxy=connect.option("proxy") or proxy,
        idle_timeout=idle_timeout, max_flows=max_flows,
        source={"listen": listen.text, "connect": connect.text},
    )


def _listen_side(ep: Endpoint) -> ListenSide:
    what = f"listen endpoint {ep.text!r}:"
    if ep.kind == "fd":
        assert isinstance(ep.address, int)  # what _parse_address makes of fd:N
        return ListenSocket(adopt_listening_fd(ep.address, what, allow_udp=True), ep.text)
    if ep.kind == "systemd":
        from nsbridge.linux.systemd import fds_named, listen_fds

        # fds_named's message lists the names systemd did pass, so a typo is obvious.
        named = fds_named(listen_fds(unset=False), str(ep.address), what=what)
        return ListenSocket(adopt_listening_fd(named[0], what, allow_udp=True), ep.text)
    assert isinstance(ep.address, (HostPort, UnixAddress))
    mode = parse_mode(ep.options["mode"][-1], what) if "mode" in ep.options else None
    owner = parse_owner(ep.options["owner"][-1], what) if "owner" in ep.options else None
    return ListenAddress(ep.address, Netns.from_spec(ep.netns) if ep.netns else None,
                         protocol=ep.protocol, mode=mode, owner=owner)


def _connect_side(ep: Endpoint) -> ConnectSide:
    what = f"connect endpoint {ep.text!r}:"
    if ep.kind == "fd":
        assert isinstance(ep.address, int)  # what _parse_address makes of fd:N
        return Preconnected(adopt_connected_fd(ep.address, what))
    assert isinstance(ep.address, (HostPort, UnixAddress))
    return ConnectAddress(ep.address, Netns.from_spec(ep.netns) if ep.netns else None,
                          protocol=ep.protocol)
