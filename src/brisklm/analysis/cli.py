"""`brisk analyze pir|icl|lens`: Peak Inverse Rank of one ICL task, the coordinate-system experiment, the logit lens."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import TextLayer, add_text_args, text_options
from brisklm.errors import BriskError
from brisklm.eval.progress import progress

DEFAULT_MODEL = "icl-lm"
TASKS_HELP = ("JSON list of your own tasks: {\"name\", \"task_word\", \"labels\": [...], \"recognisable\": true|false, "
              "\"examples\": [{\"input\", \"label\"}]} (labels scored by whole-label log-probability)")


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"analyze lens": causal_lm_only, "analyze pir": causal_lm_only, "analyze icl": causal_lm_only}


def _load(args: argparse.Namespace):
    from brisklm.zoo.store import load

    return load(args.model, seed=args.seed, **device_kwargs(args))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _user_tasks(args: argparse.Namespace):
    """The tasks of --tasks FILE (checked before the model loads), or None for the built-in tasks."""
    from brisklm.analysis.user_tasks import load_tasks

    return load_tasks(args.tasks) if getattr(args, "tasks", None) else None


def cmd_pir(args: argparse.Namespace) -> int:
    from brisklm.analysis.icl import pir_for_task
    from brisklm.analysis.pir import MODES
    from brisklm.analysis.user_tasks import pick_task

    modes = MODES if args.mode == "both" else (args.mode,)
    tasks = _user_tasks(args)
    if tasks is None and args.task is None:
        raise BriskError("choose a task: --task sentiment|category|sentiment_arbitrary|category_arbitrary, "
                         "or --tasks FILE.json [--task NAME]")
    task = pick_task(tasks, args.task) if tasks is not None else args.task
    name = getattr(task, "name", task)
    if tasks is not None and args.shots > task.max_shots:
        raise BriskError(f"--shots {args.shots} needs {args.shots + 1} examples of task {name!r}, which has "
                         f"{len(task.examples)}; add examples or lower --shots")
    loaded = _load(args)
    res = pir_for_task(loaded.model, loaded.tokenizer, task, n=args.n, shots=args.shots,
                       with_similar=args.similar, seed=args.seed, batch_size=args.batch_size, modes=modes)
    scoring = "whole-label log-probability" if tasks is not None else "argmax over the vocabulary"
    print(f"task {name}: {res.n} prompts, {res.shots} shots, accuracy {res.accuracy:.3f} ({scoring})")
    for mode in modes:
        curve = res.pir_curve(mode)
        layers = "  ".join(f"L{i + 1}={v:.3f}" for i, v in enumerate(curve))
        print(f"PIR[{mode}] = {res.pir_mean(mode):.3f}   mean inverse rank per layer: {layers}")
    if args.json:
        payload = {"task": name, "accuracy": res.accuracy, "n": res.n, "shots": res.shots,
                   "pir": {m: res.pir_mean(m) for m in modes}, "curves": {m: res.pir_curve(m) for m in modes}}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def cmd_icl(args: argparse.Namespace) -> int:
    from brisklm.analysis.icl import run_icl_experiment, save_plot

    shot_counts = tuple(int(k) for k in args.shot_counts.split(",")) if args.shot_counts else ()
    if any(k < 1 or k > 11 for k in shot_counts):
        raise BriskError(f"--shot-counts must be integers in 1..11, got {args.shot_counts!r}")
    tasks = _user_tasks(args)
    if tasks is not None:
        small = [t.name for t in tasks if args.shots > t.max_shots]
        if small:
            raise BriskError(f"--shots {args.shots} needs {args.shots + 1} examples per task; {small} have fewer: "
                             "add examples or lower --shots")
        for flag, quadrants in ((True, "Q1/Q2"), (False, "Q3/Q4")):
            if not any(t.recognisable == flag for t in tasks):
                print(f"note: no {'recognisable' if flag else 'arbitrary'} task in {args.tasks}: {quadrants} left out")
    loaded = _load(args)
    exp = run_icl_experiment(loaded.model, loaded.tokenizer, n=args.n, shots=args.shots, shot_counts=shot_counts,
                             seed=args.seed, batch_size=args.batch_size, progress=progress, tasks=tasks)
    rows = exp.quadrant_rows()
    cols = list(rows[0])
    print("  ".join(cols))
    for row in rows:
        print("  ".join(_fmt(row[c]) for c in cols))
    if exp.shot_rows():
        print("\nshots (no similar demo):")
        for row in exp.shot_rows():
            print(f"  {row['quadrant']} shots={row['shots']}: accuracy {row['accuracy']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "icl.json").write_text(json.dumps(exp.to_json(), indent=2) + "\n")
    plot = save_plot(exp, out / "icl_coordinates.png")
    print(f"\nwrote {out / 'icl.json'} and {plot}")
    return 0


def cmd_lens(args: argparse.Namespace) -> int:
    from brisklm.analysis.lens import lens_prompt_ids, lens_top_tokens, readable_token

    loaded = _load(args)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    ids = lens_prompt_ids(text, args.prompt)
    pos = len(ids) + args.position if args.position < 0 else args.position
    if not 0 <= pos < len(ids):
        raise BriskError(f"--position {args.position} is outside the prompt's {len(ids)} tokens")
    tops = lens_top_tokens(loaded.model, loaded.tokenizer, args.prompt, k=args.k, position=args.position, text=text,
                           readable=True)
    if args.tokens:
        print("tokens: " + " ".join(f"[{readable_token(text, i)}]" if k == pos else readable_token(text, i)
                                    for k, i in enumerate(ids)))
        print(f"position {pos} of {len(ids)} (in [...]); top {args.k} next tokens per layer, '␣' = a leading space:")
    for layer, top in enumerate(tops):
        name = "emb" if layer == 0 else f"L{layer}"
        print(f"{name:>4}: " + "  ".join(f"{w} {p:.3f}" for w, p in top))
    return 0


def add_commands(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", help="interpretability: logit lens, Peak Inverse Rank, ICL quadrants")
    sub = analyze.add_subparsers(dest="analyze_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or local checkpoint folder (default: icl-lm)")
        p.add_argument("--seed", type=int, default=0)
        add_device_args(p)

    p = sub.add_parser("pir", help="Peak Inverse Rank of one ICL task (both variants by default)")
    common(p)
    p.add_argument("--task", default=None, help="sentiment, category, sentiment_arbitrary or category_arbitrary; "
                                                "with --tasks, the name of a task in that file")
    p.add_argument("--tasks", help=TASKS_HELP)
    p.add_argument("--mode", choices=("both", "residual", "attn_contrib"), default="both")
    p.add_argument("--n", type=int, default=128, help="prompts to average over")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--similar", action="store_true", help="include a demonstration with the query's own key")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_pir)

    p = sub.add_parser("icl", help="the four-quadrant ICL experiment: accuracy, copying, shots and PIR per layer")
    common(p)
    p.add_argument("--n", type=int, default=128, help="prompts per condition")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--shot-counts", default="1,2,4,8", help="comma-separated shot sweep ('' to skip)")
    p.add_argument("--tasks", help=TASKS_HELP)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="analysis-out", help="folder for icl.json and icl_coordinates.png")
    p.set_defaults(func=cmd_icl)

    p = sub.add_parser("lens", help="logit lens: top tokens of every layer at one position of a prompt")
    common(p)
    p.add_argument("--prompt", required=True, help="prompt text (through the chat template when the tokenizer has one)")
    p.add_argument("--position", type=int, default=-1,
                   help="token position (0 = first token, <bos> if any; negative counts from the end)")
    add_text_args(p)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--tokens", action="store_true",
                   help="first print the prompt's tokens as read (decoded, '␣' = a leading space) and mark the position")
    p.set_defaults(func=cmd_lens)
