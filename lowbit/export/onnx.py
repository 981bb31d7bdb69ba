"""ONNX export with quantize/dequantize nodes (QDQ), run and checked in onnxruntime.

Every quantized weight is stored in the file as lowbit's own integer codes (``UINT4`` for widths up to 4 bits,
``UINT8`` up to 8) with its scales and zero points, and turned into float by a standard ``DequantizeLinear``
(opset 21: per tensor, per output channel, or blocked along the input features for group quantization).
Symmetric codes carry their implicit offset ``2^(bits-1)`` as an explicit zero point, so the dequantized
weight is bit-for-bit lowbit's. Static per-tensor activation quantization becomes a
``QuantizeLinear``/``DequantizeLinear`` pair on the layer's input; AWQ's per-input-feature scale a ``Mul``.

Linear weights are stored transposed (``(in, out)``, the ``B`` of ``MatMul``), so a 4-bit group-quantized
linear is the ``DequantizeLinear -> MatMul`` pattern that onnxruntime's graph optimizer turns into its
4-bit ``MatMulNBits`` kernel. Convolutions keep torch's ``(out, in/groups, kh, kw)`` layout with per-channel
or per-tensor scales (ONNX blocks lie along one axis, which a conv's flattened groups do not).

What ONNX cannot represent is refused before anything is written, naming the module and why: non-integer
formats (fp8, fp4, MX, codebooks), two-dimensional blocks, group-quantized convolutions, dynamic activation
quantization (its per-token scales are computed at run time), and packed weights released to a kernel.

The graph is traced with torch's ONNX exporter (``torch.onnx.export(dynamo=True)``, which needs the
``onnxscript`` package); quantized modules are swapped for small export modules whose ``DequantizeLinear`` /
``QuantizeLinear`` come from two custom torch ops with ONNX translations, and swapped back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.errors import InputError
from lowbit.export.qdq import OPSET, check_onnx, export_view, translations, why_not_onnx
from lowbit.io.save import check_destination

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "OnnxReport", "onnxruntime_session", "default_inputs", "model_kind", "CausalLMLogits",
           "check_onnx", "export_view", "why_not_onnx"]


class CausalLMLogits(nn.Module):
    """``input_ids (batch, seq) -> logits (batch, seq, vocab)`` of a Hugging Face causal LM, without a cache."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def model_kind(model: nn.Module) -> str:
    """``"causal-lm"`` for a Hugging Face model with an output embedding (LM head), else ``"image-classifier"``."""
    head = getattr(model, "get_output_embeddings", None)
    if hasattr(model, "config") and callable(head) and head() is not None:
        return "causal-lm"
    return "image-classifier"


def default_inputs(model: nn.Module, tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(example, check, kind)`` for :func:`export_onnx` from bundled data.

    A causal LM is traced on 2 x 32 tokens of the bundled Wikipedia text and checked on the next 4 windows
    of 64 (random token ids from the vocabulary, seed 0, when no tokenizer is known); an image classifier is
    traced on 2 and checked on 8 of the bundled calibration photos (224 x 224).
    """
    kind = model_kind(model)
    if kind == "causal-lm":
        if tokenizer is not None:
            from lowbit.data.text import token_windows, wikipedia_text

            ids = token_windows(tokenizer, wikipedia_text(), 64, max_tokens=64 * 6)
        else:
            vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(
                model.get_output_embeddings(), "weight") else int(model.config.vocab_size)
            ids = torch.randint(0, vocab, (6, 64), generator=torch.Generator().manual_seed(0))
        return ids[:2, :32].contiguous(), ids[2:6].contiguous(), kind
    from lowbit.data.images import calibration_views

    return calibration_views(2, seed=0), calibration_views(8, seed=1), kind


# ---- export and check ------------------------------------------------------------------------------


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote and how closely onnxruntime reproduced lowbit's output.

    max_abs_diff: largest ``|onnxruntime - lowbit|`` over the check inputs' outputs, in the exact session
    (:func:`onnxruntime_session`); rel_diff: that over the largest ``|lowbit|``; argmax_agreement: share of
    output rows (tokens, images) whose argmax agrees. default_rel_diff, default_argmax_agreement: the same for
    onnxruntime's default session, whose 4-bit kernel quantizes activations to int8.
    """

    path: Path
    bytes: int
    quantized_modules: int
    max_abs_diff: float
    rel_diff: float
    argmax_agreement: float
    inputs: tuple[int, ...]
    default_rel_diff: float
    default_argmax_agreement: float

    def describe(self) -> str:
        return (f"{self.path} ({self.bytes / 1e6:.1f} MB, {self.quantized_modules} quantized modules); "
                f"onnxruntime vs lowbit on inputs of shape {self.inputs}: max |diff| {self.max_abs_diff:.3g} "
                f"({self.rel_diff:.2e} of the largest output), argmax agreement {self.argmax_agreement:.2%}; "
                f"onnxruntime's default session: {self.default_rel_diff:.2e}, "
                f"{self.default_argmax_agreement:.2%}")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    kind: str,
    overwrite: bool = False,
    check: torch.Tensor | None = None,
    rtol: float | None = None,
) -> OnnxReport:
    """Write ``model`` (a lowbit-quantized causal LM or image classifier) to ``path`` as QDQ ONNX and check it.

    Args:
        example: the input traced: token ids ``(batch, seq)`` (``kind="causal-lm"``, output: logits) or images
            ``(batch, C, H, W)`` (``kind="image-classifier"``). Batch (and sequence length) stay dynamic; give
            a batch of at least 2 so the exporter does not specialise it to 1.
        check: inputs for the agreement check (default ``example``): the file is run in onnxruntime and
            compared with the model's own (reference path) output.
        rtol: the largest ``max |diff| / max |output|`` accepted; above it nothing is written. Default: 1e-3
            for weight-only models; 0.1 when activations are quantized, since there float rounding inside the
            runtime moves a few activation codes across a rounding tie and deep networks amplify that (on
            EfficientNet-Lite0 W8A8 it comes to about 3% of the largest logit, the same as lowbit's own int8
            kernels against its reference path).
    Returns:
        an :class:`OnnxReport`.
    Raises:
        InputError: a module ONNX cannot hold, ``path`` exists without ``overwrite``, the exporter failed, or
            onnxruntime's output disagrees beyond ``rtol``. Nothing is left at ``path`` then.
    """
    dest = check_destination(path, overwrite, file=True)
    if not dest.parent.is_dir():
        raise InputError(f"the folder of {dest} does not exist")
    if kind not in ("causal-lm", "image-classifier"):
        raise InputError(f"ONNX export handles causal-lm and image-classifier models, not {kind!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InputError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); `make install` installs them")
    model.eval()
    net = (CausalLMLogits(model) if kind == "causal-lm" else model).eval()
    check = example if check is None else check
    found = check_onnx(model)
    n_quant = len(found)
    if rtol is None:
        rtol = 0.1 if any(m.act is not None for _, m in found) else 1e-3
    state_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if state_bytes > _MAX_BYTES:
        raise InputError(f"the model's state is {state_bytes / 1e9:.2f} GB; lowbit writes ONNX as one file, which "
                         "protobuf limits to 2 GB (external data files are not written yet)")
    with torch.no_grad(), _reference_path(model):
        expected = net(check).float()  # lowbit's reference path, whatever kernels the model runs
    if kind == "causal-lm":
        names, dynamic = ["input_ids"], ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    else:
        names, dynamic = ["pixel_values"], ({0: torch.export.Dim("batch")},)
    log.info("exporting %d quantized module(s) to ONNX (tracing with torch.onnx.export)", n_quant)
    with atomic_file(dest) as tmp:  # renamed to dest once checked; an OSError becomes an InputError
        with export_view(model), torch.no_grad(), _quiet_exporter():
            try:
                torch.onnx.export(net, (example,), tmp, dynamo=True, opset_version=OPSET, external_data=False,
                                  input_names=names, output_names=["logits"], dynamic_shapes=dynamic,
                                  custom_translation_table=translations(), optimize=True)
            except InputError:
                raise
            except Exception as e:  # the exporter's own errors are long; keep the first lines
                first = "\n".join(str(e).strip().splitlines()[:6])
                raise InputError(f"torch.onnx.export failed on this model ({type(e).__name__}): {first}") from e
        _finish(tmp)
        log.info("checking the ONNX file in onnxruntime on inputs of shape %s", tuple(check.shape))
        got = torch.from_numpy(_run_onnxruntime(tmp, names[0], check)).float()
        diff, rel, agree = _compare(got, expected)
        default = _compare(torch.from_numpy(_run_onnxruntime(tmp, names[0], check, exact=False)).float(), expected)
        if not rel <= rtol:
            raise InputError(f"onnxruntime's output differs from lowbit's by {rel:.3g} of the largest output "
                             f"(max |diff| {float(diff.max()):.3g}; limit {rtol:g}); the ONNX file was not written")
    return OnnxReport(dest, dest.stat().st_size, n_quant, float(diff.max()), rel, agree, tuple(check.shape),
                      default[1], default[2])


def _compare(got: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``(|diff|, max |diff| / max |expected|, share of rows whose argmax agrees)``."""
    diff = (got - expected).abs()
    rel = float(diff.max()) / max(float(expected.abs().max()), 1e-12)
    agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    return diff, rel, agree


_MAX_BYTES = 1_900_000_000  # under protobuf's 2 GiB message limit, with room for the graph


@contextlib.contextmanager
def _reference_path(model: nn.Module) -> Iterator[None]:
    """Kernels detached for the duration (the ONNX file is checked against lowbit's reference path)."""
    from lowbit.nn.base import KERNEL_ATTR

    held = [(m, m.__dict__.pop(KERNEL_ATTR)) for m in model.modules() if KERNEL_ATTR in m.__dict__]
    try:
        yield
    finally:
        for m, k in held:
            object.__setattr__(m, KERNEL_ATTR, k)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines and warns about its own internals; keep them at debug."""
    import io
    import warnings
    from contextlib import redirect_stdout

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if buf.getvalue():
            log.debug("exporter output:\n%s", buf.getvalue())


def _finish(path: Path) -> None:
    """Tidy the exporter's file: 4-bit initializers as packed raw bytes (the exporter's constant folding
    leaves some as ``Cast(uint8 initializer, to=UINT4)`` and writes others as one varint per byte pair, 1.5x
    the size), and no per-node debugging metadata (stack traces)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    packed: list[Any] = []
    keep = []
    for n in g.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        src = n.input[0] if n.op_type == "Cast" and n.input else None
        if to == TensorProto.UINT4 and src in inits and inits[src].data_type == TensorProto.UINT8:
            arr = numpy_helper.to_array(inits[src])
            if arr.size and int(arr.max()) > 15:
                raise InputError(f"initializer {src} holds codes above 15 but is cast to UINT4")
            packed.append(onnx.helper.make_tensor(n.output[0], TensorProto.UINT4, arr.shape, arr.ravel().tolist()))
            users[src] -= 1
            continue
        del n.metadata_props[:]
        keep.append(n)
    if len(keep) != len(g.node):
        kept = [onnx.NodeProto() for _ in keep]
        for new, old in zip(kept, keep):
            new.CopyFrom(old)
        del g.node[:]
        g.node.extend(kept)
    g.initializer.extend(packed)
    tensors = list(g.initializer)
    out = []
    for t in tensors:
        if users.get(t.name, 1) == 0:
            continue  # a uint8 source now stored as UINT4
        if t.data_type in (TensorProto.UINT4, TensorProto.INT4) and not t.raw_data:
            t = numpy_helper.from_array(numpy_helper.to_array(t), t.name)  # packed, two codes per byte
        out.append(t)
    del g.initializer[:]
    g.initializer.extend(out)
    onnx.save(m, str(path))


def onnxruntime_session(path: str | os.PathLike[str], exact: bool = True, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path``.

    onnxruntime's optimizer turns each ``DequantizeLinear -> MatMul`` into its ``MatMulNBits`` kernel. By
    default that kernel quantizes the activations to int8 on the fly (accuracy level 4), which lowbit's
    weight-only model does not do; ``exact=True`` asks it for float activations (level 1) instead, so the
    session computes the same function as lowbit, still on the packed 4-bit kernel.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    if exact:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnxruntime could not load {path}: {str(e).splitlines()[0]}") from e


def _run_onnxruntime(path: Path, input_name: str, x: torch.Tensor, exact: bool = True) -> Any:
    s = onnxruntime_session(path, exact)
    try:
        return s.run(None, {input_name: x.numpy()})[0]
    except Exception as e:
        raise InputError(f"onnxruntime could not run the exported model: {str(e).splitlines()[0]}") from e
