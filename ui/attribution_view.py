"""The Attribution tab: who writes the answer. Direct logit attribution per layer (attention and MLP)
and per head, the attention patterns of one layer at a time, and MoE routing where the model has experts.

The numbers come from `tracing.attribution.attribute_with` and `tracing.attention.attention_with`; the
figures from `attribution_plots` and `attention_plots`. The attention viewer fetches one layer per pick
(`attention_with(layers=[L])`), so a long prompt never fetches every layer's T x T patterns at once, and
says what was fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from tracing.errors import LensbenchError

from .attention_plots import ATTENTION_NOTE, MEAN, ROUTING_NOTE, attention_heatmap, head_choices, routing_heatmap
from .attribution_plots import heads_heatmap, layer_bars
from .choices import backend_label
from .core import Core, Page, message_of, no_progress, problem_markdown, sub_progress, user_errors
from .tokens import TokenLabels, byte_lookup, readable, typed_token

# Prompt, target, contrast (optional), position (-1 = the last token).
ATTRIBUTION_EXAMPLES = [
    ["The capital of Germany is", "␣Berlin", "␣Paris", -1],
    ["The Eiffel Tower is in the city of", "␣Paris", "␣London", -1],
    ["The opposite of hot is", "␣cold", "", -1],
]

MEAN_HEAD = -1  # the head picker's value for the mean over heads (a picker's value cannot be None)

HELP = f"""
**Direct logit attribution** (DLA) asks *who writes the answer*. The residual stream at a position is
a sum: the token's embedding, plus what each layer's **attention** adds, plus what each layer's **MLP**
adds. The answer's logit is that sum through the final norm, dotted with the answer's unembedding row;
with the norm's scale frozen at its own value every part gets its share, and the shares add up to the
model's own logit (difference).

- A **bar** is one layer's share of the logit: blue for its attention, orange for its MLP; up pushes
  the target (or target − contrast) up, down pushes it down. The grey bars are the embeddings and the
  `bias` (the final norm's and the unembedding's bias, which no layer writes); the black line is the
  running total, ending at the model's own logit.
- A **head cell** (row = layer, column = head) is that head's share of its layer's attention bar:
  blue pushes the answer up, red pushes it down, white is about 0.
- The **attention viewer** shows where one head (or the mean over the heads) of the picked layer
  looks: a row is a query position (the token looking), a column a key (the token looked at), a darker
  cell more attention; each row adds up to 100%. It fetches one layer at a time and says what it fetched.
- For a **mixture-of-experts** model, the routing map shows which expert each token went to in each
  MoE layer (colour = the first expert chosen).

**Exact, and where not:** on PyTorch the parts add up to the model's logit exactly (float rounding);
a final soft-cap (Gemma 2) comes after the sum, so the parts add up to the logit before it, and on a
quantized GGUF llama.cpp rounds the normed residual before its output matrix, so the parts miss the
logit by that rounding (the summary says by how much). DLA says what each part writes *directly*; a
part that only helps later parts (e.g. moves information for a later head) shows up small here, which
is what the Patch tab finds.

{ATTENTION_NOTE}
"""


def example_label(example: list) -> str:
    prompt, target, contrast, _ = example
    return f"{prompt} → {target}" + (f"  vs  {contrast}" if contrast else "")


@dataclass(frozen=True)
class Attributed:
    """What the attention viewer needs after a click: the inputs that gave the shown result (not
    what the boxes hold now), the result, and the attention of the layer on screen (no model)."""

    model: str
    backend: str
    ids: tuple
    attribution: object  # AttributionResult
    attention: object | None = None  # AttentionResult of one layer
    labels: TokenLabels | None = None


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def summary_markdown(result, labels: TokenLabels) -> str:
    """The result in words: the logit, whether the parts add up to it, and the parts writing most."""
    token = labels(result.tokens[result.position], result.token_ids[result.position])
    answer = f"`{readable(result.target)}`" + (f" rather than `{readable(result.contrast)}`" if result.contrast else "")
    metric = "logit difference" if result.contrast else "logit"
    lines = [
        f"At position {result.position} (`{token}`), the **{metric}** of {answer} is **{result.final_logit:.3f}**"
        + (f" before the soft-cap ({result.output_logit:.3f} after)" if result.softcap else "")
        + f"; the parts below add up to {result.total:.3f} (embeddings {_signed(result.embeddings)}, "
          f"bias {_signed(result.bias)}). {result.model} · {backend_label(result.backend)}."
    ]
    parts = [(f"{layer} attention", v) for layer, v in zip(result.layers, result.attention)]
    parts += [(f"{layer} MLP", v) for layer, v in zip(result.layers, result.mlp)]
    up = sorted((p for p in parts if p[1] > 0), key=lambda p: -p[1])[:3]
    down = sorted((p for p in parts if p[1] < 0), key=lambda p: p[1])[:3]
    if up:
        lines.append("**Writes it most:** " + ", ".join(f"{name} ({_signed(v)})" for name, v in up) + ".")
    if down:
        lines.append("**Writes against it most:** " + ", ".join(f"{name} ({_signed(v)})" for name, v in down) + ".")
    if result.heads is not None:
        flat = [(f"{layer} head {h}", float(result.heads[i, h]))
                for i, layer in enumerate(result.layers) for h in range(result.heads.shape[1])]
        top = sorted(flat, key=lambda p: -abs(p[1]))[:3]
        lines.append("**Heads writing most:** " + ", ".join(f"{name} ({_signed(v)})" for name, v in top) + ".")
    else:
        lines.append(f"**Heads:** not split here: {result.heads_note or 'not computed'}.")
    if result.info.get("note"):
        lines.append(f"*Note: {result.info['note']}.*")
    return "\n\n".join(lines)


def layer_options(result) -> list[tuple[str, int]]:
    """The layer picker: every layer (1-based), with its attention share of the logit."""
    return [(f"{layer} · attention {_signed(v)}", i + 1) for i, (layer, v) in enumerate(zip(result.layers, result.attention))]


def head_options(attributed: Attributed) -> list[tuple[str, int]]:
    """The head picker for the fetched layer: the mean first, then each head with its share, if split."""
    attention, result = attributed.attention, attributed.attribution
    layer = attention.layers[0]
    options = []
    for label, head in head_choices(attention):
        if head is None:
            options.append((label, MEAN_HEAD))
            continue
        if result.heads is not None:
            label += f" · {_signed(float(result.heads[layer - 1, head]))}"
        options.append((label, head))
    return options


def strongest_layer(result) -> int:
    """The layer whose attention writes the most (either way): what the viewer opens on."""
    return max(range(len(result.layers)), key=lambda i: abs(float(result.attention[i]))) + 1


def strongest_head(result, layer: int) -> int:
    """The head of `layer` writing the most, or the mean when the heads were not split."""
    if result.heads is None:
        return MEAN_HEAD
    row = result.heads[layer - 1]
    return max(range(len(row)), key=lambda h: abs(float(row[h])))


def fetched_markdown(attention) -> str:
    return (f"Fetched {attention.info.get('fetched', '')} "
            f"({attention.info.get('seconds', 0):.2f} s). Each pick of a layer fetches that layer alone.")


class AttributionView:
    """The Attribution tab: the bars, the heads, the attention viewer and the routing map."""

    id, title = "attribution", "Attribution"

    def __init__(self, core: Core):
        self.core = core

    # ---------------------------------------------------------------- what a click runs

    def backend_choices(self, model) -> tuple[list, dict]:
        """The backends attribution and attention patterns run on, marked as the Lens tab marks them."""
        from tracing.attention import RUNTIMES as ATTENTION
        from tracing.attribution import RUNTIMES as ATTRIBUTION

        runs = set(ATTRIBUTION) & set(ATTENTION)
        choices, reasons = self.core.catalog.backend_choices(model)
        return [c for c in choices if c[1] in runs], {b: r for b, r in reasons.items() if b in runs}

    def model_changed(self, model, backend):
        choices, reasons = self.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(choices=choices, value=backend if backend in usable else (usable[0] if usable else backend))

    @user_errors
    def attribute(self, prompt, target, contrast, position, model, backend, ignore_memory=False,
                  progress=gr.Progress(track_tqdm=True)):
        """Direct logit attribution (the "attribute" API): `target` (one token, '␣' a space; empty: the
        model's own prediction), minus `contrast` if given, at `position` of `prompt` (-1 the last).
        Returns the summary (markdown), the layer bars, the heads heatmap, the attention pattern of the
        layer whose attention writes the most (its strongest head), what was fetched (markdown), and
        the MoE routing heatmap (None for a dense model)."""
        attributed, out = self._attribute(prompt, target, contrast, position, model, backend, ignore_memory, progress)
        return out

    def attribute_steps(self, prompt, target, contrast, position, model, backend, ignore_memory=False,
                        progress=gr.Progress(track_tqdm=True)):
        """What the Attribute button runs: as `attribute`, plus the viewer's pickers and state, and a
        mistake as a message beside the inputs (the old result hidden and forgotten)."""
        note = self.core.loading_note(model, backend)
        if note:
            yield (gr.update(),) * 10 + (note,)
        try:
            attributed, out = self._attribute(prompt, target, contrast, position, model, backend, ignore_memory,
                                              progress)
        except Exception as exc:
            yield ("", None, None, gr.update(choices=[], value=None), gr.update(choices=[], value=None), None, "",
                   gr.update(value=None, visible=False), None, gr.update(visible=False),
                   problem_markdown(message_of(exc, "attribute"), "Not attributed."))
            return
        summary, bars, heads, pattern, fetched, routing = out
        layer, head = attributed.attention.layers[0], self._head_value(attributed)
        yield (summary, bars, heads, gr.update(choices=layer_options(attributed.attribution), value=layer),
               gr.update(choices=head_options(attributed), value=head), pattern, fetched,
               gr.update(value=routing, visible=routing is not None), attributed, gr.update(visible=True), "")

    @staticmethod
    def _head_value(attributed: Attributed) -> int:
        head = strongest_head(attributed.attribution, attributed.attention.layers[0])
        return head if head in attributed.attention.heads else MEAN_HEAD

    def _attribute(self, prompt, target, contrast, position, model, backend, ignore_memory=False,
                   progress=no_progress):
        from tracing.attention import attention_with
        from tracing.attribution import RUNTIMES, attribute_with

        core = self.core
        prompt = core.check_prompt(prompt)
        if backend not in RUNTIMES:
            raise LensbenchError(f"Attribution runs on {' and '.join(map(backend_label, RUNTIMES))}.")
        position = -1 if position is None or position == "" else position
        tracer = core.open(model, backend, ignore_memory)
        ids = tracer.encode(prompt)
        core.check_tokens(len(ids), verb="attributes")
        step = sub_progress(progress, 0.1, 0.9)
        step(0.0, desc="attributing")
        result = attribute_with(tracer, None, typed_token(target) or None, typed_token(contrast) or None, position,
                                ids=ids)
        step(0.6, desc="attention of one layer")
        layer = strongest_layer(result)
        attention = attention_with(tracer, ids=ids, layers=[layer], routing=True)
        labels = TokenLabels(byte_lookup(tracer))
        attributed = Attributed(model, backend, tuple(ids), result, attention, labels)
        pattern = attention_heatmap(attention, layer, self._pattern_head(self._head_value(attributed)), labels)
        routing = routing_heatmap(attention.routing, labels) if attention.routing is not None else None
        summary = summary_markdown(result, labels)
        attributed = replace(attributed, labels=labels.frozen())
        return attributed, (summary, layer_bars(result), heads_heatmap(result), pattern,
                            fetched_markdown(attention) + ("\n\n" + ROUTING_NOTE if routing is not None else ""),
                            routing)

    @staticmethod
    def _pattern_head(head) -> int | None:
        return None if head is None or int(head) == MEAN_HEAD else int(head)

    def show_attention(self, attributed: Attributed | None, layer, head, ignore_memory=False):
        """The attention viewer: the picked layer (fetched alone, unless it is the one on screen) and
        head (or the mean over heads), for the prompt that gave the result shown. Returns the head
        picker, the figure, what was fetched, and the state; a mistake as a message under the viewer."""
        from tracing.attention import attention_with

        if attributed is None:
            return gr.update(), None, problem_markdown("Press **Attribute** first."), None
        try:
            if layer is None:
                raise LensbenchError("Pick a layer.")
            layer = int(layer)
            if attributed.attention is None or attributed.attention.layers != [layer]:
                tracer = self.core.open(attributed.model, attributed.backend, ignore_memory)
                attention = attention_with(tracer, ids=list(attributed.ids), layers=[layer], routing=False)
                labels = TokenLabels(byte_lookup(tracer))
                attributed = replace(attributed, attention=attention)
            else:
                labels = attributed.labels
            head = strongest_head(attributed.attribution, layer) if head is None else head
            heads = attributed.attention.heads
            head = MEAN_HEAD if head is None or int(head) not in heads else int(head)
            figure = attention_heatmap(attributed.attention, layer, self._pattern_head(head), labels)
        except Exception as exc:
            return gr.update(), None, problem_markdown(message_of(exc, "attention")), attributed
        return (gr.update(choices=head_options(attributed), value=head), figure, fetched_markdown(attributed.attention),
                attributed)

    def show_layer(self, attributed, layer, ignore_memory=False):
        """A layer picked: fetched alone, shown for its strongest head."""
        return self.show_attention(attributed, layer, None, ignore_memory)

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        s, catalog = self.core.settings, self.core.catalog
        choices, reasons = self.backend_choices(catalog.default_name())
        first = ATTRIBUTION_EXAMPLES[0]
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=330):
                self.prompt = gr.Textbox(label="Prompt", value=first[0], max_length=s.max_prompt_chars,
                                         elem_id="attribution-prompt")
                with gr.Row():
                    self.target = gr.Textbox(label="Target token", value=first[1], elem_id="attribution-target",
                                             info="␣ is a space; empty: the model's own prediction.")
                    self.contrast = gr.Textbox(label="Contrast (optional)", value=first[2],
                                               elem_id="attribution-contrast", info="attributes target − contrast")
                self.position = gr.Number(value=first[3], precision=0, label="Position (−1 = the last token)",
                                          elem_id="attribution-position",
                                          info="which token's next-token prediction, from 0")
                self.button = gr.Button("Attribute", variant="primary", elem_id="attribution-run")
                self.message = gr.Markdown("Press **Attribute** or click an example: the bars appear on the right.",
                                           elem_id="attribution-message")
                self.examples = gr.Dataset(components=["textbox"], samples=[[example_label(e)] for e in ATTRIBUTION_EXAMPLES],
                                           label="Examples (click to run)", type="index", layout="table",
                                           headers=["prompt → target vs contrast"], elem_id="attribution-examples")
                self.backend = gr.Radio(choices, value=next((b for _, b in choices if b not in reasons), "hooks"),
                                        label="Runtime", elem_id="attribution-backend")
            with gr.Column(scale=3):
                with gr.Accordion("What am I looking at?", open=False, elem_id="attribution-help"):
                    gr.Markdown(HELP)
                with gr.Column(visible=False, elem_id="attribution-results") as self.results:
                    self.summary = gr.Markdown(elem_id="attribution-summary")
                    self.bars = gr.Plot(show_label=False, elem_id="attribution-bars")
                    self.heads = gr.Plot(show_label=False, elem_id="attribution-heads")
                    gr.Markdown("#### Where a layer's heads look", elem_id="attribution-viewer-title")
                    with gr.Row():
                        self.layer = gr.Dropdown([], label="Layer", elem_id="attribution-layer", interactive=True)
                        self.head = gr.Dropdown([], label="Head", elem_id="attribution-head", interactive=True,
                                                info=f"or the {MEAN}")
                    self.fetched = gr.Markdown(elem_id="attribution-fetched")
                    self.pattern = gr.Plot(show_label=False, elem_id="attribution-pattern")
                    self.routing = gr.Plot(show_label=False, visible=False, elem_id="attribution-routing")
                self.state = gr.State(None)
                self.api_only = gr.Button("attribute", visible=False)

    # What the Attribute button fills (`attribute_steps` yields them in this order) and what the
    # "attribute" API returns: the components' names, for the links from other tabs.
    STEP_OUTPUTS = ("summary", "bars", "heads", "layer", "head", "pattern", "fetched", "routing", "state", "results",
                    "message")
    API_OUTPUTS = ("summary", "bars", "heads", "pattern", "fetched", "routing")

    @property
    def outputs(self) -> list:
        return [getattr(self, name) for name in self.STEP_OUTPUTS]

    @property
    def api_outputs(self) -> list:
        return [getattr(self, name) for name in self.API_OUTPUTS]

    def connect(self, page: Page) -> None:
        inputs = [self.prompt, self.target, self.contrast, self.position, page.model, self.backend, page.ignore_memory]
        outputs = self.outputs
        ui = dict(api_visibility="private", show_progress_on=[self.bars], **page.heavy)
        self.button.click(self.attribute_steps, inputs, outputs, **ui)
        self.examples.click(lambda i: tuple(ATTRIBUTION_EXAMPLES[i]), self.examples,
                            [self.prompt, self.target, self.contrast, self.position], api_visibility="private",
                            queue=False).then(self.attribute_steps, inputs, outputs, **ui)
        self.api_only.click(self.attribute, inputs, self.api_outputs, api_name="attribute", **page.heavy)
        viewer = [self.head, self.pattern, self.fetched, self.state]
        pick = dict(api_visibility="private", show_progress_on=[self.pattern], **page.heavy)
        self.layer.input(self.show_layer, [self.state, self.layer, page.ignore_memory], viewer, **pick)
        self.head.input(self.show_attention, [self.state, self.layer, self.head, page.ignore_memory], viewer, **pick)
        page.model.change(self.model_changed, [page.model, self.backend], [self.backend], api_visibility="private",
                          concurrency_limit=None)
