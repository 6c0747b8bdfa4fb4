"""One rank of the sharded (FSDP / DeepSpeed) tests: train on CPU, record how the adapter was sharded.

Launched by ``test_sharded.py`` through ``accelerate launch --config_file CONFIG --num_processes 2
sharded_worker.py DUMP_DIR [--resume CHECKPOINT] KEY=VALUE ...``.

accelerate only turns FSDP or DeepSpeed on for accelerator devices: on a machine without one, a process
group is either ``MULTI_CPU`` (plain DDP, the FSDP/DeepSpeed settings silently ignored) or none at all. So,
for CPU testing only, this worker makes accelerate treat CPU + gloo like a multi-device group
(:func:`treat_cpu_as_accelerator`); everything else (launcher, config file, plugins, Trainer, comol) runs
unchanged. Each rank writes ``rank{R}.pt`` with its view of the adapter parameters during training
(global shape, local shard shape, kind of sharding) and the full adapter weights at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ZERO_OVERRIDES_ENV = "COMOL_TEST_ZERO_OPTIMIZATION"
"""JSON object merged into the DeepSpeed config's ``zero_optimization`` section (test-only, see
:func:`override_zero_optimization`)."""


def treat_cpu_as_accelerator() -> None:
    """Make accelerate set up FSDP / DeepSpeed over gloo on CPU, as it does over NCCL on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(
        self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None
    ) -> tuple[str, DistributedType]:
        if int(os.environ.get("LOCAL_RANK", -1)) == -1:
            return original(self, cpu, sagemaker_dp, backend)
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = _prepare_backend
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"  # PartialState.device (else cuda:LOCAL_RANK)
    os.environ["ACCELERATE_USE_CPU"] = "false"  # keeps comol's run.py off the MULTI_CPU path


def override_zero_optimization() -> None:
    """Merge ``$COMOL_TEST_ZERO_OPTIMIZATION`` (JSON) into the ``zero_optimization`` section of the DeepSpeed
    config that accelerate builds from the shipped accelerate config file.

    The tests set ``stage3_param_persistence_threshold: 0``: DeepSpeed keeps every parameter smaller than that
    threshold (1e5 elements by default) whole on every rank, which on the tiny test model is every adapter
    parameter, so without it ZeRO-3 would never have to gather an adapter parameter on use. accelerate's
    config file has no key for it, and ``--deepspeed_config_file`` cannot be combined with a config file that
    sets ``zero_stage`` (accelerate refuses it), so the worker patches the plugin right after accelerate (or
    the ``TrainingArguments``, under ``accelerate launch``) builds it, before anything reads the config.
    """
    import json

    from accelerate.utils import DeepSpeedPlugin

    overrides = json.loads(os.environ.get(ZERO_OVERRIDES_ENV) or "{}")
    if not overrides:
        return
    original = DeepSpeedPlugin.__post_init__

    def __post_init__(self: Any) -> None:
        original(self)
        self.deepspeed_config.setdefault("zero_optimization", {}).update(overrides)

    DeepSpeedPlugin.__post_init__ = __post_init__


def describe(param: torch.Tensor) -> dict[str, Any]:
    """Global shape, this rank's local storage shape and the kind of sharding of one parameter."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return {
            "kind": "dtensor",
            "shape": tuple(param.shape),
            "local": tuple(param.to_local().shape),
            "placements": [str(p) for p in param.placements],
        }
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3 partitioned parameter
        return {
            "kind": "zero3",
            "shape": tuple(param.ds_shape),
            "local": tuple(param.ds_tensor.shape),
            "data": tuple(param.data.shape),  # empty between uses unless small enough to persist
            "persist": bool(getattr(param, "ds_persist", False)),
            "status": str(getattr(param, "ds_status", None)),  # ZeroParamStatus.NOT_AVAILABLE between uses
        }
    return {"kind": "plain", "shape": tuple(param.shape), "local": tuple(param.shape)}


class ShardingProbe(TrainerCallback):
    """Records how the model's parameters are held on this rank.

    - ``loaded``: right after ``Trainer.__init__`` (before ``accelerator.prepare`` / ``deepspeed.initialize``),
      how the base model's parameters are held: ZeRO-3 partitioned only if the model was loaded under
      ``deepspeed.zero.Init`` (``zero3_init_flag``);
    - ``params``: at the end of the first optimiser step (outside any forward), every trainable parameter.
    """

    def __init__(self) -> None:
        self.params: dict[str, dict[str, Any]] = {}
        self.loaded: dict[str, dict[str, Any]] = {}
        self.zero2: dict[str, int] | None = None
        self.model_class = ""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.loaded = {name: describe(p) for name, p in model.named_parameters() if not p.requires_grad}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.params:
            return
        model = kwargs["model"]
        self.model_class = type(model).__name__
        for name, param in model.named_parameters():
            if param.requires_grad:  # the adapter's trainable tensors, whatever the method calls them
                self.params[name] = describe(param)
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        groups = getattr(inner, "single_partition_of_fp32_groups", None)  # ZeRO-1/2 optimiser partition
        if groups is not None:
            self.zero2 = {
                "partition": sum(g.numel() for g in groups),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter on every rank (collective under FSDP2 / ZeRO-3), keyed as peft saves it."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            state = get_peft_model_state_dict(model)
            return {k: v.detach().cpu().clone() for k, v in state.items()}
    state = get_peft_model_state_dict(model)
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in state.items()
    }


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    treat_cpu_as_accelerator()
    override_zero_optimization()
    from comol.training.config import load_config
    from comol.training.run import train

    dump_dir, rest = Path(argv[0]), argv[1:]
    resume: bool | str = False
    if rest and rest[0] == "--resume":
        resume, rest = rest[1], rest[2:]
    probe = ShardingProbe()
    result = train(load_config(None, rest), resume=resume, callbacks=[probe])
    from accelerate.state import AcceleratorState

    accelerate_state = AcceleratorState()
    rank = torch.distributed.get_rank()
    torch.save(
        {
            "world_size": torch.distributed.get_world_size(),
            "distributed_type": str(accelerate_state.distributed_type),
            "model_class": probe.model_class,
            "params": probe.params,
            "loaded": probe.loaded,
            "zero2": probe.zero2,
            "state": full_adapter_state(result.model),
        },
        dump_dir / f"rank{rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker thread may still be releasing a finished collective
    # (whose thread-local state holds a Python object) while Python shuts down; taking the GIL then ends
    # that thread inside a noexcept destructor and std::terminate aborts the process (SIGABRT, about one
    # exit in six under FSDP2 on gloo, reproduced without comol). Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
