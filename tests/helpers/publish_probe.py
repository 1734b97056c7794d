"""The published-port switching tests' program inside ``nsbridge run --bypass -p``
(stdlib only).

``python3 publish_probe.py CASE ARGS...``.  Server cases print one JSON line when they
listen (``{"listening": [address, port]}``: ``getsockname()`` after ``listen``, which
shows the host's port once the listener was handed over), serve, and print one JSON
line at the end.  Every connection is answered with the client's address as
``accept()`` gave it (``IP PORT``, one line) and then echoed until EOF.  The ``doors``
case tries, from inside, every way around the hand-over and prints what each got.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
libc.connect.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def error_name(exc: OSError) -> str:
    if exc.errno == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # errorcode spells it ENOTSUP (the same number on Linux)
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def say(value: object) -> None:
    print(json.dumps(value), flush=True)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def answer(conn: socket.socket, peer: tuple) -> None:
    with conn:
        try:
            conn.sendall(f"{peer[0].removeprefix('::ffff:')} {peer[1]}\n".encode())
            while data := conn.recv(1 << 16):
                conn.sendall(data)
        except OSError:
            pass


def listener(family: str, address: str, port: str, *, reuseport: bool = False) -> socket.socket:
    server = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == "6":
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    elif family == "dual":
        server.close()
        server = socket.socket(socket.AF_INET6)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind((address, int(port)))
    server.listen(128)
    return server


def serve(family: str, address: str, port: str, count: str, *, wait: str = "0",
          hold: str = "0") -> None:
    """Listen, then serve ``count`` clients (each in a thread); the clients' addresses
    and the fd count before the first and after the last.  ``wait``: seconds between
    bind and listen (clients queued meanwhile must reach us); ``hold=1``: wait for a
    line on stdin before ending (the test counts nsbridge's fds meanwhile)."""
    server = socket.socket(socket.AF_INET6 if family in ("6", "dual") else socket.AF_INET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family in ("6", "dual"):
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(family == "6"))
    server.bind((address, int(port)))
    if float(wait):
        say({"bound": server.getsockname()[:2]})
        time.sleep(float(wait))
    server.listen(512)
    before = fds()
    say({"listening": server.getsockname()[:2]})
    peers, threads = [], []
    for _ in range(int(count)):
        conn, peer = server.accept()
        peers.append(f"{peer[0].removeprefix('::ffff:')} {peer[1]}")
        thread = threading.Thread(target=answer, args=(conn, peer))
        thread.start()
        threads = [t for t in threads if t.is_alive()] + [thread]
    for thread in threads:
        thread.join()
    del conn
    server.close()
    say({"peers": peers, "fds_before": before, "fds_after": fds() + 1})
    if hold == "1":
        sys.stdin.readline()


def serve_async(port: str, count: str) -> None:
    """asyncio's server (a non-blocking listener, accept through the event loop):
    ``count`` clients answered with ``getpeername()`` of the accepted socket."""
    import asyncio

    peers: list[str] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("socket").getpeername()
        peers.append(f"{peer[0]} {peer[1]}")
        writer.write(f"{peer[0]} {peer[1]}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        if len(peers) == int(count):
            done.set()

    async def main() -> None:
        server = await asyncio.start_server(handle, "0.0.0.0", int(port))
        say({"listening": server.sockets[0].getsockname()[:2]})
        await done.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    say({"peers": peers})


def restart(port: str) -> None:
    """Serve one client, close the listener and say so, wait for a line on stdin, then
    listen again and serve one more."""
    peers = []
    for round_ in range(2):
        server = listener("4", "0.0.0.0", port)
        say({"listening": server.getsockname()[:2]})
        conn, peer = server.accept()
        peers.append(peer[0])
        answer(conn, peer)
        server.close()
        if round_ == 0:
            say({"closed": True})
            sys.stdin.readline()
    say({"peers": peers})


def hand_to_child(port: str) -> None:
    """The handed-over listener passed to a child process (fork/exec with the fd): the
    child accepts a client, and its connect and bind on the listener are refused."""
    server = listener("4", "0.0.0.0", port)
    say({"listening": server.getsockname()[:2]})
    code = ("import socket, sys, errno, json\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "out = {}\n"
            "for name, call in (('connect', lambda: s.connect(('198.51.100.2', 7301))),\n"
            "                   ('bind', lambda: s.bind(('0.0.0.0', 0)))):\n"
            "    try:\n"
            "        call(); out[name] = 'ok'\n"
            "    except OSError as exc:\n"
            "        out[name] = 'EOPNOTSUPP' if exc.errno == errno.EOPNOTSUPP "
            "else errno.errorcode[exc.errno]\n"
            "conn, peer = s.accept()\n"
            "conn.sendall(f'{peer[0]} {peer[1]}\\n'.encode()); conn.close()\n"
            "out['peer'] = peer[0]\n"
            "print(json.dumps(out), flush=True)\n")
    child = subprocess.run([sys.executable, "-c", code, str(server.fileno())],
                           pass_fds=(server.fileno(),), capture_output=True, text=True,
                           timeout=60)
    server.close()
    say({"child": json.loads(child.stdout.strip() or "{}"), "child_err": child.stderr[-300:]})


def attempt(call) -> str:
    try:
        call()
        return "ok"
    except OSError as exc:
        return error_name(exc)


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(ip) + bytes(8)


def raw_connect(sock: socket.socket, family: int) -> str:
    data = struct.pack("=H", family) + bytes(14)
    if libc.connect(sock.fileno(), data, len(data)) == 0:
        return "ok"
    return error_name(OSError(ctypes.get_errno(), ""))


def doors(port: str, other: str, out4: str, echo_port: str, host_port: str) -> None:
    """Ways around bind switching, tried from inside (see the module docstring)."""
    port_n, other_n = int(port), int(other)
    result: dict[str, object] = {}
    main = listener("4", "0.0.0.0", port, reuseport=True)
    result["listener"] = main.getsockname()[:2]
    result["listener_connect"] = attempt(lambda: main.connect((out4, int(echo_port))))
    result["listener_unspec"] = raw_connect(main, socket.AF_UNSPEC)
    result["listener_bind"] = attempt(lambda: main.bind(("0.0.0.0", 0)))
    result["listener_listen_again"] = attempt(lambda: main.listen(16))
    for name, family, address, reuse in (
            ("second_bind", "4", "0.0.0.0", False),
            ("second_bind_reuseport", "4", "0.0.0.0", True),
            ("second_bind_own_address", "4", "10.0.2.100", False),
            ("second_bind_loopback", "4", "127.0.0.1", False),
            ("second_bind_dual", "dual", "::", False)):
        second = socket.socket(socket.AF_INET6 if family == "dual" else socket.AF_INET)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse:
            second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == "dual":
            second.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        result[name] = attempt(lambda s=second, a=address: s.bind((a, port_n)))
        second.close()
    # An IPv6-only listener on the published port (only IPv4 is published): not switched.
    six = listener("6", "::", port)
    result["ipv6_only"] = list(six.getsockname()[:2])
    six.close()
    main.close()
    # The listener closed: the port may be bound again at once.
    again = listener("4", "0.0.0.0", port)
    result["after_close"] = again.getsockname()[1]
    again.close()
    # Not reached by the publication: the namespace's loopback, another port, a device.
    for name, address, number, device in (("loopback", "127.0.0.1", port_n, None),
                                          ("other_port", "0.0.0.0", other_n, None),
                                          ("bound_to_device", "0.0.0.0", port_n, b"lo")):
        sock = socket.socket()
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        sock.bind((address, number))
        sock.listen(4)
        result[name] = list(sock.getsockname()[:2])
        sock.close()
    # A network namespace of the program's own (unshare -n): never the publication's.
    nested = subprocess.run(
        ["unshare", "-n", sys.executable, "-c",
         f"import socket; s = socket.socket(); s.bind(('0.0.0.0', {port_n})); s.listen(4); "
         "print(s.getsockname()[1])"], capture_output=True, text=True, timeout=30)
    result["other_namespace"] = nested.stdout.strip() or nested.stderr.strip()[-200:]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port_n))
    result["udp"] = udp.getsockname()[1]
    udp.close()
    # bind (the published port), then connect: switched like any connect, from the
    # host's address, never from the published port.
    client = socket.socket()
    client.bind(("0.0.0.0", port_n))
    client.connect((out4, int(echo_port)))
    result["bind_then_connect"] = [client.getsockname()[0],
                                   client.getsockname()[1] != int(host_port),
                                   client.recv(100).decode().split()[0]]
    # The AF_UNSPEC door: a switched socket disconnected is unbound on the host; a
    # bind there would reserve a host port.
    result["switched_bind"] = attempt(lambda: client.bind(("0.0.0.0", 0)))
    result["unspec"] = raw_connect(client, socket.AF_UNSPEC)
    result["unspec_bind"] = attempt(lambda: client.bind(("0.0.0.0", 0)))
    result["unspec_bind_published"] = attempt(lambda: client.bind(("0.0.0.0", int(host_port))))
    result["unspec_listen"] = attempt(lambda: client.listen(4))
    client.close()
    say(result)


def race(port: str, other: str, rounds: str) -> None:
    """A thread flips the port of the sockaddr being bound between the published one
    and another while the main thread binds and listens, round after round: each
    listener must be switched exactly when the bind the kernel made (getsockname
    before listen) is the published port."""
    port_n, other_n = int(port), int(other)
    buffer = ctypes.create_string_buffer(sockaddr_in("0.0.0.0", port_n), 16)
    # Whole sockaddrs copied in (struct.pack_into would zero the field before writing).
    choices = [ctypes.create_string_buffer(sockaddr_in("0.0.0.0", number), 16)
               for number in (port_n, other_n)]
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for choice in choices:
                ctypes.memmove(buffer, choice, 16)

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    seen: dict[str, int] = {}
    try:
        for _ in range(int(rounds)):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if libc.bind(sock.fileno(), ctypes.addressof(buffer), 16) != 0:
                seen[errno.errorcode[ctypes.get_errno()]] = seen.get(
                    errno.errorcode[ctypes.get_errno()], 0) + 1
                sock.close()
                continue
            bound = sock.getsockname()[1]
            sock.listen(4)
            after = sock.getsockname()[1]
            key = f"{bound}->{after}"
            seen[key] = seen.get(key, 0) + 1
            sock.close()
    finally:
        stop.set()
        thread.join()
    say(seen)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def low_port(low: str) -> None:
    """A bind to a port below 1024 with and without CAP_NET_BIND_SERVICE (dropped from
    the effective set with capset): the host side must not lend its own."""
    out = {}
    sock = socket.socket()
    out["with_cap"] = attempt(lambda: sock.bind(("0.0.0.0", int(low))))
    sock.close()
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    libc.capget(ctypes.byref(header), data)
    data[0].effective &= ~(1 << 10)
    if libc.capset(ctypes.byref(header), data) != 0:
        out["capset"] = errno.errorcode[ctypes.get_errno()]
    sock = socket.socket()
    out["without_cap"] = attempt(lambda: sock.bind(("0.0.0.0", int(low) + 1)))
    sock.close()
    sock = socket.socket()
    out["high_port_without_cap"] = attempt(lambda: sock.bind(("0.0.0.0", 4000)))
    sock.close()
    say(out)


def unix_escape(directory: str) -> None:
    """``directory`` exists on the host too; here a tmpfs covers it, holding a symlink
    ``esc -> DIRECTORY`` (absolute).  A bind and a connect through ``esc`` must stay in
    this tmpfs, never reach the host's directory behind it."""
    out = {}
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, None) != 0:
        say({"mount": errno.errorcode[ctypes.get_errno()]})
        return
    os.symlink(directory, f"{directory}/esc")
    server = socket.socket(socket.AF_UNIX)
    out["bind"] = attempt(lambda: server.bind(f"{directory}/esc/bound.sock"))
    out["bound_here"] = os.path.exists(f"{directory}/bound.sock")
    client = socket.socket(socket.AF_UNIX)
    out["connect_host_socket"] = attempt(lambda: client.connect(f"{directory}/esc/host.sock"))
    rel = socket.socket(socket.AF_UNIX)
    os.chdir(directory)
    out["bind_relative"] = attempt(lambda: rel.bind("esc/rel.sock"))
    out["relative_here"] = os.path.exists(f"{directory}/rel.sock")
    for sock in (server, client, rel):
        sock.close()
    say(out)


def bad_binds() -> None:
    """bind(2) with bad arguments: the kernel's own errors (the test compares them with
    the same calls made without the filter)."""
    out = {}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    good = sockaddr_in("0.0.0.0", 0)

    def errno_of(result: int) -> str:
        return "0" if result == 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    out["bad_pointer"] = errno_of(libc.bind(sock.fileno(), 16, 16))
    out["too_long"] = errno_of(libc.bind(sock.fileno(), ctypes.cast(good, ctypes.c_void_p),
                                         4096))
    out["too_short"] = errno_of(libc.bind(sock.fileno(), ctypes.cast(good, ctypes.c_void_p),
                                          1))
    out["zero_length"] = errno_of(libc.bind(sock.fileno(), None, 0))
    out["negative_length"] = errno_of(libc.bind(sock.fileno(),
                                                ctypes.cast(good, ctypes.c_void_p), 0xFFFFFFFF))
    out["no_such_fd"] = errno_of(libc.bind(9999, ctypes.cast(good, ctypes.c_void_p), 16))
    read_end, write_end = os.pipe()
    out["not_a_socket"] = errno_of(libc.bind(read_end, ctypes.cast(good, ctypes.c_void_p), 16))
    os.close(read_end)
    os.close(write_end)
    six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    out["wrong_family"] = errno_of(libc.bind(six.fileno(), ctypes.cast(good, ctypes.c_void_p),
                                             16))
    out["ok"] = errno_of(libc.bind(sock.fileno(), ctypes.cast(good, ctypes.c_void_p), 16))
    out["twice"] = errno_of(libc.bind(sock.fileno(), ctypes.cast(good, ctypes.c_void_p), 16))
    six.close()
    sock.close()
    say(out)


CASES = {"serve": serve, "serve_async": serve_async, "bad_binds": bad_binds,
         "restart": restart, "hand_to_child": hand_to_child, "doors": doors, "race": race,
         "low_port": low_port, "unix_escape": unix_escape}

if __name__ == "__main__":
    case, *args = sys.argv[1:]
    keywords = dict(arg.split("=", 1) for arg in args if "=" in arg)
    CASES[case](*[arg for arg in args if "=" not in arg], **keywords)
