"""Compare precond's Shampoo, EShampoo and SOAP with the public reference implementations.

The references are not part of precond: put their sources in the git-ignored folder ``.peers/``
(``.peers/optimizers`` = facebookresearch/optimizers, ``.peers/SOAP`` = nikhilvyas/SOAP,
``.peers/KL-Methods`` = yorkerlin/KL-Methods, the KL-SOAP authors' code; the GPA authors' ``GPAAdamW`` is
``.peers/optimizers/gpa``; ``.peers/gram-newton-schulz`` = NoahAmsel/gram-newton-schulz, for Muon's
iteration), then run

    python scripts/compare_references.py

Every case runs both optimizers in float64 on the same parameters and the same fixed sequence of random
gradients for 30 steps and prints the relative difference of the parameters,
``max_p ‖W_ours - W_ref‖ / ‖W_ref‖``, and of the displacement, ``max_p ‖ΔW_ours - ΔW_ref‖ / ‖ΔW_ref‖``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import types
from pathlib import Path

import torch

import precond
import precond.averaging

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(7,), (6, 5), (3, 4, 5), (4, 3, 2, 2), (40, 12)]  # (40, 12): a dim longer than the block size
STEPS = 30


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def make_grads(seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]


def run(make_optimizer, init: list[torch.Tensor], grads) -> list[torch.Tensor]:
    """The parameters after the steps (for an iterate-averaging optimizer: the averaged ones, after eval())."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    if hasattr(opt, "eval"):  # ours with averaging, and Distributed Shampoo (a no-op there without it)
        opt.eval()
    return [p.detach() for p in params]


def differences(ours, ref, init) -> tuple[float, float]:
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, ref))
    disp = max(float((a - b).norm() / (b - c).norm()) for a, b, c in zip(ours, ref, init))
    return rel, disp


def shampoo_cases():
    sys.path.insert(0, str(ROOT / ".peers" / "optimizers"))
    import distributed_shampoo as ds

    f64 = dict(factor_matrix_dtype=torch.float64)
    root_inv = ds.RootInvShampooPreconditionerConfig(inv_factor_matrix_dtype=torch.float64, **f64)
    eigen = ds.EigenvalueCorrectedShampooPreconditionerConfig(
        factor_matrix_eigenvectors_dtype=torch.float64, corrected_eigenvalues_dtype=torch.float64, **f64)
    graftings = {
        None: None,
        "sgd": ds.SGDPreconditionerConfig(),
        "adagrad": ds.AdaGradPreconditionerConfig(epsilon=1e-10),
        "rmsprop": ds.RMSpropPreconditionerConfig(beta2=0.99, epsilon=1e-10),
        "adam": ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-10),
    }
    # lr = 2**-7 is exact in float32: Distributed Shampoo keeps lr in a float32 tensor.
    common = dict(lr=2.0**-7, epsilon=1e-12, weight_decay=1e-2, max_preconditioner_dim=16)
    cases = []
    for betas in [(0.9, 1.0), (0.9, 0.999)]:
        for grafting, config in graftings.items():
            for freq, start in [(1, -1), (3, 5)]:
                if grafting is None and start != -1:
                    continue
                hp = dict(common, betas=betas, precondition_frequency=freq, start_preconditioning_step=start)
                name = f"Shampoo betas={betas} grafting={grafting} F={freq} start={start}"
                ours = lambda ps, hp=hp, grafting=grafting: precond.Shampoo(
                    ps, grafting=grafting, precondition_1d=True, **hp)
                ref = lambda ps, hp=hp, config=config: ds.DistributedShampoo(
                    ps, grafting_config=config, preconditioner_config=root_inv, **hp)
                cases.append((name, ours, ref))
    # With epsilon = 1e-12 and rank-deficient early factors, directions where both the first moment and
    # the corrected eigenvalues are zero up to round-off get round-off / epsilon in either implementation;
    # epsilon = 1e-8 shows the agreement without that amplification.
    for epsilon in [1e-12, 1e-8]:
        for grafting in [None, "adam"]:
            for freq in [1, 4]:
                hp = dict(common, epsilon=epsilon, betas=(0.9, 0.999), precondition_frequency=freq,
                          start_preconditioning_step=-1)
                name = f"EShampoo epsilon={epsilon} grafting={grafting} F={freq}"
                ours = lambda ps, hp=hp, grafting=grafting: precond.EShampoo(
                    ps, grafting=grafting, precondition_1d=True, **hp)
                ref = lambda ps, hp=hp, config=graftings[grafting]: ds.DistributedShampoo(
                    ps, grafting_config=config, preconditioner_config=eigen, **hp)
                cases.append((name, ours, ref))
    # KL-Shampoo, root-inverse and eigendecomposed forms of Distributed Shampoo.
    kl_forms = {
        "root-inverse": ds.RootInvKLShampooPreconditionerConfig(inv_factor_matrix_dtype=torch.float64, **f64),
        "eigendecomposed": ds.EigendecomposedKLShampooPreconditionerConfig(
            factor_matrix_eigenvectors_dtype=torch.float64, factor_matrix_eigenvalues_dtype=torch.float64, **f64),
    }
    # KL-Shampoo preconditions each statistic by the other factors' roots, up to epsilon**(-1/4) = 1e3 along
    # a rank-deficient factor's null space at epsilon = 1e-12, which amplifies round-off; 1e-6 shows the
    # agreement without it.
    for form, config in kl_forms.items():
        for grafting, betas, freq, epsilon in [(None, (0.9, 1.0), 1, 1e-12), (None, (0.9, 1.0), 1, 1e-6),
                                               ("adam", (0.9, 0.999), 3, 1e-12)]:
            hp = dict(common, epsilon=epsilon, betas=betas, precondition_frequency=freq,
                      start_preconditioning_step=freq)
            name = f"KLShampoo vs {form} epsilon={epsilon} betas={betas} grafting={grafting} F={freq}"
            ours = lambda ps, hp=hp, grafting=grafting: precond.KLShampoo(
                ps, grafting=grafting, precondition_1d=True, **hp)
            ref = lambda ps, hp=hp, config=config, grafting=grafting: ds.DistributedShampoo(
                ps, grafting_config=graftings[grafting], preconditioner_config=config, **hp)
            cases.append((name, ours, ref))
    # Iterate averaging around Shampoo (Adam grafting). Distributed Shampoo computes the coefficients, 1/mu_y
    # and the decay factor 1 - lr*wd in float32 tensors: so mu_x, mu_y and wd are chosen exact there
    # (2**-3·2**-7 and 1 - 2**-10 are), and only Schedule-Free's mu_x = 1 - 1/t rounds to float32.
    hp = dict(common, weight_decay=2.0**-3, betas=(0.9, 0.999), precondition_frequency=3, start_preconditioning_step=3)
    averaging = {
        "GPA mu_x=0.875 mu_y=0.5": (lambda o: precond.averaging.PrimalAveraging(o, 0.875, 0.5),
                                    ds.GeneralizedPrimalAveragingConfig(eval_interp_coeff=0.875,
                                                                        train_interp_coeff=0.5)),
        "GPA mu_x=0.5 mu_y=1 (heavy-ball)": (lambda o: precond.averaging.PrimalAveraging(o, 0.5, 1.0),
                                             ds.GeneralizedPrimalAveragingConfig(eval_interp_coeff=0.5,
                                                                                 train_interp_coeff=1.0)),
        "Schedule-Free mu_y=0.5 p=2": (lambda o: precond.averaging.ScheduleFree(o, 0.5, 2),
                                       ds.ScheduleFreeConfig(train_interp_coeff=0.5, eval_coeff_lr_power=2)),
    }
    for label, (wrap, config) in averaging.items():
        ours = lambda ps, wrap=wrap: wrap(precond.Shampoo(ps, grafting="adam", precondition_1d=True, **hp))
        ref = lambda ps, config=config: ds.DistributedShampoo(ps, grafting_config=graftings["adam"],
                                                              preconditioner_config=root_inv,
                                                              iterate_averaging_config=config, **hp)
        cases.append((f"Shampoo + {label}, evaluated at x", ours, ref))
    return cases


def load_patched(path: str, replacements: dict[str, str]) -> types.ModuleType:
    """A peer's source file under ``.peers/``, run as a module after the textual ``replacements`` (each must
    occur: a peer that changed is an error, not a silent float32 comparison)."""
    source = (ROOT / ".peers" / path).read_text()
    for old, new in replacements.items():
        if old not in source:
            raise RuntimeError(f"{path} no longer contains {old!r}: update the comparison")
        source = source.replace(old, new)
    module = types.ModuleType(f"reference_{Path(path).stem}")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def load_reference_soap(float64_internals: bool):
    """The reference SOAP module; ``float64_internals`` swaps its hard-coded float32 casts for float64
    so that the comparison measures the algorithm, not float32 rounding."""
    casts = {"m.data.float()": "m.data.double()", "o.data.float()": "o.data.double()",
             "!= torch.float:": "!= torch.float64:"}
    return load_patched("SOAP/soap.py", casts if float64_internals else {}).SOAP


def soap_cases():
    cases = []
    for internals in [True, False]:
        Ref = load_reference_soap(internals)
        for options in [dict(), dict(precondition_1d=True, merge_dims=True, max_precond_dim=16),
                        dict(normalize_grads=True, shampoo_beta=0.9, precondition_frequency=3)]:
            hp = dict(dict(lr=3e-3, weight_decay=0.01, precondition_frequency=10), **options)
            name = f"SOAP {options or 'defaults'} ref-internals={'float64' if internals else 'float32'}"
            cases.append((name, lambda ps, hp=hp: precond.SOAP(ps, **hp), lambda ps, hp=hp, Ref=Ref: Ref(ps, **hp)))
    return cases


def load_kl_soap_reference():
    """The KL-SOAP authors' ``KLOpt`` (``using_klsoap=True``), in float64 throughout: their eigh and QR cast to
    float32, which these two overrides leave out, and their ``torch.compile`` is turned off. Also a variant whose
    3-D update writes its eigenvalue estimates only once every statistic of the step has read them (the
    order of this library's KLSOAP and of their 2-D update)."""
    torch._dynamo.config.disable = True
    sys.path.insert(0, str(ROOT / ".peers" / "KL-Methods"))
    from optim.kl_opt import KLOpt

    class Float64KLOpt(KLOpt):
        def __init__(self, params, **hp):
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
                super().__init__(params, using_klsoap=True, cast_dtype=torch.float64, **hp)

        def get_orthogonal_matrix(self, mat):
            bases = [torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], dtype=m.dtype))[1].flip(1) for m in mat]
            return bases, [torch.full((Q.shape[0],), self.init_factor ** -0.5, dtype=Q.dtype) for Q in bases]

        def get_orthogonal_matrix_QR(self, state):
            return [torch.linalg.qr(m @ o)[0] for m, o in zip(state["GG"], state["Q"])]

    class Deferred(Float64KLOpt):
        pending = None  # inside a 3-D update: the estimates written at its end

        def update_eigen_value(self, state, diag, idx, *args):
            before = state["eigen_sqrt_inv"][idx]
            super().update_eigen_value(state, diag, idx, *args)
            if self.pending is not None:
                self.pending.append((idx, state["eigen_sqrt_inv"][idx]))
                state["eigen_sqrt_inv"][idx] = before

        def update_3d_preconditioner(self, grad, state, *args):
            self.pending = []
            super().update_3d_preconditioner(grad, state, *args)
            for idx, value in self.pending:
                state["eigen_sqrt_inv"][idx] = value
            self.pending = None

    return Float64KLOpt, Deferred


def kl_soap_cases():
    """KL-SOAP against its authors' code, on 2-D and 3-D tensors (theirs takes no other order) whose first
    factors have at most one null direction (a wider null space has no unique first basis)."""
    reference, deferred = load_kl_soap_reference()
    g = torch.Generator().manual_seed(2)
    cases = []
    for order, shapes, refs in [("2-D", [(6, 5), (4, 4)], [("authors' code", reference)]),
                                ("3-D", [(3, 4, 5)], [("authors' code", reference),
                                                      ("authors' code, estimates written last", deferred)])]:
        init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
        for options in [dict(), dict(precondition_frequency=3, normalize_grads=True, shampoo_beta=0.9)]:
            hp = dict(dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=1), **options)
            for label, ref in refs:
                cases.append((f"KLSOAP {order} {options or 'F=1'} vs {label}", lambda ps, hp=hp: precond.KLSOAP(ps, **hp),
                              lambda ps, hp=hp, ref=ref: ref(ps, **hp), init, grads))
    return cases


def gpa_cases():
    """AdamW under GPA against the GPA authors' ``GPAAdamW`` (facebookresearch/optimizers' ``gpa``), at
    Distributed Shampoo's coefficients and at theirs, with Adam's first moment on and off."""
    sys.path.insert(0, str(ROOT / ".peers" / "optimizers"))  # for its own `gpa.gpa_types` import
    # its moments are float32 whatever the parameters' dtype: float64 here, to compare the algorithm
    GPAAdamW = load_patched("optimizers/gpa/gpa_adamw.py", {
        "p, dtype=torch.float32, memory_format": "p, dtype=p.dtype, memory_format"}).GPAAdamW

    def theirs(ps, beta1, mu_x, mu_y):
        opt = GPAAdamW(ps, lr=3e-3, beta1=beta1, beta2=0.95, eps=1e-8, weight_decay=0.1,
                       eval_interp_coeff=mu_x, train_interp_coeff=mu_y)
        opt.train()
        return opt

    cases = []
    for beta1, mu_x, mu_y in [(0.9, 0.9, 0.8), (0.0, 0.9, 0.8), (0.9, 0.9967, 0.7)]:
        ours = lambda ps, b=beta1, x=mu_x, y=mu_y: precond.averaging.PrimalAveraging(
            precond.AdamW(ps, lr=3e-3, betas=(b, 0.95), eps=1e-8, weight_decay=0.1), x, y)
        ref = lambda ps, b=beta1, x=mu_x, y=mu_y: theirs(ps, b, x, y)
        cases.append((f"AdamW + GPA mu_x={mu_x} mu_y={mu_y} beta1={beta1} vs GPAAdamW, evaluated at x", ours, ref))
    return cases


def gram_newton_schulz_table() -> None:
    """Our Newton–Schulz iterations against the Gram Newton–Schulz authors' (``.peers/gram-newton-schulz`` =
    NoahAmsel/gram-newton-schulz, its torch path: no custom kernels, no compile): in float64, their
    iterations on the matrix normalised as they do; in float16, their whole call (normalised in float32,
    cast to float16) against ours in float16. Muon's coefficients (one triple) and Polar Express's (one per
    step, theirs), restarting after the 2nd step."""
    sys.path.insert(0, str(ROOT / ".peers" / "gram-newton-schulz"))
    from gram_newton_schulz import POLAR_EXPRESS_COEFFICIENTS, GramNewtonSchulz

    from precond.newton_schulz import gram_newton_schulz, newton_schulz
    print("| iteration | coefficients | shape | dtype | rel. diff |\n|---|---|---|---|---|")
    for label, coefficients in (("Muon's", [(3.4445, -4.7750, 2.0315)] * 5),
                                ("Polar Express", [tuple(c) for c in POLAR_EXPRESS_COEFFICIENTS])):
        theirs = GramNewtonSchulz(ns_use_kernels=False, ns_coefficients=coefficients,
                                  gram_newton_schulz_reset_iterations=[2], compile_kwargs=None)
        for shape in [(64, 256), (256, 64), (3, 48, 160)]:
            G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            wide = G.mT if shape[-2] > shape[-1] else G
            # normalised as ours (and torch.optim.Muon) do, by max(‖G‖, ε): theirs divide by ‖G‖ + ε, a
            # relative ε/‖G‖ (1e-9 here) that the iteration's result keeps
            X = (wide / wide.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)).reshape(-1, *wide.shape[-2:])
            for name, ours, ref in (
                    ("Gram", gram_newton_schulz(G, 5, coefficients, 1e-7, torch.float64),
                     theirs._gram_newton_schulz(X.clone())),
                    ("standard", newton_schulz(G, 5, coefficients, 1e-7, torch.float64),
                     theirs._standard_newton_schulz(X.clone()))):
                ref = ref.reshape(wide.shape)
                ref = ref.mT if shape[-2] > shape[-1] else ref
                print(f"| {name} | {label} | {shape} | float64 | {float((ours - ref).norm() / ref.norm()):.2e} |")
            with contextlib.redirect_stdout(io.StringIO()):  # its divergence check prints
                ref = theirs(G.float()).double()
            ours = gram_newton_schulz(G.float(), 5, coefficients, 1e-7, torch.float16).double()
            print(f"| Gram | {label} | {shape} | float16 | {float((ours - ref).norm() / ref.norm()):.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["shampoo", "soap", "klsoap", "gpa", "gram"], default=None)
    args = parser.parse_args()
    if args.only in (None, "gram"):
        gram_newton_schulz_table()
        if args.only == "gram":
            return
    # Both references create some scalars and buffers with the default dtype (Distributed Shampoo's bias
    # corrections, the reference SOAP's factors): float64 there too, or they round to float32.
    torch.set_default_dtype(torch.float64)
    init, grads = make_params(), make_grads()
    cases = []
    if args.only in (None, "shampoo"):
        cases += shampoo_cases()
    if args.only in (None, "soap"):
        cases += soap_cases()
    if args.only in (None, "klsoap"):
        cases += kl_soap_cases()
    if args.only in (None, "gpa"):
        cases += gpa_cases()
    print(f"| case | max rel. diff of W | max rel. diff of ΔW |\n|---|---|---|")
    for name, ours, ref, *own in cases:
        start, steps = own or (init, grads)
        rel, disp = differences(run(ours, start, steps), run(ref, start, steps), start)
        print(f"| {name} | {rel:.2e} | {disp:.2e} |", flush=True)


if __name__ == "__main__":
    main()
