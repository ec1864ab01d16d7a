"""Stand-ins for the benchmark harness's tests: a fake training run with a fake clock, a fake saved run, and
the study scripts loaded as modules."""

from __future__ import annotations

import json
import math
from pathlib import Path

from precond_bench.protocol import BenchConfig
from precond_bench.workloads import PRESETS

CORPUS = {f"library/mod{i}.rst.txt": (f"Module {i}\n=========\n\nThe quick brown fox {i} jumps over the lazy dog. "
                                       * 40).encode() for i in range(40)}


def fake_run(name, final, curve, diverged=False):
    return {"optimizer": name, "final_val_loss": final, "curve": curve, "diverged": diverged, "train_seconds": 4.0,
            "optimizer_share": 0.5, "state_bytes": 2**20, "peak_memory_bytes": None, "refreshes": 3,
            "skipped_refreshes": 0, "failures": 0}


class FakeTraining:
    """Stands in for ``train_run``: loss is a parabola in log(lr) around ``best_lr``; every step costs one
    second of a fake clock that the protocol reads."""

    def __init__(self, monkeypatch, best_lr: float, diverge_above: float = math.inf, best_wd: float = 0.1,
                 full_best_lr: float | None = None):
        from precond_bench import protocol
        self.best_lr, self.diverge_above, self.best_wd = best_lr, diverge_above, best_wd
        self.full_best_lr = full_best_lr or best_lr  # the best rate of runs longer than a sweep (> 3 steps)
        self.clock = 0.0
        self.calls: list[tuple[str, float, int]] = []
        monkeypatch.setattr(protocol, "train_run", self)
        monkeypatch.setattr(protocol.time, "perf_counter", lambda: self.clock)
        monkeypatch.setattr(protocol, "make_workload", lambda *a: type("W", (), {"describe": lambda s: {}})())

    def __call__(self, workload, spec, lr, seed, steps, eval_every, device, adamw, progress=None, schedule=None,
                 checkpoint=None, deadline=None, stop_at=None, compile_step=None):
        self.calls.append((spec.name, lr, seed))
        done = int(checkpoint.read_text()) if checkpoint is not None and checkpoint.exists() else 0
        if deadline is not None and self.clock + steps - done > deadline:  # checkpointed at the deadline
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(str(done + int(deadline - self.clock)))
            checkpoint.with_suffix(".json").write_text(json.dumps({"step": done + int(deadline - self.clock)}))
            self.clock = deadline
            return None
        self.clock += steps - done
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
            checkpoint.with_suffix(".json").unlink()
        diverged = lr > self.diverge_above
        best_lr = self.full_best_lr if steps > 3 else self.best_lr
        loss = math.inf if diverged else 1.0 + math.log(lr / best_lr) ** 2 + 0.01 * seed
        if spec.name == "AdamW":
            loss += (adamw.weight_decay - self.best_wd) ** 2
        return {"optimizer": spec.name, "lr": lr, "seed": seed, "steps": steps, "steps_done": steps,
                "diverged": diverged, "curve": [(0, 0.0, 5.0), (steps, float(steps), loss)], "final_val_loss": loss,
                "final_train_loss": loss, "train_seconds": float(steps), "optimizer_seconds": 0.5 * steps,
                "optimizer_share": 0.5, "state_bytes": 0, "peak_memory_bytes": None, "refreshes": 0,
                "skipped_refreshes": 0, "failures": 0, "nonfinite_skips": 0,
                "adamw": {"lr": adamw.lr, "weight_decay": adamw.weight_decay}}


def fake_config(tmp_path, optimizers, **kw):
    preset = dict(PRESETS["tiny"], steps=6, sweep_steps=3, lr_points=3, seeds=2)
    return BenchConfig(preset=preset, optimizers=optimizers, runs_dir=str(tmp_path), data_dir=str(tmp_path), **kw)


def study_script(name):
    """A script of ``benchmarks/`` as a module: the studies live outside the package, and these tests keep
    them in step with the harness they call."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
