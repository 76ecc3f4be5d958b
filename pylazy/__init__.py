"""pylazy: long-context GGUF inference with lazy prefill and recycled attention."""
from .errors import ContextOverflowError, ModelLoadError, PylazyError

__version__ = "0.1.0"

__all__ = ["ModelLoadError", "ContextOverflowError", "PylazyError", "__version__"]
