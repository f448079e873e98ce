"""`brisk vision prune|train|answer`: visual-token pruning, ViCA/dense training, and answering one image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import multimodal_only
from brisklm.errors import BriskError


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"vision prune": multimodal_only, "vision answer": multimodal_only, "vision train": multimodal_only}


def _visipruner_config(args: argparse.Namespace):
    from brisklm.vision.visipruner import VisiPrunerConfig

    return VisiPrunerConfig(shallow_layers=args.shallow_layers, layer_threshold=args.layer_threshold,
                            token_threshold=args.token_threshold, exit_threshold=args.exit_threshold)


def _spec(args: argparse.Namespace):
    from brisklm.vision.prune import PruneSpec

    spec = PruneSpec(method=args.method, keep=args.keep, layer=args.layer, visipruner=_visipruner_config(args))
    spec.check()
    return spec


def cmd_prune(args: argparse.Namespace) -> int:
    from brisklm.vision.study import evaluate_method
    from brisklm.vision.vlm import load_vlm

    loaded = load_vlm(args.model, **device_kwargs(args))
    examples = _test_examples(args.n, args.seed)
    dense = evaluate_method(loaded, examples, _dense_spec())
    pruned = evaluate_method(loaded, examples, _spec(args))
    kept = pruned["accuracy"] / dense["accuracy"] if dense["accuracy"] else float("nan")
    shown = {"method": args.method, "keep": args.keep, "dense_accuracy": round(dense["accuracy"], 4),
             "accuracy": round(pruned["accuracy"], 4), "accuracy_kept": round(kept, 4),
             "visual_tokens": dense["visual_tokens"], "equivalent_visual_tokens": round(pruned["equivalent_tokens"], 3),
             "flops_ratio": round(pruned["flops_ratio"], 4)}
    for key in ("mean_fusion_layer", "mean_kept", "mean_exit_layer", "fired_fraction"):
        if key in pruned:
            shown[key] = round(pruned[key], 3)
    print(json.dumps(shown))
    return 0


def _dense_spec():
    from brisklm.vision.prune import PruneSpec

    return PruneSpec(method="dense")


def _test_examples(n: int, seed: int):
    from brisklm.tasks import get_task
    from brisklm.vision.zoo import TASK_OPTIONS

    if n < 1:
        raise BriskError(f"--n must be at least 1, got {n}")
    return get_task("shapes_vqa", **TASK_OPTIONS).examples("test", n, seed=seed)


def cmd_train(args: argparse.Namespace) -> int:
    from brisklm.vision.zoo import train_dense_model, train_vica_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arch == "vica":
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        quality = train_vica_model(args.base, out, args.seed, args.num_layers, args.steps or 200, args.lr or 1e-3,
                                   layers=layers)
    elif args.arch == "dense":
        quality = train_dense_model(out, args.seed, args.steps, args.lr)
    else:
        raise BriskError(f"unknown --arch {args.arch!r}: choose vica or dense")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in quality.items()
                      if not isinstance(v, list) or k == "vica_layers"}))
    print(f"saved to {out}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from brisklm.vision.prune import greedy_answer
    from brisklm.vision.vica import vica_generate
    from brisklm.vision.vlm import load_vlm

    path = Path(args.image)
    if not path.is_file():
        raise BriskError(f"image {path} does not exist; pass a PNG file")
    try:
        image = np.asarray(Image.open(path).convert("RGB"))
    except OSError as error:
        raise BriskError(f"cannot read {path} as an image: {error}") from None
    loaded = load_vlm(args.model, **device_kwargs(args))
    batch = loaded.processor([image], [args.question])
    tok = loaded.processor.tokenizer
    if getattr(loaded.model.config, "vica_layers", None) is not None:
        layers = loaded.model.config.vica_layers
        ids = vica_generate(loaded.model, batch, layers, args.max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[0].tolist()
        ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        info = {"arch": "vica", "layers": list(layers)}
    else:
        answers, record = greedy_answer(loaded.model, batch, _spec(args), args.max_new_tokens)
        ids = answers[0]
        info = {"method": args.method, "visual_tokens_per_layer": [int(v[0]) for v in record.visual]}
    print(json.dumps({"answer": " ".join(tok.convert_ids_to_tokens(ids)), **info}))
    return 0


def _method_args(p: argparse.ArgumentParser, default_method: str) -> None:
    p.add_argument("--method", default=default_method, help="visipruner | fastv | pdrop | random | dense")
    p.add_argument("--keep", type=int, default=None,
                   help="visual tokens kept (FastV/random; PyramidDrop's first stage; a cap for VisiPruner)")
    p.add_argument("--layer", type=int, default=2, help="FastV/random: tokens enter this layer pruned (K)")
    p.add_argument("--shallow-layers", type=int, default=0, help="VisiPruner: layers where text sees only a sink")
    p.add_argument("--layer-threshold", type=float, default=0.995, help="VisiPruner: fusion if cos(o-c_j,o) < this")
    p.add_argument("--token-threshold", type=float, default=0.1, help="VisiPruner: keep j if ||c_j||/||o|| >= this")
    p.add_argument("--exit-threshold", type=float, default=0.999, help="VisiPruner: deep stage 'not needed' cosine")


def add_commands(subparsers) -> None:
    vision = subparsers.add_parser("vision", help="vision-language models: VisiPruner, FastV, PyramidDrop, ViCA")
    sub = vision.add_subparsers(dest="vision_command", metavar="ACTION", required=True)
    p = sub.add_parser("prune", help="accuracy and cost of a visual-token pruning method vs dense on ShapesVQA")
    p.add_argument("--model", default="shapes-llava", help="zoo name or LLaVA checkpoint folder")
    _method_args(p, "visipruner")
    p.add_argument("--n", type=int, default=200, help="test questions")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("train", help="train a ViCA model (from a dense LLaVA) or a dense tiny LLaVA")
    p.add_argument("--arch", required=True, help="vica | dense")
    p.add_argument("--out", required=True, help="folder to save the model")
    p.add_argument("--base", default="shapes-llava", help="ViCA: dense LLaVA to start from")
    p.add_argument("--num-layers", type=int, default=2, help="ViCA: how many cross-attention layers to select")
    p.add_argument("--layers", default=None, help="ViCA: explicit comma-separated layers (skips selection)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("answer", help="answer a question about one image")
    p.add_argument("--image", required=True, help="PNG file")
    p.add_argument("--question", required=True)
    p.add_argument("--model", default="shapes-llava")
    _method_args(p, "dense")
    p.add_argument("--max-new-tokens", type=int, default=4)
    add_device_args(p)
    p.set_defaults(func=cmd_answer)
