"""Compare precond's bias corrections with the authors' code: AdamW's leave-one-out modes and Shampoo's.

The authors' repository (fastino-ai/preconditioner-bias-correction) is not part of precond: clone it into
the git-ignored ``.peers/preconditioner-bias-correction``, then run

    python scripts/compare_bias_correction.py

Their LOO step is a two-pass collector (``collectors/loo_hybrid.py``) feeding ``LOOBCAdamW``
(``optimizers/adamw_loo.py``); both cast to float32 internally, so their sources are loaded with those casts
turned into float64 (the comparison measures the algorithm, not float32 rounding). Every parameter is "dense"
(their LOO path). Their Shampoo (``optimizers/shampoo.py``, ``BiasCorrectedShampoo``) takes per-step buffers
from their trainer (``trainers/shampoo_sft.py``'s ``populate_buffers``); this script fills them the same way
from the same microbatch gradients, on the 2-D parameters (their Shampoo path), with the roots recomputed on
steps ``F, 2F, …`` (their trainer's counter starts at 0, so it recomputes on ``0, F, …``: the same rule, one step
earlier). Both run the same fixed microbatch gradients for 10 steps; printed is
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


def accumulate_and_step(opt, params, steps):
    """Each step's microbatches through an accumulation loop (backward of loss_j / n adds g_j / n), then step."""
    for mbs in steps:
        for mb in mbs:
            for p, g in zip(params, mb):
                p.grad = g / len(mbs) if p.grad is None else p.grad + g / len(mbs)
            opt.accumulate(len(mbs))
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params]


def ours(init, steps, jensen: bool):
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = precond.AdamW(params, bias_correction="loo_jensen" if jensen else "loo", **HP)
    return accumulate_and_step(opt, params, steps)


SHAMPOO_MODES = {"std": "std", "inv": "variance_corrected", "cf": "cross_fit", "full": "full"}  # theirs: ours
SHAMPOO = dict(lr=0.05, weight_decay=0.1, beta1=0.9, beta2=0.95, damping=1e-6, frequency=3)


def theirs_shampoo(init, steps, mode: str):
    module = load("optimizers/shampoo.py")
    h = SHAMPOO
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = module.BiasCorrectedShampoo(params, lr=h["lr"], weight_decay=h["weight_decay"], shampoo_beta1=h["beta1"],
                                      shampoo_beta2=h["beta2"], shampoo_damping=h["damping"])
    half = MICROBATCHES // 2
    for t, mbs in enumerate(steps, start=1):
        refresh = t % h["frequency"] == 0
        for i, p in enumerate(params):  # their populate_buffers, cf/full: A = first half, B = second half
            grads = [mb[i] for mb in mbs]
            full = torch.stack(grads).mean(0)
            cross, variance = mode in ("cf", "full"), mode in ("inv", "full")
            group_b = grads[half:] if cross else grads
            st = opt.state[p]
            st["_g_A"] = torch.stack(grads[:half]).mean(0) if cross else full
            st["_S_L_step"] = st["_S_R_step"] = st["_S_L_micro"] = st["_S_R_micro"] = None
            if refresh:
                if cross:
                    st["_S_L_step"] = torch.stack([g @ g.T for g in group_b]).mean(0)
                    st["_S_R_step"] = torch.stack([g.T @ g for g in group_b]).mean(0)
                else:
                    st["_S_L_step"], st["_S_R_step"] = full @ full.T, full.T @ full
                if variance:
                    st["_S_L_micro"], st["_S_R_micro"] = [g @ g.T for g in group_b], [g.T @ g for g in group_b]
        opt.step()
    return [p.detach() for p in params]


def ours_shampoo(init, steps, mode: str):
    h = SHAMPOO
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = precond.Shampoo(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), epsilon=h["damping"],
                          weight_decay=h["weight_decay"], precondition_frequency=h["frequency"],
                          start_preconditioning_step=h["frequency"], use_bias_correction=False,
                          fold_at_refresh_only=True, bias_correction=SHAMPOO_MODES[mode], merge_dims=False,
                          max_factor_ratio=float("inf"))
    return accumulate_and_step(opt, params, steps)


def report(name: str, a, b, init) -> None:
    rel = max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))
    disp = max(float((x - y).norm() / (y - w).norm()) for x, y, w in zip(a, b, init))
    print(f"| {name} | {rel:.2e} | {disp:.2e} |", flush=True)


def main() -> None:
    init, steps = data()
    print("| case | max rel. diff of W | max rel. diff of ΔW |\n|---|---|---|")
    for jensen in (False, True):
        report(f"AdamW {'LOO+Jensen (loo_jensen)' if jensen else 'LOO (loo)'}, {MICROBATCHES} microbatches, "
               f"{STEPS} steps", ours(init, steps, jensen), theirs(init, steps, jensen), init)
    matrices = [i for i, s in enumerate(SHAPES) if len(s) == 2]  # their Shampoo path: 2-D parameters
    init2 = [init[i] for i in matrices]
    steps2 = [[[mb[i] for i in matrices] for mb in mbs] for mbs in steps]
    for mode, our_mode in SHAMPOO_MODES.items():
        report(f"Shampoo {our_mode} (theirs: {mode}), F={SHAMPOO['frequency']}, fold at refreshes, "
               f"{MICROBATCHES} microbatches, {STEPS} steps", ours_shampoo(init2, steps2, mode),
               theirs_shampoo(init2, steps2, mode), init2)


if __name__ == "__main__":
    main()
