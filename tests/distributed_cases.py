"""What each process of the distributed tests runs (spawned by ``test_distributed.py``, gloo on the CPU).

Every case trains in float64 under DDP or FSDP2 and, in the same process, an independent single-process
reference fed the full batch; it returns the largest relative difference of the parameters (and what else
the test asserts on). A case that raises returns its error text instead, so one failure does not hide others.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import precond

STEPS = 5
BATCH = 8  # per process

# Small blocks (8) so that the 18- and 20-wide dims are cut into several blocks.
FACTORIES = {
    "Shampoo": lambda ps, **kw: precond.Shampoo(ps, lr=0.01, grafting="adam", max_preconditioner_dim=8, **kw),
    "KLShampoo": lambda ps, **kw: precond.KLShampoo(ps, lr=0.01, grafting="adam", max_preconditioner_dim=8, **kw),
    "EShampoo": lambda ps, **kw: precond.EShampoo(ps, lr=0.01, precondition_frequency=2, max_preconditioner_dim=8,
                                                  **kw),
    "SOAP": lambda ps, **kw: precond.SOAP(ps, lr=0.01, precondition_frequency=2, max_precond_dim=8,
                                          large_dim_policy="split", **kw),
    "KLSOAP": lambda ps, **kw: precond.KLSOAP(ps, lr=0.01, precondition_frequency=2, max_precond_dim=8,
                                              large_dim_policy="split", **kw),
    "Muon": lambda ps, **kw: precond.Muon(ps, lr=0.02, adamw_lr=0.01, ns_dtype="float32", **kw),
    "ASGO": lambda ps, **kw: precond.ASGO(ps, lr=0.01, adamw_lr=0.01, **kw),
    "AdamW": lambda ps, **kw: precond.AdamW(ps, lr=0.01, **kw),
    "Sophia": lambda ps, **kw: precond.Sophia(ps, lr=0.01, update_period=2, **kw),
}


class Net(nn.Module):
    """A 4-D conv weight, a 3-D one, matrices wider than the block size, biases and a frozen matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(4, 2, 3, padding=1)
        self.hidden = nn.Linear(18, 20)
        self.out = nn.Linear(20, 3)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(x.view(-1, 1, 3, 3))).flatten(1).view(-1, 4, 9)
        h = torch.tanh(self.conv1(h)).flatten(1)
        return self.out(torch.tanh(self.hidden(h)))

    def parts(self) -> list[nn.Module]:
        return [self.conv2, self.conv1, self.hidden, self.out, self.frozen]


def data(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH * world, 9, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :3] * 2)


def my_rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank] if t.shape[0] >= world or rank < t.shape[0] else t[:0]


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int,
          alone: bool = False) -> None:
    """The batches of ``world`` processes; this process's share of each (the wrapper averages the
    gradients), or all of it when training ``alone``."""
    for step in steps:
        x, y = data(step, world)
        if not alone:
            x, y = my_rows(x, rank, world), my_rows(y, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if isinstance(opt, precond.Sophia) and opt.hessian_update_due():
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.update_hessian(batch_size=BATCH * world)
    opt.zero_grad()


def full_params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in net.parameters()]


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-300)) for x, y in zip(a, b))


def method_state_numel(opt: torch.optim.Optimizer) -> int:
    """Elements of preconditioner and moment state (not the per-block counters every process keeps)."""
    return sum(v.numel() for s in opt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and not k.endswith(("step", "nonfinite")))


class Reference:
    """One process stepping the same gradients as the distributed run (teacher-forced, so that rounding
    differences between the processes' gradient sums and one full batch's are not what is measured).
    ``chunked``: every parameter is cut by rows into ``world`` separate parameters (what FSDP2's
    per-shard blocks amount to)."""

    def __init__(self, name: str, world: int, chunked: bool, dtype: torch.dtype = torch.float64) -> None:
        self.world, self.chunked = world, chunked
        self.params = [p for p in Net().to(dtype).parameters() if p.requires_grad]
        self.pieces = [[c.clone() for c in p.detach().chunk(world)] if chunked else [p] for p in self.params]
        self.opt = FACTORIES[name]([c for cs in self.pieces for c in cs])

    def feed(self, grads: list[torch.Tensor]) -> None:
        for cs, g in zip(self.pieces, grads):
            for c, part in zip(cs, g.chunk(len(cs))):
                c.grad = part.clone()

    def step(self, grads: list[torch.Tensor]) -> None:
        self.feed(grads)
        self.opt.step()

    def result(self) -> list[torch.Tensor]:
        return [torch.cat([c.detach() for c in cs]) for cs in self.pieces]


def full_grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            for p in net.parameters() if p.requires_grad]


def ddp_pair(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = Net().to(dtype)
    wrapped = DistributedDataParallel(net)
    return wrapped, FACTORIES[name](net.parameters(), distributed="ddp")


def fsdp_pair(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = Net()
    for part in net.parts():
        fully_shard(part)
    fully_shard(net)
    return net, FACTORIES[name](net.parameters())


def case_trajectory(mode: str, name: str, rank: int, world: int, compiled: bool = False,
                    dtype: torch.dtype = torch.float64) -> dict:
    """``compiled``: after the first (eager) step, ``torch.compile(opt.step)`` (``aot_eager``), the
    collectives traced inside it. ``dtype``: of the parameters (DDP only; the state stays float32 for
    bfloat16, and processes exchange weights in the parameters' dtype)."""
    net, opt = ddp_pair(name, dtype) if mode == "ddp" else fsdp_pair(name)
    inner = net.module if mode == "ddp" else net
    ref = Reference(name, world, chunked=mode == "fsdp" and name != "Muon", dtype=dtype)  # Muon: whole matrices
    if compiled:
        torch._dynamo.reset()
    step_fn = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    for step in range(STEPS):
        x, y = (my_rows(t, rank, world).to(dtype) for t in data(step, world))
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        ref.step(full_grads(inner))
        step_fn() if step else opt.step()
        if isinstance(opt, precond.Sophia) and opt.hessian_update_due():
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            ref.feed(full_grads(inner))
            opt.update_hessian(batch_size=BATCH * world)
            ref.opt.update_hessian(batch_size=BATCH * world)
    numel = torch.tensor([method_state_numel(opt)])
    counts = [torch.zeros(1, dtype=numel.dtype) for _ in range(world)]
    dist.all_gather(counts, numel)
    return {"max_rel": max_rel(full_params(inner), ref.result()),
            "state_numel": [int(c) for c in counts], "reference_numel": method_state_numel(ref.opt)}


def nonfinite_counts(opt: torch.optim.Optimizer) -> list[int]:
    return [int(v) for s in opt.state.values() for k, v in sorted(s.items()) if k.endswith("nonfinite")]


def case_guards(mode: str, name: str, rank: int, world: int) -> dict:
    """Under DDP each process updates only the blocks it owns: a non-finite gradient (step 1) and refused
    updates (step 2: a rate of 1e12) must leave the same weights and counters everywhere as in one process,
    and ``strict=True`` must raise in every process alike (none waits alone in a collective)."""
    net, opt = ddp_pair(name)
    ref = Reference(name, world, chunked=False)
    trained = [p for p in net.module.parameters() if p.requires_grad]
    for step in range(4):
        x, y = (my_rows(t, rank, world) for t in data(step, world))
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        if step == 1:
            trained[0].grad.view(-1)[0] = float("nan")
        for o in (opt, ref.opt):
            for group in o.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * (1e12 if step == 2 else 1.0)
        ref.step([p.grad.clone() for p in trained])
        opt.step()
    counts = nonfinite_counts(opt)
    everyone = [None] * world
    dist.all_gather_object(everyone, counts)
    strict_net, strict_opt = ddp_pair(name)
    strict_opt._strict = True
    raised = ""
    for step in range(2):  # SOAP's first step makes no update
        x, y = (my_rows(t, rank, world) for t in data(step, world))
        strict_opt.zero_grad()
        nn.functional.mse_loss(strict_net(x), y).backward()
        for group in strict_opt.param_groups:
            group["lr"] *= 1e12 if step == 1 else 1.0
        try:
            strict_opt.step()
        except FloatingPointError as error:
            raised = str(error)
    dist.barrier()
    return {"max_rel": max_rel(full_params(net.module), ref.result()), "counts": everyone,
            "reference_counts": nonfinite_counts(ref.opt), "raised": raised}


def _save(net: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _load(net: nn.Module, opt: torch.optim.Optimizer, path: str, no_dist: bool = False) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def case_resume(mode: str, name: str, rank: int, world: int, root: str) -> dict:
    """Train, checkpoint with torch.distributed.checkpoint, train on; a fresh pair restored from the
    checkpoint must continue identically. Then one process restores the checkpoint alone (world size 1)."""
    pair = ddp_pair if mode == "ddp" else fsdp_pair
    path = os.path.join(root, f"{mode}-{name}")
    net, opt = pair(name)
    train(net, opt, range(3), rank, world)
    _save(net, opt, path)
    train(net, opt, range(3, 6), rank, world)
    fresh, fresh_opt = pair(name)
    _load(fresh, fresh_opt, path)
    train(fresh, fresh_opt, range(3, 6), rank, world)
    unwrap = (lambda m: m.module) if mode == "ddp" else (lambda m: m)
    result = {"max_rel": max_rel(full_params(unwrap(fresh)), full_params(unwrap(net)))}
    if rank == 0:  # another world size: one process, no process group
        single = Net()
        single_opt = FACTORIES[name](single.parameters())
        try:
            _load(single, single_opt, path, no_dist=True)
            train(single, single_opt, range(3, 6), 0, world, alone=True)
            result["world1_max_rel"] = max_rel(full_params(single), full_params(unwrap(net)))
        except BaseException as error:  # noqa: BLE001 - dcp raises CheckpointException, a BaseException
            result["world1_error"] = f"{type(error).__name__}: {error}"
    dist.barrier()
    return result


CASES = ([("trajectory", mode, name) for mode in ("ddp", "fsdp") for name in FACTORIES]
         + [("resume", "ddp", "SOAP"), ("resume", "ddp", "Muon"), ("resume", "fsdp", "SOAP"),
            ("resume", "fsdp", "Muon")]
         + [("guards", "ddp", name) for name in ("Shampoo", "SOAP", "Muon")]
         + [("compiled", "ddp", name) for name in ("SOAP", "Muon")]
         + [("bfloat16", "ddp", name) for name in ("Shampoo", "Muon")])


def worker(rank: int, world: int, port: int, root: str) -> None:
    """Runs every case; writes ``{case: result}`` to ``root/rank{rank}.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    results = {}
    try:
        for kind, mode, name in CASES:
            key = f"{kind}-{mode}-{name}"
            try:
                if kind == "trajectory":
                    out = case_trajectory(mode, name, rank, world)
                elif kind == "guards":
                    out = case_guards(mode, name, rank, world)
                elif kind == "compiled":
                    out = case_trajectory(mode, name, rank, world, compiled=True)
                elif kind == "bfloat16":
                    out = case_trajectory(mode, name, rank, world, dtype=torch.bfloat16)
                else:
                    out = case_resume(mode, name, rank, world, root)
            except Exception:  # noqa: BLE001 - reported per case by the test
                out = {"error": traceback.format_exc()}
            results[key] = out
    finally:
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def main() -> None:
    """``python tests/distributed_cases.py --world 8``: every case on that many gloo processes, as a table."""
    import argparse
    import socket
    import tempfile

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(worker, args=(args.world, port, root), nprocs=args.world, join=True)
        results = [json.load(open(os.path.join(root, f"rank{r}.json"))) for r in range(args.world)]
    for key in results[0]:
        outs = [r[key] for r in results]
        if any("error" in o for o in outs):
            print(f"{key:28s} ERROR {next(o['error'] for o in outs if 'error' in o).splitlines()[-1]}")
            continue
        worst = max(o["max_rel"] for o in outs)
        extra = ""
        if "state_numel" in outs[0]:
            counts, total = outs[0]["state_numel"], outs[0]["reference_numel"]
            extra = f"  state per process {min(counts)}..{max(counts)} of {total} (max {max(counts) / total:.2f})"
        if "world1_max_rel" in outs[0]:
            extra = f"  loaded by one process: {outs[0]['world1_max_rel']:.1e}"
        elif "world1_error" in outs[0]:
            extra = "  loaded by one process: refused (" + outs[0]["world1_error"].strip().splitlines()[-1][:60] + ")"
        print(f"{key:28s} max relative difference {worst:.1e}{extra}")


if __name__ == "__main__":
    main()
