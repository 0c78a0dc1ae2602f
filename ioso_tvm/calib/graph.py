"""Capture a float model with ``torch.fx`` and derive the quantized program and its reconstruction blocks.

The model is traced symbolically (``torch.fx.symbolic_trace``, as MQBench and PyTorch's FX
quantization do) and its graph is read node by node; module classes and names are not used
to find structure (only to name blocks). Understood nodes, as modules or functional calls:

- Conv2d, Linear (modules): one quantized layer each. A module called more than once is refused
  with the fix (each call needs its own quantizers and rounding); parameter-free modules
  (ReLU, pools, ...) may be called any number of times.
- ReLU / ReLU6: ``nn.ReLU``, ``nn.ReLU6``, ``F.relu``, ``torch.relu``, ``F.relu6``, ``x.relu()``;
  fused into the conv / linear / add / concat before them.
- residual add: ``x + y``, ``x += y``, ``torch.add(x, y)``, ``x.add(y)`` of two tensors.
- channel concat: ``torch.cat([a, b, ...], 1)`` (a :class:`QConcat` with its own quantizer).
- global average pool: ``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, an
  ``nn.AvgPool2d`` / ``F.avg_pool2d`` whose window covers the whole map, ``x.mean((2, 3))``
  (``keepdim=False`` adds a flatten).
- max pool: ``nn.MaxPool2d``, ``F.max_pool2d``.
- flatten to (N, features): ``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.flatten(1)``,
  ``x.view(x.size(0), -1)``, ``x.reshape(...)``, ``torch.reshape``; checked on the shapes.
- removed (eval): ``nn.Identity``, ``nn.Dropout``, ``F.dropout``, ``x.contiguous()``; shape
  arithmetic (``x.size(0)``, ``x.shape``) that only feeds a reshape.

Blocks (:func:`find_blocks`): the program is cut wherever exactly one tensor, the output of the
step before the cut, is alive across it (a single-input single-output region, as the engine's
block chain needs). The finest such cut gives the layer-wise blocks; a residual block (the
region between a fork and the add that joins it), an inverted residual with a skip and the
branches of a concat cannot be cut and stay whole. Block-wise reconstruction additionally joins
a depthwise conv with the pointwise convs right before and after it (an inverted residual
without skip, MobileNetV2).
"""
from __future__ import annotations

import operator
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .qmodules import QAdd, QFlatten, QGlobalAvgPool, QInput, QLayer, QMaxPool
from .quantizers import ActQuantizer


@dataclass
class Step:
    """One op of the program: ``outputs[out] = ops[op](*inputs)``; tensors are named by strings."""

    op: str
    inputs: list[str]
    out: str


@dataclass
class Block:
    """Consecutive program steps ``[start, stop)`` reconstructed together; one input tensor, one output."""

    name: str
    start: int
    stop: int
    inp: str
    out: str
    layers: list[str] = field(default_factory=list)


class QConcat(nn.Module):
    """Channel concat ``outq(cat(xs, dim=1))`` of (N, C_i, H, W) tensors; requantizes to one scale."""

    kind = "concat"

    def __init__(self, name: str, abits: int, act: str | None) -> None:
        super().__init__()
        self.name = name
        self.outq = ActQuantizer(abits, act)

    def pre_quant(self, *xs: torch.Tensor) -> torch.Tensor:
        """The float tensor the output quantizer sees (for its MSE initialisation)."""
        return torch.cat(xs, 1)

    def float_forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.outq.float_act(torch.cat(xs, 1))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.outq(torch.cat(xs, 1))


# ------------------------------------------------------------------------------------ capture
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())
_STATIC_HINT = ("the quantizer needs one static graph for every input: make the branch or loop static (decide it "
                "from attributes set in __init__, not from tensor values or shapes), or move the "
                "data-dependent part out of forward()")


def _user_frame(frames: list[traceback.FrameSummary]) -> str:
    """' in f() at file:line: `code`' of the deepest frame outside torch and this module, or ''."""
    for f in reversed(frames):
        path = str(Path(f.filename).resolve())
        if not path.startswith(_TORCH_DIR) and path != _THIS:
            return f" in {f.name}() at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"
    return ""


def capture(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` GraphModule of ``model`` with source lines recorded; an untraceable model raises one
    ValueError naming the line of ``forward`` and what to change."""
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types; one clear error instead
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {type(model).__name__} cannot be captured by torch.fx"
                         f"{_user_frame(traceback.extract_tb(e.__traceback__))}: {msg}; {_STATIC_HINT}") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _where(node: fx.Node) -> str:
    """' at file:line: `code`' of the node's source line (from the recorded stack trace), or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', node.stack_trace or "")
    for path, line, _, code in reversed(frames):
        if not str(Path(path).resolve()).startswith(_TORCH_DIR):
            return f" at {path}:{line}: `{code.strip()}`"
    return ""


# ------------------------------------------------------------------------------------ convert
_RELU_FNS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ADD_FNS = (operator.add, operator.iadd, torch.add)
_PASS_FNS = (F.dropout,)
_PASS_METHODS = ("contiguous",)
_RESHAPE_METHODS = ("flatten", "view", "reshape")
_SUPPORTED = ("Conv2d, Linear, ReLU / ReLU6 (module or F.relu / F.relu6), residual add (x + y, torch.add), "
              "torch.cat on channels, global average pool (AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d, global "
              "avg_pool2d, x.mean((2, 3))), MaxPool2d / F.max_pool2d, flatten to (N, features) (Flatten, "
              "torch.flatten, x.flatten(1), x.view(x.size(0), -1), x.reshape), Identity, Dropout")


def _shape(node) -> tuple[int, ...] | None:
    """Shape recorded by ShapeProp for a tensor node (batch 2), None for non-tensors."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _arg(node: fx.Node, pos: int, name: str, default=None):
    """Positional-or-keyword argument ``name`` (position ``pos``) of a call node."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _label(node: fx.Node) -> str:
    """The module path of a module call, else the fx node name."""
    return str(node.target) if node.op == "call_module" else node.name


def owner(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    """Innermost enclosing module of ``node`` that is neither a Sequential nor the node's own module
    (used to name blocks only)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    own = node.target if node.op == "call_module" else None
    for path, _ in reversed(stack):
        if path == own or path not in mods:
            continue
        if not isinstance(mods[path], nn.Sequential):
            return path
    return ""


class _Converter:
    """Walks the fx graph and fills ``ops`` / ``program`` / ``owners`` (one owner per step)."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, wbits: int, abits: int, cfg: NPUConfig) -> None:
        self.gm, self.wbits, self.abits, self.cfg = gm, wbits, abits, cfg
        self.mods = dict(model.named_modules())  # the model's own containers (GraphModule makes plain ones)
        self.ops: dict[str, nn.Module] = {}
        self.program: list[Step] = []
        self.owners: list[str] = []
        self.alias: dict[fx.Node, str] = {}
        self.producer: dict[str, str] = {}
        self.output: str | None = None

    def fail(self, node: fx.Node, why: str) -> ValueError:
        return ValueError(f"layer {_label(node)!r}{_where(node)}: {why}")

    def src(self, node: fx.Node, arg) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.alias:
            raise self.fail(node, f"input {arg!r} is not a tensor the quantizer follows; supported: {_SUPPORTED}")
        return self.alias[arg]

    def add_op(self, key: str, mod: nn.Module, inputs: list[str], node: fx.Node) -> str:
        key = key.replace(".", "/")  # ModuleDict keys cannot hold dots; op.name keeps the module path
        if key in self.ops and not isinstance(mod, QLayer):  # a parameter-free module used again: one op per call
            key = node.name
        if key in self.ops:
            kind = type(self.mods.get(str(node.target), mod)).__name__
            raise ValueError(f"module {node.target!r} ({kind}) is called more than once in forward; each call "
                             "needs its own quantizer: give every call its own module "
                             f"(e.g. self.{node.target}_2 = copy.deepcopy(self.{node.target})){_where(node)}")
        self.ops[key] = mod
        self.program.append(Step(key, inputs, key))
        self.owners.append(owner(node, self.mods))
        self.alias[node] = self.producer[key] = key
        return key

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.visit(node)
        if self.output is None:
            raise ValueError("model graph has no output")

    def visit(self, node: fx.Node) -> None:  # noqa: C901 - one dispatch table over fx node kinds
        mod = self.mods.get(node.target) if node.op == "call_module" else None
        fn = node.target if node.op == "call_function" else None
        meth = node.target if node.op == "call_method" else None
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            if self.ops:
                raise ValueError(f"model has more than one input ({node.name!r}); only one is supported")
            self.add_op("input", QInput("input", 8), [], node)
            self.program[-1] = Step("input", ["input"], "input_q")
            self.alias[node], self.producer["input_q"] = "input_q", "input"
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise self.fail(node, "the model must return one tensor (got a tuple / dict)")
            self.output = self.src(node, node.args[0])
        elif _shape(node) is None and node.op != "get_attr":  # x.size(0), x.shape[...]: only feeds reshapes
            return
        elif isinstance(mod, (nn.ReLU, nn.ReLU6)) or fn in _RELU_FNS or meth in ("relu", "relu_"):
            self.relu(node, "relu6" if isinstance(mod, nn.ReLU6) or fn is F.relu6 else "relu")
        elif isinstance(mod, (nn.Identity, nn.Dropout)) or fn in _PASS_FNS or meth in _PASS_METHODS:
            self.alias[node] = self.src(node, node.args[0])
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                raise self.fail(node, f"padding_mode {mod.padding_mode!r} not supported")
            label = str(node.target)
            self.add_op(label, QLayer(mod, label, self.wbits, self.abits, self.cfg), [self.src(node, node.args[0])],
                        node)
        elif (fn in _ADD_FNS or meth == "add") and len(tensors) == 2 and len(node.args) == 2 \
                and "alpha" not in node.kwargs:
            self.add_op(node.name, QAdd(node.name, self.abits), [self.src(node, a) for a in node.args], node)
        elif fn in (torch.cat, torch.concat):
            self.concat(node)
        elif self.is_global_pool(node, mod, fn, meth):
            self.global_pool(node)
        elif isinstance(mod, nn.MaxPool2d) or fn is F.max_pool2d:
            self.max_pool(node, mod)
        elif isinstance(mod, nn.Flatten) or fn in (torch.flatten, torch.reshape) or meth in _RESHAPE_METHODS:
            self.flatten(node)
        else:
            target = getattr(node.target, "__name__", node.target)
            what = type(mod).__name__ if mod is not None else f"{node.op} {target}"
            raise ValueError(f"unsupported layer {_label(node)!r} ({what}){_where(node)} for the NPU quantizer; "
                             f"supported: {_SUPPORTED}")

    def relu(self, node: fx.Node, act: str) -> None:
        src = self.src(node, node.args[0])
        op = self.ops.get(self.producer.get(src, ""))
        if not isinstance(op, (QLayer, QAdd, QConcat)) or op.outq.act is not None or len(node.args[0].users) != 1:
            raise self.fail(node, f"a ReLU must directly follow a conv, linear, add or concat with no other user "
                                  f"(got it after {src!r})")
        op.outq.act = act
        self.alias[node] = src

    def concat(self, node: fx.Node) -> None:
        parts, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        shape = _shape(node)
        if not isinstance(parts, (list, tuple)) or dim not in (1, 1 - len(shape)):
            raise self.fail(node, f"only a channel concat (dim=1) of a list of tensors is supported, got dim={dim}")
        inputs = [self.src(node, p) for p in parts]
        acts = [getattr(getattr(self.ops.get(self.producer.get(t, "")), "outq", None), "act", None) for t in inputs]
        act = "relu" if all(a in ("relu", "relu6") for a in acts) else None  # all parts >= 0: unsigned output
        self.add_op(node.name, QConcat(node.name, self.abits, act), inputs, node)

    def is_global_pool(self, node: fx.Node, mod, fn, meth) -> bool:
        """Average pools whose output is (N, C, 1, 1) or a mean over dims (2, 3) of a 4-D tensor."""
        src, out = _shape(node.args[0]) if node.args else None, _shape(node)
        if isinstance(mod, nn.AdaptiveAvgPool2d) or fn is F.adaptive_avg_pool2d:
            return src is not None and len(src) == 4 and out[2:] == (1, 1)
        if isinstance(mod, nn.AvgPool2d) or fn is F.avg_pool2d:  # global: the window covers the whole map
            kernel = mod.kernel_size if mod is not None else _arg(node, 1, "kernel_size")
            pad = mod.padding if mod is not None else _arg(node, 3, "padding", 0)
            kernel = tuple(kernel) if isinstance(kernel, (list, tuple)) else (kernel, kernel)
            return (src is not None and len(src) == 4 and kernel == src[2:] and out[2:] == (1, 1)
                    and pad in (0, (0, 0), [0, 0]))
        if meth == "mean" or fn is torch.mean:
            dims = _arg(node, 1, "dim")
            dims = sorted(d % 4 for d in dims) if isinstance(dims, (list, tuple)) and src and len(src) == 4 else None
            return dims == [2, 3]
        return False

    def global_pool(self, node: fx.Node) -> None:
        src = self.src(node, node.args[0])
        if len(_shape(node)) == 4:
            self.add_op(node.name, QGlobalAvgPool(node.name, self.abits), [src], node)
            return
        pooled = self.add_op(node.name + "_pool", QGlobalAvgPool(node.name, self.abits), [src], node)
        self.add_op(node.name, QFlatten(node.name + "_flatten"), [pooled], node)

    def max_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is None:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            kw = {n: _arg(node, i + 1, n) for i, n in enumerate(names) if _arg(node, i + 1, n) is not None}
            if kw.get("return_indices"):
                raise self.fail(node, "max_pool2d with return_indices=True is not supported")
            mod = nn.MaxPool2d(**kw)
        label = str(node.target) if node.op == "call_module" else node.name
        self.add_op(label, QMaxPool(mod, label), [self.src(node, node.args[0])], node)

    def flatten(self, node: fx.Node) -> None:
        src_shape, out = _shape(node.args[0]), _shape(node)
        features = 1
        for d in (src_shape or ())[1:]:
            features *= d
        if src_shape is None or len(src_shape) < 2 or out != (src_shape[0], features):
            raise self.fail(node, f"reshape {src_shape} -> {out} is not a flatten to (N, features); only "
                                  "x.flatten(1) / x.view(x.size(0), -1) style reshapes are supported")
        if len(src_shape) == 2:  # already (N, features): nothing to do
            self.alias[node] = self.src(node, node.args[0])
            return
        label = str(node.target) if node.op == "call_module" else node.name
        self.add_op(label, QFlatten(label), [self.src(node, node.args[0])], node)


def convert(model: nn.Module, input_shape: tuple[int, ...], wbits: int, abits: int,
            cfg: NPUConfig = DEFAULT_CONFIG) -> tuple[dict[str, nn.Module], list[Step], str, list[str]]:
    """Trace ``model`` (float, BN folded, eval) and convert it: (ops, program, output tensor, owners).

    Shapes come from one float run on zeros of shape (2, *input_shape) (``torch.fx`` ShapeProp)."""
    gm = capture(model)
    try:
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise ValueError(f"model {type(model).__name__} does not run on inputs of shape (N, "
                         f"{', '.join(map(str, input_shape))}): {type(e).__name__}: {e}") from None
    conv = _Converter(model, gm, wbits, abits, cfg)
    conv.run()
    return conv.ops, conv.program, conv.output, conv.owners


# ------------------------------------------------------------------------------------- blocks
def cut_points(program: list[Step], output: str | None = None) -> list[int]:
    """Boundaries k (0 < k < len) where the only tensor alive across the cut is ``program[k-1].out``."""
    produced_at = {st.out: i for i, st in enumerate(program)}
    last_use = {t: len(program) for t in ([output] if output else [program[-1].out])}
    for i, st in enumerate(program):
        for t in st.inputs:
            if t in produced_at and produced_at[t] < i:
                last_use[t] = max(last_use.get(t, i), i)
    cuts, alive = [], 0
    born = [0] * (len(program) + 2)
    dies = [0] * (len(program) + 2)
    for t, i in produced_at.items():
        if t in last_use:
            born[i + 1] += 1  # alive from boundary i + 1 to boundary last_use (inclusive)
            dies[last_use[t] + 1] += 1
    for k in range(1, len(program)):
        alive += born[k] - dies[k]
        prev = program[k - 1].out
        if alive == 1 and last_use.get(prev, -1) >= k:
            cuts.append(k)
    return cuts


def _pointwise(op: nn.Module) -> bool:
    return isinstance(op, QLayer) and op.kind == "conv" and op.groups == 1 and tuple(op.weight.shape[2:]) == (1, 1)


def find_blocks(program: list[Step], ops: dict[str, nn.Module], owners: list[str], layerwise: bool,
                output: str | None = None) -> list[Block]:
    """Reconstruction blocks: the finest single-tensor cuts (``layerwise``), and for block-wise methods
    also a depthwise conv joined with the single pointwise convs right before and after it."""
    bounds = [0, *cut_points(program, output), len(program)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    if len(spans) > 1 and program[0].op == "input" and spans[0] == (0, 1):  # input quantizer joins the first block
        spans[:2] = [(0, spans[1][1])]
    if not layerwise:
        spans = _join_inverted_residuals(program, ops, spans)
    blocks: list[Block] = []
    names: set[str] = set()
    for a, b in spans:
        name = owners[a] if (b - a > 1 and owners[a]) else program[b - 1].op
        if name in names:
            name = f"{name}/{program[b - 1].op}"
        names.add(name)
        produced = {program[k].out for k in range(a, b)}
        ins = sorted({t for k in range(a, b) for t in program[k].inputs if t not in produced})
        if len(ins) != 1:  # cut_points guarantees one input; this guards the invariant
            raise ValueError(f"cannot form a single-input block around step {program[a].op!r} (inputs {ins})")
        layers = [program[k].op for k in range(a, b) if isinstance(ops[program[k].op], QLayer)]
        blocks.append(Block(name, a, b, ins[0], program[b - 1].out, layers))
    return blocks


def _join_inverted_residuals(program: list[Step], ops: dict[str, nn.Module],
                             spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join [pointwise] + depthwise + [pointwise] single-step spans into one (an inverted residual without skip)."""
    def single(i: int, test) -> bool:
        a, b = spans[i]
        return b - a == 1 and test(ops[program[a].op])

    def depthwise(op: nn.Module) -> bool:
        return isinstance(op, QLayer) and op.kind == "conv" and op.groups > 1 and op.groups == op.in_channels

    out: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        if single(i, depthwise):
            a, b = spans[i]
            if out and out[-1][1] - out[-1][0] == 1 and _pointwise(ops[program[out[-1][0]].op]):
                a = out.pop()[0]
            if i + 1 < len(spans) and single(i + 1, _pointwise):
                i += 1
                b = spans[i][1]
            out.append((a, b))
        else:
            out.append(spans[i])
        i += 1
    return out
