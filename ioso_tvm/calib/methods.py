"""Calibration methods and their defaults: AdaRound, BRECQ, QDrop, IOSO (on BRECQ or QDrop), RTN.

A method is a :class:`MethodSpec`: block granularity, whether activations are quantized (with
QDrop's random drop) during the weight step, and whether ISG / OSO are learned.
"""
from __future__ import annotations

from dataclasses import dataclass

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .device import resolve_device


@dataclass
class CalibConfig:
    """Calibration hyper-parameters; defaults are the published ones (source in each comment)."""

    num_samples: int = 1024
    """Calibration images. BRECQ Sec. 4 / QDrop Sec. 5 / IOSO journal Sec. IV: 1,024."""
    batch_size: int = 32
    """Mini-batch. BRECQ code (yhhhli/BRECQ main_imagenet.py --batch_size 32 for reconstruction)."""
    iters: int = 20000
    """Weight-step iterations per block. AdaRound Sec. 5 / BRECQ main_imagenet.py --iters_w 20000."""
    lr_round: float = 1e-3
    """Adam lr of the rounding logits V. AdaRound Sec. 5 / BRECQ code (default Adam lr 1e-3)."""
    lr_isg: float | None = None
    """Adam lr of the group logits R; None: :func:`default_lr_isg` = 1e-3 x 20000 / ``iters`` (at least 1e-3).
    1e-3 at the published 20000 iterations: chosen, same as V (the journal trains R "like h(V)",
    Sec. III-D). Shorter schedules keep the same total Adam travel (lr x iters): measured on ResNet-20
    W2A4 at 500 iterations, lr 1e-3 leaves every channel in the unity group (737/0/0 channels, top-1
    81.55 %), lr 0.04 moves them (1/112/624, top-1 86.65 %)."""
    lr_oso: float = 1e-4
    """Adam lr of the OSO scale / offset. Chosen: 10x below V so OSO refines, not replaces, the weights."""
    reg_weight: float | None = None
    """Rounding regulariser weight lambda_r (= lambda_g); None: :func:`default_reg_weight` of the model,
    BRECQ main_imagenet.py --weight 0.01, and 0.1 for MobileNetV2 (BRECQ README, MobileNetV2 setting)."""
    warmup: float = 0.2
    """Fraction of iterations without regulariser. AdaRound Sec. 5 / BRECQ --warmup 0.2."""
    beta: tuple[float, float] = (20.0, 2.0)
    """Regulariser beta annealed start -> end. AdaRound Sec. 5 / BRECQ --b_start 20 --b_end 2."""
    act_iters: int = 5000
    """Activation-step (LSQ) iterations per block. BRECQ main_imagenet.py --iters_a 5000."""
    lr_act: float = 4e-5
    """Adam lr of the activation step sizes. BRECQ main_imagenet.py --lr 4e-5."""
    lr_oso_act: float | None = None
    """Adam lr of OSO in the activation step; None: :func:`default_lr_act` = 4e-5 x 5000 / ``act_iters``
    (at least 4e-5), the published lr and total Adam travel (BRECQ --lr 4e-5 --iters_a 5000), as for
    ``lr_isg``. Measured on MobileNetV2 (Fashion-MNIST) W4A4 IOSO seed 0 at 500/100 iterations with
    step sizes and OSO sharing one lr: 4e-5 gives 90.85 % top-1, 4e-4 91.2 %, 2e-3 92.15 % (float 93.30 %);
    the step sizes keep 4e-5, because at 2e-3 BRECQ (no OSO) loses 13.5 pp on ResNet-20 W2A4."""
    drop_prob: float = 0.5
    """QDrop probability of keeping the float activation at the block input. QDrop Sec. 4 (p = 0.5)."""
    base: str = "brecq"
    """IOSO on top of "brecq" or "qdrop". Journal Sec. IV: the code is based on BRECQ."""
    ioso_parts: tuple[str, ...] = ("isg", "oso")
    """What method "ioso" learns: "isg" (input-channel scale groups), "oso" (output scale/offset) or both.
    Published: both; one alone is the ablation of the conference paper (papers/000, Sec. 4.2, Table 4)."""
    oso_position: str = "before_act"
    """Where OSO sits: "before_act" (published: folded into NORM) or "after_act" (papers/000 App. D.7,
    Table 9 ablation). "after_act" runs in fake-quant only: the NPU's ACT clamp is per layer, and OSO
    after a ReLU needs a per-channel one, so such a model cannot be exported or deployed."""
    granularity: int = DEFAULT_CONFIG.granularity
    """Channels per ISG group come in multiples of this (1 = free). NPUConfig.granularity (journal App. A-C)."""
    harden_at: float = 0.9
    """Fraction of the weight step after which groups are hardened; the rest fine-tunes V and OSO.
    Chosen: leaves 10 % of the iterations to adapt the rounding to the final groups (journal App. A-C)."""
    first_last_bits: int | None = 8
    """Bits of the first / last layer (weights and their activations). BRECQ / QDrop / journal Sec. IV: 8."""
    act_init_samples: int = 256
    """Samples used for the MSE initialisation of activation scales. Chosen: enough for stable statistics."""
    memory_budget_mb: float = 2048.0
    """Cached block inputs/outputs above this size are spilled to disk. Chosen: fits a laptop."""
    spill_dir: str | None = None
    """Folder for spilled caches (default: a temporary folder)."""
    seed: int = 0
    """Seed of the torch generator (batch order, QDrop masks)."""
    checkpoint_dir: str | None = None
    """Folder for one checkpoint per finished block (tensors only, ``torch.load(weights_only=True)``);
    a calibration started again with the same folder, model, data and settings resumes after the
    last finished block and gives the same result as an uninterrupted run. None: no checkpoints."""
    progress: bool = True
    """One tqdm bar over every block's steps, with the current loss and an ETA; when stderr is not a terminal,
    one ``logging`` line per block (``ioso_tvm.calib``: losses, elapsed, ETA) instead."""
    device: str | None = None
    """Where the reconstruction runs: "cpu", "cuda", "cuda:N"; None: "cuda" when torch sees a GPU, else "cpu"
    (``device.resolve_device``). The model, the cached block inputs / outputs (``memory_budget_mb`` then
    counts device memory) and the optimiser state live there; checkpoints hold CPU tensors and resume on
    any device. Seeded runs are bit-identical per device, not across devices (float reductions differ).
    The calibrated model comes back on the CPU."""
    npu: NPUConfig = DEFAULT_CONFIG
    """Hardware description (ISG group factors)."""

    def validate(self) -> None:
        for name in ("num_samples", "batch_size", "act_init_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CalibConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iters", "act_iters"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"CalibConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.base not in ("brecq", "qdrop"):
            raise ValueError(f"CalibConfig.base must be 'brecq' or 'qdrop', got {self.base!r}")
        if not 0 <= self.drop_prob <= 1 or not 0 <= self.warmup < 1 or not 0 < self.harden_at <= 1:
            raise ValueError("CalibConfig.drop_prob, warmup and harden_at must be fractions in [0, 1]")
        if self.lr_isg is not None and not self.lr_isg > 0:
            raise ValueError(f"CalibConfig.lr_isg must be > 0 or None, got {self.lr_isg}")
        if not self.lr_act > 0 or (self.lr_oso_act is not None and not self.lr_oso_act > 0):
            raise ValueError(f"CalibConfig.lr_act / lr_oso_act must be > 0, got {self.lr_act} / {self.lr_oso_act}")
        if self.reg_weight is not None and not self.reg_weight >= 0:
            raise ValueError(f"CalibConfig.reg_weight must be >= 0 or None, got {self.reg_weight}")
        if not self.ioso_parts or not set(self.ioso_parts) <= {"isg", "oso"}:
            raise ValueError(f"CalibConfig.ioso_parts must be a non-empty subset of ('isg', 'oso'), got "
                             f"{self.ioso_parts!r}")
        if self.oso_position not in ("before_act", "after_act"):
            raise ValueError(f"CalibConfig.oso_position must be 'before_act' or 'after_act', got {self.oso_position!r}")
        if self.granularity < 1:
            raise ValueError(f"CalibConfig.granularity must be >= 1, got {self.granularity}")
        try:
            resolve_device(self.device)
        except ValueError as e:
            raise ValueError(f"CalibConfig.{e}") from None


@dataclass(frozen=True)
class MethodSpec:
    """What a method learns. ``blocks``: "block" (BRECQ) or "layer" (AdaRound)."""

    name: str
    blocks: str = "block"
    adaround: bool = True
    qdrop: bool = False
    isg: bool = False
    oso: bool = False


LR_ISG = 1e-3
"""Adam lr of the group logits at ``PUBLISHED_ITERS`` (chosen: same as the rounding logits, AdaRound Sec. 5)."""
PUBLISHED_ITERS = 20000
"""AdaRound Sec. 5 / BRECQ main_imagenet.py --iters_w 20000."""


def default_lr_isg(iters: int) -> float:
    """lr of the ISG logits when ``CalibConfig.lr_isg`` is None: LR_ISG x PUBLISHED_ITERS / iters, >= LR_ISG."""
    return LR_ISG * max(1.0, PUBLISHED_ITERS / max(int(iters), 1))


LR_ACT = 4e-5
"""Adam lr of the activation step at ``PUBLISHED_ACT_ITERS`` (BRECQ main_imagenet.py --lr 4e-5)."""
PUBLISHED_ACT_ITERS = 5000
"""BRECQ main_imagenet.py --iters_a 5000."""


def default_lr_act(act_iters: int) -> float:
    """lr of OSO in the activation step when ``CalibConfig.lr_oso_act`` is None:
    LR_ACT x PUBLISHED_ACT_ITERS / act_iters, at least LR_ACT."""
    return LR_ACT * max(1.0, PUBLISHED_ACT_ITERS / max(int(act_iters), 1))


REG_WEIGHT = 0.01
"""BRECQ main_imagenet.py --weight 0.01 (ResNets)."""
REG_WEIGHT_MOBILENETV2 = 0.1
"""BRECQ's published setting for MobileNetV2 (--weight 0.1)."""


def is_mobilenet_v2(model) -> bool:
    """True for a MobileNetV2: its class is named so, or it is built of InvertedResidual blocks."""
    return type(model).__name__ == "MobileNetV2" or any(
        type(m).__name__ == "InvertedResidual" for m in model.modules())


def default_reg_weight(model) -> float:
    """lambda_r when the user left ``CalibConfig.reg_weight`` at None: 0.1 for MobileNetV2, else 0.01."""
    return REG_WEIGHT_MOBILENETV2 if is_mobilenet_v2(model) else REG_WEIGHT


METHODS = ("rtn", "adaround", "brecq", "qdrop", "ioso", "qft", "qft+isg")


def method_spec(method: str, config: CalibConfig) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``; ``"ioso"`` builds on ``config.base``."""
    if method == "rtn":
        return MethodSpec("rtn", adaround=False)
    if method == "adaround":
        return MethodSpec("adaround", blocks="layer")
    if method == "brecq":
        return MethodSpec("brecq")
    if method == "qdrop":
        return MethodSpec("qdrop", qdrop=True)
    if method == "ioso":
        return MethodSpec("ioso", qdrop=config.base == "qdrop", isg="isg" in config.ioso_parts,
                          oso="oso" in config.ioso_parts)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
