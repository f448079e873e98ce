"""`brisk zoo list` and `brisk zoo train NAME|--all`: the default tiny models and their measured quality."""

from __future__ import annotations

import argparse

from brisklm.core.device import add_device_args
from brisklm.errors import BriskError
from brisklm.zoo.registry import get_recipe, recipes
from brisklm.zoo.store import is_trained, read_quality, train, zoo_path


def _quality_text(quality: dict | None) -> str:
    if not quality:
        return "not trained (brisk zoo train NAME)"
    metric = quality["metric"]
    extras = [f"{k}={quality[k]:.4g}" for k in ("exact_match", "accuracy", "bleu", "perplexity") if k in quality and k != metric]
    return f"{metric}={quality[metric]:.4g}" + (f" ({', '.join(extras)})" if extras else "") + f", {quality.get('parameters', 0) / 1e6:.2f}M params"


def cmd_list(args: argparse.Namespace) -> int:
    rows = [(name, recipe.task, _quality_text(read_quality(zoo_path(name, args.seed))), recipe.description)
            for name, recipe in recipes().items()]
    width = max(len(r[0]) for r in rows)
    task_width = max(len(r[1]) for r in rows)
    for name, task, quality, description in rows:
        print(f"{name:<{width}}  {task:<{task_width}}  {quality}")
        if args.verbose:
            print(f"{'':<{width}}  {description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    names = list(recipes()) if args.all else args.names
    if not names:
        raise BriskError("name the zoo models to train (see `brisk zoo list`) or pass --all")
    for name in names:
        get_recipe(name)  # fail before any training if a name is unknown
    for name in names:
        if is_trained(name, args.seed) and not args.force:
            print(f"{name}: already trained at {zoo_path(name, args.seed)} ({_quality_text(read_quality(zoo_path(name, args.seed)))})")
            continue
        print(f"{name}: training ...", flush=True)
        path = train(name, seed=args.seed, force=args.force)
        print(f"{name}: saved to {path} ({_quality_text(read_quality(path))})", flush=True)
    return 0


def cmd_fixture(args: argparse.Namespace) -> int:
    """Write a random-weight checkpoint that follows a real family's conventions (for trying commands offline)."""
    from pathlib import Path

    from brisklm.testing.checkpoints import FIXTURE_STYLES, VISION_FIXTURE_STYLES, build_checkpoint

    styles = [*FIXTURE_STYLES, *VISION_FIXTURE_STYLES] if args.style == "all" else [args.style]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise BriskError(f"{out} exists and is not empty; choose another --out or pass --force")
    for style in styles:
        target = out / style if len(styles) > 1 else out
        build_checkpoint(style, target, seed=args.seed)
        print(f"{style}: random-weight checkpoint saved to {target} (inspect it: brisk inspect --model {target})")
    return 0


def add_commands(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="list, train and cache the default tiny models")
    sub = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="the zoo models with their measured quality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="also print each model's description")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("train", help="train zoo models (cached under $BRISK_HOME; reused later)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="train every zoo model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if a trained copy exists")
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_train)
    from brisklm.testing.checkpoints import FIXTURE_STYLES, VISION_FIXTURE_STYLES

    p = sub.add_parser("fixture", help="write a random-weight checkpoint in a real family's conventions "
                                       "(subword tokenizer, chat template, roles); nothing is downloaded")
    p.add_argument("--style", required=True, choices=[*FIXTURE_STYLES, *VISION_FIXTURE_STYLES, "all"],
                   help="which real family's conventions to follow ('all': one sub-folder per style)")
    p.add_argument("--out", required=True, help="folder to write (model, tokenizer, generation_config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_fixture)
