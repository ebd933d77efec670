"""Attention patterns and mixture-of-experts routing: which heads look where, which experts each token went to.

Attention patterns (CircuitsVis, Neuronpedia's attention viewer): per layer and head, the
attention probabilities of every query position over the keys (causal: a query sees itself and
what came before). Routing: for every mixture-of-experts block and every token, the experts the
router chose and the weights their outputs are mixed with.

The technique is written once, here (`attention_with`, `routing_with`): validation, what to
fetch, labels, the result. A runtime only says how to read the probabilities and the router's
choice while the model runs:
- `TorchAttention`: the loaded model switched to eager attention for the call (SDPA never forms
  the probabilities), forward hooks on each block's attention module keeping only the asked
  layers, heads and query rows; routers found from structure (a module of the block that maps
  d_model to one logit per expert and returns expert ids, or Llama 4's sparse scores).
- `LlamaCppAttention`: the `kq_soft_max-{i}` node of the GGUF's own graph, which llama.cpp forms
  only with flash attention off, in a small context of its own; `ffn_moe_topk-{i}` (int32 expert
  ids) and the weights node the experts' outputs are multiplied by, found from the graph.

Memory: a pattern is layers x heads x queries x keys float32. All of it for a long prompt is a
lot (SmolLM2, 30 x 9 heads at 1,024 tokens: 1.1 GB), so at most `MAX_PATTERN_BYTES` is fetched
at once: by default all layers and heads when they fit, else the last queries that do; asking
explicitly for more is refused with a message saying what to ask for. `info["fetched"]` says
what was fetched and why.
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from .errors import BadChoice, BadPrompt, UnsupportedModel

# The most pattern bytes fetched in one call (layers x heads x queries x keys x 4).
MAX_PATTERN_BYTES = 64 * 2**20
# Tokens per llama.cpp decode in the patterns context: with flash attention off, llama.cpp's compute
# buffer holds keys x tokens x heads float32 probabilities of one layer (4,096 x 256 x 40 x 4 bytes =
# 168 MB for Scout at a 4,096-token context).
_UBATCH = 256
# Logits requested per llama.cpp decode (bytes): routing needs every position as an output (the last
# block computes its MLP for the outputs only), so decodes are cut to keep the logits this small.
_OUTPUT_BYTES_PER_DECODE = 8 * 2**20


# ==================================================================== results


@dataclass
class LayerKind:
    """How one layer attends: "full", "sliding" (a window of `span` tokens) or "chunked" (Llama 4:
    blocks of `span` tokens attend only within their chunk); `rope` False for NoPE layers (no
    position encoding at all), None when not known."""

    attention: str = "full"
    span: int | None = None
    rope: bool | None = True

    @property
    def label(self) -> str:
        text = {
            "full": "full attention",
            "sliding": f"sliding window of {self.span} tokens",
            "chunked": f"chunked attention (chunks of {self.span} tokens)",
        }[self.attention]
        if self.rope is False:
            text += ", NoPE (no position encoding)"
        return text


@dataclass
class RoutingResult:
    """Which experts each token went to, in every mixture-of-experts block.

    `layers` are the MoE layers (1-based, as the lens's "layer i" = block i); `experts` and `weights`
    are [MoE layers, positions, k]: the experts chosen for that token, heaviest first, and the
    weights their outputs are mixed with (as the model applies them: normalized top-k softmax for
    Qwen3-MoE and Mixtral, a sigmoid per expert for Llama 4).
    """

    model: str
    backend: str
    tokens: list[str]
    layers: list[int]
    n_experts: int | None
    experts: np.ndarray  # [moe layers, positions, k] int
    weights: np.ndarray  # [moe layers, positions, k] float32
    token_ids: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """`routing` in the CLI's JSON: layers, n_experts, experts [layer][position][k], weights [layer][position][k]."""
        return {
            "layers": [int(layer) for layer in self.layers],
            "n_experts": self.n_experts,
            "experts": self.experts.tolist(),
            "weights": np.round(self.weights.astype(np.float64), 6).tolist(),
        }

    def table(self) -> str:
        """One line per MoE layer: each position's experts and weights."""
        cells = [[",".join(f"{e}:{w:.2f}" for e, w in zip(self.experts[li, p], self.weights[li, p]))
                  for p in range(len(self.tokens))] for li in range(len(self.layers))]
        width = max(*(len(c) for row in cells for c in row), *(min(12, len(repr(t))) for t in self.tokens), 1)
        lines = [f"MoE routing ({self.n_experts or '?'} experts, top {self.experts.shape[-1]}; expert:weight)",
                 f"{'':<10}" + "".join(f"{repr(t)[:width]:>{width + 1}}" for t in self.tokens)]
        for layer, row in zip(self.layers, cells):
            lines.append(f"{'layer ' + str(layer):<10}" + "".join(f"{c:>{width + 1}}" for c in row))
        return "\n".join(lines)


@dataclass
class AttentionResult:
    """Attention probabilities of some layers, heads and query positions of one prompt.

    pattern[l, h, q, k]: in layer `layers[l]` (1-based, the lens's "layer i" = block i), head
    `heads[h]` (0-based), how much query position `queries[0] + q` attends to key position k
    (0 <= k < queries[1]); each row sums to 1 and is 0 past its own position.
    """

    model: str
    backend: str
    tokens: list[str]
    token_ids: list[int]
    layers: list[int]
    heads: list[int]
    queries: tuple[int, int]  # [start, stop): the query positions fetched; keys are 0 .. stop - 1
    pattern: np.ndarray  # [layers, heads, queries, keys] float32
    n_heads: int
    n_kv_heads: int
    kv_groups: list[int]  # per fetched head: the key/value head it shares (grouped-query attention)
    head_labels: list[str]
    layer_labels: list[str]  # per fetched layer, e.g. "chunked attention (chunks of 8192 tokens)"
    routing: RoutingResult | None = None
    info: dict = field(default_factory=dict)  # fetched (what and why), bytes, seconds

    def mean_over_heads(self) -> np.ndarray:
        """[layers, queries, keys]: the fetched heads' patterns averaged."""
        return self.pattern.mean(axis=1)

    def to_dict(self) -> dict:
        """The CLI's `--json`: pattern [layer][head][query][key], tokens, layers, heads, queries,
        kv_groups, head_labels, layer_labels, fetched, routing (or null)."""
        return {
            "tokens": self.tokens,
            "layers": [int(layer) for layer in self.layers],
            "heads": [int(h) for h in self.heads],
            "queries": [int(q) for q in self.queries],
            "kv_groups": [int(g) for g in self.kv_groups],
            "head_labels": self.head_labels,
            "layer_labels": self.layer_labels,
            "fetched": self.info.get("fetched", ""),
            "pattern": np.round(self.pattern.astype(np.float64), 6).tolist(),
            "routing": self.routing.to_dict() if self.routing is not None else None,
        }

    def table(self) -> str:
        """Where the last fetched query looks: its three heaviest keys, per layer and head (per layer,
        averaged over heads, when there are more than 64 layer-head pairs)."""
        q = self.queries[1] - 1
        lines = [f"model: {self.model}   backend: {self.backend}   {len(self.tokens)} tokens",
                 f"fetched: {self.info.get('fetched', '')}",
                 f"query {q} {self.tokens[q]!r} attends to (three heaviest keys):"]

        def top(row: np.ndarray) -> str:
            keys = np.argsort(-row, kind="stable")[:3]
            return "  ".join(f"{k}:{self.tokens[k]!r} {row[k]:.2f}" for k in keys)

        per_head = len(self.layers) * len(self.heads) <= 64
        for li, layer in enumerate(self.layers):
            lines.append(f"layer {layer} · {self.layer_labels[li]}")
            if per_head:
                for hi, label in enumerate(self.head_labels):
                    lines.append(f"  {label:<24}{top(self.pattern[li, hi, -1])}")
            else:
                lines.append(f"  {'mean over heads':<24}{top(self.pattern[li, :, -1].mean(0))}")
        if self.routing is not None:
            lines.append(self.routing.table())
        return "\n".join(lines)


# ==================================================================== the runtime interface


@dataclass
class RawRouting:
    """What a runtime read from the routers: per MoE block (0-based), experts and weights [positions, k]."""

    blocks: list[int]
    experts: list[np.ndarray]
    weights: list[np.ndarray]
    n_experts: int | None


class AttentionRuntime(Protocol):
    """How one runtime reads attention probabilities and router choices (`TorchAttention`, `LlamaCppAttention`)."""

    backend: str
    n_blocks: int
    n_heads: int
    n_kv_heads: int

    def layer_kinds(self) -> list[LayerKind]:
        """Per block: full, sliding or chunked attention, with or without position encoding."""

    def has_routing(self) -> bool:
        """Whether the model has mixture-of-experts blocks whose routing can be read."""

    def run(self, ids: list[int], blocks: Sequence[int], heads: Sequence[int], queries: tuple[int, int],
            routing: bool) -> tuple[np.ndarray, RawRouting | None]:
        """Run the prompt once: the pattern [blocks, heads, queries, keys = queries[1]] of the given
        0-based blocks and heads, and (when `routing`) every MoE block's routing at every position."""


# ==================================================================== the technique


def _check_ids(tracer, prompt: str | None, ids: Sequence[int] | None) -> list[int]:
    if ids is None:
        if prompt is None or not str(prompt).strip():
            raise BadPrompt("The prompt is empty: type some text to look at.")
        ids = tracer.encode(prompt)
    ids = [int(i) for i in ids]
    if not ids:
        raise BadPrompt("The prompt has no tokens.")
    if tracer.context_length and len(ids) > tracer.context_length:
        raise BadPrompt(
            f"The prompt is {len(ids)} tokens, longer than this model's context of {tracer.context_length} tokens."
        )
    return ids


def _human(n_bytes: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


def pattern_bytes(n_layers: int, n_heads: int, start: int, stop: int) -> int:
    """Bytes of a float32 pattern: layers x heads x (stop - start) queries x stop keys."""
    return 4 * n_layers * n_heads * (stop - start) * stop


def _choose(runtime, n: int, layers, heads, queries, max_bytes: int):
    """Validated (0-based blocks, heads, (start, stop)) and a sentence on what is fetched and why."""
    n_blocks, n_heads = runtime.n_blocks, runtime.n_heads
    if layers is None:
        blocks = list(range(n_blocks))
    else:
        layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [layer for layer in layers if not 1 <= int(layer) <= n_blocks]
        if bad or not layers:
            raise BadChoice(
                f"This model has layers 1 to {n_blocks}; there is no layer {bad[0] if bad else '(none given)'}."
            )
        blocks = sorted({int(layer) - 1 for layer in layers})
    if heads is None:
        head_list = list(range(n_heads))
    else:
        heads = [heads] if isinstance(heads, int) else list(heads)
        bad = [h for h in heads if not 0 <= int(h) < n_heads]
        if bad or not heads:
            raise BadChoice(
                f"This model's layers have heads 0 to {n_heads - 1}; there is no head {bad[0] if bad else '(none given)'}."
            )
        head_list = sorted({int(h) for h in heads})
    if queries is None:
        start, stop = 0, n
    else:
        start, stop = (int(queries), int(queries) + 1) if isinstance(queries, int) else (int(q) for q in queries)
        if not 0 <= start < stop <= n:
            raise BadChoice(
                f"Query positions {start}:{stop} are outside the prompt: it has {n} tokens, positions 0 to {n - 1} "
                f"(a range A:B takes positions A to B - 1)."
            )
    shape = f"{len(blocks)} layer{'s' * (len(blocks) != 1)} x {len(head_list)} head{'s' * (len(head_list) != 1)}"
    what = f"{shape}, queries {start}-{stop - 1} over keys 0-{stop - 1}"
    size = pattern_bytes(len(blocks), len(head_list), start, stop)
    if size <= max_bytes:
        return blocks, head_list, (start, stop), f"{what}: {_human(size)}"
    row = pattern_bytes(len(blocks), len(head_list), n - 1, n)
    if queries is None and row <= max_bytes:
        # The default narrows to the last queries that fit: where the prompt's end looks is what is wanted most.
        count = max(1, max_bytes // row)
        start = n - count
        fetched = pattern_bytes(len(blocks), len(head_list), start, n)
        return blocks, head_list, (start, n), (
            f"{shape}, the last {count} queries ({start}-{n - 1}) over keys 0-{n - 1}: {_human(fetched)}. All {n} "
            f"queries would be {_human(size)}, over the {_human(max_bytes)} fetched at once; ask for fewer layers "
            "or heads, or another query range, to see the others"
        )
    raise BadChoice(
        f"The attention patterns asked for ({what}) are {_human(size)}, more than the {_human(max_bytes)} fetched "
        "at once. Ask for fewer layers (--layer), fewer heads (--head) or a shorter query range (--queries A:B)."
    )


def _routing_result(tracer, raw: RawRouting | None, ids: list[int], tokens: list[str]) -> RoutingResult | None:
    if raw is None or not raw.blocks:
        return None
    ks = {e.shape[-1] for e in raw.experts}
    if len(ks) != 1:
        raise UnsupportedModel(f"The MoE blocks of '{tracer.model_name}' choose different numbers of experts ({sorted(ks)}).")
    experts = np.stack([np.asarray(e, np.int64) for e in raw.experts])
    weights = np.stack([np.asarray(w, np.float32) for w in raw.weights])
    # Heaviest first, whichever order the runtime gave them in.
    order = np.argsort(-weights, axis=-1, kind="stable")
    return RoutingResult(
        model=tracer.model_name,
        backend=tracer.backend,
        tokens=tokens,
        layers=[b + 1 for b in raw.blocks],
        n_experts=raw.n_experts,
        experts=np.take_along_axis(experts, order, -1),
        weights=np.take_along_axis(weights, order, -1),
        token_ids=list(ids),
    )


def attention_with(
    tracer,
    prompt: str | None = None,
    *,
    ids: Sequence[int] | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    queries: int | tuple[int, int] | None = None,
    routing: bool = True,
    max_bytes: int = MAX_PATTERN_BYTES,
) -> AttentionResult:
    """Attention patterns (and MoE routing) of `prompt` (or ready token `ids`) with an opened tracer
    (hooks or llama-cpp, see `tracing.open_tracer`).

    layers: 1-based layer numbers (the lens's "layer i" = block i), default all. heads: 0-based, default
    all. queries: (start, stop) query positions (stop exclusive) or one position, default all; keys are
    always 0 .. stop - 1. At most `max_bytes` of pattern is fetched: by default all layers and heads
    over every query when that fits, else the last queries that do (`info["fetched"]` says so); an
    explicit request over it raises BadChoice. routing: also read every MoE block's routing
    (`result.routing`, None for a dense model).
    BadPrompt: empty or too long a prompt; BadChoice: a layer, head or query outside the model or prompt.
    """
    runtime = attention_runtime(tracer)
    ids = _check_ids(tracer, prompt, ids)
    blocks, head_list, window, fetched = _choose(runtime, len(ids), layers, heads, queries, max_bytes)
    kinds = runtime.layer_kinds()
    group = max(1, runtime.n_heads // max(1, runtime.n_kv_heads))
    start = time.perf_counter()
    with tracer.lock():
        pattern, raw = runtime.run(ids, blocks, head_list, window, routing and runtime.has_routing())
    seconds = time.perf_counter() - start
    tokens = [tracer.decode_one(i) for i in ids]
    kv_groups = [h // group for h in head_list]
    grouped = runtime.n_kv_heads < runtime.n_heads
    return AttentionResult(
        model=tracer.model_name,
        backend=tracer.backend,
        tokens=tokens,
        token_ids=ids,
        layers=[b + 1 for b in blocks],
        heads=head_list,
        queries=window,
        pattern=pattern,
        n_heads=runtime.n_heads,
        n_kv_heads=runtime.n_kv_heads,
        kv_groups=kv_groups,
        head_labels=[f"head {h} (KV group {g})" if grouped else f"head {h}" for h, g in zip(head_list, kv_groups)],
        layer_labels=[kinds[b].label for b in blocks],
        routing=_routing_result(tracer, raw, ids, tokens),
        info={"fetched": fetched, "pattern_bytes": int(pattern.nbytes), "seconds": round(seconds, 4),
              "heads_per_kv_group": group, **getattr(runtime, "facts", {})},
    )


def routing_with(tracer, ids_or_prompt: str | Sequence[int]) -> RoutingResult | None:
    """Every MoE block's routing for a prompt (or ready token ids): the experts each token went to and
    their weights; None for a dense model. What `attention_with` puts in `result.routing`, for other
    techniques (the attribution command) to include."""
    runtime = attention_runtime(tracer)
    if not runtime.has_routing():
        return None
    if isinstance(ids_or_prompt, str):
        ids = _check_ids(tracer, ids_or_prompt, None)
    else:
        ids = _check_ids(tracer, None, ids_or_prompt)
    with tracer.lock():
        _, raw = runtime.run(ids, [], [], (len(ids) - 1, len(ids)), True)
    return _routing_result(tracer, raw, ids, [tracer.decode_one(i) for i in ids])


def attention(
    prompt: str,
    model=None,
    backend: str = "hooks",
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    queries: int | tuple[int, int] | None = None,
    routing: bool = True,
    **options,
) -> AttentionResult:
    """Attention patterns of `prompt` per layer and head, and its MoE routing where the model has experts.

    model: None for the bundled SmolLM2-135M-Instruct, a file or folder in models/, a path, or a hub id.
    backend: "hooks" (PyTorch, eager attention for the call) or "llama-cpp" (the GGUF itself).
    options: loading options, e.g. device="cpu". See `attention_with` for the rest.

        >>> r = tracing.attention("The capital of Germany is", layers=[10], heads=[0, 1])
        >>> r.pattern[0, 1, -1]      # where the last token looks in layer 10, head 1
    """
    from .api import BACKEND_ALIASES, open_tracer

    name = BACKEND_ALIASES.get(backend, backend)
    if name not in RUNTIMES:
        raise UnsupportedModel(f"Attention patterns run on the backends {' and '.join(RUNTIMES)}, not '{backend}'.")
    if prompt is None or not str(prompt).strip():
        raise BadPrompt("The prompt is empty: type some text to look at.")
    tracer = open_tracer(model, name, **options)
    return attention_with(tracer, prompt, layers=layers, heads=heads, queries=queries, routing=routing)


# Backend name -> the AttentionRuntime class for its tracer (in this file).
RUNTIMES = {"hooks": "TorchAttention", "llama-cpp": "LlamaCppAttention"}


def attention_runtime(tracer) -> AttentionRuntime:
    """The attention runtime of an opened tracer, built once per tracer."""
    cls = RUNTIMES.get(tracer.backend)
    if cls is None:
        raise UnsupportedModel(
            f"Attention patterns run on the backends {' and '.join(RUNTIMES)}, not '{tracer.backend}'."
        )
    runtime = getattr(tracer, "_attention_runtime", None)
    if runtime is None or not runtime.alive():
        with tracer.lock():
            runtime = globals()[cls](tracer)
        tracer._attention_runtime = runtime
    return runtime


# ==================================================================== layer kinds


def layer_kinds_from_config(config, n_blocks: int) -> list[LayerKind]:
    """Per block, from a transformers config: `layer_types` ("full_attention", "sliding_attention",
    "chunked_attention") with `sliding_window` / `attention_chunk_size`, and Llama 4's
    `no_rope_layers` (0 = NoPE)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if not types or len(types) != n_blocks:
        sliding = window and getattr(config, "use_sliding_window", True) is not False
        types = ["sliding_attention" if sliding else "full_attention"] * n_blocks
    no_rope = getattr(config, "no_rope_layers", None)
    kinds = []
    for i, kind in enumerate(types):
        rope = bool(no_rope[i]) if no_rope and len(no_rope) == n_blocks else True
        if kind == "sliding_attention" and window:
            kinds.append(LayerKind("sliding", int(window), rope))
        elif kind == "chunked_attention" and chunk:
            kinds.append(LayerKind("chunked", int(chunk), rope))
        else:
            kinds.append(LayerKind("full", None, rope))
    return kinds


# llama.cpp's own rules for architectures whose GGUF does not list the kind of every layer
# (src/models/<arch>.cpp): (kind, default period of the pattern: layer i is windowed when
# i % period < period - 1). Llama 4 also hard-codes its chunk of 8192 tokens and a NoPE layer
# every 4th block ((i + 1) % 4 == 0), unless `llama4.attention.sliding_window` is 0 (no chunking, RoPE everywhere).
_GGUF_WINDOWED = {"gemma2": ("sliding", 2), "gemma3": ("sliding", 6), "cohere2": ("sliding", 4), "llama4": ("chunked", 4)}
_LLAMA4_CHUNK, _LLAMA4_NOPE_STEP = 8192, 4


def layer_kinds_from_gguf(architecture: str, metadata: dict, n_blocks: int) -> list[LayerKind]:
    """Per block, from a GGUF's metadata, as llama.cpp reads it: `{arch}.attention.sliding_window`
    and `{arch}.attention.sliding_window_pattern` (a flag per layer, or a period), Llama 4's rules."""
    rule = _GGUF_WINDOWED.get(architecture)
    window = metadata.get(f"{architecture}.attention.sliding_window")
    if rule is None and metadata.get(f"{architecture}.attention.sliding_window_pattern") is None:
        return [LayerKind() for _ in range(n_blocks)]
    kind, period = rule or ("sliding", 0)
    if architecture == "llama4":
        if window is not None and int(window) == 0:
            return [LayerKind() for _ in range(n_blocks)]
        window = _LLAMA4_CHUNK
    if not window:
        return [LayerKind() for _ in range(n_blocks)]
    pattern = metadata.get(f"{architecture}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)) and len(pattern) >= n_blocks:
        windowed = [bool(p) for p in pattern[:n_blocks]]
    else:
        period = int(pattern) if pattern is not None else period
        windowed = [period == 0 or i % period < period - 1 for i in range(n_blocks)]
    kinds = []
    for i in range(n_blocks):
        rope = (i + 1) % _LLAMA4_NOPE_STEP != 0 if architecture == "llama4" else True
        kinds.append(LayerKind(kind, int(window), rope) if windowed[i] else LayerKind("full", None, rope))
    return kinds


# ==================================================================== PyTorch


def _router_reading(output, n_tokens: int, n_experts: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(experts, weights) [tokens, k] from a router's output, or None when it is not one.

    Two forms (transformers 5): expert ids as an integer tensor [tokens, k] beside their weights
    [tokens, k] (Qwen3-MoE, Mixtral, most routers: `(logits, weights, ids)`); or a float tensor
    [tokens, experts] that is 0 except at the chosen k (Llama 4: the sigmoid of the top-k logits).
    """
    items = output if isinstance(output, (tuple, list)) else (output,)
    tensors = [t.detach().reshape(-1, t.shape[-1]) for t in items
               if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.numel() == n_tokens * t.shape[-1]]
    ids = [t for t in tensors if not t.is_floating_point()]
    floats = [t for t in tensors if t.is_floating_point()]
    if ids:
        k = ids[0].shape[-1]
        weights = next((f for f in floats if f.shape[-1] == k), None)
        if weights is None or not 0 < k <= n_experts:
            return None
        return ids[0].cpu().numpy().astype(np.int64), weights.float().cpu().numpy()
    for scores in floats:
        if scores.shape[-1] != n_experts:
            continue
        counts = (scores != 0).sum(-1)
        k = int(counts[0])
        if 0 < k < n_experts and bool((counts == k).all()):
            weights, experts = torch.topk(scores.float(), k, dim=-1)
            return experts.cpu().numpy().astype(np.int64), weights.cpu().numpy()
    return None


def find_routers(model: torch.nn.Module, blocks, probe_ids: torch.Tensor) -> dict[int, torch.nn.Module]:
    """Block index -> its router, found from structure and one probe forward, no table of model types.

    A router is a module inside the block with a weight [experts, d_model] (one logit per expert)
    whose output reads as a routing (`_router_reading`). Dense models have none: {}.
    """
    d_model = model.get_input_embeddings().weight.shape[-1]
    candidates: dict[int, list[torch.nn.Module]] = {}
    for i, block in enumerate(blocks):
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == d_model \
                    and weight.shape[0] < d_model and "weight" in dict(module.named_parameters(recurse=False)):
                candidates.setdefault(i, []).append(module)
    if not candidates:
        return {}
    found: dict[int, torch.nn.Module] = {}
    n_tokens = probe_ids.numel()
    handles = []

    def watch(i: int, module: torch.nn.Module):
        def hook(_m, _a, output):
            if i not in found and _router_reading(output, n_tokens, module.weight.shape[0]) is not None:
                found[i] = module
        return hook

    try:
        for i, modules in candidates.items():
            for module in modules:
                handles.append(module.register_forward_hook(watch(i, module)))
        with torch.no_grad():
            model(input_ids=probe_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


class TorchAttention:
    """Attention patterns and routing on a transformers model through forward hooks.

    For the call, the model runs eager attention (`set_attn_implementation("eager")`, restored
    afterwards): only eager forms the probabilities, which each attention module returns as its
    second output. A hook on the attention module of each asked block keeps the asked heads and
    query rows; hooks on the routers keep their choice.
    """

    backend = "hooks"

    def __init__(self, tracer):
        from .sublayers import _sublayer_modules

        self.tracer = tracer
        self.model = tracer.lens.model
        self.blocks = tracer.lens.parts.blocks
        self.n_blocks = len(self.blocks)
        self.device = next(self.model.parameters()).device
        config = self.model.config.get_text_config()
        self.config = config
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.attention_modules = [_sublayer_modules(block)[0] for block in self.blocks]
        if any(m is None for m in self.attention_modules):
            raise UnsupportedModel(
                f"The attention modules of {type(self.blocks[0]).__name__} blocks cannot be found (one child whose "
                "class names Attention), so their patterns cannot be read."
            )
        self.routers = find_routers(self.model, self.blocks, tracer.probe_ids())
        self.n_experts = next((int(r.weight.shape[0]) for r in self.routers.values()), None)
        self.facts = {"attention": "eager (for the call)"}

    def alive(self) -> bool:
        return True

    def layer_kinds(self) -> list[LayerKind]:
        return layer_kinds_from_config(self.config, self.n_blocks)

    def has_routing(self) -> bool:
        return bool(self.routers)

    def run(self, ids, blocks, heads, queries, routing):
        start, stop = queries
        n = len(ids)
        pattern = np.zeros((len(blocks), len(heads), stop - start, stop), np.float32)
        routed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        head_index = torch.tensor(list(heads), dtype=torch.long)
        reading = [0.0]  # seconds spent copying probabilities out of the forward
        handles = []

        def keep_pattern(slot: int):
            def hook(_m, _a, output):
                weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if not isinstance(weights, torch.Tensor) or weights.shape[-2:] != (n, n):
                    raise UnsupportedModel(
                        f"{type(_m).__name__} did not return its attention probabilities under eager attention, "
                        "so its patterns cannot be read."
                    )
                began = time.perf_counter()
                rows = weights[0, head_index.to(weights.device), start:stop, :stop]
                pattern[slot] = rows.float().cpu().numpy()
                reading[0] += time.perf_counter() - began
            return hook

        def keep_routing(block: int, n_experts: int):
            def hook(_m, _a, output):
                reading = _router_reading(output, n, n_experts)
                if reading is None:
                    raise UnsupportedModel(f"The router of block {block} did not return experts for {n} tokens.")
                routed[block] = reading
            return hook

        previous = self.model.config._attn_implementation
        needs_eager = len(blocks) > 0 and previous != "eager"
        try:
            if needs_eager:
                self.model.set_attn_implementation("eager")
                if self.model.config._attn_implementation != "eager":
                    raise UnsupportedModel(
                        f"{type(self.model).__name__} cannot switch to eager attention, the only kind that forms "
                        "the attention probabilities."
                    )
            for slot, b in enumerate(blocks):
                handles.append(self.attention_modules[b].register_forward_hook(keep_pattern(slot)))
            if routing:
                for b, router in self.routers.items():
                    handles.append(router.register_forward_hook(keep_routing(b, int(router.weight.shape[0]))))
            kwargs = {"logits_to_keep": 1} if self.tracer.lens._keep_arg else {}
            with torch.no_grad():
                self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False, **kwargs)
        finally:
            for h in handles:
                h.remove()
            if needs_eager:
                self.model.set_attn_implementation(previous)
        self.facts["read_seconds"] = round(reading[0], 5)
        raw = None
        if routing and self.routers:
            order = sorted(routed)
            raw = RawRouting(order, [routed[b][0] for b in order], [routed[b][1] for b in order], self.n_experts)
        return pattern, raw


# ==================================================================== llama.cpp


class LlamaCppAttention:
    """Attention patterns and routing on the GGUF itself, read from llama.cpp's graph.

    A context of its own on the shared model with flash attention off, so the graph forms each
    layer's probabilities as `kq_soft_max-{i}`: float32 [n_kv, n_tokens, n_head] (ggml's order: keys
    fastest), one plane per head, one row per token of the decode, one column per KV cell, masked
    cells exactly 0. For one sequence decoded from an empty cache, with sliding-window caches kept
    full size (`swa_full`), KV cell j holds position j; columns past the prompt are padding.
    Routing: `ffn_moe_topk-{i}` (int32 [k, n_tokens], a view of the argsort of the router's
    scores) and the weights node the experts' outputs are multiplied by (the source of
    `ffn_moe_weighted-{i}`: `ffn_moe_weights-{i}`, or `ffn_moe_weights_norm-{i}` where llama.cpp
    normalizes the top-k).
    """

    backend = "llama-cpp"

    def __init__(self, tracer):
        self.tracer = tracer
        self.shared = tracer.shared
        self.n_blocks = tracer.n_blocks
        facts = self.shared.facts
        self.architecture = facts.architecture
        self.metadata = facts.metadata

        def value(key: str, default: int) -> int:
            v = self.metadata.get(f"{self.architecture}.{key}", default)
            return int(max(v) if isinstance(v, (list, tuple)) else v or default)

        self.n_heads = value("attention.head_count", 1)
        self.n_kv_heads = value("attention.head_count_kv", self.n_heads)
        self.n_experts = value("expert_count", 0) or None
        self._graph = None
        self._context(64)
        names = self._node_names()
        missing = [i for i in range(self.n_blocks) if f"kq_soft_max-{i}" not in names]
        if missing:
            raise UnsupportedModel(
                f"llama.cpp's graph for '{tracer.model_name}' ({self.architecture}) has no attention probabilities "
                f"for layer {missing[0] + 1} (node kq_soft_max-{missing[0]}), even with flash attention off."
            )
        self.facts = {"flash_attention": "off (for the patterns)"}

    def _context(self, n_tokens: int):
        from runtime.llama_cpp import GraphContext

        graph = self._graph
        if graph is not None and graph.alive and graph.n_ctx >= n_tokens:
            return graph
        self.close()
        self._graph = GraphContext(self.shared, n_tokens, _UBATCH, flash_attn=False, swa_full=True)
        return self._graph

    def _node_names(self) -> set[str]:
        """Every node name of a short decode, and (once) where each MoE block's routing lies."""
        from .sublayers import _graph_nodes

        ids = (self.tracer.encode("The lens") + [0, 0])[:3]
        nodes = _graph_nodes(self._graph, ids)
        by_name = {n[1]: n for n in nodes}
        self.moe: list[tuple[int, str, str]] = []  # (block, expert ids node, weights node)
        for i in range(self.n_blocks):
            topk, weighted = by_name.get(f"ffn_moe_topk-{i}"), by_name.get(f"ffn_moe_weighted-{i}")
            if topk is None:
                continue
            sources = [s.split(" (")[0] for s in (weighted[4] if weighted else [])]
            weights = next((s for s in sources if s.startswith("ffn_moe_weights")), f"ffn_moe_weights-{i}")
            if weights not in by_name:
                raise UnsupportedModel(f"llama.cpp's graph has no node '{weights}' for the routing weights of layer {i + 1}.")
            self.moe.append((i, topk[1], weights))
        return set(by_name)

    def alive(self) -> bool:
        return self._graph is not None and self._graph.alive and not self.shared.closed

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def layer_kinds(self) -> list[LayerKind]:
        return layer_kinds_from_gguf(self.architecture, self.metadata, self.n_blocks)

    def has_routing(self) -> bool:
        return bool(self.moe)

    def run(self, ids, blocks, heads, queries, routing):
        from .llama_cpp_backend import decode_spans

        start, stop = queries
        n = len(ids)
        graph = self._context(n)
        pattern = np.zeros((len(blocks), len(heads), stop - start, stop), np.float32)
        span = [0, 0]  # the positions of the current decode
        reading = [0.0]  # seconds spent copying probabilities out of the graph
        handlers = {}

        def read_pattern(slot: int):
            def handler(view):
                n_kv, n_tokens, n_head = view.t.ne[0], view.t.ne[1], view.t.ne[2]
                if n_head != self.n_heads or n_tokens != span[1] - span[0] or view.t.ne[3] != 1:
                    raise UnsupportedModel(
                        f"llama.cpp's {view.name} is {list(view.t.ne)}; expected [keys, {span[1] - span[0]} tokens, "
                        f"{self.n_heads} heads, 1]."
                    )
                lo, hi = max(start, span[0]), min(stop, span[1])
                if lo >= hi:
                    return
                began = time.perf_counter()
                keys = min(stop, int(n_kv))
                for hj, h in enumerate(heads):
                    rows = view.slab(h, lo - span[0], hi - lo)
                    pattern[slot, hj, lo - start : hi - start, :keys] = rows[:, :keys]
                reading[0] += time.perf_counter() - began
            return handler

        for slot, b in enumerate(blocks):
            handlers[f"kq_soft_max-{b}".encode()] = read_pattern(slot)
        routed: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b, _, _ in self.moe}
        if routing:
            for b, topk_name, weights_name in self.moe:
                latest: dict[str, np.ndarray] = {}

                def read_topk(view, latest=latest):
                    latest["experts"] = view.array().reshape(-1, view.t.ne[0])

                def read_weights(view, latest=latest, b=b):
                    experts = latest.pop("experts")
                    weights = view.array().reshape(len(experts), -1)
                    if len(experts) != span[1] - span[0]:
                        raise UnsupportedModel(
                            f"llama.cpp routed {len(experts)} tokens in layer {b + 1}, expected {span[1] - span[0]}."
                        )
                    routed[b].append((experts, weights))

                handlers[topk_name.encode()] = read_topk
                handlers[weights_name.encode()] = read_weights
        # Routing in the last block needs every position as an output: llama.cpp computes the last
        # block's MLP for the positions whose logits are asked for only.
        outputs = np.zeros(n, bool)
        outputs[-1] = True
        if routing and self.moe and self.moe[-1][0] == self.n_blocks - 1:
            outputs[:] = True
        max_outputs = max(1, _OUTPUT_BYTES_PER_DECODE // (4 * graph.n_vocab))
        graph.callback.handlers = handlers
        try:
            graph.clear()
            for a, z in decode_spans(outputs, graph.n_ubatch, max_outputs):
                if a >= stop and not (routing and self.moe):
                    break  # nothing after the last query is needed
                span[:] = [a, z]
                graph.decode(ids[a:z], a, outputs[a:z])
        finally:
            graph.callback.handlers = {}
            graph.clear()
        self.facts["read_seconds"] = round(reading[0], 5)
        raw = None
        if routing and self.moe:
            order = [b for b, _, _ in self.moe]
            raw = RawRouting(order, [np.concatenate([e for e, _ in routed[b]]) for b in order],
                             [np.concatenate([w for _, w in routed[b]]) for b in order], self.n_experts)
        return pattern, raw


# ==================================================================== command line


def _queries_arg(text: str) -> tuple[int, int] | int:
    """'A:B' -> (A, B); 'A:' -> (A, end) later; ':B' -> (0, B); 'A' -> A."""
    text = text.strip()
    if ":" not in text:
        return int(text)
    a, b = text.split(":", 1)
    return (int(a) if a.strip() else 0, int(b) if b.strip() else -1)


def run_attention(argv: list[str]) -> int:
    """`python -m tracing attention --prompt TEXT [--layer L ...] [--head H ...] [--queries A:B]`: where the
    last query looks, per layer and head, as a table; or with --json exactly `AttentionResult.to_dict()`."""
    import argparse

    from .__main__ import print_result
    from .models import ignoring_memory_check, print_memory_warnings

    parser = argparse.ArgumentParser(
        prog="python -m tracing attention",
        description="Attention patterns per layer and head (query x key probabilities), and which experts each "
                    "token went to in mixture-of-experts models.",
    )
    parser.add_argument("--prompt", required=True, help="the text to look at")
    parser.add_argument("--model", default=None, help="a file or folder in models/, a path, or a hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", default="hooks", help=f"one of: {', '.join(RUNTIMES)} (default: hooks)")
    parser.add_argument("--layer", type=int, action="append", default=None,
                        help="a layer, 1 to the number of layers (repeat for several; default: all that fit)")
    parser.add_argument("--head", type=int, action="append", default=None,
                        help="a head, from 0 (repeat for several; default: all)")
    parser.add_argument("--queries", default=None,
                        help="query positions A:B (A to B - 1, from 0), or one position (default: all that fit)")
    parser.add_argument("--no-routing", action="store_true", help="do not read mixture-of-experts routing")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (hooks; default: the best available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    args = parser.parse_args(argv)
    if args.backend not in RUNTIMES and args.backend not in ("pytorch", "torch"):
        raise UnsupportedModel(f"Attention patterns run on the backends {' and '.join(RUNTIMES)}, not '{args.backend}'.")
    try:
        queries = _queries_arg(args.queries) if args.queries is not None else None
    except ValueError:
        raise BadChoice(f"--queries takes positions like 3:7 or 5, not {args.queries!r}.") from None
    options = {"device": args.device} if args.device and args.backend != "llama-cpp" else {}
    print_memory_warnings()
    with ignoring_memory_check(args.ignore_memory_check):
        from .api import BACKEND_ALIASES, open_tracer

        if not str(args.prompt).strip():
            raise BadPrompt("The prompt is empty: type some text to look at.")
        tracer = open_tracer(args.model, BACKEND_ALIASES.get(args.backend, args.backend), **options)
        if isinstance(queries, tuple) and queries[1] == -1:
            queries = (queries[0], len(tracer.encode(args.prompt)))
        result = attention_with(tracer, args.prompt, layers=args.layer, heads=args.head, queries=queries,
                                routing=not args.no_routing)
    print_result(result, args.json)
    return 0


__all__ = ["attention", "attention_with", "routing_with", "AttentionResult", "RoutingResult", "LayerKind",
           "attention_runtime", "TorchAttention", "LlamaCppAttention", "find_routers", "layer_kinds_from_config",
           "layer_kinds_from_gguf", "pattern_bytes", "MAX_PATTERN_BYTES"]


class _CallableModule(types.ModuleType):
    """`tracing.attention` is both this module and the function: importing the module makes it the
    package's attribute, so the module itself calls `attention` (`tracing.attention("...")` always works)."""

    def __call__(self, *args, **kwargs) -> AttentionResult:
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
