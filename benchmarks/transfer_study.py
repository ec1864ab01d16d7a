"""Does the best learning rate stay put as the model widens? Standard parametrisation against precond.scaling.

    python benchmarks/transfer_study.py --device cuda                       # widths 128-1024, the GPU version
    python benchmarks/transfer_study.py --widths 32 64 128 256 --steps 60 --seeds 0 1  # a quick CPU version
    python benchmarks/transfer_study.py --device cuda --optimizers SOAP Shampoo --cases normalized blocked
    python benchmarks/transfer_study.py --report benchmarks/results/transfer/runs.json

For AdamW, SOAP, Shampoo (Adam grafting, as in the benchmark) and Muon, each width of a byte-level GPT (depth
2, head dim 32, the benchmark's warmup + cosine schedule) is trained at rates spaced by 2× around the
optimizer's benchmark rate, in each case asked for: "SP" gives every parameter the same rate (and weight
decay) at every width; "scaled" takes the groups of :func:`precond.scaling.scaled_param_groups` with the
narrowest width as base; for SOAP and Shampoo, "normalized" adds the explicit spectral normalisation of each
block's update (``spectral_normalize=True``, its own rate grid) and "blocked" cuts the factors at the base
width, the two transfer aids of Qiu et al. (arXiv:2512.05620). The report gives each case's best rate per
width and its drift, the ratio of the largest to the smallest best rate across widths (1 = perfect
transfer; the grid's resolution is 2×). Runs are appended to
``--out`` as they finish, and a rerun skips those already there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch

import precond
from precond_bench.model import GPT, GPTConfig
from precond_bench.optimizers import AdamWSetting, OptimizerSpec
from precond_bench.runner import train_run
from precond_bench.study import run_or_report, study_parser
from precond_bench.workloads import COSINE, LanguageModel
from precond.scaling import scaled_param_groups

# name: (class, keyword arguments, centre rate, weight decay); Muon's AdamW part runs at MUON_ADAMW_LR
OPTIMIZERS = {
    "AdamW": (precond.AdamW, dict(betas=(0.9, 0.95)), 3e-3, 0.1),
    "SOAP": (precond.SOAP, dict(betas=(0.95, 0.95), precondition_frequency=10), 3e-3, 0.01),
    "Shampoo": (precond.Shampoo, dict(betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam",
                                      grafting_beta2=0.95, grafting_epsilon=1e-8), 3e-3, 0.0),
    "Muon": (precond.Muon, dict(momentum=0.95, adamw_betas=(0.9, 0.95)), 2e-2, 0.1),
}
MUON_ADAMW_LR = 3e-3


# How each case builds its param groups: "SP" the same rate everywhere; the others scale from the base width.
# "normalized" adds spectral_normalize (its rates are those of a spectral-norm step, centred at 8e-2);
# "blocked" cuts every factor at the base width, so blocks keep one size as the model widens.
CASES = ("SP", "scaled", "normalized", "blocked")
SHAMPOO_LIKE = ("SOAP", "Shampoo")  # the optimizers the last two cases apply to
NORMALIZED_CENTRE = 8e-2


def config(width: int, context: int) -> GPTConfig:
    return GPTConfig(width=width, depth=2, heads=max(1, width // 32), context=context)


def case_of(run: dict) -> str:
    return run.get("case", "scaled" if run["scaled"] else "SP")  # runs saved before cases had names


def build(name: str, case: str, base_width: int, context: int):
    cls, kwargs, _, wd = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    if case == "blocked":
        kwargs.update(dict(max_precond_dim=base_width, large_dim_policy="split") if name == "SOAP"
                      else dict(max_preconditioner_dim=base_width))

    def make(model, lr, _adamw):
        width = model.cfg.width
        if case == "SP":
            groups = precond.param_groups(model, other_options={"lr": MUON_ADAMW_LR}) if name == "Muon" else [
                {"params": list(model.parameters())}]
        else:
            torch.manual_seed(0)
            base = GPT(config(base_width, context))
            groups = scaled_param_groups(model, base, name, lr=lr, weight_decay=wd, width=width, base_width=base_width,
                                         grafting=kwargs.get("grafting"), adamw_lr=MUON_ADAMW_LR,
                                         spectral_normalize=case == "normalized")
        extra = {"adamw_lr": MUON_ADAMW_LR} if name == "Muon" else {}
        return cls(groups, lr=lr, weight_decay=wd, **kwargs, **extra)
    return make


def run_study(args: argparse.Namespace) -> None:
    out: Path = args.out
    done = json.loads(out.read_text()) if out.exists() else []
    seen = {(r["optimizer"], case_of(r), r["width"], r["lr"], r.get("seed", 0)) for r in done}
    base_width = min(args.widths)
    for name in args.optimizers:
        cases = [c for c in args.cases if c in ("SP", "scaled") or name in SHAMPOO_LIKE]
        for width in args.widths:
            workload = LanguageModel(Path(args.data_dir), config(width, args.context), batch_size=args.batch_size,
                                     device=args.device)
            for case in cases:
                if case == "scaled" and width == base_width:
                    continue  # the base width's groups are SP's
                centre = NORMALIZED_CENTRE if case == "normalized" else OPTIMIZERS[name][2]
                for k, seed in itertools.product(args.exponents, args.seeds):
                    lr = centre * 2.0 ** k
                    if (name, case, width, lr, seed) in seen:
                        continue
                    spec = OptimizerSpec(name, lr, build(name, case, base_width, args.context))
                    r = train_run(workload, spec, lr, seed, args.steps, args.steps, args.device, AdamWSetting(lr),
                                  schedule=COSINE)
                    done.append({"optimizer": name, "case": case, "scaled": case != "SP", "width": width, "lr": lr,
                                 "seed": seed, "final_val_loss": r["final_val_loss"],
                                 "diverged": r.get("diverged", False), "train_seconds": r["train_seconds"],
                                 "steps": args.steps, "device": args.device})
                    print(f"{name} {case} width={width} lr={lr:.3g} seed={seed}: {r['final_val_loss']:.4f}",
                          file=sys.stderr, flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(done, indent=1))


def curves(runs: list[dict]) -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    """(optimizer, case) → width → sorted (lr, loss averaged over seeds; NaN if any seed diverged); SP's base
    width serves "scaled" too."""
    base_width = min(r["width"] for r in runs)
    losses: dict = {}
    for r in runs:
        case = case_of(r)
        for c in (["SP", "scaled"] if case == "SP" and r["width"] == base_width else [case]):
            losses.setdefault((r["optimizer"], c), {}).setdefault(r["width"], {}).setdefault(r["lr"], []).append(
                r["final_val_loss"])
    return {k: {w: sorted((lr, statistics.fmean(v)) for lr, v in by_lr.items()) for w, by_lr in sorted(ws.items())}
            for k, ws in losses.items()}


def interpolated_best(points: list[tuple[float, float]]) -> float:
    """The rate at the vertex of the parabola through the best grid point and its two neighbours, in log lr
    (the grid's 2× steps are too coarse to tell near-ties apart); the grid's end when the best point is one."""
    finite = [(lr, loss if loss == loss else float("inf")) for lr, loss in points]
    i = min(range(len(finite)), key=lambda j: finite[j][1])
    if i in (0, len(finite) - 1) or not all(math.isfinite(finite[j][1]) for j in (i - 1, i + 1)):
        return finite[i][0]
    (x0, y0), (x1, y1), (x2, y2) = ((math.log(lr), loss) for lr, loss in finite[i - 1:i + 2])
    # vertex of the parabola through three points (unequal spacing allowed); y1 is the smallest, so it is a minimum
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return math.exp(x1 - 0.5 * num / den) if den != 0 else finite[i][0]


def report(path: Path) -> str:
    table = curves(json.loads(path.read_text()))
    widths = sorted({w for ws in table.values() for w in ws})
    lines = ["| optimizer | parametrisation | " + " | ".join(f"best lr, width {w} (interpolated)" for w in widths)
             + " | drift (max/min best lr): grid | interpolated | loss at the widest |",
             "|---|---|" + "---|" * len(widths) + "---|---|---|"]
    for (name, case), ws in sorted(table.items(), key=lambda kv: (kv[0][0], CASES.index(kv[0][1]))):
        # a width with fewer than three rates run (a study cut short) has no best rate to speak of
        best = {w: min(points, key=lambda p: p[1] if p[1] == p[1] else float("inf")) for w, points in ws.items()
                if len(points) >= 3}
        rates = [best[w][0] for w in widths if w in best]
        if not rates:
            continue
        drift = max(rates) / min(rates)
        smooth = {w: interpolated_best(ws[w]) for w in best}
        smooth_drift = max(smooth.values()) / min(smooth.values())
        edge = {w for w in best if best[w][0] in (ws[w][0][0], ws[w][-1][0])}
        cells = [f"{best[w][0]:.3g}{' †' if w in edge else f' ({smooth[w]:.2g})'}" if w in best else "—"
                 for w in widths]
        lines.append(f"| {name} | {case} | " + " | ".join(cells) + f" | {drift:.0f}× | {smooth_drift:.1f}× | "
                     f"{best[max(best)][1]:.4f} |")
    lines.append("\n† the best rate is an end of the swept grid: the true optimum may lie beyond it (the drift "
                 "takes the end). — fewer than three rates were run at that width. In brackets: the vertex of the "
                 "parabola through the best rate and its neighbours (in log lr).")
    return "\n".join(lines)


def plot(path: Path, image: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = curves(json.loads(path.read_text()))
    names = sorted({name for name, _ in table})
    cases = [c for c in CASES if any(case == c for _, case in table)]
    fig, axes = plt.subplots(len(cases), len(names), figsize=(4 * len(names), 3.5 * len(cases)), squeeze=False)
    for col, name in enumerate(names):
        for row, case in enumerate(cases):
            ax = axes[row][col]
            for width, points in table.get((name, case), {}).items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"width {width}")
            ax.set_xscale("log")
            ax.set_title(f"{name}, {case}")
            ax.set_xlabel("learning rate (base)")
            ax.set_ylabel("final validation loss")
            finite = [p[1] for ws in table.get((name, case), {}).values() for p in ws if p[1] == p[1]]
            if finite:
                ax.set_ylim(min(finite) - 0.05, min(finite) + 1.0)
            if table.get((name, case)):
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(image, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "benchmarks/results/transfer/runs.json")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--cases", nargs="+", default=["SP", "scaled"], choices=CASES,
                   help="normalized and blocked apply to SOAP and Shampoo")
    p.add_argument("--widths", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--exponents", nargs="+", type=int, default=[-3, -2, -1, 0, 1],
                   help="rates are the optimizer's centre rate times 2**k")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="the best rate is taken on the mean over seeds")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    return run_or_report(p.parse_args(argv), run_study, report, plot)


if __name__ == "__main__":
    sys.exit(main())
