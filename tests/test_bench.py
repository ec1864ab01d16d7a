"""The benchmark harness on a tiny configuration: data loading and splitting, metrics, resume."""

from __future__ import annotations

import gzip
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import precond

from precond_bench import data
from precond_bench.__main__ import main as bench_main
from precond_bench.model import GPT, GPTConfig
from precond_bench.optimizers import ADAMW_WEIGHT_DECAYS, SPECS, AdamWSetting, OptimizerSpec
from precond_bench.protocol import (BenchConfig, loss_spike, lr_grid, mean_curve, plan_benchmark, run_benchmark,
                                   steps_to_target, summarize)
from precond_bench.report import _rate_check_line, curve_colours, markdown_table, notes
from precond_bench.runner import lr_factor, state_bytes, train_run
from precond_bench.workloads import PRESETS, Digits, LanguageModel, make_workload, with_batch_axis

CORPUS = {f"library/mod{i}.rst.txt": (f"Module {i}\n=========\n\nThe quick brown fox {i} jumps over the lazy dog. "
                                       * 40).encode() for i in range(40)}


@pytest.fixture()
def data_dir(tmp_path):
    """A prepared data folder built from synthetic documents (the real corpus needs Debian's package)."""
    train, val = data.split_documents(CORPUS)
    (tmp_path / "pydocs").mkdir()
    (tmp_path / "pydocs" / "train.bin").write_bytes(train)
    (tmp_path / "pydocs" / "val.bin").write_bytes(val)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 17, (1797, 64)), rng.integers(0, 10, (1797, 1))], axis=1)
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "digits.csv.gz").write_bytes(
        gzip.compress("\n".join(",".join(str(v) for v in r) for r in rows).encode()))
    return tmp_path


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


def fake_run(name, final, curve, diverged=False):
    return {"optimizer": name, "final_val_loss": final, "curve": curve, "diverged": diverged, "train_seconds": 4.0,
            "optimizer_share": 0.5, "state_bytes": 2**20, "peak_memory_bytes": None, "refreshes": 3,
            "skipped_refreshes": 0, "failures": 0}


def test_summary_uses_adamw_as_target_and_reports_ratios():
    results = {
        "AdamW": {"best_lr": 1e-3, "full": [fake_run("AdamW", 2.0, [(0, 0, 5), (10, 1.0, 3), (20, 2.0, 2.0)]),
                                            fake_run("AdamW", 2.2, [(0, 0, 5), (10, 1.0, 3), (20, 2.0, 2.2)])]},
        "SOAP": {"best_lr": 3e-3, "full": [fake_run("SOAP", 1.5, [(0, 0, 5), (10, 1.5, 2.0), (20, 3.0, 1.5)]),
                                           fake_run("SOAP", 1.7, [(0, 0, 5), (10, 1.5, 2.2), (20, 3.0, 1.7)])]},
    }
    s = summarize(results)
    assert s["AdamW"]["target"] == pytest.approx(2.1)
    assert s["AdamW"]["steps_to_target"] == 20 and s["SOAP"]["steps_to_target"] == 10
    assert s["SOAP"]["steps_ratio"] == pytest.approx(0.5) and s["SOAP"]["seconds_ratio"] == pytest.approx(0.75)
    assert s["SOAP"]["final_val_spread"] == pytest.approx(0.1)
    table = markdown_table(s)
    assert "| SOAP | 0.003 | 1.6000 ± 0.1000 | 10 | 0.50 |" in table
    assert "| 3 / 0 | " in table and "QR fallbacks" not in table  # runs without the count show none
    results["SOAP"]["full"][0]["qr_fallbacks"] = 2
    assert "| 3 / 0 (2 QR fallbacks) | " in markdown_table(summarize(results))
    del results["SOAP"]["full"][0]["qr_fallbacks"]
    results["torch.Muon"] = results.pop("SOAP")
    assert "| torch.Muon (peer) | 0.003 |" in markdown_table(summarize(results))
    results["SOAP"] = results.pop("torch.Muon")
    # one seed has no spread: the row says "1 seed", not "± 0.0000"
    second = results["SOAP"]["full"].pop()
    assert "| SOAP | 0.003 | 1.5000 (1 seed) | 10 |" in markdown_table(summarize(results))
    results["SOAP"]["full"].append(second)
    # a best rate on the edge of the swept rates is marked
    results["SOAP"]["sweep"] = [{"lr": lr} for lr in (1e-3, 3e-3)]
    results["AdamW"]["sweep"] = [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)]
    table = markdown_table(summarize(results))
    assert "| SOAP | 0.003 † |" in table and "| AdamW | 0.001 |" in table


def test_tiny_benchmark_runs_writes_outputs_and_resumes(data_dir, tmp_path):
    runs = tmp_path / "runs"
    argv = ["--preset", "tiny", "--optimizers", "AdamW", "Muon", "--data-dir", str(data_dir),
            "--runs-dir", str(runs), "--name", "t", "--quiet", "--edge-points", "0"]
    assert bench_main(argv) == 0
    out = runs / "t"
    files = sorted(p.name for p in (out / "runs").iterdir())
    # AdamW also sweeps its weight decay at its best rate (the default decay is its lr sweep's run)
    assert len(files) == 2 * (PRESETS["tiny"]["lr_points"] + PRESETS["tiny"]["seeds"]) + len(ADAMW_WEIGHT_DECAYS) - 1
    assert sum(f.startswith("wd") for f in files) == len(ADAMW_WEIGHT_DECAYS) - 1
    assert (out / "report.md").exists() and (out / "val_loss_vs_steps.png").exists()
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert set(summary) == {"AdamW", "Muon"} and summary["AdamW"]["steps_ratio"] == 1.0
    # resume: a second invocation trains nothing; its saved runs are reused unchanged
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert bench_main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamp
    # a different configuration under the same name is refused
    with pytest.raises(ValueError, match="another configuration"):
        bench_main(argv + ["--steps", "9"])
    # more seeds (or sweep rates) plan more runs of the same configuration: the saved ones are kept, the
    # new seed's full runs are added, and the folder still serves the plan it was made with
    assert bench_main(argv + ["--seeds", str(PRESETS["tiny"]["seeds"] + 1)]) == 0
    grown = {p.name for p in (out / "runs").iterdir()}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir() if p in stamp} == \
        {p.name: t for p, t in stamp.items()}
    added = grown - {p.name for p in stamp}
    assert added == {f"full-{n}-lr{json.loads((out / 'runs' / f).read_text())['lr']:.4g}"
                     f"-seed{PRESETS['tiny']['seeds']}.json"
                     for n in ("AdamW", "Muon") for f in files if f.startswith(f"full-{n}-")}
    assert bench_main(argv) == 0


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


def test_run_benchmark_with_one_optimizer_one_seed_one_rate(data_dir, tmp_path):
    preset = dict(PRESETS["tiny"], steps=2, sweep_steps=2, eval_every=1, seeds=1, lr_points=1)
    config = BenchConfig(preset=preset, optimizers=["AdamW"], runs_dir=str(tmp_path), data_dir=str(data_dir))
    result = run_benchmark(config)
    assert result["summary"]["AdamW"]["seeds"] == 1


def test_rate_check_repeats_the_full_run_one_grid_step_either_side(data_dir, tmp_path, capsys):
    argv = ["--preset", "tiny", "--optimizers", "AdamW", "Muon", "--data-dir", str(data_dir), "--runs-dir",
            str(tmp_path), "--quiet", "--no-plots", "--seeds", "1", "--check-rate", "AdamW"]
    assert bench_main(argv) == 0
    runs = tmp_path / "tiny" / "runs"
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())["summary"]
    best = summary["AdamW"]["best_lr"]
    check = {float(lr): loss for lr, loss in summary["AdamW"]["rate_check"].items()}
    assert sorted(check) == pytest.approx([best / 3, best, best * 3])
    full = json.loads(next(runs.glob("full-AdamW-*.json")).read_text())
    assert check[best] == full["final_val_loss"]
    checked = [json.loads(path.read_text()) for path in sorted(runs.glob("check-AdamW-*.json"))]
    assert len(checked) == 2 and all(r["steps_done"] == full["steps_done"] for r in checked)
    assert sorted(r["final_val_loss"] for r in checked) == sorted(v for lr, v in check.items() if lr != best)
    assert summary["Muon"]["rate_check"] is None  # only the optimizers named
    verdict = ("also the full run's best" if min(check, key=check.get) == best else "a neighbouring rate is better")
    assert verdict in capsys.readouterr().out
    assert verdict in (tmp_path / "tiny" / "report.md").read_text()


def test_a_plan_lists_the_runs_still_to_make_paced_by_the_saved_ones_and_trains_nothing(data_dir, tmp_path,
                                                                                          capsys):
    base = ["--preset", "tiny", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path), "--quiet", "--no-plots",
            "--lr-points", "1", "--edge-points", "0"]
    assert bench_main(base + ["--seeds", "1", "--optimizers", "AdamW", "Muon", "--plan"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "tiny").exists()  # nothing written
    assert [line.split(" s  ")[1] for line in out.splitlines()[:-1]] == [
        f"sweep AdamW lr={SPECS['AdamW'].center_lr:.4g} seed=0",
        f"AdamW's weight-decay sweep ({len(ADAMW_WEIGHT_DECAYS) - 1} runs) at its best rate",
        "full AdamW at its sweep's best rate, 1 seed(s)", "Muon's sweep (1 rate(s)) and full runs, after AdamW's"]
    assert "4 with no saved run to pace them" in out

    assert bench_main(base + ["--seeds", "1", "--optimizers", "AdamW"]) == 0
    runs = tmp_path / "tiny" / "runs"
    saved = [json.loads(path.read_text()) for path in runs.iterdir()]
    stamp = {path: path.stat().st_mtime_ns for path in runs.iterdir()}
    pace = max(r["wall_seconds"] / r["steps_done"] for r in saved)
    best = next(r["lr"] for r in saved if r["phase"] == "full")
    steps, sweep_steps = PRESETS["tiny"]["steps"], PRESETS["tiny"]["sweep_steps"]
    capsys.readouterr()
    assert bench_main(base + ["--seeds", "2", "--optimizers", "AdamW", "Muon", "--plan"]) == 0
    listed = [line.split(" s  ") for line in capsys.readouterr().out.splitlines()[:-1]]
    expected = [(f"full AdamW lr={best:.4g} seed=1", steps), (f"sweep Muon lr={SPECS['Muon'].center_lr:.4g} seed=0",
                                                             sweep_steps),
                ("full Muon at its sweep's best rate, 2 seed(s)", 2 * steps)]
    assert [label for _, label in listed] == [label for label, _ in expected]
    # the pace is the slowest saved run's (Muon has none of its own yet)
    assert [float(seconds) for seconds, _ in listed] == pytest.approx([round(pace * n) for _, n in expected], abs=1)
    assert {path: path.stat().st_mtime_ns for path in runs.iterdir()} == stamp
    limit = pace * (2 * steps + sweep_steps)  # past the first two entries, half-way into the third
    assert bench_main(base + ["--seeds", "2", "--optimizers", "AdamW", "Muon", "--plan", "--time-limit",
                              repr(limit)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out.index(f"-- a call of --time-limit {limit:g} s ends here --") == 2
    assert bench_main(base + ["--seeds", "1", "--optimizers", "AdamW", "--plan"]) == 0
    assert "nothing to make" in capsys.readouterr().out


def test_time_limit_flag_reaches_the_protocol(data_dir, tmp_path, capsys):
    argv = ["--preset", "tiny", "--optimizers", "AdamW", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path),
            "--quiet", "--no-plots", "--time-limit", "0"]
    # no time at all: nothing may start, and a call that ends before any full run says so without failing
    assert bench_main(argv) == 0
    assert "no optimizer has all its full runs" in capsys.readouterr().out
    assert not (tmp_path / "tiny" / "runs").exists()
    assert bench_main(argv[:-2] + ["--report-only"]) == 1  # a report of nothing is an error
    assert "runs not made: sweep AdamW" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--fit plans within --time-limit"):
        bench_main(argv[:-2] + ["--fit"])


def test_a_compiled_model_trains_as_the_eager_one_and_its_runs_are_kept_apart(data_dir, tmp_path):
    """``--compile-model`` (here with ``aot_eager``, which needs no C compiler): the same curve as the eager
    model to float32 rounding, the backend in workload.json, and an eager rerun into its folder refused."""
    from precond_bench.runner import train_run
    preset = PRESETS["tiny"]
    kw = dict(seed=0, steps=4, eval_every=2, device="cpu", adamw=AdamWSetting(3e-3), schedule=preset["schedule"])
    eager = train_run(make_workload(preset, data_dir, "cpu"), SPECS["SOAP"], 3e-3, **kw)
    compiled_workload = make_workload(dict(preset, compile_model="aot_eager"), data_dir, "cpu")
    compiled = train_run(compiled_workload, SPECS["SOAP"], 3e-3, **kw)
    assert [s for s, _, _ in compiled["curve"]] == [s for s, _, _ in eager["curve"]]
    assert [v for _, _, v in compiled["curve"]] == pytest.approx([v for _, _, v in eager["curve"]], rel=1e-5)
    eager_keys = make_workload(preset, data_dir, "cpu").model(0).state_dict().keys()
    assert compiled_workload.model(0).state_dict().keys() == eager_keys

    argv = ["--preset", "tiny", "--optimizers", "AdamW", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path),
            "--name", "c", "--quiet", "--no-plots", "--seeds", "1", "--lr-points", "1", "--steps", "2",
            "--sweep-steps", "1"]
    assert bench_main(argv + ["--compile-model", "aot_eager"]) == 0
    assert json.loads((tmp_path / "c" / "workload.json").read_text())["compiled"] == "aot_eager"
    with pytest.raises(ValueError, match="another configuration"):
        bench_main(argv)
    with pytest.raises(SystemExit, match="language-model presets"):
        bench_main(["--preset", "digits", "--compile-model", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path)])


def test_compile_step_takes_a_mode_after_the_backend(data_dir, monkeypatch):
    """``--compile-step inductor:reduce-overhead`` reaches ``torch.compile`` as backend and mode (CUDA graphs
    on a GPU); a bare backend passes no mode; the run records inductor's CUDA-graph skips (none here)."""
    from precond_bench.runner import train_run
    calls = []

    def recording_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    preset = PRESETS["tiny"]
    kw = dict(seed=0, steps=2, eval_every=2, device="cpu", adamw=AdamWSetting(3e-3), schedule=preset["schedule"])
    workload = make_workload(preset, data_dir, "cpu")
    run = train_run(workload, SPECS["AdamW"], 3e-3, compile_step="inductor:reduce-overhead", **kw)
    train_run(workload, SPECS["AdamW"], 3e-3, compile_step="aot_eager", **kw)
    assert calls == [{"backend": "inductor", "mode": "reduce-overhead"}, {"backend": "aot_eager"}]
    assert run["compile_step"] == "inductor:reduce-overhead" and run["cudagraph_skips"] == 0


def test_a_compiled_optimizer_step_trains_as_the_eager_one_its_compiles_timed_apart(data_dir, tmp_path):
    """``--compile-step`` (``aot_eager``): the same curve as the eager step to float32 rounding, the steps that
    compiled timed in ``compile_seconds`` and not in the wall-clock, kept across a resume, and the runs of
    the compiled configuration kept apart from eager ones."""
    from precond_bench.runner import train_run
    preset = PRESETS["tiny"]
    kw = dict(seed=0, steps=6, eval_every=2, device="cpu", adamw=AdamWSetting(3e-3), schedule=preset["schedule"])
    workload = make_workload(preset, data_dir, "cpu")
    eager = train_run(workload, SPECS["SOAP"], 3e-3, **kw)
    compiled = train_run(workload, SPECS["SOAP"], 3e-3, compile_step="aot_eager", **kw)
    assert [v for _, _, v in compiled["curve"]] == pytest.approx([v for _, _, v in eager["curve"]], rel=1e-5)
    assert "compile_seconds" not in eager and compiled["compile_seconds"] > 0
    assert compiled["compile_steps"] == [2, 3]  # a graph, then its re-trace for the dynamic step counts
    assert compiled["optimizer_seconds"] < compiled["compile_seconds"]  # 4 compiled steps, far below compiling
    checkpoint = tmp_path / "run.pt"
    assert train_run(workload, SPECS["SOAP"], 3e-3, compile_step="aot_eager", checkpoint=checkpoint, stop_at=3,
                     **kw) is None
    before = torch.load(checkpoint, weights_only=False)["compile_seconds"]
    resumed = train_run(workload, SPECS["SOAP"], 3e-3, compile_step="aot_eager", checkpoint=checkpoint, **kw)
    assert [v for _, _, v in resumed["curve"]] == pytest.approx([v for _, _, v in compiled["curve"]], rel=1e-5)
    assert 0 < before < resumed["compile_seconds"]  # the resumed call compiled again, and counts both
    assert resumed["compile_steps"][:2] == [2, 3] and len(resumed["compile_steps"]) <= 4

    argv = ["--preset", "tiny", "--optimizers", "AdamW", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path),
            "--name", "c", "--quiet", "--no-plots", "--seeds", "1", "--lr-points", "1", "--steps", "3",
            "--sweep-steps", "2"]
    assert bench_main(argv + ["--compile-step", "aot_eager"]) == 0
    assert all(json.loads(p.read_text())["compile_step"] == "aot_eager" for p in (tmp_path / "c" / "runs").iterdir())
    with pytest.raises(ValueError, match="another configuration"):
        bench_main(argv)


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


def test_sweep_grows_past_the_edge_while_the_best_rate_sits_on_it(tmp_path, monkeypatch):
    center = SPECS["AdamW"].center_lr
    fake = FakeTraining(monkeypatch, best_lr=center / 9)  # two grid steps below the centre
    result = run_benchmark(fake_config(tmp_path, ["AdamW"]))
    swept = sorted(r["lr"] for r in result["results"]["AdamW"]["sweep"])
    # c/3 wins the grid, so c/9 is tried; c/9 wins, so c/27 is tried (and loses)
    assert swept == pytest.approx([center / 27, center / 9, center / 3, center, center * 3])
    assert result["results"]["AdamW"]["best_lr"] == pytest.approx(center / 9)
    assert [c[1] for c in fake.calls if c[0] == "AdamW"][-2:] == [pytest.approx(center / 9)] * 2  # the full runs

    FakeTraining(monkeypatch, best_lr=center)  # a best rate inside the grid adds no rate
    inside = run_benchmark(fake_config(tmp_path / "inside", ["AdamW"]))
    assert len(inside["results"]["AdamW"]["sweep"]) == 3 and inside["results"]["AdamW"]["best_lr"] == center

    # the growth stops after edge_points rates, even if the best rate is still on the edge
    FakeTraining(monkeypatch, best_lr=center / 1000)
    capped = run_benchmark(fake_config(tmp_path / "capped", ["AdamW"], edge_points=1))
    assert min(r["lr"] for r in capped["results"]["AdamW"]["sweep"]) == pytest.approx(center / 9)


def test_a_centre_moves_the_grid_so_that_an_interior_best_needs_no_extra_rate(tmp_path, monkeypatch):
    center = SPECS["AdamW"].center_lr
    fake = FakeTraining(monkeypatch, best_lr=center / 9)
    result = run_benchmark(fake_config(tmp_path, ["AdamW"], centers={"AdamW": center / 9}))
    swept = sorted(r["lr"] for r in result["results"]["AdamW"]["sweep"])
    assert swept == pytest.approx([center / 27, center / 9, center / 3])  # 3 runs where the default grid took 5
    assert result["results"]["AdamW"]["best_lr"] == pytest.approx(center / 9)
    assert len([c for c in fake.calls if c[0] == "AdamW"]) == 3 + 2 + 2  # rates, weight decays, seeds


def test_rate_check_walks_on_while_the_lowest_full_run_sits_at_an_edge(tmp_path, monkeypatch):
    """The sweep picks c, the full runs are best at 9c: the check runs c/3 and 3c, then 9c (3c won at the
    edge), then 27c (9c won at the edge), and stops with 9c inside; ``edge_points`` caps the walk."""
    center = SPECS["AdamW"].center_lr
    FakeTraining(monkeypatch, best_lr=center, full_best_lr=9 * center)
    result = run_benchmark(fake_config(tmp_path / "walk", ["AdamW"], check_rates=("AdamW",)))
    check = {float(lr): loss for lr, loss in result["summary"]["AdamW"]["rate_check"].items()}
    assert sorted(check) == pytest.approx([center / 3, center, 3 * center, 9 * center, 27 * center])
    assert min(check, key=check.get) == pytest.approx(9 * center)
    capped = run_benchmark(fake_config(tmp_path / "capped", ["AdamW"], check_rates=("AdamW",), edge_points=1))
    assert sorted(capped["summary"]["AdamW"]["rate_check"]) == pytest.approx([center / 3, center, 3 * center,
                                                                              9 * center])


def test_rows_are_also_read_against_adamws_better_full_run(tmp_path, monkeypatch):
    """AdamW's check finds a full run (3c, loss 1.0) below its own (c): every row gets its steps and time to
    that loss, AdamW's own being its full length and time; the report lists them under the table."""
    center = SPECS["AdamW"].center_lr
    FakeTraining(monkeypatch, best_lr=center, full_best_lr=3 * center)
    config = fake_config(tmp_path, ["AdamW", "torch.AdamW"], check_rates=("AdamW",), rate_from={"torch.AdamW": "AdamW"})
    summary = run_benchmark(config)["summary"]
    adamw, peer = summary["AdamW"]["checked_target"], summary["torch.AdamW"]["checked_target"]
    assert adamw["adamw_lr"] == pytest.approx(3 * center) and adamw["target"] == pytest.approx(1.0)
    assert (adamw["steps_to_target"], adamw["seconds_to_target"], adamw["steps_ratio"]) == (6, 6.0, 1.0)
    assert peer["steps_to_target"] is None  # the peer ran at AdamW's sweep rate: above 1.0 at the end
    text = notes(summary)
    assert "Against AdamW's best full run" in text and "- torch.AdamW: not reached" in text
    assert "- AdamW: 6 steps (1.00×), 6.0 s (1.00×)" in text

    FakeTraining(monkeypatch, best_lr=center)  # the sweep's rate is also the full run's best: nothing added
    plain = run_benchmark(fake_config(tmp_path / "plain", ["AdamW"], check_rates=("AdamW",)))["summary"]
    assert "checked_target" not in plain["AdamW"] and "Against AdamW's best" not in notes(plain)


def test_adopting_the_checked_rate_moves_every_seed_there(tmp_path, monkeypatch):
    """The sweep picks c, full runs are best at 3c: with ``adopt_checked`` AdamW's seeds run at 3c, seed 0
    being its check run (same conditions), the sweep's rate keeps only the seed-0 run the check is centred
    on, the peer that takes AdamW's rate follows, and the table and notes say so."""
    from precond_bench.protocol import _run_path
    c = SPECS["AdamW"].center_lr
    FakeTraining(monkeypatch, best_lr=c, full_best_lr=3 * c)
    config = fake_config(tmp_path, ["AdamW", "torch.AdamW"], check_rates=("AdamW",), adopt_checked=True,
                         rate_from={"torch.AdamW": "AdamW"})
    result = run_benchmark(config)
    adamw, peer = result["results"]["AdamW"], result["results"]["torch.AdamW"]
    assert (adamw["best_lr"], adamw["swept_lr"]) == (pytest.approx(3 * c), pytest.approx(c))
    assert [(r["lr"], r["seed"]) for r in adamw["full"]] == [(pytest.approx(3 * c), 0), (pytest.approx(3 * c), 1)]
    root = tmp_path / "cpu-lm"
    assert not _run_path(root, "full", "AdamW", c, 1).exists()  # the sweep's rate: seed 0 only
    assert not _run_path(root, "full", "AdamW", 3 * c, 0).exists()  # the check run counts as seed 0
    assert _run_path(root, "full", "AdamW", 3 * c, 1).exists()
    assert [r["lr"] for r in peer["full"]] == [pytest.approx(3 * c)] * 2
    summary = result["summary"]
    assert summary["AdamW"]["target"] == pytest.approx(1.005)  # the mean of seeds 0 and 1 at 3c
    assert "checked_target" not in summary["AdamW"]  # the table's target is already the better run's
    assert any(line.startswith("| AdamW | 0.009 (full-run check; sweep 0.003), wd 0.1 |")
               for line in markdown_table(summary).splitlines())
    assert "**0.003 → " in notes(summary) and "its full runs use it (0.009)" in notes(summary)


def test_an_adopted_rate_checked_elsewhere_is_trained_again_here(tmp_path, monkeypatch):
    """A folder checked without adopting, whose check run at the better rate was made on another device:
    adopting trains seed 0 there again (its wall-clock must be this table's) and seed 1, nothing at the
    sweep's rate."""
    from precond_bench.protocol import _run_path
    c = SPECS["AdamW"].center_lr
    FakeTraining(monkeypatch, best_lr=c, full_best_lr=3 * c)
    run_benchmark(fake_config(tmp_path, ["AdamW"], check_rates=("AdamW",)))
    elsewhere = _run_path(tmp_path / "cpu-lm", "check", "AdamW", 3 * c, 0)
    run = json.loads(elsewhere.read_text())
    run["conditions"] = {"device": "another GPU", "torch": "2.11", "threads": 16}
    elsewhere.write_text(json.dumps(run))
    fake = FakeTraining(monkeypatch, best_lr=c, full_best_lr=3 * c)
    result = run_benchmark(fake_config(tmp_path, ["AdamW"], check_rates=("AdamW",), adopt_checked=True))
    assert fake.calls == [("AdamW", pytest.approx(3 * c), 0), ("AdamW", pytest.approx(3 * c), 1)]
    assert [r.get("conditions") for r in result["results"]["AdamW"]["full"]] == [None, None]


def test_adopting_waits_for_the_check_and_needs_one(tmp_path, monkeypatch, data_dir):
    """A plan for a folder whose sweep and full runs are made lists the check's runs, then the seeds that
    wait for its answer; the flag alone is refused."""
    c = SPECS["AdamW"].center_lr
    FakeTraining(monkeypatch, best_lr=c)
    run_benchmark(fake_config(tmp_path, ["AdamW"]))
    plan = plan_benchmark(fake_config(tmp_path, ["AdamW"], check_rates=("AdamW",), adopt_checked=True))
    assert [label for label, _ in plan] == [f"check AdamW lr={c / 3:.4g} seed=0", f"check AdamW lr={3 * c:.4g} seed=0",
                                            "full AdamW at its checked rate, 2 seed(s), after its rate check"]
    with pytest.raises(SystemExit, match="--adopt-checked-rate adopts what --check-rate finds"):
        bench_main(["--preset", "tiny", "--optimizers", "AdamW", "--data-dir", str(data_dir), "--runs-dir",
                    str(tmp_path), "--quiet", "--adopt-checked-rate"])


def test_center_flag_parses_and_names_the_bad_pair():
    from precond_bench.__main__ import parse_centers
    assert parse_centers(["SOAP=9e-3", "Muon=0.06"]) == {"SOAP": 0.009, "Muon": 0.06}
    for bad, message in (("Nope=1e-3", "unknown optimizer"), ("SOAP=fast", "OPTIMIZER=LR"),
                         ("SOAP=-1", "positive")):
        with pytest.raises(SystemExit, match=message):
            parse_centers([bad])


def test_a_peer_takes_its_twins_rate_without_a_sweep_of_its_own(tmp_path, monkeypatch):
    """``rate_from``: torch.AdamW runs its full seeds at the rate (and weight decay) AdamW's sweep picked,
    listed after its twin whatever the order given, and the report marks the rate as AdamW's."""
    center = SPECS["AdamW"].center_lr
    fake = FakeTraining(monkeypatch, best_lr=center * 3)
    config = fake_config(tmp_path, ["torch.AdamW", "AdamW"], rate_from={"torch.AdamW": "AdamW"})
    result = run_benchmark(config)
    peer = result["results"]["torch.AdamW"]
    assert peer["sweep"] == [] and peer["best_lr"] == result["results"]["AdamW"]["best_lr"] == pytest.approx(center * 3)
    calls = [c for c in fake.calls if c[0] == "torch.AdamW"]
    assert [c[1] for c in calls] == [pytest.approx(center * 3)] * 2  # two seeds, no sweep run
    assert result["summary"]["torch.AdamW"]["rate_from"] == "AdamW"
    row = markdown_table(result["summary"]).splitlines()
    assert any(line.startswith("| torch.AdamW (peer) | 0.009 (AdamW's) |") for line in row)

    # a peer's rate can be checked like a swept one: full runs one grid step either side of the twin's rate
    checked = run_benchmark(fake_config(tmp_path / "checked", ["AdamW", "torch.AdamW"], check_rates=("torch.AdamW",),
                                        rate_from={"torch.AdamW": "AdamW"}))
    assert sorted(checked["summary"]["torch.AdamW"]["rate_check"]) == pytest.approx([center, center * 3, center * 9])

    # the twin's sweep not made yet: the peer's runs wait for it, and a plan says so
    plan = plan_benchmark(fake_config(tmp_path / "new", ["AdamW", "torch.AdamW"], rate_from={"torch.AdamW": "AdamW"}))
    assert plan[-1][0] == "full torch.AdamW at AdamW's best rate, after AdamW's sweep"
    assert not any("sweep torch.AdamW" in label for label, _ in plan)


def test_rate_from_flag_names_the_bad_pair():
    from precond_bench.__main__ import parse_rate_from
    names = ["AdamW", "torch.AdamW", "SOAP", "pytorch_optimizer.SOAP"]
    assert parse_rate_from(["torch.AdamW=AdamW", "pytorch_optimizer.SOAP=SOAP"], names) == {
        "torch.AdamW": "AdamW", "pytorch_optimizer.SOAP": "SOAP"}
    for bad, message in ((["torch.Muon=Muon"], "not among --optimizers"), (["torch.AdamW=Muon"], "its twin"),
                         (["torch.AdamW=AdamW", "SOAP=torch.AdamW"], "swept itself"), (["AdamW=AdamW"], "swept itself")):
        with pytest.raises(SystemExit, match=message):
            parse_rate_from(bad, names)


def test_a_sweep_that_diverges_everywhere_tries_a_lower_rate(tmp_path, monkeypatch):
    center = SPECS["SOAP"].center_lr
    FakeTraining(monkeypatch, best_lr=center / 10, diverge_above=center / 5)
    result = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"]))
    soap = result["results"]["SOAP"]
    assert sum(r["diverged"] for r in soap["sweep"]) == 3
    assert soap["best_lr"] == pytest.approx(center / 9) and not soap["full"][0]["diverged"]
    # diverging at every rate the grown sweep reaches: the full runs use the smallest rate tried
    FakeTraining(monkeypatch, best_lr=center / 100, diverge_above=center / 100)
    hopeless = run_benchmark(fake_config(tmp_path / "hopeless", ["AdamW", "SOAP"], edge_points=2))
    assert hopeless["results"]["SOAP"]["best_lr"] == pytest.approx(center / 27)
    assert hopeless["summary"]["SOAP"]["diverged_seeds"] == 2


def test_time_limit_checkpoints_the_run_in_progress_and_a_rerun_goes_on(tmp_path, monkeypatch):
    fake = FakeTraining(monkeypatch, best_lr=SPECS["AdamW"].center_lr)
    # AdamW: 3 lr and 2 weight-decay sweeps × 3 s + 2 full × 6 s = 27 s; SOAP's sweeps end at 36 s; its first
    # full run reaches the limit at 40 s after 4 of its 6 steps and checkpoints; the second cannot start
    first = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, time_limit=40))
    assert set(first["summary"]) == {"AdamW"}
    lr = SPECS["SOAP"].center_lr
    assert first["unfinished"] == [f"full SOAP lr={lr:.4g} seed=0 (checkpointed)", f"full SOAP lr={lr:.4g} seed=1"]
    assert fake.clock == 40
    fake.calls.clear()
    second = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0))
    assert fake.calls == [("SOAP", lr, 0), ("SOAP", lr, 1)]
    assert fake.clock == 40 + 2 + 6  # the checkpointed run's last 2 steps, then the other's 6
    assert set(second["summary"]) == {"AdamW", "SOAP"} and not second["unfinished"]
    assert not list((tmp_path / "cpu-lm" / "partial").iterdir())


def test_fit_starts_only_the_runs_that_end_within_the_limit_and_resumes_one_that_does(tmp_path, monkeypatch):
    """Saved runs pace the estimate (1 s a step, plus 10% for runs without ``wall_seconds``): SOAP's sweeps
    (paced by AdamW's, SOAP having none yet) fit in 40 s, its 6-step full runs (6.6 s) not after 36 s, so
    neither starts and nothing is left half-done; a call with 7 s makes one. A checkpointed run is paced by
    the steps it has left."""
    fake = FakeTraining(monkeypatch, best_lr=SPECS["AdamW"].center_lr)
    lr = SPECS["SOAP"].center_lr
    first = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, time_limit=40, fit=True))
    assert fake.clock == 36 and not list((tmp_path / "cpu-lm" / "partial").glob("*"))
    assert first["unfinished"] == [f"full SOAP lr={lr:.4g} seed={s} (needs ~7 s)" for s in (0, 1)]
    fake.calls.clear()
    second = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, time_limit=7, fit=True))
    assert fake.calls == [("SOAP", lr, 0)] and fake.clock == 42
    assert second["unfinished"] == [f"full SOAP lr={lr:.4g} seed=1 (needs ~7 s)"]

    # without fit the second full run starts and is cut at the limit after 4 of its 6 steps ...
    run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, time_limit=4))
    assert json.loads((tmp_path / "cpu-lm" / "partial" / f"full-SOAP-lr{lr:.4g}-seed1.json").read_text()) == {"step": 4}
    # ... and its last 2 steps (2.2 s) fit in 3 s
    fake.calls.clear()
    last = run_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, time_limit=3, fit=True))
    assert fake.calls == [("SOAP", lr, 1)] and not last["unfinished"]


def test_a_plan_paces_an_optimizer_new_to_a_folder_by_its_optimizer_step_beside_it(tmp_path, monkeypatch):
    """The optimizer's step does not depend on the batch: SOAP, saved only in a sibling folder of the same
    model, is paced by this folder's model part of a step plus SOAP's optimizer step there."""
    fake = FakeTraining(monkeypatch, best_lr=SPECS["AdamW"].center_lr)
    run_benchmark(fake_config(tmp_path, ["AdamW"], edge_points=0, name="small"))  # 1.1 s a step, 0.5 optimizer
    sibling = fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, name="large")
    run_benchmark(sibling)
    for path in (tmp_path / "large" / "runs").glob("*SOAP*.json"):  # SOAP's optimizer: 3 s of a 4 s step there
        run = json.loads(path.read_text())
        path.write_text(json.dumps(dict(run, wall_seconds=4.0 * run["steps_done"],
                                        optimizer_seconds=3.0 * run["steps_done"])))
    pending = dict(plan_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, name="small")))
    model = 1.1 - 0.5
    lr = SPECS["SOAP"].center_lr
    assert pending[f"sweep SOAP lr={lr:.4g} seed=0"] == pytest.approx((model + 3.0) * 3)
    # a folder of another model does not pace it: the slowest step here does
    config = json.loads((tmp_path / "large" / "config.json").read_text())
    config["preset"]["gpt"] = dict(config["preset"]["gpt"], width=2 * config["preset"]["gpt"]["width"])
    (tmp_path / "large" / "config.json").write_text(json.dumps(config))
    pending = dict(plan_benchmark(fake_config(tmp_path, ["AdamW", "SOAP"], edge_points=0, name="small")))
    assert pending[f"sweep SOAP lr={lr:.4g} seed=0"] == pytest.approx(1.1 * 3)


def test_a_matrix_optimizer_run_made_at_another_adamw_setting_is_retrained(tmp_path, monkeypatch):
    fake = FakeTraining(monkeypatch, best_lr=SPECS["AdamW"].center_lr)
    run_benchmark(fake_config(tmp_path, ["AdamW", "Muon"], edge_points=0))
    stale = next((tmp_path / "cpu-lm" / "runs").glob("full-Muon-*-seed1.json"))
    run = json.loads(stale.read_text())
    assert run["adamw"] == {"lr": SPECS["AdamW"].center_lr, "weight_decay": 0.1}
    stale.write_text(json.dumps(dict(run, adamw={"lr": SPECS["AdamW"].center_lr, "weight_decay": 0.3})))
    fake.calls.clear()
    run_benchmark(fake_config(tmp_path, ["AdamW", "Muon"], edge_points=0))
    assert fake.calls == [("Muon", run["lr"], 1)]
    assert json.loads(stale.read_text())["adamw"]["weight_decay"] == 0.1


def test_adamw_weight_decay_sweep_picks_the_best_and_serves_the_routed_parameters(tmp_path, monkeypatch):
    center = SPECS["AdamW"].center_lr
    fake = FakeTraining(monkeypatch, best_lr=center, best_wd=0.3)
    result = run_benchmark(fake_config(tmp_path, ["AdamW", "Muon"], edge_points=0))
    adamw_runs = result["results"]["AdamW"]
    assert [r["lr"] for r in adamw_runs["sweep"]] == lr_grid(center, 3, 3.0)
    assert sorted(r["adamw"]["weight_decay"] for r in adamw_runs["weight_decay_sweep"]) == [0.0, 0.3]
    assert all(r["lr"] == center for r in adamw_runs["weight_decay_sweep"])
    assert adamw_runs["weight_decay"] == 0.3 and result["summary"]["AdamW"]["weight_decay"] == 0.3
    assert all(r["adamw"] == {"lr": center, "weight_decay": 0.3} for r in adamw_runs["full"])
    assert all(r["adamw"]["weight_decay"] == 0.3 for r in result["results"]["Muon"]["full"])
    assert "| AdamW | 0.003, wd 0.3 |" in markdown_table(result["summary"])


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


def test_peer_rows_are_marked_and_unavailable_peers_are_refused(data_dir, tmp_path, monkeypatch):
    from precond_bench import optimizers
    assert SPECS["torch.Muon"].peer == "torch" and SPECS["SOAP"].peer is None
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    assert optimizers.available_optimizers(["AdamW", "pytorch_optimizer.SOAP"]) == ["AdamW"]
    with pytest.raises(SystemExit, match="pytorch_optimizer"):
        bench_main(["--preset", "tiny", "--optimizers", "AdamW", "pytorch_optimizer.SOAP", "--data-dir",
                    str(data_dir), "--runs-dir", str(tmp_path)])


def test_an_optimizer_keeps_its_plot_colour_in_any_subset():
    everything = curve_colours(sorted(SPECS))
    subset = curve_colours(["SOAP", "AdamW", "Muon"])
    assert all(subset[name] == everything[name] for name in subset)
    assert len(set(everything.values())) == len(everything)  # no two optimizers share a colour
    assert curve_colours(["Custom"]) == {"Custom": None}


def study_script(name):
    """A script of ``benchmarks/`` as a module: the studies live outside the package, and these tests keep
    them in step with the harness they call."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_purifying_study_script_runs_a_configuration_and_reports_it(data_dir, tmp_path):
    study = study_script("purifying_study")
    out = tmp_path / "study.json"
    argv = ["--device", "cpu", "--out", str(out), "--data-dir", str(data_dir), "--steps", "2", "--eval-every", "1",
            "--width", "16", "--depth", "1", "--heads", "2", "--context", "8", "--batch-size", "2",
            "--findings", "b", "--match", "qr I=3 F=100", "--seeds", "0", "1"]
    assert study.main(argv) == 0
    runs = json.loads(out.read_text())
    assert [(r["config"], r["seed"]) for r in runs] == [("EShampoo qr I=3 F=100", 0), ("EShampoo qr I=3 F=100", 1)]
    assert all(math.isfinite(r["final_val_loss"]) for r in runs)
    assert runs[0]["curve"] != runs[1]["curve"]  # the seed reaches the model and the data
    table = study.report(out)
    assert "| EShampoo qr I=3 F=100 | 2 |" in table.split("### finding b over seeds")[1]


def test_transfer_study_script_runs_both_parametrisations_and_reports_drift(data_dir, tmp_path):
    study = study_script("transfer_study")
    out = tmp_path / "transfer.json"
    argv = ["--device", "cpu", "--out", str(out), "--data-dir", str(data_dir), "--steps", "2", "--context", "8",
            "--batch-size", "2", "--widths", "32", "64", "--exponents", "-1", "0", "1", "--optimizers", "SOAP", "AdamW",
            "--cases", "SP", "scaled", "normalized", "blocked"]
    assert study.main(argv) == 0
    runs = json.loads(out.read_text())
    soap = {(r["width"], r["case"]) for r in runs if r["optimizer"] == "SOAP"}
    aids = {(w, c) for w in (32, 64) for c in ("normalized", "blocked")}
    assert soap == {(32, "SP"), (64, "SP"), (64, "scaled")} | aids
    assert {r["case"] for r in runs if r["optimizer"] == "AdamW"} == {"SP", "scaled"}  # the aids are SOAP/Shampoo's
    table = study.report(out)
    for case in ("SP", "scaled", "normalized", "blocked"):
        assert f"| SOAP | {case} |" in table


def test_transfer_study_interpolates_the_optimum_between_grid_points():
    study = study_script("transfer_study")
    optimum = 0.0042
    points = [(lr, 2.0 + (math.log(lr) - math.log(optimum)) ** 2) for lr in (0.001, 0.002, 0.004, 0.008, 0.016)]
    assert study.interpolated_best(points) == pytest.approx(optimum, rel=1e-9)  # exact on a parabola
    points[0] = (0.001, float("nan"))  # a diverged rate far from the optimum changes nothing
    assert study.interpolated_best(points) == pytest.approx(optimum, rel=1e-9)
    assert study.interpolated_best(points[:3]) == 0.004  # best at the grid's end: the end


def test_study_scripts_read_their_data_where_the_benchmark_does(monkeypatch, tmp_path):
    from precond_bench.study import study_parser
    monkeypatch.setenv("PRECOND_DATA", str(tmp_path))
    assert study_parser("doc", "out.json").parse_args([]).data_dir == str(tmp_path)
    assert study_parser("doc", "out.json").parse_args(["--data-dir", "x"]).data_dir == "x"
    monkeypatch.delenv("PRECOND_DATA")
    assert study_parser("doc", "out.json").parse_args([]).data_dir == "data"


def test_bias_correction_study_script_runs_every_mode_on_equal_tokens(data_dir, tmp_path):
    study = study_script("bias_correction_study")
    out = tmp_path / "bc.json"
    argv = ["--out", str(out), "--data-dir", str(data_dir), "--steps", "2", "--eval-every", "1", "--width", "16",
            "--depth", "1", "--context", "8", "--batch-size", "2", "--microbatches", "3", "--seeds", "0", "1",
            "--modes", "std", "full"]
    assert study.main(argv) == 0
    runs = json.loads(out.read_text())
    assert {(r["mode"], r["seed"]) for r in runs} == {(m, s) for m in ("std", "full") for s in (0, 1)}
    assert all(math.isfinite(r["final_val_loss"]) for r in runs)
    assert all(r["conditions"]["torch"] == torch.__version__ for r in runs)  # which machine made each run
    table = study.report(out)
    assert "| std |" in table and "| full |" in table


def test_bias_correction_study_keeps_one_configuration_per_file_and_plans_within_a_time_limit(data_dir, tmp_path,
                                                                                                capsys):
    study = study_script("bias_correction_study")
    out = tmp_path / "bc.json"

    def argv(*extra, steps=2):
        return ["--out", str(out), "--data-dir", str(data_dir), "--steps", str(steps), "--eval-every", "1",
                "--width", "16", "--depth", "1", "--context", "8", "--batch-size", "2", "--microbatches", "2",
                "--modes", "std", *extra]

    assert study.main(argv("--seeds", "0")) == 0
    saved = out.read_text()
    assert json.loads(saved)[0]["wall_seconds"] > 0
    # a second seed expected to take as long as the first does not fit in no time: nothing starts
    assert study.main(argv("--seeds", "0", "1", "--time-limit", "0")) == 0
    assert out.read_text() == saved and "1 runs not made (--time-limit" in capsys.readouterr().err
    assert study.main(argv("--seeds", "0", "1", "--time-limit", "600")) == 0
    assert {r["seed"] for r in json.loads(out.read_text())} == {0, 1}
    with pytest.raises(SystemExit, match="another configuration"):  # 3 steps: not comparable with 2
        study.main(argv("--seeds", "2", steps=3))


def test_bias_correction_ablation_separates_the_schedule_from_the_correction(data_dir, tmp_path):
    """The headline arm's dense rate is 1.5× and its floor 0.2; embedding and head stay on std at the base rate;
    the report sets std at headline against std at baseline (the schedule's share)."""
    study = study_script("bias_correction_study")
    out = tmp_path / "ablation.json"
    argv = ["--out", str(out), "--data-dir", str(data_dir), "--steps", "3", "--eval-every", "1", "--width", "16",
            "--depth", "1", "--context", "8", "--batch-size", "2", "--microbatches", "3", "--seeds", "0",
            "--modes", "std", "loo_jensen", "--arm", "baseline", "headline", "--lr", "0.01"]
    assert study.main(argv) == 0
    runs = json.loads(out.read_text())
    assert {(r["arm"], r["mode"]) for r in runs} == {(a, m) for a in ("baseline", "headline")
                                                     for m in ("std", "loo_jensen")}
    model = GPT(GPTConfig(width=16, depth=1, heads=1, context=8))
    dense, sparse = study.param_groups(model, 0.01, "loo_jensen", "headline")
    assert dense["lr"] == pytest.approx(0.015) and sparse["lr"] == 0.01 and sparse["bias_correction"] == "std"
    assert {id(p) for p in sparse["params"]} == {id(model.embed.weight), id(model.lm_head.weight)}
    table = study.report(out)
    assert "| headline | 0.01 | std |" in table and "std vs baseline std: " in table
    by = {(r["arm"], r["mode"]): r["final_val_loss"] for r in runs}
    assert by[("headline", "std")] != by[("baseline", "std")]


def test_bias_correction_report_lists_rates_without_std_and_each_modes_best_rate(tmp_path):
    """A rate run for one mode only (to bring its best inside the grid) is listed with no difference to std,
    and the summary names each mode's best rate and whether it is inside the rates that mode ran."""
    study = study_script("bias_correction_study")
    losses = {("std", 1e-3): 2.5, ("std", 2e-3): 2.3, ("std", 4e-3): 2.4, ("loo", 2e-3): 2.6, ("loo", 4e-3): 2.5,
              ("loo", 8e-3): 2.45}
    runs = [{"optimizer": "AdamW", "mode": mode, "seed": seed, "lr": lr, "arm": "baseline",
             "final_val_loss": loss + 0.01 * seed, "optimizer_seconds_per_step": 0.001,
             "train_seconds_per_step": 0.1} for (mode, lr), loss in losses.items() for seed in (0, 1)]
    out = tmp_path / "runs.json"
    out.write_text(json.dumps(runs))
    table = study.report(out)
    assert "| AdamW | baseline | 0.008 | loo | 2.4550 ± 0.0071 | 2 | — | 1.00 ms | 100.0 ms |" in table
    assert ("Best rate per mode, AdamW, baseline: std 2.3050 ± 0.0071 at 0.002 (interior); "
            "loo 2.4550 ± 0.0071 at 0.008 (edge).") in table


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


def test_progress_counts_only_the_steps_this_call_trains():
    """A saved run, or one --time-limit does not start, leaves the total instead of filling the bar (which then
    jumped to 100% with runs still to make)."""
    from precond_bench.__main__ import Progress
    progress = Progress(100, enabled=True)
    tick = progress.run("full AdamW")
    for step in range(1, 11):
        tick(step, 1.0)
    progress.skip(60)
    assert (progress.bar.n, progress.bar.total) == (10, 40)
    progress.close()


def test_ratio_plot_with_no_optimizer_at_the_target_draws_no_empty_legend(tmp_path):
    import warnings
    from precond_bench.report import plot_ratios
    pytest.importorskip("matplotlib")
    summary = {"AdamW": {"final_val_mean": 1.0, "steps_ratio": 1.0, "seconds_ratio": 1.0, "peer": None},
               "SOAP": {"final_val_mean": 1.1, "steps_ratio": None, "seconds_ratio": None, "peer": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels found to put in legend"
        assert plot_ratios(summary, tmp_path, "t").exists()



# ------------------------------------------------------------------- accumulation and resumed runs
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


RESUMABLE = [n for n, spec in SPECS.items() if spec.available() and spec.peer in (None, "torch")]


@pytest.mark.parametrize("name", RESUMABLE)
def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(name, data_dir, tmp_path):
    """Checkpointed after 3 of 7 steps (what a time limit does), then resumed by a second call: the curve and
    the final weights are the uninterrupted run's exactly. Accumulation 2, so the micro-batches are cut alike."""
    workload = make_workload(dict(PRESETS["tiny"], batch_size=2, accumulation=2), data_dir, "cpu")
    spec, adamw = SPECS[name], AdamWSetting(3e-3, 0.1)
    schedule = PRESETS["tiny"]["schedule"]
    kw = dict(seed=1, steps=7, eval_every=2, device="cpu", adamw=adamw, schedule=schedule)
    whole = train_run(workload, spec, spec.center_lr, **kw)
    path = tmp_path / "partial.pt"
    assert train_run(workload, spec, spec.center_lr, checkpoint=path, stop_at=3, **kw) is None and path.exists()
    assert json.loads(path.with_suffix(".json").read_text()) == {"step": 3}  # how far, without loading the weights
    resumed = train_run(workload, spec, spec.center_lr, checkpoint=path, **kw)
    assert resumed["resumed"] and not path.exists() and not path.with_suffix(".json").exists()
    assert resumed["wall_seconds"] > resumed["train_seconds"]  # the two calls' set-up and evaluations too
    assert [(s, v) for s, _, v in resumed["curve"]] == [(s, v) for s, _, v in whole["curve"]]
    assert resumed["final_train_loss"] == whole["final_train_loss"] and resumed["steps_done"] == 7
    assert resumed["refreshes"] == whole["refreshes"] and resumed["qr_fallbacks"] == whole["qr_fallbacks"]
    assert resumed["cholesky_failures"] == whole["cholesky_failures"]


def test_the_benchmark_resumes_checkpointed_runs_to_the_same_results(data_dir, tmp_path):
    """Every run checkpointed at step 2 by one call and finished by the next: the same table as one call."""
    def config(name, **kw):
        preset = dict(PRESETS["tiny"], lr_points=1, seeds=1, steps=4, sweep_steps=3)
        return BenchConfig(preset=preset, optimizers=["AdamW", "SOAP"], runs_dir=str(tmp_path), name=name,
                           data_dir=str(data_dir), edge_points=0, **kw)

    straight = run_benchmark(config("straight"))
    first = run_benchmark(config("stopped", stop_at=2))  # AdamW's sweep runs checkpoint: nothing can follow them
    assert not first["summary"] and first["unfinished"]
    resumed = None
    for _ in range(12):  # each call finishes what the last checkpointed and checkpoints what it starts
        resumed = run_benchmark(config("stopped", stop_at=2))
        if not resumed["unfinished"]:
            break
    assert resumed is not None and not resumed["unfinished"]
    finals = {n: [r["final_val_loss"] for r in e["full"]] for n, e in straight["results"].items()}
    assert {n: [r["final_val_loss"] for r in e["full"]] for n, e in resumed["results"].items()} == finals


def test_batch_axis_reads_one_folder_per_batch_size(data_dir, tmp_path, capsys):
    """The tiny preset at two batch sizes (accumulation 1 and 2, one micro-batch size): one table and one
    speed-up plot over both, the batch read from each folder's workload."""
    from precond_bench import batch_axis
    folders = []
    for tokens in (64, 128):  # 4 rows of 16 bytes a micro-batch
        argv = ["--preset", "tiny", "--optimizers", "AdamW", "Muon", "--data-dir", str(data_dir), "--runs-dir",
                str(tmp_path), "--name", f"b{tokens}", "--quiet", "--no-plots", "--edge-points", "0",
                "--tokens-per-step", str(tokens), "--train-tokens", str(tokens * 6), "--lr-points", "1", "--seeds", "1"]
        assert bench_main(argv) == 0
        folders.append(tmp_path / f"b{tokens}")
    rows = batch_axis.collect(folders)
    assert [(r["bytes_per_step"], r["optimizer"]) for r in rows] == [(64, "AdamW"), (64, "Muon"), (128, "AdamW"),
                                                                      (128, "Muon")]
    assert all(r["steps_ratio"] == 1.0 for r in rows if r["optimizer"] == "AdamW")
    capsys.readouterr()
    assert batch_axis.main([str(f) for f in folders] + ["--out", str(tmp_path / "axis")]) == 0
    printed = capsys.readouterr().out
    assert "| 64 | Muon |" in printed and "| 128 | AdamW | " in printed
    pytest.importorskip("matplotlib")
    assert (tmp_path / "axis" / "speedup_vs_batch.png").exists()


def test_the_table_reports_each_optimizers_throughput():
    """The seed mean of the runs' bytes per second; "—" when a run did not record it (runs made before)."""
    curve = [(0, 0, 5), (10, 1.0, 3)]
    results = {"AdamW": {"best_lr": 1e-3, "full": [dict(fake_run("AdamW", 3.0, curve), tokens_per_second=1.2e6),
                                                   dict(fake_run("AdamW", 3.0, curve), tokens_per_second=1.3e6)]},
               "SOAP": {"best_lr": 1e-3, "full": [fake_run("SOAP", 2.5, curve)]}}
    summary = summarize(results)
    assert summary["AdamW"]["tokens_per_second"] == pytest.approx(1.25e6)
    table = markdown_table(summary)
    assert [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| AdamW")] == ["1.25M/s"]
    assert [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| SOAP")] == ["—"]


def test_a_full_runs_loss_spike_is_found_and_reported():
    """A rise to ≥ 1.2× the lowest loss so far is a spike (where it left, its peak, when it was back); the
    slow drift of a converging curve is not."""
    spiky = [(0, 0.0, 5.6), (24, 1.0, 2.3), (96, 4.0, 1.511), (120, 5.0, 3.022), (144, 6.0, 3.171),
             (240, 10.0, 1.716), (264, 11.0, 1.37), (1200, 50.0, 0.81)]
    assert loss_spike(spiky) == {"from": [96, 1.511], "peak": [144, 3.171], "recovered": 264}
    assert loss_spike(spiky[:5])["recovered"] is None
    assert loss_spike([(0, 0.0, 5.6), (10, 1.0, 1.0), (20, 2.0, 1.19), (30, 3.0, 0.9)]) is None
    results = {"AdamW": {"best_lr": 1e-3, "full": [fake_run("AdamW", 0.8, [(0, 0, 5.6), (1200, 50.0, 0.8)])]},
               "Shampoo": {"best_lr": 3e-3, "full": [fake_run("Shampoo", 0.81, spiky)]}}
    summary = summarize(results)
    assert summary["AdamW"]["spike"] is None
    text = notes(summary)
    assert "- Shampoo: 1.5110 at step 96 → 3.1710 at step 144, back at 1.5110 by step 264." in text
    assert "AdamW:" not in text


def test_batch_axis_plot_draws_a_peer_as_a_ring_around_its_twin(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from precond_bench import batch_axis, report
    figures = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figures.append(fig) or path)
    rows = [{"optimizer": name, "bytes_per_step": 1 << 20, "steps_ratio": 0.76, "seconds_ratio": 0.79, "peer": peer}
            for name, peer in (("SOAP", None), ("pytorch_optimizer.SOAP", "pytorch_optimizer"))]
    batch_axis.plot_speedups(rows, tmp_path)
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"SOAP", "pytorch_optimizer.SOAP (peer)"}
    assert lines["pytorch_optimizer.SOAP (peer)"].get_markerfacecolor() == "none"
    assert lines["SOAP"].get_markerfacecolor() != "none"


def test_cholesky_qr_probe_records_every_refresh_and_counts_each_way(data_dir):
    """The probe behind BENCHMARKS' CholeskyQR table, on the tiny LM: every power-QR refresh's matrices are
    recorded (steps 11 and 21 here), and no way of orthonormalising passes more than it was given; float64
    after float32 passes at least what float32 did."""
    from precond import linalg, refresh

    probe = study_script("cholesky_qr_probe")
    real, share = linalg.cholesky_qr, refresh.RETRY_SHARE
    tally = probe.main(["--preset", "tiny", "--steps", "21", "--batch-size", "2", "--data-dir", str(data_dir)])
    assert linalg.cholesky_qr is real and refresh.RETRY_SHARE == share  # put back (the policy was off while recording)
    assert {step for step, _ in tally} == {11, 21}
    for count, in_float32, then_float64, tf32_at_float32, tf32_at_tf32 in tally.values():
        assert count > 0 and 0 <= in_float32 <= then_float64 <= count
        assert 0 <= tf32_at_float32 <= count and 0 <= tf32_at_tf32 <= count


def test_cholesky_qr_probe_replays_the_refresh_policy_factor_by_factor():
    """The probe's replay of the skipping policy: a factor past float32's CholeskyQR (condition 1e10) tries
    it at the first of three refreshes only; a well-conditioned one at all three."""
    probe = study_script("cholesky_qr_probe")
    g = torch.Generator().manual_seed(1)
    V = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))[0]
    hard = V @ torch.diag(torch.logspace(-8, 2, 12, dtype=torch.float64)) @ V.T
    easy = torch.randn(12, 12, dtype=torch.float64, generator=g) + 12 * torch.eye(12, dtype=torch.float64)
    stack = torch.stack([hard, easy]).float()
    tried, seconds = probe.replay_policy([(11, stack), (21, stack), (31, stack)])
    assert tried == 2 + 1 + 1 and seconds > 0


def test_a_rate_check_with_a_diverged_neighbour_is_complete_and_says_so():
    row = {"best_lr": 1e-3, "swept_lr": None, "rate_check": {"0.000333": 1.2, "0.001": 1.0, "0.003": None},
           "rate_check_diverged": [0.003]}
    line = _rate_check_line("AdamW", row)
    assert "0.003 → diverged" in line and "the sweep's rate is also the full run's best" in line
    unfinished = dict(row, rate_check_diverged=[])  # the same None, now a run not made yet
    assert "0.003 → —" in _rate_check_line("AdamW", unfinished)
    assert _rate_check_line("AdamW", unfinished).endswith("not complete.")
