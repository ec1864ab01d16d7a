"""The preconditioner components as an extension point: a new Kronecker method is one component and a
one-line assembly, and the shared step calls the component's phases when and as its protocol says."""

from __future__ import annotations

import torch

import precond
from precond.preconditioners import (DiagonalCurvature, EigenbasisAdam, InverseRoots, KLEigenbasisAdam,
                                     KroneckerPreconditioner, MatrixPreconditioner)
from precond.registry import OPTIMIZERS


class Recording(InverseRoots):
    """Shampoo's roots, recording the steps at which each phase ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[int]] = {"statistics": [], "refresh": [], "observe": [], "direction": []}

    def statistics(self, bucket, grads):
        self.calls["statistics"].append(bucket.calls)
        return super().statistics(bucket, grads)

    def refresh(self, bucket, bias2, ok, group):
        self.calls["refresh"].append(bucket.calls)
        super().refresh(bucket, bias2, ok, group)

    def observe(self, bucket, grads, bias2, ok, group):
        self.calls["observe"].append(bucket.calls)

    def direction(self, bucket, m_hat, bias2, group):
        self.calls["direction"].append(bucket.calls)
        return super().direction(bucket, m_hat, bias2, group)


class Unrefreshed(KroneckerPreconditioner):
    """Roots that stay the identity: the method is then bias-corrected momentum SGD."""

    def refresh(self, bucket, bias2, ok, group):
        pass

    def direction(self, bucket, m_hat, bias2, group):
        return m_hat


def assembled(component):
    class Assembly(precond.Shampoo):
        def _make_preconditioner(self):
            return component
    return Assembly


def test_the_shared_step_calls_each_phase_on_its_schedule():
    component = Recording()
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    opt = assembled(component)([p], lr=0.1, betas=(0.9, 0.99), precondition_frequency=3, grafting="adam",
                               start_preconditioning_step=3)
    for _ in range(7):
        p.grad = torch.randn(6, 5, dtype=torch.float64)
        opt.step()
    every = list(range(1, 8))
    assert component.calls["statistics"] == every and component.calls["observe"] == every
    assert component.calls["refresh"] == [3, 6]
    assert component.calls["direction"] == [3, 4, 5, 6, 7]  # before the start, grafting's method alone


def test_a_new_component_is_a_working_optimizer_checked_against_its_formula():
    beta1, lr = 0.9, 0.05
    torch.manual_seed(0)
    W0 = torch.randn(4, 3, 2, dtype=torch.float64)
    grads = [torch.randn(4, 3, 2, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(W0.clone())
    opt = assembled(Unrefreshed())([p], lr=lr, betas=(beta1, 0.999), precondition_frequency=1)
    W, m = W0.clone(), torch.zeros_like(W0)
    for t, G in enumerate(grads, start=1):
        p.grad = G.clone()
        opt.step()
        m = beta1 * m + (1 - beta1) * G
        W = W - lr * m / (1 - beta1 ** t)
        torch.testing.assert_close(p.detach(), W, rtol=1e-13, atol=1e-15)
    assert isinstance(opt.preconditioner, Unrefreshed)


def test_every_preconditioned_optimizer_runs_a_component():
    kinds = {name: type(entry.cls([torch.nn.Parameter(torch.zeros(3, 2))]).__dict__.get("preconditioner"))
             for name, entry in OPTIMIZERS.items()}
    for name in ("Shampoo", "KLShampoo", "EShampoo"):
        assert issubclass(kinds[name], KroneckerPreconditioner), name
    for name in ("Muon", "ASGO"):
        assert issubclass(kinds[name], MatrixPreconditioner), name
    assert kinds["Sophia"] is DiagonalCurvature and kinds["SOAP"] is EigenbasisAdam
    assert kinds["KLSOAP"] is KLEigenbasisAdam
