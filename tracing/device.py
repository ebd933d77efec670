"""The one device picker: cuda, then mps (Apple Silicon), then cpu."""

from __future__ import annotations

import os

import torch


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


def default_dtype(device: torch.device) -> torch.dtype:
    """A weight dtype that works on `device`.

    cpu: float32 (exact, and the fastest there). cuda and mps: bfloat16, half the memory and,
    unlike float16, no overflow in Gemma's activations; mps before macOS 14 lacks bfloat16, so float16.
    The lens math itself always runs in float32.
    """
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        try:
            return torch.bfloat16 if torch.backends.mps.is_macos_or_newer(14, 0) else torch.float16
        except RuntimeError:  # asked off a Mac
            return torch.float16
    return torch.float32
