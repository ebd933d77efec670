"""The nnsight backend agrees with the hooks backend (lens and patching) on the real models and every
tiny architecture; the remote path is checked up to the network call: the request it would send, the
same block serialized and run here by nnsight's own local simulation, and one sentence per failure."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.tiny_models import ARCHITECTURES, MULTIMODAL, tiny_ids
from tracing.api import open_tracer, trace_with
from tracing.errors import RemoteUnavailable
from tracing.hooks import HooksTracer
from tracing.nnsight_backend import NnsightTracer

PROMPT = "The capital of Germany is"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def assert_same_lens(reference, other, tolerance=1e-3):
    """Same top-1 token in every cell; probabilities (top-k, target) within `tolerance`."""
    assert reference.layers == other.layers
    np.testing.assert_array_equal(reference.topk_ids[..., 0], other.topk_ids[..., 0])
    np.testing.assert_allclose(other.topk_probs, reference.topk_probs, atol=tolerance, rtol=0)
    np.testing.assert_allclose(other.kl_to_final, reference.kl_to_final, atol=tolerance, rtol=0)
    if reference.target is not None:
        np.testing.assert_allclose(other.target.prob, reference.target.prob, atol=tolerance, rtol=0)
        np.testing.assert_array_equal(other.target.rank, reference.target.rank)


@pytest.fixture(scope="module")
def smollm2_nnsight(smollm2):
    return open_tracer(None, "nnsight", device="cpu")


def test_agrees_with_hooks_on_the_bundled_model(smollm2_hooks, smollm2_nnsight):
    for options in (dict(target=" Berlin"), dict(target="Paris", last_only=True, temperature=2.0, top_k=3)):
        reference = trace_with(smollm2_hooks, PROMPT, **options)
        result = trace_with(smollm2_nnsight, PROMPT, **options)
        assert result.backend == "nnsight"
        assert_same_lens(reference, result)
        assert result.target.suggestion == reference.target.suggestion
    assert result.target.suggestion == " Paris"  # the other spelling, from the trace's own output row


def test_agrees_with_hooks_on_gemma3(gemma3, gemma3_gguf, gemma3_hooks):
    tracer = open_tracer(str(gemma3_gguf), "nnsight", device="cpu")
    reference = trace_with(gemma3_hooks, PROMPT, target=" Berlin")
    assert_same_lens(reference, trace_with(tracer, PROMPT, target=" Berlin"))


@pytest.mark.parametrize("arch", [*ARCHITECTURES, MULTIMODAL])
def test_agrees_with_hooks_on_every_tiny_architecture(tiny_loaded, arch):
    loaded = tiny_loaded(arch)
    hooks, wrapped = loaded.adapter("hooks", HooksTracer), loaded.adapter("nnsight", NnsightTracer)
    ids = tiny_ids()[0].tolist()
    assert_same_lens(trace_with(hooks, None, ids=ids, top_k=3, target="w5"),
                     trace_with(wrapped, None, ids=ids, top_k=3, target="w5"), tolerance=1e-5)


def test_the_shared_model_is_not_wrapped(smollm2, smollm2_nnsight):
    assert smollm2_nnsight.lens.model._module is not smollm2.model
    assert type(smollm2.model.forward).__name__ == "method"


def test_patching_agrees_with_the_hooks_runtime(smollm2_hooks, smollm2_nnsight):
    from tracing.patching import patch_with

    for contrast, sublayers in ((" Paris", True), (None, False)):
        reference = patch_with(smollm2_hooks, PROMPT, "The capital of France is", " Berlin", contrast,
                               sublayers=sublayers)
        result = patch_with(smollm2_nnsight, PROMPT, "The capital of France is", " Berlin", contrast,
                            sublayers=sublayers)
        assert result.backend == "nnsight" and result.info["cells_run"] == reference.info["cells_run"]
        for name in ("effect", "attn_effect", "mlp_effect") if sublayers else ("effect",):
            np.testing.assert_allclose(getattr(result, name), getattr(reference, name), atol=1e-3, rtol=0)
        assert result.patched_top1 == reference.patched_top1
        np.testing.assert_allclose(result.patched_top1_prob, reference.patched_top1_prob, atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_patching_reads_the_models_own_output_after_its_soft_cap_or_scaling(tiny_loaded, arch):
    """Gemma 2's final soft-cap and Granite's logit scaling come after the unembedding: the patching
    metric is read on the model's output, as the hooks runtime reads it (nnsight read the
    unembedding's output: Gemma 2's clean logit difference came out -4.99 instead of -3.00)."""
    from tracing.hooks import HooksTracer
    from tracing.nnsight_backend import NnsightTracer
    from tracing.patching import patch_with

    loaded = tiny_loaded(arch)
    args = ("w5 w6 w7 w8 w9 w10", "w5 w6 w11 w8 w9 w10", "w12", "w13")
    reference = patch_with(loaded.adapter("hooks", HooksTracer), *args)
    result = patch_with(loaded.adapter("nnsight", NnsightTracer), *args)
    assert result.clean_value == pytest.approx(reference.clean_value, abs=1e-4)
    for name in ("effect", "attn_effect", "mlp_effect"):
        np.testing.assert_allclose(getattr(result, name), getattr(reference, name), atol=1e-4, rtol=1e-4)


def test_command_line_json(smollm2, capsys):
    from tracing.__main__ import main

    assert main(["--backend", "nnsight", "--prompt", PROMPT, "--target", " Berlin", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "nnsight" and out["topk"][-1][-1][0]["token"] == " Berlin"
    assert abs(out["target"]["prob"][-1][-1] - 0.796) < 0.01


# ==================================================================== remote, up to the network call


@pytest.fixture
def remote_tracer(smollm2, monkeypatch):
    """The bundled model as NDIF's SmolLM2 (the hub's id canonicalization is a network call: given here)."""
    import nnsight.modeling.huggingface as hf

    monkeypatch.setitem(hf._ID_CACHE, REPO, REPO)
    return NnsightTracer(smollm2, remote=True, repo_id=REPO)


def test_the_remote_request_names_the_model_and_saves_only_the_statistics(remote_tracer):
    from nnsight.schema.request import RequestModel

    from tracing.nnsight_backend import build_request

    ids = remote_tracer.encode(PROMPT)
    request, blob = build_request(remote_tracer, ids, list(range(len(ids))), target_id=ids[-1])
    key = json.loads(request.model_key.split(":", 1)[1])
    assert key["repo_id"] == REPO and request.model_key.startswith("nnsight.modeling.transformers.TransformersModel:")
    assert len(blob) < 64_000  # code and names, no weights, no activations
    import linecache

    kept = dict(linecache.cache)
    try:  # deserializing registers the block's source under our file's name in linecache: put it back after
        tracer = RequestModel.deserialize(blob, remote_tracer.lens.model._remoteable_persistent_objects(),
                                          compress=request.compress)
    finally:
        linecache.cache.clear()
        linecache.cache.update(kept)
    variables = tracer.info.frame.f_locals
    assert variables["positions"] == list(range(len(ids))) and variables["top_k"] == 5
    assert tracer.info.code.co_filename.endswith("nnsight_backend.py")  # the block, compiled as the server would
    assert "not-sent" not in blob.decode("latin-1")  # the key travels in a header, not in the payload
    import zstandard

    payload = zstandard.ZstdDecompressor().decompress(blob) if request.compress else blob
    assert b"lens_statistics" in payload and b".save()" in payload  # what runs there, and the one value saved


def test_the_remote_block_runs_as_nnsight_would_run_it_on_the_server(smollm2_nnsight):
    """nnsight's local simulation serializes the block, hides local modules, deserializes and runs it."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    ids = smollm2_nnsight.encode(PROMPT)
    options = dict(top_k=5, temperature=1.0, target_id=None, alternative_id=None)
    here = smollm2_nnsight.lens.statistics(ids, [len(ids) - 1], **options)
    shipped = smollm2_nnsight.lens.statistics(ids, [len(ids) - 1], backend=LocalSimulationBackend(
        smollm2_nnsight.lens.model), **options)
    np.testing.assert_array_equal(shipped["topk_ids"], here["topk_ids"])
    np.testing.assert_allclose(shipped["topk_probs"], here["topk_probs"], atol=1e-6)


def test_no_key_is_one_sentence(remote_tracer, monkeypatch):
    import nnsight

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteUnavailable, match=r"needs an API key.*NDIF_API_KEY"):
        trace_with(remote_tracer, PROMPT)


def test_no_network_is_one_sentence_quickly_and_local_backends_still_work(remote_tracer, smollm2_nnsight,
                                                                          monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "a-key-that-must-not-be-printed")
    start = time.perf_counter()
    with pytest.raises(RemoteUnavailable) as caught:
        trace_with(remote_tracer, PROMPT)
    assert time.perf_counter() - start < 30
    message = str(caught.value)
    assert "NDIF" in message and message.count(".") <= 3 and "a-key-that" not in message
    assert trace_with(smollm2_nnsight, PROMPT, last_only=True).top1()[-1][0] == " Berlin"


@pytest.mark.parametrize("failure, words", [
    (RuntimeError("Failed to send request: 401 Unauthorized"), "rejected the API key"),
    (TimeoutError("The read operation timed out"), "did not answer in time"),
    (ConnectionError("[Errno -3] Temporary failure in name resolution"), "could not be reached"),
])
def test_remote_failures_are_one_sentence_each(failure, words):
    from tracing.nnsight_backend import explain_remote_failure

    assert words in str(explain_remote_failure(failure))


def test_an_unhosted_model_is_named(monkeypatch):
    import tracing.nnsight_backend as backend

    monkeypatch.setattr(backend, "hosted_models", lambda timeout=10.0: {
        "meta-llama/Llama-3.1-70B": {"state": "RUNNING"}, "openai-community/gpt2": {"state": "RUNNING"}})
    with pytest.raises(RemoteUnavailable, match=r"does not host 'tiny/model'.*Llama-3.1-70B"):
        backend.check_available("tiny/model")
    assert backend.check_available("meta-llama/llama-3.1-70b")["state"] == "RUNNING"


def test_command_line_remote_without_network_exits_2(capsys, monkeypatch):
    from tracing.__main__ import main

    monkeypatch.setenv("NDIF_API_KEY", "secret-value")
    assert main(["--prompt", PROMPT, "--remote", "--model", "meta-llama/Llama-3.1-70B"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: NDIF") and err.count("\n") == 1 and "secret-value" not in err


def test_a_hosted_70b_is_a_weightless_skeleton_whose_request_is_built_here(smollm2, monkeypatch):
    """Llama 3.1 70B's layout on the meta device (no memory): the structure comes from a small copy of
    the architecture, the request names the hosted model, and patching finds its sites."""
    import nnsight.modeling.huggingface as hf
    from transformers import LlamaConfig

    from tracing.nnsight_backend import NnsightRuntime, build_request, skeleton

    repo = "meta-llama/Llama-3.1-70B"
    monkeypatch.setitem(hf._ID_CACHE, repo, repo)
    config = LlamaConfig(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256)
    tracer = NnsightTracer(skeleton(repo, config=config, tokenizer=smollm2.tokenizer), remote=True, repo_id=repo)
    structure = tracer.lens.structure
    assert (structure.blocks, structure.n_blocks, structure.final, structure.unembed) == (
        "model.layers", 80, ["model.norm"], "lm_head")
    assert structure.sublayers == ("self_attn", "mlp")
    ids = tracer.encode(PROMPT)
    request, blob = build_request(tracer, ids, [len(ids) - 1])
    assert json.loads(request.model_key.split(":", 1)[1])["repo_id"] == repo and len(blob) < 64_000
    assert len(NnsightRuntime(tracer)._sites["order"]) == 1 + 3 * 80


def test_remote_patching_without_network_is_one_sentence(remote_tracer, monkeypatch):
    from tracing.patching import patch_with

    monkeypatch.setenv("NDIF_API_KEY", "a-key")
    with pytest.raises(RemoteUnavailable, match="NDIF"):
        patch_with(remote_tracer, PROMPT, "The capital of France is", " Berlin", " Paris")
