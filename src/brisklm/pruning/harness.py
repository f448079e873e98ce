"""lm-eval-harness interop: `brisk` as an lm-eval model for dense, pruned and SkipGPT checkpoints (really skipping).

Needs the optional extra `brisklm[eval]` (lm-eval). Importing this module registers the model name `brisk` with
lm-eval. lm-eval has no plugin hook for model names, so run its command line through this module, which registers
`brisk` first and then hands every argument to lm-eval unchanged:

    python -m brisklm.pruning.harness --model brisk --model_args pretrained=PATH[,skipgpt=1,kv_policy=reuse] \\
        --tasks hellaswag --device cpu

or, from Python, `import brisklm.pruning.harness` and then `lm_eval.simple_evaluate(model="brisk", ...)`.
Text becomes ids through the text layer (bos only where the tokenizer has one); scoring and generation run the
model's own forward (dense) or the sparse executor and the one generation loop (skipgpt=1).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from brisklm.errors import BriskError

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own lazy model names first: registering ours must not hide them)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as error:  # pragma: no cover - exercised only without the extra
    raise BriskError("lm-eval is not installed; install the optional extra: pip install 'brisklm[eval]'") from error


def _flag(value: Any) -> bool:
    """A model_args flag (1/0, true/false, yes/no) as a bool."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("brisk")
class BriskLM(LM):
    """A brisklm checkpoint (zoo name or folder) as an lm-eval LM; `skipgpt=1` routes through its SkipGPT routers."""

    def __init__(self, pretrained: str, skipgpt: Any = False, kv_policy: str = "full", device: str | None = "auto",
                 dtype: str = "auto", max_length: int | None = None, max_gen_toks: int = 256, **_: Any) -> None:
        super().__init__()
        from brisklm.core.text import TextLayer
        from brisklm.pruning.skipmodel import load_skipgpt
        from brisklm.zoo.store import load

        device = device or "auto"
        self.skip = None
        if _flag(skipgpt):
            self.skip = load_skipgpt(pretrained, device=device, dtype=dtype, kv_policy=kv_policy)
            self.model, self.tokenizer = self.skip.model, self.skip.tokenizer
        else:
            loaded = load(str(pretrained), device=device, dtype=dtype)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.text = TextLayer.for_model(self.model, self.tokenizer, chat_template=False)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or limit)
        self.max_gen_toks = int(max_gen_toks)

    # ---- helpers -------------------------------------------------------------------------------------------
    @property
    def prefix(self) -> list[int]:
        """What every sequence starts with: bos where the tokenizer has one, else nothing."""
        bos = self.text.roles.bos_id
        return [] if bos is None else [bos]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids that concatenate to the encoding of the joined text (as lm-eval's HF LM)."""
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        whole = self.text.encode(context + continuation)
        ctx = self.text.encode(context) if context else []
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _logits(self, ids: list[int]) -> torch.Tensor:
        """(T, V) float32 logits of one sequence (routed through the sparse executor for SkipGPT)."""
        x = torch.tensor([ids], device=self.model.device)
        out = self.skip(x) if self.skip is not None else self.model(input_ids=x)
        return out.logits[0].float()

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log-probabilities of `continuation` after `context`, and whether greedy decoding gives it.

        Sequences longer than max_length keep their last max_length + 1 tokens (the context is cut from the left)."""
        if not continuation:
            return 0.0, True
        ids = (context + continuation)[-(self.max_length + 1):]
        n = min(len(continuation), len(ids) - 1)  # continuation tokens with a token before them
        rows = self._logits(ids[:-1])[-n:]  # row t predicts ids[t + 1]
        target = torch.tensor(ids[-n:], device=rows.device)
        total = float(torch.log_softmax(rows, dim=-1).gather(1, target[:, None]).sum())
        return total, bool((rows.argmax(-1) == target).all())

    # ---- the LM interface ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self._encode_pair(context, continuation)
            start = self.prefix if ctx or self.prefix else [self.text.roles.eos_id]
            out.append(self._score(start + ctx, cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        prefix = self.prefix[0] if self.prefix else self.text.roles.eos_id
        for request in requests:
            (text,) = request.args
            total = 0.0
            for window in get_rolling_token_windows(self.text.encode(text), prefix, self.max_length, 1):
                ctx, cont = make_disjoint_window(window)
                total += self._score(ctx, cont)[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from brisklm.core.generate import generate

        out = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(options.pop("max_gen_toks", self.max_gen_toks))
            ids = (self.prefix + self.text.encode(context))[-(self.max_length - new):]
            x = torch.tensor([ids], device=self.model.device)
            kwargs = {"max_new_tokens": new, "eos_token_id": list(self.text.roles.eos_ids),
                      "pad_token_id": self.text.roles.pad_id, "do_sample": bool(options.get("do_sample", False))}
            if kwargs["do_sample"] and options.get("temperature") is not None:
                kwargs["temperature"] = float(options["temperature"])
            seq = self.skip.generate(x, **kwargs) if self.skip is not None else generate(self.model, x, **kwargs)
            tokens, _ = self.text.cut_at_eos(seq[0, len(ids):].tolist())
            completion = self.text.decode(tokens)
            for stop in until:
                if stop and stop in completion:
                    completion = completion[:completion.index(stop)]
            out.append(completion)
        return out


def _option_values(argv: list[str], name: str) -> list[str]:
    """Values given to `--name` (space- or comma-separated, `--name=v` too) in an lm-eval command line."""
    values: list[str] = []
    for k, arg in enumerate(argv):
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == name:
            for value in argv[k + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
    return [v for value in values for v in value.split(",") if v]


def check_task_files(include_paths: list[str], tasks: list[str]) -> None:
    """A one-line error when a requested task's YAML (under include_paths) names a data file that does not exist."""
    from pathlib import Path

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's !function tags
    for root in include_paths:
        for spec in sorted(Path(root).expanduser().rglob("*.yaml")):
            try:
                config = yaml.load(spec.read_text(encoding="utf-8"), Loader=_Loader)
            except yaml.YAMLError:
                continue  # lm-eval reports unreadable YAML itself
            if not isinstance(config, dict) or config.get("task") not in tasks:
                continue
            files = (config.get("dataset_kwargs") or {}).get("data_files") or []
            files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
            for entry in files:
                for name in [entry] if isinstance(entry, str) else entry:
                    if not any(Path(base, name).exists() for base in (".", spec.parent)):
                        raise BriskError(f"lm-eval task {config['task']!r} ({spec}) reads {name}, which does not "
                                         "exist; fix dataset_kwargs.data_files in the task YAML")


def main(argv: list[str] | None = None) -> int:
    """The lm-eval command line with `brisk` registered; a missing task data file is a one-line error."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0]] + argv
    try:
        check_task_files(_option_values(argv, "--include_path"), _option_values(argv, "--tasks"))
        cli_evaluate()
    except BriskError as error:
        print(f"brisk: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"brisk: error: an lm-eval task's data file is missing ({str(error).splitlines()[0]}); check the "
              "task YAML's dataset_kwargs / data_files paths", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
