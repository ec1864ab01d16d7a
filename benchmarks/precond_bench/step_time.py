"""The optimizer step alone, timed on the weight matrices of GPT-style bodies, precond beside its peers.

    python -m precond_bench.step_time --sizes 85M --device cuda

For each body (``20M``: 6 layers of width 512; ``85M``: GPT-2 small, 12 × 768; ``350M``: 24 × 1024; ``tiny``
for CPU checks), the four weight matrices of every layer (attention in/out, MLP up/down, in ``nn.Linear``'s
``(out, in)`` layout) get random float32 values and, at step ``i``, the pre-drawn random gradients
``i mod gradient_sets`` (default 8: the factors of a ``4w × w`` matrix then have full rank, as with fresh
gradients; with two sets its ``4w × 4w`` factor has rank ``2w`` and CholeskyQR falls back to Householder QR at
every SOAP refresh, which the rows' fallback count shows). Their entries are Gaussian (``--spectrum flat``:
well-conditioned factors, a refresh at its cheapest), or scaled by rows and columns falling over four decades
each (``decaying``: factors of condition ~1e8, as a trained model's, whose power step float32's CholeskyQR
often cannot orthonormalise; ``benchmarks/cholesky_qr_probe.py``).
Each optimizer steps ``warmup`` times (past its first preconditioner refresh), then ``periods`` refresh
periods are timed step by step with CUDA events (the host clock on a CPU). Reported per optimizer: mean and
median ms per step (a step that refreshes nothing), the slowest step (a refresh), the ratio of the mean to
fused AdamW's, the memory the optimizer holds after stepping (on a GPU: allocated memory beyond parameters
and gradients, whatever the state's layout; on a CPU: the bytes of its state tensors) and the peak memory of
its steps (on a CPU: its state plus the most bytes its steps allocated at once over one more refresh period,
counted by torch's ``MemTracker``; eager rows only). Our optimizers' non-refresh steps are also run under
``torch.cuda.set_sync_debug_mode("error")`` to check that they never wait for the device.

Rows ending in "compiled" (listed by ``--list``, run only when named) wrap ``opt.step`` in ``torch.compile``
after its first, eager call; their last column adds the graphs compiled and the graph breaks met.

Peers are optional: ``torch.optim`` (AdamW fused and foreach, Muon) always; ``pytorch_optimizer`` and
``heavyball`` when installed; Distributed Shampoo, the reference SOAP and NVIDIA's emerging-optimizers from
their public sources in ``.peers/`` (``optimizers``, ``SOAP``, ``emerging``), which the project never commits.
A peer that cannot be imported or built is listed with its error and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import precond

from .runner import state_bytes

# layers, width; "85M-layer" is one layer of the 85M body (its state is a twelfth of the 85M body's: a CPU
# measures it in minutes)
BODIES = {"tiny": (2, 64), "20M": (6, 512), "85M": (12, 768), "85M-layer": (1, 768), "350M": (24, 1024)}
PEERS_DIR = Path(__file__).resolve().parents[2] / ".peers"
FREQUENCY = 10  # refresh period of every preconditioned optimizer (the F=10)
GRADIENT_SETS = 8  # pre-drawn gradients taken in turn: full-rank factors for every body (see the docstring)
SPECTRA = ("flat", "decaying")


def draw_gradient(shape: tuple[int, int], gen: torch.Generator, spectrum: str) -> torch.Tensor:
    """A random gradient of ``shape``: Gaussian, or (``"decaying"``) with its rows and columns scaled from 1
    down to 1e-4, so that both Kronecker factors' eigenvalues spread over eight decades."""
    g = torch.randn(shape, generator=gen)
    if spectrum == "decaying":
        g = torch.logspace(0, -4, shape[0])[:, None] * g * torch.logspace(0, -4, shape[1])
    return g


def body_shapes(layers: int, width: int) -> list[tuple[int, int]]:
    """The weight matrices of a GPT-2-style body: per layer qkv, attention out, MLP up, MLP down."""
    return [s for _ in range(layers) for s in ((3 * width, width), (width, width), (4 * width, width),
                                               (width, 4 * width))]


# --------------------------------------------------------------------------------- optimizers
def _kronecker_rows(max_dim: int, suffix: str = "", **options: Any) -> dict[str, Callable]:
    """Our SOAP, EShampoo and Shampoo (Adam grafting) at F = ``FREQUENCY`` with ``options``, named
    ``precond <method>[ <suffix>]``."""
    name = (lambda method: f"precond {method} {suffix}") if suffix else (lambda method: f"precond {method}")
    return {
        name("SOAP"): lambda ps: precond.SOAP(ps, lr=3e-3, precondition_frequency=FREQUENCY, **options),
        name("EShampoo"): lambda ps: precond.EShampoo(ps, lr=1e-3, precondition_frequency=FREQUENCY,
                                                      max_preconditioner_dim=max_dim, **options),
        name("Shampoo"): _shampoo(max_dim, **options),
    }


def _shampoo(max_dim: int, **options: Any) -> Callable:
    """Shampoo at Distributed Shampoo's settings (Adam grafting, roots every ``FREQUENCY`` steps), ``options``
    on top."""
    return lambda ps: precond.Shampoo(ps, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=FREQUENCY,
                                      grafting="adam", max_preconditioner_dim=max_dim, **options)


def _ours(max_dim: int) -> dict[str, Callable]:
    return {
        "precond AdamW": lambda ps: precond.AdamW(ps, lr=1e-3),
        "precond Muon": lambda ps: precond.Muon(ps, lr=0.02),
        # the same iteration through the Gram matrix, in float16 as its authors run it (non-square matrices)
        "precond Muon gram fp16": lambda ps: precond.Muon(ps, lr=0.02, ns_algorithm="gram_newton_schulz",
                                                          ns_dtype="float16"),
        **_kronecker_rows(max_dim),
        **_kronecker_rows(max_dim, "tf32", tf32=True),
        "precond SOAP 3xtf32": lambda ps: precond.SOAP(ps, lr=3e-3, precondition_frequency=FREQUENCY, tf32="3x"),
        # factors (and Shampoo's roots) kept as upper triangles: Distributed Shampoo's state, unpacked per use
        **_kronecker_rows(max_dim, "packed", packed_factors=True),
        # and the eigenbases or roots in bfloat16 as well: the least state (cast up for every product)
        **_kronecker_rows(max_dim, "packed-bf16", packed_factors=True, preconditioner_dtype=torch.bfloat16),
        **_refine_rows(max_dim),
    }


class CompiledStep:
    """``opt.step`` under ``torch.compile`` from its second call on: the first, which creates the state, runs
    eagerly (state creation is host-side work that would break the graph once)."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str | None = None) -> None:
        # Every optimizer's step is one code object (BlockEngine.step): without a reset, the rows compiled
        # before would use up its recompile limit and a later row would silently run eagerly.
        torch._dynamo.reset()
        self.eager, self.compiled, self.calls = optimizer.step, torch.compile(optimizer.step, mode=mode), 0

    def __call__(self, closure: Any = None) -> Any:
        self.calls += 1
        return (self.eager if self.calls == 1 else self.compiled)(closure)


def compiled(make: Callable, mode: str | None = None) -> Callable:
    def build(ps):
        optimizer = make(ps)
        optimizer.step = CompiledStep(optimizer, mode)  # an instance attribute: the class's step stays as it is
        return optimizer
    return build


def _compiled_rows(max_dim: int) -> dict[str, Callable]:
    """Our optimizers and torch's AdamW with their step compiled (``torch.compile(opt.step)``)."""
    rows = {f"{name} compiled": compiled(make) for name, make in _ours(max_dim).items()
            if name in ("precond AdamW", "precond Muon", "precond SOAP", "precond Shampoo", "precond EShampoo")}
    rows["torch AdamW foreach compiled"] = compiled(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
    # "reduce-overhead": the compiled graphs replayed as CUDA graphs where inductor can capture them, so the
    # host launches nothing per kernel (on a CPU the same as the plain compiled rows)
    for name in ("precond AdamW", "precond Muon", "precond Muon gram fp16", "precond SOAP"):
        rows[f"{name} compiled reduce-overhead"] = compiled(_ours(max_dim)[name], "reduce-overhead")
    # The large-batch benchmark's every-step refinement, bound by its ~1,600 launches a step on the 20M body
    for name in ("precond SOAP refine tf32 F=1", "precond EShampoo refine tf32 F=1"):
        rows[f"{name} compiled"] = compiled(_refine_rows(max_dim)[name])
        rows[f"{name} compiled reduce-overhead"] = compiled(_refine_rows(max_dim)[name], "reduce-overhead")
    return rows


def _refine_rows(max_dim: int) -> dict[str, Callable]:
    """SOAP and EShampoo with the matmul-only refresh, at F=10 and refreshing every step (F=1); Shampoo with its
    roots from a refined eigenbasis, at F=10."""
    rows: dict[str, Callable] = {}
    for frequency in (FREQUENCY, 1):
        for tf32 in (False, True, "3x"):
            precision = {False: "", True: " tf32", "3x": " 3xtf32"}[tf32]
            suffix = f"refine{precision}{' F=1' if frequency == 1 else ''}"
            rows[f"precond SOAP {suffix}"] = (
                lambda ps, f=frequency, t=tf32: precond.SOAP(ps, lr=3e-3, precondition_frequency=f, tf32=t,
                                                             refresh_method="refine"))
            rows[f"precond EShampoo {suffix}"] = (
                lambda ps, f=frequency, t=tf32: precond.EShampoo(ps, lr=1e-3, precondition_frequency=f, tf32=t,
                                                                 max_preconditioner_dim=max_dim,
                                                                 refresh_method="refine"))
            if frequency == FREQUENCY:  # Shampoo's roots from a refined eigenbasis (eigh at the first refresh)
                rows[f"precond Shampoo {suffix}"] = _shampoo(max_dim, tf32=tf32, root_method="refine")
    # Every step under Purifying Shampoo's criterion: checked for all factors, refined where it fails
    rows["precond SOAP refine tf32 F=1 tau=0.03"] = lambda ps: precond.SOAP(
        ps, lr=3e-3, precondition_frequency=1, tf32=True, refresh_method="refine", refresh_tolerance=0.03)
    return rows


def _peers(max_dim: int) -> dict[str, Callable]:
    peers: dict[str, Callable] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    }

    def pytorch_optimizer(name: str, **kw: Any) -> Callable:
        def make(ps):
            import pytorch_optimizer
            return getattr(pytorch_optimizer, name)(ps, **kw)
        return make

    def heavyball(name: str, **kw: Any) -> Callable:
        def make(ps):
            import heavyball
            return getattr(heavyball, name)(ps, **kw)
        return make

    def distributed_shampoo(kind: str) -> Callable:
        def make(ps):
            sys.path.insert(0, str(PEERS_DIR / "optimizers"))
            import distributed_shampoo as ds
            common = dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=max_dim,
                          precondition_frequency=FREQUENCY)
            if kind == "Shampoo":
                return ds.DistributedShampoo(ps, **common, grafting_config=ds.AdamPreconditionerConfig(
                    beta2=0.999, epsilon=1e-10))
            if kind == "EShampoo":
                return ds.DistributedShampoo(ps, **common,
                                             preconditioner_config=ds.EigenvalueCorrectedShampooPreconditionerConfig())
            return ds.DistributedShampoo(ps, **dict(common, betas=(0.95, 0.95), epsilon=1e-8),
                                         preconditioner_config=ds.DefaultSOAPConfig)
        return make

    def reference_soap(ps):
        sys.path.insert(0, str(PEERS_DIR / "SOAP"))
        from soap import SOAP
        return SOAP(ps, lr=3e-3, precondition_frequency=FREQUENCY)

    def emerging(name: str) -> Callable:
        def make(ps):
            sys.path.insert(0, str(PEERS_DIR / "emerging"))
            if name == "Muon":
                from emerging_optimizers.orthogonalized_optimizers import Muon
                return Muon(ps, lr=0.02)
            from emerging_optimizers.legacy_soap import SOAP
            return SOAP(ps, lr=3e-3)
        return make

    peers.update({
        "pytorch-optimizer Muon": lambda ps: pytorch_optimizer("Muon", lr=0.02)([{"params": ps, "use_muon": True}]),
        "pytorch-optimizer SOAP": pytorch_optimizer("SOAP", lr=3e-3, precondition_frequency=FREQUENCY),
        "heavyball Muon": heavyball("Muon", lr=0.02),
        "heavyball SOAP": heavyball("SOAP", lr=3e-3, precondition_frequency=FREQUENCY),
        "DistributedShampoo Shampoo": distributed_shampoo("Shampoo"),
        "DistributedShampoo EShampoo": distributed_shampoo("EShampoo"),
        "DistributedShampoo SOAP": distributed_shampoo("SOAP"),
        "reference SOAP": reference_soap,
        "emerging-optimizers Muon": emerging("Muon"),
        "emerging-optimizers SOAP": emerging("SOAP"),
    })
    return peers


def optimizers(width: int = 768) -> dict[str, Callable]:
    """Every optimizer by name, configured for a body of ``width``: full factors (``max_dim = 4·width``, the
    longest dim, so nothing is blocked and no two dims of a matrix are merged into one factor)."""
    return {**_ours(4 * width), **_compiled_rows(4 * width), **_peers(4 * width)}


# ------------------------------------------------------------------------------------ timing
class Clock:
    """Per-step wall time: CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def cpu_transient_peak(opt: Any, params: list[torch.Tensor], run_steps: Callable[[], Any]) -> int | None:
    """On a CPU, the most bytes that ``run_steps()`` held at once beyond what existed before it (temporaries;
    state that grows), from torch's ``MemTracker`` (allocations made under it, released as their storage
    dies). ``None`` where the tracker is not available."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    tracker.track_external(*params, opt)
    cpu = torch.device("cpu")
    with tracker:
        entry = tracker.get_tracker_snapshot("current")[cpu]["Total"]
        run_steps()
        peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
    return peak - entry


def time_optimizer(make: Callable, shapes: list[tuple[int, int]], device: torch.device, warmup: int,
                   periods: int, check_syncs: bool, gradient_sets: int = GRADIENT_SETS,
                   spectrum: str = "flat") -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen).to(device)) for s in shapes]
    grads = [[draw_gradient(s, gen, spectrum).to(device) for s in shapes] for _ in range(gradient_sets)]
    if device.type == "cuda":
        gc.collect()  # an earlier row's optimizer caught in a reference cycle would be freed during this row
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    from torch._dynamo.utils import counters
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    skips_before = counters["inductor"]["cudagraph_skips"]
    opt = make(params)

    def step(i: int) -> None:
        for p, g in zip(params, grads[i % gradient_sets]):
            p.grad = g
        opt.step()

    if isinstance(opt.step, CompiledStep):  # the second refresh still re-traces once (a step count turns dynamic)
        warmup = max(warmup, 2 * FREQUENCY + 2)
    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started  # with a compiled step: what compiling it cost, in seconds
    sync_free = None
    if check_syncs and device.type == "cuda":
        # A step that refreshes nothing (the warm-up ended just past a refresh) must not wait for the device.
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(warmup)
            sync_free = True
        except RuntimeError as err:
            sync_free = f"no: {str(err).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        warmup += 1
    clock = Clock(device)
    clock.mark()
    steps = periods * FREQUENCY
    for i in range(warmup, warmup + steps):
        step(i)
        clock.mark()
    times = clock.intervals_ms()
    if device.type == "cuda":  # what the optimizer holds, whatever its state's layout
        resident = torch.cuda.memory_allocated() - base
        peak = torch.cuda.max_memory_allocated() - base
    else:
        resident = state_bytes(opt)
        peak = None if isinstance(opt.step, CompiledStep) else resident + cpu_transient_peak(
            opt, params, lambda: [step(i) for i in range(warmup + steps, warmup + steps + FREQUENCY)])
    result = {
        "mean_ms": sum(times) / len(times),
        "median_ms": sorted(times)[len(times) // 2],  # 9 of 10 steps refresh nothing: the median is such a step
        "max_ms": max(times),                          # a refresh step
        "state_mib": resident / 2**20,
        "peak_mib": peak / 2**20 if peak is not None else None,
        "sync_free": sync_free,
        "warmup_s": warmup_s,
        "fallbacks": fallbacks(opt),
    }
    if isinstance(opt.step, CompiledStep):  # what compiling made: graphs, breaks, graphs not captured
        result["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
        result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks_before
        # "reduce-overhead" replays a graph as a CUDA graph unless inductor skips it (a CPU tensor, a mutated
        # input without a fixed address, ...): such a row would time plain compiled kernels
        result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
    del opt, params, grads
    return result


def fallbacks(opt: Any) -> int | None:
    """How many refreshes of our optimizer's factors took a fallback (CholeskyQR to Householder QR); None for
    optimizers that keep no such counters (the peers)."""
    stats = getattr(opt, "preconditioner_stats", None)
    if stats is None:
        return None
    return sum(factor["fallbacks"] for factor in stats()["factors"])


def run(sizes: list[str], names: list[str], device: torch.device, warmup: int, periods: int,
        out: Path | None, gradient_sets: int = GRADIENT_SETS, spectrum: str = "flat") -> dict[str, Any]:
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "gradient_sets": gradient_sets, "spectrum": spectrum, "sizes": {}}
    for size in sizes:
        layers, width = BODIES[size]
        shapes = body_shapes(layers, width)
        n_params = sum(a * b for a, b in shapes)
        table = optimizers(width)
        rows: dict[str, Any] = {}
        for name in names:
            try:
                rows[name] = time_optimizer(table[name], shapes, device, warmup, periods,
                                            check_syncs=name.startswith("precond"), gradient_sets=gradient_sets,
                                            spectrum=spectrum)
            except Exception as err:  # a peer that does not import or run is reported, not fatal
                rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            print(f"{size} {name}: {rows[name]}", file=sys.stderr, flush=True)
            if out is not None:
                results["sizes"][size] = {"parameters": n_params, "matrices": len(shapes), "rows": rows}
                out.write_text(json.dumps(results, indent=1))
        results["sizes"][size] = {"parameters": n_params, "matrices": len(shapes), "rows": rows}
    return results


def markdown(results: dict[str, Any]) -> str:
    # results saved before these were recorded (two sets, Gaussian) say nothing rather than today's defaults
    drawn = (f"; gradients: {results['gradient_sets']} sets, {results.get('spectrum', 'flat')} spectrum"
             if "gradient_sets" in results else "")
    lines = [f"device: {results['device']}, torch {results['torch']}, {results['date']}{drawn}"]
    for size, entry in results["sizes"].items():
        rows = entry["rows"]
        fused = rows.get("torch AdamW fused", {}).get("mean_ms")
        lines += ["", f"**{size}** body: {entry['matrices']} matrices, {entry['parameters'] / 1e6:.1f}M parameters, "
                  f"F={FREQUENCY}, fp32", "",
                  "| optimizer | mean ms/step | median (no refresh) | max (refresh) | mean × fused AdamW "
                  "| state MiB | peak MiB | sync-free |", "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | — | — | — | — | — | — | {r['error']} |")
                continue
            ratio = f"{r['mean_ms'] / fused:.2f}" if fused else "—"
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "—"
            sync = {None: "—", True: "yes"}.get(r["sync_free"], r["sync_free"])
            if r.get("fallbacks"):  # refreshes that paid for Householder QR after CholeskyQR
                sync = f"{sync}; {r['fallbacks']} QR fallbacks"
            if "graphs" in r:  # compiling frees and caches memory of its own: the memory columns would mislead
                sync = (f"{sync}; {r['graphs']} graphs, {r['graph_breaks']} breaks, "
                        f"{r.get('cudagraph_skips', 0)} CUDA-graph skips, warm-up {r.get('warmup_s', math.nan):.0f} s")
                r = dict(r, state_mib=math.nan)
                peak = "—"
            lines.append(f"| {name} | {r['mean_ms']:.2f} | {r['median_ms']:.2f} | {r['max_ms']:.1f} | {ratio} | "
                         f"{'—' if math.isnan(r['state_mib']) else format(r['state_mib'], '.0f')} | {peak} | {sync} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["85M"], choices=list(BODIES))
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help="names as listed by --list (default: every one of ours and torch's, and the peers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=FREQUENCY + 2, help="untimed steps (past the first refresh)")
    parser.add_argument("--periods", type=int, default=3, help="timed refresh periods of F steps")
    parser.add_argument("--gradient-sets", type=int, default=GRADIENT_SETS,
                        help=f"pre-drawn gradients, taken in turn (default {GRADIENT_SETS}: full-rank factors, as "
                             "with fresh gradients; the results before 2026-12-07 used 2)")
    parser.add_argument("--spectrum", choices=SPECTRA, default="flat",
                        help="the gradients' entries: Gaussian (flat) or scaled over four decades by rows and "
                             "columns (decaying: ill-conditioned factors, as in training)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (updated per row)")
    parser.add_argument("--list", action="store_true", help="list the optimizer names and exit")
    args = parser.parse_args(argv)
    names = list(optimizers())
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.optimizers or [n for n in names if not n.startswith("heavyball") and not n.endswith("compiled")]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; --list shows the names")
    if args.gradient_sets < 1:
        parser.error("--gradient-sets must be at least 1")
    results = run(args.sizes, chosen, torch.device(args.device), args.warmup, args.periods, args.out,
                  args.gradient_sets, args.spectrum)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
