"""`brisk generate --model PATH --prompt TEXT`: one completion from a dense, pruned or SkipGPT checkpoint.

The prompt is framed by the text layer (the chat template when the tokenizer has one), decoding runs through the
one generation loop (`brisklm.core.generate`); a folder with SkipGPT routers decodes with them (really skipping,
under `--kv-policy`) unless `--dense` is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import add_text_args

# What `brisk inspect` reports for this command on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"generate": causal_lm_only}


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from brisklm.core.generate import generate
    from brisklm.core.text import TextLayer, text_options
    from brisklm.errors import BriskError
    from brisklm.pruning.skipmodel import has_routers, load_skipgpt
    from brisklm.zoo.store import load, resolve

    if args.max_new_tokens < 1:
        raise BriskError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    folder = resolve(args.model)
    routed = has_routers(folder) and not args.dense
    if routed:
        skip = load_skipgpt(folder, kv_policy=args.kv_policy, **device_kwargs(args))
        model, tokenizer = skip.model, skip.tokenizer
    else:
        loaded = load(str(folder), **device_kwargs(args))
        model, tokenizer = loaded.model, loaded.tokenizer
    text = TextLayer.for_model(model, tokenizer, **text_options(args))
    prompt = text.prompt_ids(args.prompt)
    ids = torch.tensor([prompt], device=model.device)
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": list(text.stop_ids),
               "pad_token_id": text.roles.pad_id, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        options.update(temperature=args.temperature, top_p=args.top_p)
    out = skip.generate(ids, **options) if routed else generate(model, ids, **options)
    new, ended = text.cut_at_eos(out[0, len(prompt):].tolist())
    completion = text.decode(new)
    info = {"model": str(folder), "prompt_tokens": len(prompt), "new_tokens": len(new), "ended_with_eos": ended,
            "skipgpt": routed}
    if routed:
        info.update(kv_policy=args.kv_policy, skip_rates=skip.skip_rates())
    if args.json:
        print(json.dumps({**info, "completion": completion}, indent=2))
    else:
        print(completion)
        print(json.dumps(info), file=sys.stderr)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a completion from a dense, pruned or SkipGPT checkpoint")
    p.add_argument("--model", required=True, help="zoo name or local HF checkpoint folder (routers.json: SkipGPT)")
    p.add_argument("--prompt", required=True, help="the user prompt (framed by the chat template when there is one)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--kv-policy", choices=("full", "evict", "reuse"), default="full",
                   help="SkipGPT: what a token that skips attention leaves in the KV cache")
    p.add_argument("--dense", action="store_true", help="ignore SkipGPT routers in the folder (run every module)")
    p.add_argument("--json", action="store_true", help="print the completion and statistics as one JSON object")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_generate)
