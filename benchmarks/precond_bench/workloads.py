"""Workloads: a model, its batches, its loss and its validation loss. Presets size them for CPU or GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import CORPORA, load_corpus, load_digits
from .model import GPT, GPTConfig

__all__ = ["Workload", "LanguageModel", "Digits", "PRESETS", "make_workload", "with_batch_axis"]


class Workload:
    """What the runner needs: ``model(seed)``, ``batch(step)``, ``logits_and_targets(model, batch)``,
    ``validation_loss(model)``."""

    name: str
    batch_size: int  # rows of one micro-batch
    accumulation: int = 1  # micro-batches per optimizer step

    def model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def micro_batches(self, batch) -> list:
        """A step's batch (``batch_size · accumulation`` rows) cut into its micro-batches."""
        return list(zip(*(t.tensor_split(self.accumulation) for t in batch)))

    def tokens_per_step(self) -> int:
        """What one optimizer step consumes: predicted bytes for a language model, images otherwise."""
        return self.batch_size * self.accumulation

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits_and_targets(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        logits, targets = self.logits_and_targets(model, batch)
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class LanguageModel(Workload):
    """Next-byte prediction on a corpus of :data:`~precond_bench.data.CORPORA` (the Python documentation or
    the Linux kernel's C source). Batches are random windows of the training bytes, a function of
    (step, seed); the validation set is fixed, evenly spaced windows of the validation bytes."""

    data_dir: Path
    config: GPTConfig = field(default_factory=GPTConfig)
    batch_size: int = 16
    eval_batches: int = 8
    accumulation: int = 1
    device: str = "cpu"
    corpus: str = "pydocs"
    compile_backend: str | None = None  # torch.compile's backend for the model (None: eager)
    name: str = "lm"

    def __post_init__(self):
        self.train, self.val = load_corpus(self.data_dir, self.corpus)  # uint8, memory-mapped
        T = self.config.context
        starts = np.linspace(0, len(self.val) - T - 2, self.eval_batches * self.batch_size).astype(np.int64)
        self.val_x, self.val_y = self._windows(self.val, starts)

    def _windows(self, tokens: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.config.context
        rows = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = GPT(self.config).to(self.device)
        if self.compile_backend is not None:  # in place: parameter names and state_dict keys stay the eager ones
            model.compile(backend=self.compile_backend)
        return model

    def batch(self, step: int, seed: int):
        """``batch_size · accumulation`` windows, a function of (step, seed): a step sees the same bytes whatever
        the micro-batch it is cut into."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = self.batch_size * self.accumulation
        starts = torch.randint(0, len(self.train) - self.config.context - 1, (rows,), generator=g)
        return self._windows(self.train, starts.tolist())

    def tokens_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.config.context

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        total = 0.0
        for i in range(self.eval_batches):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            total += float(self.loss(model, (self.val_x[sl], self.val_y[sl])))
        return total / self.eval_batches

    def describe(self):
        n = sum(p.numel() for p in GPT(self.config).parameters())
        return {"workload": "lm", "data": f"{CORPORA[self.corpus].title}, bytes", "corpus": self.corpus,
                "train_bytes": len(self.train), "val_bytes": len(self.val), "parameters": n,
                "batch_size": self.batch_size, "accumulation": self.accumulation,
                "bytes_per_step": self.tokens_per_step(), **self.config.__dict__,
                **({"compiled": self.compile_backend} if self.compile_backend else {})}


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 16, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


@dataclass
class Digits(Workload):
    """8×8 handwritten digits, a small CNN; 1,500 training images, the other 297 for validation."""

    data_dir: Path
    batch_size: int = 64
    device: str = "cpu"
    name: str = "digits"
    accumulation: int = 1

    def __post_init__(self):
        images, labels = load_digits(self.data_dir)
        order = np.random.default_rng(0).permutation(len(labels))
        images, labels = torch.from_numpy(images[order]), torch.from_numpy(labels[order])
        self.train_x, self.train_y = images[:1500].to(self.device), labels[:1500].to(self.device)
        self.val_x, self.val_y = images[1500:].to(self.device), labels[1500:].to(self.device)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DigitsNet().to(self.device)

    def batch(self, step: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_y), (self.batch_size * self.accumulation,), generator=g).to(self.device)
        return self.train_x[idx], self.train_y[idx]

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        return float(self.loss(model, (self.val_x, self.val_y)))

    def describe(self):
        return {"workload": "digits", "data": "UCI digits from scikit-learn's wheel", "train": 1500, "val": 297,
                "parameters": sum(p.numel() for p in DigitsNet().parameters()), "batch_size": self.batch_size}


# Every preset trains under the same schedule: 5% linear warmup, cosine decay to 10% of the rate.
COSINE = {"kind": "cosine", "warmup": 0.05, "floor": 0.1}

# Training budgets and model sizes, each evaluated at least every 2% of a run: "cpu" finishes `make bench`
# in minutes on 2 cores; "gpu" is the quick GPU preset (~20M parameters); "gpt2" is GPT-2 small's body
# (12 layers of width 768: 85M parameters, GPT-2 small's count without its 50k-token embedding) on the
# Linux corpus, 16k bytes a step, never repeating data.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(workload="lm", gpt=dict(context=64, width=64, depth=2, heads=4), batch_size=16,
                steps=300, sweep_steps=100, eval_every=6, seeds=2, lr_points=3, schedule=COSINE),
    "gpu": dict(workload="lm", corpus="linux", gpt=dict(context=256, width=512, depth=6, heads=8), batch_size=64,
                steps=1000, sweep_steps=250, eval_every=20, seeds=2, lr_points=3, schedule=COSINE),
    "gpt2": dict(workload="lm", corpus="linux", gpt=dict(context=512, width=768, depth=12, heads=12),
                 batch_size=32, steps=800, sweep_steps=200, eval_every=16, eval_batches=8, seeds=2, lr_points=3,
                 schedule=COSINE),
    "digits": dict(workload="digits", batch_size=64, steps=300, sweep_steps=100, eval_every=6, seeds=2,
                   lr_points=3, schedule=COSINE),
    "tiny": dict(workload="lm", gpt=dict(context=16, width=16, depth=1, heads=2), batch_size=4,
                 steps=6, sweep_steps=3, eval_every=3, seeds=2, lr_points=2, schedule=COSINE),
}


def with_batch_axis(preset: dict[str, Any], tokens_per_step: int | None = None, train_tokens: int | None = None,
                    warmup_steps: int | None = None) -> dict[str, Any]:
    """``preset`` at another batch (``tokens_per_step`` bytes a step, by accumulating micro-batches of the
    preset's ``batch_size`` rows) and budget (``train_tokens`` bytes: the steps follow, sweeps keep the
    preset's share of them, 50 evaluations a run); ``warmup_steps`` fixes the warmup in steps for sweep and
    full runs alike. What a batch-size axis needs: runs at several batches for one byte budget."""
    preset = dict(preset)
    row = preset["gpt"]["context"] if preset["workload"] == "lm" else 1
    micro = preset["batch_size"] * row  # bytes (images) of one micro-batch
    if tokens_per_step is not None:
        if tokens_per_step % micro:
            raise ValueError(f"--tokens-per-step {tokens_per_step} is no multiple of a micro-batch's {micro} "
                             f"({preset['batch_size']} rows of {row}); set --batch-size to fit")
        preset["accumulation"] = tokens_per_step // micro
    if train_tokens is not None:
        per_step = micro * preset.get("accumulation", 1)
        steps = train_tokens // per_step
        if steps < 2:
            raise ValueError(f"--train-tokens {train_tokens} makes fewer than 2 steps of {per_step} bytes")
        share = preset["sweep_steps"] / preset["steps"]
        preset.update(steps=steps, sweep_steps=max(1, round(steps * share)), eval_every=max(1, steps // 50))
    if warmup_steps is not None:
        preset["schedule"] = {**preset["schedule"], "warmup_steps": warmup_steps}
    return preset


def make_workload(preset: dict[str, Any], data_dir: Path, device: str) -> Workload:
    """The preset's workload; ``accumulation`` (default 1) micro-batches of ``batch_size`` rows make a step."""
    accumulation = preset.get("accumulation", 1)
    if preset["workload"] == "digits":
        return Digits(Path(data_dir), batch_size=preset["batch_size"], device=device, accumulation=accumulation)
    return LanguageModel(Path(data_dir), GPTConfig(**preset["gpt"]), batch_size=preset["batch_size"],
                         eval_batches=preset.get("eval_batches", 8), device=device,
                         corpus=preset.get("corpus", "pydocs"), accumulation=accumulation,
                         compile_backend=preset.get("compile_model"))
