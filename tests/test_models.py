"""Model zoo: shapes, parameter counts, fx tracing, BN folding equivalence, checkpoints."""
from __future__ import annotations

import importlib.util
import json
import operator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from ioso_tvm import datasets, models
from ioso_tvm.datasets import load_subset, to_model_input
from ioso_tvm.models import INPUT_SHAPES, MODELS, build_model, fold_bn, load_pretrained

# Parameter counts of the reference implementations (torchvision model cards).
KNOWN_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenetv2": 3_504_872}
ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
           nn.Linear, nn.Identity)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BN non-trivial statistics and affine parameters so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def _small_input(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    c, h, w = INPUT_SHAPES[name]
    if h > 32:  # ImageNet models are fully convolutional up to the global pool: 64x64 keeps tests fast
        h = w = 64
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_param_counts(name: str) -> None:
    assert sum(p.numel() for p in build_model(name).parameters()) == KNOWN_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_ops(name: str) -> None:
    model = build_model(name).eval()
    c, h, w = INPUT_SHAPES[name]
    classes = 1000 if h == 224 else 10
    with torch.no_grad():
        assert model(torch.randn(1, c, h, w)).shape == (1, classes)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED) for m in leaves), {type(m).__name__ for m in leaves}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fx_trace_matches_and_is_clean(name: str) -> None:
    model = build_model(name).eval()
    gm = fx.symbolic_trace(model)
    x = _small_input(name)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    funcs = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert funcs <= {operator.add}, funcs
    # each activation module is used exactly once (no shared ReLU instances)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(targets) == len(set(targets))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_fold_bn_preserves_function(name: str, seed: int) -> None:
    model = build_model(name)
    _randomize_bn(model, seed)
    model.eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "original must stay untouched"
    x = _small_input(name, seed=seed)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_fold_bn_skips_bn_not_after_conv() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _randomize_bn(model, 3)
    folded = fold_bn(model)
    assert isinstance(folded[2], nn.BatchNorm2d)
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(folded(x), model(x))


def test_build_model_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21")


def test_fold_bn_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="model"):
        fold_bn("resnet20")  # type: ignore[arg-type]


def test_load_pretrained_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="resnet20"):
        load_pretrained("resnet18")
    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_fp"):
        load_pretrained("resnet20")


@pytest.mark.parametrize("name", models.PRETRAINED)
def test_load_pretrained_roundtrip(name: str) -> None:
    if not models.checkpoint_path(name).is_file():
        pytest.skip(f"checkpoint {name} not shipped yet")
    model = load_pretrained(name)
    assert not model.training
    state = torch.load(models.checkpoint_path(name), map_location="cpu", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# Targets of the training task (Fashion-MNIST 10k test top-1), see benchmarks/train_fp.py.
TARGETS = {"resnet20": 0.93, "mobilenetv2_small": 0.92}


@pytest.mark.parametrize("name", models.PRETRAINED)
def test_pretrained_accuracy_and_log(name: str) -> None:
    if not models.checkpoint_path(name).is_file():
        pytest.skip(f"checkpoint {name} not shipped yet")
    log = json.loads(models.checkpoint_path(name).with_suffix(".json").read_text())
    assert log["model"] == name and log["test_images"] == 10000 and log["train_images"] == 60000
    assert len(log["history"]) == log["epochs"] and log["final_test_acc"] == log["history"][-1]["test_acc"]
    assert log["final_test_acc"] >= TARGETS[name]
    x, y = load_subset("test")
    xt = torch.from_numpy(to_model_input(x))
    model = load_pretrained(name)
    with torch.no_grad():
        pred = model(xt).argmax(1).numpy()
        pred_folded = fold_bn(model)(xt).argmax(1).numpy()
    # shipped 2000-image subset: within ~2 binomial standard errors below the 10k figure
    assert (pred == y).mean() >= log["final_test_acc"] - 0.012
    assert (pred_folded == pred).mean() >= 0.999


def _load_train_fp():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_fp.py"
    spec = importlib.util.spec_from_file_location("train_fp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_augment_is_crop_and_flip() -> None:
    tfp = _load_train_fp()
    x = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = tfp.augment(x, torch.Generator().manual_seed(1))
    bg = (0.0 - datasets.MEAN) / datasets.STD
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4), value=bg)
    flips = 0
    for b in range(len(x)):
        crops = [xp[b, 0, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        plain = any(torch.equal(c, out[b, 0]) for c in crops)
        flipped = any(torch.equal(c.flip(-1), out[b, 0]) for c in crops)
        assert plain or flipped, b
        flips += flipped and not plain
    assert 4 <= flips <= 28  # p = 0.5 flips on 32 samples


def test_train_fp_tiny_run(tmp_path) -> None:
    tfp = _load_train_fp()
    x, y = load_subset("calib")
    arrays = {"x_train": x[:256], "y_train": y[:256], "x_test": x[256:320], "y_test": y[256:320]}
    model, log = tfp.train("resnet20", arrays, epochs=1, seed=0, bs=128, lr=0.1, wd=5e-4, device="cpu")
    assert len(log["history"]) == 1 and log["train_images"] == 256
    assert 0.0 <= log["final_test_acc"] <= 1.0 and np.isfinite(log["history"][0]["loss"])
    assert not model.training
