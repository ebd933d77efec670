"""Measuring helpers shared by the benchmarks (and the llama.cpp memory test)."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time


def interleaved_medians_ms(fns: dict, repeats: int) -> dict:
    """Median time of each function, run round-robin so load from other processes hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def resident(path: str) -> int:
    """Bytes resident for this process (Linux): the pages of the file at `path` once (llama.cpp
    and the lens map the same GGUF), everything else by its proportional share; after gc and
    malloc_trim, so it counts live memory, not what malloc keeps for later."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    gguf = other = 0
    in_gguf = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                in_gguf = len(fields) >= 6 and fields[-1] == path
            elif fields[:1] == ["Rss:"] and in_gguf:
                gguf += int(fields[1]) * 1024
            elif fields[:1] == ["Pss:"] and not in_gguf:
                other += int(fields[1]) * 1024
    return min(gguf, os.path.getsize(path)) + other
