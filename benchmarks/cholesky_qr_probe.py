"""How often does SOAP's CholeskyQR pass on the factors of a real training run, in float32 and under TF32?

    PYTHONPATH=src:benchmarks python benchmarks/cholesky_qr_probe.py [--steps 41] [--batch-size 8] [--preset gpu]

Trains a preset's LM (by default the GPU preset's: 6 layers of width 512, the Linux corpus; ``PRECOND_DATA``
or ``--data-dir`` points at its data) on the CPU with SOAP at the reference defaults (refresh every 10 steps),
records what each refresh gives :func:`precond.linalg.cholesky_qr` (the power step's ``A·Q``, columns
sorted), then orthonormalises every recorded matrix again four ways: in float32 (what the run did on a CPU),
in float32 and then float64 for those that failed (what an A100/H100/H200 does), with TF32 products emulated
(inputs cut to TF32's 10 mantissa bits) judged by float32's tolerance, and the same judged by TF32's. Prints,
per refresh and size, how many matrices passed each way (the rest fall back to Householder QR), and what
the float32 pass and the fallback cost on this machine, every matrix trying CholeskyQR first and under the
refresh's policy of skipping it for factors that keep failing (:func:`precond.refresh.counted_power_qr_`,
replayed on the recorded matrices; the run itself tries every matrix, so that every refresh is seen).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

import precond
from precond import linalg, precision, refresh
from precond_bench.data import default_data_dir
from precond_bench.workloads import PRESETS, make_workload


def tf32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A TF32 tensor-core product, emulated: inputs cut to 10 mantissa bits, exact products, float32 result."""
    return (precision.split_tf32(a)[0].double() @ precision.split_tf32(b)[0].double()).float()


def passes(X: torch.Tensor, product, epsilon) -> int:
    """How many of the stack ``X`` :func:`linalg.cholesky_qr` accepts with ``product`` as its matmul and
    ``epsilon`` as the products' spacing."""
    saved = linalg.matmul, linalg.matmul_epsilon
    linalg.matmul, linalg.matmul_epsilon = product, epsilon
    try:
        return int(linalg.cholesky_qr(X)[1].sum())
    finally:
        linalg.matmul, linalg.matmul_epsilon = saved


def main(argv: list[str] | None = None) -> dict[tuple[int, int], list[int]]:
    """Prints the table; returns it as ``{(step, n): [matrices, passed each way...]}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=41, help="training steps (refreshes at 10, 20, ...)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows a step")
    parser.add_argument("--preset", default="gpu", choices=sorted(PRESETS), help="whose language model")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    recorded: list[tuple[int, torch.Tensor]] = []
    orthonormalise = linalg.cholesky_qr
    step = 0
    workload = make_workload(dict(PRESETS[args.preset], batch_size=args.batch_size), args.data_dir, "cpu")
    model = workload.model(0)
    opt = precond.SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)
    linalg.cholesky_qr = lambda X: recorded.append((step, X.detach().clone())) or orthonormalise(X)
    share, refresh.RETRY_SHARE = refresh.RETRY_SHARE, 0  # every matrix tries CholeskyQR: all are recorded
    try:
        for step in range(1, args.steps + 1):
            workload.loss(model, workload.batch(step, 0)).backward()
            opt.step()
            opt.zero_grad()
    finally:
        linalg.cholesky_qr, refresh.RETRY_SHARE = orthonormalise, share

    tally: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    float32 = lambda x: torch.finfo(x.dtype).eps  # noqa: E731
    seconds = [0.0, 0.0]  # float32 CholeskyQR of every recorded stack; Householder QR of the failed matrices
    for at, X in recorded:
        row = tally[(at, X.shape[-1])]
        row[0] += X.shape[0]
        start = time.perf_counter()
        in_float32 = linalg.cholesky_qr(X)[1]
        seconds[0] += time.perf_counter() - start
        start = time.perf_counter()
        if not bool(in_float32.all()):
            torch.linalg.qr(X[~in_float32])
        seconds[1] += time.perf_counter() - start
        row[1] += int(in_float32.sum())
        row[2] += int(in_float32.sum()) + int(linalg.cholesky_qr(X[~in_float32].double())[1].sum())
        row[3] += passes(X, tf32_product, float32)
        row[4] += passes(X, tf32_product, lambda x: 2.0**-10)
    print("| step | n | matrices | float32 passes | float32, then float64 | TF32, float32's test | TF32, TF32's test |")
    print("|---|---|---|---|---|---|---|")
    for (at, n), (count, *passed) in sorted(tally.items()):
        print(f"| {at} | {n} | {count} | " + " | ".join(str(p) for p in passed) + " |")
    total = [sum(row[i] for row in tally.values()) for i in range(5)]
    print(f"| all | | {total[0]} | " + " | ".join(f"{p} ({p / total[0]:.0%})" for p in total[1:]) + " |")
    print(f"\nfloat32 CholeskyQR of every recorded stack: {seconds[0]:.2f} s; Householder QR of the "
          f"{total[0] - total[1]} that failed: {seconds[1]:.2f} s ({torch.get_num_threads()} threads)")
    tried, policy_seconds = replay_policy(recorded)
    print(f"under the policy of skipping CholeskyQR for factors that keep failing, it was tried on {tried} of "
          f"{total[0]} matrices: {policy_seconds:.2f} s with the Householder QR of the rest, against "
          f"{seconds[0] + seconds[1]:.2f} s")
    return dict(tally)


def replay_policy(recorded: list[tuple[int, torch.Tensor]]) -> tuple[int, float]:
    """The recorded refreshes again under :func:`precond.refresh.counted_power_qr_`'s choice (float32, a
    CPU: the retry is Householder QR): a matrix is the same factor at the same place of every refresh's
    sequence of stacks, its counters start at the initial eigh's one refresh. Returns (matrices that tried
    CholeskyQR, seconds)."""
    by_step: dict[int, list[torch.Tensor]] = defaultdict(list)
    for at, X in recorded:
        by_step[at].append(X)
    failures: dict[int, torch.Tensor] = {}
    refreshes: dict[int, torch.Tensor] = {}
    tried_count, seconds = 0, 0.0
    for at in sorted(by_step):
        for k, X in enumerate(by_step[at]):
            F = failures.setdefault(k, torch.zeros(X.shape[0], dtype=torch.int64))
            R = refreshes.setdefault(k, torch.ones(X.shape[0], dtype=torch.int64))
            tried = ~refresh.skips_cholesky_qr(F, R)
            start = time.perf_counter()
            ok = torch.zeros(X.shape[0], dtype=torch.bool)
            if bool(tried.any()):
                ok[tried] = linalg.cholesky_qr(X[tried])[1]
            if not bool(ok.all()):
                torch.linalg.qr(X[~ok])
            seconds += time.perf_counter() - start
            tried_count += int(tried.sum())
            F += tried & ~ok
            R += 1
    return tried_count, seconds


if __name__ == "__main__":
    main()
