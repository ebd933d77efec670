"""The demo in a real browser: headless Debian Chromium driven by Playwright, on the bundled model:
the Lens tab's examples, hover and backend switch, and the README's screenshot. (What a newcomer does,
chat and mistakes included, is in test_browser_newcomer.py, on one page; the helpers here serve both.)

Playwright's own browser download cannot work offline; Debian's `chromium` package can
(`make chromium` installs it; CI does). Without it these tests are skipped locally and fail on CI.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest

from tracing.api import BACKENDS
from tracing.models import DEFAULT_MODEL_NAME
from ui.choices import backend_label

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
# The README's screenshot: refreshed with LENSBENCH_SCREENSHOT=1 (else written to a temporary folder,
# so a test run leaves the tree unchanged).
DOCS = Path(__file__).resolve().parent.parent / "docs"
SLOW = 180_000  # ms: a first model load on a busy 2-core machine

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (make chromium)", allow_module_level=True)
from playwright import sync_api  # noqa: E402  (a test requirement: missing is a failure, not a skip)


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app (1400 x 1000, a laptop's window); fails the test if the browser logs any error."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.goto(server[0])
    page.wait_for_selector("#lens-trace", timeout=SLOW)
    yield page
    page.close()
    assert errors == []


@contextlib.contextmanager
def app_page(url: str):
    """Headless Chromium on the app at `url` in a laptop's window (1400 x 1000), for a test that opens
    its own browser; yields the page, and fails the test if the page raised a JavaScript error."""
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(url)
        yield page
        browser.close()
    assert errors == []


def summary_text(page) -> str:
    return page.inner_text("#lens-summary")


def wait_for_summary(page, pattern: str) -> str:
    return wait_for_text(page, "#lens-summary", pattern)


def cell_center(page, row: int, col: int, n_rows: int, n_cols: int, plot: str = "#lens-heatmap") -> tuple:
    """Where a heatmap cell is on the screen (row 0 = embeddings, at the bottom)."""
    area = page.locator(f"{plot} .nsewdrag").first
    area.scroll_into_view_if_needed()
    box = area.bounding_box()
    return (box["x"] + (col + 0.5) * box["width"] / n_cols,
            box["y"] + box["height"] - (row + 0.5) * box["height"] / n_rows)


def hover_cell(page, row: int, col: int, n_rows: int, n_cols: int) -> str:
    """Move the mouse over a heatmap cell and read the hover box."""
    page.mouse.move(*cell_center(page, row, col, n_rows, n_cols))
    hover = page.locator("#lens-heatmap .hoverlayer .hovertext")
    hover.first.wait_for(timeout=10_000)
    return hover.first.text_content()


def wait_for_text(page, selector: str, pattern: str, timeout: int = SLOW) -> str:
    """Wait until the element's text matches `pattern` (a regular expression); return the text."""
    try:
        page.wait_for_function(
            "([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test(e.innerText); }",
            arg=[selector, pattern], timeout=timeout,
        )
    except sync_api.TimeoutError:
        shown = page.locator(selector).first.inner_text() if page.locator(selector).count() else "(not on the page)"
        raise AssertionError(f"{selector} never matched {pattern!r}; it shows {shown!r}") from None
    return page.inner_text(selector)


def test_lens_example_heatmap_hover_and_backend_switch(page, server, tmp_path):
    _, app = server
    # The page opens on the first example, traced: a newcomer sees a result before doing anything.
    text = wait_for_summary(page, "predicts ␣Berlin")
    assert "backend hooks" in text and "79.6%" in text
    # An example: a click fills the prompt and target and runs the lens.
    page.get_by_text("Berlin is the capital of", exact=True).last.click()
    wait_for_summary(page, "Target ␣Germany")
    page.get_by_text("The capital of Germany is", exact=True).last.click()
    text = wait_for_summary(page, "Target ␣Berlin")
    assert "backend hooks" in text and "79.6%" in text
    assert page.input_value("#lens-target textarea") == "␣Berlin"  # the leading space, visible
    page.locator("#lens-heatmap .heatmap-label").first.wait_for()
    labels = page.locator("#lens-heatmap .heatmap-label").all_text_contents()
    assert len(labels) == 31 * 5 and "␣Berlin" in labels

    # Hovering the output row's last cell shows the top-k with probabilities, spaces made visible.
    hover = hover_cell(page, 30, 4, 31, 5)
    assert "layer 30 = output" in hover and "1. ␣Berlin  79.6%" in hover and "2. ␣Hamburg" in hover
    page.locator("#lens-chart .scatterlayer").first.wait_for()
    shots = DOCS if os.environ.get("LENSBENCH_SCREENSHOT") else tmp_path
    page.evaluate("window.scrollTo(0, 0)")  # what a 1400 x 1000 window shows first, hovering the answer's cell
    box = page.locator("#lens-heatmap .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + 4.5 * box["width"] / 5, box["y"] + 0.5 * box["height"] / 31)
    page.locator("#lens-heatmap .hoverlayer .hovertext").first.wait_for(timeout=10_000)
    page.screenshot(path=str(shots / "lens-tab.png"))
    assert (shots / "lens-tab.png").stat().st_size > 50_000
    page.mouse.move(5, 5)

    # Switch the backend, trace again: the same story from the other backend (llama.cpp when it can: the
    # GGUF loads in a second, where a second PyTorch copy for another backend takes much longer).
    usable = [b for b in BACKENDS if b != "hooks" and not app.catalog.backend_problem(DEFAULT_MODEL_NAME, b)]
    other = "llama-cpp" if "llama-cpp" in usable else next(iter(usable), None)
    assert other is not None, "no second backend can trace the default model"
    page.get_by_text(backend_label(other), exact=True).click()
    page.locator("#lens-trace").click()
    text = wait_for_summary(page, f"backend {re.escape(other)}")
    assert "predicts ␣Berlin" in text
    hover = hover_cell(page, 30, 4, 31, 5)
    assert "1. ␣Berlin" in hover


# Counts plotly's drawings of each plot on the page ("afterplot", by the plot's element id), from now on.
COUNT_DRAWINGS = """() => {
    window.drawings = {};
    const hook = () => document.querySelectorAll('.js-plotly-plot').forEach((g) => {
        if (g.__counted || typeof g.on !== 'function') return;
        g.__counted = true;
        const id = g.closest('[id]').id;
        g.on('plotly_afterplot', () => { window.drawings[id] = (window.drawings[id] || 0) + 1; });
    });
    hook();
    new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
}"""
PLOT_WIDTHS = """(ids) => ids.map((id) => {
    const g = document.querySelector('#' + id + ' .js-plotly-plot');
    return [Math.round(g.getBoundingClientRect().width), g._fullLayout.width];
})"""


def test_a_new_result_is_drawn_once_at_its_width_and_follows_the_window(page):
    """Gradio has plotly refit each new figure to its box (`Plots.resize`), which drew the figure all
    over again 100 ms later even when the box had not changed: every plot twice per update, 0.1-0.3 s of
    a CPU-only browser's time each. ui/page.js draws each once; a figure still fits its box, and still
    follows the window when it changes."""
    wait_for_summary(page, "predicts ␣Berlin")
    page.locator("#lens-chart .scatterlayer").first.wait_for()
    page.evaluate(COUNT_DRAWINGS)
    box = page.locator("#lens-temperature input[type=number]")
    box.fill("1.5")
    box.press("Enter")
    page.wait_for_timeout(300)
    page.locator("#lens-trace").click()
    page.wait_for_function("() => window.drawings['lens-heatmap'] && window.drawings['lens-chart']", timeout=SLOW)
    page.wait_for_timeout(1500)  # a second drawing came 100 ms after the first
    assert page.evaluate("window.drawings") == {"lens-heatmap": 1, "lens-chart": 1}
    plots = ["lens-heatmap", "lens-chart"]
    wide = page.evaluate(PLOT_WIDTHS, plots)
    assert all(box == drawn for box, drawn in wide), wide

    page.set_viewport_size({"width": 900, "height": 1000})
    page.wait_for_function(f"(ids) => ({PLOT_WIDTHS})(ids).every(([box, drawn]) => box === drawn)", arg=plots,
                           timeout=10_000)
    narrow = page.evaluate(PLOT_WIDTHS, plots)
    assert all(n[1] < w[1] for n, w in zip(narrow, wide)), (narrow, wide)
