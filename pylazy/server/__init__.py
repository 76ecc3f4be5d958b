"""``pylazy serve``: an OpenAI-compatible HTTP server over pylazy.Llama, with a web chat.

Needs the optional extra: ``pip install "pylazy[server]"`` (FastAPI, uvicorn, sse-starlette).
``create_app`` is in ``pylazy.server.app``; the command in ``pylazy.server.cli``. This
package's ``__init__`` imports nothing heavy: the CLI parser loads it on every start.
"""
