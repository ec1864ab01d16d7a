"""What one eigenbasis refresh of every Kronecker factor of a GPT-style body costs, and how good it is.

    python -m precond_bench.refresh_cost --size 85M --device cuda

The factors are those SOAP keeps for the body's weight matrices (one per side of each matrix, full size:
for GPT-2 small 60 of 768², 12 of 2304², 24 of 3072²), bucketed by size. Each is an EMA (β = 0.95) of
``G Gᵀ`` over ``history`` random gradients whose columns have decaying scales (a dense spectrum, like real
factors) made of a persistent part plus ``noise`` times fresh noise (gradients are correlated from step to
step; ``--noise`` large is the i.i.d. worst case); its basis comes from ``eigh`` at that point, and the factor then drifts for ``F`` more steps, the
staleness a refresh every ``F`` steps sees. Each method then refreshes every factor; reported per method:
wall time (median of ``repeats``, CUDA-synchronised), the off-diagonal ratio ``‖B − diag B‖_F / ‖B‖_F`` of
``B = QᵀAQ`` in float64 before and after (0 for an exact eigenbasis; the adaptive criterion's statistic),
the largest eigenvalue error of ``diag B`` against float64 ``eigvalsh`` (relative to ``λ_max``), and the
orthogonality error ``max|QᵀQ − I|``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from precond.linalg import batched_eigh, off_diagonal_ratio, power_qr_step, qr_algorithm, refine_eigenbasis
from precond.precision import TF32_MODES, matmul, tf32_matmuls
from .step_time import BODIES, body_shapes


def factor_buckets(layers: int, width: int, history: int, drift: int, noise: float, device: torch.device,
                   seed: int = 0) -> dict[int, tuple[Tensor, Tensor]]:
    """``{n: (A, Q)}``: stacks of drifted factors and their stale eigenbases, one entry per factor size."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pairs: dict[int, list[int]] = {}
    for rows, cols in body_shapes(layers, width):
        pairs.setdefault(rows, []).append(cols)
        pairs.setdefault(cols, []).append(rows)
    buckets = {}
    for n, others in sorted(pairs.items()):
        m = max(others)  # one sample width per bucket keeps the stack batched
        scale = torch.logspace(0, -1, m, device=device)
        A = torch.zeros(len(others), n, n, device=device)
        persistent = torch.randn(len(others), n, m, device=device, generator=gen) * scale
        for step in range(history + drift):
            if step == history:
                Q = torch.linalg.eigh(A)[1]
            G = persistent + noise * torch.randn(len(others), n, m, device=device, generator=gen) * scale
            A = 0.95 * A + 0.05 * (G @ G.mT)
        buckets[n] = (A, Q)
    return buckets


def methods() -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    def eigh_each(A: Tensor, Q: Tensor) -> Tensor:
        return torch.stack([torch.linalg.eigh(a)[1] for a in A])

    def in_mode(mode: bool | str, method: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        def run(A: Tensor, Q: Tensor) -> Tensor:
            with tf32_matmuls(mode):
                return method(A, Q)
        return run

    def refine(iterations: int, mode: bool | str) -> Callable[[Tensor, Tensor], Tensor]:
        return in_mode(mode, lambda A, Q: refine_eigenbasis(A, Q, iterations)[0])

    return {
        "eigh, per factor": eigh_each,
        "eigh, batched": lambda A, Q: batched_eigh(A)[1],
        "QR algorithm, 1 step": lambda A, Q: qr_algorithm(A, Q, 1, 0.0)[1],
        "power-QR (SOAP)": lambda A, Q: power_qr_step(A, Q)[0],
        # the same step orthonormalised by LAPACK's Householder QR (the reference SOAP's torch.linalg.qr)
        "power-QR, Householder": lambda A, Q: torch.linalg.qr(A @ Q)[0],
        "refine, 1 step": refine(1, False),
        "refine, 2 steps": refine(2, False),
        "refine, 1 step, TF32": refine(1, True),
        "refine, 2 steps, TF32": refine(2, True),
        "refine, 1 step, 3×TF32": refine(1, "3x"),
        "refine, 2 steps, 3×TF32": refine(2, "3x"),
        "power-QR (SOAP), 3×TF32": in_mode("3x", lambda A, Q: power_qr_step(A, Q)[0]),
    }


def quality(A: Tensor, Q: Tensor, reference: Tensor) -> dict[str, float]:
    A, Q = A.double(), Q.double()
    B = Q.mT @ A @ Q
    estimates = torch.diagonal(B, dim1=-2, dim2=-1).sort(-1).values
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return {"ratio": float(off_diagonal_ratio(B).mean()),
            "eigenvalue_error": float(((estimates - reference).abs().amax(-1) / reference[..., -1]).max()),
            "orthogonality": float((Q.mT @ Q - eye).abs().amax())}


def run(size: str, device: torch.device, drift: int, history: int, noise: float, repeats: int,
        names: list[str]) -> dict:
    layers, width = BODIES[size]
    buckets = factor_buckets(layers, width, history, drift, noise, device)
    references = {n: torch.linalg.eigvalsh(A.double()) for n, (A, _) in buckets.items()}
    stale = {n: quality(A, Q, references[n]) for n, (A, Q) in buckets.items()}
    rows: dict[str, dict] = {"stale basis": {"ms": 0.0, "per_size": stale}}
    table = methods()
    for name in names:
        ms, out = _median_ms(lambda: {n: table[name](A, Q) for n, (A, Q) in buckets.items()}, repeats, device)
        per_size = {n: quality(buckets[n][0], out[n], references[n]) for n in buckets}
        rows[name] = {"ms": ms, "per_size": per_size}
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "size": size, "drift": drift, "noise": noise,
            "factors": {n: int(A.shape[0]) for n, (A, _) in buckets.items()}, "rows": rows}


def product_precision(size: str, device: torch.device, repeats: int) -> list[dict]:
    """One batched product ``A·B`` per factor size of the body (as many as it has factors of that size; ``A``'s
    columns of decaying scale) in each :data:`~precond.precision.TF32_MODES`: time (median, synchronised) and
    relative Frobenius error against float64."""
    gen = torch.Generator(device=device).manual_seed(0)
    counts: dict[int, int] = {}
    for rows, cols in body_shapes(*BODIES[size]):
        for n in (rows, cols):  # a factor per side, as factor_buckets
            counts[n] = counts.get(n, 0) + 1
    out = []
    for n, count in sorted(counts.items()):
        a = torch.randn(count, n, n, device=device, generator=gen) * torch.logspace(0, -3, n, device=device)
        b = torch.randn(count, n, n, device=device, generator=gen)
        exact = a.double() @ b.double()
        for mode in TF32_MODES:
            with tf32_matmuls(mode):
                result = matmul(a, b)  # also the warm-up
                ms, _ = _median_ms(lambda: matmul(a, b), repeats, device)
            error = torch.linalg.vector_norm(result.double() - exact) / torch.linalg.vector_norm(exact)
            out.append({"stack": f"{count} × {n}²", "mode": str(mode), "ms": ms, "relative_error": float(error)})
    return out


def _median_ms(work: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall time of ``work()`` over ``repeats`` calls, synchronised on CUDA, and its last result."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), result


def markdown(results: dict) -> str:
    sizes = list(results["factors"])
    head = ", ".join(f"{c} × {n}²" for n, c in results["factors"].items())
    lines = [f"device: {results['device']}, torch {results['torch']}, {results['date']}; {results['size']} body "
             f"({head}), basis {results['drift']} steps stale, noise {results['noise']}", "",
             "| method | ms, all factors | × eigh per factor | off-diagonal ratio (" + " / ".join(
                 f"{n}" for n in sizes) + ") | eigenvalue error | orthogonality |", "|---|---|---|---|---|---|"]
    eigh_ms = results["rows"].get("eigh, per factor", {}).get("ms")
    for name, row in results["rows"].items():
        q = row["per_size"]
        speed = f"{eigh_ms / row['ms']:.1f}" if eigh_ms and row["ms"] else "—"
        ratios = " / ".join(f"{q[n]['ratio']:.1e}" for n in sizes)
        err = max(q[n]["eigenvalue_error"] for n in sizes)
        orth = max(q[n]["orthogonality"] for n in sizes)
        lines.append(f"| {name} | {row['ms']:.1f} | {speed} | {ratios} | {err:.1e} | {orth:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="85M", choices=list(BODIES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--drift", type=int, default=10, help="steps the factors move after their basis (F)")
    parser.add_argument("--history", type=int, default=30, help="EMA steps before the basis is taken")
    parser.add_argument("--noise", type=float, default=1.0, help="fresh noise beside the persistent gradient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None, help="default: all")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--products", action="store_true",
                        help="instead: one batched product per factor size in each float32 matmul precision")
    args = parser.parse_args(argv)
    if args.products:
        rows = product_precision(args.size, torch.device(args.device), args.repeats)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
        print("| stack | tf32 | ms | relative error vs float64 |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['stack']} | {row['mode']} | {row['ms']:.2f} | {row['relative_error']:.1e} |")
        return 0
    names = args.methods or list(methods())
    unknown = [n for n in names if n not in methods()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(methods())}")
    results = run(args.size, torch.device(args.device), args.drift, args.history, args.noise, args.repeats, names)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
