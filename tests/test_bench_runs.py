"""The whole benchmark on the tiny preset: outputs, resumed and interrupted runs (bit for bit), compiled
runs, plans and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from precond_bench.__main__ import main as bench_main
from precond_bench.optimizers import ADAMW_WEIGHT_DECAYS, SPECS, AdamWSetting
from precond_bench.protocol import BenchConfig, run_benchmark
from precond_bench.runner import train_run
from precond_bench.workloads import PRESETS, make_workload


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


def test_peer_rows_are_marked_and_unavailable_peers_are_refused(data_dir, tmp_path, monkeypatch):
    from precond_bench import optimizers
    assert SPECS["torch.Muon"].peer == "torch" and SPECS["SOAP"].peer is None
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    assert optimizers.available_optimizers(["AdamW", "pytorch_optimizer.SOAP"]) == ["AdamW"]
    with pytest.raises(SystemExit, match="pytorch_optimizer"):
        bench_main(["--preset", "tiny", "--optimizers", "AdamW", "pytorch_optimizer.SOAP", "--data-dir",
                    str(data_dir), "--runs-dir", str(tmp_path)])


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
