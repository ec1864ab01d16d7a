"""Does correcting the preconditioner's microbatch bias lower the held-out loss at equal tokens?

    python benchmarks/bias_correction_study.py                                  # CPU: AdamW, std vs full, 3 seeds
    python benchmarks/bias_correction_study.py --optimizer Sophia Shampoo --modes std variance_corrected full
    python benchmarks/bias_correction_study.py --device cuda --width 256 --depth 4 --steps 400
    python benchmarks/bias_correction_study.py --report benchmarks/results/bias_correction/runs.json
    # the ablation of the paper's headline: the schedule apart from the correction
    python benchmarks/bias_correction_study.py --device cuda --modes std loo_jensen full --arm baseline headline
    # each mode's rate grown on seed 0 until its best is interior, then seeds 1 and 2 there
    python benchmarks/bias_correction_study.py --modes std loo_jensen --lr 0.001 0.002 0.004 --tune

``--arm baseline`` decays every rate to 0 (the authors' baseline); ``--arm headline`` is their headline run's
schedule: the dense (non-embedding) rate ×1.5 and a cosine floor of 0.2. In every arm the embedding and the
output head train with plain AdamW (``bias_correction="std"``) at the base rate, as in the authors' LOO run, and
every other parameter with the mode; so ``std`` at ``headline`` against ``std`` at ``baseline`` is the
schedule's share of a gain, and a mode against ``std`` within one arm the correction's. ``--lr`` tunes each
arm's base rate (runs are keyed by optimizer, mode, seed, arm and rate).

Each step of a byte-level GPT (the benchmark's model and data, warmup + cosine schedule) takes ``--microbatches``
microbatches of ``--batch-size`` windows through an ordinary accumulation loop with ``optimizer.accumulate(n)``
after each backward (Sophia's sampled-label pass every 10 steps too); every mode sees the same windows in
the same order (equal tokens). Hyper-parameters are the benchmark's (``precond_bench.optimizers``), the rate
``--lr`` or the benchmark's. The report gives the
final validation loss per mode (mean ± standard deviation over seeds), its difference to ``std`` per seed,
and the optimizer's seconds per step (``accumulate`` calls and ``step``) relative to ``std``. Runs are
appended to ``--out`` as they finish; a rerun skips those already there (one ``--out`` holds one model, step
count, batch and device kind: another is refused). With ``--time-limit SECONDS`` no run starts that would end
past it (paced by the longest saved run of the same optimizer, else of any); a rerun goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import precond
from precond_bench.model import GPTConfig
from precond_bench.runner import lr_factor, timing_conditions
from precond_bench.study import run_or_report, study_parser
from precond_bench.workloads import COSINE, LanguageModel


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# The benchmark's hyper-parameters (precond_bench.optimizers), with the bias-correction mode added.
OPTIMIZERS = {
    "AdamW": (3e-3, lambda ps, lr, mode: precond.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                                       bias_correction=mode)),
    "Sophia": (1e-3, lambda ps, lr, mode: precond.Sophia(ps, lr=lr, rho=0.04, weight_decay=0.2,
                                                         bias_correction=mode)),
    "Shampoo": (3e-3, lambda ps, lr, mode: precond.Shampoo(
        ps, lr=lr, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam",
        grafting_beta2=0.95, grafting_epsilon=1e-8, bias_correction=mode)),
}


def accumulation_pass(workload: LanguageModel, model, opt, batches, sampled: bool) -> tuple[int, float]:
    """Backward of each microbatch's loss / n, ``accumulate(n)`` after each; returns the labels seen and the
    seconds ``accumulate`` took. ``sampled``: the loss on labels drawn from the model's own predictions
    (Sophia's curvature pass)."""
    n, labels, seconds = len(batches), 0, 0.0
    for batch in batches:
        with torch.autocast(workload.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=workload.device.startswith("cuda")):
            logits, targets = workload.logits_and_targets(model, batch)
        if sampled:
            targets = torch.distributions.Categorical(logits=logits.float().detach()).sample()
        (F.cross_entropy(logits.float(), targets) / n).backward()
        labels += targets.numel()
        sync(workload.device)
        start = time.perf_counter()
        opt.accumulate(n)
        sync(workload.device)
        seconds += time.perf_counter() - start
    return labels, seconds


# The arms of the ablation: (rate multiplier of the dense parameters, the cosine's floor).
ARMS = {"baseline": (1.0, 0.0), "headline": (1.5, 0.2)}


def param_groups(model, lr: float, mode: str, arm: str) -> list[dict]:
    """Embedding and output head on plain AdamW at ``lr``; the rest with ``mode`` at the arm's dense rate."""
    sparse = [p for n, p in model.named_parameters() if n.split(".")[0] in ("embed", "lm_head")]
    dense = [p for n, p in model.named_parameters() if n.split(".")[0] not in ("embed", "lm_head")]
    return [{"params": dense, "lr": lr * ARMS[arm][0], "bias_correction": mode},
            {"params": sparse, "lr": lr, "bias_correction": "std"}]


def run(workload: LanguageModel, name: str, mode: str, seed: int, args: argparse.Namespace, arm: str = "baseline",
        lr: float | None = None) -> dict:
    model = workload.model(seed)
    default_lr, build = OPTIMIZERS[name]
    lr = lr or default_lr
    opt = build(param_groups(model, lr, mode, arm), lr, mode)
    base = [group["lr"] for group in opt.param_groups]
    schedule = {**COSINE, "floor": ARMS[arm][1]}
    n, optimizer_seconds, eval_seconds, curve = args.microbatches, 0.0, 0.0, []
    began = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group, rate in zip(opt.param_groups, base):
            group["lr"] = rate * lr_factor(step, args.steps, schedule)
        batches = [workload.batch(step * n + j, seed) for j in range(n)]
        optimizer_seconds += accumulation_pass(workload, model, opt, batches, sampled=False)[1]
        start = time.perf_counter()
        opt.step()
        sync(args.device)
        optimizer_seconds += time.perf_counter() - start
        opt.zero_grad()
        if name == "Sophia" and opt.hessian_update_due():
            labels, seconds = accumulation_pass(workload, model, opt, batches, sampled=True)
            start = time.perf_counter()
            opt.update_hessian(batch_size=labels)
            sync(args.device)
            optimizer_seconds += seconds + time.perf_counter() - start
            opt.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            start = time.perf_counter()
            model.eval()
            curve.append((step, workload.validation_loss(model)))
            model.train()
            eval_seconds += time.perf_counter() - start
    wall_seconds = time.perf_counter() - began
    train_seconds = wall_seconds - eval_seconds
    return {"optimizer": name, "mode": mode, "seed": seed, "lr": lr, "arm": arm, "final_val_loss": curve[-1][1],
            "curve": curve, "optimizer_seconds_per_step": optimizer_seconds / args.steps,
            "train_seconds_per_step": train_seconds / args.steps, "wall_seconds": wall_seconds, "steps": args.steps,
            "microbatches": n, "batch_size": args.batch_size, "device": args.device,
            "model": {"width": args.width, "depth": args.depth, "context": args.context},
            "conditions": timing_conditions(args.device)}


MODES = ("std", "cross_fit", "variance_corrected", "full", "loo", "loo_jensen")  # the last two: AdamW's


def _arm(run: dict) -> str:
    """Runs made before the arms existed: every parameter with the mode, the benchmark's cosine (floor 0.1)."""
    return run.get("arm", "all parameters, floor 0.1")


def _key(run: dict) -> tuple:
    """What names a saved run: optimizer, mode, seed, arm and rate."""
    return run.get("optimizer", "AdamW"), run["mode"], run["seed"], _arm(run), run["lr"]


def report(path: Path) -> str:
    """Per optimizer, arm and rate: each mode's final loss and its difference to ``std`` of the same arm and
    rate, seed by seed (the correction's share); ``std`` rows of the headline arm also give their difference to
    ``std`` at the baseline arm and the same rate (the schedule's share)."""
    runs = json.loads(path.read_text())
    lines = ["| optimizer | arm | lr | mode | final val loss (mean ± sd) | seeds | Δ vs std per seed | optimizer per "
             "step (× std) | training step (× std) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in OPTIMIZERS:
        mine = [r for r in runs if r.get("optimizer", "AdamW") == name]
        for arm, lr in sorted({(_arm(r), r["lr"]) for r in mine}):
            cell = [r for r in mine if _arm(r) == arm and r["lr"] == lr]
            std = {r["seed"]: r for r in cell if r["mode"] == "std"}
            baseline = {r["seed"]: r for r in mine if _arm(r) == "baseline" and r["lr"] == lr and r["mode"] == "std"}
            # a rate run for some modes only (to bring a mode's best rate inside its grid) has no std to compare
            base_time = statistics.mean(r["optimizer_seconds_per_step"] for r in std.values()) if std else None
            base_step = statistics.mean(r["train_seconds_per_step"] for r in std.values()) if std else None
            for mode in (m for m in MODES if any(r["mode"] == m for r in cell)):
                rs = [r for r in cell if r["mode"] == mode]
                losses = [r["final_val_loss"] for r in rs]
                spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
                against = baseline if mode == "std" and arm == "headline" else std
                deltas = [r["final_val_loss"] - against[r["seed"]]["final_val_loss"] for r in rs if r["seed"] in against]
                label = "std vs baseline std: " if against is baseline else ""
                per_step = statistics.mean(r["optimizer_seconds_per_step"] for r in rs)
                train_step = statistics.mean(r["train_seconds_per_step"] for r in rs)
                ratio = (lambda value, base: f" ({value / base:.2f}×)" if base else "")
                lines.append(f"| {name} | {arm} | {lr:g} | {mode} | {statistics.mean(losses):.4f} ± {spread:.4f} | "
                             f"{len(rs)} | {label}" + (", ".join(f"{d:+.4f}" for d in deltas) or "—")
                             + f" | {per_step * 1e3:.2f} ms{ratio(per_step, base_time)}"
                             f" | {train_step * 1e3:.1f} ms{ratio(train_step, base_step)} |")
    return "\n".join(lines + ["", *best_rates(runs)])


def best_rates(runs: list[dict]) -> list[str]:
    """Per optimizer, arm and mode: the rate with the lowest mean final loss, and whether it is inside the
    rates that mode ran (an edge best may be beaten beyond the edge)."""
    lines = []
    for name in OPTIMIZERS:
        mine = [r for r in runs if r.get("optimizer", "AdamW") == name]
        for arm in sorted({_arm(r) for r in mine}):
            parts = []
            for mode in (m for m in MODES if any(r["mode"] == m and _arm(r) == arm for r in mine)):
                by_rate = {lr: [r["final_val_loss"] for r in mine if _arm(r) == arm and r["mode"] == mode
                                and r["lr"] == lr] for lr in {r["lr"] for r in mine}}
                by_rate = {lr: losses for lr, losses in by_rate.items() if losses}
                best = min(by_rate, key=lambda lr: statistics.mean(by_rate[lr]))
                rates = sorted(by_rate)
                where = ("one rate" if len(rates) == 1 else "edge" if best in (rates[0], rates[-1]) else "interior")
                spread = statistics.stdev(by_rate[best]) if len(by_rate[best]) > 1 else 0.0
                parts.append(f"{mode} {statistics.mean(by_rate[best]):.4f} ± {spread:.4f} at {best:g} ({where})")
            lines.append(f"Best rate per mode, {name}, {arm}: " + "; ".join(parts) + ".")
    return lines


def plot(path: Path, image: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = json.loads(path.read_text())
    names = [n for n in OPTIMIZERS if any(r.get("optimizer", "AdamW") == n for r in runs)]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in runs if r.get("optimizer", "AdamW") == name]
        first = min(r["seed"] for r in mine)
        for r in mine:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, color=f"C{MODES.index(r['mode'])}", alpha=0.7,
                    label=r["mode"] if r["seed"] == first else None)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{name}: bias-correction modes, each seed")
        ax.legend()
    fig.tight_layout()
    fig.savefig(image, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "benchmarks/results/bias_correction/runs.json", device="cpu")
    p.add_argument("--optimizer", nargs="+", default=["AdamW"], choices=list(OPTIMIZERS))
    p.add_argument("--modes", nargs="+", default=["std", "full"], choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="windows per microbatch")
    p.add_argument("--lr", type=float, nargs="+", default=[None],
                   help="base rates to run (default: the benchmark's rate of each optimizer)")
    p.add_argument("--arm", nargs="+", default=["baseline"], choices=list(ARMS),
                   help="baseline: decay to 0; headline: dense rate ×1.5, floor 0.2 (see the module docstring)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--tune", action="store_true",
                   help="grow each mode's rates on the first seed until its best is interior, then run the other "
                        "seeds at that best (see tune())")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no run that would end past this many seconds (paced by the saved runs); rerun to go on")
    return run_or_report(p.parse_args(argv), run_study, report, plot)


def configuration(run: dict) -> dict:
    """What runs must share to sit in one results file: model, steps, batch and the kind of device."""
    return {"model": run.get("model"), "steps": run.get("steps"), "microbatches": run.get("microbatches"),
            "batch_size": run.get("batch_size"), "device": str(run.get("device", "cpu")).split(":")[0]}


def expected_seconds(done: list[dict], name: str) -> float | None:
    """A run's expected wall-clock: the longest saved run of optimizer ``name``, else of any (``None``: no run
    saved). Runs saved before ``wall_seconds`` was recorded count their training time plus 20%."""
    def wall(r: dict) -> float:
        return r.get("wall_seconds") or 1.2 * r["train_seconds_per_step"] * r["steps"]
    mine = [wall(r) for r in done if r.get("optimizer", "AdamW") == name]
    return max(mine or [wall(r) for r in done], default=None)


MAX_TUNE_STEPS = 6  # further rates --tune tries past the grid before giving up on an edge


def tune(name: str, mode: str, arm: str, rates: list[float], seeds: list[int], done: list[dict], make) -> None:
    """``--tune``: the rates on the first seed; while the best of every rate saved for this mode on that seed
    is the lowest or the highest, one grid step past it (the ratio of ``rates``' first two, else 2); then the
    other seeds at the best. ``make(name, mode, seed, arm, lr)`` runs one configuration, False past the time
    limit (the rest is left to a rerun, which reads the saved runs and goes on)."""
    ratio = sorted(rates)[1] / sorted(rates)[0] if len(set(rates)) > 1 else 2.0
    first = seeds[0]
    if not all([make(name, mode, first, arm, lr) for lr in rates]):
        return
    for grown in range(MAX_TUNE_STEPS + 1):
        loss = {r["lr"]: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf for r in done
                if _key(r)[:4] == (name, mode, first, arm)}
        best = min(loss, key=loss.get)
        if min(loss) < best < max(loss):
            break
        if grown == MAX_TUNE_STEPS:
            print(f"{name} {arm} {mode}: the best rate, {best:g}, is still at an edge after {MAX_TUNE_STEPS} "
                  "further rates; its other seeds are not run", file=sys.stderr)
            return
        if not make(name, mode, first, arm, best / ratio if best == min(loss) else best * ratio):
            return
    for seed in seeds[1:]:
        make(name, mode, seed, arm, best)


def run_study(args: argparse.Namespace) -> None:
    config = GPTConfig(width=args.width, depth=args.depth, heads=max(1, args.width // 32), context=args.context)
    workload = LanguageModel(Path(args.data_dir), config, batch_size=args.batch_size, device=args.device)
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    wanted = configuration({"model": {"width": args.width, "depth": args.depth, "context": args.context},
                            "steps": args.steps, "microbatches": args.microbatches, "batch_size": args.batch_size,
                            "device": args.device})
    other = next((configuration(r) for r in done if configuration(r) != wanted), None)
    if other is not None:
        raise SystemExit(f"{args.out} holds runs of another configuration ({other}, not {wanted}); "
                         "choose another --out")
    started, waiting = time.perf_counter(), []

    def make(name: str, mode: str, seed: int, arm: str, lr: float) -> bool:
        """Run one configuration unless saved; False when the time limit leaves it for a rerun."""
        if any(_key(r) == (name, mode, seed, arm, lr) for r in done):
            return True
        need = expected_seconds(done, name) or 0.0
        if args.time_limit is not None and time.perf_counter() - started + need > args.time_limit:
            waiting.append(f"{name} {arm} lr={lr:g} {mode} seed={seed}")
            return False
        r = run(workload, name, mode, seed, args, arm, lr)
        done.append(r)
        print(f"{name} {arm} lr={lr:g} {mode} seed={seed}: {r['final_val_loss']:.4f}", file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1))
        return True

    for name in args.optimizer:
        modes = [m for m in args.modes if name == "AdamW" or m not in ("loo", "loo_jensen")]
        rates = [rate or OPTIMIZERS[name][0] for rate in args.lr]
        if args.tune:
            for arm in args.arm:
                for mode in modes:
                    tune(name, mode, arm, rates, args.seeds, done, make)
            continue
        for lr in rates:
            for arm in args.arm:
                for seed in args.seeds:
                    for mode in modes:
                        make(name, mode, seed, arm, lr)
    if waiting:
        print(f"{len(waiting)} runs not made (--time-limit; rerun to go on): " + "; ".join(waiting), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
