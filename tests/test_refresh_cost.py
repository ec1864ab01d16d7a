"""The refresh-cost benchmark runs on the CPU and measures what it says."""

import torch

from precond_bench import refresh_cost


def test_refresh_cost_on_the_tiny_body_reports_every_method_and_eigh_is_exact():
    names = ["eigh, batched", "power-QR (SOAP)", "refine, 1 step"]
    results = refresh_cost.run("tiny", torch.device("cpu"), drift=10, history=10, noise=1.0, repeats=1,
                               names=names)
    rows = results["rows"]
    assert list(rows) == ["stale basis", *names]
    assert results["factors"] == {64: 10, 192: 2, 256: 4}
    for n in results["factors"]:
        stale = rows["stale basis"]["per_size"][n]["ratio"]
        assert rows["eigh, batched"]["per_size"][n]["ratio"] < 1e-5 < stale
        assert rows["refine, 1 step"]["per_size"][n]["ratio"] < stale
        assert rows["refine, 1 step"]["per_size"][n]["orthogonality"] < 1e-4
    assert "| refine, 1 step |" in refresh_cost.markdown(results)


def test_product_precision_reports_every_mode_per_factor_size_at_float32_error_on_the_cpu():
    rows = refresh_cost.product_precision("tiny", torch.device("cpu"), repeats=1)
    assert [(r["stack"], r["mode"]) for r in rows] == [(s, m) for s in ("10 × 64²", "2 × 192²", "4 × 256²")
                                                        for m in ("False", "True", "3x")]
    for row in rows:  # no TF32 on a CPU: every mode is the float32 product
        assert 0.0 < row["relative_error"] < 1e-6 and row["ms"] > 0.0
