"""Loading a model into PyTorch (transformers), with the one in-process model cache.

A GGUF is dequantized by transformers once (~18 s for SmolLM2), then saved as float32
safetensors under the cache folder beside a fingerprint of the GGUF; later loads read the
safetensors (~1 s). A changed GGUF has a new fingerprint, so its stale cache is replaced.
Weights load in float32 when they fit in the device's memory, else in half precision
(`tracing.device.pick_dtype`); every load is checked against memory first (`tracing.models.check_fits`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .device import pick_device, pick_dtype
from .errors import BadModelFile, LensbenchError, ModelNotFound, NotEnoughMemory, UnsupportedModel
from .models import ModelSource, check_fits, fingerprint, read_gguf, resolve

CACHE_DIR = Path(os.environ.get("LENSBENCH_CACHE", Path.home() / ".cache" / "lensbench"))
_COMPLETE = "lensbench-complete.json"


@dataclass
class LoadedModel:
    """A transformers causal LM with its tokenizer, ready to trace."""

    source: ModelSource
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    weights_bytes: int
    info: dict = field(default_factory=dict)
    # Backend adapters built on this model (each probes it once), and the lock that serializes
    # forwards: hooks collect into per-call lists, so two requests must not interleave.
    adapters: dict = field(default_factory=dict, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def name(self) -> str:
        return self.source.name

    def result_info(self) -> dict:
        """What a LensResult's `info` should say about this model: device, dtype, why that dtype,
        and the memory warning its load gave (if any)."""
        info = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
        for key in ("dtype_reason", "memory_warning"):
            if key in self.info:
                info[key] = self.info[key]
        return info

    @property
    def context_length(self) -> int | None:
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    # Tokenization shared by every backend that runs on a transformers model.
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_target(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def adapter(self, name: str, build):
        """The backend adapter `name` for this model, built once by `build(self)`."""
        with self.lock:
            if name not in self.adapters:
                self.adapters[name] = build(self)
            return self.adapters[name]


class LoadedModelTracer:
    """Base of the `Tracer`s that run on a transformers model: tokenization, context and the
    model's lock come from the shared `LoadedModel`; subclasses add residuals() and project()."""

    backend = ""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model_name = loaded.name
        self.context_length = loaded.context_length
        self.encode = loaded.encode
        self.encode_target = loaded.encode_target
        self.decode_one = loaded.decode_one
        # trace_with copies it into every result: which dtype ran and why.
        self.info = loaded.result_info()
        unembed = loaded.model.get_output_embeddings()
        self.vocab_size = int(unembed.weight.shape[0]) if unembed is not None else None

    def lock(self):
        return self.loaded.lock

    def input_ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.loaded.device)

    def probe_ids(self) -> torch.Tensor:
        """A few real tokens for the one probe forward a backend makes to find its way around."""
        return self.input_ids(self.loaded.encode("The lens")[:3] or [0])

    # With a `self.lens` that has residuals(input_ids, last_only) and project(hidden), as the hooks
    # and TransformerLens lenses do, these complete the Tracer protocol (logit lens on every row).
    def residuals(self, ids: list[int], last_only: bool) -> tuple[torch.Tensor, list[str]]:
        hidden, _ = self.lens.residuals(self.input_ids(ids), last_only)
        return hidden, ["logit"] * (hidden.shape[0] - 1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lens.project(hidden)


def cache_dir() -> Path:
    return Path(os.environ.get("LENSBENCH_CACHE", CACHE_DIR))


# llama.cpp's spelling of an architecture -> transformers', where they differ (transformers renames
# them the same way in `load_gguf_checkpoint`).
_LLAMA_CPP_ARCHITECTURE_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_architectures_transformers_loads() -> set[str]:
    """GGUF `general.architecture` values (as llama.cpp writes them) transformers can dequantize into PyTorch."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    known = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}  # those two are metadata sections
    return known | {ours for ours, theirs in _LLAMA_CPP_ARCHITECTURE_NAMES.items() if theirs in known}


class _ModelCache:
    """Loaded models by (location, device, dtype), least recently used evicted past a memory budget."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: tuple) -> LoadedModel | None:
        """The model under `key`; for an explicit dtype, also one loaded with the automatic choice that picked it."""
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None and key[-1] != "auto":
                auto = (*key[:-1], "auto")
                candidate = self._models.get(auto)
                if candidate is not None and str(candidate.dtype) == key[-1]:
                    key, loaded = auto, candidate
            if loaded is not None:
                self._models.move_to_end(key)
            return loaded

    def put(self, key: tuple, loaded: LoadedModel) -> None:
        with self._lock:
            self._models[key] = loaded
            budget = _memory_budget()
            while len(self._models) > 1 and sum(m.weights_bytes for m in self._models.values()) > budget:
                self._models.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    @property
    def lock(self) -> threading.RLock:
        return self._lock


def _memory_budget() -> int:
    from .models import parse_bytes

    text = os.environ.get("LENSBENCH_MODEL_BUDGET")
    if text:
        return parse_bytes(text)
    import psutil

    return int(psutil.virtual_memory().total * 0.5)


MODEL_CACHE = _ModelCache()


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    check_memory: bool = True,
) -> LoadedModel:
    """Load (or reuse) a transformers model for `spec` (see `tracing.models.resolve`).

    device: "cuda", "mps" or "cpu" (default: the best available, `tracing.device.pick_device`).
    dtype: the weights' dtype; by default float32 when it fits in the device's memory, else half
    precision (`tracing.device.pick_dtype`). `loaded.info["dtype_reason"]` says which and why.
    check_memory: False loads even a model larger than this machine's memory (with a warning).
    Raises ModelNotFound, BadModelFile, UnsupportedModel, NotEnoughMemory (before loading); a tight
    fit loads with a `tracing.models.MemoryWarning`.
    """
    source = resolve(spec)
    device = pick_device(str(device) if device else None)
    key = (source.kind, source.location, str(device), str(dtype) if dtype else "auto")
    with MODEL_CACHE.lock:  # one load at a time: two requests never load two copies
        loaded = MODEL_CACHE.get(key)
        if loaded is not None:
            return loaded
        start = time.perf_counter()
        if source.kind == "gguf":
            loaded = _load_gguf(source, device, dtype, check_memory)
        else:
            loaded = _load_pretrained(source, device, dtype, trust_remote_code, check_memory)
        loaded.info["load_seconds"] = round(time.perf_counter() - start, 2)
        MODEL_CACHE.put(key, loaded)
        return loaded


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _load_gguf(source: ModelSource, device: torch.device, requested: torch.dtype | None, check_memory: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = read_gguf(source.path)
    if facts.n_files > 1:
        raise UnsupportedModel(
            f"'{source.name}' is a split GGUF ({facts.n_files} files); transformers cannot load split GGUFs "
            "into PyTorch. Use the llama.cpp backend (--backend llama-cpp), which reads it as it is."
        )
    known = gguf_architectures_transformers_loads()
    if facts.architecture not in known:
        raise UnsupportedModel(
            f"transformers cannot load '{facts.architecture}' GGUF files into PyTorch (it knows "
            f"{', '.join(sorted(known))}). Use the llama.cpp backend (--backend llama-cpp), "
            "which runs the GGUF itself."
        )
    dtype, reason = pick_dtype(device, facts.n_params * 4, requested)
    weights_bytes = facts.n_params * _dtype_bytes(dtype)
    target = gguf_cache_folder(source.path)
    from_cache = (target / _COMPLETE).is_file()
    if not from_cache:
        # transformers holds the quantized file, a float32 state dict and the model at once.
        verdict = check_fits(
            facts.n_params * 4 * 2,
            f"Converting '{source.name}' ({facts.summary()}) to PyTorch",
            "The llama.cpp backend runs the GGUF without converting it.",
            check_memory=check_memory,
        )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        except LensbenchError:
            raise
        except Exception as exc:
            raise BadModelFile(
                f"transformers could not read '{source.name}': {type(exc).__name__}: {exc}"
            ) from None
        _save_cache(model, tokenizer, target, source)
        model = model.to(device=device, dtype=dtype)
    else:
        verdict = check_fits(
            int(weights_bytes * 1.1),
            f"Loading '{source.name}' in {_name(dtype)}",
            "The llama.cpp backend runs the GGUF itself, in less memory.",
            metal=device.type == "mps",
            check_memory=check_memory,
        )
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
    model.eval()
    return LoadedModel(
        source, model, tokenizer, device, dtype, weights_bytes,
        info={"from_cache": from_cache, "cache_dir": str(target), "gguf": facts.summary(),
              **_dtype_info(dtype, reason, verdict)},
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_info(dtype: torch.dtype, reason: str, verdict) -> dict:
    info = {"dtype": _name(dtype), "dtype_reason": reason}
    if verdict.warning:
        info["memory_warning"] = verdict.message
    return info


def gguf_cache_folder(gguf: Path) -> Path:
    """Where the float32 conversion of this version of `gguf` is cached: <cache>/gguf/<stem>-<fingerprint>
    (a new fingerprint, a new folder, when the file changes)."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{fingerprint(gguf)}"


def _converted_from(folder: Path) -> Path | None:
    """The GGUF a cache folder was converted from, as its completion file records it (None: unknown)."""
    try:
        return Path(json.loads((folder / _COMPLETE).read_text())["gguf"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_cache(model, tokenizer, target: Path, source: ModelSource) -> None:
    """Save a GGUF-loaded model as float32 safetensors; remove the conversions of older versions of the
    same file and of same-named files that are gone (a copy elsewhere, still there, keeps its own)."""
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf") until the quantizer is dropped;
    # its weights are plain float tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    here = Path(source.path).resolve()
    for stale in parent.glob(f"{source.path.stem}-*"):
        if stale.name.rsplit("-", 1)[0] != source.path.stem or stale == target:
            continue
        origin = _converted_from(stale)
        if origin is None or origin == here or not origin.exists():  # this file's, or a file now gone
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(json.dumps({"gguf": str(source.path)}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only or full disk only costs speed next time


def _load_pretrained(
    source: ModelSource, device: torch.device, requested: torch.dtype | None, trust_remote_code: bool,
    check_memory: bool,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = source.kind == "hf"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        config = AutoConfig.from_pretrained(
            source.location, local_files_only=local or offline, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise _config_problem(exc, source, local) from None
    n_params = _estimate_params(config)
    dtype, reason = pick_dtype(device, n_params * 4, requested)
    weights_bytes = n_params * _dtype_bytes(dtype)
    verdict = check_fits(
        int(weights_bytes * 1.1),
        f"Loading '{source.name}' (~{n_params / 1e9:.1f}B parameters) in {_name(dtype)}",
        metal=device.type == "mps",
        check_memory=check_memory,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, local_files_only=local, trust_remote_code=trust_remote_code
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(
            source.location, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError) as exc:
        reason = str(exc).split(". ")[0][:200]
        raise UnsupportedModel(f"transformers cannot load '{source.name}' as a causal LM ({reason}).") from None
    except OSError as exc:  # the download broke off, or a file is missing from the folder
        raise _config_problem(exc, source, local) from None
    except torch.OutOfMemoryError:
        raise NotEnoughMemory(f"Ran out of memory loading '{source.name}'.") from None
    model.eval()
    return LoadedModel(source, model, tokenizer, device, dtype, weights_bytes,
                       info={"from_cache": False, **_dtype_info(dtype, reason, verdict)})


def _config_problem(exc: Exception, source: ModelSource, local: bool) -> LensbenchError:
    """Why a model's config could not be read, in one sentence: an architecture transformers does
    not know, a gated or missing hub model, no network, or a damaged folder."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    unknown = isinstance(exc, (KeyError, ValueError)) and "model type" in text
    if unknown or "does not recognize this architecture" in text:
        found = re.search(r"model type `([^`]+)`", text)
        kind = f" ('{found[1]}')" if found else ""
        return UnsupportedModel(f"This version of transformers does not know the architecture{kind} of "
                                f"'{source.name}'; a newer transformers may, and llama.cpp runs GGUF files of "
                                "many more.")
    if local:
        return BadModelFile(f"Could not read the model folder '{source.name}' "
                            f"({type(exc).__name__}: {str(exc)[:200]}).")
    where = (f"'{source.location}' is not a file or folder here, and it could not be fetched from the "
             "Hugging Face hub")
    if "GatedRepoError" in names or "gated repo" in text:
        return ModelNotFound(f"{where}: it is gated, so accept its licence on huggingface.co/{source.location} "
                             "and log in with `hf auth login` first.")
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError"} or "not a valid model identifier" in text:
        return ModelNotFound(f"{where}: there is no such model (check the spelling, as in "
                             "'HuggingFaceTB/SmolLM2-135M').")
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError", "Timeout",
                "ReadTimeout", "ConnectTimeout"} or "couldn't connect" in text or "offline" in text.lower():
        return ModelNotFound(f"{where}: there is no network connection (or HF_HUB_OFFLINE is set).")
    return ModelNotFound(f"{where} ({type(exc).__name__}).")


def _estimate_params(config) -> int:
    """Parameters from the config alone (before any weight is read): embeddings plus blocks."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        text = config.get_text_config()
        d = getattr(text, "hidden_size", 4096)
        return 12 * getattr(text, "num_hidden_layers", 32) * d * d + 2 * getattr(text, "vocab_size", 32000) * d


__all__ = ["LoadedModel", "LoadedModelTracer", "load_model", "MODEL_CACHE"]
