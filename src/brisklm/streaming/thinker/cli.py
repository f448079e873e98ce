"""`brisk think`: the question, then facts, line by line from stdin; each reasoning unit is printed as it is written."""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Iterator

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import word_level_only
from brisklm.errors import BriskError
from brisklm.tasks.streaming_arithmetic import FACT_END


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"think": word_level_only}


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

    check_depth(args.depth)
    check_mode(args.mode)
    torch.set_num_threads(1)
    loaded = load(args.model, **device_kwargs(args))
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


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("think", help="StreamingThinker: read a question and facts from stdin, reason while reading")
    p.add_argument("--model", default="streaming-thinker", help="zoo name or checkpoint folder (a thinker model)")
    p.add_argument("--depth", default="D2", help="final reasoning depth: D1 (answer), D2 (+combine), D3 (+check)")
    p.add_argument("--mode", default="streaming", help="streaming (think while reading) or batch (read, then think)")
    p.add_argument("--text", default=None, help="the input as text (lines) instead of stdin")
    add_device_args(p)
    p.set_defaults(func=cmd_think)
