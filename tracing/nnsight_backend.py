"""The nnsight backend: the lens written with nnsight's tracing API, locally or on NDIF.

nnsight (https://nnsight.net) wraps a PyTorch model so that code inside `with model.trace(ids):`
reads (and writes) any module's input or output while the model runs; with `remote=True` the very
same block is serialized and run on NDIF's hosted models (Llama 3.1 70B, 405B, ...), and only the
values the block `.save()`s come back. lensbench is an nnsight client: no remote execution of our own.

Where the lens reads is found once, structurally, by the hooks backend (`hooks.find_lens_parts`:
the decoder blocks, the final modules before the unembedding, the unembedding) and mapped to
nnsight envoys by module path (`model.layers`, `model.norm`, `lm_head`). One trace reads the input
of the first block and the output of every block at the traced positions, projects them through
the model's own final norm and unembedding, and turns the logits into the lens statistics with
`lens.summarize` (the same ruler every backend is measured with) inside the trace, where the
model is. So what comes back per traced position is rows x (12 k + 16) bytes (top-k ids as int64
and probabilities as float32, entropy, KL, the target's probability and rank): 6.2 KB for a 70B
model's 81 rows at k = 5, instead of 1.3 MB of bfloat16 residual rows (81 x 8192 x 2 bytes) or
42 MB of float32 logits (81 x 128256 x 4) -- and a weightless local skeleton could not project
residual rows anyway.

The wrapped model is a structural copy (new module objects, the same parameter tensors), like the
TransformerLens backend's: nnsight wraps every module's forward, and the shared model the other
backends use keeps its own.

Remote runs (`remote=True`): the API key comes from `NDIF_API_KEY` or nnsight's own config
(`nnsight.CONFIG.API.APIKEY`, saved by `nnsight.login()`), is handed to nnsight's RemoteBackend
and never written anywhere by lensbench; availability comes from `nnsight.status()`; every
failure is one `RemoteUnavailable` sentence.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RemoteUnavailable, UnsupportedModel
from .hooks import LensParts, find_lens_parts
from .lens import summarize
from .loading import LoadedModelTracer, load_model

# Where a key comes from, for the messages (never the key itself).
KEY_VARIABLE = "NDIF_API_KEY"
KEY_HELP = ("Get a free key from NDIF (https://ndif.us) and set the environment variable "
            f"{KEY_VARIABLE} to it before starting lensbench (e.g. export {KEY_VARIABLE}=... then make demo), "
            "or save it once with: .venv/bin/python -c \"import nnsight; nnsight.login()\"; a running app reads "
            "the key when it starts, so restart it.")


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def lens_statistics(first_input, block_outputs, final, unembed, transforms, positions, top_k, temperature,
                    target_id, alternative_id):
    """The lens statistics of one traced prompt, computed where the model runs.

    first_input: the first block's input [1, T, d]; block_outputs: each block's output (a tensor or
    a tuple whose first item is the hidden state); final, unembed: callables (envoys) of the final
    modules and the unembedding; transforms: the logit transforms (fn, value) the model applies.
    Returns `lens.summarize`'s dict (numpy arrays) plus "alternative_prob": the output row's
    probability of `alternative_id` at the last traced position (None without one).
    """
    rows = [first_input[0, positions]] + [_first_tensor(out)[0, positions] for out in block_outputs]
    hidden = torch.stack(rows)  # [N+1, P, d]

    def project(h):
        for module in final:
            h = module(h)
        logits = unembed(h)
        for fn, value in transforms:
            logits = fn(logits, value)
        return logits.float().cpu()  # the statistics on the CPU of wherever the model runs (NDIF's for a remote run)

    stats = summarize(hidden, project, top_k=top_k, temperature=temperature, target_id=target_id,
                      vocab_size=int(unembed.weight.shape[0]) if hasattr(unembed, "weight") else None)
    stats["alternative_prob"] = None
    if alternative_id is not None:
        z = project(hidden[-1:, -1:])[0, 0] / temperature
        stats["alternative_prob"] = float(torch.softmax(z, -1)[alternative_id])
    return stats


@dataclass
class Structure:
    """Where the lens and patching read and write, as module paths (nnsight envoys are found by path).

    Found by the hooks backend's probe (`hooks.find_lens_parts`, `sublayers.find_sublayers`) on the
    model itself, or, for a weightless skeleton of a hosted model, on a small random copy of the same
    architecture (module paths do not depend on sizes)."""

    blocks: str  # e.g. "model.layers"
    n_blocks: int
    final: list[str]  # e.g. ["model.norm"]
    unembed: str  # e.g. "lm_head"
    transforms: list  # the logit transforms (fn, value) the model's forward applies
    sublayers: tuple[str, str] | None  # (attention, MLP) paths inside a block, e.g. ("self_attn", "mlp")
    sublayer_problem: str | None  # why there are none, for a person


def find_structure(model: nn.Module, probe_ids: torch.Tensor, parts: LensParts | None = None) -> Structure:
    """The Structure of `model`, found by running it once on `probe_ids` (see hooks.find_lens_parts)."""
    from .sublayers import find_sublayers

    parts = parts or find_lens_parts(model, probe_ids)
    names = {module: name for name, module in model.named_modules()}
    found, problem = find_sublayers(model, parts.blocks, probe_ids)
    sublayers = None
    if found:
        block = names[parts.blocks[0]] + "."
        sublayers = (names[found[0][0]].removeprefix(block), names[found[0][1]].removeprefix(block))
    return Structure(parts.blocks_name, len(parts.blocks), list(parts.final_names), names[parts.unembed],
                     list(parts.logit_transforms), sublayers, problem)


# A small copy of a hosted model's architecture, to find its structure: config attribute -> size.
_SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=2, vocab_size=128, moe_intermediate_size=32, intermediate_size_mlp=96,
              num_local_experts=4, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
              max_position_embeddings=256)


def structure_of_skeleton(model: nn.Module) -> Structure:
    """The Structure of a model whose weights are on the meta device (it cannot run here): found on
    a small random copy of its architecture; the number of blocks is the skeleton's own."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr, value in _SMALL.items():
        if getattr(text, attr, None) is not None:
            setattr(text, attr, min(value, getattr(text, attr)) if isinstance(getattr(text, attr), int) else value)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[: text.num_hidden_layers]
    config._attn_implementation = "eager"
    small = AutoModelForCausalLM.from_config(config).float().eval()
    found = find_structure(small, torch.tensor([[1, 2, 3]]))
    found.n_blocks = len(model.get_submodule(found.blocks))
    return found


class NnsightLens:
    """The lens through nnsight envoys over a structural copy of a transformers causal LM."""

    def __init__(self, model: nn.Module, tokenizer, structure: Structure, repo_id: str | None = None,
                 wrapped=None):
        from nnsight import TransformersModel

        from .transformer_lens_backend import structural_copy

        self.structure = structure
        if wrapped is not None:  # nnsight's own weightless skeleton of a hosted model (see `skeleton`)
            self.model = wrapped
        else:
            # A copy of the tokenizer: nnsight sets its pad token and padding side.
            self.model = TransformersModel(structural_copy(model), tokenizer=copy.deepcopy(tokenizer),
                                           task="text-generation")
        if repo_id:  # the hub id NDIF knows the model by (the remote key)
            self.model.repo_id = repo_id
        self.blocks = self.model.get(structure.blocks)
        self.final = [self.model.get(path) for path in structure.final]
        self.unembed = self.model.get(structure.unembed)
        self.transforms = list(structure.transforms)

    @property
    def n_blocks(self) -> int:
        return self.structure.n_blocks

    def statistics(self, ids: list[int], positions: list[int], *, top_k: int, temperature: float,
                   target_id: int | None, alternative_id: int | None, backend=None) -> dict:
        """One trace of `ids`: the lens statistics at `positions` (see `lens_statistics`).

        backend: None to run here, or an nnsight backend (a RemoteBackend runs it on NDIF).
        """
        blocks, final, unembed, transforms = self.blocks, self.final, self.unembed, self.transforms
        positions = list(positions)
        with torch.no_grad(), self.model.trace(torch.tensor([ids]), backend=backend) as tracer:
            first_input = blocks[0].input
            outputs = [block.output for block in blocks]
            stats = lens_statistics(first_input, outputs, final, unembed, transforms, positions, top_k,
                                    temperature, target_id, alternative_id).save()
            tracer.stop()  # the lens has what it needs: the model's own head need not run on every position
        return stats


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


class NnsightTracer(LoadedModelTracer):
    """The `Tracer` of the nnsight backend (see tracing.api): the statistics come from the trace
    (`statistics`), not from residual rows projected here."""

    backend = "nnsight"

    def __init__(self, loaded, remote: bool = False, repo_id: str | None = None):
        super().__init__(loaded)
        if _on_meta(loaded.model):  # a weightless skeleton of a hosted model
            structure = structure_of_skeleton(loaded.model)
        else:  # the hooks backend's probe, found once per model
            hooks = loaded.adapter("hooks", _hooks_tracer)
            structure = find_structure(loaded.model, self.probe_ids(), hooks.lens.parts)
        self.lens = NnsightLens(loaded.model, loaded.tokenizer, structure, repo_id=repo_id,
                                wrapped=loaded.adapters.get(SKELETON))
        self.remote = remote
        self.repo_id = repo_id
        self.timeout = 120.0  # seconds a remote job may take before we say so
        if remote:
            self.info = {**self.info, "remote": True, "device": "NDIF"}

    def statistics(self, ids: list[int], positions: list[int], **options) -> tuple[dict, list[str]]:
        """The lens statistics at `positions` (see `NnsightLens.statistics`), here or on NDIF."""
        if not self.remote:
            stats = self.lens.statistics(ids, positions, **options)
        else:
            stats = run_remote(lambda backend: self.lens.statistics(ids, positions, backend=backend, **options),
                               self.lens.model, self.repo_id, self.timeout)
        return stats, ["logit"] * (len(stats["entropy"]) - 1)

    def residuals(self, ids: list[int], last_only: bool):
        raise UnsupportedModel("The nnsight backend computes the lens inside its trace: use tracing.trace_with.")


def _hooks_tracer(loaded):
    from .hooks import HooksTracer

    return HooksTracer(loaded)


def open_tracer(model=None, device=None, remote: bool = False, repo_id: str | None = None,
                **load_options) -> NnsightTracer:
    """Load `model` (see tracing.models.resolve), shared with the other backends, and wrap it once.

    remote: run the traces on NDIF (`remote=True`); the model is then named by `repo_id` (its
    Hugging Face id, e.g. "meta-llama/Llama-3.1-70B"), or by `model` itself when it is a hub id
    that lensbench does not hold locally (a weightless skeleton is built from its config).
    """
    if remote:
        return open_remote_tracer(model, repo_id=repo_id, device=device, **load_options)
    loaded = load_model(model, device=device, **load_options)
    return loaded.adapter("nnsight", NnsightTracer)


# ==================================================================== NDIF


def api_key() -> str | None:
    """The NDIF API key: NDIF_API_KEY, else nnsight's own config (nnsight.login() saves it there)."""
    key = os.environ.get(KEY_VARIABLE)
    if key:
        return key.strip()
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or None


def hosted_models(timeout: float = 10.0) -> dict:
    """NDIF's deployed models (`nnsight.status()`): repo id -> its deployment (state, revision...).

    RemoteUnavailable when NDIF cannot be reached.
    """
    import nnsight

    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):  # nnsight prints its own "Down" banner: we say it once
        status = _with_timeout(lambda: nnsight.status(), timeout,
                               f"NDIF did not answer within {timeout:g} seconds: try again later.")
    if not len(status):
        raise RemoteUnavailable(
            "NDIF (the National Deep Inference Fabric) could not be reached: check the network connection "
            "(NDIF's status: https://discuss.ndif.us), and use a local backend meanwhile."
        )
    return dict(status.deployments)


def check_available(repo_id: str, timeout: float = 10.0) -> dict:
    """The deployment of `repo_id` on NDIF; RemoteUnavailable (one sentence) when there is none running."""
    hosted = hosted_models(timeout)
    entry = hosted.get(repo_id)
    if entry is None:
        lowered = {name.lower(): name for name in hosted}
        entry = hosted.get(lowered.get(repo_id.lower(), ""))
    if entry is None:
        running = sorted(name for name, e in hosted.items() if e.get("state") == "RUNNING")
        raise RemoteUnavailable(
            f"NDIF does not host {repo_id!r} right now; it runs: {', '.join(running[:12]) or 'nothing'}."
        )
    if entry.get("state") != "RUNNING":
        raise RemoteUnavailable(f"{repo_id!r} is on NDIF but not running right now ({entry.get('state')}): try again later.")
    return entry


def require_key() -> str:
    key = api_key()
    if not key:
        raise RemoteUnavailable(f"Running on NDIF needs an API key, and none is set. {KEY_HELP}")
    return key


def remote_backend(nn_model, key: str):
    """nnsight's RemoteBackend for `nn_model` with `key` (given to nnsight only, never logged)."""
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend(nn_model.to_model_key(), api_key=key, env=nn_model._remoteable_get_env())
    backend.display.enabled = False  # no spinner in our CLI or logs
    return backend


def _with_timeout(call, timeout: float, message: str):
    """call() in a worker thread; RemoteUnavailable(message) when it takes longer than `timeout`."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise RemoteUnavailable(message) from None
    finally:
        pool.shutdown(wait=False)


def explain_remote_failure(exc: BaseException) -> RemoteUnavailable:
    """One sentence for a failed remote call (rejected key, timeout, no network, server error)."""
    text = str(exc)
    lowered = text.lower()
    if any(word in lowered for word in ("401", "403", "unauthorized", "forbidden", "api key", "api-key")):
        return RemoteUnavailable(f"NDIF rejected the API key. {KEY_HELP}")
    if "timed out" in lowered or "timeout" in lowered:
        return RemoteUnavailable("NDIF did not answer in time: try again later, or trace fewer positions.")
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"ConnectError", "ConnectionError", "gaierror", "WebSocketAddressException", "ConnectionRefusedError",
                "OSError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "connect" in lowered:
        return RemoteUnavailable("NDIF could not be reached (no network connection to it): use a local backend, "
                                 "or try again when online.")
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return RemoteUnavailable(f"NDIF could not run the trace: {first_line[:300]}")


def _chain(exc: BaseException):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def run_remote(job, nn_model, repo_id: str | None, timeout: float):
    """job(backend) on NDIF: key, availability, then the job; every failure one RemoteUnavailable."""
    key = require_key()
    if repo_id:
        check_available(repo_id)
    try:
        backend = remote_backend(nn_model, key)
        return _with_timeout(lambda: job(backend), timeout,
                             f"NDIF did not finish within {timeout:g} seconds: try again later, or trace fewer positions.")
    except RemoteUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - nnsight, httpx and websocket errors all become one sentence
        raise explain_remote_failure(exc) from None


def open_remote_tracer(model, repo_id: str | None = None, device=None, **load_options) -> NnsightTracer:
    """A tracer whose traces run on NDIF.

    With a locally held model (a path, or the bundled one) and `repo_id`: the local copy supplies the
    structure and the tokenizer, NDIF's copy of `repo_id` runs. With only a hub id: availability
    is checked first, then a weightless skeleton is built from the hub's config and tokenizer.
    """
    from .models import resolve

    require_key()
    source = resolve(model)
    if source.kind != "hub":  # held here: the local copy gives the structure and the tokenizer
        loaded = load_model(model, device=device, **load_options)
        repo_id = repo_id or _hub_id(loaded)
        return loaded.adapter(f"nnsight remote {repo_id}", lambda held: NnsightTracer(held, remote=True, repo_id=repo_id))
    repo_id = repo_id or str(model)
    check_available(repo_id)
    try:
        loaded = skeleton(repo_id)
    except RemoteUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001
        raise explain_remote_failure(exc) from None
    return NnsightTracer(loaded, remote=True, repo_id=repo_id)


def _hub_id(loaded) -> str:
    name = getattr(loaded.model.config, "_name_or_path", "") or loaded.name
    if not name or os.path.exists(name):
        raise RemoteUnavailable(
            f"{loaded.name} is a local model: NDIF needs the Hugging Face id of the model it hosts "
            "(e.g. --model meta-llama/Llama-3.1-8B --remote)."
        )
    return name


SKELETON = "nnsight skeleton"  # the LoadedModel adapter holding nnsight's model of a hosted checkpoint


def skeleton(repo_id: str, config=None, tokenizer=None):
    """A LoadedModel of NDIF's `repo_id` with no weights: nnsight builds it on the meta device from
    the config (the hub's, unless given), so the structure and the request are this machine's, the
    weights NDIF's."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from .loading import LoadedModel
    from .models import ModelSource

    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(repo_id)
    options = {"config": config} if config is not None else {}
    wrapped = TransformersModel(repo_id, tokenizer=copy.deepcopy(tokenizer), task="text-generation", **options)
    model = wrapped._module.eval()
    loaded = LoadedModel(ModelSource("hub", repo_id, repo_id), model, tokenizer, torch.device("meta"),
                         next(model.parameters()).dtype, 0)
    loaded.adapters[SKELETON] = wrapped
    return loaded


def build_request(tracer: NnsightTracer, ids: list[int], positions: list[int], *, top_k: int = 5,
                  temperature: float = 1.0, target_id: int | None = None, alternative_id: int | None = None):
    """The request a remote lens trace would send to NDIF, built without sending it:
    (nnsight's RequestModel, the serialized payload). For tests and for seeing what leaves the machine."""
    from nnsight.intervention.backends.remote import RemoteBackend

    class Capture(RemoteBackend):
        def request(self, request, nn_tracer):
            self.captured = (request, self._serialize(nn_tracer))
            return None

    backend = Capture(tracer.lens.model.to_model_key(), api_key="not-sent")
    backend.display.enabled = False
    with contextlib.suppress(NameError, UnboundLocalError):  # nothing ran, so nothing was saved
        tracer.lens.statistics(ids, positions, top_k=top_k, temperature=temperature, target_id=target_id,
                               alternative_id=alternative_id, backend=backend)
    return backend.captured


# ==================================================================== activation patching


def _patched_summary(logits, keep_ids, k):
    """What one patched run sends back: the top-k ids and log-probabilities of its last-position
    logits, and the log-probabilities of `keep_ids` (the target, the contrast): 12 (k + 2) bytes, not
    the vocabulary's 4 x vocab."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(k)
    return top.indices.cpu(), top.values.cpu(), logp[keep_ids].cpu()


def patch_session(model, sites, clean_ids, corrupt_ids, cells, keep_ids, k, cells_per_forward, backend=None,
                  transforms=()):
    """Clean, corrupted and every patched run of a patching grid in one nnsight session (one NDIF job).

    sites: (site, row) -> (envoy, whether its input rather than its output is the vector).
    transforms: the logit transforms (fn, value) the model's forward applies after its unembedding
    (Gemma 2/3's soft-cap): the metric is read on the model's own output, as the hooks runtime reads it.
    The clean vectors never leave the session (the patched traces read them where they were captured);
    what comes back is the clean and corrupted last-position logits and each cell's `_patched_summary`.
    """
    unembed = sites["unembed"]

    def last_logits():
        logits = unembed.output[0, -1]
        for fn, value in transforms:
            logits = fn(logits, value)
        return logits

    with torch.no_grad(), model.session(backend=backend):
        with model.trace(torch.tensor([clean_ids])):
            clean = {}
            for key, (envoy, is_input) in sites["order"]:
                value = envoy.input if is_input else envoy.output
                clean[key] = _first_tensor(value)[0].clone()
            clean_logits = last_logits().float().cpu().save()
        with model.trace(torch.tensor([corrupt_ids])):
            corrupt_logits = last_logits().float().cpu().save()
        patched = [].save()
        for start in range(0, len(cells), cells_per_forward):
            with model.trace() as tracer:
                for site, row, position in cells[start:start + cells_per_forward]:
                    with tracer.invoke(torch.tensor([corrupt_ids])):
                        envoy, is_input = sites["by_key"][(site, row)]
                        value = envoy.input if is_input else envoy.output
                        _first_tensor(value)[0, position] = clean[(site, row)][position]
                        patched.append(_patched_summary(last_logits(), keep_ids, k))
    return clean_logits, corrupt_logits, patched


class NnsightRuntime:
    """Activation patching (tracing.patching) through nnsight: the residual stream (first block's input,
    every block's output) and, where `find_sublayers` finds them, each block's attention and MLP
    outputs, written with nnsight's in-trace assignment. The whole grid is one `model.session()`
    (`prepare`), so on NDIF it is one job; up to 64 cells run in one forward (one invoke each)."""

    backend = "nnsight"
    cells_per_forward = 64

    def __init__(self, tracer):
        self.tracer = tracer
        lens = tracer.lens
        structure = lens.structure
        self.n_blocks = lens.n_blocks
        self._problem = structure.sublayer_problem
        blocks = lens.blocks
        order = [(("resid", 0), (blocks[0], True))]
        for i in range(self.n_blocks):
            if structure.sublayers is not None:
                attn, mlp = structure.sublayers
                order.append((("attn", i + 1), (lens.model.get(f"{structure.blocks}.{i}.{attn}"), False)))
                order.append((("mlp", i + 1), (lens.model.get(f"{structure.blocks}.{i}.{mlp}"), False)))
            order.append((("resid", i + 1), (blocks[i], False)))
        self._sites = {"order": order, "by_key": dict(order), "unembed": lens.unembed}
        self._results = None
        self.facts = {"session": "one nnsight session", "remote": bool(tracer.remote)}

    def alive(self) -> bool:
        return True

    def sublayer_problem(self) -> str | None:
        return self._problem

    def prepare(self, clean_ids, corrupt_ids, cells, sublayers: bool, keep_ids) -> None:
        """Run the whole grid (clean, corrupted, every cell) as one session; `clean`, `corrupted`
        and `run` then hand out its results."""
        from .patching import PATCHED_K

        keep = [int(i) for i in keep_ids if i is not None]
        plain = [(c.site, c.row, c.position) for c in cells]
        model = self.tracer.lens.model
        sites = self._sites
        if not sublayers:
            order = [item for item in sites["order"] if item[0][0] == "resid"]
            sites = {**sites, "order": order}

        def job(backend=None):
            return patch_session(model, sites, list(clean_ids), list(corrupt_ids), plain, keep, PATCHED_K,
                                 self.cells_per_forward, backend=backend, transforms=self.tracer.lens.transforms)

        if self.tracer.remote:
            result = run_remote(job, model, self.tracer.repo_id, self.tracer.timeout)
        else:
            result = job()
        self._results = result
        self._keep = keep

    def clean(self, ids, sublayers):
        from .patching import CleanRun

        return CleanRun({}, self._results[0].numpy())

    def corrupted(self, ids):
        return self._results[1].numpy()

    def run(self, ids, cells, clean):
        import numpy as np

        vocab = self._results[0].shape[-1]
        summaries = self._results[2]
        for start in range(0, len(cells), self.cells_per_forward):
            indices = list(range(start, min(start + self.cells_per_forward, len(cells))))
            yield indices, np.stack([_log_probs(vocab, *summaries[i], self._keep) for i in indices])


def _log_probs(vocab: int, top_ids, top_values, keep_values, keep_ids):
    """A vocabulary-sized row of log-probabilities exact at the kept ids (the top-k, the target, the
    contrast), the rest of the probability spread evenly over the other ids: its softmax, top-k and
    differences of kept entries are the patched run's own."""
    import numpy as np

    known = {int(i): float(v) for i, v in zip(top_ids.tolist(), top_values.tolist())}
    known.update({int(i): float(v) for i, v in zip(keep_ids, keep_values.tolist())})
    mass = float(np.exp(np.array(list(known.values()), dtype=np.float64)).sum())
    rest = max(1.0 - mass, 1e-30) / max(1, vocab - len(known))
    row = np.full(vocab, np.log(rest), dtype=np.float64)
    for i, v in known.items():
        row[i] = v
    return row
