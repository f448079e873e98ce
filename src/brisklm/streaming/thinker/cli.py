"""`brisk think`: the question, then context sentences, line by line from stdin; each reasoning unit is printed as
it is written. `brisk think train`: fit a checkpoint on your streaming CoT (thinker/text.py).

Two kinds of model: brisk's arithmetic thinker models (a word-level tokenizer with the thinker words; input
'Q: C from A ?' then facts ending in ' .', with --depth and --mode) and any other checkpoint (first line = the
question, every later line = one context sentence; the chat template frames it when the tokenizer has one).
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Iterator

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import add_text_args, text_options
from brisklm.errors import BriskError
from brisklm.tasks.streaming_arithmetic import FACT_END


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"think": causal_lm_only, "think train": causal_lm_only, "think make-units": causal_lm_only}


def sentences(lines: Iterable[str]) -> Iterator[str]:
    """Split stdin lines into sentences: the first ends with '?', every later one with '.'; blank lines are skipped."""
    asked = False
    for line in lines:
        words = line.split()
        while words:
            end_word = "?" if not asked else FACT_END
            if end_word not in words:
                kind = "question" if not asked else "fact"
                raise BriskError(f"{kind} {' '.join(words)!r} does not end with '{end_word}': "
                                 f"end every {kind} with ' {end_word}' (e.g. 'Q: C from A ?' then 'A = 3 .')")
            cut = words.index(end_word) + 1
            yield " ".join(words[:cut])
            words, asked = words[cut:], True


def cmd_think(args: argparse.Namespace) -> int:
    import torch

    from brisklm.streaming.thinker.data import check_depth, check_mode
    from brisklm.streaming.thinker.session import ThinkerSession
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load(args.model, **device_kwargs(args))
    if not is_arithmetic_thinker(loaded.tokenizer):
        return _think_text(args, loaded)
    if args.data is not None:
        raise BriskError("--data applies to checkpoints trained on your data (brisk think train), not to brisk's "
                         "arithmetic thinker models; pipe the input on stdin instead")
    args.depth, args.mode = args.depth or "D2", args.mode or "streaming"
    check_depth(args.depth)
    check_mode(args.mode)
    session = ThinkerSession(loaded.model, loaded.tokenizer, args.depth, mode=args.mode)
    source = sys.stdin if args.text is None else args.text.splitlines()
    for index, sentence in enumerate(sentences(source)):
        units = session.read_question(sentence) if index == 0 else session.read_fact(sentence)
        label = "question" if index == 0 else f"fact {index}"
        for unit in units:
            print(f"[{label}] {unit}", flush=True)
    if not session.started:
        raise BriskError("stdin held no question: type 'Q: C from A ?' on the first line, then one fact per line")
    final, answer = session.finish()
    if args.mode == "batch":  # the baseline writes all its units only now
        for index, unit in enumerate(session.units):
            print(f"[{'question' if index == 0 else f'fact {index}'}] {unit}", flush=True)
    print(f"[final {args.depth}] {final}", flush=True)
    print(f"answer {answer}" if answer else "answer (none: the model wrote no answer)", flush=True)
    print(f"# {session.facts_read} facts; input tokens forwarded {session.input_tokens_forwarded}, "
          f"reasoning tokens forwarded {session.reasoning_tokens_forwarded}", file=sys.stderr)
    return 0


def is_arithmetic_thinker(tokenizer) -> bool:
    """A brisk arithmetic thinker model: a word-level tokenizer that holds the thinker's reasoning words."""
    from brisklm.core.text import is_word_level
    from brisklm.streaming.thinker.data import THINKER_WORDS

    vocab = tokenizer.get_vocab()
    return is_word_level(tokenizer) and all(w in vocab for w in THINKER_WORDS)


def _text_layer(args: argparse.Namespace, loaded):
    from brisklm.core.text import TextLayer
    from brisklm.streaming.thinker.text import load_settings, unit_end

    settings = load_settings(loaded.path)
    options = text_options(args)
    if settings.get("chat_template") is False:  # trained on the plain layout: keep it
        options["chat_template"] = False
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **options)
    return text, unit_end(text, settings.get("unit_end"))[1]


def _think_text(args: argparse.Namespace, loaded) -> int:
    """Any checkpoint: question on the first line, one context sentence per later line; units as they come."""
    from brisklm.streaming.thinker.text import TextThinkerSession

    if args.depth is not None or args.mode not in (None, "streaming"):
        raise BriskError("--depth and --mode batch apply to brisk's arithmetic thinker models (streaming-thinker, "
                         "thinker-batch-cot); drop them for this checkpoint")
    text, marker = _text_layer(args, loaded)
    if args.data is not None:
        return _think_data(args, loaded, text, marker)
    session = TextThinkerSession(loaded.model, text, marker=marker, max_unit_tokens=args.max_unit_tokens,
                                 max_final_tokens=args.max_final_tokens)
    lines = (line.strip() for line in (sys.stdin if args.text is None else args.text.splitlines()))
    count = 0
    for line in (line for line in lines if line):
        if session.frames[0] is None:
            session.start([line])
            continue
        count += 1
        print(f"[sentence {count}] {session.read([line])[0]}", flush=True)
    if session.frames[0] is None:
        raise BriskError("stdin held no question: type the question on the first line, then one context sentence "
                         "per line")
    if count == 0:
        raise BriskError("the input has a question but no context: type at least one context sentence after the "
                         "question (one per line)")
    final = session.finish()[0]
    print(f"[final] {final}", flush=True)
    answer = session.answers[0]
    print(f"answer {answer}" if answer else "answer (none: the model wrote no answer)", flush=True)
    print(f"# {count} sentences; input tokens forwarded {session.input_tokens_forwarded}, reasoning tokens forwarded "
          f"{session.reasoning_tokens_forwarded}", file=sys.stderr)
    return 0


def _think_data(args: argparse.Namespace, loaded, text, marker) -> int:
    """`--data test.jsonl`: every example through batched sessions; prints each answer and the accuracy."""
    from brisklm.streaming.thinker.text import answer_matches, read_thinker_data, think_batched

    examples = read_thinker_data(args.data)
    sessions = think_batched(loaded.model, text, examples, args.batch_size, marker,
                             max_unit_tokens=args.max_unit_tokens, max_final_tokens=args.max_final_tokens)
    answers = [a for s in sessions for a in s.answers]
    correct = [answer_matches(a, e.answer) for a, e in zip(answers, examples)]
    for e, a, ok in zip(examples, answers, correct):
        print(f"{e.where}\t{'correct' if ok else 'wrong'}\tanswer={a!r}\treference={e.answer!r}", flush=True)
    print(f"accuracy {sum(correct) / len(examples):.3f} ({sum(correct)} of {len(examples)})")
    return 0


def cmd_think_train(args: argparse.Namespace) -> int:
    """Fit a checkpoint on your JSONL streaming CoT through the sentence-level streaming mask."""
    import tempfile
    from pathlib import Path

    import torch

    from brisklm.streaming.thinker.text import read_thinker_data, require_units, save_settings, train_thinker_text
    from brisklm.zoo.store import load
    from brisklm.zoo.textlm import TrainOptions

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise BriskError(f"{out} is not empty: pass another --out or --force to overwrite")
    if args.steps < 1 or args.batch_size < 1:
        raise BriskError("--steps and --batch-size must be positive")
    examples = read_thinker_data(args.data)
    require_units(examples)
    loaded = load(args.model, **device_kwargs(args))
    torch.set_num_threads(args.threads)
    text, marker = _text_layer(args, loaded)
    from brisklm.streaming.thinker.text import unit_end

    marker_text = unit_end(text)[0]
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    print(f"fine-tuning {loaded.path} with the sentence-level streaming mask on {len(examples)} examples of "
          f"{Path(args.data).name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_thinker_text(loaded.model, text, examples, options, tmp, marker)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    save_settings(out, marker_text, text.chat_template)
    print(f"saved to {out} (train loss {stats['train_loss']:.3f}, {stats['train_seconds']:.0f} s)")
    return 0


def cmd_make_units(args: argparse.Namespace) -> int:
    """Teacher-written units for examples without them, kept when the teacher's answer is correct."""
    import json
    from pathlib import Path

    import torch

    from brisklm.core.text import TextLayer
    from brisklm.streaming.thinker.text import read_thinker_data
    from brisklm.streaming.thinker.units import example_row, make_units
    from brisklm.zoo.store import load

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise BriskError(f"{out} exists: pass another --out or --force to overwrite")
    examples = read_thinker_data(args.data)
    torch.set_num_threads(args.threads)
    loaded = load(args.teacher, **device_kwargs(args))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    kept, dropped = make_units(loaded.model, text, examples, args.max_unit_tokens, args.max_final_tokens)
    out.write_text("".join(json.dumps(example_row(e)) + "\n" for e in kept), encoding="utf-8")
    print(f"kept {len(kept)} of {len(examples)} examples in {out}"
          + (f"; dropped (teacher's answer wrong): {', '.join(dropped)}" if dropped else ""))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("think", help="StreamingThinker: read a question and sentences from stdin, reason while "
                                            "reading")
    p.add_argument("--model", default="streaming-thinker",
                   help="a thinker zoo model (arithmetic format) or any causal-LM checkpoint folder")
    p.add_argument("--depth", default=None, help="arithmetic thinker models: final reasoning depth D1 (answer), "
                                                 "D2 (+combine, the default), D3 (+check)")
    p.add_argument("--mode", default=None, help="arithmetic thinker models: streaming (think while reading, the "
                                                "default) or batch (read, then think)")
    p.add_argument("--text", default=None, help="the input as text (lines) instead of stdin")
    p.add_argument("--data", default=None, help="other checkpoints: a JSONL test set (question, context, answer) "
                                                "run through batched sessions instead of stdin; prints the accuracy")
    p.add_argument("--batch-size", type=int, default=8, help="with --data: streams per batched session")
    p.add_argument("--max-unit-tokens", type=int, default=48, help="other checkpoints: cap on one unit's tokens")
    p.add_argument("--max-final-tokens", type=int, default=128, help="other checkpoints: cap on the final segment")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_think)
    sub = p.add_subparsers(dest="think_command", metavar="ACTION")
    t = sub.add_parser("train", help="fit a checkpoint on your streaming CoT (JSONL: question, context, answer, "
                                     "units, optional final) with the sentence-level streaming mask")
    t.add_argument("--model", required=True, help="zoo name or checkpoint folder to start from")
    t.add_argument("--data", required=True, help="JSONL: question, context (list of sentences), answer, units "
                                                 "(one per sentence), optional final")
    t.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    add_text_args(t)
    add_device_args(t, training=True)
    t.set_defaults(func=cmd_think_train)
    m = sub.add_parser("make-units", help="write reasoning units for examples without them with a teacher "
                                          "checkpoint; keep an example only if the teacher's answer is correct")
    m.add_argument("--teacher", required=True, help="zoo name or checkpoint folder of the teacher model")
    m.add_argument("--data", required=True, help="JSONL: question, context, answer (units optional)")
    m.add_argument("--out", required=True, help="JSONL file for the kept examples, with units (input of think train)")
    m.add_argument("--max-unit-tokens", type=int, default=48)
    m.add_argument("--max-final-tokens", type=int, default=96)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--force", action="store_true", help="overwrite --out")
    add_text_args(m)
    add_device_args(m)
    m.set_defaults(func=cmd_make_units)
