"""`brisk stream train` (GPE or ProactiveLLM fine-tuning, full or LoRA), `brisk stream translate` (stdin in, words
out) and `brisk stream eval` (a test set scored as SimulEval does)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import TextLayer, add_text_args, text_options
from brisklm.errors import BriskError
from brisklm.streaming.stepper import DEFAULT_THRESHOLDS, HEAD_POLICIES


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
# wait-k, offline, the decision heads and GPE / ProactiveLLM training run on any tokenizer
CHECKPOINT_SUPPORT = {"stream train": causal_lm_only, "stream translate": causal_lm_only,
                      "stream eval": causal_lm_only}


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from brisklm.streaming.train import parse_k_range, train_gpe
    from brisklm.tasks import get_task
    from brisklm.zoo.store import load
    from brisklm.zoo.textlm import TrainOptions

    if args.k is not None and args.k_range is not None:
        raise BriskError("pass either --k K or --k-range A:B, not both")
    default_k = "1:5" if args.objective == "proactive" else 3  # proactive: random lags 1..5 plus extra reads
    k_range = parse_k_range(args.k_range if args.k_range is not None else (args.k if args.k is not None else default_k))
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise BriskError(f"{out} is not empty: pass another --out or --force to overwrite")
    if args.steps < 1 or args.n_train < 1:
        raise BriskError("--steps and --n-train must be positive")
    if args.spsd is not None and args.objective != "proactive":
        raise BriskError("--spsd applies to --objective proactive only: add --objective proactive or drop --spsd")
    if args.merge and not args.lora:
        raise BriskError("--merge applies to --lora: add --lora or drop --merge")
    if args.lora and args.objective != "gpe":
        raise BriskError("--lora applies to --objective gpe for now: drop --lora or use --objective gpe")
    loaded = load(args.model, **device_kwargs(args))
    torch.set_num_threads(args.threads)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    if args.objective == "proactive":
        return _train_proactive(args, loaded, k_range, options, out)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    if args.data is not None:
        examples = _training_pairs(text, args.data, args.instruction)
        what = f"{len(examples)} pairs of {Path(args.data).name}"
    else:
        examples = get_task("translation").examples("train", args.n_train, seed=args.seed)
        what = "the built-in synthetic translation task"
    peft_model = None
    if args.lora:
        from brisklm.streaming.lora import add_lora

        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        peft_model = add_lora(loaded.model, args.lora_r, args.lora_alpha, targets)
        modules = ",".join(sorted(peft_model.peft_config["default"].target_modules))
        what += f" (LoRA r={args.lora_r} alpha={args.lora_alpha} on {modules})"
    print(f"fine-tuning {loaded.path} with the GPE wait-k mask, k in {k_range[0]}..{k_range[1]}, on {what}", flush=True)
    trained = loaded.model if peft_model is None else peft_model.get_base_model()  # LoRA layers injected in place
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_gpe(trained, text, examples, k_range, options, tmp, phi=args.phi,
                          instruction=args.instruction)
    out.mkdir(parents=True, exist_ok=True)
    if peft_model is not None and not args.merge:
        peft_model.save_pretrained(out)  # adapter only: `stream translate/eval --model OUT` loads base + adapter
        kind = "LoRA adapter"
    else:
        model = loaded.model if peft_model is None else peft_model.merge_and_unload()
        model.save_pretrained(out)
        kind = "merged LoRA model" if peft_model is not None else "model"
    loaded.tokenizer.save_pretrained(out)
    print(f"saved the {kind} to {out} (train loss {stats['train_loss']:.3f}, {stats['train_seconds']:.0f} s)")
    return 0


def _training_pairs(text: TextLayer, data: str, instruction: str | None) -> list:
    """The pairs of a training file; every bad line (format, empty source, a word the tokenizer cannot encode)
    is reported on its own `brisk: error:` line with its line number before anything is trained."""
    from brisklm.streaming.data import read_pairs
    from brisklm.streaming.gpe import build_layout

    name = Path(data).name
    pairs, bad = read_pairs(data)
    for pair in pairs:
        try:
            build_layout(text, pair.example.meta["source_words"], pair.example.meta["target_words"],
                         instruction=instruction)
        except BriskError as error:
            bad.append(BriskError(f"{name} line {pair.line}: {error}"))
    if bad:
        for error in sorted(bad, key=lambda e: _line_of(e) or 0)[:-1]:
            print(f"brisk: error: {error}", file=sys.stderr)
        last = max(bad, key=lambda e: _line_of(e) or 0)
        raise BriskError(f"{last} ({len(bad)} bad line(s) in {name}; nothing was trained)")
    if not pairs:
        raise BriskError(f"--data {data} has no source/target pairs")
    return [pair.example for pair in pairs]


def _train_proactive(args: argparse.Namespace, loaded, k_range: tuple[int, int], options, out: Path) -> int:
    """Random monotone masks (+ SPSD) on your corpus (--data) or variable-lookahead translation, then the
    self-labelled probe; any tokenizer (proactive/subword.py)."""
    from brisklm.streaming.proactive.heads import save_probe, train_probe
    from brisklm.streaming.proactive.subword import sufficiency_data_text, train_proactive_text
    from brisklm.streaming.proactive.train import ScheduleOptions
    from brisklm.streaming.proactive_zoo import proactive_task

    lam = 0.0 if args.spsd is None else args.spsd
    if lam < 0:
        raise BriskError(f"--spsd must be >= 0 (the KL weight lambda), got {lam}")
    if args.n_probe < 1 or args.probe_steps < 1:
        raise BriskError("--n-probe and --probe-steps must be positive")
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    if args.data is not None:  # your corpus: the masks, SPSD and the probe's self-generated labels all come from it
        from brisklm.streaming.data import check_encodable, read_parallel

        examples = read_parallel(args.data)
        check_encodable(text, examples, args.instruction, name=Path(args.data).name)
        what = f"{len(examples)} pairs of {Path(args.data).name}"
    else:
        examples = proactive_task().examples("train", args.n_train, seed=args.seed)
        what = "variable-lookahead translation"
    schedule = ScheduleOptions(k_min=k_range[0], k_max=k_range[1])
    print(f"fine-tuning {loaded.path} with random monotone masks (k in {k_range[0]}..{k_range[1]} plus extra reads)"
          f"{f' and SPSD lambda={lam}' if lam else ''} on {what}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_proactive_text(loaded.model, text, examples, options, tmp, spsd_lambda=lam, schedule=schedule,
                                     phi=args.phi, instruction=args.instruction)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    rows = sufficiency_data_text(loaded.model, text, examples[:args.n_probe], seed=args.seed + 1,
                                 instruction=args.instruction)
    save_probe(train_probe(rows, steps=args.probe_steps, seed=args.seed), out)
    print(f"saved to {out} with its decision probe (train loss {stats['train_loss']:.3f}, "
          f"{stats['train_seconds']:.0f} s; probe rows {len(rows.label)})")
    return 0


def _stdin_words(stream):
    for line in stream:
        yield from line.split()


def cmd_translate(args: argparse.Namespace) -> int:
    """Source words from stdin (or --text) pushed one by one through the policy; each target word printed once
    complete, with its delay (the same word-by-word driver as `stream eval` and the SimulEval agent)."""
    import torch

    from brisklm.streaming.lora import load_model as load
    from brisklm.streaming.stepper import PolicySpec, StreamStepper

    if args.policy in HEAD_POLICIES:
        return _translate_with_head(args)
    spec = PolicySpec(args.policy, args.k, args.threshold).check()
    torch.set_num_threads(1)
    loaded = load(args.model, **device_kwargs(args))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    stepper = StreamStepper(loaded.model, text, spec, phi=args.phi, instruction=args.instruction,
                            max_words=args.max_words)
    source = _stdin_words(sys.stdin) if args.text is None else iter(args.text.split())

    def show(emitted) -> None:
        for item in emitted:  # a word is printed once complete, with the source words read at its first token
            print(f"{item.word}\tdelay={item.delay}", flush=True)

    with torch.no_grad():
        for word in source:
            if not stepper.done:
                show(stepper.push([word]))
        if not stepper.received:
            raise BriskError("the source stream is empty: type at least one word on stdin (or pass --text)")
        show(stepper.push([], finished=True))
    out = stepper.output
    print(f"# {len(out.words)} words from {len(stepper.received)} source words; forward tokens "
          f"{stepper.session.forward_tokens}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Decode a test set with a policy, sentence by sentence (timed), and write instances.log + scores.json."""
    import torch

    from brisklm.eval.progress import progress
    from brisklm.streaming.data import NumberedPair, read_pairs
    from brisklm.streaming.evaluate import evaluate, write_outputs
    from brisklm.streaming.lora import load_model
    from brisklm.streaming.simul_scores import DEFAULT_WORD_MS
    from brisklm.streaming.stepper import PolicySpec
    from brisklm.tasks import get_task

    spec = PolicySpec(args.policy, args.k, args.threshold).check()
    word_ms = DEFAULT_WORD_MS if args.word_ms is None else args.word_ms
    if not word_ms > 0:
        raise BriskError(f"--word-ms must be positive, got {word_ms}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise BriskError(f"--out {out} is a file: pass a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise BriskError(f"{out} is not empty: pass another --out or --force to overwrite")
    bad: list[BriskError] = []
    if args.data is not None:
        lines, bad = read_pairs(args.data)
        name = Path(args.data).name
    else:
        if args.n_test < 1:
            raise BriskError("--n-test must be positive")
        task = get_task("translation")
        lines = [NumberedPair(i + 1, e) for i, e in enumerate(task.examples("test", args.n_test, seed=args.seed))]
        name = "the synthetic translation task"
    if args.limit is not None:
        lines = lines[:args.limit]
    for error in bad:
        print(f"brisk: error: {error}", file=sys.stderr, flush=True)
    if not lines:
        raise BriskError(f"--data {args.data} has no usable source/target pairs")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, **device_kwargs(args))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))

    def report(error: BriskError) -> None:  # above the progress bar, on a line of its own
        from tqdm.auto import tqdm

        tqdm.write(f"brisk: error: {error}", file=sys.stderr)

    result = evaluate(loaded.model, text, lines, spec, name=name, word_ms=word_ms, phi=args.phi,
                      instruction=args.instruction, checkpoint=loaded.path, progress=progress, on_error=report)
    skipped = [{"line": _line_of(e), "error": str(e)} for e in bad] + result.skipped
    result.skipped = sorted(skipped, key=lambda s: s["line"] or 0)
    meta = {**spec.describe(), "model": str(args.model), "data": args.data or "synthetic:translation",
            "latency_unit": "word", "word_ms": word_ms,
            "compute_seconds": sum(r["compute_ms"][-1] for r in result.records if r["compute_ms"]) / 1000.0}
    path = write_outputs(out, result, meta)
    if result.records:
        s = result.scores
        latency = " ".join(f"{m}={s[m]:.3f}" for m in ("AL", "LAAL", "DAL", "AP", "AL_CA") if s.get(m) is not None)
        print(f"{len(result.records)} sentences of {name}: BLEU={s['BLEU']:.2f} {latency} -> {path}")
    if result.skipped:
        print(f"brisk: error: {len(result.skipped)} line(s) skipped (listed in {path}); fix them and rerun",
              file=sys.stderr)
        return 2
    return 0


def _line_of(error: BriskError) -> int | None:
    """The line number a data error names ('NAME line N: ...')."""
    import re

    found = re.search(r" line (\d+):", str(error))
    return int(found.group(1)) if found else None


def _translate_with_head(args: argparse.Namespace) -> int:
    """A decision head (ProactiveLLM) chooses READ or WRITE at every step; prints words with their delays."""
    import math

    import torch

    from brisklm.streaming.lora import load_model as load
    from brisklm.streaming.proactive.heads import make_head
    from brisklm.streaming.proactive.subword import head_decode

    threshold = DEFAULT_THRESHOLDS[args.policy] if args.threshold is None else args.threshold
    if math.isnan(threshold):
        raise BriskError("--threshold is NaN: pass a number")
    torch.set_num_threads(1)
    loaded = load(args.model, **device_kwargs(args))
    head = make_head(args.policy, loaded.path)
    source = _stdin_words(sys.stdin) if args.text is None else iter(args.text.split())
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    out = head_decode(loaded.model, text, [source], head, threshold, phi=args.phi, max_words=args.max_words,
                      instruction=args.instruction,
                      on_write=lambda _, word, delay: print(f"{word}\tdelay={delay}", flush=True)).outputs[0]
    print(f"# {len(out.words)} words from {out.source_words} source words ({args.policy} head, threshold "
          f"{threshold})", file=sys.stderr)
    return 0


def add_commands(subparsers) -> None:
    stream = subparsers.add_parser("stream", help="simultaneous (streaming) translation with Group Position Encoding")
    sub = stream.add_subparsers(dest="stream_command", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="fine-tune a model with the GPE wait-k mask (transformers.Trainer)")
    p.add_argument("--model", default="translate-offline", help="zoo name or checkpoint folder to start from")
    p.add_argument("--k", type=int, default=None, help="one wait-k lag (default 3)")
    p.add_argument("--k-range", default=None, help="A:B, draw k per example (one model for several lags)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--phi", type=int, default=0, help="first target position (GPE's pe_cache_length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--objective", choices=("gpe", "proactive"), default="gpe",
                   help="gpe: wait-k masks; proactive: random monotone masks on variable-lookahead data + a probe")
    p.add_argument("--spsd", type=float, default=None, metavar="LAMBDA",
                   help="with --objective proactive: weight of the full-context self-distillation KL (default 0)")
    p.add_argument("--n-probe", type=int, default=600, help="training sentences whose rows label the probe")
    p.add_argument("--probe-steps", type=int, default=1500, help="optimizer steps of the probe's logistic regression")
    p.add_argument("--data", default=None,
                   help="your parallel corpus: .jsonl with fields source and target, or .tsv source<TAB>target "
                        "(default: the built-in synthetic translation task)")
    p.add_argument("--instruction", default=None, help="text that opens the source group (see stream translate)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling alpha")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="projections to adapt, by their unfused names (fused families map them, e.g. qkv_proj)")
    p.add_argument("--merge", action="store_true",
                   help="with --lora: merge the adapters into the weights (default: save the adapter alone)")
    add_text_args(p)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("translate", help="read source words from stdin, print each target word with its delay")
    p.add_argument("--model", default="translate-gpe", help="zoo name or checkpoint folder (GPE-trained)")
    p.add_argument("--policy", choices=("wait-k", "offline", *HEAD_POLICIES), default="wait-k",
                   help="wait-k / offline schedules, or a decision head (entropy, attention, probe)")
    p.add_argument("--threshold", type=float, default=None,
                   help="head threshold: entropy WRITEs if H <= T (default 0.5), attention if newest-word mass <= T "
                        "(0.3), probe if P(sufficient) >= T (0.5)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--phi", type=int, default=0)
    p.add_argument("--text", default=None, help="source text instead of stdin")
    p.add_argument("--max-words", type=int, default=256, help="stop after this many target words")
    p.add_argument("--instruction", default=None,
                   help="text that opens the source group, e.g. 'Translate the following English text to German:' "
                        "(inside the chat template's user turn when the tokenizer has one)")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_translate)
    p = sub.add_parser("eval", help="decode a test set with a policy; write SimulEval's instances.log + scores.json")
    p.add_argument("--model", default="translate-gpe", help="zoo name, checkpoint folder or LoRA adapter folder")
    p.add_argument("--data", default=None,
                   help="test pairs: .jsonl (fields source, target) or .tsv (default: the synthetic task's test set)")
    p.add_argument("--policy", choices=("wait-k", "offline", *HEAD_POLICIES), default="wait-k")
    p.add_argument("--k", type=int, default=3, help="wait-k lag")
    p.add_argument("--threshold", type=float, default=None, help="decision-head threshold (see stream translate)")
    p.add_argument("--out", required=True, help="folder for instances.log, scores.json and config.yaml")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--word-ms", type=float, default=None,
                   help="milliseconds per source word that convert compute time into the *_CA latencies (300)")
    p.add_argument("--n-test", type=int, default=200, help="sentences of the synthetic task (without --data)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--phi", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--instruction", default=None, help="text that opens the source group (see stream translate)")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_eval)
