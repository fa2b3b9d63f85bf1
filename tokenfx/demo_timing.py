"""The demo's timing: several callables timed in turns, median latency of each.

``tokenfx demo`` times Hugging Face against tokenfx on a machine that may be busy with other
work; timing the candidates in turns (one call each, round after round) spreads any background
load over all of them alike, so their ratio holds even when the absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median wall milliseconds per call of each callable, after one warm-up call each;
    ``repeats`` rounds, each calling every callable once in order."""
    for fn in fns.values():
        fn()  # warm-up: first-call caches and lazy compilation stay out of the timings
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
