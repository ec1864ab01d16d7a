"""Does correcting the preconditioner's microbatch bias lower the held-out loss at equal tokens?

    python benchmarks/bias_correction_study.py                                  # CPU: AdamW, std vs full, 3 seeds
    python benchmarks/bias_correction_study.py --device cuda --width 256 --depth 4 --steps 400
    python benchmarks/bias_correction_study.py --report benchmarks/results/bias_correction/runs.json

Each step of a byte-level GPT (the benchmark's model and data, warmup + cosine schedule) takes ``--microbatches``
microbatches of ``--batch-size`` windows through an ordinary accumulation loop with ``optimizer.accumulate(n)``
after each backward; every mode sees the same windows in the same order (equal tokens). The report gives the
final validation loss per mode (mean ± standard deviation over seeds), its difference to ``std`` per seed,
and the optimizer's seconds per step (``accumulate`` calls and ``step``) relative to ``std``. Runs are
appended to ``--out`` as they finish; a rerun skips those already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import precond
from precond.bench.model import GPTConfig
from precond.bench.runner import lr_factor
from precond.bench.workloads import COSINE, LanguageModel


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(workload: LanguageModel, mode: str, seed: int, args: argparse.Namespace) -> dict:
    model = workload.model(seed)
    opt = precond.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, bias_correction=mode)
    n, optimizer_seconds, eval_seconds, curve = args.microbatches, 0.0, 0.0, []
    began = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, COSINE)
        for j in range(n):
            with torch.autocast(workload.device.split(":")[0], dtype=torch.bfloat16,
                                enabled=workload.device.startswith("cuda")):
                loss = workload.loss(model, workload.batch(step * n + j, seed)) / n
            loss.backward()
            sync(args.device)
            start = time.perf_counter()
            opt.accumulate(n)
            sync(args.device)
            optimizer_seconds += time.perf_counter() - start
        start = time.perf_counter()
        opt.step()
        sync(args.device)
        optimizer_seconds += time.perf_counter() - start
        opt.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            start = time.perf_counter()
            model.eval()
            curve.append((step, workload.validation_loss(model)))
            model.train()
            eval_seconds += time.perf_counter() - start
    train_seconds = time.perf_counter() - began - eval_seconds
    return {"optimizer": "AdamW", "mode": mode, "seed": seed, "lr": args.lr, "final_val_loss": curve[-1][1],
            "curve": curve, "optimizer_seconds_per_step": optimizer_seconds / args.steps,
            "train_seconds_per_step": train_seconds / args.steps, "steps": args.steps,
            "microbatches": n, "batch_size": args.batch_size, "device": args.device,
            "model": {"width": args.width, "depth": args.depth, "context": args.context}}


def report(path: Path) -> str:
    runs = json.loads(path.read_text())
    modes = [m for m in ("std", "cross_fit", "variance_corrected", "full") if any(r["mode"] == m for r in runs)]
    by = {(r["mode"], r["seed"]): r for r in runs}
    lines = ["| mode | final val loss (mean ± sd) | seeds | Δ vs std per seed | optimizer per step (× std) "
             "| training step (× std) |", "|---|---|---|---|---|---|"]
    base_time = statistics.mean(r["optimizer_seconds_per_step"] for r in runs if r["mode"] == "std")
    base_step = statistics.mean(r["train_seconds_per_step"] for r in runs if r["mode"] == "std")
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        losses = [r["final_val_loss"] for r in rs]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        deltas = [r["final_val_loss"] - by[("std", r["seed"])]["final_val_loss"] for r in rs
                  if ("std", r["seed"]) in by]
        per_step = statistics.mean(r["optimizer_seconds_per_step"] for r in rs)
        train_step = statistics.mean(r["train_seconds_per_step"] for r in rs)
        lines.append(f"| {mode} | {statistics.mean(losses):.4f} ± {spread:.4f} | {len(rs)} | "
                     + ", ".join(f"{d:+.4f}" for d in deltas)
                     + f" | {per_step * 1e3:.2f} ms ({per_step / base_time:.2f}×)"
                     f" | {train_step * 1e3:.1f} ms ({train_step / base_step:.2f}×) |")
    return "\n".join(lines)


def plot(path: Path, image: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        steps, losses = zip(*r["curve"])
        colour = f"C{('std', 'cross_fit', 'variance_corrected', 'full').index(r['mode'])}"
        ax.plot(steps, losses, color=colour, alpha=0.7,
                label=r["mode"] if r["seed"] == min(x["seed"] for x in runs) else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("AdamW: bias-correction modes, each seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(image, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bias_correction/runs.json"))
    p.add_argument("--report", type=Path, default=None, help="print the table of a finished study and plot it")
    p.add_argument("--modes", nargs="+", default=["std", "full"],
                   choices=["std", "cross_fit", "variance_corrected", "full"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="windows per microbatch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    args = p.parse_args(argv)
    if args.report is not None:
        print(report(args.report))
        plot(args.report, args.report.with_suffix(".png"))
        return 0
    config = GPTConfig(width=args.width, depth=args.depth, heads=max(1, args.width // 32), context=args.context)
    workload = LanguageModel(Path(args.data_dir), config, batch_size=args.batch_size, device=args.device)
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    seen = {(r["mode"], r["seed"]) for r in done}
    for seed in args.seeds:
        for mode in args.modes:
            if (mode, seed) in seen:
                continue
            r = run(workload, mode, seed, args)
            done.append(r)
            print(f"{mode} seed={seed}: {r['final_val_loss']:.4f}", file=sys.stderr, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(done, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
