"""The one device picker (cuda, then mps on Apple Silicon, then cpu) and the one weight-dtype rule.

Weights load in float32 whenever they fit in the memory of the device they run on; half
precision only when they do not. Measured on the bundled SmolLM2: in bfloat16 the lens agrees
with float32 in only 94.2% of top-1 cells, and " Berlin" reads 0.768 instead of 0.796.
"""

from __future__ import annotations

import os

import torch

from .models import human_bytes, metal_working_set, physical_memory

# float32 weights must fit with this much to spare (activations, the lens's buffers).
FLOAT32_MARGIN = 1.1

_WHERE = {
    "cpu": "this machine's memory",
    "cuda": "the GPU's free memory",
    "mps": "the memory macOS lets the GPU use",
}


def pick_device(requested: str | None = None) -> torch.device:
    """Return the device to run on: `requested` if given (or $LENSBENCH_DEVICE), else the best available."""
    requested = requested or os.environ.get("LENSBENCH_DEVICE")
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def half_dtype(device: torch.device) -> torch.dtype:
    """The half-precision weight dtype for `device`, used only when float32 does not fit.

    bfloat16: unlike float16, no overflow in Gemma's activations. mps before macOS 14 lacks
    bfloat16, so float16 there. The lens math itself always runs in float32.
    """
    if device.type == "mps":
        try:
            return torch.bfloat16 if torch.backends.mps.is_macos_or_newer(14, 0) else torch.float16
        except RuntimeError:  # asked off a Mac
            return torch.float16
    return torch.bfloat16


def device_memory(device: torch.device) -> int:
    """Bytes the weights may take on `device`.

    cpu: the machine's physical memory (`tracing.models.physical_memory`; above it a load is
    refused). cuda: the GPU's free memory (`torch.cuda.mem_get_info`). mps: what macOS lets the
    GPU use, Metal's recommended working set ($LENSBENCH_METAL_WORKING_SET, else
    `torch.mps.recommended_max_memory()`), at most the physical memory.
    """
    physical = physical_memory()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        metal = None
        if not os.environ.get("LENSBENCH_METAL_WORKING_SET", "").strip():
            try:
                metal = int(torch.mps.recommended_max_memory())
            except Exception:  # older torch, or asked off a Mac
                metal = None
        metal = metal or metal_working_set()
        return min(metal or physical, physical)
    return physical


def choose_dtype(
    device_type: str, float32_bytes: int, memory_bytes: int, *, half: torch.dtype = torch.bfloat16
) -> tuple[torch.dtype, str]:
    """The weight dtype for a model, and why, from figures alone (no device is touched).

    device_type: "cpu", "cuda" or "mps". float32_bytes: the weights in float32 (4 bytes a
    parameter). memory_bytes: what the weights may take there (`device_memory`).
    float32 when float32_bytes * FLOAT32_MARGIN fits in memory_bytes; else `half`, with a reason
    a person can read (it names both sizes).
    """
    where = _WHERE.get(device_type, f"the memory of {device_type}")
    needed = float32_bytes * FLOAT32_MARGIN
    if needed <= memory_bytes:
        return torch.float32, f"float32: its weights ({human_bytes(float32_bytes)}) fit in {where} ({human_bytes(memory_bytes)})"
    name = str(half).removeprefix("torch.")
    return half, (
        f"{name}, not float32: its float32 weights ({human_bytes(float32_bytes)}, plus 10%) do not fit in "
        f"{where} ({human_bytes(memory_bytes)}); half precision is less exact (on the bundled model only "
        "94% of the lens's top-1 tokens agree with float32)"
    )


def pick_dtype(
    device: torch.device, float32_bytes: int, requested: torch.dtype | None = None
) -> tuple[torch.dtype, str]:
    """The weight dtype to load a model of `float32_bytes` (bytes in float32) on `device`, and why.

    An explicitly `requested` dtype always wins; otherwise `choose_dtype` on this device's memory.
    """
    if requested is not None:
        return requested, f"{str(requested).removeprefix('torch.')}: requested"
    return choose_dtype(device.type, float32_bytes, device_memory(device), half=half_dtype(device))
