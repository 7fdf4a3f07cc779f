"""Quality of a model on a text: perplexity, and the divergence of a quantised model from its reference."""

from .perplexity import EvalResult, evaluate, windows

__all__ = ["EvalResult", "evaluate", "windows"]
