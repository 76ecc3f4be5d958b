"""`pylazy run`: complete one prompt, streamed to stdout (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import sys

from ..cli_args import (UsageError, add_command, add_model_arguments, add_policy_arguments,
                        add_sampling_arguments, open_llama, sampling_kwargs, write)


def register(subparsers) -> None:
    add_command(subparsers, "run", "complete one prompt, streamed to stdout",
                "Complete one prompt; the text streams to stdout, progress to stderr.",
                add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' = read stdin)")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, usage, stats) instead of streaming")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=128)
    add_policy_arguments(p)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("give the prompt as an argument or with --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --prompt-file: {exc}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is None:
        raise UsageError("a prompt is needed (argument, '-' for stdin, or --prompt-file)")
    return args.prompt


def main(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    sampling = sampling_kwargs(args)
    llm = open_llama(args)
    kw = dict(max_tokens=args.max_tokens, stop=args.stop, stream=not args.json, **sampling)
    if args.chat:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], **kw)
    else:
        out = llm.create_completion(prompt, **kw)
    if args.json:
        choice = out["choices"][0]
        text = choice["message"]["content"] if args.chat else choice["text"]
        print(json.dumps({"text": text, "finish_reason": choice["finish_reason"], "usage": out["usage"],
                          "stats": llm.stats, "model": llm.model_path}))
        return 0
    for chunk in out:
        choice = chunk["choices"][0]
        write(choice["delta"].get("content", "") if args.chat else choice["text"])
    write("\n")
    return 0
