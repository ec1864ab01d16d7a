"""Human-readable outputs: a markdown table and validation-loss plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "write_report", "plot_curves", "curve_colours"]


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


UNITS = {"lm": "nats per byte", "digits": "nats per image"}


def _edge_mark(row: dict[str, Any]) -> str:
    rates = row.get("swept_lrs") or []
    return " †" if len(rates) > 1 and row["best_lr"] in (rates[0], rates[-1]) else ""


def markdown_table(summary: dict[str, dict[str, Any]], unit: str = "nats per byte") -> str:
    target = next(iter(summary.values()))["target"]
    lines = [
        f"Target: AdamW's final validation loss, {target:.4f} {unit}. Ratios are relative to AdamW "
        "(< 1 is faster). Final loss: mean ± half-range over seeds. † the best rate is the edge of the swept "
        "rates (the sweep stopped growing): a rate beyond it may be better.",
        "",
        "| optimizer | best lr | final val loss | steps to target | × AdamW | time to target (s) | × AdamW "
        "| optimizer share of step | state MB | peak GPU MB | refreshes / failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(summary.items(), key=lambda kv: kv[1]["final_val_mean"]):
        diverged = f" ({row['diverged_seeds']} diverged)" if row["diverged_seeds"] else ""
        lines.append(
            f"| {name} | {_fmt(row['best_lr'], '.3g')}{_edge_mark(row)} | {row['final_val_mean']:.4f} ± {row['final_val_spread']:.4f}"
            f"{diverged} | {_fmt(row['steps_to_target'], 'd', 'not reached')} | {_fmt(row['steps_ratio'], '.2f')} "
            f"| {_fmt(row['seconds_to_target'], '.1f', 'not reached')} | {_fmt(row['seconds_ratio'], '.2f')} "
            f"| {row['optimizer_share']:.0%} | {row['state_mb']:.2f} | {_fmt(row['peak_memory_mb'], '.0f')} "
            f"| {row['refreshes']} / {row['failures']} |")
    return "\n".join(lines)


def curve_colours(names) -> dict[str, str | None]:
    """A matplotlib colour per optimizer name, fixed by its place among all known optimizers, so that an
    optimizer has the same colour in every plot whichever subset the plot shows (unknown names: default)."""
    from .optimizers import SPECS

    known = sorted(SPECS)
    return {name: f"C{known.index(name) % 10}" if name in known else None for name in names}


def plot_curves(summary: dict[str, dict[str, Any]], out_dir: Path, title: str,
                unit: str = "nats per byte") -> list[Path]:
    """PNG plots of validation loss against steps and against wall-clock; none if matplotlib is missing
    (re-render elsewhere from the saved runs)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = curve_colours(summary)
    paths = []
    for axis, index, label in (("steps", 0, "step"), ("time", 1, "wall-clock seconds (training only)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, row in sorted(summary.items()):
            curve = row["curve"][1:]  # skip the untrained point: it squashes the interesting range
            if curve:
                ax.plot([p[index] for p in curve], [p[2] for p in curve], label=name, marker=".",
                        color=colour[name])
        ax.axhline(next(iter(summary.values()))["target"], color="grey", linestyle=":", label="AdamW final")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation loss ({unit})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        path = Path(out_dir) / f"val_loss_vs_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(result: dict[str, Any], out_dir: Path, plots: bool = True) -> str:
    out_dir = Path(out_dir)
    w = result["workload"]
    unit = UNITS.get(w["workload"], "nats")
    table = markdown_table(result["summary"], unit)
    header = (f"# Benchmark `{result['config']['name']}`\n\nWorkload: {json.dumps(w)}\n\n"
              f"Device: {result['config']['device']}. Preset: {json.dumps(result['config']['preset'])}\n\n")
    text = header + table + "\n"
    if result.get("unfinished"):
        text += ("\nNot run yet (a time limit, or a report of saved runs only): "
                 + "; ".join(result["unfinished"]) + "\n")
    if plots:
        title = f"{w['workload']} ({w.get('parameters', '?'):,} parameters)"
        for p in plot_curves(result["summary"], out_dir, title, unit):
            text += f"\n![{p.stem}]({p.name})\n"
    (out_dir / "report.md").write_text(text)
    compact = {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in result["summary"].items()}
    (out_dir / "summary.json").write_text(json.dumps({"workload": w, "summary": compact}, indent=1))
    return table
