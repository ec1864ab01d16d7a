"""The step-time benchmark runs on the CPU (a tiny body), and its table has a row per optimizer."""

import json

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
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in names)
