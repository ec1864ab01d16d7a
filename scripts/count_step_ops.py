"""Operators one optimizer step dispatches, views aside: on a GPU each is a launch the host must enqueue, so
this count is what a host-bound step (Muon's, BENCHMARKS.md) costs, measured without a GPU.

    PYTHONPATH=src:benchmarks python scripts/count_step_ops.py [--layers 12] [--by-line] Muon SOAP AdamW

The body is GPT-2 small's matrix shapes at width 8: the same buckets as at its width 768, where the count
differs only in how a bucket's weights are written (Muon: 188 operators at width 8, 184 at 768, whose large
buckets are updated in place instead of through a stack). ``--bench-model`` counts the benchmark's own
optimizers instead (names of ``precond_bench``, e.g. SOAP-F1-tf32) on the batch-size axis's 20M model, its
embedding and head included:

    PYTHONPATH=src:benchmarks python scripts/count_step_ops.py --bench-model SOAP-F1-tf32 Muon AdamW"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import precond
from precond_bench.step_time import body_shapes

# aliasing operators: no kernel, no launch
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "select", "slice", "unsqueeze", "squeeze",
         "as_strided", "permute", "alias", "detach", "unbind", "split", "split_with_sizes", "_reshape_alias",
         "unfold", "lift_fresh", "diagonal"}
MAKE = {
    "AdamW": lambda ps: precond.AdamW(ps, lr=1e-3),
    "Muon": lambda ps: precond.Muon(ps, lr=0.02),
    "Muon-gram": lambda ps: precond.Muon(ps, lr=0.02, ns_algorithm="gram_newton_schulz", ns_dtype="float16"),
    "SOAP": lambda ps: precond.SOAP(ps, lr=3e-3, precondition_frequency=100),  # a step without a refresh
    "EShampoo": lambda ps: precond.EShampoo(ps, lr=1e-3, precondition_frequency=100),
    "Shampoo": lambda ps: precond.Shampoo(ps, lr=1e-3, precondition_frequency=100, grafting="adam"),
    # the every-step refinement of the large-batch benchmark (SOAP-F1-tf32, EShampoo-F1-tf32)
    "SOAP-F1": lambda ps: precond.SOAP(ps, lr=3e-3, precondition_frequency=1, refresh_method="refine"),
    "EShampoo-F1": lambda ps: precond.EShampoo(ps, lr=1e-3, precondition_frequency=1, refresh_method="refine"),
}


class OperatorCount(TorchDispatchMode):
    def __init__(self, by_line: bool) -> None:
        super().__init__()
        self.by_line, self.counts = by_line, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            if self.by_line:  # the innermost line of the library that made the call
                frames = [f for f in traceback.extract_stack() if "/precond/" in f.filename]
                name = f"{frames[-1].filename.split('/precond/')[-1]}:{frames[-1].lineno}" if frames else name
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _bench_model_optimizer(name: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The benchmark's optimizer ``name`` at its centre rate on the 20M model of the batch-size axis."""
    from precond_bench.model import GPT, GPTConfig
    from precond_bench.optimizers import SPECS, AdamWSetting
    from precond_bench.workloads import PRESETS
    model = GPT(GPTConfig(**PRESETS["gpu"]["gpt"]))  # the batch axis's model (`--preset gpu`), bytes: vocab 256
    return list(model.parameters()), SPECS[name].build(model, SPECS[name].center_lr, AdamWSetting(3e-3))


def count(name: str, layers: int, by_line: bool, bench_model: bool = False) -> collections.Counter:
    torch.manual_seed(0)
    if bench_model:
        params, opt = _bench_model_optimizer(name)
    else:
        params = [torch.nn.Parameter(torch.randn(s)) for s in body_shapes(layers, 8)]
        opt = MAKE[name](params)
    for _ in range(4):  # past the first steps (state, SOAP's statistics-only step)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    with OperatorCount(by_line) as counter:
        opt.step()
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("optimizers", nargs="+")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--bench-model", action="store_true",
                        help="the benchmark's optimizers (precond_bench names) on the batch axis's 20M model")
    parser.add_argument("--by-line", action="store_true", help="count per line of the library, not per operator")
    parser.add_argument("--top", type=int, default=12, help="how many of the most frequent to list")
    args = parser.parse_args()
    from precond_bench.optimizers import SPECS
    known = SPECS if args.bench_model else MAKE
    unknown = [n for n in args.optimizers if n not in known]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(known)}")
    for name in args.optimizers:
        counts = count(name, args.layers, args.by_line, args.bench_model)
        print(f"{name}: {sum(counts.values())} operators a step")
        for what, n in counts.most_common(args.top):
            print(f"  {n:4d}  {what}")


if __name__ == "__main__":
    main()
