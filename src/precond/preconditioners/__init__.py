"""Preconditioners as parts: what a method keeps beside the gradient, and how it turns a gradient into a direction.

A public optimizer is an assembly: its arguments and their checks, its docstring, and the component it runs.

- Kronecker-factored (:class:`KroneckerPreconditioner`): :class:`~precond.Shampoo` runs :class:`InverseRoots`,
  :class:`~precond.KLShampoo` :class:`KLInverseRoots`, :class:`~precond.EShampoo` :class:`CorrectedEigenvalues`;
  the step they share (factor statistics, first moment, grafting, refresh schedule) is
  :class:`precond.shampoo.ShampooFamily`'s.
- :class:`~precond.SOAP` runs :class:`EigenbasisAdam` (Adam's moments in the factors' eigenbasis), in the
  reference SOAP's order: its own step, not the Kronecker one above; :class:`~precond.KLSOAP`
  :class:`KLEigenbasisAdam` (the same, with KL-estimated factors).
- On weight matrices (:class:`MatrixPreconditioner`): :class:`~precond.Muon` runs :class:`Orthogonalized`,
  :class:`~precond.ASGO` :class:`OneSidedRoot`; the routing of the other parameters to AdamW is
  :class:`precond.matrix.MatrixOptimizer`'s.
- Elementwise: :class:`~precond.Sophia` runs :class:`DiagonalCurvature` (its curvature estimates and their
  microbatch corrections are the optimizer's); the diagonal methods of grafting (Adam, AdaGrad, RMSprop, SGD)
  are :class:`precond.grafting.Diagonal`.
"""

from .base import KroneckerPreconditioner, MatrixPreconditioner
from .curvature import DiagonalCurvature
from .eigenbasis_adam import EigenbasisAdam
from .eigenvalues import CorrectedEigenvalues
from .kl_eigenbasis_adam import KLEigenbasisAdam
from .one_sided import OneSidedRoot
from .orthogonal import NS_DTYPES, Orthogonalized
from .roots import InverseRoots, KLInverseRoots

__all__ = ["NS_DTYPES", "CorrectedEigenvalues", "DiagonalCurvature", "EigenbasisAdam", "InverseRoots",
           "KLEigenbasisAdam", "KLInverseRoots", "KroneckerPreconditioner", "MatrixPreconditioner", "OneSidedRoot",
           "Orthogonalized"]
