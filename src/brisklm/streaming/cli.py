"""`brisk stream train` (GPE or ProactiveLLM fine-tuning) and `brisk stream translate` (stdin in, words out)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import TextLayer, add_text_args, text_options
from brisklm.errors import BriskError
from brisklm.streaming.policies import MAX_TOKENS_PER_WORD, OFFLINE_K, reads_before, target_limit


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
# wait-k, offline, the decision heads and GPE / ProactiveLLM training run on any tokenizer
CHECKPOINT_SUPPORT = {"stream train": causal_lm_only, "stream translate": causal_lm_only}


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
    loaded = load(args.model, **device_kwargs(args))
    torch.set_num_threads(args.threads)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    if args.objective == "proactive":
        return _train_proactive(args, loaded, k_range, options, out)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    if args.data is not None:
        from brisklm.streaming.data import check_encodable, read_parallel

        examples = read_parallel(args.data)
        check_encodable(text, examples, args.instruction, name=Path(args.data).name)
        what = f"{len(examples)} pairs of {Path(args.data).name}"
    else:
        examples = get_task("translation").examples("train", args.n_train, seed=args.seed)
        what = "the built-in synthetic translation task"
    print(f"fine-tuning {loaded.path} with the GPE wait-k mask, k in {k_range[0]}..{k_range[1]}, on {what}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_gpe(loaded.model, text, examples, k_range, options, tmp, phi=args.phi,
                          instruction=args.instruction)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    print(f"saved to {out} (train loss {stats['train_loss']:.3f}, {stats['train_seconds']:.0f} s)")
    return 0


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
    import torch

    from brisklm.streaming.engine import StreamingSession
    from brisklm.streaming.gpe import check_k
    from brisklm.zoo.store import load

    if args.policy in HEAD_POLICIES:
        return _translate_with_head(args)
    if args.threshold is not None:
        raise BriskError(f"--threshold applies to --policy {'|'.join(HEAD_POLICIES)}, not {args.policy}")
    k = OFFLINE_K if args.policy == "offline" else check_k(args.k)
    torch.set_num_threads(1)
    loaded = load(args.model, **device_kwargs(args))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    session = StreamingSession(loaded.model, text, phi=args.phi, instruction=args.instruction)
    source = _stdin_words(sys.stdin) if args.text is None else iter(args.text.split())

    def write_while_allowed(closed: bool) -> None:
        cap = args.max_words if not closed else min(args.max_words, target_limit(session.words_read(0)))
        while not session.done[0]:
            if session.words_started(0) >= cap or len(session.written[0]) >= MAX_TOKENS_PER_WORD * cap:
                out, before = session.outputs[0], len(session.outputs[0].words)
                session.stop(0)  # completes the open word
                show(zip(out.words[before:], out.delays[before:]))
                return
            j = session.words_started(0) + 1  # the word the next token may start
            if not closed and session.words_read(0) < reads_before(k, j, 10**9):
                return
            token = session.write()[0]
            show(session.new_words[0])
            if token is None and session.wants_read[0] and not closed:
                return  # the model wants more source before it may end

    def show(words) -> None:
        for word, delay in words:  # a word is printed once complete, with the source words read at its first token
            print(f"{word}\tdelay={delay}", flush=True)

    for word in source:
        session.read([word])
        write_while_allowed(closed=False)
    if session.words_read(0) == 0:
        raise BriskError("the source stream is empty: type at least one word on stdin (or pass --text)")
    session.close()
    write_while_allowed(closed=True)
    out = session.outputs[0]
    print(f"# {len(out.words)} words from {out.source_words} source words; forward tokens {session.forward_tokens}",
          file=sys.stderr)
    return 0


HEAD_POLICIES = ("entropy", "attention", "probe")
DEFAULT_THRESHOLDS = {"entropy": 0.5, "attention": 0.3, "probe": 0.5}


def _translate_with_head(args: argparse.Namespace) -> int:
    """A decision head (ProactiveLLM) chooses READ or WRITE at every step; prints words with their delays."""
    import math

    import torch

    from brisklm.streaming.proactive.heads import make_head
    from brisklm.streaming.proactive.subword import head_decode
    from brisklm.zoo.store import load

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
