"""Human-readable outputs: a markdown table, validation-loss plots (against steps and wall-clock, seed
bands, the target line) and a bar chart of steps- and time-to-target ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "notes", "write_report", "plot_curves", "plot_ratios", "curve_colours"]


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


UNITS = {"lm": "nats per byte", "digits": "nats per image"}


def _edge_mark(row: dict[str, Any]) -> str:
    rates = row.get("swept_lrs") or []
    swept = row.get("swept_lr") or row["best_lr"]  # the sweep's pick, where a full-run check replaced it
    return " †" if len(rates) > 1 and swept in (rates[0], rates[-1]) else ""


def _label(name: str, row: dict[str, Any], reference: list[str] | None = None) -> str:
    label = f"{name} (peer)" if row.get("peer") else name
    return label + " §" if reference is not None and row.get("timed_under", reference) != reference else label


def _conditions_note(summary: dict[str, dict[str, Any]]) -> tuple[str, list[str] | None]:
    """A sentence when the rows were timed under different conditions (device, torch, threads), and the
    reference conditions (AdamW's) that unmarked rows share."""
    every = sorted({c for row in summary.values() for c in row.get("timed_under", [])})
    if len(every) <= 1:
        return "", None
    reference = summary.get("AdamW", next(iter(summary.values()))).get("timed_under", [])
    return (f" § timed under other conditions than AdamW's ({'; '.join(reference)}): its wall-clock "
            f"ratios compare unlike runs (conditions seen: {' | '.join(every)})."), reference


def _rate(row: dict[str, Any]) -> str:
    wd = f", wd {row['weight_decay']:g}" if row.get("weight_decay") is not None else ""
    twin = f" ({row['rate_from']}'s)" if row.get("rate_from") else ""  # taken from its twin's sweep, not swept
    checked = f" (full-run check; sweep {row['swept_lr']:.3g})" if row.get("swept_lr") else ""
    return f"{_fmt(row['best_lr'], '.3g')}{twin}{checked}{wd}{_edge_mark(row)}"


def markdown_table(summary: dict[str, dict[str, Any]], unit: str = "nats per byte") -> str:
    target = next(iter(summary.values()))["target"]
    mixed, reference = _conditions_note(summary)
    lines = [
        f"Target: AdamW's final validation loss, {target:.4f} {unit}. Ratios are relative to AdamW "
        "(< 1 is faster). Final loss: mean ± half-range over seeds. † the best rate is the edge of the swept "
        "rates (the sweep stopped growing): a rate beyond it may be better. (peer): another library's "
        "implementation of the same algorithm, same hyper-parameters; a rate marked (X's) is X's best, not swept "
        "again." + mixed,
        "",
        "| optimizer | best lr | final val loss | steps to target | × AdamW | time to target (s) | × AdamW "
        "| optimizer share of step | state MB | peak GPU MB | refreshes / failures | throughput |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(summary.items(), key=lambda kv: kv[1]["final_val_mean"]):
        diverged = f" ({row['diverged_seeds']} diverged)" if row["diverged_seeds"] else ""
        lines.append(
            f"| {_label(name, row, reference)} | {_rate(row)} | {_final_loss(row)}{diverged} "
            f"| {_fmt(row['steps_to_target'], 'd', 'not reached')} | {_fmt(row['steps_ratio'], '.2f')} "
            f"| {_fmt(row['seconds_to_target'], '.1f', 'not reached')} | {_fmt(row['seconds_ratio'], '.2f')} "
            f"| {row['optimizer_share']:.0%} | {row['state_mb']:.2f} | {_fmt(row['peak_memory_mb'], '.0f')} "
            f"| {row['refreshes']} / {row['failures']}{_fallbacks(row)} | {_throughput(row.get('tokens_per_second'))} |")
    return "\n".join(lines)


def _final_loss(row: dict[str, Any]) -> str:
    """The seed mean ± half-range; one seed has no spread to show, so it says so instead of "± 0.0000"."""
    mean = f"{row['final_val_mean']:.4f}"
    return f"{mean} (1 seed)" if row.get("seeds") == 1 else f"{mean} ± {row['final_val_spread']:.4f}"


def _fallbacks(row: dict[str, Any]) -> str:
    """" (N QR fallbacks)" where refreshes fell back from CholeskyQR to Householder QR (runs before the count
    was kept have none to show)."""
    return f" ({row['qr_fallbacks']} QR fallbacks)" if row.get("qr_fallbacks") else ""


def _rate_check_line(name: str, row: dict[str, Any]) -> str | None:
    """An optimizer whose full run was repeated at the neighbouring rates (``--check-rate``): the losses and
    whether the sweep's rate won."""
    from .protocol import lowest_rate

    if not row.get("rate_check"):
        return None
    losses = {float(lr): loss for lr, loss in row["rate_check"].items()}
    diverged = {float(lr) for lr in row.get("rate_check_diverged") or ()}
    swept = row.get("swept_lr") or row["best_lr"]
    shown = {lr: "diverged" if lr in diverged else "—" if loss is None else f"{loss:.4f}" for lr, loss in losses.items()}
    parts = [("**{:.3g} → {}**" if lr == swept else "{:.3g} → {}").format(lr, shown[lr]) for lr in sorted(losses)]
    if any(loss is None and lr not in diverged for lr, loss in losses.items()):
        verdict = "not complete"
    elif row.get("swept_lr"):
        verdict = f"a neighbouring rate is better for the full run, and its full runs use it ({row['best_lr']:.3g})"
    else:
        verdict = ("the sweep's rate is also the full run's best" if lowest_rate(losses) == row["best_lr"]
                   else "a neighbouring rate is better for the full run")
    return f"- {name}: {', '.join(parts)}: {verdict}."


def _spike_line(name: str, row: dict[str, Any]) -> str | None:
    """An optimizer whose full run's (seed-mean) validation loss spiked (``protocol.loss_spike``)."""
    if not row.get("spike"):
        return None
    (start, level), (peak, high), back = row["spike"]["from"], row["spike"]["peak"], row["spike"]["recovered"]
    again = f"back at {level:.4f} by step {back}" if back is not None else "never back at that level"
    return f"- {name}: {level:.4f} at step {start} → {high:.4f} at step {peak}, {again}."


def _checked_target_line(name: str, row: dict[str, Any]) -> str | None:
    """A row read against AdamW's best full run where its rate check found one below the table's target
    (``protocol._against_checked_rate``)."""
    checked = row.get("checked_target")
    if not checked:
        return None
    if checked["steps_to_target"] is None:
        return f"- {name}: not reached"
    return (f"- {name}: {checked['steps_to_target']} steps ({checked['steps_ratio']:.2f}×), "
            f"{checked['seconds_to_target']:.1f} s ({checked['seconds_ratio']:.2f}×)")


def _checked_target_heading(summary: dict[str, dict[str, Any]]) -> str:
    checked = next(row["checked_target"] for row in summary.values() if row.get("checked_target"))
    return (f"Against AdamW's best full run (its rate check: lr {checked['adamw_lr']:.3g}, final loss "
            f"{checked['target']:.4f}), steps and time to that loss; AdamW's time is its full run's at the sweep's "
            "rate, made on the table's device (a step's cost does not depend on the rate):")


def notes(summary: dict[str, dict[str, Any]]) -> str:
    """What the table cannot say, a paragraph each where it applies: the full-run rate checks, the rows read
    against AdamW's better full run, and the loss spikes."""
    from .protocol import SPIKE_RATIO

    headings = {_rate_check_line: "Full-run rate check (seed 0, the full budget, one grid step either side of "
                                  "the sweep's rate, further while the lowest is at an edge):"}
    if any(row.get("checked_target") for row in summary.values()):
        headings[_checked_target_line] = _checked_target_heading(summary)
    headings[_spike_line] = (f"Loss spikes in the full runs (validation loss ≥ {SPIKE_RATIO:g}× its lowest so far; a "
                             "rate the short sweep picked may be too high for the full run: `--check-rate` runs its "
                             "neighbours):")
    paragraphs = []
    for line, heading in headings.items():
        lines = [text for name, row in summary.items() if (text := line(name, row))]
        if lines:
            paragraphs.append("\n".join([heading, *lines]))
    return "\n\n".join(paragraphs)


def _throughput(per_second: float | None) -> str:
    """Training bytes (tokens) per second, forward, backward and optimizer; "—" for runs that did not record it."""
    if not per_second:
        return "—"
    return f"{per_second / 1e6:.3g}M/s" if per_second >= 1e5 else f"{per_second / 1e3:.3g}k/s"


# Thirty-six distinct colours (matplotlib's tab20, then tab20b's shades): one per known optimizer.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
            "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252",
            "#bd9e39", "#ad494a", "#a55194", "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd", "#9c9ede"]


def curve_colours(names) -> dict[str, str | None]:
    """A colour per optimizer name, fixed by its place among all known optimizers, so that an optimizer has
    the same colour in every plot whichever subset the plot shows (unknown names: matplotlib's default)."""
    from .optimizers import SPECS

    known = list(SPECS)
    return {name: _PALETTE[known.index(name) % len(_PALETTE)] if name in known else None for name in names}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(summary: dict[str, dict[str, Any]], out_dir: Path, title: str,
                unit: str = "nats per byte") -> list[Path]:
    """Validation loss against steps and against wall-clock: the seed mean, a band from the lowest to the
    highest seed, AdamW's final loss as the target line. None if matplotlib is missing (re-render elsewhere
    from the saved runs)."""
    plt = _pyplot()
    if plt is None:
        return []
    colour = curve_colours(summary)
    # the last two thirds of the runs decide the ranking: zoom on them
    lows = [p[2] for row in summary.values() for p in row["curve"][len(row["curve"]) // 3:]]
    paths = []
    for axis, index, label in (("steps", 0, "step"), ("time", 1, "wall-clock seconds (training only)")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, row in sorted(summary.items()):
            curve = row["curve"][1:]  # skip the untrained point: it squashes the interesting range
            if not curve:
                continue
            xs = [p[index] for p in curve]
            ax.plot(xs, [p[2] for p in curve], label=_label(name, row), color=colour[name],
                    linestyle="--" if row.get("peer") else "-")
            band = row.get("band", [])[1:]
            if len(band) == len(curve):
                ax.fill_between(xs, [b[1] for b in band], [b[2] for b in band], color=colour[name], alpha=0.2,
                                linewidth=0)
        ax.axhline(next(iter(summary.values()))["target"], color="black", linestyle=":", label="target (AdamW final)")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation loss ({unit})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if lows:
            ax.set_ylim(min(lows) - 0.02, max(lows) + 0.02)
        ax.legend(fontsize="small")
        paths.append(_save(plt, fig, Path(out_dir) / f"val_loss_vs_{axis}.png"))
    return paths


def plot_ratios(summary: dict[str, dict[str, Any]], out_dir: Path, title: str) -> Path | None:
    """Bars of steps- and time-to-target as multiples of AdamW's (< 1 is faster); an optimizer that never
    reached the target gets an empty slot marked "not reached"."""
    plt = _pyplot()
    rows = [(n, r) for n, r in sorted(summary.items(), key=lambda kv: kv[1]["final_val_mean"]) if n != "AdamW"]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    width = 0.38
    for k, (key, hatch, label) in enumerate((("steps_ratio", "", "steps to target"),
                                             ("seconds_ratio", "//", "wall-clock to target"))):
        for i, (name, row) in enumerate(rows):
            x = i + (k - 0.5) * width
            if row[key] is None:
                ax.text(x, 0.05, "not reached", rotation=90, ha="center", va="bottom", fontsize="x-small")
                continue
            ax.bar(x, row[key], width, color=curve_colours([name])[name], hatch=hatch, edgecolor="black",
                   label=label if i == 0 else None)
    ax.axhline(1.0, color="black", linestyle=":")
    ax.set_xticks(range(len(rows)), [_label(n, r) for n, r in rows], rotation=30, ha="right")
    ax.set_ylabel("× AdamW (lower is better)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # no bar when no optimizer reached the target: no legend to draw
        ax.legend(fontsize="small")
    return _save(plt, fig, Path(out_dir) / "ratios_to_target.png")


def write_report(result: dict[str, Any], out_dir: Path, plots: bool = True) -> str:
    out_dir = Path(out_dir)
    w = result["workload"]
    unit = UNITS.get(w["workload"], "nats")
    table = markdown_table(result["summary"], unit)
    header = (f"# Benchmark `{result['config']['name']}`\n\nWorkload: {json.dumps(w)}\n\n"
              f"Device: {result['config']['device']}. Preset: {json.dumps(result['config']['preset'])}\n\n")
    text = header + table + "\n"
    remarks = notes(result["summary"])
    if remarks:
        text += "\n" + remarks + "\n"
    if result.get("unfinished"):
        text += ("\nNot run yet (a time limit, or a report of saved runs only): "
                 + "; ".join(result["unfinished"]) + "\n")
    if plots:
        title = f"{w['workload']} ({w.get('parameters', '?'):,} parameters)"
        paths = plot_curves(result["summary"], out_dir, title, unit)
        paths.append(plot_ratios(result["summary"], out_dir, title))
        for p in filter(None, paths):
            text += f"\n![{p.stem}]({p.name})\n"
    (out_dir / "report.md").write_text(text)
    compact = {k: {kk: vv for kk, vv in v.items() if kk not in ("curve", "band")}
               for k, v in result["summary"].items()}
    (out_dir / "summary.json").write_text(json.dumps({"workload": w, "summary": compact}, indent=1))
    return table
