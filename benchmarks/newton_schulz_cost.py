"""Muon's Newton–Schulz iteration, plain against Gram (``precond.linalg``): FLOPs, time and accuracy.

    PYTHONPATH=src:benchmarks python benchmarks/newton_schulz_cost.py [--device cuda] [--layers 12] [--width 768]

For each matrix shape of a GPT-2-style body (all layers' matrices of one shape stacked, as Muon's buckets
are): the FLOPs of five quintic steps both ways, and the median time of each iteration in each precision
(on a CPU, where half-precision products are emulated, float32 stands in for both). Then the accuracy
that the precision buys: each iteration's relative distance to the float64 plain iteration on three kinds
of 256 × 1024 matrix (Gaussian; a spectrum decaying over six decades; rank 8 plus noise). Muon's default
is the plain iteration in bfloat16 (torch.optim.Muon's); the Gram iteration's authors run it in float16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from precond.newton_schulz import gram_newton_schulz, gram_newton_schulz_flops, newton_schulz, newton_schulz_flops
from precond_bench.step_time import body_shapes

ABC = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's coefficients
STEPS = 5


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matrices(m: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=g))
    low_rank = torch.randn(m, 8, dtype=torch.float64, generator=g) @ torch.randn(8, n, dtype=torch.float64, generator=g)
    return {"gaussian": torch.randn(m, n, dtype=torch.float64, generator=g),
            "decaying spectrum": (U * torch.logspace(0, -6, m, dtype=torch.float64)) @ V.T,
            "rank 8 + noise": low_rank + 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=g)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16} if gpu else {"float32": torch.float32}
    shapes = body_shapes(args.layers, args.width)
    print(f"device {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, "
          f"{args.layers} layers of width {args.width}")
    print("| shape × count | FLOPs plain | FLOPs Gram | × | " + " | ".join(
        f"plain {d} ms | Gram {d} ms | ×" for d in half) + " |")
    print("|---" * (4 + 3 * len(half)) + "|")
    totals = {key: 0.0 for key in ("plain", "gram", *[f"{k} {d}" for d in half for k in ("plain", "gram")])}
    for shape in dict.fromkeys(shapes):
        count = shapes.count(shape)
        stack = torch.randn(count, *shape, device=args.device)
        flops = [count * f(*shape, STEPS) for f in (newton_schulz_flops, gram_newton_schulz_flops)]
        # as Muon(ns_algorithm="gram_newton_schulz") does: the plain iteration where the Gram one costs more
        gram_fn = gram_newton_schulz if flops[1] < flops[0] else newton_schulz
        flops[1] = min(flops)
        totals["plain"] += flops[0]
        totals["gram"] += flops[1]
        cells = [f"{shape[0]}×{shape[1]} × {count}", f"{flops[0] / 1e9:.1f}G", f"{flops[1] / 1e9:.1f}G",
                 f"{flops[1] / flops[0]:.2f}"]
        for name, dtype in half.items():
            plain = _timed(lambda: newton_schulz(stack, STEPS, ABC, 1e-7, dtype), args.repeats, args.device)
            gram = _timed(lambda: gram_fn(stack, STEPS, ABC, 1e-7, dtype), args.repeats, args.device)
            totals[f"plain {name}"] += plain
            totals[f"gram {name}"] += gram
            cells += [f"{plain * 1e3:.2f}", f"{gram * 1e3:.2f}", f"{gram / plain:.2f}"]
        print("| " + " | ".join(cells) + " |")
    cells = ["body", f"{totals['plain'] / 1e9:.1f}G", f"{totals['gram'] / 1e9:.1f}G",
             f"{totals['gram'] / totals['plain']:.2f}"]
    for name in half:
        plain, gram = totals[f"plain {name}"], totals[f"gram {name}"]
        cells += [f"{plain * 1e3:.2f}", f"{gram * 1e3:.2f}", f"{gram / plain:.2f}"]
    print("| " + " | ".join(cells) + " |")
    print("(the Gram columns run the plain iteration where the Gram one would cost more, as Muon does)")

    print("\nrelative distance to the float64 plain iteration (256 × 1024)")
    variants = {"plain bfloat16 (Muon's default)": (newton_schulz, torch.bfloat16, {}),
                "plain float16": (newton_schulz, torch.float16, {}),
                "Gram float16, restart after step 2": (gram_newton_schulz, torch.float16, {}),
                "Gram float16, no restart": (gram_newton_schulz, torch.float16, {"restart_iterations": ()}),
                "Gram bfloat16, restart after step 2": (gram_newton_schulz, torch.bfloat16, {})}
    print("| iteration | " + " | ".join(matrices(4, 8)) + " |\n|---|---|---|---|")
    for label, (fn, dtype, kw) in variants.items():
        cells = []
        for G in matrices(256, 1024).values():
            exact = newton_schulz(G, STEPS, ABC, 1e-7, torch.float64)
            out = fn(G.to(args.device), STEPS, ABC, 1e-7, dtype, **kw).double().cpu()
            cells.append(f"{float(torch.linalg.norm(out - exact) / torch.linalg.norm(exact)):.2e}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
