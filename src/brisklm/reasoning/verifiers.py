"""Verifiers: is a completion's answer the reference answer? A registry of named rules, chosen with `--verifier`.

Every verifier is callable as `verifier(completion_text, example) -> bool` (the signature On-Policy SFT, the
distillation evaluation and latent CoT use) and checks a reference once with `check_reference(answer)`, so a data
file whose answers the rule cannot read fails on load, naming the line.

  numeric            the completion's `#### n` (GSM8K style) if it has one, else its last number; the reference
                     likewise (`#### n`, else its last number; none is an error). Numbers compare exactly as
                     fractions after dropping thousands separators: `1,000` == `1000.0`.
  boxed              the content of the completion's last `\\boxed{...}` (nested braces allowed); the reference is
                     the content of its own last `\\boxed{}` or, without one, the whole answer. Whitespace-insensitive.
  exact              the whole completion equals the answer, whitespace collapsed (for data without a chain of thought).
  regex:PATTERN      the last match of PATTERN in the completion (group 1 when the pattern has a group) equals the
                     reference's match; a reference the pattern does not match is used whole.
  python:MOD:FUNC    FUNC(completion_text, answer_text) -> bool, imported from module MOD (on the Python path).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from brisklm.errors import BriskError

VERIFIERS = ("numeric", "boxed", "exact", "regex:PATTERN", "python:module:function")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_GSM8K = re.compile(r"####\s*([-+]?[\d,]*\.?\d+(?:/\d+)?)")


def _answer(example: Any) -> str:
    """The reference of an example (an object with `.answer`, or the answer string itself)."""
    return str(getattr(example, "answer", example))


def _number(text: str) -> Fraction | None:
    """The answer number of a text: `#### n` if present, else the last number; None when there is none."""
    marked = _GSM8K.findall(text)
    found = marked[-1:] or _NUMBER.findall(text)[-1:]
    if not found:
        return None
    try:
        return Fraction(found[0].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in text (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: no complete box


def _squash(text: str) -> str:
    return "".join(text.split())


@dataclass
class Verifier:
    """A named rule: `extract(text)` reads a completion's answer, `reference(answer)` the data's (None: unreadable)."""

    name: str
    extract: Callable[[str], Any]
    reference: Callable[[str], Any]

    def check_reference(self, answer: str) -> Any:
        """The parsed reference; a BriskError when this rule cannot read it."""
        value = self.reference(answer)
        if value is None:
            raise BriskError(f"the {self.name} verifier cannot read the reference answer {answer!r}; "
                             "fix the answer or choose another --verifier (numeric, boxed, exact, regex:..., python:...)")
        return value

    def __call__(self, text: str, example: Any) -> bool:
        value = self.reference(_answer(example))
        got = self.extract(text)
        return value is not None and got is not None and got == value


def _regex(pattern: str) -> Verifier:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise BriskError(f"--verifier regex:{pattern!r} is not a valid regular expression ({error})") from None

    def find(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if compiled.groups else m.group(0)).strip()

    return Verifier(f"regex:{pattern}", find, lambda answer: find(answer) or answer.strip() or None)


def _python(spec: str) -> Callable[[str, Any], bool]:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise BriskError(f"--verifier python:{spec!r}: write python:module:function (e.g. python:my_checks:is_right)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BriskError(f"--verifier python:{spec}: cannot import {module_name!r} ({error}); "
                         "put the module on PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BriskError(f"--verifier python:{spec}: {module_name} has no function {function_name!r}")

    def verify(text: str, example: Any) -> bool:
        return bool(function(text, _answer(example)))

    verify.check_reference = lambda answer: answer  # type: ignore[attr-defined]  (a user function reads anything)
    return verify


def make_verifier(spec: str) -> Callable[[str, Any], bool]:
    """The verifier named by `spec` (see the module docstring); unknown names are a one-line error."""
    if spec == "numeric":
        return Verifier("numeric", _number, _number)
    if spec == "boxed":
        extract = lambda text: (lambda b: None if b is None else _squash(b))(last_boxed(text))  # noqa: E731
        reference = lambda answer: _squash(last_boxed(answer) if "\\boxed{" in answer else answer) or None  # noqa: E731
        return Verifier("boxed", extract, reference)
    if spec == "exact":
        return Verifier("exact", lambda text: " ".join(text.split()), lambda answer: " ".join(answer.split()) or None)
    if spec.startswith("regex:"):
        return _regex(spec[len("regex:"):])
    if spec.startswith("python:"):
        return _python(spec[len("python:"):])
    raise BriskError(f"unknown --verifier {spec!r}: use one of {', '.join(VERIFIERS)}")
