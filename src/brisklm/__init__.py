"""brisklm: efficient-LLM methods (streaming, pruning, multimodal, reasoning, analysis) on Hugging Face models."""

from brisklm.errors import BriskError

__version__ = "0.1.0"
__all__ = ["BriskError", "__version__"]
