"""The benchmark's report: the summary against AdamW's target, the tables and the plots."""

from __future__ import annotations

import pytest

from bench_fakes import fake_run
from precond_bench.__main__ import main as bench_main
from precond_bench.optimizers import SPECS
from precond_bench.protocol import loss_spike, summarize
from precond_bench.report import _rate_check_line, curve_colours, markdown_table, notes


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


def test_an_optimizer_keeps_its_plot_colour_in_any_subset():
    everything = curve_colours(sorted(SPECS))
    subset = curve_colours(["SOAP", "AdamW", "Muon"])
    assert all(subset[name] == everything[name] for name in subset)
    assert len(set(everything.values())) == len(everything)  # no two optimizers share a colour
    assert curve_colours(["Custom"]) == {"Custom": None}


def test_ratio_plot_with_no_optimizer_at_the_target_draws_no_empty_legend(tmp_path):
    import warnings

    from precond_bench.report import plot_ratios
    pytest.importorskip("matplotlib")
    summary = {"AdamW": {"final_val_mean": 1.0, "steps_ratio": 1.0, "seconds_ratio": 1.0, "peer": None},
               "SOAP": {"final_val_mean": 1.1, "steps_ratio": None, "seconds_ratio": None, "peer": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels found to put in legend"
        assert plot_ratios(summary, tmp_path, "t").exists()


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


def test_a_rate_check_with_a_diverged_neighbour_is_complete_and_says_so():
    row = {"best_lr": 1e-3, "swept_lr": None, "rate_check": {"0.000333": 1.2, "0.001": 1.0, "0.003": None},
           "rate_check_diverged": [0.003]}
    line = _rate_check_line("AdamW", row)
    assert "0.003 → diverged" in line and "the sweep's rate is also the full run's best" in line
    unfinished = dict(row, rate_check_diverged=[])  # the same None, now a run not made yet
    assert "0.003 → —" in _rate_check_line("AdamW", unfinished)
    assert _rate_check_line("AdamW", unfinished).endswith("not complete.")
