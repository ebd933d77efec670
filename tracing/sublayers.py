"""Where attention and the MLP write into the residual stream, found from structure, on both runtimes.

Activation patching and direct logit attribution both need, per block, the tensor that attention
adds to the residual stream and the one the MLP adds (after any post-norm, scaled as added):
- PyTorch (`find_sublayers`): the block's attention and MLP children, found by what they are
  called, checked by one probe forward (block output = block input + attention + MLP).
- llama.cpp (`find_graph_sublayers`): the ADD nodes that end each block in the graph, walked
  back from `l_out-{i}`; no table of node names per architecture.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn


def _first_tensor(output) -> torch.Tensor:
    from .hooks import _first_tensor as first

    return first(output)


def _replace_first(output, hidden: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot patch a {type(output).__name__}")


_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_MLP_CLASS_WORDS = ("MLP", "MoE", "Moe", "FeedForward", "SparseMoe")


def _sublayer_modules(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The attention and MLP children of a decoder block, by what they are called (one each, or None).

    The MLP is the child named mlp / feed_forward / ...; only when none is named so, the child
    typed MLP / MoE / FeedForward (never a norm: Qwen3-MoE's norms are called Qwen3MoeRMSNorm).
    """
    children = list(block.named_children())
    attn = [m for _, m in children if "Attention" in type(m).__name__ or "Attn" in type(m).__name__]
    mlp = [m for n, m in children if n in _MLP_NAMES]
    if not mlp:
        mlp = [m for _, m in children
               if any(w in type(m).__name__ for w in _MLP_CLASS_WORDS) and "Norm" not in type(m).__name__]
    return (attn[0] if len(attn) == 1 else None), (mlp[0] if len(mlp) == 1 else None)


@dataclass
class SublayerWrite:
    """Block i's attention and MLP: the modules whose outputs are added to the residual stream, and
    the factor each is added with (Granite's residual_multiplier; 1 elsewhere)."""

    attn: nn.Module
    mlp: nn.Module
    attn_scale: float = 1.0
    mlp_scale: float = 1.0
    flat: bool = False  # an output comes as [tokens, d] and is reshaped before it is added (Llama 4's MoE)


# How closely block output = input + attention + MLP must hold (relative to the output's scale), in
# float32; half precision allows 4 of its own rounding steps (bfloat16: 0.031; measured 0.0037 on a
# tiny Llama).
_SUM_TOLERANCE = 1e-4


def find_sublayer_writes(model: nn.Module, blocks: nn.ModuleList, probe_ids: torch.Tensor):
    """Per block, what attention and the MLP add to the residual stream, and with which factor.

    The attention module is the block's child whose class says Attention; the MLP the child named
    mlp / feed_forward (or typed MLP / MoE / FeedForward). When a norm's input is exactly that
    module's output (post-norm families: Gemma 2/3, OLMo 2), the norm's output is what is added.
    One probe forward measures, per block, the factors with which the two are added (least
    squares over the probe's positions: 1 and 1, or Granite's residual_multiplier) and checks
    that block output = block input + factor x attention + factor x MLP. Returns
    ([SublayerWrite] per block, None) or (None, why not).
    """
    kind = type(blocks[0]).__name__
    found = [_sublayer_modules(b) for b in blocks]
    if any(a is None or m is None for a, m in found):
        return None, (
            f"the attention and MLP modules of {kind} blocks cannot be found (expected one child whose class "
            "names Attention and one named mlp or feed_forward)"
        )
    seen: dict[int, dict] = {}
    handles = []

    def watch(i: int, block: nn.Module, attn: nn.Module, mlp: nn.Module) -> None:
        record = seen.setdefault(i, {})

        def on_input(_m, args, kwargs):
            record["in"] = args[0] if args else kwargs.get("hidden_states")

        def on_output(_m, _a, output):
            record["out"] = _first_tensor(output)

        def on_site(key):
            def hook(_m, _a, output):
                record[key] = _first_tensor(output)
            return hook

        def on_child_input(child):
            def hook(_m, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()), None)
                for key in ("attn", "mlp"):
                    if x is not None and x is record.get(key) and "Norm" in type(child).__name__:
                        record[f"{key}_post"] = child
            return hook

        handles.append(block.register_forward_pre_hook(on_input, with_kwargs=True))
        handles.append(block.register_forward_hook(on_output))
        handles.append(attn.register_forward_hook(on_site("attn")))
        handles.append(mlp.register_forward_hook(on_site("mlp")))
        for _, child in block.named_children():
            if child is not attn and child is not mlp:
                handles.append(child.register_forward_pre_hook(on_child_input(child), with_kwargs=True))

    try:
        for i, (block, (attn, mlp)) in enumerate(zip(blocks, found)):
            watch(i, block, attn, mlp)
        with torch.no_grad():
            # Post-norm outputs are recorded by a second pass once the norms are known.
            model(input_ids=probe_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sites = []
    for i, (attn, mlp) in enumerate(found):
        record = seen.get(i, {})
        sites.append((record.get("attn_post", attn), record.get("mlp_post", mlp)))
    # Check: the block adds exactly these two outputs (times a factor each) to its input.
    outputs: dict[int, dict] = {}
    handles = []
    for i, (block, (a, m)) in enumerate(zip(blocks, sites)):
        slot = outputs.setdefault(i, {})
        handles.append(a.register_forward_hook(lambda _m, _a, o, s=slot: s.__setitem__("a", _first_tensor(o))))
        handles.append(m.register_forward_hook(lambda _m, _a, o, s=slot: s.__setitem__("m", _first_tensor(o))))
    try:
        with torch.no_grad():
            model(input_ids=probe_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    writes, worst, tolerance = [], 0.0, _SUM_TOLERANCE
    for i in range(len(blocks)):
        x, y = seen[i].get("in"), seen[i].get("out")
        a, m = outputs[i].get("a"), outputs[i].get("m")
        if any(t is None for t in (x, y, a, m)) or a.numel() != y.numel() or m.numel() != y.numel():
            worst = float("inf")
            break
        flat = a.shape != y.shape or m.shape != y.shape
        # Half-precision weights round each sum: allow a few of the dtype's own steps.
        tolerance = max(tolerance, 4 * torch.finfo(y.dtype).eps)
        x, y, a, m = (t.detach().cpu().double().reshape(-1) for t in (x, y, a, m))  # no float64 on mps
        scale = float(y.abs().max().clamp_min(1e-6))

        def error(p: float, q: float) -> float:
            return float((x + p * a + q * m - y).abs().max()) / scale

        # Added as they are, in most families; else the factors are measured.
        scales = (1.0, 1.0) if error(1.0, 1.0) < tolerance else _factors(y - x, a, m)
        worst = max(worst, error(*scales))
        writes.append(SublayerWrite(sites[i][0], sites[i][1], scales[0], scales[1], flat))
    if not worst < tolerance:
        return None, (
            f"a {kind} block's output is not its input plus its attention and MLP outputs (relative error "
            f"{worst:.1e})"
        )
    return writes, None


def _factors(delta: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> tuple[float, float]:
    """(p, q) minimizing |delta - p a - q m| (float64), rounded to 6 significant digits (a factor is a
    model constant such as 0.22, and the fit's float32 noise would otherwise show in the parts)."""
    basis = torch.stack([a, m], dim=1)
    solution = torch.linalg.lstsq(basis, delta.unsqueeze(1)).solution[:, 0]
    return tuple(float(f"{float(v):.6g}") for v in solution)


def find_sublayers(model: nn.Module, blocks: nn.ModuleList, probe_ids: torch.Tensor):
    """Per block, the modules whose outputs are what attention and the MLP add to the residual stream,
    for activation patching: ([(attn site, mlp site)] per block, None) or (None, why not).

    See `find_sublayer_writes`; patching also wants each output added as it is (factor 1) and shaped
    as the residual stream, so that a clean vector can be written in at its position.
    """
    writes, problem = find_sublayer_writes(model, blocks, probe_ids)
    kind = type(blocks[0]).__name__
    if problem is None and any(w.flat or w.attn_scale != 1 or w.mlp_scale != 1 for w in writes):
        problem = (f"a {kind} block's output is not its input plus its attention and MLP outputs as they are "
                   "(they are scaled or reshaped first)")
    if problem is not None:
        suffix = "so only the residual stream is patched"
        if "cannot be found" in problem:
            return None, f"{problem}, {suffix}"
        return None, f"{problem}, so patching them separately would not mean what it says; only the residual stream is patched"
    return [(w.attn, w.mlp) for w in writes], None


@dataclass
class _Site:
    """A graph node to patch: its name, and (when two nodes share the name) its op and first source."""

    name: str
    op: str
    src0: str


def _graph_nodes(graph, ids: list[int]) -> list[tuple[int, str, str, list[int], list[str], tuple[int, ...]]]:
    """Every node of one decode of `ids` (last token as output): (address, name, op, source addresses,
    source names, op parameters as int32s)."""
    from runtime.ggml import GGML_MAX_SRC, TensorView

    nodes = []

    def record(address: int) -> None:
        view = TensorView(address)
        sources, names = [], []
        for i in range(GGML_MAX_SRC):
            src = view.src(i)
            if src is not None:
                sources.append(ctypes.cast(src.ptr, ctypes.c_void_p).value)
                names.append(src.name)
        nodes.append((address, view.name, view.op, sources, names, tuple(view.t.op_params[:4])))

    callback = graph.callback
    saved, callback.handlers = callback.handlers, {}
    callback.recorder = record
    try:
        graph.clear()
        graph.decode(ids, 0, [False] * (len(ids) - 1) + [True])
    finally:
        callback.recorder, callback.handlers = None, saved
        graph.clear()
    return nodes


@dataclass
class GraphBlock:
    """One block in llama.cpp's graph: the nodes (as `_graph_nodes` records them) of the residual
    after attention, of what attention adds (before the last block's GET_ROWS) and of what the MLP adds."""

    mid: tuple
    attn: tuple
    mlp: tuple

    def sites(self) -> tuple[_Site, _Site, _Site]:
        """(mid, attention, MLP) as sites a node handler can be keyed on."""
        return tuple(_Site(n[1], n[2], n[4][0] if n[4] else "") for n in (self.mid, self.attn, self.mlp))


def graph_blocks(nodes, n_blocks: int, embeddings: str):
    """Per block, the graph nodes around the residual stream's two additions, from `_graph_nodes`'s
    records. See `find_graph_sublayers`. Returns ([GraphBlock] per block, None) or (None, why not)."""
    by_address = {n[0]: n for n in nodes}

    def source_of(node, i):
        return by_address.get(node[3][i])

    blocks = []
    for i in range(n_blocks):
        previous = embeddings if i == 0 else f"l_out-{i - 1}"
        end = next((n for n in nodes if n[1] == f"l_out-{i}"), None)
        # Walk back from the block output through non-ADD wrappers (control vector) to the final ADD.
        while end is not None and end[2] != "ADD" and end[3]:
            end = source_of(end, 0)
        if end is None or len(end[3]) != 2:
            return None, f"llama.cpp's graph does not end block {i} in an addition to the residual stream"
        mid_index = None
        for k in range(2):
            node = source_of(end, k)
            if node is None:
                continue
            # The residual after attention: an ADD one of whose sources leads back to the previous residual.
            if node[2] == "ADD" and any(_leads_to(by_address, s, previous) for s in node[3]):
                mid_index = k
        if mid_index is None:
            return None, f"llama.cpp's graph has no residual after attention in block {i}"
        mid = source_of(end, mid_index)
        mlp = source_of(end, 1 - mid_index)
        attn = next((by_address[s] for s in mid[3] if not _leads_to(by_address, s, previous)), None)
        while attn is not None and attn[2] == "GET_ROWS":  # the last block keeps only the output rows
            attn = source_of(attn, 0)
        if attn is None or mlp is None or not attn[1] or not mlp[1]:
            return None, f"llama.cpp's graph does not name block {i}'s attention or MLP output"
        blocks.append(GraphBlock(mid, attn, mlp))
    return blocks, None


def find_graph_sublayers(graph, n_blocks: int, embeddings: str, ids: list[int]):
    """Per block, the graph nodes holding what attention and the MLP add to the residual stream.

    Found from the graph's structure, not from names alone: the residual after attention is the
    ADD that the block's MLP output is added to (named `ffn_inp-{i}`, or `sa_out-{i}` in Gemma 3);
    its other source is the attention output (`attn_out-{i}`, or `attn_post_norm-{i}` in
    post-norm families; in the last block through a GET_ROWS of the requested outputs); the
    other source of the ADD that ends the block is the MLP output (`ffn_out-{i}`,
    `ffn_post_norm-{i}`, `ffn_moe_out-{i}`, Scout's `ffn_moe_out_merged-{i}`). Returns
    ([(attn site, mlp site)] per block, None) or (None, why not).
    """
    blocks, problem = graph_blocks(_graph_nodes(graph, ids), n_blocks, embeddings)
    if problem is not None:
        return None, problem
    return [block.sites()[1:] for block in blocks], None


def _leads_to(by_address, address, name: str, depth: int = 3) -> bool:
    """Whether the node at `address` is `name`, or a GET_ROWS / copy of it (a few steps back)."""
    node = by_address.get(address)
    for _ in range(depth):
        if node is None:
            return False
        if node[1] == name:
            return True
        if node[2] not in ("GET_ROWS", "CONT", "CPY", "VIEW", "RESHAPE") or not node[3]:
            return False
        node = by_address.get(node[3][0])
    return False
