"""The llama.cpp lens on real GGUFs of eleven architectures, written by llama.cpp's own converter.

tests/converted_models.py makes tiny random-weight transformers models (llama4 with MoE and NoPE
blocks, qwen2, qwen3, qwen3_moe, mistral, phi3, gemma2, gemma3, olmo2, granite, starcoder2) and
converts each with `convert_hf_to_gguf.py` of the installed llama-cpp-python, to f32 and q8_0.
llama.cpp tokenizes the prompt, and the same ids go to every side. Measured:

- f32: in every cell (layer, position) the lens's top-1 is the reference's, and probabilities
  agree within PROB_TOL. The reference is the transformers model itself with only its first k
  blocks, run through its own final norm, head and logit post-processing: no lens code at all.
- every file: the lens's last row is llama.cpp's own logits.
- q8_0: the lens's top-1 is the float reference's in most cells (8-bit weights move logits).
- the hooks backend on the same f32 file, where transformers can load it, agrees with the
  llama.cpp lens in every top-1 cell; where it cannot, it says so.

The fixtures are checked too (the architecture as llama.cpp names it, the block count, a reference
whose top-1 stands clear of the second in every cell, layers that predict differently), so an
agreement here cannot come from a degenerate model.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp
import numpy as np
import pytest
import torch

import tracing
from tests.converted_models import ARCHITECTURES, CACHE, convert_all, hf_model, model_dir, reference_lens
from tracing import UnsupportedModel
from tracing.api import open_tracer

NAMES = list(ARCHITECTURES)
HOOKS_NAMES = [name for name in NAMES if ARCHITECTURES[name].transformers_loads]
HOOKS_REFUSED = [name for name in NAMES if name not in HOOKS_NAMES]

# Longer than gemma2's and gemma3's sliding window (8): 12 tokens with SmolLM2's vocabulary, 18-19
# with the sentencepiece one.
PROMPT = "The capital of Germany is Berlin. The capital of France is"

# Largest |p_lens - p_reference| on f32 files (see test_llama_cpp_lens_is_the_truncated_model_on_f32).
PROB_TOL = 2e-2
# Smallest top-1 minus top-2 logit of the reference, in standard deviations of its logits.
MIN_MARGIN = 0.0125
# Last row vs llama.cpp's own logits, relative to their largest magnitude (see that test).
LAST_ROW_TOL = 1e-3 if llama_cpp.llama_supports_gpu_offload() else 1e-6
# Share of cells whose q8_0 top-1 is the float reference's.
Q8_TOP1 = 0.9


@dataclass
class LensRun:
    ids: list[int]
    lens: torch.Tensor  # [n_blocks + 1, T, vocab]: the llama.cpp lens's logits
    own: np.ndarray  # [T, vocab]: llama.cpp's own logits from the same decode
    tracer: object


def hf_vocab(name: str) -> int:
    return json.loads((model_dir(name) / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def ggufs():
    """Every architecture's GGUF in every outtype (converted on the first run, cached after)."""
    return convert_all()


@pytest.fixture(scope="module")
def lens_run(ggufs):
    """`lens_run(name, outtype)`: the llama.cpp lens over PROMPT at every position, and llama.cpp's logits."""
    runs: dict[tuple[str, str], LensRun] = {}

    def run(name: str, outtype: str) -> LensRun:
        if (name, outtype) not in runs:
            tracer = open_tracer(str(ggufs[name, outtype]), "llama-cpp")
            ids = tracer.encode(PROMPT)
            tracer.keep_all_logits = True
            try:
                with tracer.lock():
                    hidden, _ = tracer.residuals(ids, last_only=False)
                    own = tracer.logits.copy()
            finally:
                tracer.keep_all_logits = False
            runs[name, outtype] = LensRun(ids, tracer.project(hidden).float(), own, tracer)
        return runs[name, outtype]

    return run


@pytest.fixture(scope="module")
def reference(lens_run):
    """`reference(name)`: the truncated-model reference lens on the ids llama.cpp made of PROMPT."""
    refs: dict[str, torch.Tensor] = {}

    def ref(name: str) -> torch.Tensor:
        if name not in refs:
            refs[name] = reference_lens(hf_model(name), lens_run(name, "f32").ids)
        return refs[name]

    return ref


@contextmanager
def hooks_cache():
    """The hooks backend converts a GGUF to safetensors once: keep those beside the converted models
    (only while opening, so other tests' caches stay where they were)."""
    before = os.environ.get("LENSBENCH_CACHE")
    os.environ["LENSBENCH_CACHE"] = str(CACHE / "lensbench")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LENSBENCH_CACHE")
        else:
            os.environ["LENSBENCH_CACHE"] = before


def mismatches(ours: torch.Tensor, theirs: torch.Tensor) -> list[tuple[int, int]]:
    """(row, position) of every cell whose top-1 differs."""
    return [tuple(cell) for cell in torch.nonzero(ours.argmax(-1) != theirs.argmax(-1)).tolist()]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_what_it_claims(name, ggufs, reference):
    """The files are the architecture they are named for, and the comparisons can tell layers apart.

    Sharpness: in every cell of the reference, top-1 minus top-2 logit >= MIN_MARGIN standard
    deviations of its logits (seeds picked for it; smallest now 0.0138, llama4). llama.cpp's f32
    rounding moves that difference by at most 1.5e-3 deviations (8e-3 on Gemma 2/3, whose scaled
    embeddings and 256-wide heads round more); the smallest margin/error ratio measured over all
    cells is 14 (gemma3), so no top-1 can flip by rounding. Variety: every intermediate row's top-1
    differs from the output row's in at least a quarter of the positions, so a lens that read the
    wrong block, or showed the output everywhere, would disagree.
    """
    spec = ARCHITECTURES[name]
    for outtype in ("f32", "q8_0"):
        vocab = llama_cpp.Llama(str(ggufs[name, outtype]), vocab_only=True, verbose=False)
        meta = dict(vocab.metadata)
        vocab.close()
        assert meta["general.architecture"] == spec.gguf_arch
        assert int(meta[f"{spec.gguf_arch}.block_count"]) == spec.config["num_hidden_layers"]
    ref = reference(name)
    top2 = ref.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    assert margin >= MIN_MARGIN * ref.std().item(), f"smallest top-1 margin {margin:.4f}, logit std {ref.std():.2f}"
    top1 = ref.argmax(-1)
    differs = (top1[:-1] != top1[-1]).float().mean(-1)
    assert (differs >= 0.25).all(), f"share of positions where each row's top-1 is not the output's: {differs.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_lens_is_the_truncated_model_on_f32(name, lens_run, reference):
    """Every cell's top-1 equals the reference's; every probability within PROB_TOL of it.

    PROB_TOL, and why: the lens reads llama.cpp's own residual stream, which llama.cpp computes
    with an f16 KV cache (and on the CPU f16 queries in its attention kernel and an f16 GELU table),
    while the reference runs in float32. The embeddings row matches to 2e-6 of the logits' spread;
    later rows move by 1e-3 to 3e-3 of it (9e-3 on Gemma 2/3). Largest probability difference over
    all cells and tokens, measured: llama4 1.5e-3, qwen2 1.9e-3, qwen3 2.3e-3, qwen3_moe 2.0e-3,
    mistral 1.9e-3, phi3 2.3e-3, gemma2 2.0e-3, gemma3 3.3e-3, olmo2 6.7e-3 (post-norms amplify the
    rounding), granite 4.9e-4, starcoder2 2.6e-3. PROB_TOL = 2e-2 is three times the largest. The
    mistakes this is for are far above it (measured by breaking the lens on these files): without
    Gemma 2's soft-cap 0.13, without Granite's logit scaling 0.44, without the final norm's weight
    or with it applied twice >= 0.39 and 12-74 top-1 cells wrong per architecture.
    """
    run, ref = lens_run(name, "f32"), reference(name)
    n_blocks = ARCHITECTURES[name].config["num_hidden_layers"]
    assert run.lens.shape == ref.shape == (n_blocks + 1, len(run.ids), hf_vocab(name))
    assert mismatches(run.lens, ref) == []
    prob_diff = (run.lens.softmax(-1) - ref.softmax(-1)).abs().max().item()
    print(f"{name}: max |p_lens - p_ref| = {prob_diff:.2e}")
    assert prob_diff <= PROB_TOL


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("name", NAMES)
def test_last_row_is_llama_cpps_own_logits(name, outtype, lens_run):
    """The lens's output row against the logits llama.cpp returned for the same decode, every position.

    LAST_ROW_TOL, and why: on a CPU build the lens multiplies by the GGUF's own unembedding bytes
    with llama.cpp's own kernel (activations rounded to the weight's dot type as llama.cpp does),
    so only the last bits of the float32 final norm can differ; measured at most 1.6e-7 of the
    logits' largest magnitude (0 on 15 of the 22 files), bound 1e-6. A GPU build computes its
    logits on the GPU without rounding activations to 8 bits, while the lens multiplies on the
    CPU: there the bound is the lens's own self-check tolerance, 1e-3.
    """
    run = lens_run(name, outtype)
    last = run.lens[-1].numpy()
    assert last.shape == run.own.shape == (len(run.ids), hf_vocab(name))
    error = np.abs(last - run.own).max() / np.abs(run.own).max()
    print(f"{name}-{outtype}: last row vs llama.cpp's logits, relative {error:.1e}")
    assert error <= LAST_ROW_TOL
    assert (last.argmax(-1) == run.own.argmax(-1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_lens_mostly_agrees_with_the_float_reference(name, lens_run, reference):
    """The lens on q8_0 weights (and llama.cpp's 8-bit activations in its q8_0 matmuls) against the
    float32 reference, on the same ids (both files carry the same vocabulary).

    8-bit rounding of every weight moves logits far more than f32's errors, so close top-1s flip.
    Measured agreement: 1.000 on qwen2, qwen3, qwen3_moe, mistral, phi3, starcoder2; llama4 0.983,
    olmo2 0.983, gemma2 0.979, granite 0.978, gemma3 0.947. Bound Q8_TOP1 = 0.9.
    """
    run, ref = lens_run(name, "q8_0"), reference(name)
    assert run.ids == lens_run(name, "f32").ids
    assert run.lens.shape == ref.shape
    agree = (run.lens.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}-q8_0: top-1 agreement with the float reference {agree:.3f}")
    assert agree >= Q8_TOP1


@pytest.mark.parametrize("name", HOOKS_NAMES)
def test_hooks_backend_on_the_same_gguf_agrees_in_every_top1(name, ggufs, lens_run, reference):
    """The hooks backend (transformers' dequantization of the f32 GGUF, read by PyTorch hooks) and the
    llama.cpp lens, both through the public trace API on the same ids: every cell's top-1 equal.

    The hooks lens is also held to the reference: both are float32 PyTorch on the same weights, so
    they differ only by summation order (measured <= 5.6e-6 in probability, qwen3; bound 2e-5).
    """
    with hooks_cache():
        hooks = open_tracer(str(ggufs[name, "f32"]), "hooks", device="cpu")
    cpp = lens_run(name, "f32")
    ours = tracing.trace_with(hooks, None, ids=cpp.ids, top_k=1)
    theirs = tracing.trace_with(cpp.tracer, None, ids=cpp.ids, top_k=1)
    assert ours.topk_ids.shape == theirs.topk_ids.shape == (len(ours.layers), len(cpp.ids), 1)
    assert np.argwhere(ours.topk_ids[..., 0] != theirs.topk_ids[..., 0]).tolist() == []
    with hooks.lock():
        hidden, _ = hooks.residuals(cpp.ids, last_only=False)
        hooks_logits = hooks.project(hidden).float()
    ref = reference(name)
    assert mismatches(hooks_logits, ref) == []
    prob_diff = (hooks_logits.softmax(-1) - ref.softmax(-1)).abs().max().item()
    print(f"{name}: hooks vs reference, max |dp| = {prob_diff:.1e}")
    assert prob_diff <= 2e-5


@pytest.mark.parametrize("name", HOOKS_REFUSED)
def test_hooks_backend_says_when_transformers_cannot_load_the_gguf(name, ggufs):
    arch = ARCHITECTURES[name].gguf_arch
    with hooks_cache(), pytest.raises(UnsupportedModel, match=f"transformers cannot load '{arch}' GGUF files"):
        open_tracer(str(ggufs[name, "f32"]), "hooks", device="cpu")
