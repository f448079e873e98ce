"""`brisk reason opsft|distill|latent`: On-Policy SFT, decoupled distillation and latent CoT, on the built-in CoT
arithmetic or on a user JSONL (`--data`, `--eval-data`) checked by a named `--verifier`, framed by the
checkpoint's chat template (`--system`)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import TextLayer, add_text_args, text_options
from brisklm.errors import BriskError
from tqdm.auto import tqdm

from brisklm.reasoning.curriculum import EntropyGatedCurriculum
from brisklm.reasoning.data import load_jsonl, load_rollouts
from brisklm.reasoning.distill import DistillConfig, check_shared_tokenizer, distill, parse_kl
from brisklm.reasoning.evaluate import evaluate_rollouts
from brisklm.reasoning.latent import LatentConfig, evaluate_explicit, evaluate_latent, train_explicit, train_latent
from brisklm.reasoning.opsft import OPSFTConfig, on_policy_sft, sft_on_rollouts
from brisklm.reasoning.verifiers import make_verifier
from brisklm.reasoning.zoo import TASK_OPTIONS
from brisklm.tasks.cot_arithmetic import CotArithmeticTask, is_correct
from brisklm.zoo.store import load, load_tokenizer, resolve


SAMPLING = ("pure", "model")

# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"reason opsft": causal_lm_only, "reason distill": causal_lm_only, "reason latent": causal_lm_only}


def _task_data(n_train: int, n_eval: int, seed: int):
    task = CotArithmeticTask(**TASK_OPTIONS)
    return task.examples("train", n_train, seed=seed), task.examples("test", n_eval, seed=seed)


def _data(args: argparse.Namespace, n_train: int, n_eval: int, need_steps: bool = False):
    """(train, eval, verifier): `--data` / `--eval-data` JSONL with `--verifier` (default numeric), else the
    built-in cot_arithmetic task with its own answer check (or `--verifier` when given)."""
    user = args.data or getattr(args, "rollouts", None)
    verifier = make_verifier(args.verifier) if args.verifier else (make_verifier("numeric") if user else is_correct)
    if args.data:
        train = load_jsonl(args.data, verifier, need_steps)[:n_train]
    else:
        train = _task_data(n_train, 1, args.seed)[0]
    if args.eval_data:
        test = load_jsonl(args.eval_data, verifier, need_steps)[:n_eval]
    elif args.data:
        test = train[:n_eval]
        print(f"no --eval-data: measuring on the first {len(test)} training examples", flush=True)
    else:
        test = _task_data(1, n_eval, args.seed)[1]
    return train, test, verifier


def _text(loaded, args: argparse.Namespace) -> TextLayer:
    """The checkpoint's text layer: its chat template (unless --no-chat-template) with --system / --system-prompt."""
    return TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))


def _sampling(loaded, args: argparse.Namespace):
    """--sampling model: the checkpoint's own GenerationConfig sampling settings; pure: plain sampling at T."""
    if args.sampling not in SAMPLING:
        raise BriskError(f"unknown --sampling {args.sampling!r}: use pure (temperature only) or model "
                         "(the checkpoint's generation_config: top_k, top_p, temperature)")
    if args.sampling == "pure" or loaded is None:
        return None
    config = copy.deepcopy(loaded.model.generation_config)
    config.do_sample = True
    return config


def _report(title: str, metrics: dict) -> None:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    print(f"{title}: {json.dumps(shown)}", flush=True)


def _save(model, tokenizer, out: str | None) -> None:
    if out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"saved to {out}")


def cmd_opsft(args: argparse.Namespace) -> int:
    config = OPSFTConfig(budget=args.budget, samples=args.samples, rounds=args.rounds, prompts_per_round=args.prompts,
                         temperature=args.temperature, learning_rate=args.lr, keep=args.keep, seed=args.seed)
    config.check()
    _sampling(None, args)  # bad data and options fail before any loading
    train, test, verifier = _data(args, 2000 if not args.data else 10**9, args.eval)
    rollouts = load_rollouts(args.rollouts, verifier) if args.rollouts else None
    loaded = load(args.model, **device_kwargs(args))
    text = _text(loaded, args)
    config.generation_config = _sampling(loaded, args)
    budgets = sorted({max(2, args.budget // 2), args.budget, args.max_new_tokens})
    evaluate = lambda: evaluate_rollouts(loaded.model, text, test, verifier, 1, args.max_new_tokens,
                                         args.temperature, budgets, seed=args.seed,
                                         generation_config=config.generation_config)
    _report("before", evaluate())
    bar = tqdm(total=config.rounds, desc="on-policy SFT", leave=False, dynamic_ncols=True)

    def on_round(r: int, rec: dict) -> None:
        bar.update(1)
        bar.set_postfix(kept=f"{rec['kept']}/{rec['sampled']}", length=f"{rec['mean_length']:.1f}")

    if rollouts is not None:
        sft_on_rollouts(loaded.model, text, rollouts, verifier, config, on_round=on_round)
    else:
        on_policy_sft(loaded.model, text, train, verifier, config, on_round=on_round)
    bar.close()
    _report("after", evaluate())
    _save(loaded.model, loaded.tokenizer, args.out)
    return 0


def curriculum_stages(max_new_tokens: int) -> tuple[int, ...]:
    """Caps of the entropy-gated curriculum: 32 -> 64 -> max, or quarter -> half -> max for short caps."""
    stages = (32, 64, max_new_tokens) if max_new_tokens > 64 else (max_new_tokens // 4, max_new_tokens // 2, max_new_tokens)
    return tuple(sorted({s for s in stages if s >= 1}))


def cmd_distill(args: argparse.Namespace) -> int:
    spec = parse_kl(args.kl, args.top_k)
    config = DistillConfig(prefix=args.prefix, kl=spec, rounds=args.rounds, prompts_per_round=args.prompts,
                           samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                           learning_rate=args.lr, seed=args.seed)
    config.check()
    if args.curriculum not in (None, "entropy"):
        raise BriskError(f"unknown --curriculum {args.curriculum!r}: the only curriculum is 'entropy'")
    _sampling(None, args)  # bad data and options fail before any loading
    train, test, verifier = _data(args, 2000 if not args.data else 10**9, args.eval)
    check_shared_tokenizer(load_tokenizer(resolve(args.teacher)), load_tokenizer(resolve(args.student)))
    teacher, student = load(args.teacher, **device_kwargs(args)), load(args.student, **device_kwargs(args))
    text = _text(student, args)
    config.generation_config = _sampling(student, args)
    schedule = EntropyGatedCurriculum(stages=curriculum_stages(args.max_new_tokens)) if args.curriculum else None
    evaluate = lambda: evaluate_rollouts(student.model, text, test, verifier, 4, args.max_new_tokens,
                                         1.0, k=4, seed=args.seed, with_entropy=True,
                                         generation_config=config.generation_config)
    _report("student before", evaluate())
    bar = tqdm(total=config.rounds, desc=f"distill {config.prefix}-prefix {spec.name}", leave=False, dynamic_ncols=True)

    def on_round(r: int, rec: dict) -> None:
        bar.update(1)
        bar.set_postfix(length=f"{rec['mean_length']:.1f}", entropy=f"{rec['student_entropy']:.3f}")

    distill(teacher.model, student.model, text, [e.prompt for e in train], config,
            length_schedule=schedule, on_round=on_round)
    bar.close()
    _report("student after", evaluate())
    _save(student.model, student.tokenizer, args.out)
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    from brisklm.reasoning.bench import LATENT_SETTINGS

    steps, lr = LATENT_SETTINGS["full"].get(args.method, (100, 2e-3))  # the benchmark's per-method defaults
    config = LatentConfig(method=args.method, stages=args.stages, steps_per_stage=args.steps_per_stage or steps,
                          batch_size=args.batch_size, learning_rate=args.lr or lr, pauses=args.pauses,
                          thoughts=args.thoughts,
                          remove_per_stage=args.remove_per_stage, smoothing=args.smoothing, seed=args.seed)
    config.check()
    if args.stage0_steps < 0 or args.train < 1 or args.eval < 1:
        raise BriskError("--stage0-steps must be >= 0 and --train, --eval >= 1")
    train, test, verifier = _data(args, args.train, args.eval, need_steps=True)  # bad data fails before loading
    loaded = load(args.model, **device_kwargs(args))
    model, tok = loaded.model, loaded.tokenizer
    text = _text(loaded, args)
    if args.stage0_steps:
        _report("explicit CoT before stage 0", evaluate_explicit(model, text, test, verifier))
        train_explicit(model, text, train, args.stage0_steps, args.batch_size, args.lr or 1e-3, args.seed)
    _report("explicit minimal CoT (stage 0)", evaluate_explicit(model, text, test, verifier))
    bar = tqdm(total=len(config.stage_list()), desc=f"latent {config.method}", leave=False, dynamic_ncols=True)

    def on_stage(stage: int, record: dict) -> None:
        bar.update(1)
        _report(f"{config.method} stage {stage}", {**evaluate_latent(model, text, test, verifier, config, stage),
                                                   "train_loss": record["loss"]})

    train_latent(model, text, train, config, on_stage=on_stage)
    bar.close()
    if args.out:
        _save(model, tok, args.out)
        (Path(args.out) / "latent.json").write_text(json.dumps(vars(config), indent=1))
    return 0


def _data_args(p: argparse.ArgumentParser, steps: bool = False) -> None:
    """--data / --eval-data / --verifier, --system (and --system-prompt, --no-chat-template)."""
    fields = "'question' (or 'prompt'), 'answer'" + (", 'steps' (a list: the explicit chain of thought)" if steps
                                                    else " (optional 'steps')")
    p.add_argument("--data", help=f"training JSONL, one object per line: {fields} (default: built-in cot_arithmetic)")
    p.add_argument("--eval-data", help="evaluation JSONL in the same format (default: the first --eval of --data)")
    p.add_argument("--verifier", default=None,
                   help="numeric (last number or '#### n'), boxed (\\boxed{...}), exact, regex:PATTERN or "
                        "python:module:function (default: numeric with --data, the task's own check without)")
    add_text_args(p)
    p.add_argument("--system", dest="system_prompt", help="same as --system-prompt")


def _sampling_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampling", default="pure",
                   help="pure: sample at --temperature with no top-k/top-p (default); model: the checkpoint's own "
                        "generation_config (temperature, top_k, top_p)")


def add_commands(subparsers) -> None:
    reason = subparsers.add_parser("reason", help="efficient reasoning training: On-Policy SFT, distillation, latent CoT")
    sub = reason.add_subparsers(dest="reason_command", metavar="ACTION", required=True)
    p = sub.add_parser("opsft", help="On-Policy SFT: keep correct samples finished within --budget, train NLL")
    p.add_argument("--model", default="arith-cot", help="zoo name or checkpoint folder (default arith-cot)")
    p.add_argument("--budget", type=int, default=45, help="token budget L (completions longer are dropped)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt n")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts per round")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--keep", default="all_correct", help="all_correct (paper) or shortest")
    p.add_argument("--eval", type=int, default=128, help="test prompts for the before/after metrics")
    p.add_argument("--max-new-tokens", type=int, default=120, help="evaluation cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder to save the trained model")
    _data_args(p)
    p.add_argument("--rollouts", help="train on rollouts generated elsewhere (e.g. vLLM) instead of sampling: JSONL "
                                      "with 'question' (or 'prompt'), 'answer', 'completion' and optional 'finished'; "
                                      "each round filters the next --prompts x --samples lines")
    _sampling_arg(p)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_opsft)
    p = sub.add_parser("distill", help="token-level KL distillation with a chosen prefix source and KL direction")
    p.add_argument("--teacher", default="arith-cot")
    p.add_argument("--student", default="arith-cot-student")
    p.add_argument("--prefix", default="student", help="teacher | student: who generates the trained-on prefixes")
    p.add_argument("--kl", default="reverse", help="forward | reverse | mix:BETA (BETA = reverse-KL weight)")
    p.add_argument("--top-k", type=int, default=None, help="restrict the KL to the teacher's top-k tokens")
    p.add_argument("--curriculum", default=None, help="entropy: entropy-gated length curriculum")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder to save the trained student")
    _data_args(p)
    _sampling_arg(p)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("latent", help="latent CoT: pause tokens, Coconut continuous thoughts, stepwise internalization")
    p.add_argument("--method", default="coconut", help="pause | coconut | internalize")
    p.add_argument("--model", default="arith-cot", help="zoo name or checkpoint folder (default arith-cot)")
    p.add_argument("--stage0-steps", type=int, default=150,
                   help="explicit minimal-CoT fine-tuning steps before the latent stages (0: the model already is)")
    p.add_argument("--stages", type=int, default=3, help="curriculum stages (steps replaced / removal stages)")
    p.add_argument("--steps-per-stage", type=int, default=None,
                   help="Trainer steps per stage, fresh AdamW each (default: coconut 100, pause/internalize 250)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: coconut 2e-3, others 1e-3)")
    p.add_argument("--pauses", type=int, default=6, help="pause: <pause> tokens after the prompt (M)")
    p.add_argument("--thoughts", type=int, default=1, help="coconut: continuous thoughts per replaced step (c)")
    p.add_argument("--remove-per-stage", type=int, default=6, help="internalize: CoT tokens removed per stage")
    p.add_argument("--smoothing", type=float, default=None, help="internalize: removal smoothing lambda (off)")
    p.add_argument("--train", type=int, default=4000, help="training examples")
    p.add_argument("--eval", type=int, default=200, help="test prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder to save the trained model (and latent.json with its settings)")
    _data_args(p, steps=True)
    add_device_args(p, training=True)
    p.set_defaults(func=cmd_latent)
