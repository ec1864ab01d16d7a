"""Train the benchmark's GPT on several processes under DDP or FSDP2 with a precond optimizer.

    torchrun --nproc-per-node 2 examples/distributed_lm.py --mode ddp --optimizer SOAP          # 2 GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/distributed_lm.py --mode fsdp --device cpu            # 8 CPU processes (gloo)
    python examples/distributed_lm.py --optimizer SOAP                                          # one process

Every process takes its rows of each global batch (``--batch-size`` is the global size), so any world size
trains on the same data. Each process prints its optimizer time per step (median over the timed steps),
the time of the optimizer's collectives (over the last ``--comm-steps`` steps, which timing them slows with
device syncs, so they are not in the optimizer's time), the optimizer state it holds and its peak memory;
``--out`` writes them (and the loss curve) as JSON, ``--save-params`` the final parameters and
``--compare`` the differences to a run saved by another (e.g. one process).

Whether processes follow one process's trajectory is tested exactly in ``tests/test_distributed.py`` (same
gradients fed to both; ``python tests/distributed_cases.py --world 8`` runs it on 8 processes). Here the
gradients of a batch split between processes are summed in another order than one process's, and methods
whose eigenbases are not unique (SOAP on an embedding whose unseen rows give a zero eigenspace) amplify
such rounding: compare their loss curves rather than their parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import precond
from precond_bench.data import prepare_corpus
from precond_bench.workloads import GPTConfig, LanguageModel

OPTIMIZERS = {
    "SOAP": lambda params, distributed: precond.SOAP(params, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.0,
                                                     precondition_frequency=10, distributed=distributed),
    "EShampoo": lambda params, distributed: precond.EShampoo(params, lr=3e-3, betas=(0.95, 0.95), epsilon=1e-8,
                                                             precondition_frequency=10, distributed=distributed),
    "Shampoo": lambda params, distributed: precond.Shampoo(params, lr=3e-3, epsilon=1e-12, grafting="adam",
                                                           grafting_beta2=0.95, grafting_epsilon=1e-8,
                                                           precondition_frequency=10, distributed=distributed),
    "Muon": lambda params, distributed: precond.Muon(params, lr=2e-2, weight_decay=0.0, adamw_lr=3e-3,
                                                     distributed=distributed),
    "AdamW": lambda params, distributed: precond.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0,
                                                       distributed=distributed),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def backward(trained, opt, workload, step, rank, share) -> torch.Tensor:
    """Gradients of this process's rows of global batch ``step``; returns its loss."""
    x, y = workload.batch(step, seed=0)
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    opt.zero_grad(set_to_none=True)
    logits = trained(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    return loss


def profile_step(trained, opt, workload, step, rank, share, device) -> None:
    """One more training step whose optimizer step runs under ``torch.profiler``; rank 0 prints the table."""
    from torch.profiler import ProfilerActivity, profile
    backward(trained, opt, workload, step, rank, share)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if rank == 0:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="SOAP")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps not timed (first step, compilation, refreshes)")
    p.add_argument("--comm-steps", type=int, default=5, help="last steps, which time the collectives (adding "
                   "device syncs around them) and are left out of the optimizer's time")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split between processes")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--compile", action="store_true", help="torch.compile(opt.step) after the first (eager) step; "
                   "compilation falls in the warmup steps (under FSDP2, torch 2.11's inductor refuses the step: "
                   "aliased inputs mutated in the graph)")
    p.add_argument("--profile", action="store_true", help="after training, profile one more step (rank 0 prints "
                   "the kernels that took the most device time; the step changes the final parameters)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-params", type=Path, default=None)
    p.add_argument("--compare", type=Path, default=None)
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun: a process group, even of one
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type ==
                                "cuda" else None)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if rank == 0:
        prepare_corpus(args.data_dir)
    if distributed:
        dist.barrier()

    config = GPTConfig(context=args.context, width=args.width, depth=args.depth, heads=args.heads)
    workload = LanguageModel(args.data_dir, config, batch_size=args.batch_size, eval_batches=1, device=str(device))
    model = workload.model(seed=0).to(getattr(torch, args.dtype))
    trained = model
    if distributed and args.mode == "ddp":
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif distributed:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    groups = precond.param_groups(model) if args.optimizer == "Muon" else list(model.parameters())
    ddp = distributed and args.mode == "ddp"
    opt = OPTIMIZERS[args.optimizer](groups, "ddp" if ddp else None)
    step_fn = torch.compile(opt.step) if args.compile else opt.step
    comm_from = max(args.steps - args.comm_steps, min(args.warmup + 1, args.steps - 1))

    losses, step_seconds, comm_seconds = [], [], []
    share = args.batch_size // world
    for step in range(args.steps):
        if step == comm_from:
            opt.time_communication()
        loss = backward(trained, opt, workload, step, rank, share)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        comm_before, start = opt.communication_seconds, time.perf_counter()
        step_fn() if step else opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        comm_seconds.append(opt.communication_seconds - comm_before)
        mean_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))

    if args.profile:
        opt.time_communication(False)
        profile_step(trained, opt, workload, args.steps, rank, share, device)

    timed, comm_timed = slice(min(args.warmup, comm_from - 1), comm_from), slice(comm_from, None)
    record = {"rank": rank, "world": world, "mode": args.mode if distributed else "single",
              "optimizer": args.optimizer, "compiled": args.compile,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "optimizer_ms": 1e3 * statistics.median(step_seconds[timed]),
              "comm_ms": 1e3 * statistics.median(comm_seconds[comm_timed] or [0.0]),
              "optimizer_state_mb": state_bytes(opt) / 2**20, "peak_memory_mb": peak_memory_mb(device),
              "losses": losses}
    params = {name: full(p.detach()).cpu() for name, p in model.named_parameters()}
    params["losses"] = torch.tensor(losses, dtype=torch.float64)
    records = [None] * world
    if distributed:
        dist.all_gather_object(records, record)
    else:
        records = [record]
    if rank == 0:
        for r in records:
            print(f"rank {r['rank']}/{world} {r['mode']} {args.optimizer}: optimizer {r['optimizer_ms']:.2f} ms/step "
                  f"(collectives {r['comm_ms']:.2f} ms), optimizer state {r['optimizer_state_mb']:.1f} MiB, "
                  f"peak memory {r['peak_memory_mb']:.0f} MiB")
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=1))
        if args.save_params:
            torch.save(params, args.save_params)
        if args.compare:
            other = torch.load(args.compare)
            diff = max(float((params[k] - other[k]).norm() / other[k].norm()) for k in other if k != "losses")
            steps = min(len(losses), len(other["losses"]))
            gap = float((params["losses"][:steps] - other["losses"][:steps]).abs().max())
            print(f"against {args.compare}: max relative parameter difference {diff:.3e}, "
                  f"max loss difference {gap:.3e} over {steps} steps")
    if distributed:
        dist.barrier()  # rank 0 writes and compares above: the others wait, so none tears down gloo under it
        dist.destroy_process_group()
        # On a loaded CPU machine a rank was seen to abort (SIGABRT) in the interpreter's teardown after all
        # of the above had finished, which torchrun reports as a failed run; nothing is left to clean up here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
