"""Float model definitions (no torchvision), BN folding, and the shipped trained checkpoints.

Every model is built from modules only: Conv2d, BatchNorm2d, ReLU / ReLU6, MaxPool2d,
AdaptiveAvgPool2d(1), Flatten, Linear, plus ``+`` for residual adds (ResNet: followed by
its own ReLU module; MobileNetV2: none). Each activation is a distinct module instance, so
``torch.fx.symbolic_trace`` and forward hooks see one node per layer.

Inputs are float32 NCHW: ImageNet-shape models take (N, 3, 224, 224), the small models take
the Fashion-MNIST input of ``ioso_tvm.datasets.to_model_input`` (N, 1, 32, 32).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv2d (no bias, 'same' padding k//2) + BatchNorm2d."""
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ----------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv-BN projection (option B of He et al. 2016)
    when the stride or the channel count changes.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(planes, cout, 3)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck (v1.5: stride on the 3x3 conv): 1x1, 3x3, 1x1 (x4), + shortcut, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, planes, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = _conv_bn(planes, cout, 1)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """ResNet. ``imagenet=True``: stem conv7x7/2 + maxpool3x3/2 and four stages 64..512 planes
    (He et al. 2016, Table 1); ``imagenet=False``: CIFAR stem conv3x3/1 and three stages
    16/32/64 (He et al. 2016, Sec. 4.2), with 1x1 projection shortcuts.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3, imagenet: bool = True) -> None:
        super().__init__()
        widths = [64, 128, 256, 512] if imagenet else [16, 32, 64]
        if len(layers) != len(widths):
            raise ValueError(f"layers must have {len(widths)} entries, got {layers}")
        stem = widths[0]
        if imagenet:
            self.conv1, self.bn1 = _conv_bn(in_channels, stem, 7, 2)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1, self.bn1 = _conv_bn(in_channels, stem, 3, 1)
            self.relu = nn.ReLU()
            self.maxpool = nn.Identity()
        cin = stem
        stages = []
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(self.flatten(self.avgpool(x)))


# ------------------------------------------------------------------------------ MobileNetV2
def _make_divisible(v: float, divisor: int) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10 % below ``v``
    (the rule of the MobileNetV2 reference implementation)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand-BN-ReLU6], 3x3 depthwise-BN-ReLU6, 1x1 project-BN
    (linear bottleneck), + input when stride 1 and cin == cout (no activation after the add)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand ratio t, channels c, repeats n, stride s): Sandler et al. 2018, Table 2.
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1)]
# Small-input variant for 32x32: stem stride 2 (32->16) then the 24- and 160-channel stages at
# stride 1, so the last stage stays 4x4. Chosen: keeps enough spatial extent for 32x32 inputs.
_MBV2_SMALL_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 1), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018): stem conv3x3/2 (32 ch), inverted residuals, 1x1 conv to
    1280 (scaled up only for width_mult > 1), global average pool, Linear (no dropout)."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 settings: list[tuple[int, int, int, int]] | None = None, divisor: int = 8) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        settings = _MBV2_SETTINGS if settings is None else settings
        cin = _make_divisible(32 * width_mult, divisor)
        last = _make_divisible(1280 * max(1.0, width_mult), divisor)
        features: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, cin, 3, 2), nn.ReLU6())]
        for t, c, n, s in settings:
            cout = _make_divisible(c * width_mult, divisor)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN gamma 1 / beta 0, Linear N(0, 0.01): the torchvision recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# -------------------------------------------------------------------------------- builders
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18, input (N, 3, 224, 224). 11.69 M parameters."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, imagenet=True)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50 (v1.5), input (N, 3, 224, 224). 25.56 M parameters."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, imagenet=True)


def mobilenetv2(width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2, input (N, 3, 224, 224). 3.50 M parameters at width 1.0."""
    return MobileNetV2(width_mult, num_classes, in_channels)


def resnet20(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, projection
    shortcuts, so 272,186 parameters instead of the 0.27 M of option A), input (N, 1, 32, 32)."""
    return ResNet(BasicBlock, [3, 3, 3], num_classes, in_channels, imagenet=False)


def mobilenetv2_small(width_mult: float = 0.5, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (stem stride 2, last stage 4x4), input (N, 1, 32, 32);
    702,890 parameters at width 0.5.

    Channel counts are multiples of 16 (chosen: ``NPUConfig.granularity`` = 16, so every
    layer's channels fill whole ISG groups / MAC-row blocks).
    """
    return MobileNetV2(width_mult, num_classes, in_channels, settings=_MBV2_SMALL_SETTINGS, divisor=16)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "resnet20": resnet20,
    "mobilenetv2_small": mobilenetv2_small,
}

# Input shape (C, H, W) each model expects.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "resnet18": (3, 224, 224), "resnet50": (3, 224, 224), "mobilenetv2": (3, 224, 224),
    "resnet20": (1, 32, 32), "mobilenetv2_small": (1, 32, 32),
}


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build a float model by name (random init); ``kw`` goes to the builder."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kw)


# ------------------------------------------------------------------------------ BN folding
def fold_bn(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` (eval mode) where every BatchNorm2d that directly follows a
    Conv2d (whose output feeds nothing else) is folded into the conv's weight and bias and
    replaced by ``nn.Identity``. Patterns are found on the ``torch.fx`` graph."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    graph = fx.symbolic_trace(folded).graph
    mods = dict(folded.named_modules())
    conv_uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            conv_uses[node.target] = conv_uses.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(mods[prev.target], nn.Conv2d)):
            continue
        if len(prev.users) != 1 or conv_uses[prev.target] != 1:
            continue
        conv, bn = mods[prev.target], mods[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(f"BatchNorm2d {node.target!r} has no running statistics to fold")
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        folded.set_submodule(node.target, nn.Identity())
    return folded


# ------------------------------------------------------------------------------ checkpoints
PRETRAINED = ("resnet20", "mobilenetv2_small")


def checkpoint_path(name: str) -> Path:
    """Path of the shipped float checkpoint of ``name`` (``ioso_tvm/checkpoints/<name>.pt``)."""
    return CHECKPOINT_DIR / f"{name}.pt"


def load_pretrained(name: str) -> nn.Module:
    """Build ``name`` with its default arguments and load the shipped Fashion-MNIST float
    checkpoint (trained by ``benchmarks/train_fp.py``); returned in eval mode, BN not folded."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained checkpoint for model {name!r}; available: {list(PRETRAINED)}")
    path = checkpoint_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint for {name!r} missing: {path} (train it with benchmarks/train_fp.py)")
    model = build_model(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
