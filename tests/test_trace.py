"""The lens on the real bundled model, the GGUF cache, the CLI, and every bad input's message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tracing
from tracing import BadModelFile, BadPrompt, BadTarget, ModelNotFound, NotEnoughMemory, UnsupportedModel
from tracing.loading import MODEL_CACHE, load_model
from tracing.models import bundled_gguf, discover, read_gguf, resolve

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of Germany is"


def test_berlin_is_the_last_rows_top1_with_the_models_own_probability(smollm2, smollm2_hooks):
    result = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin")
    assert result.topk_tokens[-1][-1][0] == " Berlin"
    ids = torch.tensor([smollm2.encode(PROMPT)])
    with torch.no_grad():
        own = torch.softmax(smollm2.model(input_ids=ids).logits[0, -1].float(), -1)
    berlin = smollm2.encode_target(" Berlin")[0]
    # float32 sums in another order (the lens projects every row in one batched matmul, the model
    # one row with its own lm_head): measured 0 on one machine, 1.4e-5 on an AVX-512 one.
    assert result.target.prob[-1, -1] == pytest.approx(own[berlin].item(), abs=5e-5)
    assert result.topk_probs[-1, -1, 0] == pytest.approx(own.max().item(), abs=5e-5)
    assert 0.7 < result.target.prob[-1, -1] < 0.9  # 0.796 measured
    assert result.target.rank[-1, -1] == 1
    assert result.target.prob[0, -1] < 0.01  # the embeddings don't know the answer yet
    assert len(result.layers) == 31 and result.layers[0] == "embeddings"
    assert result.tokens == [smollm2.decode_one(i) for i in ids[0].tolist()]


def test_last_position_only_agrees_with_all_positions(smollm2_hooks):
    full = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin")
    last = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin", last_only=True)
    assert last.positions == [full.positions[-1]]
    np.testing.assert_array_equal(last.topk_ids[:, 0], full.topk_ids[:, -1])
    np.testing.assert_allclose(last.target.prob[:, 0], full.target.prob[:, -1], atol=1e-5)


def test_trace_api_uses_the_default_model(smollm2_hooks):
    result = tracing.trace(PROMPT, top_k=3, device="cpu")
    assert result.model == "SmolLM2-135M-Instruct (bundled)" and result.backend == "hooks"
    assert result.topk_ids.shape == (31, len(result.tokens), 3)


def test_gguf_cache_is_used_then_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    # A tiny Mistral (llama-architecture) GGUF made by llama.cpp's own converter (q8_0: dequantized on load, like the
    # bundled Q4_1 file), so converting it three times takes seconds, not minutes.
    from tests.converted_models import converted

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "tiny.gguf"
    gguf.parent.mkdir()
    shutil.copy(converted("mistral", "q8_0"), gguf)

    def fresh_load():
        MODEL_CACHE.clear()
        return load_model(str(gguf), device="cpu")

    first = fresh_load()
    assert first.info["from_cache"] is False
    cached_dirs = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached_dirs) == 1 and list(cached_dirs[0].glob("*.safetensors"))
    second = fresh_load()
    assert second.info["from_cache"] is True
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)

    with open(gguf, "r+b") as f:  # change one byte of the last tensor's data
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    third = fresh_load()
    assert third.info["from_cache"] is False
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] != [d.name for d in cached_dirs]
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1  # the stale cache was removed
    # A copy of the file elsewhere, under the same name (a new modification time): converted once
    # more, into a cache of its own, and the first file's conversion stays.
    copy = tmp_path / "elsewhere" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    MODEL_CACHE.clear()
    assert load_model(str(copy), device="cpu").info["from_cache"] is False
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2
    assert fresh_load().info["from_cache"] is True
    # The copy deleted: its conversion goes at the next conversion of a file of that name.
    copy.unlink()
    with open(gguf, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(byte)  # the byte as it was: a new version again
    assert fresh_load().info["from_cache"] is False
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    MODEL_CACHE.clear()


# ---------------------------------------------------------------- models and discovery


def test_resolve_and_discover(tmp_path, monkeypatch):
    import tracing.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    assert resolve(None).path == bundled_gguf()
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    for i in (1, 2):
        (tmp_path / f"big-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve("a").location == str(tmp_path / "a.gguf")
    assert resolve("hf").kind == "hf"
    names = [e.name for e in discover(tmp_path)]
    assert names == ["SmolLM2-135M-Instruct (bundled)", "a.gguf", "big-00001-of-00002.gguf", "hf"]
    with pytest.raises(BadModelFile, match="give the first part"):
        resolve(str(tmp_path / "big-00002-of-00002.gguf"))
    assert resolve("someone/some-model").kind == "hub"


def test_gguf_facts_from_the_header():
    facts = read_gguf(bundled_gguf())
    assert facts.architecture == "llama" and facts.n_layers == 30 and facts.vocab_size == 49152
    assert 130e6 < facts.n_params < 140e6
    assert facts.quantization.startswith("Q4")
    assert "llama" in facts.summary()


# ---------------------------------------------------------------- bad inputs


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_path():
    with pytest.raises(ModelNotFound, match="No model called"):
        tracing.trace(PROMPT, model="/nowhere/model.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(BadModelFile, match="not a GGUF file"):
        tracing.trace(PROMPT, model=str(bad))


def test_truncated_gguf(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(bundled_gguf(), "rb") as f:
        cut.write_bytes(f.read(3 << 20))
    with pytest.raises(BadModelFile, match="damaged or incomplete"):
        tracing.trace(PROMPT, model=str(cut))


def test_gguf_architecture_transformers_cannot_load(tmp_path):
    path = _write_gguf(tmp_path / "scout.gguf", "llama4")
    with pytest.raises(UnsupportedModel, match="llama.cpp backend"):
        tracing.trace(PROMPT, model=str(path))


def test_model_too_large_is_refused_before_loading(tmp_path, monkeypatch):
    gguf = tmp_path / "smol.gguf"
    shutil.copy(bundled_gguf(), gguf)
    monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", "200MB")
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", "200MB")
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NotEnoughMemory, match="needs about .* more than this machine's 200.0 MB.*--ignore-memory-check"):
        tracing.trace(PROMPT, model=str(gguf))
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_cpu_load_of_the_bundled_model_is_float32_and_says_so(smollm2, smollm2_hooks):
    assert smollm2.dtype == torch.float32
    result = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin", info=smollm2_hooks.info)
    assert result.info["dtype"] == "float32" and result.info["device"] == "cpu"
    assert result.info["dtype_reason"].startswith("float32: its weights (")
    assert result.target.prob[-1, -1] == pytest.approx(0.796, abs=0.002)


def test_half_precision_only_when_float32_does_not_fit_and_an_explicit_dtype_wins(smollm2, monkeypatch, tmp_path):
    # The model converted once with the machine's real memory (converting needs float32 and more),
    # then loaded on a machine whose 400 MB hold it in bfloat16 (270 MB) but not in float32 (540 MB).
    # The conversion is the `smollm2` fixture's, written into this test's own cache by the loader's own
    # writer, so the test does not depend on what earlier tests left in the shared cache (it failed on a
    # fresh clone when another test's copy of the file had replaced the fixture's conversion there).
    from tracing.loading import _save_cache, gguf_cache_folder
    from tracing.models import resolve

    copy = tmp_path / bundled_gguf().name
    shutil.copy2(bundled_gguf(), copy)
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    _save_cache(smollm2.model, smollm2.tokenizer, gguf_cache_folder(copy), resolve(str(copy)))
    first = load_model(copy, device="cpu", dtype=torch.float32)
    assert first.dtype == torch.float32 and first.info["from_cache"]
    from tracing.loading import MODEL_CACHE

    MODEL_CACHE.clear()  # loaded models are reused without a check: forget this one
    monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", "400MB")
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", "400MB")
    half = load_model(copy, device="cpu")
    assert half.dtype == torch.bfloat16 and half.info["from_cache"]
    assert "bfloat16, not float32" in half.info["dtype_reason"] and "400.0 MB" in half.info["dtype_reason"]
    tracer = tracing.open_tracer(copy, "hooks", device="cpu")
    result = tracing.trace_with(tracer, PROMPT, target=" Berlin", info=tracer.info)
    assert result.info["dtype"] == "bfloat16" and result.topk_tokens[-1][-1][0] == " Berlin"
    with pytest.raises(NotEnoughMemory, match="in float32 needs about"):  # asked for: never quietly halved
        load_model(copy, device="cpu", dtype=torch.float32)


def test_empty_prompt(smollm2_hooks):
    for prompt in ("", "   \n"):
        with pytest.raises(BadPrompt, match="empty"):
            tracing.trace_with(smollm2_hooks, prompt)


def test_prompt_longer_than_the_context(smollm2_hooks):
    assert smollm2_hooks.context_length == 8192
    with pytest.raises(BadPrompt, match="longer than this model's context of 8192"):
        tracing.trace_with(smollm2_hooks, "hello " * 9000)


def test_target_that_is_not_one_token_says_how_it_tokenizes(smollm2_hooks):
    with pytest.raises(BadTarget, match=r"'Berlinxyz' is 3 tokens .*'Ber' \+ 'lin' \+ 'xyz'"):
        tracing.trace_with(smollm2_hooks, PROMPT, target="Berlinxyz")
    with pytest.raises(BadTarget, match="leading space") as spaced:
        tracing.trace_with(smollm2_hooks, PROMPT, target="Berlin")
    assert spaced.value.suggestion == " Berlin"  # what the app offers as one click
    # A word in pieces: its first piece as the model writes it mid-sentence, not a lone letter.
    with pytest.raises(BadTarget, match="first piece, ' Berlin'") as pieces:
        tracing.trace_with(smollm2_hooks, PROMPT, target="Berlinxyz")
    assert pieces.value.suggestion == " Berlin"


def test_a_likelier_spelling_of_the_target_is_reported(smollm2_hooks):
    result = tracing.trace_with(smollm2_hooks, "The Eiffel Tower is in the city of", target="Paris")
    assert result.target.token == "Paris" and result.target.suggestion == " Paris"
    assert result.target.suggestion_prob > 0.5 > float(result.target.prob[-1, -1])
    assert "' Paris' is likelier than 'Paris'" in result.table() and result.to_dict()["target"]["suggestion"] == " Paris"
    assert tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin").target.suggestion is None


def test_some_positions_only_on_a_backend_that_computes_all(smollm2_hooks):
    every = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin")
    some = tracing.trace_with(smollm2_hooks, PROMPT, target=" Berlin", positions=[3, 4])
    assert some.positions == [3, 4] and some.topk_ids.shape[1] == 2
    np.testing.assert_array_equal(some.topk_ids, every.topk_ids[:, 3:])
    np.testing.assert_allclose(some.target.prob, every.target.prob[:, 3:], rtol=1e-5)


def test_bad_settings(smollm2_hooks):
    with pytest.raises(BadPrompt, match="top-k"):
        tracing.trace_with(smollm2_hooks, PROMPT, top_k=0)
    with pytest.raises(BadPrompt, match="temperature"):
        tracing.trace_with(smollm2_hooks, PROMPT, temperature=0)
    with pytest.raises(UnsupportedModel, match="Unknown backend"):
        tracing.trace(PROMPT, backend="nope")


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tracing", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_table_and_json(smollm2):
    table = _cli("--prompt", PROMPT, "--target", " Berlin", "--top-k", "3")
    assert table.returncode == 0, table.stderr
    last = table.stdout.strip().splitlines()[-1]
    assert last.startswith("layer 30") and "' Berlin' 0.796" in last

    out = _cli("--prompt", PROMPT, "--target", " Berlin", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"] == "SmolLM2-135M-Instruct (bundled)" and data["backend"] == "hooks"
    assert data["topk"][-1][-1][0]["token"] == " Berlin"
    assert data["target"]["rank"][-1][-1] == 1
    assert len(data["entropy"]) == len(data["kl_to_final"]) == len(data["layers"]) == 31


def test_cli_memory_check_refuses_names_the_override_and_the_override_loads(smollm2, monkeypatch):
    monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", "200MB")
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", "200MB")
    refused = _cli("--prompt", PROMPT)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: ") and "--ignore-memory-check" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    forced = _cli("--prompt", PROMPT, "--top-k", "3", "--ignore-memory-check")
    assert forced.returncode == 0, forced.stderr
    warning = [line for line in forced.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "memory check is off" in warning[0], forced.stderr
    assert forced.stdout.strip().splitlines()[-1].startswith("layer 30")


def test_cli_errors_are_one_line_without_traceback():
    for args, message in [
        (("--prompt", ""), "The prompt is empty"),
        (("--prompt", "x", "--model", "/nowhere.gguf"), "No model called"),
    ]:
        out = _cli(*args)
        assert out.returncode == 2
        assert out.stderr.strip().startswith("error: " + message)
        assert "Traceback" not in out.stderr


def test_hub_id_offline_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="could not be fetched from the Hugging Face hub"):
        tracing.trace(PROMPT, model="nobody-here/no-such-model")


def test_model_load_failures_are_one_sentence():
    from tracing.loading import _config_problem
    from tracing.models import ModelSource

    hub = ModelSource("hub", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B")

    def caused_by(name: str, text: str = "x") -> Exception:
        outer = OSError(text)
        outer.__cause__ = type(name, (Exception,), {})("inner")
        return outer

    gated = str(_config_problem(caused_by("GatedRepoError"), hub, False))
    missing = str(_config_problem(caused_by("RepositoryNotFoundError"), hub, False))
    offline = str(_config_problem(caused_by("LocalEntryNotFoundError"), hub, False))
    unknown = _config_problem(ValueError("The checkpoint you are trying to load has model type `newarch` but "
                                         "Transformers does not recognize this architecture."), hub, False)
    assert "gated" in gated and "no such model" in missing and "no network" in offline
    assert "architecture ('newarch')" in str(unknown) and type(unknown).__name__ == "UnsupportedModel"
    for message in (gated, missing, offline, str(unknown)):
        assert message.count(". ") == 0 and message.endswith("."), message  # one sentence


def test_device_and_half_precision_defaults(monkeypatch):
    from tracing.device import half_dtype, pick_device

    monkeypatch.delenv("LENSBENCH_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu").type == "cpu"
    assert half_dtype(torch.device("cpu")) == torch.bfloat16
    assert half_dtype(torch.device("cuda")) == torch.bfloat16
    assert half_dtype(torch.device("mps")) in (torch.bfloat16, torch.float16)
