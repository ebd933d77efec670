"""Real GGUFs of many architectures, made offline by llama.cpp's own converter, for tests.

Each architecture is a tiny Hugging Face model (hidden size 64, 4 blocks) with random weights,
saved as safetensors and converted by `convert_hf_to_gguf.py` from the llama-cpp-python source
distribution of the installed version, the converter that made the GGUFs people download. So a
test sees what llama.cpp really writes and runs (tensor names, the Gemma (1 + w) norms folded
in, fused or split projections, metadata), not our idea of it.

    path = converted("qwen3", "f32")          # builds or reuses .cache/converted/...
    model = hf_model("qwen3")                 # the same weights, in PyTorch
    logits = reference_lens(model, ids)       # [blocks + 1, T, vocab]

Everything is cached under `<repo>/.cache/converted/`: the converter (downloaded once with pip),
the tokenizers, each model's folder and its GGUFs, keyed by a hash of what made them (the
llama-cpp-python version, the architecture's config and tokenizer, the seed, the outtype and
`RECIPE`), so an unchanged fixture is reused and a changed one rebuilt. Every build writes to a
temporary name and renames, so two processes building at once never see half a file. Nothing
comes from the Hugging Face hub.

Tokenizers, and why two: the converter picks the vocabulary writer per architecture.
- Byte-level BPE (`_set_vocab_gpt2`, the only writer of llama4, qwen3_moe, olmo2, starcoder2):
  it names the pre-tokenizer by hashing the ids of a test string, so only a real tokenizer's
  vocabulary passes. We use SmolLM2's, read from the bundled GGUF (the converter's "smollm").
- Sentencepiece (`tokenizer.model`), a 512-piece BPE with byte fallback trained here on a fixed
  text with the `sentencepiece` package (installed with transformer-lens): what gemma2 and phi3
  require, what the llama (mistral), qwen2/qwen3, gemma3 and granite writers try first, and small:
  lensbench reads a GGUF header with gguf's reader, ~7 s for SmolLM2's 49k tokens and merges
  against ~0.1 s here, so the BPE vocabulary is kept to the architectures that need it.
- Why qwen2 cannot have SmolLM2's BPE: transformers 5 always loads a `qwen2` folder's tokenizer as
  `Qwen2Tokenizer` (qwen2 is in its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which replaces the
  pre-tokenizer with Qwen's regex; SmolLM2's ids then hash to a70b913f..., which
  `get_vocab_base_pre` does not know ("BPE pre-tokenizer was not recognized"). Only Qwen's own
  151k vocabulary hashes to "qwen2"; the converter's Qwen2 class tries `tokenizer.model` first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "converted"
# Bump when anything in this module changes what gets built (weights, configs, tokenizers, files).
RECIPE = 1
OUTTYPES = ("f32", "q8_0")

# ---------------------------------------------------------------- architectures

_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Spec:
    """One architecture: its transformers config and what the test needs to know about it."""

    model_type: str  # transformers model_type
    config: dict  # overrides of the transformers config defaults
    tokenizer: str  # "bpe" (SmolLM2's) or "spm" (trained here)
    seed: int = 0
    # Standard deviations of the random weights (see `_randomize`).
    init: dict = field(default_factory=dict)
    gguf_arch: str = ""  # general.architecture, as llama.cpp writes it
    # Whether transformers 5.23 dequantizes this GGUF into PyTorch (so the hooks backend can run it).
    transformers_loads: bool = True


ARCHITECTURES: dict[str, Spec] = {
    # Llama 4 text: MoE every second block (1 and 3) with a shared expert and sigmoid top-1 routing;
    # block 3 is NoPE (no rotary embedding, full attention), the others RoPE with L2-normed q/k and
    # chunked attention. llama.cpp hard-codes the NoPE period 4, hence the explicit list here.
    "llama4": Spec(
        "llama4_text",
        dict(
            _BASE, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0], attention_chunk_size=8192, use_qk_norm=True,
        ),
        "bpe",
        seed=6, gguf_arch="llama4", transformers_loads=False,
    ),
    "qwen2": Spec("qwen2", dict(_BASE, tie_word_embeddings=True, use_sliding_window=False), "spm", seed=34, gguf_arch="qwen2"),
    # head_dim 128, Qwen 3's own (transformers' GGUF loader does not read key_length for qwen3).
    "qwen3": Spec("qwen3", dict(_BASE, head_dim=128, use_sliding_window=False), "spm", seed=28, gguf_arch="qwen3"),
    # llama.cpp's qwen3moe always renormalizes the top-k router weights: norm_topk_prob=True matches it.
    # Experts 768 wide, Qwen3-30B-A3B's (transformers' GGUF loader does not read that width).
    "qwen3_moe": Spec(
        "qwen3_moe",
        dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True,
             decoder_sparse_step=1, use_sliding_window=False),
        "bpe",
        seed=23, gguf_arch="qwen3moe",
    ),
    # llama.cpp runs Mistral as "llama" and has no sliding window for it: none here either.
    "mistral": Spec("mistral", dict(_BASE, sliding_window=None), "spm", seed=18, gguf_arch="llama"),
    "phi3": Spec("phi3", dict(_BASE, sliding_window=None), "spm", seed=2, gguf_arch="phi3"),
    # Gemma 2: soft-capped attention and output, post-norms, sliding window (8, shorter than the
    # test prompt) on every other block. Heads 256 wide and query_pre_attn_scalar 256, as in Gemma
    # 2 2B/9B: llama.cpp scales queries by 1/sqrt(head_dim) and transformers' GGUF loader assumes
    # 256 (it does not carry query_pre_attn_scalar).
    "gemma2": Spec(
        "gemma2",
        dict(_BASE, head_dim=256, tie_word_embeddings=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
             query_pre_attn_scalar=256, sliding_window=8, hidden_activation="gelu_pytorch_tanh"),
        "spm",
        init={"embed_tokens": 0.25},
        seed=32, gguf_arch="gemma2",
    ),
    # Gemma 3: q/k norms, local rope base on sliding blocks (all 4 here: the full one is every 6th),
    # heads and query_pre_attn_scalar 256 as Gemma 3 270M.
    "gemma3": Spec(
        "gemma3_text",
        dict(_BASE, head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=8,
             hidden_activation="gelu_pytorch_tanh"),
        "spm",
        init={"embed_tokens": 0.25},
        seed=36, gguf_arch="gemma3",
    ),
    # OLMo 2: norms after attention and MLP (no norm before them), q/k norms over all heads.
    "olmo2": Spec("olmo2", dict(_BASE), "bpe", seed=35, gguf_arch="olmo2", transformers_loads=False),
    # Granite: every multiplier away from 1, attention scale away from 1/sqrt(head_dim).
    "granite": Spec(
        "granite",
        dict(_BASE, embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.1),
        "spm",
        init={"embed_tokens": 0.25},
        seed=37, gguf_arch="granite", transformers_loads=False,
    ),
    # StarCoder 2: LayerNorm with biases, biases on every projection, a plain GELU MLP.
    "starcoder2": Spec(
        "starcoder2", dict(_BASE, norm_epsilon=1e-5, use_bias=True, sliding_window=None), "bpe", seed=9, gguf_arch="starcoder2"
    ),
}


# ---------------------------------------------------------------- small helpers


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _publish_dir(tmp: Path, target: Path) -> Path:
    """Rename a finished temporary folder into place; if another process got there first, keep theirs."""
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _prune(target: Path, prefix: str) -> None:
    """Remove older builds of the same thing (same name prefix, another key) beside `target`."""
    for stale in target.parent.glob(f"{prefix}*"):
        if stale != target and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _temp_dir(near: Path) -> Path:
    near.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{near.name}.tmp-", dir=near.parent))


_LOCK = threading.RLock()  # one build of a given thing at a time within this process


# ---------------------------------------------------------------- llama.cpp's converter


def converter_dir() -> Path:
    """`vendor/llama.cpp` of the installed llama-cpp-python's source distribution (downloaded once)."""
    version = llama_cpp_version()
    target = CACHE / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with _LOCK:
        if (target / "convert_hf_to_gguf.py").is_file():
            return target
        tmp = _temp_dir(target)
        try:
            download = tmp / "download"
            # `--no-binary llama-cpp-python`, not `:all:`: that would also build pip's build-time
            # requirements (setuptools, scikit-build-core) from source, 7 minutes without a pip cache.
            pip = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
                 f"llama-cpp-python=={version}", "-d", str(download)],
                capture_output=True, text=True, timeout=900,
            )
            if pip.returncode != 0:
                raise RuntimeError(f"pip could not download llama-cpp-python {version}'s source:\n{pip.stderr[-2000:]}")
            (sdist,) = download.glob("llama_cpp_python-*.tar.gz")
            prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
            wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")
            tree = tmp / "tree"
            with tarfile.open(sdist) as archive:
                members = []
                for member in archive.getmembers():
                    if member.name.startswith(prefix) and member.name[len(prefix):].startswith(wanted):
                        member.name = member.name[len(prefix):]
                        members.append(member)
                archive.extractall(tree, members=members, filter="data")
            _publish_dir(tree, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# Runs convert_hf_to_gguf.py as its own __main__ once per job, with the job's command line, in one
# subprocess for several jobs: its imports (torch, transformers: ~5 s) are paid once instead of
# per file. The files are byte-identical to separate command-line runs (checked when this was written).
_DRIVER = """
import json, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
for model_dir, outfile, outtype in jobs:
    sys.argv = [script, model_dir, "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(script, run_name="__main__")
"""


def convert(jobs: list[tuple[Path, Path, str]]) -> None:
    """llama.cpp's `convert_hf_to_gguf.py MODEL_DIR --outfile X --outtype T` for each job, in a subprocess."""
    tree = converter_dir()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tree), str(tree / "gguf-py")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    tag = f"tmp-{os.getpid()}-{threading.get_ident()}"
    temporary = [(model, out.with_name(f".{out.name}.{tag}"), out, outtype) for model, out, outtype in jobs]
    argv = json.dumps([[str(model), str(tmp), outtype] for model, tmp, _, outtype in temporary])
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DRIVER, str(tree / "convert_hf_to_gguf.py"), argv],
            env=env, capture_output=True, text=True, timeout=900,
        )
        for model, tmp, out, outtype in temporary:
            if done.returncode != 0 or not tmp.is_file():
                raise RuntimeError(
                    f"convert_hf_to_gguf.py failed on {model.name} ({outtype}):\n{done.stderr[-3000:]}"
                )
            _prune(out, out.name.rsplit("-", 1)[0] + "-")
            os.replace(tmp, out)
    finally:
        for _, tmp, _, _ in temporary:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- tokenizers

# A fixed text for the sentencepiece model: the test prompts' words and some more, in sentences.
_SENTENCES = [
    "The capital of Germany is Berlin.", "The capital of France is Paris.", "Berlin is the capital of Germany.",
    "Rome is the capital of Italy, and Madrid is the capital of Spain.", "Vienna lies on the Danube.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "A language model reads the text and predicts the next word, layer by layer.",
    "The lens shows what each layer would predict.", "Water boils at 100 degrees Celsius.",
    "She said that the weather was fine, so they walked to the river.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1969 2024.", "Questions? Answers! Lists: apples, pears; plums.",
]


def _spm_corpus() -> list[str]:
    rng = random.Random(0)
    words = " ".join(_SENTENCES).split()
    lines = list(_SENTENCES) * 20
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)]
    return lines


# A 512-piece BPE with byte fallback (every text tokenizes). "<|endoftext|>" is there because
# llama.cpp's vocabulary loader requires it of any model whose name contains "phi3", as Phi-3's has.
_SPM_OPTIONS = dict(
    vocab_size=512, model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
    pad_id=3, control_symbols=["<|endoftext|>"], remove_extra_whitespaces=False,
)


def tokenizer_dir(kind: str) -> Path:
    """A folder with tokenizer files to copy beside a model: "bpe" (SmolLM2's) or "spm" (trained)."""
    if kind == "bpe":
        from tracing.models import bundled_gguf

        source = bundled_gguf()
        key = _digest(kind, source.name, source.stat().st_size, importlib.metadata.version("transformers"), RECIPE)
    elif kind == "spm":
        import sentencepiece

        key = _digest(kind, _spm_corpus(), _SPM_OPTIONS, sentencepiece.__version__, RECIPE)
    else:
        raise ValueError(kind)
    target = CACHE / "tokenizers" / f"{kind}-{key}"
    if target.is_dir():
        return target
    with _LOCK:
        if target.is_dir():
            return target
        tmp = _temp_dir(target)
        try:
            _build_bpe(tmp) if kind == "bpe" else _build_spm(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _publish_dir(tmp, target)


def _build_bpe(folder: Path) -> None:
    from transformers import AutoTokenizer

    from tracing.models import bundled_gguf

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(folder))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    (folder / "ids.json").write_text(json.dumps(ids))


def _build_spm(folder: Path) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_spm_corpus()), model_writer=model, num_threads=1, minloglevel=2, **_SPM_OPTIONS
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "vocab_size": _SPM_OPTIONS["vocab_size"]}
    (folder / "ids.json").write_text(json.dumps(ids))


# ---------------------------------------------------------------- models


def _randomize(model: torch.nn.Module, seed: int, init: dict) -> None:
    """Every parameter redrawn from N(mean, std), the norms' weights included.

    Matrices: std 1/sqrt(last dim), so each block adds about as much to the residual as the
    embeddings hold; embeddings and the unembedding: std 1, so logits spread over ~8 and the
    top-1 of a cell stands clear of the second. Norm weights: 1 + N(0, 0.5) (Gemma's stored offset
    w in (1 + w) likewise), so a lens that drops the final norm's weight, or applies it twice, is
    wrong somewhere. Biases: N(0, 0.2). `init` scales any of these by parameter-name substring.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                mean, std = (0.0, 0.2) if name.endswith("bias") else (1.0, 0.5)
            elif "embed" in name or "lm_head" in name or name.endswith("wte.weight"):
                mean, std = 0.0, 1.0
            else:
                mean, std = 0.0, param.shape[-1] ** -0.5
            for part, factor in init.items():
                if part in name:
                    std *= factor
            param.copy_(mean + std * torch.randn(param.shape, generator=generator))


def _spec_key(name: str) -> str:
    spec = ARCHITECTURES[name]
    tokenizer = tokenizer_dir(spec.tokenizer)
    return _digest(name, spec.model_type, spec.config, spec.tokenizer, tokenizer.name, spec.seed, spec.init, RECIPE)


def model_dir(name: str) -> Path:
    """The Hugging Face folder of architecture `name` (config, safetensors, tokenizer files), built once."""
    spec = ARCHITECTURES[name]
    target = CACHE / "models" / f"{name}-{_spec_key(name)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer_dir(spec.tokenizer)
    ids = json.loads((tokenizer / "ids.json").read_text())
    overrides = dict(ids, **spec.config)
    config = AutoConfig.for_model(spec.model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, spec.seed, spec.init)
    with _LOCK:
        if (target / "config.json").is_file():
            return target
        tmp = _temp_dir(target)
        try:
            model.save_pretrained(str(tmp))
            for item in tokenizer.iterdir():
                if item.name != "ids.json":
                    shutil.copy(item, tmp / item.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(target, f"{name}-")
        return _publish_dir(tmp, target)


def gguf_path(name: str, outtype: str) -> Path:
    """Where the GGUF of `name` in `outtype` lives (whether built yet or not)."""
    spec = ARCHITECTURES[name]
    key = _digest(llama_cpp_version(), _spec_key(name), spec.seed, outtype, RECIPE)
    return CACHE / "gguf" / f"{name}-{outtype}-{key}.gguf"


def converted(name: str, outtype: str = "f32") -> Path:
    """The GGUF llama.cpp's converter makes of architecture `name` (built on first use)."""
    return convert_all([name], [outtype], workers=1)[name, outtype]


def convert_all(names=None, outtypes=OUTTYPES, workers: int = 2) -> dict[tuple[str, str], Path]:
    """The GGUF of every (name, outtype); the missing ones converted by `workers` subprocesses."""
    names = list(names or ARCHITECTURES)
    if any(outtype not in OUTTYPES for outtype in outtypes):
        raise ValueError(f"outtypes must be among {OUTTYPES}")
    paths = {(name, outtype): gguf_path(name, outtype) for name in names for outtype in outtypes}
    missing = [(model_dir(name), path, outtype) for (name, outtype), path in paths.items() if not path.is_file()]
    if missing:
        (CACHE / "gguf").mkdir(parents=True, exist_ok=True)
        shares = [missing[i::workers] for i in range(workers) if missing[i::workers]]
        with ThreadPoolExecutor(max_workers=len(shares)) as pool:
            list(pool.map(convert, shares))
    return paths


def hf_model(name: str) -> torch.nn.Module:
    """The float32 eval-mode transformers model of `name`, the very weights that were converted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# ---------------------------------------------------------------- the reference lens


def _blocks(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute) of the model's list of decoder blocks."""
    n = model.config.get_text_config().num_hidden_layers
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                return parent, attr
    raise ValueError(f"no list of {n} blocks in {type(model).__name__}")


@torch.no_grad()
def reference_lens(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [n_blocks + 1, T, vocab]: row k is the output of the model cut after its first k blocks.

    The model's own forward runs with only blocks 0..k-1 in its block list, so row k passes the
    residual after block k through the model's own final norm, unembedding and logit post-processing
    (Gemma 2's soft-cap, Granite's logits_scaling, ...): what a logit lens on block k must give,
    computed without any lens code. Row 0 is the embeddings (Gemma's scaled ones), row n the model.
    """
    parent, attr = _blocks(model)
    blocks = getattr(parent, attr)
    input_ids = torch.tensor([list(ids)])
    rows = []
    try:
        for k in range(len(blocks) + 1):
            setattr(parent, attr, torch.nn.ModuleList(list(blocks)[:k]))
            rows.append(model(input_ids=input_ids, use_cache=False).logits[0].float())
    finally:
        setattr(parent, attr, blocks)
    return torch.stack(rows)


__all__ = [
    "ARCHITECTURES", "OUTTYPES", "Spec", "converted", "convert_all", "gguf_path", "hf_model", "model_dir",
    "reference_lens", "tokenizer_dir", "converter_dir", "llama_cpp_version",
]
