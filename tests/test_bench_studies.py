"""The study scripts of ``benchmarks/`` on tiny configurations: purifying, transfer, bias correction and the
CholeskyQR probe."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from bench_fakes import study_script
from precond_bench.model import GPT, GPTConfig


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


def test_bias_correction_study_tunes_each_modes_rate_until_interior_then_runs_the_other_seeds(data_dir, tmp_path,
                                                                                              monkeypatch):
    """With losses a parabola in log(rate) around a best of 0.016 (std) and 0.0005 (loo), --tune grows the
    1e-3/2e-3/4e-3 grid on seed 0 by its ratio past each edge until the best is interior, then runs seeds 1
    and 2 at that best only; a rerun makes nothing new, and a time limit leaves the rest to a rerun."""
    study = study_script("bias_correction_study")
    centre = {"std": 0.016, "loo": 0.0005}
    clock = [0.0]  # a run takes one second of it

    def fake_run(workload, name, mode, seed, args, arm, lr):
        clock[0] += 1.0
        return {"optimizer": name, "mode": mode, "seed": seed, "arm": arm, "lr": lr, "steps": args.steps,
                "final_val_loss": 1.0 + math.log(lr / centre[mode]) ** 2 + 0.01 * seed, "wall_seconds": 1.0,
                "microbatches": args.microbatches, "batch_size": args.batch_size, "device": args.device,
                "model": {"width": args.width, "depth": args.depth, "context": args.context}}

    monkeypatch.setattr(study, "run", fake_run)
    monkeypatch.setattr(study, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    out = tmp_path / "tune.json"
    argv = ["--out", str(out), "--data-dir", str(data_dir), "--width", "16", "--depth", "1", "--context", "8",
            "--modes", "std", "loo", "--lr", "0.001", "0.002", "0.004", "--tune"]
    assert study.main(argv) == 0
    runs = json.loads(out.read_text())
    seed0 = {m: sorted(r["lr"] for r in runs if r["mode"] == m and r["seed"] == 0) for m in centre}
    assert seed0 == {"std": [0.001, 0.002, 0.004, 0.008, 0.016, 0.032],
                     "loo": [0.00025, 0.0005, 0.001, 0.002, 0.004]}
    assert {(r["mode"], r["lr"]) for r in runs if r["seed"] > 0} == {("std", 0.016), ("loo", 0.0005)}
    assert sorted(r["seed"] for r in runs if r["seed"] > 0) == [1, 1, 2, 2]
    assert study.main(argv) == 0 and len(json.loads(out.read_text())) == len(runs)  # all saved: nothing new
    out.unlink()
    assert study.main([*argv, "--time-limit", "2.5"]) == 0  # 1 s a run: the std grid's first two only
    assert len(json.loads(out.read_text())) == 2
    assert study.main(argv) == 0 and len(json.loads(out.read_text())) == len(runs)  # a rerun goes on
