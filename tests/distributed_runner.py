"""Run several trainings, one after another, inside one ``torchrun`` launch.

    torchrun --nproc_per_node 2 tests/distributed_runner.py RUNS.json

RUNS.json is a list of command lines (each a list of train.py arguments). Starting processes
and importing torch costs more than a tiny training run, so the distributed tests pay for it
once per launch. Each run is ``train.train`` exactly as ``python train.py`` runs it, minus the
samples printed at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import train


def main(runs_file: str) -> None:
    torch.set_num_threads(1)  # two processes share the test machine's cores
    runs = json.loads(Path(runs_file).read_text())
    try:
        for argv in runs:
            train.train(train.config_from_args(argv))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
