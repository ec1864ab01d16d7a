"""The "Purifying Shampoo" findings at our scale: grafting, the adaptive refresh criterion, early eigenbasis
error, and per-parameter-type drift, on the language model of ``python -m precond_bench``.

    python benchmarks/purifying_study.py --device cuda --out benchmarks/results/purifying/runs.json
    python benchmarks/purifying_study.py --report benchmarks/results/purifying/runs.json   # tables + plots

Each run trains one optimizer configuration at one learning rate and seed (``--seeds``, default 0) for
``--steps`` steps and records the final validation loss (nats/byte), the training wall-clock, the optimizer's
share of it, and the per-factor refresh counters. Runs already in ``--out`` are skipped, so an interrupted
study resumes.

- ``a``: Shampoo without grafting over a grid of lr × epsilon, Shampoo with Adam grafting, EShampoo without
  grafting, AdamW, over the same learning rates.
- ``b``: EShampoo refreshing with ``eigh``, the QR algorithm (``I`` = 1, 3, 10) and the matmul ``refine``:
  fixed ``F`` ∈ {1, 10, 100} against the adaptive criterion ``τ`` ∈ {0.01, 0.03, 0.1, 0.3} checked every step.
- ``c``: one eigendecomposition at the first step and then ``τ`` = 0.99 (the basis practically never
  changes) against ``τ`` ∈ {0.3, 0.5, 0.9}; AdamW from ``a`` is the bar.
- ``d``: from the ``b`` runs with τ, how often each parameter type's factors were recomputed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

import precond
from precond_bench.optimizers import AdamWSetting, OptimizerSpec
from precond_bench.runner import train_run
from precond_bench.study import run_or_report, study_parser
from precond_bench.workloads import LanguageModel
from precond_bench.model import GPTConfig

LRS = (1e-3, 3e-3, 1e-2)
BETAS = (0.95, 0.95)


def _eshampoo(**kw) -> Callable:
    return lambda m, lr: precond.EShampoo(list(m.parameters()), lr=lr, betas=BETAS, epsilon=1e-8, **kw)


def configurations() -> dict[str, tuple[str, Callable, tuple[float, ...]]]:
    """``{name: (finding, build(model, lr), learning rates)}``."""
    runs: dict[str, tuple[str, Callable, tuple[float, ...]]] = {}
    runs["AdamW"] = ("a", lambda m, lr: precond.AdamW(list(m.parameters()), lr=lr, betas=(0.9, 0.95),
                                                     weight_decay=0.0), LRS)
    for eps in (1e-12, 1e-8, 1e-4):
        runs[f"Shampoo no grafting eps={eps:g}"] = ("a", lambda m, lr, e=eps: precond.Shampoo(
            list(m.parameters()), lr=lr, betas=(0.9, 0.95), epsilon=e, precondition_frequency=10,
            grafting=None), LRS)
    runs["Shampoo + Adam grafting"] = ("a", lambda m, lr: precond.Shampoo(
        list(m.parameters()), lr=lr, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10,
        grafting="adam", grafting_beta2=0.95, grafting_epsilon=1e-8), LRS)
    runs["EShampoo F=10"] = ("a", _eshampoo(precondition_frequency=10), LRS)
    for method, iterations in (("eigh", 1), ("qr", 1), ("qr", 3), ("qr", 10), ("refine", 1)):
        label = method if method != "qr" else f"qr I={iterations}"
        for F in (1, 10, 100):
            runs[f"EShampoo {label} F={F}"] = ("b", _eshampoo(precondition_frequency=F, refresh_method=method,
                                                              max_qr_iterations=iterations), (3e-3,))
        for tau in (0.01, 0.03, 0.1, 0.3):
            runs[f"EShampoo {label} tau={tau}"] = ("b", _eshampoo(precondition_frequency=1, refresh_method=method,
                                                                  max_qr_iterations=iterations,
                                                                  refresh_tolerance=tau), (3e-3,))
    for tau in (0.5, 0.9, 0.99):
        runs[f"EShampoo eigh tau={tau}"] = ("c", _eshampoo(precondition_frequency=1, refresh_tolerance=tau),
                                            (3e-3,))
    return runs


def parameter_type(name: str) -> str:
    for key, label in (("embed", "embedding"), ("qkv", "attention qkv"), ("attn.proj", "attention out"),
                       ("mlp.gate", "MLP gate"), ("mlp.up", "MLP up"), ("mlp.down", "MLP down"), ("norm", "norm"),
                       ("lm_head", "head")):
        if key in name:
            return label
    return name


def run_study(args: argparse.Namespace) -> None:
    out: Path = args.out
    done = json.loads(out.read_text()) if out.exists() else []
    seen = {(r["config"], r["lr"], r.get("seed", 0)) for r in done}
    workload = LanguageModel(Path(args.data_dir), GPTConfig(context=args.context, width=args.width,
                                                            depth=args.depth, heads=args.heads),
                             batch_size=args.batch_size, device=args.device)
    for name, (finding, build, lrs) in configurations().items():
        if (args.findings and finding not in args.findings) or (args.match and args.match not in name):
            continue
        for lr, seed in itertools.product(lrs, args.seeds):
            if (name, lr, seed) in seen:
                continue
            holder: dict = {}

            def make(model, lr_, _adamw_lr, build=build):
                holder["names"] = [n for n, _ in model.named_parameters()]
                holder["opt"] = build(model, lr_)
                return holder["opt"]

            result = train_run(workload, OptimizerSpec(name, lr, make), lr, seed, args.steps, args.eval_every,
                               args.device, AdamWSetting(lr))  # constant rate, as the study was made
            per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
            if hasattr(holder["opt"], "preconditioner_stats"):
                for f in holder["opt"].preconditioner_stats()["factors"]:
                    t = parameter_type(holder["names"][f["param"]])
                    per_type[t][0] += f["refreshes"]
                    per_type[t][1] += f["skipped"]
                    per_type[t][2] += 1
            done.append({"config": name, "finding": finding, "lr": lr, "seed": seed,
                         "final_val_loss": result["final_val_loss"],
                         "train_seconds": result["train_seconds"], "optimizer_seconds": result["optimizer_seconds"],
                         "refreshes": result["refreshes"], "skipped": result["skipped_refreshes"],
                         "failures": result["failures"], "curve": result["curve"], "per_type": dict(per_type),
                         "steps": args.steps, "device": args.device,
                         "model": dict(width=args.width, depth=args.depth, context=args.context,
                                       batch_size=args.batch_size)})
            print(f"{name} lr={lr:g} seed={seed}: loss {result['final_val_loss']:.4f}, {result['train_seconds']:.1f} s, "
                  f"refreshes {result['refreshes']}", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(done, indent=1))


def report(path: Path) -> str:
    every_seed = json.loads(path.read_text())
    runs = [r for r in every_seed if r.get("seed", 0) == 0]  # the tables below are seed 0's; seeds: seed_table
    best: dict[str, dict] = {}
    for r in runs:
        if r["config"] not in best or r["final_val_loss"] < best[r["config"]]["final_val_loss"]:
            best[r["config"]] = r
    lines = []
    for finding in "abc":
        rows = [r for r in best.values() if r["finding"] == finding]
        if not rows:
            continue
        lines += ["", f"### finding {finding}", "",
                  "| configuration | best lr | val loss (nats/byte) | wall s | optimizer share | refreshes |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['config']} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['train_seconds']:.1f} | "
                         f"{r['optimizer_seconds'] / max(r['train_seconds'], 1e-9):.2f} | {r['refreshes']} |")
    tau_runs = [r for r in best.values() if r["finding"] == "b" and "tau=" in r["config"]]
    if tau_runs:
        lines += ["", "### finding d: refreshes per factor, by parameter type (τ runs)", "",
                  "| configuration | " + " | ".join(sorted(tau_runs[0]["per_type"])) + " |",
                  "|---|" + "---|" * len(tau_runs[0]["per_type"])]
        for r in tau_runs:
            cells = [f"{v[0] / max(v[2], 1):.1f}" for _, v in sorted(r["per_type"].items())]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + seed_table(every_seed))


def seed_table(runs: list[dict]) -> list[str]:
    """Finding b over seeds, for the configurations run with more than one: mean ± sample deviation of the
    final loss and of the refreshes, and the seeds' mean loss difference to the method's F=1 run, paired by
    seed (the adaptive criterion's saving is counted against F=1, the best fixed frequency here)."""
    by_config: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in runs:
        if r["finding"] == "b":
            by_config[r["config"]][r.get("seed", 0)] = r
    rows = {name: seeds for name, seeds in by_config.items() if len(seeds) > 1}
    if not rows:
        return []
    lines = ["", "### finding b over seeds", "",
             "| configuration | seeds | val loss, mean ± sd | Δ loss vs F=1 (paired), mean ± sd | "
             "refreshes, mean | refreshes vs F=1 |", "|---|---|---|---|---|---|"]
    for name, seeds in rows.items():
        method = name.rsplit(" ", 1)[0]
        base = by_config.get(f"{method} F=1", {})
        losses = [seeds[k]["final_val_loss"] for k in sorted(seeds)]
        refreshes = statistics.mean(seeds[k]["refreshes"] for k in seeds)
        paired = [seeds[k]["final_val_loss"] - base[k]["final_val_loss"] for k in sorted(seeds) if k in base]
        delta = f"{statistics.mean(paired):+.4f} ± {statistics.stdev(paired):.4f}" if len(paired) > 1 else "—"
        share = (f"{refreshes / statistics.mean(base[k]['refreshes'] for k in base):.2f}×" if base else "—")
        lines.append(f"| {name} | {len(seeds)} | {statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} | "
                     f"{delta} | {refreshes:.0f} | {share} |")
    return lines


def plot(path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in json.loads(path.read_text()) if r["finding"] == "b"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("eigh", "qr I=1", "qr I=3", "qr I=10", "refine"):
        for kind, marker in (("F=", "o"), ("tau=", "^")):
            rs = [r for r in runs if r["config"].startswith(f"EShampoo {method} {kind}")]
            if not rs:
                continue
            label = f"{method} {'fixed F' if kind == 'F=' else 'adaptive τ'}"
            axes[0].scatter([max(r["refreshes"], 1) for r in rs], [r["final_val_loss"] for r in rs],
                            marker=marker, label=label)
            axes[1].scatter([r["train_seconds"] for r in rs], [r["final_val_loss"] for r in rs], marker=marker,
                            label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("factor refreshes (all factors, whole run)")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("final validation loss (nats/byte)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "benchmarks/results/purifying/runs.json")
    p.add_argument("--findings", nargs="+", default=None, choices=list("abc"))
    p.add_argument("--match", default=None, help="only configurations whose name contains this")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    return run_or_report(p.parse_args(argv), run_study, report, plot)


if __name__ == "__main__":
    sys.exit(main())
