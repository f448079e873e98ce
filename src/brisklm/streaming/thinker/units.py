"""`brisk think make-units`: reasoning units for examples that lack them, written by a teacher checkpoint and kept
only when the teacher's final answer matches the reference (the paper's quality control).

Per example: one greedy generation per context sentence (the question, the sentences so far, "reason about the
newest sentence"; all sentences of an example in one left-padded batch), then one for the final segment
(question, context, the units, "give the answer as 'Answer: <answer>'"). The example is kept when the answer
parsed from that final segment equals the reference after normalization (case, surrounding punctuation and
spaces); its units are the first line of each generation. Examples that already have units pass through.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from brisklm.core.generate import generate, left_pad
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.thinker.text import ANSWER_PREFIX, ThinkerExample, answer_matches, parse_answer

UNIT_PROMPT = ("Question: {question}\nContext so far:\n{context}\n"
               "In one short sentence, reason about the newest sentence only: \"{sentence}\"")
FINAL_PROMPT = ("Question: {question}\nContext:\n{context}\nReasoning so far:\n{units}\n"
                "Finish the reasoning in one or two sentences, then give the answer on its own line as "
                f"'{ANSWER_PREFIX} <answer>'.")




@torch.no_grad()
def generate_texts(model, text: TextLayer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of prompts (framed by the text layer: chat template when there is one), batched."""
    rows = [text.prompt_ids(p) for p in prompts]
    device = next(model.parameters()).device
    ids, mask = left_pad(rows, text.roles.pad_id, device)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                   eos_token_id=list(text.stop_ids), pad_token_id=text.roles.pad_id)
    return [text.decode(text.cut_at_eos(row[ids.shape[1]:].tolist())[0]).strip() for row in out]


def _first_line(completion: str) -> str:
    return next((line.strip() for line in completion.splitlines() if line.strip()), "")


def teacher_units(model, text: TextLayer, example: ThinkerExample, max_unit_tokens: int = 48,
                  max_final_tokens: int = 96) -> tuple[ThinkerExample, bool]:
    """The example with teacher units and final segment, and whether the teacher's answer is correct."""
    prompts = [UNIT_PROMPT.format(question=example.question, context="\n".join(example.context[:j + 1]),
                                  sentence=sentence) for j, sentence in enumerate(example.context)]
    units = [_first_line(c) for c in generate_texts(model, text, prompts, max_unit_tokens)]
    final_prompt = FINAL_PROMPT.format(question=example.question, context="\n".join(example.context),
                                       units="\n".join(units))
    final = generate_texts(model, text, [final_prompt], max_final_tokens)[0]
    answer = parse_answer(final)
    reasoning = final[:final.rfind(ANSWER_PREFIX)].strip() if ANSWER_PREFIX in final else final.strip()
    ok = all(units) and answer_matches(answer, example.answer)
    return replace(example, units=units, final=reasoning or None), ok


def make_units(model, text: TextLayer, examples: Sequence[ThinkerExample], max_unit_tokens: int = 48,
               max_final_tokens: int = 96) -> tuple[list[ThinkerExample], list[str]]:
    """(kept examples, `where` of each dropped one): teacher units for those without, checked by the answer."""
    kept, dropped = [], []
    for e in examples:
        if e.units is not None:
            kept.append(e)
            continue
        made, ok = teacher_units(model, text, e, max_unit_tokens, max_final_tokens)
        (kept.append(made) if ok else dropped.append(e.where))
    if not kept:
        raise BriskError(f"no example passed the quality check (the teacher's answer matched the reference in 0 of "
                         f"{len(examples)}): use a stronger --teacher, or write the units yourself")
    return kept, dropped


def example_row(example: ThinkerExample) -> dict:
    """The JSONL object of an example (fields of the input format)."""
    row = {"question": example.question, "context": example.context, "answer": example.answer,
           "units": example.units}
    if example.final:
        row["final"] = example.final
    return row
