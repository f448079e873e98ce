"""The pruning section of the demo report: methods at 25% sparsity, SkipGPT routing by token difficulty."""

from __future__ import annotations

from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, new_figure, table_html
from brisklm.pruning.bench import BASE_MODEL, kv_policy_figures
from brisklm.pruning.study import run_study, study_data
from brisklm.zoo.store import load


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Run every method once on the mixed-difficulty zoo model (small settings in quick mode)."""
    loaded = load(BASE_MODEL, seed=0)
    model, tok = loaded.model, loaded.tokenizer
    q = ctx.quick
    data = study_data(tok, n_test=64 if q else 200, n_calib=32, n_train=800 if q else 2000, seed=ctx.seed)
    sk = {"router_steps": 100 if q else 300, "lora_steps": 40 if q else 200, "seed": ctx.seed}
    study = run_study(model, tok, data, (0.25,), {"skipgpt": sk}, progress=ctx.progress)
    rows = [{"method": "dense", "perplexity": study["dense"]["perplexity"], "accuracy": study["dense"].get("accuracy"),
             "realised sparsity": 0.0}]
    for name, r in study["methods"]["0.25"].items():
        rows.append({"method": name, "perplexity": r["perplexity"], "accuracy": r.get("accuracy"),
                     "accuracy kept": r.get("accuracy_kept"), "realised sparsity": r["realised_sparsity"]})
    by_diff = study["routing"]["0.25"]["skip_rate_by_token_difficulty"]
    diff_rows = [{"predicted word": k, "attention skip": v["attn"], "MLP skip": v["mlp"], "tokens": v["tokens"]}
                 for k, v in by_diff.items()]
    fig = new_figure(5, 3)
    ax = fig.add_subplot(1, 1, 1)
    kinds = list(by_diff)
    ax.bar([i - 0.2 for i in range(len(kinds))], [by_diff[k]["attn"] for k in kinds], 0.4, label="attention")
    ax.bar([i + 0.2 for i in range(len(kinds))], [by_diff[k]["mlp"] for k in kinds], 0.4, label="MLP")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("skip rate")
    ax.legend()
    kv = kv_policy_figures(model, study["routers"]["0.25"], data.test, tok.pad_token_id)
    kv_rows = [{"policy": p, "perplexity": r["perplexity"], "KV bytes": r["kv_bytes"], "saved": r["kv_bytes_saved"],
                "pointer bytes": r["pointer_bytes"]} for p, r in kv.items()]
    intro = (f"<p>All methods at a 25% target on <code>{BASE_MODEL}</code> (8 layers). Accuracy is next-word top-1 "
             "on predictable (easy + hard) words of held-out text. SkipGPT runs through the sparse executor with "
             "argmax routing.</p>")
    html = (intro + table_html(rows) + "<h3>SkipGPT skip rate by difficulty of the predicted word</h3>"
            + table_html(diff_rows) + figure_html(fig, ctx.out_dir, "pruning-skip-by-difficulty")
            + "<h3>KV policies for tokens that skip attention</h3>" + table_html(kv_rows))
    methods = [MethodRow(f"{name} (25% target)", BASE_MODEL,
                         f"accuracy {r['accuracy_kept']:.2f} of dense" if r.get("accuracy_kept") is not None
                         else f"perplexity {r['perplexity']:.2f} vs {study['dense']['perplexity']:.2f} dense",
                         None, "dense model", "brisk bench pruning")
               for name, r in study["methods"]["0.25"].items()]
    return [Section("Pruning and dynamic computation", html, methods)]
