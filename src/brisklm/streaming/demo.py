"""The streaming section of the demo report: a live wait-k transcript, quality vs latency, and cost vs re-encoding."""

from __future__ import annotations

import html

from brisklm.core.timing import one_torch_thread
from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, table_html


def _transcript(k: int = 3) -> str:
    """One sentence streamed word by word through the GPE engine: when each target word was written."""
    from brisklm.streaming.policies import gpe_wait_k
    from brisklm.tasks.translation import TranslationTask
    from brisklm.zoo.store import load

    gpe = load("translate-gpe")
    example = TranslationTask(min_len=10, max_len=10).examples("test", 1, seed=1)[0]
    source = example.meta["source_words"]
    out = gpe_wait_k(gpe.model, gpe.tokenizer, [source], k).outputs[0]
    rows = [{"source words read": d, "last word read": source[min(d, len(source)) - 1], "written": w}
            for w, d in zip(out.words, out.delays)]
    return (f"<p>Source: <code>{html.escape(' '.join(source))}</code><br>Reference: "
            f"<code>{html.escape(example.completion)}</code></p>" + table_html(rows))


def demo_sections(ctx: DemoContext) -> list[Section]:
    from brisklm.streaming.bench import bleu_laal_figure, cost_table, quality_table

    with one_torch_thread():
        quality = quality_table(60 if ctx.quick else 200, seed=ctx.seed, progress=ctx.progress)
        cost = cost_table((10, 20, 40), 4 if ctx.quick else 8, k=3, repeats=1 if ctx.quick else 3, seed=ctx.seed,
                          progress=ctx.progress)
        transcript = _transcript()
    rows = []
    for method in ("gpe", "reencode", "reencode_strict", "interleaved", "offline"):
        for key, value in quality["bleu"][method].items():
            rows.append({"method": method, "k": key, "BLEU": value, "LAAL": quality["laal"][method][key],
                         "AL": quality["al"][method][key]})
    cost_rows = [{"source words": key[1:], **value} for key, value in cost.items()]
    intro = ("<p>Group Position Encoding: source tokens at positions 0.., target tokens at 0.. in their own group, "
             "a wait-k mask in training, and an engine with a source cache and a target cache, so each token is "
             "encoded once. <b>reencode</b> is a batch LLM (translate-offline) that re-encodes the source prefix and "
             "its output before every word (reading one more word when it predicts the end early); "
             "<b>reencode_strict</b> forbids that early end, so its schedule is exactly wait-k; <b>interleaved</b> "
             "keeps one sequence in arrival order (source sees target).</p>")
    fig = bleu_laal_figure(quality)
    longest = max(cost, key=lambda key: int(key[1:]))
    methods = [MethodRow(
        "GPE wait-3 (streaming)", "translate-gpe",
        f"BLEU {quality['bleu']['gpe']['k3']:.1f} vs {quality['bleu']['offline']['all']:.1f} offline",
        cost[longest]["wall_ratio"], f"re-encoding the prefix at every read, {longest[1:]}-word sources")]
    return [
        Section("Streaming translation (GPE)", intro + figure_html(fig, ctx.out_dir, "streaming-bleu-laal")
                + table_html(rows) + "<h3>Cost at wait-3: GPE engine vs re-encoding</h3>" + table_html(cost_rows)
                + "<h3>A stream, word by word (wait-3)</h3>" + transcript, methods),
    ]
