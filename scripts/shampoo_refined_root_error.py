"""How far Shampoo's refined roots (``root_method="refine"``) are from eigh's along a real training run.

Trains Shampoo (eigh roots, the benchmark's ``Shampoo`` spec) on the CPU preset's language model. At every
refresh it also refines a shadow eigenbasis of each factor, as ``root_method="refine"`` would have from the
same factors, and prints, per refresh step and factor, the relative error of the refined root's action on
random vectors against eigh's root (max and median over the blocks of a bucket). The run itself follows the
eigh roots, so the errors are those of one refresh's approximation, not of a diverged trajectory.

    PYTHONPATH=src:benchmarks python scripts/shampoo_refined_root_error.py --iterations 1
"""

from __future__ import annotations

import argparse
import collections

import torch

from precond import linalg
from precond.preconditioners import roots
from precond_bench.optimizers import SPECS, AdamWSetting
from precond_bench.runner import train_run
from precond_bench.workloads import PRESETS, make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1, help="refinement steps per refresh (the option: 1)")
    parser.add_argument("--lr", type=float, default=9e-3, help="Shampoo's rate (the CPU preset's best: 9e-3)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()

    shadow: dict[tuple, torch.Tensor] = {}
    errors: dict[int, list] = collections.defaultdict(list)
    eigh_root = roots.InverseRoots._root

    def root_and_shadow(self, bucket, i, factor, exponent, bias2, ok, group, part):
        root, good = eigh_root(self, bucket, i, factor, exponent, bias2, ok, group, part)
        key = (id(bucket), i, part.start)
        if key not in shadow:  # the first refresh: eigh's basis, as the option takes it
            shadow[key] = linalg.shifted_eigh(factor, group["epsilon"])[1]
            return root, good
        for _ in range(args.iterations):
            refined, shadow[key], _, _ = linalg.refined_inverse_roots(factor, shadow[key], exponent,
                                                                      group["epsilon"])
        X = torch.randn(*factor.shape[:-1], 16, dtype=factor.dtype, generator=torch.Generator().manual_seed(0))
        error = ((refined - root) @ X).norm(dim=(1, 2)) / (root @ X).norm(dim=(1, 2))
        errors[bucket.calls].append((factor.shape[-1], float(error.max()), float(error.median())))
        return root, good

    roots.InverseRoots._root = root_and_shadow
    preset = PRESETS["cpu"]
    train_run(make_workload(preset, args.data_dir, "cpu"), SPECS["Shampoo"], args.lr, 0, args.steps, 50, "cpu",
              AdamWSetting(3e-3, 0.3), schedule=preset["schedule"])
    print("step: (factor size, max relative error, median) per bucket factor")
    for step in sorted(errors):
        print(step, " ".join(f"({n}, {mx:.2g}, {md:.2g})" for n, mx, md in errors[step]))


if __name__ == "__main__":
    main()
