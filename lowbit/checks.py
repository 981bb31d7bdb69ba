"""Checks of a whole model made before lowbit works on it (``quantize`` calls them first)."""

from __future__ import annotations

from torch import nn

from lowbit.errors import InputError


def check_materialized(model: nn.Module) -> None:
    """Raise InputError naming the first parameter or buffer of ``model`` on the ``meta`` device.

    Such a model (built under ``torch.device("meta")`` or ``init_empty_weights``) has shapes but no values:
    quantizing it would fail deep inside an algorithm, or quantize nothing real.
    """
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        meta = [n for n, t in named if t.device.type == "meta"]
        if meta:
            more = f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
            raise InputError(f"{kind} {meta[0]!r}{more} is on the meta device (shapes only, no values); "
                             f"load the weights first (e.g. from_pretrained without a meta init, or "
                             f"model.to_empty(device='cpu') then load_state_dict)")
