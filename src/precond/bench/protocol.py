"""The fair protocol: per optimizer a short learning-rate sweep, then the best rate on several seeds.

1. Sweep: each optimizer at ``lr_points`` rates on a log grid (factor 3) around its centre, seed 0,
   ``sweep_steps`` steps; the rate with the lowest final validation loss wins (diverged runs lose).
2. Full runs: the winning rate for ``steps`` steps on seeds ``0..seeds-1``.
3. Target: AdamW's final validation loss (mean over seeds). Steps- and time-to-target are read off each
   optimizer's seed-averaged validation curve: the first evaluation at or below the target.

Every run is written to ``<runs_dir>/<name>/runs/*.json`` as soon as it ends; a rerun with the same
configuration reuses them, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .optimizers import SPECS
from .runner import train_run
from .workloads import make_workload

__all__ = ["BenchConfig", "lr_grid", "run_benchmark", "summarize", "steps_to_target"]


@dataclass
class BenchConfig:
    preset: dict[str, Any]
    optimizers: list[str]
    device: str = "cpu"
    name: str = "cpu-lm"
    runs_dir: str = "runs"
    data_dir: str = "data"
    lr_factor: float = 3.0
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must match for saved runs to be reused (the optimizer list may grow)."""
        return {"preset": self.preset, "device": self.device.split(":")[0], "lr_factor": self.lr_factor}


def lr_grid(center: float, points: int, factor: float) -> list[float]:
    return [float(center * factor ** (i - (points - 1) / 2)) for i in range(points)]


def steps_to_target(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """First (step, seconds) whose validation loss is at or below ``target``."""
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return None


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """Seed-averaged curve over the evaluation steps all runs share."""
    steps = set.intersection(*(set(s for s, _, _ in r["curve"]) for r in runs))
    out = []
    for step in sorted(steps):
        points = [next(p for p in r["curve"] if p[0] == step) for r in runs]
        out.append((step, float(np.mean([p[1] for p in points])), float(np.mean([p[2] for p in points]))))
    return out


def _run_path(root: Path, phase: str, name: str, lr: float, seed: int) -> Path:
    return root / "runs" / f"{phase}-{name}-lr{lr:.4g}-seed{seed}.json"


def run_benchmark(config: BenchConfig, progress_factory=None, train: bool = True) -> dict[str, Any]:
    """Run (or, with ``train=False``, only collect) every planned run; see the module docstring."""
    root = Path(config.runs_dir) / config.name
    root.mkdir(parents=True, exist_ok=True)
    identity_file = root / "config.json"
    if identity_file.exists():
        saved = json.loads(identity_file.read_text())
        if saved != json.loads(json.dumps(config.identity())):
            raise ValueError(f"{root} holds runs of another configuration; choose another --name "
                             f"or remove the folder (saved: {saved})")
    identity_file.write_text(json.dumps(config.identity(), indent=1))
    preset = config.preset
    workload = None  # built on the first run that must be trained: a finished benchmark re-reports anywhere
    workload_file = root / "workload.json"
    order = sorted(config.optimizers, key=lambda n: n != "AdamW")  # AdamW first: its lr serves the routed params
    plan = []
    for name in order:
        plan += [("sweep", name, lr, 0, preset["sweep_steps"])
                 for lr in lr_grid(SPECS[name].center_lr, preset["lr_points"], config.lr_factor)]
        plan += [("full", name, None, seed, preset["steps"]) for seed in range(preset["seeds"])]
    total = sum(p[4] for p in plan)
    progress = progress_factory(total) if progress_factory else None

    results: dict[str, dict[str, Any]] = {}
    adamw_lr = SPECS["AdamW"].center_lr
    for phase, name, lr, seed, steps in plan:
        entry = results.setdefault(name, {"sweep": [], "full": []})
        if phase == "full":
            if not train and not entry["sweep"]:
                continue
            finite = [r for r in entry["sweep"] if not r["diverged"]]
            lr = min(finite, key=lambda r: r["final_val_loss"])["lr"] if finite else SPECS[name].center_lr
            entry["best_lr"] = lr
            if name == "AdamW":
                adamw_lr = lr
        path = _run_path(root, phase, name, lr, seed)
        if path.exists():
            run = json.loads(path.read_text())
            if progress:
                progress.skip(steps)
        elif not train:
            continue
        else:
            if workload is None:
                workload = make_workload(preset, Path(config.data_dir), config.device)
                workload_file.write_text(json.dumps(workload.describe(), indent=1))
            tick = progress.run(f"{phase} {name} lr={lr:.3g} seed={seed}") if progress else None
            run = train_run(workload, SPECS[name], lr, seed, steps, preset["eval_every"], config.device,
                            adamw_lr, tick)
            run["phase"] = phase
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run, indent=1))
            if progress:  # a diverged run stops early: its remaining steps leave the bar
                progress.skip(steps - run["steps_done"])
        entry[phase].append(run)
    if progress:
        progress.close()
    results = {name: entry for name, entry in results.items() if entry["full"]}
    if not results:
        raise ValueError(f"no finished full runs under {root}")
    summary = summarize(results)
    return {"config": asdict(config), "workload": json.loads(workload_file.read_text()), "results": results,
            "summary": summary}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: final loss statistics, steps/time to AdamW's final loss, costs."""
    finals = {n: [r["final_val_loss"] for r in e["full"]] for n, e in results.items()}
    target = float(np.mean(finals["AdamW"])) if "AdamW" in finals else min(float(np.mean(v)) for v in finals.values())
    reference = None
    out: dict[str, dict[str, Any]] = {}
    for name, entry in results.items():
        runs = [r for r in entry["full"] if not r["diverged"]]
        losses = finals[name]
        curve = mean_curve(runs) if runs else []
        hit = steps_to_target(curve, target) if curve else None
        out[name] = {
            "best_lr": entry.get("best_lr"), "target": target,
            "final_val_mean": float(np.mean(losses)),
            "final_val_spread": float((max(losses) - min(losses)) / 2) if len(losses) > 1 else 0.0,
            "seeds": len(losses), "diverged_seeds": sum(r["diverged"] for r in entry["full"]),
            "steps_to_target": hit[0] if hit else None, "seconds_to_target": hit[1] if hit else None,
            "seconds_total": float(np.mean([r["train_seconds"] for r in runs])) if runs else math.nan,
            "optimizer_share": float(np.mean([r["optimizer_share"] for r in runs])) if runs else math.nan,
            "state_mb": entry["full"][0]["state_bytes"] / 2**20,
            "peak_memory_mb": (entry["full"][0]["peak_memory_bytes"] or 0) / 2**20 or None,
            "refreshes": entry["full"][0]["refreshes"], "skipped_refreshes": entry["full"][0]["skipped_refreshes"],
            "failures": entry["full"][0]["failures"], "curve": curve,
        }
        if name == "AdamW":
            reference = out[name]
    for row in out.values():
        for key in ("steps_to_target", "seconds_to_target"):
            ok = reference and row[key] is not None and reference[key]
            row[key.replace("_to_target", "_ratio")] = row[key] / reference[key] if ok else None
    return out
