"""The Chat tab: a streaming chat with the picked GGUF model; "Trace this reply", which fills the
Lens tab's inputs with the conversation as the model read it and traces the reply; and "Attribute
this reply", which fills the Attribution tab's inputs (the conversation up to the reply, the reply's
first token as the target) and attributes it.

A reply cut by the token limit, or stopped, says so in the conversation (a note the app adds,
never sent back to the model).
"""

from __future__ import annotations

import gradio as gr

from tracing.errors import LensbenchError

from .core import Core, Page, message_of, problem_markdown, user_errors
from .tokens import shown_token

HELP = """
**Chat** with the model picked above (a GGUF file: llama.cpp runs it). The model's own chat template
wraps your messages as it was trained to read them.

- **Temperature** 0 always picks the likeliest next token (the same answer every time); higher values
  pick less likely tokens more often. **Top-p** keeps only the likeliest tokens that together make up
  that much probability. **Seed** makes a random answer repeatable.
- **Max new tokens** bounds a reply; a reply cut there says so, and so does one you **Stop**.
- **Trace this reply** opens the Lens tab on the conversation exactly as the model read it (its chat
  template written out, special tokens included) and traces the reply's tokens: each column shows
  what the model would write next after that token, layer by layer.
- **Attribute this reply** opens the Attribution tab on the conversation up to the reply, with the
  reply's first token as the target: which layers and heads wrote that token.
"""


def _text(content) -> str:
    """A chat message's text, whether Gradio gives a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def is_note(message: dict) -> bool:
    """A note the app added to the conversation (a reply cut or stopped), not the model's words."""
    return bool((message.get("metadata") or {}).get("title"))


def plain_messages(history) -> list[dict]:
    """Gradio chat history -> [{"role", "content": str}] for `chat.engine` (the app's notes left out)."""
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []
            if m.get("role") in ("user", "assistant") and not is_note(m)]


def ending_note(finish_reason: str | None, max_tokens: int) -> dict | None:
    """The note after a reply that did not end by itself, for the conversation."""
    if finish_reason == "length":
        title = (f"✂️ Cut off at {max_tokens:,} new tokens (the Max new tokens setting): raise it to let the "
                 "model finish.")
    elif finish_reason == "cancelled":
        title = "⏹ Stopped: the reply above is what the model had written when you pressed Stop."
    else:
        return None
    return {"role": "assistant", "content": "", "metadata": {"title": title, "status": "done"}}


class ChatView:
    """The Chat tab: send, stop, the model's facts, and the links to the Lens and Attribution tabs."""

    id, title = "chat", "Chat"

    def __init__(self, core: Core, lens, attribution=None):
        self.core = core
        self.lens = lens  # the Lens tab's view: "Trace this reply" fills its inputs and traces them
        self.attribution = attribution  # the Attribution tab's view, for "Attribute this reply"

    # ---------------------------------------------------------------- what a click runs

    def _conversation(self, message, history, model, system, temperature, top_p, max_tokens, seed,
                      ignore_memory=False, request: gr.Request = None):
        """The history as the answer grows (the question first), then with a note when the answer
        was cut or stopped. Raises a LensbenchError for a mistake before anything is sent."""
        from chat.engine import stream_chat

        s = self.core.settings
        message = (message or "").strip()
        if not message:
            raise LensbenchError("Type a message first.")
        if len(message) > s.max_prompt_chars:
            raise LensbenchError(f"The message is longer than {s.max_prompt_chars:,} characters.")
        max_tokens = int(max_tokens or 256)
        if not 1 <= max_tokens <= s.max_new_tokens:
            raise LensbenchError(f"Max new tokens must be between 1 and {s.max_new_tokens:,}.")
        entry = self.core.catalog.pick(model, gguf_only=True)
        messages = plain_messages(history) + [{"role": "user", "content": message}]
        shown = [m for m in history or [] if m.get("role") in ("user", "assistant")]
        shown += [{"role": "user", "content": message}]
        yield shown + [{"role": "assistant", "content": ""}], []
        cancel = self.core.cancel_event(request)
        seed = None if seed is None or int(seed) < 0 else int(seed)
        with self.core.loading(ignore_memory):  # no yield inside: see `Core.loading`
            stream = stream_chat(entry.name, messages, system=(system or None), temperature=float(temperature),
                                 top_p=float(top_p), max_tokens=max_tokens, seed=seed, cancel=cancel,
                                 check_memory=not self.core.memory_check_off(ignore_memory))
        notices = [notice.message for notice in stream.notices]  # e.g. the oldest turns were dropped to fit
        try:
            for _delta in stream:
                yield shown + [{"role": "assistant", "content": stream.text}], notices
        finally:
            stream.close()  # a closed stream (visitor left, or Stop) ends generation too
        note = ending_note(stream.finish_reason, max_tokens)
        yield shown + [{"role": "assistant", "content": stream.text}] + ([note] if note else []), notices

    @user_errors
    def chat(self, message, history, model, system, temperature, top_p, max_tokens, seed, ignore_memory=False,
             request: gr.Request = None):
        """Send `message` (the "chat" API): stream the answer into the history, clear the message box."""
        for shown, notices in self._conversation(message, history, model, system, temperature, top_p, max_tokens,
                                                 seed, ignore_memory, request):
            for text in notices:
                gr.Warning(text)
            yield shown, ""

    def chat_steps(self, message, history, model, system, temperature, top_p, max_tokens, seed, ignore_memory=False,
                   request: gr.Request = None):
        """What Send runs: as `chat`, and a line under the message box (a mistake, or why older turns were
        left out). A mistake leaves the conversation and the typed message as they were."""
        status = ""
        try:
            for shown, notices in self._conversation(message, history, model, system, temperature, top_p,
                                                     max_tokens, seed, ignore_memory, request):
                status = "  \n".join(f"ℹ️ {text}" for text in notices)
                yield shown, "", status
        except Exception as exc:
            yield history, message, problem_markdown(message_of(exc, "chat"), "Not sent.")

    def stop(self, request: gr.Request = None) -> None:
        """Stop this visitor's answer being generated (the model finishes its current token)."""
        self.core.cancel(request)

    def model_facts(self, model) -> str:
        """What the picked model is for chat: its GGUF facts, or why chat cannot run it."""
        try:
            from chat.engine import model_facts

            entry = self.core.catalog.pick(model, gguf_only=True)
            return _facts_markdown(model_facts(entry.name))
        except ImportError:
            return self.core.catalog.facts(model)
        except LensbenchError as exc:
            return problem_markdown(str(exc))

    def reply_as_lens_input(self, history, model, system, ignore_memory=False) -> tuple[str, int]:
        """The last reply as the Lens tab's inputs: the conversation as the model read it, and the
        token the reply starts at."""
        messages = plain_messages(history)
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise LensbenchError("There is no reply to trace yet: chat first.")
        entry = self.core.catalog.pick(model, gguf_only=True)
        problem = self.core.catalog.backend_problem(entry.name, "llama-cpp")
        if problem:
            raise LensbenchError(f"Tracing a reply needs the llama.cpp backend: {problem}")
        from tracing.llama_cpp_backend import reply_as_prompt

        context = ([{"role": "system", "content": system}] if system else []) + messages[:-1]
        with self.core.loading(ignore_memory):
            return reply_as_prompt(entry.name, context, messages[-1]["content"])

    def reply_as_attribution_input(self, history, model, system, ignore_memory=False) -> tuple[str, str]:
        """The last reply as the Attribution tab's inputs: the conversation as the model read it, up
        to the reply, and the reply's first token (as a token box shows it, '␣' a space)."""
        prompt, start = self.reply_as_lens_input(history, model, system, ignore_memory)
        reply = plain_messages(history)[-1]["content"]
        tracer = self.core.open(model, "llama-cpp", ignore_memory)
        first = tracer.encode(prompt)[start]
        return prompt[: len(prompt) - len(reply)], shown_token(tracer.piece(first).decode("utf-8", "replace"))

    def attribute_reply_steps(self, history, model, system, ignore_memory=False,
                              progress=gr.Progress(track_tqdm=True)):
        """What "Attribute this reply" runs: the Attribution tab opens with its inputs set to the reply
        (the conversation before it, its first token as the target, no contrast, the last position,
        llama.cpp), then attributes them as its Attribute button would."""
        view = self.attribution
        try:
            prompt, target = self.reply_as_attribution_input(history, model, system, ignore_memory)
        except Exception as exc:
            yield (gr.update(),) * 6 + (problem_markdown(message_of(exc, "attribute_reply"), "Not attributed."),) \
                + (gr.update(),) * len(view.STEP_OUTPUTS)
            return
        head = (gr.update(selected=view.id), prompt, target, "", -1, "llama-cpp", "")
        for step in view.attribute_steps(prompt, target, "", -1, model, "llama-cpp", ignore_memory, progress):
            yield head + step

    @user_errors
    def attribute_reply(self, history, model, system, ignore_memory=False, progress=gr.Progress(track_tqdm=True)):
        """The last reply's first token attributed on the same GGUF through llama.cpp (the
        "attribute_reply" API): the Attribution tab, its prompt, target, contrast, position and
        runtime, and its outputs (as the "attribute" API's)."""
        prompt, target = self.reply_as_attribution_input(history, model, system, ignore_memory)
        outputs = self.attribution.attribute(prompt, target, "", -1, model, "llama-cpp", ignore_memory, progress)
        return (gr.update(selected=self.attribution.id), prompt, target, "", -1, "llama-cpp", *outputs)

    def trace_reply_steps(self, history, model, system, top_k, temperature, metric, ignore_memory=False,
                          lens_kind="logit", progress=gr.Progress(track_tqdm=True)):
        """What "Trace this reply" runs: the Lens tab opens with its inputs set to the reply (prompt,
        no target, llama.cpp, trace from the reply's first token), then traces them as Trace would,
        with the lens the tab's "Lens (on the GGUF)" shows (`lens_kind`: logit, tuned or jacobian)."""
        lens = self.lens
        try:
            prompt, start = self.reply_as_lens_input(history, model, system, ignore_memory)
        except Exception as exc:
            yield (gr.update(),) * 5 + (problem_markdown(message_of(exc, "trace_reply"), "Not traced."),) \
                + (gr.update(),) * len(lens.outputs)
            return
        head = (gr.update(selected=lens.id), prompt, "", "llama-cpp", start, "")
        for step in lens.lens_steps(prompt, model, "llama-cpp", top_k, temperature, "", metric, start, ignore_memory,
                                    progress, lens_kind or "logit"):
            yield head + step

    @user_errors
    def trace_reply(self, history, model, system, top_k, temperature, metric, ignore_memory=False,
                    progress=gr.Progress(track_tqdm=True)):
        """The last reply of the chat traced on the same GGUF through llama.cpp (the "trace_reply"
        API): the Lens tab, its prompt, target, backend and first token, and its outputs."""
        prompt, start = self.reply_as_lens_input(history, model, system, ignore_memory)
        outputs = self.lens.lens(prompt, model, "llama-cpp", top_k, temperature, "", metric, start, ignore_memory,
                                 progress)
        return (gr.update(selected=self.lens.id), prompt, "", "llama-cpp", start, *outputs)

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        s = self.core.settings
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat-history")
                with gr.Row():
                    self.message = gr.Textbox(placeholder="Message", label="Message", show_label=False, scale=5,
                                              max_length=s.max_prompt_chars, elem_id="chat-message")
                    self.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    self.stop_button = gr.Button("Stop", scale=1, elem_id="chat-stop")
                self.status = gr.Markdown(elem_id="chat-status")
                with gr.Row():
                    self.trace_button = gr.Button("Trace this reply in the Lens →", elem_id="chat-trace")
                    self.attribute_button = gr.Button("Attribute this reply →", elem_id="chat-attribute",
                                                      visible=self.attribution is not None)
                    self.clear = gr.Button("Clear", elem_id="chat-clear")
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("What am I looking at?", open=False, elem_id="chat-help"):
                    gr.Markdown(HELP)
                self.facts = gr.Markdown(elem_id="chat-facts")
                self.system = gr.Textbox(label="System prompt", lines=2, placeholder="(the model's default)")
                self.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                             info="0 = always the likeliest token", elem_id="chat-temperature")
                self.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                self.max_tokens = gr.Slider(1, s.max_new_tokens, value=min(256, s.max_new_tokens), step=1,
                                            label="Max new tokens", info="a longer reply is cut here (it says so)",
                                            elem_id="chat-max-tokens")
                self.seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="chat-seed")
                self.api_only = gr.Button("chat", visible=False)
                self.api_trace = gr.Button("trace_reply", visible=False)
                self.api_attribute = gr.Button("attribute_reply", visible=False)

    def connect(self, page: Page) -> None:
        s = self.core.settings
        inputs = [self.message, self.chatbot, page.model, self.system, self.temperature, self.top_p, self.max_tokens,
                  self.seed, page.ignore_memory]
        ui = dict(api_visibility="private", concurrency_id="chat", concurrency_limit=s.concurrency)
        self.send.click(self.chat_steps, inputs, [self.chatbot, self.message, self.status], **ui)
        self.message.submit(self.chat_steps, inputs, [self.chatbot, self.message, self.status], **ui)
        self.api_only.click(self.chat, inputs, [self.chatbot, self.message], api_name="chat", concurrency_id="chat",
                            concurrency_limit=s.concurrency)
        self.stop_button.click(self.stop, None, None, api_name="stop", queue=False)
        self.clear.click(lambda: ([], ""), None, [self.chatbot, self.status], api_visibility="private", queue=False)
        page.model.change(self.model_facts, page.model, self.facts, api_visibility="private", concurrency_limit=None)
        page.blocks.load(self.model_facts, page.model, self.facts, api_visibility="private", concurrency_limit=None)

        lens = self.lens
        trace_inputs = [self.chatbot, page.model, self.system, lens.top_k, lens.temperature, lens.metric,
                        page.ignore_memory]
        head = [page.tabs, lens.prompt, lens.target, lens.backend, lens.first_position, self.status]
        # The button traces with the lens the Lens tab shows for llama.cpp (the API: the logit lens).
        lens.traced_event(self.trace_button.click, self.trace_reply_steps, trace_inputs + [lens.lens_kind],
                          head + lens.outputs, page.heavy)
        lens_api = head[:-1] + lens.api_outputs
        self.api_trace.click(self.trace_reply, trace_inputs, lens_api, api_name="trace_reply", **page.heavy)

        view = self.attribution
        if view is None:
            return
        reply_inputs = [self.chatbot, page.model, self.system, page.ignore_memory]
        head = [page.tabs, view.prompt, view.target, view.contrast, view.position, view.backend]
        self.attribute_button.click(self.attribute_reply_steps, reply_inputs, head + [self.status] + view.outputs,
                                    api_visibility="private", show_progress_on=[view.bars], **page.heavy)
        self.api_attribute.click(self.attribute_reply, reply_inputs, head + view.api_outputs,
                                 api_name="attribute_reply", **page.heavy)


def _facts_markdown(facts) -> str:
    """`chat.engine.ModelFacts` as markdown: its summary (ending with the memory verdict), and the
    verdict's whole message when it warns or refuses."""
    text = getattr(facts, "summary", None)
    text = text() if callable(text) else text
    verdict = getattr(facts, "memory", None)
    if verdict is not None and not verdict.fits:
        return f"⚠️ {text}  \n{verdict.message}"
    if getattr(facts, "fits", True) is False:
        return f"⚠️ {text}"
    return text or str(facts)


__all__ = ["ChatView", "plain_messages", "ending_note"]
