"""The reasoning section of the demo report: On-Policy SFT shortening a verbose chain of thought."""

from __future__ import annotations

import html

from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, table_html


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Run a short On-Policy SFT on arith-cot; show accuracy/length before and after, budgets, and one completion."""
    from brisklm.reasoning.bench import accuracy_length_figure, opsft_study

    study = opsft_study(True, ctx.seed, rounds=10 if ctx.quick else 30, progress=ctx.progress)
    rows = []
    for mode in ("sampled_T1", "greedy"):
        for when in ("before", "after"):
            m = study[mode][when]
            rows.append({"decoding": mode, "model": when, "accuracy": m["accuracy"], "mean length": m["mean_length"],
                         **{f"acc@{b}": v for b, v in m["accuracy_at_budget"].items()}})
    ex = study["example"]
    intro = (f"<p>On-Policy SFT: each round samples 8 completions for 16 prompts at T=1, keeps exactly those that are "
             f"correct and end within L={study['budget_L']} tokens, and takes one NLL step on them "
             f"({study['rounds']} rounds, {study['train_seconds']:.0f} s). No reward model, no reference model.</p>")
    sample = (f"<p>Prompt <code>{html.escape(ex['prompt'])}</code><br>verbose training target: "
              f"<code>{html.escape(ex['reference_verbose'])}</code><br>after On-Policy SFT (greedy): "
              f"<code>{html.escape(ex['after'])}</code></p>")
    fig = accuracy_length_figure(study)
    before, after = study["greedy"]["before"], study["greedy"]["after"]
    kept = after["accuracy"] / before["accuracy"] if before["accuracy"] else float("nan")
    methods = [MethodRow("On-Policy SFT", "arith-cot",
                         f"accuracy {after['accuracy']:.2f} vs {before['accuracy']:.2f} before ({kept:.2f} kept)",
                         before["mean_length"] / after["mean_length"] if after["mean_length"] else None,
                         "the model before On-Policy SFT (ratio of mean greedy completion lengths, in tokens)")]
    return [Section("Efficient reasoning (On-Policy SFT)",
                    intro + figure_html(fig, ctx.out_dir, "reasoning-accuracy-length") + table_html(rows) + sample,
                    methods)]
