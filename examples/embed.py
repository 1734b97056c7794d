#!/usr/bin/env python3
"""Embed nsbridge: run a command with user-mode networking from Python, then report.

    python3 examples/embed.py [--publish 8080:80] [--dns 127.0.0.1:53] -- curl -sS URL

Prints the command's exit status and the networking counters (JSON) on stderr, and exits
with the command's status (128+N if signal N killed it, like a shell).  The networking
runs in a thread of this process and is gone when the command is: nothing to clean up.
"""

from __future__ import annotations

import argparse
import json
import sys

from nsbridge.errors import UserError
from nsbridge.usernet import api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publish", "-p", action="append", default=[])
    parser.add_argument("--dns", action="append", default=None, metavar="IP:PORT")
    parser.add_argument("--allow-host-access", "--allow-host-loopback", action="store_true")
    parser.add_argument("--deny", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    dns = None
    if args.dns is not None:
        dns = []
        for text in args.dns:  # IPv4 IP[:PORT] only, to keep the example short
            ip, _, port = text.partition(":")
            dns.append((ip, int(port or 53)))
    try:
        with api.run(command, publish=args.publish, dns=dns, deny=args.deny,
                     allow_host_access=args.allow_host_access) as proc:
            code = proc.wait()
            stats = proc.stats()
    except UserError as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return 2
    print(f"exit status: {code}", file=sys.stderr)
    print(json.dumps(stats, indent=2, sort_keys=True), file=sys.stderr)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
