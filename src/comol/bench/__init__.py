"""Benchmarks of comol's adapters against the base layer, peft LoRA and the other mixture methods.

- :mod:`~comol.bench.memory`: memory kept for backward (device independent) and peak device memory.
- :mod:`~comol.bench.timing`: interleaved repeats, medians.
- :mod:`~comol.bench.suite`: the layer- and model-level suites behind ``comol bench``.
- :mod:`~comol.bench.report`: JSON, Markdown and plots written into ``BENCHMARKS.md``.
"""
