"""Learned lenses: the Jacobian lens through TransformerLens's JacobianLens (a backend, fit-lens,
the reference file format), tuned and Jacobian lenses read on the GGUF through llama.cpp, and a
tuned lens trained from the GGUF alone. Refusing another model's lens; a stopped fit writes nothing.

SmolLM2's lenses are fitted small (a chunk of 12 tokens, one training step of 256 tokens) and
kept in .cache/test-lenses between runs, like the converted models.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import tiny_ids
from tests.test_tuned_lens_backend import random_text, save_tiny_model
from tracing.api import open_tracer, trace_with
from tracing.errors import BadModelFile, FitStopped, ModelNotFound
from tracing.fit_lens import fit_jacobian_lens, fit_tuned_lens, held_out_kl
from tracing.jacobian_lens_backend import bridge_of, jacobian_tracer
from tracing.learned_lens import load_jacobian

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "test-lenses"
PROMPTS = ["The capital of Germany is", "Berlin is the capital of", "def fibonacci(n):\n    return"]
# Fixed English text (no sampling): the same tokens on every run and both runtimes.
TEXT = " ".join([
    "The river runs through the old town, past the market and the church, and out into the fields.",
    "In the morning the bakers open their doors and the smell of bread fills the narrow streets.",
    "Scientists measured the temperature of the lake every day for ten years and found it rising.",
    "She opened the letter, read it twice, and then put it back into the drawer without a word.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The committee will meet on Tuesday to discuss the budget for the coming year.",
] * 6)
HELD_OUT = " ".join([
    "After the storm the fishermen counted their boats and found that two were missing from the harbour.",
    "The museum keeps a small collection of clocks, some of them more than three hundred years old.",
    "for i in range(10):\n    total += i * i\nprint(total)",
    "Children in the village learn to swim in the cold water of the lake before they can read.",
] * 2)


def tiny_jacobian(loaded, tmp_path, **options):
    return fit_jacobian_lens(loaded, random_text(600), chunks=3, seq_len=24, skip_first=2, out=tmp_path / "jl",
                             progress=False, **options)


# ---- the Jacobian lens on a tiny model: fast checks of the plumbing ----


def test_jacobian_rows_are_transformer_lens_readout_and_the_last_row_is_the_model(tiny_loaded, tmp_path):
    from transformer_lens.tools.analysis import JacobianLens

    loaded = tiny_loaded("llama")
    report = tiny_jacobian(loaded, tmp_path)
    assert report.mean_after < report.mean_before, report.table()
    lens = JacobianLens.load(str(tmp_path / "jl" / "lens.pt"))
    assert lens.source_layers == [0, 1] and lens.d_model == 32  # every block but the last
    ids = tiny_ids()[0].tolist()
    result = trace_with(jacobian_tracer(loaded, tmp_path / "jl"), None, ids=ids, top_k=5)
    assert result.backend == "jacobian-lens"
    assert result.lens == ["logit", "jacobian", "jacobian", "output"]
    with torch.no_grad():
        own = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    np.testing.assert_allclose(result.topk_probs[-1], own.topk(5).values.numpy(), atol=1e-5)
    # The library's own readout, on the same bridge: the same distributions row by row.
    theirs = lens.readout(bridge_of(loaded), torch.tensor([ids]), top_k=5, return_full_logits=True)
    for layer in lens.source_layers:
        probs = torch.softmax(theirs.lens_logits[layer], -1).topk(5)
        np.testing.assert_array_equal(result.topk_ids[layer + 1], probs.indices.numpy())
        np.testing.assert_allclose(result.topk_probs[layer + 1], probs.values.numpy(), atol=1e-5)


def test_fit_lens_cli_writes_the_reference_format_and_the_backend_reads_it(tmp_path, capsys):
    from tracing.__main__ import main

    folder = save_tiny_model(tmp_path / "tiny-llama")
    text = tmp_path / "text.txt"
    text.write_text(random_text(800))
    out = tmp_path / "jlens"
    argv = ["fit-lens", "--kind", "jacobian", "--model", str(folder), "--text", str(text), "--chunks", "2",
            "--seq-len", "24", "--skip-first", "2", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Held-out mean KL" in printed and "layer 2" in printed and str(out) in printed
    assert sorted(p.name for p in out.iterdir()) == ["lens.pt"]
    payload = torch.load(out / "lens.pt", weights_only=True)
    assert {"J", "n_prompts", "source_layers", "d_model"} <= set(payload)  # the reference artifact's keys
    assert payload["n_prompts"] == 2 and payload["J"][0].dtype == torch.float16
    assert main(["--backend", "jacobian-lens", "--model", str(folder), "--lens", str(out), "--prompt", "w5 w6 w7",
                 "--device", "cpu"]) == 0
    assert "backend: jacobian-lens" in capsys.readouterr().out


def test_a_saved_jacobian_lens_loads_back_as_fitted(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    tiny_jacobian(loaded, tmp_path)
    first = load_jacobian(tmp_path / "jl")
    first.save(str(tmp_path / "again.pt"))
    second = load_jacobian(tmp_path / "again.pt")
    for layer in first.source_layers:  # a round trip through the file is exact
        assert torch.equal(first.jacobians[layer], second.jacobians[layer])
    ids = tiny_ids()[0].tolist()
    a = trace_with(jacobian_tracer(loaded, first), None, ids=ids)
    b = trace_with(jacobian_tracer(loaded, tmp_path / "again.pt"), None, ids=ids)
    np.testing.assert_array_equal(a.topk_probs, b.topk_probs)


def test_a_lens_for_another_model_is_refused_naming_both(tiny_loaded, tmp_path, smollm2):
    tiny_jacobian(tiny_loaded("llama"), tmp_path)
    with pytest.raises(BadModelFile, match=r"fitted for tiny llama \(3 layers of width 32\); SmolLM2.*30 layers of width 576"):
        jacobian_tracer(smollm2, tmp_path / "jl")
    # Same shape, another model: TransformerLens's own provenance check names both.
    with pytest.raises(BadModelFile, match=r"fitted for model 'tiny llama', but the supplied model is 'tiny qwen2'"):
        jacobian_tracer(tiny_loaded("qwen2"), tmp_path / "jl")
    # Same shape and name, another unembedding (the fingerprint recorded at fitting time).
    lens = load_jacobian(tmp_path / "jl")
    lens.metadata["lensbench_unembedding_fingerprint"] = torch.randn(1024).tolist()
    with pytest.raises(BadModelFile, match=r"fitted for tiny llama, whose unembedding is not tiny llama's \(correlation"):
        jacobian_tracer(tiny_loaded("llama"), lens)
    # On the GGUF: a J-lens and a tuned lens made for the tiny model.
    with pytest.raises(BadModelFile, match=r"tiny llama \(3 layers of width 32\); SmolLM2.*30 layers of width 576"):
        open_tracer(None, "llama-cpp", lens_kind="jacobian", lens=str(tmp_path / "jl"))
    from tracing.train_lens import train_lens

    train_lens(tiny_loaded("llama"), random_text(600), steps=1, out=tmp_path / "tl", seq_len=32, tokens_per_step=32,
               progress=False)
    with pytest.raises(BadModelFile, match=r"trained for tiny llama \(3 layers of width 32\); SmolLM2.*30 layers"):
        open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(tmp_path / "tl"))
    with pytest.raises(ModelNotFound, match="no tuned lens for .* yet|No tuned lens"):
        open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kind", ["jacobian", "tuned"])
def test_a_stopped_fit_leaves_nothing_half_written(tiny_loaded, tmp_path, kind):
    loaded = tiny_loaded("llama")
    out = tmp_path / "lenses" / "mine"
    out.mkdir(parents=True)
    (out / "earlier.txt").write_text("the lens from before")
    stop = threading.Event()
    seen = []

    def on_step(done, total, message):
        seen.append((done, total))
        if done:
            stop.set()  # stop after the first chunk / step (0: the preparation before it)

    options = dict(out=out, on_step=on_step, cancel=stop, progress=False)
    with pytest.raises(FitStopped, match="stopped; nothing was saved"):
        if kind == "jacobian":
            fit_jacobian_lens(loaded, random_text(600), chunks=3, seq_len=24, skip_first=2, **options)
        else:
            fit_tuned_lens(loaded, random_text(2000), steps=5, tokens_per_step=32, seq_len=32, **options)
    total = 3 if kind == "jacobian" else 5
    assert seen == [(0, total), (1, total)]
    assert sorted(p.name for p in (tmp_path / "lenses").iterdir()) == ["mine"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]  # the earlier lens untouched
    stop.clear()
    seen.clear()
    options["on_step"] = lambda *a: seen.append(a)
    if kind == "jacobian":
        fit_jacobian_lens(loaded, random_text(600), chunks=3, seq_len=24, skip_first=2, **options)
    else:
        fit_tuned_lens(loaded, random_text(2000), steps=5, tokens_per_step=32, seq_len=32, **options)
    assert [p.name for p in (tmp_path / "lenses").iterdir()] == ["mine"]
    assert "earlier.txt" not in {p.name for p in out.iterdir()}  # replaced whole, at the end
    assert seen[-1][:2] == ((3, 3) if kind == "jacobian" else (5, 5))


# ---- SmolLM2: a fitted J-lens, lenses on the GGUF, a tuned lens trained from the GGUF alone ----


@pytest.fixture(scope="module")
def smollm2_jacobian(smollm2):
    """A J-lens for the bundled SmolLM2 (dequantized twin), fitted on one 12-token chunk (~1 min), cached."""
    folder = CACHE / "smollm2-jacobian"
    if not (folder / "lens.pt").is_file():
        fit_jacobian_lens(smollm2, TEXT, chunks=1, seq_len=12, skip_first=4, out=folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def smollm2_tuned(smollm2):
    """Tuned lenses for SmolLM2 on TEXT, one step of 256 tokens each: trained in PyTorch and from the GGUF alone."""
    from tracing.gguf_lens import train_tuned_lens_gguf

    torch_dir, gguf_dir = CACHE / "smollm2-tuned", CACHE / "smollm2-tuned-gguf"
    if not (torch_dir / "params.pt").is_file():
        fit_tuned_lens(smollm2, TEXT, steps=1, tokens_per_step=256, seq_len=128, out=torch_dir, progress=False)
    if not (gguf_dir / "params.pt").is_file():
        train_tuned_lens_gguf(None, TEXT, steps=1, tokens_per_step=256, seq_len=128, out=gguf_dir, progress=False)
    return torch_dir, gguf_dir


def test_a_fitted_jacobian_lens_on_smollm2_differs_from_the_logit_lens_in_middle_rows(smollm2_jacobian, smollm2_hooks):
    jlens = open_tracer(None, "jacobian-lens", device="cpu", lens=str(smollm2_jacobian))
    prompt = "The capital of Germany is"
    result = trace_with(jlens, prompt, target=" Berlin")
    logit = trace_with(smollm2_hooks, prompt, target=" Berlin")
    assert result.lens[0] == "logit" and result.lens[1:-1] == ["jacobian"] * 29
    middle = range(10, 21)
    assert all(np.abs(result.topk_probs[r] - logit.topk_probs[r]).max() > 1e-2 for r in middle)
    assert (result.topk_ids[10:21, :, 0] != logit.topk_ids[10:21, :, 0]).mean() > 0.3
    np.testing.assert_allclose(result.topk_probs[-1], logit.topk_probs[-1], atol=1e-4)  # the output row
    assert result.top1()[-1][-1] == " Berlin"
    # Read back from its file twice: identical.
    again = trace_with(jacobian_tracer(jlens.loaded, load_jacobian(smollm2_jacobian)), prompt, target=" Berlin")
    np.testing.assert_array_equal(again.topk_probs, result.topk_probs)


def agreement(a, b) -> tuple[float, float]:
    """Top-1 agreement over every cell of PROMPTS, and the largest top-1 probability difference."""
    same = cells = 0
    worst = 0.0
    for prompt in PROMPTS:
        ids = b.encode(prompt)
        x, y = trace_with(a, None, ids=ids, top_k=1), trace_with(b, None, ids=ids, top_k=1)
        equal = x.topk_ids[..., 0] == y.topk_ids[..., 0]
        same, cells = same + int(equal.sum()), cells + equal.size
        worst = max(worst, float(np.abs(x.topk_probs[..., 0] - y.topk_probs[..., 0])[equal].max()))
    return same / cells, worst


def test_learned_lenses_on_the_gguf_agree_with_pytorch_as_the_logit_lens_does(smollm2_jacobian, smollm2_tuned, smollm2_hooks,
                                                                             smollm2_llama_cpp):
    torch_tuned, _ = smollm2_tuned
    logit = agreement(smollm2_llama_cpp, smollm2_hooks)
    jacobian = agreement(open_tracer(None, "llama-cpp", lens_kind="jacobian", lens=str(smollm2_jacobian)),
                         open_tracer(None, "jacobian-lens", device="cpu", lens=str(smollm2_jacobian)))
    tuned = agreement(open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(torch_tuned)),
                      open_tracer(None, "tuned-lens-tuned", device="cpu", lens=str(torch_tuned)))
    # The test_llama_cpp_backend bound (>= 90% of cells' top-1), and within 5 points of the logit lens.
    for name, (share, worst) in {"logit": logit, "jacobian": jacobian, "tuned": tuned}.items():
        assert share >= 0.90 and share >= logit[0] - 0.05, (name, share, logit)
    result = trace_with(open_tracer(None, "llama-cpp", lens_kind="jacobian", lens=str(smollm2_jacobian)), PROMPTS[0])
    assert result.backend == "llama-cpp" and result.lens[1:-1] == ["jacobian"] * 29
    assert result.info["lens_file"].endswith("lens.pt")
    wrapped = open_tracer(None, "llama-cpp", lens_kind="jacobian", lens=str(smollm2_jacobian))
    wrapped.control_vector = None  # what steering sets: it reaches llama.cpp's own tracer
    assert "control_vector" not in vars(wrapped) and wrapped.inner is smollm2_llama_cpp


def test_a_tuned_lens_trained_from_the_gguf_alone_lands_close_to_the_pytorch_one(smollm2_tuned, smollm2_llama_cpp):
    torch_tuned, gguf_tuned = smollm2_tuned
    from tracing.train_lens import sequences

    held = [row.tolist() for row in sequences(smollm2_llama_cpp, HELD_OUT, 32)[:2]]
    kl = {
        "logit": held_out_kl(smollm2_llama_cpp, held),
        "pytorch": held_out_kl(open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(torch_tuned)), held),
        "gguf": held_out_kl(open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(gguf_tuned)), held),
    }
    mean = {name: sum(v) / len(v) for name, v in kl.items()}
    assert mean["gguf"] < mean["logit"] and mean["pytorch"] < mean["logit"], mean
    # Measured: the same to 0.1% (both see the same weights; llama.cpp rounds activations to 8 bits).
    assert abs(mean["gguf"] - mean["pytorch"]) <= 0.02 * mean["pytorch"], mean
    per_layer = np.abs(np.array(kl["gguf"]) - np.array(kl["pytorch"]))
    assert per_layer.max() <= 0.05 * max(kl["pytorch"]), per_layer


def test_fit_lens_on_the_gguf_refuses_a_jacobian_lens():
    from tracing.__main__ import main

    assert main(["fit-lens", "--kind", "jacobian", "--backend", "llama-cpp"]) == 2
