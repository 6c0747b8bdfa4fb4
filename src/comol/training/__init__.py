"""Fine-tuning with any comol method on ``transformers.Trainer``: configs, data, trainer, entry point.

- :mod:`~comol.training.config`: :class:`TrainConfig` (YAML + ``key=value`` overrides).
- :mod:`~comol.training.data`: LLM-Adapters records -> tokenised examples with response-only loss.
- :mod:`~comol.training.trainer`: :class:`ComolTrainer` (aux losses, router logging, atomic checkpoints).
- :mod:`~comol.training.run`: :func:`train`, the function behind ``comol train``.
- :mod:`~comol.training.generation`: greedy generation and "The answer is N" accuracy (used by the demo).
- :mod:`~comol.training.demo`: the offline demo behind ``comol demo``.
"""

from comol.training.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
