"""The protocol's decisions on a fake training run: sweeps that grow past an edge, the full-run rate check,
adopted rates, peers' rates, time limits and plans."""

from __future__ import annotations

import json

import pytest

from bench_fakes import FakeTraining, fake_config
from precond_bench.__main__ import main as bench_main
from precond_bench.optimizers import SPECS
from precond_bench.protocol import lr_grid, plan_benchmark, run_benchmark
from precond_bench.report import markdown_table, notes


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
    FakeTraining(monkeypatch, best_lr=SPECS["AdamW"].center_lr)
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
    FakeTraining(monkeypatch, best_lr=center, best_wd=0.3)
    result = run_benchmark(fake_config(tmp_path, ["AdamW", "Muon"], edge_points=0))
    adamw_runs = result["results"]["AdamW"]
    assert [r["lr"] for r in adamw_runs["sweep"]] == lr_grid(center, 3, 3.0)
    assert sorted(r["adamw"]["weight_decay"] for r in adamw_runs["weight_decay_sweep"]) == [0.0, 0.3]
    assert all(r["lr"] == center for r in adamw_runs["weight_decay_sweep"])
    assert adamw_runs["weight_decay"] == 0.3 and result["summary"]["AdamW"]["weight_decay"] == 0.3
    assert all(r["adamw"] == {"lr": center, "weight_decay": 0.3} for r in adamw_runs["full"])
    assert all(r["adamw"]["weight_decay"] == 0.3 for r in result["results"]["Muon"]["full"])
    assert "| AdamW | 0.003, wd 0.3 |" in markdown_table(result["summary"])
