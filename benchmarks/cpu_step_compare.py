"""The optimizer step alone on `make bench`'s CPU model, for whichever precond is importable.

    PYTHONPATH=src python benchmarks/cpu_step_compare.py NAME

Every optimizer of the benchmark (its `bench/optimizers.py` settings, centre learning rate) takes 12
untimed and 60 timed steps on fixed random gradients of the CPU preset's GPT (139,584 parameters), two
threads; prints ms per step. Run it against two checkouts alternately to compare engines on one machine.
"""

import sys
import time

import torch

from precond_bench.model import GPT, GPTConfig
from precond_bench.optimizers import SPECS, AdamWSetting

torch.set_num_threads(2)
times = {}
for name, spec in SPECS.items():
    if spec.peer is not None or name.endswith("-tf32"):  # precond's own optimizers only
        continue
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=256, context=64, width=64, depth=2, heads=4))
    opt = spec.build(net, spec.center_lr, AdamWSetting(3e-3))
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    grads = [[1e-2 * torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]

    def step(i: int) -> None:
        for p, g in zip(params, grads[i % 2]):
            p.grad = g
        opt.step()

    for i in range(12):
        step(i)
    start = time.perf_counter()
    for i in range(60):
        step(i)
    times[name] = (time.perf_counter() - start) / 60 * 1e3
print(sys.argv[1] if len(sys.argv) > 1 else "", " ".join(f"{k}={v:.2f}" for k, v in times.items()))
