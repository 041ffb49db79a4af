"""What every subcommand does the same way: argparse types from pissa_fast.options, and errors as one
line on stderr with an exit status."""
from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError, NativeLibraryMissing
from ..options import parse_niter, parse_size


def niter_type(text):
    try:
        return parse_niter(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_type(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def report_errors(command: str, fn) -> int:
    """Run fn(); a CheckpointError (or a missing compiled library) becomes `pissa-fast COMMAND: error:
    ...` on stderr and exit status 2."""
    try:
        return fn()
    except (CheckpointError, NativeLibraryMissing) as e:
        print(f"pissa-fast {command}: error: {e}", file=sys.stderr)
        return 2
