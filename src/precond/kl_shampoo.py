"""KL-Shampoo: Shampoo whose Kronecker factors are estimated by KL minimisation (Lin et al. 2025)."""

from __future__ import annotations

from .preconditioners import KLInverseRoots, KroneckerPreconditioner
from .shampoo import Shampoo
from .validation import check_choice

__all__ = ["KLShampoo"]


class KLShampoo(Shampoo):
    r"""KL-Shampoo (Lin et al. 2025, "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization"), as Distributed Shampoo's ``RootInvKLShampooPreconditionerConfig`` computes it.

    Shampoo (see :class:`Shampoo`) with one change: each factor's statistic is taken from the gradient
    preconditioned along every *other* dim by that dim's current inverse root,

    .. math::
        L_i \leftarrow \beta_2 L_i + (1-\beta_2)\, \tilde G_{(i)} \tilde G_{(i)}^\top,\qquad
        \tilde G = G \times_{j \ne i} R_j,\quad R_j = (\hat L_j + \epsilon I)^{-1/(2k)},

    so that ``L_i`` estimates the covariance of the gradient whitened by the other factors (the KL
    projection of ``E[g gᵀ]`` onto Kronecker products) instead of a plain second moment. ``R_j`` are the
    roots kept from the last refresh (identity before the first), so a step costs ``k(k−1)`` extra
    mode products per block of order ``k``. The preconditioner applies the same roots as Shampoo:
    ``P = \hat M \times_1 R_1 \cdots \times_k R_k`` (with grafting, if set). Distributed Shampoo's
    eigendecomposed form (``EigendecomposedKLShampooPreconditionerConfig``) computes the same roots from
    cached eigenpairs: the two agree up to rounding, and both are compared with this class by
    ``scripts/compare_references.py``.

    Arguments and defaults are :class:`Shampoo`'s; the microbatch bias corrections are not offered
    (``bias_correction`` must stay ``"std"``).
    """

    _group_rules = {**Shampoo._group_rules, "bias_correction": lambda name, v: check_choice(name, v, ("std",))}

    def _make_preconditioner(self) -> KroneckerPreconditioner:
        return KLInverseRoots()
