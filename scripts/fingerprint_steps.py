"""A hash of every optimizer's weights and state after a few steps, to show a refactor changes no bit.

    python scripts/fingerprint_steps.py > before.json   # on the old code
    python scripts/fingerprint_steps.py | diff before.json -   # on the new: no output means bit-identical

Each configuration trains the same parameters (1-D to 4-D, one dim longer than the block size) on the same
seeded gradients, in float32 and float64, through the public class and its ``state_dict``.
``--counters-width N`` hashes only the first N of each factor's counters (``stats``), to compare across a
change that adds a counter.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch

from precond.engine.saved_state import STATS_KEY
from precond.registry import OPTIMIZERS

SHAPES = [(7,), (12, 9), (40, 6), (4, 5, 6), (3, 4, 5, 2)]
STEPS = 7
SETTINGS = {
    "AdamW": [{}, {"betas": (0.9, 0.95), "weight_decay": 0.0}],
    "SOAP": [{}, {"precondition_frequency": 1, "refresh_method": "refine"}, {"refresh_method": "eigh"},
             {"refresh_tolerance": 0.05, "precondition_frequency": 2}, {"packed_factors": True},
             {"preconditioner_dtype": torch.bfloat16, "precondition_frequency": 2}],
    "EShampoo": [{"precondition_frequency": 2}, {"precondition_frequency": 1, "refresh_method": "refine"},
                 {"refresh_method": "qr", "refresh_tolerance": 0.05, "precondition_frequency": 2},
                 {"grafting": "adam", "precondition_frequency": 3, "betas": (0.0, 0.99)}],
    "Shampoo": [{}, {"grafting": "adam", "precondition_frequency": 3, "betas": (0.9, 0.99)},
                {"root_method": "newton", "precondition_frequency": 2}, {"grafting": "rmsprop", "epsilon": 1e-6},
                {"use_decoupled_weight_decay": False, "weight_decay": 0.1, "grafting": "sgd"},
                {"spectral_normalize": True, "precondition_frequency": 2},
                {"grafting": "adam", "precondition_frequency": 2, "packed_factors": True},
                {"grafting": "adam", "precondition_frequency": 2, "packed_factors": True,
                 "preconditioner_dtype": torch.float16}],
    "KLShampoo": [{"precondition_frequency": 2}, {"grafting": "adam", "precondition_frequency": 3}],
    "KLSOAP": [{"precondition_frequency": 2}, {"normalize_grads": True, "correct_bias": True, "max_clamp_value": None}],
    "Muon": [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "ns_dtype": "float32"}],
    "ASGO": [{}, {"precondition_frequency": 2}],
    "Sophia": [{}],
}
SMALL_BLOCKS = {"Shampoo": "max_preconditioner_dim", "EShampoo": "max_preconditioner_dim",
                "KLShampoo": "max_preconditioner_dim", "SOAP": "max_precond_dim", "KLSOAP": "max_precond_dim"}


def fingerprint(name: str, options: dict, dtype: torch.dtype, counters_width: int | None = None) -> str:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in SHAPES]
    options = dict(options)
    if name in SMALL_BLOCKS:
        options.setdefault(SMALL_BLOCKS[name], 16)  # (40, 6): the 40 splits into blocks or goes unfactored
    cls = OPTIMIZERS[name].cls
    if OPTIMIZERS[name].routes_vectors:
        optimizer = cls([{"params": params[1:3], "use_muon": True}, {"params": [params[0], *params[3:]]}],
                        lr=0.02, **options)
    else:
        optimizer = cls(params, lr=1e-2, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=dtype) + 0.1 * p.detach()
        if name == "Sophia":
            optimizer.update_hessian(batch_size=8)
        optimizer.step()
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().contiguous().numpy().tobytes())
    for key, state in sorted(optimizer.state_dict()["state"].items()):
        for field, value in sorted(state.items()):
            if torch.is_tensor(value):
                digest.update(f"{key}.{field}".encode())
                flat = value.detach().contiguous().cpu().reshape(-1)  # bytes of any dtype (numpy has no bfloat16)
                if counters_width is not None and STATS_KEY.match(field):
                    flat = flat[:counters_width]
                digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counters-width", type=int, default=None, metavar="N")
    counters_width = parser.parse_args().counters_width
    result = {}
    for name, settings in SETTINGS.items():
        for options in settings:
            for dtype in (torch.float32, torch.float64):
                key = f"{name} {json.dumps(options, sort_keys=True, default=str)} {dtype}"
                result[key] = fingerprint(name, options, dtype, counters_width)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
