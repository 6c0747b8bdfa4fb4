#!/usr/bin/env bash
# The comol sweep study: every configuration the paper compares (+ SMEAR) on SmolLM2-135M-Instruct with the
# demo's generated arithmetic, equal training budget, two seeds, on CPU. Resumable: re-run to complete it.
#   bash benchmarks/sweep_study.sh [OUT_DIR]   (default benchmarks/results/sweep_study)
# Budget (sized for a shared 2-core CPU, ~1 minute per run): STEPS optimiser steps of 8 sequences
# (max_length 128), lr 2e-3 constant after 2 warm-up steps; N_TEST held-out problems, greedy, 40 new tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/sweep_study}
STEPS=${STEPS:-24}
N_TEST=${N_TEST:-50}
SEEDS=${SEEDS:-"0 125"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/data"
read -r MODEL GGUF < <(python - "$OUT/data" "$N_TEST" <<'PY'
import json, sys
from pathlib import Path
from comol.data.arithmetic import train_test_split
from comol.loading import locate_smollm2
out, n_test = Path(sys.argv[1]), int(sys.argv[2])
train, test = train_test_split(2000, n_test, seed=0)
(out / "train.json").write_text(json.dumps(train))
(out / "test.json").write_text(json.dumps(test))
directory, gguf = locate_smollm2()
print(directory, gguf)
PY
)
C=benchmarks/sweep_configs
python -m comol sweep \
  $C/lora.yaml $C/molora.yaml $C/hydralora.yaml $C/mola.yaml $C/adamole.yaml $C/sparsemoa.yaml \
  $C/flylora.yaml $C/denselora.yaml $C/comol-wo-cr.yaml $C/comol.yaml $C/smear.yaml \
  "model.name_or_path=$MODEL" "model.gguf_file=$GGUF" model.dtype=fp32 \
  "data.train=$OUT/data/train.json" data.max_length=128 data.val_size=0 \
  "train.max_steps=$STEPS" train.micro_batch_size=8 train.gradient_accumulation_steps=1 \
  train.optim=adamw_torch train.learning_rate=2e-3 train.lr_scheduler=constant_with_warmup train.warmup_steps=2 \
  train.logging_steps=4 "train.save_steps=$STEPS" train.save_total_limit=1 "train.report_to=[]" \
  train.disable_tqdm=true \
  --seeds $SEEDS --base --eval math --data "arith=$OUT/data/test.json" \
  --max-new-tokens 40 --batch-size 25 --compare paper --out "$OUT"
