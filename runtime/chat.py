"""Chat generation on any GGUF through llama.cpp, on the shared model of `runtime.llama_cpp`: what
`chat.engine` (the app's Chat tab and `python -m chat`) and `tracing.steering` (answers with a
control vector) both run.

The model's own chat template (from the GGUF) is applied by llama-cpp-python's
`create_chat_completion`; generation stops on the model's end-of-turn tokens. Requests to one
model are served one after another by a worker thread that owns the model while it writes.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tracing.errors import BadPrompt, LensbenchError, UnsupportedModel
from tracing.models import resolve

from .llama_cpp import SharedLlama, shared_llama

ROLES = ("user", "assistant")


def gguf_path(model: str | None) -> tuple[Path, str]:
    """(the resolved path, the display name) of a GGUF model spec (see `tracing.models.resolve`);
    UnsupportedModel, in one sentence, for a model folder or hub id (chat runs GGUF files only)."""
    source = resolve(model)
    if source.kind != "gguf":
        what = "a Hugging Face model folder" if source.kind == "hf" else "a Hugging Face hub id"
        raise UnsupportedModel(
            f"'{source.name}' is {what}; chat runs GGUF files through llama.cpp. "
            "Pick a .gguf file (the lens works with both)."
        )
    return source.path.resolve(), source.name


def load(model: str | None = None, context_length: int | None = None, *, check_memory: bool = True) -> SharedLlama:
    """Load `model` for chat (or return it if already loaded): the same object for every caller.

    `context_length` (tokens) applies to the first load; by default the model's own, capped.
    The memory verdict is taken before loading: NotEnoughMemory for a model larger than this
    machine's memory, unless `check_memory` is False; a tight fit loads with a
    `tracing.models.MemoryWarning`. A failed load raises a LensbenchError and leaves every model
    loaded before usable.
    """
    path, _ = gguf_path(model)
    return shared_llama(path, n_ctx=context_length, check_memory=check_memory)


# ---------------------------------------------------------------- chat


@dataclass(frozen=True)
class ChatNotice:
    """Something the person should know about an answer; show `message` beside the chat.

    kind: "trimmed" (the oldest turns were left out to fit the context), "shortened" (the
    answer is limited below max_tokens to fit the context), "no_template" (the GGUF has no chat
    template; a generic ChatML format is used), "system_merged" (the template has no system
    role; the system prompt was put at the start of the first user message).
    """

    kind: str
    message: str
    dropped_turns: int = 0


class ChatStream(Iterator[str]):
    """One answer, streamed: iterating yields text deltas (str) as the model writes them.

    Known as soon as `stream_chat` returns:
      notices        list of ChatNotice (e.g. older turns dropped to fit the context)
      messages       the messages sent to the model, after any dropping
      prompt_tokens  the token ids the model reads: the chat template applied to `messages`
      max_tokens     the answer's token limit actually used
      seed           the sampling seed (drawn at random when none was given: reuse it to reproduce)
    Filled in while it runs:
      text           everything yielded so far
      finish_reason  None while running, then "stop" (end of turn), "length" (max_tokens
                     reached) or "cancelled"
      time_to_first_token  seconds from the stream_chat call to the first delta (a load included)
      started_at, finished_at  time.perf_counter() when this answer got and released the model
    Closing it (or dropping it) stops generation; the model is freed for the next request.
    """

    def __init__(self, shared: SharedLlama, request: dict, plan: "_Plan", cancel: threading.Event | None, requested: float):
        self.model_name = shared.path.name
        self.notices: list[ChatNotice] = plan.notices
        self.messages: list[dict] = plan.messages
        self.prompt_tokens: list[int] = plan.prompt_tokens
        self.max_tokens: int = plan.max_tokens
        self.seed: int = request["seed"]
        self.text = ""
        self.time_to_first_token: float | None = None
        self._cancel = cancel or threading.Event()
        self._job = _Job()
        self._requested = requested
        request = dict(request, messages=plan.messages, max_tokens=plan.max_tokens)
        # The worker owns the lock from start to end of generation: consumers may iterate from any
        # thread (Gradio steps generators in a thread pool), which a held RLock would not allow.
        shared.worker.submit(_generate, shared, request, self._job, self._cancel)

    @property
    def finish_reason(self) -> str | None:
        return self._job.finish_reason

    @property
    def started_at(self) -> float | None:
        return self._job.started_at

    @property
    def finished_at(self) -> float | None:
        return self._job.finished_at

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        while True:
            if self._cancel.is_set() or self._job.stop.is_set():
                self.close()
                raise StopIteration
            try:
                item = self._job.out.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _DONE:
                self._job.out.put(_DONE)  # later calls end too
                raise StopIteration
            if isinstance(item, BaseException):
                self._job.out.put(_DONE)
                raise item
            if self.time_to_first_token is None:
                self.time_to_first_token = time.perf_counter() - self._requested
            self.text += item
            return item

    def close(self) -> None:
        """Stop generating (the text so far stays in `text`); finish_reason becomes "cancelled" unless it had ended."""
        self._job.stop.set()
        if self._job.finish_reason is None:
            self._job.finish_reason = "cancelled"

    def __del__(self):
        self._job.stop.set()


def stream_chat(
    model: str | None,
    messages: list[dict],
    *,
    system: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 256,
    seed: int | None = None,
    cancel: threading.Event | None = None,
    check_memory: bool = True,
    steering=None,
) -> ChatStream:
    """Answer the last user message, streaming text deltas.

    model: anything `tracing.models.resolve` takes (None: the bundled SmolLM2-135M-Instruct);
        only GGUF files chat (UnsupportedModel otherwise). Loaded on first use, then shared.
    messages: the conversation, oldest first: [{"role": "user" | "assistant", "content": str}],
        ending with the user's message.
    system: an optional system prompt. temperature (0 = always the likeliest token), top_p,
        max_tokens (new tokens at most), seed (same seed, same answer).
    cancel: a threading.Event; setting it stops the answer within a token.
    check_memory: False loads the model even when it is larger than this machine's memory.
    steering: a `tracing.steering.Steering` (a control vector, strength and layers), applied with
        llama.cpp's control-vector mechanism on this model's context for this answer only; the
        prompt cache is dropped when it is set and when it is taken off (it was computed without it).

    Returns a ChatStream: iterate it for the deltas. When the conversation does not fit the
    model's context, the oldest turns are dropped (and the answer shortened if need be) and
    `stream.notices` says so, before the first delta; show those notices to the person.
    Requests to the same model are served one after another. Loading, memory and prompt
    problems raise tracing.errors exceptions here, before anything is generated.
    """
    requested = time.perf_counter()
    check_settings(temperature, top_p, max_tokens, seed)
    conversation = normalize_messages(messages)
    shared = load(model, check_memory=check_memory)
    plan = _fit_context(shared, system, conversation, int(max_tokens))
    if steering is not None:
        steering.check_chat_model(shared)  # a vector for another model: its message, before anything runs
    request = dict(
        temperature=float(temperature),
        top_p=float(top_p),
        seed=int(seed) if seed is not None else random.randrange(2**31),
        steering=steering,
    )
    return ChatStream(shared, request, plan, cancel, requested)


def chat(model: str | None, messages: list[dict], **options) -> str:
    """The whole answer at once (same arguments as `stream_chat`)."""
    return "".join(stream_chat(model, messages, **options))


def check_settings(temperature, top_p, max_tokens, seed) -> None:
    """LensbenchError, in one sentence, for a sampling setting out of range: temperature 0-5,
    top_p in (0, 1], max_tokens a whole number >= 1, seed a whole number or None."""
    if not 0 <= float(temperature) <= 5:
        raise LensbenchError(f"Temperature must be between 0 and 5 (got {temperature}).")
    if not 0 < float(top_p) <= 1:
        raise LensbenchError(f"Top-p must be above 0 and at most 1 (got {top_p}).")
    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise LensbenchError(f"Max new tokens must be a whole number of at least 1 (got {max_tokens}).")
    if seed is not None and int(seed) != seed:
        raise LensbenchError(f"The seed must be a whole number (got {seed}).")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Plain {"role", "content": str} messages; Gradio-style content lists become their text."""
    out = []
    for message in messages or []:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadPrompt(f"A chat message has role {role!r}; only 'user' and 'assistant' are allowed (pass system= for a system prompt).")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        elif isinstance(content, dict):
            content = content.get("text", "")
        out.append({"role": role, "content": "" if content is None else str(content)})
    if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise BadPrompt("There is nothing to answer: the conversation must end with a message from you.")
    return out


@dataclass
class _Plan:
    messages: list[dict]  # as sent to create_chat_completion
    prompt_tokens: list[int]
    max_tokens: int
    notices: list[ChatNotice] = field(default_factory=list)


def _fit_context(shared: SharedLlama, system: str | None, conversation: list[dict], max_tokens: int) -> _Plan:
    """Drop the oldest turns until prompt + answer fit the context; say what was dropped."""
    n_ctx = shared.n_ctx
    notices: list[ChatNotice] = []
    if not shared.chat_template:
        notices.append(ChatNotice("no_template", "This model's file has no chat template; a generic (ChatML) format is used, so answers may be poor."))
    system = system.strip() if system and system.strip() else None
    dropped = 0
    while True:
        messages, tokens, merged = _render(shared, system, conversation)
        if len(tokens) + max_tokens <= n_ctx or len(conversation) == 1:
            break
        conversation = conversation[1:]  # a turn: the oldest user message and the answers after it
        while conversation[0]["role"] == "assistant":
            conversation = conversation[1:]
        dropped += 1
    if merged:
        notices.append(ChatNotice("system_merged", "This model's chat template has no system role: the system prompt was put at the start of your first message."))
    if dropped:
        turns = "turn was" if dropped == 1 else "turns were"
        notices.append(
            ChatNotice(
                "trimmed",
                f"The conversation is longer than this model's context ({n_ctx:,} tokens): the oldest {dropped} {turns} left out of what it reads.",
                dropped,
            )
        )
    room = n_ctx - len(tokens)
    if room < 1:
        raise BadPrompt(
            f"Your message is too long for this model: with the chat template it takes {len(tokens):,} tokens, "
            f"and the model's context holds {n_ctx:,}. Shorten it{' or the system prompt' if system else ''}."
        )
    if room < max_tokens:
        notices.append(ChatNotice("shortened", f"Only {room:,} tokens of the context are left, so this answer is limited to {room:,} tokens."))
        max_tokens = room
    return _Plan(messages, tokens, max_tokens, notices)


def _render(shared: SharedLlama, system: str | None, conversation: list[dict]) -> tuple[list[dict], list[int], bool]:
    """The messages to send, the prompt tokens the template makes of them, and whether the system prompt was merged."""
    messages = ([{"role": "system", "content": system}] if system else []) + conversation
    merged = False
    try:
        prompt = shared.chat_formatter(messages=messages).prompt
    except Exception:
        prompt = None
        if system:  # templates without a system role (Gemma 2, some Mistrals) raise: fold it into the first message
            first = dict(conversation[0], content=f"{system}\n\n{conversation[0]['content']}")
            messages, merged = [first] + conversation[1:], True
            try:
                prompt = shared.chat_formatter(messages=messages).prompt
            except Exception:
                pass
        if prompt is None:
            raise BadPrompt(
                "This model's chat template rejects the conversation (it may need strictly alternating "
                "user and assistant messages, starting with the user)."
            ) from None
    # Tokenizing reads only the vocabulary; it is safe beside a running generation.
    tokens = shared.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    return messages, tokens, merged


# ---------------------------------------------------------------- generation (worker thread)

_DONE = object()


class _Job:
    def __init__(self):
        self.out: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.finish_reason: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None


def _generate(shared: SharedLlama, request: dict, job: _Job, cancel: threading.Event) -> None:
    def stopped() -> bool:
        return job.stop.is_set() or cancel.is_set()

    while not shared.lock.acquire(timeout=0.05):  # our turn, unless cancelled while waiting
        if stopped():
            job.finish_reason = "cancelled"
            job.out.put(_DONE)
            return
    job.started_at = time.perf_counter()
    chunks = None
    steering = request.pop("steering", None)
    steered = False
    try:
        if stopped():
            job.finish_reason = "cancelled"
            return
        if shared.closed:
            raise LensbenchError("The model was unloaded while this message waited; send it again.")
        if steering is not None:
            steering.apply_to_chat(shared)
            steered = True
        chunks = shared.llama.create_chat_completion(stream=True, **request)
        for chunk in chunks:
            if stopped():
                job.finish_reason = job.finish_reason or "cancelled"
                break
            choice = chunk["choices"][0]
            delta = choice["delta"].get("content")
            if delta:
                job.out.put(delta)
            if choice.get("finish_reason") and job.finish_reason is None:
                job.finish_reason = choice["finish_reason"]
    except Exception as exc:  # handed to the consumer, raised from __next__
        job.out.put(exc)
    finally:
        if chunks is not None:
            chunks.close()
        if steered and not shared.closed:
            try:  # never leaves the lock held
                steering.remove_from_chat(shared)
            except Exception as exc:
                job.out.put(exc)
        job.finished_at = time.perf_counter()
        shared.lock.release()
        job.out.put(_DONE)


__all__ = ["ChatNotice", "ChatStream", "chat", "check_settings", "gguf_path", "load", "normalize_messages", "stream_chat"]
