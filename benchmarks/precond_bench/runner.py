"""One training run: an optimizer at one learning rate and seed, with its curve and costs."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .optimizers import AdamWSetting, OptimizerSpec
from .workloads import Workload

__all__ = ["train_run", "state_bytes", "lr_factor", "timing_conditions"]


def lr_factor(step: int, steps: int, schedule: dict[str, Any] | None) -> float:
    """The multiplier of every group's base rate at ``step`` (1-based) of ``steps``.

    ``{"kind": "cosine", "warmup": w, "floor": f}``: linear warmup over the first ``w`` of the run (a
    fraction; or ``"warmup_steps": n`` steps, the same in a short sweep run as in a full one), then a cosine
    from 1 down to ``f`` at the last step. ``None`` or ``{"kind": "constant"}``: 1.
    """
    if not schedule or schedule["kind"] == "constant":
        return 1.0
    warm = schedule["warmup_steps"] if "warmup_steps" in schedule else max(1, round(schedule["warmup"] * steps))
    if step <= warm:
        return step / warm
    progress = (step - warm) / max(1, steps - warm)
    floor = schedule["floor"]
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of distinct storage the optimizer's state holds: the tensors reached from its ``state`` through
    dicts, lists and the attributes of non-torch objects (Distributed Shampoo keeps its factors in
    dataclasses), each storage once (views of one stack, a wrapper's state and its base optimizer's), the
    parameters and their gradients left out."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skip = {t.untyped_storage().data_ptr() for p in params for t in (p, p.grad) if t is not None}
    seen: dict[int, int] = {}
    visited: set[int] = set()

    def walk(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
            return
        if id(value) in visited or depth > 12:
            return
        visited.add(id(value))
        if isinstance(value, dict):
            values = value.values()
        elif isinstance(value, (list, tuple)):
            values = value
        elif hasattr(value, "__dict__") and not type(value).__module__.startswith(("torch", "builtins")):
            values = vars(value).values()
        else:
            return
        for v in values:
            walk(v, depth + 1)

    walk(list(optimizer.state.values()))
    inner = getattr(optimizer, "optimizer", None)  # an iterate-averaging wrapper's base optimizer
    if inner is not None:
        walk(list(inner.state.values()))
    return sum(seen.values())


def _validation_loss(workload: Workload, model, optimizer) -> float:
    """The validation loss, at the averaged weights for an iterate-averaging optimizer (``eval()``/``train()``)."""
    averaged = hasattr(optimizer, "eval") and hasattr(optimizer, "train")
    if averaged:
        optimizer.eval()
    try:
        return workload.validation_loss(model)
    finally:
        if averaged:
            optimizer.train()


def timing_conditions(device: str) -> dict[str, Any]:
    """What a run's timings depend on: the device's name, torch's version, its CPU thread count and the
    commit of the code: ``PRECOND_COMMIT`` from the environment when set (a copy of the tree whose ``.git``
    is not the code's own), else the checkout's HEAD, else ``None``. Runs timed under different conditions
    should not be compared by wall-clock."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or "cpu")
    commit = os.environ.get("PRECOND_COMMIT") or None
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit}


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs in this process (``reduce-overhead``)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _save_checkpoint(path: Path, model, optimizer, progress: dict[str, Any], device: str) -> None:
    """Everything a run needs to go on bit for bit: weights, the optimizer's own ``state_dict``, the host and
    device random states (Sophia samples labels), the curve and the clocks. The data position and the schedule
    are functions of the step."""
    rng = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng, **progress}, partial)
    partial.replace(path)  # a call killed while saving leaves the previous checkpoint
    # how far it got, readable without loading the weights (what a call planning its time needs)
    path.with_suffix(".json").write_text(json.dumps({"step": progress["step"]}))


def _compiled(step, setting: str):
    """``torch.compile`` of ``step`` under ``BACKEND[:MODE]``."""
    backend, _, mode = setting.partition(":")
    return torch.compile(step, backend=backend, **({"mode": mode} if mode else {}))


def train_run(workload: Workload, spec: OptimizerSpec, lr: float, seed: int, steps: int, eval_every: int,
              device: str, adamw: AdamWSetting, progress=None, schedule: dict[str, Any] | None = None,
              checkpoint: Path | None = None, deadline: float | None = None, stop_at: int | None = None,
              compile_step: str | None = None) -> dict[str, Any] | None:
    """Train, evaluating every ``eval_every`` steps; stops early (``diverged``) on a non-finite loss.

    Every group's rate follows ``schedule`` (see :func:`lr_factor`) from the rate it was built with. A step
    is ``workload.accumulation`` micro-batches, each loss scaled by ``1/accumulation`` before its backward.
    Wall-clock counts forward, backward and optimizer work (Sophia's curvature pass included), not the
    evaluations; ``optimizer_seconds`` is the ``step()`` (and ``update_hessian``) part of it; ``wall_seconds``
    is the whole run's (set-up and evaluations too, summed over resumed calls: what a call must plan for).

    With ``checkpoint`` (a path), a run that passes ``deadline`` (a ``time.perf_counter()`` value) or reaches
    step ``stop_at`` before its end saves itself there and returns ``None``; called again with the same
    arguments it resumes from that file, bit for bit, and removes it when the run ends.

    With ``compile_step`` (a ``torch.compile`` backend, and after a colon its mode: ``inductor:reduce-overhead``
    replays the step as CUDA graphs), every ``step()`` after a call's first (which creates
    or loads the state eagerly) is compiled. A step during which dynamo compiled a graph is timed apart
    (``compile_seconds``; which steps, ``compile_steps``: a step that recompiles at every step shows there):
    the wall-clock is the compiled step's, as a long run sees it.
    """
    started = time.perf_counter()
    if compile_step is not None:  # every optimizer's step is one code object: a fresh cache, no recompile limit
        torch._dynamo.reset()
    model = workload.model(seed)
    optimizer = spec.build(model, lr, adamw)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a checkpoint's scheduled rates load
    autocast = _autocast(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    saved = torch.load(checkpoint, weights_only=False) if checkpoint is not None and checkpoint.exists() else None
    adamw_setting = {"lr": adamw.lr, "weight_decay": adamw.weight_decay}
    if saved is not None and saved["adamw"] != adamw_setting:  # made under another AdamW setting: stale
        saved = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        curve, first = [tuple(p) for p in saved["curve"]], saved["step"] + 1
        train_seconds, optimizer_seconds = saved["train_seconds"], saved["optimizer_seconds"]
        last_loss, wall_before = saved["last_loss"], saved.get("wall_seconds", 0.0)
    else:
        with torch.no_grad(), autocast:
            curve = [(0, 0.0, _validation_loss(workload, model, optimizer))]
        first, train_seconds, optimizer_seconds, last_loss, wall_before = 1, 0.0, 0.0, math.nan, 0.0
    diverged = False
    steps_done = first - 1
    compiled = None if compile_step is None else _compiled(optimizer.step, compile_step)
    compile_seconds = saved.get("compile_seconds", 0.0) if saved is not None else 0.0
    compile_steps: list[int] = list(saved.get("compile_steps", [])) if saved is not None else []
    skips_before = _cudagraph_skips() - (saved.get("cudagraph_skips", 0) if saved is not None else 0)
    for step in range(first, steps + 1):
        late = deadline is not None and time.perf_counter() > deadline
        if checkpoint is not None and step > first and (late or (stop_at is not None and step == stop_at + 1)):
            done = dict(step=steps_done, curve=curve, train_seconds=train_seconds, optimizer_seconds=optimizer_seconds,
                        last_loss=last_loss, adamw=adamw_setting, compile_seconds=compile_seconds,
                        compile_steps=compile_steps, cudagraph_skips=_cudagraph_skips() - skips_before,
                        wall_seconds=wall_before + time.perf_counter() - started)
            _save_checkpoint(checkpoint, model, optimizer, done, device)
            return None
        _sync(device)
        t0 = time.perf_counter()
        micro = workload.micro_batches(workload.batch(step, seed))
        total = 0.0
        for part in micro:
            with autocast:
                loss = workload.loss(model, part) / len(micro)
            loss.backward()
            total += loss.detach()
        _sync(device)
        t1 = time.perf_counter()
        factor = lr_factor(step, steps, schedule)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        graphs = _graphs_compiled()
        (optimizer.step if compiled is None or step == first else compiled)()
        optimizer.zero_grad(set_to_none=True)
        if spec.needs_hessian and optimizer.hessian_update_due():
            with autocast:  # on the last micro-batch: the curvature estimate needs no more
                logits, _ = workload.logits_and_targets(model, micro[-1])
            sampled = torch.distributions.Categorical(logits=logits.float().detach()).sample()
            F.cross_entropy(logits.float(), sampled).backward()
            optimizer.update_hessian(batch_size=logits.shape[0])
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if compiled is not None and _graphs_compiled() != graphs:  # this step compiled: timed apart
            compile_seconds += t2 - t1
            compile_steps.append(step)
            t2 = t1
        train_seconds += t2 - t0
        optimizer_seconds += t2 - t1
        last_loss = float(total)
        steps_done = step
        if progress is not None:
            progress(step, last_loss)
        if not math.isfinite(last_loss):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            with torch.no_grad(), autocast:
                val = _validation_loss(workload, model, optimizer)
            curve.append((step, train_seconds, val))
            if not math.isfinite(val):
                diverged = True
                break
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        checkpoint.with_suffix(".json").unlink(missing_ok=True)
    stats = optimizer.preconditioner_stats() if hasattr(optimizer, "preconditioner_stats") else {"factors": []}
    tokens = workload.tokens_per_step()
    return {
        "optimizer": spec.name, "lr": lr, "seed": seed, "steps": steps, "steps_done": steps_done,
        "adamw": {"lr": adamw.lr, "weight_decay": adamw.weight_decay}, "schedule": schedule,
        "conditions": timing_conditions(device), "resumed": saved is not None,
        "diverged": diverged, "tokens_per_step": tokens, "accumulation": workload.accumulation,
        "tokens_per_second": steps_done * tokens / train_seconds if train_seconds else None,
        "curve": curve, "final_val_loss": curve[-1][2] if not diverged else math.inf,
        "final_train_loss": last_loss, "train_seconds": train_seconds, "optimizer_seconds": optimizer_seconds,
        "optimizer_share": optimizer_seconds / train_seconds if train_seconds else 0.0,
        **({"compile_step": compile_step, "compile_seconds": compile_seconds, "compile_steps": compile_steps,
            "cudagraph_skips": _cudagraph_skips() - skips_before} if compile_step else {}),
        "wall_seconds": wall_before + time.perf_counter() - started,  # evaluations and set-up too
        "state_bytes": state_bytes(optimizer),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "refreshes": sum(f["refreshes"] for f in stats["factors"]),
        "skipped_refreshes": sum(f["skipped"] for f in stats["factors"]),
        "failures": sum(f["failures"] for f in stats["factors"]),
        # refreshes whose CholeskyQR fell back to Householder QR (power-QR: SOAP, KL-SOAP)
        "qr_fallbacks": sum(f["fallbacks"] for f in stats["factors"]),
        # refreshes whose first CholeskyQR (the factor's precision) failed, before any retry
        "cholesky_failures": sum(f["cholesky_failures"] for f in stats["factors"]),
        "nonfinite_skips": stats.get("nonfinite_skipped_blocks", 0),
    }
