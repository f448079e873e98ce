"""The StreamingThinker section of the demo report: a live think-while-reading transcript and latency vs batch CoT."""

from __future__ import annotations

import html

from brisklm.core.timing import one_torch_thread
from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, table_html


def _transcript(seed: int = 0, depth: str = "D3") -> str:
    """One example: each fact as it arrives, the streaming unit written right then, and the batch CoT's units."""
    from brisklm.streaming.thinker.data import thinker_task
    from brisklm.streaming.thinker.session import ThinkerSession
    from brisklm.streaming.thinker_zoo import BATCH_MODEL, STREAMING_MODEL
    from brisklm.zoo.store import load

    example = thinker_task(min_distractors=2).examples("test", 1, seed=seed + 11)[0]
    stream, batch = load(STREAMING_MODEL), load(BATCH_MODEL)
    session = ThinkerSession(stream.model, stream.tokenizer, depth)
    baseline = ThinkerSession(batch.model, batch.tokenizer, depth, mode="batch")
    question = example.meta["question"]
    baseline.read_question(question)
    rows = [{"input arrives": question, "streaming thinker writes now": session.read_question(question)[0],
             "batch CoT writes now": "(waits)"}]
    for fact in example.meta["facts"]:
        unit = session.read_fact(fact)[0]
        baseline.read_fact(fact)
        rows.append({"input arrives": fact, "streaming thinker writes now": unit, "batch CoT writes now": "(waits)"})
    final, answer = session.finish()
    b_final, b_answer = baseline.finish()
    rows.append({"input arrives": "(end of input)", "streaming thinker writes now": final,
                 "batch CoT writes now": " ".join(baseline.units) + " " + b_final})
    after_s = sum(1 for e in session.events[next(i for i, e in enumerate(session.events)
                                                 if e.kind == "read" and e.segment == len(example.meta["facts"])):]
                  if e.kind == "write")
    return (f"<p>Reference answer <code>{html.escape(example.answer)}</code>; streaming answered "
            f"<code>{html.escape(answer)}</code>, batch CoT <code>{html.escape(b_answer)}</code>. Reasoning tokens "
            f"after the last fact: streaming {after_s}, batch {baseline.reasoning_tokens_forwarded}.</p>"
            + table_html(rows))


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Accuracy, waiting and latency of StreamingThinker vs batch CoT, a time-to-answer plot and a transcript."""
    from brisklm.streaming.thinker.bench import thinker_figures, time_figure

    with one_torch_thread():
        depths = ("D1", "D2", "D3")
        figures = thinker_figures(15 if ctx.quick else 100, ctx.seed, depths, progress=ctx.progress)
        transcript = _transcript(ctx.seed)
    rows = [{"depth": d, "acc streaming": figures[d]["accuracy_streaming"], "acc batch": figures[d]["accuracy_batch"],
             "input tokens waited (stream / batch)":
                 f"{figures[d]['tokens_waited_streaming']:.1f} / {figures[d]['tokens_waited_batch']:.1f}",
             "reasoning tokens after last input (stream / batch)":
                 f"{figures[d]['tokens_after_last_input_streaming']:.1f} / "
                 f"{figures[d]['tokens_after_last_input_batch']:.1f}",
             "time to answer reduction": figures[d]["time_to_answer_reduction"],
             "skip rate on distractors": figures[d]["skip_rate_distractors_streaming"]} for d in depths]
    intro = ("<p>StreamingThinker reasons while it reads: after each incoming fact it writes one short unit "
             "(the fact's value, or <code>skip</code> for a distractor), with an input cache and a reasoning cache so "
             "the input is never re-encoded. When the input ends it reasons to depth D1 (answer), D2 (combine the "
             "kept units) or D3 (D2 plus a re-check). The batch CoT baseline is trained on the same units with the "
             f"same budget but reads everything first. {figures['n_test_examples']} test examples; times are simulated "
             "from per-forward costs measured in this run, one fact arriving every "
             f"{figures['headline_interval_steps']} decode steps.</p>")
    fig = time_figure(figures["time_to_answer_s_by_interval_steps"], figures["arrival_step_s"], depths)
    methods = [MethodRow(f"StreamingThinker {d}", "streaming-thinker",
                         f"accuracy {figures[d]['accuracy_streaming']:.2f} vs {figures[d]['accuracy_batch']:.2f} batch CoT",
                         1 / (1 - figures[d]["time_to_answer_reduction"]) if figures[d]["time_to_answer_reduction"] < 1
                         else None, "batch CoT (thinker-batch-cot): time from the last input to the answer")
               for d in depths]
    return [Section("StreamingThinker (think while reading)",
                    intro + table_html(rows) + figure_html(fig, ctx.out_dir, "thinker-time-to-answer")
                    + "<h3>One stream, fact by fact (D3)</h3>" + transcript, methods)]
