"""Exceptions raised by pylazy. Every failure a user can cause ends in one of these."""


class PylazyError(RuntimeError):
    """An engine failure that is not the caller's input (out of memory, backend error)."""


class ModelLoadError(ValueError):
    """The model file is missing, not GGUF, malformed, or uses something pylazy cannot run.

    The message names the field or section that is wrong.
    """


class ContextOverflowError(ValueError):
    """A prompt (or prompt + generation) does not fit in the context window."""


class RpcConnectionError(PylazyError):
    """An RPC server (``rpc_servers=``) cannot be reached, or its connection was lost mid-call.

    After a lost connection the model that used it cannot run any more (``Llama`` closes itself);
    load it again once the server is back."""
