"""ISG: rectified softmax, granular hardening (journal App. A-C), quantizer basics, the floored group shifter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calib_helpers import TinyRes, randomise

from hw_model import reference as ref
from ioso_tvm.calib import build_qmodel
from ioso_tvm.calib.isg import ISG, granular_assignment, rectified_softmax, shift_add_ste
from ioso_tvm.calib.qmodules import QLayer
from ioso_tvm.calib.quantizers import WeightQuantizer, mse_weight_scale


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 70), gran=st.sampled_from([1, 2, 4, 16]), seed=st.integers(0, 999))
def test_granular_assignment_counts_and_keeps_earliest(c, gran, seed):
    rng = np.random.default_rng(seed)
    prob = rng.dirichlet(np.ones(3), size=c)
    order = rng.permutation(c).astype(float)
    g = granular_assignment(prob, order, gran)
    counts = np.bincount(g, minlength=3)
    assert counts.sum() == c
    off = [n for n in counts if n % gran]
    assert len(off) <= 1
    if off:
        assert off[0] % gran == c % gran
    learned = prob.argmax(1)
    if gran == 1:
        assert np.array_equal(g, learned)
    # within each group, a moved-out channel never settled before a channel that stayed
    for gi in range(3):
        stayed = order[(learned == gi) & (g == gi)]
        moved = order[(learned == gi) & (g != gi)]
        if stayed.size and moved.size:
            assert moved.min() > stayed.max() or np.isclose(moved.min(), stayed.max())


def test_rectified_softmax_saturates_and_gamma_hard():
    r = torch.tensor([[50.0, -50.0, -50.0], [0.0, 0.0, 0.0]])
    s = rectified_softmax(r)
    assert s[0, 0] == 1 and s[0, 1] == 0
    assert torch.all((s[1] > 0) & (s[1] < 1))
    isg = ISG(2)
    isg.init_soft()
    isg.r.data.copy_(r)
    isg.track(7)
    assert isg.settled_at.tolist() == [7, -1]
    isg.harden(1)
    assert isg.gamma().tolist() == [1.0, list(isg.cfg.group_factors)[int(isg.groups[1])]]


def test_weight_quantizer_mse_and_adaround_init():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    s = mse_weight_scale(w, 4)
    amax = w.abs().reshape(6, -1).amax(1)
    assert torch.all(s <= amax / 7 + 1e-7) and torch.all(s >= 0.2 * amax / 7)
    q = WeightQuantizer(w, 4)
    q.init_adaround(w)
    soft = q(w)
    inside = ((w / q.scale.view(-1, 1, 1, 1)) >= -8) & ((w / q.scale.view(-1, 1, 1, 1)) <= 7)
    assert inside.float().mean() > 0.9
    assert (soft - w)[inside].abs().max() < 1e-3  # h(V) starts at the fractional part
    q.mode = "hard"
    wi = q.integer(w)
    assert torch.equal(wi, torch.round(wi)) and wi.min() >= -8 and wi.max() <= 7


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 999), sign=st.sampled_from([-1, 0, 1]), shift=st.integers(1, 8))
def test_shift_add_is_the_npu_shifter_with_a_straight_through_gradient(seed, sign, shift):
    d = torch.from_numpy(np.random.default_rng(seed).integers(-5000, 5000, 200).astype(np.float32))
    d.requires_grad_(True)
    y = shift_add_ste(d, sign, shift)
    want = d.detach().numpy().astype(np.int64)
    want = want + sign * (want >> shift)  # arithmetic shift = floor
    assert np.array_equal(y.detach().numpy().astype(np.int64), want)
    y.sum().backward()
    assert torch.equal(d.grad, torch.full_like(d, 1 + sign * 2.0 ** -shift))


def _wire(qm) -> None:
    for st_ in qm.program:
        if isinstance(qm.ops[st_.op], QLayer):
            qm.ops[st_.op].set_input_quantizer(qm.tensor_quantizer(st_.inputs[0]))


@pytest.mark.parametrize("seed", range(3))
def test_fake_quant_accumulator_is_the_contracts(seed):
    """Per layer, on integer inputs: the floored fake-quant accumulator equals ``reference.conv2d_acc``
    (dense, depthwise with groups, linear as a 1x1 conv), every element."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    qm = build_qmodel(TinyRes(c=32).eval(), (1, 12, 12), 4, 4).eval()
    qm.init_act_scales(torch.randn(16, 1, 12, 12, generator=g))
    randomise(qm, seed, 3)
    dw = qm.ops["dw"]
    dw.isg.groups.copy_(torch.randint(0, 3, (dw.in_channels,), generator=g))
    _wire(qm)
    for st_ in qm.program:
        layer = qm.ops[st_.op]
        if not isinstance(layer, QLayer):
            continue
        inq = qm.tensor_quantizer(st_.inputs[0])
        lo, hi = inq.bounds()
        shape = (5, layer.in_channels, 6, 6) if layer.kind == "conv" else (5, layer.in_channels)
        x_int = torch.randint(lo, hi + 1, shape, generator=g).float()
        s_x, s_w = inq.step.detach().abs(), layer.wq.scale
        with torch.no_grad():
            acc = layer._shifted_acc(x_int * s_x, inq) - layer._shape(layer.bias)
            acc = torch.round(acc / (s_x * layer._shape(s_w))).numpy().astype(np.int64)
        p = layer.integer_params()
        w = p["w_int"] if layer.kind == "conv" else p["w_int"][:, :, None, None]
        xr = x_int.numpy().astype(np.int64)
        xr = xr if layer.kind == "conv" else xr[:, :, None, None]
        kw = dict(stride=layer.stride, pads=(*layer.padding, *layer.padding), dilation=layer.dilation,
                  groups=layer.groups) if layer.kind == "conv" else {}
        want = ref.conv2d_acc(xr, 0, w, isg_groups=p["isg_groups"], cfg=qm.cfg, **kw)
        assert np.array_equal(acc, want.reshape(acc.shape)), st_.op


@pytest.mark.parametrize("seed", range(3))
def test_fake_quant_through_the_floor_equals_deploy(seed):
    x = torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    qm = build_qmodel(TinyRes(c=32).eval(), (1, 12, 12), 4, 4).eval()
    qm.init_act_scales(x)
    randomise(qm, seed, 3)
    keys = set(qm.state_dict())
    with torch.no_grad():
        floored_by_default, deployed = qm(x), qm.deploy(x)  # build_qmodel wires every layer's input quantizer
        for m in qm.layers():
            m.set_input_quantizer(None)
        exact_gamma = qm(x)  # without it: the exact factor
        _wire(qm)
        floored = qm(x)
    assert set(qm.state_dict()) == keys  # the input quantizer is not a submodule of the layer
    s = qm.tensor_quantizer(qm.output).step.detach().abs()

    def ints(t):  # the output integers (the dequantized floats may differ in the last ulp: int * s computed twice)
        return torch.round(t / s).to(torch.int64)

    assert torch.equal(ints(floored), ints(deployed))  # every logit
    assert torch.equal(ints(floored_by_default), ints(deployed))
    assert not torch.equal(ints(exact_gamma), ints(deployed))  # the exact factor is not what the NPU computes
    loss = qm(x).pow(2).sum()  # gradients flow through the floor (straight-through)
    loss.backward()
    layers = [m for m in qm.layers() if bool(m.isg.groups.any())]
    assert layers and all(m.oso_scale.grad is not None and bool(m.oso_scale.grad.abs().sum() > 0) for m in layers)
    assert all(bool(torch.isfinite(q.step.grad)) for q in qm.quantizers() if q.step.grad is not None)
