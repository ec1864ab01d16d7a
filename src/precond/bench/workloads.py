"""Workloads: a model, its batches, its loss and its validation loss. Presets size them for CPU or GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import load_corpus, load_digits
from .model import GPT, GPTConfig

__all__ = ["Workload", "LanguageModel", "Digits", "PRESETS", "make_workload"]


class Workload:
    """What the runner needs: ``model(seed)``, ``batch(step)``, ``logits_and_targets(model, batch)``,
    ``validation_loss(model)``."""

    name: str
    batch_size: int

    def model(self, seed: int) -> nn.Module:
        raise NotImplementedError

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
    """Next-byte prediction on the Python documentation corpus."""

    data_dir: Path
    config: GPTConfig = field(default_factory=GPTConfig)
    batch_size: int = 16
    eval_batches: int = 8
    device: str = "cpu"
    name: str = "lm"

    def __post_init__(self):
        train, val = load_corpus(self.data_dir)
        self.train = torch.from_numpy(train.astype(np.int64))
        self.val = torch.from_numpy(val.astype(np.int64))
        # a fixed validation set: evenly spaced windows
        T = self.config.context
        starts = torch.linspace(0, len(self.val) - T - 2, self.eval_batches * self.batch_size).long()
        self.val_x = torch.stack([self.val[s:s + T] for s in starts]).to(self.device)
        self.val_y = torch.stack([self.val[s + 1:s + T + 1] for s in starts]).to(self.device)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GPT(self.config).to(self.device)

    def batch(self, step: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        T = self.config.context
        starts = torch.randint(0, len(self.train) - T - 1, (self.batch_size,), generator=g)
        x = torch.stack([self.train[s:s + T] for s in starts])
        y = torch.stack([self.train[s + 1:s + T + 1] for s in starts])
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        total = 0.0
        for i in range(self.eval_batches):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            total += float(self.loss(model, (self.val_x[sl], self.val_y[sl])))
        return total / self.eval_batches

    def describe(self):
        n = sum(p.numel() for p in GPT(self.config).parameters())
        return {"workload": "lm", "data": "Python 3.11 docs (Debian python3.11-doc), bytes",
                "train_bytes": len(self.train), "val_bytes": len(self.val), "parameters": n,
                "batch_size": self.batch_size, **self.config.__dict__}


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
        idx = torch.randint(0, len(self.train_y), (self.batch_size,), generator=g).to(self.device)
        return self.train_x[idx], self.train_y[idx]

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        return float(self.loss(model, (self.val_x, self.val_y)))

    def describe(self):
        return {"workload": "digits", "data": "UCI digits from scikit-learn's wheel", "train": 1500, "val": 297,
                "parameters": sum(p.numel() for p in DigitsNet().parameters()), "batch_size": self.batch_size}


# Training budgets and model sizes: "cpu" finishes `make bench` in minutes on 2 cores; "gpu" is ~20M
# parameters for one H100.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(workload="lm", gpt=dict(context=64, width=64, depth=2, heads=4), batch_size=16,
                steps=300, sweep_steps=100, eval_every=25, seeds=2, lr_points=3),
    "gpu": dict(workload="lm", gpt=dict(context=256, width=512, depth=6, heads=8), batch_size=64,
                steps=1000, sweep_steps=200, eval_every=100, seeds=2, lr_points=3),
    "digits": dict(workload="digits", batch_size=64, steps=300, sweep_steps=100, eval_every=25, seeds=2,
                   lr_points=3),
    "tiny": dict(workload="lm", gpt=dict(context=16, width=16, depth=1, heads=2), batch_size=4,
                 steps=6, sweep_steps=3, eval_every=3, seeds=2, lr_points=2),
}


def make_workload(preset: dict[str, Any], data_dir: Path, device: str) -> Workload:
    if preset["workload"] == "digits":
        return Digits(Path(data_dir), batch_size=preset["batch_size"], device=device)
    return LanguageModel(Path(data_dir), GPTConfig(**preset["gpt"]), batch_size=preset["batch_size"],
                         eval_batches=preset.get("eval_batches", 8), device=device)
