"""Int8 convolution chains for CNNs: BatchNorm folded into the int8 convolution before it, the activation
fused into that convolution's output, and the output written directly as the next convolution's input codes.

``use_kernels`` gives each convolution the oneDNN int8 kernel (``conv-int8-onednn``), which takes float in
and gives float out: between two of them the model still runs BatchNorm, the activation and a quantize pass
in float, over the whole activation tensor each. :func:`int8_conv_graph` traces the model (``torch.fx``,
lowbit's quantized modules as leaves) and rewrites, for every such convolution ``A``:

* ``A -> BatchNorm2d`` (eval mode, running statistics, ``A``'s only user): the BatchNorm becomes part of
  ``A``'s per-channel weight scale and bias (``c = gamma / sqrt(var + eps)``: ``s_w * c``, ``c * b + beta -
  c * mean``). Exact in real arithmetic: the int8 codes do not change, only the float factors oneDNN applies
  to the int32 accumulator.
* then ``-> ReLU / ReLU6 / Hardtanh`` (the only user): fused into the kernel (oneDNN post-op).
* then ``-> B``, another int8 convolution that is the only user: ``A`` writes uint8 codes with ``B``'s input
  scale and zero point (``round(y / t_B) + zp_B``, saturated: exactly ``B``'s own input quantizer), and ``B``
  reads them without a float round trip; ``B``'s input padding pads with the code of 0.0.

* ``A -> [BatchNorm] -> add(., r) -> [ReLU]`` (a residual add, ``A`` without activation): the add becomes
  oneDNN's ``sum`` post-op (``sum_relu`` with the ReLU): ``A`` accumulates onto ``r`` in the same kernel. When
  ``r`` arrives as uint8 codes (its producer writes them, see below) the sum is computed on them and, if the
  add's result can be written as codes, written as codes: the residual stream stays integer between blocks.

A convolution's output is written as uint8 codes when exactly one of its users reads codes and every other
user is a fused residual add taking it as ``r``. A reader is an int8 convolution (whose input quantizer sets the
scale and zero point); after a clipped activation (ReLU6), a global average pool before a linear with static
integer activations (``lowbit.kernels.int8_head``: the codes span the clip range, the pool averages them and
requantizes once to the linear's input codes, the linear multiplies those: the classifier end is integer too);
or a channel concatenation (``torch.cat(..., dim=1)``) of such outputs that only one int8 convolution reads
(each branch writes that convolution's codes, and the concatenation joins codes).

With the fused adds, the first kind makes an inverted-residual network's stream (EfficientNet, MobileNetV2)
integer: each block's sum feeds the next block's expansion convolution and the next add. There the integer
graph quantizes the residual stream, as integer runtimes do, where the reference path adds in float: the sums
differ from the reference by the stream's rounding (at most half a code step per add), which the agreement
measured at the end reports.

What remains float: the first convolution's input, the outputs that feed anything else (a pool or classifier
not as above, a residual add that cannot be fused) and every module that is not part of such a pattern. The
result is a ``torch.fx.GraphModule`` that shares the model's modules (their kernels' packed weights are not
copied); the model itself is left as it was. Convolutions that take no part are listed in the report with the
reason (not on the int8 kernel, or 8-bit activations on a CPU without VNNI, where that kernel is not exact:
``cpu_features``; 7-bit activations run everywhere). A link clips ``A``'s output to the values ``B``'s codes
represent before writing them (one oneDNN post-op with the activation), as ``B``'s own quantizer clamps.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.kernels import conv_int8, int8_head
from lowbit.kernels.dispatch import kernel_name
from lowbit.nn.base import KERNEL_ATTR, QuantModule
from lowbit.nn.conv import QuantConv2d

log = logging.getLogger(__name__)

KERNEL = "conv-int8-onednn"
_ACT_FUNCTIONS = {F.relu: ("relu", []), torch.relu: ("relu", []), F.relu6: ("hardtanh", [0.0, 6.0])}
_ADDS = (operator.add, torch.add)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


@dataclass
class ConvGraphReport:
    """What :func:`int8_conv_graph` fused: BatchNorms folded (their names), activations fused into a
    convolution, and int8 links (convolution pairs that pass uint8 codes), each as ``(producer, consumer)``;
    ``declined``: each quantized convolution left out (and each classifier whose pool stays float), with the
    reason; ``heads``: the classifiers that read pooled codes."""

    folded: list[str] = field(default_factory=list)
    activations: int = 0
    links: list[tuple[str, str]] = field(default_factory=list)
    convs: int = 0
    declined: dict[str, str] = field(default_factory=dict)
    adds: list[str] = field(default_factory=list)  # residual adds fused into the convolution before them
    integer_adds: list[str] = field(default_factory=list)  # those of them summing uint8 codes
    heads: list[str] = field(default_factory=list)  # linears fed by an integer global pool of codes (classifiers)

    def describe(self) -> str:
        text = (f"{self.convs} int8 convolution(s): {len(self.folded)} BatchNorm(s) folded, {self.activations} "
                f"activation(s) fused, {len(self.links)} int8-to-int8 link(s), {len(self.adds)} residual add(s) "
                f"fused ({len(self.integer_adds)} on uint8 codes)")
        if self.heads:
            text += f", {len(self.heads)} classifier(s) on pooled codes ({', '.join(self.heads)})"
        reasons: dict[str, list[str]] = {}
        for name, why in self.declined.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            text += f"; not chained: {names[0]}{more} ({why})"
        return text


class FusedInt8Conv(nn.Module):
    """An int8 convolution with its folded BatchNorm, fused activation and requantized output (see module doc)."""

    def __init__(self, conv: QuantConv2d, fold: nn.BatchNorm2d | None, post: tuple[str, list],
                 out_q: tuple[float, int, tuple[float, float], int] | None, codes_in: bool,
                 add: "_Add | None" = None) -> None:
        super().__init__()
        self.conv = conv
        st = conv.__dict__[KERNEL_ATTR].state
        w_scale = st["w_scale"].clone()
        bias = conv.bias.detach().float().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        if fold is not None:
            c = fold.weight.detach().float() / torch.sqrt(fold.running_var.float() + fold.eps) \
                if fold.affine else 1.0 / torch.sqrt(fold.running_var.float() + fold.eps)
            beta = fold.bias.detach().float() if fold.affine else torch.zeros_like(c)
            w_scale = w_scale * c
            bias = bias * c + beta - c * fold.running_mean.float()
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("fused_bias", bias)
        self.post, self.out_q, self.codes_in, self.add = post, out_q, codes_in, add
        # writing the next layer's codes: the output clipped to what they represent first, as that layer's own
        # quantizer clamps its codes (for fewer than 8 bits the uint8 range is wider than the codes')
        self.link_post = post if out_q is None else _clipped(post, out_q[2])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        m = self.conv
        packed = m.__dict__.get(KERNEL_ATTR)
        if packed is None or packed.kernel.name != KERNEL:
            raise InputError("a convolution of this int8 graph lost its int8 kernel (release_kernels, a new weight "
                             "or a move); run use_kernels and int8_conv_graph again")
        st = packed.state
        if self.codes_in:
            if x.dtype != torch.uint8:
                raise InputError(f"{type(self).__name__} expected uint8 codes from the previous int8 layer, got {x.dtype}")
            codes = conv_int8.pad_codes(m, st, x)
        else:
            codes = conv_int8.input_codes(m, st, x)
        output = (1.0, 0, torch.float32) if self.out_q is None else (self.out_q[0], self.out_q[1], torch.uint8)
        if self.add is not None:
            return self._sum(m, st, codes, residual, output)
        y = conv_int8.conv_codes(m, st, codes, w_scale=self.w_scale, bias=self.fused_bias, output=output,
                                 post=self.link_post)
        return y if self.out_q is not None or x.dtype == torch.uint8 else y.to(x.dtype)

    def _sum(self, m: QuantConv2d, st: dict, codes: torch.Tensor, residual: torch.Tensor | None,
             output: tuple[float, int, torch.dtype]) -> torch.Tensor:
        """The convolution accumulated onto ``residual`` (oneDNN's ``sum`` post-op, which writes into it)."""
        add = self.add
        if residual is None:
            raise InputError(f"{type(self).__name__} with a fused residual add was called without the residual")
        if add.residual_q is not None and residual.dtype != torch.uint8:
            raise InputError(f"{type(self).__name__} expected the residual as uint8 codes, got {residual.dtype}")
        if tuple(residual.shape) != _out_shape(m, codes):  # a broadcast operand: the add in float
            return self._float_sum(m, st, codes, residual)
        fresh = False  # whether residual is a tensor of this call's own, free to write into
        if self.out_q is None:  # float sum: oneDNN takes a float residual with scale 1
            dtype, (a_scale, a_zp) = torch.float32, (1.0, 0)
            if add.residual_q is not None:
                residual, fresh = _dequantize(residual, add.residual_q), True
        else:
            dtype, (a_scale, a_zp) = torch.uint8, add.residual_q
        if add.clone and not fresh or residual.dtype != dtype \
                or not residual.is_contiguous(memory_format=torch.channels_last):
            residual = residual.to(dtype=dtype, memory_format=torch.channels_last, copy=True)
        y = torch.ops.onednn.qconv2d_pointwise.binary(
            codes, st["x_scale"], st["x_zp"], st["weight"], self.w_scale, st["w_zp"], residual, self.fused_bias,
            list(m.stride), list(m.padding), list(m.dilation), m.groups, output[0], output[1], output[2], a_scale,
            a_zp, "sum", 1.0, "relu" if add.relu else "none", [], "")
        if self.out_q is not None and self.out_q[3] < 255:  # codes of fewer than 8 bits: the consumer's clamp
            y.clamp_(max=self.out_q[3])
        return y

    def _float_sum(self, m: QuantConv2d, st: dict, codes: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The same sum without the post-op: float convolution output plus the (dequantized) residual, then the
        ReLU and the output codes as planned."""
        y = conv_int8.conv_codes(m, st, codes, w_scale=self.w_scale, bias=self.fused_bias)
        y = y + (residual.float() if self.add.residual_q is None else _dequantize(residual, self.add.residual_q))
        if self.add.relu:
            y = y.relu()
        if self.out_q is None:
            return y
        t, zp, _, qmax = self.out_q
        return torch.round(y / t + zp).clamp_(0, qmax).to(torch.uint8)

    def extra_repr(self) -> str:
        add = "" if self.add is None else f", add={'codes' if self.add.residual_q else 'float'}"
        return f"post={self.post[0]}, out={'uint8' if self.out_q else 'float'}, codes_in={self.codes_in}{add}"


def _dequantize(codes: torch.Tensor, q: tuple[float, int]) -> torch.Tensor:
    """uint8 ``codes`` of ``q = (scale, zero_point)`` as the float values they represent (a new tensor)."""
    return (codes.float() - q[1]).mul_(q[0])


def _out_shape(m: QuantConv2d, codes: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``m``'s output for its (padded) input ``codes``."""
    hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
          zip(codes.shape[2:], m.padding, m.dilation, m.kernel_size, m.stride)]
    return (codes.shape[0], m.out_channels, *hw)


@dataclass(frozen=True)
class _Add:
    """A residual add fused into the convolution before it: the residual's codes' ``(scale, zero_point)`` (None:
    it arrives as float), a ReLU after the add, and whether the residual must be copied first (the kernel
    writes into it: copied when a later node still reads it or it does not come from a convolution of the
    graph, so it may be the caller's tensor or a view of another)."""

    residual_q: tuple[float, int] | None
    relu: bool
    clone: bool


def int8_conv_graph(model: nn.Module, residual_adds: bool = True) -> tuple[fx.GraphModule, ConvGraphReport]:
    """A traced copy of ``model`` whose int8 convolutions are fused into chains (see the module docstring).
    ``residual_adds=False`` leaves residual adds in float (the graph then equals the reference path up to
    requantization rounding; the residual stream is not integer).

    Call after ``lowbit.kernels.use_kernels(model)``: only convolutions on the ``conv-int8-onednn`` kernel
    take part, and none with 8-bit activations on a CPU without VNNI (the report's ``declined`` says why). The
    model must be in eval mode.

    Raises:
        InputError: the model is in training mode or ``torch.fx`` cannot trace it (data-dependent control
            flow); the message carries the tracer's reason.
    """
    if model.training:
        raise InputError("int8_conv_graph needs the model in eval mode (BatchNorm folding uses running statistics)")
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise InputError(f"torch.fx cannot trace {type(model).__name__}, so its convolutions cannot be chained: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    report = ConvGraphReport()

    def module(n: fx.Node) -> nn.Module | None:
        return modules.get(n.target) if n.op == "call_module" else None

    why_not = {n: _why_not_fused(m) for n in graph.nodes if isinstance(m := module(n), QuantConv2d)}

    def input_state(reader: fx.Node) -> dict:  # scale, zero point and bits of the codes a reader takes
        return heads[reader][2] if reader in heads else module(reader).__dict__[KERNEL_ATTR].state

    def is_int8_conv(n: fx.Node) -> bool:
        return n in why_not and why_not[n] is None

    plans: dict[fx.Node, dict] = {}
    for n in graph.nodes:
        if n in why_not and why_not[n] is not None:
            report.declined[n.target] = why_not[n]
        if is_int8_conv(n):
            report.convs += 1
            plans[n] = _chain(n, modules, residual_adds)
    claimed: dict[fx.Node, fx.Node] = {}  # add node -> the convolution it is fused into (one per add)
    for n, plan in plans.items():
        if plan["add"] is not None and plan["add"] in claimed:
            plan.update(_unclaimed(n, plan))
        elif plan["add"] is not None:
            claimed[plan["add"]] = n
    residual_of = {plan["add"]: plan["residual"] for plan in plans.values() if plan["add"] is not None}
    order = {node: i for i, node in enumerate(graph.nodes)}
    ends = {plan["end"]: n for n, plan in plans.items()}
    heads = _heads(graph, modules, plans, ends, report)
    cats = _concats(graph, plans, ends, is_int8_conv)
    writes: dict[fx.Node, fx.Node] = {}  # convolution -> the reader (convolution, pool) whose codes it writes
    for n in sorted(plans, key=lambda c: order[plans[c]["end"]]):  # a residual's producer is decided first
        plan, end = plans[n], plans[n]["end"]
        users = list(end.users)
        readers = [cats.get(u, u) for u in users
                   if is_int8_conv(u) and u.args[0] is end and len(u.args) == 1 and not u.kwargs
                   or u in heads and u.args[0] is end or u in cats]
        sums = [u for u in users if residual_of.get(u) is end]
        residual_codes = plan["add"] is None or ends.get(plan["residual"]) in writes
        if len(readers) == 1 and len(readers) + len(sums) == len(users) and residual_codes:
            writes[n] = readers[0]
    consumers = set(writes.values())
    adds: dict[fx.Node, _Add] = {}  # decided before any node is replaced (the graph's users change below)
    for n, plan in plans.items():
        if plan["add"] is not None:
            r, producer = plan["residual"], ends.get(plan["residual"])
            rst = input_state(writes[producer]) if producer in writes else None
            residual_q = None if rst is None else (float(rst["x_scale"]), int(rst["x_zp"]))
            later = any(order[u] > order[plan["add"]] for u in r.users if u is not plan["add"])
            # a residual from anything but a convolution of this graph may be the caller's tensor or a view of
            # one (the input, a reshape): never written into
            adds[n] = _Add(residual_q, plan["relu_after_add"], later or producer is None)
    replaced: dict[fx.Node, fx.Node] = {}  # a chain's last node -> the fused module's node
    for n, plan in plans.items():
        if plan["fold"] is None and plan["post"][0] == "none" and n not in writes and n not in consumers \
                and plan["add"] is None:
            continue  # nothing to gain: keep the module's own kernel call
        conv = module(n)
        out_q = None
        if n in writes:
            nst = input_state(writes[n])
            out_q = (float(nst["x_scale"]), int(nst["x_zp"]), conv_int8.code_range(nst), 2 ** nst["x_bits"] - 1)
            reader = writes[n] if writes[n] not in heads else heads[writes[n]][1]
            report.links.append((n.target, reader.target))
        add = adds.get(n)
        if add is not None:
            report.adds.append(str(plan["add"].name))
            if add.residual_q is not None and out_q is not None:
                report.integer_adds.append(str(plan["add"].name))
        fused = FusedInt8Conv(conv, None if plan["fold"] is None else plan["fold"][1], plan["post"], out_q,
                              codes_in=n in consumers, add=add)
        if plan["fold"] is not None:
            report.folded.append(plan["fold"][0])
        report.activations += plan["post"][0] != "none"
        name = "int8_" + n.target.replace(".", "_")
        gm.add_submodule(name, fused)
        last = plan["end"]
        args = n.args if add is None else (n.args[0], replaced.get(plan["residual"], plan["residual"]))
        with graph.inserting_after(last):
            new = graph.call_module(name, args, n.kwargs)
        last.replace_all_uses_with(new)
        replaced[last] = new
        for old in reversed([n, *plan["chain"]]):
            graph.erase_node(old)
    for pool in consumers & heads.keys():  # the classifier end on codes: integer pool, integer linear
        _, linear, st = heads[pool]
        out = int8_head.codes_reader_state(module(linear))
        mean = int8_head.CodeMeanPool(int8_head.pool_keepdim(pool, modules), (st["x_scale"], st["x_zp"]),
                                      (out["x_scale"], out["x_zp"], 2 ** out["x_bits"] - 1))
        _replace(gm, pool, f"int8_pool_{len(report.heads)}", mean, (pool.args[0],))
        _replace(gm, linear, "int8_" + linear.target.replace(".", "_"), int8_head.Int8LinearCodes(module(linear)),
                 linear.args)
        report.heads.append(linear.target)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    (log.warning if report.declined and not report.convs else log.info)("int8 conv graph: %s", report.describe())
    return gm.eval(), report


def _heads(graph: fx.Graph, modules: dict[str, nn.Module], plans: dict[fx.Node, dict], ends: dict[fx.Node, fx.Node],
           report: ConvGraphReport) -> dict[fx.Node, tuple[list[fx.Node], fx.Node, dict]]:
    """Global pools that can average the codes of the int8 convolution before them for a linear reading codes
    (``lowbit.kernels.int8_head``): pool -> (pass-through nodes, linear, the codes the convolution writes). A
    convolution whose output is unbounded has no range for those codes: its linear is reported as declined."""
    heads = {}
    for n in graph.nodes:
        found = int8_head.pooled_linear(n, modules) if n.args and isinstance(n.args[0], fx.Node) else None
        producer = ends.get(n.args[0]) if found is not None else None
        if producer is None:
            continue
        post = plans[producer]["post"]
        if post[0] != "hardtanh" or plans[producer]["add"] is not None:
            report.declined[found[1].target] = "the pooled input comes from an unbounded activation (ReLU or none): " \
                                               "no range for codes before the pool, so the pool stays float"
            continue
        bits = modules[found[1].target].act.spec.bits
        heads[n] = (*found, int8_head.pool_input_state((post[1][0], post[1][1]), bits))
    return heads


def _concats(graph: fx.Graph, plans: dict[fx.Node, dict], ends: dict[fx.Node, fx.Node], is_int8_conv
             ) -> dict[fx.Node, fx.Node]:
    """Channel concatenations of int8 convolutions' outputs read only by one int8 convolution: ``torch.cat``
    node -> that reader. Each input is a convolution chain's end (without a residual add) that only the
    concatenation reads, so every producer can write the reader's codes and the concatenation joins codes."""
    cats = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not torch.cat or not n.args:
            continue
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        parts = n.args[0]
        users = list(n.users)
        if dim != 1 or not isinstance(parts, (list, tuple)) or len(users) != 1 or not is_int8_conv(users[0]) \
                or users[0].args != (n,) or users[0].kwargs:
            continue
        if all(isinstance(p, fx.Node) and p in ends and plans[ends[p]]["add"] is None and list(p.users) == [n]
               for p in parts):
            cats[n] = users[0]
    return cats


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, args: tuple) -> None:
    """Put ``module`` (registered as ``name``) called on ``args`` in place of ``node``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _chain(n: fx.Node, modules: dict[str, nn.Module], residual_adds: bool = True) -> dict:
    """What follows int8 convolution ``n``, each step the only user of the one before: an eval-mode BatchNorm
    (``fold``), an activation (``post``) or else a residual add (``add``, with the other operand ``residual``)
    and a ReLU after it. ``chain``: the nodes the fused module replaces; ``end``: the last of them (or ``n``)."""
    plan = {"chain": [], "fold": None, "post": ("none", []), "add": None, "residual": None, "relu_after_add": False}
    cur = n

    def only_user(node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    u = only_user(cur)
    bn = modules.get(u.target) if u is not None and u.op == "call_module" else None
    if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None \
            and not bn.training and u.args[0] is cur:
        plan["fold"], cur = (u.target, bn), u
        plan["chain"].append(cur)
    u = only_user(cur)
    post = _post_op(u, modules) if u is not None and u.args and u.args[0] is cur else None
    if post is not None:
        plan["post"], cur = post, u
        plan["chain"].append(cur)
    elif residual_adds and u is not None and u.op == "call_function" and u.target in _ADDS and len(u.args) == 2 \
            and not u.kwargs and all(isinstance(a, fx.Node) for a in u.args) and u.args[0] is not u.args[1]:
        plan["add"], plan["residual"], cur = u, u.args[1] if u.args[0] is cur else u.args[0], u
        plan["chain"].append(cur)
        u = only_user(cur)
        if u is not None and u.args and u.args[0] is cur and _post_op(u, modules) == ("relu", []):
            plan["relu_after_add"], cur = True, u
            plan["chain"].append(cur)
    plan["end"] = cur
    return plan


def _unclaimed(n: fx.Node, plan: dict) -> dict:
    """Convolution ``n``'s ``plan`` without the residual add (another convolution of the add took it)."""
    chain = plan["chain"][:plan["chain"].index(plan["add"])]
    return {"add": None, "residual": None, "relu_after_add": False, "chain": chain, "end": chain[-1] if chain else n}


def _why_not_fused(m: QuantConv2d) -> str | None:
    """None if ``m`` runs the int8 kernel on a CPU where it is exact, else why it stays out of the graph."""
    why = conv_int8.why_not(m)  # checked here too: a kernel attached elsewhere (another CPU) must not be chained
    if why is None and kernel_name(m) != KERNEL:
        why = f"it runs {kernel_name(m) or 'the reference path'}, not {KERNEL} (call use_kernels first)"
    return why


def _clipped(post: tuple[str, list], bounds: tuple[float, float]) -> tuple[str, list]:
    """``post`` followed by a clip to ``bounds``, as one oneDNN post-op (ReLU and Hardtanh are clips too)."""
    lo, hi = bounds
    if post[0] == "relu":
        lo = max(lo, 0.0)
    elif post[0] == "hardtanh":
        lo, hi = max(lo, post[1][0]), min(hi, post[1][1])
    return ("hardtanh", [lo, max(lo, hi)])


def _post_op(n: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, list] | None:
    """The oneDNN post-op computing node ``n`` (an activation of its first argument), or None."""
    if n.op == "call_module":
        m = modules.get(n.target)
        if isinstance(m, nn.ReLU6):
            return ("hardtanh", [0.0, 6.0])
        if isinstance(m, nn.ReLU):
            return ("relu", [])
        if isinstance(m, nn.Hardtanh):
            return ("hardtanh", [float(m.min_val), float(m.max_val)])
        return None
    if n.op == "call_function" and n.target in _ACT_FUNCTIONS and len(n.args) == 1 and not n.kwargs:
        return _ACT_FUNCTIONS[n.target]
    return None
