"""chat.engine on the real bundled SmolLM2-135M-Instruct GGUF: streaming, seeds, template, limits, cancel, turns."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from chat.engine import chat, load, stream_chat
from tracing.errors import BadPrompt, LensbenchError
from tracing.models import bundled_gguf

GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module")
def smol():
    return load(None)


def test_streams_incremental_text(smol):
    stream = stream_chat(None, GERMANY, temperature=0, seed=1)
    deltas, arrivals = [], []
    for delta in stream:
        deltas.append(delta)
        arrivals.append(time.perf_counter())
    assert len(deltas) >= 4, deltas
    assert "".join(deltas) == stream.text
    assert "Berlin" in stream.text
    assert stream.finish_reason == "stop"  # the model's end-of-turn token ended it, not the limit
    assert arrivals[-1] - arrivals[0] > 0.005  # deltas came as they were generated, not in one piece
    assert 0 < stream.time_to_first_token < 60


def test_fixed_seed_gives_the_same_answer(smol):
    options = dict(temperature=1.0, top_p=0.95, max_tokens=16)
    first = chat(None, STORY, seed=1234, **options)
    chat(None, GERMANY, seed=7, **options)  # something else in between: the KV cache now holds another prompt
    second = chat(None, STORY, seed=1234, **options)
    assert first == second
    others = {chat(None, STORY, seed=seed, **options) for seed in (1, 2)}
    assert others != {first}  # the seed does drive sampling


def test_unseeded_answers_report_their_seed(smol):
    stream = stream_chat(None, STORY, temperature=1.0, max_tokens=12)
    text = "".join(stream)
    assert chat(None, STORY, temperature=1.0, max_tokens=12, seed=stream.seed) == text


def test_chat_template_role_markers_reach_the_model(smol):
    stream = stream_chat(None, GERMANY, system="You answer in one word.", temperature=0, seed=1, max_tokens=8)
    "".join(stream)
    llama = smol.llama
    prompt = llama.detokenize(stream.prompt_tokens, special=True).decode()
    assert prompt.startswith("<|im_start|>system\nYou answer in one word.<|im_end|>\n")
    assert "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    im_start = llama.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and stream.prompt_tokens.count(im_start[0]) == 3  # special tokens, not text
    with smol.lock:  # what llama.cpp actually evaluated starts with exactly these tokens
        assert llama.input_ids[: len(stream.prompt_tokens)].tolist() == stream.prompt_tokens


def test_default_system_prompt_comes_from_the_template(smol):
    stream = stream_chat(None, GERMANY, temperature=0, seed=1, max_tokens=1)
    "".join(stream)
    prompt = smol.llama.detokenize(stream.prompt_tokens, special=True).decode()
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_max_tokens_is_respected(smol):
    long = stream_chat(None, STORY, temperature=0, seed=1, max_tokens=30)
    long_text = "".join(long)
    short = stream_chat(None, STORY, temperature=0, seed=1, max_tokens=4)
    short_text = "".join(short)
    assert short.finish_reason == "length" and long.finish_reason == "length"
    assert short_text and long_text.startswith(short_text) and len(short_text) < len(long_text)
    assert len(smol.llama.tokenize(short_text.encode(), add_bos=False, special=True)) <= 4


def test_cancel_stops_generation(smol):
    cancel = threading.Event()
    stream = stream_chat(None, STORY, temperature=0.7, seed=3, max_tokens=200, cancel=cancel)
    deltas = []
    for delta in stream:
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()
    assert len(deltas) == 3
    assert stream.finish_reason == "cancelled"
    assert smol.lock.acquire(timeout=5)  # the model is free again at once
    smol.lock.release()
    assert "Berlin" in chat(None, GERMANY, temperature=0, seed=1)


def test_cancel_before_start_and_close_midway(smol):
    cancel = threading.Event()
    cancel.set()
    stream = stream_chat(None, STORY, max_tokens=50, cancel=cancel)
    assert list(stream) == [] and stream.finish_reason == "cancelled"

    stream = stream_chat(None, STORY, temperature=0.7, seed=3, max_tokens=200)
    next(stream)
    stream.close()  # e.g. the browser tab went away
    deadline = time.time() + 5
    while stream.finished_at is None and time.time() < deadline:
        time.sleep(0.01)
    assert stream.finished_at is not None and stream.finish_reason == "cancelled"


def test_concurrent_requests_are_served_one_after_another(smol):
    questions = {
        "germany": GERMANY,
        "france": [{"role": "user", "content": "What is the capital of France?"}],
    }
    alone = {k: chat(None, m, temperature=0, seed=5, max_tokens=40) for k, m in questions.items()}
    streams, results = {}, {}
    barrier = threading.Barrier(len(questions))

    def ask(key):
        barrier.wait()
        streams[key] = stream_chat(None, questions[key], temperature=0, seed=5, max_tokens=40)
        results[key] = "".join(streams[key])

    threads = [threading.Thread(target=ask, args=(k,)) for k in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone  # no corruption from sharing one llama.cpp context
    a, b = sorted(streams.values(), key=lambda s: s.started_at)
    assert a.finished_at <= b.started_at  # one after the other


def test_stream_can_be_consumed_from_another_thread(smol):
    # Gradio steps a generator from worker threads; the model lock must not belong to the consumer.
    stream = stream_chat(None, GERMANY, temperature=0, seed=1)
    out = []
    first = next(stream)
    worker = threading.Thread(target=lambda: out.extend(stream))
    worker.start()
    worker.join(timeout=60)
    assert "Berlin" in first + "".join(out)


# ---------------------------------------------------------------- context overflow


@pytest.fixture(scope="module")
def small_context(tmp_path_factory):
    """The bundled model under another name, loaded with a 256-token context."""
    path = tmp_path_factory.mktemp("smallctx") / "smol-small-context.gguf"
    shutil.copyfile(bundled_gguf(), path)
    shared = load(str(path), context_length=256)
    assert shared.n_ctx == 256
    return str(path)


def _history(turns: int) -> list[dict]:
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: tell me about the number {i} and its history in mathematics, please."})
        messages.append({"role": "assistant", "content": f"The number {i} is interesting for many reasons, and people have studied it for centuries. " * 2})
    return messages + [{"role": "user", "content": "Which number did we talk about first?"}]


def test_context_overflow_drops_the_oldest_turns_and_says_so(small_context):
    messages = _history(5)
    stream = stream_chat(small_context, messages, temperature=0, seed=1, max_tokens=32)
    assert [n.kind for n in stream.notices] == ["trimmed"]
    notice = stream.notices[0]
    assert notice.dropped_turns >= 1 and "oldest" in notice.message and "\n" not in notice.message
    assert len(stream.prompt_tokens) + 32 <= 256
    assert stream.messages[-1] == messages[-1]  # the question itself is always kept
    assert stream.messages == messages[2 * notice.dropped_turns :]  # whole turns, oldest first
    assert "".join(stream).strip()


def test_answer_is_shortened_when_the_question_fills_the_context(small_context):
    question = [{"role": "user", "content": "Repeat: " + "apple " * 60}]
    stream = stream_chat(small_context, question, temperature=0, seed=1, max_tokens=200)
    assert [n.kind for n in stream.notices] == ["shortened"]
    assert stream.max_tokens == 256 - len(stream.prompt_tokens) < 200
    assert next(stream)
    stream.close()


def test_message_longer_than_the_context_is_refused(small_context):
    with pytest.raises(BadPrompt, match="too long"):
        stream_chat(small_context, [{"role": "user", "content": "apple " * 400}])


@pytest.mark.parametrize(
    "messages, options, match",
    [
        ([], {}, "nothing to answer"),
        ([{"role": "assistant", "content": "Hi"}], {}, "nothing to answer"),
        ([{"role": "user", "content": "   "}], {}, "nothing to answer"),
        ([{"role": "tool", "content": "x"}], {}, "role 'tool'"),
        (GERMANY, {"temperature": -1}, "Temperature"),
        (GERMANY, {"top_p": 0}, "Top-p"),
        (GERMANY, {"max_tokens": 0}, "Max new tokens"),
    ],
)
def test_bad_requests_get_one_line_messages(smol, messages, options, match):
    with pytest.raises(LensbenchError, match=match) as info:
        stream_chat(None, messages, **options)
    assert "\n" not in str(info.value)


def test_gradio_style_content_parts_are_read_as_text(smol):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of Germany?"}]}]
    assert "Berlin" in chat(None, messages, temperature=0, seed=1)
