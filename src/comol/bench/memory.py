"""Memory measurements that do not depend on timing noise.

``saved_tensor_bytes`` counts what autograd keeps for backward, through
``torch.autograd.graph.saved_tensors_hooks``: the sum of the sizes of the distinct storages saved by the
graph built inside the context, leaving out the ones given in ``exclude`` (parameters and frozen weights,
which exist whether or not a step is taken). It is deterministic and works on every device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class SavedTensors:
    """Result of :func:`saved_tensor_bytes`; ``bytes`` is filled when the context exits."""

    bytes: int = 0
    count: int = 0
    _storages: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


@contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Measure the memory autograd saves for backward inside the ``with`` block.

    Args:
        exclude: tensors whose storages are not counted (typically ``module.parameters()``).

    Yields:
        A :class:`SavedTensors` whose ``bytes`` (unique storages) and ``count`` (saved tensors, duplicates
        included) are final once the block exits.

    Example:
        >>> lin = torch.nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> with saved_tensor_bytes(exclude=lin.parameters()) as saved:
        ...     y = lin(x)
        >>> saved.bytes  # x is saved to compute the weight's gradient: 3 * 4 float32
        48
    """
    excluded = {_storage_key(t) for t in exclude}
    result = SavedTensors()

    def pack(t: torch.Tensor) -> torch.Tensor:
        result.count += 1
        key = _storage_key(t)
        if key not in excluded and t.device.type != "meta":
            result._storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result.bytes = sum(result._storages.values())


def peak_device_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset, None elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_device_memory(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter (no-op on other devices)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
