"""KL-SOAP: SOAP whose Kronecker factors are estimated by KL minimisation (Lin et al. 2025)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .preconditioners import KLEigenbasisAdam
from .soap import SOAP
from .validation import check_choice, check_in, check_positive

__all__ = ["KLSOAP"]


class KLSOAP(SOAP):
    r"""KL-SOAP (Lin et al. 2025, "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", arXiv:2509.03378), as the authors' ``KLOpt(using_klsoap=True)`` computes it.

    SOAP (see :class:`SOAP`: Adam's moments in the factors' eigenbasis, the first step statistics only) with
    the factors of KL-Shampoo: each factor's statistic is the gradient whitened along the *other* dims by their
    current bases and eigenvalue estimates, and those estimates follow the projected gradient every step.
    Per preconditioned dim ``i`` of a block of ``N`` entries, with ``s_j = d_j^{-1/2}``,
    ``W_j = Q_j \operatorname{diag}(s_j)`` and ``P = G ×_1 Q_1ᵀ ⋯`` (all from before the step):

    .. math::
        L_i &\leftarrow \beta_s L_i + (1-\beta_s)\,\tfrac{n_i}{N}\,\tilde G_{(i)}\tilde G_{(i)}^\top,\qquad
            \tilde G = G \times_{j\ne i} W_j^\top \\
        d_i &\leftarrow \beta_s d_i + (1-\beta_s)\operatorname{mean}_{\ne i}
            \big((P \times_{j\ne i} \operatorname{diag}(s_j))^{\odot 2}\big) \\
        \text{every } F:\ & Q_i \leftarrow \operatorname{qr}(L_i Q_i)\ \text{(columns not re-sorted)},\
            M \text{ re-projected}

    ``d_i`` starts at ``init_factor`` and ``s_i`` is clamped to ``max(10, min(n_i, max_clamp_value))``
    (``None``: no clamp). The first step's statistic is ``(1-β_s)(n_i/N) G_(i)G_(i)ᵀ``, its bases by eigh.

    Arguments are :class:`SOAP`'s, with ``correct_bias=False`` by default (the authors' Adam has none) and
    the eigenbasis refresh fixed to the authors' unsorted power-QR (``refresh_method`` stays
    ``"power_qr"``, ``refresh_tolerance`` 0). The authors' code handles 2-D and 3-D tensors; this class any
    order (1-D with ``precondition_1d``). Their 3-D update reuses some estimates already updated within the
    same step; here every statistic of a step reads the values from before it (equal in 2-D, compared by
    ``scripts/compare_references.py``).
    """

    _group_rules = {**SOAP._group_rules,
                    "refresh_method": lambda name, value: check_choice(name, value, ("power_qr",)),
                    "refresh_tolerance": lambda name, value: check_in(name, value, 0.0, 0.0)}

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95), *,
                 init_factor: float = 0.1, max_clamp_value: float | None = 4000.0, correct_bias: bool = False,
                 **soap_arguments: Any) -> None:
        check_positive("init_factor", init_factor)
        if max_clamp_value is not None:
            check_positive("max_clamp_value", max_clamp_value)
        self._kl = (init_factor, max_clamp_value)
        super().__init__(params, lr, betas, correct_bias=correct_bias, **soap_arguments)

    def _make_preconditioner(self) -> KLEigenbasisAdam:
        return KLEigenbasisAdam(*self._kl)
