"""QFT offline subgraph: exported constants reproduce the online output and hw_model.reference bit for bit."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ioso_tvm.calib import qft_init as qi
from ioso_tvm.calib.qft_offline import QFTLayer, TensorQ


def _layer(seed, cin, cout, k, stride, pad, groups, wbits, mode, act, signed_in, linear=False):
    torch.manual_seed(seed)
    conv = nn.Linear(cin, cout) if linear else nn.Conv2d(cin, cout, k, stride, pad, groups=groups)
    t_in = TensorQ(0.02, 0 if not signed_in else 3, 8, signed_in, cin, vector=True)
    t_out = TensorQ(0.05, 0 if act else -7, 8, act is None, cout, vector=True)
    with torch.no_grad():
        t_in.log_a.copy_(0.5 * torch.randn(cin, dtype=torch.float64))
        t_out.log_a.copy_(0.3 * torch.randn(cout, dtype=torch.float64))
    lay = QFTLayer(conv, t_in, t_out, act, wbits, mode, "l")
    with torch.no_grad():  # MMSE right scale of the effective weight W * a_in (a_out: layerwise part of R)
        eff = lay.weight * lay.left_expanded().reshape(lay.weight.shape[:2] + (1,) * (lay.weight.dim() - 2))
        if mode == "layerwise":
            eff = eff / t_out.a().reshape([-1] + [1] * (eff.dim() - 1))
        lay.set_right_scale(qi.ppq_scale(eff, wbits, per_channel=mode == "channelwise"))
    lo, hi = t_in.bounds()
    shape = (3, cin) if linear else (3, cin, 7, 6)
    q_in = torch.randint(lo, hi + 1, shape, dtype=torch.int64)
    return lay, q_in


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), cin=st.sampled_from([1, 4, 8]), cout=st.sampled_from([4, 8]),
       k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]),
       depthwise=st.booleans(), wbits=st.sampled_from([4, 8]), mode=st.sampled_from(["layerwise", "channelwise"]),
       act=st.sampled_from([None, "relu", "relu6"]), signed_in=st.booleans(), linear=st.booleans())
def test_layer_online_deploy_reference_equal(seed, cin, cout, k, stride, pad, depthwise, wbits, mode, act,
                                             signed_in, linear):
    groups = cin if depthwise and not linear and cout % cin == 0 else 1
    lay, q_in = _layer(seed, cin, cout, k, stride, pad, groups, wbits, mode, act, signed_in, linear)
    if seed % 2:  # random hard ISG groups: shift-add accumulation per group
        lay.isg.groups.copy_(torch.randint(0, 3, (cin,), generator=torch.Generator().manual_seed(seed)))
    operand = (q_in - lay.t_in.zp).to(torch.float32)
    with torch.no_grad():
        online = lay(operand).numpy() + lay.t_out.zp
        exact = lay(operand, exact=True).numpy() + lay.t_out.zp
    ref_out = lay.reference(q_in.numpy().astype(lay.t_in.dtype))
    assert ref_out.dtype == lay.t_out.dtype
    assert np.array_equal(exact, ref_out.astype(np.float32))
    assert np.array_equal(online, exact)  # float32 accumulation is exact at these sizes
    e = lay.export()
    assert e["w"].dtype == np.int8 and np.abs(e["w"]).max() <= 2 ** (wbits - 1) - 1
    assert e["m"].dtype == np.float32 and e["b"].dtype == np.float32
    if mode == "layerwise":  # one rescale per layer: a_out moves into the weight's right scale, m is scalar
        np.testing.assert_allclose(e["m"], e["m"][0], rtol=1e-6)
    else:
        assert np.unique(e["m"]).size > 1


def test_vector_scale_folding_is_a_reparameterisation():
    """Real output s_out * a_out * (q - zp) tracks the float layer fed with s_in * a_in * (q - zp) (8-bit)."""
    lay, q_in = _layer(3, 8, 16, 3, 1, 1, 1, 8, "channelwise", None, False)
    with torch.no_grad():
        x = lay.t_in.s().float() * lay.t_in.a().float().reshape(1, -1, 1, 1) * (q_in - lay.t_in.zp).float()
        y = nn.functional.conv2d(x, lay.weight.float(), lay.bias.float(), padding=1)
        lay.t_out.log_s.fill_(np.log(float((y / lay.t_out.a().float().reshape(1, -1, 1, 1)).abs().max()) / 110))
        q = lay((q_in - lay.t_in.zp).float())
        real = lay.t_out.s().float() * lay.t_out.a().float().reshape(1, -1, 1, 1) * q
        t = y / (lay.t_out.s().float() * lay.t_out.a().float().reshape(1, -1, 1, 1)) + lay.t_out.zp
    inside = ((t > -127) & (t < 126)).numpy()  # not clipped by the output quantizer
    err = (y - real).abs().numpy()[inside]
    assert err.max() < 0.02 * float(y.abs().max()) and inside.mean() > 0.95


def test_every_dof_gets_a_gradient():
    lay, q_in = _layer(1, 8, 8, 3, 1, 1, 1, 4, "channelwise", "relu", False)
    out = lay((q_in - lay.t_in.zp).float())
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    for name, p in [("weight", lay.weight), ("bias", lay.bias), ("log_r", lay.log_r), ("s_in", lay.t_in.log_s),
                    ("s_out", lay.t_out.log_s), ("a_in", lay.t_in.log_a), ("a_out", lay.t_out.log_a)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_layer_bad_input():
    t = TensorQ(0.1, 0, 8, False, 4, False)
    with pytest.raises(ValueError, match="mode"):
        QFTLayer(nn.Conv2d(4, 4, 1), t, t, None, 4, "perchannel", "x")
    with pytest.raises(ValueError, match="bits"):
        QFTLayer(nn.Conv2d(4, 4, 1), t, t, None, 9, "layerwise", "x")
