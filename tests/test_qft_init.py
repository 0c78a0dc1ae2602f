"""QFT initialisation: PPQ / APQ beat min-max, APQ <= per-channel, CLE keeps the float function."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ioso_tvm.calib import qft_init as qi
from ioso_tvm.models import fold_bn, load_pretrained


def _weights(seed: int, k: int, c: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        w = torch.randn(k, c, 3, 3, generator=g)
    elif kind == "laplace":  # heavy tails, like trained conv weights
        u = torch.rand(k, c, 3, 3, generator=g) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:  # "ranges": channel ranges spread over 2 decades on both axes (BN-folded-like)
        w = torch.randn(k, c, 3, 3, generator=g)
        w = w * torch.exp(2 * torch.rand(k, 1, 1, 1, generator=g)) * torch.exp(2 * torch.rand(1, c, 1, 1, generator=g))
    return w


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 24), c=st.integers(2, 24),
       bits=st.sampled_from([3, 4, 8]), kind=st.sampled_from(["gauss", "laplace", "ranges"]))
def test_ppq_apq_beat_minmax(seed, k, c, bits, kind):
    w = _weights(seed, k, c, kind)
    mm_t = qi.quant_mse(w, bits, qi.minmax_scale(w, bits))
    mm_c = qi.quant_mse(w, bits, qi.minmax_scale(w, bits, per_channel=True))
    pp_t = qi.quant_mse(w, bits, qi.ppq_scale(w, bits))
    pp_c = qi.quant_mse(w, bits, qi.ppq_scale(w, bits, per_channel=True))
    left, right = qi.apq_scales(w, bits)
    ap = qi.quant_mse(w, bits, right, left)
    assert pp_t <= mm_t and pp_c <= mm_c
    assert ap <= pp_c * (1 + 1e-6)
    assert left.shape == (c,) and right.shape == (k,) and bool((left > 0).all() and (right > 0).all())


@pytest.mark.parametrize("kind", ["gauss", "laplace", "ranges"])
def test_4bit_mmse_strictly_better(kind):
    """At 4 bits min-max wastes range on outliers: PPQ must win clearly, APQ more on 2-axis ranges."""
    w = _weights(1, 32, 32, kind)
    assert qi.quant_mse(w, 4, qi.ppq_scale(w, 4)) < 0.95 * qi.quant_mse(w, 4, qi.minmax_scale(w, 4))
    left, right = qi.apq_scales(w, 4)
    pc = qi.quant_mse(w, 4, qi.ppq_scale(w, 4, per_channel=True))
    if kind == "ranges":
        assert qi.quant_mse(w, 4, right, left) < 0.9 * pc


def test_real_layer_mmse():
    model = fold_bn(load_pretrained("resnet20"))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1:
            w = m.weight.detach()
            assert qi.quant_mse(w, 4, qi.ppq_scale(w, 4)) < qi.quant_mse(w, 4, qi.minmax_scale(w, 4)), name
            left, right = qi.apq_scales(w, 4)
            assert qi.quant_mse(w, 4, right, left) <= qi.quant_mse(w, 4, qi.ppq_scale(w, 4, True)) * (1 + 1e-6), name


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        qi.ppq_scale(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="w"):
        qi.apq_scales(torch.ones(3), 4)
    with pytest.raises(ValueError, match="input channels"):
        qi.cle_factors(torch.ones(3, 2), torch.ones(4, 2), 4, 4)


class _ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.r, self.b = nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 5, 3)
        self.r2, self.fc = nn.ReLU(), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.r2(self.b(self.r(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_cle_keeps_function_small(seed):
    torch.manual_seed(seed)
    net = _ConvReluConv().eval()
    with torch.no_grad():  # spread channel ranges so the factors are far from 1
        net.a.weight.mul_(torch.exp(3 * torch.rand(12, 1, 1, 1)))
    x = torch.randn(8, 3, 9, 9)
    ref = net(x)
    eq = copy.deepcopy(net)
    pairs = qi.apply_cle(eq, wbits=4)
    assert ("a", "b") in pairs
    c = eq.a.weight.detach().reshape(12, -1).abs().amax(1) / net.a.weight.detach().reshape(12, -1).abs().amax(1)
    assert float(c.max() / c.min()) > 2.0  # the transform is not the identity
    torch.testing.assert_close(eq(x), ref, rtol=1e-4, atol=1e-5)


def test_cle_keeps_resnet20_and_helps_layerwise_4bit():
    model = fold_bn(load_pretrained("resnet20")).requires_grad_(False)
    x = torch.randn(4, 1, 32, 32)
    ref = model(x)
    eq = copy.deepcopy(model)
    pairs = qi.apply_cle(eq, wbits=4)
    assert len(pairs) == 9  # conv1 -> conv2 inside each of the 9 basic blocks; residual paths excluded
    torch.testing.assert_close(eq(x), ref, rtol=1e-3, atol=1e-4)
    mods, mods0 = dict(eq.named_modules()), dict(model.named_modules())

    def tot(ms):
        return sum(qi.quant_mse(ms[n].weight, 4, qi.ppq_scale(ms[n].weight, 4)) / float(ms[n].weight.pow(2).mean())
                   for p in pairs for n in p)
    assert tot(mods) < tot(mods0)


def test_minmax_ranges_and_qparams():
    torch.manual_seed(0)
    net = _ConvReluConv().eval()
    x = torch.randn(20, 3, 9, 9)
    r = qi.minmax_ranges(net, x, batch_size=7)
    with torch.no_grad():
        ya = net.a(x)
    assert r["a"] == (float(ya.min()), float(ya.max()))
    assert r["r"][0] == 0.0 and r[""] == (float(x.min()), float(x.max()))
    s, zp = qi.act_qparams(*r["r"], bits=8)
    assert zp == 0 and np.isclose(s, r["r"][1] / 255, rtol=1e-6)
    s, zp = qi.act_qparams(*r["a"], bits=8)
    q = np.clip(np.rint(ya.numpy() / s) + zp, -128, 127)
    assert np.abs((q - zp) * s - ya.numpy()).max() <= s * 0.5 + 1e-6
    with pytest.raises(ValueError, match="not found"):
        qi.minmax_ranges(net, x, names=["nope"])
