"""CalibConfig.device / ioso-calibrate --device: resolution, one-line refusals, tensors created on the model's
device (checked on torch's "meta" device), checkpoints saved on another device, CPU results unchanged.
No test needs a GPU."""
from __future__ import annotations

import re

import pytest
import torch
import torch.serialization as serialization
from test_calib_api import SMALL, TinyRes, _data

from ioso_tvm import cli as calib_cli
from ioso_tvm.calib import CalibConfig, build_qmodel, calibrate
from ioso_tvm.calib.device import module_device, resolve_device
from ioso_tvm.calib.engine import Engine, TensorCache
from ioso_tvm.calib.methods import method_spec
from ioso_tvm.calib.qft import QFTConfig
from ioso_tvm.calib.quantizers import mse_weight_scale
from ioso_tvm.export import export_onnx


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("gpus, want", [(0, "cpu"), (1, "cuda"), (2, "cuda")])
def test_default_is_cuda_when_available(monkeypatch, gpus, want):
    _gpus(monkeypatch, gpus)
    assert resolve_device(None) == torch.device(want)
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_devices_are_checked_against_what_torch_sees(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ValueError, match=r"^device 'cuda:2' requested but torch sees 2 GPU\(s\) \(cuda:0..cuda:1\)$"):
        resolve_device("cuda:2")


BAD = [  # device, message pattern (no GPU)
    ("cuda", r"^device 'cuda' requested but CUDA is not available \(this torch .* sees no GPU\); use device 'cpu'$"),
    ("cuda:0", r"^device 'cuda:0' requested but CUDA is not available"),
    ("gpu", r"^device 'gpu' is not a torch device; use 'cpu', 'cuda', 'cuda:N'"),
    ("cuda:x", r"^device 'cuda:x' is not a torch device"),
    ("meta", r"^device 'meta' is not supported for calibration"),
    (3, r"^device must be 'cpu', 'cuda', .*; got a int$"),
]


@pytest.mark.parametrize("device, pattern", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_devices_are_one_line_errors(monkeypatch, device, pattern):
    _gpus(monkeypatch, 0)
    for make in (lambda: resolve_device(device), lambda: CalibConfig(device=device).validate(),
                 lambda: QFTConfig(device=device)):
        with pytest.raises(ValueError) as info:
            make()
        msg = re.sub(r"^(CalibConfig|QFTConfig)\.", "", str(info.value))
        assert "\n" not in msg and re.search(pattern, msg), msg


def test_calibrate_refuses_cuda_without_a_gpu_before_any_work(monkeypatch):
    _gpus(monkeypatch, 0)
    monkeypatch.setattr(Engine, "run", lambda *a: pytest.fail("calibration started"))
    for method in ("brecq", "qft"):
        with pytest.raises(ValueError, match=r"^(CalibConfig|QFTConfig)\.device 'cuda' requested but CUDA is not"):
            calibrate(TinyRes().eval(), _data(), method, config=CalibConfig(**SMALL, device="cuda"))


@pytest.mark.parametrize("flag, pattern", [
    (["--device", "cuda"], r"^ioso-calibrate: error: --device 'cuda' requested but CUDA is not available"),
    (["--device", "tpu7"], r"^ioso-calibrate: error: --device 'tpu7' is not a torch device"),
    (["--threads", "0"], r"^ioso-calibrate: error: --threads must be at least 1, got 0$"),
])
def test_cli_device_and_threads_errors_are_one_line(monkeypatch, tmp_path, capsys, flag, pattern):
    _gpus(monkeypatch, 0)
    out = tmp_path / "q.onnx"
    rc = calib_cli.main(["--model", "resnet20", "--method", "rtn", "--num-samples", "4", *flag, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and re.search(pattern, err), err
    assert not out.exists()


def _onnx(qm) -> bytes:
    return export_onnx(qm, None, (1, *_data().shape[1:])).SerializeToString()


@pytest.mark.parametrize("method", ["qdrop", "ioso", "qft"])
def test_cpu_device_equals_the_default_and_the_model_comes_back_on_the_cpu(method):
    torch.manual_seed(1)
    net = TinyRes(c=8).eval()
    make = CalibConfig if method != "qft" else QFTConfig
    cfg = SMALL if method != "qft" else dict(epochs=1, images_per_epoch=64, batch_size=8, progress=False)
    a = calibrate(net, _data(), method, 2, 4, make(**cfg))
    b = calibrate(net, _data(), method, 2, 4, make(**cfg, device="cpu"))
    assert {t.device.type for t in [*b.parameters(), *b.buffers()]} == {"cpu"}
    assert _onnx(a) == _onnx(b)


def test_tensors_are_created_on_the_models_device():
    """Every tensor the engine creates while learning follows the model (torch's shape-only "meta" device)."""
    torch.manual_seed(0)
    qm = build_qmodel(TinyRes(c=8).eval(), (1, 12, 12), 2, 4).to("meta")
    meta = torch.device("meta")
    assert module_device(qm) == meta
    for layer in qm.layers():
        layer.wq.init_adaround(layer.weight)
        layer.isg.init_soft()
        assert layer.wq.v.device == meta and layer.isg.r.device == meta
        assert layer.wq.round_reg(2.0).device == meta and layer.isg.reg(2.0).device == meta
        x = torch.zeros((2, layer.in_channels, 6, 6) if layer.kind == "conv" else (2, layer.in_channels), device=meta)
        assert layer.isg.gamma().device == meta and layer.pre_act(x).device == meta
    assert mse_weight_scale(torch.randn(4, 3, 3, 3, device="meta"), 4).device == meta
    x = _data(8)
    assert qm.float_forward(x).device == meta  # CPU input moved to the model


def test_caches_hold_their_rows_on_the_device(tmp_path):
    x, idx = _data(16), torch.tensor([5, 1, 9, 1])
    for spill in (None, tmp_path / "c.f32"):
        cache = TensorCache(x, spill, torch.device("meta"))
        assert cache[idx].device.type == "meta" and tuple(cache[idx].shape) == (4, *x.shape[1:])
        cpu = TensorCache(x, spill, torch.device("cpu"))
        assert torch.equal(cpu[idx], x[idx])


def _tag_as_cuda(storage):
    return "cuda:0" if storage.device.type == "cpu" else None


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """A checkpoint whose tensors are tagged "cuda:0" (as torch.save writes them on a GPU) loads with
    map_location="cpu", and the resumed calibration equals the uninterrupted one."""
    torch.manual_seed(3)
    net = TinyRes(c=8).eval()
    cfg = CalibConfig(**SMALL, granularity=4, checkpoint_dir=str(tmp_path))
    want = _onnx(calibrate(net, _data(), "ioso", 2, 4, cfg))
    files = sorted(tmp_path.glob("block*.pt"))
    for f in files[1:]:
        f.unlink()  # interrupted after block 0
    state = torch.load(files[0], weights_only=True)
    monkeypatch.setattr(serialization, "_package_registry", list(serialization._package_registry))
    serialization.register_package(0, _tag_as_cuda, lambda obj, location: None)
    torch.save(state, files[0])
    monkeypatch.undo()
    _gpus(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really names a GPU
        torch.load(files[0], weights_only=True)
    ran = []
    original = Engine.calibrate_block
    monkeypatch.setattr(Engine, "calibrate_block", lambda self, *a, **k: (ran.append(1), original(self, *a, **k)))
    got = _onnx(calibrate(net, _data(), "ioso", 2, 4, cfg))
    assert len(ran) == len(files) - 1 > 0 and got == want


def test_qdrop_masks_on_an_accelerator_come_from_a_seeded_device_generator(monkeypatch):
    """On a non-CPU device the mask generator is re-seeded from the CPU generator per draw: the CPU
    generator is the only random state, so a checkpoint taken on one device resumes on another."""
    qm = build_qmodel(TinyRes(c=8).eval(), (1, 12, 12), 2, 4)
    cfg = CalibConfig(**SMALL, lr_isg=1e-3, lr_oso_act=4e-5)
    engine = Engine(qm, method_spec("qdrop", cfg), cfg)
    assert engine.mask_gen is None
    first = engine._uniform(torch.Size([3, 4]))
    engine.gen.manual_seed(cfg.seed)
    assert torch.equal(engine._uniform(torch.Size([3, 4])), first)  # CPU: the CPU generator's own stream
    engine.gen.manual_seed(cfg.seed)
    engine.mask_gen = torch.Generator()  # stands in for the device generator
    a = engine._uniform(torch.Size([3, 4]))
    state = engine.gen.get_state()
    b = engine._uniform(torch.Size([3, 4]))
    engine.gen.set_state(state)
    engine.mask_gen = torch.Generator().manual_seed(12345)  # a fresh device generator after a resume
    assert torch.equal(engine._uniform(torch.Size([3, 4])), b) and not torch.equal(a, b)


def test_threads_argument_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        calibrate(TinyRes().eval(), _data(), "rtn", config=CalibConfig(**SMALL), threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
            calibrate(TinyRes().eval(), _data(), "rtn", config=CalibConfig(**SMALL), threads=0)
    finally:
        torch.set_num_threads(before)
