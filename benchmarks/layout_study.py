"""Our default layout against Distributed Shampoo's, on the CPU preset of the benchmark.

    python benchmarks/layout_study.py

Shampoo and EShampoo differ from Distributed Shampoo by default in two places: 1-D parameters run the
diagonal method (``precondition_1d=False``; Distributed Shampoo gives them a factor) and the memory guard
(``max_factor_ratio=64``; it has none). This trains the ``cpu`` preset's model (2 layers of width 64 on the
Python documentation) with both layouts at the best rates of the CPU benchmark, two seeds each, with the
benchmark's warmup + cosine schedule, and prints final validation loss and optimizer seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import precond
from precond_bench.optimizers import AdamWSetting, OptimizerSpec
from precond_bench.runner import train_run
from precond_bench.workloads import PRESETS, make_workload

DS_LAYOUT = dict(precondition_1d=True, max_factor_ratio=float("inf"))
SHAMPOO = dict(betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam", grafting_beta2=0.95,
               grafting_epsilon=1e-8)  # the benchmark's Shampoo
ESHAMPOO = dict(betas=(0.95, 0.95), epsilon=1e-8, weight_decay=0.01, precondition_frequency=10)
CASES = {  # name: (class, arguments, rate)
    "Shampoo, our layout": (precond.Shampoo, SHAMPOO, 0.009),
    "Shampoo, Distributed Shampoo's layout": (precond.Shampoo, {**SHAMPOO, **DS_LAYOUT}, 0.009),
    "EShampoo, our layout": (precond.EShampoo, ESHAMPOO, 0.027),
    "EShampoo, Distributed Shampoo's layout": (precond.EShampoo, {**ESHAMPOO, **DS_LAYOUT}, 0.027),
}


def main() -> int:
    preset = PRESETS["cpu"]
    workload = make_workload(preset, Path("data"), "cpu")
    for name, (cls, kwargs, lr) in CASES.items():
        spec = OptimizerSpec(name, lr, lambda m, lr_, _, cls=cls, kwargs=kwargs: cls(m.parameters(), lr=lr_, **kwargs))
        for seed in (0, 1):
            run = train_run(workload, spec, lr, seed, preset["steps"], preset["eval_every"], "cpu", AdamWSetting(lr),
                            schedule=preset["schedule"])
            print(json.dumps({"case": name, "seed": seed, "final_val_loss": round(run["final_val_loss"], 4),
                              "optimizer_seconds": round(run["optimizer_seconds"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
