"""Shared helpers of the calibration tests: tiny nets, randomised quantized state, the numpy reference walk."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hw_model import reference as ref


class TinyRes(nn.Module):
    """A small residual net: conv-ReLU, maxpool, [conv-ReLU, conv] + skip, ReLU, GAP, linear."""

    def __init__(self, c: int = 16, cin: int = 1, classes: int = 5) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(cin, c, 3, 1, 1)
        self.relu0 = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.relu2 = nn.ReLU()
        self.dw = nn.Conv2d(c, c, 3, 2, 1, groups=c)
        self.relu3 = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.pool(self.relu0(self.conv0(x)))
        y = self.conv2(self.relu1(self.conv1(x)))
        x = self.relu2(x + y)
        x = self.relu3(self.dw(x))
        return self.fc(self.flat(self.gap(x)))


@torch.no_grad()
def randomise(qm, seed: int, num_groups: int) -> None:
    """Random hardened ISG groups (``num_groups`` used), OSO near identity, random AdaRound choices."""
    g = torch.Generator().manual_seed(seed)
    for layer in qm.layers():
        c = layer.in_channels
        if num_groups > 1 and not layer.depthwise:
            layer.isg.groups.copy_(torch.randint(0, num_groups, (c,), generator=g))
        k = layer.weight.shape[0]
        layer.oso_scale.copy_(1 + 0.1 * torch.randn(k, generator=g))
        layer.oso_offset.copy_(0.05 * torch.randn(k, generator=g))
        layer.wq.init_adaround(layer.weight)
        layer.wq.v.copy_(torch.randn(layer.wq.v.shape, generator=g))
        layer.wq.mode = "hard"


def reference_walk(qm, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run every step of ``qm.program`` with ``hw_model.reference`` functions (integer numpy tensors)."""
    from ioso_tvm.calib.qmodules import QAdd, QFlatten, QGlobalAvgPool, QInput, QLayer, QMaxPool
    env: dict[str, np.ndarray] = {"input": x}
    qp: dict[str, tuple] = {}

    def params(q):
        lo, hi = q.bounds()
        return float(q.scale32()), q.zp, lo, hi, (np.int8 if q.signed else np.uint8)

    for st in qm.program:
        op = qm.ops[st.op]
        ins = [env[t] for t in st.inputs]
        if isinstance(op, QInput):
            s, zp, lo, hi, dt = qp[st.out] = params(op.outq)
            env[st.out] = ref.quantize(ins[0], s, zp, lo, hi, dt)
        elif isinstance(op, QLayer):
            p = op.integer_params()
            s_x, zp_x = qp[st.inputs[0]][:2]
            s, zp, lo, hi, dt = qp[st.out] = params(op.outq)
            m, b = ref.norm_constants(s_x, p["s_w"], s, zp, p["bias"], p["oso_scale"], p["oso_offset"])
            if op.kind == "conv":
                ph, pw = op.padding
                env[st.out] = ref.conv2d(ins[0], zp_x, p["w_int"], m, b, lo, hi, dt, stride=op.stride,
                                         pads=(ph, pw, ph, pw), dilation=op.dilation, groups=op.groups,
                                         isg_groups=p["isg_groups"], cfg=qm.cfg)
            else:
                env[st.out] = ref.linear(ins[0], zp_x, p["w_int"], m, b, lo, hi, dt, isg_groups=p["isg_groups"],
                                         cfg=qm.cfg)
        elif isinstance(op, QAdd):
            (sa, za, *_), (sb, zb, *_) = qp[st.inputs[0]], qp[st.inputs[1]]
            s, zp, lo, hi, dt = qp[st.out] = params(op.outq)
            ma, mb, bias = ref.add_constants(sa, sb, s, zp)
            env[st.out] = ref.add(ins[0], za, ma, ins[1], zb, mb, bias, lo, hi, dt)
        elif isinstance(op, QGlobalAvgPool):
            s_in, z_in = qp[st.inputs[0]][:2]
            s, zp, lo, hi, dt = qp[st.out] = params(op.outq)
            m, b = ref.avg_pool_constants(s_in, s, zp, ins[0].shape[2] * ins[0].shape[3])
            env[st.out] = ref.global_avg_pool(ins[0], z_in, m, b, lo, hi, dt)
        elif isinstance(op, QMaxPool):
            qp[st.out] = qp[st.inputs[0]]
            ph, pw = op.padding
            env[st.out] = ref.max_pool2d(ins[0], op.kernel, op.stride, (ph, pw, ph, pw))
        elif isinstance(op, QFlatten):
            qp[st.out] = qp[st.inputs[0]]
            env[st.out] = ins[0].reshape(ins[0].shape[0], -1)
        else:
            raise TypeError(type(op).__name__)
    return env
