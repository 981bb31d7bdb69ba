"""How far float equivalence transforms move a real model's logits (they should move them only by rounding).

For each bundled language model: logits of 2 x 64 random token ids (seed 0) before and after the
transform, in fp32; prints the largest absolute difference, relative to the largest logit, and top-1 agreement.

    python benchmarks/transform_equivalence.py [--models smollm2-135m gemma3-270m] [--transforms fuse_norms]
"""

from __future__ import annotations

import argparse

import torch

from lowbit.models import load_model
from lowbit.transforms import apply_transforms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--transforms", nargs="+", default=["fuse_norms"])
    a = p.parse_args()
    print(f"{'model':14s} {'transforms':12s} {'tensors':>7s} {'max |diff|':>11s} {'relative':>9s} {'top-1 agree':>11s}")
    for name in a.models:
        lm = load_model(name)
        ids = torch.randint(10, 5000, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = lm.model(ids).logits
            changed = apply_transforms(lm.model, a.transforms)
            after = lm.model(ids).logits
        diff = float((before - after).abs().max())
        agree = float((before.argmax(-1) == after.argmax(-1)).float().mean())
        print(f"{name:14s} {'+'.join(a.transforms):12s} {len(changed):7d} {diff:11.3g} "
              f"{diff / float(before.abs().max()):9.2g} {agree:11.3f}")


if __name__ == "__main__":
    main()
