"""Compare precond.Muon and precond.AdamW with torch.optim.Muon and torch.optim.AdamW.

    python scripts/compare_torch.py

Same parameters, same fixed random gradients; prints the maximum over parameters of the relative
difference of the parameters after the last step, ‖W_ours - W_torch‖ / ‖W_torch‖.
"""

from __future__ import annotations

import torch

import precond
from compare_references import run  # same loop: fixed gradients fed to an optimizer (scripts/ is on sys.path)


def case(shapes, steps, dtype, ours, theirs):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    a, b = run(ours, init, grads), run(theirs, init, grads)
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def main() -> None:
    print("| comparison | dtype | steps | max rel. diff of W |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        for adjust in (None, "match_rms_adamw"):
            for ns_dtype in ("bfloat16", "float32"):
                kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
                diff = case([(8, 16), (32, 12), (24, 24)], 20, dtype,
                            lambda ps: precond.Muon(ps, ns_dtype=ns_dtype, **kw), lambda ps: torch.optim.Muon(ps, **kw))
                print(f"| Muon adjust_lr_fn={adjust} ns_dtype={ns_dtype} vs torch (bf16) | {dtype} | 20 | {diff:.2e} |")
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        diff = case([(7,), (5, 6), (3, 4, 5)], 30, dtype, lambda ps: precond.AdamW(ps, **kw),
                    lambda ps: torch.optim.AdamW(ps, foreach=False, **kw))
        print(f"| AdamW vs torch | {dtype} | 30 | {diff:.2e} |")


if __name__ == "__main__":
    main()
