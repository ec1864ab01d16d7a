"""The step-time benchmark runs on the CPU (a tiny body), and its table has a row per optimizer."""

import json

import torch

from precond_bench import step_time


def test_body_shapes_are_gpt2_small_for_85m():
    layers, width = step_time.BODIES["85M"]
    shapes = step_time.body_shapes(layers, width)
    assert len(shapes) == 48 and sum(a * b for a, b in shapes) == 84_934_656  # 12 · 12 · 768²


def test_tiny_cpu_run_reports_every_optimizer(tmp_path, capsys):
    out = tmp_path / "steps.json"
    names = ["precond AdamW", "precond SOAP", "torch AdamW fused"]
    assert step_time.main(["--sizes", "tiny", "--device", "cpu", "--warmup", "2", "--periods", "1",
                           "--optimizers", *names, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["sizes"]["tiny"]["rows"]
    assert list(rows) == names
    for row in rows.values():
        assert row["mean_ms"] > 0 and row["max_ms"] >= row["median_ms"] > 0 and row["state_mib"] > 0
        assert row["peak_mib"] >= row["state_mib"]  # on a CPU too: the state and the steps' temporaries
        assert row["warmup_s"] > 0 and "cudagraph_skips" not in row  # eager rows compile nothing
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in names)
    assert "gradients: 8 sets, flat spectrum" in table.splitlines()[0]  # what the timings were drawn from
    old = {"device": "cuda", "torch": "x", "date": "d", "sizes": {}}  # saved before the gradients were recorded
    assert step_time.markdown(old) == "device: cuda, torch x, d"


def test_cpu_transient_peak_counts_what_the_steps_hold_at_once_and_release():
    """Two 4 MB temporaries alive together, then a third after both died: the peak is 8 MB, not 12."""
    def steps():
        a, b = torch.ones(1 << 20), torch.ones(1 << 20)  # 4 MiB each
        del a, b
        return torch.ones(1 << 20).sum()

    param = torch.nn.Parameter(torch.zeros(3))
    peak = step_time.cpu_transient_peak(torch.optim.SGD([param], lr=0.1), [param], steps)
    assert 8 << 20 <= peak < (8 << 20) + (1 << 16)


def test_a_compiled_row_shows_what_compiling_made_and_cost():
    row = {"mean_ms": 2.0, "median_ms": 2.0, "max_ms": 3.0, "state_mib": 5.0, "peak_mib": 6.0, "sync_free": True,
           "warmup_s": 41.2, "graphs": 2, "graph_breaks": 1, "cudagraph_skips": 3, "fallbacks": 4}
    results = {"device": "cuda", "torch": "x", "date": "d",
               "sizes": {"tiny": {"matrices": 1, "parameters": 10, "rows": {"precond SOAP compiled": row}}}}
    line = [l for l in step_time.markdown(results).splitlines() if l.startswith("| precond SOAP compiled")][0]
    assert "yes; 4 QR fallbacks; 2 graphs, 1 breaks, 3 CUDA-graph skips, warm-up 41 s" in line


def test_two_gradient_sets_leave_soaps_tall_factors_rank_deficient_and_eight_do_not(tmp_path):
    """With the gradients of two steps taken in turn, the ``4w × 4w`` factor of an MLP matrix has rank ``2w``:
    CholeskyQR fails and each SOAP refresh pays for Householder QR as well, which the row counts. Eight sets
    give full-rank factors, as fresh gradients do."""
    counts = {}
    for sets in (2, 8):
        out = tmp_path / f"steps-{sets}.json"
        assert step_time.main(["--sizes", "tiny", "--device", "cpu", "--warmup", "2", "--periods", "2",
                               "--gradient-sets", str(sets), "--optimizers", "precond SOAP", "torch AdamW fused",
                               "--out", str(out)]) == 0
        results = json.loads(out.read_text())
        assert results["gradient_sets"] == sets
        rows = results["sizes"]["tiny"]["rows"]
        assert rows["torch AdamW fused"]["fallbacks"] is None  # a peer keeps no such counters
        counts[sets] = rows["precond SOAP"]["fallbacks"]
    assert counts[2] > 0 and counts[8] == 0


def test_gradient_sets_must_be_positive(capsys):
    import pytest
    with pytest.raises(SystemExit):
        step_time.main(["--sizes", "tiny", "--device", "cpu", "--gradient-sets", "0"])
    assert "--gradient-sets" in capsys.readouterr().err


def test_a_decaying_spectrum_defeats_float32_cholesky_qr_and_not_float64(tmp_path, monkeypatch):
    """Gradients scaled over four decades by rows and columns give factors as ill-conditioned as a trained
    model's: SOAP's float32 CholeskyQR falls back to Householder QR (as on a CPU), while the float64 retry of a
    data-centre GPU (pretended here) orthonormalises every one of them."""
    from precond import linalg

    def fallbacks(name: str) -> int:
        out = tmp_path / f"{name}.json"
        assert step_time.main(["--sizes", "tiny", "--device", "cpu", "--warmup", "2", "--periods", "2",
                               "--spectrum", "decaying", "--optimizers", "precond SOAP", "--out", str(out)]) == 0
        results = json.loads(out.read_text())
        assert results["spectrum"] == "decaying"
        return results["sizes"]["tiny"]["rows"]["precond SOAP"]["fallbacks"]

    assert fallbacks("float32") > 0
    monkeypatch.setattr(linalg, "_float64_keeps_pace", lambda X: True)
    assert fallbacks("float64") == 0
