"""What chat loads: header facts, Llama 4 Scout from synthetic headers (and the memory verdicts it
gets), split GGUFs, sharing, each bad file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from chat.engine import chat, load, model_facts, stream_chat
from runtime.llama_cpp import loaded, release, shared_llama
from tracing.errors import BadModelFile, LensbenchError, ModelNotFound, NotEnoughMemory, UnsupportedModel
from tracing.models import MemoryWarning, bundled_gguf, ignoring_memory_check

GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]


def write_scout_header(folder: Path, quant: str = "Q4_K_M") -> Path:
    """A Llama 4 Scout 17B-16E GGUF in two parts: the real header layout and tensor shapes, no weights.

    The tensor data is left as a hole in a sparse file (a few KB on disk), so the header reader
    sees exactly what a real download shows: quant "Q4_K_M" is ~65 GB long; "Q2_K" (experts in
    Q2_K and Q3_K, like the ~40 GB low-bit quants people run on 64 GB Macs) ~39 GB.
    """
    d, vocab, layers, heads, kv_heads, head_dim, expert_ff, experts = 5120, 202048, 48, 40, 8, 128, 8192, 16
    writer = gguf.GGUFWriter(folder / f"Llama-4-Scout-17B-16E-Instruct-{quant}.gguf", "llama4", split_max_size=40 * 10**9)
    writer.add_name("Llama 4 Scout 17B 16E Instruct")
    writer.add_block_count(layers)
    writer.add_context_length(10485760)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(16384)
    writer.add_expert_feed_forward_length(expert_ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(1)
    writer.add_vocab_size(vocab)
    block_bytes = {Q.F32: (1, 4), Q.Q2_K: (256, 84), Q.Q3_K: (256, 110), Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}
    experts_up, experts_down = (Q.Q4_K, Q.Q6_K) if quant == "Q4_K_M" else (Q.Q2_K, Q.Q3_K)

    def add(name, shape, kind=Q.Q4_K):
        block, size = block_bytes[kind]
        writer.add_tensor_info(name, shape, np.float32, int(np.prod(shape)) // block * size, raw_dtype=kind)

    add("token_embd.weight", (vocab, d))
    add("output_norm.weight", (d,), Q.F32)
    add("output.weight", (vocab, d), Q.Q6_K)
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (d,), Q.F32)
        add(b + "attn_q.weight", (heads * head_dim, d))
        add(b + "attn_k.weight", (kv_heads * head_dim, d))
        add(b + "attn_v.weight", (kv_heads * head_dim, d), Q.Q6_K)
        add(b + "attn_output.weight", (d, heads * head_dim))
        add(b + "ffn_norm.weight", (d,), Q.F32)
        add(b + "ffn_gate_inp.weight", (experts, d), Q.F32)
        add(b + "ffn_gate_exps.weight", (experts, expert_ff, d), experts_up)
        add(b + "ffn_up_exps.weight", (experts, expert_ff, d), experts_up)
        add(b + "ffn_down_exps.weight", (experts, d, expert_ff), experts_down)
        add(b + "ffn_gate_shexp.weight", (expert_ff, d))
        add(b + "ffn_up_shexp.weight", (expert_ff, d))
        add(b + "ffn_down_shexp.weight", (d, expert_ff), Q.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for fout, tensors in zip(writer.fout, writer.tensors):
        writer.write_padding(fout, fout.tell())
        fout.truncate(fout.tell() + sum(writer.ggml_pad(t.nbytes, writer.data_alignment) for t in tensors.values()))
    parts = writer.format_shard_names(writer.path)
    writer.close()
    return parts[0]


def write_split(src: Path, dest: Path, parts: int, overrides: dict | None = None) -> Path:
    """Re-write a GGUF as `parts` files (name-00001-of-0000N.gguf) with the gguf package; returns part 1.

    `overrides` replaces metadata values (same type). With parts=1 it is a plain copy at `dest`.
    """
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dest, arch, split_max_tensors=-(-len(reader.tensors) // parts) if parts > 1 else 0)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        value = (overrides or {}).get(field.name, field.contents())
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return writer.format_shard_names(dest)[0]


def write_tiny(path: Path, arch: str) -> Path:
    """A valid GGUF header with one small tensor, for architectures llama.cpp should reject."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- facts


def test_facts_of_the_bundled_model():
    facts = model_facts(None)
    assert (facts.architecture, facts.family, facts.layers, facts.quantization) == ("llama", "Llama", 30, "Q4_1")
    assert 130e6 < facts.parameters < 140e6 and facts.experts is None and facts.active_parameters is None
    assert facts.context_length == 8192 and facts.chat_context <= 8192
    assert facts.file_bytes == bundled_gguf().stat().st_size and facts.files == 1
    assert facts.fits and facts.chat_template
    assert facts.memory_needed > facts.file_bytes
    for text in ("SmolLM2", "134.5M parameters", "30 layers", "Q4_1", "8,192"):
        assert text in facts.summary
    assert "\n" not in facts.summary


def scout_machine(monkeypatch, free: str, total: str) -> None:
    """Pretend to be a machine with `total` of RAM, `free` of it available now, and no Metal GPU."""
    monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", free)
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", total)
    monkeypatch.delenv("LENSBENCH_METAL_WORKING_SET", raising=False)
    monkeypatch.setattr("tracing.models.apple_silicon", lambda: False)


def test_llama4_scout_is_identified_and_refused_above_physical_memory_before_any_load(tmp_path, monkeypatch):
    first = write_scout_header(tmp_path)
    assert first.name.endswith("-00001-of-00002.gguf")
    assert sum(p.stat().st_blocks for p in tmp_path.iterdir()) * 512 < 50 << 20  # really sparse

    scout_machine(monkeypatch, "1TB", "1TB")
    assert model_facts(str(first)).fits

    scout_machine(monkeypatch, "48GB", "64GB")  # a 64 GB M2 Max: the Q4_K_M is bigger than all of it
    facts = model_facts(str(first))
    assert facts.architecture == "llama4" and facts.family == "Llama 4 Scout"
    assert facts.experts == 16 and facts.experts_per_token == 1 and facts.layers == 48
    assert 105e9 < facts.parameters < 110e9  # ~109B with the vision tower, which text GGUFs leave out
    assert 16e9 < facts.active_parameters < 18e9  # the "17B" in its name
    assert facts.files == 2 and facts.file_bytes > 60e9 and facts.quantization == "Q4_K"
    assert facts.context_length == 10485760 and facts.chat_context == 4096
    assert not facts.fits and facts.memory.refuse and facts.memory_needed > facts.file_bytes
    for text in ("Llama 4 Scout", "mixture of 16 experts", "107.8B parameters", "17.2B active", "Does not fit"):
        assert text in facts.summary, facts.summary

    start = time.perf_counter()
    with pytest.raises(NotEnoughMemory, match=r"needs about 6\d\.\d GB of memory, more than this machine's 64.0 GB") as info:
        stream_chat(str(first), GERMANY)
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)
    assert "--ignore-memory-check" in str(info.value) and "Skip the memory check" in str(info.value)
    assert str(info.value) == facts.memory.message  # the facts said exactly what the load says
    assert first.resolve() not in loaded()


def test_a_40gb_scout_on_a_64gb_mac_with_30gb_free_loads_with_a_warning(tmp_path, monkeypatch):
    first = write_scout_header(tmp_path, "Q2_K")
    scout_machine(monkeypatch, "30GB", "64GB")
    facts = model_facts(str(first))
    assert 36 << 30 < facts.memory_needed < 42 << 30, facts.memory_needed
    verdict = facts.memory
    assert verdict.warning and not verdict.refuse and not facts.fits
    assert "only 30.0 GB of this machine's 64.0 GB is free now" in verdict.message and "\n" not in verdict.message
    assert "Tight" in facts.summary

    # The load goes past the memory check (with the warning) to llama.cpp itself, which fails on
    # this header-only file for its own reason: not NotEnoughMemory.
    with pytest.warns(MemoryWarning, match="only 30.0 GB of this machine's 64.0 GB is free now"):
        with pytest.raises(BadModelFile, match="llama.cpp could not load"):
            load(str(first))
    assert first.resolve() not in loaded()


def test_the_memory_check_can_be_turned_off(tmp_path, monkeypatch):
    first = write_scout_header(tmp_path, "Q2_K")
    scout_machine(monkeypatch, "8GB", "16GB")  # over physical: refused...
    with pytest.raises(NotEnoughMemory, match="more than this machine's 16.0 GB"):
        load(str(first))
    # ... unless asked, by argument or around a call that cannot pass one (a lens backend)
    for attempt in (lambda: load(str(first), check_memory=False), lambda: _load_inside_ignoring(first)):
        with pytest.warns(MemoryWarning, match="loading anyway because the memory check is off"):
            with pytest.raises(BadModelFile, match="llama.cpp could not load"):
                attempt()


def _load_inside_ignoring(path: Path):
    with ignoring_memory_check():
        return shared_llama(path)


# ---------------------------------------------------------------- loading


def test_one_instance_per_file():
    shared = load(None)
    assert load(str(bundled_gguf())) is shared
    assert shared_llama(bundled_gguf()) is shared
    assert loaded().count(shared.path) == 1


def test_split_gguf_loads_and_answers_like_the_single_file(tmp_path):
    first = write_split(bundled_gguf(), tmp_path / "smol-split.gguf", parts=3)
    assert first.name == "smol-split-00001-of-00003.gguf"
    single, split = model_facts(None), model_facts(str(first))
    assert split.files == 3 and split.parameters == single.parameters and split.quantization == single.quantization

    options = dict(temperature=0.8, seed=11, max_tokens=24)
    # Both from an empty KV cache: a prefix cached by an earlier test is evaluated in other batches,
    # and float rounding then decides near-ties of the sampler differently.
    single_model = load(None)
    with single_model.lock:
        single_model.llama.reset()
    assert chat(str(first), GERMANY, **options) == chat(None, GERMANY, **options)

    with pytest.raises(BadModelFile, match="give the first part, 'smol-split-00001-of-00003.gguf'"):
        load(str(tmp_path / "smol-split-00002-of-00003.gguf"))
    for i in (1, 2):  # the same model under another name, with its last part missing
        os.link(tmp_path / f"smol-split-0000{i}-of-00003.gguf", tmp_path / f"incomplete-0000{i}-of-00003.gguf")
    with pytest.raises(BadModelFile, match="missing part.*incomplete-00003-of-00003.gguf"):
        stream_chat(str(tmp_path / "incomplete-00001-of-00003.gguf"), GERMANY)


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_gemma_like_model_ends_turns_on_a_non_eos_token_and_gets_the_system_prompt_merged(tmp_path):
    # Like Gemma: the turn ends on a token other than the GGUF's end-of-sequence (<end_of_turn> vs
    # <eos>), and the template refuses a system role. Here SmolLM2's EOS moves from <|im_end|> to
    # <|endoftext|> (id 0) and its template raises on a system message.
    path = write_split(
        bundled_gguf(),
        tmp_path / "smol-gemma-like.gguf",
        parts=1,
        overrides={"tokenizer.ggml.eos_token_id": 0, "tokenizer.chat_template": NO_SYSTEM_TEMPLATE},
    )
    shared = load(str(path))
    assert shared.llama.token_eos() == 0 and shared.chat_template
    stream = stream_chat(str(path), GERMANY, temperature=0, seed=1, max_tokens=64)
    assert "".join(stream).strip() == "The capital of Germany is Berlin." and stream.finish_reason == "stop"

    stream = stream_chat(str(path), GERMANY, system="Answer in French.", temperature=0, seed=1, max_tokens=8)
    assert [n.kind for n in stream.notices] == ["system_merged"]
    assert stream.messages == [{"role": "user", "content": "Answer in French.\n\nWhat is the capital of Germany?"}]
    prompt = shared.llama.detokenize(stream.prompt_tokens, special=True).decode()
    assert prompt == "<|im_start|>user\nAnswer in French.\n\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
    assert "".join(stream).strip() and stream.finish_reason in ("stop", "length")


def _not_gguf(tmp_path, monkeypatch):
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 100)
    return path, BadModelFile, "not a GGUF file"


def _truncated(tmp_path, monkeypatch):
    path = tmp_path / "half.gguf"
    with open(bundled_gguf(), "rb") as f:
        path.write_bytes(f.read(30 << 20))
    return path, BadModelFile, "damaged or incomplete"


def _unknown_architecture(tmp_path, monkeypatch):
    return write_tiny(tmp_path / "future.gguf", "lensbenchnet"), UnsupportedModel, "'lensbenchnet'.*does not know"


def _broken_model(tmp_path, monkeypatch):
    return write_tiny(tmp_path / "broken.gguf", "llama"), BadModelFile, "llama.cpp could not load 'broken.gguf'.*embedding_length"


def _missing(tmp_path, monkeypatch):
    return tmp_path / "nowhere.gguf", ModelNotFound, "No model called"


def _hf_folder(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path, UnsupportedModel, "Hugging Face model folder; chat runs GGUF files"


def _too_big(tmp_path, monkeypatch):
    path = tmp_path / "copy.gguf"
    path.write_bytes(bundled_gguf().read_bytes())
    monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", "50MB")
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", "50MB")
    return path, NotEnoughMemory, "needs about .* more than this machine's 50.0 MB"


@pytest.mark.parametrize("make", [_missing, _not_gguf, _truncated, _unknown_architecture, _broken_model, _hf_folder, _too_big])
def test_bad_model_gets_one_line_message_and_the_loaded_model_keeps_working(make, tmp_path, monkeypatch):
    before = load(None)
    path, error, match = make(tmp_path, monkeypatch)
    with pytest.raises(error, match=match) as info:
        stream_chat(str(path), GERMANY)
    assert "\n" not in str(info.value)
    assert Path(str(path)).resolve() not in loaded()
    assert load(None) is before
    assert "Berlin" in chat(None, GERMANY, temperature=0, seed=1)


def test_release_frees_the_file_and_a_waiting_request_gets_a_message(tmp_path):
    path = tmp_path / "released.gguf"
    path.write_bytes(bundled_gguf().read_bytes())
    shared = load(str(path))
    with shared.lock:  # a request queues behind this holder, which then releases the model
        stream = stream_chat(str(path), GERMANY, temperature=0, seed=1)
        assert release(str(path))
    with pytest.raises(LensbenchError, match="unloaded"):
        "".join(stream)
    assert path.resolve() not in loaded()
    assert "Berlin" in chat(str(path), GERMANY, temperature=0, seed=1)  # loads again on demand
    assert load(str(path)) is not shared
