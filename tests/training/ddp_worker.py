"""One rank of the 2-process DDP test: train, then dump this rank's in-memory adapter weights.

Launched by ``test_ddp.py`` as ``python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py DUMP_DIR
KEY=VALUE ...`` on CPU (gloo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

from comol.training.config import load_config
from comol.training.run import train


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    dump_dir, overrides = Path(argv[0]), argv[1:]
    result = train(load_config(None, overrides))
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(result.model).items()}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else 1
    torch.save({"state": state, "world_size": world_size}, dump_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
