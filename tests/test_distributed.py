"""DDP and FSDP2 on two gloo processes (spawned once for the module) against one process.

DDP splits the preconditioner work: the trajectory must equal one process's on the full batch and each
process must hold about half the preconditioner state. FSDP2 preconditions each process's shard, so its
reference is one process stepping every parameter cut by rows into separate parameters; Muon gathers whole
matrices, so its reference is plain Muon. Checkpoints go through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from distributed_cases import CASES, FACTORIES

WORLD = 2
TOLERANCE = 1e-10  # float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    from distributed_cases import worker
    mp.spawn(worker, args=(WORLD, _free_port(), str(root)), nprocs=WORLD, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _case(results, key):
    outs = [r[key] for r in results]
    for rank, out in enumerate(outs):
        assert "error" not in out, f"rank {rank}: {out['error']}"
    return outs


@pytest.mark.parametrize("name", list(FACTORIES))
def test_ddp_matches_one_process_and_splits_state(results, name):
    outs = _case(results, f"trajectory-ddp-{name}")
    for out in outs:
        assert out["max_rel"] <= TOLERANCE
    counts, total = outs[0]["state_numel"], outs[0]["reference_numel"]
    assert sum(counts) >= total and max(counts) <= total  # nothing lost; no process holds more than one
    if name in ("Shampoo", "EShampoo", "SOAP", "Sophia"):  # no fused-AdamW parameters (those are replicated)
        assert sum(counts) == total and max(counts) <= 0.75 * total


@pytest.mark.parametrize("name", ["Shampoo", "SOAP", "Muon"])
def test_ddp_guards_agree_between_processes(results, name):
    """A NaN gradient and refused updates: the same weights and skip counts as one process, in every
    process; strict=True raises in every process."""
    outs = _case(results, f"guards-ddp-{name}")
    for out in outs:
        assert out["max_rel"] <= TOLERANCE
        assert out["raised"].startswith(f"{name} (strict=True)")
    counts = outs[0]["counts"]
    assert all(c == counts[0] for c in counts)  # every process counts every block alike
    assert sorted(counts[0]) == sorted(outs[0]["reference_counts"]) and sum(counts[0]) > 1


@pytest.mark.parametrize("name", ["SOAP", "Muon"])
def test_compiled_ddp_step_matches_one_process(results, name):
    """torch.compile(opt.step) under DDP traces the exchange's collectives and keeps the trajectory."""
    for out in _case(results, f"compiled-ddp-{name}"):
        assert out["max_rel"] <= TOLERANCE


@pytest.mark.parametrize("name", ["Shampoo", "Muon"])
def test_ddp_bfloat16_parameters_match_one_process(results, name):
    """bfloat16 weights (float32 state) exchanged between processes. Muon: the same bits as one process.
    Shampoo's owned blocks form smaller batches than one process's buckets, whose float32 arithmetic rounds
    differently (1e-17 in float64, above); a weight near a bfloat16 rounding boundary then lands one bf16 step
    (2^-8 relative) away, so a few elements differ by that much, not more."""
    for out in _case(results, f"bfloat16-ddp-{name}"):
        assert out["max_rel"] == 0.0 if name == "Muon" else out["max_rel"] <= 4e-3


@pytest.mark.parametrize("name", list(FACTORIES))
def test_fsdp_matches_its_reference(results, name):
    for out in _case(results, f"trajectory-fsdp-{name}"):
        assert out["max_rel"] <= TOLERANCE


@pytest.mark.parametrize("key", [f"{k}-{m}-{n}" for k, m, n in CASES if k == "resume"])
def test_distributed_checkpoint_resumes(results, key):
    outs = _case(results, key)
    for out in outs:
        assert out["max_rel"] <= TOLERANCE
    first = outs[0]
    if key.startswith("resume-ddp"):  # blocks are keyed by parameter, not by process: any world size loads
        assert first.get("world1_max_rel", 1.0) <= TOLERANCE, first.get("world1_error")
    else:  # per-shard state cannot be re-cut: the error names the entry missing from the checkpoint
        assert "Missing key in checkpoint" in first.get("world1_error", "")


def test_distributed_argument_is_checked():
    import torch

    import precond
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="distributed.*not initialised"):
        precond.SOAP(params, distributed="ddp")
    with pytest.raises(ValueError, match="Invalid distributed"):
        precond.Muon(params, distributed="fsdp")


def test_owners_are_dealt_by_cost():
    from precond.engine.distribute import assign_owners
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 8.0, 2.0, 2.0]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert loads == [15.0, 15.0]
    assert owners == assign_owners(costs, 2)  # deterministic: every process computes the same
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_launcher_example_runs_ddp_and_fsdp_like_one_process(tmp_path):
    """examples/distributed_lm.py on a tiny model: one process, then torchrun with 2 gloo processes under DDP
    and FSDP2, each compared with the one-process run (Muon: whole matrices, so the same trajectory)."""
    import subprocess
    import sys
    from pathlib import Path

    from precond_bench import data

    docs = {f"doc{i}.txt": (f"Some text number {i} for the example. " * 30).encode() for i in range(30)}
    train, val = data.split_documents(docs)
    (tmp_path / "pydocs").mkdir()
    (tmp_path / "pydocs" / "train.bin").write_bytes(train)
    (tmp_path / "pydocs" / "val.bin").write_bytes(val)
    root = Path(__file__).resolve().parents[1]
    tiny = ["--optimizer", "Muon", "--width", "32", "--depth", "1", "--heads", "2", "--context", "16",
            "--batch-size", "4", "--steps", "6", "--warmup", "2", "--device", "cpu", "--dtype", "float64",
            "--data-dir", str(tmp_path)]
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    script = str(root / "examples" / "distributed_lm.py")
    one = subprocess.run([sys.executable, script, *tiny, "--save-params", str(tmp_path / "one.pt"),
                          "--out", str(tmp_path / "one.json")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads((tmp_path / "one.json").read_text())[0]["mode"] == "single"
    for mode in ("ddp", "fsdp"):
        out = tmp_path / f"{mode}.json"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(_free_port()), script, "--mode", mode, *tiny,
                              "--compare", str(tmp_path / "one.pt"), "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        records = json.loads(out.read_text())
        assert [r["rank"] for r in records] == [0, 1] and all(r["mode"] == mode for r in records)
        assert all(r["optimizer_ms"] > 0 and r["optimizer_state_mb"] > 0 for r in records)
        diff = float(run.stdout.split("max relative parameter difference ")[1].split(",")[0])
        assert diff <= 1e-12  # float64; the processes sum gradients in another order than one process
