"""How far float equivalence transforms move a real model's logits (they should move them only by rounding).

For each bundled language model and each transform (applied alone, to a fresh copy of the model): logits of
2 x 64 random token ids (seed 0) before and after, in fp32; prints the largest absolute difference, relative to
the largest logit, and top-1 agreement. A transform a model's architecture cannot take is listed with the
reason it was refused. The data transforms (``smoothquant``, ``awq_scales``) calibrate on 16 x 128 tokens of
the bundled news text with a W8A8 (``smoothquant``) or W4 g64 (``awq_scales``) plan.

    python benchmarks/transform_equivalence.py [--models smollm2-135m gemma3-270m] [--transforms rotate ...]
"""

from __future__ import annotations

import argparse
import copy

import torch

from lowbit.data import calibration_set
from lowbit.errors import InputError
from lowbit.models import default_bos, load_model
from lowbit.plan import QuantPlan
from lowbit.transforms import NEEDS_DATA, apply_transforms

PLANS = {"smoothquant": {"rules": [{"pattern": "*", "weight": "int8", "act": "int8-token"}]},
         "awq_scales": {"rules": [{"pattern": "*", "weight": "int4-g64-asym"}]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--transforms", nargs="+",
                   default=["fuse_norms", "rotate_residual", "rotate", "rotate_inputs", "smoothquant", "awq_scales"])
    a = p.parse_args()
    print(f"{'model':14s} {'transform':16s} {'tensors':>7s} {'max |diff|':>11s} {'relative':>9s} {'top-1 agree':>11s}")
    for name in a.models:
        lm = load_model(name)
        ids = torch.randint(10, 5000, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = lm.model(ids).logits
        data = None
        for t in a.transforms:
            model = copy.deepcopy(lm.model)
            kwargs = {}
            if t in NEEDS_DATA:
                if data is None:
                    data = calibration_set(lm.kind, lm.tokenizer, 16, 128, seed=0, bos=default_bos(lm))
                kwargs = {"data": data, "plan": QuantPlan.from_dict({**PLANS[t], "transforms": [t]})}
            try:
                with torch.no_grad():
                    changed = apply_transforms(model, [t], **kwargs)
                    after = model(ids).logits
            except InputError as e:
                print(f"{name:14s} {t:16s} refused: {e}")
                continue
            diff = float((before - after).abs().max())
            agree = float((before.argmax(-1) == after.argmax(-1)).float().mean())
            print(f"{name:14s} {t:16s} {len(changed):7d} {diff:11.3g} {diff / float(before.abs().max()):9.2g} "
                  f"{agree:11.3f}", flush=True)
            del model, changed


if __name__ == "__main__":
    main()
