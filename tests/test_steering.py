"""Steering vectors on the GGUF through llama.cpp and on PyTorch, checked against independent references.

- The mean-difference vector equals the mean difference of residuals read independently (llama.cpp:
  an eval callback of the test's own on `l_out-L`; PyTorch: transformers' `hidden_states`), and the
  PCA vector the first singular vector of the paired differences.
- The layer convention: on the same float32 weights, llama.cpp's own control vector and a PyTorch
  hook on block L's output change the logits alike; one block off does not (Llama and Scout's layout).
- A saved vector is the control-vector GGUF llama.cpp reads (architecture, tensor names, types, shapes).
- Strength 0 gives exactly the unsteered answer with the same seed on both runtimes, a vector
  changes it, and nothing leaks into the next unsteered answer or trace.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import tracing
from tracing.errors import BadControlVector, BadPrompt, BadSetting
from tracing.steering import (
    Steering,
    SteeringCancelled,
    SteeringVector,
    applied,
    build_with,
    capture,
    example,
    generate,
    load_vector,
    parse_layers,
    sweep,
)

POSITIVE, NEGATIVE = (texts[:8] for texts in example())
NEIGHBOR = [{"role": "user", "content": "Tell me about your neighbor."}]


@pytest.fixture(scope="module")
def llama_vector(smollm2_llama_cpp):
    return build_with(smollm2_llama_cpp, POSITIVE, NEGATIVE)


@pytest.fixture(scope="module")
def hooks_vector(smollm2_hooks):
    return build_with(smollm2_hooks, POSITIVE, NEGATIVE)


@pytest.fixture(scope="module")
def llama_reads(smollm2_llama_cpp):
    """The examples' residuals read independently of tracing/ (see `llama_residuals`): (positive, negative)."""
    return llama_residuals(smollm2_llama_cpp, POSITIVE), llama_residuals(smollm2_llama_cpp, NEGATIVE)


def test_the_worked_example_is_32_pairs():
    positive, negative = example()
    assert len(positive) == len(negative) == 32 and len(set(positive)) == 32
    assert positive[0] == "I love you with all my heart." and negative[0] == "I hate you with all my heart."


# ---------------------------------------------------------------- building, against independent reads


def llama_residuals(tracer, texts) -> np.ndarray:
    """l_out-L at each text's last token, read by a GraphContext and eval callback of the test's own."""
    from runtime.llama_cpp import GraphContext

    out = np.zeros((len(texts), tracer.n_blocks, tracer.d_model), np.float32)
    graph = GraphContext(tracer.shared, 64)
    try:
        for t, text in enumerate(texts):
            ids = tracer.encode(text)

            def reader(layer, t=t, n=len(ids)):
                def read(view):
                    out[t, layer] = view.rows(view.shape[0] - 1, 1)[0]  # the last block keeps only the output row
                return read

            graph.callback.handlers = {f"l_out-{L}".encode(): reader(L) for L in range(tracer.n_blocks)}
            with tracer.lock():
                graph.clear()
                graph.decode(ids, 0, [i == len(ids) - 1 for i in range(len(ids))])
    finally:
        graph.close()
    return out


def hf_residuals(tracer, texts) -> np.ndarray:
    """transformers' own hidden_states[L + 1] (the output of block L) at each text's last token."""
    model = tracer.lens.model
    rows = []
    with torch.no_grad():
        for text in texts:
            states = model(input_ids=tracer.input_ids(tracer.encode(text)), output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1] for h in states[1:]]).float().numpy())
    return np.stack(rows)


@pytest.mark.parametrize("runtime", ["llama", "hooks"])
def test_the_mean_vector_is_the_mean_difference_of_independently_read_residuals(runtime, request):
    vector = request.getfixturevalue(f"{runtime}_vector")
    if runtime == "llama":
        positive, negative = request.getfixturevalue("llama_reads")
    else:
        tracer = request.getfixturevalue("smollm2_hooks")
        positive, negative = hf_residuals(tracer, POSITIVE), hf_residuals(tracer, NEGATIVE)
    expected = positive.mean(0) - negative.mean(0)
    assert vector.directions.shape == (30, 576) and not vector.directions[0].any()
    # transformers' last hidden state has the final norm applied: compare blocks 1 .. 28 there
    last = 30 if runtime == "llama" else 29
    np.testing.assert_allclose(vector.directions[1:last], expected[1:last], rtol=1e-4, atol=1e-3 if runtime == "llama" else 1e-4)
    assert vector.n_positive == vector.n_negative == 8 and vector.method == "mean" and vector.model_hint == "llama"
    assert np.nanmax(vector.separation) == 1.0  # some layers split the two sets completely


def test_pca_is_the_first_singular_vector_of_the_paired_differences(smollm2_llama_cpp, llama_vector, llama_reads):
    pca = build_with(smollm2_llama_cpp, POSITIVE, NEGATIVE, method="pca")
    differences = llama_reads[0] - llama_reads[1]
    for layer in (3, 15, 29):
        d = differences[:, layer].astype(np.float64)
        values, vectors = np.linalg.eigh(d.T @ d)  # uncentred: the power iteration's matrix in cvector-generator
        component = vectors[:, -1] * np.sign(vectors[:, -1] @ d.mean(0))  # sign of the mean difference
        got = pca.directions[layer].astype(np.float64)
        assert got @ component == pytest.approx(component @ d.mean(0), rel=1e-3)  # its length: the mean's projection
        np.testing.assert_allclose(got / np.linalg.norm(got), component, atol=2e-3)
    cosine = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(pca.directions[10:], llama_vector.directions[10:])]
    assert min(cosine) > 0.9  # with one concept in the pairs, PCA and the mean agree in the middle layers


def test_the_lens_reading_is_the_direction_through_the_final_norm_and_unembedding(smollm2_hooks, hooks_vector):
    model = smollm2_hooks.lens.model
    for layer in (12, 29):
        v = torch.from_numpy(hooks_vector.directions[layer])
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(v))  # RMSNorm of zero is zero: nothing to subtract
        top = [smollm2_hooks.decode_one(int(i)) for i in logits.topk(5).indices]
        bottom = [smollm2_hooks.decode_one(int(i)) for i in (-logits).topk(5).indices]
        assert [t for t, _ in hooks_vector.promoted[layer]] == top
        assert [t for t, _ in hooks_vector.suppressed[layer]] == bottom
        assert hooks_vector.promoted[layer][0][1] > 0 > hooks_vector.suppressed[layer][0][1]
    table = hooks_vector.table()
    assert "l_out-L" in table and len(table.splitlines()) == 3 + 29


# ---------------------------------------------------------------- the layer convention, on the same weights


def vector_for(tracer, seed: int = 0) -> SteeringVector:
    rng = np.random.default_rng(seed)
    n, d = tracer.n_blocks, tracer.d_model
    directions = rng.normal(0, 1, (n, d)).astype(np.float32)
    directions[0] = 0
    return SteeringVector("random", "test", n, d, directions, "mean", 1, 1)


@pytest.mark.parametrize("arch", ["mistral", "llama4"])
def test_llama_cpp_adds_layer_l_where_a_hook_on_block_l_does(arch):
    """llama.cpp's control vector (llama_set_adapter_cvec) on a float32 GGUF and forward hooks on the
    transformers model of the same weights, each adding the vector of layer L to block L's output."""
    from tests.converted_models import converted, model_dir

    gguf = tracing.open_tracer(str(converted(arch, "f32")), "llama-cpp")
    hooks = tracing.open_tracer(str(model_dir(arch)), "hooks", device="cpu")
    ids = gguf.encode("The capital of Germany is")
    vector = vector_for(gguf)

    def llama_logits(steering=None):
        with applied(gguf, steering) if steering else contextlib.nullcontext():
            gguf.residuals(ids, True)
        return gguf.logits.copy()

    def torch_logits(steering=None):
        with applied(hooks, steering) if steering else contextlib.nullcontext():
            _, logits = hooks.lens.residuals(hooks.input_ids(ids), True)
        return logits[-1].float().numpy()

    base_llama, base_torch = llama_logits(), torch_logits()
    change = llama_logits(Steering.of(vector, 1.0, "1-2")) - base_llama
    assert np.abs(change).max() > 3  # a real change
    same = torch_logits(Steering.of(vector, 1.0, "1-2")) - base_torch
    assert np.abs(same - change).max() < 0.03 * np.abs(change).max()  # f16 KV cache vs float32
    for shift in (-1, 1):  # the same numbers one block earlier or later
        moved = np.roll(vector.directions, shift, axis=0)
        moved[0] = 0
        other = SteeringVector("moved", "test", vector.n_blocks, vector.d_model, moved, "mean")
        off = torch_logits(Steering.of(other, 1.0, "2-3" if shift == 1 else "1-1")) - base_torch
        assert np.abs(off - change).max() > 0.3 * np.abs(change).max()
    np.testing.assert_array_equal(llama_logits(), base_llama)  # the vector is gone afterwards


# ---------------------------------------------------------------- the file


def test_a_saved_vector_is_a_llama_cpp_control_vector_and_loads_back(llama_vector, tmp_path):
    import gguf

    from runtime.ggml import GGML_TYPE_F32, GGUFHeader

    path = llama_vector.save(tmp_path / "love.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.contents() == 29 and layer_count.types == [gguf.GGUFValueType.INT32]
    assert [t.name for t in reader.tensors] == [f"direction.{L}" for L in range(1, 30)]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [576]
        assert len(tensor.shape) == 1
    with GGUFHeader(path) as header:  # llama.cpp's own parser, as common_control_vector_load_one uses it
        assert header.value("general.architecture") == "controlvector"
        for L in (1, 29):
            tensor = header.tensor(f"direction.{L}")
            assert tensor.type == GGML_TYPE_F32 and tensor.shape == (576,)
            np.testing.assert_array_equal(np.frombuffer(tensor.data(), np.float32), llama_vector.directions[L])
        assert header.tensor("direction.0") is None and header.tensor("direction.30") is None

    loaded = load_vector(path, None)
    np.testing.assert_array_equal(loaded.directions, llama_vector.directions)
    assert (loaded.method, loaded.n_blocks, loaded.n_positive, loaded.model) == ("mean", 30, 8, llama_vector.model)
    np.testing.assert_allclose(loaded.separation[1:], llama_vector.separation[1:])
    assert SteeringVector.load(path, None).key == llama_vector.key


def test_a_file_made_elsewhere_loads_and_fits_the_model(tmp_path):
    """As cvector-generator and repeng write them: unit vectors, no lensbench keys, maybe fewer layers."""
    import gguf

    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(tmp_path / "elsewhere.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 3)
    rows = {L: (v / np.linalg.norm(v)).astype(np.float32) for L, v in ((L, rng.normal(size=576)) for L in (5, 6, 7))}
    for L, v in rows.items():
        writer.add_tensor(f"direction.{L}", v)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    vector = load_vector(tmp_path / "elsewhere.gguf", None)  # the bundled model
    assert vector.method == "file" and vector.n_blocks == 30 and vector.directions.shape == (30, 576)
    np.testing.assert_array_equal(vector.directions[6], rows[6])
    assert not vector.directions[8:].any() and not vector.directions[:5].any()


# ---------------------------------------------------------------- chat with a vector


def test_llama_cpp_strength_zero_is_the_unsteered_answer_and_a_vector_changes_it(llama_vector):
    from chat.engine import chat, load

    options = dict(temperature=0.8, seed=3, max_tokens=24)
    shared = load(None)
    with shared.lock:  # like the steered runs, start from an empty prompt cache: a reused prefix from
        shared.llama.reset()  # earlier tests decodes in other batches, which moves sampled tokens
    plain = chat(None, NEIGHBOR, **options)
    zero = chat(None, NEIGHBOR, steering=Steering.of(llama_vector, 0.0, "8-20"), **options)
    assert zero == plain  # the same seed, a zero vector through llama.cpp's control-vector path
    steered = chat(None, NEIGHBOR, steering=Steering.of(llama_vector, 0.4, "8-20"), **options)
    assert steered != plain
    assert chat(None, NEIGHBOR, **options) == plain  # nothing left on the context or in its prompt cache
    with shared.lock:  # chat's own Llama, used directly, is unsteered too
        direct = shared.llama.create_chat_completion(NEIGHBOR, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    assert direct == chat(None, NEIGHBOR, temperature=0, max_tokens=24)


def test_a_sweep_is_one_answer_per_strength_with_one_seed(llama_vector):
    from chat.engine import chat

    replies = sweep(NEIGHBOR, llama_vector, [0.0, 0.4], "8-20", temperature=0, max_tokens=20, seed=5)
    assert [r.strength for r in replies] == [0.0, 0.4] and all(r.seed == 5 for r in replies)
    assert replies[0].text == chat(None, NEIGHBOR, temperature=0, max_tokens=20, seed=5)
    assert replies[1].text != replies[0].text and replies[1].layers == (8, 20)


def test_pytorch_strength_zero_is_the_unsteered_answer_and_a_vector_changes_it(hooks_vector):
    options = dict(backend="hooks", device="cpu", temperature=0.8, max_tokens=10, seed=3)
    plain = generate(NEIGHBOR, None, **options)
    zero = generate(NEIGHBOR, (hooks_vector, 0.0, "8-20"), **options)
    assert zero.text == plain.text and plain.text
    steered = generate(NEIGHBOR, (hooks_vector, 0.4, "8-20"), **options)
    assert steered.text != plain.text and steered.strength == 0.4
    assert generate(NEIGHBOR, None, **options).text == plain.text  # hooks removed


# ---------------------------------------------------------------- the lens of a steered run


@pytest.mark.parametrize("runtime", ["llama", "hooks"])
def test_a_steered_lens_changes_exactly_the_rows_after_the_first_steered_layer(runtime, request):
    vector = request.getfixturevalue(f"{runtime}_vector")
    backend = "llama-cpp" if runtime == "llama" else "hooks"
    before = tracing.trace("I feel", backend=backend, last_only=True)
    steered = tracing.trace("I feel", backend=backend, last_only=True, steering=(vector, 0.5, "10-20"))
    after = tracing.trace("I feel", backend=backend, last_only=True)
    # row L + 1 is block L's output: rows 0 .. 10 come before layer 10 is steered
    np.testing.assert_array_equal(steered.topk_probs[:11], before.topk_probs[:11])
    assert all(not np.array_equal(steered.topk_probs[r], before.topk_probs[r]) for r in range(11, 31))
    np.testing.assert_array_equal(after.topk_probs, before.topk_probs)
    assert steered.info["steering"] == "mean vector at strength 0.5 on layers 10-20"


# ---------------------------------------------------------------- what a person can get wrong


def test_bad_inputs_get_messages(smollm2_llama_cpp, llama_vector, tmp_path):
    with pytest.raises(BadPrompt, match="The negative examples are empty"):
        build_with(smollm2_llama_cpp, POSITIVE, ["", "  "])
    with pytest.raises(BadPrompt, match="PCA pairs the examples line by line"):
        build_with(smollm2_llama_cpp, POSITIVE, NEGATIVE[:3], method="pca")
    for layers in ("0-5", "5-30", "12-8", "x"):
        with pytest.raises(BadSetting, match="Layers must be a range A-B with 1 <= A <= B <= 29"):
            parse_layers(layers, 30)
    assert parse_layers(None, 30) == (1, 29) and parse_layers("7", 30) == (7, 7)
    with pytest.raises(BadSetting, match="strength must be a number"):
        Steering.of(llama_vector, float("nan"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadControlVector, match="is not a GGUF file"):
        load_vector(tmp_path / "notes.txt")
    cancel = __import__("threading").Event()
    cancel.set()
    with pytest.raises(SteeringCancelled):
        build_with(smollm2_llama_cpp, POSITIVE, NEGATIVE, cancel=cancel)
    with pytest.raises(SteeringCancelled):
        capture(smollm2_llama_cpp, POSITIVE, cancel=cancel)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_command_lines_build_save_and_refuse_with_one_line(smollm2_llama_cpp, tmp_path, capsys):
    import json

    from chat.__main__ import main as chat_main
    from tests.converted_models import converted
    from tracing.__main__ import main
    from tracing.models import bundled_gguf

    (tmp_path / "pos.txt").write_text("\n".join(POSITIVE[:3]) + "\n\n")
    (tmp_path / "neg.txt").write_text("\n".join(NEGATIVE[:3]))
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "v.gguf"
    args = ["steer-vector", "--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt")]
    assert main(args + ["--out", str(out), "--json", "--method", "pca"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "pca" and data["n_positive"] == 3 and data["layers"] == list(range(1, 30))
    assert len(data["promoted"]) == 29 and len(data["promoted"][0]) == 5 and out.is_file()

    assert main(["steer-vector", "--positive", str(tmp_path / "empty.txt"), "--negative", str(tmp_path / "neg.txt"),
                 "--out", str(tmp_path / "w.gguf")]) == 2
    assert one_error_line(capsys) == "error: The positive examples are empty: give at least one text (one a line)."

    # another model's vector (width 64), a model instead of a vector, a layer range this model lacks
    tiny = tracing.open_tracer(str(converted("mistral", "f32")), "llama-cpp")
    other = tmp_path / "tiny.gguf"
    build_with(tiny, POSITIVE[:2], NEGATIVE[:2]).save(other)
    for chat_args, expected in (
        (["--control-vector", str(other)], "was made for a model of width 64"),
        (["--control-vector", str(bundled_gguf())], "is a 'llama' model, not a control vector"),
        (["--control-vector", str(out), "--layers", "0-40"], "Layers must be a range A-B"),
        (["--strength", "0.5"], "add --control-vector FILE"),
        (["--control-vector", str(out), "--sweep", "a,b"], "Strengths are numbers"),
    ):
        assert chat_main(chat_args) == 2, chat_args
        assert expected in one_error_line(capsys)


def test_the_figures_the_steer_tab_draws(llama_vector):
    from ui.steer_plots import profile_figure, reading_figure

    reading = reading_figure(llama_vector, top_k=4)
    heatmap = reading.data[0]
    assert len(heatmap.z) == 29 and len(heatmap.z[0]) == 8  # layers 1..29 x 4 suppressed + 4 promoted
    assert heatmap.z[-1][0] < 0 < heatmap.z[-1][-1]
    assert list(reading.layout.yaxis.ticktext)[-1] == "layer 29"
    profile = profile_figure(llama_vector, (8, 20))
    assert [t.name for t in profile.data] == ["length", "separates"] and len(profile.data[0].x) == 29
    unread = SteeringVector("m", "llama", 30, 576, llama_vector.directions, "mean")
    assert "not been read" in reading_figure(unread).layout.annotations[0].text
