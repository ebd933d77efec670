"""The app as a newcomer meets it, in headless Chromium: they type, click and read what is on the screen.

One server for the module, launched as `demo.py` launches it on 127.0.0.1 (typed paths and hub ids
welcome), and one page at 1400 x 1000, a laptop's window, that the tests use in turn as a visitor
would (a page load costs seconds on a busy machine). Each test starts from what it needs: a fresh
page, or what the test before it left, goes back to the Lens tab or types its own inputs; after a
failed test the next one gets a freshly loaded page. After every kind of mistake the message stays
in the page beside what caused it, nothing on the page belongs to other inputs, the inputs stay
editable, and the next valid action works.
"""

from __future__ import annotations

import os
import re

import pytest

from tracing.api import BACKENDS
from tracing.models import DEFAULT_MODEL_NAME

if not os.path.exists("/usr/bin/chromium") and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (make chromium)", allow_module_level=True)
from playwright import sync_api  # noqa: E402

from tests.test_browser import SLOW, browser, cell_center, hover_cell, wait_for_summary, wait_for_text  # noqa: E402

COUNT = "Count from 1 to 5000, one number after another, separated by commas."
N_ROWS, N_COLS = 31, 5  # the Berlin example on the bundled model: embeddings + 30 layers, 5 tokens


@pytest.fixture(scope="module")
def server():
    from tests.conftest import free_port
    from ui.app import Settings, launch

    demo, app, url = launch(Settings.for_launch(public=False), block=False, server_name="127.0.0.1",
                            server_port=free_port(), quiet=True)
    yield url, app
    demo.close()


class Visit:
    """The module's one page, and the errors the browser logged on it."""

    def __init__(self, browser, url: str):
        self.url, self.errors = url, []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.open()

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_selector("#lens-trace", timeout=SLOW)


@pytest.fixture(scope="module")
def visit(browser, server):
    visit = Visit(browser, server[0])
    yield visit
    visit.page.close()


@pytest.fixture
def page(visit, request):
    """The module's page, opened afresh after a failed test; fails the test if the browser logs any error."""
    failed = request.session.testsfailed
    if failed != getattr(visit, "failed", failed):
        visit.open()
    visit.errors.clear()
    yield visit.page
    visit.failed = request.session.testsfailed
    assert visit.errors == []


def lens_tab(page) -> str:
    """The Lens tab, its result shown (the page's first one on a fresh page); its summary."""
    page.get_by_role("tab", name="Lens").click()
    return wait_for_summary(page, "predicts")


def type_in(page, box: str, text: str) -> None:
    page.locator(f"{box} textarea, {box} input").first.fill(text)


def trace(page) -> None:
    page.locator("#lens-trace").click()


def message(page, pattern: str, box: str = "#lens-message") -> str:
    return wait_for_text(page, box, pattern)


def wait_for_value(page, selector: str, pattern: str) -> str:
    """Wait until an input's value matches `pattern` (a regular expression)."""
    page.wait_for_function("([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test(e.value); }",
                           arg=[selector, pattern], timeout=30_000)
    return page.input_value(selector)


def downloaded_result(page) -> dict:
    """The Lens tab's result as its JSON download holds it (and the link, as "href")."""
    href = page.locator("#lens-json a").first.get_attribute("href")
    href = page.evaluate("h => new URL(h, location.href).href", href)
    return {**page.request.get(href).json(), "href": href}


def assert_nothing_stale(page) -> None:
    """After a failed trace: no heatmap, chart, table or download left from earlier inputs."""
    for part in ("#lens-heatmap", "#lens-chart", "#lens-table", "#lens-json", "#lens-csv", "#lens-summary"):
        assert not page.locator(part).is_visible(), part


def assert_recovers(page) -> None:
    """The inputs are editable and the next valid trace works (and clears the message)."""
    for box in ("#lens-prompt textarea", "#lens-target textarea"):
        assert page.locator(box).is_editable()
    type_in(page, "#lens-prompt", "The capital of Germany is")
    type_in(page, "#lens-target", "␣Berlin")
    trace(page)
    wait_for_summary(page, "Target ␣Berlin: first becomes top-1")
    assert page.inner_text("#lens-message").strip() == ""
    assert page.locator("#lens-heatmap").is_visible()
    page.locator("#lens-json a").first.wait_for(timeout=30_000)  # the trace's last step: it is done


# ---------------------------------------------------------------- first impression


def test_the_first_page_shows_a_finished_result_with_the_button_in_view(page):
    # (The first test on the module's page: what a visitor sees on arriving.)
    text = wait_for_summary(page, "predicts ␣Berlin")
    assert "Target ␣Berlin: first becomes top-1 at layer 30" in text
    page.locator("#lens-heatmap .heatmap-label").first.wait_for()
    button = page.locator("#lens-trace").bounding_box()
    assert button["y"] + button["height"] <= 1000  # Trace is visible without scrolling
    for part in ("#lens-json", "#lens-csv"):  # downloads appear once there is something to download
        assert page.locator(part).is_visible()
    # What a newcomer does not know is explained where it is, folded away until asked for.
    assert not page.get_by_text("reads that summary after every layer").is_visible()
    page.locator("#lens-help").get_by_text("What am I looking at?").click()
    assert page.get_by_text("reads that summary after every layer").is_visible()
    assert "tuned lens" in page.inner_text("#lens-help").lower()
    note = page.inner_text("#lens-heatmap-note")
    assert "embeddings" in note and "nats" in note and "␣" in note
    for tab, help_id in (("Chat", "#chat-help"), ("Compare", "#compare-help"), ("Patch", "#patch-help"),
                         ("Steer", "#steer-help"), ("Attribution", "#attribution-help")):
        page.get_by_role("tab", name=tab).click()
        assert page.locator(help_id).get_by_text("What am I looking at?").is_visible()
    # One model picker, above the tabs, for every tab.
    assert page.locator("#model").count() == 1
    page.get_by_role("tab", name="Chat").click()
    wait_for_text(page, "#chat-facts", "30 layers")
    assert page.locator("#model").is_visible()
    # A message with nothing to say takes no room.
    for empty in ("#chat-status", "#lens-message"):
        assert page.locator(empty).evaluate("e => getComputedStyle(e).display") == "none", empty


def test_a_cold_start_says_what_it_is_doing(server):
    # (A real cold start converts the GGUF for a minute: the in-process note is what the page shows meanwhile.)
    from ui.app import LensApp, Settings

    fresh = LensApp(Settings())
    note = fresh.loading_note(DEFAULT_MODEL_NAME, "hooks")
    assert note.startswith("⏳ Loading") and "converts the GGUF" in note
    fresh.open(DEFAULT_MODEL_NAME, "hooks")
    assert fresh.loading_note(DEFAULT_MODEL_NAME, "hooks") is None


def test_a_trace_shows_tracing_over_the_heatmap_until_the_new_one_is_drawn(page):
    lens_tab(page)
    # What the heatmap's block looks like from the click on: busy ("Tracing…" over it), then not.
    page.evaluate("""() => {
        const block = document.querySelector('#lens-heatmap');
        window.busyLabels = [];
        new MutationObserver(() => window.busyLabels.push(block.classList.contains('lb-busy')
            ? getComputedStyle(block, '::after').content : 'idle')).observe(block, {attributes: true});
    }""")
    type_in(page, "#lens-prompt", "The capital of Germany is")  # the example: the tests after this one read it
    type_in(page, "#lens-target", "␣Berlin")
    trace(page)
    page.wait_for_function("window.busyLabels.includes('\"Tracing…\"') && window.busyLabels.at(-1) === 'idle'",
                           timeout=30_000)
    wait_for_summary(page, "Target ␣Berlin: first becomes top-1")
    labels = page.evaluate("window.busyLabels")
    assert '"Tracing…"' in labels and labels[-1] == "idle", labels
    assert page.locator("#lens-heatmap .heatmap-label").count() == N_ROWS * N_COLS


def test_small_numbers_and_units_read_well(page):
    lens_tab(page)
    wait_for_summary(page, "predicts ␣Berlin")
    hover = hover_cell(page, 0, 4, N_ROWS, N_COLS)  # the embeddings row: the target is nowhere near
    assert "target ␣Berlin: <0.01%" in hover and "nats" in hover and "e-" not in hover
    page.mouse.move(5, 5)
    assert "<0.01%" in page.inner_text("#lens-table")


# ---------------------------------------------------------------- targets and tokens


def test_clicking_a_top_k_entry_or_a_cell_picks_it(page):
    lens_tab(page)
    wait_for_summary(page, "Target ␣Berlin: first becomes top-1")
    page.locator("#lens-table").scroll_into_view_if_needed()
    page.locator("#lens-table .body-cell", has_text="Hamburg").first.click()
    wait_for_summary(page, "Target ␣Hamburg")
    assert page.input_value("#lens-target textarea") == "␣Hamburg"
    # A heatmap cell: its position goes to the chart and the table, its guess can be followed.
    page.mouse.click(*cell_center(page, 28, 2, N_ROWS, N_COLS))
    wait_for_value(page, "#lens-position input", "2: ␣of")
    follow = page.locator("#lens-follow")
    follow.wait_for(timeout=30_000)
    assert follow.inner_text().startswith("Follow ␣the (layer 28")
    wait_for_summary(page, "After ␣of the model predicts")
    follow.click()
    wait_for_summary(page, "Target ␣the")


def test_a_target_in_pieces_gets_a_useful_suggestion(page):
    lens_tab(page)
    type_in(page, "#lens-prompt", "The capital of Germany is")
    type_in(page, "#lens-target", "Berlinxyz")
    trace(page)
    text = message(page, "Not traced")
    assert "3 tokens" in text and "first piece, ' Berlin'" in text
    assert_nothing_stale(page)
    page.get_by_role("button", name="Follow ␣Berlin instead").click()
    wait_for_summary(page, "Target ␣Berlin: first becomes top-1")


def test_the_leading_space_is_visible_and_the_likelier_spelling_is_offered(page):
    lens_tab(page)
    wait_for_summary(page, "predicts ␣Berlin")
    assert page.input_value("#lens-target textarea") == "␣Berlin"
    assert "␣Paris" in page.inner_text("#tab-lens")  # the examples show it too
    type_in(page, "#lens-prompt", "The Eiffel Tower is in the city of")
    type_in(page, "#lens-target", "Paris")  # typed as a newcomer would: no space
    trace(page)
    note = message(page, "likelier")
    assert "␣Paris is likelier here than Paris" in note
    page.get_by_role("button", name="Follow ␣Paris instead").click()
    text = wait_for_summary(page, "Target ␣Paris: first becomes top-1")
    assert page.input_value("#lens-target textarea") == "␣Paris"
    assert page.inner_text("#lens-message").strip() == ""
    # A plain space typed works the same, and the box then shows it. (The result is the same, so the
    # new downloads say when this trace is done: the next test's Trace is not a click during it.)
    shown = downloaded_result(page)["href"]
    type_in(page, "#lens-target", " Paris")
    trace(page)
    page.wait_for_function("old => document.querySelector('#lens-json a')?.href !== old", arg=shown, timeout=SLOW)
    assert "Target ␣Paris" in wait_for_summary(page, "Target ␣Paris")
    assert page.input_value("#lens-target textarea") == "␣Paris"
    assert "predicts ␣Paris" in text


# ---------------------------------------------------------------- every kind of mistake


def test_mistakes_are_messages_in_the_page_and_the_next_try_works(page):
    lens_tab(page)
    mistakes = [
        (lambda: type_in(page, "#lens-prompt", ""), "The prompt is empty"),
        (lambda: type_in(page, "#lens-target", "Berlin"), "' Berlin' is one token: use that"),
        (lambda: type_in(page, "#lens-prompt", "word " * 1100), r"1,101 tokens; this app traces at most 1,024"),
    ]
    for make, expected in mistakes:
        make()
        trace(page)
        message(page, expected)
        assert_nothing_stale(page)
        assert page.locator(".toast-body").count() == 0  # in the page to stay, not a toast that fades
        assert_recovers(page)


def test_a_typed_model_that_is_not_there_is_one_sentence_and_the_listed_one_still_works(page):
    lens_tab(page)
    picker = page.locator("#model input")
    picker.fill("/nowhere/model.gguf")
    picker.press("Enter")
    facts = wait_for_text(page, "#model-facts", "No model called")
    assert facts.count(". ") == 0  # one sentence
    trace(page)
    text = message(page, "No model called '/nowhere/model.gguf'")
    assert "hub id" in text
    assert_nothing_stale(page)
    picker.fill(DEFAULT_MODEL_NAME)
    page.get_by_role("option", name=DEFAULT_MODEL_NAME).first.click()
    wait_for_text(page, "#model-facts", "135M parameters")
    assert_recovers(page)


# ---------------------------------------------------------------- the tabs together


def test_a_lens_cell_leads_to_patching_that_position(page):
    lens_tab(page)
    wait_for_summary(page, "Target ␣Berlin: first becomes top-1")
    page.mouse.click(*cell_center(page, 12, 3, N_ROWS, N_COLS))
    wait_for_value(page, "#lens-position input", "3: ␣Germany")
    page.locator("#lens-to-patch").click()
    text = message(page, "Set up from the Lens tab", "#patch-message")
    assert "change ␣Germany (position 3)" in text
    assert page.get_by_role("tab", name="Patch").get_attribute("aria-selected") == "true"
    assert page.input_value("#patch-clean textarea") == "The capital of Germany is"
    type_in(page, "#patch-corrupt", "The capital of France is")
    type_in(page, "#patch-contrast", "␣Paris")
    page.locator("#patch-run").click()
    wait_for_text(page, "#patch-summary", "corrupted answers ␣Paris")
    # A patching mistake is a message there too, and the inputs stay.
    type_in(page, "#patch-corrupt", "The capital of the UK is")
    page.locator("#patch-run").click()
    assert "same number of tokens" in message(page, "Not patched", "#patch-message")
    assert not page.locator("#patch-heatmap").is_visible()
    assert page.input_value("#patch-corrupt textarea") == "The capital of the UK is"


@pytest.mark.skipif("llama-cpp" not in BACKENDS, reason="llama.cpp is not installed")
def test_compare_defaults_to_a_pair_that_can_differ_and_outlines_differences(page):
    page.get_by_role("tab", name="Compare").click()
    assert page.locator("#compare-backend-a input[value='hooks']").is_checked()
    assert page.locator("#compare-backend-b input[value='llama-cpp']").is_checked()
    page.locator("#compare-run").click()
    text = wait_for_text(page, "#compare-summary", r"predict the same top-1 token in")
    found = re.search(r"in (\d+) of 155 cells", text)
    assert found and int(found[1]) < 155 and "outlined in red" in text
    outlines = page.locator("#compare-map-a .scatterlayer .point")
    outlines.first.wait_for(timeout=30_000)
    assert outlines.count() == 155 - int(found[1])


# ---------------------------------------------------------------- charts and limits


def test_charts_stay_readable(page):
    lens_tab(page)
    # The rank axis is labelled at powers of ten only.
    page.locator("#lens-chart .scatterlayer").first.wait_for()
    ticks = page.locator("#lens-chart .y2tick text").all_text_contents()
    assert ticks and all(t in ("1", "10", "100", "1k", "10k", "100k") for t in ticks), ticks
    # KL: the layers' colours are not squeezed by the embeddings row.
    page.locator("#lens-metric").get_by_text("KL to final", exact=True).click()
    page.wait_for_function("() => /embeddings row: up to/.test(document.querySelector('#lens-heatmap .cbtitle')"
                           "?.textContent || '')", timeout=30_000)
    wait_for_text(page, "#lens-metric-note", "in nats")
    # Many tokens: the labels are slanted and none is cut by the figure's edge.
    type_in(page, "#lens-prompt", "One, two, three, four, five, six, seven, eight, nine")
    type_in(page, "#lens-target", "")
    trace(page)
    wait_for_summary(page, "17 tokens, 17 traced")
    figure = page.locator("#lens-heatmap .main-svg").first.bounding_box()
    labels = page.locator("#lens-heatmap .xtick text")
    assert labels.count() >= 17
    for i in range(labels.count()):
        box = labels.nth(i).bounding_box()
        assert box["y"] + box["height"] <= figure["y"] + figure["height"] + 1
    # The top-k table fits its column: no sideways scrolling, every column visible.
    viewport = page.locator("#lens-table .virtual-table-viewport").first
    assert viewport.evaluate("v => v.scrollWidth <= v.clientWidth + 1")


def test_limits_are_shown_and_a_clamped_value_says_so(page):
    lens_tab(page)
    assert "Up to 1,024 tokens" in page.inner_text("#lens-prompt")
    top_k = page.locator("#lens-top-k input[type=number]")
    top_k.fill("1000")
    top_k.press("Tab")
    assert "1000 is outside 1–20: using 20" in wait_for_text(page, "#lens-top-k", "outside")
    assert top_k.input_value() == "20"
    temperature = page.locator("#lens-temperature input[type=number]")
    temperature.fill("0")
    temperature.press("Tab")
    wait_for_text(page, "#lens-temperature", "0 is outside 0.1–3: using 0.1")
    trace(page)
    text = wait_for_summary(page, "temperature 0.1")
    assert "sharper than the model's own" in text


# ---------------------------------------------------------------- chat


@pytest.mark.skipif("llama-cpp" not in BACKENDS, reason="llama.cpp is not installed")
def test_chat_streams_says_when_a_reply_was_cut_or_stopped_and_links_to_its_lens_and_attribution(page):
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-send").click()  # nothing typed yet
    message(page, "Type a message first", "#chat-status")
    max_tokens = page.locator("#chat-max-tokens input[type=number]")
    max_tokens.fill("8")
    max_tokens.press("Tab")
    page.locator("#chat-message textarea").fill("Tell me about Berlin in three sentences.")
    page.locator("#chat-send").click()
    history = wait_for_text(page, "#chat-history", "Cut off at 8 new tokens")
    assert "Max new tokens" in history and "Tell me about Berlin" in history
    assert page.inner_text("#chat-status").strip() == ""
    assert page.input_value("#chat-message textarea") == ""  # sent, so the box is cleared
    # Its lens: the Lens tab opens with inputs that say exactly what was traced (the conversation as the
    # model read it, from the reply's first token, on the GGUF through llama.cpp); Trace gives the same again.
    page.locator("#chat-trace").click()
    first = wait_for_summary(page, "backend llama-cpp")
    assert page.get_by_role("tab", name="Lens").get_attribute("aria-selected") == "true"
    prompt = page.input_value("#lens-prompt textarea")
    assert prompt.startswith("<|im_start|>") and "Tell me about Berlin" in prompt
    start = int(page.input_value("#lens-first-position input"))
    assert start > 0 and re.search(rf"\d+ traced \(from token {start}\)", first)
    assert page.locator("#lens-backend input[value='llama-cpp']").is_checked()
    page.locator("#lens-heatmap .hm image").first.wait_for()
    # (The same heatmap is not drawn again: Gradio leaves an unchanged figure alone. Each trace writes
    # new downloads, so the JSON link changes; both files hold the result.)
    shown = downloaded_result(page)
    trace(page)
    page.wait_for_function("old => document.querySelector('#lens-json a')?.href !== old", arg=shown["href"],
                           timeout=SLOW)
    again = downloaded_result(page)
    assert again["positions"] == shown["positions"] and again["topk"] == shown["topk"]
    assert wait_for_summary(page, "backend llama-cpp").split("Traced in")[0] == first.split("Traced in")[0]
    # Its attribution: the Attribution tab opens on the conversation up to the reply, the reply's first
    # token as the target, on llama.cpp, attributed.
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-attribute").click()
    summary = wait_for_text(page, "#attribution-summary", "the logit of")
    assert page.get_by_role("tab", name="Attribution").get_attribute("aria-selected") == "true"
    context = page.input_value("#attribution-prompt textarea")
    assert prompt.startswith(context) and context.rstrip().endswith("<|im_start|>assistant")
    target = page.input_value("#attribution-target textarea")
    assert target and f"the logit of {target} is" in summary and "llama.cpp" in summary
    assert page.locator("#attribution-backend input[value='llama-cpp']").is_checked()
    # Stop, while a long answer streams in (it grows in several steps): said in the conversation too.
    page.get_by_role("tab", name="Chat").click()
    max_tokens.fill("1000")
    max_tokens.press("Tab")
    # Counting has no natural end (a story, even seeded, sometimes ended before Stop landed); in a new
    # conversation, seeded, so the earlier (unseeded) Berlin reply cannot lead it elsewhere.
    page.locator("#chat-clear").click()
    page.wait_for_function("() => !document.querySelector('#chat-history').innerText.includes('Tell me about Berlin')",
                           timeout=SLOW)
    temperature = page.locator("#chat-temperature input[type=number]")
    temperature.fill("0")  # the likeliest tokens: the count itself (as the CLI's Ctrl-C test has it)
    temperature.press("Tab")
    page.locator("#chat-message textarea").fill(COUNT)
    page.locator("#chat-seed input").fill("1")
    page.evaluate("window.__lengths = []")
    page.locator("#chat-send").click()
    # The story has begun (its length noted at each look, to see it grow in steps); then Stop at once.
    try:
        page.wait_for_function("""q => { const t = document.querySelector('#chat-history').innerText;
                                         const i = t.lastIndexOf(q), n = i < 0 ? 0 : t.length - i - q.length;
                                         window.__lengths.push(n); return n > 40; }""",
                               arg=COUNT, timeout=SLOW)
    except sync_api.TimeoutError:
        shown = page.locator("#chat-history").inner_text()[-600:]
        status = page.locator("#chat-status").inner_text()
        raise AssertionError(f"the count never streamed; the chat shows {shown!r}, its status {status!r}") from None
    page.locator("#chat-stop").dispatch_event("click")  # (the streaming chat scrolls itself: no waiting for it)
    wait_for_text(page, "#chat-history", "Stopped: the reply above")
    growing = sorted({n for n in page.evaluate("window.__lengths") if n > 0})
    assert len(growing) >= 3, growing  # the answer appeared in several steps, not at once
