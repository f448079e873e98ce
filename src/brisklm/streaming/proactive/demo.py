"""The ProactiveLLM section of the demo report: heads vs wait-k on variable lookahead, and one stream's decisions."""

from __future__ import annotations

import html

from brisklm.core.timing import one_torch_thread
from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, table_html


def _transcript(threshold: float = 0.5, seed: int = 1) -> str:
    """One sentence through the probe head: the source words read before each target word, and the oracle need."""
    from brisklm.streaming.proactive.heads import Head, adaptive_decode, load_probe
    from brisklm.streaming.proactive_zoo import proactive_task
    from brisklm.zoo.store import load

    m = load("translate-proactive")
    example = proactive_task().examples("test", 1, seed=seed)[0]
    source = example.meta["source_words"]
    result = adaptive_decode(m.model, m.tokenizer, [source], Head("probe", load_probe(m.path)), threshold)
    out = result.outputs[0]
    needs = example.meta["source_needed"]
    rows = [{"written": w, "source words read": d, "last word read": source[d - 1],
             "oracle need": needs[i] if i < len(needs) else "-"} for i, (w, d) in enumerate(zip(out.words, out.delays))]
    return (f"<p>Source: <code>{html.escape(' '.join(source))}</code><br>Reference: "
            f"<code>{html.escape(example.completion)}</code><br>Actions (R = read, W = write): "
            f"<code>{result.actions[0]}</code></p>" + table_html(rows))


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Curves of the SPSD model's heads against wait-k, the AUROC table, and a probe-head transcript."""
    from brisklm.streaming.proactive.bench import curve_figure, proactive_figures

    with one_torch_thread():
        figures = proactive_figures(n_test=30 if ctx.quick else 150, n_dev=80 if ctx.quick else 200,
                                    n_thresholds=6 if ctx.quick else 10, curve_models=("spsd",), seed=ctx.seed,
                                    progress=ctx.progress)
        transcript = _transcript()
    auroc_rows = [{"model": f"{key} ({figures['models'][key]})", **values} for key, values in figures["auroc"].items()]
    area_rows = [{"curve": c, "area (mean BLEU over LAAL range)": a} for c, a in figures["area"].items()]
    intro = ("<p>ProactiveLLM (our clean-room design): training with random monotone visibility (random k plus "
             "random extra reads), optionally with SPSD (the same model's full-context view teaches its partial "
             "view); then plug-in heads decide READ/WRITE from the model's own state: predictive entropy, attention "
             "on the newest source word, or a probe trained on self-generated labels (partial-view prediction = "
             "full-view prediction). Data: noun phrases of 1-4 words reordered noun-first, so the needed lookahead "
             "varies and a fixed k is not optimal. AUROC: how well each signal predicts that the partial view "
             f"already gives the full-view word (lag = the wait-k signal). auc_gain = {figures['auc_gain']} BLEU "
             f"(best head {figures['best_head']} vs {figures['best_waitk']}, LAAL range "
             f"{figures['area_laal_range']}).</p>")
    fig = curve_figure(figures)
    methods = [MethodRow(f"ProactiveLLM {figures['best_head']} head", figures["models"]["spsd"],
                         f"{figures['auc_gain']:+.2f} BLEU over the LAAL range vs {figures['best_waitk']}", None,
                         "wait-k on the same model", "brisk bench proactive")]
    return [Section("Proactive streaming (decision heads)",
                    intro + figure_html(fig, ctx.out_dir, "proactive-bleu-laal") + "<h3>Sufficiency AUROC</h3>"
                    + table_html(auroc_rows) + "<h3>Curve areas</h3>" + table_html(area_rows)
                    + "<h3>A stream through the probe head (threshold 0.5)</h3>" + transcript, methods)]
