"""The socket-switching tests' program inside ``nsbridge run --bypass`` (stdlib only).

``python3 switch_probe.py CASE ARGS...`` runs one case and prints one JSON object: what
the program saw (its socket's own address, the server's answer, or the errno name).
The servers the tests start answer every connection with the address they saw it come
from, then echo.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import socket
import struct
import sys
import threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN_CONNECT = 30


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def talk(sock: socket.socket) -> dict:
    """The server's first line (the peer it saw), an echo, our own address."""
    sock.settimeout(10)
    seen = b""
    while not seen.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        seen += chunk
    sock.sendall(b"ping\n")
    echoed = sock.recv(100)
    return {"server_saw": seen.decode().strip(), "echo": echoed.decode().strip(),
            "sockname": sock.getsockname()[0]}


def connect(ip: str, port: str) -> dict:
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.connect((ip, int(port)))
        return {"result": "ok", **talk(sock)}
    except OSError as exc:
        return {"result": error_name(exc)}
    finally:
        sock.close()


def connect_many(ip: str, port: str, count: str) -> dict:
    """``count`` connections one after another; the fd count before and after."""
    before = len(os.listdir("/proc/self/fd"))
    ok = 0
    for _ in range(int(count)):
        with socket.create_connection((ip, int(port)), timeout=10) as sock:
            if talk(sock)["echo"] == "ping":
                ok += 1
    return {"ok": ok, "fds_before": before, "fds_after": len(os.listdir("/proc/self/fd"))}


def transfer(ip: str, port: str, mebibytes: str) -> dict:
    """Random bytes sent through the echo server while its echo is read back, then a
    half-close: sha256 of both ways, and whether the server's end followed our FIN."""
    import hashlib

    size = int(mebibytes) << 20
    payload = os.urandom(size)
    sock = socket.create_connection((ip, int(port)), timeout=30)
    first = b""
    while not first.endswith(b"\n"):
        first += sock.recv(1)
    received = hashlib.sha256()
    got = {"bytes": 0, "eof": False}

    def read() -> None:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                got["eof"] = True
                return
            received.update(chunk)
            got["bytes"] += len(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reader.join(60)
    sock.close()
    return {"same": received.hexdigest() == hashlib.sha256(payload).hexdigest(),
            "bytes": got["bytes"], "eof_after_half_close": got["eof"],
            "server_saw": first.decode().strip()}


def nonblocking(ip: str, port: str) -> dict:
    """asyncio: a non-blocking connect (EINPROGRESS, then writable)."""
    async def main() -> dict:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, int(port)), 10)
        except OSError as exc:
            return {"result": error_name(exc)}
        seen = (await reader.readline()).decode().strip()
        writer.write(b"ping\n")
        echoed = (await reader.readline()).decode().strip()
        sockname = writer.get_extra_info("sockname")[0]
        writer.close()
        return {"result": "ok", "server_saw": seen, "echo": echoed, "sockname": sockname}

    return asyncio.run(main())


def concurrent(ip: str, port: str, count: str) -> dict:
    """``count`` non-blocking connects at once (each switched while the others wait),
    each exchanging its own line; the fd count before and after."""
    async def one(index: int) -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, int(port)), 30)
        await reader.readline()
        writer.write(f"line {index}\n".encode())
        echoed = (await reader.readline()).decode().strip()
        sockname = writer.get_extra_info("sockname")[0]
        writer.close()
        await writer.wait_closed()
        return sockname if echoed == f"line {index}" else "mismatch"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(int(count))))

    before = len(os.listdir("/proc/self/fd"))
    socknames = asyncio.run(main())
    return {"socknames": sorted(set(socknames)), "count": len(socknames),
            "fds_before": before, "fds_after": len(os.listdir("/proc/self/fd"))}


def connect_again(ip: str, port: str) -> dict:
    """A non-blocking connect polled by calling connect again until EISCONN (as some C
    programs do): the answers the kernel would give, one connection."""
    import time

    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    sock.setblocking(False)
    answers = []
    for _ in range(200):
        code = sock.connect_ex((ip, int(port)))
        name = errno.errorcode.get(code, "0")
        if not answers or answers[-1] != name:
            answers.append(name)
        if code in (errno.EISCONN, 0) or code not in (errno.EINPROGRESS, errno.EALREADY):
            break
        time.sleep(0.01)
    sock.setblocking(True)
    out = {"answers": answers}
    if answers[-1] in ("EISCONN", "0"):
        out.update(talk(sock))
    sock.close()
    return out


def loopback() -> dict:
    """A server on the namespace's own 127.0.0.1 and [::1], reached from inside."""
    out = {}
    for host, family, dialed in (("127.0.0.1", socket.AF_INET, "127.0.0.1"),
                                 ("::1", socket.AF_INET6, "::1"),
                                 ("0.0.0.0", socket.AF_INET, "0.0.0.0"),
                                 ("10.0.2.100", socket.AF_INET, "10.0.2.100")):
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((host, 0))
        server.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect((dialed, server.getsockname()[1]))
        conn, _ = server.accept()
        client.sendall(b"x")
        out[host] = conn.recv(1).decode()
        for s in (client, conn, server):
            s.close()
    return out


def raw_connect(fd: int, family: int, ip: str = "", port: int = 0) -> int:
    """connect(2) through libc with a hand-made sockaddr; 0 or the errno."""
    if family == socket.AF_UNSPEC:
        addr = struct.pack("=H14x", socket.AF_UNSPEC)
    elif family == socket.AF_INET:
        addr = struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(ip) \
            + bytes(8)
    else:
        addr = struct.pack("=H", family) + struct.pack("!HI", port, 0) \
            + socket.inet_pton(socket.AF_INET6, ip) + bytes(4)
    return 0 if libc.connect(fd, addr, len(addr)) == 0 else ctypes.get_errno()


def unspec(ip: str, port: str, denied_ip: str, denied_port: str) -> dict:
    """A switched socket disconnected with AF_UNSPEC, then connected again: to a denied
    address (must be refused), then to the allowed one (decided again)."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    sock.connect((ip, int(port)))
    first = sock.getsockname()[0]
    out = {"first_sockname": first,
           "unspec": errno.errorcode.get(raw_connect(sock.fileno(), socket.AF_UNSPEC), "0")}
    code = raw_connect(sock.fileno(), family_of(denied_ip), denied_ip, int(denied_port))
    out["denied"] = errno.errorcode.get(code, "0")
    code = raw_connect(sock.fileno(), family_of(ip), ip, int(port))
    out["again"] = errno.errorcode.get(code, "0")
    if code == 0:
        out.update(talk(sock))
    code = raw_connect(sock.fileno(), socket.AF_INET, "127.0.0.1", 9)
    out["loopback_on_switched"] = errno.errorcode.get(code, "0")
    try:
        sock.listen(1)
        out["listen"] = "0"
    except OSError as exc:
        out["listen"] = error_name(exc)
    sock.close()
    return out


def fastopen(ip: str, port: str) -> dict:
    """sendto/sendmsg with MSG_FASTOPEN (connects without connect), and
    TCP_FASTOPEN_CONNECT followed by connect."""
    out = {}
    for call in ("sendto", "sendmsg"):
        sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
        try:
            if call == "sendto":
                sock.sendto(b"hello\n", MSG_FASTOPEN, (ip, int(port)))
            else:
                sock.sendmsg([b"hello\n"], [], MSG_FASTOPEN, (ip, int(port)))
            out[call] = "0"
        except OSError as exc:
            out[call] = error_name(exc)
        sock.close()
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    try:
        sock.connect((ip, int(port)))
        sock.sendall(b"x")
        out["fastopen_connect"] = "0"
    except OSError as exc:
        out["fastopen_connect"] = error_name(exc)
    sock.close()
    return out


def io_uring() -> dict:
    params = ctypes.create_string_buffer(120)
    result = libc.syscall(425, 8, params)  # io_uring_setup (x86_64 and aarch64)
    return {"io_uring_setup": "0" if result >= 0 else errno.errorcode[ctypes.get_errno()]}


def x32() -> dict:
    """A system call through the x32 ABI (x86_64 only): the filter kills the process."""
    pid = os.fork()
    if pid == 0:
        libc.syscall(0x40000000 | 39)  # getpid, x32 numbering
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def int80() -> dict:
    """A system call through the 32-bit ABI (``int 0x80``, x86_64 only), from machine code
    put in executable memory: the filter kills the process."""
    import mmap

    pid = os.fork()
    if pid == 0:
        code = bytes([0xB8, 20, 0, 0, 0,  # mov eax, 20 (getpid in i386 numbering)
                      0xCD, 0x80,  # int 0x80
                      0xC3])  # ret
        memory = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                           | mmap.PROT_EXEC)
        memory.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        ctypes.CFUNCTYPE(ctypes.c_int)(address)()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def race(ip: str, port: str, denied_ip: str, denied_port: str, rounds: str) -> dict:
    """A thread rewrites the sockaddr between an allowed and a denied destination while
    connect(2) reads it: every connection that succeeds must be to the allowed one."""
    allowed = struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(port)) \
        + socket.inet_aton(ip) + bytes(8)
    denied = struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(denied_port)) \
        + socket.inet_aton(denied_ip) + bytes(8)
    buffer = ctypes.create_string_buffer(allowed, len(allowed))
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            ctypes.memmove(buffer, denied, len(denied))
            ctypes.memmove(buffer, allowed, len(allowed))

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    peers: dict[str, int] = {}
    for _ in range(int(rounds)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if libc.connect(sock.fileno(), buffer, len(allowed)) == 0:
            host, port_seen = sock.getpeername()
            peer = f"{host}:{port_seen}"
        else:
            peer = errno.errorcode.get(ctypes.get_errno(), "?")
        peers[peer] = peers.get(peer, 0) + 1
        sock.close()
    stop.set()
    thread.join()
    return {"peers": peers}


def child(ip: str, port: str, denied_ip: str, denied_port: str) -> dict:
    """The filter holds for child processes too (subprocess: CPython starts them with
    vfork where it can)."""
    import subprocess

    out = {}
    for name, args in (("allowed", [ip, port]), ("denied", [denied_ip, denied_port])):
        done = subprocess.run([sys.executable, __file__, "connect", *args],
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout)
    return out


def unix() -> dict:
    """Unix sockets by absolute path, relative path and abstract name, the path in a
    tmpfs only this program's mount namespace has: connected where the program sees it."""
    import tempfile

    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    directory = tempfile.mkdtemp(prefix="nsbridge-switch-")
    out = {}
    try:
        if libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, None) != 0:
            return {"mount": errno.errorcode[ctypes.get_errno()]}
        try:
            path = os.path.join(directory, "s")
            for name, bound, dialed in (("absolute", path, path), ("relative", path, "s"),
                                        ("abstract", "\0nsbridge-switch-probe",
                                         "\0nsbridge-switch-probe")):
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.bind(bound)
                server.listen(1)
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                os.chdir(directory)
                try:
                    client.connect(dialed)
                    conn, _ = server.accept()
                    client.sendall(b"u")
                    out[name] = conn.recv(1).decode()
                    conn.close()
                except OSError as exc:
                    out[name] = error_name(exc)
                os.chdir("/")
                client.close()
                server.close()
                if not bound.startswith("\0"):
                    os.unlink(bound)
        finally:
            libc.umount2(directory.encode(), 0)
    finally:
        os.rmdir(directory)
    return out


def udp_connected(ip: str, port: str) -> dict:
    """A connected UDP socket (not switched: the namespace's own path carries it)."""
    with socket.socket(family_of(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((ip, int(port)))
        for _ in range(3):
            sock.send(b"udp-connected")
            try:
                return {"echo": sock.recv(100).decode(), "sockname": sock.getsockname()[0]}
            except TimeoutError:
                continue
    return {"echo": None}


def bad_calls() -> dict:
    """connect(2) and listen(2) with bad arguments: the kernel's own errors, from the
    host side that answers them (and nsbridge carries on)."""
    out = {}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    good = struct.pack("=H", socket.AF_INET) + bytes(14)

    def errno_of(result: int) -> str:
        return "0" if result == 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    libc.connect.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    out["bad_pointer"] = errno_of(libc.connect(sock.fileno(), ctypes.c_void_p(16), 16))
    out["too_long"] = errno_of(libc.connect(sock.fileno(), good, 4096))
    out["too_short"] = errno_of(libc.connect(sock.fileno(), good, 1))
    out["no_such_fd"] = errno_of(libc.connect(9999, good, 16))
    read_end, write_end = os.pipe()
    out["not_a_socket"] = errno_of(libc.connect(read_end, good, 16))
    out["listen_not_a_socket"] = errno_of(libc.listen(read_end, 1))
    os.close(read_end)
    os.close(write_end)
    sock.close()
    return out


def serve_once(port: str) -> dict:
    """Listen on the namespace's 0.0.0.0:PORT (a trapped listen, made by the host side
    on this socket), say so, answer one client with the address it came from."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(port)))
    server.listen(4)
    print("listening", flush=True)
    server.settimeout(30)
    conn, peer = server.accept()
    conn.sendall(f"{peer[0]}\n".encode())
    conn.close()
    server.close()
    return {"client": peer[0]}


def outlive(ip: str, port: str) -> dict:
    """Connect, say so, wait for a line on stdin (the test kills nsbridge meanwhile),
    then use the switched connection and try a new connect."""
    sock = socket.create_connection((ip, int(port)), timeout=10)
    first = talk(sock)
    print("connected", flush=True)
    sys.stdin.readline()
    sock.sendall(b"after\n")
    out = {"first": first["echo"], "after": sock.recv(100).decode().strip()}
    sock.close()
    again = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        again.connect((ip, int(port)))
        out["new_connect"] = "0"
    except OSError as exc:
        out["new_connect"] = error_name(exc)
    again.close()
    return out


CASES = {name: function for name, function in globals().items()
         if name in ("connect", "concurrent", "transfer", "connect_again", "connect_many",
                     "nonblocking", "loopback", "unspec", "fastopen", "io_uring", "x32",
                     "int80", "race", "child", "unix", "udp_connected", "outlive",
                     "serve_once", "bad_calls")}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]](*sys.argv[2:])), flush=True)
