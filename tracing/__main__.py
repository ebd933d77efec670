"""Command line: `python -m tracing --prompt TEXT [--model M] [--backend hooks] ...`.

Subcommands: `fit-lens` (a Jacobian or tuned lens; `train-lens` = `fit-lens --kind tuned`), `patch` (activation patching, tracing/patching.py).

Prints a per-layer table at the last position, or with --json exactly `LensResult.to_dict()`.
Errors a user can cause are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .api import BACKENDS
from .errors import LensbenchError


def lens_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tracing",
        description="Per-layer next-token predictions (a logit lens) for a prompt.",
    )
    parser.add_argument("--prompt", required=True, help="the text to trace")
    parser.add_argument("--model", default=None, help="a file or folder in models/, a path, or a hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", default="hooks", help=f"one of: {', '.join(BACKENDS)} (default: hooks)")
    parser.add_argument("--top-k", type=int, default=5, help="tokens shown per layer (default: 5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits before the softmax (default: 1)")
    parser.add_argument("--target", default=None, help="a token to follow through the layers, e.g. ' Berlin'")
    parser.add_argument("--last-only", action="store_true", help="trace only the last position (long prompts)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--lens", default=None, help="a learned lens: with --backend tuned-lens-tuned a tuned lens folder "
                        "(config.json + params.pt); with jacobian-lens a J-lens file or folder; with llama-cpp either, "
                        "named by --lens-kind")
    parser.add_argument("--lens-kind", default=None, choices=["logit", "tuned", "jacobian"],
                        help="with --backend llama-cpp: the lens read on the GGUF (default: logit)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_remote_arguments(parser)
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    return parser


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remote", action="store_true",
                        help="run on NDIF's hosted model through nnsight (implies --backend nnsight; API key from "
                             "NDIF_API_KEY or nnsight's config)")
    parser.add_argument("--repo-id", default=None,
                        help="with --remote and a local --model: the Hugging Face id NDIF hosts it under")


def remote_options(args) -> dict:
    """--remote: the nnsight backend's options (and the backend), or {} without it."""
    if not args.remote:
        return {}
    if args.backend not in ("hooks", "nnsight"):  # hooks is the default: --remote alone means nnsight
        from .errors import UnsupportedModel

        raise UnsupportedModel(f"--remote runs on the nnsight backend, not '{args.backend}'.")
    args.backend = "nnsight"
    return {"remote": True, **({"repo_id": args.repo_id} if args.repo_id else {})}


def run_lens(argv: list[str]) -> int:
    args = lens_parser().parse_args(argv)
    from .api import trace
    from .models import ignoring_memory_check, print_memory_warnings

    options = {"lens": args.lens} if args.lens else {}
    options.update(remote_options(args))
    if args.lens_kind and args.backend != "llama-cpp":
        from .errors import UnsupportedModel

        raise UnsupportedModel("--lens-kind is for --backend llama-cpp (the PyTorch backends are "
                               "tuned-lens-tuned and jacobian-lens).")
    if args.lens_kind:
        options["lens_kind"] = args.lens_kind
    if args.lens and args.backend not in ("tuned-lens-tuned", "jacobian-lens", "llama-cpp"):
        from .errors import UnsupportedModel

        raise UnsupportedModel("--lens needs --backend tuned-lens-tuned, jacobian-lens or llama-cpp (with --lens-kind).")
    print_memory_warnings()  # a tight fit: one "warning: ..." line on stderr
    with ignoring_memory_check(args.ignore_memory_check):  # reaches every backend's load
        result = trace(
            args.prompt,
            model=args.model,
            backend=args.backend,
            top_k=args.top_k,
            temperature=args.temperature,
            target=args.target,
            last_only=args.last_only,
            device=args.device,
            **options,
        )
    print_result(result, args.json)
    return 0


def print_result(result, as_json: bool) -> None:
    """A technique's result on stdout: exactly `result.to_dict()` as JSON, or `result.table()`."""
    if as_json:
        json.dump(result.to_dict(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(result.table())


# Subcommands besides the default lens: name -> "module:function" taking argv, returning an exit code.
COMMANDS = {
    "lens": "tracing.__main__:run_lens",
    "train-lens": "tracing.fit_lens:run_train_lens",
    "fit-lens": "tracing.fit_lens:run_fit_lens",
    "patch": "tracing.patching:run_patch",
    "attribute": "tracing.attribution:run_attribute",
    "steer-vector": "tracing.steering:run_steer_vector",
    "attention": "tracing.attention:run_attention",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "lens"
    module, function = COMMANDS[command].split(":")
    import importlib

    try:
        return getattr(importlib.import_module(module), function)(argv)
    except LensbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... --json | head`): stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
