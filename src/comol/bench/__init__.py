"""Benchmarks of comol's adapters against the base layer, peft LoRA and the other mixture methods.

- :mod:`~comol.bench.memory`: memory kept for backward (device independent) and peak device memory.
- :mod:`~comol.bench.timing`: interleaved repeats, medians.
- :mod:`~comol.bench.config`: what to measure (:class:`~comol.bench.config.BenchConfig`), the environment.
- :mod:`~comol.bench.variants`: the compared variants (method, options, implementation).
- :mod:`~comol.bench.kernel_level`, :mod:`~comol.bench.layer_level`, :mod:`~comol.bench.model_level`: the suites.
- :mod:`~comol.bench.suite`: the entry point behind ``comol bench``.
- :mod:`~comol.bench.report`: JSON, Markdown and plots written into ``BENCHMARKS.md``.
"""
