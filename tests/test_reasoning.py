"""Reasoning area, fast tests: KL directions and gradient identities, the On-Policy SFT filter, the curriculum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from brisklm.errors import BriskError
from brisklm.reasoning.curriculum import EntropyGatedCurriculum
from brisklm.reasoning.distill import (
    KLSpec, distill_loss, parse_kl, reverse_kl_policy_gradient_surrogate, soft_target_cross_entropy, token_kl,
)
from brisklm.reasoning.opsft import keep_mask
from brisklm.reasoning.rollout import Rollout, RolloutBatch
from brisklm.tasks.base import Example
from brisklm.tasks.cot_arithmetic import is_correct


def tiny_model(seed: int, vocab: int = 11) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double()


def grads(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_kl_directions_on_three_tokens():
    p_t = torch.tensor([0.7, 0.2, 0.1], dtype=torch.double)
    p_s = torch.tensor([0.2, 0.5, 0.3], dtype=torch.double)
    fkl = float((p_t * (p_t / p_s).log()).sum())
    rkl = float((p_s * (p_s / p_t).log()).sum())
    s, t = p_s.log(), p_t.log()
    assert float(token_kl(s, t, beta=0.0)) == pytest.approx(fkl, abs=1e-12)
    assert float(token_kl(s, t, beta=1.0)) == pytest.approx(rkl, abs=1e-12)
    assert float(token_kl(s, t, beta=0.25)) == pytest.approx(0.25 * rkl + 0.75 * fkl, abs=1e-12)
    assert fkl != pytest.approx(rkl)  # the test distinguishes the directions
    # top-k = 2: both renormalised on the teacher's two most likely tokens {0, 1}
    pt2, ps2 = p_t[:2] / p_t[:2].sum(), p_s[:2] / p_s[:2].sum()
    assert float(token_kl(s, t, beta=0.0, top_k=2)) == pytest.approx(float((pt2 * (pt2 / ps2).log()).sum()), abs=1e-12)
    assert float(token_kl(s, t, beta=0.0, top_k=3)) == pytest.approx(fkl, abs=1e-12)


def _logits_pair(seed: int = 0):
    student, teacher = tiny_model(seed), tiny_model(seed + 1)
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    return student, ids, t_logits


def test_forward_kl_gradient_is_soft_target_cross_entropy_gradient():
    student, ids, t_logits = _logits_pair()
    g_kl = grads(student, token_kl(student(input_ids=ids).logits, t_logits, beta=0.0).mean())
    g_ce = grads(student, soft_target_cross_entropy(student(input_ids=ids).logits, t_logits).mean())
    assert g_kl.norm() > 1e-4
    torch.testing.assert_close(g_kl, g_ce, rtol=1e-9, atol=1e-12)
    # ... and the losses differ by the teacher entropy, a constant
    with torch.no_grad():
        s = student(input_ids=ids).logits
        h_t = -(F.softmax(t_logits, -1) * F.log_softmax(t_logits, -1)).sum(-1)
        torch.testing.assert_close(token_kl(s, t_logits, 0.0), soft_target_cross_entropy(s, t_logits) - h_t)


def test_reverse_kl_gradient_is_policy_gradient_with_log_ratio_reward():
    student, ids, t_logits = _logits_pair(3)
    g_kl = grads(student, token_kl(student(input_ids=ids).logits, t_logits, beta=1.0).mean())
    g_pg = grads(student, reverse_kl_policy_gradient_surrogate(student(input_ids=ids).logits, t_logits).mean())
    assert g_kl.norm() > 1e-4
    torch.testing.assert_close(g_kl, g_pg, rtol=1e-9, atol=1e-12)
    # Monte-Carlo form: sampled tokens v ~ pS with reward log pT(v) - log pS(v) (sampled-token OPD) agrees in mean.
    logits = student(input_ids=ids).logits
    log_s = F.log_softmax(logits, -1)
    log_t = F.log_softmax(t_logits, -1)
    n = 20000
    draws = torch.distributions.Categorical(logits=log_s.detach()).sample((n,))  # (n, B, T)
    counts = F.one_hot(draws, log_s.shape[-1]).double().mean(0)  # empirical pS, (B, T, V)
    reward = (log_t - log_s).detach()
    g_mc = grads(student, -(counts * reward * log_s).sum(-1).mean())
    cos = float(F.cosine_similarity(g_mc, g_kl, dim=0))
    assert cos > 0.99, cos


def test_reverse_and_forward_gradients_differ_and_mix_is_linear():
    student, ids, t_logits = _logits_pair(5)
    g_f = grads(student, token_kl(student(input_ids=ids).logits, t_logits, 0.0).mean())
    g_r = grads(student, token_kl(student(input_ids=ids).logits, t_logits, 1.0).mean())
    g_m = grads(student, token_kl(student(input_ids=ids).logits, t_logits, 0.3).mean())
    assert float(F.cosine_similarity(g_f, g_r, dim=0)) < 0.999
    torch.testing.assert_close(g_m, 0.3 * g_r + 0.7 * g_f)


def test_distill_loss_masks_prompt_positions_and_finite_difference():
    student, ids, t_logits = _logits_pair(7)
    labels = ids.clone()
    labels[:, :4] = -100
    spec = KLSpec(0.5)
    loss = distill_loss(student(input_ids=ids).logits, t_logits, labels, spec)
    manual = token_kl(student(input_ids=ids).logits[:, 3:-1], t_logits[:, 3:-1], 0.5).mean()
    torch.testing.assert_close(loss, manual)
    # finite-difference check of one weight: the autograd derivative is the true derivative of the loss
    w = student.lm_head.weight
    g = torch.autograd.grad(loss, w)[0][2, 3]
    eps = 1e-6
    with torch.no_grad():
        w[2, 3] += eps
        up = distill_loss(student(input_ids=ids).logits, t_logits, labels, spec)
        w[2, 3] -= 2 * eps
        down = distill_loss(student(input_ids=ids).logits, t_logits, labels, spec)
    assert float(g) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5, abs=1e-9)


def test_parse_kl_and_bad_input():
    assert parse_kl("forward").beta == 0.0 and parse_kl("reverse").beta == 1.0
    assert parse_kl("mix:0.25").beta == 0.25 and parse_kl("mix:0.25").name == "mix:0.25"
    for bad in ("mix:2", "mix:x", "sideways"):
        with pytest.raises(BriskError, match="--kl"):
            parse_kl(bad)
    with pytest.raises(BriskError, match="top_k"):
        token_kl(torch.zeros(3), torch.zeros(3), top_k=5)
    with pytest.raises(BriskError, match="same tokenizer"):
        token_kl(torch.zeros(3), torch.zeros(4))


def _example(answer: str) -> Example:
    return Example(prompt="Q: x =", completion="", answer=answer)


def test_filter_keeps_exactly_correct_and_finished_within_budget():
    eos = 3
    # (prompt, completion words, finished): completion length counts <eos>
    cases = [
        (0, "1 + 2 = 3 ; answer 3", True, True),     # correct, 8 tokens incl. eos <= 10 -> kept
        (0, "1 + 2 = 4 ; answer 4", True, False),    # wrong answer
        (0, "1 + 2 = 3 ; answer 3", False, False),   # correct text but truncated (no eos)
        (1, "answer 7", True, True),                 # correct, short
        (1, "so the total is 7 ; so the total is 7 ; answer 7", True, False),  # correct but longer than budget
        (1, "so the total is", True, False),         # no answer
        (1, "answer", True, False),                  # marker without a value
    ]
    rollouts = [Rollout(p, [5], list(range(len(t.split()))), t, fin) for p, t, fin, _ in cases]
    batch = RolloutBatch(rollouts, eos)
    refs = [_example("3"), _example("7")]
    keep = keep_mask(batch, refs, is_correct, budget=10)
    assert keep == [c[3] for c in cases]
    feats = batch.features(keep)
    assert len(feats) == 2 and feats[0]["input_ids"][-1] == eos and feats[0]["labels"][0] == -100
    shortest = keep_mask(batch, refs, is_correct, budget=100, rule="shortest")
    assert shortest == [True, False, False, True, False, False, False]
    with pytest.raises(BriskError, match="keep rule"):
        keep_mask(batch, refs, is_correct, 10, rule="best")


def test_entropy_gated_curriculum():
    cur = EntropyGatedCurriculum(stages=(8, 16, 32), gate=0.1, tolerance=0.01, patience=2, ema=1.0)
    assert cur(0, float("nan")) == 8
    # entropy below the gate: the cap is held, however stable, and forward KL gets boosted
    assert [cur.update(0.05) for _ in range(5)] == [8] * 5 and cur.fkl_boost
    # above the gate but moving: held
    assert [cur.update(h) for h in (0.3, 0.5, 0.7)] == [8, 8, 8]
    # above the gate and stable for 2 rounds: one stage up, then the stability count restarts
    assert [cur.update(h) for h in (0.7, 0.7, 0.7, 0.7, 0.7)] == [8, 16, 16, 32, 32]
    assert not cur.fkl_boost and cur.update(float("nan")) == 32
    with pytest.raises(BriskError, match="increasing"):
        EntropyGatedCurriculum(stages=(16, 8))


def _word_model(seed: int):
    from brisklm.tasks.cot_arithmetic import CotArithmeticTask
    from brisklm.tasks.tokenizer import build_word_tokenizer
    from brisklm.zoo.architecture import new_model, tiny_llama_config

    task = CotArithmeticTask()
    tok = build_word_tokenizer(task.vocabulary())
    cfg = tiny_llama_config(len(tok), "tiny", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    return task, tok, new_model(cfg, seed)


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_on_policy_sft_updates_only_on_kept_samples():
    from brisklm.reasoning.opsft import OPSFTConfig, on_policy_sft

    task, tok, model = _word_model(0)
    examples = task.examples("train", 8)
    config = OPSFTConfig(budget=6, samples=2, prompts_per_round=3, rounds=2, learning_rate=1e-2)
    before = _params(model)
    logs = on_policy_sft(model, tok, examples, lambda text, ex: False, config)
    assert [r["kept"] for r in logs] == [0, 0] and torch.equal(before, _params(model))  # nothing kept: no update
    logs = on_policy_sft(model, tok, examples, lambda text, ex: True, config)
    assert all(r["sampled"] == 6 and r["mean_length"] <= 6 for r in logs)
    # an untrained model rarely emits <eos> within 6 tokens; whenever something was kept, the weights moved
    assert (sum(r["kept"] for r in logs) > 0) == (not torch.equal(before, _params(model)))
    with pytest.raises(BriskError, match="budget"):
        on_policy_sft(model, tok, examples, is_correct, OPSFTConfig(budget=1))


def test_distill_rounds_move_student_towards_teacher():
    from brisklm.reasoning.distill import DistillConfig, distill
    from brisklm.reasoning.rollout import sample_rollouts

    task, tok, teacher = _word_model(1)
    _, _, student = _word_model(2)
    prompts = [e.prompt for e in task.examples("train", 8)]
    probe = sample_rollouts(teacher, tok, prompts, 2, 8, seed=5).features()
    from brisklm.zoo.textlm import PadCollator

    b = PadCollator(tok.pad_token_id)(probe)

    def gap() -> float:
        with torch.no_grad():
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return float(distill_loss(s, t, b["labels"], KLSpec(0.0)))

    start = gap()
    logs = distill(teacher, student, tok, prompts, DistillConfig(prefix="teacher", kl=KLSpec(0.0), rounds=8,
                                                                  prompts_per_round=4, max_new_tokens=8,
                                                                  learning_rate=1e-2))
    assert len(logs) == 8 and all(math.isfinite(r["loss"]) for r in logs)
    assert gap() < 0.8 * start, (start, gap())
    with pytest.raises(BriskError, match="prefix"):
        distill(teacher, student, tok, prompts, DistillConfig(prefix="dataset"))


@pytest.mark.parametrize("argv, message", [
    (["reason", "opsft", "--budget", "1"], "--budget"),
    (["reason", "opsft", "--keep", "longest"], "keep rule"),
    (["reason", "distill", "--kl", "mix:1.5"], "--kl"),
    (["reason", "distill", "--prefix", "dataset"], "--prefix"),
    (["reason", "distill", "--curriculum", "length"], "--curriculum"),
    (["reason", "opsft", "--model", "./no/such/folder"], "does not exist"),
])
def test_cli_rejects_bad_input_with_one_line(argv, message, capsys):
    from brisklm.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_reasoning_zoo_recipes_define_arith_cot():
    from brisklm.reasoning.zoo import TASK_OPTIONS
    from brisklm.zoo.registry import recipes

    known = recipes()
    teacher, student = known["arith-cot"].options, known["arith-cot-student"].options
    assert teacher["task_options"] == student["task_options"] == TASK_OPTIONS
    assert TASK_OPTIONS["recheck"] == "end"  # the layout the teacher learns (README: why)
    assert student["shape"]["hidden_size"] < 128 and student["shape"]["num_hidden_layers"] < 4  # smaller than tiny
    assert student["train"]["steps"] < teacher["train"]["steps"]  # part-trained


def test_cot_recheck_at_end_layout():
    from brisklm.tasks.cot_arithmetic import REDUNDANT_LINES, CotArithmeticTask, parse_answer

    task = CotArithmeticTask(min_terms=3, max_terms=4, modulus=5, recheck="end")
    saw_recheck = False
    for e in task.examples("train", 60):
        minimal, verbose = e.meta["minimal_cot"], e.meta["verbose_cot"]
        steps = minimal.rsplit(" answer ", 1)[0]
        assert verbose.startswith(steps + " ") and verbose.endswith(f"answer {e.answer}")  # steps first, unbroken
        tail = verbose[len(steps):].rsplit(" answer ", 1)[0].split(";")
        final = e.meta["steps"][-1].split()  # a op b = c
        a, op, b, _, c = final
        allowed = {template.format(a=a, op=op, b=b, c=c) for template in REDUNDANT_LINES}
        for line in filter(str.strip, tail):  # every re-check is about the final step
            saw_recheck = True
            assert line.strip() in allowed, line
        assert parse_answer(verbose) == e.answer == final[-1]
    assert saw_recheck
    with pytest.raises(BriskError, match="recheck"):
        CotArithmeticTask(recheck="middle")
