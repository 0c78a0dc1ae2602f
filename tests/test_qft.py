"""QFT end to end: training lowers the distillation loss; deploy == online == hw_model.reference."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from ioso_tvm.calib import qft
from ioso_tvm.models import fold_bn, load_pretrained


class _Tiny(nn.Module):
    """conv-relu-conv-relu (a CLE pair) + residual add + relu + global pool + linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.r0 = nn.Conv2d(2, 8, 3, padding=1), nn.ReLU()
        self.c1, self.r1 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.c2 = nn.Conv2d(16, 8, 1)
        self.r2, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        h = self.r0(self.stem(x))
        y = self.c2(self.r1(self.c1(h)))
        return self.fc(torch.flatten(self.pool(self.r2(y + h)), 1))


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g)


def _cfg(mode, **kw):
    base = dict(mode=mode, epochs=2, images_per_epoch=160, batch_size=16, lr=1e-3, cosine_epochs=1,
                calib_batch=64, progress=False)
    base.update(kw)
    return qft.QFTConfig(**base)


@pytest.mark.parametrize("mode", ["layerwise", "channelwise"])
def test_tiny_qft_trains_and_is_bit_exact(mode):
    torch.manual_seed(1)
    model, x = _Tiny().eval(), _data()
    cfg = _cfg(mode)
    teacher = fold_bn(model).eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    bits = qft.layer_bits(student, 4, cfg.keep_8bit_fraction)
    assert sorted(set(bits.values())) == [4]  # this net has no layer inside the 1% budget
    qnet = qft.build_qft_net(student, x, bits, 8, mode)
    assert qnet.qft_layers()["c2"].t_in.vector  # c1 -> relu -> c2 only: the left scale is trainable
    assert not qnet.qft_layers()["c1"].t_in.vector  # stem output fans out to the add: a fixed to 1
    with torch.no_grad():
        before = float(((qnet(x) - teacher(x)) ** 2).mean())
    qft.train_qft(qnet, teacher, x, cfg)
    with torch.no_grad():
        after = float(((qnet(x) - teacher(x)) ** 2).mean())
        online = (qnet.gm(x) + qnet.t_final.zp).numpy()
    assert after < before
    assert float(qnet.qft_layers()["c2"].t_in.log_a.detach().abs().max()) > 0  # the vector scale moved
    deploy = qnet.deploy(x).numpy()
    reference = qnet.reference(x.numpy())
    assert np.array_equal(deploy, reference.astype(np.float32))
    assert np.array_equal(online, deploy)


@pytest.mark.slow
def test_calibrate_qft_resnet20_bit_exact():
    x = torch.randn(24, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = qft.QFTConfig(epochs=1, images_per_epoch=16, calib_batch=24, progress=False)
    qnet, student = qft.run_qft(load_pretrained("resnet20"), x, 4, 8, cfg)
    bits = {n: lay.wbits for n, lay in qnet.qft_layers().items()}
    assert bits["conv1"] == 8 and bits["fc"] == 8 and bits["layers.0.0.conv1"] == 4
    vec = [n for n, lay in qnet.qft_layers().items() if lay.t_in.vector]
    assert len(vec) == 9 and all(n.endswith("conv2") for n in vec)
    assert np.array_equal(qnet.deploy(x[:2]).numpy(), qnet.reference(x[:2].numpy()).astype(np.float32))
    qm = qft.to_quant_model(qnet, student, (1, 32, 32))
    assert torch.equal(qm.deploy(x[:4]), qnet(x[:4]).detach())


def test_layer_bits_and_schedule():
    model = fold_bn(load_pretrained("resnet20"))
    bits = qft.layer_bits(model, 4, 0.01)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    kept = [n for n, b in bits.items() if b == 8]
    assert sum(sizes[n] for n in kept) <= 0.01 * sum(sizes.values())
    smallest_4bit = min(sizes[n] for n, b in bits.items() if b == 4)
    assert all(sizes[n] <= smallest_4bit for n in kept)
    cfg = qft.QFTConfig()
    assert [qft.lr_at(e, cfg) for e in (0, 4, 8)] == pytest.approx([1e-4, 5e-5, 2.5e-5])
    assert qft.lr_at(2, cfg) == pytest.approx(0.5e-4) and qft.lr_at(11.99, cfg) < 1e-7


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        qft.QFTConfig(mode="perchannel")
    with pytest.raises(ValueError, match="calib_data"):
        qft.calibrate_qft(_Tiny(), torch.randn(4, 8, 8), 4, 8, _cfg("layerwise"))
    with pytest.raises(ValueError, match="method"):
        qft.calibrate_qft(_Tiny(), _data(), 4, 8, _cfg("layerwise"), method="isg")
    with pytest.raises(TypeError, match="model"):
        qft.calibrate_qft("resnet20", _data(), 4, 8, _cfg("layerwise"))

    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return torch.sigmoid(self.c(x))
    with pytest.raises(ValueError, match="sigmoid"):
        qft.calibrate_qft(Sig(), _data(), 4, 8, _cfg("layerwise"))


@pytest.mark.parametrize("mode", ["layerwise", "channelwise"])
def test_quant_model_deploy_equals_qft(mode):
    """The QuantModel from calibrate_qft: its integer deploy mode == the offline subgraph, bit for bit."""
    torch.manual_seed(2)
    model, x = _Tiny().eval(), _data(3)
    qnet, student = qft.run_qft(model, x, 4, 8, _cfg(mode))
    qm = qft.to_quant_model(qnet, student, (2, 8, 8))
    mine = qnet.deploy(x).to(torch.float32) * torch.tensor(float(qnet.t_final.s().detach()), dtype=torch.float32)
    assert torch.equal(qm.deploy(x), mine)
    assert torch.equal(qm.deploy(x), qnet(x).detach())
    qp = qm.integer_model().run(x)
    for name, lay in qnet.qft_layers().items():  # NORM constants equal those of norm_constants
        il = qm.integer_model().fns[[s.op for s in qm.program].index(name.replace(".", "/"))]
        assert np.array_equal(il.m.reshape(-1).numpy(), lay.export()["m"])
        assert np.array_equal(il.b.reshape(-1).numpy(), lay.export()["b"])
    assert qp[qm.output].dtype == torch.int64


def test_qft_quant_model_exports_and_compiles_bit_exact():
    """QFT constants survive the ONNX export and the compiler: the NPU run == deploy mode."""
    compiler = pytest.importorskip("ioso_tvm.compiler")
    export = pytest.importorskip("ioso_tvm.export")
    torch.manual_seed(2)
    x = _data(3)
    qm = qft.calibrate_qft(_Tiny().eval(), x, 4, 8, _cfg("channelwise", epochs=1, images_per_epoch=32))
    model = export.export_onnx(qm, None, (x.shape[0], 2, 8, 8))
    cm = compiler.compile(model, "ioso_npu")
    assert not cm.fallbacks
    assert np.array_equal(cm.run(x.numpy()), qm.deploy(x).numpy())


def test_qft_isg_hardens_and_stays_bit_exact():
    """method qft+isg: soft groups train, harden to granular groups; deploy == QuantModel == reference."""
    from hw_model.config import DEFAULT_CONFIG
    torch.manual_seed(4)
    model, x = _Tiny().eval(), _data(5)
    qnet, student = qft.run_qft(model, x, 4, 8, _cfg("channelwise", isg=True, isg_lambda=0.0))
    for lay in qnet.qft_layers().values():
        assert lay.isg.hard
        counts = np.bincount(lay.isg.groups.numpy(), minlength=3)
        assert sum(int(c) % DEFAULT_CONFIG.granularity != 0 for c in counts) <= 1
    qm = qft.to_quant_model(qnet, student, (2, 8, 8))
    assert torch.equal(qm.deploy(x), qnet(x).detach())
    assert np.array_equal(qnet.deploy(x).numpy(), qnet.reference(x.numpy()).astype(np.float32))


@pytest.mark.slow
def test_mobilenetv2_small_relu6_depthwise_bit_exact():
    """ReLU6 outputs keep a = 1 (per-tensor clip); depthwise convs; deploy == reference == QuantModel."""
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = qft.QFTConfig(epochs=1, images_per_epoch=16, calib_batch=16, progress=False, mode="channelwise")
    qnet, student = qft.run_qft(load_pretrained("mobilenetv2_small"), x, 4, 8, cfg)
    layers = list(qnet.qft_layers().values())
    assert any(lay.act == "relu6" for lay in layers) and any(lay.groups > 1 for lay in layers)
    assert not any(lay.t_out.vector for lay in layers if lay.act == "relu6")
    assert np.array_equal(qnet.deploy(x[:2]).numpy(), qnet.reference(x[:2].numpy()).astype(np.float32))
    qm = qft.to_quant_model(qnet, student, (1, 32, 32))
    assert torch.equal(qm.deploy(x[:4]), qnet(x[:4]).detach())
