"""`brisk prune depth|width|skipgpt`: prune a model and save a normal HF checkpoint (+ routers for SkipGPT)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.errors import BriskError


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"prune depth": causal_lm_only, "prune width": causal_lm_only, "prune skipgpt": causal_lm_only}


def _seq_len(args) -> int | None:
    """--seq-len for file sources (0 = one sequence per line / record)."""
    return args.seq_len or None


def _pad(tokenizer) -> int:
    """The pad id of the text layer (falls back to eos for tokenizers without a pad token)."""
    from brisklm.core.text import as_text_layer

    return as_text_layer(tokenizer).roles.pad_id


def _load(args, check=None):
    """The model (its family checked, then `check(model)`, before any work) and the calibration data."""
    from brisklm.core.adapter import ModelAdapter
    from brisklm.pruning.calibration import load_calibration
    from brisklm.zoo.store import load

    loaded = load(args.model, **device_kwargs(args))
    ModelAdapter.from_model(loaded.model)  # unsupported families fail here, before any work
    if check is not None:
        check(loaded.model)
    data = load_calibration(loaded.tokenizer, args.calib, args.calib_n, seq_len=_seq_len(args))
    return loaded, data


def _save(model, tokenizer, out: str, report: dict) -> None:
    path = Path(out)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"saved to {path} (loads with AutoModelForCausalLM.from_pretrained)")


def cmd_depth(args: argparse.Namespace) -> int:
    from brisklm.pruning.depth import check_remove, prune_depth

    loaded, data = _load(args)
    check_remove(loaded.model.config.num_hidden_layers, args.remove)
    pruned, report = prune_depth(loaded.model, data, _pad(loaded.tokenizer), args.remove, args.method)
    _save(pruned, loaded.tokenizer, args.out, {**report, "calib": args.calib})
    return 0


def cmd_width(args: argparse.Namespace) -> int:
    from brisklm.pruning.skipgpt import check_sparsity
    from brisklm.pruning.width import (activation_norms, check_nm, heads_for_sparsity, parse_nm, prune_structured,
                                       prune_unstructured, zero_fraction)

    nm = parse_nm(args.nm) if args.nm else None
    if nm is not None and args.method == "structured":
        raise BriskError("--nm is a pattern of unstructured pruning; use it with --method wanda or magnitude")
    if nm is None:
        if args.sparsity is None:
            raise BriskError("pass --sparsity FRACTION (or --nm N:M for magnitude/wanda)")
        check_sparsity(args.sparsity)
    heads = {"per_group": args.heads_per_group}

    def check(model) -> None:  # shapes first: no calibration work for a pattern or head count that cannot apply
        if nm is not None:
            check_nm(model, *nm)
        if args.method == "structured" and args.head_sparsity is not None:
            heads["per_group"] = heads_for_sparsity(model, args.head_sparsity)

    loaded, data = _load(args, check)
    pad = _pad(loaded.tokenizer)
    norms = activation_norms(loaded.model, data, pad) if args.method in ("wanda", "structured") else None
    if args.method == "structured":
        pruned, report = prune_structured(loaded.model, args.sparsity, norms, heads["per_group"])
    else:
        pruned = prune_unstructured(loaded.model, args.sparsity, args.method, norms, nm=nm)
        report = {"method": args.method, "realised_sparsity": zero_fraction(pruned)}
        if nm is not None:
            report["nm"] = f"{nm[0]}:{nm[1]}"
    target = args.sparsity if nm is None else 1 - nm[0] / nm[1]
    _save(pruned, loaded.tokenizer, args.out, {**report, "target_sparsity": target, "calib": args.calib})
    return 0


def cmd_skipgpt(args: argparse.Namespace) -> int:
    from brisklm.pruning.calibration import load_calibration, token_metrics
    from brisklm.pruning.routers import RouterSet
    from brisklm.pruning.skipgpt import SkipGPTOptions, check_sparsity, save_skipgpt, train_lora, train_routers
    from brisklm.pruning.study import merged_rates, routed_forward

    check_sparsity(args.sparsity)
    opts = SkipGPTOptions(sparsity=args.sparsity, router=args.router, rank=args.rank, router_steps=args.steps,
                          lora_steps=args.steps)
    loaded, _ = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    train = load_calibration(tok, args.calib, args.train_n, seed=1, seq_len=_seq_len(args))
    if args.stage == "routers":
        routers, stats = train_routers(model, tok, train.features, opts)
    else:
        if not (loaded.path / "routers.json").exists():
            raise BriskError(f"--stage lora needs a checkpoint with trained routers; run --stage routers first "
                             f"(no routers.json in {loaded.path})")
        routers = RouterSet.load(loaded.path).follow(model)
        model, stats = train_lora(model, tok, train.features, routers, opts)
    test = load_calibration(tok, "mixed_lm", 64, split="test") if args.calib in ("mixed_lm", "shifted") else train
    records = []
    metrics = token_metrics(routed_forward(model, routers, records), test, _pad(tok))
    report = {**stats, **metrics, "target_sparsity": args.sparsity, "realised_sparsity": merged_rates(records)["total"],
              "skip_rates": merged_rates(records), "router": args.router, "calib": args.calib}
    save_skipgpt(args.out, model, tok, routers, report)
    print(json.dumps(report, indent=2))
    print(f"saved to {args.out} (HF checkpoint + routers.safetensors/routers.json)")
    return 0


def add_commands(subparsers) -> None:
    prune = subparsers.add_parser("prune", help="static depth/width pruning and SkipGPT token routing")
    sub = prune.add_subparsers(dest="prune_command", metavar="METHOD", required=True)

    def common(p, training: bool = False):
        p.add_argument("--model", required=True, help="zoo name or local HF checkpoint folder")
        p.add_argument("--calib", default="mixed_lm",
                       help="calibration/recovery data: mixed_lm (the model's own distribution), shifted, or your "
                            "text: FILE.txt or FILE.jsonl (field 'text'), encoded with the model's tokenizer")
        p.add_argument("--calib-n", type=int, default=64, help="calibration sequences (at most)")
        p.add_argument("--seq-len", type=int, default=128,
                       help="tokens per calibration sequence cut from a text file (0 = one sequence per line/record)")
        p.add_argument("--out", required=True, help="output checkpoint folder")
        add_device_args(p, training=training)

    p = sub.add_parser("depth", help="delete whole layers (Block Influence or SLEB)")
    common(p)
    p.add_argument("--remove", type=int, required=True, help="number of layers to delete")
    p.add_argument("--method", choices=("bi", "sleb"), default="bi")
    p.set_defaults(func=cmd_depth)

    p = sub.add_parser("width", help="magnitude / Wanda (unstructured) or structured channel+head pruning")
    common(p)
    p.add_argument("--sparsity", type=float, default=None, help="fraction of decoder projection weights, in (0, 1)")
    p.add_argument("--method", choices=("magnitude", "wanda", "structured"), default="wanda")
    p.add_argument("--nm", default=None, metavar="N:M",
                   help="magnitude/wanda: keep N of every M consecutive input weights (e.g. 2:4) instead of --sparsity")
    p.add_argument("--heads-per-group", type=int, default=0, help="structured: query heads removed per KV group")
    p.add_argument("--head-sparsity", type=float, default=None,
                   help="structured: fraction of query heads removed (rounded per KV group; overrides --heads-per-group)")
    p.set_defaults(func=cmd_width)

    p = sub.add_parser("skipgpt", help="train SkipGPT routers (stage routers) or LoRA with frozen routers (stage lora)")
    common(p, training=True)
    p.add_argument("--sparsity", type=float, default=0.25, help="target skipped fraction of module executions, in (0, 1)")
    p.add_argument("--stage", choices=("routers", "lora"), default="routers")
    p.add_argument("--router", choices=("linear", "lowrank"), default="linear")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-n", type=int, default=2000, help="training sequences")
    p.set_defaults(func=cmd_skipgpt)
