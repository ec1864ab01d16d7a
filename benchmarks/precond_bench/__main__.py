"""``python -m precond_bench`` / ``precond bench``: run a benchmark preset and print its table."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .data import default_data_dir
from .optimizers import DEFAULT_OPTIMIZERS, SPECS, available_optimizers
from .protocol import BenchConfig, plan_benchmark, run_benchmark
from .report import notes, write_report
from .workloads import PRESETS, with_batch_axis


class Progress:
    """One tqdm bar over the training steps this call makes (or, quiet, a line per run)."""

    def __init__(self, total: int, enabled: bool):
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is missing: a line per run instead of a bar
            enabled = False
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr) if enabled else None

    def run(self, description: str):
        if self.bar is None:
            print(description, file=sys.stderr, flush=True)
            return None
        self.bar.set_description(description)

        def tick(step: int, loss: float):
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}")
        return tick

    def grow(self, steps: int):
        if self.bar is not None:
            self.bar.total += steps
            self.bar.refresh()

    def skip(self, steps: int):
        """Steps that will not be trained (a saved run, a run past --time-limit, a diverged run's rest) leave
        the total, so that the bar and its ETA count only the training this call makes."""
        if self.bar is not None:
            self.bar.total = max(self.bar.n, self.bar.total - steps)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="precond bench", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="workload size and budget (default cpu: small LM, a few minutes on 2 cores)")
    p.add_argument("--optimizers", nargs="+", default=None, choices=list(SPECS),
                   help="default: ours, torch's AdamW and Muon, and pytorch-optimizer's SOAP and Muon when it is "
                        "installed (heavyball's rows run only when named)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--name", default=None, help="folder under --runs-dir (default: the preset's name)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--data-dir", default=default_data_dir())
    for key in ("steps", "sweep_steps", "eval_every", "seeds", "lr_points"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the preset's {key}")
    for key in ("width", "depth", "heads", "context"):
        p.add_argument(f"--{key}", type=int, default=None, help=f"override the language model's {key}")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's (micro-)batch size, in rows")
    p.add_argument("--tokens-per-step", type=int, default=None, metavar="BYTES",
                   help="bytes (tokens) per optimizer step: accumulates micro-batches of --batch-size rows")
    p.add_argument("--train-tokens", type=int, default=None, metavar="BYTES",
                   help="the training budget in bytes: steps = BYTES / tokens per step; sweep runs keep the "
                        "preset's share of it and the run is evaluated 50 times")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="warmup in steps, the same for sweep and full runs (default: 5%% of each run)")
    p.add_argument("--edge-points", type=int, default=4,
                   help="extra sweep rates beyond the grid's edge while the best rate sits on it (default 4)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=None,
                   help="override the preset's schedule (cosine: 5%% linear warmup, cosine decay to 10%%)")
    p.add_argument("--center", nargs="+", default=(), metavar="OPTIMIZER=LR",
                   help="centre an optimizer's learning-rate grid elsewhere than its default (e.g. on the rate "
                        "that won at a neighbouring batch size, so that fewer sweeps reach an interior best)")
    p.add_argument("--rate-from", nargs="+", default=(), metavar="PEER=TWIN",
                   help="run PEER's full runs at the rate TWIN's sweep picked, without a sweep of its own (a "
                        "peer of the same algorithm as one of ours, e.g. torch.AdamW=AdamW; TWIN must be among "
                        "--optimizers)")
    p.add_argument("--check-rate", nargs="+", default=(), metavar="OPTIMIZER", choices=list(SPECS),
                   help="also run these optimizers' full budget (seed 0) one grid step either side of the "
                        "sweep's best rate, further while the lowest is at an edge: is it the full run's best too?")
    p.add_argument("--adopt-checked-rate", action="store_true",
                   help="with --check-rate: an optimizer whose check finds a lower full run makes all its seeds' "
                        "full runs at that rate (seed 0's check run counts where it was timed under the same "
                        "conditions as the sweep rate's full run); its peers under --rate-from follow")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="after this many seconds the run in progress saves a checkpoint and no other starts; "
                        "rerun to go on")
    p.add_argument("--fit", action="store_true",
                   help="with --time-limit: start or resume only the runs expected to end within it (paced by "
                        "the saved runs): for a machine's last call, whose checkpoints would be lost")
    p.add_argument("--compile-model", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the language model (default backend inductor): a faster forward and "
                        "backward, so a larger optimizer share; kept in the configuration, never mixed with eager runs")
    p.add_argument("--compile-step", nargs="?", const="inductor", default=None, metavar="BACKEND[:MODE]",
                   help="torch.compile each optimizer's step after its first (default backend inductor; "
                        "inductor:reduce-overhead replays it as CUDA graphs); the steps that compile are timed "
                        "apart (compile_seconds), not in the wall-clock; kept in the configuration, never mixed "
                        "with eager runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the finished runs found under --runs-dir/--name")
    p.add_argument("--plan", action="store_true",
                   help="train nothing: list the runs still to make and their expected seconds, paced by the "
                        "folder's saved runs of the same optimizer, else by the folder's model step plus the "
                        "optimizer's step in a folder of the same model beside it, else by the folder's slowest "
                        "step ('?' with none saved)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def parse_centers(pairs: Sequence[str]) -> dict[str, float]:
    """``["SOAP=9e-3", ...]`` as ``{"SOAP": 0.009}``; a clear exit on a bad pair."""
    centers = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in SPECS:
            raise SystemExit(f"--center {pair}: unknown optimizer {name!r}")
        try:
            centers[name] = float(value)
        except ValueError:
            raise SystemExit(f"--center {pair}: expected OPTIMIZER=LR, e.g. SOAP=9e-3") from None
        if not centers[name] > 0:
            raise SystemExit(f"--center {pair}: the rate must be positive")
    return centers


def parse_rate_from(pairs: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``["torch.AdamW=AdamW", ...]`` as ``{"torch.AdamW": "AdamW"}``; a clear exit on a bad pair."""
    twins = dict(pair.partition("=")[::2] for pair in pairs)
    for peer, twin in twins.items():
        pair = f"{peer}={twin}"
        if peer not in names:
            raise SystemExit(f"--rate-from {pair}: {peer!r} is not among --optimizers")
        if twin not in names:
            raise SystemExit(f"--rate-from {pair}: its twin {twin!r} is not among --optimizers (its sweep gives the rate)")
        if twin in twins:  # itself, or another peer that takes a rate
            raise SystemExit(f"--rate-from {pair}: the twin must be swept itself, not take another's rate")
    return twins


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fit and args.time_limit is None:
        raise SystemExit("--fit plans within --time-limit: give both")
    if args.adopt_checked_rate and not args.check_rate:
        raise SystemExit("--adopt-checked-rate adopts what --check-rate finds: give both")
    preset = dict(PRESETS[args.preset])
    for key in ("steps", "sweep_steps", "eval_every", "seeds", "lr_points", "batch_size"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.compile_model:
        if preset["workload"] != "lm":
            raise SystemExit(f"--compile-model applies to language-model presets, not {args.preset}")
        preset["compile_model"] = args.compile_model
    if args.compile_step:
        preset["compile_step"] = args.compile_step
    if args.schedule == "constant":
        preset["schedule"] = {"kind": "constant"}
    try:
        preset = with_batch_axis(preset, args.tokens_per_step, args.train_tokens, args.warmup_steps)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    model_overrides = {k: getattr(args, k) for k in ("width", "depth", "heads", "context") if getattr(args, k)}
    if model_overrides:
        if "gpt" not in preset:
            raise SystemExit(f"--{next(iter(model_overrides))} applies to language-model presets, not {args.preset}")
        preset["gpt"] = {**preset["gpt"], **model_overrides}
    names = args.optimizers or available_optimizers(DEFAULT_OPTIMIZERS)
    missing = [n for n in names if not SPECS[n].available()]
    if missing:
        raise SystemExit(f"--optimizers: {missing} need packages that are not installed "
                         f"({sorted({SPECS[n].peer for n in missing})}; pip install './benchmarks[peers]')")
    config = BenchConfig(preset=preset, optimizers=list(dict.fromkeys(names)), device=args.device,
                         name=args.name or args.preset, runs_dir=args.runs_dir, data_dir=args.data_dir,
                         edge_points=args.edge_points, time_limit=args.time_limit,
                         check_rates=tuple(args.check_rate), adopt_checked=args.adopt_checked_rate, fit=args.fit,
                         centers=parse_centers(args.center),
                         rate_from=parse_rate_from(args.rate_from, list(dict.fromkeys(names))))
    if args.plan:
        return print_plan(plan_benchmark(config), Path(args.runs_dir) / config.name, args.time_limit)
    started = time.time()
    result = run_benchmark(config, None if args.report_only else lambda total: Progress(total, not args.quiet),
                           train=not args.report_only)
    out_dir = Path(args.runs_dir) / config.name
    if not result["results"]:  # a call cut by --time-limit before any optimizer's full runs: go on next time
        print(f"no optimizer has all its full runs under {out_dir} yet; {len(result['unfinished'])} runs not "
              "made: " + "; ".join(result["unfinished"]))
        return 1 if args.report_only else 0
    table = write_report(result, out_dir, plots=not args.no_plots)
    if args.report_only:
        print(f"\n{json.dumps(result['workload'])}\nreport of the saved runs (device: {args.device})\n")
    else:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
        print(f"\n{json.dumps(result['workload'])}\ndevice: {device}, torch {torch.__version__}, "
              f"{time.time() - started:.0f} s\n")
    print(table)
    remarks = notes(result["summary"])
    if remarks:
        print("\n" + remarks)
    if result["unfinished"]:
        print(f"\n{len(result['unfinished'])} runs not made (--time-limit or --report-only; rerun to go on): "
              + "; ".join(result["unfinished"]))
    print(f"\nreport: {out_dir / 'report.md'}")
    return 0


def print_plan(pending: list[tuple[str, float | None]], folder: Path, time_limit: float | None = None) -> int:
    """The runs still to make under ``folder``, one a line, with their expected seconds and the total; with
    ``time_limit``, a line where a call of that many seconds would stop (the runs in order, none skipped)."""
    if not pending:
        print(f"nothing to make under {folder}: every planned run is saved")
        return 0
    elapsed, marked = 0.0, time_limit is None
    for label, seconds in pending:
        elapsed += seconds or 0.0
        if not marked and elapsed > time_limit:
            print(f"-- a call of --time-limit {time_limit:g} s ends here --")
            marked = True
        print(f"{'?' if seconds is None else f'{seconds:.0f}':>7} s  {label}")
    known = [s for _, s in pending if s is not None]
    unknown = len(pending) - len(known)
    print(f"{len(pending)} entries, ~{sum(known):.0f} s at the saved runs' pace"
          + (f"; {unknown} with no saved run to pace them" if unknown else "")
          + " (sweep rates beyond a grid's edge not foreseen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
