"""`brisk inspect --model PATH`: what brisklm sees in a checkpoint, and which commands can run on it.

Each area's command module may declare `CHECKPOINT_SUPPORT = {"area command": rule}` where a rule maps a
`CheckpointReport` to None (it can run) or the reason it cannot; this command asks every area.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs


def load_any(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """A checkpoint loaded the way its commands load it: LLaVA through the vision loader, else as a causal LM."""
    from brisklm.zoo.store import load, resolve

    path = resolve(name_or_path)
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        from brisklm.vision.vlm import load_vlm

        loaded = load_vlm(str(path), device=device, dtype=dtype)
        return loaded.model, loaded.processor.tokenizer
    loaded = load(str(path), device=device, dtype=dtype)
    return loaded.model, loaded.tokenizer


def command_support(report) -> dict[str, str | None]:
    """Every declared command's verdict on this checkpoint, from each area's CHECKPOINT_SUPPORT."""
    from brisklm.areas import command_modules

    verdicts: dict[str, str | None] = {}
    for name in command_modules():
        module = importlib.import_module(name)
        for command, rule in getattr(module, "CHECKPOINT_SUPPORT", {}).items():
            verdicts[command] = rule(report)
    return dict(sorted(verdicts.items()))


def cmd_inspect(args: argparse.Namespace) -> int:
    from brisklm.core.inspect import describe, report_lines

    model, tokenizer = load_any(args.model, **device_kwargs(args))
    report = describe(model, tokenizer)
    support = command_support(report)
    if args.json:
        print(json.dumps({**report.to_json(), "commands": support}, indent=2))
        return 0
    print(f"checkpoint    {args.model}")
    for line in report_lines(report):
        print(line)
    runnable = [c for c, why in support.items() if why is None]
    print(f"\ncan run ({len(runnable)}): " + ", ".join(f"brisk {c}" for c in runnable))
    blocked = {c: why for c, why in support.items() if why is not None}
    if blocked:
        print(f"cannot run ({len(blocked)}):")
        for command, why in blocked.items():
            print(f"  brisk {command}: {why}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show what brisklm sees in a checkpoint and which commands run on it")
    p.add_argument("--model", required=True, help="a checkpoint folder (save_pretrained) or a zoo model name")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_device_args(p)
    p.set_defaults(func=cmd_inspect)

