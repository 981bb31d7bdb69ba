"""Block-sequential calibration: run a model block by block, each block fed the outputs of the blocks
before it *after* they were quantized (as GPTQ's reference implementation and AWQ do).

    capture   replace every block by a recorder and run the model once per batch: the recorders keep
              each block's call arguments (masks, position embeddings: shared objects, stored once) and
              the first block's input hidden states; the last recorder stops the model, so nothing after
              the blocks (final norm, LM head) runs.
    per block observe the inputs of its modules (``InputCollector``), let the caller quantize them and
              swap them in, then run the block again to produce the next block's inputs, in place.
              With ``true_sequential`` a block is solved in stages instead: its modules grouped by the
              input they share, in call order (attention projections, output projection, MLP in/gate,
              MLP out for a Llama layer), each stage observed with the stages before it already quantized
              (the "true sequential" option of GPTQ's reference code). It costs a partial block pass per stage.

Peak memory is the model plus one set of hidden states (``n_samples x seq_len x hidden`` floats) plus one
block's working set, whatever the depth. Memory the C allocator holds free is handed back after each
observing pass and each solve, so the pass's activations and the solver's scratch are not resident at once
(GPTQ W4 on SmolLM2-135M: peak 1.91x -> 1.76x the float model, no measurable time cost).

With a checkpoint (``lowbit.calibration.checkpoint``), each solved block's quantized modules are saved as
soon as it is done, and a block the checkpoint already holds is swapped in without observing or solving;
it is still run, to recompute the next block's inputs (hidden states are not stored).

Each block gets the arguments the model passed to *it*, so models whose layers differ (Gemma-3's
sliding-window and global layers get different masks and rotary tables) are handled without knowing their
architecture.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import (
    InputCollector,
    InputStats,
    Request,
    StopObserving,
    batch_count,
    batches,
    run_model,
)
from lowbit.calibration.checkpoint import BlockCheckpoint
from lowbit.errors import InputError
from lowbit.formats import all_finite
from lowbit.memory import release_free_memory, rss_bytes
from lowbit.nn.cache import cached_weights

log = logging.getLogger(__name__)

# solve(block index, block name, stats by module name) -> nothing; it swaps the quantized modules of those names
# into the block (called once per block, or once per stage with true_sequential). A block restored from a
# checkpoint is instead handed over as solve(i, name, {}, stored): stored maps full module names to the
# quantized modules to swap in, with nothing to solve.
Solve = Callable[..., None]


@dataclass
class BlockInputs:
    """What the blocks are called with, per calibration batch.

    hidden: per batch, the current block's input hidden states ``(B, T, hidden)`` (replaced in place as
        the runner advances). calls: per block, per batch, the other positional and keyword arguments.
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    in_kwargs: bool = False  # the hidden states were passed as ``hidden_states=`` rather than first
    returns_tuple: bool = False
    # a block returns more than its hidden states, which the model hands to the next block (T5's position
    # biases, computed by the first block): during capture every block but the last then really runs (in
    # float), so each records the arguments it gets from the one before; otherwise the hidden states pass
    # through unchanged (the arguments of a Llama layer do not depend on the layer before)
    passes_more: bool = False
    # run the blocks under CPU autocast to bfloat16 (their matrix products and attention in bf16, norms and the
    # residual stream as the model computes them). The input statistics' hooks run inside the same autocast, so a
    # batch's X^T X is a bf16 product (rounded to bf16), summed over batches in float32:
    # run_block_sequential(calib_dtype=torch.bfloat16)
    autocast_bf16: bool = False

    def run(self, block_index: int, block: nn.Module, b: int) -> torch.Tensor:
        """Run ``block`` on batch ``b``'s current hidden states; returns the output hidden states."""
        args, kwargs = self.calls[block_index][b]
        h = self.hidden[b]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            out = block(*args, hidden_states=h, **kwargs) if self.in_kwargs else block(h, *args, **kwargs)
        out = _hidden_of(out)
        return out.to(h.dtype) if self.autocast_bf16 and out.dtype != h.dtype else out


class _Stop(Exception):
    """Raised by the last recorder: the model has nothing more to tell us."""


class _Recorder(nn.Module):
    """Stands in for one block during capture: records its call, passes the hidden states through."""

    def __init__(self, index: int, block: nn.Module, inputs: BlockInputs, last: bool) -> None:
        super().__init__()
        self.index, self.inputs, self.last = index, inputs, last
        self.block = [block]  # a list, so the real block is not registered as a child

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        in_kwargs = not args
        if in_kwargs:
            if "hidden_states" not in kwargs:
                raise InputError(f"block {self.index} was called without hidden states (kwargs {sorted(kwargs)})")
            h = kwargs.pop("hidden_states")
        else:
            h, args = args[0], args[1:]
        if any(_is_cache(a) for a in (*args, *kwargs.values())):
            raise InputError("the model passed a key/value cache to its blocks during calibration; "
                             "call it with use_cache=False")
        self.inputs.calls[self.index].append((args, kwargs))
        if self.index == 0:
            self.inputs.hidden.append(h.detach())
            self.inputs.in_kwargs = in_kwargs
        if self.last:
            raise _Stop
        if self.index == 0 and len(self.inputs.hidden) == 1:  # the real block's output structure, from one call
            out = self._real(h, args, kwargs, in_kwargs)
            self.inputs.returns_tuple = isinstance(out, (tuple, list))
            self.inputs.passes_more = self.inputs.returns_tuple and len(out) > 1
            if self.inputs.passes_more:
                return out
        if self.inputs.passes_more:  # the next block needs what this one returns besides its hidden states
            return self._real(h, args, kwargs, in_kwargs)
        return (h,) if self.inputs.returns_tuple else h

    def _real(self, h: torch.Tensor, args: tuple, kwargs: dict, in_kwargs: bool) -> Any:
        return self.block[0](*args, hidden_states=h, **kwargs) if in_kwargs else self.block[0](h, *args, **kwargs)


def first_calls(model: nn.Module, entries: dict[str, nn.Module], data: Any) -> list[str]:
    """The keys of ``entries`` that one forward pass on the first batch of ``data`` calls (as modules: a
    module whose weight the model reads directly is never called), in the order it first calls them. The
    model runs once, up to the last entry it reaches (to the end when some are never called)."""
    seen: list[str] = []

    def hook_for(key: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if key not in seen:
                seen.append(key)
            if len(seen) == len(entries):
                raise _Stop  # every entry has been reached: the rest of the pass tells nothing more
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k), with_kwargs=True) for k, m in entries.items()]
    try:
        with torch.inference_mode():
            first = next(iter(batches(data)), None)
            if first is None:
                raise InputError("the calibration data set is empty: it yielded no batch")
            try:
                run_model(model, first)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], data: Any,
                         progress: bool = True) -> BlockInputs:
    """Run ``model`` on every batch of ``data`` up to its first block, recording every block's call.

    Raises:
        InputError: ``data`` holds no batch, or the model never reached its blocks.
    """
    inputs = BlockInputs(hidden=[], calls=[[] for _ in blocks])
    originals = list(blocks)
    for i, (name, block) in enumerate(blocks):
        model.set_submodule(name, _Recorder(i, block, inputs, last=i == len(blocks) - 1))
    try:
        with torch.inference_mode():
            for b in tqdm(batches(data), total=batch_count(data), desc="capture", unit="batch",
                          disable=not progress, leave=False):
                try:
                    run_model(model, b, check_fit=not inputs.hidden)  # the first batch: errors mean bad data
                except _Stop:
                    pass
                if len(inputs.calls[-1]) != len(inputs.hidden):
                    raise InputError("the model returned before running all of its blocks "
                                     f"({blocks[0][0]} .. {blocks[-1][0]}); lowbit cannot run it block by block")
    finally:
        for name, block in originals:
            model.set_submodule(name, block)
    if not inputs.hidden:
        raise InputError("the calibration data set is empty: it yielded no batch")
    return inputs


def run_block_sequential(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    wanted: list[dict[str, Request]],
    data: Any,
    solve: Solve,
    progress: bool = True,
    true_sequential: bool = False,
    checkpoint: BlockCheckpoint | None = None,
    first_index: int = 0,
    calib_dtype: torch.dtype = torch.float32,
) -> int:
    """For each block in order: observe ``wanted[i]`` on its inputs, ``solve`` (quantize and swap), then
    compute its outputs with the quantized modules as the next block's inputs.

    Args:
        blocks: from :func:`~lowbit.calibration.blocks.find_blocks`.
        wanted: per block, the modules (inside it) whose input statistics ``solve`` needs; may be empty.
        solve: called with the statistics after observing and before the outputs: once per block, or with
            ``true_sequential`` once per stage of the block (:func:`block_stages`), with that stage's modules.
        checkpoint: where finished blocks are kept (``lowbit.calibration.checkpoint``). A block it holds is
            handed to ``solve`` as stored modules (no observing, no solving) and then run as usual, so the
            hidden states are recomputed, not stored; every block solved here is saved to it.
        first_index: the index of ``blocks[0]`` among all blocks of the run (a model with several stacks runs
            them one after another): ``solve`` and the checkpoint see ``first_index + i``.
        calib_dtype: ``torch.bfloat16`` runs every block pass (observing and computing the next inputs) under
            CPU autocast to bf16 (:attr:`BlockInputs.autocast_bf16`); the hidden states stay float32.
    Returns:
        the tokens (or positions: frames, patches) the blocks were calibrated on.
    """
    inputs = capture_block_inputs(model, blocks, data, progress)
    inputs.autocast_bf16 = calib_dtype == torch.bfloat16
    n_tokens = sum(h.shape[0] * h.shape[1] if h.dim() >= 2 else h.shape[0] for h in inputs.hidden)
    log.info("block-sequential calibration of %s: %d block(s), %d batch(es), %d token(s) or positions; hidden "
             "states %.0f MB", blocks[0][0].rsplit(".", 1)[0], len(blocks), len(inputs.hidden), n_tokens,
             sum(h.numel() * h.element_size() for h in inputs.hidden) / 2**20)
    bar = tqdm(blocks, desc="blocks", unit="block", disable=not progress)
    with torch.inference_mode():
        for i, (name, _) in enumerate(bar):
            t0 = time.perf_counter()
            block = model.get_submodule(name)
            stored = checkpoint.restore(first_index + i, block) if checkpoint is not None else None
            if stored is not None:
                solve(first_index + i, name, {}, stored)
            else:
                _solve_block(inputs, i, name, block, wanted[i],
                             lambda _, *rest: solve(first_index + i, *rest), true_sequential)
            block = model.get_submodule(name)  # solve may have replaced modules inside it
            if checkpoint is not None and stored is None:
                checkpoint.save(first_index + i, block)
            if i + 1 < len(blocks):
                with cached_weights(block):  # dequantize each new quantized layer once, not once per batch
                    for b in range(len(inputs.hidden)):
                        inputs.hidden[b] = inputs.run(i, block, b)
                _check_finite(inputs.hidden, name)
            release_free_memory()
            dt = time.perf_counter() - t0
            rss = rss_bytes() / 2**20
            bar.set_postfix_str(f"{name} {dt:.1f}s rss {rss:.0f}MB")
            log.info("block %d/%d (%s): %s, %.1f s, RSS %.0f MB", i + 1, len(blocks), name,
                     "reused from the checkpoint" if stored is not None else f"{len(wanted[i])} module(s) observed",
                     dt, rss)
    return n_tokens


def _solve_block(inputs: BlockInputs, i: int, name: str, block: nn.Module, wanted: dict[str, Request],
                 solve: Solve, true_sequential: bool) -> None:
    """Observe block ``i``'s modules of ``wanted`` (in stages with ``true_sequential``) and solve each stage."""
    stages = block_stages(inputs, i, block, wanted) if true_sequential and wanted else [list(wanted)]
    for k, stage in enumerate(stages):
        stats: dict[str, InputStats] = {}
        if stage:
            where = f"block {name}'s calibration inputs" + (f" (stage {k + 1})" if len(stages) > 1 else "")
            stats = _observe(inputs, i, block, {n: wanted[n] for n in stage}, where)
            release_free_memory()  # the pass's activations, so the solver does not stack on them
        solve(i, name, stats)
        del stats
        release_free_memory()  # the solver's scratch, before the next pass allocates its own


def _observe(inputs: BlockInputs, i: int, block: nn.Module, wanted: dict[str, Request], where: str
             ) -> dict[str, InputStats]:
    with InputCollector(wanted, early_stop=True) as c:  # the outputs come from a later pass
        for b in range(len(inputs.hidden)):
            c.new_batch()
            try:
                inputs.run(i, block, b)
            except StopObserving:
                pass
    return c.result(where=where)


def block_stages(inputs: BlockInputs, i: int, block: nn.Module, wanted: dict[str, Request]) -> list[list[str]]:
    """The modules of ``wanted`` in stages: in the order they first run on batch 0, consecutive modules fed
    the same input tensor together (a Llama layer: q/k/v, o, gate/up, down). Modules that did not run on
    batch 0 form a last stage (observing them then reports the problem)."""
    order: list[str] = []
    keys: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []  # keep each input alive so its id cannot be reused during the call

    def hook_for(n: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if n not in keys and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                alive.append(x)
                order.append(n)
                keys[n] = (id(x), x.data_ptr(), tuple(x.shape))
                if len(order) == len(wanted):
                    raise StopObserving
        return hook

    handles = [r.module.register_forward_pre_hook(hook_for(n)) for n, r in wanted.items()]
    try:
        inputs.run(i, block, 0)
    except StopObserving:
        pass
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for n in order:
        if stages and keys[stages[-1][-1]] == keys[n]:
            stages[-1].append(n)
        else:
            stages.append([n])
    rest = [n for n in wanted if n not in keys]
    return stages + ([rest] if rest else [])


def _hidden_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"a block returned {type(out).__name__}; expected hidden states or a tuple starting with them")


def _is_cache(x: Any) -> bool:
    return x is not None and type(x).__name__.endswith("Cache")


def _check_finite(hidden: list[torch.Tensor], name: str) -> None:
    for b, h in enumerate(hidden):
        if not all_finite(h):
            raise InputError(f"block {name} produced NaN/Inf hidden states on calibration batch {b} after "
                             "quantization; try a wider format or more damping")
