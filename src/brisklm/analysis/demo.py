"""The analysis section of the demo report: the ICL coordinate system and PIR on the icl-lm zoo model."""

from __future__ import annotations

from brisklm.eval.report import DemoContext, Section, figure_html, table_html


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Quadrant table, shot sweep and PIR-per-layer plot (small n when ctx.quick)."""
    import torch

    from brisklm.analysis.icl import plot_experiment, run_icl_experiment
    from brisklm.analysis.lens import lens_top_tokens
    from brisklm.zoo.store import load

    loaded = load("icl-lm", seed=ctx.seed)
    n = 48 if ctx.quick else 128
    with torch.no_grad():
        exp = run_icl_experiment(loaded.model, loaded.tokenizer, n=n, seed=ctx.seed,
                                 shot_counts=(1, 4, 8) if ctx.quick else (1, 2, 4, 8), progress=ctx.progress)
    prompt = "truly great -> positive ; so apple -> fruit ; very sad ->"
    lens = lens_top_tokens(loaded.model, loaded.tokenizer, prompt, k=3)
    lens_rows = [{"layer": "embeddings" if i == 0 else f"block {i}",
                  "top tokens at the last position": ", ".join(f"{w} ({p:.2f})" for w, p in top)}
                 for i, top in enumerate(lens)]
    intro = (
        "<p>The in-context-learning coordinate system (Zhao et al., EMNLP 2024) on the <code>icl-lm</code> zoo model: "
        "Q1 task recognised + similar demonstration, Q2 recognised only, Q3 neither, Q4 similar only. "
        "Recognisable tasks use meaningful labels the model met in pretraining statements; arbitrary tasks use "
        f"foo/bar-style labels with a rule never seen in pretraining. {n} prompts per condition, 4 shots. "
        "PIR is the peak over layers of 1/(rank+1) of the task word: <i>residual</i> decodes the label token's "
        "residual stream with the logit lens (the paper's text), <i>attn_contrib</i> decodes what the label token "
        "writes into the last position through attention (the public code).</p>"
    )
    html = intro + table_html(exp.quadrant_rows())
    html += "<h3>Shot count (no similar demonstration)</h3>" + table_html(exp.shot_rows())
    html += figure_html(plot_experiment(exp), ctx.out_dir, "analysis-icl-coordinates",
                        alt="PIR per layer and accuracy per quadrant")
    html += f"<h3>Logit lens on <code>{prompt}</code></h3>" + table_html(lens_rows)
    return [Section("Analysis: ICL coordinate system and Peak Inverse Rank", html)]
