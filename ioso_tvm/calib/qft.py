"""QFT: joint fine-tuning of all quantization degrees of freedom by knowledge distillation.

Paper: QFT (``papers/002``) Sec. 3-4. ``calibrate_qft`` BN-folds the float model, optionally
equalises it (4-bit adapted CLE, App. D), builds the offline subgraph (``qft_offline``) with
MMSE-initialised weight scales (PPQ, App. C) and min-max activation ranges, then trains
every DoF (weights, biases, activation scales and vector scales, kernel scales) with an L2
loss between the quantized and the float model outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

from ioso_tvm.calib import qft_init as qi
from ioso_tvm.calib.device import module_device, resolve_device
from ioso_tvm.calib.qft_offline import (
    ADD_TARGETS,
    InputQuant,
    Passthrough,
    QFTAdd,
    QFTAvgPool,
    QFTLayer,
    QFTNet,
    TensorQ,
)
from ioso_tvm.models import fold_bn


@dataclass
class QFTConfig:
    """QFT hyper-parameters; every default says where it comes from."""

    mode: str = "layerwise"
    """'layerwise' (deployment-oriented: one weight scale per layer) or 'channelwise' (permissive). Table 1."""
    epochs: int = 12
    """Sec. 4: "12 epochs"."""
    images_per_epoch: int = 8192
    """Sec. 4: "of 8K images" (drawn from the calibration set, cycling)."""
    batch_size: int = 16
    """Sec. 4: batch 16."""
    lr: float = 1e-4
    """Sec. 4: Adam, cosine learning rate from 1e-4."""
    cosine_epochs: int = 4
    """Sec. 4: cosine period of 4 epochs, restarted at half the previous peak (1e-4, 5e-5, 2.5e-5)."""
    keep_8bit_fraction: float = 0.01
    """Sec. 4: the smallest layers adding up to 1% of the weight memory stay 8-bit."""
    cle: bool = True
    """App. D / Table 2: 4-bit adapted CLE as pre-conditioning (conv -> ReLU -> conv pairs)."""
    vector_act: bool = True
    """Eq. 12: train the activation vector scale a (left kernel scales) where it folds into the NPU."""
    isg: bool = False
    """method "qft+isg": ISG group logits of every low-bit layer as an extra DoF, hardened at the end."""
    isg_lambda: float = 1e-3
    """Weight of the ISG regulariser. Chosen: small against the L2 loss of logits (order 1e-2..1)."""
    isg_beta: tuple[float, float] = (20.0, 2.0)
    """Regulariser exponent annealed linearly from 20 to 2 (AdaRound / IOSO conference Eq. 11 schedule)."""
    calib_batch: int = 256
    """Chosen: images used for the min-max activation ranges (enough for stable maxima at 28x28)."""
    seed: int = 0
    """Chosen: seed of the sample order."""
    progress: bool = True
    """Show a tqdm bar."""
    device: str | None = None
    """Where the distillation runs ("cpu", "cuda", "cuda:N"; None: cuda when available), as
    ``CalibConfig.device``. The offline subgraph is built on the CPU and trained there; the result comes
    back on the CPU."""

    def __post_init__(self) -> None:
        if self.mode not in ("layerwise", "channelwise"):
            raise ValueError(f"QFTConfig.mode must be 'layerwise' or 'channelwise', got {self.mode!r}")
        for name in ("epochs", "images_per_epoch", "batch_size", "cosine_epochs", "calib_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"QFTConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.keep_8bit_fraction < 1:
            raise ValueError("QFTConfig.lr must be > 0 and keep_8bit_fraction in [0, 1)")
        try:
            resolve_device(self.device)
        except ValueError as e:
            raise ValueError(f"QFTConfig.{e}") from None


def lr_at(epoch_pos: float, cfg: QFTConfig) -> float:
    """Cosine learning rate with restarts at half the previous peak; ``epoch_pos`` in epochs (float)."""
    cycle = int(epoch_pos // cfg.cosine_epochs)
    frac = (epoch_pos - cycle * cfg.cosine_epochs) / cfg.cosine_epochs
    return cfg.lr * 0.5 ** cycle * 0.5 * (1 + math.cos(math.pi * frac))


def layer_bits(model: nn.Module, wbits: int, keep_fraction: float) -> dict[str, int]:
    """Weight bits per Conv2d / Linear name: ``wbits``, or 8 for the smallest layers within ``keep_fraction``."""
    layers = [(n, m.weight.numel()) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total, used, bits = sum(n for _, n in layers), 0, {}
    for name, n in sorted(layers, key=lambda t: t[1]):
        keep = used + n <= keep_fraction * total
        used += n if keep else 0
        bits[name] = 8 if keep else wbits
    return bits


class _Ranges(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ranges: dict[str, tuple[float, float]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            lo, hi = float(out.min()), float(out.max())
            old = self.ranges.get(n.name, (lo, hi))
            self.ranges[n.name] = (min(lo, old[0]), max(hi, old[1]))
        return out


def _act_of(node: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module" and isinstance(mods[node.target], nn.ReLU6):
        return "relu6"
    if (node.op == "call_module" and isinstance(mods[node.target], nn.ReLU)) or \
            (node.op == "call_function" and node.target in (torch.relu, nn.functional.relu)):
        return "relu"
    return None


@torch.no_grad()
def build_qft_net(model: nn.Module, calib: torch.Tensor, wbits: dict[str, int], abits: int,
                  mode: str, vector_act: bool = True) -> QFTNet:
    """Offline-subgraph network of a BN-folded float ``model``; ranges from ``calib`` (N, C, H, W)."""
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # folded BatchNorms are Identity: drop them so ReLUs fuse
        if node.op == "call_module" and isinstance(mods[node.target], (nn.Identity, nn.Dropout)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    rng = _Ranges(gm)
    rng.run(calib)
    graph, env, tq = fx.Graph(), {}, {}
    root = nn.Module()
    fused: set[str] = set()
    count = [0]

    def add_mod(mod: nn.Module, prefix: str) -> str:
        count[0] += 1
        name = f"{prefix.replace('.', '_')}_{count[0]}"
        root.add_module(name, mod)
        return name

    def new_tensor(value: fx.Node, channels: int, vector: bool, act: str | None) -> TensorQ:
        # chosen: zero point 0, signed unless a ReLU / ReLU6 clip follows (as QuantModel's ActQuantizer)
        lo, hi = rng.ranges[value.name]
        s, zp = qi.act_qparams(lo, hi, abits, signed=act is None, symmetric=True)
        return TensorQ(s, zp, abits, act is None, channels, vector)

    def foldable(value: fx.Node, act: str | None) -> bool:
        users = list(value.users)
        return vector_act and act != "relu6" and bool(users) and all(
            u.op == "call_module" and isinstance(mods[u.target], (nn.Conv2d, nn.Linear)) for u in users)

    for node in gm.graph.nodes:
        if node.name in fused:
            env[node.name] = env[node.args[0].name]
            continue
        if node.op == "placeholder":
            t = new_tensor(node, calib.shape[1], False, None)
            x = graph.placeholder(node.name)
            env[node.name], tq[node.name] = graph.call_module(add_mod(InputQuant(t), "input"), (x,)), t
        elif node.op == "output":
            last = node.args[0]
            graph.output(env[last.name])
            return QFTNet(fx.GraphModule(root, graph), tq[last.name])
        elif node.op == "call_module" and isinstance(mods[node.target], (nn.Conv2d, nn.Linear)) or \
                node.op == "call_function" and node.target in ADD_TARGETS:
            users = list(node.users)
            act = _act_of(users[0], mods) if len(users) == 1 else None
            value = users[0] if act else node
            if act:
                fused.add(value.name)
            if node.op == "call_module":
                layer = mods[node.target]
                ch = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
                t = new_tensor(value, ch, foldable(value, act), act)
                mod = QFTLayer(layer, tq[node.args[0].name], t, act, wbits[node.target], mode, node.target)
                w = layer.weight.detach()
                mod.set_right_scale(qi.ppq_scale(w, mod.wbits, per_channel=mode == "channelwise"))
                args = (env[node.args[0].name],)
            else:
                a, b = node.args
                if not all(isinstance(v, fx.Node) for v in (a, b)) or any(tq[v.name].vector for v in (a, b)):
                    raise ValueError(f"add {node.name!r}: both inputs must be quantized tensors with a = 1")
                t = new_tensor(value, tq[a.name].channels, False, act)
                mod, args = QFTAdd(tq[a.name], tq[b.name], t, act, node.name), (env[a.name], env[b.name])
            env[node.name], tq[node.name] = graph.call_module(add_mod(mod, node.name), args), t
            if act:
                tq[value.name] = t
        elif node.op == "call_module" and isinstance(mods[node.target], nn.AdaptiveAvgPool2d) and \
                mods[node.target].output_size in (1, (1, 1)):
            src = tq[node.args[0].name]
            if src.vector:
                raise ValueError(f"average pool {node.name!r}: its input must have a = 1")
            t = new_tensor(node, src.channels, False, None)
            pool = QFTAvgPool(src, t, str(node.target))
            env[node.name] = graph.call_module(add_mod(pool, node.name), (env[node.args[0].name],))
            tq[node.name] = t
        elif node.op == "call_module" and isinstance(mods[node.target], (nn.Identity, nn.Flatten, nn.Dropout)):
            src = node.args[0]
            mod = nn.Flatten(1) if isinstance(mods[node.target], nn.Flatten) else nn.Identity()
            env[node.name] = graph.call_module(add_mod(mod, node.name), (env[src.name],))
            tq[node.name] = tq[src.name]
        elif node.op == "call_function" and node.target is torch.flatten:
            if tuple(node.args[1:]) + tuple(node.kwargs.values()) not in ((1,), (1, -1)):
                raise ValueError(f"flatten {node.name!r}: only torch.flatten(x, 1) is supported")
            env[node.name] = graph.call_module(add_mod(nn.Flatten(1), node.name), (env[node.args[0].name],))
            tq[node.name] = tq[node.args[0].name]
        elif _act_of(node, mods) == "relu" or node.op == "call_module" and isinstance(mods[node.target], nn.MaxPool2d):
            src = tq[node.args[0].name]
            if src.vector and _act_of(node, mods) is None:
                raise ValueError(f"max pool {node.name!r}: its input must have a = 1")
            mod = Passthrough("relu", src) if _act_of(node, mods) else Passthrough("pool", src, mods[node.target])
            env[node.name] = graph.call_module(add_mod(mod, node.name), (env[node.args[0].name],))
            tq[node.name] = src
        else:
            raise ValueError(f"QFT cannot quantize node {node.name!r} ({node.op} {node.target}); "
                             "supported: Conv2d, Linear, ReLU, ReLU6, add, MaxPool2d, global AvgPool, Flatten")
    raise ValueError("model graph has no output")


def _as_tensor(calib_data) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(calib_data) if not isinstance(calib_data, torch.Tensor) else calib_data)
    if x.dim() != 4 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError(f"calib_data must be a non-empty float (N, C, H, W) array, got shape {tuple(x.shape)}")
    return x.to(torch.float32)


_SHARED = {"batch_size": "batch_size", "beta": "isg_beta", "act_init_samples": "calib_batch"}
"""CalibConfig field -> QFTConfig field of the same meaning (mini-batch, ISG regulariser exponent
schedule, samples for the activation-range initialisation); forwarded when set away from its default."""


def _config(config) -> QFTConfig:
    """QFTConfig as given; a CalibConfig lends ``seed``, ``progress``, ``device`` and the fields of
    :data:`_SHARED` that the user changed from their defaults (QFT keeps its own published defaults
    otherwise); its other hyper-parameters belong to other methods."""
    if config is None or isinstance(config, QFTConfig):
        return config or QFTConfig()
    kw = {k: getattr(config, k) for k in ("seed", "progress", "device") if hasattr(config, k)}
    if dataclasses.is_dataclass(config):
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for src, dst in _SHARED.items():
            if src in defaults and getattr(config, src) != defaults[src]:
                kw[dst] = tuple(getattr(config, src)) if dst == "isg_beta" else int(getattr(config, src))
    return QFTConfig(**kw)


def run_qft(model: nn.Module, calib_data, wbits: int = 4, abits: int = 8,
            config: QFTConfig | None = None) -> tuple[QFTNet, nn.Module]:
    """QFT on ``calib_data`` (N, C, H, W float32): returns the trained QFTNet and the BN-folded
    (and CLE-equalised) float model it was built from."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _config(config)
    x = _as_tensor(calib_data)
    teacher = fold_bn(model).eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    bits = layer_bits(student, wbits, cfg.keep_8bit_fraction)
    if cfg.cle:
        qi.apply_cle(student, bits)
    qnet = build_qft_net(student, x[:cfg.calib_batch], bits, abits, cfg.mode, cfg.vector_act)
    device = resolve_device(cfg.device)
    train_qft(qnet.to(device), teacher.to(device), x, cfg)
    return qnet.cpu(), student


def calibrate_qft(model: nn.Module, calib_data, wbits: int = 4, abits: int = 8, config: QFTConfig | None = None,
                  method: str = "qft"):
    """QFT-calibrate a float ``model``; returns a ``QuantModel`` whose deploy mode computes exactly
    what the trained offline subgraph computes (see :func:`to_quant_model`).
    ``method="qft+isg"`` also trains ISG groups (``QFTConfig.isg``)."""
    if method not in ("qft", "qft+isg"):
        raise ValueError(f"method must be 'qft' or 'qft+isg', got {method!r}")
    config = _config(config)
    if method == "qft+isg":
        config = replace(config, isg=True)
    qnet, student = run_qft(model, calib_data, wbits, abits, config)
    return to_quant_model(qnet, student, tuple(_as_tensor(calib_data).shape[1:]))


@torch.no_grad()
def to_quant_model(qnet: QFTNet, student: nn.Module, input_shape: tuple[int, ...]):
    """The trained QFT state written into the calibration engine's ``QuantModel`` (same ops, names).

    Per conv / linear: weight = W_int * s_w, ``wq.scale`` = s_w = R (right scale), ``oso_scale`` =
    g = 1 / a_out, ``oso_offset`` = 0, bias, ISG all in the unity group, ``outq`` step / bits /
    clip; add, pool and input quantizers get their tensor's scale and bits. Every value is the
    float32 number the subgraph used, so ``norm_constants`` reproduces its m and b exactly.
    """
    from ioso_tvm.calib.qmodel import build_qmodel
    from ioso_tvm.calib.quantizers import WeightQuantizer

    qm = build_qmodel(student, input_shape, 8, 8, first_last_bits=None)

    def set_q(outq, t: TensorQ) -> None:
        if t.zp != 0 or outq.signed != t.signed:
            raise ValueError(f"tensor quantizer mismatch for {outq}: QuantModel needs zp 0 and matching sign")
        outq.bits = t.bits
        outq.step.fill_(float(t.s()))

    for mod in qnet.gm.modules():
        if isinstance(mod, InputQuant):
            set_q(qm.ops["input"].outq, mod.out)
        elif isinstance(mod, (QFTLayer, QFTAdd, QFTAvgPool)):
            key = mod.name.replace(".", "/")
            if key not in qm.ops:
                raise ValueError(f"QFT op {mod.name!r} has no counterpart in the QuantModel")
            op = qm.ops[key]
            set_q(op.outq, mod.t_out)
            if isinstance(mod, QFTLayer):
                c = mod.constants()
                s_w = c["s_w"].to(torch.float32)
                shape = [-1] + [1] * (op.weight.dim() - 1)
                op.weight.copy_(c["w_int"].reshape(op.weight.shape) * s_w.reshape(shape))
                op.wq = WeightQuantizer(op.weight, mod.wbits)
                op.wq.scale.copy_(s_w)
                op.bias.copy_(c["bias"].to(torch.float32))
                op.oso_scale.copy_(c["g"].to(torch.float32))
                op.oso_offset.zero_()
                op.isg.groups.copy_(mod.isg.groups)
                op.isg.hard = True
    for q in qm.quantizers():
        q.initialised = True
    return qm.eval()


def train_qft(qnet: QFTNet, teacher: nn.Module, x: torch.Tensor, cfg: QFTConfig) -> list[float]:
    """Knowledge distillation: Adam on the L2 distance of the outputs; returns the loss per step.
    Runs on the device of ``qnet`` (``teacher`` must be there too); mini-batches of ``x`` are moved there."""
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU: the sample order is the same on every device
    device = module_device(qnet)
    isg_layers = [lay for lay in qnet.qft_layers().values() if cfg.isg and lay.wbits < 8]
    for lay in isg_layers:
        lay.isg.init_soft()
    params = [p for p in qnet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = max(1, cfg.images_per_epoch // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    losses: list[float] = []
    order = torch.randperm(x.shape[0], generator=gen)
    pos = 0
    qnet.train()
    for step in tqdm(range(total), desc="QFT", disable=not cfg.progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step / steps_per_epoch, cfg)
        if pos + cfg.batch_size > order.numel():
            order, pos = torch.randperm(x.shape[0], generator=gen), 0
        xb = x[order[pos:pos + cfg.batch_size].to(x.device)].to(device)
        pos += cfg.batch_size
        with torch.no_grad():
            target = teacher(xb)
        loss = ((qnet(xb) - target) ** 2).mean()
        if isg_layers:
            beta = cfg.isg_beta[0] + (cfg.isg_beta[1] - cfg.isg_beta[0]) * step / max(total - 1, 1)
            loss = loss + cfg.isg_lambda * sum(lay.isg.reg(beta) for lay in isg_layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for lay in isg_layers:
            lay.isg.track(step)
        losses.append(loss.item())
    for lay in isg_layers:
        lay.isg.harden(lay.isg.cfg.granularity)
    qnet.eval()
    return losses
