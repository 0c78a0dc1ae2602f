"""Post-training calibration in torch (AdaRound / BRECQ / QDrop / IOSO, QFT plug-in), integer deploy mode.

``calibrate(model, calib_data, method=..., wbits=4, abits=4, config=CalibConfig()) -> QuantModel``.
IOSO runs on top of BRECQ (default) or QDrop: ``calibrate(..., method="ioso", config=CalibConfig(base="qdrop"))``.
Per-layer error report of the result: ``layer_report(qm, data)`` (``layer_report.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .data import gather_calib_data
from .device import resolve_device
from .layer_report import format_layer_report, layer_report, plot_layer_report
from .methods import (
    METHODS,
    CalibConfig,
    MethodSpec,
    default_lr_act,
    default_lr_isg,
    default_reg_weight,
    is_mobilenet_v2,
    method_spec,
)
from .qmodel import Block, QuantModel, Step, build_qmodel, check_calib_data
from .quantizers import check_bits

log = logging.getLogger(__name__)

__all__ = ["Block", "CalibConfig", "CalibrationWarning", "MethodSpec", "QuantModel", "Step", "build_qmodel",
           "calibrate", "format_layer_report", "layer_report", "plot_layer_report"]


class CalibrationWarning(UserWarning):
    """calibrate() changed something the caller handed over (a model in train mode is calibrated in eval mode)."""


def calibrate(model: nn.Module, calib_data: torch.Tensor | np.ndarray | Iterable, method: str = "ioso", wbits: int = 4,
              abits: int = 4, config: CalibConfig | None = None, threads: int | None = None) -> QuantModel:
    """Calibrate float ``model`` on ``calib_data`` (float32 (N, C, H, W), N >= batch size; also a list of
    tensors or a ``DataLoader`` yielding tensors or ``(x, y)`` tuples, concatenated: ``data.gather_calib_data``).
    A model in train mode is calibrated in eval mode (a copy; CalibrationWarning); integer images are refused.

    ``method``: "ioso" | "brecq" | "qdrop" | "adaround" | "rtn" | "qft" | "qft+isg" (dispatched to
    ``ioso_tvm.calib.qft.calibrate_qft(model, data, wbits, abits, config, method)``; a CalibConfig
    lends QFT its seed, progress and the fields of the same meaning the user changed, see ``qft._SHARED``,
    and ``num_samples``). ``CalibConfig.reg_weight=None`` becomes 0.1 for a MobileNetV2, else 0.01 (logged).
    Returns a QuantModel with hardened rounding and groups (``forward`` fake-quant, ``deploy``
    integer mode, ``ioso_tvm.export_onnx``), always on the CPU whatever ``config.device`` calibrated.
    Seeded by ``config.seed``: runs on one device are bit-identical.

    ``threads``: CPU threads for torch and BLAS/OpenMP (``target_npu.threads.set_threads``; the setting
    stays for the process, as ``torch.set_num_threads`` does); None leaves the current setting.
    """
    if threads is not None:
        from target_npu.threads import set_threads

        set_threads(threads)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wbits, abits = check_bits(wbits, "wbits"), check_bits(abits, "abits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"model {name!r} holds NaN or Inf values: calibrate a finite float model")
    if model.training:
        warnings.warn(f"calibrate: the model ({type(model).__name__}) is in train mode; calibrating it in eval mode "
                      "(BatchNorm running statistics, no dropout). Call model.eval() first to silence this.",
                      CalibrationWarning, stacklevel=2)
        model = copy.deepcopy(model).eval()
    limit = CalibConfig.num_samples if config is None else getattr(config, "num_samples", None)
    calib_data = gather_calib_data(calib_data, limit, int(getattr(config, "seed", 0) or 0))
    if method in ("qft", "qft+isg"):  # config may be a QFTConfig or a CalibConfig (qft.py decides)
        from . import qft

        data = check_calib_data(calib_data, None, int(getattr(config, "batch_size", 1)))
        if isinstance(config, CalibConfig) and config.num_samples != CalibConfig.num_samples:
            data = data[: config.num_samples]  # same meaning: calibration images (set by the user)
        return qft.calibrate_qft(model, data, wbits, abits, config, method=method)
    config = CalibConfig() if config is None else config
    if not isinstance(config, CalibConfig):
        raise TypeError(f"config must be a CalibConfig, got {type(config).__name__}")
    config.validate()
    if config.reg_weight is None:
        config = dataclasses.replace(config, reg_weight=default_reg_weight(model))
        log.info("calibrate: CalibConfig.reg_weight not set, using %g (%s)", config.reg_weight,
                 "BRECQ's MobileNetV2 setting" if is_mobilenet_v2(model) else "BRECQ default")
    if config.lr_isg is None:
        config = dataclasses.replace(config, lr_isg=default_lr_isg(config.iters))
        log.info("calibrate: CalibConfig.lr_isg not set, using %g (1e-3 x 20000 / %d iterations)", config.lr_isg,
                 config.iters)
    if config.lr_oso_act is None:
        config = dataclasses.replace(config, lr_oso_act=default_lr_act(config.act_iters))
        log.info("calibrate: CalibConfig.lr_oso_act not set, using %g (4e-5 x 5000 / %d iterations)",
                 config.lr_oso_act, config.act_iters)
    data = check_calib_data(calib_data, None, min(config.batch_size, config.num_samples))
    data = data[: config.num_samples]
    from .engine import Engine

    torch.manual_seed(config.seed)
    qm = build_qmodel(model, tuple(data.shape[1:]), wbits, abits, config.first_last_bits, config.npu)
    qm.to(resolve_device(config.device))  # weight scales are initialised on the CPU: the same on every device
    try:
        qm.float_forward(data[:1])
    except RuntimeError as e:
        raise ValueError(f"calib_data samples of shape {tuple(data.shape[1:])} do not fit the model: {e}") from e
    qm.init_act_scales(data[: config.act_init_samples])
    spec = method_spec(method, config)
    if spec.oso and config.oso_position == "after_act":
        for op in qm.ops.values():
            if hasattr(op, "oso_after_act"):
                op.oso_after_act = True
    engine = Engine(qm, spec, config)
    if spec.adaround:
        engine.run(data)
    qm.calib_history = engine.history
    qm.set_act_quant(True)
    return qm.cpu().eval()
