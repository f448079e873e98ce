"""brisklm.analysis: logit lens, Peak Inverse Rank (residual and attn_contrib) and the ICL coordinate system."""

from brisklm.analysis.icl import (
    QUADRANTS,
    ConditionResult,
    IclExperiment,
    encode_icl,
    evaluate_condition,
    pir_for_task,
    plot_experiment,
    run_icl_experiment,
)
from brisklm.analysis.lens import encode_prompts, logit_lens, lens_top_tokens, pad_right, token_rank
from brisklm.analysis.pir import MODES, PirResult, peak_inverse_rank

__all__ = [
    "MODES", "QUADRANTS", "ConditionResult", "IclExperiment", "PirResult", "encode_icl", "encode_prompts",
    "evaluate_condition", "lens_top_tokens", "logit_lens", "pad_right", "peak_inverse_rank", "pir_for_task",
    "plot_experiment", "run_icl_experiment", "token_rank",
]
