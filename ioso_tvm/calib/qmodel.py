"""Turn a float torch model into a :class:`QuantModel`: a program of quantized ops plus blocks.

The float model is BN-folded (``ioso_tvm.models.fold_bn``), captured with ``torch.fx`` and
converted node by node by ``graph.convert``: Conv2d, Linear, ReLU / ReLU6 (module or functional;
fused into the preceding conv / linear / add / concat), residual add, channel concat, global
average pool (module, ``F.adaptive_avg_pool2d``, global ``F.avg_pool2d``, ``x.mean((2, 3))``),
max pool, flatten / view / reshape to (N, features), Identity / Dropout (eval: removed). Anything
else raises ValueError naming the node and its source line; an untraceable model (data-dependent
control flow) raises one ValueError naming the line and what to change.

Blocks (for reconstruction) come from the graph (``graph.find_blocks``): the program is cut
wherever a single tensor is alive; residual blocks, inverted residuals and concat branches stay
whole, and block-wise methods join a depthwise conv with its pointwise neighbours. Module names
only name the blocks (the innermost enclosing non-``Sequential`` module).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .device import module_device
from .graph import Block, Step, capture, convert, find_blocks
from .qmodules import QAdd, QGlobalAvgPool, QInput, QLayer
from .quantizers import ActQuantizer, WeightQuantizer, check_bits

__all__ = ["Block", "QuantModel", "Step", "build_qmodel", "check_calib_data"]


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
                elif hasattr(op, "pre_quant"):  # graph.QConcat
                    pre = op.pre_quant(*args)
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
    try:
        folded = fold_bn(model)
    except Exception:  # noqa: BLE001 - fold_bn traces the model: an untraceable one gets capture's clear error
        capture(model)
        raise
    ops, program, output, owners = convert(folded, tuple(input_shape), wbits, abits, cfg)
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
    for st in program:  # fake-quant then shifts each hardened ISG group's integer partial sum as the NPU does
        if isinstance(ops[st.op], QLayer):
            ops[st.op].set_input_quantizer(_quantizer_of(ops, program, st.inputs[0]))
    blocks = _find_blocks(program, owners, ops, layerwise=False, output=output)
    return QuantModel(ops, program, output, blocks, input_shape, cfg)


def _quantizer_of(ops: dict[str, nn.Module], program: list[Step], tensor: str) -> ActQuantizer:
    st = next(s for s in program if s.out == tensor)
    op = ops[st.op]
    return op.outq if hasattr(op, "outq") else _quantizer_of(ops, program, st.inputs[0])


def _find_blocks(program: list[Step], owners: list[str], ops: dict[str, nn.Module], layerwise: bool | None = None,
                 output: str | None = None) -> list[Block]:
    """Reconstruction blocks of ``program`` from its graph (``graph.find_blocks``); ``owners`` name them.
    ``layerwise`` None: layer-wise when every owner is blank (how the engine asks for AdaRound's blocks),
    else block-wise (BRECQ / QDrop / IOSO)."""
    if layerwise is None:
        layerwise = not any(owners)
    return find_blocks(program, ops, owners, layerwise, output)


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
