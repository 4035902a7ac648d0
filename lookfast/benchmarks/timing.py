"""Wall-clock timing: warm up, then repeat until a time budget is spent, and report the median."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def measure(fn: Callable[[], Any], min_seconds: float, min_rounds: int = 3, max_rounds: int = 1000,
            warmup_seconds: float = 0.1, warmup: bool = True) -> dict[str, Any]:
    """Time `fn()` after warming up (unless `warmup` is False: at least two calls and `warmup_seconds`, at most 10
    calls: compilation, thread pools, allocator and page-cache state settle in a fresh process).
    Returns seconds: median, min, max, mean, stddev, the number of rounds and the samples themselves."""
    warm_start, warm_calls = time.perf_counter(), 0
    while warmup and (warm_calls < 2 or (time.perf_counter() - warm_start < warmup_seconds and warm_calls < 10)):
        fn()
        warm_calls += 1
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_rounds or (spent < min_seconds and len(samples) < max_rounds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return summarize_samples(samples)


def summarize_samples(samples: list[float]) -> dict[str, Any]:
    """Median, min, max, mean, stddev and count of timing samples (seconds)."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "stddev": statistics.pstdev(samples),
        "rounds": len(samples),
        "samples": list(samples),
    }
