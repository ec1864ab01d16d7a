"""The fair protocol: per optimizer a learning-rate sweep, then the best rate on several seeds.

Every run follows the preset's schedule (default: linear warmup over 5% of the run, then a cosine decay to
10% of the rate; ``constant`` is the other choice), the same for every optimizer; a sweep run is a shorter
run with its own schedule.

1. Sweep: each optimizer at ``lr_points`` rates on a log grid (factor 3) around its centre (its spec's, or one
   given in ``centers``: the best rate of a neighbouring batch size, say), seed 0,
   ``sweep_steps`` steps; the rate with the lowest final validation loss wins (diverged runs lose). While
   the winner sits on the grid's edge the grid grows by one rate beyond it, ``edge_points`` times at most,
   so that no optimizer is judged at a rate its own grid cut short.
2. AdamW (swept first) then sweeps its weight decay over ``ADAMW_WEIGHT_DECAYS`` at its best rate. Its tuned
   (rate, weight decay) trains every parameter that Muon, ASGO and their peers route to AdamW.
3. Full runs: the winning rate for ``steps`` steps on seeds ``0..seeds-1``.
   With ``rate_from`` (``{peer: twin}``), a peer of the same algorithm as one of ours skips the sweep and
   runs at the rate its twin's sweep picked (the same update rule: the same best rate, and its sweep's device
   time saved); the report marks that rate as the twin's.
4. With ``check_rates``, the named optimizers also run the full budget (seed 0) one grid step either side of
   the winning rate, and further, as the sweep grows, while the lowest full run sits at an edge: does the
   sweep's short run pick the full run's best rate? (``rate_check`` in the summary and a line under the
   table; where AdamW's check finds a better rate, the report also reads every row against that run's loss.)
   With ``adopt_checked`` as well, an optimizer whose check found a lower full run takes that rate for all
   its full runs (and the peers that take its rate follow): the sweep's rate keeps only the seed-0 run the
   check is centred on. Seed 0 at the adopted rate is its check run when that was made under the same
   timing conditions (device, torch, threads) as the sweep rate's full run, and is trained again otherwise,
   so that its wall-clock belongs to the table. The tuned AdamW setting that other optimizers' routed
   parameters use stays the sweep's.
5. Target: AdamW's final validation loss (mean over seeds). Steps- and time-to-target are read off each
   optimizer's seed-averaged validation curve (evaluated every ``eval_every`` steps, ≤ 2% of the run in the
   presets): the first evaluation at or below the target.

Every run is written to ``<runs_dir>/<name>/runs/*.json`` as soon as it ends; a rerun with the same
configuration reuses them, so an interrupted sweep resumes where it stopped (more seeds or sweep rates are
the same configuration: they add runs). With ``time_limit`` the run in
progress when the limit passes saves a checkpoint (``<runs_dir>/<name>/partial/*.pt``: weights, the
optimizer's ``state_dict``, random states, curve and clocks) and the next call resumes it bit for bit, so a
run may be longer than one job; the runs not reached are listed (what a job with a wall-clock limit needs).
With ``fit`` as well, a call starts or resumes only the runs it expects to finish before the limit (the pace
of this benchmark's saved runs of the same optimizer, else of its slowest optimizer; a run with no saved pace
to go by starts): for the last call on a machine, whose checkpoints would be lost with it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .optimizers import ADAMW_WEIGHT_DECAYS, SPECS, AdamWSetting
from .runner import train_run
from .workloads import make_workload

__all__ = ["BenchConfig", "lr_grid", "run_benchmark", "plan_benchmark", "summarize", "steps_to_target", "mean_curve",
           "seed_band"]


@dataclass
class BenchConfig:
    preset: dict[str, Any]
    optimizers: list[str]
    device: str = "cpu"
    name: str = "cpu-lm"
    runs_dir: str = "runs"
    data_dir: str = "data"
    lr_factor: float = 3.0
    edge_points: int = 4  # extra sweep rates beyond the grid's edge while the best rate sits on it
    time_limit: float | None = None  # seconds: the run in progress then checkpoints, the rest wait
    stop_at: int | None = None  # checkpoint every run at this step, as a time limit would (to test resuming)
    check_rates: tuple[str, ...] = ()  # optimizers whose full run is repeated at the neighbouring rates
    adopt_checked: bool = False  # a check's better rate becomes the rate of the optimizer's full runs
    fit: bool = False  # with time_limit: start (or resume) only the runs expected to end before it
    centers: dict[str, float] = field(default_factory=dict)  # a grid centre other than the optimizer's default
    rate_from: dict[str, str] = field(default_factory=dict)  # peer -> twin: the peer runs at the twin's best rate

    def identity(self) -> dict[str, Any]:
        """The configuration, as ``config.json`` records it; :func:`reuse_key` says which part must match."""
        return {"preset": self.preset, "device": self.device.split(":")[0], "lr_factor": self.lr_factor}


# How many seeds and sweep rates a call plans picks which runs it makes, not how any one run trains: a folder
# made with one seed takes a second, and a wider grid, without starting over.
PLAN_ONLY = ("seeds", "lr_points")


def reuse_key(identity: dict[str, Any]) -> dict[str, Any]:
    """What must match for saved runs to be reused: the identity less :data:`PLAN_ONLY` (the optimizer list
    may grow too)."""
    preset = {k: v for k, v in identity["preset"].items() if k not in PLAN_ONLY}
    return {**identity, "preset": preset}


def lr_grid(center: float, points: int, factor: float) -> list[float]:
    return [float(center * factor ** (i - (points - 1) / 2)) for i in range(points)]


def steps_to_target(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """First (step, seconds) whose validation loss is at or below ``target``."""
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return None


SPIKE_RATIO = 1.2  # a validation loss this many times its lowest so far is a spike, not evaluation noise


def loss_spike(curve: list[tuple[int, float, float]]) -> dict[str, Any] | None:
    """The largest rise of a curve's validation loss over its lowest value so far, when it reaches
    :data:`SPIKE_RATIO`: where the loss stood (``from``), its highest point (``peak``) and the first step at
    which it was back at or below the level it left (``recovered``, None if never). A sweep whose schedule
    leaves the peak rate at once can pick a rate that the full run, held near the peak for longer, cannot
    keep; the spike is how that shows."""
    worst, lowest = None, None
    for step, _, loss in curve:
        if lowest is not None and loss >= SPIKE_RATIO * lowest[1] and (worst is None or loss / lowest[1] > worst[0]):
            worst = (loss / lowest[1], lowest, (step, loss))
        if lowest is None or loss < lowest[1]:
            lowest = (step, loss)
    if worst is None:
        return None
    _, (start, level), (peak, high) = worst
    back = next((s for s, _, loss in curve if s > peak and loss <= level), None)
    return {"from": [start, level], "peak": [peak, high], "recovered": back}


def _shared_points(runs: list[dict[str, Any]]):
    """Per evaluation step that all runs share: (step, [each run's (step, seconds, loss)])."""
    steps = set.intersection(*(set(s for s, _, _ in r["curve"]) for r in runs))
    for step in sorted(steps):
        yield step, [next(p for p in r["curve"] if p[0] == step) for r in runs]


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """Seed-averaged curve over the evaluation steps all runs share."""
    return [(step, float(np.mean([p[1] for p in points])), float(np.mean([p[2] for p in points])))
            for step, points in _shared_points(runs)]


def seed_band(runs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, lowest, highest) validation loss over the seeds at each shared evaluation step."""
    return [(step, min(p[2] for p in points), max(p[2] for p in points)) for step, points in _shared_points(runs)]


def _run_path(root: Path, phase: str, name: str, lr: float, seed: int, folder: str = "runs",
              suffix: str = ".json") -> Path:
    return root / folder / f"{phase}-{name}-lr{lr:.4g}-seed{seed}{suffix}"


def _same_adamw(run: dict[str, Any], adamw: AdamWSetting) -> bool:
    saved = run.get("adamw", {"lr": run.get("adamw_lr"), "weight_decay": None})
    return saved == {"lr": adamw.lr, "weight_decay": adamw.weight_decay}


class _Runs:
    """Loads a saved run or trains it, within an optional time limit."""

    def __init__(self, config: BenchConfig, root: Path, progress, train: bool):
        self.config, self.root, self.progress, self.train = config, root, progress, train
        self.workload = None  # built on the first run that must be trained: a finished benchmark re-reports anywhere
        self.started = time.perf_counter()
        self.unfinished: list[str] = []
        self.pending: list[tuple[str, float | None]] = []  # (run, expected seconds): what a plan lists
        self.stop_at = config.stop_at

    def get(self, phase: str, name: str, lr: float, seed: int, steps: int, adamw: AdamWSetting) -> dict | None:
        """The run, or ``None`` when it is not saved and may not (or, in time, cannot) be trained."""
        spec = SPECS[name]
        path = _run_path(self.root, phase, name, lr, seed)
        if path.exists():
            run = json.loads(path.read_text())
            # parameters trained with AdamW's tuned setting: a run made under another one is stale
            if not spec.uses_adamw or _same_adamw(run, adamw):
                if self.progress:
                    self.progress.skip(steps)
                return run
        limit = self.config.time_limit
        deadline = None if limit is None else self.started + limit
        checkpoint = _run_path(self.root, phase, name, lr, seed, "partial", ".pt")
        paced = not self.train or (self.config.fit and deadline is not None)
        need = self._seconds_needed(name, steps, checkpoint) if paced else None
        late = deadline is not None and time.perf_counter() + (need or 0.0) >= deadline
        if not self.train or late:
            label = f"{phase} {name} lr={lr:.4g} seed={seed}" + (" (checkpointed)" if checkpoint.exists() else "")
            self.unfinished.append(label + (f" (needs ~{need:.0f} s)" if need else ""))
            self.pending.append((label, need))
            if self.progress:
                self.progress.skip(steps)
            return None
        if self.workload is None:
            self.workload = make_workload(self.config.preset, Path(self.config.data_dir), self.config.device)
            (self.root / "workload.json").write_text(json.dumps(self.workload.describe(), indent=1))
        ticked = [0]
        tick = self.progress.run(f"{phase} {name} lr={lr:.3g} seed={seed}") if self.progress else None

        def counted(step: int, loss: float) -> None:
            ticked[0] += 1
            if tick is not None:
                tick(step, loss)

        run = train_run(self.workload, spec, lr, seed, steps, self.config.preset["eval_every"], self.config.device,
                        adamw, counted, self.config.preset.get("schedule"), checkpoint=checkpoint, deadline=deadline,
                        stop_at=self.stop_at, compile_step=self.config.preset.get("compile_step"))
        if self.progress:  # steps not trained in this call (made by an earlier one, after a divergence or the
            self.progress.skip(steps - ticked[0])  # limit) leave the bar
        if run is None:  # the limit passed: checkpointed, to go on at the next call
            self.unfinished.append(f"{phase} {name} lr={lr:.4g} seed={seed} (checkpointed)")
            return None
        run.update(phase=phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=1))
        return run


    def expect(self, label: str, name: str, steps: int) -> None:
        """A plan's entry for runs that cannot be named yet (their rate waits for a sweep): ``steps`` steps of
        ``name`` in all."""
        self.pending.append((label, self._seconds_needed(name, steps)))

    def _seconds_needed(self, name: str, steps: int, checkpoint: Path | None = None) -> float | None:
        """Expected seconds to finish a run of ``name``: its steps still to go (a checkpoint's sidecar says
        how far it got) at the slowest pace per step among this benchmark's saved runs of ``name``. Without
        one, a step is this folder's model part (the slowest saved step less its optimizer) plus ``name``'s
        optimizer step as saved beside it (a folder of the same model, another batch size: the optimizer's
        step does not depend on the batch), else the slowest saved step of any optimizer; ``None`` with no
        saved run here. A run saved before ``wall_seconds`` was recorded is paced by its training time plus
        10% (evaluations, set-up)."""
        saved = list(_saved_runs(self.root))
        here = _paces(saved)
        if not here:
            return None
        if name in here:
            pace = here[name][0]
        else:
            devices = {_device(run) for run in saved}  # the optimizer's step differs between devices
            beside = {}
            for sibling in self.root.parent.iterdir():
                if sibling != self.root and _same_model(self.root, sibling):
                    same_device = [run for run in _saved_runs(sibling) if _device(run) in devices]
                    for other, (_, opt) in _paces(same_device).items():
                        beside[other] = max(beside.get(other, 0.0), opt)
            model = max(wall - opt for wall, opt in here.values())
            pace = model + beside[name] if name in beside else max(wall for wall, _ in here.values())
        progress = None if checkpoint is None else checkpoint.with_suffix(".json")
        done = json.loads(progress.read_text())["step"] if progress is not None and progress.exists() else 0
        return pace * (steps - done)


def _saved_runs(root: Path):
    for path in (root / "runs").glob("*.json"):
        run = json.loads(path.read_text())
        if run.get("steps_done"):
            yield run


def _device(run: dict[str, Any]) -> str | None:
    return (run.get("conditions") or {}).get("device")


def _paces(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per optimizer, the slowest seconds per step among ``runs``: the whole step's (evaluations included) and
    its optimizer's."""
    paces: dict[str, tuple[float, float]] = {}
    for run in runs:
        wall = (run.get("wall_seconds") or 1.1 * run["train_seconds"]) / run["steps_done"]
        opt = run["optimizer_seconds"] / run["steps_done"]
        old = paces.get(run["optimizer"], (0.0, 0.0))
        paces[run["optimizer"]] = (max(old[0], wall), max(old[1], opt))
    return paces


def _same_model(root: Path, other: Path) -> bool:
    """Whether two benchmark folders train the same model on the same data (their batch may differ)."""
    configs = [folder / "config.json" for folder in (root, other)]
    if not all(c.exists() for c in configs):
        return False
    mine, theirs = (json.loads(c.read_text())["preset"] for c in configs)
    return all(mine.get(k) == theirs.get(k) for k in ("workload", "corpus", "gpt"))


def _best(sweep: list[dict[str, Any]]) -> dict[str, Any] | None:
    finite = [r for r in sweep if not r["diverged"]]
    return min(finite, key=lambda r: r["final_val_loss"]) if finite else None


def _next_edge_lr(sweep: list[dict[str, Any]], factor: float) -> float | None:
    """The rate one grid step beyond the sweep's edge when its best rate sits on that edge (or when every
    rate diverged: one step below the smallest); ``None`` when the best is inside the grid."""
    rates = sorted(r["lr"] for r in sweep)
    best = _best(sweep)
    if best is None or (best["lr"] == rates[0] and len(rates) > 1):
        return rates[0] / factor
    if best["lr"] == rates[-1] and len(rates) > 1:
        return rates[-1] * factor
    return None


def _check_rate(runs: _Runs, name: str, best: dict[str, Any], steps: int, factor: float,
                adamw: AdamWSetting, edge_points: int) -> dict[float, dict[str, Any] | None]:
    """Seed 0's full run at the best rate and one grid step either side, and, while the lowest of them sits
    at an edge of the rates checked, one more grid step beyond it (``edge_points`` times at most), as the
    sweep grows; by rate, ``None`` where not run yet."""
    checked = {best["lr"]: best}
    if runs.progress:
        runs.progress.grow(2 * steps)
    for lr in (best["lr"] / factor, best["lr"] * factor):
        checked[lr] = runs.get("check", name, lr, 0, steps, adamw)
    for _ in range(edge_points):
        if None in checked.values():
            break
        lr = _next_edge_lr(list(checked.values()), factor)
        if lr is None:
            break
        if runs.progress:
            runs.progress.grow(steps)
        checked[lr] = runs.get("check", name, lr, 0, steps, adamw)
    return dict(sorted(checked.items()))


def _losses(checked: dict[float, dict[str, Any] | None]) -> dict[float, float | None]:
    """A rate check's final losses (``None``: not run yet, or diverged)."""
    return {lr: (None if r is None or r["diverged"] else r["final_val_loss"]) for lr, r in checked.items()}


def lowest_rate(losses: dict[float, float | None]) -> float | None:
    """The rate of a rate check's lowest final loss (``None`` losses left out; ``None`` if none is left)."""
    finite = {float(lr): loss for lr, loss in losses.items() if loss is not None}
    return min(finite, key=finite.get) if finite else None


def _sweep_weight_decay(runs: _Runs, entry: dict[str, Any], best: dict[str, Any], steps: int) -> dict | None:
    """AdamW at its best rate with each other weight decay of the documented grid; the best run of all (its
    ``adamw`` entry holds the weight decay), or ``None`` while a run is missing."""
    entry["weight_decay_sweep"] = [runs.get(f"wd{wd:g}", "AdamW", best["lr"], 0, steps, AdamWSetting(best["lr"], wd))
                                   for wd in ADAMW_WEIGHT_DECAYS if wd != best["adamw"]["weight_decay"]]
    tried = [best] + entry["weight_decay_sweep"]
    return None if None in tried else min(tried, key=lambda r: r["final_val_loss"])


def _check_identity(config: BenchConfig, root: Path) -> None:
    """Refuse a folder whose saved runs were made under another configuration."""
    identity_file = root / "config.json"
    if identity_file.exists():
        saved = json.loads(identity_file.read_text())
        if reuse_key(saved) != reuse_key(json.loads(json.dumps(config.identity()))):
            raise ValueError(f"{root} holds runs of another configuration; choose another --name "
                             f"or remove the folder (saved: {saved})")


def run_benchmark(config: BenchConfig, progress_factory=None, train: bool = True) -> dict[str, Any]:
    """Run (or, with ``train=False``, only collect) every planned run; see the module docstring."""
    root = Path(config.runs_dir) / config.name
    root.mkdir(parents=True, exist_ok=True)
    _check_identity(config, root)
    (root / "config.json").write_text(json.dumps(config.identity(), indent=1))
    preset = config.preset
    total = len(config.optimizers) * (preset["lr_points"] * preset["sweep_steps"] + preset["seeds"] * preset["steps"])
    if "AdamW" in config.optimizers:
        total += (len(ADAMW_WEIGHT_DECAYS) - 1) * preset["sweep_steps"]
    progress = progress_factory(total) if progress_factory else None
    runs = _Runs(config, root, progress, train)
    results = _walk(config, runs)
    if progress:
        progress.close()
    results = {name: entry for name, entry in results.items() if len(entry["full"]) == preset["seeds"]}
    summary = summarize(results) if results else {}  # none finished yet: what a call cut by its limit may leave
    workload = root / "workload.json"  # written by the first run trained here
    return {"config": asdict(config), "workload": json.loads(workload.read_text()) if workload.exists() else {},
            "results": results, "summary": summary, "unfinished": runs.unfinished}


def plan_benchmark(config: BenchConfig) -> list[tuple[str, float | None]]:
    """The runs still to make, each with its expected seconds (paced as :meth:`_Runs._seconds_needed` says;
    ``None`` with no saved run to go by), training and writing nothing. Runs
    whose rate waits for a sweep are listed as one entry per optimizer; the rates a sweep adds beyond its
    grid's edge are not foreseen."""
    root = Path(config.runs_dir) / config.name
    _check_identity(config, root)
    runs = _Runs(config, root, None, train=False)
    _walk(config, runs)
    return runs.pending


def _walk(config: BenchConfig, runs: _Runs) -> dict[str, dict[str, Any]]:
    """The protocol's runs in order, each saved, trained or (not training) listed; per optimizer its sweep,
    best rate and full runs as far as they exist."""
    preset, progress = config.preset, runs.progress
    # AdamW first (its setting serves others), the peers that take a twin's rate last (after their twins)
    order = sorted(config.optimizers, key=lambda n: (n != "AdamW", n in config.rate_from))
    results: dict[str, dict[str, Any]] = {}
    adamw = AdamWSetting(SPECS["AdamW"].center_lr)
    full_steps = preset["seeds"] * preset["steps"]
    for position, name in enumerate(order):
        entry = results[name] = {"sweep": [], "full": []}
        if name in config.rate_from:
            twin = config.rate_from[name]
            if "best_lr" not in results.get(twin, {}):
                if progress:
                    progress.skip(full_steps)
                _expect_at_twins_rate(runs, config, name, full_steps)
                continue
            entry["best_lr"], entry["rate_from"] = results[twin]["best_lr"], twin
            _full_runs(runs, config, name, entry, adamw)
            continue
        grid = lr_grid(config.centers.get(name, SPECS[name].center_lr), preset["lr_points"], config.lr_factor)
        entry["sweep"] = [runs.get("sweep", name, lr, 0, preset["sweep_steps"], adamw) for lr in grid]
        for _ in range(config.edge_points):
            if None in entry["sweep"]:
                break
            lr = _next_edge_lr(entry["sweep"], config.lr_factor)
            if lr is None:
                break
            if progress:
                progress.grow(preset["sweep_steps"])
            entry["sweep"].append(runs.get("sweep", name, lr, 0, preset["sweep_steps"], adamw))
        best = _best(entry["sweep"]) if None not in entry["sweep"] else None
        if name == "AdamW" and best is not None:
            best = _sweep_weight_decay(runs, entry, best, preset["sweep_steps"])
        if None in entry["sweep"] or None in entry.get("weight_decay_sweep", []):  # unfinished: decides nothing
            entry["sweep"] = [r for r in entry["sweep"] if r is not None]
            if progress:
                progress.skip(full_steps)
            if name == "AdamW" and "weight_decay_sweep" not in entry:
                decays = len(ADAMW_WEIGHT_DECAYS) - 1
                runs.expect(f"AdamW's weight-decay sweep ({decays} runs) at its best rate", name,
                            decays * preset["sweep_steps"])
            runs.expect(f"full {name} at its sweep's best rate, {preset['seeds']} seed(s)", name, full_steps)
            if name == "AdamW":  # nor can the optimizers that use AdamW's tuned setting run
                for other in order[position + 1:]:
                    if other in config.rate_from:
                        _expect_at_twins_rate(runs, config, other, full_steps)
                    else:
                        runs.expect(f"{other}'s sweep ({preset['lr_points']} rate(s)) and full runs, after AdamW's",
                                    other, preset["lr_points"] * preset["sweep_steps"] + full_steps)
                break
            continue
        # every rate diverged: the full runs take the smallest, the likeliest to train (and show that it does not)
        entry["best_lr"] = best["lr"] if best else min(r["lr"] for r in entry["sweep"])
        if name == "AdamW":
            adamw = AdamWSetting(entry["best_lr"], best["adamw"]["weight_decay"] if best else adamw.weight_decay)
            entry["weight_decay"] = adamw.weight_decay
        _full_runs(runs, config, name, entry, adamw)
    return results


def _expect_at_twins_rate(runs: _Runs, config: BenchConfig, name: str, full_steps: int) -> None:
    """A plan's entry for a peer whose rate waits for its twin's sweep."""
    twin = config.rate_from[name]
    runs.expect(f"full {name} at {twin}'s best rate, after {twin}'s sweep", name, full_steps)


def _full_runs(runs: _Runs, config: BenchConfig, name: str, entry: dict[str, Any], adamw: AdamWSetting) -> None:
    """``name``'s full runs at ``entry["best_lr"]`` (those that exist go into ``entry["full"]``) and, if it is
    among ``check_rates``, seed 0's full runs one grid step either side; with ``adopt_checked``, the seeds
    after the first wait for the check, whose best rate they take."""
    preset, steps = config.preset, config.preset["steps"]
    checking = name in config.check_rates
    adopting = checking and config.adopt_checked
    seeds = 1 if adopting else preset["seeds"]
    full = [runs.get("full", name, entry["best_lr"], seed, steps, adamw) for seed in range(seeds)]
    if checking:
        if full[0] is None:
            runs.expect(f"check {name} at the two rates beside {entry['best_lr']:.4g}", name, 2 * steps)
        else:
            checked = _check_rate(runs, name, full[0], steps, config.lr_factor, adamw, config.edge_points)
            entry["rate_check"] = _losses(checked)
            entry["rate_check_diverged"] = sorted(lr for lr, r in checked.items() if r is not None and r["diverged"])
            if adopting:
                full = _at_checked_rate(runs, config, name, entry, adamw, checked)
    entry["full"] = [r for r in full if r is not None]


def _at_checked_rate(runs: _Runs, config: BenchConfig, name: str, entry: dict[str, Any], adamw: AdamWSetting,
                     checked: dict[float, dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """Every seed's full run at the rate whose check run ended lowest (``entry["best_lr"]`` becomes it, and
    ``entry["swept_lr"]`` keeps the sweep's where they differ); nothing while the check is unfinished."""
    preset, steps, center = config.preset, config.preset["steps"], checked[entry["best_lr"]]
    if None in checked.values():
        if runs.progress:
            runs.progress.skip((preset["seeds"] - 1) * steps)
        runs.expect(f"full {name} at its checked rate, {preset['seeds']} seed(s), after its rate check", name,
                    preset["seeds"] * steps)
        return [center]
    lr = lowest_rate(_losses(checked)) or entry["best_lr"]
    if lr == entry["best_lr"]:
        return [center] + [runs.get("full", name, lr, seed, steps, adamw) for seed in range(1, preset["seeds"])]
    entry["swept_lr"], entry["best_lr"] = entry["best_lr"], lr
    first = checked[lr] if _timing_key(checked[lr]) == _timing_key(center) else None
    if first is None and runs.progress:
        runs.progress.grow(steps)
    return [first or runs.get("full", name, lr, 0, steps, adamw)] + [
        runs.get("full", name, lr, seed, steps, adamw) for seed in range(1, preset["seeds"])]


def _timing_key(run: dict[str, Any]) -> str:
    """The conditions that a run's wall-clock depends on, as one comparable string."""
    c = run.get("conditions")
    return f"{c['device']}, torch {c['torch']}, {c['threads']} threads" if c else "unrecorded"


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
            "best_lr": entry.get("best_lr"), "target": target, "swept_lrs": sorted(r["lr"] for r in entry.get("sweep", [])),
            "final_val_mean": float(np.mean(losses)),
            "final_val_spread": float((max(losses) - min(losses)) / 2) if len(losses) > 1 else 0.0,
            "seeds": len(losses), "diverged_seeds": sum(r["diverged"] for r in entry["full"]),
            "steps_to_target": hit[0] if hit else None, "seconds_to_target": hit[1] if hit else None,
            "seconds_total": float(np.mean([r["train_seconds"] for r in runs])) if runs else math.nan,
            "optimizer_share": float(np.mean([r["optimizer_share"] for r in runs])) if runs else math.nan,
            "tokens_per_second": (float(np.mean([r["tokens_per_second"] for r in runs]))
                                  if runs and all(r.get("tokens_per_second") for r in runs) else None),
            "state_mb": entry["full"][0]["state_bytes"] / 2**20,
            "peak_memory_mb": (entry["full"][0]["peak_memory_bytes"] or 0) / 2**20 or None,
            "refreshes": entry["full"][0]["refreshes"], "skipped_refreshes": entry["full"][0]["skipped_refreshes"],
            "failures": entry["full"][0]["failures"], "qr_fallbacks": entry["full"][0].get("qr_fallbacks"),
            "curve": curve, "band": seed_band(runs) if runs else [],
            "weight_decay": entry.get("weight_decay"), "peer": SPECS[name].peer if name in SPECS else None,
            "timed_under": sorted({_timing_key(r) for r in entry["full"]}),
            "rate_check": entry.get("rate_check"), "rate_check_diverged": entry.get("rate_check_diverged", []),
            "swept_lr": entry.get("swept_lr"),
            "rate_from": entry.get("rate_from"), "spike": loss_spike(curve),
        }
        if name == "AdamW":
            reference = out[name]
    for row in out.values():
        for key in ("steps_to_target", "seconds_to_target"):
            ok = reference and row[key] is not None and reference[key]
            row[key.replace("_to_target", "_ratio")] = row[key] / reference[key] if ok else None
    if reference:
        _against_checked_rate(out, reference)
    return out


def _against_checked_rate(out: dict[str, dict[str, Any]], reference: dict[str, Any]) -> None:
    """Where AdamW's rate check found a full run lower than the one at its sweep's rate, each row's steps and
    time to that lower loss (``checked_target``). AdamW reaches it at its last step; its time is its full run's
    training time, made on the table's device (a step's cost does not depend on the rate), where the check
    run may have been made on another."""
    checked = {float(lr): loss for lr, loss in (reference["rate_check"] or {}).items()}
    lr = lowest_rate(checked)
    if lr is None or lr == reference["best_lr"] or not reference["curve"]:
        return
    adamw = (reference["curve"][-1][0], reference["seconds_total"])  # AdamW's steps and seconds to that loss
    for row in out.values():
        hit = adamw if row is reference else (steps_to_target(row["curve"], checked[lr]) if row["curve"] else None)
        row["checked_target"] = {"adamw_lr": lr, "target": checked[lr]}
        for i, key in enumerate(("steps", "seconds")):
            row["checked_target"][f"{key}_to_target"] = hit[i] if hit else None
            row["checked_target"][f"{key}_ratio"] = hit[i] / adamw[i] if hit and adamw[i] else None
