"""Calibration on a torch.fx-captured graph: functional models, reused modules, concat branches, untraceable
models, block discovery (layer-wise for AdaRound, block-wise for BRECQ / QDrop / IOSO)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ioso_tvm
from ioso_tvm.calib import CalibConfig, calibrate
from ioso_tvm.calib.graph import QConcat, Step, cut_points
from ioso_tvm.calib.qmodel import _find_blocks, build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model

SMALL = dict(num_samples=16, batch_size=8, iters=3, act_iters=2, progress=False, act_init_samples=16)
"""Chosen: the shortest schedule that runs every step of the engine (tests check structure and exactness)."""

POOLS = {  # (N, C, 8, 8) -> (N, C, 1, 1) or (N, C)
    "adaptive_avg_pool2d": lambda x: F.adaptive_avg_pool2d(x, 1),
    "avg_pool2d_global": lambda x: F.avg_pool2d(x, 8),
    "mean_keepdim": lambda x: x.mean((2, 3), keepdim=True),
    "mean": lambda x: x.mean((2, 3)),
    "torch_mean": lambda x: torch.mean(x, dim=[-2, -1]),
}
FLATTENS = {
    "flatten_method": lambda x: x.flatten(1),
    "view": lambda x: x.view(x.size(0), -1),
    "reshape": lambda x: x.reshape(x.shape[0], -1),
    "torch_flatten": lambda x: torch.flatten(x, 1),
}


class FBlock(nn.Module):
    """A residual block written with functional calls."""

    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.short = nn.Conv2d(cin, c, 1, stride, bias=False) if stride != 1 or cin != c else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class FResNet(nn.Module):
    """A plain CIFAR-style ResNet with F.relu, F.max_pool2d, a functional pool and a tensor-method flatten."""

    def __init__(self, pool: str = "adaptive_avg_pool2d", flat: str = "flatten_method", c: int = 16) -> None:
        super().__init__()
        self.pool, self.flat = POOLS[pool], FLATTENS[flat]
        self.pool_flattens = pool in ("mean", "torch_mean")  # decided here: forward must not branch on shapes
        self.stem, self.bn = nn.Conv2d(1, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.b1, self.b2 = FBlock(c, c, 1), FBlock(c, 2 * c, 1)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.bn(self.stem(x))), 2)
        x = self.b2(self.b1(x))
        y = self.pool(x)
        return self.fc(y if self.pool_flattens else self.flat(y))


def _x(n: int = 16, hw: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, hw, hw, generator=torch.Generator().manual_seed(seed))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("pool, flat", list(zip(sorted(POOLS), [*sorted(FLATTENS), "view"])))
def test_functional_resnet_is_converted(pool, flat):
    """Every pool / flatten spelling gives the same program kinds and the float program equals the model."""
    torch.manual_seed(0)
    net = _randomise_bn(FResNet(pool, flat), 1)
    qm = build_qmodel(net, (1, 16, 16), 4, 4)
    kinds = [getattr(qm.ops[s.op], "kind", "") for s in qm.program]
    assert kinds == ["input", "conv", "maxpool", "conv", "conv", "add", "conv", "conv", "conv", "add", "gap",
                     "flatten", "linear"]
    assert [qm.ops[s.op].outq.act for s in qm.program if hasattr(qm.ops[s.op], "outq")] == \
        [None, "relu6", "relu", None, "relu", "relu", None, None, "relu", None, None]
    x = _x()
    with torch.no_grad():
        want = net(x)
    assert torch.allclose(qm.float_forward(x), want, atol=1e-4, rtol=1e-4)
    blocks = [(b.start, b.stop, len(b.layers)) for b in qm.blocks]
    assert blocks == [(0, 2, 1), (2, 3, 0), (3, 6, 2), (6, 10, 3), (10, 11, 0), (11, 12, 0), (12, 13, 1)]


def test_functional_resnet_calibrates_exports_and_compiles_bit_exact(tmp_path):
    """brecq on the functional ResNet, exported ONNX compiled for the NPU equals deploy mode element by element."""
    torch.manual_seed(0)
    net = _randomise_bn(FResNet("mean", "view"), 2)
    qm = calibrate(net, _x(), "brecq", 4, 4, CalibConfig(**SMALL))
    path = tmp_path / "f.onnx"
    export_onnx(qm, path, input_shape=(2, 1, 16, 16))
    cm = ioso_tvm.compile(str(path))
    x = _x(2, seed=5)
    want = qm.deploy(x).numpy()
    got = cm.run(x.numpy())
    assert got.shape == want.shape == (2, 10) and np.array_equal(got, want)
    assert np.unique(want).size > 2


# ----------------------------------------------------------------------------- reused modules, errors
class Reused(nn.Module):
    """Parameter-free modules (ReLU, max pool) called twice: allowed; ``conv_twice``: a conv called twice."""

    def __init__(self, conv_twice: bool = False) -> None:
        super().__init__()
        self.conv_twice = conv_twice
        self.c0, self.c1, self.c2 = nn.Conv2d(1, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.act, self.pool, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(self.act(self.c0(x)))
        x = self.c1(self.c1(x)) if self.conv_twice else self.c2(self.c1(x))
        return self.fc(self.pool(self.act(x)).flatten(1))


def test_reused_parameter_free_modules_get_one_op_per_call():
    net = Reused().eval()
    qm = build_qmodel(net, (1, 16, 16), 4, 4)
    assert [s.op for s in qm.program] == ["input", "c0", "pool", "c1", "c2", "pool_1", "flatten", "fc"]
    assert qm.ops["c2"].outq.act == "relu" and qm.ops["c0"].outq.act == "relu"
    x = _x()
    with torch.no_grad():
        assert torch.allclose(qm.float_forward(x), net(x), atol=1e-5)


def test_reused_conv_is_refused_with_the_fix_and_the_line():
    with pytest.raises(ValueError, match=r"^module 'c1' \(Conv2d\) is called more than once in forward; .*"
                                         r"self\.c1_2 = copy\.deepcopy\(self\.c1\).* at .*test_calib_graph\.py:\d+: "
                                         r"`x = self\.c1\(self\.c1\(x\)\)"):
        build_qmodel(Reused(conv_twice=True).eval(), (1, 16, 16), 4, 4)


class Branchy(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else x.mean((2, 3))


class Sigmoidal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


class BadView(Sigmoidal):
    def forward(self, x):
        return self.conv(x).view(x.size(0), 4, -1)


@pytest.mark.parametrize("model, pattern", [
    (Branchy(), r"^model Branchy cannot be captured by torch\.fx in forward\(\) at .*test_calib_graph\.py:\d+: "
                r"`return x\.flatten\(1\) if x\.sum\(\) > 0 else x\.mean\(\(2, 3\)\)`: symbolically traced "
                r"variables cannot be used as inputs to control flow; .*make the branch or loop static"),
    (Sigmoidal(), r"^unsupported layer 'sigmoid' \(call_function sigmoid\) at .*test_calib_graph\.py:\d+: "
                  r"`return torch\.sigmoid\(self\.conv\(x\)\)` for the NPU quantizer; supported: Conv2d"),
    (BadView(), r"^layer 'view' at .*: reshape \(2, 4, 6, 6\) -> \(2, 4, 36\) is not a flatten to \(N, features\)"),
])
def test_unsupported_models_get_one_clear_error(model, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        calibrate(model.eval(), _x(hw=8), "rtn", config=CalibConfig(**SMALL))
    assert info.value.__cause__ is None and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- concat
class Inception(nn.Module):
    """Stem, two conv branches joined by torch.cat, a conv on the concat, pool, linear."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, 1, 1)
        self.a, self.b1, self.b2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, 1, 1)
        self.mix, self.fc = nn.Conv2d(2 * c, c, 1), nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b2(F.relu(self.b1(x))))], dim=1)
        return self.fc(F.relu(self.mix(y)).mean((2, 3)))


@pytest.mark.parametrize("method", ["adaround", "ioso"])
def test_concat_branches_form_one_block_and_calibrate(method, tmp_path):
    torch.manual_seed(0)
    qm = calibrate(Inception().eval(), _x(), method, 4, 4, CalibConfig(**SMALL))
    cat = next(s for s in qm.program if isinstance(qm.ops[s.op], QConcat))
    assert qm.ops[cat.op].outq.act == "relu" and len(cat.inputs) == 2
    blocks = [(b.inp, b.out, b.layers) for b in qm.blocks]
    assert blocks[1] == ("stem", "cat", ["a", "b1", "b2"])  # the region between the fork and the cat
    assert blocks[0][2] == ["stem"] and [b[2] for b in blocks[2:]] == [["mix"], [], [], ["fc"]]
    assert set(qm.calib_history) == {b.name for b in qm.blocks}
    x = _x(4, seed=3)
    assert torch.isfinite(qm(x)).all() and qm.ops[cat.op].outq.initialised
    model = export_onnx(qm, tmp_path / "c.onnx")
    assert [n.op_type for n in model.graph.node].count("Concat") == 1


# --------------------------------------------------------------------------------------------- blocks
@pytest.fixture
def fast_weight_init(monkeypatch):
    """max|W| weight scales instead of the MSE search: block structure does not depend on them (chosen: the
    MSE search dominates building ResNet-20 / MobileNetV2 on a loaded 2-core machine)."""
    def amax_scale(w, bits):
        return (w.detach().reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8) / (2 ** (bits - 1) - 1)).float()
    monkeypatch.setattr("ioso_tvm.calib.quantizers.mse_weight_scale", amax_scale)


def _bounds(blocks):
    return [(b.start, b.stop) for b in blocks]


RESNET20_BLOCKS = [("conv1", 0, 2), ("layers.0.0", 2, 5), ("layers.0.1", 5, 8), ("layers.0.2", 8, 11),
                   ("layers.1.0", 11, 15), ("layers.1.1", 15, 18), ("layers.1.2", 18, 21), ("layers.2.0", 21, 25),
                   ("layers.2.1", 25, 28), ("layers.2.2", 28, 31), ("avgpool", 31, 32), ("flatten", 32, 33),
                   ("fc", 33, 34)]
"""ResNet-20's blocks as the module-based discovery of earlier versions formed them (BRECQ's blocks)."""


def test_resnet20_blocks_unchanged_and_adaround_is_finest(fast_weight_init):
    qm = build_qmodel(build_model("resnet20").eval(), (1, 32, 32), 4, 4)
    assert [(b.name, b.start, b.stop) for b in qm.blocks] == RESNET20_BLOCKS
    layerwise = _find_blocks(qm.program, [""] * len(qm.program), dict(qm.ops))
    assert _bounds(layerwise) == _bounds(qm.blocks)  # every residual region is a fork ... add: nothing to cut


def test_mobilenetv2_blockwise_joins_inverted_residuals_adaround_does_not(fast_weight_init):
    qm = build_qmodel(build_model("mobilenetv2_small").eval(), (1, 32, 32), 4, 4)
    by_name = {b.name: b for b in qm.blocks}
    assert len(qm.blocks) == 22 and by_name["features.4"].layers == [f"features/4/conv/{i}" for i in (0, 3, 6)]
    assert by_name["features.1"].layers == ["features/1/conv/0", "features/1/conv/3"]  # t = 1, with skip
    layerwise = _find_blocks(qm.program, [""] * len(qm.program), dict(qm.ops))
    assert len(layerwise) == 32
    for b in layerwise:  # single layers, except where a skip makes the region uncuttable
        adds = [s for s in qm.program[b.start:b.stop] if qm.ops[s.op].kind == "add"]
        assert len(b.layers) <= 1 or adds, b


class Chain(nn.Module):
    """MobileNet-v1 style chain without skips (conv, dw, pw, dw, pw, pool, fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 16, 3, 2, 1)
        self.dw1, self.pw1 = nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 32, 1)
        self.dw2, self.pw2 = nn.Conv2d(32, 32, 3, 2, 1, groups=32), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.c0(x))
        x = F.relu(self.pw1(F.relu(self.dw1(x))))
        x = self.pw2(F.relu(self.dw2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_adaround_blocks_are_single_layers_on_a_chain():
    torch.manual_seed(0)
    qm = calibrate(Chain().eval(), _x(), "adaround", 4, 4, CalibConfig(**SMALL))
    assert all(h for h in qm.calib_history.values())
    layerwise = _find_blocks(qm.program, [""] * len(qm.program), dict(qm.ops))
    assert [b.layers for b in layerwise] == [["c0"], ["dw1"], ["pw1"], ["dw2"], ["pw2"], [], [], ["fc"]]
    assert set(qm.calib_history) == {b.name for b in layerwise}
    # block-wise: each depthwise conv joins its pointwise neighbours (c0 is 3x3: not pointwise)
    assert [b.layers for b in qm.blocks] == [["c0"], ["dw1", "pw1"], ["dw2", "pw2"], [], [], ["fc"]]


@st.composite
def _programs(draw):
    """Random DAG programs: step i reads 1..3 earlier tensors (the input at least once)."""
    n = draw(st.integers(2, 14))
    prog = [Step("input", ["input"], "t0")]
    for i in range(1, n):
        k = draw(st.integers(1, min(3, i)))
        srcs = draw(st.lists(st.integers(max(0, i - 4), i - 1), min_size=k, max_size=k, unique=True))
        prog.append(Step(f"s{i}", [f"t{j}" for j in sorted(srcs)], f"t{i}"))
    return prog


@settings(max_examples=200, deadline=None)
@given(_programs())
def test_cut_points_match_brute_force(prog):
    """A cut is valid exactly when the step before it writes the only tensor alive across it."""
    out = prog[-1].out
    want = []
    for k in range(1, len(prog)):
        produced = {s.out for s in prog[:k]}
        alive = {t for s in prog[k:] for t in s.inputs if t in produced} | ({out} & produced)
        if alive == {prog[k - 1].out}:
            want.append(k)
    assert cut_points(prog, out) == want
