"""User-facing errors: one line that names what is wrong and how to fix it (the CLI prints it without a trace)."""


class BriskError(Exception):
    """An error caused by the user's input (model, data, arguments), not by a bug in brisklm."""


class UnsupportedModelError(BriskError):
    """The model's family is not one the layer-loop executor knows."""


class PlanError(BriskError):
    """A plan whose shapes or indices do not fit the model or the input."""


class VocabularyError(BriskError):
    """Text contains a word the word-level tokenizer does not know."""
