"""The QFT offline subgraph: every deployment constant as a differentiable function of the DoF.

Paper: QFT (``papers/002``) Sec. 3.3, Eq. 2-4, 9-12, App. A-B; the numeric contract is
``hw_model/reference.py``. Between modules flows the integer *operand* ``q - zp`` of each
quantized tensor, as a float32 torch tensor with integer values (gradients by the
straight-through estimator). A quantized tensor (:class:`TensorQ`) has a per-tensor scale
``s`` and a per-channel vector scale ``a`` (the cross-layer DoF, ``S_a`` of Eq. 12):
real = s * a[c] * (q - zp). ``a`` is trainable only where it folds into this NPU (see
``docs/qft.md``), else fixed to 1.

Conv / linear (:class:`QFTLayer`), weights W (K, C/groups, ...), bias (K,):
    left scale  L[c] = 1 / a_in[c]            (Eq. 12, folded into the producer's NORM)
    right scale R[k] = f * a_out[k]  (layerwise) or free R[k] (channelwise)
    W_int = clip(round(W / (L[c] R[k])))      (int8 storage, symmetric b-bit grid)
    m[k]  = s_in * R[k] / (s_out * a_out[k]);  b[k] = bias[k] / (s_out * a_out[k]) + zp_out
    q     = clip(round(fl(fl(acc * m) + b)), lo, hi)          (NORM + ACT + QUANT)
The online forward evaluates exactly these float32 operations, so it equals the deploy path.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from ioso_tvm.calib.isg import ISG
from ioso_tvm.calib.qft_init import qmax


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round a float64 constant once to float32 (the deployed value), keeping the gradient."""
    return x.to(torch.float32)


class TensorQ(nn.Module):
    """One quantized activation tensor: bits, signedness, zp, trainable log scale, vector scale a (C,)."""

    def __init__(self, scale: float, zp: int, bits: int, signed: bool, channels: int, vector: bool) -> None:
        super().__init__()
        self.bits, self.signed, self.zp, self.channels = int(bits), bool(signed), int(zp), int(channels)
        self.log_s = nn.Parameter(torch.tensor(float(np.log(scale)), dtype=torch.float64))
        if vector:
            self.log_a = nn.Parameter(torch.zeros(channels, dtype=torch.float64))
        else:
            self.register_buffer("log_a", torch.zeros(channels, dtype=torch.float64))

    @property
    def vector(self) -> bool:
        return isinstance(self.log_a, nn.Parameter)

    def s(self) -> torch.Tensor:
        """Deployed per-tensor scale, float32 value (kept as float64 for exact constant folding)."""
        return torch.exp(self.log_s).to(torch.float32).to(torch.float64)

    def a(self) -> torch.Tensor:
        return torch.exp(self.log_a)

    def bounds(self, act: str | None = None) -> tuple[int, int]:
        return ref.clip_bounds(self.bits, self.signed, act, float(self.s().detach()), self.zp)

    @property
    def dtype(self):
        return np.int8 if self.signed else np.uint8


class InputQuant(nn.Module):
    """CPU-side QuantizeLinear of the float model input; returns the operand q - zp."""

    def __init__(self, out: TensorQ) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.out.bounds()
        t = x.to(torch.float32) / self.out.s().to(torch.float32)
        return torch.clamp(round_ste(t) + self.out.zp, lo, hi) - self.out.zp

    def reference(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.out.bounds()
        return ref.quantize(x, float(self.out.s().detach()), self.out.zp, lo, hi, self.out.dtype)


class QFTLayer(nn.Module):
    """Conv2d or Linear with fused ReLU / ReLU6 clip, deployable as one NPU MAC layer."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, t_in: TensorQ, t_out: TensorQ, act: str | None,
                 wbits: int, mode: str, name: str, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        if mode not in ("layerwise", "channelwise"):
            raise ValueError(f"mode must be 'layerwise' or 'channelwise', got {mode!r}")
        self.name, self.act, self.wbits, self.mode = name, act, int(wbits), mode
        qmax(self.wbits)
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"layer {name!r}: only explicit zero padding is supported")
            self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
            self.dilation, self.groups = tuple(layer.dilation), int(layer.groups)
        else:
            self.groups = 1
        self.t_in, self.t_out = t_in, t_out
        w = layer.weight.detach().to(torch.float64).clone()
        k = w.shape[0]
        self.weight = nn.Parameter(w)
        b = layer.bias.detach() if layer.bias is not None else torch.zeros(k)
        self.bias = nn.Parameter(b.to(torch.float64).clone())
        n_r = 1 if mode == "layerwise" else k
        self.log_r = nn.Parameter(torch.zeros(n_r, dtype=torch.float64))
        cin = layer.in_channels if self.is_conv else layer.in_features
        self.isg = ISG(cin, cfg)  # hard, all channels in the unity group unless init_soft() is called

    def set_right_scale(self, r: torch.Tensor) -> None:
        """Initialise the right scale(s): scalar f (layerwise) or (K,) (channelwise), > 0."""
        with torch.no_grad():
            self.log_r.copy_(torch.log(torch.as_tensor(r, dtype=torch.float64)).reshape(self.log_r.shape))

    def left_expanded(self) -> torch.Tensor:
        """a_in laid out like the weight's input-channel axis: (K, C/groups) (grouped convs index by group)."""
        k, cg = self.weight.shape[:2]
        a = self.t_in.a().reshape(self.groups, cg)
        return a.repeat_interleave(k // self.groups, dim=0)

    def right(self) -> torch.Tensor:
        r = torch.exp(self.log_r)
        return r * self.t_out.a() if self.mode == "layerwise" else r.expand(self.weight.shape[0])

    def constants(self) -> dict[str, torch.Tensor]:
        """Differentiable deployment constants: w_int (float, integer values), s_w, g, bias (float32
        values), m, b (float32). m and b follow ``hw_model.reference.norm_constants`` operation by
        operation (float64 from float32 inputs, one final rounding) with s_w = R, OSO scale g = 1 / a_out."""
        shape = [-1] + [1] * (self.weight.dim() - 1)
        eff = self.weight * self.left_expanded().reshape(self.weight.shape[:2] + (1,) * (self.weight.dim() - 2))
        s_w = _f32(self.right()).to(torch.float64)
        q = qmax(self.wbits)
        w_int = torch.clamp(round_ste(eff / s_w.reshape(shape)), -q, q).to(torch.float32)
        g = _f32(1.0 / self.t_out.a()).to(torch.float64)
        bias = _f32(self.bias).to(torch.float64)
        s_out = self.t_out.s()
        m = _f32(g * s_w * self.t_in.s() / s_out)
        b = _f32((g * bias + 0.0) / s_out + self.t_out.zp)
        return {"w_int": w_int, "s_w": s_w, "g": g, "bias": bias, "m": m, "b": b}

    def _acc(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return nn.functional.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        return nn.functional.linear(x, w)

    def _isg_acc(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """D2 = sum over hard groups of shift-add(D1) (contract ISG), gradient as x * gamma."""
        view = [1, -1] + [1] * (x.dim() - 2)
        signs, n = self.isg.cfg.isg_group_signs, self.isg.cfg.isg_shift
        d2 = torch.zeros((), dtype=x.dtype)
        for g in range(len(signs)):
            mask = (self.isg.groups == g).to(x.dtype).reshape(view)
            if not bool(mask.any()):
                continue
            d1 = self._acc(x * mask, w)
            d2 = d2 + (d1 if signs[g] == 0 else d1 + signs[g] * torch.floor(d1 / 2 ** n))
        smooth = self._acc(x * self.isg.gamma().to(x.dtype).reshape(view), w)
        return smooth + (d2 - smooth).detach()

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        c = self.constants()
        w = c["w_int"]
        if exact:  # float64 accumulation is exact for any int8 x int9 layer of this size
            x, w = x.to(torch.float64), w.to(torch.float64)
        # float32 is exact while |partial sums| < 2**24 (always so for 4-bit weights, 8-bit acts)
        if not self.isg.hard:  # soft ISG (training): input channels scaled by the mixed factor
            acc = self._acc(x * self.isg.gamma().to(x.dtype).reshape([1, -1] + [1] * (x.dim() - 2)), w)
        elif bool((self.isg.groups != 0).any()) or self.isg.cfg.isg_group_signs[0] != 0:
            acc = self._isg_acc(x, w)
        else:
            acc = self._acc(x, w)
        acc = acc.to(torch.float32)
        shape = [1, -1] + [1] * (acc.dim() - 2)
        t = acc * c["m"].reshape(shape)
        t = t + c["b"].reshape(shape)
        lo, hi = self.t_out.bounds(self.act)
        return torch.clamp(round_ste(t), lo, hi) - self.t_out.zp

    def export(self) -> dict[str, np.ndarray | int]:
        """Integer weights (int8), NORM m / b (float32 (K,)), clip bounds and zero points, as numpy."""
        with torch.no_grad():
            c = self.constants()
        lo, hi = self.t_out.bounds(self.act)
        return {"w": c["w_int"].numpy().astype(np.int8), "m": c["m"].numpy().astype(np.float32),
                "b": c["b"].numpy().astype(np.float32), "lo": lo, "hi": hi, "zp_in": self.t_in.zp,
                "zp_out": self.t_out.zp, "s_out": np.float32(self.t_out.s().detach())}

    def reference(self, x: np.ndarray) -> np.ndarray:
        e = self.export()
        groups, cfg = self.isg.groups.numpy(), self.isg.cfg
        if not self.is_conv:
            return ref.linear(x, e["zp_in"], e["w"], e["m"], e["b"], e["lo"], e["hi"], self.t_out.dtype,
                              isg_groups=groups, cfg=cfg)
        p = self.padding
        return ref.conv2d(x, e["zp_in"], e["w"], e["m"], e["b"], e["lo"], e["hi"], self.t_out.dtype,
                          stride=self.stride, pads=(p[0], p[1], p[0], p[1]), dilation=self.dilation,
                          groups=self.groups, isg_groups=groups, cfg=cfg)


class QFTAdd(nn.Module):
    """Residual add with requantization (contract: Element-wise add); inputs have a = 1."""

    def __init__(self, t_a: TensorQ, t_b: TensorQ, t_out: TensorQ, act: str | None, name: str = "add") -> None:
        super().__init__()
        self.name = name
        self.t_a, self.t_b, self.t_out, self.act = t_a, t_b, t_out, act

    def constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _f32(self.t_a.s() / self.t_out.s()), _f32(self.t_b.s() / self.t_out.s())

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        ma, mb = self.constants()
        t = (xa * ma + xb * mb) + float(self.t_out.zp)
        lo, hi = self.t_out.bounds(self.act)
        return torch.clamp(round_ste(t), lo, hi) - self.t_out.zp

    def reference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            ma, mb = (v.numpy() for v in self.constants())
        lo, hi = self.t_out.bounds(self.act)
        return ref.add(a, self.t_a.zp, ma, b, self.t_b.zp, mb, np.float32(self.t_out.zp), lo, hi, self.t_out.dtype)


class QFTAvgPool(nn.Module):
    """Global average pool (contract: Pooling), input a = 1."""

    def __init__(self, t_in: TensorQ, t_out: TensorQ, name: str = "avgpool") -> None:
        super().__init__()
        self.name = name
        self.t_in, self.t_out = t_in, t_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = x.shape[2] * x.shape[3]
        m = _f32(self.t_in.s() / (self.t_out.s() * window))
        t = x.sum(dim=(2, 3), keepdim=True) * m + float(self.t_out.zp)
        lo, hi = self.t_out.bounds()
        return torch.clamp(round_ste(t), lo, hi) - self.t_out.zp

    def reference(self, x: np.ndarray) -> np.ndarray:
        window = x.shape[2] * x.shape[3]
        with torch.no_grad():
            m = _f32(self.t_in.s() / (self.t_out.s() * window)).numpy()
        b = np.float32(self.t_out.zp)
        lo, hi = self.t_out.bounds()
        return ref.global_avg_pool(x, self.t_in.zp, m, b, lo, hi, self.t_out.dtype)


class QFTNet(nn.Module):
    """A traced network of QFT modules; ``forward`` returns the real output s * (q - zp) (float32)."""

    def __init__(self, gm: fx.GraphModule, t_final: TensorQ) -> None:
        super().__init__()
        self.gm, self.t_final = gm, t_final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x) * self.t_final.s().to(torch.float32)

    def qft_layers(self) -> dict[str, QFTLayer]:
        return {m.name: m for m in self.gm.modules() if isinstance(m, QFTLayer)}

    def tensors(self) -> list[TensorQ]:
        return [m for m in self.modules() if isinstance(m, TensorQ)]

    @torch.no_grad()
    def deploy(self, x: torch.Tensor) -> torch.Tensor:
        """Integer deploy evaluation in torch (float64 accumulation): the stored output integers q."""
        interp = _ExactInterpreter(self.gm)
        return interp.run(x) + self.t_final.zp

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The same network through ``hw_model.reference`` on numpy: the stored output integers q."""
        return _ReferenceInterpreter(self.gm).run(np.asarray(x, np.float32))


class _ExactInterpreter(fx.Interpreter):
    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if isinstance(mod, QFTLayer):
            return mod(*args, exact=True)
        return super().call_module(target, args, kwargs)


class _ReferenceInterpreter(fx.Interpreter):
    """Runs the graph on stored integers through hw_model.reference (passthrough ops on numpy)."""

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if isinstance(mod, (InputQuant, QFTLayer, QFTAdd, QFTAvgPool)):
            return mod.reference(*args)
        if isinstance(mod, nn.Identity):
            return args[0]
        if isinstance(mod, nn.Flatten):
            return args[0].reshape(args[0].shape[0], -1)
        if isinstance(mod, Passthrough):
            return mod.reference(*args)
        raise TypeError(f"module {target!r} ({type(mod).__name__}) has no reference implementation")


class Passthrough(nn.Module):
    """ReLU on a quantized tensor (clamp at zp) or max pool: same tensor scale in and out."""

    def __init__(self, kind: str, t: TensorQ, pool: nn.MaxPool2d | None = None) -> None:
        super().__init__()
        self.kind, self.t, self.pool = kind, t, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) if self.kind == "relu" else self.pool(x)

    def reference(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "relu":
            return np.maximum(x, np.asarray(self.t.zp, x.dtype))
        p, k, s = self.pool.padding, self.pool.kernel_size, self.pool.stride
        p = (p, p) if isinstance(p, int) else p
        k = (k, k) if isinstance(k, int) else k
        s = (s, s) if isinstance(s, int) else s
        return ref.max_pool2d(x, k, s, (p[0], p[1], p[0], p[1]))


ADD_TARGETS = (operator.add, torch.add)
