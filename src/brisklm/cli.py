"""The `brisk` command: one argparse tree, one sub-module per area, user errors printed as one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from brisklm.areas import command_modules
from brisklm.errors import BriskError

# Every area declares its command modules in its `area.py` (see brisklm.areas); each module defines
# `add_commands(subparsers)` and a command's parser sets `func=callable(args) -> int|None`.


def build_parser() -> argparse.ArgumentParser:
    """Build the full `brisk` argument parser from every area's command module."""
    parser = argparse.ArgumentParser(prog="brisk", description="Efficient LLM methods on Hugging Face models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in command_modules():  # a missing module is an ImportError: no area is skipped silently
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from brisklm.core.device import device_defaults

        with device_defaults(args):  # --device/--dtype become what "auto" means for everything the command loads
            status = args.func(args)
    except BriskError as error:
        print(f"brisk: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brisk: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
