"""``quantize(model, plan, data=None)``: replace a model's layers by quantized ones, following a plan.

Prepare (select modules, validate, fall back where a layer misfits: ``lowbit.targets``) -> feed data (only if
the plan needs statistics, block by block along the schedule traced from the model) -> convert (run each
module's algorithm on its weight, swap in the quantized module). The model is changed in place and
returned; it keeps working as an ``nn.Module`` with the same call signature.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import tempfile
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.config import WeightResult
from lowbit.calibration import InputStats, Request, collect_input_stats
from lowbit.calibration.blocks import find_stacks
from lowbit.calibration.checkpoint import BlockCheckpoint
from lowbit.calibration.fingerprint import run_key
from lowbit.calibration.sequential import first_calls, run_block_sequential
from lowbit.calibration.undo import UndoStore, remove_stale_folders
from lowbit.checks import check_materialized
from lowbit.errors import InputError
from lowbit.nn.convert import float_weight, to_quantized
from lowbit.nn.state import CALIBRATION_ATTR
from lowbit.nn.roles import input_embedding, output_embedding, share_quantized_storage, tied_head
from lowbit.nn.experts import experts_of, unfuse_experts
from lowbit.nn.input_quant import quantize_inputs, select_inputs
from lowbit.nn.kv_cache import attach_kv_quant, check_kv_quant
from lowbit.plan import QuantPlan, Rule
from lowbit.spec import QuantSpec
from lowbit.targets import (  # noqa: F401  (re-exported: the plan check lives in lowbit.targets)
    Target,
    check_finite_params,
    check_fits,
    data_aware_misfit,
    prepare,
    rtn_instead,
    select_targets,
)
from lowbit.transforms import Originals, apply_transforms
from lowbit.transforms.equalization import expected_input_means

log = logging.getLogger(__name__)

# quantize(calib_dtype=...): the precision of the block-by-block calibration passes
CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

def quantize(
    model: nn.Module,
    plan: QuantPlan | QuantSpec | str,
    data: Any = None,
    *,
    progress: bool = True,
    sequential: bool = True,
    checkpoint: str | os.PathLike | None = None,
    calib_dtype: str = "float32",
) -> nn.Module:
    """Quantize ``model`` in place according to ``plan`` and return it.

    The plan's ``transforms`` (``lowbit.transforms``: float equivalence transforms such as ``fuse_norms``)
    rewrite the float model first, and are undone if quantization then fails. Its ``inputs``
    (``lowbit.nn.input_quant``: the inputs of softmax, GELU or other modules without weights) are calibrated
    last, on the quantized model, and hooked; an entry that names no module is refused before anything changes.

    When the plan needs statistics of the inputs of layers inside a model's repeated blocks (every stack of
    them, found by ``lowbit.calibration.blocks.find_stacks``: the decoder layers of an LLM; the encoder and
    the decoder of T5, BART or Whisper; a vision tower and a language model), calibration is
    block-sequential: each block is observed on the outputs of the blocks before it *as quantized*, then
    quantized, before the next one runs (``lowbit.calibration.sequential``). Stacks, and the layers outside
    them that need data, are calibrated in the order a forward pass runs them (traced on the first batch),
    each on the model quantized so far: a decoder's cross-attention sees the quantized encoder's outputs, a
    language model the quantized vision tower's. Layers that need no data are quantized first.

    Args:
        model: any ``nn.Module``; its supported layers (see ``lowbit.nn.convert.SUPPORTED``) are replaced.
        plan: a :class:`QuantPlan`, or a spec / scheme name for a uniform round-to-nearest plan.
        data: calibration batches (see ``lowbit.calibration.capture``); required when a rule quantizes
            activations statically or its algorithm needs data.
        progress: show progress bars.
        sequential: set False to observe every layer in one pass of the float model instead.
        checkpoint: a folder in which each block calibrated block by block is kept as soon as it is
            quantized; a later call with the same model, plan and data reuses the blocks found there
            (verified) and gives the same result, bit for bit (``lowbit.calibration.checkpoint``). The folder
            is left in place when this returns or raises: delete it once the result is saved
            (``lowbit.calibration.checkpoint.remove_checkpoint``). None: no checkpoint.
        calib_dtype: ``"float32"`` (default) or ``"bfloat16"``: the precision of the block-by-block calibration
            passes (CPU autocast: matrix products and attention in bf16, each batch's ``X^T X`` too; the
            batches' statistics are summed in float32). On CPUs with native bf16 (AVX-512 BF16, AMX) the passes are faster: GPTQ W4 g64 on
            SmolLM2-135M 261.6 s -> 181.7 s, perplexity 24.2690 -> 24.2731 (``benchmarks/gptq_speed.py``).
            On CPUs without it bf16 is emulated and slower: keep float32 there.
    Raises:
        InputError: the plan selects nothing or an unsupported module, a spec does not fit a layer, a weight
            holds NaN/Inf, data is missing or empty when needed, ``checkpoint`` holds files lowbit did
            not write, or a transform does not fit the model. The model is unchanged then.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"quantize() needs an nn.Module, got {type(model).__name__}")
    if calib_dtype not in CALIB_DTYPES:
        raise InputError(f"calib_dtype must be one of {', '.join(CALIB_DTYPES)}, got {calib_dtype!r}")
    check_materialized(model)
    if isinstance(plan, (str, QuantSpec)):
        plan = QuantPlan.uniform(plan)
    if plan.kv is not None:
        check_kv_quant(model, plan.kv)  # before anything changes
    points = select_inputs(model, plan.inputs) if plan.inputs else {}  # before anything changes
    if any(not a.dynamic for a in points.values()) and data is None:
        raise InputError("the plan's inputs quantize module inputs statically: pass calibration data=")
    # the float pre-pass; undone if anything below fails. Fused mixture-of-experts weights become one linear
    # pair per expert first (lowbit.nn.experts), so that rules and transforms see the experts' linears
    unfused = Originals()
    try:
        if any(r.weight is not None for r in plan.rules):
            unfuse_experts(model, unfused)
        originals = apply_transforms(model, plan.transforms, data=data, plan=plan, progress=progress)
    except BaseException:
        unfused.restore()
        raise
    try:
        # block reconstruction learns against the float model as transformed: a copy of it (memory: twice the model)
        reference = copy.deepcopy(model) if plan.reconstruct is not None else None
        originals.offload()  # the float tensors the transforms changed wait on disk, not in memory
        _quantize(model, plan, data, progress, sequential, checkpoint, reference, CALIB_DTYPES[calib_dtype])
    except BaseException:
        originals.restore()
        unfused.restore()
        raise
    finally:
        originals.close()
    if plan.kv is not None:
        attach_kv_quant(model, plan.kv)
    if points:  # observed on the quantized model: the ranges its own layers' outputs give
        quantize_inputs(model, points, data, progress)
    return model


def _quantize(model: nn.Module, plan: QuantPlan, data: Any, progress: bool, sequential: bool,
              checkpoint: str | os.PathLike | None, reference: nn.Module | None = None,
              calib_dtype: torch.dtype = torch.float32) -> nn.Module:
    """``quantize`` after its float pre-pass: prepare, feed data, convert, and with ``plan.reconstruct`` block
    reconstruction against the float ``reference`` (the float layers put back on failure)."""
    if plan.reconstruct is not None and data is None:
        raise InputError("the plan's reconstruct: learns the rounding on calibration data; pass data=")
    targets = prepare(model, plan)
    if not targets:  # a plan that only quantizes the KV cache
        return model
    tie = _tied_pair(model, targets)
    fallbacks: dict[str, list[str]] = {}
    for t in targets:
        if t.fallback_from is not None:
            fallbacks.setdefault(f"{t.fallback_from} -> {t.rule.method.name}", []).append(t.name)
        if t.act_from is not None:
            fallbacks.setdefault(f"activations {t.act_from} -> float", []).append(t.name)
    record: dict[str, Any] = {"schedule": [], "fallbacks": fallbacks}
    routed = tuple(f"{n}." for n in experts_of(model))  # expert linears see only the tokens routed to them
    requests = _requests(targets, routed)
    expert_tokens: dict[str, int] = {}  # tokens each expert linear saw

    # analytic bias correction: input means from the BatchNorms of the float model, before any layer changes
    analytic = [t.name for t in targets if t.rule.bias_correction == "analytic"]
    means, why = expected_input_means(model, analytic) if analytic else ({}, {})
    if why:  # the first convolution at least: it sees the data, not a BatchNorm
        fallbacks["analytic bias correction -> none"] = list(why)
        name = next(iter(why))
        log.warning("analytic bias correction leaves %d layer(s) uncorrected, having no BatchNorm statistics for "
                    "their input (%s: %s%s)", len(why), name, why[name], ", ..." if len(why) > 1 else "")

    def convert(t: Target, s: InputStats | None) -> nn.Module:
        if s is not None and t.name.startswith(routed):
            expert_tokens[t.name] = s.n_rows
        qm = _convert(*_no_tokens(t, s, fallbacks))
        if t.name in means:  # analytic bias correction
            _correct_bias(qm, t, means[t.name])
        return qm
    if requests and data is None:
        names = ", ".join(list(requests)[:3]) + (" ..." if len(requests) > 3 else "")
        raise InputError(f"the plan needs calibration data (static activation ranges, bias correction or "
                         f"data-aware algorithms for {names}); pass data=")
    stacks = find_stacks(model) if requests and sequential else []
    stacks = [st for st in stacks if any(t.name in requests and _inside(t.name, st) for t in targets)]
    order: list[str] = []
    if requests:  # one traced pass on the first batch: which requested layers run, and in which order
        entries = {f"stack {k}": st[0][1] for k, st in enumerate(stacks)}
        entries.update({n: r.module for n, r in requests.items() if not r.routed})
        order = first_calls(model, entries, data)
        targets, requests = _uncalled_fall_back(targets, requests, set(order), fallbacks)
    # requested layers outside every stack, and the order the model runs stacks and those layers in: blocks are
    # solved (and checkpointed) in that order
    rest = [t for t in targets if t.name in requests and not any(_inside(t.name, st) for st in stacks)]
    units = _schedule(stacks, rest, order) if stacks else []
    ran = [u for u in units if isinstance(u, int)]
    stacks = [stacks[k] for k in ran]
    units = [ran.index(u) if isinstance(u, int) else u for u in units]
    blocks = [b for st in stacks for b in st]  # every stack's blocks, one index across the stacks
    in_block = [[t for t in targets if t.name.startswith(name + ".")] for name, _ in blocks]
    store = _checkpoint(checkpoint, model, plan, data, blocks, in_block, calib_dtype)
    if blocks:  # float weights will go to a temporary folder: first delete those killed runs left behind
        remove_stale_folders(tempfile.gettempdir())
    swapped = UndoStore(model)  # the float modules replaced, to put back on failure
    try:
        if not blocks:
            stats = collect_input_stats(model, requests, data, progress) if requests else {}
            if requests:
                record["schedule"].append({"layers": list(requests), "one_pass": True})
            _swap(model, [(t, convert(t, stats.get(t.name))) for t in _bar(targets, progress)], swapped)
        else:
            inside = {t.name for ts in in_block for t in ts}
            outside = [t for t in targets if t.name not in inside]
            _swap(model, [(t, convert(t, None)) for t in outside if t.name not in requests], swapped)

            done: set[str] = set()

            def solve(i: int, block_name: str, stats: dict, stored: dict | None = None) -> None:
                # once per block, or per stage of one; stored: the whole block's modules, from the checkpoint
                if stored is not None:
                    now, pairs = in_block[i], [(t, stored[t.name]) for t in in_block[i]]
                else:
                    now = [t for t in in_block[i] if t.name not in done and (t.name in stats or t.name not in requests)]
                    pairs = [(t, convert(t, stats.get(t.name))) for t in now]
                _swap(model, pairs, swapped)
                done.update(t.name for t in now)
                swapped.offload([t.name for t in now], f"block{i}-{len(done)}")  # done with their float weights

            wanted = [{t.name: requests[t.name] for t in ts if t.name in requests} for ts in in_block]
            staged = any(_true_sequential(t.rule.method) for ts in in_block for t in ts)
            starts = [sum(len(st) for st in stacks[:k]) for k in range(len(stacks))]
            for unit in units:
                if isinstance(unit, int):  # a stack, block by block
                    a, b = starts[unit], starts[unit] + len(stacks[unit])
                    tokens = run_block_sequential(model, blocks[a:b], wanted[a:b], data, solve, progress,
                                                  true_sequential=staged, checkpoint=store, first_index=a,
                                                  calib_dtype=calib_dtype)
                    step = {"stack": blocks[a][0].rsplit(".", 1)[0], "blocks": b - a, "tokens": int(tokens)}
                    if calib_dtype != torch.float32:
                        step["dtype"] = str(calib_dtype).removeprefix("torch.")
                    record["schedule"].append(step)
                else:  # layers outside the stacks that run here: observed on the model quantized so far
                    stats = collect_input_stats(model, {t.name: requests[t.name] for t in unit}, data, progress,
                                                early_stop=True)
                    _swap(model, [(t, convert(t, stats[t.name])) for t in unit], swapped)
                    record["schedule"].append({"layers": [t.name for t in unit]})
        if tie is not None and share_quantized_storage(model, *tie):
            record["tied"] = list(tie)
        if expert_tokens:
            record["experts"] = _expert_coverage(expert_tokens)
        if plan.reconstruct is not None:
            from lowbit.algorithms.brecq import reconstruct

            ratios = reconstruct(model, reference, data, plan.reconstruct, progress)
            record["reconstruct"] = {"units": len(ratios), "error_ratio": {k: round(v, 4) for k, v in ratios.items()}}
    except BaseException:
        swapped.restore()  # no half-quantized model
        raise
    finally:
        swapped.close()
    log.info("quantized %d module(s)%s", len(swapped), f" block by block over {len(blocks)} blocks" if blocks else "")
    model.__dict__[CALIBRATION_ATTR] = record  # what save() records under the manifest's extra["calibration"]
    return model


def _tied_pair(model: nn.Module, targets: list[Target]) -> tuple[str, str] | None:
    """``(head, embedding)`` names when the plan quantizes a head tied to the input embedding and the embedding
    alike (same format, data-free method, no bias): the head then shares the embedding's quantized storage,
    so the tie holds and the weight is stored once. A tied head quantized otherwise breaks the tie; said here,
    before any work."""
    if not tied_head(model):
        return None
    head, emb = output_embedding(model), input_embedding(model)
    by_module = {id(t.module): t for t in targets}
    h, e = by_module.get(id(head)), by_module.get(id(emb))
    if h is None:
        return None
    alike = (e is not None and h.rule.weight == e.rule.weight and not h.rule.method.stats_needed
             and not e.rule.method.stats_needed and getattr(head, "bias", None) is None)
    if alike:
        return h.name, e.name
    mb = float_weight(head).numel() * float_weight(head).element_size() / 2**20
    log.warning("the head %r shares its weight (%.1f MB in float) with the input embedding %r; %s, so the tie "
                "breaks and the artifact stores two copies (the %s embedding and the quantized head). Quantize the "
                "embedding with the same format and a data-free method (rule role:embedding) to keep one copy, or "
                "keep the head in float (skip role:head)", h.name, mb, e.name if e is not None else _name_of(model, emb),
                "the embedding stays float" if e is None else "the two are quantized differently",
                "float" if e is None else "quantized")
    return None


def _name_of(model: nn.Module, module: nn.Module | None) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?")


def _inside(name: str, stack: list[tuple[str, nn.Module]]) -> bool:
    return any(name.startswith(block + ".") for block, _ in stack)


def _schedule(stacks: list, rest: list[Target], order: list[str]) -> list[int | list[Target]]:
    """The calibration units in the order a forward pass runs them (``order``: the keys ``"stack <k>"`` and
    layer names, as first called on the first batch): a stack's index, or a list of layers outside every stack
    that run one after another between two stacks (each such list is observed in one pass of the model
    quantized up to there). Stacks never reached come last."""
    by_name = {t.name: t for t in rest}
    keys = [k for k in order if k.startswith("stack ") or k in by_name]
    keys += [f"stack {k}" for k in range(len(stacks)) if f"stack {k}" not in keys]
    units: list[int | list[Target]] = []
    for key in keys:
        if key.startswith("stack ") and key not in by_name:
            units.append(int(key.split()[1]))
        elif units and isinstance(units[-1], list):
            units[-1].append(by_name[key])
        else:
            units.append([by_name[key]])
    described = [f"{stacks[u][0][0].rsplit('.', 1)[0]} ({len(stacks[u])} blocks)" if isinstance(u, int)
                 else ", ".join(t.name for t in u[:3]) + (f" and {len(u) - 3} more" if len(u) > 3 else "")
                 for u in units]
    log.info("calibration schedule: %s", " -> ".join(described))
    return units


def _uncalled_fall_back(targets: list[Target], requests: dict[str, Request], called: set[str],
                        fallbacks: dict[str, list[str]]) -> tuple[list[Target], dict[str, Request]]:
    """Requested layers that a forward pass never calls as modules (the model reads their weight directly, as
    Mamba's mixer does with ``dt_proj``) cannot be observed: they get round to nearest (listed in
    ``fallbacks``), said in one warning before any work. Static activation ranges cannot: InputError."""
    uncalled = [n for n, r in requests.items() if not r.routed and n not in called]
    if not uncalled:
        return targets, requests
    out = []
    for t in targets:
        if t.name not in uncalled:
            out.append(t)
            continue
        if t.rule.act is not None and not t.rule.act.dynamic:
            raise InputError(f"module {t.name!r} is never called on the calibration data (the model reads its "
                             f"weight directly), so its static activation range cannot be calibrated; quantize "
                             f"it with dynamic activations or skip it")
        fallbacks.setdefault(f"{t.rule.method.name} -> rtn (never called)", []).append(t.name)
        out.append(rtn_instead(t))
    shown = ", ".join(uncalled[:3]) + (f" and {len(uncalled) - 3} more" if len(uncalled) > 3 else "")
    log.warning("%d layer(s) are never called as modules on the calibration data (the model reads their weight "
                "directly), so nothing can be observed at their input: they use round to nearest (%s)",
                len(uncalled), shown)
    return out, {n: r for n, r in requests.items() if n not in uncalled}


def _checkpoint(folder: str | os.PathLike | None, model: nn.Module, plan: QuantPlan, data: Any,
                blocks: list[tuple[str, nn.Module]], in_block: list[list[Target]],
                calib_dtype: torch.dtype = torch.float32) -> BlockCheckpoint | None:
    """This run's checkpoint in ``folder``; None when none is asked for or no layer is solved block by block."""
    if folder is None:
        return None
    if not blocks:
        log.debug("checkpoint %s not used: no layer is calibrated block by block", folder)
        return None
    layout = [(name, [t.name for t in ts]) for (name, _), ts in zip(blocks, in_block)]
    settings = plan.to_dict()
    if calib_dtype != torch.float32:  # a float32 run keeps the key it always had
        settings["calib_dtype"] = str(calib_dtype)
    return BlockCheckpoint(folder, run_key(model, settings, data), layout)


def _true_sequential(method: Any) -> bool:
    """Whether ``method`` (or the algorithm it hands over to, as AWQ's ``then``) asks for staged blocks."""
    while method is not None:
        if getattr(method, "true_sequential", False):
            return True
        method = getattr(method, "then", None)
    return False


def quantize_weight(weight: torch.Tensor, rule: Rule, stats: InputStats | None = None) -> WeightResult:
    """Run ``rule``'s algorithm on one weight (lowbit layout, see ``float_weight``) with its input statistics.

    Returns the quantized weight and, for algorithms that scale the input (AWQ), the float32 ``(in,)``
    scale the layer multiplies its input by first.
    """
    found = {k: getattr(stats, k, None) for k in rule.method.stats_needed} if stats is not None else {}
    found = {k: v for k, v in found.items() if v is not None}
    if weight.dim() <= 2 or not found:
        return rule.method.run(weight, found, rule.weight)
    # a convolution's weight through its 2-D view (out, in * kernel), the layout its input patches have; an
    # input scale (AWQ) is one per input channel, shared by that channel's kernel positions
    kernel = math.prod(weight.shape[2:])
    if "abs_mean" in found:
        found["columns_per_input"] = torch.tensor(kernel)
    r = rule.method.run(weight.reshape(weight.shape[0], -1), found, rule.weight)
    r = dataclasses.replace(r, q=dataclasses.replace(r.q, codes=r.q.codes.reshape(weight.shape)))
    if r.input_scale is not None:
        per_column = r.input_scale.reshape(-1, kernel)
        if not torch.equal(per_column, per_column[:, :1].expand_as(per_column)):
            raise InputError(f"{rule.method.name} gave one convolution input channel several scales")
        r = dataclasses.replace(r, input_scale=per_column[:, 0].contiguous())
    return r


def _expert_coverage(tokens: dict[str, int]) -> dict[str, Any]:
    """How many calibration tokens the expert linears saw (logged, and recorded in the artifact)."""
    counts = sorted(tokens.values())
    out = {"linears": len(counts), "min_tokens": counts[0], "median_tokens": counts[len(counts) // 2],
           "max_tokens": counts[-1], "no_tokens": sum(c == 0 for c in counts)}
    log.info("experts: %d expert linears calibrated on %d .. %d tokens each (median %d)%s", out["linears"],
             out["min_tokens"], out["max_tokens"], out["median_tokens"],
             f"; {out['no_tokens']} saw none and use round to nearest" if out["no_tokens"] else "")
    return out


def _requests(targets: list[Target], routed: tuple[str, ...] = ()) -> dict[str, Request]:
    """What must be observed at each target's input (targets that need nothing are left out); targets under
    the prefixes ``routed`` are mixture-of-experts experts (``Request.routed``)."""
    wanted = {}
    for t in targets:
        static_act = t.rule.act if t.rule.act is not None and not t.rule.act.dynamic else None
        needs = t.rule.method.stats_needed
        why = data_aware_misfit(t.module, t.rule.method)
        if why is not None:  # prepare() moved such targets to round to nearest: a target built elsewhere
            raise InputError(f"module {t.name!r}: data-aware {t.rule.method.name} cannot take {why}")
        if t.rule.bias_correction and isinstance(t.module, nn.Embedding):
            raise InputError(f"module {t.name!r}: bias correction does not apply to an embedding")
        measured = t.rule.bias_correction is True
        if static_act is not None or needs or measured:
            wanted[t.name] = Request(t.module, static_act, mean=measured,
                                     hessian="hessian" in needs, abs_mean="abs_mean" in needs,
                                     routed=t.name.startswith(routed) if routed else False)
    return wanted


def _no_tokens(t: Target, s: InputStats | None, fallbacks: dict[str, list[str]]) -> tuple[Target, InputStats | None]:
    """``(t, s)`` as given, or for a routed expert that no calibration token reached (``s.n_rows == 0``)
    ``t`` with round to nearest and no statistics, listed in ``fallbacks`` under ``"<method> -> rtn (no
    calibration tokens)"``. Static activation ranges cannot come from nothing: InputError."""
    if s is None or s.n_rows:
        return t, s
    if t.rule.act is not None and not t.rule.act.dynamic:
        raise InputError(f"module {t.name!r}: no calibration token was routed to this expert, so its static "
                         f"activation range cannot be calibrated; use dynamic activations or more data")
    fallbacks.setdefault(f"{t.rule.method.name} -> rtn (no calibration tokens)", []).append(t.name)
    return rtn_instead(t), None


def _convert(t: Target, s: InputStats | None) -> nn.Module:
    """The quantized module replacing target ``t``, given its input statistics (None if it needs none)."""
    W = float_weight(t.module)
    try:
        r = quantize_weight(W, t.rule, s)
    except InputError as e:
        raise InputError(f"module {t.name!r}: {e}") from None
    qm = to_quantized(t.module, r.q, t.rule.act, r.input_scale)
    if s is not None and s.act_range is not None:
        qm.set_activation_range(*s.act_range)
    if t.rule.bias_correction is True:  # measured; analytic is applied by the caller, which knows the means
        _correct_bias(qm, t, s.mean, W)
    qm.train(t.module.training)
    return qm


def _correct_bias(qm: nn.Module, t: Target, mean_x: torch.Tensor, W: torch.Tensor | None = None) -> None:
    """Shift ``qm``'s bias by minus the mean output change its quantized weight causes on inputs whose mean per
    channel is ``mean_x`` (``W``: the float weight, read from ``t.module`` if not given)."""
    W = float_weight(t.module) if W is None else W
    dW = qm.effective_weight() - W.float()  # what the layer applies minus the float weight
    qm.add_to_bias(-bias_correction(dW, mean_x, getattr(t.module, "groups", 1)))


def _swap(model: nn.Module, pairs: list[tuple[Target, nn.Module]], swapped: UndoStore) -> None:
    for t, qm in pairs:
        swapped.keep(t.name, t.module)
        model.set_submodule(t.name, qm)


def _bar(targets: list[Target], progress: bool):
    return tqdm(targets, desc="quantize", unit="layer", disable=not progress, leave=False)
