"""A SimulEval (1.1.x) text-to-text agent that runs any brisklm streaming policy under SimulEval's own evaluator.

    simuleval --agent-class brisklm.streaming.simuleval_agent.BriskStreamingAgent \\
        --source src.txt --target ref.txt --output DIR --model CKPT --policy wait-k --k 3

SimulEval pushes one source word per step; the agent feeds it to a `StreamStepper` and answers with every word
the policy completes (one WriteAction, several words) or a ReadAction. Only this module imports simuleval, so
brisklm works without it. On a word-level tokenizer SimulEval records the same delays as `brisk stream eval`;
on a subword tokenizer a word reaches SimulEval once complete (its next token started), so SimulEval's delay
can be later than brisklm's (taken at the word's first token).
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace

from brisklm.errors import BriskError

try:
    from simuleval.agents import TextToTextAgent
    from simuleval.agents.actions import ReadAction, WriteAction
except ImportError:  # pragma: no cover - exercised only without simuleval
    raise BriskError("the SimulEval agent needs the simuleval package (pip install 'simuleval==1.1.4'; see the "
                     "README's streaming section for why brisklm does not install it)") from None

from brisklm.streaming.stepper import HEAD_POLICIES, POLICIES, PolicySpec, StreamStepper


class BriskStreamingAgent(TextToTextAgent):
    """wait-k, offline or a decision head (entropy, attention, probe) on a brisklm checkpoint, word in, words out."""

    def __init__(self, args: Namespace) -> None:
        from brisklm.core.text import TextLayer
        from brisklm.streaming.lora import load_model

        self.stepper: StreamStepper | None = None
        self.fed = 0
        self.spec = PolicySpec(args.policy, args.k, args.threshold).check()
        loaded = load_model(args.model, device=args.brisk_device, dtype=args.brisk_dtype)
        self.model, self.path = loaded.model, loaded.path
        self.text = TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template=args.chat_template)
        self.phi, self.instruction = args.phi, args.instruction
        self.head = None
        if self.spec.name in HEAD_POLICIES:
            from brisklm.streaming.proactive.heads import make_head

            self.head = make_head(self.spec.name, self.path)
        super().__init__(args)

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="brisklm zoo name, checkpoint or LoRA adapter folder")
        parser.add_argument("--policy", choices=POLICIES, default="wait-k")
        parser.add_argument("--k", type=int, default=3)
        parser.add_argument("--threshold", type=float, default=None)
        parser.add_argument("--phi", type=int, default=0)
        parser.add_argument("--instruction", default=None)
        parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
        parser.add_argument("--brisk-device", default="cpu", help="brisklm --device (SimulEval's --device is ignored)")
        parser.add_argument("--brisk-dtype", default="auto")

    def reset(self) -> None:
        super().reset()
        self.stepper, self.fed = None, 0

    def policy(self):
        import torch

        states = self.states
        if self.stepper is None:
            self.stepper = StreamStepper(self.model, self.text, self.spec, phi=self.phi,
                                         instruction=self.instruction, head=self.head)
        new, self.fed = states.source[self.fed:], len(states.source)
        with torch.no_grad():
            emitted = self.stepper.push(new, finished=states.source_finished)
        if emitted or self.stepper.done:
            return WriteAction(" ".join(e.word for e in emitted), finished=self.stepper.done)
        return ReadAction()
