"""``comol sweep``: two methods x two seeds on a tiny model: the table, resuming, a failed run, the paper."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from comol.cli import main
from comol.data.arithmetic import generate
from comol.sweep import execute, orchestrate
from comol.sweep.paper import PAPER_TABLES
from comol.sweep.plan import EvalSpec, plan_runs
from comol.sweep.results import aggregate
from training.tiny import make_char_tokenizer, make_tiny_model

# The paper's text lives in the shared/ folder beside the repository (as laid out for development and CI).
PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "comol-arxiv-2603.00573.txt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    model_dir = root / "model"
    tokenizer = make_char_tokenizer()
    tokenizer.save_pretrained(model_dir)
    make_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    (root / "train.json").write_text(json.dumps(generate(32, seed=1)))
    (root / "test.json").write_text(json.dumps(generate(4, seed=2)))
    common = (
        f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {root / 'train.json'}\n"
        "  max_length: 320\ntrain:\n  max_steps: 2\n  micro_batch_size: 4\n  gradient_accumulation_steps: 1\n"
        "  learning_rate: 0.01\n  save_steps: 2\n  report_to: []\n  disable_tqdm: true\n"
    )
    (root / "lora.yaml").write_text(common + "adapter:\n  method: lora\n  r: 4\n")
    (root / "molora.yaml").write_text(
        common + "adapter:\n  method: molora\n  r: 2\n  options:\n    num_experts: 2\n"
    )
    return {
        "root": root,
        "lora": root / "lora.yaml",
        "molora": root / "molora.yaml",
        "test": root / "test.json",
    }


def _argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "sweep", str(setup["lora"]), str(setup["molora"]), "--seeds", "0", "1", "--eval", "math",
        "--data", f"arith={setup['test']}", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out), *extra,
    ]  # fmt: skip


def test_sweep_table_resume_and_failed_run(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    real_train = execute._train
    calls: list[str] = []
    fail = {"molora/seed1"}

    def train(spec, launcher, accelerate_config):
        calls.append(spec.run_id)
        if spec.run_id in fail:
            raise RuntimeError("made to fail")
        return real_train(spec, launcher, accelerate_config)

    monkeypatch.setattr(execute, "_train", train)
    assert main(_argv(setup, out, "--compare", "paper")) == 1  # one run failed
    assert calls == ["lora/seed0", "lora/seed1", "molora/seed0", "molora/seed1"]
    data = json.loads((out / "results.json").read_text())
    status = {r["run_id"]: r["status"] for r in data["runs"]}
    assert status == {"lora/seed0": "ok", "lora/seed1": "ok", "molora/seed0": "ok", "molora/seed1": "failed"}
    assert "made to fail" in data["aggregate"]["molora"]["failed"][0]["error"]
    lora = data["aggregate"]["lora"]
    assert lora["seeds"] == [0, 1] and lora["metrics"]["arith"]["n"] == 2 and lora["params"] > 0
    assert data["aggregate"]["molora"]["router_entropy"]["mean"] <= 1.0
    md = (out / "results.md").read_text()
    assert re.search(r"^\| lora \| \d+\.\d\d ± \d+\.\d\d \|", md, re.MULTILINE)
    assert re.search(r"^\| molora \| \d+\.\d\d ± \d+\.\d\d \|.*1 \(1 failed\) \|$", md, re.MULTILINE)
    assert "molora, seed 1: RuntimeError: made to fail" in md
    assert "| CoMoL | 94.60 ± 1.05 |" not in md and "| MoLoRA | 93.76 ± 1.30 |" in md  # paper rows of ours
    assert (out / "results.png").stat().st_size > 0

    # Re-running repeats no finished run and completes the table.
    calls.clear()
    fail.clear()
    assert main(_argv(setup, out)) == 0
    assert calls == ["molora/seed1"]
    calls.clear()
    assert main(_argv(setup, out)) == 0
    assert calls == []
    data = json.loads((out / "results.json").read_text())
    assert data["aggregate"]["molora"]["seeds"] == [0, 1] and not data["aggregate"]["molora"]["failed"]


def test_aggregate_mean_and_std() -> None:
    runs = [
        {"run_id": f"m/seed{s}", "group": "m", "label": "m", "grid": {}, "seed": s, "status": "ok",
         "metrics": {"a": a, "b": b}, "params": 10, "train_loss": 1.0, "router": None, "wall_s": 1.0}
        for s, a, b in ((0, 10.0, 30.0), (1, 20.0, 50.0))
    ]  # fmt: skip
    g = aggregate(runs)["m"]
    assert g["metrics"]["a"]["mean"] == 15.0 and g["metrics"]["a"]["std"] == pytest.approx(50**0.5)
    assert g["Average"]["mean"] == 27.5 and g["Average"]["std"] == pytest.approx(abs(20 - 35) / 2**0.5)


def test_plan_rejects_bad_input_and_expands_grid(setup: dict[str, Path], tmp_path: Path) -> None:
    ev = EvalSpec(math_data=(f"arith={setup['test']}",))
    runs = plan_runs([str(setup["lora"])], [0, 1], [], ["adapter.r=2,4"], tmp_path, ev)
    assert [r.run_id for r in runs] == [
        "lora@adapter.r=2/seed0", "lora@adapter.r=2/seed1", "lora@adapter.r=4/seed0", "lora@adapter.r=4/seed1",
    ]  # fmt: skip
    assert pickle.loads(pickle.dumps(runs[0])) == runs[0]
    assert main(_argv(setup, tmp_path / "x", "--grid", "adapter.r")) == 2
    argv = _argv(setup, tmp_path / "x")
    assert main([*argv[:3], "adapter.method=nosuch", *argv[3:]]) == 2
    assert not (tmp_path / "x").exists()  # nothing trained or written


def test_accelerate_command(setup: dict[str, Path], tmp_path: Path) -> None:
    run = plan_runs([str(setup["lora"])], [0], ["train.max_steps=1"], [], tmp_path, EvalSpec(code=True))[0]
    cmd = execute.accelerate_command(run, "acc.yaml")
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", "acc.yaml"]
    assert (
        cmd[5:9] == ["-m", "comol", "train", "--resume"]
        and cmd[-1] == f"train.output_dir={tmp_path}/runs/lora/seed0"
    )


def test_submitit_job_runs_with_debug_executor(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", lambda folder: submitit.DebugExecutor(folder=folder))
    ev = EvalSpec(math_data=(f"arith={setup['test']}",), max_new_tokens=2)
    data = orchestrate.run_sweep([str(setup["lora"])], [0], tmp_path, ev, launcher="submitit")
    assert [r["status"] for r in data["runs"]] == ["ok"], data["runs"][0].get("error")


@pytest.mark.skipif(not PAPER.is_file(), reason="paper text not available")
def test_paper_facts_match_the_paper_text() -> None:
    text = PAPER.read_text()
    for table in PAPER_TABLES.values():
        for label, (cells, param) in table.rows.items():
            name = "HydraLora" if label == "HydraLoRA" and table.name == "Table 4" else label
            wanted = [f"{m:.2f}±{s:.2f}" if s is not None else f"{m:.2f}" for m, s in cells]
            lines = [ln.replace("¯", "") for ln in text.splitlines() if ln.startswith(name + " ")]
            assert any(f"{param:.2f}M" in ln and all(w in ln for w in wanted) for ln in lines), (
                table.name,
                label,
            )


@pytest.mark.slow
def test_sweep_trains_through_accelerate_launch_with_two_processes(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--launcher accelerate``: each run is trained by ``accelerate launch`` (here 2 CPU processes, gloo),
    then loaded from its run directory and evaluated like an in-process run."""
    from training.tiny import free_port

    accelerate_config = tmp_path / "multi_cpu.yaml"
    accelerate_config.write_text(
        # configs/accelerate/ddp.yaml with 2 processes; without a GPU, torchrun starts 2 gloo CPU processes
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
        f"num_processes: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\n"
        "mixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
    )
    for key, value in {
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)
    argv = [
        "sweep", str(setup["lora"]), "--seeds", "0", "--eval", "math", "--data", f"arith={setup['test']}",
        "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path / "sweep"),
        "--launcher", "accelerate", "--accelerate-config", str(accelerate_config), "train.micro_batch_size=2",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "sweep" / "results.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == "ok", run.get("error")
    assert 0.0 <= run["metrics"]["arith"] <= 100.0 and run["params"] > 0
    run_info = json.loads((Path(run["run_dir"]) / "run_info.json").read_text())
    assert run_info["world_size"] == 2  # really trained by two processes
    assert (Path(run["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()


def test_sweep_evaluates_code_with_pass_at_k(setup: dict[str, Path], tmp_path: Path) -> None:
    """``--eval code``: HumanEval-format problems run in the sandbox; one that passes whatever the tiny model
    writes and one that never does give pass@1 = 50% exactly, in the table as a column."""
    # The completion lands inside a string literal that the test closes, so any completion passes the first
    # problem; the second problem's test always fails.
    opening, closing = "\n\n_ = '''", "'''\n\n"
    problems = [
        {"task_id": "T/0", "entry_point": "one", "prompt": "def one():\n    return 1" + opening,
         "test": closing + "def check(f):\n    assert f() == 1\n", "canonical_solution": ""},
        {"task_id": "T/1", "entry_point": "two", "prompt": "def two():\n    return 2" + opening,
         "test": closing + "def check(f):\n    assert f() == 3\n", "canonical_solution": ""},
    ]  # fmt: skip
    problems_file = tmp_path / "problems.jsonl"
    problems_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    argv = [
        "sweep", str(setup["lora"]), "--seeds", "0", "--eval", "code", "--problems", str(problems_file),
        "--max-new-tokens", "4", "--batch-size", "2", "--out", str(tmp_path / "sweep"),
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "sweep" / "results.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == "ok", run.get("error")
    assert run["metrics"] == {"pass@1": 50.0}
    assert data["aggregate"]["lora"]["metrics"]["pass@1"]["mean"] == 50.0
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "pass@1" in table.splitlines()[0] and "50.00" in table


def test_sweep_takes_overrides_after_the_options_and_rejects_unknown_ones(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(setup, tmp_path / "x", "--nosuch")) == 2
    assert "unrecognized argument(s) --nosuch" in capsys.readouterr().err
    assert main(_argv(setup, tmp_path / "x", "adapter.nosuch=1")) == 2  # an override, checked as one
    assert "adapter.nosuch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
