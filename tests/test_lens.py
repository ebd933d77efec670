"""The lens math (tracing/lens.py) against a direct numpy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tracing.lens as lens_module
from tracing.lens import build_result, summarize


def _reference(logits: np.ndarray, temperature: float, target: int):
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    logp = np.log(p)
    entropy = -(p * logp).sum(-1)
    kl = (p[-1:] * (logp[-1:] - logp)).sum(-1)
    rank = (p > p[..., target : target + 1]).sum(-1) + 1
    return p, entropy, kl, rank


@pytest.fixture
def case():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, 8, generator=generator, dtype=torch.float64)
    unembed = torch.randn(8, 50, generator=generator, dtype=torch.float64) * 2
    return hidden, (lambda h: h @ unembed), unembed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_statistics_match_a_direct_computation(case, temperature):
    hidden, project, unembed = case
    stats = summarize(hidden, project, top_k=3, temperature=temperature, target_id=7)
    p, entropy, kl, rank = _reference((hidden @ unembed).numpy(), temperature, 7)
    np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-5, atol=2e-5)  # float32 cancellation
    np.testing.assert_allclose(stats["kl_to_final"], kl, rtol=1e-5, atol=2e-5)  # float32 cancellation
    np.testing.assert_allclose(stats["target_prob"], p[..., 7], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(stats["target_rank"], rank)
    order = np.argsort(-p, axis=-1)[..., :3]
    np.testing.assert_array_equal(stats["topk_ids"], order)
    np.testing.assert_allclose(stats["topk_probs"], np.take_along_axis(p, order, -1), rtol=1e-5)
    assert np.all(stats["kl_to_final"][-1] == 0)


def test_temperature_flattens_the_distribution(case):
    hidden, project, _ = case
    cold = summarize(hidden, project, temperature=0.5)
    hot = summarize(hidden, project, temperature=2.0)
    assert np.all(hot["entropy"] > cold["entropy"])
    with pytest.raises(ValueError):
        summarize(hidden, project, temperature=0)


def test_chunking_gives_the_same_answer(case, monkeypatch):
    hidden, project, _ = case
    whole = summarize(hidden, project, top_k=4, target_id=3)
    calls = []

    def counting(h):
        calls.append(h.shape[0])
        return project(h)

    monkeypatch.setattr(lens_module, "_CHUNK_BYTES", 4 * 50 * 4 * 2)  # two rows a chunk
    chunked = summarize(hidden, counting, top_k=4, target_id=3)
    assert calls == [1, 2, 2]  # the final row first, then rows 0-1, 2-3
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-6)


def test_result_to_dict_is_json_with_the_documented_shape(case):
    hidden, project, _ = case
    result = build_result(
        hidden, project, model="m", backend="b", token_ids=[10, 11, 12, 13], positions=[0, 1, 2, 3],
        decode_one=lambda i: f"<{i}>", top_k=2, target=("<7>", 7),
    )
    data = json.loads(json.dumps(result.to_dict()))
    for key in ("model", "backend", "tokens", "layers", "topk", "entropy", "kl_to_final", "target"):
        assert key in data
    assert data["tokens"] == ["<10>", "<11>", "<12>", "<13>"]
    assert data["layers"][0] == "embeddings" and len(data["layers"]) == 5
    assert len(data["topk"]) == 5 and len(data["topk"][0]) == 4 and len(data["topk"][0][0]) == 2
    cell = data["topk"][2][1][0]
    assert set(cell) == {"token", "id", "prob"} and cell["token"] == f"<{cell['id']}>"
    assert np.array(data["target"]["prob"]).shape == (5, 4)
    assert np.array(data["target"]["rank"]).min() >= 1
    assert result.lens == ["logit"] * 4 + ["output"]
    assert "layer 4" in result.table()


@pytest.mark.parametrize("vocab", [3, 64, 200, 49152, 49155])
def test_blocked_topk_equals_torch_topk(vocab):
    from tracing.lens import _topk

    generator = torch.Generator().manual_seed(vocab)
    z = torch.randn(6, vocab, generator=generator)
    z[0, vocab // 2] = 50.0  # a spike
    z[1, -1] = 60.0  # a winner in the ragged tail
    k = min(5, vocab)
    values, ids = _topk(z, k)
    ref_values, ref_ids = z.topk(k, dim=-1)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(ids, ref_ids)


def test_one_matmul_when_the_vocabulary_is_known(case):
    hidden, project, _ = case
    calls = []

    def counting(h):
        calls.append(h.shape[0])
        return project(h)

    hinted = summarize(hidden, counting, top_k=3, target_id=2, vocab_size=50)
    assert calls == [5]  # every row, the output row included, in one projection
    plain = summarize(hidden, project, top_k=3, target_id=2)
    for key in plain:
        np.testing.assert_allclose(hinted[key], plain[key], rtol=1e-6)
