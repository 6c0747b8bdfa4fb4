"""The offline demo behind ``comol demo``: CoMoL on SmolLM2-135M-Instruct and generated arithmetic.

- :mod:`~comol.demo.run`: :func:`run_demo`, base vs tuned held-out accuracy through :func:`comol.training.run.train`.
- :mod:`~comol.demo.generation`: greedy batched generation stopped at "The answer is N", and its accuracy.
"""

from comol.demo.run import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
