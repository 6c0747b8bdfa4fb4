"""Fine-tuning with any comol method on ``transformers.Trainer``: configs, data, trainer, entry point.

- :mod:`~comol.training.config`: :class:`TrainConfig` (YAML + ``key=value`` overrides).
- :mod:`~comol.training.data`: LLM-Adapters records -> tokenised examples with response-only loss.
- :mod:`~comol.training.trainer`: :class:`ComolTrainer` (aux losses, router logging, atomic checkpoints).
- :mod:`~comol.training.run`: :func:`train`, the function behind ``comol train`` (orchestration only).
- :mod:`~comol.training.adapter`: target modules checked against the model, the adapter attached.
- :mod:`~comol.training.arguments`: the ``train:`` section as ``TrainingArguments``; the Trainer built.
- :mod:`~comol.training.distributed`: guards against a launch that would not shard as asked.
- :mod:`~comol.training.rundir`: the run directory (resume checkpoint, atomic writes, adapter, run info).

The offline demo built on it is :mod:`comol.demo`; models are loaded by :mod:`comol.loading`.
"""

from comol.training.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
