"""pylazy: long-context GGUF inference with lazy prefill and recycled attention."""
from .errors import ContextOverflowError, ModelLoadError, PylazyError, RpcConnectionError
from .models import default_model_path
from .policy import LazyPrefill, Recycle, StreamingWindow

__version__ = "0.1.0"


def __getattr__(name):
    # Llama imports numpy and the engine; load it on first use so `import pylazy` stays light.
    if name == "Llama":
        from .llama import Llama
        return Llama
    raise AttributeError(f"module 'pylazy' has no attribute {name!r}")


__all__ = ["Llama", "LazyPrefill", "Recycle", "StreamingWindow", "default_model_path",
           "ModelLoadError", "ContextOverflowError", "PylazyError", "RpcConnectionError", "__version__"]
