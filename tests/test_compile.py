"""``torch.compile(opt.step)``: a step that refreshes nothing traces whole (no graph break) and once (no
recompile per step), and computes what the eager step computes. ``aot_eager`` keeps the test free of a C
compiler; the inductor timings are in the step-time benchmark (``... compiled`` rows).

``step()`` is a frame of its own (``torch._dynamo.disable(recursive=False)``) around ``_step``, which is what
compiles: dynamo specialises the integers of an optimizer reached through a global, as in a compiled training
function that calls ``opt.step()``, so inlined there the step recompiled at every step. The one graph break
that boundary makes is the only one allowed."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import precond

SHAPES = [(24, 16), (16,), (40, 12), (3, 4, 5)]


def params_and_grads(steps):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    grads[3][1][0] = float("nan")  # skipped alike by both: the guards live in the traced step too
    return init, grads


def trajectory(make, init, grads, compile_step, rate=None, made=None, from_first=False):
    """The weights after a step per gradient set; ``rate(i)``, if given, is written into every group's ``lr``
    before step ``i`` (as a scheduler does); ``made`` (a list) receives the optimizer. The first step, which
    creates the state, runs eagerly unless ``from_first``."""
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    if made is not None:
        made.append(opt)
    step = torch.compile(opt.step, backend="aot_eager") if compile_step else opt.step
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        for group in opt.param_groups if rate is not None else ():
            group["lr"] = rate(i)
        (opt.step if i == 0 and not from_first else step)()
    return [p.detach() for p in params]


def kronecker(frequency: int) -> dict:
    """The Kronecker-factored optimizers, refreshing every ``frequency`` steps."""
    return {
        "SOAP": lambda ps: precond.SOAP(ps, lr=1e-2, precondition_frequency=frequency),
        "KLSOAP": lambda ps: precond.KLSOAP(ps, lr=1e-2, precondition_frequency=frequency),
        "Shampoo": lambda ps: precond.Shampoo(ps, lr=1e-2, precondition_frequency=frequency, grafting="adam",
                                              max_preconditioner_dim=16),
        "KLShampoo": lambda ps: precond.KLShampoo(ps, lr=1e-2, precondition_frequency=frequency, grafting="adam",
                                                  max_preconditioner_dim=16),
        "EShampoo": lambda ps: precond.EShampoo(ps, lr=1e-2, precondition_frequency=frequency),
    }


FACTORIES = {
    "AdamW": lambda ps: precond.AdamW(ps, lr=1e-2, weight_decay=0.1),
    **kronecker(100),  # no refresh within the tests' steps
    "Sophia": lambda ps: precond.Sophia(ps, lr=1e-2),
    "Muon": lambda ps: precond.Muon(ps, lr=1e-2, ns_dtype="float32"),
    "ASGO": lambda ps: precond.ASGO(ps, lr=1e-2, precondition_frequency=100),
}
OPTIMIZERS = pytest.mark.parametrize("make", list(FACTORIES.values()), ids=list(FACTORIES))
# The large-batch benchmark's settings: a refinement every step, under the TF32 flag that step() sets (read
# inside the traced step, the flag broke the graph and dynamo then ran each bucket's frame eagerly)
SETTINGS = {
    "SOAP-F1-tf32": lambda ps: precond.SOAP(ps, lr=1e-2, precondition_frequency=1, refresh_method="refine",
                                            tf32=True),
    "EShampoo-F1-tf32": lambda ps: precond.EShampoo(ps, lr=1e-2, precondition_frequency=1,
                                                    refresh_method="refine", tf32=True),
    # Muon's iteration through the Gram matrix (a Python loop over its steps and restarts, unrolled when traced)
    "Muon-gram": lambda ps: precond.Muon(ps, lr=1e-2, ns_dtype="float32", ns_algorithm="gram_newton_schulz"),
}


def breaks_inside_the_step() -> dict:
    """Graph breaks other than the step's own frame boundary (see the module docstring)."""
    return {k: v for k, v in counters["graph_break"].items() if "BlockEngine.step" not in k}


@pytest.mark.parametrize("make", [*FACTORIES.values(), *SETTINGS.values()], ids=[*FACTORIES, *SETTINGS])
def test_compiled_step_has_no_graph_break_no_recompile_and_equals_eager(make):
    torch._dynamo.reset()
    counters.clear()
    init, grads = params_and_grads(6)
    compiled = trajectory(make, init, grads, compile_step=True)
    assert breaks_inside_the_step() == {}
    # one graph, plus at most one re-trace at the second compiled call (a counter turning dynamic)
    assert counters["stats"]["unique_graphs"] <= 2
    eager = trajectory(make, init, grads, compile_step=False)
    for a, b in zip(compiled, eager):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@OPTIMIZERS
def test_no_two_inputs_of_the_compiled_step_share_storage(make):
    """Graph inputs that are views of one tensor, mutated in the step, are merged into a synthetic base by
    AOTAutograd on every call: ~4 ms of host time for GPT-2 small's AdamW, once its step counts were passed
    as views of their stack."""
    torch._dynamo.reset()
    shared: list[list[tuple[int, ...]]] = []

    def backend(gm, example_inputs):
        storages: dict[int, list[tuple[int, ...]]] = {}
        for x in example_inputs:
            if isinstance(x, torch.Tensor):
                storages.setdefault(x.untyped_storage().data_ptr(), []).append(tuple(x.shape))
        shared.extend(shapes for shapes in storages.values() if len(shapes) > 1)
        return gm.forward

    init, grads = params_and_grads(4)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    step = torch.compile(opt.step, backend=backend)
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        (opt.step if i == 0 else step)()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert shared == []


OPTIMIZER = None  # reached through a global, as in a training script


@torch.compile(backend="aot_eager")
def compiled_update(model):
    with torch.no_grad():
        for p in model.parameters():
            p.grad.clamp_(-1.0, 1.0)
    OPTIMIZER.step()


@OPTIMIZERS
def test_a_compiled_function_calling_step_compiles_once(make):
    """Eight steps of a compiled training function: the step's graph is made once, then once more when its
    counters turn dynamic; before, every step recompiled (a guard on the global's step counter) until
    ``recompile_limit`` and then ran eagerly."""
    global OPTIMIZER
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    OPTIMIZER = make(list(model.parameters()))
    x = torch.randn(16, 8)
    model(x).pow(2).mean().backward()
    OPTIMIZER.step()  # the first step creates the state eagerly
    OPTIMIZER.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(8):
        model(x).pow(2).mean().backward()
        compiled_update(model)
        OPTIMIZER.zero_grad()
    assert breaks_inside_the_step() == {}
    # the clipping before the step, and the step traced at most twice
    assert counters["stats"]["unique_graphs"] <= 3, counters["stats"]["unique_graphs"]
    assert "recompile_limit" not in str(dict(counters["misc"])).lower()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", [*FACTORIES, *SETTINGS])
def test_a_step_compiled_from_its_first_call_equals_eager(name):
    """The plan is built in an eager frame before the step is traced: dynamo refuses to trace
    ``mark_static_address`` (a step compiled from its first call raised there), and a first read of a bucket's
    cached properties inside the trace sent the whole step back to eager. ASGO's first step computes its first
    root by eigh, which reads its failures on the host: traced, the step broke inside its loop of buckets and
    torch 2.13 failed creating a shape guard (IndexError) while compiling the parts; the step now runs eagerly."""
    make = {**FACTORIES, **SETTINGS}[name]
    torch._dynamo.reset()
    init, grads = params_and_grads(4)
    compiled = trajectory(make, init, grads, compile_step=True, from_first=True)
    eager = trajectory(make, init, grads, compile_step=False)
    for a, b in zip(compiled, eager):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [*FACTORIES.values(), *SETTINGS.values()], ids=[*FACTORIES, *SETTINGS])
def test_every_tensor_the_step_writes_has_a_fixed_address_for_cuda_graphs(make):
    """torch.compile's "reduce-overhead" replays a graph as a CUDA graph only if every input it writes in place
    is static (a parameter, or marked with ``mark_static_address``); one other, and inductor skips the CUDA
    graph and runs plain kernels. Read from each graph's own metadata: the state stacks, the fused path's
    per-parameter moments and the running count of skipped blocks are all static (the count and the fused
    moments were not: every optimizer's compiled step was skipped)."""
    from torch._dynamo.backends.common import aot_autograd

    written = []  # per graph: how many inputs it writes, and which of them are not static

    def inspect(gm, example_inputs):
        meta = torch._guards.TracingContext.try_get().fw_metadata
        static = set(meta.static_input_indices)
        mutated = [i for i, info in enumerate(meta.input_info) if info.mutates_data or info.mutates_metadata]
        written.append((len(mutated), [i for i in mutated if i not in static]))
        return gm

    torch._dynamo.reset()
    init, grads = params_and_grads(4)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    step = torch.compile(opt.step, backend=aot_autograd(fw_compiler=inspect))
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        (opt.step if i == 0 else step)()  # the first step creates the state eagerly
    assert written and all(count > 0 for count, _ in written)  # the graphs write their state in place
    assert all(not moving for _, moving in written), written


@pytest.mark.parametrize("make", [*FACTORIES.values(), *SETTINGS.values()], ids=[*FACTORIES, *SETTINGS])
def test_a_rate_changed_at_every_step_compiles_once(make):
    """A scheduler writes a new Python ``lr`` into the groups before every step. The compiled step reads it as
    a number in the graph, not a constant to guard on: before, each new rate recompiled the step, until
    dynamo's recompile limit sent it back to eager."""
    torch._dynamo.reset()
    counters.clear()
    init, grads = params_and_grads(8)
    warmup = lambda i: 1e-2 * (i + 1) / len(grads)  # noqa: E731  (as LambdaLR writes it)
    compiled = trajectory(make, init, grads, compile_step=True, rate=warmup)
    assert counters["stats"]["unique_graphs"] <= 2
    for a, b in zip(compiled, trajectory(make, init, grads, compile_step=False, rate=warmup)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Refreshing every other step: the refreshes that read a flag on the host (eigh's failures, CholeskyQR's fallback)
REFRESHING = {**kronecker(2),
              "ASGO": lambda ps: precond.ASGO(ps, lr=1e-2, precondition_frequency=2)}  # roots by eigh


@pytest.mark.parametrize("make", list(REFRESHING.values()), ids=list(REFRESHING))
def test_refresh_steps_run_eagerly_and_the_others_trace_once(make):
    """A refresh that reads the host runs its whole step eagerly: no graph break inside the traced steps and
    no re-trace per refresh (traced, SOAP's refreshes had made 62 graphs and 24 breaks over these 12 steps,
    and EShampoo's had failed inside dynamo on torch 2.13)."""
    torch._dynamo.reset()
    counters.clear()
    init, grads = params_and_grads(12)
    compiled = trajectory(make, init, grads, compile_step=True)
    assert breaks_inside_the_step() == {}
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # the steps between refreshes are still traced
    eager = trajectory(make, init, grads, compile_step=False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["SOAP-F1-tf32", "EShampoo-F1-tf32"])
def test_the_matmul_only_refinement_is_traced_at_every_step(name):
    """``refine`` reads nothing on the host: refreshing at every step, the step is traced, not run eagerly."""
    torch._dynamo.reset()
    counters.clear()
    init, grads = params_and_grads(6)
    trajectory(SETTINGS[name], init, grads, compile_step=True)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 and breaks_inside_the_step() == {}
