"""Deploy mode (integer torch) == hw_model.reference bit for bit, layer by layer and whole nets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calib_helpers import TinyRes, randomise, reference_walk

from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.models import mobilenetv2_small, resnet20


def _qmodel(net, shape, wbits, abits, groups, seed, n=8):
    torch.manual_seed(seed)
    qm = build_qmodel(net.eval(), shape, wbits, abits)
    x = torch.randn(n, *shape) * 1.5
    qm.init_act_scales(x)
    randomise(qm, seed, groups)
    return qm, x


def _check_layer_by_layer(qm, x):
    im = qm.integer_model()
    env = im.run(x)
    ref_env = reference_walk(qm, x.numpy())
    for t, r in ref_env.items():
        if t == "input":
            continue
        assert np.array_equal(env[t].numpy(), r.astype(np.int64)), f"tensor {t} differs from the reference"
    # layer by layer: each integer layer on the reference's own inputs
    for st_, fn in zip(qm.program, im.fns):
        ins = [torch.from_numpy(np.asarray(ref_env[t]).astype(np.int64)) if t != "input" else x for t in st_.inputs]
        assert np.array_equal(fn(*ins).numpy(), ref_env[st_.out].astype(np.int64)), st_.op
    return env


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 4), (2, 4)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_small"])
def test_deploy_equals_reference_whole_net(name, wbits, abits, groups):
    net = resnet20() if name == "resnet20" else mobilenetv2_small()
    qm, x = _qmodel(net, (1, 16, 16), wbits, abits, groups, seed=wbits * 10 + groups, n=2)
    env = _check_layer_by_layer(qm, x)
    out = env[qm.output]
    assert out.unique().numel() > 1, "degenerate output: test would not detect errors"


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), wbits=st.integers(2, 8), abits=st.integers(2, 8), groups=st.sampled_from([1, 2, 3]),
       c=st.sampled_from([3, 8, 16, 21]), hw=st.integers(6, 13))
def test_deploy_equals_reference_tiny(seed, wbits, abits, groups, c, hw):
    qm, x = _qmodel(TinyRes(c=c, cin=2), (2, hw, hw), wbits, abits, groups, seed, n=3)
    _check_layer_by_layer(qm, x)


def test_deploy_close_to_fake_quant():
    qm, x = _qmodel(TinyRes(), (1, 12, 12), 8, 8, 1, seed=3, n=16)
    with torch.no_grad():
        fq, dep = qm(x), qm.deploy(x)
    step = float(qm.ops[qm.program[-1].op].outq.scale32())
    assert (fq - dep).abs().max().item() <= 2 * step + 1e-6


def test_deploy_overflow_is_detected():
    qm, x = _qmodel(TinyRes(), (1, 12, 12), 8, 8, 1, seed=4, n=2)
    im = qm.integer_model()
    layer = next(f for f in im.fns if hasattr(f, "acc"))
    big = torch.full((1, 1, 12, 12), 2**40, dtype=torch.int64)
    with pytest.raises(OverflowError):
        layer(big)


def test_float32_mac_path_equals_float64_path(monkeypatch):
    """The float32 MAC (taken when the bound allows) gives the same integers as the float64 one."""
    from ioso_tvm.calib import deploy

    qm, x = _qmodel(resnet20(), (1, 16, 16), 4, 4, 3, seed=11, n=4)
    fast = qm.integer_model().run(x)[qm.output]
    monkeypatch.setattr(deploy, "FLOAT32_EXACT_BOUND", 0.0)  # every layer on float64
    slow = qm.integer_model().run(x)[qm.output]
    assert fast.unique().numel() > 1
    assert np.array_equal(fast.numpy(), slow.numpy())


def test_deploy_reuses_its_integer_model_until_a_parameter_changes():
    from ioso_tvm.calib.deploy import cached_integer_model

    qm, x = _qmodel(TinyRes(), (1, 12, 12), 4, 4, 3, seed=5, n=3)
    with torch.no_grad():
        y0 = qm.deploy(x)
        im = cached_integer_model(qm)
        assert cached_integer_model(qm) is im and torch.equal(qm.deploy(x), y0)
        layer = qm.layers()[0]
        layer.wq.v.add_(5.0)  # in-place weight change (version counter)
        assert cached_integer_model(qm) is not im
        assert torch.equal(qm.deploy(x), qm.integer_model()(x))
        im = cached_integer_model(qm)
        q = qm.quantizers()[-1]
        q.step.data.mul_(1.5)  # small tensor changed behind autograd: compared by value
        assert cached_integer_model(qm) is not im
        y1 = qm.deploy(x)
        assert torch.equal(y1, qm.integer_model()(x)) and not torch.equal(y1, y0)
