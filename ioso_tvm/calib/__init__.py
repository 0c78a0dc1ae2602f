"""Post-training calibration in torch (AdaRound / BRECQ / QDrop / IOSO, QFT plug-in), integer deploy mode.

``calibrate(model, calib_data, method=..., wbits=4, abits=4, config=CalibConfig()) -> QuantModel``.
"""
from __future__ import annotations

from .qmodel import Block, QuantModel, Step, build_qmodel

__all__ = ["Block", "QuantModel", "Step", "build_qmodel"]
