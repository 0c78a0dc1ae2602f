"""Quantized layer modules of a :class:`~ioso_tvm.calib.qmodel.QuantModel` (fake-quant float32).

Every NPU layer ends in its output :class:`ActQuantizer` (``outq``), which also applies the
layer's ReLU / ReLU6 as clip bounds. A calibration method (IOSO, BRECQ, QFT, ...) only
changes the learnable state of these modules: ``QLayer.wq`` (weight scale / rounding),
``QLayer.isg`` (input-channel groups), ``QLayer.oso_scale`` / ``oso_offset`` (OSO) and the
``outq.step`` of every op. Deploy mode and the export read the same state through
``QLayer.integer_params``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .isg import ISG, shift_add_ste
from .quantizers import ActQuantizer, WeightQuantizer, round_ste


class NotDeployableError(ValueError):
    """The calibrated model uses a feature the NPU's integer contract cannot express."""


class QInput(nn.Module):
    """Network input quantizer (signed, ``bits`` wide). Input (N, C, H, W) float32."""

    kind = "input"

    def __init__(self, name: str, bits: int) -> None:
        super().__init__()
        self.name = name
        self.outq = ActQuantizer(bits, None)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outq(x)


class QLayer(nn.Module):
    """Conv2d (``kind="conv"``) or Linear (``kind="linear"``) with weight quantizer, ISG, OSO, act quantizer.

    Fake-quant forward: ``outq(oso_scale * (conv(x * gamma_isg, s_w * W_int) + bias) + oso_offset)``; with
    its input quantizer set (:meth:`set_input_quantizer`) and hardened groups, ``conv(x * gamma_isg, ...)``
    becomes the NPU's floored group shifter on the integer partial sums (``_shifted_acc``), so the
    output integers equal deploy mode's (tests/test_calib_isg.py).
    Weight (K, C/groups, KH, KW) or (K, C) and bias (K,) are float32 buffers (BN already folded).
    """

    def __init__(self, module: nn.Conv2d | nn.Linear, name: str, wbits: int, abits: int,
                 cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.name = name
        self.kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        w = module.weight.detach().float().clone()
        k = w.shape[0]
        self.register_buffer("weight", w)
        b = module.bias.detach().float().clone() if module.bias is not None else torch.zeros(k)
        self.register_buffer("bias", b)
        if self.kind == "conv":
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"layer {name!r}: only numeric zero padding is supported, got {module.padding!r}")
            self.stride, self.padding = tuple(module.stride), tuple(module.padding)
            self.dilation, self.groups = tuple(module.dilation), int(module.groups)
            cin = module.in_channels
        else:
            self.stride, self.padding, self.dilation, self.groups = (1, 1), (0, 0), (1, 1), 1
            cin = module.in_features
        self.in_channels = cin
        self.wq = WeightQuantizer(w, wbits)
        self.isg = ISG(cin, cfg)
        self.oso_scale = nn.Parameter(torch.ones(k))
        self.oso_offset = nn.Parameter(torch.zeros(k))
        self.oso_after_act = False  # ablation (CalibConfig.oso_position): fake-quant only, not deployable
        self.outq = ActQuantizer(abits, None)
        self.__dict__["_inq"] = None  # see set_input_quantizer

    def set_input_quantizer(self, q: ActQuantizer | None) -> None:
        """The quantizer of this layer's input tensor (it belongs to the producing op, so it is kept outside
        the module tree: no state_dict entry). With it and hardened groups, ``pre_act`` shifts the integer
        partial sums of each group as the NPU does (floor, :func:`~ioso_tvm.calib.isg.shift_add_ste`)."""
        self.__dict__["_inq"] = q

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "conv":
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, b)

    def _shape(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if self.kind == "conv" else v.view(1, -1)

    def _shifted_acc(self, x: torch.Tensor, inq: ActQuantizer) -> torch.Tensor:
        """``conv(x, W)`` through the NPU's group shifter: per hardened ISG group the integer partial sum
        D1 = conv(x / s_x, W_int) over its input channels, ``D1 + sign * floor(D1 * 2^-n)``, summed, times
        s_x * s_w, plus bias (the integer path of ``deploy.IntLayer.acc``, floor with a straight-through
        gradient)."""
        s_x = inq.step.abs()
        xi, wi = round_ste(x / s_x), self.wq.integer(self.weight)  # x is on the grid: round drops the ulps
        cfg, d2 = self.isg.cfg, None
        for g, sign in enumerate(cfg.isg_group_signs):
            chans = torch.nonzero(self.isg.groups == g).flatten()
            if chans.numel() == 0:
                continue
            if self.groups > 1:  # grouped conv: mask the other channels
                mask = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
                mask[chans] = 1
                d1 = self._op(xi * mask.view(1, -1, 1, 1), wi, None)
            else:
                d1 = self._op(xi[:, chans], wi[:, chans], None)
            sh = shift_add_ste(d1, sign, cfg.isg_shift)
            d2 = sh if d2 is None else d2 + sh
        return d2 * (s_x * self._shape(self.wq.scale)) + self._shape(self.bias)

    def pre_act(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the activation quantizer (float32)."""
        inq = self.__dict__.get("_inq")
        if inq is not None and inq.enabled and self.isg.hard and bool(self.isg.groups.any()):
            y = self._shifted_acc(x, inq)
            if self.oso_after_act:
                return y
            return y * self._shape(self.oso_scale) + self._shape(self.oso_offset)
        w = self.wq(self.weight)
        if self.isg.r is not None or bool(self.isg.groups.any()):
            # ISG scales input channel c; applied to the weights' input-channel axis (same product,
            # and the gradient of gamma then needs no extra backward pass through the input).
            g = self.isg.gamma()
            if self.groups > 1:  # grouped conv: weights have no full input-channel axis
                x = x * g.view(1, -1, 1, 1)
            else:
                w = w * (g.view(1, -1, 1, 1) if self.kind == "conv" else g.view(1, -1))
        y = self._op(x, w, self.bias)
        if self.oso_after_act:
            return y
        return y * self._shape(self.oso_scale) + self._shape(self.oso_offset)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original float layer (no quantization, no ISG/OSO), with its activation."""
        return self.outq.float_act(self._op(x, self.weight, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre_act(x)
        if self.oso_after_act:  # outq(gamma_z * act(y) + phi_z): outq clips to the act's range again
            y = self.outq.float_act(y) * self._shape(self.oso_scale) + self._shape(self.oso_offset)
        return self.outq(y)

    @torch.no_grad()
    def integer_params(self) -> dict[str, np.ndarray]:
        """Hardened integer state as numpy: ``w_int`` int8, ``s_w`` / ``bias`` / ``oso_scale`` /
        ``oso_offset`` / ``gamma`` float32, ``isg_groups`` int64 (C,). The one source that
        deploy mode and the ONNX export read."""
        if not self.isg.hard:
            raise RuntimeError(f"layer {self.name!r}: ISG groups are not hardened yet")
        if self.oso_after_act and self.outq.act is not None:
            raise NotDeployableError(
                f"layer {self.name!r}: OSO after the activation needs a per-channel clamp that the NPU's "
                "NORM/ACT/QUANT does not have; this model runs in fake-quant only (QuantModel.forward)")
        w_int = self.wq.integer(self.weight, hard=True)
        return {
            "w_int": w_int.cpu().numpy().astype(np.int8),
            "s_w": self.wq.scale.cpu().numpy().astype(np.float32),
            "bias": self.bias.cpu().numpy().astype(np.float32),
            "oso_scale": self.oso_scale.detach().cpu().numpy().astype(np.float32),
            "oso_offset": self.oso_offset.detach().cpu().numpy().astype(np.float32),
            "isg_groups": self.isg.groups.cpu().numpy().astype(np.int64),
            "gamma": self.isg.gamma().detach().cpu().numpy().astype(np.float32),
        }


class QAdd(nn.Module):
    """Residual add ``outq(a + b)`` (ReLU fused into ``outq`` when the model has one)."""

    kind = "add"

    def __init__(self, name: str, abits: int) -> None:
        super().__init__()
        self.name = name
        self.outq = ActQuantizer(abits, None)

    def float_forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.outq.float_act(a + b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.outq(a + b)


class QGlobalAvgPool(nn.Module):
    """Global average pool (N, C, H, W) -> (N, C, 1, 1), then ``outq``."""

    kind = "gap"

    def __init__(self, name: str, abits: int) -> None:
        super().__init__()
        self.name = name
        self.outq = ActQuantizer(abits, None)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outq(x.mean((2, 3), keepdim=True))


class QMaxPool(nn.Module):
    """Max pool; keeps its input's quantizer (no ``outq``)."""

    kind = "maxpool"

    def __init__(self, module: nn.MaxPool2d, name: str) -> None:
        super().__init__()
        self.name = name
        def pair(v):
            return ((v, v) if isinstance(v, int) else tuple(v))
        self.kernel, self.stride, self.padding = pair(module.kernel_size), pair(module.stride), pair(module.padding)
        if module.dilation not in (1, (1, 1)) or module.ceil_mode:
            raise ValueError(f"layer {name!r}: MaxPool2d with dilation or ceil_mode is not supported")

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)

    forward = float_forward


class QFlatten(nn.Module):
    """Flatten (N, C, 1, 1) -> (N, C): layout only."""

    kind = "flatten"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)

    forward = float_forward
