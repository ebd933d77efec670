"""The memory verdict (fits / warning / refuse), its override, Metal's limit on Apple Silicon, the
weight-dtype rule, and how the app shows them. Machines are simulated with environment variables."""

from __future__ import annotations

import warnings

import pytest
import torch

from tracing.device import FLOAT32_MARGIN, choose_dtype, device_memory, pick_dtype
from tracing.errors import NotEnoughMemory
from tracing.models import (
    MemoryWarning,
    check_fits,
    default_metal_working_set,
    ignoring_memory_check,
    memory_notices,
    memory_verdict,
    metal_working_set,
)

GB = 2**30


@pytest.fixture
def machine(monkeypatch):
    """`machine(free, total, metal=None)`: pretend to have `total` RAM, `free` of it available, and
    (on a simulated Apple Silicon Mac) `metal` bytes the GPU may use."""

    def pretend(free: str, total: str, metal: str | None = None) -> None:
        monkeypatch.setenv("LENSBENCH_MEMORY_LIMIT", free)
        monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", total)
        if metal:
            monkeypatch.setenv("LENSBENCH_METAL_WORKING_SET", metal)
        else:
            monkeypatch.delenv("LENSBENCH_METAL_WORKING_SET", raising=False)
            monkeypatch.setattr("tracing.models.apple_silicon", lambda: False)

    return pretend


# ---------------------------------------------------------------- the verdict


def test_the_three_verdicts_on_a_64gb_machine_with_30gb_free(machine):
    machine("30GB", "64GB")
    fits = memory_verdict(20 * GB, "'small.gguf'")
    assert fits.status == "fits" and fits.fits and not fits.warning and not fits.refuse
    assert (fits.available, fits.physical, fits.gpu_limit) == (30 * GB, 64 * GB, None)

    tight = memory_verdict(40 * GB, "'scout.gguf'")
    assert tight.warning and tight.needed == 40 * GB
    assert tight.message.startswith("'scout.gguf' needs about 40.0 GB of memory: only 30.0 GB of this machine's 64.0 GB")
    assert "loads more slowly" in tight.message and "\n" not in tight.message

    too_big = memory_verdict(70 * GB, "'huge.gguf'", hint="Pick a smaller quantization or a smaller model.")
    assert too_big.refuse
    assert "needs about 70.0 GB of memory, more than this machine's 64.0 GB. Pick a smaller" in too_big.message
    assert "--ignore-memory-check" in too_big.message and "Skip the memory check" in too_big.message
    assert "\n" not in too_big.message
    assert [v.short().split(":")[0] for v in (fits, tight, too_big)] == ["Fits", "Tight", "Does not fit"]


def test_physical_memory_is_at_least_what_is_said_to_be_free(machine):
    machine("1TB", "64GB")  # LENSBENCH_MEMORY_LIMIT alone still pretends to a bigger machine
    assert memory_verdict(100 * GB, "x").fits


def test_check_fits_refuses_warns_and_the_override_skips_the_refusal(machine):
    machine("30GB", "64GB")
    with pytest.raises(NotEnoughMemory, match="more than this machine's 64.0 GB"):
        check_fits(70 * GB, "'huge.gguf'")

    with pytest.warns(MemoryWarning, match="only 30.0 GB of this machine's 64.0 GB is free now"):
        assert check_fits(40 * GB, "'scout.gguf'").warning

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fit warns about nothing
        assert check_fits(20 * GB, "'small.gguf'").fits

    with pytest.warns(MemoryWarning, match="loading anyway because the memory check is off"):
        forced = check_fits(70 * GB, "'huge.gguf'", check_memory=False)
    assert forced.warning and forced.overridden and "memory check is off" in forced.short()

    with pytest.warns(MemoryWarning, match="memory check is off"), ignoring_memory_check():
        assert check_fits(70 * GB, "'huge.gguf'").overridden
    with ignoring_memory_check(False), pytest.raises(NotEnoughMemory):
        check_fits(70 * GB, "'huge.gguf'")


def test_memory_notices_collect_the_warnings_of_a_block(machine):
    machine("30GB", "64GB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with memory_notices() as notes:
            check_fits(20 * GB, "'small'")
            check_fits(40 * GB, "'tight'")
    assert [v.message.split()[0] for v in notes] == ["'tight'"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_fits(40 * GB, "'outside'")  # no block: nothing collected, nothing fails
    assert len(notes) == 1


# ---------------------------------------------------------------- Metal (Apple Silicon)


def test_metals_default_working_set_is_two_thirds_up_to_36gb_then_three_quarters():
    # What llama.cpp logs as recommendedMaxWorkingSetSize on 16, 32, 64 and 96 GB Macs (MiB).
    for ram_gb, mib in ((16, 10922.67), (32, 21845.34), (64, 49152.0), (96, 73728.0)):
        assert default_metal_working_set(ram_gb * GB) / 2**20 == pytest.approx(mib, abs=0.01)


def test_metal_working_set_comes_from_the_sysctl_setting_or_the_default(monkeypatch):
    monkeypatch.delenv("LENSBENCH_METAL_WORKING_SET", raising=False)
    monkeypatch.setenv("LENSBENCH_PHYSICAL_MEMORY", "64GB")
    monkeypatch.setattr("tracing.models.apple_silicon", lambda: False)
    assert metal_working_set() is None  # not a Mac: no GPU limit of that kind
    monkeypatch.setattr("tracing.models.apple_silicon", lambda: True)
    monkeypatch.setattr("tracing.models._sysctl_wired_limit_mb", lambda: 0)
    assert metal_working_set() == 48 * GB
    monkeypatch.setattr("tracing.models._sysctl_wired_limit_mb", lambda: 57344)  # sudo sysctl iogpu.wired_limit_mb=57344
    assert metal_working_set() == 56 * GB
    monkeypatch.setenv("LENSBENCH_METAL_WORKING_SET", "40GB")
    assert metal_working_set() == 40 * GB


def test_on_a_simulated_m2_max_a_model_over_metals_limit_warns_with_the_setting_to_raise_it(machine):
    machine("60GB", "64GB", metal="48GB")
    gpu = memory_verdict(50 * GB, "'scout.gguf'", metal=True)
    assert gpu.warning and gpu.gpu_limit == 48 * GB
    assert "more than the 48.0 GB macOS lets the GPU use" in gpu.message
    assert "sudo sysctl iogpu.wired_limit_mb=52224" in gpu.message  # the model plus 1 GB
    assert "smaller quantization" in gpu.message and "\n" not in gpu.message
    assert memory_verdict(50 * GB, "'scout.gguf'").fits  # on the CPU alone, Metal's limit does not apply
    assert memory_verdict(40 * GB, "'scout.gguf'", metal=True).fits

    machine("30GB", "64GB", metal="48GB")  # both: little free and over the GPU's limit, one line
    both = memory_verdict(62 * GB, "'scout.gguf'", metal=True)
    assert both.warning and "is free now" in both.message and "iogpu.wired_limit_mb=61440" in both.message  # 4 GB left to macOS
    assert "\n" not in both.message


# ---------------------------------------------------------------- the weight dtype


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_float32_whenever_it_fits_half_precision_only_when_it_does_not(device):
    weights = 32 * GB  # an 8B model in float32
    dtype, reason = choose_dtype(device, weights, 64 * GB)
    assert dtype == torch.float32 and reason.startswith("float32: its weights (32.0 GB) fit in")
    dtype, reason = choose_dtype(device, weights, int(weights * FLOAT32_MARGIN) + 1)  # just enough
    assert dtype == torch.float32

    dtype, reason = choose_dtype(device, weights, 24 * GB, half=torch.float16 if device == "mps" else torch.bfloat16)
    assert dtype == (torch.float16 if device == "mps" else torch.bfloat16)
    assert "not float32: its float32 weights (32.0 GB, plus 10%) do not fit in" in reason and "24.0 GB" in reason
    where = {"cpu": "this machine's memory", "cuda": "the GPU's free memory", "mps": "the memory macOS lets the GPU use"}
    assert where[device] in reason and "less exact" in reason


def test_an_explicit_dtype_always_wins(machine):
    machine("1GB", "1GB")
    assert pick_dtype(torch.device("cpu"), 32 * GB, torch.float32) == (torch.float32, "float32: requested")
    assert pick_dtype(torch.device("cpu"), 1, torch.bfloat16)[0] == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), 32 * GB)[0] == torch.bfloat16


def test_the_memory_each_device_offers(machine):
    machine("30GB", "64GB", metal="48GB")
    assert device_memory(torch.device("cpu")) == 64 * GB  # physical: above it a load is refused
    assert device_memory(torch.device("mps")) == 48 * GB  # what Metal lets the GPU use
    if torch.cuda.is_available():
        assert device_memory(torch.device("cuda")) == torch.cuda.mem_get_info()[0]


# ---------------------------------------------------------------- the app


def test_the_app_shows_the_dtype_and_memory_warnings_and_has_the_override(machine):
    from tracing.models import DEFAULT_MODEL_NAME
    from ui.app import LensApp, Settings, build_app

    app = LensApp(Settings())
    out = app.lens_tab.lens("The capital of Germany is", DEFAULT_MODEL_NAME, "hooks", 3, 1.0, "␣Berlin", "entropy")
    summary = out[5]
    assert "Weights in float32" in summary, summary

    machine("50MB", "64GB")  # the bundled model no longer fits in what is free: both verdicts warn
    facts = app.catalog.facts(DEFAULT_MODEL_NAME)
    assert "llama.cpp: Tight" in facts and "PyTorch (float32 on" in facts
    assert facts.count("⚠️") == 2 and "is free now" in facts

    machine("50MB", "50MB")  # bigger than the whole machine: the one picker's facts say it won't load
    shared_facts = app.model_facts(DEFAULT_MODEL_NAME)
    assert "Does not fit" in shared_facts and "--ignore-memory-check" in shared_facts, shared_facts

    blocks, _ = build_app(Settings())
    boxes = [c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "ignore-memory"]
    assert len(boxes) == 1 and boxes[0].visible and boxes[0].value is False
    public, _ = build_app(Settings.for_launch(public=True))
    assert not [c for c in public.blocks.values() if getattr(c, "elem_id", None) == "ignore-memory"][0].visible
    assert LensApp(Settings.for_launch(public=True)).memory_check_off(True) is False
