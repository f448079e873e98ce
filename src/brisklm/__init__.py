"""brisklm: efficient-LLM methods (streaming, pruning, multimodal, reasoning, analysis) on Hugging Face models."""

from brisklm.errors import BriskError

__version__ = "0.1.0"
__all__ = ["BriskError", "__version__", "generate"]


def __getattr__(name: str):
    """`brisklm.generate` (the one generation loop), imported on first use so `import brisklm` stays light."""
    if name == "generate":
        from brisklm.core.generate import generate

        return generate
    raise AttributeError(f"module 'brisklm' has no attribute {name!r}")
