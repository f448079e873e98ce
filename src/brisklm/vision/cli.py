"""`brisk vision prune|train|answer|eval`: visual-token pruning, ViCA/dense training, answering about images
through a checkpoint's own processor, and evaluating every method on user QA data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import multimodal_only
from brisklm.core.text import add_text_args
from brisklm.errors import BriskError


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"vision prune": multimodal_only, "vision answer": multimodal_only, "vision train": multimodal_only,
                      "vision eval": multimodal_only}


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
    kept = pruned["accuracy"] / dense["accuracy"] if dense["accuracy"] else None  # undefined when dense scores 0
    shown = {"method": args.method, "keep": args.keep, "dense_accuracy": round(dense["accuracy"], 4),
             "accuracy": round(pruned["accuracy"], 4), "accuracy_kept": None if kept is None else round(kept, 4),
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


def _refuse_qwen2vl_vica(base: str) -> None:
    """ViCA is trained on LLaVA checkpoints only: a Qwen2-VL base is refused in one line before loading."""
    from brisklm.vision.vlm import _model_type

    path = Path(base)
    if path.is_dir() and _model_type(path) in ("qwen2_vl", "qwen2_5_vl"):
        raise BriskError(f"ViCA training needs a LLaVA checkpoint; {base} is {_model_type(path)} (Qwen2-VL runs "
                         "dense, FastV, PyramidDrop and VisiPruner: use vision answer / vision eval)")


def cmd_train(args: argparse.Namespace) -> int:
    from brisklm.vision.zoo import train_dense_model, train_vica_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arch == "vica":
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        if min(args.n_calib, args.n_test) < 1:
            raise BriskError(f"--n-calib and --n-test must be at least 1, got {args.n_calib} and {args.n_test}")
        _refuse_qwen2vl_vica(args.base)
        quality = train_vica_model(args.base, out, args.seed, args.num_layers, args.steps or 200, args.lr or 1e-3,
                                   layers=layers, n_calib=args.n_calib, n_test=args.n_test)
    elif args.arch == "dense":
        quality = train_dense_model(out, args.seed, args.steps, args.lr)
    else:
        raise BriskError(f"unknown --arch {args.arch!r}: choose vica or dense")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in quality.items()
                      if not isinstance(v, list) or k == "vica_layers"}))
    print(f"saved to {out}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from brisklm.core.text import text_options
    from brisklm.vision.evaluate import generate_answers, generation_options, vica_layers
    from brisklm.vision.processor import load_image
    from brisklm.vision.vlm import load_vlm

    import torch

    images = [load_image(path) for path in args.image]  # a file that does not open fails before loading
    loaded = load_vlm(args.model, **device_kwargs(args), **text_options(args))
    layers = vica_layers(loaded.model)
    spec = "vica" if layers is not None else _spec(args)
    if args.max_new_tokens < 1:
        raise BriskError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    torch.manual_seed(args.seed)
    answers, record = generate_answers(loaded, [images], [args.question], spec, args.max_new_tokens,
                                       **generation_options(loaded, args.temperature, args.top_p))
    info = ({"arch": "vica", "layers": list(layers)} if layers is not None else
            {"method": args.method, "visual_tokens_per_layer": [int(v[0]) for v in record.visual]})
    counted = record is not None and bool(record.visual)  # the prompt's own count (dynamic resolution: Qwen2-VL)
    tokens = int(record.visual[0].sum()) if counted else len(images) * loaded.processor.tokens_per_image
    print(json.dumps({"answer": answers[0], "images": len(images), "image_tokens": tokens, **info}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import torch

    from brisklm.core.text import text_options
    from brisklm.vision.evaluate import (
        evaluate,
        generation_options,
        method_runs,
        plot,
        read_qa,
        resolve_budgets,
        shapes_items,
        vica_layers,
    )
    from brisklm.vision.vlm import load_vlm

    items = read_qa(args.data) if args.data else shapes_items(args.n, args.seed)  # bad data fails before loading
    loaded = load_vlm(args.model, **device_kwargs(args), **text_options(args))
    visual = loaded.processor.tokens_per_image * min(len(it.images) for it in items)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else \
        ["fastv", "pdrop", "visipruner", *(["vica"] if vica_layers(loaded.model) is not None else [])]
    runs = method_runs(methods, resolve_budgets(args.budgets.split(","), visual), loaded.model, args.layer)
    torch.manual_seed(args.seed)
    results = evaluate(loaded, items, runs, args.batch_size, args.max_new_tokens,
                       progress=lambda **kw: tqdm(disable=None, **kw),
                       **generation_options(loaded, args.temperature, args.top_p))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = str(args.data) if args.data else f"shapes_vqa test (n={args.n}, seed={args.seed})"
    figure = plot(results, out / "accuracy_vs_flops.png", f"{Path(str(args.model)).name} on {Path(data).name}")
    summary = {"model": str(args.model), "data": data, "questions": len(items), "visual_tokens": visual,
               "note": "flops_ratio: LM prefill FLOPs counted by the executor (work done inside a method's scoring hook "
                       "is not in it); analytic_flops_ratio: vision.common.flops_ratio; times: one pass each, same run", "runs": results,
               "plot": str(figure)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'run':<16}{'accuracy':>9}{'kept':>7}{'flops':>7}{'prefill':>9}{'decode':>8}")
    shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        print(f"{r['run']:<16}{r['accuracy']:>9.3f}{shown(r['accuracy_kept']):>7}{r['flops_ratio']:>7.3f}"
              f"{r['prefill_time_ratio']:>9.3f}{shown(r['decode_time_ratio']):>8}")
    print(f"(ratios against dense; decode per step; results in {out / 'results.json'}, plot in {figure})")
    print(json.dumps({"questions": len(items), "runs": [{k: (round(v, 4) if isinstance(v, float) else v)
                                                          for k, v in r.items()} for r in results]}))
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")


def _method_args(p: argparse.ArgumentParser, default_method: str) -> None:
    p.add_argument("--method", default=default_method, help="visipruner | fastv | pdrop | random | dense")
    p.add_argument("--keep", "--budget", dest="keep", type=int, default=None,
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
    p.add_argument("--n-calib", type=int, default=256, help="ViCA: ShapesVQA questions for layer selection")
    p.add_argument("--n-test", type=int, default=400, help="ViCA: ShapesVQA test questions for the accuracy")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("answer", help="answer a question about an image (any LLaVA, through its own processor)")
    p.add_argument("--image", required=True, action="append",
                   help="image file; repeat for several images (one <image> each, in order)")
    p.add_argument("--question", required=True, help="the question; may write <image> where each image goes")
    p.add_argument("--model", default="shapes-llava", help="zoo name or LLaVA checkpoint folder")
    _method_args(p, "dense")
    p.add_argument("--max-new-tokens", type=int, default=16)
    _sampling_args(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_answer)
    p = sub.add_parser("eval", help="accuracy, FLOPs and time of every method and budget vs dense on your QA data")
    p.add_argument("--model", default="shapes-llava", help="zoo name or LLaVA checkpoint folder")
    p.add_argument("--data", default=None, help="QA JSONL: image (path relative to the file), question, answer "
                                                "[, options]; default: ShapesVQA test questions")
    p.add_argument("--n", type=int, default=200, help="ShapesVQA questions (without --data)")
    p.add_argument("--methods", default=None,
                   help="comma-separated: fastv, pdrop, visipruner, vica (default: all that apply); dense always runs")
    p.add_argument("--budgets", default="0.25,0.1",
                   help="kept visual tokens per prompt: counts (12) or fractions (0.25); default 0.25,0.1")
    p.add_argument("--layer", type=int, default=2, help="FastV: tokens enter this layer pruned (K)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    _sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="vision-eval", help="folder for results.json and accuracy_vs_flops.png")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_eval)
