"""Every technique on a GPU (cuda, or mps on Apple Silicon) gives what it gives on the CPU.

The app leaves the device to `tracing.device.pick_device` (cuda, then mps, then cpu), so on the
user's Mac every PyTorch technique runs on mps. Here each one runs twice on the same tiny random
model, saved to a folder and loaded by `tracing.loading.load_model` as the app loads a model: on
the CPU, and on the device picked by default. The CPU run is the reference; the exact identities
(restoring the clean input gives effect 1, parts add up to the logit, attention rows sum to 1)
are checked on the GPU too. Skipped where there is no GPU (as on CI): `make test` runs it on a
Mac or a CUDA machine. LENSBENCH_TEST_GPU=cpu runs it here against the CPU itself (a check of
the checks).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.test_tuned_lens_backend import random_text, save_tiny_model


DEVICE = os.environ.get("LENSBENCH_TEST_GPU")  # None: the device load_model picks by itself


def _gpus() -> list[str]:
    if DEVICE:
        return [DEVICE]
    found = ["cuda"] if torch.cuda.is_available() else []
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


GPUS = _gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason="no GPU here (cuda or mps): these checks run where there is one")

# Dense with tied embeddings; Gemma 3 (soft-cap, post-norms, sliding window); a mixture of experts.
ARCHS = ["llama", "gemma3_text", "qwen3_moe"]
CLEAN, CORRUPT = "w5 w6 w7 w8 w9 w10", "w5 w6 w11 w8 w9 w10"
TARGET, CONTRAST = "w12", "w13"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """arch -> a saved model folder (tests/tiny_models.py's model with its word tokenizer)."""
    made = {}

    def folder(arch: str):
        if arch not in made:
            made[arch] = save_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return made[arch]

    return folder


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, folders):
    """(CPU tracer, GPU tracer) of the hooks backend on one tiny model; the GPU one on the device
    `load_model` picks by itself (LENSBENCH_TEST_GPU names it instead when set)."""
    from tracing.api import open_tracer

    folder = str(folders(request.param))
    cpu = open_tracer(folder, "hooks", device="cpu")
    gpu = open_tracer(folder, "hooks", device=DEVICE)
    return cpu, gpu


def test_the_default_device_is_the_gpu_with_float32_weights(pair):
    cpu, gpu = pair
    assert gpu.loaded.device.type == GPUS[0]
    assert gpu.loaded.dtype == torch.float32 and "fit in" in gpu.loaded.info["dtype_reason"]
    assert next(gpu.loaded.model.parameters()).device.type == GPUS[0]
    assert cpu.loaded.device.type == "cpu"


def test_the_lens_gives_the_cpu_numbers(pair):
    from tracing.api import trace_with

    cpu, gpu = pair
    ours, ref = trace_with(gpu, CLEAN, target=TARGET), trace_with(cpu, CLEAN, target=TARGET)
    assert ours.info["device"].startswith(GPUS[0])
    np.testing.assert_array_equal(ours.topk_ids[:, :, 0], ref.topk_ids[:, :, 0])
    np.testing.assert_allclose(ours.topk_probs, ref.topk_probs, atol=1e-4)
    np.testing.assert_allclose(ours.entropy, ref.entropy, atol=1e-3)
    np.testing.assert_allclose(ours.kl_to_final, ref.kl_to_final, atol=1e-3)
    np.testing.assert_allclose(ours.target.prob, ref.target.prob, atol=1e-4)
    # The last row is the model's own output: its softmax, on the GPU.
    with torch.no_grad():
        ids = torch.tensor([ours.token_ids], device=gpu.loaded.device)
        own = torch.softmax(gpu.loaded.model(input_ids=ids).logits[0].float(), -1).topk(5).values.cpu().numpy()
    np.testing.assert_allclose(ours.topk_probs[-1], own, atol=1e-5)


def test_activation_patching_gives_the_cpu_grid_and_restoring_the_clean_input_gives_1(pair):
    from tracing.patching import patch_with

    cpu, gpu = pair
    ours = patch_with(gpu, CLEAN, CORRUPT, TARGET, CONTRAST)
    ref = patch_with(cpu, CLEAN, CORRUPT, TARGET, CONTRAST)
    changed = 2  # the one position where the prompts differ
    assert ours.effect[0, changed] == pytest.approx(1.0, abs=1e-4)  # the embeddings row: the clean input
    assert ours.effect[-1, -1] == pytest.approx(1.0, abs=1e-4)  # the last block's output at the last position
    assert ours.clean_value == pytest.approx(ref.clean_value, abs=1e-3)
    np.testing.assert_allclose(ours.effect, ref.effect, atol=1e-3, rtol=1e-3)
    if ref.attn_effect is not None:
        np.testing.assert_allclose(ours.attn_effect, ref.attn_effect, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(ours.mlp_effect, ref.mlp_effect, atol=1e-3, rtol=1e-3)
    assert np.abs(ref.effect).max() > 0.2  # not a grid of zeros


def test_direct_logit_attribution_adds_up_and_gives_the_cpu_parts(pair):
    from tracing.attribution import attribute_with

    cpu, gpu = pair
    ours = attribute_with(gpu, CLEAN, TARGET, CONTRAST)
    ref = attribute_with(cpu, CLEAN, TARGET, CONTRAST)
    assert ours.total == pytest.approx(ours.final_logit, abs=1e-3)  # parts sum to the whole
    assert ours.final_logit == pytest.approx(ref.final_logit, abs=1e-3)
    np.testing.assert_allclose(ours.attention, ref.attention, atol=1e-3)
    np.testing.assert_allclose(ours.mlp, ref.mlp, atol=1e-3)
    assert ours.embeddings == pytest.approx(ref.embeddings, abs=1e-3)
    if ref.heads is not None:
        np.testing.assert_allclose(ours.heads, ref.heads, atol=1e-3)


def test_attention_patterns_and_expert_routing_are_the_cpus(pair):
    from tracing.attention import attention_with

    cpu, gpu = pair
    ours, ref = attention_with(gpu, CLEAN), attention_with(cpu, CLEAN)
    np.testing.assert_allclose(ours.pattern.sum(-1), 1.0, atol=1e-4)  # each query's row is a distribution
    np.testing.assert_allclose(ours.pattern, ref.pattern, atol=1e-4)  # a GPU may sum in another order (the H200 met 1e-5)
    assert (ours.routing is None) == (ref.routing is None)
    if ref.routing is not None:  # the MoE model: the same experts for every token
        np.testing.assert_array_equal(ours.routing.experts, ref.routing.experts)
        np.testing.assert_allclose(ours.routing.weights, ref.routing.weights, atol=1e-4)


def test_a_steering_vector_built_and_applied_on_the_gpu_is_the_cpus(pair):
    from tracing.api import trace_with
    from tracing.steering import build_with, generate

    cpu, gpu = pair
    positive, negative = ["w20 w21 w22", "w23 w24 w25"], ["w30 w31 w32", "w33 w34 w35"]
    ours, ref = build_with(gpu, positive, negative), build_with(cpu, positive, negative)
    np.testing.assert_allclose(ours.directions, ref.directions, atol=1e-4)
    steered = trace_with(gpu, CLEAN, target=TARGET, steering=(ours, 4.0))
    plain = trace_with(gpu, CLEAN, target=TARGET)
    expected = trace_with(cpu, CLEAN, target=TARGET, steering=(ref, 4.0))
    np.testing.assert_allclose(steered.target.prob, expected.target.prob, atol=1e-4)
    assert np.abs(steered.target.prob[-1] - plain.target.prob[-1]).max() > 1e-3  # it changed the model
    # Generation with the vector added (greedy: the same tokens on both devices).
    folder = cpu.loaded.source.location
    on_gpu = generate(CLEAN, (ours, 4.0), folder, "hooks", temperature=0, max_tokens=6,
                      device=DEVICE)
    on_cpu = generate(CLEAN, (ref, 4.0), folder, "hooks", temperature=0, max_tokens=6, device="cpu")
    assert on_gpu.text == on_cpu.text and on_gpu.text.strip()


def test_half_precision_on_the_gpu_traces_and_attributes(folders):
    """bfloat16 weights (what a model too big for float32 gets): the lens and attribution run, the
    attribution still adds up, and the output row mostly agrees with float32."""
    from tracing.api import trace_with
    from tracing.attribution import attribute_with
    from tracing.hooks import HooksTracer
    from tracing.loading import load_model

    folder = str(folders("llama"))
    half = load_model(folder, device=DEVICE, dtype=torch.bfloat16).adapter("hooks", HooksTracer)
    full = load_model(folder, device=DEVICE).adapter("hooks", HooksTracer)
    assert half.loaded.dtype == torch.bfloat16
    ours, ref = trace_with(half, CLEAN, target=TARGET), trace_with(full, CLEAN, target=TARGET)
    assert (ours.topk_ids[-1, :, 0] == ref.topk_ids[-1, :, 0]).mean() >= 0.5
    parts = attribute_with(half, CLEAN, TARGET, CONTRAST)
    assert parts.total == pytest.approx(parts.final_logit, abs=0.02 * max(1.0, abs(parts.final_logit)))


def test_a_tuned_lens_trained_on_the_gpu_reads_the_same_on_the_cpu(pair, tmp_path):
    from tracing.api import trace_with
    from tracing.train_lens import train_lens
    from tracing.tuned_lens_backend import tuned_lens_tracer

    cpu, gpu = pair
    report = train_lens(gpu.loaded, random_text(1200), steps=4, out=tmp_path / "lens", seq_len=32,
                        tokens_per_step=128, progress=False)
    assert np.isfinite(report.mean_kl_tuned) and report.mean_kl_tuned < report.mean_kl_logit
    ours = trace_with(tuned_lens_tracer(gpu.loaded, tmp_path / "lens"), CLEAN)
    ref = trace_with(tuned_lens_tracer(cpu.loaded, tmp_path / "lens"), CLEAN)  # saved on the GPU, read on the CPU
    assert ours.lens[1] == "tuned"
    np.testing.assert_allclose(ours.topk_probs, ref.topk_probs, atol=1e-4)


def test_a_jacobian_lens_fitted_on_the_gpu_reads_the_same_on_the_cpu(pair, tmp_path):
    from tracing.api import trace_with
    from tracing.fit_lens import fit_jacobian_lens
    from tracing.jacobian_lens_backend import jacobian_tracer

    cpu, gpu = pair
    report = fit_jacobian_lens(gpu.loaded, random_text(600), chunks=3, seq_len=24, skip_first=2,
                               out=tmp_path / "jl", progress=False)
    assert np.isfinite(report.mean_after)
    ours = trace_with(jacobian_tracer(gpu.loaded, tmp_path / "jl"), CLEAN)
    ref = trace_with(jacobian_tracer(cpu.loaded, tmp_path / "jl"), CLEAN)
    assert ours.lens[1] == "jacobian"
    np.testing.assert_allclose(ours.topk_probs, ref.topk_probs, atol=1e-4)


@pytest.mark.parametrize("backend", ["transformer-lens", "tuned-lens", "nnsight"])
def test_the_other_pytorch_backends_trace_on_the_gpu_as_hooks_does_on_the_cpu(folders, backend):
    from tracing.api import open_tracer, trace_with

    folder = str(folders("gemma3_text"))
    tracer = open_tracer(folder, backend, device=DEVICE)
    ours = trace_with(tracer, CLEAN, target=TARGET)
    ref = trace_with(open_tracer(folder, "hooks", device="cpu"), CLEAN, target=TARGET)
    assert ours.backend == backend and ours.info["device"].startswith(GPUS[0])
    np.testing.assert_array_equal(ours.topk_ids[:, :, 0], ref.topk_ids[:, :, 0])
    np.testing.assert_allclose(ours.topk_probs, ref.topk_probs, atol=1e-4)
    np.testing.assert_allclose(ours.target.prob, ref.target.prob, atol=1e-4)
    if backend == "nnsight":  # nnsight's own patching runtime, as NDIF would run it
        from tracing.patching import patch_with

        grid = patch_with(tracer, CLEAN, CORRUPT, TARGET, CONTRAST, sublayers=False)
        expected = patch_with(open_tracer(folder, "hooks", device="cpu"), CLEAN, CORRUPT, TARGET, CONTRAST, sublayers=False)
        np.testing.assert_allclose(grid.effect, expected.effect, atol=1e-3, rtol=1e-3)


def test_the_apps_default_the_bundled_gguf_on_pytorch_reads_berlin_on_the_gpu(smollm2_hooks):
    """What the app opens with on a Mac: the bundled SmolLM2 GGUF dequantized into PyTorch (hooks) on
    the device picked by default. The same " Berlin" as on the CPU (0.796 in float32)."""
    from tracing.api import open_tracer, trace_with

    gpu = open_tracer(None, "hooks", device=DEVICE)
    prompt = "The capital of Germany is"
    ours, ref = trace_with(gpu, prompt, target=" Berlin"), trace_with(smollm2_hooks, prompt, target=" Berlin")
    assert ours.info["device"].startswith(GPUS[0]) and ours.topk_tokens[-1][-1][0] == " Berlin"
    assert ours.target.prob[-1, -1] == pytest.approx(ref.target.prob[-1, -1], abs=2e-3)
    assert (ours.topk_ids[:, :, 0] == ref.topk_ids[:, :, 0]).mean() > 0.98
