"""precond: matrix-preconditioned optimizers for PyTorch on one engine."""

from .engine import BlockEngine
from .eshampoo import EShampoo
from .refresh import EigenbasisRefresh
from .shampoo import Shampoo
from .soap import SOAP

__all__ = ["BlockEngine", "EShampoo", "EigenbasisRefresh", "SOAP", "Shampoo"]
__version__ = "0.1.0"
