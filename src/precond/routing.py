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

__all__ = ["param_groups", "find_head", "stores_transposed", "NORM_TYPES", "LAYER_TYPES"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# Modules whose weight is a layer's weight matrix. A parameter owned by any other module is "raw": it may
# be a position table, a class token or a custom layer's matrix, which the name and shape decide.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
# Leaf names of raw parameters that are tables or tokens rather than layer weights (ViT's pos_embed,
# cls_token, reg_token, mask_token; GPT's wpe/wte; "position_table", "register_tokens", ...).
_TABLE_NAME = re.compile(r"emb|wte|wpe|pos|token|cls|register|table", re.IGNORECASE)
# Module names that say "output head" (lm_head, head, classifier, cls_head, logits, fc_out, output, score).
_HEAD_NAME = re.compile(r"(^|_)(head|classifier|logits)$|^(fc_out|output|output_layer|score)$")


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored ``(fan_in, fan_out)``, the transpose of ``nn.Linear``'s layout:
    Hugging Face's ``Conv1D`` (GPT-2's attention and MLP weights), recognised by its name and its ``nf``
    (output width) being the weight's last dim, without importing ``transformers``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def find_head(model: nn.Module) -> set[str]:
    """The output head(s) of ``model``, as module names, found without relying on registration order.

    1. ``nn.Linear`` modules whose weight is an embedding's weight (a tied head);
    2. else ``nn.Linear`` modules whose own name says head (``lm_head``, ``head``, ``classifier``,
       ``cls_head``, ``logits``, ``fc_out``, ``output``, ``output_layer``, ``score``): all of them;
    3. else the ``nn.Linear`` whose output width is no ``nn.Linear``'s input width (its output feeds no
       other layer: the classes or the vocabulary), if exactly one has that property.

    Raises ``ValueError`` when none of these decides (no candidate, or several by shape): pass
    ``head="<module name>"`` (or ``head=None``) to :func:`param_groups` then.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    tied = {name for name, m in linears.items() if id(m.weight) in tables}
    if tied:
        return tied
    named = {name for name in linears if _HEAD_NAME.search(name.rsplit(".", 1)[-1])}
    if named:
        return named
    inputs = {m.in_features for m in linears.values()}
    by_shape = sorted(name for name, m in linears.items() if m.out_features not in inputs)
    if len(by_shape) == 1:
        return set(by_shape)
    found = f"several candidates by output width: {by_shape}" if by_shape else "no candidate"
    raise ValueError(f"Cannot tell the output head of {type(model).__name__} ({found}); pass head='<module "
                     "name>' (a name or regex, or a list of them) or head=None to param_groups")


def param_groups(model: nn.Module, *, head: str | Iterable[str] | None = "auto",
                 matrix_patterns: Iterable[str] = (), other_patterns: Iterable[str] = (),
                 matrix_options: dict[str, Any] | None = None,
                 other_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a matrix group and an "other" group.

    Heuristics, in order (the first that applies decides):

    1. a name matching one of ``matrix_patterns`` / ``other_patterns`` (regular expressions,
       ``re.search`` on the dotted parameter name) goes where the pattern says;
    2. parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules → other;
    3. the output head → other: the modules named by ``head`` (names or regexes); ``"auto"`` finds it by
       :func:`find_head` (tied weights, then a head-like name, then the one output width no layer reads;
       an error asks for ``head=`` when that is ambiguous); ``None`` marks no head;
    4. parameters of normalisation layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm, …) → other;
    5. parameters with fewer than 2 dims (biases, gains, scalars) → other;
    6. raw parameters (owned by a module that is not a Linear, Bilinear or convolution) → other when their
       own name reads as a table or token (``pos_embed``, ``cls_token``, ``wpe``, ``register_tokens``, …)
       or when fewer than 2 of their dims exceed 1 (a ``[1, 1, d]`` token); other raw matrices (a custom
       layer's ``weight``, Hugging Face's ``Conv1D``) → matrix;
    7. everything else (linear and convolution weights) → matrix.

    Returns standard param-group dicts, ``{"params", "param_names", "matrix": True/False, **options}``,
    empty groups dropped. A parameter shared by several modules is listed once. Frozen parameters
    (``requires_grad=False``) are listed too, routed like the others: they get no gradient, so no step, and
    the groups (hence a checkpoint's layout) stay the same when the frozen set changes.

    Matrices stored ``(fan_in, fan_out)`` (Hugging Face's ``Conv1D``, see :func:`stores_transposed`) go to a
    matrix group of their own with ``"transposed": True``, which the optimizers and the scaling rules read
    wherever a matrix's orientation matters (Muon's shape factor, ASGO's ``side``, spectral normalisation).
    """
    matrix_re = [re.compile(p) for p in matrix_patterns]
    other_re = [re.compile(p) for p in other_patterns]
    if head == "auto":
        head_modules = find_head(model)
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

    # (matrix, transposed) -> group; a plain matrix group first, as before Conv1D had its own
    groups: dict[tuple[bool, bool], dict[str, list]] = {
        key: {"params": [], "param_names": []} for key in ((True, False), (True, True), (False, False))}
    for name, p in model.named_parameters():  # named_parameters lists a shared parameter once
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
        elif not isinstance(module, LAYER_TYPES):
            leaf = name.rsplit(".", 1)[-1]
            is_matrix = not _TABLE_NAME.search(leaf) and sum(size > 1 for size in p.shape) >= 2
        else:
            is_matrix = True
        key = (is_matrix, is_matrix and module is not None and stores_transposed(module) and p is module.weight)
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    out = []
    for (is_matrix, transposed), group in groups.items():
        if group["params"]:
            flag = {"transposed": True} if transposed else {}
            options = (matrix_options if is_matrix else other_options) or {}
            out.append({**group, "matrix": is_matrix, **flag, **options})
    return out
