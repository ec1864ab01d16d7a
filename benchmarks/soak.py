"""Soak: many steps of a small model per optimizer, with faults injected and memory sampled.

    python benchmarks/soak.py                                   # 10,000 steps per optimizer, CPU
    python benchmarks/soak.py --device cuda --out benchmarks/results/soak/gpu.json
    python benchmarks/soak.py --steps 300 --nan-every 97 --spike-every 199   # the quick profile (CI)

Each optimizer trains an MLP with a layer norm (a 3-D weight reshaped on the way in, so every kind of
block appears) on a fixed teacher. Every 997th step one gradient entry is NaN and every 1,999th the rate is
1e12 for a step: the optimizer must skip those blocks (count them), keep the weights finite, and say so
once per parameter, not once per step; the loss must still have gone down. Sampled 20 times: the
optimizer's state bytes, the process's resident memory (CPU) or the allocator's bytes (CUDA). Growth is
measured from the first sample at or after 10% of the steps to the last: state bytes must not grow at all;
resident/allocated memory is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import precond
from precond_bench.runner import state_bytes

OPTIMIZERS = {
    "AdamW": lambda ps: precond.AdamW(ps, lr=1e-3),
    "SOAP": lambda ps: precond.SOAP(ps, lr=3e-3, precondition_frequency=10),
    "EShampoo": lambda ps: precond.EShampoo(ps, lr=3e-3, betas=(0.95, 0.95), epsilon=1e-8, precondition_frequency=10),
    "Shampoo": lambda ps: precond.Shampoo(ps, lr=3e-3, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10,
                                          grafting="adam", grafting_beta2=0.95, grafting_epsilon=1e-8),
    "Muon": lambda ps: precond.Muon(ps, lr=2e-2, adamw_lr=1e-3),
    "ASGO": lambda ps: precond.ASGO(ps, lr=1e-2, adamw_lr=1e-3),
    "Sophia": lambda ps: precond.Sophia(ps, lr=1e-3, rho=0.04),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 8, 8) * 0.3)  # a 3-D weight
        self.hidden = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("bgi,gij->bgj", x.view(-1, 4, 8), self.mix).reshape(-1, 32)
        return self.out(torch.tanh(self.norm(self.hidden(x))))


PARAMETERS = 7  # of Net: a warning once per parameter (and a layout note or two) is the most a soak may log


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(name: str, steps: int, device: str, nan_every: int = 997, spike_every: int = 1999,
         samples: int = 20) -> dict:
    torch.manual_seed(0)
    net = Net().to(device)
    teacher = nn.Linear(32, 10).to(device)
    opt = OPTIMIZERS[name](list(net.parameters()))
    counter = Counter()
    logging.getLogger("precond").addHandler(counter)
    every = max(1, steps // samples)
    trace, injected, began = [], 0, time.perf_counter()
    try:
        for step in range(1, steps + 1):
            x = torch.randn(64, 32, device=device)
            loss = nn.functional.mse_loss(net(x), teacher(x).detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step % nan_every == 0:
                net.hidden.weight.grad[0, 0] = float("nan")
                injected += 1
            spike = step % spike_every == 0
            if spike:
                saved = [g["lr"] for g in opt.param_groups]
                for g in opt.param_groups:
                    g["lr"] = 1e12
            opt.step()
            if spike:
                for g, lr in zip(opt.param_groups, saved):
                    g["lr"] = lr
            if name == "Sophia" and opt.hessian_update_due():
                logits = net(x)
                sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
                nn.functional.cross_entropy(logits, sampled).backward()
                opt.update_hessian(batch_size=sampled.numel())
                opt.zero_grad(set_to_none=True)
            if step % every == 0 or step == steps:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                trace.append({"step": step, "state_bytes": state_bytes(opt), "memory_bytes": memory(device),
                              "loss": float(loss.detach())})
    finally:
        logging.getLogger("precond").removeHandler(counter)
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    base = next(t for t in trace if t["step"] >= steps // 10)
    return {"optimizer": name, "steps": steps, "device": device, "seconds": time.perf_counter() - began,
            "finite": finite, "nan_gradients_injected": injected,
            "skipped_blocks": opt.preconditioner_stats()["nonfinite_skipped_blocks"],
            "warnings": counter.count, "state_growth_bytes": trace[-1]["state_bytes"] - base["state_bytes"],
            "memory_growth_bytes": trace[-1]["memory_bytes"] - base["memory_bytes"],
            "first_loss": trace[0]["loss"], "last_loss": trace[-1]["loss"], "trace": trace}


def table(runs: list[dict]) -> str:
    lines = ["| optimizer | steps | weights finite | NaN gradients injected | blocks skipped | warnings | "
             "state growth | memory growth | loss (first → last sample) | seconds |", "|---|" * 1 + "---|" * 9]
    for r in runs:
        lines.append(f"| {r['optimizer']} | {r['steps']} | {r['finite']} | {r['nan_gradients_injected']} | "
                     f"{r['skipped_blocks']} | {r['warnings']} | {r['state_growth_bytes']} B | "
                     f"{r['memory_growth_bytes'] / 2**20:+.1f} MiB | {r['first_loss']:.4f} → {r['last_loss']:.4f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--nan-every", type=int, default=997, help="a NaN gradient entry every this many steps")
    p.add_argument("--spike-every", type=int, default=1999, help="a step at rate 1e12 every this many steps")
    p.add_argument("--out", type=Path, default=None, help="write the runs (with their memory traces) as JSON")
    args = p.parse_args(argv)
    runs = []
    for name in args.optimizers:
        runs.append(soak(name, args.steps, args.device, args.nan_every, args.spike_every))
        print(f"{name}: {runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
        if args.out is not None:  # written as each finishes
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(runs, indent=1))
    print(table(runs))
    bad = [r["optimizer"] for r in runs if not r["finite"] or r["state_growth_bytes"] != 0
           or r["warnings"] > 2 * PARAMETERS or not r["last_loss"] < r["first_loss"]]
    if bad:
        print(f"soak failed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
