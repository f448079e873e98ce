"""The `brisk` command: one argparse tree, one sub-module per area, user errors printed as one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from brisklm.errors import BriskError

# Each module defines `add_commands(subparsers)`; a command's parser sets `func=callable(args) -> int|None`.
COMMAND_MODULES = [
    "brisklm.zoo.cli",
    "brisklm.eval.cli",
    "brisklm.streaming.cli",
    "brisklm.analysis.cli",
    "brisklm.pruning.cli",
    "brisklm.reasoning.cli",
    "brisklm.streaming.thinker.cli",
    "brisklm.vision.cli",
    "brisklm.serve.cli",
    "brisklm.inspect_cli",
    "brisklm.generate_cli",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the full `brisk` argument parser from every area's command module."""
    parser = argparse.ArgumentParser(prog="brisk", description="Efficient LLM methods on Hugging Face models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # an area whose command module does not exist yet
            raise
        module.add_commands(subparsers)
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
