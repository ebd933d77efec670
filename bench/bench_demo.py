"""Click-to-heatmap in the browser vs the same trace through `tracing.trace`, in one run.

    .venv/bin/python bench/bench_demo.py [--repeats 9] [--threads 2] [--prompt TEXT] [--target TOKEN]

Starts the app in this process on a free local port, opens it in headless Chromium (Debian's
`chromium`, driven by Playwright) and, round-robin so that load from other processes hits both
alike, measures medians of:
  trace        tracing.trace(prompt, target=...) on the default model (loaded and warm)
  callback     the Lens tab's function in-process (trace + figures + table + downloads)
  click        from the click on "Trace" to the new heatmap drawn in the page (timed in the page
               with performance.now(): queue, HTTP, JSON, plotly rendering included)
and where the click's time goes, in the same rounds (medians, ms; server and page read one clock):
  to server    click -> the Lens tab's function starts (the page's request, Gradio's queue)
  to heatmap   the function: trace, then heatmap and summary built (its first step)
  transport    first step -> plotly starts drawing in the page (Gradio's postprocess, JSON, SSE, Svelte)
  draw         plotly drawing the heatmap (as ui/page.js logs it), and the heatmap's JSON size
Target (issue 6, issue 14): click <= 1.5x trace. Results go to bench/results/demo.json too.
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
    window.__clickedAt = Date.now();
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
    from ui import plots
    from ui.app import Settings, launch
    from ui.lens_view import LensView

    if args.threads:
        torch.set_num_threads(args.threads)
    # When the Lens tab's function starts and yields its first step (the heatmap), on the page's clock.
    marks: dict[str, float] = {}
    steps = LensView.lens_steps

    def timed_steps(self, *a, **k):
        marks["start"] = time.time()
        for n, out in enumerate(steps(self, *a, **k)):
            if n == 0:
                marks["heatmap"] = time.time()
            yield out

    LensView.lens_steps = timed_steps  # before launch: the button's event holds this function
    demo, app, url = launch(Settings(), block=False, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    LensView.lens_steps = steps
    first = tracing.trace(args.prompt, target=args.target)  # loads the model once
    expected = first.n_rows * len(first.positions)

    temperature = [1.0]

    def trace() -> float:
        start = time.perf_counter()
        tracing.trace(args.prompt, target=args.target, temperature=temperature[0])
        return time.perf_counter() - start

    def callback() -> float:
        start = time.perf_counter()
        app.lens_tab.lens(args.prompt, DEFAULT_MODEL_NAME, "hooks", 5, temperature[0], args.target, "top-1 probability")
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"trace": [], "callback": [], "click": []}
    parts: dict[str, list[float]] = {"to server": [], "to heatmap": [], "transport": [], "draw": []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#lens-trace")
            page.wait_for_selector("#lens-heatmap .heatmap-label")  # the page's first result, traced on load
            page.locator("#lens-prompt textarea").fill(args.prompt)
            page.locator("#lens-target textarea").fill(args.target)

            box = page.locator("#lens-temperature input[type=number]")

            def click() -> float:
                box.fill(f"{temperature[0]:g}")
                box.press("Enter")
                page.wait_for_timeout(200)  # let the slider's new value reach the page's state
                page.evaluate("window.lensbenchDraws = []")  # ui/page.js logs each figure's drawing
                seconds = page.evaluate(CLICK_TO_HEATMAP_JS, expected) / 1000
                clicked = page.evaluate("window.__clickedAt") / 1000
                draws = [(start, ms) for plot, start, ms in page.evaluate("window.lensbenchDraws")
                         if plot == "lens-heatmap"]
                if draws and "heatmap" in marks:
                    parts["to server"].append(marks["start"] - clicked)
                    parts["to heatmap"].append(marks["heatmap"] - marks["start"])
                    parts["transport"].append(draws[0][0] / 1000 - marks["heatmap"])
                    parts["draw"].append(sum(d for _, d in draws) / 1000)
                return seconds

            temperature[0] = 1.1
            for fn in (click, trace, callback):  # warm-up: first draw, first figures
                fn()
            for kept in parts.values():
                kept.clear()
            for i in range(args.repeats):
                temperature[0] = (1.0, 1.1)[i % 2]
                times["click"].append(click())
                times["trace"].append(trace())
                times["callback"].append(callback())
            browser.close()
    finally:
        demo.close()

    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    where = {name: round(statistics.median(t) * 1000, 1) for name, t in parts.items() if t}
    figure_bytes = len(plots.heatmap(first, "top-1 probability").to_json())
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
        "click_parts_median_ms": where,
        "heatmap_json_bytes": figure_bytes,
    }
    print(f"{args.prompt!r} -> {args.target!r}, {expected} cells, {args.repeats} rounds, "
          f"{report['torch_threads']} torch threads (medians)")
    for name in ("trace", "callback", "click"):
        ratio = medians[name] / medians["trace"]
        print(f"  {name:<9} {medians[name]:8.1f} ms   {ratio:5.2f}x trace")
    print("  where the click goes: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in where.items())
          + f" (heatmap JSON {figure_bytes / 1024:.0f} KB)")
    verdict = "meets" if report["click_over_trace"] <= 1.5 else "MISSES"
    print(f"click-to-heatmap / tracing.trace = {report['click_over_trace']:.2f}x ({verdict} the 1.5x target)")
    out = ROOT / "bench" / "results" / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
