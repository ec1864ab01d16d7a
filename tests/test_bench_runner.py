"""One benchmark run on the tiny preset: the data it reads, its schedule, accumulation, metrics and the
conditions it records."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

import precond
from bench_fakes import CORPUS, fake_run
from precond_bench import data
from precond_bench.__main__ import main as bench_main
from precond_bench.optimizers import SPECS, AdamWSetting, OptimizerSpec
from precond_bench.protocol import lr_grid, mean_curve, steps_to_target, summarize
from precond_bench.report import markdown_table
from precond_bench.runner import lr_factor, state_bytes, train_run
from precond_bench.workloads import PRESETS, Digits, LanguageModel, make_workload, with_batch_axis


def test_documents_are_split_whole_and_stably():
    train, val = data.split_documents(CORPUS)
    names_in_val = [n for n, d in CORPUS.items() if d in val]
    assert 0 < len(names_in_val) < len(CORPUS)
    for name, doc in CORPUS.items():
        assert (doc in val) != (doc in train), name  # each document on exactly one side
    assert data.split_documents(dict(reversed(list(CORPUS.items())))) == (train, val)
    assert len(train) + len(val) == sum(len(d) for d in CORPUS.values()) + len(CORPUS) - 2


def test_language_model_batches_are_next_byte_pairs(data_dir):
    wl = LanguageModel(data_dir, batch_size=3, eval_batches=2)
    x, y = wl.batch(step=5, seed=1)
    assert x.shape == y.shape == (3, wl.config.context) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = wl.batch(step=5, seed=1)
    assert torch.equal(x, x2)                               # batches are a function of (step, seed)
    loss = wl.validation_loss(wl.model(0))
    assert abs(loss - math.log(256)) < 0.5                 # an untrained byte model is near uniform


def test_digits_workload_reads_the_csv(data_dir):
    wl = Digits(data_dir)
    assert wl.train_x.shape == (1500, 64) and wl.val_x.shape == (297, 64)
    assert float(wl.train_x.max()) <= 1.0
    assert wl.validation_loss(wl.model(0)) > 0


def test_missing_corpus_without_apt_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="python3.11-doc"):
        data.prepare_corpus(tmp_path)


def test_metrics():
    assert lr_grid(1e-3, 3, 3.0) == pytest.approx([1e-3 / 3, 1e-3, 3e-3])
    assert lr_grid(1.0, 2, 4.0) == pytest.approx([0.5, 2.0])
    curve = [(0, 0.0, 5.0), (10, 1.0, 3.0), (20, 2.0, 2.0)]
    assert steps_to_target(curve, 3.0) == (10, 1.0)
    assert steps_to_target(curve, 1.0) is None
    runs = [{"curve": [(0, 0.0, 4.0), (5, 1.0, 2.0)]}, {"curve": [(0, 0.0, 6.0), (5, 3.0, 4.0), (9, 4.0, 1.0)]}]
    assert mean_curve(runs) == [(0, 0.0, 5.0), (5, 2.0, 3.0)]
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3, 4)
    opt.step()
    assert state_bytes(opt) == 2 * 12 * 4 + 4  # exp_avg, exp_avg_sq (float32) and a float32 step


def test_state_bytes_reaches_into_objects_and_counts_each_storage_once():
    """Distributed Shampoo keeps its factors in dataclasses inside the state (once counted as zero); a
    wrapper's state holds its base optimizer's tensors (once counted twice); parameters never count."""
    import dataclasses

    @dataclasses.dataclass
    class Factors:
        packed: torch.Tensor
        param_view: torch.Tensor

    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.ones(4, 4)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"factors": Factors(torch.zeros(10), p.detach()[0]), "stack_views": [torch.zeros(8)[:4]] * 2}
    assert state_bytes(opt) == 10 * 4 + 8 * 4
    averaged = precond.PrimalAveraging(precond.AdamW([p]))
    averaged.step()
    assert state_bytes(averaged) == state_bytes(averaged.optimizer) + 16 * 4  # the base's state, and z


def test_every_benchmark_optimizer_trains_the_tiny_model(data_dir):
    wl = make_workload(PRESETS["tiny"], data_dir, "cpu")
    for name, spec in SPECS.items():
        if not spec.available():  # a peer whose package (the `peers` extra) is not installed
            continue
        run = train_run(wl, spec, spec.center_lr, seed=0, steps=4, eval_every=2, device="cpu",
                        adamw=AdamWSetting(3e-3), schedule=PRESETS["tiny"]["schedule"])
        assert not run["diverged"], name
        assert run["state_bytes"] > 0, name
        assert [p[0] for p in run["curve"]] == [0, 2, 4], name
        assert run["optimizer_seconds"] <= run["train_seconds"]


def test_model_size_flags_reach_the_workload(data_dir, tmp_path):
    argv = ["--preset", "tiny", "--optimizers", "AdamW", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path),
            "--name", "w", "--quiet", "--no-plots", "--width", "24", "--depth", "2", "--batch-size", "2",
            "--seeds", "1", "--lr-points", "1"]
    assert bench_main(argv) == 0
    described = json.loads((tmp_path / "w" / "workload.json").read_text())
    assert (described["width"], described["depth"], described["batch_size"]) == (24, 2, 2)
    with pytest.raises(SystemExit):
        bench_main(["--preset", "digits", "--width", "8", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path)])


def test_a_diverged_run_stops_and_reports_the_steps_it_ran(data_dir):
    from precond_bench.runner import train_run
    wl = make_workload(PRESETS["tiny"], data_dir, "cpu")
    calls = []
    real_loss = wl.loss

    def loss_turning_nan(model, batch):  # training losses only: the first call is step 1
        calls.append(1)
        value = real_loss(model, batch)
        return value * float("nan") if len(calls) >= 5 else value

    wl.loss = loss_turning_nan
    wl.validation_loss = lambda model: 1.0
    ticks = []
    run = train_run(wl, SPECS["AdamW"], 1e-3, seed=0, steps=40, eval_every=2, device="cpu",
                    adamw=AdamWSetting(3e-3), progress=lambda step, loss: ticks.append(step))
    assert run["diverged"] and run["final_val_loss"] == math.inf
    assert run["steps_done"] == len(ticks) == 5


def test_schedule_is_warmup_then_cosine_to_the_floor():
    cosine = {"kind": "cosine", "warmup": 0.1, "floor": 0.1}
    factors = [lr_factor(step, 100, cosine) for step in range(1, 101)]
    assert factors[:10] == pytest.approx([k / 10 for k in range(1, 11)])  # linear warmup over 10% of the run
    assert factors[-1] == pytest.approx(0.1) and min(factors) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # then it only decays
    assert lr_factor(55, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(7, 100, {"kind": "constant"}) == lr_factor(7, 100, None) == 1.0


def test_train_run_applies_the_schedule_to_every_group(data_dir):
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    def build(model, lr, adamw):
        params = list(model.parameters())
        return Recording([{"params": params[:1]}, {"params": params[1:], "lr": 2 * lr}], lr=lr)

    wl = make_workload(PRESETS["tiny"], data_dir, "cpu")
    schedule = {"kind": "cosine", "warmup": 0.25, "floor": 0.1}
    train_run(wl, OptimizerSpec("rec", 0.1, build), 0.1, seed=0, steps=8, eval_every=4, device="cpu",
              adamw=AdamWSetting(1e-3), schedule=schedule)
    # 2 warmup steps (25% of 8), then 0.1 + 0.9·(1 + cos(π·(k-2)/6))/2 for steps 3..8
    factors = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * (k - 2) / 6)) for k in range(3, 9)]
    assert seen == [pytest.approx([0.1 * f, 0.2 * f]) for f in factors]


def test_split_steps_every_part_and_shares_its_groups():
    a, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    from precond_bench.optimizers import Split
    split = Split(torch.optim.SGD([a], lr=0.1), torch.optim.Adam([b], lr=0.1))
    assert len(split.param_groups) == 2
    for group in split.param_groups:
        group["lr"] = 0.5  # what the schedule does
    (a.sum() + b.sum()).backward()
    split.step()
    assert torch.allclose(a, torch.full((3, 3), 0.5)) and torch.allclose(b, torch.full((3,), 0.5))
    assert set(split.state) == {b}  # plain SGD keeps no state; Adam does
    split.zero_grad()
    assert a.grad is None and b.grad is None


def test_runs_record_their_timing_conditions_and_mixed_rows_are_marked(data_dir):
    wl = make_workload(PRESETS["tiny"], data_dir, "cpu")
    run = train_run(wl, SPECS["AdamW"], 1e-3, seed=0, steps=2, eval_every=1, device="cpu", adamw=AdamWSetting(1e-3))
    assert run["conditions"]["threads"] == torch.get_num_threads()
    assert run["conditions"]["torch"] == torch.__version__ and run["conditions"]["device"]

    here = {"device": "cpu", "torch": "2.13", "threads": 2, "commit": "abc"}
    elsewhere = dict(here, threads=16)
    results = {"AdamW": {"best_lr": 1e-3, "full": [dict(fake_run("AdamW", 2.0, [(0, 0, 5), (10, 1.0, 2.0)]),
                                                        conditions=here)] * 2},
               "SOAP": {"best_lr": 1e-3, "full": [dict(fake_run("SOAP", 2.0, [(0, 0, 5), (10, 1.0, 2.0)]),
                                                       conditions=c) for c in (here, elsewhere)]}}
    table = markdown_table(summarize(results))
    assert "| SOAP § |" in table and "| AdamW |" in table and "cpu, torch 2.13, 16 threads" in table
    results["SOAP"]["full"] = [dict(r, conditions=here) for r in results["SOAP"]["full"]]
    table = markdown_table(summarize(results))
    assert "§" not in table  # one set of conditions: nothing to mark


def test_a_run_outside_a_checkout_takes_its_commit_from_the_environment(monkeypatch):
    from precond_bench import runner

    def no_git(*args, **kwargs):
        raise OSError("git: not found")
    monkeypatch.setattr(runner.subprocess, "run", no_git)
    monkeypatch.delenv("PRECOND_COMMIT", raising=False)
    assert runner.timing_conditions("cpu")["commit"] is None
    monkeypatch.setenv("PRECOND_COMMIT", "abd4097")
    assert runner.timing_conditions("cpu")["commit"] == "abd4097"


def test_the_environments_commit_wins_over_a_copied_checkouts_head(monkeypatch):
    """A tree copied with a stale ``.git`` (a remote machine's copy) reports the code's commit, not that HEAD."""
    from precond_bench import runner

    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout="50c7ddc\n"))
    monkeypatch.delenv("PRECOND_COMMIT", raising=False)
    assert runner.timing_conditions("cpu")["commit"] == "50c7ddc"
    monkeypatch.setenv("PRECOND_COMMIT", "e2adbe7")
    assert runner.timing_conditions("cpu")["commit"] == "e2adbe7"


@pytest.mark.parametrize("name, expected", [
    ("SOAP", dict(refresh_method="power_qr", precondition_frequency=10, tf32=False, betas=(0.95, 0.95))),
    ("SOAP-F1-tf32", dict(refresh_method="refine", precondition_frequency=1, tf32=True, weight_decay=0.01)),
    ("SOAP-refine-tf32", dict(refresh_method="refine", precondition_frequency=10, tf32=True)),
    ("SOAP-F1-tf32-tau0.03", dict(refresh_method="refine", precondition_frequency=1, refresh_tolerance=0.03)),
    ("EShampoo", dict(refresh_method="eigh", precondition_frequency=10, epsilon=1e-8, betas=(0.95, 0.95))),
    ("EShampoo-F1-tf32", dict(refresh_method="refine", precondition_frequency=1, tf32=True, epsilon=1e-8)),
])
def test_spec_variants_build_what_their_names_say_and_train(name, expected):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = SPECS[name].build(model, 1e-2, AdamWSetting(1e-3))
    group = opt.param_groups[0]
    assert {k: group[k] for k in expected} == expected
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_accumulated_micro_batches_step_as_the_whole_batch(data_dir):
    """2 micro-batches of 2 rows equal one batch of 4 rows (the same bytes, float32 summation order aside)."""
    preset = dict(PRESETS["tiny"])
    whole = make_workload(dict(preset, batch_size=4), data_dir, "cpu")
    split = make_workload(dict(preset, batch_size=2, accumulation=2), data_dir, "cpu")
    assert split.tokens_per_step() == whole.tokens_per_step() == 4 * preset["gpt"]["context"]
    assert all(torch.equal(a, b) for a, b in zip(whole.batch(3, 0), split.batch(3, 0)))
    runs = [train_run(w, SPECS["AdamW"], 3e-3, seed=0, steps=5, eval_every=5, device="cpu", adamw=AdamWSetting(3e-3))
            for w in (whole, split)]
    assert runs[1]["accumulation"] == 2 and runs[1]["tokens_per_second"] > 0
    # the last step's training loss (the mean over its micro-batches) after 4 updates; the validation sets
    # differ (eval_batches windows of the micro-batch's rows)
    assert runs[0]["final_train_loss"] == pytest.approx(runs[1]["final_train_loss"], rel=1e-5)
    assert runs[0]["final_train_loss"] < runs[0]["curve"][0][2] - 0.05  # it trained


def test_batch_axis_sets_accumulation_steps_and_warmup():
    preset = dict(PRESETS["gpu"])  # 64 rows of 256 bytes: 16k bytes a micro-batch
    big = with_batch_axis(preset, tokens_per_step=1 << 20, train_tokens=300 << 20, warmup_steps=30)
    assert big["accumulation"] == 64 and big["steps"] == 300 and big["eval_every"] == 6
    assert big["sweep_steps"] == round(300 * preset["sweep_steps"] / preset["steps"])
    assert big["schedule"]["warmup_steps"] == 30 and lr_factor(15, 300, big["schedule"]) == pytest.approx(0.5)
    assert lr_factor(15, 75, big["schedule"]) == pytest.approx(0.5)  # a sweep run warms up as long
    with pytest.raises(ValueError, match="no multiple of a micro-batch"):
        with_batch_axis(preset, tokens_per_step=3 * 16384 + 1)
