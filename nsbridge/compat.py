"""``netns-tcp-bridge``: exactly netns_tcp_bridge's command line, on nsbridge's engine.

Existing scripts keep working: same flags, same long names, quiet by default.  What
differs is only what was broken or missing in the original (resets carried, -S with -c
and -l/-L with -C work).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli import OneLineErrorParser, add_forward_flags, run_forward, run_guarded


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="netns_tcp_bridge",
        description="TCP forwarder whose listening and connecting parts can each live in "
        "another Linux network namespace (nsbridge's drop-in for netns_tcp_bridge; "
        "`nsbridge forward --help` shows more options).",
    )
    add_forward_flags(parser, compat=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(run_forward, args)


if __name__ == "__main__":
    sys.exit(main())
