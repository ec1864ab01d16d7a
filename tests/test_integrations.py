"""Use from outside code: the README's own snippets, and Hugging Face's Trainer on a GPT-2 built from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import precond

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet(start: str, stop: str) -> str:
    """The README's lines from the one starting with ``start`` up to (without) the one starting with ``stop``."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith(stop))
    return "\n".join(lines[first:last])


class ByteLM(nn.Module):
    def __init__(self, vocab=16, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, x):  # [batch, sequence] → [batch, sequence, vocab]
        return self.lm_head(torch.tanh(self.mix(self.embed(x))))


def cyclic_batches(n, batch=8, length=12, vocab=16, seed=0):
    """Sequences counting up modulo ``vocab``: the next token is a function of the current one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        seq = (start + torch.arange(length + 1)) % vocab
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def test_readme_sophia_loop_trains_a_language_model():
    code = readme_snippet("opt = precond.Sophia(", "# AdamW")
    torch.manual_seed(0)
    model = ByteLM()
    loader = cyclic_batches(60)
    namespace = {"torch": torch, "precond": precond, "model": model, "loader": loader}
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(loader[0][0]).flatten(0, 1), loader[0][1].flatten())
    exec(compile(code.replace("lr=1e-4", "lr=3e-2"), "README.md", "exec"), namespace)
    opt = namespace["opt"]
    assert isinstance(opt, precond.Sophia)
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(loader[0][0]).flatten(0, 1), loader[0][1].flatten())
    assert float(after) < 0.5 * float(before)
    hessians = [opt.state[p]["hessian"] for p in model.parameters()]
    assert all(bool((h > 0).any()) for h in hessians)  # the curvature pass ran on token-level labels


def test_readme_sophia_loop_trains_a_classifier():
    code = readme_snippet("opt = precond.Sophia(", "# AdamW")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    xs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(3 + i)) for i in range(60)]
    loader = [(x, (x @ w).argmax(1)) for x in xs]
    exec(compile(code.replace("lr=1e-4", "lr=1e-2"), "README.md", "exec"),
         {"torch": torch, "precond": precond, "model": model, "loader": loader})
    x, y = loader[0]
    assert float((model(x).argmax(1) == y).float().mean()) > 0.8


transformers = pytest.importorskip("transformers")  # installed by `make test` (the "integrations" extra)


class TokenSequences(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=32):
        self.items = [(torch.arange(length) * (i % 3 + 1) + i) % vocab for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("make", [
    lambda m: precond.Muon(precond.param_groups(m), lr=0.02, adamw_lr=3e-3),
    lambda m: precond.SOAP(m.parameters(), lr=3e-3),
    lambda m: precond.Shampoo(m.parameters(), lr=3e-3, grafting="adam", precondition_frequency=4),
], ids=["Muon", "SOAP", "Shampoo"])
def test_hugging_face_trainer_runs_our_optimizer_and_scheduler(make, tmp_path):
    model = tiny_gpt2()
    opt = make(model)
    steps = 12
    scheduler = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                          logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                                          disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenSequences(),
                                   optimizers=(opt, scheduler))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    assert sum(losses[-3:]) < sum(losses[:3])
    # the schedule reached every group: cosine to 0 at the end, from each group's own rate
    assert all(group["lr"] == pytest.approx(0.0, abs=1e-12) for group in opt.param_groups)
    assert [group["initial_lr"] for group in opt.param_groups] == [group["lr"] for group in make(tiny_gpt2()).param_groups]


def test_param_groups_on_hugging_face_gpt2():
    groups = precond.param_groups(tiny_gpt2())
    by_kind = {g["matrix"]: set(g["param_names"]) for g in groups}
    # Conv1D weights (a raw [in, out] parameter) are matrices; the tied embedding/head, wpe, norms, biases are not
    assert by_kind[True] == {f"transformer.h.{i}.{name}.weight" for i in range(2)
                             for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= by_kind[False]


def test_lightning_configure_optimizers_with_our_optimizer_and_a_scheduler():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ByteLM()

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
            self.losses.append(float(loss.detach()))
            return loss

        def forward(self, x):
            return self.model(x)

        def configure_optimizers(self):
            opt = precond.Muon(precond.param_groups(self.model), lr=0.05, adamw_lr=1e-2)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 1e-2], total_steps=40)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    torch.manual_seed(0)
    module = Module()
    module.losses = []
    trainer = lightning.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(cyclic_batches(40), batch_size=None))
    assert len(module.losses) == 40
    assert sum(module.losses[-5:]) < 0.5 * sum(module.losses[:5])
    opt = trainer.optimizers[0]
    assert [g["matrix"] for g in opt.param_groups] == [True, False]
    # OneCycle drove both groups in step from their own max_lr, to near its floor
    fractions = [g["lr"] / g["max_lr"] for g in opt.param_groups]
    assert fractions[0] == pytest.approx(fractions[1], rel=1e-9) and fractions[0] < 0.01
