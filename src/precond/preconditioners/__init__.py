"""Preconditioners as parts: what a Kronecker-factored method computes from its factors and how it applies it.

A public optimizer (:class:`~precond.Shampoo`, :class:`~precond.EShampoo`, :class:`~precond.KLShampoo`) is an
assembly: its arguments and their checks, its docstring, and the component below that it runs. The shared
step (factor statistics, first moment, grafting, refresh schedule) is :class:`precond.shampoo.ShampooFamily`'s.
"""

from .base import KroneckerPreconditioner
from .eigenvalues import CorrectedEigenvalues
from .roots import InverseRoots, KLInverseRoots

__all__ = ["CorrectedEigenvalues", "InverseRoots", "KLInverseRoots", "KroneckerPreconditioner"]
