"""Calibrated shipped nets (ResNet-20, small MobileNetV2): deploy mode == hw_model.reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calib_helpers import reference_walk

from ioso_tvm.calib import CalibConfig, calibrate
from ioso_tvm.datasets import load_calib_set, to_model_input
from ioso_tvm.models import load_pretrained


@pytest.mark.parametrize("name,method,wbits,abits,gran", [("resnet20", "ioso", 2, 4, 16),
                                                          ("mobilenetv2_small", "ioso", 4, 4, 16),
                                                          ("resnet20", "qdrop", 8, 8, 16)])
def test_calibrated_net_deploy_equals_reference(name, method, wbits, abits, gran):
    torch.manual_seed(0)
    x = torch.from_numpy(to_model_input(load_calib_set()[0][:16])).float()
    cfg = CalibConfig(num_samples=16, batch_size=8, iters=4, act_iters=2, progress=False, granularity=gran,
                      act_init_samples=16, harden_at=0.5)
    qm = calibrate(load_pretrained(name), x, method, wbits, abits, cfg)
    xs = x[:2]
    env = qm.integer_model().run(xs)
    ref_env = reference_walk(qm, xs.numpy())
    for t, r in ref_env.items():
        if t != "input":
            assert np.array_equal(env[t].numpy(), r.astype(np.int64)), t
    for layer in qm.layers():
        counts = np.bincount(layer.isg.groups.numpy(), minlength=3)
        assert sum(1 for c in counts if c % gran) <= 1
