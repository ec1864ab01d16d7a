"""``python -m precond_bench.batch_axis DIR...``: how each optimizer's speed-up over AdamW moves with the batch.

Each ``DIR`` is one benchmark folder (``--runs-dir``/``--name`` of a ``precond_bench`` call), the same
workload at one batch size: run them at one byte budget (``--train-tokens``) and micro-batch (``--batch-size``,
so the validation set is the same) with ``--tokens-per-step`` set per folder. Reads each folder's
``summary.json`` and ``workload.json``; prints a markdown table (one row per optimizer and batch size:
final loss, steps and wall-clock to AdamW's final loss as multiples of AdamW's) and plots both speed-ups
(``1 / ratio``, > 1 is faster than AdamW) against bytes per step, one line per optimizer
(``speedup_vs_batch.png`` in ``--out``; another library's implementation as a hollow ring, dashed). An
optimizer that misses the target at a batch has no point there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect", "axis_table", "plot_speedups"]


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    """One row per (batch size, optimizer), sorted by bytes per step then by name."""
    rows = []
    for folder in folders:
        saved = json.loads((Path(folder) / "summary.json").read_text())
        per_step = saved["workload"].get("bytes_per_step")
        if per_step is None:  # folders written before accumulation existed: rows × context bytes
            per_step = saved["workload"]["batch_size"] * saved["workload"].get("context", 1)
        for name, row in saved["summary"].items():
            rows.append({"folder": str(folder), "bytes_per_step": per_step, "optimizer": name,
                         "best_lr": row["best_lr"], "final": row["final_val_mean"], "seeds": row["seeds"],
                         "target": row["target"], "steps_ratio": row.get("steps_ratio"),
                         "seconds_ratio": row.get("seconds_ratio"), "optimizer_share": row["optimizer_share"],
                         "peer": row.get("peer")})
    return sorted(rows, key=lambda r: (r["bytes_per_step"], r["optimizer"]))


def _ratio(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def _bytes(n: int) -> str:
    if n < 1024:
        return str(n)
    return f"{n / 1024:g}k" if n < 1 << 20 else f"{n / (1 << 20):g}M"


def axis_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bytes per step | optimizer | best lr | final val loss (seeds) | steps × AdamW | wall-clock × AdamW "
             "| optimizer share |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_bytes(r['bytes_per_step'])} | {r['optimizer']} | {r['best_lr']:.3g} | {r['final']:.4f} "
                     f"({r['seeds']}) | {_ratio(r['steps_ratio'])} | {_ratio(r['seconds_ratio'])} "
                     f"| {r['optimizer_share']:.0%} |")
    return "\n".join(lines)


def plot_speedups(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Steps and wall-clock speed-ups over AdamW against bytes per step (log scale), one line per optimizer."""
    from .report import _pyplot, _save, curve_colours

    plt = _pyplot()
    names = sorted({r["optimizer"] for r in rows if r["optimizer"] != "AdamW"})
    if plt is None or not names:
        return None
    colour = curve_colours(names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("steps_ratio", "seconds_ratio"), ("steps", "wall-clock")):
        for name in names:
            points = [(r["bytes_per_step"], 1.0 / r[key]) for r in rows if r["optimizer"] == name and r[key]]
            if not points:
                continue
            if any(r.get("peer") for r in rows if r["optimizer"] == name):
                # a peer: a larger hollow marker, so that it rings its twin's point where the two agree
                ax.plot(*zip(*points), marker="o", markersize=11, markerfacecolor="none", linestyle="--",
                        label=f"{name} (peer)", color=colour[name])
            else:
                ax.plot(*zip(*points), marker="o", label=name, color=colour[name])
        ax.axhline(1.0, color="black", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per step")
        ax.set_title(f"speed-up over AdamW to its final loss ({title})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("× AdamW's speed (higher is better)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    return _save(plt, fig, Path(out) / "speedup_vs_batch.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m precond_bench.batch_axis", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="benchmark folders, one per batch size")
    p.add_argument("--out", type=Path, default=Path("."), help="where speedup_vs_batch.png goes")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    rows = collect(args.folders)
    print(axis_table(rows))
    if not args.no_plots:
        args.out.mkdir(parents=True, exist_ok=True)
        path = plot_speedups(rows, args.out)
        if path is not None:
            print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
