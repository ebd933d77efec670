"""Terminal chat: `python -m chat [--model PATH]`, streaming answers, multi-turn.

Type a message and press Enter. Ctrl-C stops an answer; Ctrl-D (or /quit) leaves.
/reset forgets the conversation, /system TEXT sets the system prompt, /facts shows the model.
With --control-vector V.gguf every answer is steered (--strength, --layers); with --sweep S1,S2,...
every message is answered once per strength, same seed, side by side (no conversation history).
Errors a user can cause are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from tracing.errors import LensbenchError

HELP = "Commands: /reset (forget the conversation), /system TEXT, /facts, /quit. Ctrl-C stops an answer."


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chat", description="Chat with a GGUF model in the terminal.")
    parser.add_argument("--model", default=None, help="a .gguf file (or the first part of a split model), a name in models/ (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 always picks the likeliest token (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--max-tokens", type=int, default=512, help="new tokens per answer at most (default: 512)")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed makes answers reproducible")
    parser.add_argument("--context", type=int, default=None, help="context length in tokens (default: the model's own, capped at 4096)")
    parser.add_argument("--facts", action="store_true", help="print what the model is and whether it fits, then exit (no load)")
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    parser.add_argument("--control-vector", default=None,
                        help="steer every answer with a control-vector GGUF (python -m tracing steer-vector makes one)")
    parser.add_argument("--strength", type=float, default=1.0, help="how much of the control vector to add (default: 1; negative steers away)")
    parser.add_argument("--layers", default=None, help="the layers to steer, A-B as llama.cpp counts them (default: all)")
    parser.add_argument("--sweep", default=None, help="answer each message at these strengths, e.g. -0.4,0,0.4 (same seed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = chat_parser().parse_args(argv)
    from tracing.models import print_memory_warnings

    print_memory_warnings()  # a tight fit: one "warning: ..." line
    try:
        return _run(args)
    except LensbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or between answers
        print(file=sys.stderr)
        return 130


def _run(args) -> int:
    from .engine import load, model_facts, stream_chat

    facts = model_facts(args.model)
    print(facts.summary, file=sys.stderr)
    if args.facts:
        return 0
    steering, strengths = _steering(args)  # a bad vector file or setting: its message before a load
    check_memory = not args.ignore_memory_check
    if facts.memory is not None and facts.memory.refuse and check_memory:
        load(args.model, args.context)  # refused before loading: raises NotEnoughMemory with the numbers
    print("Loading…", file=sys.stderr, flush=True)  # a memory warning, if any, comes on the next line
    shared = load(args.model, args.context, check_memory=check_memory)
    print(f"Ready in {shared.load_seconds:.1f} s (context {shared.n_ctx:,} tokens). {HELP}", file=sys.stderr)
    if strengths is not None:
        return _sweep(args, steering, strengths)

    interactive = sys.stdin.isatty()
    system, history = args.system, []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if text == "/facts":
            print(model_facts(args.model).summary, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            stream = stream_chat(
                args.model,
                history,
                system=system,
                temperature=args.temperature,
                top_p=args.top_p,
                max_tokens=args.max_tokens,
                seed=args.seed,
                steering=steering,
            )
        except LensbenchError as exc:  # e.g. a message longer than the context: the chat goes on
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        for notice in stream.notices:
            print(f"({notice.message})", file=sys.stderr)
        try:
            for delta in stream:
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the program
            stream.close()
        print()
        if stream.finish_reason == "cancelled":
            print("(stopped)", file=sys.stderr)
        elif stream.finish_reason == "length":
            print(f"(cut at {stream.max_tokens} tokens)", file=sys.stderr)
        history.append({"role": "assistant", "content": stream.text})
    return 0


def _steering(args):
    """(the Steering of --control-vector, --strength and --layers, or None; the --sweep strengths or None)."""
    if args.control_vector is None:
        if args.sweep is not None or args.layers is not None or args.strength != 1.0:
            raise LensbenchError("--strength, --layers and --sweep steer with a control vector: add --control-vector FILE.")
        return None, None
    from tracing.steering import Steering, load_vector, parse_strengths

    vector = load_vector(args.control_vector, args.model)
    steering = Steering.of(vector, args.strength, args.layers)
    strengths = parse_strengths(args.sweep) if args.sweep is not None else None
    if strengths is None:
        print(f"(steering with {steering.describe()})", file=sys.stderr)
    return steering, strengths


def _sweep(args, steering, strengths) -> int:
    """Each message answered once per strength, with one seed: the same answer at strength 0 as unsteered."""
    import random

    from tracing.steering import Steering
    from .engine import stream_chat

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"(sweep of {steering.vector.source} on layers {steering.first}-{steering.last} at strengths "
          f"{', '.join(f'{s:g}' for s in strengths)}; seed {seed})", file=sys.stderr)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if not text or text.startswith("/"):
            continue
        for strength in strengths:
            print(f"[strength {strength:g}] ", end="", flush=True)
            stream = stream_chat(args.model, [{"role": "user", "content": line}], system=args.system,
                                 temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=seed,
                                 steering=Steering.of(steering.vector, strength, steering.layers))
            try:
                for delta in stream:
                    print(delta, end="", flush=True)
            except KeyboardInterrupt:
                stream.close()
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
