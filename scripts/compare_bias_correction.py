"""Compare precond's leave-one-out AdamW (``bias_correction="loo"`` / ``"loo_jensen"``) with the authors' code.

The authors' repository (fastino-ai/preconditioner-bias-correction) is not part of precond: clone it into
the git-ignored ``.peers/preconditioner-bias-correction``, then run

    python scripts/compare_bias_correction.py

Their LOO step is a two-pass collector (``collectors/loo_hybrid.py``) feeding ``LOOBCAdamW``
(``optimizers/adamw_loo.py``); both cast to float32 internally, so their sources are loaded with those casts
turned into float64 (the comparison measures the algorithm, not float32 rounding). Every parameter is "dense"
(their LOO path). Both run the same fixed microbatch gradients for 10 steps; printed is
``max_p ‖W_ours − W_ref‖ / ‖W_ref‖`` and the same for the displacement ``W − W_0``.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

import precond

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".peers" / "preconditioner-bias-correction" / "src" / "bcopt"
SHAPES = [(7,), (6, 5), (3, 4, 5), (2, 3, 2, 2)]
STEPS, MICROBATCHES = 10, 8
HP = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def load(relative: str) -> types.ModuleType:
    source = (PEER / relative).read_text().replace("torch.float32", "torch.float64")
    module = types.ModuleType(relative.replace("/", "_"))
    exec(compile(source, relative, "exec"), module.__dict__)
    return module


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    steps = [[[torch.randn(s, generator=g, dtype=torch.float64) * 3 + 0.5 for s in SHAPES]
              for _ in range(MICROBATCHES)] for _ in range(STEPS)]
    return init, steps


def theirs(init, steps, jensen: bool):
    collector, optimizer = load("collectors/loo_hybrid.py"), load("optimizers/adamw_loo.py")
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = optimizer.LOOBCAdamW(params, **HP)
    collect = collector.make_collect_loo_hybrid(
        lambda model, mb, device: sum((p * g).sum() for p, g in zip(params, mb)))  # ∂/∂p = the microbatch's g
    for mbs in steps:
        collect(None, mbs, [], params, None, opt, "cpu", False, jensen_correction=jensen)
        opt.step()
    return [p.detach() for p in params]


def ours(init, steps, jensen: bool):
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = precond.AdamW(params, bias_correction="loo_jensen" if jensen else "loo", **HP)
    for mbs in steps:
        for mb in mbs:  # an accumulation loop: backward of loss_j / n adds g_j / n
            for p, g in zip(params, mb):
                p.grad = g / len(mbs) if p.grad is None else p.grad + g / len(mbs)
            opt.accumulate(len(mbs))
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params]


def main() -> None:
    init, steps = data()
    print("| case | max rel. diff of W | max rel. diff of ΔW |\n|---|---|---|")
    for jensen in (False, True):
        a, b = ours(init, steps, jensen), theirs(init, steps, jensen)
        rel = max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))
        disp = max(float((x - y).norm() / (y - w).norm()) for x, y, w in zip(a, b, init))
        print(f"| AdamW {'LOO+Jensen (loo_jensen)' if jensen else 'LOO (loo)'}, {MICROBATCHES} microbatches, "
              f"{STEPS} steps | {rel:.2e} | {disp:.2e} |")


if __name__ == "__main__":
    main()
