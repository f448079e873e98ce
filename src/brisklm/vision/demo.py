"""The vision section of the demo report: visual-token pruning (VisiPruner vs FastV/PyramidDrop) and ViCA."""

from __future__ import annotations

from brisklm.eval.report import DemoContext, MethodRow, Section, figure_html, new_figure, table_html


def demo_sections(ctx: DemoContext) -> list[Section]:
    """Accuracy and FLOPs of each method on ShapesVQA test questions, the layer profile, and ViCA."""
    from brisklm.tasks import get_task
    from brisklm.vision.prune import PruneSpec
    from brisklm.vision.study import evaluate_method, layer_profile
    from brisklm.vision.vica import vica_layers_of, visual_compute_fraction
    from brisklm.vision.vlm import load_vlm
    from brisklm.vision.zoo import TASK_OPTIONS, vica_accuracy

    loaded, vica = load_vlm("shapes-llava"), load_vlm("shapes-vica")
    examples = get_task("shapes_vqa", **TASK_OPTIONS).examples("test", 128 if ctx.quick else 400, seed=ctx.seed)
    specs = {"dense": PruneSpec("dense"), "VisiPruner": PruneSpec("visipruner"),
             "FastV keep 4": PruneSpec("fastv", keep=4), "PyramidDrop keep 8/4/2": PruneSpec("pdrop", keep=8),
             "random keep 4": PruneSpec("random", keep=4)}
    rows, dense_acc = [], None
    for name, spec in ctx.progress(list(specs.items()), desc="vision methods"):
        r = evaluate_method(loaded, examples, spec)
        dense_acc = r["accuracy"] if dense_acc is None else dense_acc
        rows.append({"method": name, "accuracy": r["accuracy"], "accuracy kept": r["accuracy"] / dense_acc,
                     "visual tokens (T_eq)": r["equivalent_tokens"], "LM FLOPs ratio": r["flops_ratio"]})
    layers = vica_layers_of(vica.model)
    v = vica_accuracy(vica.model, vica.processor, examples, layers)
    rows.append({"method": f"ViCA (layers {list(layers)})", "accuracy": v["accuracy"],
                 "accuracy kept": v["accuracy"] / dense_acc,
                 "visual tokens (T_eq)": f"K/V only, {visual_compute_fraction(vica.model, layers):.1%} visual compute"})
    profile = layer_profile(loaded, examples[:64])
    fig = new_figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(profile["cos_drop"])))
    ax.plot(x, profile["cos_drop"], marker="o", label="max_j 1-cos(o-c_j,o)")
    ax.plot(x, profile["visual_mass"], marker="s", label="attention mass on image tokens")
    ax.set_xlabel("layer")
    ax.legend()
    methods = [MethodRow(row["method"], "shapes-vica" if row["method"].startswith("ViCA") else "shapes-llava",
                         f"accuracy {row['accuracy kept']:.2f} of dense", None, "dense LLaVA", "brisk bench vision")
               for row in rows if row["method"] != "dense"]
    intro = ("<p>A tiny LLaVA trained from scratch on ShapesVQA (16 image tokens). VisiPruner hides the image from "
             "text in shallow layers (except a sink token), finds the fusion layer by the removal-cosine criterion, "
             "keeps only the visual tokens whose contribution to the last token's attention output is large "
             "relative to it, and drops them all in the deep stage. ViCA lets text read the frozen projector "
             "outputs only at a few selected layers.</p>")
    return [Section("Vision: VisiPruner, FastV, PyramidDrop, ViCA",
                    intro + table_html(rows) + figure_html(fig, ctx.out_dir, "vision-layer-profile"), methods)]
