"""The public optimizers, listed once, with what other modules need to know of each.

The scaling rules (:mod:`precond.scaling`), the benchmark's list of our optimizers and the tests that must
cover every optimizer read this table, so a new method is one line here (and its class).
"""

from __future__ import annotations

from dataclasses import dataclass

from .adamw import AdamW
from .asgo import ASGO
from .engine import BlockEngine
from .eshampoo import EShampoo
from .kl_shampoo import KLShampoo
from .kl_soap import KLSOAP
from .muon import Muon
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia

__all__ = ["Entry", "OPTIMIZERS"]


@dataclass(frozen=True)
class Entry:
    """``update``: how the update's spectral norm scales with the width, ``"entrywise"`` (entries of order
    1, as Adam's) or ``"spectral"`` (spectral norm of order 1, as Muon's); ``normalizable``: it takes
    ``spectral_normalize``; ``routes_vectors``: its non-matrix parameters run AdamW (``adamw_*`` arguments)."""

    cls: type[BlockEngine]
    update: str
    normalizable: bool = False
    routes_vectors: bool = False


OPTIMIZERS: dict[str, Entry] = {
    "AdamW": Entry(AdamW, "entrywise"),
    "SOAP": Entry(SOAP, "entrywise", normalizable=True),  # Adam in a rotated basis
    "EShampoo": Entry(EShampoo, "spectral", normalizable=True),
    "Shampoo": Entry(Shampoo, "spectral", normalizable=True),
    "KLShampoo": Entry(KLShampoo, "spectral", normalizable=True),
    "KLSOAP": Entry(KLSOAP, "entrywise", normalizable=True),
    "Muon": Entry(Muon, "spectral", routes_vectors=True),
    "ASGO": Entry(ASGO, "spectral", routes_vectors=True),
    "Sophia": Entry(Sophia, "entrywise"),
}
