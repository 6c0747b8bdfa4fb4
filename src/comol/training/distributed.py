"""Guards against a distributed launch that would not do what was asked (checked before training starts)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate.utils import DistributedType


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Fail if ``accelerate launch`` was asked for FSDP or DeepSpeed but accelerate set up something else.

    ``accelerate launch`` with an FSDP or DeepSpeed config sets ``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED``; accelerate only honours them on accelerator devices. On a machine without
    CUDA it quietly falls back to plain data parallelism (``MULTI_CPU``) or to a single process (``NO``), so
    the run would train unsharded while the user believes it is sharded. Called with the ``PartialState``'s
    type before anything is loaded (which never says ``FSDP``: only a process group on devices fits) and with
    the ``Accelerator``'s once the Trainer exists (which must then say ``FSDP`` or ``DEEPSPEED``).

    Args:
        distributed_type: an ``accelerate.utils.DistributedType``.

    Raises:
        ValueError: the requested strategy is not what accelerate set up.
    """
    from accelerate.utils import DistributedType

    requested = [
        (name, kind)
        for name, kind in (("DeepSpeed", DistributedType.DEEPSPEED), ("FSDP", DistributedType.FSDP))
        if env_flag(f"ACCELERATE_USE_{name.upper()}")
    ]
    if not requested:
        return
    name, kind = requested[0]
    if distributed_type == kind:
        return
    # Before the Accelerator exists, FSDP shows as a multi-device process group (MULTI_GPU, MULTI_XPU, ...).
    if kind == DistributedType.FSDP and distributed_type not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
    ):
        return
    raise ValueError(
        f"The accelerate config asks for {name} (ACCELERATE_USE_{name.upper()}=true), but accelerate set up "
        f"{getattr(distributed_type, 'value', distributed_type)} instead, so the model would not be sharded. "
        "FSDP and DeepSpeed need CUDA devices (one process per GPU, launched with accelerate launch); "
        f"this machine has {torch.cuda.device_count()} visible CUDA device(s). On CPU use "
        "configs/accelerate/ddp.yaml (plain data parallelism over gloo) or torchrun instead."
    )


def check_fsdp2_buffers(peft_model: torch.nn.Module) -> None:
    """Fail before training if FSDP2's RAM-efficient loading would meet adapter buffers.

    With ``fsdp_cpu_ram_efficient_loading`` accelerate loads the full state dict on rank 0 and distributes it
    as sharded DTensors, which works for parameters only: an adapter's persistent buffers (FlyLoRA's frozen
    ``A`` and balancing bias) end in ``AttributeError: 'Tensor' object has no attribute 'device_mesh'`` after
    the model has been loaded everywhere. Raises a ValueError naming the launch flag that avoids it.
    """
    if not (
        env_flag("ACCELERATE_USE_FSDP")
        and os.environ.get("FSDP_VERSION") == "2"
        and env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
    ):
        return
    prefix = getattr(getattr(peft_model, "base_model", None), "prefix", None)
    buffers = [name for name, _ in peft_model.named_buffers() if prefix and prefix in name]
    if buffers:
        raise ValueError(
            f"This adapter keeps tensors as buffers ({buffers[0]}, ...), which accelerate's FSDP2 loading with "
            "fsdp_cpu_ram_efficient_loading cannot distribute. Launch with `accelerate launch --config_file "
            "configs/accelerate/fsdp.yaml --fsdp_cpu_ram_efficient_loading false ...`."
        )
