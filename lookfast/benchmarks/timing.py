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


def paired_ratio(first: Callable[[], Any], second: Callable[[], Any], pairs: int) -> float:
    """Median over `pairs` alternating calls of (time of second) / (time of first). On a noisy machine two medians
    taken seconds apart can move by 1.5x or more; calls alternating one by one see the same machine state, so this
    ratio is the steadier figure for a bar set on the ratio of two implementations."""
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return statistics.median(ratios)
