"""Turn a float torch model into a :class:`QuantModel`: a program of quantized ops plus blocks.

The float model is BN-folded (``ioso_tvm.models.fold_bn``) and traced with
``torch.fx.symbolic_trace``. Supported nodes: Conv2d, Linear, ReLU / ReLU6 (module or
``F.relu``; fused into the preceding conv / linear / add), ``+`` / ``torch.add`` of two
tensors (residual add), AdaptiveAvgPool2d(1), MaxPool2d, Flatten / ``torch.flatten``,
Identity / Dropout (eval: removed). Anything else raises ValueError naming the layer.

Blocks (for reconstruction): consecutive ops whose innermost enclosing non-``Sequential``
module is the same (a ResNet BasicBlock / Bottleneck, a MobileNetV2 InvertedResidual); ops
directly under the root or under Sequential containers form single-op blocks.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .device import module_device
from .qmodules import QAdd, QFlatten, QGlobalAvgPool, QInput, QLayer, QMaxPool
from .quantizers import ActQuantizer, WeightQuantizer, check_bits


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


_PASS = (nn.Identity, nn.Dropout)


def _owner(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    """Innermost enclosing module of ``node`` that is neither a Sequential nor the node's own module."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    own = node.target if node.op == "call_module" else None
    for path, _ in reversed(stack):
        if path == own or path not in mods:
            continue
        if not isinstance(mods[path], nn.Sequential):
            return path
    return ""


class QuantModel(nn.Module):
    """Quantized model: ``ops`` (ModuleDict of q-modules), ``program`` (list of :class:`Step`),
    ``blocks``, ``output`` (name of the output tensor).

    ``forward(x)`` fake-quant float32 (N, C, H, W) -> logits; ``float_forward(x)`` the float model;
    ``deploy(x)`` integer mode (see ``deploy.py``); ``run(...)`` executes part of the program.
    """

    def __init__(self, ops: dict[str, nn.Module], program: list[Step], output: str, blocks: list[Block],
                 input_shape: tuple[int, ...], cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.ops = nn.ModuleDict(ops)
        self.program = program
        self.output = output
        self.blocks = blocks
        self.input_shape = tuple(input_shape)
        self.cfg = cfg

    # ---------------------------------------------------------------------- structure
    def layers(self) -> list[QLayer]:
        """Conv / linear ops in program order."""
        return [m for m in self.ops.values() if isinstance(m, QLayer)]

    def tensor_quantizer(self, tensor: str) -> ActQuantizer:
        """The activation quantizer that defines ``tensor``'s scale (max pool / flatten pass through)."""
        for st in self.program:
            if st.out == tensor:
                op = self.ops[st.op]
                if hasattr(op, "outq"):
                    return op.outq
                return self.tensor_quantizer(st.inputs[0])
        raise KeyError(f"unknown tensor {tensor!r}")

    def quantizers(self) -> list[ActQuantizer]:
        return [m.outq for m in self.ops.values() if hasattr(m, "outq")]

    def set_act_quant(self, enabled: bool) -> None:
        for q in self.quantizers():
            q.enabled = enabled

    # ------------------------------------------------------------------------ running
    def run(self, env: dict[str, torch.Tensor], start: int = 0, stop: int | None = None,
            quant: bool = True) -> dict[str, torch.Tensor]:
        """Execute steps ``[start, stop)`` on tensors in ``env`` (updated in place and returned).
        ``quant=False`` runs the original float ops."""
        for st in self.program[start:stop]:
            op = self.ops[st.op]
            args = [env[i] for i in st.inputs]
            env[st.out] = op(*args) if quant else op.float_forward(*args)
        return env

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant logits; ``x`` is moved to the model's device."""
        return self.run({"input": self._check_input(x).to(module_device(self))})[self.output]

    @torch.no_grad()
    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run({"input": self._check_input(x).to(module_device(self))}, quant=False)[self.output]

    def integer_model(self):
        """The integer (deploy) model with all constants computed once (``deploy.IntegerModel``)."""
        from .deploy import IntegerModel
        return IntegerModel(self)

    def deploy(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-mode inference (the numeric contract): float32 input -> dequantized float32 logits.
        The integer model is built once and reused until a parameter, buffer or setting changes
        (``deploy.cached_integer_model``)."""
        from .deploy import cached_integer_model
        return cached_integer_model(self)(self._check_input(x))

    # ------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_act_scales(self, x: torch.Tensor, batch: int = 64) -> None:
        """MSE-initialise every activation quantizer from the float model's activations on ``x``."""
        x, device = self._check_input(x), module_device(self)
        stats: dict[str, list[torch.Tensor]] = {}
        for i in range(0, x.shape[0], batch):
            env = {"input": x[i:i + batch].to(device)}
            for st in self.program:
                op = self.ops[st.op]
                args = [env[t] for t in st.inputs]
                if isinstance(op, QLayer):
                    pre = op._op(args[0], op.weight, op.bias)
                elif isinstance(op, QAdd):
                    pre = args[0] + args[1]
                elif isinstance(op, QGlobalAvgPool):
                    pre = args[0].mean((2, 3), keepdim=True)
                elif isinstance(op, QInput):
                    pre = args[0]
                else:
                    pre = None
                if pre is not None:
                    stats.setdefault(st.op, []).append(pre)
                env[st.out] = op.float_forward(*args)
        for name, parts in stats.items():
            self.ops[name].outq.init_scale(torch.cat(parts))


def build_qmodel(model: nn.Module, input_shape: tuple[int, ...], wbits: int, abits: int,
                 first_last_bits: int | None = 8, cfg: NPUConfig = DEFAULT_CONFIG) -> QuantModel:
    """Fold BN, trace and convert ``model`` (float, NCHW input of shape (C, H, W) = ``input_shape``).

    ``first_last_bits`` (default 8; BRECQ/QDrop setting, IOSO journal Sec. IV): bits of the
    network input, the first layer's weights, the last layer's weights, its input and output
    activations; ``None`` uses ``wbits`` / ``abits`` everywhere.
    """
    from ioso_tvm.models import fold_bn

    wbits, abits = check_bits(wbits, "wbits"), check_bits(abits, "abits")
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folded = fold_bn(model)
    try:
        gm = fx.symbolic_trace(folded)
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise ValueError(f"model {type(model).__name__} cannot be traced by torch.fx: {e}") from e
    mods = dict(folded.named_modules())
    ops: dict[str, nn.Module] = {}
    program: list[Step] = []
    owners: list[str] = []
    alias: dict[fx.Node, str] = {}
    producer: dict[str, str] = {}
    output = None

    def name_of(node: fx.Node) -> str:
        return node.name if node.op != "call_module" else str(node.target)

    def add_op(key: str, mod: nn.Module, inputs: list[str], node: fx.Node) -> None:
        key = key.replace(".", "/")  # ModuleDict keys cannot hold dots; op.name keeps the module path
        if key in ops and not isinstance(mod, QLayer):  # a parameter-free module used again: one op per call
            key = node.name
        if key in ops:
            kind = type(mods.get(str(node.target), mod)).__name__
            raise ValueError(f"module {node.target!r} ({kind}) is called more than once in forward; each call "
                             "needs its own quantizer: give every call its own module "
                             f"(e.g. self.{node.target}_2 = copy.deepcopy(self.{node.target}))")
        out = key
        ops[key] = mod
        program.append(Step(key, inputs, out))
        owners.append(_owner(node, mods))
        alias[node] = out
        producer[out] = key

    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        label = name_of(node)
        if node.op == "placeholder":
            if ops:
                raise ValueError(f"model has more than one input ({label!r}); only one is supported")
            add_op("input", QInput("input", 8), [], node)
            program[-1] = Step("input", ["input"], "input_q")
            alias[node] = "input_q"
            producer["input_q"] = "input"
            continue
        if node.op == "output":
            output = alias[node.args[0]]
            continue
        mod = mods.get(node.target) if node.op == "call_module" else None
        is_relu = isinstance(mod, (nn.ReLU, nn.ReLU6)) or (node.op == "call_function" and node.target in (F.relu,
                                                                                                             torch.relu))
        if is_relu:
            src = alias[args[0]]
            op = ops.get(producer.get(src, ""))
            if not isinstance(op, (QLayer, QAdd)) or op.outq.act is not None or len(args[0].users) != 1:
                raise ValueError(f"layer {label!r}: a ReLU must directly follow a conv, linear or add with no "
                                 f"other user (got it after {src!r})")
            op.outq.act = "relu6" if isinstance(mod, nn.ReLU6) else "relu"
            alias[node] = src
        elif isinstance(mod, _PASS):
            alias[node] = alias[args[0]]
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                raise ValueError(f"layer {label!r}: padding_mode {mod.padding_mode!r} not supported")
            add_op(label, QLayer(mod, label, wbits, abits, cfg), [alias[args[0]]], node)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(args) == 2:
            add_op(label, QAdd(label, abits), [alias[a] for a in args], node)
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
            add_op(label, QGlobalAvgPool(label, abits), [alias[args[0]]], node)
        elif isinstance(mod, nn.MaxPool2d):
            add_op(label, QMaxPool(mod, label), [alias[args[0]]], node)
        elif isinstance(mod, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten):
            add_op(label, QFlatten(label), [alias[args[0]]], node)
        else:
            target = getattr(node.target, "__name__", node.target)
            what = type(mod).__name__ if mod is not None else f"{node.op} {target}"
            raise ValueError(f"unsupported layer {label!r} ({what}) for the NPU quantizer; supported: Conv2d, Linear, "
                             "ReLU, ReLU6, residual add, AdaptiveAvgPool2d(1), MaxPool2d, Flatten, Identity, Dropout")
    layers = [k for k, m in ops.items() if isinstance(m, QLayer)]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    if first_last_bits is not None:
        first, last = ops[layers[0]], ops[layers[-1]]
        first.wq = WeightQuantizer(first.weight, first_last_bits)
        last.wq = WeightQuantizer(last.weight, first_last_bits)
        last.outq.bits = first_last_bits
        last_in = next(s for s in program if s.op == layers[-1]).inputs[0]
        _quantizer_of(ops, program, last_in).bits = first_last_bits
        ops["input"].outq.bits = first_last_bits
    else:
        ops["input"].outq.bits = abits
    blocks = _find_blocks(program, owners, ops)
    return QuantModel(ops, program, output, blocks, input_shape, cfg)


def _quantizer_of(ops: dict[str, nn.Module], program: list[Step], tensor: str) -> ActQuantizer:
    st = next(s for s in program if s.out == tensor)
    op = ops[st.op]
    return op.outq if hasattr(op, "outq") else _quantizer_of(ops, program, st.inputs[0])


def _find_blocks(program: list[Step], owners: list[str], ops: dict[str, nn.Module]) -> list[Block]:
    """Group consecutive steps by owner; a group with more than one outside input is split into single steps."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(program):
        j = i + 1
        if owners[i]:
            while j < len(program) and owners[j] == owners[i]:
                j += 1
        spans.append((i, j))
        i = j
    if len(spans) > 1 and program[0].op == "input":  # the input quantizer joins the first block
        spans[:2] = [(0, spans[1][1])]
    def ext_inputs(a: int, b: int) -> list[str]:
        produced = {program[k].out for k in range(a, b)}
        return sorted({t for k in range(a, b) for t in program[k].inputs if t not in produced})

    merged: list[tuple[int, int]] = []
    for a, b in spans:  # a span with several outside inputs (a residual add) swallows its predecessors
        while len(ext_inputs(a, b)) > 1 and merged:
            a = merged.pop()[0]
        merged.append((a, b))
    blocks: list[Block] = []
    for a, b in merged:
        ins = ext_inputs(a, b)
        if len(ins) != 1:
            raise ValueError(f"cannot form a single-input block around step {program[a].op!r} (inputs {ins})")
        name = owners[a] if (b - a > 1 and owners[a]) else program[b - 1].op
        layers = [program[k].op for k in range(a, b) if isinstance(ops[program[k].op], QLayer)]
        blocks.append(Block(name, a, b, ins[0], program[b - 1].out, layers))
    return blocks


def check_calib_data(data: torch.Tensor | np.ndarray, input_shape: tuple[int, ...] | None,
                     min_samples: int) -> torch.Tensor:
    """Validate calibration data: float (N, C, H, W), finite, N >= ``min_samples``."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"calib_data must be a torch.Tensor or numpy array, got {type(data).__name__}")
    if not (data.is_floating_point() or data.is_complex()):
        raise TypeError(f"calib_data has dtype {data.dtype}, not float model inputs: convert raw images the way the "
                        "model was trained (e.g. ioso_tvm.datasets.to_model_input(images), or x.float() / 255 "
                        "and the training normalisation)")
    if data.is_complex():
        raise TypeError(f"calib_data has dtype {data.dtype}; pass real float32 model inputs")
    if data.dim() != 4:
        raise ValueError(f"calib_data must have shape (N, C, H, W), got {tuple(data.shape)}")
    if input_shape is not None and tuple(data.shape[1:]) != tuple(input_shape):
        raise ValueError(f"calib_data samples have shape {tuple(data.shape[1:])}, the model expects {input_shape}")
    data = data.float()
    if not torch.isfinite(data).all():
        raise ValueError("calib_data contains NaN or Inf values")
    if data.shape[0] < min_samples:
        raise ValueError(f"calib_data has {data.shape[0]} samples, at least {min_samples} are needed")
    return data
