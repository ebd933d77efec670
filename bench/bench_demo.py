"""Click-to-heatmap in the browser vs the same trace through `tracing.trace`, in one run.

    .venv/bin/python bench/bench_demo.py [--repeats 9] [--threads 2] [--prompt TEXT] [--target TOKEN]

Starts the app in this process on a free local port, opens it in headless Chromium (Debian's
`chromium`, driven by Playwright) and, round-robin so that load from other processes hits both
alike, measures medians of:
  trace        tracing.trace(prompt, target=...) on the default model (loaded and warm)
  callback     the Lens tab's function in-process (trace + figures + table + downloads)
  click        from the click on "Trace" to the new heatmap drawn in the page (timed in the page
               with performance.now(): queue, HTTP, JSON, plotly rendering included)
Target (issue 6): click <= 1.5x trace. Results go to bench/results/demo.json too.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

# Click, and resolve when plotly has drawn a new heatmap image with all its cell labels. (Rounds
# alternate the temperature, so each new heatmap differs from the one before.)
CLICK_TO_HEATMAP_JS = """
(expected) => new Promise((resolve) => {
    const root = document.querySelector('#lens-heatmap');
    const image = () => root.querySelector('.hm image');
    const before = image() ? image().getAttribute('href') : null;
    const observer = new MutationObserver(() => {
        const now = image();
        if (now && now.getAttribute('href') !== before
                && root.querySelectorAll('.heatmap-label').length === expected) {
            observer.disconnect();
            resolve(performance.now() - start);
        }
    });
    observer.observe(root, {subtree: true, childList: true, attributes: true});
    const start = performance.now();
    document.querySelector('#lens-trace').click();
})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--prompt", default="The capital of Germany is")
    parser.add_argument("--target", default=" Berlin")
    args = parser.parse_args(argv)

    import torch
    from playwright.sync_api import sync_playwright

    import tracing
    from tracing.models import DEFAULT_MODEL_NAME
    from ui.app import Settings, launch

    if args.threads:
        torch.set_num_threads(args.threads)
    demo, app, url = launch(Settings(), block=False, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    first = tracing.trace(args.prompt, target=args.target)  # loads the model once
    expected = first.n_rows * len(first.positions)

    temperature = [1.0]

    def trace() -> float:
        start = time.perf_counter()
        tracing.trace(args.prompt, target=args.target, temperature=temperature[0])
        return time.perf_counter() - start

    def callback() -> float:
        start = time.perf_counter()
        app.lens(args.prompt, DEFAULT_MODEL_NAME, "hooks", 5, temperature[0], args.target, "top-1 probability")
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"trace": [], "callback": [], "click": []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#lens-trace")
            page.locator("#lens-prompt textarea").fill(args.prompt)
            page.locator("#lens-target textarea").fill(args.target)

            box = page.locator("#lens-temperature input[type=number]")

            def click() -> float:
                box.fill(f"{temperature[0]:g}")
                box.press("Enter")
                page.wait_for_timeout(200)  # let the slider's new value reach the page's state
                return page.evaluate(CLICK_TO_HEATMAP_JS, expected) / 1000

            temperature[0] = 1.1
            for fn in (click, trace, callback):  # warm-up: first draw, first figures
                fn()
            for i in range(args.repeats):
                temperature[0] = (1.0, 1.1)[i % 2]
                times["click"].append(click())
                times["trace"].append(trace())
                times["callback"].append(callback())
            browser.close()
    finally:
        demo.close()

    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    report = {
        "prompt": args.prompt,
        "target": args.target,
        "cells": expected,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "median_ms": {k: round(v, 1) for k, v in medians.items()},
        "click_over_trace": round(medians["click"] / medians["trace"], 3),
        "callback_over_trace": round(medians["callback"] / medians["trace"], 3),
        "target_click_over_trace": 1.5,
    }
    print(f"{args.prompt!r} -> {args.target!r}, {expected} cells, {args.repeats} rounds, "
          f"{report['torch_threads']} torch threads (medians)")
    for name in ("trace", "callback", "click"):
        ratio = medians[name] / medians["trace"]
        print(f"  {name:<9} {medians[name]:8.1f} ms   {ratio:5.2f}x trace")
    verdict = "meets" if report["click_over_trace"] <= 1.5 else "MISSES"
    print(f"click-to-heatmap / tracing.trace = {report['click_over_trace']:.2f}x ({verdict} the 1.5x target)")
    out = ROOT / "bench" / "results" / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
