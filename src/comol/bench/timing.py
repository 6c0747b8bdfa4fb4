"""Wall-clock timing robust to a shared, noisy machine.

Every case of a comparison group is run once per round, round after round (interleaved), so that a burst
of load from another process hits all cases alike; the reported figure is the median over rounds and
ratios are always taken between cases of the same group.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Args:
        cases: name -> callable doing one unit of work (e.g. a forward+backward step).
        device: where the work runs (for synchronisation).
        repeats: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> ``{"median_s", "min_s", "max_s"}``.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
        for name, s in samples.items()
    }
