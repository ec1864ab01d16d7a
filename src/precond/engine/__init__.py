"""The one engine every precond optimizer runs on (see :mod:`precond.engine.core`)."""

from .batched import bias_correction, commit_, ema_, gradient_mask, per_block
from .core import STATS_FIELDS, WEIGHT_DECAY_MODES, BlockEngine
from .distribute import local
from .plan import ADAM, Bucket, Member, state_dtype

__all__ = ["ADAM", "BlockEngine", "Bucket", "Member", "STATS_FIELDS", "WEIGHT_DECAY_MODES", "bias_correction",
           "commit_", "ema_", "gradient_mask", "local", "per_block", "state_dtype"]
