"""Idle/echo TCP server run inside the benchmark namespace.

Accepts connections and holds them open without sending anything, so
that the forwarder's memory per idle connection can be measured.  Data
that arrives is echoed back, which lets the harness check that a
forwarder delivers bytes unchanged and passes on a half-close.  The
number of open connections is written to a file (the filesystem is
shared across network namespaces) so the harness, which lives in another
namespace, can tell when all connections made it through the forwarder.

Usage: python3 idle_server.py PORT COUNT_FILE
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys


class Counter:
    """Open-connection count, published to a file when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.value = 0
        self.written = -1

    def publish(self) -> None:
        """Atomically replace the count file, so readers never see a partial write."""
        if self.value == self.written:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(self.value))
        os.replace(tmp, self.path)
        self.written = self.value


async def hold(
    counter: Counter, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Keep one connection open until the peer closes it; echo what it sends."""
    counter.value += 1
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        counter.value -= 1
        writer.close()


async def publisher(counter: Counter) -> None:
    """Publish the count every 10 ms: the harness paces its connects on it."""
    while True:
        counter.publish()
        await asyncio.sleep(0.01)


async def main(port: int, count_file: str) -> None:
    """Serve forever on 127.0.0.1:port of the current namespace."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counter = Counter(count_file)
    counter.publish()
    server = await asyncio.start_server(
        lambda r, w: hold(counter, r, w), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await asyncio.gather(server.serve_forever(), publisher(counter))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
