"""Which parameters a matrix optimizer should precondition, and which should run a diagonal method.

Matrix methods (Muon, ASGO; Shampoo and SOAP benefit too) are meant for the hidden weight matrices. The
input embedding and the output head see very sparse or very skewed gradients and are, by the common
recipe (Jordan et al. 2024; Moonlight; modded-nanoGPT), trained with AdamW, as are gains and biases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["param_groups", "NORM_TYPES"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(model: nn.Module, *, head: str | Iterable[str] | None = "auto",
                 matrix_patterns: Iterable[str] = (), other_patterns: Iterable[str] = (),
                 matrix_options: dict[str, Any] | None = None,
                 other_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a matrix group and an "other" group.

    Heuristics, in order (the first that applies decides):

    1. a name matching one of ``matrix_patterns`` / ``other_patterns`` (regular expressions,
       ``re.search`` on the dotted parameter name) goes where the pattern says;
    2. parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules → other;
    3. the output head → other: the modules named by ``head`` (names or regexes); ``"auto"`` takes the
       last ``nn.Linear`` registered in the model, which is the head of nanoGPT-style language models and
       of most classifiers (a head tied to the embedding is the embedding's parameter anyway);
       ``None`` marks no head;
    4. parameters of normalisation layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm, …) → other;
    5. parameters with fewer than 2 dims (biases, gains, scalars) → other;
    6. everything else (linear and convolution weights) → matrix.

    Returns standard param-group dicts, ``{"params", "param_names", "matrix": True/False, **options}``,
    empty groups dropped. A parameter shared by several modules is listed once.
    """
    matrix_re = [re.compile(p) for p in matrix_patterns]
    other_re = [re.compile(p) for p in other_patterns]
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if head == "auto":
        head_modules = set(linear_names[-1:])
    elif head is None:
        head_modules = set()
    else:
        wanted = [head] if isinstance(head, str) else list(head)
        head_modules = {name for name, _ in model.named_modules()
                        if any(name == w or re.fullmatch(w, name) for w in wanted)}
    owner: dict[int, nn.Module] = {}
    owner_name: dict[int, str] = {}
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
            owner_name.setdefault(id(p), mname)

    groups: dict[bool, dict[str, list]] = {True: {"params": [], "param_names": []},
                                           False: {"params": [], "param_names": []}}
    for name, p in model.named_parameters():  # named_parameters lists a shared parameter once
        if not p.requires_grad:
            continue
        module = owner.get(id(p))
        if any(r.search(name) for r in matrix_re):
            is_matrix = True
        elif any(r.search(name) for r in other_re):
            is_matrix = False
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            is_matrix = False
        elif owner_name.get(id(p)) in head_modules:
            is_matrix = False
        elif isinstance(module, NORM_TYPES) or p.dim() < 2:
            is_matrix = False
        else:
            is_matrix = True
        groups[is_matrix]["params"].append(p)
        groups[is_matrix]["param_names"].append(name)
    out = []
    for is_matrix, options in ((True, matrix_options), (False, other_options)):
        if groups[is_matrix]["params"]:
            out.append({**groups[is_matrix], "matrix": is_matrix, **(options or {})})
    return out
