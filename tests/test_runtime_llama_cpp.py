"""The llama.cpp runtime: graph contexts that read and write nodes while llama.cpp runs.

Checked on the real bundled SmolLM2 GGUF and Gemma 3 270M by exact identities: a node written
back unchanged leaves the logits bit-identical; a changed node changes everything after it and
nothing before it; the embeddings node found from the graph's structure is what enters block 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.llama_cpp import EMBEDDINGS, GraphContext, block_output, shared_llama
from tracing.models import bundled_gguf

PROMPT = "The capital of Germany is"


@pytest.fixture(scope="module")
def smol():
    shared = shared_llama(bundled_gguf())
    with shared.lock:
        graph = GraphContext(shared, 64)
        yield shared, graph
        graph.close()


def tokens(shared, text: str) -> list[int]:
    return shared.llama.tokenize(text.encode(), add_bos=True, special=True)


def run(graph: GraphContext, ids, handlers=None) -> np.ndarray:
    """Every position's logits [T, vocab] of one decode with `handlers` on the graph."""
    graph.callback.handlers = {graph.node_name(k): v for k, v in (handlers or {}).items()}
    try:
        graph.clear()
        graph.decode(ids, 0, [True] * len(ids))
        return np.stack([graph.logits(i).copy() for i in range(len(ids))])
    finally:
        graph.callback.handlers = {}


def test_the_embeddings_node_is_found_from_the_graph(smol, gemma3_gguf):
    shared, graph = smol
    layout = graph.layout()
    assert layout.embeddings == "embd"  # llama: the token embeddings enter block 0 unchanged
    assert all(block_output(i) in layout.names for i in range(30))
    gemma = shared_llama(gemma3_gguf)
    with gemma.lock:
        gemma_graph = GraphContext(gemma, 16)
        try:
            assert gemma_graph.layout().embeddings == "inp_scaled"  # Gemma scales them by sqrt(d) first
        finally:
            gemma_graph.close()


def test_writing_a_node_back_unchanged_is_bit_identical_and_zeros_change_only_what_follows(smol):
    shared, graph = smol
    ids = tokens(shared, PROMPT)
    clean = run(graph, ids)
    seen = {}

    def same(view):
        seen["rows"] = view.rows(0, view.shape[0])
        view.write_rows(0, seen["rows"])

    np.testing.assert_array_equal(run(graph, ids, {block_output(10): same}), clean)
    assert seen["rows"].shape == (len(ids), 576)

    def zero_last_position(view):
        view.write_rows(len(ids) - 1, np.zeros((1, view.shape[1]), np.float32))

    patched = run(graph, ids, {block_output(10): zero_last_position})
    # Causal attention: earlier positions cannot see the last one.
    np.testing.assert_array_equal(patched[:-1], clean[:-1])
    assert np.abs(patched[-1] - clean[-1]).max() > 1.0
    np.testing.assert_array_equal(run(graph, ids), clean)  # nothing stays behind


def test_the_embeddings_row_written_changes_the_prediction(smol):
    shared, graph = smol
    ids = tokens(shared, PROMPT)
    germany, france = ids, tokens(shared, "The capital of France is")
    assert len(germany) == len(france)
    position = next(i for i, (a, b) in enumerate(zip(germany, france)) if a != b)
    captured = {}
    run(graph, france, {EMBEDDINGS: lambda view: captured.setdefault("rows", view.rows(0, view.shape[0]))})

    def swap_in_france(view):
        view.write_rows(position, captured["rows"][position : position + 1])

    # Replacing " Germany"'s embedding by " France"'s is exactly the French run.
    np.testing.assert_array_equal(run(graph, germany, {EMBEDDINGS: swap_in_france}), run(graph, france))


def test_a_handler_error_stops_the_decode_and_is_raised(smol):
    shared, graph = smol
    ids = tokens(shared, PROMPT)

    def broken(view):
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        run(graph, ids, {block_output(3): broken})
    assert np.isfinite(run(graph, ids)).all()  # the context is still usable


def test_a_graph_without_a_block_output_gets_a_message_naming_the_node(tmp_path):
    """Recurrent and hybrid graphs may not end every block in `l_out-{i}`. Shown on a copy of the
    bundled model whose watched layout is told to lack one (no such model converts offline)."""
    import shutil

    import tracing
    from runtime.llama_cpp import GraphLayout, release
    from tracing import UnsupportedModel

    path = tmp_path / "smol.gguf"
    shutil.copy(bundled_gguf(), path)
    shared = shared_llama(path)
    try:
        with shared.lock:
            graph = GraphContext(shared, 16)
            names = graph.layout().names
            graph.close()
        shared.graph_layout = GraphLayout("embd", frozenset(names - {"l_out-7"}))
        with pytest.raises(UnsupportedModel, match=r"has no node 'l_out-7'.*recurrent or hybrid"):
            tracing.trace("Hello", model=str(path), backend="llama-cpp")
    finally:
        release(path)
