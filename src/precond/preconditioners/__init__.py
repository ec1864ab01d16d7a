"""Preconditioners as parts: what a method keeps beside the gradient, and how it turns a gradient into a direction.

A public optimizer is an assembly: its arguments and their checks, its docstring, and the component it runs.

- Kronecker-factored (:class:`KroneckerPreconditioner`): :class:`~precond.Shampoo` runs :class:`InverseRoots`,
  :class:`~precond.KLShampoo` :class:`KLInverseRoots`, :class:`~precond.EShampoo` :class:`CorrectedEigenvalues`;
  the step they share (factor statistics, first moment, grafting, refresh schedule) is
  :class:`precond.shampoo.ShampooFamily`'s.
- On weight matrices (:class:`MatrixPreconditioner`): :class:`~precond.Muon` runs :class:`Orthogonalized`,
  :class:`~precond.ASGO` :class:`OneSidedRoot`; the routing of the other parameters to AdamW is
  :class:`precond.matrix.MatrixOptimizer`'s.
"""

from .base import KroneckerPreconditioner, MatrixPreconditioner
from .eigenvalues import CorrectedEigenvalues
from .one_sided import OneSidedRoot
from .orthogonal import NS_DTYPES, Orthogonalized
from .roots import InverseRoots, KLInverseRoots

__all__ = ["NS_DTYPES", "CorrectedEigenvalues", "InverseRoots", "KLInverseRoots", "KroneckerPreconditioner",
           "MatrixPreconditioner", "OneSidedRoot", "Orthogonalized"]
