"""precond: matrix-preconditioned optimizers for PyTorch on one engine."""

from .adamw import AdamW
from .averaging import PrimalAveraging, ScheduleFree
from .asgo import ASGO
from .engine import BlockEngine
from .eshampoo import EShampoo
from .explain import explain
from .kl_shampoo import KLShampoo
from .kl_soap import KLSOAP
from .muon import Muon
from .refresh import EigenbasisRefresh
from .routing import param_groups
from . import scaling
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia

__all__ = ["ASGO", "AdamW", "BlockEngine", "EShampoo", "EigenbasisRefresh", "KLSOAP", "KLShampoo", "Muon",
           "PrimalAveraging", "SOAP", "ScheduleFree", "Shampoo", "Sophia", "explain", "param_groups"]
__version__ = "0.1.0"
