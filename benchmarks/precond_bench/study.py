"""What the study scripts in ``benchmarks/`` share: their common arguments and the ``--report`` path."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from precond_bench.data import default_data_dir

__all__ = ["study_parser", "run_or_report"]


def study_parser(doc: str, out: str, device: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--device`` (default: CUDA when present), ``--out``, ``--report`` and ``--data-dir``
    (default: ``$PRECOND_DATA``, else ``data``); the description is the first paragraph of ``doc``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", default=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--report", type=Path, default=None, help="print the tables of a finished study and plot it")
    p.add_argument("--data-dir", default=default_data_dir())
    return p


def run_or_report(args: argparse.Namespace, run_study: Callable[[argparse.Namespace], None],
                  report: Callable[[Path], str], plot: Callable[[Path, Path], None]) -> int:
    """Runs the study, or with ``--report`` prints a finished study's tables and writes the plot beside its
    runs; the exit status."""
    if args.report is None:
        run_study(args)
    else:
        print(report(args.report))
        plot(args.report, args.report.with_suffix(".png"))
    return 0
