"""``netns-tcp-bridge``: exactly netns_tcp_bridge's command line, on nsbridge's relay.

Existing scripts keep working: same flags, same long names, quiet by default.  What
differs is only what was broken or missing in the original (resets carried, -S with -c
and -l/-L with -C work).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nsbridge import __version__
from nsbridge.cli.main import OneLineErrorParser, add_forward_flags, run_forward, run_guarded

# The original's binary is netns_tcp_bridge; the package installs it under that name and as
# netns-tcp-bridge.  Messages name whichever the user typed.
_NAMES = ("netns_tcp_bridge", "netns-tcp-bridge")


def command_name() -> str:
    """The name this command was started as, when it is one of ours (else the original's)."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return typed if typed in _NAMES else _NAMES[0]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=command_name(),
        description="TCP forwarder whose listening and connecting parts can each live in "
        "another Linux network namespace (nsbridge's drop-in for netns_tcp_bridge; "
        "`nsbridge forward --help` shows more options).",
    )
    parser.add_argument("--version", action="version",
                        version=f"{command_name()} (nsbridge {__version__})")
    add_forward_flags(parser, compat=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(run_forward, args, command_name())


if __name__ == "__main__":
    sys.exit(main())
