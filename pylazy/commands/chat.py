"""`pylazy chat`: an interactive chat through the model's chat template."""
from __future__ import annotations

import argparse
import sys

from ..cli_args import (add_command, add_model_arguments, add_policy_arguments,
                        add_sampling_arguments, open_llama, sampling_kwargs, write)


def register(subparsers) -> None:
    add_command(subparsers, "chat", "interactive chat (reads stdin until EOF or /exit)",
                "Chat through the model's chat template. One line per user turn; "
                "/reset forgets the history, /exit (or EOF) ends.", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="a system message to start with")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=256)
    add_policy_arguments(p)


def main(args: argparse.Namespace) -> int:
    sampling = sampling_kwargs(args)
    llm = open_llama(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            stream = llm.create_chat_completion(messages, max_tokens=args.max_tokens, stop=args.stop,
                                                stream=True, **sampling)
        except ValueError as exc:   # the conversation outgrew the context
            print(f"pylazy: {exc}; history cleared", file=sys.stderr)
            messages = list(start)
            continue
        reply = []
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply.append(piece)
            write(piece)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
