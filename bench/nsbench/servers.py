"""The servers inside namespace B: iperf3, nginx and an idle TCP holder.

They listen only on B's loopback, so every byte of traffic stays inside
namespaces this harness created or on the caller's loopback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Managed, Netns, ProcessRegistry, wait_port

# Fixed ports are safe: B is a fresh namespace nobody else uses.
IPERF_PORT = 5201
HTTP_PORT = 8080
IDLE_PORT = 9000
PAGE_BYTES = 600

NGINX_CONF = """\
# Written by bench/forward_bench.py; one worker, no master, stays in foreground.
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    default_type text/html;
    # sendfile off: nginx then writes header and body in one writev.  With
    # sendfile on they leave as two segments, and a relay without
    # TCP_NODELAY (the socat recipe) stalls the second one on Nagle plus
    # delayed ACK (~40 ms), measuring the server's write pattern instead
    # of the forwarder.
    sendfile off;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        root {prefix}/html;
        location / {{
            index index.html;
        }}
    }}
}}
"""


@dataclass
class Servers:
    """Handles of the servers in B and the count file of the idle server."""

    iperf: Managed
    nginx: Managed
    idle: Managed
    idle_count_file: Path


def page_body(size: int = PAGE_BYTES) -> bytes:
    """A static HTML page of exactly `size` bytes (the small-request payload)."""
    head = b"<!doctype html><html><head><title>nsbridge bench</title></head><body><p>"
    tail = b"</p></body></html>\n"
    return head + b"x" * (size - len(head) - len(tail)) + tail


def write_nginx_prefix(prefix: Path) -> Path:
    """Lay out nginx's prefix dir and config in a temp dir; return the config path.

    All paths nginx would otherwise take from its compiled-in defaults
    (/var/lib/nginx, /run/nginx.pid, /var/log/nginx) are redirected here.
    """
    for sub in ("html", "logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "html" / "index.html").write_bytes(page_body())
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=HTTP_PORT))
    return conf


def start_servers(reg: ProcessRegistry, ns: Netns, workdir: Path) -> Servers:
    """Start iperf3, nginx and the idle server in B and wait until they listen."""
    iperf = reg.start(
        "iperf3-server",
        ns.exec_argv(["iperf3", "-s", "-p", str(IPERF_PORT), "--idle-timeout", "30"]),
    )
    conf = write_nginx_prefix(workdir / "nginx")
    nginx = reg.start(
        "nginx", ns.exec_argv(["/usr/sbin/nginx", "-c", str(conf), "-p", str(workdir / "nginx")])
    )
    count_file = workdir / "idle.count"
    script = Path(__file__).with_name("idle_server.py")
    idle = reg.start(
        "idle-server", ns.exec_argv([sys.executable, str(script), str(IDLE_PORT), str(count_file)])
    )
    wait_port(IPERF_PORT, "iperf3 server", iperf, ns.path)
    wait_port(HTTP_PORT, "nginx", nginx, ns.path)
    wait_port(IDLE_PORT, "idle server", idle, ns.path)
    return Servers(iperf, nginx, idle, count_file)


def idle_count(servers: Servers) -> int:
    """Connections the idle server currently holds (-1 if unreadable)."""
    try:
        return int(servers.idle_count_file.read_text() or -1)
    except (OSError, ValueError):
        return -1
