"""The tuned-lens backends: tuned-lens's LogitLens agrees with the hooks backend everywhere; a tuned
lens trained here beats the logit lens on held-out text; each way tuned-lens 0.2.0 breaks on
today's stack is shown failing in tuned-lens itself and working through our adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tiny_models import ARCHITECTURES, MULTIMODAL, SOFTCAPPED, VOCAB, tiny_ids, tiny_model
from tracing.api import trace, trace_with
from tracing.errors import BadModelFile, ModelNotFound
from tracing.hooks import HooksTracer
from tracing.tuned_lens_backend import (
    ModelUnembed,
    figure,
    logit_lens_tracer,
    new_tuned_lens,
    trained_lens_dir,
    trajectory,
    tuned_lens_tracer,
)

PROMPT = "The capital of Germany is Berlin, and the capital of France is"


def assert_same_lens(reference, other, tolerance=1e-3):
    np.testing.assert_array_equal(reference.topk_ids[..., 0], other.topk_ids[..., 0])
    np.testing.assert_allclose(other.topk_probs, reference.topk_probs, atol=tolerance, rtol=0)
    if reference.target is not None:
        np.testing.assert_allclose(other.target.prob, reference.target.prob, atol=tolerance, rtol=0)


def random_text(n_words: int, seed: int = 1) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n_words,), generator=generator).tolist())


# ---- the logit lens through tuned-lens's LogitLens agrees with the hooks backend ----


@pytest.mark.parametrize("arch", [*ARCHITECTURES, MULTIMODAL])
def test_logit_lens_agrees_with_hooks_on_every_tiny_architecture(tiny_loaded, arch):
    loaded = tiny_loaded(arch)
    ids = tiny_ids()[0].tolist()
    reference = trace_with(loaded.adapter("hooks", HooksTracer), None, ids=ids, top_k=3, target="w5")
    result = trace_with(logit_lens_tracer(loaded), None, ids=ids, top_k=3, target="w5")
    assert result.backend == "tuned-lens"
    assert result.lens == ["logit"] * (len(result.layers) - 1) + ["output"]
    assert_same_lens(reference, result, tolerance=1e-6)


def test_logit_lens_agrees_with_hooks_on_smollm2(smollm2, smollm2_hooks):
    from tracing.api import open_tracer

    tuned_lens_logit = open_tracer(None, "tuned-lens", device="cpu")
    reference = trace_with(smollm2_hooks, PROMPT, target=" Paris")
    result = trace_with(tuned_lens_logit, PROMPT, target=" Paris")
    assert_same_lens(reference, result)
    assert result.top1()[-1][-1] == " Paris"


def test_logit_lens_agrees_with_hooks_on_gemma3(gemma3, gemma3_gguf):
    from tracing.api import open_tracer

    hooks = open_tracer(str(gemma3_gguf), "hooks", device="cpu")
    tuned_lens_logit = open_tracer(str(gemma3_gguf), "tuned-lens", device="cpu")
    prompt = "The capital of Germany is"
    assert_same_lens(trace_with(hooks, prompt, target=" Berlin"), trace_with(tuned_lens_logit, prompt, target=" Berlin"))


# ---- each tuned-lens 0.2.0 breakage: failing in tuned-lens itself, working through the adapter ----


def test_1_from_model_fails_on_transformer_lens_4_but_our_unembed_works(tiny_loaded):
    """tuned-lens's model_surgery asks TransformerLens for HookedTransformer, gone in 4.0."""
    from tuned_lens.nn import LogitLens

    model = tiny_loaded("llama").model  # an architecture tuned-lens knows
    with pytest.raises(Exception, match="HookedTransformer"):
        LogitLens.from_model(model)
    result = trace_with(logit_lens_tracer(tiny_loaded("llama")), None, ids=[5, 6, 7])
    assert result.n_rows == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("arch", ["mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "qwen3_moe"])
def test_2_unknown_model_type_in_tuned_lens_but_our_unembed_works(tiny_loaded, arch, monkeypatch):
    """Even with TransformerLens out of the way, model_surgery's isinstance table rejects these."""
    import tuned_lens.model_surgery
    from tuned_lens.nn import Unembed

    loaded = tiny_loaded(arch)
    monkeypatch.setattr(tuned_lens.model_surgery, "_transformer_lens_available", False)
    with pytest.raises(NotImplementedError, match="Unknown model type"):
        Unembed(loaded.model)
    monkeypatch.undo()
    parts = loaded.adapter("hooks", HooksTracer).lens.parts
    unembed = ModelUnembed(parts)
    hidden = torch.randn(2, 4, loaded.model.config.hidden_size)
    torch.testing.assert_close(unembed(hidden), parts.project(hidden), atol=1e-6, rtol=0)
    assert unembed.unembedding is loaded.model.get_output_embeddings()  # shared, not a copy


@pytest.mark.parametrize("arch", sorted(SOFTCAPPED))
def test_3_softcapping_ignored_by_tuned_lens_applied_by_ours(tiny_loaded, arch):
    from tuned_lens.nn import Unembed

    loaded = tiny_loaded(arch)
    hooks = loaded.adapter("hooks", HooksTracer)
    ids = tiny_ids()
    hidden, logits = hooks.lens.residuals(ids)
    ours = ModelUnembed(hooks.lens.parts)
    tuned_lens_way = Unembed.forward(ours, hidden[-1])  # the library's forward: norm, unembedding, no cap
    assert (tuned_lens_way - logits).abs().max() > 1.0
    torch.testing.assert_close(ours(hidden[-1]), logits, atol=1e-5, rtol=0)


def test_4_one_token_prompt_asserts_in_tuned_lens_but_our_trajectory_works(tiny_loaded):
    from tuned_lens.plotting import PredictionTrajectory

    loaded = tiny_loaded("qwen2")
    tracer = logit_lens_tracer(loaded)
    with pytest.raises(AssertionError):
        PredictionTrajectory.from_lens_and_model(tracer.lens, loaded.model, input_ids=[5], tokenizer=loaded.tokenizer)
    one = trajectory(tracer, [5])
    assert one.log_probs.shape == (loaded.model.config.num_hidden_layers + 1, 1, VOCAB)
    with torch.no_grad():
        model_logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([[5]])).logits[0], -1)
    np.testing.assert_allclose(one.model_log_probs, model_logp.numpy(), atol=1e-4)
    # Longer prompts: the same numbers as tuned-lens's own pipeline.
    ids = tiny_ids()[0].tolist()
    theirs = PredictionTrajectory.from_lens_and_model(tracer.lens, loaded.model, input_ids=ids)
    np.testing.assert_allclose(trajectory(tracer, ids).log_probs, theirs.log_probs, atol=1e-4)


def test_5_plotly_7_rejects_tuned_lens_figures_but_ours_render(tiny_loaded):
    loaded = tiny_loaded("llama")
    statistic = trajectory(logit_lens_tracer(loaded), tiny_ids()[0].tolist()).entropy()
    with pytest.raises(ValueError, match="titleside"):
        statistic.figure()
    fig = figure(statistic, title="entropy")
    assert fig.data[0].colorbar.title.text.startswith("Entropy") and fig.data[0].colorbar.title.side == "right"
    assert json.loads(fig.to_json())["data"][0]["type"] == "heatmap"


def test_6_tuned_lens_cli_does_not_import_but_ours_trains(tmp_path, capsys):
    with pytest.raises(ImportError):
        import tuned_lens.__main__  # noqa: F401
    folder = save_tiny_model(tmp_path / "tiny-llama")
    text = tmp_path / "text.txt"
    text.write_text(random_text(3000))
    from tracing.__main__ import main

    out = tmp_path / "lens"
    argv = ["train-lens", "--model", str(folder), "--text", str(text), "--steps", "3", "--seq-len", "32",
            "--tokens-per-step", "128", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Held-out mean KL" in printed and str(out) in printed
    # tuned-lens's own format: its TunedLens loads it, and params.pt is plain tensors.
    from tuned_lens.nn import TunedLens

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.pt"]
    state = torch.load(out / "params.pt", weights_only=True)
    assert set(state) == {f"{i}.{w}" for i in range(3) for w in ("weight", "bias")}
    from tracing.loading import load_model

    loaded = load_model(str(folder), device="cpu")
    unembed = ModelUnembed(loaded.adapter("hooks", HooksTracer).lens.parts)
    theirs = TunedLens.from_unembed_and_pretrained(unembed, str(out))
    assert len(theirs) == 3 and theirs.config.d_model == 32


# ---- a trained tuned lens ----


def save_tiny_model(folder, arch: str = "llama"):
    """tests/tiny_models.py's model of `arch` with its word tokenizer, as a model folder the CLI can open."""
    from tests.conftest import word_tokenizer

    tiny_model(arch).save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def test_trained_tuned_lens_beats_the_logit_lens_on_held_out_text(tiny_loaded, tmp_path):
    from tracing.train_lens import train_lens

    loaded = tiny_loaded("gemma2")
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    report = train_lens(
        loaded, random_text(3000), steps=30, out=tmp_path / "lens", seq_len=32, tokens_per_step=128, progress=False
    )
    assert report.mean_kl_tuned < 0.9 * report.mean_kl_logit, report.summary()

    # The shared model is exactly as it was: same weights, still trainable, no gradients left on it.
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad and p.grad is None, name

    # Independently of the trainer's own measure: trace text it never saw with both lenses.
    tuned = tuned_lens_tracer(loaded, tmp_path / "lens")
    held_out = [int(w[1:]) for w in random_text(48, seed=7).split()]
    tuned_result = trace_with(tuned, None, ids=held_out)
    logit_result = trace_with(logit_lens_tracer(loaded), None, ids=held_out)
    rows = len(tuned_result.layers) - 1
    assert tuned_result.lens == ["tuned"] * rows + ["output"]
    assert tuned_result.kl_to_final[:-1].mean() < logit_result.kl_to_final[:-1].mean()
    np.testing.assert_allclose(tuned_result.topk_probs[-1], logit_result.topk_probs[-1], atol=1e-6)  # the output row


def test_a_tuned_lens_on_smollm2_from_a_folder(smollm2, tmp_path):
    """A lens folder (here: identity translators but one) is read and applied row by row."""
    from tracing.api import open_tracer

    parts = smollm2.adapter("hooks", HooksTracer).lens.parts
    lens = new_tuned_lens(smollm2.model, parts, smollm2.name)
    with torch.no_grad():
        lens.layer_translators[10].bias.normal_(0, 5.0)
    lens.save(tmp_path)
    tuned = open_tracer(None, "tuned-lens-tuned", device="cpu", lens=str(tmp_path))
    assert tuned.lens.matches_unembedding
    logit = open_tracer(None, "tuned-lens", device="cpu")
    a, b = trace_with(tuned, PROMPT, top_k=3), trace_with(logit, PROMPT, top_k=3)
    assert a.lens[:2] == ["tuned", "tuned"] and a.backend == "tuned-lens-tuned"
    changed = [r for r in range(a.n_rows) if not np.allclose(a.topk_probs[r], b.topk_probs[r], atol=1e-5)]
    assert changed == [10]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_train_then_trace_through_the_default_lens_folder(tiny_folder, tmp_path, monkeypatch, capsys):
    from tracing.__main__ import main

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    assert trained_lens_dir(str(tiny_folder)) is None
    with pytest.raises(ModelNotFound, match="no tuned lens for .* yet.*train-lens"):
        trace("w5 w6 w7", model=str(tiny_folder), backend="tuned-lens-tuned", device="cpu")
    text = tmp_path / "text.txt"
    text.write_text(random_text(2000))
    argv = ["train-lens", "--model", str(tiny_folder), "--text", str(text), "--steps", "2", "--seq-len", "32",
            "--tokens-per-step", "64", "--device", "cpu"]
    assert main(argv) == 0
    assert trained_lens_dir(str(tiny_folder)) == tmp_path / "cache" / "lenses" / "tiny-llama"
    capsys.readouterr()
    assert main(["--backend", "tuned-lens-tuned", "--model", str(tiny_folder), "--prompt", "w5 w6 w7", "--device", "cpu"]) == 0
    assert "backend: tuned-lens-tuned" in capsys.readouterr().out


def test_lens_files_that_cannot_be_used_are_clear_errors(tiny_folder, tmp_path):
    def open_lens(folder):
        return trace("w5 w6", model=str(tiny_folder), backend="tuned-lens-tuned", device="cpu", lens=str(folder))

    with pytest.raises(ModelNotFound, match="config.json and params.pt missing"):
        open_lens(tmp_path / "nowhere")
    other = tmp_path / "gpt2-lens"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"base_model_name_or_path": "gpt2", "d_model": 768, "num_hidden_layers": 12}))
    (other / "params.pt").write_bytes(b"")
    with pytest.raises(BadModelFile, match="trained for gpt2 \\(12 layers of width 768\\)"):
        open_lens(other)
    unsafe = tmp_path / "unsafe-lens"
    unsafe.mkdir()
    (unsafe / "config.json").write_text(json.dumps({"base_model_name_or_path": "x", "d_model": 32, "num_hidden_layers": 3}))
    torch.save({"0.weight": torch.zeros(32, 32), "code": print}, unsafe / "params.pt")  # not plain tensors
    with pytest.raises(BadModelFile, match="Could not read the tuned lens"):
        open_lens(unsafe)


def test_train_lens_refuses_text_too_short(tiny_folder, tmp_path):
    from tracing.__main__ import main

    text = tmp_path / "short.txt"
    text.write_text("w5 w6 w7")
    assert main(["train-lens", "--model", str(tiny_folder), "--text", str(text), "--out", str(tmp_path / "l")]) == 2
    assert main(["train-lens", "--model", str(tiny_folder), "--text", str(tmp_path / "missing.txt")]) == 2
