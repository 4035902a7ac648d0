"""Wall-clock timing: warm up, then repeat until a time budget is spent, and report the median."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def measure(fn: Callable[[], Any], min_seconds: float, min_rounds: int = 3, max_rounds: int = 1000) -> dict[str, float]:
    """Time `fn()` after one warm-up call (which also triggers compilation). Returns seconds: median, min, max, mean."""
    fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_rounds or (spent < min_seconds and len(samples) < max_rounds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "stddev": statistics.pstdev(samples),
        "rounds": len(samples),
    }
