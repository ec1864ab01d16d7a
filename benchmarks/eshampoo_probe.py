"""Why does EShampoo refreshed every step trail SOAP on the GPU LM at 1M bytes a step? Probes on the CPU preset.

    PYTHONPATH=src:benchmarks python benchmarks/eshampoo_probe.py [--lr 0.01 ...] [--seeds 0 1]
        [--accumulation 16 --warmup-steps 30] [--variants SOAP-F1 EShampoo-F1 SOAP-F1-64 EShampoo-F1-64
        EShampoo-F1-eigh-first AdamW]

Trains the CPU preset's LM (`--preset cpu`: 300 steps, warmup + cosine) with SOAP and EShampoo, both refining
their bases at every step (the GPU rows SOAP-F1-tf32 and EShampoo-F1-tf32; TF32 has no effect on a CPU), as they
are, with every dim cut into blocks of 64, and EShampoo with an eigh first basis (SOAP's first basis is an eigh,
EShampoo's refinement starts from the identity). ``--accumulation`` micro-batches a step and ``--warmup-steps``
take it to the GPU's 1M-byte column's regime (16 micro-batches, 300 steps, 30 of warmup), where EShampoo fell
behind. Prints each variant's final validation loss per rate and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from precond.preconditioners import CorrectedEigenvalues
from precond_bench.optimizers import SPECS, AdamWSetting, OptimizerSpec, _eshampoo, _soap
from precond_bench.runner import train_run
from precond_bench.workloads import PRESETS, make_workload

EVERY_STEP = dict(tf32=True, precondition_frequency=1, refresh_method="refine")


class EighFirstBasis(CorrectedEigenvalues):
    """EShampoo's component with its first refresh by eigh, as SOAP's first basis."""

    def refresh(self, bucket, bias2, ok, group):
        first = bucket.calls == group["start_preconditioning_step"]
        super().refresh(bucket, bias2, ok, dict(group, refresh_method="eigh") if first else group)


def eigh_first(model, lr, adamw):
    optimizer = _eshampoo(**EVERY_STEP)(model, lr, adamw)
    optimizer.preconditioner = EighFirstBasis()
    return optimizer


VARIANTS = {
    "SOAP-F1": SPECS["SOAP-F1-tf32"],
    "EShampoo-F1": SPECS["EShampoo-F1-tf32"],
    "SOAP-F1-64": OptimizerSpec("SOAP-F1-64", 1e-2, _soap(**EVERY_STEP, max_precond_dim=64,
                                                          large_dim_policy="split")),
    "EShampoo-F1-64": OptimizerSpec("EShampoo-F1-64", 1e-2, _eshampoo(**EVERY_STEP, max_preconditioner_dim=64)),
    "EShampoo-F1-eigh-first": OptimizerSpec("EShampoo-F1-eigh-first", 1e-2, eigh_first),
    "AdamW": SPECS["AdamW"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-2], help="rates (1e-2: both's best at batch 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches a step")
    parser.add_argument("--warmup-steps", type=int, default=None, help="warmup in steps (default: 5%% of the run)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=[n for n in VARIANTS if n != "AdamW"])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(4)
    preset = dict(PRESETS["cpu"], accumulation=args.accumulation)
    if args.warmup_steps is not None:
        preset["schedule"] = {**preset["schedule"], "warmup_steps": args.warmup_steps}
    workload = make_workload(preset, Path(args.data_dir), "cpu")
    for name in args.variants:
        for lr in args.lr:
            finals = [train_run(workload, VARIANTS[name], lr, seed, preset["steps"], preset["eval_every"], "cpu",
                                AdamWSetting(3e-3), schedule=preset["schedule"])["final_val_loss"]
                      for seed in args.seeds]
            print(f"{name} lr={lr:g}: " + ", ".join(f"{f:.4f}" for f in finals), flush=True)


if __name__ == "__main__":
    main()
